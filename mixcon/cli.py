"""mixcon: train, run, evaluate and benchmark MixCon models.

    mixcon train [--recipe NAME|FILE] [key=value ...]    the main job (default: the built-in tiny recipe)
    mixcon generate MODEL --prompt TEXT                  stream a continuation
    mixcon eval MODEL --tasks T1,T2                      lm-evaluation-harness through its hf model
    mixcon layout CONFIG                                 the per-layer layout of a config (name or file)
    mixcon bench WHICH ...                               benchmarks (each prints its run header)
    mixcon study WHICH ...                               the studies of the paper's claims (resumable)

Each verb has --help. A bad argument, file or path is one line on stderr and exit status 2.
"""

from __future__ import annotations

import argparse
import sys

from mixcon.resources import UsageError

# The verbs: name → (one-line help, the function that adds its arguments, the function that runs it).
VERBS: dict = {}


def verb(name: str, help: str, arguments):
    """Register the decorated function as the run of verb ``name``; ``arguments(ap)`` adds its arguments."""
    def wrap(run):
        VERBS[name] = (help, arguments, run)
        return run
    return wrap


def _passthrough(ap: argparse.ArgumentParser, what: str) -> None:
    ap.add_argument("args", nargs=argparse.REMAINDER, help=f"the arguments of {what} (see its --help)")


# ---------------------------------------------------------------------------------------------- verbs
def _train_args(ap):
    from mixcon.resources import recipe_names

    ap.description = ("Train a MixCon model. The built-in recipe trains a tokenizer and a tiny MixCon on "
                      "the Python standard library's source (CPU, about 3 minutes). Under torchrun, one "
                      "process per GPU (`torchrun --nproc_per_node N -m mixcon train ...`).")
    ap.add_argument("--recipe", default=None,
                    help=f"a shipped recipe ({', '.join(recipe_names())}) or a YAML file (default: tiny)")
    ap.add_argument("--resume", action="store_true",
                    help="continue from the newest checkpoint in out_dir/checkpoints (any number of processes)")
    ap.add_argument("--no-progress", action="store_true", help="no progress bar")
    ap.add_argument("overrides", nargs="*", metavar="key=value",
                    help="recipe fields, e.g. max_steps=50 out_dir=runs/x model_overrides.delay=0")


@verb("train", "train a model from a recipe; writes OUT/model (a HuggingFace directory), log.csv, loss.png",
      _train_args)
def _train(args):
    from mixcon.train.loop import NonFiniteLoss
    from mixcon.train.run import run

    try:
        run(args.recipe, args.overrides, resume=args.resume, progress=not args.no_progress)
    except NonFiniteLoss as exc:
        raise SystemExit(str(exc))


def _generate_args(ap):
    ap.add_argument("model", help="a save_pretrained directory with its tokenizer (e.g. runs/tiny/model)")
    ap.add_argument("--prompt", required=True)
    ap.add_argument("--max-new-tokens", type=_positive_int, default=64)
    ap.add_argument("--temperature", type=_non_negative_float, default=0.8, help="0 = greedy")
    ap.add_argument("--static", action="store_true", help="the static cache (compiled decode step on a GPU)")
    ap.add_argument("--seed", type=int, default=0)


@verb("generate", "stream a continuation of a prompt from a saved model", _generate_args)
def _generate(args):
    from mixcon.generate import stream

    stream(args.model, args.prompt, max_new_tokens=args.max_new_tokens, temperature=args.temperature,
           static=args.static, seed=args.seed)


def _eval_args(ap):
    ap.add_argument("model", help="a save_pretrained directory with its tokenizer")
    ap.add_argument("--tasks", required=True, help="comma-separated lm-eval tasks, or 'paper' (the paper's suite)")
    ap.add_argument("--include_path", "--include-path", default=None, help="a folder of task YAMLs")
    ap.add_argument("--limit", type=float, default=None, help="examples per task (or a fraction < 1)")
    ap.add_argument("--batch_size", "--batch-size", type=_positive_int, default=1)
    ap.add_argument("--num_fewshot", "--num-fewshot", type=int, default=None)
    ap.add_argument("--output", default=None, help="write the results JSON here")


@verb("eval", "evaluate a saved model with lm-evaluation-harness (its hf model)", _eval_args)
def _eval(args):
    import os

    from mixcon.generate import check_model_dir

    check_model_dir(args.model)
    if args.include_path and not os.path.isdir(args.include_path):
        raise UsageError(f"--include_path {args.include_path!r} is not a directory of task YAML files")
    try:
        from mixcon.eval import harness
    except ImportError as exc:
        raise UsageError(str(exc)) from None
    argv = [f"--pretrained={args.model}", f"--tasks={args.tasks}", f"--batch_size={args.batch_size}"]
    argv += [f"--include_path={args.include_path}"] if args.include_path else []
    argv += [f"--limit={args.limit}"] if args.limit is not None else []
    argv += [f"--num_fewshot={args.num_fewshot}"] if args.num_fewshot is not None else []
    argv += [f"--output={args.output}"] if args.output else []
    harness.main(argv)


