"""CPU benchmark of Conba (`mixcon bench conba-cpu`), every number beside
its baseline from the same process, runs interleaved and repeated, medians reported:

  ``layer``  one Conba layer (ConbaMixer, every mechanism on, control period 64) forward + backward
             beside transformers' ``Mamba2Mixer`` (its torch path, as on any CPU without mamba_ssm)
             at equal sizes (hidden 256, d_inner 512, N 16, Mamba-2 heads of 64, batch 2), and the
             same Conba layer without the compiled kernels (the pure-PyTorch path);
  ``model``  an 8-layer width-256 hybrid (2 attention : 6 Conba, dense SwiGLU FFN, P = 64) beside the
             same model with every layer attention (RoPE): prefill seconds (one forward of the whole
             prompt, batch 1, under no_grad), decode ms per token after it (the growing cache, greedy,
             the two models' tokens interleaved; ``decode_roofline``: the ratio of the bytes a token must
             read, `decode_bytes`, the speed-up memory bandwidth allows),
             and for the longest context the peak resident memory the prefill adds (Linux);
  ``scan``   `conba_scan` alone, chunk_torch against the reference loop (the tiny model's sizes);
  ``mechanisms``  one training step (forward + backward) of a small all-Conba model (2 layers, width 64,
             N 16, 64 sequences of 64 tokens by default) for each mechanism and combination of them —
             delay, scaling, control at P = 1, 16, 64 or off, training noise, SwiGLU or linear selection,
             a padding mask — beside the Mamba member (every mechanism off, linear selection), all
             interleaved in one process; best and median of the repeats.

    mixcon bench conba-cpu --threads 2 --out eval/results/cpu
    mixcon bench conba-cpu --parts mechanisms --threads 1 --reps 5
"""

from __future__ import annotations

import argparse
import ctypes
import time

import torch

from .common import header, print_row, save_results

SCAN_SETTINGS = {"P=64": dict(control=True, P=64), "P=16": dict(control=True, P=16),
                 "P=1": dict(control=True, P=1), "control off": dict(control=False, P=1)}


def interleaved_times(fns: dict, reps: int) -> dict:
    """Seconds of each of ``reps`` runs of each function, the functions run interleaved (after one warm-up
    each), so that a load change on a shared machine hits all of them alike."""
    for f in fns.values():
        f()
    times = {k: [] for k in fns}
    for _ in range(reps):
        for k, f in fns.items():
            t0 = time.perf_counter()
            f()
            times[k].append(time.perf_counter() - t0)
    return times


