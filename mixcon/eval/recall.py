"""Multi-query associative recall (MQAR, Arora et al. 2023, "Zoology"): can a member look up, in its
own context, the value that was paired with a key?

A sequence opens with ``pairs`` key–value pairs (keys from the lower half of the vocabulary, values
from the upper half, no key twice), then every key is queried once, at a distance drawn from a power
law (most queries soon after the context, a few far), the other positions filled with random
tokens. Only the answers are scored: at a query key the model must predict its value. Loss and
accuracy are over the answers alone. The data is a pure function of a seed (`mqar`); every training
step draws fresh sequences, and the test sequences come from a seed no training step uses.

Members, all built by MixConConfig's block builder: all attention (RoPE), Mamba (Conba with every
mechanism off and the linear selection), Conba with each mechanism alone and all together
(training noise σ = grid.NOISE), and hybrids with MixCon's Conba as shipped (1:3, 2:6, 1:7; a hybrid
whose block is longer than ``--depth`` runs at the depth its block needs, and the table says so).
Grid: width × (sequence length, pairs), one panel per length in the plot, as in Zoology's figures.

    python eval/recall.py --jobs 2                  # the CPU grid (widths 32, 64 at 64 tokens), ~55 min
    python eval/recall.py --widths 32 64 128 256 --cells 64:4 128:8 256:16 512:64 --depth 4 \\
        --steps 3000 --lrs 3e-4 1e-3 3e-3           # nearer the paper (a GPU); best lr per cell
    python eval/recall.py --smoke                   # seconds: every member, one tiny cell
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time

import numpy as np

from mixcon.eval import grid


MEMBERS = {  # name → (layout: "attention" | "conba" | "a:c", description, config overrides)
    # the claim's members first: when the budget runs out, the mechanisms-alone runs are the ones left out
    "attention": ("attention", "all attention, RoPE", dict(use_rope=True)),
    "mamba": ("conba", "Conba, every mechanism off, linear selection (= Mamba)", grid.mechanisms()),
    "conba-all": ("conba", "Conba, every mechanism on (noise too)", grid.mechanisms(*grid.MECHANISM_ON)),
    "conba-noctl": ("conba", "Conba, every mechanism on but control (noise too)",
                    {**grid.mechanisms(*grid.MECHANISM_ON), "control": False}),
    "conba-live": ("conba", "Conba, every mechanism on, control_init='live' (k0 = 0.5, λ₁ = 0.005)",
                   {**grid.mechanisms(*grid.MECHANISM_ON), "control_init": "live"}),
    "hybrid-1:3": ("1:3", "MixCon 1:3 (Conba as shipped)", {}),
    "hybrid-2:6": ("2:6", "MixCon 2:6 (Conba as shipped)", {}),
    "hybrid-1:7": ("1:7", "MixCon 1:7 (Conba as shipped)", {}),
    "conba+delay": ("conba", "Mamba + delayed state (τ = 2)", grid.mechanisms("delay")),
    "conba+scaling": ("conba", "Mamba + dynamic state scaling", grid.mechanisms("scaling")),
    "conba+control": ("conba", "Mamba + adaptive control", grid.mechanisms("control")),
    "conba+noise": ("conba", f"Mamba + training noise (σ = {grid.NOISE})", grid.mechanisms("noise")),
    "conba+selection": ("conba", "Mamba + SwiGLU selection", grid.mechanisms("selection")),
}
CLAIM = ("attention", "mamba", "conba-all", "conba-noctl", "conba-live", "hybrid-1:3", "hybrid-2:6",
         "hybrid-1:7")  # the paper's claims (issue 27 adds control off and control_init='live')
# the default run (no --members) keeps the members it had before issue 27
DEFAULT_MEMBERS = [m for m in MEMBERS if m not in ("conba-noctl", "conba-live")]
COLS = ["member", "width", "depth", "seq_len", "pairs", "vocab", "lr", "seed", "control_period", "params_M", "steps",
        "accuracy", "answer_loss", "train_loss", "ctl_effect", "ctl_feedback", "ctl_k_end", "ctl_k_max_dev",
        "step_time_s", "step_cpu_s", "seconds", "description"]


def mqar(seed, n: int, seq_len: int, pairs: int, vocab: int, power_a: float = 0.01, random_fill: bool = True):
    """``n`` MQAR sequences as (inputs, targets), int64 numpy arrays of shape (n, seq_len); targets are
    -100 except at the query positions, where they hold the value paired with the queried key.
    ``seed``: an int or a tuple of ints (numpy SeedSequence entropy) — the arrays depend on nothing else."""
    half = vocab // 2
    if pairs < 1 or seq_len < 4 * pairs:
        raise ValueError(f"pairs={pairs} must be >= 1 and seq_len={seq_len} >= 4 * pairs (context + queries)")
    if half - 1 < pairs:
        raise ValueError(f"vocab={vocab} must give at least pairs={pairs} keys: keys are 1 .. vocab // 2 - 1")
    if not 0 < power_a <= 1:
        raise ValueError(f"power_a={power_a} must be in (0, 1]")
    rng = np.random.default_rng(seed)
    keys = np.argsort(rng.random((n, half - 1)), axis=1)[:, :pairs] + 1  # distinct within a sequence
    values = np.argsort(rng.random((n, vocab - half)), axis=1)[:, :pairs] + half
    x = rng.integers(0, vocab, (n, seq_len)) if random_fill else np.zeros((n, seq_len), dtype=np.int64)
    x[:, 0:2 * pairs:2], x[:, 1:2 * pairs:2] = keys, values
    # query slots: every other position after the context; slot i drawn with weight ∝ i^(a−1), without
    # replacement (Gumbel top-k is sequential weighted sampling without replacement)
    space = (seq_len - 2 * pairs) // 2
    logw = (power_a - 1) * np.log(np.arange(1, space + 1))
    slots = np.argsort(-(logw + rng.gumbel(size=(n, space))), axis=1)[:, :pairs]
    pos = 2 * pairs + 2 * slots
    np.put_along_axis(x, pos, keys, axis=1)
    y = np.full((n, seq_len), -100, dtype=np.int64)
    np.put_along_axis(y, pos, values, axis=1)
    return x.astype(np.int64), y


def member_layout(member: str, depth: int) -> dict:
    """Layout fields of MixConConfig for ``member`` at ``depth`` layers (a hybrid whose block does not
    divide ``depth`` gets the next depth its block fits)."""
    layout = MEMBERS[member][0]
    if layout == "attention":
        return dict(n_blocks=1, layers_per_block=depth, attn_ratio=f"{depth}:0")
    if layout == "conba":
        return dict(n_blocks=1, layers_per_block=depth, attn_ratio=f"0:{depth}")
    a, c = (int(v) for v in layout.split(":"))
    block = a + c
    return dict(n_blocks=max(1, math.ceil(depth / block)), layers_per_block=block, attn_ratio=layout)


def member_config(member: str, width: int, depth: int, vocab: int, seq_len: int, extra: dict | None = None):
    from mixcon import MixConConfig

    if member not in MEMBERS:
        raise ValueError(f"member={member!r} is not one of {list(MEMBERS)}")
    heads = max(1, width // 16)
    kw = dict(vocab_size=vocab, hidden_size=width, intermediate_size=2 * width, moe_every=0,
              num_attention_heads=heads, num_key_value_heads=heads, max_position_embeddings=max(seq_len, 64),
              **member_layout(member, depth))
    kw.update(MEMBERS[member][2])
    kw.update(extra or {})
    return MixConConfig(**kw)


def train_member(member, width, depth, seq_len, pairs, vocab, steps, batch, lr, warmup, seed, data_seed,
                 eval_examples, extra=None, instrument_dir=None) -> dict:
    """Train one member on fresh MQAR batches (step s draws seed (data_seed, s)) with the training tool's
    optimizer and schedule; test on ``eval_examples`` sequences of seed (data_seed, 2**32 − 1), which no
    step draws. A member with Conba's controller is instrumented after training (`mixcon.eval.control`,
    on 4 test sequences: ctl_* columns, the mean over layers); with ``instrument_dir`` the per-layer plot
    and table go there."""
    import torch

    from mixcon import MixConForCausalLM
    from mixcon.train.loop import lr_at, make_optimizer
    from mixcon.train.recipe import Recipe

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    r = Recipe(lr=lr, max_steps=steps, warmup_steps=warmup, batch_size=batch, seq_len=seq_len, seed=seed)
    config = member_config(member, width, depth, vocab, seq_len, extra)
    torch.manual_seed(seed)
    model = MixConForCausalLM(config).to(device).train()
    optimizer = make_optimizer(model, r, device)
    autocast = lambda: torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda")  # noqa: E731

    def answer_loss(x, y):
        with autocast():
            logits = model(x, use_cache=False).logits.float()
        mask = y != -100
        return torch.nn.functional.cross_entropy(logits[mask], y[mask]), logits, mask

    t0, c0 = time.perf_counter(), time.process_time()
    losses = []
    for step in range(1, steps + 1):
        for g in optimizer.param_groups:
            g["lr"] = lr_at(step, r)
        x, y = (torch.from_numpy(a).to(device) for a in mqar((data_seed, step), batch, seq_len, pairs, vocab))
        loss, _, _ = answer_loss(x, y)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), r.grad_clip)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss.item())
    train_s, train_cpu = time.perf_counter() - t0, time.process_time() - c0
    model.eval()
    x, y = (torch.from_numpy(a).to(device) for a in mqar((data_seed, 2**32 - 1), eval_examples, seq_len, pairs, vocab))
    correct, total, loss_sum = 0, 0, 0.0
    with torch.no_grad():
        for i in range(0, eval_examples, batch):
            loss, logits, mask = answer_loss(x[i:i + batch], y[i:i + batch])
            correct += (logits.argmax(-1)[mask] == y[i:i + batch][mask]).sum().item()
            loss_sum += loss.item() * mask.sum().item()
            total += mask.sum().item()
    tail = losses[-max(1, steps // 10):]
    ctl = instrument(model, x[:4].cpu(), f"{member} w={width} L={seq_len} P={config.control_period} seed={seed}",
                     instrument_dir)
    return dict(member=member, description=MEMBERS[member][1], width=width, control_period=config.control_period,
                **ctl, depth=config.num_hidden_layers, seq_len=seq_len, pairs=pairs, vocab=vocab, lr=lr, seed=seed,
                params_M=sum(p.numel() for p in model.parameters()) / 1e6, steps=steps,
                accuracy=correct / total, answer_loss=loss_sum / total, train_loss=sum(tail) / len(tail),
                step_time_s=train_s / steps, step_cpu_s=train_cpu / steps, seconds=time.perf_counter() - t0)


def instrument(model, ids, label: str, out_dir=None) -> dict:
    """ctl_effect, ctl_feedback, ctl_k_end, ctl_k_max_dev (means over the Conba layers with control;
    None without any) of a trained model on ``ids``; the per-layer plot and table into ``out_dir``."""
    from mixcon.eval import control

    keys = ("effect", "feedback", "k_end", "k_max_dev")
    if not any(m.control for m in control.conba_mixers(model)):
        return {f"ctl_{k}": None for k in keys}
    model = model.cpu().float()
    sigs = control.model_signals(model, ids)
    if out_dir:
        os.makedirs(out_dir, exist_ok=True)
        name = label.replace(" ", "_").replace("=", "").replace(":", "-")
        control.plot_signals(sigs, os.path.join(out_dir, name + ".png"), label)
        grid.write_text(os.path.join(out_dir, name + ".md"),
                        f"{label}\n\n" + control.format_table([control.summary_row(s) for s in sigs]) + "\n")
    return {f"ctl_{k}": sum(s[k] for s in sigs) / len(sigs) for k in keys}


def estimate(args) -> float:
    """CPU seconds of one training step of every (member, width, cell) (one warm-up step, then one timed),
    and the grid's time from them (steps × lrs × seeds runs each, evaluation left out). Prints a table."""
    import torch

    from mixcon import MixConForCausalLM

    total = 0.0
    for seq_len, pairs in args.cells:
        for width in args.widths:
            for m in args.members:
                model = MixConForCausalLM(member_config(m, width, args.depth, args.vocab, seq_len,
                                                        extra_overrides(m, args))).train()
                x, y = (torch.from_numpy(a) for a in mqar(0, args.batch, seq_len, pairs, args.vocab))
                for _ in range(2):
                    c0 = time.process_time()
                    logits = model(x, use_cache=False).logits
                    torch.nn.functional.cross_entropy(logits[y != -100], y[y != -100]).backward()
                    step = time.process_time() - c0
                minutes = step * args.steps * len(args.lrs) * len(args.seeds) / 60
                total += minutes
                print(f"L={seq_len:<4d} w={width:<4d} {m:16s} {step:6.3f} CPU s/step → {minutes:6.1f} CPU min",
                      flush=True)
    print(f"total {total:.0f} CPU min: ≈ {total / args.jobs:.0f} min with --jobs {args.jobs} on idle cores", flush=True)
    return total


