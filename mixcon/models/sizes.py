"""Parameter counts of a MixCon config (built on the meta device: no memory allocated).

Kept apart from configuration_mixcon.py, which must not import the model (the config is a leaf:
the model imports it)."""

from __future__ import annotations

import torch

from mixcon.models.configuration_mixcon import MixConConfig
from mixcon.models.modeling_mixcon import MixConForCausalLM


def active_parameters(config: "MixConConfig") -> int:
    """Parameters one token passes through (the K chosen experts of each MoE layer), counted on the
    meta device without allocating."""
    with torch.device("meta"):
        model = MixConForCausalLM(config)
    total = sum(p.numel() for p in model.parameters())
    if config.tie_word_embeddings and model.lm_head.weight is not model.model.embed_tokens.weight:
        total -= model.lm_head.weight.numel()
    per_expert = 3 * config.hidden_size * config.intermediate_size
    inactive = config.layers_ffn_type.count("moe") * (config.num_experts - config.experts_per_token) * per_expert
    return total - inactive
