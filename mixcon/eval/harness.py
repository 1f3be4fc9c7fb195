"""lm-evaluation-harness for MixCon.

A saved MixCon runs under the harness's own ``hf`` model type, in a process that never imported
mixcon (the checkpoint's ``auto_map`` brings the code)::

    lm_eval --model hf --model_args pretrained=DIR,trust_remote_code=True,dtype=bfloat16 \
            --tasks hellaswag,winogrande,arc_easy,arc_challenge,boolq --batch_size 8

This module registers a ``mixcon`` model type as well (``--model mixcon`` after importing it, or
through `evaluate`), which takes an in-memory model, sets ``max_length`` from the config, and
defaults to the CPU when no GPU is present::

    mixcon eval DIR --tasks arc_easy --batch_size 8 [--include_path DIR]

Generate-until tasks call ``model.generate``, which on a CUDA device takes the static cache and the
compiled (CUDA-graph) decode step by default (MixConForCausalLM's own choice, see the README's "Fast
decoding"), under both model types and without a flag; ``--gen_kwargs cache_implementation=dynamic``
turns it off.

Recurrent layers must be exact under the harness's two paddings (right padding without a mask for
log-likelihoods, left padding with a mask for generation); the test suite checks both on an
offline task set (multiple-choice, generate-until, rolling log-likelihood).
"""

from __future__ import annotations

import argparse
import json

import torch

import mixcon  # noqa: F401  (importing registers the Auto classes)

try:
    from lm_eval.api.registry import register_model
    from lm_eval.models.huggingface import HFLM
except ImportError as e:  # pragma: no cover - lm-eval is the `eval` extra
    raise ImportError("mixcon eval needs lm-eval, a dependency of mixcon that is missing here: pip install 'lm-eval>=0.4.13'") from e

# The paper's evaluation suite (MixCon, Table 2–3) as lm-eval task names.
PAPER_TASKS = {
    "standard": ["hellaswag", "winogrande", "arc_easy", "arc_challenge", "boolq", "mmlu", "bbh"],
    "reading": ["quac"],  # QuAC: not in every lm-eval release; see the README
    "long_context": ["scrolls_narrativeqa"],  # NarrativeQA; L-Eval has no lm-eval task: see the README
}


@register_model("mixcon")
class MixConLM(HFLM):
    """``HFLM`` for MixCon: ``pretrained`` is a directory or an in-memory `MixConForCausalLM`."""

    def __init__(self, pretrained="", tokenizer=None, device=None, max_length=None, batch_size=1, **kwargs):
        if device is None:
            device = "cuda" if torch.cuda.is_available() else "cpu"
        if isinstance(pretrained, str):
            from transformers import AutoConfig

            kwargs.setdefault("trust_remote_code", True)
            if max_length is None:
                max_length = AutoConfig.from_pretrained(pretrained, trust_remote_code=True).context_limit
            super().__init__(pretrained=pretrained, tokenizer=tokenizer, device=device, max_length=max_length,
                             batch_size=batch_size, **kwargs)
        else:
            if tokenizer is None:
                raise ValueError("an in-memory model needs its tokenizer: MixConLM(model, tokenizer=tok)")
            max_length = max_length or pretrained.config.context_limit
            super().__init__(pretrained=pretrained, tokenizer=tokenizer, max_length=max_length,
                             batch_size=batch_size, **kwargs)


def evaluate(model, tokenizer=None, tasks=("arc_easy",), include_path=None, limit=None, batch_size=1,
             log_samples=False, **kwargs):
    """Run lm-eval on ``model`` (a directory or an in-memory MixCon) and return its results dict."""
    from lm_eval import simple_evaluate
    from lm_eval.tasks import TaskManager

    lm = MixConLM(model, tokenizer=tokenizer, batch_size=batch_size)
    tm = TaskManager(include_path=include_path) if include_path else TaskManager()
    return simple_evaluate(model=lm, tasks=list(tasks), task_manager=tm, limit=limit, log_samples=log_samples,
                           batch_size=batch_size, **kwargs)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--pretrained", required=True, help="a save_pretrained directory with its tokenizer")
    ap.add_argument("--tasks", default="arc_easy",
                    help="comma-separated lm-eval tasks, or 'paper' for the paper's standard suite")
    ap.add_argument("--include_path", default=None)
    ap.add_argument("--limit", type=float, default=None)
    ap.add_argument("--batch_size", type=int, default=1)
    ap.add_argument("--num_fewshot", type=int, default=None)
    ap.add_argument("--output", default=None, help="write the results JSON here")
    args = ap.parse_args(argv)
    tasks = PAPER_TASKS["standard"] if args.tasks == "paper" else args.tasks.split(",")
    res = evaluate(args.pretrained, tasks=tasks, include_path=args.include_path, limit=args.limit,
                   batch_size=args.batch_size, **({"num_fewshot": args.num_fewshot} if args.num_fewshot is not None else {}))
    from lm_eval.utils import make_table

    print(make_table(res))
    if args.output:
        with open(args.output, "w") as f:
            json.dump({k: res[k] for k in ("results", "config", "versions") if k in res}, f, indent=1, default=str)


if __name__ == "__main__":
    main()