def extra_overrides(member: str, args) -> dict:
    """--control-period for every member with Conba layers (MixConConfig's field; others ignore it)."""
    return {} if args.control_period is None or MEMBERS[member][0] == "attention" else dict(
        control_period=args.control_period)


def summarize(rows: list) -> list:
    """Per (member, width, seq_len, pairs): mean accuracy over seeds at each lr, the best lr's kept
    (Zoology reports each model at its best learning rate)."""
    groups = {}
    for r in rows:
        groups.setdefault((r["member"], r["width"], r["seq_len"], r["pairs"]), {}).setdefault(r["lr"], []).append(r)
    out = []
    for (member, width, seq_len, pairs), by_lr in groups.items():
        best_lr = max(by_lr, key=lambda lr: grid.spread(x["accuracy"] for x in by_lr[lr])["mean"])
        rs = by_lr[best_lr]
        acc = grid.spread(x["accuracy"] for x in rs)
        out.append(dict(member=member, width=width, seq_len=seq_len, pairs=pairs, depth=rs[0]["depth"],
                        lr=best_lr, accuracy=acc["mean"], accuracy_std=acc["std"], seeds=acc["n"],
                        accuracy_min=acc["min"], accuracy_max=acc["max"],
                        ctl_effect=grid.spread(x.get("ctl_effect") for x in rs)["mean"],
                        ctl_feedback=grid.spread(x.get("ctl_feedback") for x in rs)["mean"],
                        answer_loss=grid.spread(x["answer_loss"] for x in rs)["mean"],
                        step_time_s=grid.spread(x["step_time_s"] for x in rs)["mean"]))
    return out


