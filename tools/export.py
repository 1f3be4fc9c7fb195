#!/usr/bin/env python
"""Turn a sharded training checkpoint into a save_pretrained model directory (safetensors).

    python tools/export.py runs/train runs/model                        # the run's newest checkpoint, bf16
    python tools/export.py runs/train/checkpoints/step-00002000 runs/model --dtype fp32 --tokenizer runs/tok

One process, no process group: it reads the shards every training process wrote (any number of
them) but only the model's tensors, never the optimizer state, casting each tensor as it is read,
so it needs memory for the model in the chosen dtype and little more.
"""

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from mixcon.train.checkpoint import export_pretrained, resolve_checkpoint  # noqa: E402


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("checkpoint", help="a checkpoint directory (step-N) or a run's out_dir (its newest checkpoint)")
    ap.add_argument("out", help="output directory for save_pretrained")
    ap.add_argument("--dtype", default="bf16", choices=["bf16", "fp32"], help="dtype of the exported weights")
    ap.add_argument("--tokenizer", default=None, help="a tokenizer directory to save beside the model")
    ap.add_argument("--max-shard-size", default="5GB", help="largest safetensors file (save_pretrained's)")
    args = ap.parse_args(argv)
    ckpt = resolve_checkpoint(args.checkpoint)
    export_pretrained(ckpt, args.out, dtype=args.dtype, tokenizer=args.tokenizer, max_shard_size=args.max_shard_size)
    print(f"exported {ckpt} → {args.out} ({args.dtype})")


if __name__ == "__main__":
    main()
