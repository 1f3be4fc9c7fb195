"""Throughput of MixCon served by vLLM beside this project's `generate`, or beside vLLM's own hybrid.

    python -m mixcon.serve.bench --model DIR [--batch 1 8] [--prompt-len 64] [--new-tokens 64]
    python -m mixcon.serve.bench --tiny-random OUT_DIR ...   # exports a random model of the tiny config first
    mixcon bench serve --side-by-side OUT_DIR --batch 1 8 32 --prompt-len 256 --new-tokens 64

``--side-by-side`` saves a small random transformers `JambaForCausalLM`, converts it with
`mixcon convert jamba`, and serves both with one vLLM build: vLLM's in-tree Jamba on the original,
MixCon's plugin on the converted copy (greedy tokens compared, then tokens/s of each and their
ratio). Where vLLM cannot run its in-tree Jamba (the CPU build has no Mamba-1 prefill scan,
``torch.ops._C.selective_scan_fwd``), the error is printed and the speed peer is the in-tree hybrid it
can run at the same shape: Granite 4.0-H (``GraniteMoeHybridForCausalLM``: Mamba-2 layers, one
attention layer at the same position, MoE); the tokens are then compared with transformers' Jamba.

Both decode greedily exactly ``--new-tokens`` tokens per prompt (no end-of-sequence stop) from the same
random token prompts; tokens/s counts generated tokens. `generate` runs left-padded batches with the
dynamic cache, and on CUDA also with the static cache (``cache_implementation="static"``). vLLM runs
one `LLM.generate` call over the batch, eager (`enforce_eager=True`; the side-by-side runs both engines so).
Each figure is the median of ``--reps`` timed runs after one warm-up, in one process.
"""

from __future__ import annotations

import argparse
import json
import os
import time

import torch

# the engine in this process: a separate engine process polls for work and would take CPU from the
# `generate` runs beside it
DEFAULT_ENV = {"VLLM_CPU_KVCACHE_SPACE": "2", "VLLM_CPU_OMP_THREADS_BIND": "nobind", "VLLM_ENABLE_V1_MULTIPROCESSING": "0"}