def medians(fns: dict, reps: int) -> dict:
    """Median seconds of each function over ``reps`` interleaved runs (`interleaved_times`)."""
    return {k: sorted(v)[len(v) // 2] for k, v in interleaved_times(fns, reps).items()}


# ---------------------------------------------------------------------------------------- layer
def layer_rows(Ts, reps, batch=2, hidden=256, d_state=16):
    from transformers import Mamba2Config
    from transformers.models.mamba2.modeling_mamba2 import Mamba2Mixer
    from transformers.utils import logging

    from ..layers.conba import ConbaMixer
    from ..models.configuration_mixcon import MixConConfig
    from ..ops.conba import chunk_torch

    logging.set_verbosity_error()  # Mamba2Mixer's notice that it runs its torch path
    cfg = MixConConfig(hidden_size=hidden, d_state=d_state, n_blocks=1, layers_per_block=8, attn_ratio="2:6",
                       moe_every=0, vocab_size=512, num_attention_heads=4, num_key_value_heads=2)
    torch.manual_seed(0)
    conba = ConbaMixer(cfg, 0)
    conba.reset_parameters()
    m2 = Mamba2Mixer(Mamba2Config(hidden_size=hidden, expand=2, state_size=d_state, head_dim=64,
                                  num_heads=cfg.d_inner // 64, n_groups=1, chunk_size=256), 0)
    rows = []
    for T in Ts:
        x = torch.randn(batch, T, hidden, requires_grad=True)

        def fwd_bwd(mod, compiled=True):
            def run():
                chunk_torch.COMPILED = compiled
                try:
                    mod(x).float().pow(2).mean().backward()
                finally:
                    chunk_torch.COMPILED = True
            return run

        fns = {"conba": fwd_bwd(conba), "mamba2": fwd_bwd(m2)}
        if T <= 4096:
            fns["conba_pytorch"] = fwd_bwd(conba, compiled=False)
        t = medians(fns, reps)
        rows.append(dict(part="layer fwd+bwd", T=T, batch=batch, conba_s=t["conba"], mamba2_s=t["mamba2"],
                         conba_over_mamba2=t["conba"] / t["mamba2"], conba_pytorch_s=t.get("conba_pytorch")))
        print_row(rows[-1], LAYER_COLS)
    return rows


LAYER_COLS = ["part", "T", "batch", "conba_s", "mamba2_s", "conba_over_mamba2", "conba_pytorch_s"]


# ---------------------------------------------------------------------------------------- model
def model_configs(hidden=256, layers=8, intermediate=704, max_ctx=32768):
    from ..models.configuration_mixcon import MixConConfig

    kw = dict(vocab_size=512, hidden_size=hidden, intermediate_size=intermediate, n_blocks=1,
              layers_per_block=layers, moe_every=0, num_attention_heads=4, num_key_value_heads=2,
              max_position_embeddings=max(2 * max_ctx, 8192))
    return {"attention": MixConConfig(**kw, attn_ratio=f"{layers}:0", use_rope=True),
            "hybrid": MixConConfig(**kw, attn_ratio="2:6")}


def _rss(field: str) -> int | None:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


def peak_added_bytes(fn) -> int | None:
    """Resident memory that ``fn()`` adds at its peak (Linux: VmHWM after resetting it, less VmRSS
    before, freed heap returned to the system first); None elsewhere."""
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # resets VmHWM to the current RSS
    except OSError:
        return None
    before = _rss("VmRSS")
    fn()
    peak = _rss("VmHWM")
    return None if before is None or peak is None else peak - before


def decode_bytes(model, context: int) -> int:
    """Bytes a decode token must read at ``context`` tokens of cache, at the least: every weight once (the
    embedding table one row, unless tied to the head), each attention layer's keys and values, each
    Conba layer's state read and written. Two models' ratio of it is the speed-up the memory bandwidth
    allows (the roofline) where decoding is bandwidth-bound, as at batch 1."""
    cfg = model.config
    emb, head = model.get_input_embeddings().weight, model.get_output_embeddings().weight
    n = sum(p.numel() for p in model.parameters())
    if emb.data_ptr() != head.data_ptr():
        n -= emb.numel() - emb.shape[1]
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    for kind in cfg.layers_block_type:
        if kind == "attention":
            n += 2 * context * cfg.num_key_value_heads * head_dim
        elif kind == "conba":  # h and the delay line, the conv window: read and written
            n += 2 * (cfg.d_inner * cfg.d_state * (1 + cfg.delay) + cfg.d_inner * (cfg.d_conv - 1))
    return n * emb.element_size()


def model_rows(Ts, reps, decode_tokens, memory_T=None):
    """Prefill seconds and decode ms per token of the two models. Prefills alternate model by model
    within each repeat; decoding alternates token by token (one token of each model in turn, each from
    its own cache), so that the machine's load changes hit both alike; medians over every token of
    every repeat."""
    from ..models.compat import cache_kwargs, output_cache
    from ..models.modeling_mixcon import MixConForCausalLM

    torch.manual_seed(0)
    models = {k: MixConForCausalLM(c).eval() for k, c in model_configs(max_ctx=max(Ts)).items()}
    rows = []
    for T in Ts:
        ids = torch.randint(3, 512, (1, T), generator=torch.Generator().manual_seed(T))
        prefill, decode = {k: [] for k in models}, {k: [] for k in models}
        mem = {}
        n_reps = reps if T <= 8192 else 1
        for rep in range(n_reps):
            state = {}
            order = list(models) if rep % 2 == 0 else list(models)[::-1]
            with torch.no_grad():
                for name in order:
                    m, out = models[name], {}

                    def run():
                        out["o"] = m(ids, use_cache=True, logits_to_keep=1)

                    t0 = time.perf_counter()
                    if T == memory_T and name not in mem:
                        mem[name] = peak_added_bytes(run)
                    else:
                        run()
                    prefill[name].append(time.perf_counter() - t0)
                    state[name] = (output_cache(out["o"]), out["o"].logits[:, -1:].argmax(-1))
                    del out
                for _ in range(decode_tokens):
                    for name in order:
                        cache, nxt = state[name]
                        t0 = time.perf_counter()
                        o = models[name](nxt, use_cache=True, **cache_kwargs(cache))
                        decode[name].append(time.perf_counter() - t0)
                        state[name] = (output_cache(o), o.logits[:, -1:].argmax(-1))
            del state
        med = lambda v: sorted(v)[len(v) // 2]  # noqa: E731
        row = dict(part="model", T=T, reps=n_reps,
                   attn_prefill_s=med(prefill["attention"]), hybrid_prefill_s=med(prefill["hybrid"]),
                   attn_decode_ms=med(decode["attention"]) * 1e3, hybrid_decode_ms=med(decode["hybrid"]) * 1e3)
        row["prefill_speedup"] = row["attn_prefill_s"] / row["hybrid_prefill_s"]
        row["decode_speedup"] = row["attn_decode_ms"] / row["hybrid_decode_ms"]
        row["decode_roofline"] = decode_bytes(models["attention"], T) / decode_bytes(models["hybrid"], T)
        if mem:
            row["attn_prefill_peak_MiB"] = mem["attention"] / 2**20 if mem.get("attention") is not None else None
            row["hybrid_prefill_peak_MiB"] = mem["hybrid"] / 2**20 if mem.get("hybrid") is not None else None
        rows.append(row)
        print_row(row, MODEL_COLS)
    return rows


MODEL_COLS = ["part", "T", "reps", "attn_prefill_s", "hybrid_prefill_s", "prefill_speedup", "attn_decode_ms",
              "hybrid_decode_ms", "decode_speedup", "decode_roofline", "attn_prefill_peak_MiB", "hybrid_prefill_peak_MiB"]


# ---------------------------------------------------------------------------------------- scan
def scan_inputs(b, T, d, n, G, control, seed=0):
    g = torch.Generator().manual_seed(seed)
    r = lambda *s: torch.randn(*s, generator=g)  # noqa: E731
    ng = d // G
    x = dict(u=r(b, T, d), delta=r(b, T, d) * 0.5, A=-(torch.rand(d, n, generator=g) * 4 + 0.5),
             B=r(b, T, n), C=r(b, T, n), D=r(d), z=r(b, T, d), delta_bias=r(d) * 0.3 - 3.0,
             delta_softplus=True, group_size=G, alpha=torch.sigmoid(r(b, T, ng) + 4),
             rho=torch.full((ng,), 0.01), tau=2)
    if control:
        x.update(k0=torch.full((ng,), 0.1), eta=torch.full((ng,), 0.05), lam=torch.full((ng,), 0.05),
                 w_r=torch.zeros(d), k_max=1.0)
    for k in ("u", "delta", "B", "C", "z", "alpha", "A", "D", "delta_bias"):
        x[k].requires_grad_(True)
    return x


def scan_rows(Ts, reps, batch=16, d_inner=128, d_state=8, settings=tuple(SCAN_SETTINGS), ref_max_T=1024):
    from ..ops.conba import conba_scan

    rows = []
    for T in Ts:
        for name in settings:
            s = SCAN_SETTINGS[name]
            x = scan_inputs(batch, T, d_inner, d_state, 8, s["control"])

            def fwd_bwd(backend):
                def run():
                    conba_scan(**x, backend=backend, control_period=s["P"]).square().mean().backward()
                return run

            fns = {"chunk_torch": fwd_bwd("chunk_torch")}
            if T <= ref_max_T:
                fns["ref"] = fwd_bwd("ref")
            t = medians(fns, reps)
            row = dict(part="scan fwd+bwd", setting=name, T=T, chunk_torch_s=t["chunk_torch"], ref_s=t.get("ref"))
            row["speedup"] = row["ref_s"] / row["chunk_torch_s"] if row["ref_s"] else None
            rows.append(row)
            print_row(row, SCAN_COLS)
    return rows


SCAN_COLS = ["part", "setting", "T", "chunk_torch_s", "ref_s", "speedup"]


# ---------------------------------------------------------------------------------------- mechanisms
def mechanism_settings(P=16):
    """name → (config overrides on top of every mechanism off, padded batch?). The names say what is on;
    P is the control period where control is on and no other is named."""
    from ..eval import grid

    on = grid.mechanisms
    noise = grid.MECHANISM_ON["noise"]
    every = on(*grid.MECHANISM_ON)  # every mechanism, noise too
    quiet = {**every, "process_noise": 0.0, "observation_noise": 0.0}
    out = {"mamba": (on(), False),
           "+delay": (on("delay"), False), "+scaling": (on("scaling"), False),
           "+selection": (on("selection"), False), f"+control P={P}": ({**on("control"), "control_period": P}, False),
           "+noise": (on("noise"), False)}
    for p in (1, P, 64):
        out[f"all, no noise, P={p}"] = ({**quiet, "control_period": p}, False)
    out["all, no noise, control off"] = ({**quiet, "control": False}, False)
    for p in (1, P, 64):
        out[f"all + noise, P={p}"] = ({**every, "control_period": p}, False)
    out["all + noise, control off"] = ({**every, "control": False}, False)
    out["all + noise, linear selection"] = ({**every, "selection": "linear", "control_period": P}, False)
    out[f"all + noise, P={P}, backward draws again"] = ({**every, "control_period": P}, False)
    out["mamba, padded"] = (on(), True)
    out[f"all + noise, P={P}, padded"] = ({**every, "control_period": P}, True)
    out["all + noise, control off, padded"] = ({**every, "control": False}, True)
    return {k: (dict(v[0]), v[1]) for k, v in out.items()}


def mechanism_rows(reps, width=64, depth=2, batch=64, T=64, d_state=16, P=16, vocab=64, only=None):
    """Seconds of one training step (forward, cross-entropy over every token, backward) per setting, the
    settings interleaved ``reps`` times after one warm-up each; best and median. ``padded``: a quarter of
    the rows left-padded by a quarter of the sequence (attention_mask 0 there)."""
    import torch.nn.functional as F

    from ..models.configuration_mixcon import MixConConfig
    from ..models.modeling_mixcon import MixConForCausalLM
    from ..ops.conba import cpu

    settings = mechanism_settings(P)
    if only:
        settings = {k: v for k, v in settings.items() if k in only}
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(3, vocab, (batch, T), generator=g)
    pad = torch.ones(batch, T, dtype=torch.long)
    pad[: batch // 4, : T // 4] = 0
    fns = {}
    for name, (over, padded) in settings.items():
        cfg = MixConConfig(vocab_size=vocab, hidden_size=width, intermediate_size=2 * width, n_blocks=1,
                           layers_per_block=depth, attn_ratio=f"0:{depth}", moe_every=0, num_attention_heads=4,
                           num_key_value_heads=4, max_position_embeddings=max(T, 64), d_state=d_state, **over)
        torch.manual_seed(0)
        model = MixConForCausalLM(cfg).train()

        def step(model=model, mask=pad if padded else None, keep="draws again" not in name):
            model.zero_grad(set_to_none=True)
            cpu.KEEP_NOISY_STATES = keep  # (the compiled kernels' choice with noise: keep states or draw again)
            try:
                logits = model(ids, attention_mask=mask, use_cache=False).logits
                F.cross_entropy(logits[:, :-1].reshape(-1, vocab), ids[:, 1:].reshape(-1)).backward()
            finally:
                cpu.KEEP_NOISY_STATES = True
        fns[name] = step
    d_inner = 2 * width
    if cpu.kernels() is not None and hasattr(cpu.kernels(), "noise") and (not only or "noise draw" in only):
        from ..ops.conba.noise import step_key

        keys = step_key(0, torch.arange(batch), torch.arange(T)[:, None].expand(T, batch)).contiguous()
        # one layer's noise alone, as the kernels draw it: ξ's N lanes and ζ's per (t, row, channel)
        fns["noise draw"] = lambda: [cpu.noise(keys, d_inner, d_state, j) for j in range(d_state + 1)]
    times = interleaved_times(fns, reps)
    best = {k: min(v) for k, v in times.items()}
    base = best.get("mamba")
    rows = []
    for k, v in times.items():
        if k == "noise draw":
            normals = T * batch * d_inner * (d_state + 1)
            row = dict(part="noise draw", setting=f"one layer's xi and zeta: {normals} normals", width=width,
                       batch=batch, T=T, d_state=d_state, best_ms=best[k] * 1e3, median_ms=sorted(v)[len(v) // 2] * 1e3,
                       ns_per_normal=best[k] / normals * 1e9)
            rows.append(row)
            print_row(row, MECH_COLS + ["ns_per_normal"])
            continue
        over, padded = settings[k]
        quiet = k.replace("all + noise", "all, no noise") if "all + noise" in k and "padded" not in k \
            and "linear" not in k else None
        if quiet and "draws again" in quiet:
            quiet = quiet.replace(", backward draws again", "")
        row = dict(part="train step", setting=k, width=width, depth=depth, batch=batch, T=T, d_state=d_state,
                   best_ms=best[k] * 1e3, median_ms=sorted(v)[len(v) // 2] * 1e3,
                   over_mamba=best[k] / base if base else None,
                   over_no_noise=best[k] / best[quiet] if quiet in best else None)
        rows.append(row)
        print_row(row, MECH_COLS)
    return rows


MECH_COLS = ["part", "setting", "width", "depth", "batch", "T", "d_state", "best_ms", "median_ms", "over_mamba",
             "over_no_noise"]


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--parts", nargs="+", default=["layer", "model"], choices=["layer", "model", "scan", "mechanisms"])
    ap.add_argument("--layer-T", type=int, nargs="+", default=[1024, 4096])
    ap.add_argument("--model-T", type=int, nargs="+", default=[1024, 4096, 8192, 32768])
    ap.add_argument("--scan-T", type=int, nargs="+", default=[256, 1024])
    ap.add_argument("--settings", nargs="+", default=None, help="--parts mechanisms: only these settings")
    ap.add_argument("--decode-tokens", type=int, default=16)
    ap.add_argument("--memory-T", type=int, default=None, help="context whose prefill peak memory is measured "
                    "(default: the longest of --model-T)")
    ap.add_argument("--threads", type=int, default=2, help="torch.set_num_threads")
    ap.add_argument("--reps", type=int, default=3, help="interleaved repeats (1 above 8K tokens in --parts model)")
    ap.add_argument("--note", default="", help="free text stored with the results (e.g. the machine's load)")
    ap.add_argument("--out", default=None, help="folder for results.csv / results.json")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    from ..ops.conba import cpu

    t0 = time.perf_counter()
    compiled = cpu.kernels() is not None  # built (or loaded) before anything is timed
    meta = header(torch.device("cpu"), dtype="float32", threads=torch.get_num_threads(),
                  cpu_capability=torch.backends.cpu.get_cpu_capability(), compiled_kernels=compiled,
                  kernel_load_s=round(time.perf_counter() - t0, 2), note=args.note)
    print(meta, flush=True)
    rows = []
    if "layer" in args.parts:
        print("\t".join(LAYER_COLS), flush=True)
        rows += layer_rows(args.layer_T, args.reps)
    if "model" in args.parts:
        print("\t".join(MODEL_COLS), flush=True)
        rows += model_rows(args.model_T, args.reps, args.decode_tokens, args.memory_T or max(args.model_T))
    if "scan" in args.parts:
        print("\t".join(SCAN_COLS), flush=True)
        rows += scan_rows(args.scan_T, args.reps)
    if "mechanisms" in args.parts:
        print("\t".join(MECH_COLS), flush=True)
        rows += mechanism_rows(args.reps, only=args.settings)
    if args.out:
        cols = list(dict.fromkeys(c for r in rows for c in r))
        save_results(args.out, rows, cols, meta)
    return rows


if __name__ == "__main__":
    main()
