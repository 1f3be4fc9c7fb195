"""The HF model: cache consistency, generate, bad input, checkpointing, save/load."""

import json
import os
import subprocess
import sys

import pytest
import torch

from helpers import ROOT, randomize_, tiny_config
from mixcon import MixConCache, MixConConfig, MixConForCausalLM


def make_model(dtype=torch.float32, **overrides):
    torch.manual_seed(0)
    return randomize_(MixConForCausalLM(tiny_config(**overrides))).to(dtype).eval()


def left_pad(seqs, pad_id=0):
    L = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), L), pad_id, dtype=torch.long)
    mask = torch.zeros(len(seqs), L, dtype=torch.long)
    for i, s in enumerate(seqs):
        ids[i, L - len(s):] = torch.tensor(s)
        mask[i, L - len(s):] = 1
    return ids, mask


LAYOUTS = {
    # control periods that act inside these short sequences (the default, 64, would never sample),
    # with the prefill/decode split in the middle of a period
    "mixcon": dict(control_period=4),
    "mixcon-per-step-control": dict(control_period=1),
    "rope+all-mechanisms": dict(use_rope=True, delay=3, control_period=3),
    "mamba-like": dict(attn_ratio="0:4", moe_every=0, control=False, delay=0, state_scaling=False, selection="linear"),
    "mixtral-like": dict(attn_ratio="4:0", moe_every=1, moe_offset=0, use_rope=True),
}


@pytest.mark.parametrize("layout", LAYOUTS, ids=str)
def test_full_forward_equals_prefill_plus_cached_decoding_left_padded(layout):
    # float64: the two paths agree to roundoff, so a real difference cannot hide in fp32 noise
    model = make_model(torch.float64, **LAYOUTS[layout])
    assert set(model.config.layers_block_type) <= {"attention", "conba"}
    V = model.config.vocab_size
    g = torch.Generator().manual_seed(1)
    seqs = [torch.randint(3, V, (n,), generator=g).tolist() for n in (11, 7, 9)]
    ids, mask = left_pad(seqs)
    with torch.no_grad():
        full = model(ids, attention_mask=mask).logits  # (3, 11, V)
        # each sequence alone, no padding: the same logits at its positions
        for i, s in enumerate(seqs):
            alone = model(torch.tensor([s])).logits[0]
            assert torch.allclose(full[i, -len(s):], alone, atol=1e-9, rtol=1e-7)
        # prefill 6 positions, then one token at a time through the cache
        P = 6
        cache = MixConCache(model.config)
        out = model(ids[:, :P], attention_mask=mask[:, :P], past_key_values=cache, use_cache=True)
        steps = [out.logits]
        for t in range(P, ids.shape[1]):
            out = model(ids[:, t:t + 1], attention_mask=mask[:, :t + 1], past_key_values=out.past_key_values,
                        use_cache=True)
            steps.append(out.logits)
        dec = torch.cat(steps, 1)
    real = mask.bool()
    assert torch.allclose(dec[real], full[real], atol=1e-9, rtol=1e-7)
    assert out.past_key_values.get_seq_length() == ids.shape[1]


def test_chunked_prefill_equals_one_prefill():
    model = make_model(torch.float64, use_rope=True)
    ids = torch.randint(3, model.config.vocab_size, (2, 20))
    with torch.no_grad():
        full = model(ids).logits
        cache = MixConCache(model.config)
        a = model(ids[:, :7], past_key_values=cache, use_cache=True).logits
        b = model(ids[:, 7:], past_key_values=cache, use_cache=True).logits
    assert torch.allclose(torch.cat([a, b], 1), full, atol=1e-9, rtol=1e-7)


def test_generate_left_padded_batch_equals_each_prompt_alone():
    model = make_model()
    V = model.config.vocab_size
    prompts = [torch.randint(3, V, (n,)).tolist() for n in (5, 9, 2)]
    ids, mask = left_pad(prompts)
    kw = dict(max_new_tokens=8, do_sample=False, pad_token_id=0, eos_token_id=None)
    batch = model.generate(ids, attention_mask=mask, **kw)
    for i, p in enumerate(prompts):
        alone = model.generate(torch.tensor([p]), **kw)
        assert batch[i, ids.shape[1]:].tolist() == alone[0, len(p):].tolist()


