"""Issue 27's studies of Conba's controller beside MQAR (`mixcon.eval.recall --control-period`):

* ``init``: the controller's instruments (`mixcon.eval.control`) at initialisation, P = 1, 16, 64, the spec's
  initialisation and ``control_init="live"``, on the shift task's sequences (>= 4·P tokens);
* ``shift``: a token stream whose statistics change once, at a random point in the middle half: before it the
  tokens are drawn i.i.d. from one random distribution over ``support`` tokens of the vocabulary, after it
  from another. A model must notice the change in context and follow it; the loss after the change (overall
  and in windows of positions since it) is what feedback should help;
* ``extrapolation``: the same kind of stream with a change every ~``segment`` tokens (exponential gaps),
  trained at ``--train-len`` tokens and evaluated at ``--eval-lens`` (e.g. 4K, 8K): loss per position bin,
  and in the windows 0–16 and ≥ 64 tokens after a change (where a segment has settled, the training target
  applies: ``after_64_gap``, the gap to ln(support) at the training length).

Members (the MQAR study's): attention (RoPE), Mamba, Conba with every mechanism (control on, P = 64),
control off, control on with ``control_init="live"``. Same steps, batch, lr for every member; ≥ 3 seeds.
Every run is appended to OUT/runs.jsonl as it ends; ``--resume`` keeps those and runs the rest.

Training: AdamW, weight decay 0.1, cosine to 0 at ``--steps``; the shift task stops early once the held-out
loss before the change is within ``--target-gap`` (0.2) nats of ln(support), what knowing the support gives.
Each trained member with a controller is evaluated again with f ≡ 0 in every layer (``*_f0`` columns), and
the members are compared paired by seed (`paired_rows`: on − off, live − off, Conba − Mamba, as trained −
f ≡ 0; per-seed differences, paired t, sign in every seed).

    mixcon study control init --out eval/results/control/init
    mixcon study control shift --out eval/results/control/shift-trained
    mixcon study control extrapolation --out eval/results/control/extrapolation-16
    mixcon study control shift --smoke --out /tmp/x        # seconds
"""

from __future__ import annotations

import argparse
import json
import math
import os

import numpy as np

from mixcon.eval import grid


MEMBERS = ("attention", "mamba", "conba-all", "conba-noctl", "conba-live")
WINDOWS = ((0, 16), (16, 64), (64, None))  # positions since the change
EXTRAPOLATION_WINDOWS = (WINDOWS[0], WINDOWS[-1])  # right after a change, and where a segment has settled


def window(lo: int, hi: int | None) -> tuple:
    """(column name, mask of ``since`` (positions since the change) in [lo, hi)) of one window."""
    return f"loss_after_{lo}_{hi or 'end'}", lambda since: (since >= lo) & (since < hi) if hi else since >= lo


