"""MixCon configuration and the block builder (docs/architecture.md).

`resolve_layout` is the one place that decides which layer is attention or Conba and which
FFN is dense or MoE; the config stores its result as ``layers_block_type`` / ``layers_ffn_type``.
"""

from __future__ import annotations

import difflib
import math
from typing import Optional

from transformers import PretrainedConfig

SELECTIONS = ("swiglu", "linear")
CONTROL_INITS = ("spec", "live")  # docs/conba.md, "Initialisation": the gain law's starting values
MOE_IMPLS = ("auto", "grouped", "loop")
# the ops' own values (mixcon.ops.conba.params), repeated because this file is a leaf: save_pretrained copies
# it beside the weights for trust_remote_code; tests/models/test_validation.py checks that they agree
CONBA_BACKENDS = ("auto", "ref", "triton", "chunk_torch")
MOD_DECISIONS = ("router", "predictor")
SPATIAL_ROUTINGS = ("deterministic", "learned")
MAX_DELAY = 4
# layer_pattern letters → mixer kinds: softmax attention, Conba, the sparse all-MLP's spatial (token-mixing)
# sMoE, and one round of a Mixture-of-Modules block
MIXER_LETTERS = {"a": "attention", "c": "conba", "s": "spatial", "m": "mom"}


def _require_positive_int(name: str, v) -> None:
    if not isinstance(v, int) or isinstance(v, bool) or v < 1:
        raise ValueError(f"{name}={v!r} must be an integer >= 1")