def test_generate_sampling_and_beam_search():
    model = make_model()
    ids, mask = left_pad([[5, 6, 7, 8], [9, 10]])
    torch.manual_seed(3)
    s1 = model.generate(ids, attention_mask=mask, do_sample=True, top_k=20, max_new_tokens=6, pad_token_id=0)
    torch.manual_seed(3)
    s2 = model.generate(ids, attention_mask=mask, do_sample=True, top_k=20, max_new_tokens=6, pad_token_id=0)
    assert torch.equal(s1, s2) and s1.shape == (2, 10)
    kw = dict(num_beams=3, max_new_tokens=5, do_sample=False, pad_token_id=0, eos_token_id=None)
    beams = model.generate(ids, attention_mask=mask, **kw)
    alone = model.generate(torch.tensor([[9, 10]]), **kw)
    assert beams[1, ids.shape[1]:].tolist() == alone[0, 2:].tolist()
    # beam search reorders the Conba states too: compare with an exhaustive score of the chosen beam
    out = model.generate(torch.tensor([[9, 10]]), output_scores=True, return_dict_in_generate=True, **kw)
    seq = out.sequences
    with torch.no_grad():
        logp = torch.log_softmax(model(seq).logits.float(), -1)
    score = sum(logp[0, t - 1, seq[0, t]] for t in range(2, seq.shape[1])).item()
    assert abs(out.sequences_scores[0].item() * (seq.shape[1] - 2) - score) < 1e-3


def test_cache_is_constant_size_for_conba_and_reports_bytes():
    model = make_model()
    c = model.config
    sizes = []
    for n in (8, 32):
        out = model(torch.randint(3, c.vocab_size, (1, n)), use_cache=True)
        cache = out.past_key_values
        sizes.append((cache.nbytes(), cache.attention_nbytes()))
    n_attn = c.layers_block_type.count("attention")
    kv_per_token = 2 * n_attn * c.num_key_value_heads * c.head_dim * 4  # fp32
    assert sizes[1][1] - sizes[0][1] == 24 * kv_per_token
    assert sizes[1][0] - sizes[1][1] == sizes[0][0] - sizes[0][1] > 0  # Conba part does not grow


@pytest.mark.parametrize("kwargs, msg", [
    (dict(input_ids=torch.tensor([[1, 2, 512]])), "outside the vocabulary"),
    (dict(input_ids=torch.tensor([[1, -1, 2]])), "outside the vocabulary"),
    (dict(input_ids=torch.tensor([[1.0, 2.0]])), "integer tensor"),
    (dict(input_ids=torch.tensor([[1, 2, 3]]), attention_mask=torch.ones(1, 4)), "attention_mask has shape"),
    (dict(input_ids=torch.tensor([1, 2, 3])), r"\(batch, time\)"),
    (dict(inputs_embeds=torch.randn(1, 3, 7)), "inputs_embeds has shape"),
])
def test_bad_input_raises_value_error(kwargs, msg):
    model = make_model()
    with pytest.raises(ValueError, match=msg):
        model(**kwargs)


def test_context_beyond_max_positions_with_rope_raises():
    model = make_model(use_rope=True, max_position_embeddings=16)
    model(torch.randint(3, 100, (1, 16)))
    with pytest.raises(ValueError, match="max_position_embeddings=16"):
        model(torch.randint(3, 100, (1, 17)))


def test_loss_aux_loss_and_gradient_checkpointing_give_the_same_gradients():
    model = make_model(control_period=4)  # the controller acts inside these 12 tokens: every parameter has a gradient
    model.train()
    ids = torch.randint(3, model.config.vocab_size, (2, 12))
    out = model(ids, labels=ids)
    assert out.aux_loss is not None and len(out.router_logits) == model.config.layers_ffn_type.count("moe")
    logits = out.logits.float()
    lm = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1))
    assert torch.allclose(out.loss, lm + out.aux_loss)
    out.loss.backward()
    g1 = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad()
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model(ids, labels=ids).loss.backward()
    g2 = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    assert g1.keys() == g2.keys() and len(g1) == len(list(model.parameters()))
    for n in g1:
        assert torch.allclose(g1[n], g2[n], atol=1e-6, rtol=1e-4), n


def test_training_noise_only_in_training_mode():
    model = make_model(process_noise=0.1, observation_noise=0.1)
    ids = torch.randint(3, 100, (1, 10))
    with torch.no_grad():
        e1, e2 = model(ids).logits, model(ids).logits
        model.train()
        t1, t2 = model(ids).logits, model(ids).logits
    assert torch.equal(e1, e2) and not torch.allclose(t1, t2) and not torch.allclose(t1, e1)


