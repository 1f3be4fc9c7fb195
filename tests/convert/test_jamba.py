"""Jamba import: logits equal transformers' JambaForCausalLM on random weights."""

import os
import subprocess
import sys

import pytest
import torch

from helpers import ROOT, randomize_

transformers = pytest.importorskip("transformers")
from transformers import JambaConfig, JambaForCausalLM  # noqa: E402

from mixcon.convert import from_jamba  # noqa: E402


def tiny_jamba(**kw):
    cfg = dict(vocab_size=97, hidden_size=32, intermediate_size=40, num_hidden_layers=8, num_attention_heads=4,
               num_key_value_heads=2, num_experts=4, num_experts_per_tok=2, mamba_d_state=4, mamba_expand=2,
               pad_token_id=0, use_mamba_kernels=False)  # 5.0 needs the flag on CPU; later 5.x ignore it
    cfg.update(kw)
    torch.manual_seed(0)
    return randomize_(JambaForCausalLM(JambaConfig(**cfg)), scale=0.2).eval()


@pytest.mark.parametrize("kw", [{}, dict(num_hidden_layers=16, expert_layer_period=4, expert_layer_offset=3)])
def test_jamba_import_logits_match(kw):
    jamba = tiny_jamba(**kw)
    model = from_jamba(jamba)
    c = model.config
    assert c.attn_ratio == "1:7" and not (c.control or c.state_scaling or c.delay) and c.ssm_norm
    assert c.moe_renormalize is False and c.selection == "linear"
    ids = torch.randint(1, 97, (2, 13))
    with torch.no_grad():
        a, b = jamba(ids).logits, model(ids).logits
    assert (a - b).abs().max() < 1e-4 * a.abs().max()
    # and the imported model decodes with its cache exactly as its full forward
    with torch.no_grad():
        g = model.generate(ids[:, :5], max_new_tokens=4, do_sample=False, pad_token_id=0)
        full = model(g).logits[:, 4:-1].argmax(-1)
    assert torch.equal(full, g[:, 5:])


def test_convert_jamba_tool(tmp_path):
    jamba = tiny_jamba()
    jamba.save_pretrained(tmp_path / "jamba")
    res = subprocess.run([sys.executable, "-m", "mixcon", "convert", "jamba", str(tmp_path / "jamba"),
                          str(tmp_path / "mixcon")], capture_output=True, text=True, cwd=tmp_path,
                         env={**os.environ, "PYTHONPATH": ROOT})
    assert res.returncode == 0, res.stderr[-2000:]
    import mixcon  # noqa: F401
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tmp_path / "mixcon").eval()
    ids = torch.randint(1, 97, (1, 9))
    with torch.no_grad():
        assert torch.allclose(model(ids).logits, jamba(ids).logits, atol=1e-4)


def test_non_jamba_model_is_refused():
    with pytest.raises(ValueError, match="expected a Jamba model"):
        from_jamba(torch.nn.Linear(2, 2).__class__.__new__(type("M", (torch.nn.Module,), {"config": None})))