def plot(summary: list, cells: list, members: list, path: str, title: str) -> None:
    plt = grid.pyplot()
    if plt is None:
        return
    fig, axes = plt.subplots(1, len(cells), figsize=(4.2 * len(cells) + 1.6, 3.8), squeeze=False)
    cmap = plt.get_cmap("tab20")
    for ax, (seq_len, pairs) in zip(axes[0], cells):
        for i, m in enumerate(members):
            pts = sorted((s["width"], s["accuracy"]) for s in summary
                         if s["member"] == m and s["seq_len"] == seq_len and s["pairs"] == pairs)
            if pts:
                style = dict(color="k", lw=2) if m == "attention" else dict(color=cmap(i % 20))
                ax.plot(*zip(*pts), "o-", label=m, ms=4, **style)
        ax.set_xscale("log", base=2)
        ax.set_ylim(-0.02, 1.02)
        ax.set_title(f"sequence length {seq_len}, {pairs} pairs", fontsize=9)
        ax.set_xlabel("model width")
        ax.set_ylabel("MQAR accuracy")
        ax.grid(alpha=0.3)
    axes[0][-1].legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.02, 1.0))
    fig.suptitle(title, fontsize=8)
    fig.tight_layout()
    grid.save_figure(fig, path)


def write_markdown(summary, skipped, cells, widths, members, meta, path):
    a = meta["args"]
    lines = [f"MQAR accuracy on {a['eval_examples']} test sequences (vocabulary {a['vocab']}), after {a['steps']} "
             f"steps × {a['batch']} sequences, lr {a['lrs']} (best per cell when several), warm-up {a['warmup']}, "
             f"seeds {a['seeds']}, depth {a['depth']}.",
             f"Device {meta['device']}, torch {meta['torch']}, transformers {meta['transformers']}, rev {meta['rev']}, "
             f"{meta['date']}. Command: `{meta['command']}`. Config defaults: {meta['config_defaults']}.", ""]
    head = [f"L={s} ({p} pairs) w={w}" for s, p in cells for w in widths]

    def cell(r):
        if r["seeds"] > 1:
            return f"{r['accuracy']:.3f} ({r['accuracy_min']:.3f}–{r['accuracy_max']:.3f})"
        return grid.fmt(r["accuracy"], 3)

    lines += ["| member | depth | " + " | ".join(head) + " |", "| --- | --- |" + " --- |" * len(head)]
    by = {(s["member"], s["width"], s["seq_len"], s["pairs"]): s for s in summary}
    for m in members:
        rows = [by.get((m, w, sl, p)) for sl, p in cells for w in widths]
        depth = next((r["depth"] for r in rows if r), "")
        lines.append(f"| {m} | {depth} | " + " | ".join(cell(r) if r else "not run" for r in rows) + " |")
    if any(s.get("ctl_effect") == s.get("ctl_effect") and s.get("ctl_effect") is not None for s in summary):
        lines += ["", "Controller after training (mixcon.eval.control, mean over layers and seeds): share of the layer "
                  "output due to the feedback rms(out − out[f≡0]) / rms(out), and rms(f) / rms(u).", "",
                  "| member | " + " | ".join(head) + " |", "| --- |" + " --- |" * len(head)]
        for m in members:
            rows = [by.get((m, w, sl, p)) for sl, p in cells for w in widths]
            if any(r and r.get("ctl_effect") == r.get("ctl_effect") for r in rows):
                lines.append(f"| {m} | " + " | ".join(
                    f"{r['ctl_effect']:.2e} / {r['ctl_feedback']:.2e}" if r else "" for r in rows) + " |")
    if skipped:
        lines += ["", f"Not run (time budget of {a['budget_min']} min): " + ", ".join(
            f"{k[0]} w={k[1]} L={k[2]}/{k[3]} lr={k[4]} seed={k[5]}" for k in skipped) + "."]
    grid.write_text(path, "\n".join(lines) + "\n")