# ---------------------------------------------------------------------------- the field schema
# Every field of MixConConfig: (kind, allowed). Kinds: "int" (an int, not a bool or float) with a
# closed range (lo, hi) (None = unbounded); "float" (an int or a finite float, not a bool) with a
# range (lo, hi, lo_open, hi_open); "bool" (True/False only); "choice" (one of a tuple); "auto-int"
# ("auto" or an int >= 1); "opt-int" (None or an int >= 1); "token" (None or an id in the vocabulary).
INF = math.inf
FIELDS = {
    "vocab_size": ("int", (1, None)), "hidden_size": ("int", (1, None)), "intermediate_size": ("int", (0, None)),
    "n_blocks": ("int", (1, None)), "layers_per_block": ("int", (1, None)), "attn_ratio": ("str", None),
    "layer_pattern": ("opt-str", None), "moe_every": ("int", (0, None)), "moe_offset": ("int", (0, None)),
    "num_experts": ("int", (1, None)), "experts_per_token": ("int", (1, None)), "moe_renormalize": ("bool", None),
    "moe_impl": ("choice", MOE_IMPLS), "router_aux_loss_coef": ("float", (0, INF, False, True)),
    "router_z_loss_coef": ("float", (0, INF, False, True)), "router_jitter_noise": ("float", (0, 1, False, True)),
    "num_attention_heads": ("int", (1, None)), "num_key_value_heads": ("int", (1, None)),
    "head_dim": ("opt-int", None), "use_rope": ("bool", None), "rope_theta": ("float", (0, INF, True, True)),
    "attention_dropout": ("float", (0, 1, False, True)), "max_position_embeddings": ("int", (1, None)),
    "d_state": ("int", (1, None)), "d_conv": ("int", (1, None)), "expand": ("int", (1, None)),
    "dt_rank": ("auto-int", None), "selection": ("choice", SELECTIONS), "selection_hidden": ("auto-int", None),
    "ssm_norm": ("bool", None), "conv_bias": ("bool", None), "proj_bias": ("bool", None),
    "control_group": ("int", (1, None)), "delay": ("int", (0, MAX_DELAY)), "state_scaling": ("bool", None),
    "control": ("bool", None), "k_max": ("float", (0, INF, True, True)), "control_period": ("int", (1, None)),
    "control_init": ("choice", CONTROL_INITS),
    "process_noise": ("float", (0, INF, False, True)), "observation_noise": ("float", (0, INF, False, True)),
    "dt_min": ("float", (0, INF, True, True)), "dt_max": ("float", (0, INF, True, True)),
    "dt_init_floor": ("float", (0, INF, True, True)), "conba_backend": ("choice", CONBA_BACKENDS),
    "dense_layers": ("int", (0, None)), "mod_every": ("int", (0, None)), "mod_offset": ("int", (0, None)),
    "mod_capacity": ("float", (0, 1, True, False)), "mod_decision": ("choice", MOD_DECISIONS),
    "mod_aux_loss_coef": ("float", (0, INF, False, True)), "mom_attn_modules": ("int", (1, None)),
    "mom_ffn_modules": ("int", (1, None)), "mom_top_k": ("int", (1, None)), "mom_router_hidden": ("int", (1, None)),
    "mom_router_temperature": ("float", (0, INF, True, True)), "mom_aux_loss_coef": ("float", (0, INF, False, True)),
    "spatial_experts": ("int", (1, None)), "spatial_routing": ("choice", SPATIAL_ROUTINGS),
    "spatial_route_prefix": ("int", (1, None)), "spatial_max_len": ("int", (1, None)),
    "rms_norm_eps": ("float", (0, INF, True, True)), "initializer_range": ("float", (0, INF, False, True)),
    "tie_word_embeddings": ("bool", None), "use_cache": ("bool", None), "output_router_logits": ("bool", None),
    "pad_token_id": ("token", None), "bos_token_id": ("token", None), "eos_token_id": ("token", None),
}
# Keys a saved config may hold besides the fields: transformers' own (serialized by every config,
# read by its loaders, or kept from older versions) and the derived layout.
BASE_KEYS = {
    "model_type", "transformers_version", "architectures", "auto_map", "_name_or_path", "name_or_path",
    "output_hidden_states", "output_attentions", "return_dict", "dtype", "torch_dtype", "chunk_size_feed_forward",
    "is_encoder_decoder", "id2label", "label2id", "num_labels", "problem_type", "attn_implementation",
    "experts_implementation", "_attn_implementation_internal", "_experts_implementation_internal", "_commit_hash",
    "per_layer_config", "torchscript", "use_bfloat16", "tf_legacy_loss", "pruned_heads", "is_decoder",
    "add_cross_attention", "cross_attention_hidden_size", "tie_encoder_decoder", "finetuning_task",
    "tokenizer_class", "prefix", "sep_token_id", "decoder_start_token_id", "task_specific_params",
    "custom_pipelines", "quantization_config", "_pre_quantization_dtype", "num_hidden_layers",
    "layers_block_type", "layers_ffn_type", "layers_mod_type",
    # generation settings older configs carry (transformers moves them to the generation config)
    "max_length", "min_length", "do_sample", "early_stopping", "num_beams", "num_beam_groups", "diversity_penalty",
    "temperature", "top_k", "top_p", "typical_p", "repetition_penalty", "length_penalty", "no_repeat_ngram_size",
    "encoder_no_repeat_ngram_size", "bad_words_ids", "num_return_sequences", "output_scores",
    "return_dict_in_generate", "forced_bos_token_id", "forced_eos_token_id", "remove_invalid_values",
    "exponential_decay_length_penalty", "suppress_tokens", "begin_suppress_tokens", "epsilon_cutoff", "eta_cutoff",
    "encoder_repetition_penalty",
    # the epsilons transformers' own test helpers set on every config (set_config_for_less_flaky_test)
    "post_norm_eps", "layer_norm_eps", "norm_eps", "norm_epsilon", "layer_norm_epsilon", "batch_norm_eps",
}


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_real(v) -> bool:
    return (isinstance(v, (int, float)) and not isinstance(v, bool))


def _range_text(lo, hi, lo_open=False, hi_open=False) -> str:
    if hi in (None, INF):
        return f"> {lo}" if lo_open else f">= {lo}"
    return f"in {'(' if lo_open else '['}{lo}, {hi}{')' if hi_open else ']'}"


def check_field(name: str, v, vocab_size=None) -> None:
    """ValueError naming the field, the value and what is allowed, unless v fits FIELDS[name]."""
    kind, allowed = FIELDS[name]
    bad = lambda what: ValueError(f"{name}={v!r} must be {what}")
    if kind == "int":
        lo, hi = allowed
        if not _is_int(v) or v < lo or (hi is not None and v > hi):
            raise bad(f"an integer {_range_text(lo, hi)}")
    elif kind == "float":
        lo, hi, lo_open, hi_open = allowed
        if not _is_real(v) or not math.isfinite(v) or v < lo or (lo_open and v == lo) or v > hi \
                or (hi_open and v == hi):
            raise bad(f"a finite number {_range_text(lo, hi, lo_open, hi_open)}")
    elif kind == "bool":
        if not isinstance(v, bool):
            raise bad("True or False (a bool, not a string or a number)")
    elif kind == "choice":
        if not isinstance(v, str) or v not in allowed:
            raise bad(f"one of {allowed}")
    elif kind == "str":
        if not isinstance(v, str):
            raise bad("a string")
    elif kind == "opt-str":
        if v is not None and not isinstance(v, str):
            raise bad("None or a string")
    elif kind == "auto-int":
        if v != "auto" and (not _is_int(v) or v < 1):
            raise bad('"auto" or an integer >= 1')
    elif kind == "opt-int":
        if v is not None and (not _is_int(v) or v < 1):
            raise bad("None or an integer >= 1")
    elif kind == "token":
        ids = v if isinstance(v, (list, tuple)) and name == "eos_token_id" else [v]
        if v is not None and (not ids or not all(_is_int(i) and 0 <= i < vocab_size for i in ids)):
            raise bad(f"None or a token id in the vocabulary [0, vocab_size={vocab_size})"
                      + (" (or a list of them)" if name == "eos_token_id" else ""))


