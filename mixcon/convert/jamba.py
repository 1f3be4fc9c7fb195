"""Import a transformers Jamba checkpoint as a MixCon model with equal logits.

Jamba is the MixCon family member with attn_ratio 1:7 (attention at offset 4), every Conba
mechanism off, Mamba's linear selection, RMSNorms on δ, B and C, a router that does not
renormalise its top-K weights, a conv with a bias and projections without one.
"""

from __future__ import annotations

import re
from typing import Union

import torch

from ..models import MixConConfig, MixConForCausalLM


def jamba_config_to_mixcon(jc) -> MixConConfig:
    period, offset = jc.attn_layer_period, jc.attn_layer_offset
    if jc.num_hidden_layers % period:
        raise ValueError(
            f"Jamba num_hidden_layers={jc.num_hidden_layers} is not a multiple of attn_layer_period={period}; "
            "MixCon blocks repeat one pattern, so only whole periods can be imported")
    pattern = "".join("a" if i == offset else "c" for i in range(period))
    return MixConConfig(
        vocab_size=jc.vocab_size,
        hidden_size=jc.hidden_size,
        intermediate_size=jc.intermediate_size,
        n_blocks=jc.num_hidden_layers // period,
        layers_per_block=period,
        layer_pattern=pattern,
        moe_every=jc.expert_layer_period if jc.num_experts > 1 else 0,
        moe_offset=jc.expert_layer_offset,
        num_experts=jc.num_experts,
        experts_per_token=jc.num_experts_per_tok,
        moe_renormalize=False,  # Jamba: softmax → top-K, no renormalisation
        router_aux_loss_coef=jc.router_aux_loss_coef,
        router_z_loss_coef=0.0,
        num_attention_heads=jc.num_attention_heads,
        num_key_value_heads=jc.num_key_value_heads,
        use_rope=False,
        attention_dropout=float(jc.attention_dropout),
        max_position_embeddings=jc.max_position_embeddings,
        d_state=jc.mamba_d_state,
        d_conv=jc.mamba_d_conv,
        expand=jc.mamba_expand,
        dt_rank=jc.mamba_dt_rank,
        selection="linear",
        ssm_norm=True,
        conv_bias=jc.mamba_conv_bias,
        proj_bias=jc.mamba_proj_bias,
        delay=0,
        state_scaling=False,
        control=False,
        rms_norm_eps=jc.rms_norm_eps,
        initializer_range=jc.initializer_range,
        tie_word_embeddings=bool(getattr(jc, "tie_word_embeddings", False)),
        pad_token_id=jc.pad_token_id,
        bos_token_id=jc.bos_token_id,
        eos_token_id=jc.eos_token_id,
    )


_RENAMES = [(re.compile(r"\.mamba\."), ".mixer."), (re.compile(r"\.self_attn\."), ".mixer.")]


def convert_jamba_state_dict(sd: dict) -> dict:
    out = {}
    for k, v in sd.items():
        for pat, rep in _RENAMES:
            k = pat.sub(rep, k)
        out[k] = v
    return out


def from_jamba(model_or_path: Union[str, "torch.nn.Module"], dtype=None) -> MixConForCausalLM:
    """A `JambaForCausalLM` (instance or checkpoint directory) → `MixConForCausalLM` with equal logits."""
    if isinstance(model_or_path, (str, bytes)) or hasattr(model_or_path, "__fspath__"):
        from transformers import JambaForCausalLM

        jamba = JambaForCausalLM.from_pretrained(model_or_path, dtype=dtype)
    else:
        jamba = model_or_path
    if getattr(jamba.config, "model_type", None) != "jamba":
        raise ValueError(f"expected a Jamba model, got model_type={getattr(jamba.config, 'model_type', None)!r}")
    config = jamba_config_to_mixcon(jamba.config)
    param = next(jamba.parameters())
    with torch.device("meta"):
        model = MixConForCausalLM(config)
    sd = convert_jamba_state_dict(jamba.state_dict())
    missing, unexpected = model.load_state_dict(sd, strict=False, assign=True)
    missing = [k for k in missing if not (config.tie_word_embeddings and k == "lm_head.weight")]
    if missing or unexpected:
        raise ValueError(f"Jamba → MixCon mapping left missing={missing[:8]} unexpected={unexpected[:8]}")
    if config.tie_word_embeddings:
        model.tie_weights()
    return model.to(device=param.device, dtype=dtype or param.dtype).eval()
