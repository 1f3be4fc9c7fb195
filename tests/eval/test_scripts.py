"""The evaluation scripts' logic on CPU (their GPU numbers are produced on a GPU and committed)."""

import os
import sys

import pytest
import torch

from helpers import ROOT



def test_max_context_search_finds_the_boundary():
    from mixcon.bench.max_context import search

    for limit in (5_000, 123_456, 1_000_000):
        found, capped = search(lambda c: c <= limit, 1024, 512, 4 * 2**20)
        assert not capped and limit - 512 < found <= limit
    found, capped = search(lambda c: True, 1024, 512, 10_000)
    assert capped and found == 8192


@pytest.mark.parametrize("name", ["mixcon", "hf-mixtral"])
def test_max_context_runs_the_model_at_the_end_of_a_grown_cache(name):
    from mixcon.bench import throughput
    from mixcon.bench.max_context import run_at_context

    cfgs = throughput.variants("mixcon-1b", 4096, smoke=True)
    model = throughput.build(name, cfgs, torch.device("cpu"), torch.float32)
    cache, logits = run_at_context(name, model, 300, 64, torch.device("cpu"))
    assert cache.get_seq_length() == 301 and torch.isfinite(logits).all()
    kv = [layer.keys.shape[-2] for layer in cache.layers if getattr(layer, "keys", None) is not None
          and layer.keys.numel()]
    assert kv and all(n == 301 for n in kv)
    with pytest.raises(ValueError, match="twice the tail"):
        run_at_context(name, model, 100, 64, torch.device("cpu"))


def test_throughput_smoke_run_consistent_caches(tmp_path):
    from mixcon.bench import throughput

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
    from mixcon.bench import kv_cache

    from mixcon.models.configuration_mixcon import cache_nbytes

    kv_cache.main(["--context", "1024", "--models", "llama-2-70b", "mixcon-paper", "--out", str(tmp_path)])
    out = capsys.readouterr().out
    llama = kv_cache.load("llama-2-70b")
    # 80 layers × K and V × 8 KV heads × 128 × 2 bytes
    assert cache_nbytes(llama, 1)["attention"] == 80 * 2 * 8 * 128 * 2
    assert "327,680" in out and (tmp_path / "kv_cache.png").exists()


def test_count_flops_counts_matmuls_and_attention_exactly():
    import torch

    from helpers import tiny_config
    from mixcon import MixConForCausalLM
    from mixcon.bench.common import count_flops

    c = tiny_config(layer_pattern="aaaa", moe_every=0, use_rope=True)
    model = MixConForCausalLM(c)
    b, T, h, F, V = 2, 16, c.hidden_size, c.intermediate_size, c.vocab_size
    H, KV, hd = c.num_attention_heads, c.num_key_value_heads, c.head_dim
    with torch.no_grad():
        n = count_flops(lambda: model(torch.randint(0, V, (b, T)), use_cache=False))
    proj = 2 * h * (H * hd + 2 * KV * hd + H * hd) + 2 * 3 * h * F  # per token per layer
    attn = 2 * 2 * H * T * T * hd * b  # QKᵀ and PV per layer
    assert n["matmul"] == c.num_hidden_layers * (b * T * proj + attn) + b * T * 2 * h * V
    assert n["elementwise"] > 0


def test_study_smoke_run_writes_table_and_plot(tmp_path):
    import glob
    import json
    import sysconfig

    from mixcon.eval import study
    from transformers import AutoTokenizer

    from mixcon.train.data import prepare_data
    from mixcon.train.tokenizer import train_tokenizer

    files = sorted(glob.glob(os.path.join(sysconfig.get_paths()["stdlib"], "*.py")))[:12]
    train_tokenizer(files, str(tmp_path / "tok"), vocab_size=400, input_sentence_size=20_000)
    prepare_data(files, AutoTokenizer.from_pretrained(tmp_path / "tok"), str(tmp_path / "data"),
                 heldout_fraction=0.2, progress=False)
    recipe = tmp_path / "r.yaml"
    recipe.write_text(f"tokenizer: {tmp_path / 'tok'}\ndata: {tmp_path / 'data'}\nseq_len: 24\nbatch_size: 4\n"
                      "max_steps: 2\nwarmup_steps: 1\neval_every: 1\neval_batches: 1\nsave_every: 2\nlog_every: 1\n")
    study.main(["--recipe", str(recipe), "--members", "mixcon", "dense", "mod", "mom-2stage", "smlp",
                "--runs", str(tmp_path / "runs"), "--out", str(tmp_path / "out"), "--decode-tokens", "4",
                "--no-progress"])
    res = json.load(open(tmp_path / "out" / "results.json"))
    rows = {r["member"]: r for r in res["rows"]}
    assert set(rows) == {"mixcon", "dense", "mod", "mom-2stage", "smlp"}
    assert all(r["heldout_loss"] > 0 and r["decode_tok_per_s"] > 0 and r["train_GFLOP_per_token"] > 0
               for r in rows.values())
    # MoD's routed layers process C = 12.5% of the tokens in training: fewer FLOPs than MixCon
    assert rows["mod"]["train_GFLOP_per_token"] < rows["mixcon"]["train_GFLOP_per_token"]
    assert 0 <= rows["mod"]["mod_agreement"] <= 1 and 0 <= rows["mom-2stage"]["mom_skip_share"] <= 1
    assert (tmp_path / "out" / "loss_curves.png").exists() and "| mod |" in (tmp_path / "out" / "study.md").read_text()
