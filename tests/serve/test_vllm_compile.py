"""MixCon compiled by vLLM (mixcon/serve): the Conba layer behind the registered op
``mixcon::conba_mixer`` (fake implementation, one of vLLM's splitting ops), on CPU, float32.

- the layer under ``torch.compile(fullgraph=True)``: one graph, the op a node of it, no graph break;
- the op is among the ops at which vLLM splits its piecewise CUDA-graph compile;
- the engine with compilation on (``enforce_eager=False``; on CPU vLLM traces the model once with
  Dynamo and compiles it with Inductor): greedy tokens equal the eager engine's and `generate`'s.

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

NEW = 10


def _free_port():
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_op_compiles_in_one_graph():
    from vllm.config import VllmConfig, set_current_vllm_config
    from vllm.forward_context import set_forward_context

    from mixcon.serve.vllm_model import VllmConbaMixer

    from vllm.distributed import init_distributed_environment, initialize_model_parallel
    from vllm.distributed.parallel_state import cleanup_dist_env_and_memory

    cfg = tiny_config(head_dim=32, control_period=5)
    trained = randomize_(MixConForCausalLM(cfg)).model.layers[0].mixer  # a Conba layer
    vc = VllmConfig()
    with set_current_vllm_config(vc):  # vLLM's linear layers read the (one-rank) tensor-parallel group
        init_distributed_environment(world_size=1, rank=0, local_rank=0, backend="gloo",
                                     distributed_init_method=f"tcp://127.0.0.1:{_free_port()}")
        initialize_model_parallel(1)
        try:
            layer = VllmConbaMixer(cfg, 0, "model.layers.0.mixer").eval()
        finally:
            cleanup_dist_env_and_memory()
    layer.load_state_dict(trained.state_dict())
    for m in layer.modules():  # what vLLM's loader does after load_weights (on CPU: picks the GEMM)
        if getattr(m, "quant_method", None) is not None:
            m.quant_method.process_weights_after_loading(m)
    graphs = []

    def backend(gm, example_inputs):  # records every graph Dynamo hands over; runs it as traced
        graphs.append(gm)
        return gm.forward

    x = torch.randn(7, cfg.hidden_size)
    with torch.no_grad(), set_forward_context(None, vc):
        want = layer.forward_impl(x)
        got = torch.compile(layer, fullgraph=True, backend=backend)(x)  # a graph break raises here
    torch.testing.assert_close(got, want, rtol=0, atol=0)
    assert len(graphs) == 1
    targets = [n.target for n in graphs[0].graph.nodes if n.op == "call_function"]
    op = torch.ops.mixcon.conba_mixer
    assert any(t in (op, op.default) for t in targets), targets  # the layer is the op, opaque to Dynamo


def test_op_is_a_splitting_op():
    from vllm.config import CompilationConfig, CompilationMode
    from vllm.plugins import load_general_plugins

    load_general_plugins()
    cc = CompilationConfig(mode=CompilationMode.VLLM_COMPILE)
    cc.set_splitting_ops_for_v1(all2all_backend="naive")
    assert "mixcon::conba_mixer" in cc.splitting_ops
    assert "vllm::mamba_mixer" in cc.splitting_ops  # beside vLLM's own Mamba mixers


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    torch.manual_seed(0)
    model = randomize_(MixConForCausalLM(tiny_config(head_dim=32, control_period=5)).eval())
    out = tmp_path_factory.mktemp("mixcon_compile")
    model.save_pretrained(out)
    return model, str(out)


def _serve(path, eager, prompts):
    from vllm.config import CompilationMode
    from vllm.distributed.parallel_state import cleanup_dist_env_and_memory

    llm = vllm.LLM(model=path, skip_tokenizer_init=True, enforce_eager=eager, dtype="float32", max_model_len=64,
                   max_num_seqs=4, max_num_batched_tokens=16, enable_prefix_caching=False, seed=0)
    try:
        mode = llm.llm_engine.vllm_config.compilation_config.mode
        sp = vllm.SamplingParams(temperature=0.0, max_tokens=NEW, ignore_eos=True)
        out = [list(r.outputs[0].token_ids)
               for r in llm.generate([{"prompt_token_ids": p} for p in prompts], sp, use_tqdm=False)]
    finally:
        llm.llm_engine.engine_core.shutdown()
        cleanup_dist_env_and_memory()
    assert (mode == CompilationMode.NONE) == eager, mode
    return out


def test_compiled_engine_tokens_equal_eager_and_generate(exported):
    model, path = exported
    prompts = token_lists(3, (3, 22, 9, 37))
    compiled = _serve(path, False, prompts)
    eager = _serve(path, True, prompts)
    L = max(map(len, prompts))
    ids = torch.tensor([[0] * (L - len(p)) + p for p in prompts])
    mask = (torch.arange(L)[None] >= torch.tensor([L - len(p) for p in prompts])[:, None]).long()
    want = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=NEW, do_sample=False,
                          pad_token_id=0)[:, L:].tolist()
    assert compiled == eager
    # `generate` stops a sequence at its end-of-sequence token (then pads); vLLM ran on (ignore_eos)
    assert [_upto_eos(t, model.config.eos_token_id) for t in compiled] == \
        [_upto_eos(t, model.config.eos_token_id) for t in want]


def _upto_eos(tokens, eos):
    return tokens[:tokens.index(eos) + 1] if eos in tokens else tokens
