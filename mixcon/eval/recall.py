"""Multi-query associative recall (MQAR, Arora et al. 2023, "Zoology"): can a member look up, in its
own context, the value that was paired with a key?

**The task is Zoology's.** A sequence opens with ``pairs`` key–value pairs (keys from the lower half of
the vocabulary, 1 .. vocab/2 − 1, values from the upper half, no key twice), then every key is queried
once, at a distance drawn from a power law (most queries soon after the context, a few far). Every other
position holds token 0 (Zoology's default); ``random_fill=True`` fills them with random tokens that are
never a key of the sequence. The vocabulary must exceed the sequence length (Zoology asserts it). Only
the answers are scored: at a query key the model must predict its value; loss and accuracy are over the
answers alone. The data is a pure function of a seed (`mqar`); every training step draws fresh sequences,
the held-out (early stop) and test sequences come from seeds no training step uses.

**The protocol is Zoology's, CPU-sized** (`run_member`): AdamW (β = 0.9, 0.95), weight decay 0.1 on the
matrices, a short linear warm-up then cosine to 0 at ``--steps``; a learning-rate sweep (``--lrs``) on the
first seed of each member, in the given order, stopping at the first that reaches the target (or every
one with ``--full-sweep``), the best learning rate (highest test accuracy, then fewest steps) kept for the
other seeds; early stop once the held-out accuracy (``--val-examples`` sequences, every
``--eval-every`` steps) reaches ``--target`` (0.99); the final accuracy on ``--eval-examples`` (≥ 1000)
test sequences. Attention has ``--heads`` heads (Zoology: one head of the full width) and RoPE (this
config has no learned positions); the hybrids' attention layers are NoPE, as MixCon's are.

**A pilot gate** (`gate`): all-attention runs first in every cell; the other members of a cell run only
if attention reaches ``--gate`` (0.95) in every seed there — a grid in which attention fails decides
nothing (``--no-gate`` runs them anyway, and the table says the cell failed its gate).

**Control ablations**: every trained member with Conba's controller is evaluated a second time with
f ≡ 0 in every layer (`feedback_off`: the same weights, no gain, no feedback): ``accuracy_f0``,
``answer_loss_f0``. The paired comparisons (`PAIRS`, `grid.paired`) take the members' runs of the same
seed (same data, same initial-weight seed) and report the per-seed differences, their mean, the paired t
and whether the sign holds in every seed.

Members, all built by MixConConfig's block builder: all attention, Mamba (Conba with every mechanism off
and the linear selection), Conba with every mechanism (control on / off / ``control_init="live"``),
hybrids with MixCon's Conba as shipped (1:3 at depth 4, 2:6 and 1:7 at depth 8), and ``conba-deep``, a
pure Conba of the hybrids' depth (8), so that depth and hybridisation are told apart; each Conba
mechanism alone for the mechanism study.

    mixcon study recall --cells 64:4 --control-period 8 --out eval/results/recall/L64  # the deciding cell
    mixcon study recall --smoke --out /tmp/r                                           # seconds
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
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
    "conba-deep": ("conba", "Conba, every mechanism on, at the hybrids' depth (8 layers)",
                   grid.mechanisms(*grid.MECHANISM_ON)),
    "conba+delay": ("conba", "Mamba + delayed state (τ = 2)", grid.mechanisms("delay")),
    "conba+scaling": ("conba", "Mamba + dynamic state scaling", grid.mechanisms("scaling")),
    "conba+control": ("conba", "Mamba + adaptive control", grid.mechanisms("control")),
    "conba+noise": ("conba", f"Mamba + training noise (σ = {grid.NOISE})", grid.mechanisms("noise")),
    "conba+selection": ("conba", "Mamba + SwiGLU selection", grid.mechanisms("selection")),
}
MEMBER_DEPTH = {"conba-deep": 8}  # members whose depth is fixed, whatever --depth says
CLAIM = ("attention", "mamba", "conba-all", "conba-noctl", "conba-live", "hybrid-1:3", "hybrid-2:6",
         "hybrid-1:7", "conba-deep")  # the paper's claims, and the depth control
DEFAULT_MEMBERS = list(CLAIM)
# the paired comparisons: (name, member a, member b); the effect is a − b, per seed
PAIRS = (
    ("Mamba − attention", "mamba", "attention"),
    ("control on − off", "conba-all", "conba-noctl"),
    ("control live − off", "conba-live", "conba-noctl"),
    ("Conba − Mamba", "conba-all", "mamba"),
    ("Conba − attention", "conba-all", "attention"),
    ("1:3 − attention", "hybrid-1:3", "attention"),
    ("2:6 − attention", "hybrid-2:6", "attention"),
    ("1:7 − attention", "hybrid-1:7", "attention"),
    ("2:6 − Mamba", "hybrid-2:6", "mamba"),
    ("1:7 − Mamba", "hybrid-1:7", "mamba"),
    ("2:6 − 1:7", "hybrid-2:6", "hybrid-1:7"),
    ("2:6 − Conba of its depth", "hybrid-2:6", "conba-deep"),
    ("1:7 − Conba of its depth", "hybrid-1:7", "conba-deep"),
    ("Conba depth 8 − depth 2", "conba-deep", "conba-all"),
)
COLS = ["member", "width", "depth", "heads", "seq_len", "pairs", "vocab", "lr", "seed", "role", "control_period",
        "params_M", "steps", "max_steps", "stopped_early", "accuracy", "answer_loss", "accuracy_f0", "answer_loss_f0",
        "val_accuracy", "train_loss", "ctl_effect", "ctl_feedback", "ctl_k_end", "ctl_k_max_dev", "step_time_s",
        "step_cpu_s", "seconds", "description"]
TEST_SEED, VAL_SEED = 2**32 - 1, 2**32 - 2  # the data seeds' second word of the test and held-out sets


def mqar(seed, n: int, seq_len: int, pairs: int, vocab: int, power_a: float = 0.01, random_fill: bool = False):
    """``n`` MQAR sequences as (inputs, targets), int64 numpy arrays of shape (n, seq_len); targets are
    -100 except at the query positions, where they hold the value paired with the queried key.
    Non-query positions after the context hold 0, or with ``random_fill`` random tokens of 1 .. vocab − 1
    that are never a key of their sequence.
    ``seed``: an int or a tuple of ints (numpy SeedSequence entropy) — the arrays depend on nothing else."""
    half = vocab // 2
    if pairs < 1 or seq_len < 4 * pairs:
        raise ValueError(f"pairs={pairs} must be >= 1 and seq_len={seq_len} >= 4 * pairs (context + queries)")
    if vocab <= seq_len:
        raise ValueError(f"vocab={vocab} must be > seq_len={seq_len} (Zoology's MQAR asserts vocab_size > "
                         f"input_seq_len)")
    # vocab > seq_len >= 4 * pairs leaves vocab // 2 - 1 >= pairs keys
    if not 0 < power_a <= 1:
        raise ValueError(f"power_a={power_a} must be in (0, 1]")
    rng = np.random.default_rng(seed)
    keys = np.argsort(rng.random((n, half - 1)), axis=1)[:, :pairs] + 1  # distinct within a sequence
    values = np.argsort(rng.random((n, vocab - half)), axis=1)[:, :pairs] + half
    x = np.zeros((n, seq_len), dtype=np.int64)
    if random_fill:
        is_key = np.zeros((n, vocab), dtype=bool)
        np.put_along_axis(is_key, keys, True, axis=1)
        x = rng.integers(1, vocab, (n, seq_len))
        bad = np.take_along_axis(is_key, x, axis=1)
        while bad.any():  # redraw the fillers that hit a key of their sequence
            x[bad] = rng.integers(1, vocab, int(bad.sum()))
            bad = np.take_along_axis(is_key, x, axis=1)
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


def member_depth(member: str, depth: int) -> int:
    return MEMBER_DEPTH.get(member, depth)


def member_layout(member: str, depth: int) -> dict:
    """Layout fields of MixConConfig for ``member`` at ``depth`` layers (a hybrid whose block does not
    divide ``depth`` gets the next depth its block fits; a member of `MEMBER_DEPTH` its own depth)."""
    layout = MEMBERS[member][0]
    depth = member_depth(member, depth)
    if layout == "attention":
        return dict(n_blocks=1, layers_per_block=depth, attn_ratio=f"{depth}:0")
    if layout == "conba":
        return dict(n_blocks=1, layers_per_block=depth, attn_ratio=f"0:{depth}")
    a, c = (int(v) for v in layout.split(":"))
    block = a + c
    return dict(n_blocks=max(1, math.ceil(depth / block)), layers_per_block=block, attn_ratio=layout)


def member_config(member: str, width: int, depth: int, vocab: int, seq_len: int, extra: dict | None = None,
                  heads: int | None = None):
    """The member's MixConConfig. ``heads``: attention heads (default width // 16; Zoology's MQAR uses 1)."""
    from mixcon import MixConConfig

    if member not in MEMBERS:
        raise ValueError(f"member={member!r} is not one of {list(MEMBERS)}")
    heads = heads or max(1, width // 16)
    if width % heads:
        raise ValueError(f"heads={heads} must divide width={width}")
    kw = dict(vocab_size=vocab, hidden_size=width, intermediate_size=2 * width, moe_every=0,
              num_attention_heads=heads, num_key_value_heads=heads, max_position_embeddings=max(seq_len, 64),
              **member_layout(member, depth))
    kw.update(MEMBERS[member][2])
    kw.update(extra or {})
    return MixConConfig(**kw)


@contextlib.contextmanager
def feedback_off(model):
    """Within the block, every Conba layer of ``model`` runs with f ≡ 0 (its controller switched off: no
    gain, no feedback; every other mechanism and every weight unchanged). Yields the number of layers
    switched (0 for a model without a controller)."""
    from mixcon.eval import control

    mixers = [m for m in control.conba_mixers(model) if m.control]
    for m in mixers:
        m.control = False
    try:
        yield len(mixers)
    finally:
        for m in mixers:
            m.control = True


def evaluate(model, x, y, batch: int) -> tuple[float, float]:
    """(accuracy, answer loss) of ``model`` over the answers of (x, y) (torch tensors)."""
    import torch

    correct, total, loss_sum = 0, 0, 0.0
    with torch.no_grad():
        for i in range(0, x.shape[0], batch):
            xb, yb = x[i:i + batch], y[i:i + batch]
            logits = model(xb, use_cache=False).logits.float()
            mask = yb != -100
            loss_sum += torch.nn.functional.cross_entropy(logits[mask], yb[mask], reduction="sum").item()
            correct += (logits.argmax(-1)[mask] == yb[mask]).sum().item()
            total += mask.sum().item()
    return correct / total, loss_sum / total


def train_member(member, width, depth, seq_len, pairs, vocab, steps, batch, lr, warmup, seed, data_seed,
                 eval_examples, extra=None, instrument_dir=None, heads=None, eval_every=100, val_examples=256,
                 target=0.99, role="seed", progress=False, checkpoint_dir=None) -> dict:
    """Train one member on fresh MQAR batches (step s draws seed (data_seed, s)): AdamW with weight decay
    0.1 on the matrices, ``warmup`` linear steps, cosine to 0 at ``steps``; every ``eval_every`` steps the
    accuracy on ``val_examples`` held-out sequences (seed (data_seed, VAL_SEED)), stopping once it reaches
    ``target``. Then the test: ``eval_examples`` sequences of seed (data_seed, TEST_SEED), with the
    controller as trained and, for a member with one, with f ≡ 0 in every layer (``*_f0``). A member with
    Conba's controller is instrumented after training (`mixcon.eval.control`, on 4 test sequences: ctl_*
    columns, the mean over layers); with ``instrument_dir`` the per-layer plot and table go there. With
    ``checkpoint_dir`` (a study's OUT) the training state is saved after every held-out check
    (`grid.Checkpoint`) and a run of the same settings stopped part-way continues from there."""
    import torch

    from mixcon import MixConForCausalLM
    from mixcon.train.loop import make_optimizer
    from mixcon.train.recipe import Recipe

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    r = Recipe(lr=lr, max_steps=steps, warmup_steps=warmup, batch_size=batch, seq_len=seq_len, seed=seed,
               weight_decay=0.1, min_lr_ratio=0.0)
    config = member_config(member, width, depth, vocab, seq_len, extra, heads)
    torch.manual_seed(seed)
    model = MixConForCausalLM(config).to(device)
    optimizer = make_optimizer(model, r, device)
    tensors = lambda a: (torch.from_numpy(v).to(device) for v in a)  # noqa: E731
    xv, yv = tensors(mqar((data_seed, VAL_SEED), val_examples, seq_len, pairs, vocab))

    def loss_at(model, step):
        x, y = tensors(mqar((data_seed, step), batch, seq_len, pairs, vocab))
        logits = model(x, use_cache=False).logits.float()
        mask = y != -100
        return torch.nn.functional.cross_entropy(logits[mask], y[mask])

    def check(model):
        acc = evaluate(model, xv, yv, batch)[0]
        return acc, acc >= target

    ckpt = grid.Checkpoint(checkpoint_dir, run_key(member, width, seq_len, pairs, lr, seed), dict(
        member=member, width=width, depth=depth, seq_len=seq_len, pairs=pairs, vocab=vocab, steps=steps,
        batch=batch, lr=lr, warmup=warmup, seed=seed, data_seed=data_seed, extra=extra, heads=heads,
        eval_every=eval_every, val_examples=val_examples, target=target))
    model, run = grid.train_steps(model, optimizer, r, loss_at, check, eval_every, ckpt,
                                  desc=f"{member} lr={lr:g} seed={seed}" if progress else None)
    step, losses, t_trained = run["step"], run["losses"], time.perf_counter()
    val_acc = run["checks"][-1][1] if run["checks"] else float("nan")
    x, y = tensors(mqar((data_seed, TEST_SEED), eval_examples, seq_len, pairs, vocab))
    accuracy, answer_loss = evaluate(model, x, y, batch)
    acc_f0 = loss_f0 = None
    with feedback_off(model) as n_switched:
        if n_switched:
            acc_f0, loss_f0 = evaluate(model, x, y, batch)
    tail = losses[-max(1, len(losses) // 10):]
    ctl = instrument(model, x[:4].cpu(), f"{member} w={width} L={seq_len} P={config.control_period} seed={seed}",
                     instrument_dir)
    return dict(member=member, description=MEMBERS[member][1], width=width, heads=config.num_attention_heads,
                control_period=config.control_period, **ctl, depth=config.num_hidden_layers, seq_len=seq_len,
                pairs=pairs, vocab=vocab, lr=lr, seed=seed, role=role,
                params_M=sum(p.numel() for p in model.parameters()) / 1e6, steps=step, max_steps=steps,
                batch=batch, warmup=warmup, target=target, eval_every=eval_every, val_examples=val_examples,
                eval_examples=eval_examples,
                stopped_early=step < steps, accuracy=accuracy, answer_loss=answer_loss, accuracy_f0=acc_f0,
                answer_loss_f0=loss_f0, val_accuracy=val_acc, val_curve=run["checks"],
                train_loss=sum(tail) / len(tail), step_time_s=run["seconds"] / step,
                step_cpu_s=run["cpu_seconds"] / step, seconds=run["seconds"] + time.perf_counter() - t_trained)


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


def best_lr(rows: list):
    """The learning rate of the best of ``rows`` (one member's sweep): highest accuracy, then fewest steps
    (the earliest to reach the target), then lowest answer loss."""
    return min(rows, key=lambda r: (-r["accuracy"], r["steps"], r["answer_loss"]))["lr"]


def run_member(spec: dict, done: dict, log_dir: str | None = None) -> list:
    """One member in one cell: the learning-rate sweep at the first seed (``spec['lrs']``), then the other
    seeds at the best learning rate. ``done``: {key: row} of runs already made (skipped). Each new run is
    appended to ``log_dir``'s run log as it ends, and a run in progress is checkpointed under ``spec['out']``
    (`grid.Checkpoint`), so a stopped study loses at most the steps since the run's last held-out check.
    Returns every row of the member in the cell, old and new."""
    seeds, lrs = spec["seeds"], spec["lrs"]
    kw = {k: v for k, v in spec.items() if k not in ("seeds", "lrs", "instruments", "out", "sweep_stop")}
    log = grid.RunLog(log_dir, resume=True) if log_dir else None
    rows = []

    def one(lr, seed, role):
        key = run_key(spec["member"], spec["width"], spec["seq_len"], spec["pairs"], lr, seed)
        if key in done:
            return done[key]
        inst = os.path.join(spec["out"], "instruments") if spec.get("instruments") and seed == seeds[0] else None
        row = train_member(lr=lr, seed=seed, data_seed=seed, role=role, instrument_dir=inst,
                           checkpoint_dir=spec["out"], **kw)
        if log is not None:
            log.add(key, row)
        grid.Checkpoint(spec["out"], key).clear()
        print(f"{row['member']:12s} w={row['width']:<3d} L={row['seq_len']:<4d} pairs={row['pairs']:<3d} "
              f"lr={lr:.0e} seed={seed} ({role}): accuracy {row['accuracy']:.3f}"
              + (f" (f≡0: {row['accuracy_f0']:.3f})" if row["accuracy_f0"] is not None else "")
              + f", {row['steps']} steps, {row['step_time_s'] * 1e3:.0f} ms/step", flush=True)
        return row

    sweep = []
    for lr in lrs:  # in the given order; with sweep_stop, the first that reaches the target ends the sweep
        sweep.append(one(lr, seeds[0], "sweep" if len(lrs) > 1 else "seed"))
        if spec.get("sweep_stop") and sweep[-1]["val_accuracy"] >= spec["target"]:
            break
    rows += sweep
    lr = best_lr(sweep)
    rows += [one(lr, s, "seed") for s in seeds[1:]]
    return rows


def run_key(member, width, seq_len, pairs, lr, seed) -> tuple:
    return (member, width, seq_len, pairs, float(lr), seed)


def final_rows(rows: list) -> list:
    """Per (member, width, seq_len, pairs): the runs at the chosen learning rate (every seed), the sweep's
    other learning rates left out."""
    out = []
    groups = {}
    for r in rows:
        groups.setdefault((r["member"], r["width"], r["seq_len"], r["pairs"]), []).append(r)
    for rs in groups.values():
        first = min(r["seed"] for r in rs)
        sweep = [r for r in rs if r["seed"] == first]
        lr = best_lr(sweep)
        out += sorted((r for r in rs if r["lr"] == lr), key=lambda r: r["seed"])
    return out


def gate(rows: list, width: int, seq_len: int, pairs: int, threshold: float) -> dict:
    """The pilot gate of a cell: attention's accuracy in every seed at its chosen learning rate."""
    att = [r for r in final_rows(rows) if r["member"] == "attention" and r["width"] == width
           and r["seq_len"] == seq_len and r["pairs"] == pairs]
    accs = [r["accuracy"] for r in att]
    return dict(seeds=len(accs), min_accuracy=min(accs) if accs else float("nan"),
                passed=bool(accs) and min(accs) >= threshold, lr=att[0]["lr"] if att else None)


def summarize(rows: list, solved_at: float = 0.95) -> list:
    """Per (member, width, seq_len, pairs), at the chosen learning rate: accuracy over seeds (mean, std,
    min, max), ``solved`` (the seeds whose accuracy reaches ``solved_at``, the gate's threshold: a run either
    leaves the 1/pairs plateau or stays near it, so the count says more than the mean), with f ≡ 0, the
    controller's share, the answer loss and the step time."""
    groups = {}
    for r in final_rows(rows):
        groups.setdefault((r["member"], r["width"], r["seq_len"], r["pairs"]), []).append(r)
    out = []
    for (member, width, seq_len, pairs), rs in groups.items():
        acc = grid.spread(x["accuracy"] for x in rs)
        out.append(dict(member=member, width=width, seq_len=seq_len, pairs=pairs, depth=rs[0]["depth"],
                        lr=rs[0]["lr"], accuracy=acc["mean"], accuracy_std=acc["std"], seeds=acc["n"],
                        accuracy_min=acc["min"], accuracy_max=acc["max"],
                        solved=sum(x["accuracy"] >= solved_at for x in rs),
                        accuracy_f0=grid.spread(x.get("accuracy_f0") for x in rs)["mean"],
                        ctl_effect=grid.spread(x.get("ctl_effect") for x in rs)["mean"],
                        ctl_feedback=grid.spread(x.get("ctl_feedback") for x in rs)["mean"],
                        answer_loss=grid.spread(x["answer_loss"] for x in rs)["mean"],
                        steps=grid.spread(x["steps"] for x in rs)["mean"],
                        step_time_s=grid.spread(x["step_time_s"] for x in rs)["mean"]))
    return out


def paired_table(rows: list) -> list:
    """Every comparison of `PAIRS` and every member's f ≡ 0 counterfactual, per cell, on accuracy and
    answer loss: `grid.paired` over the seeds both sides have."""
    fin = final_rows(rows)
    cells = sorted({(r["width"], r["seq_len"], r["pairs"]) for r in fin})
    out = []
    for width, seq_len, pairs in cells:
        by = {}
        for r in fin:
            if (r["width"], r["seq_len"], r["pairs"]) == (width, seq_len, pairs):
                by.setdefault(r["member"], {})[r["seed"]] = r
        for name, a, b in PAIRS:
            if a in by and b in by:
                for metric in ("accuracy", "answer_loss"):
                    p = grid.paired({s: r[metric] for s, r in by[a].items()}, {s: r[metric] for s, r in by[b].items()})
                    out.append(dict(width=width, seq_len=seq_len, pairs=pairs, comparison=name, a=a, b=b,
                                    metric=metric, **p))
        for m, runs in by.items():
            if any(r.get("accuracy_f0") is not None for r in runs.values()):
                for metric in ("accuracy", "answer_loss"):
                    p = grid.paired({s: r[metric] for s, r in runs.items()},
                                    {s: r[metric + "_f0"] for s, r in runs.items()})
                    out.append(dict(width=width, seq_len=seq_len, pairs=pairs, comparison=f"{m}: as trained − f≡0",
                                    a=m, b=f"{m} f≡0", metric=metric, **p))
    return out


def matched_table(rows: list) -> list:
    """The comparisons of `PAIRS` at each learning rate both members ran with a seed in common (the seed-0
    sweeps, and seeds run at a learning rate other than a member's chosen one), leaving out the one the
    chosen-rate table already has: differences in one ingredient only, the learning rate held fixed."""
    chosen = {(r["member"], r["width"], r["seq_len"], r["pairs"]): r["lr"] for r in final_rows(rows)}
    by = {}
    for r in rows:
        by.setdefault((r["width"], r["seq_len"], r["pairs"]), {}).setdefault(r["member"], {}).setdefault(
            float(r["lr"]), {})[r["seed"]] = r
    out = []
    for cell, members in sorted(by.items()):
        width, seq_len, pairs = cell
        for name, a, b in PAIRS:
            if a not in members or b not in members:
                continue
            for lr in sorted(set(members[a]) & set(members[b])):
                ra, rb = members[a][lr], members[b][lr]
                if not set(ra) & set(rb) or chosen.get((a, *cell)) == chosen.get((b, *cell)) == lr:
                    continue
                for metric in ("accuracy", "answer_loss"):
                    p = grid.paired({s: r[metric] for s, r in ra.items()}, {s: r[metric] for s, r in rb.items()})
                    out.append(dict(width=width, seq_len=seq_len, pairs=pairs, comparison=name, a=a, b=b, lr=lr,
                                    metric=metric, **p))
    return out


def plot_cell(rows: list, members: list, width: int, seq_len: int, pairs: int, path: str, title: str) -> None:
    """One cell: each member's test accuracy per seed (dots) and their mean (bar), f ≡ 0 as open marks."""
    plt = grid.pyplot()
    if plt is None:
        return
    fin = [r for r in final_rows(rows) if (r["width"], r["seq_len"], r["pairs"]) == (width, seq_len, pairs)]
    shown = [m for m in members if any(r["member"] == m for r in fin)]
    if not shown:
        return
    fig, ax = plt.subplots(figsize=(1.0 * len(shown) + 2.5, 3.8))
    for i, m in enumerate(shown):
        rs = [r for r in fin if r["member"] == m]
        accs = [r["accuracy"] for r in rs]
        ax.bar(i, float(np.mean(accs)), color="k" if m == "attention" else "C0", alpha=0.35, width=0.6)
        ax.plot([i] * len(accs), accs, "o", color="C3", ms=4, label="seed" if i == 0 else None)
        f0 = [r["accuracy_f0"] for r in rs if r.get("accuracy_f0") is not None]
        if f0:
            ax.plot([i + 0.15] * len(f0), f0, "x", color="C2", ms=5, label="f ≡ 0")
    ax.axhline(1 / pairs, color="gray", lw=0.8, ls=":")
    ax.set_xticks(range(len(shown)), shown, rotation=35, ha="right", fontsize=8)
    ax.set_ylim(-0.02, 1.02)
    ax.set_ylabel("MQAR test accuracy")
    ax.set_title(title, fontsize=8)
    handles, labels = ax.get_legend_handles_labels()
    uniq = dict(zip(labels, handles))
    ax.legend(uniq.values(), uniq.keys(), fontsize=7, loc="lower right")
    ax.grid(alpha=0.3, axis="y")
    fig.tight_layout()
    grid.save_figure(fig, path)


def write_markdown(rows, members, gates, meta, path, summary, paired, matched):
    a = meta["args"]
    lines = [f"MQAR (Zoology's task: filler 0, keys never elsewhere) — vocabulary {a['vocab']}, width(s) {a['widths']}, "
             f"depth {a['depth']} (hybrids: their block's; conba-deep 8), attention heads {a['heads']} (RoPE; "
             f"hybrids NoPE), Conba control period {a['control_period'] or 'the config default'}. AdamW, weight "
             f"decay 0.1, warm-up {a['warmup']}, cosine to 0 at {a['steps']} steps × {a['batch']} sequences, early "
             f"stop at held-out accuracy ≥ {a['target']} ({a['val_examples']} sequences, every {a['eval_every']} "
             f"steps); learning rate swept over {a['lrs']} at seed {a['seeds'][0]} "
             f"({'every one' if a['full_sweep'] else 'in order, until one reaches the target'}), the best kept for seeds "
             f"{a['seeds'][1:]}; test accuracy on {a['eval_examples']} sequences. One CPU thread per run.",
             f"Device {meta['device']}, torch {meta['torch']}, transformers {meta['transformers']}, rev {meta['rev']}, "
             f"{meta['date']}. Command: `{meta['command']}`.", ""]
    for (width, seq_len, pairs), g in gates.items():
        lines.append(f"Pilot gate, L = {seq_len}, {pairs} pairs, width {width}: attention's lowest seed "
                     f"{grid.fmt(g['min_accuracy'])} over {g['seeds']} seeds at lr {g['lr']} → "
                     f"**{'passed' if g['passed'] else 'FAILED'}** (threshold {a['gate']}).")
    lines += ["", f"| member | cell | depth | lr | seeds | ≥ {a['gate']} | accuracy mean (min–max) | f≡0 | "
              "answer loss | steps | ms/step |", "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    order = {m: i for i, m in enumerate(members)}
    for s in sorted(summary, key=lambda s: (s["seq_len"], s["pairs"], s["width"], order.get(s["member"], 99))):
        lines.append(f"| {s['member']} | L={s['seq_len']} p={s['pairs']} w={s['width']} | {s['depth']} | "
                     f"{s['lr']:g} | {s['seeds']} | {s['solved']}/{s['seeds']} | {s['accuracy']:.3f} ({s['accuracy_min']:.3f}–"
                     f"{s['accuracy_max']:.3f}) | {grid.fmt(s['accuracy_f0'])} | {s['answer_loss']:.3f} | "
                     f"{s['steps']:.0f} | {s['step_time_s'] * 1e3:.0f} |")
    lines += ["", "Paired by seed (same data and initial-weight seed; each member at its own chosen learning rate): "
              "the difference a − b per seed, its mean, the paired t (df = seeds − 1) and whether the sign holds "
              "in every seed. An effect is called when the sign holds in every seed and |t| exceeds the 0.975 "
              "quantile of t (4.30 at df 2).", "",
              "| cell | comparison | metric | seeds | per-seed a − b | mean | t | d_z | verdict |",
              "| --- | --- | --- | --- | --- | --- | --- | --- | --- |"]

    def row(p: dict, lr: str = "") -> str:
        return (f"| L={p['seq_len']} p={p['pairs']} w={p['width']} | {p['comparison']} |{lr} {p['metric']} | "
                f"{p['n']} | " + ", ".join(f"{d:+.3f}" for d in p["diffs"]) + f" | {p['mean']:+.3f} | "
                f"{grid.fmt(p['t'], 2)} | {grid.fmt(p['d_z'], 2)} | {p['verdict']} |")

    lines += [row(p) for p in paired]
    if matched:
        lines += ["", "The same comparisons at a learning rate both members ran (the seed-0 sweeps, and seeds run at "
                  "a rate other than a member's chosen one): only the members differ, the rate held fixed.", "",
                  "| cell | comparison | lr | metric | seeds | per-seed a − b | mean | t | d_z | verdict |",
                  "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
        lines += [row(p, f" {p['lr']:g} |") for p in matched]
    grid.write_text(path, "\n".join(lines) + "\n")


def write_outputs(out: str, rows: list, members: list, gates: dict, meta: dict) -> None:
    """summary.csv (every run: the COLS), results.json (the header, the per-member summary, the paired
    table, the gates and every run), recall.md and two plots per cell (accuracy per member; the paired
    differences)."""
    from mixcon.bench.common import save_results

    summary, paired, matched = summarize(rows, meta["args"]["gate"]), paired_table(rows), matched_table(rows)
    save_results(out, rows, COLS, meta, summary=summary, paired=paired, paired_matched_lr=matched,
                 gates={f"{w}:{s}:{p}": g for (w, s, p), g in gates.items()})
    os.replace(os.path.join(out, "results.csv"), os.path.join(out, "summary.csv"))
    write_markdown(rows, members, gates, meta, os.path.join(out, "recall.md"), summary, paired, matched)
    for width, seq_len, pairs in sorted({(r["width"], r["seq_len"], r["pairs"]) for r in rows}):
        name = f"recall-L{seq_len}-p{pairs}-w{width}"
        plot_cell(rows, members, width, seq_len, pairs, os.path.join(out, name + ".png"),
                  f"MQAR L={seq_len}, {pairs} pairs, vocab {meta['args']['vocab']}, width {width} "
                  f"(rev {meta['rev']}; bars: mean of seeds; dotted: 1/pairs)")
        grid.plot_paired([p for p in paired if (p["width"], p["seq_len"], p["pairs"]) == (width, seq_len, pairs)],
                         ["accuracy", "answer_loss"], os.path.join(out, name + "-paired.png"),
                         f"MQAR L={seq_len}, {pairs} pairs, width {width}: paired by seed, each member at its "
                         f"chosen rate (bar: mean, line: 95 % interval)")


def estimate(args) -> float:
    """CPU seconds of one training step of every (member, width, cell) (one warm-up step, then one timed),
    and the grid's worst case from them (every run to --steps). Prints a table."""
    import torch

    from mixcon import MixConForCausalLM

    total = 0.0
    runs = len(args.lrs) + len(args.seeds) - 1
    for seq_len, pairs in args.cells:
        for width in args.widths:
            for m in args.members:
                model = MixConForCausalLM(member_config(m, width, args.depth, args.vocab, seq_len,
                                                        extra_overrides(m, args), args.heads)).train()
                x, y = (torch.from_numpy(a) for a in mqar(0, args.batch, seq_len, pairs, args.vocab))
                for _ in range(2):
                    c0 = time.process_time()
                    logits = model(x, use_cache=False).logits
                    torch.nn.functional.cross_entropy(logits[y != -100], y[y != -100]).backward()
                    step = time.process_time() - c0
                minutes = step * args.steps * runs / 60
                total += minutes
                print(f"L={seq_len:<4d} w={width:<4d} {m:16s} {step:6.3f} CPU s/step → at most {minutes:6.1f} CPU min",
                      flush=True)
    print(f"total at most {total:.0f} CPU min ({runs} runs per member and cell, none stopping early)", flush=True)
    return total


def extra_overrides(member: str, args) -> dict:
    """--control-period for every member with Conba layers (MixConConfig's field; others ignore it)."""
    return {} if args.control_period is None or MEMBERS[member][0] == "attention" else dict(
        control_period=args.control_period)


def parse_cell(s: str) -> tuple:
    try:
        seq_len, pairs = (int(v) for v in s.split(":"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"cell {s!r} must be SEQ_LEN:PAIRS, e.g. 128:8")
    return seq_len, pairs


def build_parser(ap: argparse.ArgumentParser | None = None) -> argparse.ArgumentParser:
    ap = ap or argparse.ArgumentParser(prog="mixcon study recall", description=__doc__,
                                       formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--members", nargs="+", default=DEFAULT_MEMBERS, choices=list(MEMBERS))
    ap.add_argument("--cells", nargs="+", type=parse_cell, default=[(64, 4)], help="SEQ_LEN:PAIRS ... (default 64:4)")
    ap.add_argument("--vocab", type=int, default=128, help="must exceed every cell's sequence length")
    ap.add_argument("--widths", nargs="+", type=int, default=[64])
    ap.add_argument("--depth", type=int, default=2,
                    help="layers of every pure member (Zoology's 2; a hybrid: the depth its block fits, 4 or 8)")
    ap.add_argument("--heads", type=int, default=1, help="attention heads (Zoology: 1, of the full width)")
    ap.add_argument("--control-period", type=int, default=None,
                    help="control_period of every member with Conba layers (default: the config's, 64)")
    ap.add_argument("--steps", type=int, default=3000, help="the most training steps (the schedule's length)")
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--lrs", nargs="+", type=float, default=None,
                    help="the sweep at the first seed (default 1e-3 3e-3 1e-2; Zoology: four values over 1e-4 .. "
                         "1e-2; --smoke: the first two)")
    ap.add_argument("--full-sweep", action="store_true",
                    help="run every learning rate of the sweep (default: the sweep stops at the first, in the "
                         "given order, whose run reaches the target)")
    ap.add_argument("--warmup", type=int, default=30, help="linear warm-up steps")
    ap.add_argument("--seeds", nargs="+", type=int, default=None, help="default 0 1 2 (--smoke: 0 1)")
    ap.add_argument("--target", type=float, default=0.99, help="early stop at this held-out accuracy")
    ap.add_argument("--eval-every", type=int, default=100)
    ap.add_argument("--val-examples", type=int, default=256, help="held-out sequences of the early stop")
    ap.add_argument("--eval-examples", type=int, default=1000, help="test sequences")
    ap.add_argument("--gate", type=float, default=0.95, help="attention's accuracy every seed must reach")
    ap.add_argument("--no-gate", action="store_true", help="run the other members where attention failed")
    ap.add_argument("--jobs", type=int, default=1, help="members at a time, in separate one-thread processes")
    ap.add_argument("--threads", type=int, default=None, help="torch threads when --jobs 1 (default 1 on CPU)")
    ap.add_argument("--resume", action="store_true",
                    help="keep the runs already in OUT/runs.jsonl (written as each run ends) and run the rest")
    ap.add_argument("--instruments", action="store_true",
                    help="per-layer controller plots and tables (first seed's runs) under OUT/instruments")
    ap.add_argument("--out", default=os.path.join("eval", "results", "recall"))
    ap.add_argument("--smoke", action="store_true", help="seconds: every member, width 16, one 16-token cell")
    ap.add_argument("--estimate", action="store_true", help="time one step of each run, print the grid's time")
    ap.add_argument("--report", action="store_true",
                    help="train nothing: write the tables, the paired comparisons and the plots from OUT/runs.jsonl")
    ap.add_argument("--no-progress", action="store_true")
    return ap


PROTOCOL = dict(max_steps="steps", vocab="vocab", batch="batch", warmup="warmup", target="target",
                eval_every="eval_every", val_examples="val_examples", eval_examples="eval_examples")  # row: option


def check_args(args) -> None:
    """One message per bad argument (ValueError), before any run."""
    for s, p in args.cells:
        mqar(0, 1, s, p, args.vocab)  # bad cells fail now, not in the middle of the grid
    for name in ("steps", "batch", "eval_every", "val_examples", "eval_examples", "heads", "jobs"):
        if getattr(args, name) < 1:
            raise ValueError(f"--{name.replace('_', '-')} {getattr(args, name)} must be >= 1")
    if args.control_period is not None and args.control_period < 1:
        raise ValueError(f"--control-period {args.control_period} must be >= 1")
    for w in args.widths:
        if w % args.heads:
            raise ValueError(f"--heads {args.heads} must divide every width (got {w})")
    if not 0 < args.target <= 1 or not 0 < args.gate <= 1:
        raise ValueError(f"--target {args.target} and --gate {args.gate} must be in (0, 1]")
    if args.resume and not args.report:
        grid.check_resume(args.out, {f: (f"--{a.replace('_', '-')}", getattr(args, a)) for f, a in PROTOCOL.items()})


def main(argv=None):
    args = build_parser().parse_args(argv)
    if args.smoke:
        args.widths, args.cells, args.vocab, args.steps, args.batch = [16], [(16, 2)], 32, 3, 4
        args.eval_examples, args.val_examples, args.warmup, args.eval_every = 8, 8, 1, 2
        args.lrs, args.seeds, args.no_gate = args.lrs or [1e-3, 3e-3], args.seeds or [0, 1], True
    args.lrs, args.seeds = args.lrs or [1e-3, 3e-3, 1e-2], args.seeds or [0, 1, 2]
    check_args(args)
    return run(args)


def run(args):
    import torch

    from mixcon.bench.common import header

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.type == "cpu":  # these models are small: one thread per process beats two contending
        torch.set_num_threads(args.threads or 1)
    if args.estimate:
        return estimate(args)
    meta = header(device, dtype="float32", args=vars(args),  # train_member runs float32 everywhere (no autocast)
                  config_defaults=grid.config_defaults("control_period", "delay", "k_max"))
    meta["args"]["cells"] = [list(c) for c in args.cells]
    print(json.dumps({k: v for k, v in meta.items() if k != "args"}), flush=True)
    os.makedirs(args.out, exist_ok=True)
    if args.report:
        rows = list(grid.RunLog(args.out, resume=True).done.values())
        if not rows:
            raise ValueError(f"--report: no runs in {os.path.join(args.out, 'runs.jsonl')}")
        cells = sorted({(r["width"], r["seq_len"], r["pairs"]) for r in rows})
        gates = {c: gate(rows, *c, args.gate) for c in cells if any(
            r["member"] == "attention" and (r["width"], r["seq_len"], r["pairs"]) == c for r in rows)}
        members = list(dict.fromkeys([m for m in MEMBERS if any(r["member"] == m for r in rows)]))
        saved = os.path.join(args.out, "study.json")  # the settings of the training call, not this one's
        if os.path.exists(saved):
            with open(saved) as f:
                meta = {**json.load(f), "report": {k: meta[k] for k in ("rev", "date", "command")}}
        write_outputs(args.out, rows, members, gates, meta)
        print(f"wrote {args.out}/recall.md, summary.csv, results.json and a plot per cell from {len(rows)} runs")
        return rows, gates
    runlog = grid.RunLog(args.out, args.resume)
    grid.write_text(os.path.join(args.out, "study.json"), json.dumps(meta, indent=1) + "\n")
    if runlog.done:
        print(f"resume: {len(runlog.done)} runs kept from {runlog.path}", flush=True)
    members = [m for m in args.members if m == "attention"] + [m for m in args.members if m != "attention"]

    def spec(m, width, seq_len, pairs):
        return dict(member=m, width=width, depth=args.depth, seq_len=seq_len, pairs=pairs, vocab=args.vocab,
                    steps=args.steps, batch=args.batch, warmup=args.warmup, eval_examples=args.eval_examples,
                    extra=extra_overrides(m, args), heads=args.heads, eval_every=args.eval_every,
                    val_examples=args.val_examples, target=args.target, seeds=args.seeds, lrs=args.lrs,
                    instruments=args.instruments, out=args.out, progress=not args.no_progress and args.jobs == 1,
                    sweep_stop=not args.full_sweep)

    gates = {}
    for seq_len, pairs in args.cells:
        for width in args.widths:
            cell = (width, seq_len, pairs)
            if "attention" in members:  # the pilot: attention first, the gate decides the rest
                run_member(spec("attention", *cell), runlog.done, args.out)
                runlog = grid.RunLog(args.out, resume=True)
                gates[cell] = gate(list(runlog.done.values()), *cell, args.gate)
                g = gates[cell]
                print(f"pilot gate L={seq_len} pairs={pairs} w={width}: attention's lowest seed "
                      f"{g['min_accuracy']:.3f} → {'passed' if g['passed'] else 'FAILED'}", flush=True)
                if not g["passed"] and not args.no_gate:
                    print(f"  the other members are not run in this cell: raise --steps or the width, or pass "
                          f"--no-gate", flush=True)
                    continue
            rest = [m for m in members if m != "attention"]
            jobs = [grid.Job(key=m, fn=run_member, args=(spec(m, *cell), runlog.done, args.out), cost_key=m)
                    for m in rest]
            grid.run_jobs(jobs, None, args.jobs, progress=not args.no_progress, desc=f"members L={seq_len} w={width}")
            runlog = grid.RunLog(args.out, resume=True)
    rows = list(runlog.done.values())
    write_outputs(args.out, rows, members, gates, meta)
    print(f"wrote {args.out}/recall.md, summary.csv, results.json and a plot per cell", flush=True)
    return rows, gates


if __name__ == "__main__":
    main()
