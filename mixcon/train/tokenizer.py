"""A sentencepiece BPE tokenizer as the paper's (every digit its own token, byte fallback), saved so
that `AutoTokenizer.from_pretrained` loads it and encodes exactly as sentencepiece does.

The `tokenizers` rebuild follows what matches sentencepiece exactly (docs: ecosystem-notes):
normaliser Prepend("▁") + Replace(" ", "▁"), no pre-tokenizer, BPE with byte fallback and
fused unknowns, decoder Replace("▁", " ") → ByteFallback → Fuse → Strip(left 1), saved through
`PreTrainedTokenizerFast` (LlamaTokenizer's hard-coded Metaspace mis-encodes whitespace runs).
"""

from __future__ import annotations

import json
import os
from typing import Iterable

SPECIALS = {"pad": ("<pad>", 0), "bos": ("<s>", 1), "eos": ("</s>", 2), "unk": ("<unk>", 3)}
MAX_VOCAB = 256_000


def train_sentencepiece(files: Iterable[str], out_dir: str, vocab_size: int = 32000,
                        input_sentence_size: int = 2_000_000) -> str:
    """Train the BPE model on text files; returns the path of ``out_dir/tokenizer.model``."""
    import sentencepiece as spm

    files = list(files)
    if not files:
        raise ValueError("no input files given to train the tokenizer on")
    if not 260 < vocab_size <= MAX_VOCAB:
        raise ValueError(f"vocab_size={vocab_size} must be in (260, {MAX_VOCAB}] (256 byte pieces + specials)")
    os.makedirs(out_dir, exist_ok=True)
    prefix = os.path.join(out_dir, "tokenizer")
    spm.SentencePieceTrainer.train(
        input=",".join(files), model_prefix=prefix, vocab_size=vocab_size, model_type="bpe",
        split_digits=True, byte_fallback=True, normalization_rule_name="identity",
        remove_extra_whitespaces=False, add_dummy_prefix=True, character_coverage=1.0,
        allow_whitespace_only_pieces=True, max_sentence_length=1 << 16,
        input_sentence_size=input_sentence_size, shuffle_input_sentence=True,
        pad_id=SPECIALS["pad"][1], bos_id=SPECIALS["bos"][1], eos_id=SPECIALS["eos"][1], unk_id=SPECIALS["unk"][1],
        pad_piece="<pad>", bos_piece="<s>", eos_piece="</s>", unk_piece="<unk>", minloglevel=2,
    )
    return prefix + ".model"


def _bpe_merges(vocab: dict[str, int], skip: set[str]) -> list[tuple[str, str]]:
    """Merges of a sentencepiece BPE model, ranked by the id of the piece they produce."""
    merges = []
    for piece, pid in vocab.items():
        if piece in skip:
            continue
        for k in range(1, len(piece)):
            a, b = piece[:k], piece[k:]
            if a in vocab and b in vocab and a not in skip and b not in skip:
                merges.append((pid, vocab[a], vocab[b], a, b))
    merges.sort()
    return [(a, b) for *_, a, b in merges]


def to_hf_tokenizer(sp_model_path: str):
    """A `PreTrainedTokenizerFast` equal to the sentencepiece model."""
    import sentencepiece as spm
    from tokenizers import Tokenizer, decoders, normalizers
    from tokenizers.models import BPE
    from transformers import PreTrainedTokenizerFast

    sp = spm.SentencePieceProcessor(model_file=sp_model_path)
    vocab = {sp.id_to_piece(i): i for i in range(sp.get_piece_size())}
    special = {sp.id_to_piece(i) for i in range(sp.get_piece_size())
               if sp.is_control(i) or sp.is_unknown(i) or sp.is_byte(i)}
    tok = Tokenizer(BPE(vocab=vocab, merges=_bpe_merges(vocab, special), unk_token="<unk>",
                        byte_fallback=True, fuse_unk=True))
    tok.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
    tok.pre_tokenizer = None
    tok.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(),
                                     decoders.Strip(content=" ", left=1, right=0)])
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>",
                                   pad_token="<pad>", clean_up_tokenization_spaces=False)


def train_tokenizer(files: Iterable[str], out_dir: str, vocab_size: int = 32000, **kw):
    """Train, convert and save: ``out_dir`` then holds tokenizer.model and the HF tokenizer files."""
    model_path = train_sentencepiece(files, out_dir, vocab_size, **kw)
    hf = to_hf_tokenizer(model_path)
    hf.save_pretrained(out_dir)
    cfg_path = os.path.join(out_dir, "tokenizer_config.json")
    cfg = json.load(open(cfg_path))
    cfg["tokenizer_class"] = "PreTrainedTokenizerFast"
    json.dump(cfg, open(cfg_path, "w"), indent=2)
    return hf


def train_tokenizer_files(paths: Iterable[str], out_dir: str, vocab_size: int = 32000):
    """``train_tokenizer`` on text files and JSONL files ({"text": ...} per line, flattened to text first)."""
    import tempfile

    paths = list(paths)
    with tempfile.TemporaryDirectory() as tmp:
        files = []
        for p in paths:
            if p.endswith(".jsonl"):
                q = os.path.join(tmp, os.path.basename(p) + ".txt")
                with open(p, encoding="utf-8") as f, open(q, "w", encoding="utf-8") as g:
                    for i, line in enumerate(f):
                        if line.strip():
                            obj = json.loads(line)
                            if not isinstance(obj, dict) or "text" not in obj:
                                raise ValueError(f"{p}:{i + 1}: a JSONL line needs a 'text' field")
                            g.write(obj["text"].replace("\n", " ") + "\n")
                files.append(q)
            else:
                files.append(p)
        return train_tokenizer(files, out_dir, vocab_size)
