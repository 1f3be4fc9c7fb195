"""Mixture-of-Depths routing (Raposo et al. 2024): which tokens a routed layer processes.

In training a scalar router ``r = wᵀx`` picks, per sequence, the top ``ceil(capacity · T)`` tokens
(expert choice); they go through the layer in their original order with their original positions
and the layer's output is scaled by σ(r) before the residual. Top-k over a sequence looks at the
future, so sampling uses a causal decision instead, trained with a binary cross-entropy against
top-k membership: either the router itself (``σ(r) > ½``) or a small predictor on stop-gradient
inputs. In eval mode (generation, evaluation) every forward uses the causal decision, so a full
forward and a cached decode process the same tokens.

`DepthRoutedMixin` holds the routed paths of the decoder layer (a whole attention layer, or the FFN of a
Conba/spatial layer): gather the selected tokens, run them, scatter σ(r)-scaled outputs back.
"""

from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from ..ops import to_acc as _acc
from .common import is_static_cache


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


def select_tokens(selected: torch.Tensor, fixed: bool):
    """Mixture-of-Depths' selected tokens as (idx, valid) (see `gather_selected`). ``fixed``: every
    position, ``valid`` = selected: no host sync and no data-dependent shape (a static cache, a
    compiled step), at the cost of running the routed part on every token."""
    if not fixed:
        return gather_selected(selected)
    b, T = selected.shape
    return torch.arange(T, device=selected.device).expand(b, T), selected


class DepthRoutedMixin:
    """The Mixture-of-Depths paths of `MixConDecoderLayer`: only the tokens its ``depth_router``
    selects pass through the routed part. The layer provides ``depth_router``, ``mixer`` (attention,
    for `_routed_layer`), ``input_layernorm``, ``pre_ff_layernorm``, ``ffn_type``, ``layer_idx`` and
    ``_ffn(h) → (out, router logits or None)``. Each path returns what the layer's forward returns:
    (hidden_states, router_logits (b·T, E) or None, their token mask or None, aux loss, weights)."""

    def _scatter_logits(self, logits, idx, valid, b, T):
        """Router logits of the selected tokens (b·k, E) → (b·T, E) and the mask of real rows."""
        if logits is None:
            return None, None
        E = logits.shape[-1]
        # empty slots point at position 0 too: add (zeros for them) rather than write, so they never
        # overwrite a selected token's row
        vals = logits.view(b, -1, E) * valid[..., None].to(logits.dtype)
        full = logits.new_zeros(b, T, E).scatter_add(1, idx[..., None].expand(-1, -1, E), vals)
        sel = torch.zeros(b, T, dtype=torch.long, device=idx.device).scatter_add(1, idx, valid.long()) > 0
        return full.view(b * T, E), sel.view(-1)

    def _routed_ffn(self, x, seq_mask):
        """Mixture-of-Depths on the FFN of a Conba/spatial layer: x + σ(r)·ffn(norm(x)) for selected tokens."""
        b, T, D = x.shape
        real = seq_mask.bool() if seq_mask is not None else None
        selected, r, aux = self.depth_router(x, real)
        idx, valid = select_tokens(selected, fixed=torch.compiler.is_compiling())
        if idx.shape[1] == 0:
            return x, None, None, aux, None
        xs = take(x, idx)
        f, logits = self._ffn(self.pre_ff_layernorm(xs))
        w = (torch.sigmoid(take(r, idx)) * valid)[..., None].to(x.dtype)
        out = x.scatter_add(1, idx[..., None].expand(-1, -1, D), f * w)
        return (out, *self._scatter_logits(logits, idx, valid, b, T), aux, None)

    def _routed_layer(self, x, seq_mask, rope, cache, positions, attn_impl="sdpa"):
        """Mixture-of-Depths on a whole attention layer: the selected tokens, in their order and at their
        positions, attend to the selected tokens before them (the cache keeps only selected keys).
        Its attention weights (eager) are given at the tokens' places in (b, H, T, past + T) (a static
        cache: (b, H, T, slots)), zero for tokens the router did not select."""
        b, T, D = x.shape
        real = seq_mask.bool() if seq_mask is not None else None
        selected, r, aux = self.depth_router(x, real)
        static = is_static_cache(cache)
        # static cache: every token passes (fixed shapes), the unselected ones masked out and dropped
        idx, valid = select_tokens(selected, fixed=static)
        k = idx.shape[1]
        eager = attn_impl == "eager"
        if k == 0 and (cache is None or cache.key_positions[self.layer_idx] is None):
            return x, None, None, aux, self._full_weights(None, None, None, None, x, cache) if eager else None
        xs = take(x, idx)
        qpos = take(positions, idx).masked_fill(~valid, -1)
        kpos = qpos
        if static:
            kpos = cache.layers[self.layer_idx].write_positions(qpos)
        elif cache is not None:
            prev = cache.key_positions[self.layer_idx]
            kpos = torch.cat([prev, qpos], 1) if prev is not None else qpos
            cache.key_positions[self.layer_idx] = kpos
        if k == 0:  # nothing to process, nothing new cached (the K/V stay as they were)
            return x, None, None, aux, self._full_weights(None, None, None, None, x, cache) if eager else None
        allowed = (kpos[:, None, :] >= 0) & (kpos[:, None, :] <= qpos[:, :, None])
        allowed = allowed | ~valid[:, :, None]  # empty slots attend anywhere; their output is dropped
        rope_s = (take(rope[0], idx, 2), take(rope[1], idx, 2)) if rope is not None else None
        a, weights = self.mixer(self.input_layernorm(xs), attn_mask=allowed[:, None], rope=rope_s,
                                past_key_values=cache, impl=attn_impl, return_weights=True)
        if weights is not None and static:
            # every token is a query and a slot is a key's place in the sequence: the weights are already
            # (b, H, T, slots); the rows of tokens the router did not select are zero
            weights = weights * valid[:, None, :, None].to(weights.dtype)
        elif weights is not None:
            weights = self._full_weights(weights, idx.masked_fill(~valid, T), kpos, positions, x, cache)
        delta, logits = a, None
        if self.ffn_type != "none":
            f, logits = self._ffn(self.pre_ff_layernorm(xs + a))
            delta = a + f
        w = (torch.sigmoid(take(r, idx)) * valid)[..., None].to(x.dtype)
        out = x.scatter_add(1, idx[..., None].expand(-1, -1, D), delta * w)
        return (out, *self._scatter_logits(logits, idx, valid, b, T), aux, weights)

    def _full_weights(self, weights, idx, kpos, positions, x, cache):
        """Weights over the selected queries/keys (b, H, k, n) → (b, H, T, past + T): row = the query's
        place in this chunk (idx; T for an empty slot), column = the key's place in the whole sequence
        (left padding counted); zero for tokens the router did not select."""
        b, T = x.shape[:2]
        S = (cache.get_seq_length() if cache is not None else 0) + T
        H = self.mixer.num_heads
        out = x.new_zeros(b, H, T + 1, S + 1)  # one spare row/column takes the empty slots
        if weights is None:
            return out[:, :, :T, :S]
        offset = (S - 1 - positions[:, -1])[:, None]  # place − position: the row's left padding
        ki = torch.where(kpos >= 0, kpos + offset, S).clamp(0, S)
        rows = x.new_zeros(b, H, weights.shape[2], S + 1).scatter_(
            3, ki[:, None, None, :].expand(-1, H, weights.shape[2], -1), weights)
        return out.scatter_(2, idx[:, None, :, None].expand(-1, H, -1, S + 1), rows)[:, :, :T, :S]
