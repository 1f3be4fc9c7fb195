#!/usr/bin/env python
"""Tokenize text / JSONL files into memory-mapped shards with a held-out split (resumable).

    python tools/prepare_data.py --tokenizer TOK_DIR --out DATA_DIR FILE [FILE ...] [--heldout 0.05]
"""

import argparse

from transformers import AutoTokenizer

from mixcon.train.data import prepare_data


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("files", nargs="+")
    ap.add_argument("--tokenizer", required=True)
    ap.add_argument("--out", required=True)
    ap.add_argument("--heldout", type=float, default=0.05)
    args = ap.parse_args(argv)
    tok = AutoTokenizer.from_pretrained(args.tokenizer)
    meta = prepare_data(args.files, tok, args.out, args.heldout)
    for split, shards in meta["shards"].items():
        print(f"{split}: {sum(n for _, n in shards):,} tokens in {len(shards)} shards")


if __name__ == "__main__":
    main()