def check_keys(keys) -> None:
    """Unknown keys (a typo in a config file) raise a ValueError naming the nearest known one."""
    known = set(FIELDS) | BASE_KEYS
    for key in keys:
        if key not in known:
            lower = {k.lower(): k for k in sorted(known)}
            near = difflib.get_close_matches(str(key).lower(), list(lower), n=1)
            hint = f"; did you mean {lower[near[0]]}?" if near else ""
            raise ValueError(f"unknown MixConConfig field {key!r}{hint} (the fields are listed in "
                             "mixcon.models.configuration_mixcon.FIELDS)")


def parse_ratio(attn_ratio: str, layers_per_block: int) -> tuple[int, int]:
    """'a:c' → (a, c) with a + c == layers_per_block, else ValueError."""
    try:
        a_str, c_str = str(attn_ratio).split(":")
        a, c = int(a_str), int(c_str)
    except ValueError:
        raise ValueError(f"attn_ratio={attn_ratio!r} must be 'a:c' with two non-negative integers, e.g. '2:6'")
    if a < 0 or c < 0 or a + c != layers_per_block:
        raise ValueError(
            f"attn_ratio={attn_ratio!r} must have a + c == layers_per_block={layers_per_block} "
            f"and a, c >= 0 (e.g. '{min(2, layers_per_block)}:{layers_per_block - min(2, layers_per_block)}')"
        )
    return a, c


def default_pattern(n_attn: int, layers_per_block: int) -> str:
    """Attention at offsets floor((j + 0.5) · L / a), j = 0..a−1; Conba elsewhere."""
    offsets = {math.floor((j + 0.5) * layers_per_block / n_attn) for j in range(n_attn)}
    return "".join("a" if i in offsets else "c" for i in range(layers_per_block))


def resolve_layout(
    n_blocks: int,
    layers_per_block: int,
    attn_ratio: str,
    layer_pattern: Optional[str],
    moe_every: int,
    moe_offset: int,
    has_ffn: bool = True,
    dense_layers: int = 0,
) -> tuple[list[str], list[str]]:
    """The per-layer lists: (["attention" | "conba" | "spatial" | "mom"] * n, ["mlp" | "moe" | "none"] * n).
    ``has_ffn=False`` (intermediate_size = 0) gives mixer-only layers, as in a Mamba-1 LM. The first
    ``dense_layers`` layers keep a dense MLP (the sparse all-MLP's N1 dense blocks). A MoM round
    ("m") carries its own pool of FFN modules, so its FFN entry is "none"."""
    for name, v in (("n_blocks", n_blocks), ("layers_per_block", layers_per_block)):
        _require_positive_int(name, v)
    if layer_pattern is not None:
        if len(layer_pattern) != layers_per_block or set(layer_pattern) - set(MIXER_LETTERS):
            raise ValueError(
                f"layer_pattern={layer_pattern!r} must be {layers_per_block} letters (one per layer of a "
                "block), each 'a' (attention), 'c' (Conba), 's' (sparse all-MLP spatial mixer) or "
                "'m' (a Mixture-of-Modules round)"
            )
        pattern = layer_pattern
    else:
        a, _ = parse_ratio(attn_ratio, layers_per_block)
        pattern = default_pattern(a, layers_per_block)
    if not isinstance(moe_every, int) or moe_every < 0:
        raise ValueError(f"moe_every={moe_every!r} must be an integer >= 0 (0 = no MoE layers)")
    if moe_every > 0 and not (isinstance(moe_offset, int) and 0 <= moe_offset < moe_every):
        raise ValueError(f"moe_offset={moe_offset!r} must be an integer in [0, moe_every={moe_every})")
    n = n_blocks * layers_per_block
    if not isinstance(dense_layers, int) or not 0 <= dense_layers <= n:
        raise ValueError(f"dense_layers={dense_layers!r} must be an integer in [0, {n}] (the number of layers)")
    block = [MIXER_LETTERS[ch] for ch in pattern] * n_blocks
    if not has_ffn:
        if moe_every:
            raise ValueError(f"moe_every={moe_every} needs intermediate_size > 0 (experts are SwiGLU MLPs)")
        if "mom" in block:
            raise ValueError("a Mixture-of-Modules round ('m') needs intermediate_size > 0 (its FFN modules)")
        return block, ["none"] * n
    ffn = ["none" if block[i] == "mom" else
           "moe" if moe_every > 0 and i >= dense_layers and i % moe_every == moe_offset else "mlp"
           for i in range(n)]
    return block, ffn


