"""Sparse MoE FFN: a router and stacked SwiGLU experts (docs/architecture.md, "Mixture of Experts")."""

import torch
from torch import nn

from ..ops.moe import expert_counts, moe_grouped, moe_loop, route


class MoEExperts(nn.Module):
    def __init__(self, num_experts: int, hidden_size: int, intermediate_size: int):
        super().__init__()
        self.gate_up_proj = nn.Parameter(torch.empty(num_experts, 2 * intermediate_size, hidden_size))
        self.down_proj = nn.Parameter(torch.empty(num_experts, hidden_size, intermediate_size))


class SparseMoE(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.num_experts = config.num_experts
        self.top_k = config.experts_per_token
        self.renormalize = config.moe_renormalize
        self.jitter = config.router_jitter_noise
        self.impl = config.moe_impl
        self.router = nn.Linear(config.hidden_size, config.num_experts, bias=False)
        self.experts = MoEExperts(config.num_experts, config.hidden_size, config.intermediate_size)
        self.last_expert_load = None  # tokens per expert in the latest forward, for logging

    def forward(self, x: torch.Tensor):
        """x (b, T, D) → (y (b, T, D), router_logits (b·T, E))."""
        b, T, D = x.shape
        h = x.reshape(-1, D)
        r = h
        if self.training and self.jitter > 0:
            # multiplicative jitter on the router's input only (Switch Transformer): routing is
            # explored, the experts see the clean activations
            r = h * torch.empty_like(h).uniform_(1.0 - self.jitter, 1.0 + self.jitter)
        logits = self.router(r)  # (b·T, E)
        weights, indices = route(logits, self.top_k, self.renormalize)
        fn = moe_loop if self.impl == "loop" else moe_grouped
        y = fn(h, self.experts.gate_up_proj, self.experts.down_proj, weights, indices)
        if not torch.compiler.is_compiling():  # logging only: kept out of a compiled (captured) step
            self.last_expert_load = expert_counts(indices, self.num_experts).detach()
        return y.view(b, T, D), logits