def piecewise_unigram(seed, n: int, seq_len: int, vocab: int, support: int = 8, changes: str = "one",
                      segment: int = 256):
    """``n`` token streams (int64, (n, seq_len)) and their change points.

    Each segment draws its tokens i.i.d. from a distribution over ``support`` random tokens (weights from a
    flat Dirichlet). ``changes="one"``: one change at a uniform position in [seq_len/4, 3·seq_len/4);
    returns (x, change) with change (n,). ``changes="many"``: a change after every exponential gap of mean
    ``segment``; returns (x, since) with since (n, seq_len) the positions since the start of each token's
    segment (0 at a segment's first token). A pure function of ``seed``."""
    if not 1 <= support <= vocab:
        raise ValueError(f"support={support} must be in [1, vocab={vocab}]")
    if changes not in ("one", "many"):
        raise ValueError(f"changes={changes!r} must be 'one' or 'many'")
    rng = np.random.default_rng(seed)
    x = np.empty((n, seq_len), dtype=np.int64)
    change = rng.integers(seq_len // 4, 3 * seq_len // 4, n) if changes == "one" else None
    since = np.empty((n, seq_len), dtype=np.int64) if changes == "many" else None
    for i in range(n):
        if changes == "one":
            bounds = [0, int(change[i]), seq_len]
        else:
            bounds = [0]
            while bounds[-1] < seq_len:
                bounds.append(min(seq_len, bounds[-1] + 1 + int(rng.exponential(segment))))
        for a, b in zip(bounds[:-1], bounds[1:]):
            toks = rng.choice(vocab, support, replace=False)
            p = rng.dirichlet(np.ones(support))
            x[i, a:b] = toks[rng.choice(support, b - a, p=p)]
            if since is not None:
                since[i, a:b] = np.arange(b - a)
    return x, (change if changes == "one" else since)


def _mean(a) -> float:
    """The mean, NaN for an empty selection (no warning)."""
    return float(a.mean()) if a.size else float("nan")


def _train(member, seq_len, vocab, width, depth, steps, batch, lr, warmup, seed, batch_fn, max_len, extra=None,
           stop=None, eval_every=100, checkpoint=None, desc=None):
    """A member trained on next-token loss over ``batch_fn(step)`` (int64 numpy (batch, seq_len)), AdamW with
    weight decay 0.1 and cosine to 0 at ``steps`` (`grid.train_steps`: every ``eval_every`` steps ``stop(model)``
    may end the training early, and otherwise the state is saved to ``checkpoint``; ``desc``: a progress bar
    with that title). Returns (model in eval mode, train losses, seconds per step)."""
    import torch

    from mixcon import MixConForCausalLM
    from mixcon.eval.recall import member_config
    from mixcon.train.loop import make_optimizer
    from mixcon.train.recipe import Recipe

    r = Recipe(lr=lr, max_steps=steps, warmup_steps=warmup, batch_size=batch, seq_len=seq_len, seed=seed,
               weight_decay=0.1, min_lr_ratio=0.0)
    config = member_config(member, width, depth, vocab, max_len, extra)
    torch.manual_seed(seed)
    model = MixConForCausalLM(config)
    optimizer = make_optimizer(model, r, torch.device("cpu"))

    def loss_at(model, step):
        ids = torch.from_numpy(batch_fn(step))
        return model(ids, labels=ids, use_cache=False).loss

    model, run = grid.train_steps(model, optimizer, r, loss_at, stop, eval_every, checkpoint, desc)
    return model, run["losses"], run["seconds"] / len(run["losses"])


def _token_losses(model, ids, batch: int):
    """Next-token cross-entropy at every position but the last: numpy (n, T − 1)."""
    import torch

    out = []
    with torch.no_grad():
        for i in range(0, ids.shape[0], batch):
            x = torch.from_numpy(ids[i:i + batch])
            logits = model(x, use_cache=False).logits[:, :-1].float()
            out.append(torch.nn.functional.cross_entropy(logits.transpose(1, 2), x[:, 1:], reduction="none").numpy())
    return np.concatenate(out)


def _control(model, ids, label, out_dir):
    import torch

    from mixcon.eval.recall import instrument

    return instrument(model, torch.from_numpy(ids), label, out_dir)


SETTINGS = ("width", "depth", "vocab", "support", "batch", "lr", "warmup")  # in every row, checked on --resume
RUN_ONLY = ("out", "resume", "no_progress", "budget_min", "threads", "members", "seeds", "smoke")  # not a run's


def checkpoint(task, member, seed, a):
    """The checkpoint of one run (`grid.Checkpoint`, under OUT), fingerprinted by the study's settings."""
    return grid.Checkpoint(a["out"], (task, member, seed), {k: v for k, v in a.items() if k not in RUN_ONLY})


def _desc(task, member, seed, a):
    """A run's progress-bar title, None (no bar) under --no-progress."""
    return None if a.get("no_progress") else f"{task} {member} seed={seed}"


def run_shift(member, seed, a) -> dict:
    vocab, T = a["vocab"], a["seq_len"]
    fn = lambda step: piecewise_unigram((seed, step), a["batch"], T, vocab, a["support"])[0]  # noqa: E731
    xv, change_v = piecewise_unigram((seed, 2**32 - 2), a["val_examples"], T, vocab, a["support"])
    since_v = np.arange(T - 1)[None, :] + 1 - change_v[:, None]
    goal = math.log(a["support"]) + a["target_gap"]  # knowing the support: ln(support) nats

    def stop(model):  # the held-out loss before the change, and whether it is within target_gap of ln(support)
        loss = _mean(_token_losses(model, xv, a["batch"])[since_v < 0])
        return loss, loss <= goal

    model, losses, step_s = _train(member, T, vocab, a["width"], a["depth"], a["steps"], a["batch"], a["lr"],
                                   a["warmup"], seed, fn, T, stop=stop if a["target_gap"] is not None else None,
                                   eval_every=a["eval_every"], checkpoint=checkpoint("shift", member, seed, a),
                                   desc=_desc("shift", member, seed, a))
    x, change = piecewise_unigram((seed, 2**32 - 1), a["eval_examples"], T, vocab, a["support"])
    since = np.arange(T - 1)[None, :] + 1 - change[:, None]  # target position − change
    tl = _token_losses(model, x, a["batch"])  # tl[:, t] predicts x[:, t + 1]
    from mixcon.eval.recall import feedback_off

    with feedback_off(model) as n_switched:
        tl0 = _token_losses(model, x, a["batch"]) if n_switched else None
    row = dict(member=member, seed=seed, steps=len(losses), max_steps=a["steps"], seq_len=T, step_time_s=step_s,
               **{k: a[k] for k in SETTINGS},
               train_loss=float(np.mean(losses[-max(1, len(losses) // 10):])),
               loss_before=_mean(tl[since < 0]), loss_after=_mean(tl[since >= 0]))
    row["before_gap"] = row["loss_before"] - math.log(a["support"])
    for name, mask in (window(*w) for w in WINDOWS):
        sel = mask(since)
        row[name] = _mean(tl[sel])
        row[name + "_f0"] = _mean(tl0[sel]) if tl0 is not None else None
    row["loss_after_f0"] = _mean(tl0[since >= 0]) if tl0 is not None else None
    curve = [_mean(tl[(since >= lo) & (since < lo + 8)]) for lo in range(-64, 192, 8)]
    row["curve"] = curve  # loss in bins of 8 positions from 64 before the change to 192 after
    out_dir = os.path.join(a["out"], "instruments") if seed == a["seeds"][0] else None
    row.update(_control(model, x[:4], f"shift {member} P={model.config.control_period} seed={seed}", out_dir))
    return row


def run_extrapolation(member, seed, a) -> dict:
    """One member trained at ``train_len`` tokens and tested on ``eval_examples`` streams of the longest
    ``eval_lens``: the mean loss over the first n positions (``loss_{n}``) and over the last half training
    length before n (``loss_last_{n}``); over the targets 0–16 and ≥ 64 tokens after a change
    (``loss_after_0_16_{n}``, ``loss_after_64_end_{n}``), n the training length and each test length; and
    ``after_64_gap``: ``loss_after_64_end`` at the training length − ln(support), how far the trained model
    is from knowing the support where a segment has settled (the shift task's ``before_gap``). A member with
    a controller is tested again with f ≡ 0 in every layer at the longest length (``*_f0``)."""
    from mixcon.eval.recall import feedback_off

    vocab, T = a["vocab"], a["train_len"]
    L = max(a["eval_lens"])
    gen = lambda s, n, t: piecewise_unigram(s, n, t, vocab, a["support"], "many", a["segment"])  # noqa: E731
    model, losses, step_s = _train(member, T, vocab, a["width"], a["depth"], a["steps"], a["batch"], a["lr"],
                                   a["warmup"], seed, lambda step: gen((seed, step), a["batch"], T)[0], L,
                                   eval_every=a["eval_every"], checkpoint=checkpoint("extrapolation", member, seed, a),
                                   desc=_desc("extrapolation", member, seed, a))
    x, since = gen((seed, 2**32 - 1), a["eval_examples"], L)
    since = since[:, 1:]  # of each target: tl[:, t] predicts x[:, t + 1]
    tl = _token_losses(model, x, 1)  # (n, L − 1)
    with feedback_off(model) as n_switched:
        tl0 = _token_losses(model, x, 1) if n_switched else None
    row = dict(member=member, seed=seed, steps=a["steps"], train_len=T, step_time_s=step_s,
               **{k: a[k] for k in SETTINGS},
               train_loss=float(np.mean(losses[-max(1, a["steps"] // 10):])),
               loss_train_len=float(tl[:, :T - 1].mean()))
    for n in a["eval_lens"]:
        row[f"loss_{n}"] = float(tl[:, :n - 1].mean())
        row[f"loss_last_{n}"] = float(tl[:, n - 1 - T // 2:n - 1].mean())  # the last half-train-length
    for n in [T, *a["eval_lens"]]:
        for name, mask in (window(*w) for w in EXTRAPOLATION_WINDOWS):
            sel = mask(since[:, :n - 1])
            row[f"{name}_{n}"] = _mean(tl[:, :n - 1][sel])
            if n == L:
                row[f"{name}_{n}_f0"] = _mean(tl0[:, :n - 1][sel]) if tl0 is not None else None
    row[f"loss_{L}_f0"] = float(tl0.mean()) if tl0 is not None else None
    row["after_64_gap"] = row[f"loss_after_64_end_{T}"] - math.log(a["support"])
    bin_ = a["bin"]
    row["curve"] = [float(tl[:, i:i + bin_].mean()) for i in range(0, L - 1, bin_)]
    out_dir = os.path.join(a["out"], "instruments") if seed == a["seeds"][0] else None
    row.update(_control(model, x[:1, :min(L, 4 * T)], f"extrapolation {member} {min(L, 4 * T)} tokens seed={seed}",
                        out_dir))
    return row


def run_init(a) -> list:
    """Instruments at initialisation: conba-all at each P and initialisation, seeds ``a['seeds']``."""
    import torch

    from mixcon import MixConForCausalLM
    from mixcon.eval import control
    from mixcon.eval.recall import member_config

    rows = []
    T = a["seq_len"]
    for init in ("spec", "live"):
        for P in (1, 16, 64):
            for seed in a["seeds"]:
                torch.manual_seed(seed)
                model = MixConForCausalLM(member_config("conba-all", a["width"], a["depth"], a["vocab"], T,
                                                        dict(control_period=P, control_init=init)))
                x, _ = piecewise_unigram((seed, 7), 2, T, a["vocab"], a["support"])
                sigs = control.model_signals(model, torch.from_numpy(x))
                if seed == a["seeds"][0]:
                    control.plot_signals(sigs, os.path.join(a["out"], f"init-{init}-P{P}.png"),
                                         f"conba-all at initialisation, control_init={init}, P={P}, {T} tokens")
                for s in sigs:
                    rows.append(dict(init=init, seed=seed, **control.summary_row(s)))
                print(f"init={init} P={P} seed={seed}: effect " +
                      ", ".join(f"{s['effect']:.2e}" for s in sigs), flush=True)
    return rows


SHIFT_COLS = ["member", "seed", "steps", "seq_len", "loss_before", "before_gap", "loss_after", "loss_after_0_16",
              "loss_after_16_64", "loss_after_64_end", "loss_after_f0", "loss_after_0_16_f0", "loss_after_16_64_f0",
              "loss_after_64_end_f0", "train_loss", "ctl_effect", "ctl_feedback", "ctl_k_end", "ctl_k_max_dev",
              "step_time_s"]


def extrapolation_cols(train_len: int, eval_lens: list) -> list:
    L = max(eval_lens)
    names = [window(*w)[0] for w in EXTRAPOLATION_WINDOWS]
    return (["member", "seed", "steps", "train_len", "loss_train_len", "after_64_gap"]
            + [f"loss_{n}" for n in eval_lens] + [f"loss_last_{n}" for n in eval_lens]
            + [f"{w}_{n}" for n in [train_len, *eval_lens] for w in names]
            + [f"loss_{L}_f0"] + [f"{w}_{L}_f0" for w in names]
            + ["train_loss", "ctl_effect", "ctl_feedback", "ctl_k_end", "ctl_k_max_dev", "step_time_s"])


def summarize(rows, cols) -> list:
    out = []
    for m in dict.fromkeys(r["member"] for r in rows):
        rs = [r for r in rows if r["member"] == m]
        s = dict(member=m, seeds=len(rs))
        for c in cols:
            if c in ("member", "seed", "seq_len", "train_len"):
                continue
            sp = grid.spread(r.get(c) for r in rs)
            s[c], s[c + "_min"], s[c + "_max"], s[c + "_std"] = sp["mean"], sp["min"], sp["max"], sp["std"]
        out.append(s)
    return out


PAIRS = (("control on − off", "conba-all", "conba-noctl"), ("control live − off", "conba-live", "conba-noctl"),
         ("Conba − Mamba", "conba-all", "mamba"), ("Conba − attention", "conba-all", "attention"))


def paired_rows(rows: list, metrics: list) -> list:
    """`PAIRS` and each controlled member's f ≡ 0 counterfactual (``metric`` − ``metric_f0``, where the runs
    carry it), per metric: `grid.paired` over the seeds."""
    by = {}
    for r in rows:
        by.setdefault(r["member"], {})[r["seed"]] = r
    out = []
    for name, a, b in PAIRS:
        if a in by and b in by:
            for m in metrics:
                out.append(dict(comparison=name, metric=m, **grid.paired(
                    {s: r[m] for s, r in by[a].items()}, {s: r[m] for s, r in by[b].items()})))
    for member, runs in by.items():
        for m in metrics:
            if all(r.get(m + "_f0") is not None for r in runs.values()) and runs:
                out.append(dict(comparison=f"{member}: as trained − f≡0", metric=m, **grid.paired(
                    {s: r[m] for s, r in runs.items()}, {s: r[m + "_f0"] for s, r in runs.items()})))
    return out


def paired_markdown(table: list) -> list:
    lines = ["", "Paired by seed (each seed fixes the data, the initial weights' seed and the noise): the difference "
             "a − b per seed (negative = a has the lower loss), its mean, the paired t (df = seeds − 1), Cohen's "
             "d_z; an effect is called only when the sign holds in every seed and |t| > the 0.975 quantile of t "
             "(4.30 at df 2).", "",
             "| comparison | metric | seeds | per-seed a − b | mean | t | d_z | verdict |",
             "| --- | --- | --- | --- | --- | --- | --- | --- |"]
    for p in table:
        lines.append(f"| {p['comparison']} | {p['metric']} | {p['n']} | " + ", ".join(f"{d:+.3f}" for d in p["diffs"])
                     + f" | {p['mean']:+.3f} | {grid.fmt(p['t'], 2)} | {grid.fmt(p['d_z'], 2)} | {p['verdict']} |")
    return lines


def write_markdown(task, summary, cols, meta, not_run, path, paired=()):
    a = meta["args"]
    shown = [c for c in cols if c not in ("member", "seed", "seq_len", "train_len", "ctl_k_max_dev")
             and not c.endswith("_f0")]
    lines = [f"Task `{task}`: {a['steps']} steps × {a['batch']} sequences, lr {a['lr']}, width {a['width']}, depth "
             f"{a['depth']}, vocabulary {a['vocab']} (support {a['support']}), seeds {a['seeds']}, "
             f"{a['eval_examples']} test sequences. Mean over seeds (min–max).",
             f"Device {meta['device']}, torch {meta['torch']}, transformers {meta['transformers']}, rev {meta['rev']}, "
             f"{meta['date']}, {meta.get('threads', 1)} thread. Command: `{meta['command']}`.", "",
             "| member | seeds | " + " | ".join(shown) + " |", "| --- | --- |" + " --- |" * len(shown)]
    for s in summary:
        cells = []
        for c in shown:
            v = s.get(c)
            if v is None or v != v:
                cells.append("")
            elif c.startswith("ctl_"):
                cells.append(f"{v:.2e}")
            elif c == "step_time_s":
                cells.append(f"{v:.3f}")
            else:
                p = 0 if c == "steps" else 3
                cells.append(f"{v:.{p}f}" + (f" ({s[c + '_min']:.{p}f}–{s[c + '_max']:.{p}f})" if s["seeds"] > 1 else ""))
        lines.append(f"| {s['member']} | {s['seeds']} | " + " | ".join(cells) + " |")
    if paired:
        lines += paired_markdown(paired)
    if not_run:
        lines += ["", f"Not run (budget {a['budget_min']} min): " + ", ".join(f"{m} seed {s}" for m, s in not_run)]
    grid.write_text(path, "\n".join(lines) + "\n")


def plot(task, rows, a, path, title):
    plt = grid.pyplot()
    if plt is None or not rows:
        return
    fig, ax = plt.subplots(figsize=(7.5, 4))
    for m in dict.fromkeys(r["member"] for r in rows):
        curves = np.array([r["curve"] for r in rows if r["member"] == m])
        if task == "shift":
            xs = np.arange(-64, 192, 8) + 4
        else:
            xs = np.arange(curves.shape[1]) * a["bin"] + a["bin"] / 2
        ok = np.isfinite(curves).all(0)  # bins every test sequence reaches
        xs, curves = xs[ok], curves[:, ok]
        line, = ax.plot(xs, curves.mean(0), lw=1.2, label=f"{m} ({len(curves)} seeds)")
        ax.fill_between(xs, curves.min(0), curves.max(0), color=line.get_color(), alpha=0.15)
    if task == "shift":
        ax.axvline(0, color="k", lw=0.8)
        ax.set_xlabel("position − change point")
    else:
        ax.axvline(a["train_len"], color="k", lw=0.8, ls="--")
        ax.set_xscale("log")
        ax.set_xlabel("position (dashed: training length)")
    ax.set_ylabel("next-token loss")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    ax.set_title(title, fontsize=8)
    fig.tight_layout()
    grid.save_figure(fig, path)


def main(argv=None):
    ap = argparse.ArgumentParser(prog="mixcon study control", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("task", choices=["init", "shift", "extrapolation"])
    ap.add_argument("--members", nargs="+", default=list(MEMBERS), choices=list(MEMBERS))
    ap.add_argument("--width", type=int, default=32)
    ap.add_argument("--depth", type=int, default=2)
    ap.add_argument("--vocab", type=int, default=64)
    ap.add_argument("--support", type=int, default=8, help="tokens per segment's distribution")
    ap.add_argument("--seq-len", type=int, default=512, help="shift and init: tokens per sequence")
    ap.add_argument("--train-len", type=int, default=1024, help="extrapolation: training length")
    ap.add_argument("--eval-lens", nargs="+", type=int, default=[4096, 8192], help="extrapolation: test lengths")
    ap.add_argument("--segment", type=int, default=256, help="extrapolation: mean tokens between changes")
    ap.add_argument("--bin", type=int, default=256, help="extrapolation: positions per point of the curve")
    ap.add_argument("--steps", type=int, default=None,
                    help="the most training steps, the cosine schedule's length (default: shift 3000, extrapolation 600)")
    ap.add_argument("--target-gap", type=float, default=0.2,
                    help="shift: stop once the held-out loss before the change is within this many nats of "
                         "ln(support), what knowing the support gives (checked every --eval-every steps)")
    ap.add_argument("--eval-every", type=int, default=100)
    ap.add_argument("--val-examples", type=int, default=16, help="shift: held-out sequences of the stop check")
    ap.add_argument("--batch", type=int, default=None, help="default: shift 8, extrapolation 4")
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--warmup", type=int, default=20)
    ap.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    ap.add_argument("--eval-examples", type=int, default=None, help="test sequences (default: shift 64, extrapolation 16)")
    ap.add_argument("--budget-min", type=float, default=None,
                    help="start no run that would end after this (default: no limit; --resume continues)")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--resume", action="store_true", help="keep the runs in OUT/runs.jsonl, run the rest")
    ap.add_argument("--out", required=True)
    ap.add_argument("--smoke", action="store_true", help="seconds: tiny sizes, 3 steps, one seed")
    ap.add_argument("--report", action="store_true",
                    help="train nothing: the tables, the paired comparisons and the plot from OUT/runs.jsonl")
    ap.add_argument("--no-progress", action="store_true")
    args = ap.parse_args(argv)
    args.resume = args.resume or args.report
    shift = args.task == "shift"
    args.steps = args.steps or (3000 if shift else 600)
    args.batch = args.batch or (8 if shift else 4)
    args.eval_examples = args.eval_examples or (64 if shift else 16)
    if args.smoke:
        args.width, args.steps, args.batch, args.seeds, args.eval_examples = 16, 3, 2, [0], 2
        args.val_examples, args.eval_every = 2, 2
        args.seq_len, args.train_len, args.eval_lens, args.segment, args.bin = 64, 32, [64, 128], 16, 16
    if args.task == "extrapolation" and min(args.eval_lens) <= args.train_len:
        ap.error(f"--eval-lens {args.eval_lens} must be longer than --train-len {args.train_len}")
    if args.resume and args.task != "init":
        settings = {k: (f"--{k.replace('_', '-')}", getattr(args, k)) for k in SETTINGS}
        settings["max_steps" if shift else "steps"] = ("--steps", args.steps)
        settings["seq_len" if shift else "train_len"] = ("--seq-len", args.seq_len) if shift else ("--train-len",
                                                                                                   args.train_len)
        try:
            grid.check_resume(args.out, settings)
        except ValueError as e:
            ap.error(str(e))
    import torch

    from mixcon.bench.common import header, save_results

    torch.set_num_threads(args.threads)
    os.makedirs(args.out, exist_ok=True)
    meta = header(torch.device("cpu"), dtype="float32", args=vars(args), threads=args.threads,
                  config_defaults=grid.config_defaults("control_period", "delay", "k_max"))
    print(json.dumps({k: v for k, v in meta.items() if k != "args"}), flush=True)
    a = dict(vars(args))
    if args.task == "init":
        rows = run_init(a)
        from mixcon.eval import control

        cols = list(rows[0])
        save_results(args.out, rows, cols, meta)
        grid.write_text(os.path.join(args.out, "init.md"),
                        f"Conba (conba-all, width {args.width}, depth {args.depth}) at initialisation on "
                        f"{args.seq_len}-token shift-task sequences, seeds {args.seeds}. rev {meta['rev']}, "
                        f"command `{meta['command']}`.\n\n" + control.format_table(rows) + "\n")
        print(f"wrote {args.out}/init.md", flush=True)
        return rows
    cols = SHIFT_COLS if shift else extrapolation_cols(args.train_len, args.eval_lens)
    fn = run_shift if shift else run_extrapolation
    jobs = [grid.Job(key=(m, s), fn=fn, args=(m, s, a), cost_key=m) for s in args.seeds for m in args.members]
    runlog = grid.RunLog(args.out, args.resume)
    done = runlog.done
    jobs = runlog.pending(jobs) if not args.report else []
    if args.report and not done:
        ap.error(f"--report: no runs in {runlog.path}")

    def report(key, row):
        runlog.add(key, row)
        checkpoint(args.task, *key, a).clear()
        print(f"{key[0]:12s} seed={key[1]}: " + ", ".join(
            f"{c} {row[c]:.4g}" for c in cols[4:] if isinstance(row.get(c), float)), flush=True)

    results, skipped = grid.run_jobs(jobs, args.budget_min * 60 if args.budget_min else None, 1, progress=not args.no_progress,
                                     desc=f"{args.task} runs", on_result=report)
    results = {**done, **results}
    rows = [results[k] for k in sorted(results, key=lambda k: (list(MEMBERS).index(k[0]), k[1]))]
    summary = summarize(rows, cols)
    metrics = (["loss_before", "loss_after_0_16", "loss_after_16_64", "loss_after_64_end", "loss_after"] if shift else
               ["loss_train_len", f"loss_after_64_end_{args.train_len}"]
               + [f"{c}_{max(args.eval_lens)}" for c in ("loss", "loss_last", "loss_after_0_16", "loss_after_64_end")])
    metrics = [m for m in metrics if all(m in r for r in rows)]  # runs of an older revision lack the newer columns
    paired = paired_rows(rows, metrics)
    save_results(args.out, rows, cols, meta, summary=summary, paired=paired, not_run=[list(k) for k in skipped])
    os.replace(os.path.join(args.out, "results.csv"), os.path.join(args.out, "summary.csv"))
    write_markdown(args.task, summary, cols, meta, skipped, os.path.join(args.out, f"{args.task}.md"), paired)
    plot(args.task, rows, a, os.path.join(args.out, f"{args.task}.png"),
         f"{args.task}: {args.steps} steps × {args.batch}, width {args.width}, depth {args.depth}, "
         f"rev {meta['rev']} (mean, min–max band over seeds)")
    grid.plot_paired(paired, metrics, os.path.join(args.out, f"{args.task}-paired.png"),
                     f"{args.task}: paired by seed, loss a − b (negative: a lower; bar: mean, line: 95 % interval), "
                     f"rev {meta['rev']}")
    print(f"wrote {args.out}/{args.task}.md, summary.csv, results.json, {args.task}.png, {args.task}-paired.png",
          flush=True)
    return rows


if __name__ == "__main__":
    main()