def resolve_mod_layers(block: list[str], ffn: list[str], mod_every: int, mod_offset: int) -> list[str]:
    """Mixture-of-Depths routing per layer: "layer" (an attention layer: mixer and FFN are skipped
    together), "ffn" (a Conba or spatial layer: only its FFN is routed — skipping a recurrent or
    token-mixing layer would break its state), or "none"."""
    if not isinstance(mod_every, int) or isinstance(mod_every, bool) or mod_every < 0:
        raise ValueError(f"mod_every={mod_every!r} must be an integer >= 0 (0 = no Mixture-of-Depths)")
    if mod_every == 0:
        return ["none"] * len(block)
    if not (isinstance(mod_offset, int) and 0 <= mod_offset < mod_every):
        raise ValueError(f"mod_offset={mod_offset!r} must be an integer in [0, mod_every={mod_every})")
    out = []
    for i, (mixer, f) in enumerate(zip(block, ffn)):
        if i % mod_every != mod_offset or mixer == "mom":
            out.append("none")
        elif mixer == "attention":
            out.append("layer")
        else:
            out.append("ffn" if f != "none" else "none")
    if all(x == "none" for x in out):
        raise ValueError(f"mod_every={mod_every}, mod_offset={mod_offset} route no layer: Mixture-of-Depths routes "
                         "attention layers and the FFNs of Conba/spatial layers, never a Conba mixer or a MoM round")
    return out


# The fields that decide which layer goes where; a saved config (it holds one of SAVED_MARKERS) must carry all.
LAYOUT_FIELDS = ("n_blocks", "layers_per_block", "attn_ratio", "layer_pattern", "moe_every", "moe_offset",
                 "intermediate_size", "dense_layers", "mod_every", "mod_offset")
SAVED_MARKERS = ("transformers_version", "layers_block_type", "layers_ffn_type")


