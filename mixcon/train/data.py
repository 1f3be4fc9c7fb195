"""Text / JSONL files → tokenized, memory-mapped shards plus a held-out split; a step-keyed sampler.

Layout of a data directory: ``meta.json`` (tokenizer fingerprint, dtype, shards done) and one
``<split>-<k>.bin`` per input file and split (raw little-endian uint16/uint32). Preparation is
resumable per input file: a shard is written to a temporary file and renamed, then ``meta.json``
is replaced atomically, so an interrupted run picks up at the first file not recorded.
"""

from __future__ import annotations

import hashlib
import json
import os
import zlib
from typing import Iterator

import numpy as np
from tqdm import tqdm

from mixcon.train.files import atomic_write_text, publish


def tokenizer_fingerprint(tokenizer) -> dict:
    vocab = tokenizer.get_vocab()
    digest = hashlib.sha256(json.dumps(sorted(vocab.items())).encode()).hexdigest()[:16]
    return {"vocab_size": len(vocab), "vocab_sha256": digest, "eos_token_id": tokenizer.eos_token_id}


def iter_documents(path: str) -> Iterator[str]:
    """A .jsonl file yields each line's "text"; any other file is one document."""
    if path.endswith(".jsonl"):
        with open(path, encoding="utf-8") as f:
            for i, line in enumerate(f):
                if line.strip():
                    obj = json.loads(line)
                    if "text" not in obj:
                        raise ValueError(f"{path}:{i + 1}: a JSONL line needs a 'text' field, got keys {list(obj)}")
                    yield obj["text"]
    else:
        with open(path, encoding="utf-8", errors="replace") as f:
            yield f.read()


def _atomic_write_json(path, obj):
    atomic_write_text(path, json.dumps(obj, indent=1))


def prepare_data(paths, tokenizer, out_dir: str, heldout_fraction: float = 0.05, progress: bool = True) -> dict:
    """Tokenize ``paths`` into ``out_dir``; documents go to the held-out split by a hash of their
    text (stable across runs). Returns the meta dict."""
    if not 0 <= heldout_fraction < 1:
        raise ValueError(f"heldout_fraction={heldout_fraction} must be in [0, 1)")
    os.makedirs(out_dir, exist_ok=True)
    meta_path = os.path.join(out_dir, "meta.json")
    fp = tokenizer_fingerprint(tokenizer)
    dtype = "uint16" if fp["vocab_size"] <= 65536 else "uint32"
    if os.path.exists(meta_path):
        meta = json.load(open(meta_path))
        if meta["tokenizer"] != fp:
            raise ValueError(f"{out_dir} was prepared with another tokenizer ({meta['tokenizer']}), not this one "
                             f"({fp}); use a new output directory")
    else:
        meta = {"tokenizer": fp, "dtype": dtype, "done": [], "shards": {"train": [], "heldout": []}}
    eos = tokenizer.eos_token_id
    todo = [p for p in paths if os.path.abspath(p) not in meta["done"]]
    for path in tqdm(todo, desc="tokenizing", unit="file", disable=not progress):
        split_ids = {"train": [], "heldout": []}
        for doc in iter_documents(path):
            if not doc:
                continue
            h = zlib.crc32(doc.encode("utf-8", "replace")) / 2**32
            split = "heldout" if h < heldout_fraction else "train"
            split_ids[split].extend(tokenizer.encode(doc, add_special_tokens=False) + [eos])
        k = len(meta["done"])
        for split, ids in split_ids.items():
            if not ids:
                continue
            name = f"{split}-{k:05d}.bin"
            tmp = os.path.join(out_dir, name + ".tmp")
            with open(tmp, "wb") as f:
                np.asarray(ids, dtype=dtype).tofile(f)
                f.flush()
                os.fsync(f.fileno())
            publish(tmp, os.path.join(out_dir, name))
            meta["shards"][split].append([name, len(ids)])
        meta["done"].append(os.path.abspath(path))
        _atomic_write_json(meta_path, meta)
    return meta


class TokenShards:
    """Memory-mapped shards of one split with a deterministic, step-keyed window sampler:
    batch ``step`` is a pure function of (seed, step), so a resumed run sees the same data."""

    def __init__(self, data_dir: str, split: str = "train", vocab_size: int | None = None):
        meta_path = os.path.join(data_dir, "meta.json")
        if not os.path.exists(meta_path):
            from mixcon.resources import UsageError

            raise UsageError(f"data {data_dir!r} has no meta.json: prepare it with `mixcon prepare-data FILES "
                             f"--tokenizer DIR --out {data_dir}` (or use corpus=stdlib)")
        meta = json.load(open(meta_path))
        if vocab_size is not None and meta["tokenizer"]["vocab_size"] > vocab_size:
            raise ValueError(f"data tokenized with a {meta['tokenizer']['vocab_size']}-token vocabulary does not fit "
                             f"a model with vocab_size={vocab_size}")
        self.meta = meta
        self.shards = [np.memmap(os.path.join(data_dir, n), dtype=meta["dtype"], mode="r", shape=(L,))
                       for n, L in meta["shards"][split]]
        self.num_tokens = sum(len(s) for s in self.shards)
        if not self.shards:
            raise ValueError(f"{data_dir} has no {split!r} tokens")

    def batch(self, step: int, batch_size: int, seq_len: int, seed: int = 0) -> np.ndarray:
        """(batch_size, seq_len + 1) int64 windows for step ``step``."""
        usable = [s for s in self.shards if len(s) > seq_len + 1]
        if not usable:
            raise ValueError(f"no shard is longer than seq_len + 1 = {seq_len + 1} tokens")
        lens = np.array([len(s) - seq_len - 1 for s in usable], dtype=np.float64)
        rng = np.random.default_rng([seed, step])
        which = rng.choice(len(usable), size=batch_size, p=lens / lens.sum())
        out = np.empty((batch_size, seq_len + 1), dtype=np.int64)
        for i, w in enumerate(which):
            start = int(rng.integers(0, len(usable[w]) - seq_len - 1))
            out[i] = usable[w][start:start + seq_len + 1]
        return out
