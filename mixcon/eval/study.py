"""A small study of the family's members on one data set and one training budget.

MixCon, a dense transformer, MixCon with Mixture-of-Depths, a Mixture-of-Modules model (from
scratch, and from the trained dense model: the paper's two-stage recipe) and a sparse all-MLP are
trained by the same tool with the same recipe (default: the built-in tiny recipe, the Python
standard library's source on CPU). For each: held-out loss, parameters, FLOPs per token counted
while the model runs (matrix products and attention by torch's flop counter; pointwise ops
separately), training and decoding tokens/s, and for MoD the causal decision's agreement with
top-k. One table (Markdown, CSV, JSON) and one plot of the loss curves.

    mixcon study family                                    # all members, the built-in recipe
    mixcon study family --members mixcon dense --steps 50  # a subset, shorter
    mixcon study family --recipe R.yaml --out DIR          # larger data on a GPU

``mom-2stage`` starts from the dense run's weights, so its curve is on top of the dense budget:
the table says so instead of pretending it is a like-for-like row.
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

import torch

from mixcon.eval.grid import load_builtin  # noqa: E402
from mixcon.bench.common import count_flops, header, save_results  # noqa: E402
from mixcon.train.checkpoint import latest_checkpoint, load_model_weights  # noqa: E402
from mixcon.train.data import TokenShards  # noqa: E402
from mixcon.train.loop import build_model, train  # noqa: E402

MEMBERS = {  # name → (config, description, model overrides)
    "mixcon": ("tiny", "MixCon 1:3, MoE every 2nd layer", {}),
    "dense": ("dense-tiny", "dense transformer (RoPE)", {}),
    "mod": ("mod-tiny", "MixCon + Mixture-of-Depths (C = 12.5%), router decision", {}),
    "mod-predictor": ("mod-tiny", "MixCon + Mixture-of-Depths, predictor decision",
                      {"mod_decision": "predictor"}),
    "mom": ("mom-tiny", "Mixture-of-Modules K2 H4, 8+8 modules", {}),
    "mom-2stage": ("mom-tiny", "MoM, pool from the trained dense model", {}),
    "smlp": ("smlp-tiny", "sparse all-MLP, 2 dense + 6 sparse", {}),
}
COLS = ["member", "description", "params_M", "heldout_loss", "heldout_ppl", "train_GFLOP_per_token",
        "infer_MFLOP_per_token", "infer_elementwise_Mop_per_token", "train_tok_per_s", "decode_tok_per_s",
        "mod_agreement", "mod_selected", "mom_skip_share"]


def export_dir(r):
    return os.path.join(r.out_dir, "export")


def trained_model(r, vocab):
    model = build_model(dataclasses.replace(r, init_from=None), vocab)
    load_model_weights(latest_checkpoint(r.out_dir), model)  # tensors only, nothing unpickled
    return model.eval()


def measure(model, heldout: TokenShards, r, decode_tokens: int) -> dict:
    """FLOPs per token (training step and inference forward), decoding speed, routing statistics."""
    x = torch.from_numpy(heldout.batch(0, 4, r.seq_len, seed=123))
    n = x[:, :-1].numel()
    model.train()
    train_flops = count_flops(lambda: model(x[:, :-1], labels=x, use_cache=False).loss.backward())
    model.zero_grad(set_to_none=True)
    model.eval()
    with torch.no_grad():
        infer = count_flops(lambda: model(x[:, :-1], use_cache=False))
    out = dict(train_GFLOP_per_token=train_flops["matmul"] / n / 1e9, infer_MFLOP_per_token=infer["matmul"] / n / 1e6,
               infer_elementwise_Mop_per_token=infer["elementwise"] / n / 1e6)
    # routing statistics of the eval-mode forward above
    routers = [l.depth_router for l in model.model.layers if hasattr(l, "depth_router")]
    if routers:
        out["mod_agreement"] = statistics.mean(rt.last_stats["agreement"] for rt in routers)
        out["mod_selected"] = statistics.mean(rt.last_stats["selected"] for rt in routers)
    rounds = [l.mixer for l in model.model.layers if l.mixer_type == "mom"]
    if rounds:
        skips = [(c == rd.attn_router.skip).float().mean().item() for rd in rounds for c in rd.last_choices]
        out["mom_skip_share"] = statistics.mean(skips)
    # decoding: batch 1, greedy, a 16-token prompt, the cache on; best of two
    prompt = x[:1, :16]
    times = []
    for _ in range(2):
        t0 = time.perf_counter()
        model.generate(prompt, max_new_tokens=decode_tokens, min_new_tokens=decode_tokens, do_sample=False,
                       pad_token_id=0)
        times.append(time.perf_counter() - t0)
    out["decode_tok_per_s"] = decode_tokens / min(times)
    return out


def plot(curves: dict, path: str, title: str):
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for name, rows in curves.items():
        ls = "--" if name == "mom-2stage" else "-"
        axes[0].plot([x["step"] for x in rows], [x["loss"] for x in rows], ls, label=name, alpha=0.85)
        ev = [x for x in rows if x["heldout_loss"] != ""]
        axes[1].plot([x["step"] for x in ev], [x["heldout_loss"] for x in ev], ls + "o", label=name, ms=3)
    for ax, what in zip(axes, ("training loss", "held-out loss")):
        ax.set_xlabel("step")
        ax.set_ylabel(f"{what} (nats/token)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv=None):
    ap = argparse.ArgumentParser(prog="mixcon study family", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--recipe", default="tiny", help="a shipped recipe name or a YAML file")
    ap.add_argument("--members", nargs="+", default=list(MEMBERS), choices=list(MEMBERS))
    ap.add_argument("--steps", type=int, default=None, help="override the recipe's max_steps")
    ap.add_argument("--runs", default=os.path.join("runs", "study"), help="training runs go here")
    ap.add_argument("--out", default=os.path.join("eval", "results", "study"))
    ap.add_argument("--decode-tokens", type=int, default=64)
    ap.add_argument("--no-progress", action="store_true")
    args = ap.parse_args(argv)
    if "mom-2stage" in args.members and "dense" not in args.members:
        ap.error("mom-2stage starts from the dense run: list dense too")
    torch.set_num_threads(max(1, torch.get_num_threads()))
    base, tok = load_builtin(args.recipe, [f"max_steps={args.steps}"] if args.steps else [])
    heldout = TokenShards(base.data, "heldout")
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    meta = header(device, recipe=dataclasses.asdict(base))
    print(json.dumps({k: v for k, v in meta.items() if k != "recipe"}))
    order = sorted(args.members, key=lambda m: list(MEMBERS).index(m))  # dense before mom-2stage
    rows, curves = [], {}
    for name in order:
        config, desc, model_overrides = MEMBERS[name]
        overrides = dict(model_config=config, out_dir=os.path.join(args.runs, name),
                         model_overrides={**base.model_overrides, **model_overrides})
        if name == "mom-2stage":
            overrides["init_from"] = export_dir(dataclasses.replace(base, out_dir=os.path.join(args.runs, "dense")))
        r = dataclasses.replace(base, **overrides)
        print(f"== {name}: {desc}", flush=True)
        log = train(r, progress=not args.no_progress)
        model = trained_model(r, len(tok))
        if name == "dense":
            model.save_pretrained(export_dir(r))
        heldout_loss = [x for x in log if x["heldout_loss"] != ""][-1]["heldout_loss"]
        tps = [x["tokens_per_s"] for x in log[len(log) // 5:] if x.get("tokens_per_s") not in ("", None)]
        row = dict(member=name, description=desc, params_M=sum(p.numel() for p in model.parameters()) / 1e6,
                   heldout_loss=heldout_loss, heldout_ppl=math.exp(heldout_loss),
                   train_tok_per_s=statistics.median(tps) if tps else float("nan"))
        row.update(measure(model, heldout, r, args.decode_tokens))
        rows.append(row)
        curves[name] = log
        print({k: (round(v, 4) if isinstance(v, float) else v) for k, v in row.items()}, flush=True)
    os.makedirs(args.out, exist_ok=True)
    save_results(args.out, rows, COLS, meta, curves={k: [{kk: x[kk] for kk in ("step", "loss", "heldout_loss")}
                                                         for x in v] for k, v in curves.items()})
    write_markdown(rows, meta, os.path.join(args.out, "study.md"))
    plot(curves, os.path.join(args.out, "loss_curves.png"),
         f"{base.max_steps} steps × {base.batch_size} × {base.seq_len} tokens, lr {base.lr} "
         f"({meta['device']}, rev {meta['rev']})")
    print(f"wrote {args.out}/study.md, results.csv, results.json, loss_curves.png")


def write_markdown(rows, meta, path):
    fmt = lambda v, p: "" if v in (None, "") or (isinstance(v, float) and math.isnan(v)) else f"{v:.{p}f}"  # noqa: E731
    r = meta["recipe"]
    lines = [f"Same data and budget for every member: {r['max_steps']} steps × {r['batch_size']} sequences × "
             f"{r['seq_len']} tokens, lr {r['lr']} (warm-up {r['warmup_steps']}, cosine), seed {r['seed']}.",
             f"Device {meta['device']}, torch {meta['torch']}, transformers {meta['transformers']}, rev {meta['rev']}, "
             f"{meta['date']}. Command: `{meta['command']}`.", "",
             "| member | params (M) | held-out loss | ppl | train GFLOP/token | infer MFLOP/token (matmul) | "
             "infer Mop/token (pointwise) | train tok/s | decode tok/s | notes |",
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for x in rows:
        notes = [x["description"]]
        if "mod_agreement" in x:
            notes.append(f"causal decision agrees with top-k on {100 * x['mod_agreement']:.1f}% of tokens, "
                         f"selects {100 * x['mod_selected']:.1f}% at inference")
        if "mom_skip_share" in x:
            notes.append(f"SKIP is {100 * x['mom_skip_share']:.1f}% of the picks")
        if x["member"] == "mom-2stage":
            notes.append("starts from the dense run: its budget is on top of the dense one")
        lines.append(f"| {x['member']} | {fmt(x['params_M'], 2)} | {fmt(x['heldout_loss'], 3)} | "
                     f"{fmt(x['heldout_ppl'], 1)} | {fmt(x['train_GFLOP_per_token'], 4)} | "
                     f"{fmt(x['infer_MFLOP_per_token'], 2)} | {fmt(x['infer_elementwise_Mop_per_token'], 3)} | "
                     f"{fmt(x['train_tok_per_s'], 0)} | {fmt(x['decode_tok_per_s'], 1)} | {'; '.join(notes)} |")
    with open(path, "w") as f:
        f.write("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