def parse_cell(s: str) -> tuple:
    try:
        seq_len, pairs = (int(v) for v in s.split(":"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"cell {s!r} must be SEQ_LEN:PAIRS, e.g. 128:8")
    return seq_len, pairs


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--members", nargs="+", default=DEFAULT_MEMBERS, choices=list(MEMBERS))
    ap.add_argument("--control-period", type=int, default=None,
                    help="control_period of every member with Conba layers (default: the config's)")
    ap.add_argument("--resume", action="store_true",
                    help="keep the runs already in OUT/runs.jsonl (written as each run ends) and run the rest")
    ap.add_argument("--instruments", action="store_true",
                    help="per-layer controller plots and tables (first seed's runs) under OUT/instruments")
    # the CPU default: the claim's members at widths 16 and 32 fit --budget-min 55 with --jobs 2 (0.01-0.4
    # CPU s per step); 3000 steps because a 2-layer transformer at width 32 sits at 1/4 accuracy (one of
    # the four values in context) for over 1500 steps before it solves 64:4 (4000 steps: 1.000, measured
    # at lr 3e-3); the paper's grid is for a GPU (README)
    ap.add_argument("--widths", nargs="+", type=int, default=None, help="default 16 32 (--smoke: 16)")
    ap.add_argument("--cells", nargs="+", type=parse_cell, default=[(64, 4)], help="SEQ_LEN:PAIRS ...")
    ap.add_argument("--vocab", type=int, default=64)
    ap.add_argument("--depth", type=int, default=2,
                    help="layers of every member (Zoology's 2; a hybrid: the depth its block fits, 4 or 8)")
    ap.add_argument("--steps", type=int, default=3000)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--lrs", nargs="+", type=float, default=[3e-3])
    ap.add_argument("--warmup", type=int, default=20)
    ap.add_argument("--seeds", nargs="+", type=int, default=[0])
    ap.add_argument("--eval-examples", type=int, default=512)
    ap.add_argument("--budget-min", type=float, default=55.0, help="start no run that would end after this")
    ap.add_argument("--jobs", type=int, default=1, help="runs at a time, in separate one-thread processes")
    ap.add_argument("--threads", type=int, default=None, help="torch threads when --jobs 1 (default 1 on CPU)")
    ap.add_argument("--out", default=os.path.join("eval", "results", "recall"))
    ap.add_argument("--smoke", action="store_true", help="seconds: every member, width 16, one 16-token cell")
    ap.add_argument("--estimate", action="store_true", help="time one step of each run, print the grid's time")
    ap.add_argument("--no-progress", action="store_true")
    args = ap.parse_args(argv)
    if args.smoke:
        args.widths, args.cells, args.vocab, args.steps, args.batch = args.widths or [16], [(16, 2)], 16, 3, 4
        args.eval_examples, args.warmup = 8, 1
    args.widths = args.widths or [16, 32]
    for s, p in args.cells:
        mqar(0, 1, s, p, args.vocab)  # bad cells fail now, not in the middle of the grid
    import torch

    from mixcon.benchmark import header, save_results

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.type == "cpu":  # these models are small: one thread per process beats two contending
        torch.set_num_threads(args.threads or 1)
    if args.control_period is not None and args.control_period < 1:
        ap.error(f"--control-period {args.control_period} must be >= 1")
    if args.estimate:
        return estimate(args)
    meta = header(device, dtype="bf16 autocast" if device.type == "cuda" else "float32", args=vars(args),
                  config_defaults=grid.config_defaults("control_period", "delay", "k_max"))
    print(json.dumps({k: v for k, v in meta.items() if k != "args"}), flush=True)
    jobs = []
    # the claim's members (attention, Mamba, Conba, hybrids) in every cell and width before any
    # mechanism-alone member: when the budget runs out, those are the runs left out
    claim = [m for m in args.members if m in CLAIM]
    for group in (claim, [m for m in args.members if m not in CLAIM]):
        for seq_len, pairs in args.cells:
            for width in args.widths:
                for lr in args.lrs:
                    for seed in args.seeds:
                        for m in group:
                            kw = dict(member=m, width=width, depth=args.depth, seq_len=seq_len, pairs=pairs,
                                      vocab=args.vocab, steps=args.steps, batch=args.batch, lr=lr,
                                      warmup=args.warmup, seed=seed, data_seed=seed,
                                      eval_examples=args.eval_examples, extra=extra_overrides(m, args),
                                      instrument_dir=os.path.join(args.out, "instruments")
                                      if args.instruments and seed == args.seeds[0] else None)
                            jobs.append(grid.Job(key=(m, width, seq_len, pairs, lr, seed), fn=train_member,
                                                 kwargs=kw, cost_key=(m, width, seq_len)))

    os.makedirs(args.out, exist_ok=True)
    runlog = grid.RunLog(args.out, args.resume)
    done = runlog.done
    jobs = runlog.pending(jobs)
    if done:
        print(f"resume: {len(done)} runs kept from {runlog.path}", flush=True)

    def report(key, row):
        runlog.add(key, row)
        print(f"{key[0]:16s} w={key[1]:<4d} L={key[2]:<4d} pairs={key[3]:<3d} lr={key[4]:.0e} seed={key[5]}: "
              f"accuracy {row['accuracy']:.3f}, answer loss {row['answer_loss']:.3f}, "
              f"{row['step_time_s'] * 1e3:.0f} ms/step", flush=True)

    results, skipped = grid.run_jobs(jobs, args.budget_min * 60, args.jobs, progress=not args.no_progress,
                                     desc="recall runs", on_result=report)
    results = {**done, **results}
    rows = [results[k] for k in results]
    summary = summarize(rows)
    os.makedirs(args.out, exist_ok=True)
    meta["args"]["cells"] = [list(c) for c in args.cells]
    save_results(args.out, rows, COLS, meta, summary=summary, not_run=[list(k) for k in skipped])
    write_markdown(summary, skipped, args.cells, args.widths, args.members, meta, os.path.join(args.out, "recall.md"))
    plot(summary, args.cells, args.members, os.path.join(args.out, "recall.png"),
         f"MQAR, vocabulary {args.vocab}, {args.steps} steps × {args.batch}, depth {args.depth} "
         f"({meta['device']}, rev {meta['rev']})")
    if skipped:
        print(f"not run (budget {args.budget_min} min): {len(skipped)} of {len(jobs)} runs, listed in recall.md")
    print(f"wrote {args.out}/recall.md, results.csv, results.json, recall.png")
    return rows, skipped


if __name__ == "__main__":
    main()
