#!/usr/bin/env python
"""Train a MixCon model from a YAML recipe, on one process or many (torchrun).

    python tools/train.py                                  # built-in default: configs/train-tiny.yaml
    python tools/train.py --recipe configs/train-tiny.yaml max_steps=50 lr=1e-3 model_overrides.delay=0
    torchrun --nproc_per_node 8 tools/train.py --recipe R.yaml parallel=fsdp
    python tools/train.py --recipe R.yaml --resume         # continue from the newest out_dir/checkpoints/step-N
    python tools/train.py --recipe R.yaml --export DIR     # also write a save_pretrained model + tokenizer

Checkpoints are sharded (torch.distributed.checkpoint): each process writes its own shards, and
--resume works on any number of processes. tools/export.py turns one into a save_pretrained model.

With the default recipe and no prepared data, a tokenizer is trained on the Python standard
library's source (every fresh machine has it) and the data prepared first; after training the
model generates a continuation of a prompt.
"""

import argparse
import glob
import os
import sys
import sysconfig

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from mixcon.train.loop import NonFiniteLoss, train, unwrap  # noqa: E402
from mixcon.train.recipe import load_recipe  # noqa: E402

DEFAULT_RECIPE = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs", "train-tiny.yaml")


def stdlib_files(limit=None):
    files = sorted(glob.glob(os.path.join(sysconfig.get_paths()["stdlib"], "*.py")))
    return files[:limit] if limit else files


def ensure_builtin_data(r, vocab_size=2048):
    """Tokenizer + shards from the standard library's source, when the recipe's dirs are empty."""
    from transformers import AutoTokenizer

    from mixcon.train.data import prepare_data
    from mixcon.train.tokenizer import train_tokenizer

    files = stdlib_files()
    if not os.path.exists(os.path.join(r.tokenizer, "tokenizer.json")):
        print(f"training a {vocab_size}-token tokenizer on {len(files)} standard-library files → {r.tokenizer}")
        train_tokenizer(files, r.tokenizer, vocab_size, input_sentence_size=300_000)
    tok = AutoTokenizer.from_pretrained(r.tokenizer)
    prepare_data(files, tok, r.data, heldout_fraction=0.05)
    return tok


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--recipe", default=None, help="YAML recipe (default: the built-in tiny one)")
    ap.add_argument("--resume", action="store_true",
                    help="continue from the newest checkpoint in out_dir/checkpoints (any number of processes)")
    ap.add_argument("--export", default=None, help="write a save_pretrained model and its tokenizer here")
    ap.add_argument("--no-progress", action="store_true")
    ap.add_argument("overrides", nargs="*", help="KEY=VALUE recipe overrides")
    args = ap.parse_args(argv)
    builtin = args.recipe is None
    r = load_recipe(args.recipe or DEFAULT_RECIPE, args.overrides)
    if builtin and int(os.environ.get("RANK", 0)) == 0:
        ensure_builtin_data(r)
    try:
        rows = train(r, resume=args.resume, progress=not args.no_progress)
    except NonFiniteLoss as exc:
        raise SystemExit(str(exc))
    rank = int(os.environ.get("RANK", 0))
    if rank != 0:
        return
    first = next((x for x in rows if x["heldout_loss"] != ""), None)
    last = rows[-1] if rows else None
    if first and last:
        print(f"held-out loss: {first['heldout_loss']:.3f} at step {first['step']} → "
              f"{last['heldout_loss']:.3f} at step {last['step']}  (log: {r.out_dir}/log.csv, plot: {r.out_dir}/loss.png)")
    if args.export or builtin:
        from transformers import AutoTokenizer

        from mixcon.train.checkpoint import latest_checkpoint, model_from_checkpoint

        tok = AutoTokenizer.from_pretrained(r.tokenizer)
        model = model_from_checkpoint(latest_checkpoint(r.out_dir))  # float32, the model's tensors only
        if args.export:
            model.save_pretrained(args.export)
            tok.save_pretrained(args.export)
            print(f"exported model and tokenizer to {args.export}")
        prompt = "def "
        ids = tok(prompt, return_tensors="pt", add_special_tokens=False).input_ids
        torch.manual_seed(0)  # sampled (greedy decoding of a small model repeats itself), reproducibly
        out = model.generate(ids, max_new_tokens=48, do_sample=True, temperature=0.8, top_p=0.95,
                             repetition_penalty=1.2, pad_token_id=tok.pad_token_id)
        print("sample:", repr(tok.decode(out[0])))


if __name__ == "__main__":
    main()
