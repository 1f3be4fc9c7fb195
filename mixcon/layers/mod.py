"""Mixture-of-Depths routing (Raposo et al. 2024): which tokens a routed layer processes.

In training a scalar router ``r = wᵀx`` picks, per sequence, the top ``ceil(capacity · T)`` tokens
(expert choice); they go through the layer in their original order with their original positions
and the layer's output is scaled by σ(r) before the residual. Top-k over a sequence looks at the
future, so sampling uses a causal decision instead, trained with a binary cross-entropy against
top-k membership: either the router itself (``σ(r) > ½``) or a small predictor on stop-gradient
inputs. In eval mode (generation, evaluation) every forward uses the causal decision, so a full
forward and a cached decode process the same tokens.
"""

from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn


def _acc(x: torch.Tensor) -> torch.Tensor:
    """float32 for half types, the input's own precision otherwise (float64 stays exact in tests)."""
    return x if x.dtype in (torch.float32, torch.float64) else x.float()


class DepthRouter(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.capacity = config.mod_capacity
        self.decision = config.mod_decision
        self.aux_coef = config.mod_aux_loss_coef
        self.router = nn.Linear(config.hidden_size, 1, bias=False)
        if self.decision == "predictor":
            hidden = max(8, config.hidden_size // 4)
            self.predictor = nn.Sequential(nn.Linear(config.hidden_size, hidden), nn.SiLU(), nn.Linear(hidden, 1))
        self._stats: Optional[torch.Tensor] = None  # (agreement, selected), kept on the device (no sync)

    @property
    def last_stats(self) -> Optional[dict]:
        """From the latest forward over more than one token: "agreement" = share of real tokens where the
        causal decision equals top-k membership, "selected" = share of real tokens processed."""
        if self._stats is None:
            return None
        agreement, selected = self._stats.tolist()
        return {"agreement": agreement, "selected": selected}

    def forward(self, x: torch.Tensor, real: Optional[torch.Tensor]):
        """x (b, T, D), real (b, T) bool or None → (selected (b, T) bool, r (b, T) float32, aux loss or None).
        ``aux`` is mod_aux_loss_coef · BCE(causal logit, top-k membership) over real tokens."""
        b, T, _ = x.shape
        r = _acc(self.router(x).squeeze(-1))
        causal = r if self.decision == "router" else _acc(self.predictor(x.detach()).squeeze(-1))
        if real is None:
            real = torch.ones(b, T, dtype=torch.bool, device=x.device)
        aux = None
        member = None
        if T > 1:  # top-k membership over the sequence: the training decision and the causal one's target
            k = max(1, math.ceil(self.capacity * T))
            top = r.detach().masked_fill(~real, float("-inf")).topk(k, dim=-1).indices
            member = torch.zeros_like(real).scatter_(1, top, True) & real
            bce = F.binary_cross_entropy_with_logits(causal, member.float(), reduction="none")
            aux = self.aux_coef * (bce * real).sum() / real.sum().clamp(min=1)
        if self.training and member is not None:
            selected = member
        else:
            selected = (causal > 0) & real
        if member is not None:
            n = real.sum().clamp(min=1)
            self._stats = torch.stack([(((causal > 0) == member) & real).sum(), selected.sum()]).detach() / n
        return selected, r, aux


def gather_selected(selected: torch.Tensor):
    """(b, T) bool → (idx (b, k) long: the selected positions in increasing order, padded with 0;
    valid (b, k) bool), k = the most any row selected."""
    b, T = selected.shape
    ar = torch.arange(T, device=selected.device)
    order = torch.argsort((~selected).long() * T + ar, dim=1)  # selected first, each group in time order
    k = int(selected.sum(1).max()) if b else 0
    idx = order[:, :k]
    valid = torch.gather(selected, 1, idx)
    return idx.masked_fill(~valid, 0), valid


def take(x: torch.Tensor, idx: torch.Tensor, dim: int = 1) -> torch.Tensor:
    """x[b, idx[b, j], ...] along ``dim`` (batch first)."""
    shape = list(x.shape)
    shape[dim] = idx.shape[1]
    view = [idx.shape[0]] + [1] * (x.dim() - 1)
    view[dim] = idx.shape[1]
    return torch.gather(x, dim, idx.view(view).expand(shape))