def _export_args(ap):
    ap.add_argument("checkpoint", help="a checkpoint directory (step-N) or a run's out_dir (its newest checkpoint)")
    ap.add_argument("out", help="output directory")
    ap.add_argument("--dtype", default="bf16", choices=["bf16", "fp32"])
    ap.add_argument("--tokenizer", default=None,
                    help="tokenizer directory to save beside the model (default: the run's own, when found)")
    ap.add_argument("--max-shard-size", default="5GB")


@verb("export", "turn a training checkpoint into a HuggingFace directory (safetensors, bf16 or fp32)", _export_args)
def _export(args):
    import os

    from mixcon.train.checkpoint import export_pretrained, read_trainer_state, resolve_checkpoint

    try:
        ckpt = resolve_checkpoint(args.checkpoint)
    except ValueError as exc:
        raise UsageError(str(exc)) from None
    tok = args.tokenizer
    if tok is None:  # the run's own: its model directory, its recipe's tokenizer (relative to the run's cwd)
        run = os.path.dirname(os.path.dirname(os.path.abspath(ckpt)))
        found = [p for p in (os.path.join(run, "model"), read_trainer_state(ckpt)["recipe"].get("tokenizer") or "",
                             os.path.join(run, "tokenizer")) if os.path.exists(os.path.join(p, "tokenizer.json"))]
        tok = found[0] if found else None
    elif not os.path.isdir(tok):
        raise UsageError(f"--tokenizer {tok!r} is not a tokenizer directory")
    export_pretrained(ckpt, args.out, dtype=args.dtype, tokenizer=tok, max_shard_size=args.max_shard_size)
    print(f"exported {ckpt} → {args.out} ({args.dtype}{', with the tokenizer' if tok else ', no tokenizer'})")


def _convert_args(ap):
    ap.add_argument("family", choices=["jamba"], help="the source family")
    ap.add_argument("src", help="a transformers checkpoint directory of that family")
    ap.add_argument("dst", help="output directory for the MixCon checkpoint")
    ap.add_argument("--dtype", default=None, choices=["float32", "bfloat16", "float16"])


@verb("convert", "convert another model family's checkpoint: `mixcon convert jamba SRC DST`", _convert_args)
def _convert(args):
    import os

    import torch

    from mixcon.convert import from_jamba

    if not os.path.isdir(args.src) or not os.path.exists(os.path.join(args.src, "config.json")):
        raise UsageError(f"{args.src!r} is not a checkpoint directory (no config.json)")
    try:
        model = from_jamba(args.src, dtype=getattr(torch, args.dtype) if args.dtype else None)
    except ValueError as exc:
        raise UsageError(f"{args.src}: {exc}") from None
    model.save_pretrained(args.dst)
    try:
        from transformers import AutoTokenizer

        AutoTokenizer.from_pretrained(args.src).save_pretrained(args.dst)
    except Exception as exc:  # a checkpoint without a tokenizer is still convertible
        print(f"no tokenizer copied ({type(exc).__name__}: {exc})", file=sys.stderr)
    print(model.config.layout_summary())
    print(f"saved {sum(p.numel() for p in model.parameters()):,} parameters to {args.dst}")


def _prepare_args(ap):
    ap.add_argument("files", nargs="+", help="text files (one document each) or .jsonl ({\"text\": ...} per line)")
    ap.add_argument("--tokenizer", required=True, help="a tokenizer directory")
    ap.add_argument("--out", required=True, help="the data directory (the recipe's `data`)")
    ap.add_argument("--heldout", type=float, default=0.05, help="share of documents held out, in [0, 1)")


@verb("prepare-data", "tokenize text/JSONL files into training shards with a held-out split (resumable)", _prepare_args)
def _prepare(args):
    from transformers import AutoTokenizer

    from mixcon.train.data import prepare_data

    _require_files(args.files)
    if not 0 <= args.heldout < 1:
        raise UsageError(f"--heldout {args.heldout} must be in [0, 1)")
    tok = AutoTokenizer.from_pretrained(_require_dir(args.tokenizer, "--tokenizer", "tokenizer.json"))
    meta = prepare_data(args.files, tok, args.out, args.heldout)
    for split, shards in meta["shards"].items():
        print(f"{split}: {sum(n for _, n in shards):,} tokens in {len(shards)} shards")


def _train_tokenizer_args(ap):
    ap.add_argument("out_dir")
    ap.add_argument("files", nargs="+")
    ap.add_argument("--vocab-size", type=_positive_int, default=32000)


@verb("train-tokenizer", "train the MixCon BPE tokenizer (digits split, byte fallback) on text/JSONL files",
      _train_tokenizer_args)
def _train_tokenizer(args):
    from mixcon.train.tokenizer import train_tokenizer_files

    _require_files(args.files)
    try:
        tok = train_tokenizer_files(args.files, args.out_dir, args.vocab_size)
    except ValueError as exc:
        raise UsageError(str(exc)) from None
    print(f"saved a {len(tok)}-token tokenizer to {args.out_dir}")


