"""Language-modelling ablations on the built-in corpus: what each Conba mechanism buys, which
attention:Conba ratio is best, and what the controller's period does. Every member is trained by the
training tool (`mixcon.train.loop.train`) with the same data, budget and learning rate, over several
seeds; the table gives the held-out loss (mean ± sample standard deviation over seeds, min–max) and
the step time.

Grids (members are config overrides, as data in GRIDS):

* ``mechanisms``: the tiny MixCon (tiny, 1:3, MoE) with every mechanism off (Jamba-style:
  linear selection, no delay, scaling, control or noise), each mechanism alone, all on; and, when the
  installed config has ``control_period``, control alone and all on at ``control_period = 1``.
* ``ratio``: 0:8, 1:7, 2:6, 4:4, 8:0 in one block of 8 layers (the same depth and budget), Conba as
  shipped; the all-attention member has RoPE (the others are NoPE, as MixCon is).
* ``period``: the controller's period P in {1, 16, 64} (the tiny MixCon as shipped), beside the same
  model with control off and with every mechanism off; 1024-token sequences (16 periods of the longest P) and a
  model shrunk to fit (width 32, 4 layers) instead of shorter sequences. Needs ``control_period``.

The learning rate: a small sweep (``--lrs``) on the grid's reference member at the first seed, the
best held-out loss chosen, that lr used for every member (no per-member tuning); ``--lr`` skips it.
Precedence of settings: the recipe file < the grid's recipe settings < ``KEY=VALUE`` arguments.

    mixcon study ablation mechanisms --jobs 2          # the CPU grid, within --budget-min
    mixcon study ablation ratio --jobs 2
    mixcon study ablation period --jobs 2
    mixcon study ablation mechanisms --recipe R.yaml model_config=mixcon-150m --lr 1e-3
    mixcon study ablation mechanisms --smoke           # seconds
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import statistics
import sys
import time

from mixcon.eval import grid


M = grid.mechanisms
# grid → reference member (the lr sweep's), recipe settings, members: name → (description, model overrides)
GRIDS = {
    "mechanisms": dict(
        reference="all",
        recipe=dict(model_config="tiny", seq_len=256, batch_size=8, max_steps=200, warmup_steps=20),
        members={
            "off": ("every mechanism off (Jamba-style)", M()),
            "+delay": ("delayed state alone (τ = 2)", M("delay")),
            "+scaling": ("dynamic state scaling alone", M("scaling")),
            "+control": ("adaptive control alone (default period)", M("control")),
            "+noise": (f"training noise alone (σ = {grid.NOISE})", M("noise")),
            "+selection": ("SwiGLU selection alone", M("selection")),
            "all": ("every mechanism on (default period)", M(*grid.MECHANISM_ON)),
            "+control P=1": ("adaptive control alone, acting every step", {**M("control"), "control_period": 1}),
            "all P=1": ("every mechanism on, control every step", {**M(*grid.MECHANISM_ON), "control_period": 1}),
        }),
    "ratio": dict(
        reference="2:6",
        recipe=dict(model_config="tiny", seq_len=256, batch_size=8, max_steps=400, warmup_steps=40),
        members={
            f"{a}:{8 - a}": (desc, dict(n_blocks=1, layers_per_block=8, attn_ratio=f"{a}:{8 - a}",
                                        **(dict(use_rope=True) if a == 8 else {})))
            for a, desc in ((0, "all Conba"), (1, "Jamba's ratio"), (2, "MixCon's ratio"), (4, "half attention"),
                            (8, "all attention (RoPE)"))
        }),
    # the control period: the tiny MixCon as shipped (delay, scaling, control, SwiGLU selection; noise off) with the
    # controller acting every P steps, beside control off and every mechanism off; P = 1 is the reference
    "period": dict(
        reference="MixCon P=1",
        recipe=dict(model_config="tiny", seq_len=1024, batch_size=4, max_steps=250, warmup_steps=25,
                    model_overrides=dict(hidden_size=32, intermediate_size=64, n_blocks=1)),
        members={
            **{f"MixCon P={p}": ("MixCon, control acting every " + (f"{p} steps" if p > 1 else "step"),
                                 {**M("delay", "scaling", "control", "selection"), "control_period": p})
               for p in (1, 16, 64)},
            "control off": ("MixCon with control off", M("delay", "scaling", "selection")),
            "all off": ("every mechanism off", M()),
        }),
}
RUN_COLS = ["grid", "member", "seed", "lr", "heldout_loss", "step_time_s", "step_cpu_s", "tokens_per_s", "params_M"]
SUMMARY_COLS = ["member", "description", "seeds", "heldout_loss_mean", "heldout_loss_std", "heldout_loss_min",
                "heldout_loss_max", "delta_vs_reference", "step_time_s", "step_cpu_s", "params_M"]


def train_run(recipe: dict) -> dict:
    """One training run of the recipe (a Recipe's fields as a dict); the held-out loss at the end, step time
    (median wall time over the last 80% of steps; and CPU seconds of this process per step, evaluation
    included, which contention on a shared machine does not inflate), parameters and the loss curve."""
    import torch

    from mixcon.train.checkpoint import latest_checkpoint, model_from_checkpoint
    from mixcon.train.loop import train
    from mixcon.train.recipe import Recipe

    r = Recipe(**recipe).validate()
    c0 = time.process_time()
    log = train(r, progress=False)
    cpu = time.process_time() - c0
    ev = [x for x in log if x["heldout_loss"] != ""]
    tps = [x["tokens_per_s"] for x in log[len(log) // 5:] if x["tokens_per_s"] not in ("", None)]
    model = model_from_checkpoint(latest_checkpoint(r.out_dir))  # tensors and JSON only, nothing unpickled
    params = sum(p.numel() for p in model.parameters()) / 1e6
    tok_s = statistics.median(tps) if tps else float("nan")
    return dict(heldout_loss=ev[-1]["heldout_loss"], tokens_per_s=tok_s,
                step_time_s=r.batch_size * r.seq_len / tok_s, step_cpu_s=cpu / r.max_steps, params_M=params,
                curve=[dict(step=x["step"], loss=x["loss"], heldout_loss=x["heldout_loss"]) for x in log])


def grid_members(name: str, fields: set, only=None):
    """(members to run, [(member, reason)] skipped because the installed config lacks a field)."""
    g = GRIDS[name]
    run, skipped = {}, []
    for m, (desc, ov) in g["members"].items():
        if only and m not in only:
            continue
        missing = sorted(set(ov) - fields)
        if missing:
            skipped.append((m, f"the installed MixConConfig has no field {', '.join(missing)}"))
        else:
            run[m] = (desc, ov)
    return run, skipped


def _same_setting(a, b) -> bool:
    """Recipe values equal; absolute paths by their last two parts (a run from another checkout)."""
    if isinstance(a, str) and isinstance(b, str) and os.path.isabs(a) and os.path.isabs(b):
        return a.split(os.sep)[-2:] == b.split(os.sep)[-2:]
    return a == b


def read_prior(out: str, grid_name: str, recipe: dict):
    """The content of ``out``/results.json written by an earlier call, or None when there is none.
    Refused when the file is of another grid or recipe: its runs would not be comparable."""
    path = os.path.join(out, "results.json")
    if not os.path.exists(path):
        return None
    old = json.load(open(path))
    if old["meta"].get("grid") != grid_name:
        raise SystemExit(f"--resume: {path} holds grid {old['meta'].get('grid')!r}, not {grid_name!r}")
    recipe = json.loads(json.dumps(recipe))  # as the file holds it (tuples are lists there)
    differ = sorted(k for k in set(recipe) | set(old["meta"].get("recipe", {}))
                    if not _same_setting(recipe.get(k), old["meta"].get("recipe", {}).get(k)))
    if differ:
        raise SystemExit(f"--resume: {path} was made with another recipe ({', '.join(differ)} differ); "
                         f"pass the same settings or another --out")
    return old


def prior_runs(old: dict, reference: str) -> dict:
    """An earlier call's runs as {(member, seed, lr): result}, the lr sweep's runs of the reference included."""
    curves = old.get("curves", {})
    prior = {}
    for sw in old.get("lr_sweep", []):
        k = (reference, 0, sw["lr"])
        prior[k] = dict(heldout_loss=sw["heldout_loss"], curve=curves.get(f"{k[0]} s0 lr{k[2]:g}", []))
    for r in old.get("rows", []):
        k = (r["member"], r["seed"], r["lr"])
        prior[k] = {**{c: r[c] for c in RUN_COLS[4:] if c in r},
                    "curve": curves.get(f"{k[0]} s{k[1]} lr{k[2]:g}", [])}
    return prior


def summarize(runs: list, members: dict, reference: str) -> list:
    out = []
    ref = grid.spread(r["heldout_loss"] for r in runs if r["member"] == reference)["mean"]
    for m, (desc, _) in members.items():
        rs = [r for r in runs if r["member"] == m]
        if not rs:
            continue
        s = grid.spread(r["heldout_loss"] for r in rs)
        out.append(dict(member=m, description=desc, seeds=s["n"], heldout_loss_mean=s["mean"],
                        heldout_loss_std=s["std"], heldout_loss_min=s["min"], heldout_loss_max=s["max"],
                        delta_vs_reference=s["mean"] - ref,
                        step_time_s=statistics.median(r["step_time_s"] for r in rs),
                        step_cpu_s=statistics.median(r["step_cpu_s"] for r in rs),
                        params_M=rs[0]["params_M"]))
    return out


def plot(summary, runs, sweep, lr, path, title):
    plt = grid.pyplot()
    if plt is None:
        return
    fig, axes = plt.subplots(1, 2, figsize=(11, 4), gridspec_kw=dict(width_ratios=[3, 1]))
    ax = axes[0]
    for i, s in enumerate(summary):
        ys = [r["heldout_loss"] for r in runs if r["member"] == s["member"]]
        ax.plot([i] * len(ys), ys, "o", color="0.6", ms=4)
        ax.errorbar([i], [s["heldout_loss_mean"]], yerr=[s["heldout_loss_std"]], fmt="s", color="C0", capsize=4)
    ax.set_xticks(range(len(summary)), [s["member"] for s in summary], rotation=30, ha="right", fontsize=8)
    ax.set_ylabel("held-out loss (nats/token)")
    ax.set_title("each seed (grey), mean ± std (blue)", fontsize=9)
    ax.grid(alpha=0.3)
    ax = axes[1]
    if sweep:
        pts = sorted((x["lr"], x["heldout_loss"]) for x in sweep)
        ax.plot(*zip(*pts), "o-")
        ax.axvline(lr, color="C3", ls="--", lw=1)
        ax.set_xscale("log")
    ax.set_xlabel("learning rate")
    ax.set_title("lr sweep (reference member, seed 0)", fontsize=9)
    ax.grid(alpha=0.3)
    fig.suptitle(title, fontsize=8)
    fig.tight_layout()
    grid.save_figure(fig, path)


def write_markdown(name, summary, sweep, lr, skipped_members, not_run, meta, path):
    r = meta["recipe"]
    lines = [f"Grid `{name}`: {r['max_steps']} steps × {r['batch_size']} sequences × {r['seq_len']} tokens, "
             f"model {r['model_config']} with {r['model_overrides'] or 'no overrides'}, lr {lr:g} "
             f"(warm-up {r['warmup_steps']}, cosine), seeds {meta['seeds']}, {meta['dtype']}.",
             f"Device {meta['device']}, torch {meta['torch']}, transformers {meta['transformers']}, rev {meta['rev']}, "
             f"{meta['date']}. Command: `{meta['command']}`. Config defaults: {meta['config_defaults']}.", ""]
    if meta.get("resumed"):
        rs = meta["resumed"]
        lines += [f"Resumed: the runs already in this folder were kept (rev {rs.get('rev')}, {rs.get('date')}, "
                  f"`{rs.get('command')}`); this call ran only the missing ones.", ""]
    if sweep:
        lines += ["lr sweep on `" + meta["reference"] + "`, seed " + str(meta["seeds"][0]) + ": " + ", ".join(
            f"{x['lr']:g} → {x['heldout_loss']:.3f}" for x in sorted(sweep, key=lambda x: x["lr"])) +
            f"; chosen {lr:g}.", ""]
    lines += ["| member | held-out loss (mean ± std) | min – max | Δ vs " + meta["reference"] +
              " | seeds | step (s) | CPU s/step | params (M) | description |",
              "| --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for s in summary:
        lines.append(f"| {s['member']} | {s['heldout_loss_mean']:.3f} ± {s['heldout_loss_std']:.3f} | "
                     f"{s['heldout_loss_min']:.3f} – {s['heldout_loss_max']:.3f} | {s['delta_vs_reference']:+.3f} | "
                     f"{s['seeds']} | {s['step_time_s']:.2f} | {s['step_cpu_s']:.2f} | {s['params_M']:.2f} | "
                     f"{s['description']} |")
    for m, why in skipped_members:
        lines.append(f"| {m} | skipped: {why} | | | | | | | |")
    if not_run:
        lines += ["", f"Not run (time budget of {meta['budget_min']} min): " +
                  ", ".join(f"{k[0]} seed {k[1]} lr {k[2]:g}" for k in not_run) + "."]
    grid.write_text(path, "\n".join(lines) + "\n")


def estimate(base, members: dict, reference: str, seeds: int, n_lrs: int, jobs: int, vocab: int) -> list:
    """CPU seconds of one optimizer step of each member at the grid's shape (one warm-up step, then the
    median of two), and the grid's time from them: every member × seeds, the sweep's extra runs, two
    evaluations of eval_batches forward passes (≈ a third of a step each). Prints a table."""
    import torch

    from mixcon.train.loop import build_model, make_optimizer

    rows = []
    for m, (_, ov) in members.items():
        r = dataclasses.replace(base, model_overrides={**base.model_overrides, **ov})
        model = build_model(r, vocab).train()
        opt = make_optimizer(model, r, torch.device("cpu"))
        x = torch.randint(0, model.config.vocab_size, (r.batch_size, r.seq_len + 1))
        times = []
        for _ in range(3):
            c0 = time.process_time()
            model(x[:, :-1], labels=x, use_cache=False).loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            times.append(time.process_time() - c0)
        step = statistics.median(times[1:])
        runs = seeds + (n_lrs - 1 if m == reference else 0)
        per_run = step * (r.max_steps + 2 * r.eval_batches / 3)
        rows.append(dict(member=m, cpu_s_per_step=step, runs=runs, cpu_min=runs * per_run / 60))
        print(f"{m:14s} {step:6.2f} CPU s/step × {r.max_steps} steps × {runs} runs = {rows[-1]['cpu_min']:6.1f} "
              "CPU min", flush=True)
    total = sum(x["cpu_min"] for x in rows)
    print(f"total {total:.0f} CPU min: ≈ {total / jobs:.0f} min with --jobs {jobs} on idle cores", flush=True)
    return rows


def main(argv=None):
    ap = argparse.ArgumentParser(prog="mixcon study ablation", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("grid", choices=list(GRIDS))
    ap.add_argument("overrides", nargs="*", help="KEY=VALUE recipe overrides (model_overrides.FIELD=V reaches the model)")
    ap.add_argument("--recipe", default="tiny", help="a shipped recipe name or a YAML file")
    ap.add_argument("--members", nargs="+", default=None, help="a subset of the grid's members")
    ap.add_argument("--seeds", type=int, default=3, help="seeds 0 .. N-1")
    ap.add_argument("--lrs", nargs="+", type=float, default=[1e-3, 3e-3, 1e-2], help="the sweep")
    ap.add_argument("--lr", type=float, default=None, help="skip the sweep, use this")
    ap.add_argument("--budget-min", type=float, default=55.0, help="start no run that would end after this")
    ap.add_argument("--jobs", type=int, default=1, help="runs at a time, in separate one-thread processes")
    ap.add_argument("--threads", type=int, default=None, help="torch threads when --jobs 1 (default 1 on CPU)")
    ap.add_argument("--runs", default=os.path.join("runs", "ablation"), help="training runs go here")
    ap.add_argument("--out", default=None, help="default eval/results/ablation/<grid>")
    ap.add_argument("--smoke", action="store_true", help="seconds: 2 steps of 16 tokens, 2 seeds, a 2-point sweep")
    ap.add_argument("--estimate", action="store_true", help="time one step of each member, print the grid's time")
    ap.add_argument("--resume", action="store_true",
                    help="keep the runs already in OUT/results.json (same grid and recipe) and run only the "
                         "missing ones; the table covers both")
    ap.add_argument("--no-progress", action="store_true")
    args = ap.parse_intermixed_args(argv)
    import torch

    from mixcon.bench.common import header, save_results

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.type == "cpu":
        torch.set_num_threads(args.threads or 1)
    g = GRIDS[args.grid]
    if args.members and set(args.members) - set(g["members"]):
        ap.error(f"--members {sorted(set(args.members) - set(g['members']))} not in grid {args.grid}: "
                 f"{list(g['members'])}")
    settings = {k: v for k, v in g["recipe"].items() if k != "model_overrides"}
    if args.smoke:
        args.seeds, args.lrs = 2, args.lrs[:2]
        settings.update(seq_len=16, batch_size=2, max_steps=2, warmup_steps=1)
    settings.update({f"model_overrides.{k}": v for k, v in g["recipe"].get("model_overrides", {}).items()})
    overrides = [f"{k}={json.dumps(v)}" for k, v in settings.items()] + args.overrides
    if args.estimate:  # no data needed: the tokenizer's vocabulary when it exists, the built-in 2048 otherwise
        from mixcon.train.recipe import load_recipe

        base = load_recipe(args.recipe, overrides)
        tok_json = os.path.join(base.tokenizer, "tokenizer.json")
        vocab = len(json.load(open(tok_json))["model"]["vocab"]) if os.path.exists(tok_json) else 2048
    else:
        base, tok = grid.load_builtin(args.recipe, overrides)
        vocab = len(tok)
    base = dataclasses.replace(base, eval_every=max(1, base.max_steps // 2), save_every=base.max_steps,
                               log_every=base.max_steps, eval_batches=1 if args.smoke else max(base.eval_batches, 8))
    fields = grid.config_fields()
    members, skipped_members = grid_members(args.grid, fields, args.members)
    for m, why in skipped_members:
        print(f"skipping {m}: {why}", flush=True)
    full = grid_members(args.grid, fields)[0]
    reference = g["reference"] if g["reference"] in members else next(iter(members), None)
    out = args.out or os.path.join("eval", "results", "ablation", args.grid)
    old = read_prior(out, args.grid, dataclasses.asdict(base)) if args.resume else None
    if old is not None:  # the earlier call's reference
        reference = old["meta"].get("reference", reference)
    if reference is None:
        raise SystemExit(f"grid {args.grid}: no member can run with the installed config")
    if args.estimate:
        return estimate(base, members, reference, args.seeds, 1 if args.lr is not None else len(args.lrs),
                        args.jobs, vocab)
    runs_dir = os.path.join(args.runs, args.grid)
    meta = header(device, dtype="bf16 autocast" if device.type == "cuda" else "float32", grid=args.grid,
                  reference=reference, seeds=list(range(args.seeds)), budget_min=args.budget_min,
                  config_defaults=grid.config_defaults("control_period", "delay", "k_max"),
                  shapes=dict(seq_len=base.seq_len, batch_size=base.batch_size, max_steps=base.max_steps),
                  recipe=dataclasses.asdict(base))
    print(json.dumps({k: v for k, v in meta.items() if k != "recipe"}), flush=True)

    def job(member, seed, lr):
        ov = {**base.model_overrides, **full[member][1]}
        r = dataclasses.replace(base, seed=seed, lr=lr, model_overrides=ov,
                                out_dir=os.path.join(runs_dir, f"{member.replace(' ', '_')}-s{seed}-lr{lr:g}"))
        return grid.Job(key=(member, seed, lr), fn=train_run, args=(dataclasses.asdict(r),), cost_key=member)

    def report(key, res):
        print(f"{key[0]:14s} seed {key[1]} lr {key[2]:g}: held-out {res['heldout_loss']:.4f}, "
              f"{res['step_time_s']:.2f} s/step", flush=True)

    prior, shown = {}, members
    if args.resume:
        old = old or {"meta": {}}
        prior = prior_runs(old, reference)
        meta["resumed"] = {k: old["meta"].get(k) for k in ("rev", "date", "command")}
        # the table shows every member of the grid that has runs, not only the ones run now
        shown = {m: v for m, v in full.items() if m in members or any(k[0] == m for k in prior)}
        print(f"resuming: {len(prior)} runs kept from {out}/results.json (rev {meta['resumed']['rev']})", flush=True)
    deadline = time.monotonic() + args.budget_min * 60
    sweep_jobs = [] if args.lr is not None else [job(reference, 0, lr) for lr in args.lrs
                                                 if (reference, 0, lr) not in prior]
    done, not_run = grid.run_jobs(sweep_jobs, args.budget_min * 60, args.jobs, not args.no_progress, "lr sweep", report)
    sweep = [dict(lr=k[2], heldout_loss=v["heldout_loss"]) for k, v in done.items()]
    if args.resume:  # the earlier call's sweep, and what this one added to it
        sweep = [sw for sw in old.get("lr_sweep", []) if sw["lr"] not in {x["lr"] for x in sweep}] + sweep
    done = {**prior, **done}
    if args.lr is not None:
        lr = args.lr
    elif sweep:
        lr = min(sweep, key=lambda x: x["heldout_loss"])["lr"]
    else:
        raise SystemExit("the lr sweep did not run within the budget")
    print(f"learning rate {lr:g}", flush=True)
    main_jobs = [job(m, s, lr) for s in range(args.seeds) for m in members if (m, s, lr) not in done]
    more, not_run2 = grid.run_jobs(main_jobs, max(0.0, deadline - time.monotonic()), args.jobs,
                                   not args.no_progress, f"{args.grid} runs", report)
    done.update(more)
    runs = [dict(grid=args.grid, member=k[0], seed=k[1], lr=k[2], **{c: v[c] for c in RUN_COLS[4:] if c in v})
            for k, v in done.items() if k[2] == lr]
    runs = [r for r in runs if r["member"] in shown]
    runs.sort(key=lambda r: (list(shown).index(r["member"]), r["seed"]))
    summary = summarize(runs, shown, reference)
    os.makedirs(out, exist_ok=True)
    not_run = [list(k) for k in not_run + not_run2]
    save_results(out, runs, RUN_COLS, meta, summary=summary, lr=lr, lr_sweep=sweep, not_run=not_run,
                 skipped_members=[list(x) for x in skipped_members],
                 curves={f"{k[0]} s{k[1]} lr{k[2]:g}": v["curve"] for k, v in done.items()})
    import csv

    tmp = os.path.join(out, "summary.csv.tmp")
    with open(tmp, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=SUMMARY_COLS, extrasaction="ignore")
        w.writeheader()
        w.writerows(summary)
    os.replace(tmp, os.path.join(out, "summary.csv"))
    write_markdown(args.grid, summary, sweep, lr, skipped_members, not_run, meta, os.path.join(out, "ablation.md"))
    plot(summary, runs, sweep, lr, os.path.join(out, "ablation.png"),
         f"{args.grid}: {base.max_steps} steps × {base.batch_size} × {base.seq_len} tokens, lr {lr:g}, "
         f"{args.seeds} seeds ({meta['device']}, rev {meta['rev']})")
    print(open(os.path.join(out, "ablation.md")).read())
    return summary, runs, not_run


if __name__ == "__main__":
    main()