def test_save_and_load_in_a_fresh_process_that_never_imported_mixcon(tmp_path):
    model = make_model(use_rope=True)
    model.save_pretrained(tmp_path / "ckpt")
    cfg = json.load(open(tmp_path / "ckpt" / "config.json"))
    assert cfg["model_type"] == "mixcon" and "AutoModelForCausalLM" in cfg["auto_map"]
    ids = torch.randint(3, model.config.vocab_size, (2, 9))
    with torch.no_grad():
        ref = model(ids).logits
    torch.save({"ids": ids, "logits": ref}, tmp_path / "ref.pt")
    script = f"""
import sys, torch
from transformers import AutoModelForCausalLM
m = AutoModelForCausalLM.from_pretrained({str(tmp_path / 'ckpt')!r}, trust_remote_code=True).eval()
r = torch.load({str(tmp_path / 'ref.pt')!r}, weights_only=True)
with torch.no_grad():
    out = m(r["ids"]).logits
assert (out - r["logits"]).abs().max().item() < 1e-5, (out - r["logits"]).abs().max()
g = m.generate(r["ids"][:, :4], max_new_tokens=3, do_sample=False)
assert g.shape == (2, 7)
print(type(m).__module__)
"""
    env = {**os.environ, "PYTHONPATH": ROOT}
    res = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=tmp_path, env=env)
    assert res.returncode == 0, res.stderr[-3000:]
    # loaded through the copied remote-code module, not through an import of mixcon by the test
    assert "transformers_modules" in res.stdout


_BLOCK_MIXCON = """
import importlib.abc, sys
class Block(importlib.abc.MetaPathFinder):  # this process has no mixcon, whatever is installed
    def find_spec(self, name, path=None, target=None):
        if name == "mixcon" or name.startswith("mixcon."):
            raise ModuleNotFoundError(f"No module named {name!r}", name=name)
sys.meta_path.insert(0, Block())
"""


def test_loading_an_export_without_mixcon_says_how_to_install_it(tmp_path):
    """transformers' own import check would say `pip install mixcon`, which is on no index: the model
    file's mixcon imports sit in a try block (which that check skips) and raise a message of ours."""
    make_model().save_pretrained(tmp_path / "ckpt")
    script = _BLOCK_MIXCON + f"""
from transformers import AutoModelForCausalLM
AutoModelForCausalLM.from_pretrained({str(tmp_path / 'ckpt')!r}, trust_remote_code=True)
"""
    env = {**os.environ, "PYTHONPATH": ROOT, "HF_MODULES_CACHE": str(tmp_path / "modules")}
    res = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=tmp_path, env=env)
    assert res.returncode != 0
    last = res.stderr.strip().splitlines()[-1]
    assert last.startswith("ImportError: this MixCon model needs the mixcon package (not installed)"), res.stderr[-3000:]
    assert "pip install <a checkout of the mixcon repository>" in last and "pip install mixcon`" not in res.stderr


def test_save_and_load_in_process_keeps_weights(tmp_path):
    from transformers import AutoModelForCausalLM

    model = make_model()
    model.save_pretrained(tmp_path)
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert type(loaded) is MixConForCausalLM
    for (n, a), (_, b) in zip(model.state_dict().items(), loaded.state_dict().items()):
        assert torch.equal(a, b), n


def test_device_map_auto_places_whole_layers(tmp_path):
    pytest.importorskip("accelerate")
    from accelerate import infer_auto_device_map
    from transformers import AutoModelForCausalLM

    model = make_model()
    size = sum(p.numel() * p.element_size() for p in model.parameters())
    # three devices that each hold a third: the split falls between decoder layers, never inside one
    dm = infer_auto_device_map(model, max_memory={0: size // 3, 1: size // 3, "cpu": 10 * size},
                               no_split_module_classes=model._no_split_modules)
    assert len(set(dm.values())) == 3
    assert all(k.count(".") <= 2 for k in dm if k.startswith("model.layers."))
    model.save_pretrained(tmp_path)
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path, device_map="auto").eval()
    ids = torch.randint(3, 100, (1, 6))
    with torch.no_grad():
        assert torch.allclose(loaded(ids).logits, model(ids).logits, atol=1e-5)


@pytest.mark.parametrize("ratio", ["1:3", "4:0", "0:4"])
def test_cache_nbytes_from_config_equals_the_cache_held(ratio):
    from mixcon.models.cache import MixConCache
    from mixcon.models.configuration_mixcon import cache_nbytes

    cfg = tiny_config(attn_ratio=ratio, delay=3)
    model = MixConForCausalLM(cfg).eval()
    cache = MixConCache(cfg)
    with torch.no_grad():
        model(torch.randint(3, cfg.vocab_size, (2, 11)), past_key_values=cache, use_cache=True)
        model(torch.randint(3, cfg.vocab_size, (2, 1)), past_key_values=cache, use_cache=True)
    expected = cache_nbytes(cfg, 12, batch=2, dtype=torch.float32)
    assert cache.nbytes() == expected["total"]
    assert cache.attention_nbytes() == expected["attention"]