BENCHES = {"conba": "mixcon.bench.conba", "conba-tune": "mixcon.bench.conba_tune", "moe": "mixcon.bench.moe",
           "throughput": "mixcon.bench.throughput", "max-context": "mixcon.bench.max_context",
           "kv-cache": "mixcon.bench.kv_cache", "conba-cpu": "mixcon.bench.conba_cpu", "decode": "mixcon.bench.decode",
           "kernel-report": "mixcon.bench.kernel_report",
           "serve": "mixcon.serve.bench"}  # serve: vLLM serving (docs/serving.md), needs the vLLM venv


def _bench_args(ap):
    ap.add_argument("which", choices=list(BENCHES), help="the benchmark")
    _passthrough(ap, "the benchmark")


@verb("bench", "benchmarks: " + ", ".join(BENCHES) + " (each prints its run header)", _bench_args)
def _bench(args):
    import importlib

    importlib.import_module(BENCHES[args.which]).main(args.args)


STUDIES = {"recall": ("mixcon.eval.recall", "MQAR (Zoology's task and protocol): the pilot gate, the claim members, "
                                          "paired control ablations"),
           "control": ("mixcon.eval.control_study", "the controller: init | shift | extrapolation"),
           "ablation": ("mixcon.eval.ablation", "language-modelling ablations: mechanisms | ratio | period"),
           "family": ("mixcon.eval.study", "the family's members on one corpus and budget (MoD, MoM, sparse MLP)")}


def _study_args(ap):
    ap.description = "The studies, each resumable (--resume) with a --smoke run:\n" + "\n".join(
        f"  {k:9s} {v[1]}" for k, v in STUDIES.items())
    ap.formatter_class = argparse.RawDescriptionHelpFormatter
    ap.add_argument("which", choices=list(STUDIES), help="the study")
    _passthrough(ap, "the study")


@verb("study", "the studies of the paper's claims: " + ", ".join(STUDIES) + " (resumable, one thread per run)",
      _study_args)
def _study(args):
    import importlib

    module = importlib.import_module(STUDIES[args.which][0])
    try:
        module.main(args.args)
    except ValueError as exc:
        raise UsageError(str(exc)) from None


def _layout_args(ap):
    from mixcon.resources import config_names

    ap.add_argument("config", help=f"a shipped config ({', '.join(config_names())}) or a config.json")


@verb("layout", "print the per-layer layout of a config (a shipped name such as mixcon-1b, or a file)", _layout_args)
def _layout(args):
    from mixcon.resources import load_config

    cfg = load_config(args.config)
    print(cfg.layout_summary())
    for i, (m, f) in enumerate(zip(cfg.layers_block_type, cfg.layers_ffn_type)):
        print(f"layer {i:3d}: {m:9s} {f}")


def _demo_args(ap):
    ap.add_argument("--config", default="tiny", help="a shipped config name or a config.json")
    ap.add_argument("--context", type=_positive_int, default=4096)
    ap.add_argument("--new-tokens", type=_positive_int, default=12)
    ap.add_argument("--seed", type=int, default=0)


@verb("demo", "build a tiny model, generate, compare its cache with a same-size transformer's (seconds)", _demo_args)
def _demo(args):
    from mixcon.demo import demo

    demo(args.config, context=args.context, new_tokens=args.new_tokens, seed=args.seed)


# ---------------------------------------------------------------------------------------------- checks
def _positive_int(text: str) -> int:
    try:
        v = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
    if v < 1:
        raise argparse.ArgumentTypeError(f"{v} must be >= 1")
    return v


def _non_negative_float(text: str) -> float:
    try:
        v = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not v >= 0:
        raise argparse.ArgumentTypeError(f"{v} must be >= 0")
    return v


def _require_files(paths) -> None:
    import os

    for p in paths:
        if not os.path.isfile(p):
            raise UsageError(f"input {p!r} is {'a directory' if os.path.isdir(p) else 'missing'}; give text or "
                             f".jsonl files")


def _require_dir(path: str, what: str, marker: str) -> str:
    import os

    if not os.path.exists(os.path.join(path, marker)):
        raise UsageError(f"{what} {path!r} is not a directory holding {marker}")
    return path


# ---------------------------------------------------------------------------------------------- main
def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="mixcon", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--version", action="version", version=f"mixcon {_version()}")
    sub = ap.add_subparsers(dest="verb", metavar="VERB", title="verbs")
    for name, (help, arguments, _) in VERBS.items():
        arguments(sub.add_parser(name, help=help, description=help))
    return ap


def _version() -> str:
    from mixcon import __version__

    return __version__


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    ap = build_parser()
    if not argv:
        ap.print_help()
        return 0
    args = ap.parse_args(argv)
    try:
        VERBS[args.verb][2](args)
    except UsageError as exc:
        print(f"mixcon {args.verb}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"mixcon {args.verb}: interrupted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