class MixConConfig(PretrainedConfig):
    r"""Configuration of a MixCon model (docs/architecture.md, docs/conba.md).

    Layout: ``n_blocks`` blocks of ``layers_per_block`` layers; ``attn_ratio`` "a:c" (or an explicit
    ``layer_pattern`` of 'a'/'c' letters per block) places attention and Conba mixers; layer i has an
    MoE FFN when ``i % moe_every == moe_offset`` (``moe_every = 0``: no MoE). The resolved lists are
    ``layers_block_type`` and ``layers_ffn_type``.

    Special cases: Jamba = ``attn_ratio="1:7"``, Conba mechanisms off, ``ssm_norm=True``,
    ``moe_renormalize=False``; Mamba-1 = ``"0:8"``, ``moe_every=0``; Mixtral = ``"8:0"``.
    """

    model_type = "mixcon"
    keys_to_ignore_at_inference = ["past_key_values"]

    def __init__(
        self,
        vocab_size: int = 32000,
        hidden_size: int = 1024,
        intermediate_size: int = 2816,  # SwiGLU width of the dense MLP and of each expert; 0 = no FFN
        n_blocks: int = 4,
        layers_per_block: int = 8,
        attn_ratio: str = "2:6",  # attention : Conba layers per block
        layer_pattern: Optional[str] = None,  # explicit per-block layout, overrides attn_ratio
        moe_every: int = 2,
        moe_offset: int = 1,
        num_experts: int = 16,
        experts_per_token: int = 2,
        moe_renormalize: bool = True,  # renormalise the top-K weights (Mixtral) or not (Jamba)
        moe_impl: str = "auto",  # grouped matrix products, or the reference loop over experts
        router_aux_loss_coef: float = 0.001,  # Switch load-balancing loss
        router_z_loss_coef: float = 0.001,  # router z-loss
        router_jitter_noise: float = 0.0,  # multiplicative jitter on router inputs in training
        num_attention_heads: int = 16,
        num_key_value_heads: int = 4,
        head_dim: Optional[int] = None,
        use_rope: bool = False,  # Jamba-style NoPE by default: Conba carries position
        rope_theta: float = 10000.0,
        attention_dropout: float = 0.0,
        max_position_embeddings: int = 8192,
        d_state: int = 16,  # N
        d_conv: int = 4,
        expand: int = 2,
        dt_rank="auto",  # R = ceil(hidden_size / 16)
        selection: str = "swiglu",  # selection network: "swiglu" (MixCon) or "linear" (Mamba)
        selection_hidden="auto",  # S = 2 (R + 2N)
        ssm_norm: bool = False,  # RMSNorm on δ, B, C (Jamba)
        conv_bias: bool = True,
        proj_bias: bool = False,
        control_group: int = 8,  # G: channels sharing one control gain
        delay: int = 2,  # τ, 0 = off
        state_scaling: bool = True,
        control: bool = True,
        k_max: float = 1.0,
        control_period: int = 64,  # P: real steps between two actions of the controller (1 = every step)
        control_init: str = "spec",  # "spec" or "live" (k0 = 0.5, λ 10× slower: docs/conba.md, "Initialisation")
        process_noise: float = 0.0,  # σ_w, training only
        observation_noise: float = 0.0,  # σ_v, training only
        dt_min: float = 1e-3,
        dt_max: float = 0.1,
        dt_init_floor: float = 1e-4,
        conba_backend: str = "auto",
        dense_layers: int = 0,  # the first N1 layers: dense MLP, one spatial expert (sparse all-MLP)
        mod_every: int = 0,  # Mixture-of-Depths: route layer i when i % mod_every == mod_offset; 0 = off
        mod_offset: int = 0,  # (MixCon's MoE FFNs sit at odd layers, so MoD takes the even ones)
        mod_capacity: float = 0.125,  # share of a sequence's tokens a routed layer processes in training
        mod_decision: str = "router",  # causal decision at inference: "router" (σ(r) > ½, BCE-trained) or "predictor"
        mod_aux_loss_coef: float = 0.01,  # BCE of the causal decision against top-k membership
        mom_attn_modules: int = 4,  # Mixture-of-Modules pool: attention modules
        mom_ffn_modules: int = 4,  # ... and FFN modules (SKIP is always there besides)
        mom_top_k: int = 2,  # modules chosen per token, per pool, per round
        mom_router_hidden: int = 256,  # router MLP d → hidden → modules + 1
        mom_router_temperature: float = 1.0,
        mom_aux_loss_coef: float = 0.01,  # Switch balance loss over the MoM routers
        spatial_experts: int = 4,  # sparse all-MLP sMoE: feature chunks, one causal spatial gating unit each
        spatial_routing: str = "deterministic",  # chunk i → expert i, or "learned" (leak-free: see layers/spatial.py)
        spatial_route_prefix: int = 32,  # learned routing: tokens whose features decide the routing
        spatial_max_len: int = 1024,  # the spatial units' (time × time) weights: the longest context
        rms_norm_eps: float = 1e-6,
        initializer_range: float = 0.02,
        tie_word_embeddings: bool = False,
        use_cache: bool = True,
        pad_token_id: Optional[int] = 0,
        bos_token_id: Optional[int] = 1,
        eos_token_id: Optional[int] = 2,
        layers_block_type=None,  # derived; accepted (and checked) when a saved config is loaded
        layers_ffn_type=None,
        layers_mod_type=None,
        **kwargs,
    ):
        # validation in one place: unknown keys, then every field's type, range and finiteness (before
        # anything is derived from them), then the fields against each other (`_validate`)
        check_keys(kwargs)
        given = {k: v for k, v in locals().items() if k in FIELDS}
        given["output_router_logits"] = kwargs.get("output_router_logits", False)
        for name in FIELDS:
            check_field(name, given[name], vocab_size=vocab_size)
        n_layers = kwargs.pop("num_hidden_layers", None)
        if n_layers is not None and n_layers != n_blocks * layers_per_block:
            raise ValueError(f"num_hidden_layers={n_layers!r} disagrees with n_blocks * layers_per_block = "
                             f"{n_blocks * layers_per_block} (it is derived; leave it out)")
        self.vocab_size = vocab_size
        self.hidden_size = hidden_size
        self.intermediate_size = intermediate_size
        self.n_blocks = n_blocks
        self.layers_per_block = layers_per_block
        self.attn_ratio = attn_ratio
        self.layer_pattern = layer_pattern
        self.moe_every = moe_every
        self.moe_offset = moe_offset
        self.num_experts = num_experts
        self.experts_per_token = experts_per_token
        self.moe_renormalize = moe_renormalize
        self.moe_impl = moe_impl
        self.router_aux_loss_coef = router_aux_loss_coef
        self.router_z_loss_coef = router_z_loss_coef
        self.router_jitter_noise = router_jitter_noise
        self.num_attention_heads = num_attention_heads
        self.num_key_value_heads = num_key_value_heads
        self.head_dim = head_dim if head_dim is not None else (
            hidden_size // num_attention_heads if num_attention_heads else None)
        self.use_rope = use_rope
        self.rope_theta = rope_theta
        self.attention_dropout = attention_dropout
        self.max_position_embeddings = max_position_embeddings
        self.d_state = d_state
        self.d_conv = d_conv
        self.expand = expand
        self.dt_rank = math.ceil(hidden_size / 16) if dt_rank == "auto" else dt_rank
        self.selection = selection
        self.selection_hidden = (
            2 * (self.dt_rank + 2 * d_state) if selection_hidden == "auto" else selection_hidden
        )
        self.ssm_norm = ssm_norm
        self.conv_bias = conv_bias
        self.proj_bias = proj_bias
        self.control_group = control_group
        self.delay = delay
        self.state_scaling = state_scaling
        self.control = control
        self.k_max = k_max
        self.control_period = control_period
        self.control_init = control_init
        self.process_noise = process_noise
        self.observation_noise = observation_noise
        self.dt_min = dt_min
        self.dt_max = dt_max
        self.dt_init_floor = dt_init_floor
        self.conba_backend = conba_backend
        self.dense_layers = dense_layers
        self.mod_every = mod_every
        self.mod_offset = mod_offset
        self.mod_capacity = mod_capacity
        self.mod_decision = mod_decision
        self.mod_aux_loss_coef = mod_aux_loss_coef
        self.mom_attn_modules = mom_attn_modules
        self.mom_ffn_modules = mom_ffn_modules
        self.mom_top_k = mom_top_k
        self.mom_router_hidden = mom_router_hidden
        self.mom_router_temperature = mom_router_temperature
        self.mom_aux_loss_coef = mom_aux_loss_coef
        self.spatial_experts = spatial_experts
        self.spatial_routing = spatial_routing
        self.spatial_route_prefix = spatial_route_prefix
        self.spatial_max_len = spatial_max_len
        self.rms_norm_eps = rms_norm_eps
        self.initializer_range = initializer_range
        self.tie_word_embeddings = tie_word_embeddings
        self.use_cache = use_cache
        self.pad_token_id = pad_token_id
        self.bos_token_id = bos_token_id
        self.eos_token_id = eos_token_id
        self.output_router_logits = kwargs.pop("output_router_logits", False)
        self._validate()
        block, ffn = resolve_layout(n_blocks, layers_per_block, attn_ratio, layer_pattern, moe_every, moe_offset,
                                    has_ffn=intermediate_size > 0, dense_layers=dense_layers)
        if moe_every > 0 and "moe" not in ffn:
            raise ValueError(
                f"moe_every={moe_every}, moe_offset={moe_offset} place no MoE layer among the {len(ffn)} layers "
                f"(dense_layers={dense_layers}, layers with a FFN: {sum(f != 'none' for f in ffn)}); choose "
                "moe_offset < number of layers past dense_layers, or moe_every=0 for no MoE")
        mod = resolve_mod_layers(block, ffn, mod_every, mod_offset)
        self._validate_members(block, mod)
        for name, given, derived in (("layers_block_type", layers_block_type, block),
                                     ("layers_ffn_type", layers_ffn_type, ffn),
                                     ("layers_mod_type", layers_mod_type, mod)):
            if given is not None and list(given) != derived:
                raise ValueError(f"{name}={given!r} disagrees with the layout the config's fields give: {derived}")
        self.layers_block_type = block
        self.layers_ffn_type = ffn
        self.layers_mod_type = mod
        if layer_pattern is not None:  # keep attn_ratio truthful when a pattern overrides it
            self.attn_ratio = f"{layer_pattern.count('a')}:{layer_pattern.count('c')}"
        self.num_hidden_layers = n_blocks * layers_per_block
        super().__init__(
            tie_word_embeddings=tie_word_embeddings, pad_token_id=pad_token_id, bos_token_id=bos_token_id,
            eos_token_id=eos_token_id, **kwargs,
        )

    @classmethod
    def _dict_from_json_file(cls, json_file):
        config_dict = super()._dict_from_json_file(json_file)
        if not isinstance(config_dict, dict):
            raise ValueError(f"{json_file}: a MixCon config file must hold a JSON object {{\"field\": value, ...}}, "
                             f"got a JSON {type(config_dict).__name__}")
        return config_dict

    @classmethod
    def from_dict(cls, config_dict, **kwargs):
        if not isinstance(config_dict, dict):
            raise ValueError(f"a MixCon config must be built from a dict of fields, got a {type(config_dict).__name__}")
        if any(k in config_dict for k in SAVED_MARKERS):  # a saved config: its layout is spelled out, never defaulted
            missing = [k for k in LAYOUT_FIELDS if k not in config_dict]
            if missing:
                raise ValueError(f"this saved MixCon config lacks the layout field(s) {missing}; a saved config must "
                                 f"carry every one of {list(LAYOUT_FIELDS)} (a missing one would silently take its "
                                 f"default and build another model): add them, or re-save it with this version")
        return super().from_dict(config_dict, **kwargs)

    # ---------------------------------------------------------------- validation
    def _validate(self):
        if not isinstance(self.intermediate_size, int) or self.intermediate_size < 0:
            raise ValueError(f"intermediate_size={self.intermediate_size!r} must be an integer >= 0 (0 = no FFN)")
        for name in ("vocab_size", "hidden_size", "num_experts", "d_state", "d_conv",
                     "expand", "max_position_embeddings", "control_group", "dt_rank", "selection_hidden",
                     "control_period"):
            _require_positive_int(name, getattr(self, name))
        if not 1 <= self.experts_per_token <= self.num_experts:
            raise ValueError(
                f"experts_per_token={self.experts_per_token!r} must be in [1, num_experts={self.num_experts}]")
        if self.num_attention_heads is not None and (self.num_attention_heads < 1 or self.num_key_value_heads < 1
                                                     or self.num_attention_heads % self.num_key_value_heads):
            raise ValueError(
                f"num_attention_heads={self.num_attention_heads} must be a positive multiple of "
                f"num_key_value_heads={self.num_key_value_heads}")
        if self.head_dim is None or self.head_dim < 1 or (self.use_rope and self.head_dim % 2):
            raise ValueError(f"head_dim={self.head_dim!r} must be a positive integer (even when use_rope=True)")
        d_inner = self.expand * self.hidden_size
        if d_inner % self.control_group:
            raise ValueError(
                f"control_group={self.control_group} must divide d_inner = expand * hidden_size = {d_inner}")
        if not isinstance(self.delay, int) or not 0 <= self.delay <= MAX_DELAY:
            raise ValueError(f"delay={self.delay!r} must be an integer in [0, {MAX_DELAY}] (0 = off)")
        for name, allowed in (("selection", SELECTIONS), ("control_init", CONTROL_INITS), ("moe_impl", MOE_IMPLS), ("conba_backend", CONBA_BACKENDS)):
            if getattr(self, name) not in allowed:
                raise ValueError(f"{name}={getattr(self, name)!r} must be one of {allowed}")
        if not self.k_max > 0:
            raise ValueError(f"k_max={self.k_max!r} must be > 0")
        for name in ("process_noise", "observation_noise", "router_aux_loss_coef", "router_z_loss_coef",
                     "router_jitter_noise", "attention_dropout"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name}={getattr(self, name)!r} must be >= 0")
        if not 0 < self.dt_min <= self.dt_max:
            raise ValueError(f"dt_min={self.dt_min}, dt_max={self.dt_max} must satisfy 0 < dt_min <= dt_max")

    def _validate_members(self, block, mod):
        """Fields of the dynamic-compute members, checked only where the layout uses them."""
        if any(m != "none" for m in mod):
            if not 0 < self.mod_capacity <= 1:
                raise ValueError(f"mod_capacity={self.mod_capacity!r} must be in (0, 1] (share of tokens processed)")
            if self.mod_decision not in MOD_DECISIONS:
                raise ValueError(f"mod_decision={self.mod_decision!r} must be one of {MOD_DECISIONS}")
            if self.mod_aux_loss_coef < 0:
                raise ValueError(f"mod_aux_loss_coef={self.mod_aux_loss_coef!r} must be >= 0")
        if "mom" in block:
            for name in ("mom_attn_modules", "mom_ffn_modules", "mom_top_k", "mom_router_hidden"):
                _require_positive_int(name, getattr(self, name))
            if self.mom_top_k > min(self.mom_attn_modules, self.mom_ffn_modules) + 1:
                raise ValueError(f"mom_top_k={self.mom_top_k} must be <= modules + 1 (SKIP) of each pool "
                                 f"({self.mom_attn_modules} attention, {self.mom_ffn_modules} FFN)")
            if not self.mom_router_temperature > 0 or self.mom_aux_loss_coef < 0:
                raise ValueError(f"mom_router_temperature={self.mom_router_temperature!r} must be > 0 and "
                                 f"mom_aux_loss_coef={self.mom_aux_loss_coef!r} >= 0")
        if "spatial" in block:
            for name in ("spatial_experts", "spatial_route_prefix", "spatial_max_len"):
                _require_positive_int(name, getattr(self, name))
            if self.spatial_routing not in SPATIAL_ROUTINGS:
                raise ValueError(f"spatial_routing={self.spatial_routing!r} must be one of {SPATIAL_ROUTINGS}")
            if self.spatial_width % self.spatial_experts:
                raise ValueError(f"spatial_experts={self.spatial_experts} must divide the spatial width "
                                 f"expand * hidden_size = {self.spatial_width}")

    # ---------------------------------------------------------------- derived
    @property
    def context_limit(self) -> int:
        """The longest context the model takes: max_position_embeddings, or spatial_max_len when the
        layout has spatial (sparse all-MLP) layers and that is shorter."""
        if "spatial" in self.layers_block_type:
            return min(self.max_position_embeddings, self.spatial_max_len)
        return self.max_position_embeddings

    @property
    def spatial_width(self) -> int:
        """Width of the spatial gating unit's u and v halves (gMLP's d_ffn / 2)."""
        return self.expand * self.hidden_size

    @property
    def d_inner(self) -> int:
        return self.expand * self.hidden_size

    def layout_summary(self) -> str:
        """One line per block: the block's letters (a/c/s/m) with MoE layers upper-cased and
        Mixture-of-Depths-routed layers marked '*'."""
        letter = {v: k for k, v in MIXER_LETTERS.items()}
        lines = []
        L = self.layers_per_block
        for blk in range(self.n_blocks):
            s = ""
            for i in range(blk * L, (blk + 1) * L):
                ch = letter[self.layers_block_type[i]]
                s += (ch.upper() if self.layers_ffn_type[i] == "moe" else ch) + (
                    "*" if self.layers_mod_type[i] != "none" else "")
            lines.append(f"block {blk}: {s}")
        return "\n".join(lines) + ("\n(a = attention, c = Conba, s = spatial sMoE, m = MoM round; "
                                   "upper case = MoE FFN; * = Mixture-of-Depths routed)")


def cache_nbytes(config: "MixConConfig", context: int, batch: int = 1, dtype=None) -> dict:
    """Bytes of a `MixConCache` after ``context`` tokens, computed from the config alone (no model):
    ``{"attention": K/V bytes, "conba": conv windows + float32 states, "spatial": …, "total": ...}``.
    ``dtype`` is the model's dtype (K/V, conv windows, spatial histories; default bfloat16); Conba states
    are float32. MoM rounds hold one K/V each; a Mixture-of-Depths-routed attention layer holds only
    the tokens it selected (plus their int64 positions), so for it this is the upper bound (all selected)."""
    import torch

    esize = torch.finfo(dtype or torch.bfloat16).bits // 8
    kinds = config.layers_block_type
    n_attn = kinds.count("attention") + kinds.count("mom")
    n_conba = kinds.count("conba")
    attn = n_attn * 2 * config.num_key_value_heads * config.head_dim * context * batch * esize if n_attn else 0
    attn += sum(1 for k, m in zip(kinds, config.layers_mod_type) if m == "layer") * 8 * context * batch
    d, n = config.d_inner, config.d_state
    # conv window; float32 h, delay line, gain k and sampled error e; the int64 phase of the control period
    per_layer = d * (config.d_conv - 1) * esize + 4 * (d * n * (1 + config.delay) + d // config.control_group + d) + 8
    conba = n_conba * per_layer * batch
    spatial = kinds.count("spatial") * context * batch * (config.spatial_width * esize + 8)
    return {"attention": attn, "conba": conba, "spatial": spatial, "total": attn + conba + spatial}