def _median_time(fn, reps: int) -> float:
    fn()  # warm-up
    ts = []
    for _ in range(reps):
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        fn()
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        ts.append(time.perf_counter() - t0)
    return sorted(ts)[len(ts) // 2]


def export_tiny_random(out_dir: str, **overrides) -> str:
    """A random MixCon of configs/tiny.json (head_dim 32: vLLM's CPU attention needs ≥ 32) saved with
    `save_pretrained`."""
    from mixcon import MixConForCausalLM
    from mixcon.resources import load_config

    torch.manual_seed(0)
    MixConForCausalLM(load_config("tiny", **{"head_dim": 32, **overrides})).save_pretrained(out_dir)
    return out_dir


# the side-by-side's shape: head_dim 32 (vLLM's CPU attention needs >= 32), one attention layer of 8 at
# offset 4, MoE (4 experts, top 2) every second layer, Mamba d_state 16, expand 2
SIDE_SHAPE = dict(vocab_size=512, hidden_size=128, intermediate_size=256, num_hidden_layers=8,
                  num_attention_heads=4, num_key_value_heads=2, num_experts=4, num_experts_per_tok=2,
                  mamba_d_state=16, mamba_d_conv=4, mamba_expand=2)


def _randomize(model) -> None:
    """Weights away from their near-identity init so that greedy tokens are decided by clear margins."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("A_log"):
                p.copy_(torch.log(torch.rand_like(p) * 4 + 0.5))
            elif "norm" in name:
                p.copy_(1 + 0.2 * torch.randn_like(p))
            elif name.endswith("dt_proj.bias") or name.endswith("dt_bias"):
                p.copy_(torch.randn_like(p) * 0.5 - 2.0)
            else:
                p.add_(torch.randn_like(p) * 0.1)


def export_side_by_side(out_dir: str) -> dict[str, str]:
    """Random Jamba (transformers) → OUT/jamba, `mixcon convert jamba` → OUT/mixcon, and the Mamba-2 peer
    of the same shape (Granite 4.0-H) → OUT/granite. → {name: directory}."""
    import subprocess
    import sys

    from transformers import GraniteMoeHybridConfig, GraniteMoeHybridForCausalLM, JambaConfig, JambaForCausalLM

    s = SIDE_SHAPE
    dirs = {k: os.path.join(out_dir, k) for k in ("jamba", "mixcon", "granite")}
    ids = dict(pad_token_id=0, bos_token_id=1, eos_token_id=2, tie_word_embeddings=False, max_position_embeddings=2048)
    torch.manual_seed(0)
    jamba = JambaForCausalLM(JambaConfig(
        vocab_size=s["vocab_size"], hidden_size=s["hidden_size"], intermediate_size=s["intermediate_size"],
        num_hidden_layers=s["num_hidden_layers"], num_attention_heads=s["num_attention_heads"],
        num_key_value_heads=s["num_key_value_heads"], attn_layer_period=8, attn_layer_offset=4,
        expert_layer_period=2, expert_layer_offset=1, num_experts=s["num_experts"],
        num_experts_per_tok=s["num_experts_per_tok"], mamba_d_state=s["mamba_d_state"], mamba_d_conv=s["mamba_d_conv"],
        mamba_expand=s["mamba_expand"], use_mamba_kernels=False, **ids)).eval()
    _randomize(jamba)
    jamba.save_pretrained(dirs["jamba"])
    subprocess.run([sys.executable, "-m", "mixcon", "convert", "jamba", dirs["jamba"], dirs["mixcon"]], check=True,
                   stdout=subprocess.DEVNULL)
    d_inner = s["mamba_expand"] * s["hidden_size"]
    granite = GraniteMoeHybridForCausalLM(GraniteMoeHybridConfig(
        vocab_size=s["vocab_size"], hidden_size=s["hidden_size"], intermediate_size=s["intermediate_size"],
        shared_intermediate_size=s["intermediate_size"], num_hidden_layers=s["num_hidden_layers"],
        num_attention_heads=s["num_attention_heads"], num_key_value_heads=s["num_key_value_heads"],
        layer_types=["attention" if i == 4 else "mamba" for i in range(s["num_hidden_layers"])],
        num_local_experts=s["num_experts"], num_experts_per_tok=s["num_experts_per_tok"],
        mamba_n_heads=d_inner // 32, mamba_d_head=32, mamba_n_groups=1, mamba_d_state=s["mamba_d_state"],
        mamba_d_conv=s["mamba_d_conv"], mamba_expand=s["mamba_expand"], position_embedding_type="nope", **ids)).eval()
    _randomize(granite)
    granite.save_pretrained(dirs["granite"])
    return dirs


_PROBE = """
import os, sys
os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
import vllm
llm = vllm.LLM(model=sys.argv[1], skip_tokenizer_init=True, dtype=sys.argv[2], enforce_eager=True,
               max_model_len=64, max_num_seqs=1, enable_prefix_caching=False, seed=0)
llm.generate([{"prompt_token_ids": [5, 6, 7]}], vllm.SamplingParams(max_tokens=2), use_tqdm=False)
"""


def _probe(model_dir: str, dtype: str) -> str | None:
    """None when vLLM serves ``model_dir`` (in a child process: a failed engine leaves this one unusable),
    else the last line of its error."""
    import subprocess
    import sys

    r = subprocess.run([sys.executable, "-c", _PROBE, model_dir, dtype], capture_output=True, text=True)
    if r.returncode == 0:
        return None
    lines = [line for line in r.stderr.splitlines() if "Error" in line]
    return (lines[-1] if lines else r.stderr.strip().splitlines()[-1]).split("]: ", 1)[-1]


def side_by_side(args) -> None:
    import vllm

    from mixcon.bench.common import header

    dirs = export_side_by_side(args.side_by_side)
    jamba_error = _probe(dirs["jamba"], args.dtype)
    peer, peer_name = (dirs["jamba"], "vLLM in-tree Jamba") if jamba_error is None else \
        (dirs["granite"], "vLLM in-tree Granite 4.0-H")
    from transformers import AutoConfig

    mcfg = AutoConfig.from_pretrained(dirs["mixcon"])
    print(json.dumps(header(torch.device("cuda" if torch.cuda.is_available() else "cpu"), vllm=vllm.__version__,
                            dtype=args.dtype, threads=torch.get_num_threads(), prompt_len=args.prompt_len,
                            new_tokens=args.new_tokens, batch=args.batch, reps=args.reps, peer=peer_name,
                            jamba_in_tree_error=jamba_error, shape=SIDE_SHAPE,
                            mixcon_layout="".join("a" if t == "attention" else "c" for t in mcfg.layers_block_type))))
    if jamba_error is not None:
        print(f"vLLM cannot serve its in-tree Jamba here: {jamba_error}")
    kw = dict(skip_tokenizer_init=True, dtype=args.dtype, enable_prefix_caching=False, enforce_eager=True,
              max_model_len=args.prompt_len + args.new_tokens, max_num_seqs=max(args.batch), seed=0)
    engines = {"MixCon plugin": vllm.LLM(model=dirs["mixcon"], **kw), peer_name: vllm.LLM(model=peer, **kw)}
    sp = vllm.SamplingParams(temperature=0.0, max_tokens=args.new_tokens, ignore_eos=True)
    g = torch.Generator().manual_seed(0)

    # greedy tokens: the plugin on the converted copy against the in-tree Jamba, or transformers' Jamba
    check = [torch.randint(3, SIDE_SHAPE["vocab_size"], (n,), generator=g).tolist() for n in (args.prompt_len, 37, 5)]
    run = lambda llm, ps: [list(r.outputs[0].token_ids)
                           for r in llm.generate([{"prompt_token_ids": p} for p in ps], sp, use_tqdm=False)]
    got = run(engines["MixCon plugin"], check)
    if jamba_error is None:
        want, ref = run(engines[peer_name], check), "vLLM's in-tree Jamba"
    else:
        from transformers import JambaForCausalLM

        hf = JambaForCausalLM.from_pretrained(dirs["jamba"], dtype=getattr(torch, args.dtype)).eval()
        want = [hf.generate(input_ids=torch.tensor([p]), max_new_tokens=args.new_tokens, do_sample=False,
                            pad_token_id=0)[0, len(p):].tolist() for p in check]
        ref = "transformers' JambaForCausalLM.generate"
        # generate stops at the end-of-sequence token (vLLM runs on with ignore_eos): compare up to it
        eos = hf.config.eos_token_id
        got, want = ([t[:t.index(eos) + 1] if eos in t else t for t in ts] for ts in (got, want))
    same = sum(a == b for a, b in zip(got, want))
    print(f"greedy tokens, MixCon plugin (converted) vs {ref}: {same}/{len(check)} prompts equal "
          f"({args.new_tokens} new tokens each)")

    print(f"{'batch':>5} {peer_name + ' tok/s':>32} {'MixCon plugin tok/s':>20} {'ratio':>7}")
    for b in args.batch:
        reqs = [{"prompt_token_ids": torch.randint(3, SIDE_SHAPE["vocab_size"], (args.prompt_len,),
                                                   generator=g).tolist()} for _ in range(b)]
        times = {name: [] for name in engines}
        for name, llm in engines.items():  # warm-up
            llm.generate(reqs, sp, use_tqdm=False)
        for _ in range(args.reps):  # alternated, so that the shared machine's load falls on both
            for name, llm in engines.items():
                t0 = time.perf_counter()
                llm.generate(reqs, sp, use_tqdm=False)
                times[name].append(time.perf_counter() - t0)
        tps = {n: b * args.new_tokens / sorted(t)[len(t) // 2] for n, t in times.items()}
        print(f"{b:>5} {tps[peer_name]:>32.1f} {tps['MixCon plugin']:>20.1f} "
              f"{tps['MixCon plugin'] / tps[peer_name]:>6.2f}x")


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    src = ap.add_mutually_exclusive_group(required=True)
    src.add_argument("--model", help="a save_pretrained MixCon directory")
    src.add_argument("--tiny-random", metavar="OUT_DIR", help="export a random tiny MixCon here and use it")
    src.add_argument("--side-by-side", metavar="OUT_DIR",
                     help="random Jamba converted to MixCon here; the plugin against vLLM's own hybrid")
    ap.add_argument("--batch", type=int, nargs="+", default=[1, 8])
    ap.add_argument("--prompt-len", type=int, default=64)
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    args = ap.parse_args(argv)
    for k, v in DEFAULT_ENV.items():
        os.environ.setdefault(k, v)
    if args.side_by_side:
        return side_by_side(args)

    from mixcon import MixConForCausalLM
    from mixcon.bench.common import header

    model_dir = args.model or export_tiny_random(args.tiny_random)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = getattr(torch, args.dtype)
    import vllm

    llm = vllm.LLM(model=model_dir, skip_tokenizer_init=True, dtype=args.dtype, enable_prefix_caching=False,
                   enforce_eager=True, max_model_len=args.prompt_len + args.new_tokens,
                   max_num_seqs=max(args.batch), seed=0)
    hf = MixConForCausalLM.from_pretrained(model_dir, dtype=dtype).to(device).eval()
    cfg = hf.config
    meta = header(device, vllm=vllm.__version__, dtype=args.dtype, threads=torch.get_num_threads(),
                  hidden_size=cfg.hidden_size, layers=cfg.num_hidden_layers, layout="".join(
                      "a" if t == "attention" else "c" for t in cfg.layers_block_type),
                  params=sum(p.numel() for p in hf.parameters()), prompt_len=args.prompt_len,
                  new_tokens=args.new_tokens)
    print(json.dumps(meta))
    g = torch.Generator().manual_seed(0)
    sp = vllm.SamplingParams(temperature=0.0, max_tokens=args.new_tokens, ignore_eos=True)
    print(f"{'batch':>5} {'engine':<24} {'tokens/s':>10} {'vs generate':>12}")
    for b in args.batch:
        prompts = torch.randint(3, cfg.vocab_size, (b, args.prompt_len), generator=g)
        reqs = [{"prompt_token_ids": p} for p in prompts.tolist()]
        ids = prompts.to(device)
        gen = dict(max_new_tokens=args.new_tokens, min_new_tokens=args.new_tokens, do_sample=False,
                   pad_token_id=cfg.pad_token_id)
        rows = [("generate (dynamic cache)", lambda: hf.generate(input_ids=ids, **gen))]
        if device.type == "cuda":
            rows.append(("generate (static cache)",
                         lambda: hf.generate(input_ids=ids, cache_implementation="static", **gen)))
        rows.append(("vLLM LLM.generate", lambda: llm.generate(reqs, sp, use_tqdm=False)))
        base = None
        for name, fn in rows:
            with torch.no_grad():
                tps = b * args.new_tokens / _median_time(fn, args.reps)
            base = base or tps
            print(f"{b:>5} {name:<24} {tps:>10.1f} {tps / base:>11.2f}x")


if __name__ == "__main__":
    main()
