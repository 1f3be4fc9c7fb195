#!/usr/bin/env python
"""Train the MixCon BPE tokenizer (digits split, byte fallback) on text/JSONL files.

    python tools/train_tokenizer.py OUT_DIR FILE [FILE ...] [--vocab-size 32000]

OUT_DIR then loads with `AutoTokenizer.from_pretrained(OUT_DIR)` and encodes exactly as
sentencepiece does with OUT_DIR/tokenizer.model.
"""

import argparse
import json
import os
import tempfile

from mixcon.train.tokenizer import MAX_VOCAB, train_tokenizer


def _as_text_files(paths, tmp):
    """JSONL files ({"text": ...} per line) are flattened to text for sentencepiece."""
    out = []
    for p in paths:
        if not os.path.exists(p):
            raise SystemExit(f"input file {p!r} does not exist")
        if p.endswith(".jsonl"):
            q = os.path.join(tmp, os.path.basename(p) + ".txt")
            with open(p, encoding="utf-8") as f, open(q, "w", encoding="utf-8") as g:
                for line in f:
                    if line.strip():
                        g.write(json.loads(line)["text"].replace("\n", " ") + "\n")
            out.append(q)
        else:
            out.append(p)
    return out


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("out_dir")
    ap.add_argument("files", nargs="+")
    ap.add_argument("--vocab-size", type=int, default=32000, help=f"up to {MAX_VOCAB}")
    args = ap.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        tok = train_tokenizer(_as_text_files(args.files, tmp), args.out_dir, args.vocab_size)
    print(f"saved a {len(tok)}-token tokenizer to {args.out_dir}")


if __name__ == "__main__":
    main()
