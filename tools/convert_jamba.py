#!/usr/bin/env python
"""Convert a transformers Jamba checkpoint to a MixCon checkpoint with equal logits.

    python tools/convert_jamba.py SRC_DIR DST_DIR [--dtype bfloat16]

The tokenizer files in SRC_DIR, if any, are copied along.
"""

import argparse
import sys

import torch


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("src", help="directory of a JambaForCausalLM checkpoint")
    ap.add_argument("dst", help="output directory for the MixCon checkpoint")
    ap.add_argument("--dtype", default=None, choices=["float32", "bfloat16", "float16"])
    args = ap.parse_args(argv)

    from mixcon.convert import from_jamba

    dtype = getattr(torch, args.dtype) if args.dtype else None
    model = from_jamba(args.src, dtype=dtype)
    model.save_pretrained(args.dst)
    try:
        from transformers import AutoTokenizer

        AutoTokenizer.from_pretrained(args.src).save_pretrained(args.dst)
    except Exception as exc:  # a checkpoint without a tokenizer is still convertible
        print(f"no tokenizer copied ({type(exc).__name__}: {exc})", file=sys.stderr)
    print(model.config.layout_summary())
    print(f"saved {sum(p.numel() for p in model.parameters()):,} parameters to {args.dst}")


if __name__ == "__main__":
    main()
