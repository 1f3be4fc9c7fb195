"""The evaluation scripts' logic on CPU (their GPU numbers are produced on a GPU and committed)."""

import os
import sys

import pytest

from helpers import ROOT

sys.path.insert(0, os.path.join(ROOT, "eval"))


def test_max_context_search_finds_the_boundary():
    from max_context import search

    for limit in (5_000, 123_456, 1_000_000):
        found, capped = search(lambda c: c <= limit, 1024, 512, 4 * 2**20)
        assert not capped and limit - 512 < found <= limit
    found, capped = search(lambda c: True, 1024, 512, 10_000)
    assert capped and found == 8192


def test_throughput_smoke_run_consistent_caches(tmp_path):
    import throughput

    rows = throughput.main(["--smoke", "--out", str(tmp_path)])
    assert {r["model"] for r in rows} == set(throughput.MODELS)
    assert all(r["status"] == "ok" and r["prefill_tok_s"] > 0 and r["decode_tok_s"] > 0 for r in rows)
    cache = {(r["model"], r["batch"], r["context"]): r["cache_MiB"] for r in rows}
    for (m, b, c), v in cache.items():
        if m == "hf-mixtral":  # transformers' Mixtral holds exactly what our all-attention build holds
            assert v == pytest.approx(cache[("mixtral-shaped", b, c)])
    long = max(r["context"] for r in rows)
    assert cache[("mixcon", 1, long)] < cache[("mixtral-shaped", 1, long)]
    assert os.path.exists(tmp_path / "throughput.png") and os.path.exists(tmp_path / "results.csv")


def test_kv_cache_table(tmp_path, capsys):
    import kv_cache

    from mixcon.models.configuration_mixcon import cache_nbytes

    kv_cache.main(["--context", "1024", "--models", "llama-2-70b", "mixcon-paper", "--out", str(tmp_path)])
    out = capsys.readouterr().out
    llama = kv_cache.load("llama-2-70b")
    # 80 layers × K and V × 8 KV heads × 128 × 2 bytes
    assert cache_nbytes(llama, 1)["attention"] == 80 * 2 * 8 * 128 * 2
    assert "327,680" in out and (tmp_path / "kv_cache.png").exists()
