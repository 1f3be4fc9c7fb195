"""Prefix caching of MixCon's Conba state in vLLM ("align" mode), on CPU: eager, float32.

One exported tiny MixCon (attention, Conba with delay line, state scaling and control at P = 3, MoE)
is served by two engines, prefix caching on and off. Requests that share a long prefix are sent one
after the other; the second must hit the cache (vLLM's counters and the request's
`num_cached_tokens` say so) and its greedy tokens must equal the engine without caching and this
project's `generate`. P = 3 with vLLM's 128-token blocks puts one hit at 256 tokens (mid-period:
256 mod 3 = 1) and one at 384 (a period boundary): the restored phase must be right in both.

Needs vLLM (`bash tools/setup.sh vllm`); skipped without it.
"""

import os

import pytest

os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")

vllm = pytest.importorskip("vllm", reason="vLLM is not installed (bash tools/setup.sh vllm)")
pytestmark = pytest.mark.slow

import torch  # noqa: E402

from helpers import randomize_, tiny_config, token_lists  # noqa: E402

from mixcon import MixConForCausalLM  # noqa: E402

P = 3
NEW = 8
MAX_LEN = 512


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    torch.manual_seed(0)
    model = randomize_(MixConForCausalLM(tiny_config(head_dim=32, control_period=P)).eval())
    out = tmp_path_factory.mktemp("mixcon_prefix")
    model.save_pretrained(out)
    return model, str(out)


def _engine(path, caching):
    return vllm.LLM(model=path, skip_tokenizer_init=True, enforce_eager=True, dtype="float32",
                    max_model_len=MAX_LEN, max_num_seqs=4, enable_prefix_caching=caching, seed=0,
                    disable_log_stats=False)


def _shutdown(llm):
    from vllm.distributed.parallel_state import cleanup_dist_env_and_memory

    llm.llm_engine.engine_core.shutdown()
    cleanup_dist_env_and_memory()


def _run(llm, prompt):
    sp = vllm.SamplingParams(temperature=0.0, max_tokens=NEW, ignore_eos=True)
    r = llm.generate([{"prompt_token_ids": prompt}], sp, use_tqdm=False)[0]
    return list(r.outputs[0].token_ids), r.num_cached_tokens or 0


def _hits(llm):
    return {m.name: m.value for m in llm.get_metrics() if m.name == "vllm:prefix_cache_hits"}["vllm:prefix_cache_hits"]


def _generate(model, prompt):
    out = model.generate(input_ids=torch.tensor([prompt]), max_new_tokens=NEW, do_sample=False, pad_token_id=0)
    return out[0, len(prompt):].tolist()


@pytest.mark.parametrize("prefix_len,expect_hit,mid_period", [(300, 256, True), (400, 384, False)])
def test_shared_prefix_hits_the_cache_and_keeps_tokens(exported, prefix_len, expect_hit, mid_period):
    model, path = exported
    prefix = token_lists(prefix_len, (prefix_len,))[0]
    first, second = prefix + token_lists(1, (20,))[0], prefix + token_lists(2, (27,))[0]
    assert (expect_hit % P != 0) == mid_period  # the case this parameter claims to test

    on = _engine(path, True)
    try:
        cc = on.llm_engine.vllm_config.cache_config
        assert cc.mamba_cache_mode == "align" and cc.block_size == 128, (cc.mamba_cache_mode, cc.block_size)
        got_first, cached_first = _run(on, first)
        hits_before = _hits(on)
        got_second, cached_second = _run(on, second)
        hits = _hits(on) - hits_before
    finally:
        _shutdown(on)
    assert cached_first == 0
    # the second request starts from the last block boundary inside the shared prefix
    assert cached_second == expect_hit and hits == expect_hit, (cached_second, hits)

    off = _engine(path, False)
    try:
        ref_first, ref_second = _run(off, first)[0], _run(off, second)[0]
    finally:
        _shutdown(off)
    assert got_first == ref_first == _generate(model, first)
    assert got_second == ref_second == _generate(model, second)


def test_copy_functions_cover_every_state(exported):
    """vLLM copies a block's slot into the next one state by state, with as many states as it is given
    functions: the model gives one for each of the layer's states (conv, h, delay, k, e, phase)."""
    from vllm.v1.attention.backends.registry import MambaAttentionBackendEnum

    from mixcon.serve.vllm_model import MixConForCausalLM as VllmMixCon, conba_state_layout

    model, _ = exported
    inst = VllmMixCon.__new__(VllmMixCon)
    inst.config = model.config
    funcs = inst.get_mamba_state_copy_funcs({MambaAttentionBackendEnum.MAMBA1})[MambaAttentionBackendEnum.MAMBA1]
    names = [n for n, _, _ in conba_state_layout(model.config)]
    assert names == ["conv", "h", "line", "k", "e", "phase"] and len(funcs) == len(names)
