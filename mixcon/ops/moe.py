"""Mixture-of-Experts routing, dispatch and losses as pure functions (docs/architecture.md).

Experts are stacked weights: gate_up (E, 2F, D) with the gate in the first F rows, down (E, D, F),
the layout of transformers' Mixtral and Jamba, so checkpoints map one to one.
"""

from __future__ import annotations

from typing import Optional, Sequence

import torch
import torch.nn.functional as F

from . import acc_dtype

_grouped_mm = getattr(F, "grouped_mm", None) or getattr(torch, "_grouped_mm", None)


def route(router_logits: torch.Tensor, top_k: int, renormalize: bool = True):
    """softmax → top-K (→ renormalise). Returns (weights (T, K) float32, indices (T, K))."""
    probs = torch.softmax(router_logits.float(), dim=-1)
    weights, indices = torch.topk(probs, top_k, dim=-1)
    if renormalize:
        weights = weights / weights.sum(dim=-1, keepdim=True)
    return weights, indices


def _expert_ffn(x, gate_up_e, down_e):
    gate, up = F.linear(x, gate_up_e).chunk(2, dim=-1)
    return F.linear(F.silu(gate) * up, down_e)


def expert_counts(indices: torch.Tensor, num_experts: int) -> torch.Tensor:
    """Tokens per expert (num_experts,) long: a bincount with a fixed output shape (torch.bincount's
    shape depends on the data, which torch.compile cannot trace without a graph break)."""
    flat = indices.reshape(-1)
    return torch.zeros(num_experts, dtype=torch.long, device=flat.device).scatter_add_(
        0, flat, torch.ones_like(flat, dtype=torch.long))


def moe_loop(x, gate_up, down, weights, indices):
    """The reference: for each expert, its tokens through its SwiGLU, weighted, summed. x (T, D).
    Under torch.compile it runs `moe_gather` (the loop's token sets have data-dependent sizes)."""
    if torch.compiler.is_compiling():
        return moe_gather(x, gate_up, down, weights, indices)
    acc = acc_dtype(x)
    out = torch.zeros(x.shape, dtype=acc, device=x.device)
    for e in range(gate_up.shape[0]):
        tok, slot = torch.where(indices == e)
        if tok.numel() == 0:
            continue
        y = _expert_ffn(x[tok], gate_up[e], down[e])
        out.index_add_(0, tok, y.to(acc) * weights[tok, slot, None].to(acc))
    return out.to(x.dtype)


def moe_gather(x, gate_up, down, weights, indices):
    """Decoding path for a handful of tokens: gather the chosen experts' weights per (token, k) and
    run them as a batched product. Reads exactly the T·K chosen experts' weights (K at batch 1) and
    never synchronises with the host, so it can be captured in a CUDA graph."""
    T, K = indices.shape
    flat = indices.reshape(-1)  # (T·K,)
    xs = x.repeat_interleave(K, dim=0)[:, None, :]  # (T·K, 1, D)
    gu = torch.bmm(xs, gate_up[flat].transpose(1, 2))  # (T·K, 1, 2F)
    g, u = gu.chunk(2, dim=-1)
    ys = torch.bmm(F.silu(g) * u, down[flat].transpose(1, 2))[:, 0]  # (T·K, D)
    acc = acc_dtype(x)
    out = (ys.to(acc).view(T, K, -1) * weights[..., None].to(acc)).sum(dim=1)
    return out.to(x.dtype)


def moe_grouped(x, gate_up, down, weights, indices):
    """Dropless grouped dispatch: (token, k) pairs sorted by expert, every expert's slice run in one
    grouped matrix product (torch's grouped_mm on CUDA in bf16, else a loop over non-empty experts
    only, so at batch 1 only the K chosen experts' weights are read), un-permuted, and the K copies of
    each token summed in float32 in a fixed order (deterministic, unlike index_add_)."""
    T, K = indices.shape
    E = gate_up.shape[0]
    grouped = _grouped_mm is not None and x.is_cuda and x.dtype == torch.bfloat16
    if T * K <= E // 2 or (torch.compiler.is_compiling() and not grouped):
        # decoding: reading the chosen experts beats touching all of them; and under torch.compile
        # without grouped_mm the per-expert loop below would need the counts on the host
        return moe_gather(x, gate_up, down, weights, indices)
    flat = indices.reshape(-1)  # (T·K,)
    order = torch.argsort(flat, stable=True)
    xs = x[order // K]  # (T·K, D) grouped by expert
    counts = expert_counts(flat, E)
    if grouped:
        offs = torch.cumsum(counts, 0).to(torch.int32)
        gu = _grouped_mm(xs, gate_up.transpose(1, 2), offs=offs)  # (T·K, 2F)
        g, u = gu.chunk(2, dim=-1)
        ys = _grouped_mm(F.silu(g) * u, down.transpose(1, 2), offs=offs)  # (T·K, D)
    else:
        parts, start = [], 0  # concatenated, not written into slices: no copy chain in the backward
        for e, n in enumerate(counts.tolist()):
            if n:
                parts.append(_expert_ffn(xs[start:start + n], gate_up[e], down[e]))
            start += n
        ys = torch.cat(parts)
    out = torch.empty_like(ys, dtype=torch.float32)
    out[order] = ys.float()
    out = (out.view(T, K, -1) * weights[..., None]).sum(dim=1)
    return out.to(x.dtype)


def _masked_mean(x: torch.Tensor, mask: Optional[torch.Tensor], dim=0):
    if mask is None:
        return x.mean(dim)
    m = mask.to(x.dtype).reshape(mask.shape + (1,) * (x.dim() - mask.dim()))
    return (x * m).sum(dim) / m.sum(dim).clamp(min=1)


def _layer_masks(router_logits, mask):
    """One (tokens,) mask for every layer, a list of per-layer masks (None = all tokens), or None."""
    if mask is None or isinstance(mask, torch.Tensor):
        return mask.reshape(-1).repeat(len(router_logits)) if mask is not None else None
    if all(m is None for m in mask):
        return None
    return torch.cat([torch.ones(l.shape[0], dtype=torch.bool, device=l.device) if m is None else m.reshape(-1)
                      for l, m in zip(router_logits, mask)])


def load_balancing_loss(router_logits: Sequence[torch.Tensor], top_k: int, mask=None):
    """Switch loss over all MoE layers' logits (each (tokens, E)); ``mask`` (tokens,) drops padding,
    or a list of per-layer masks (None = all tokens; a Mixture-of-Depths layer's selected tokens).
    L = E · Σ_e f_e P_e summed over the K choices, = K at perfect balance."""
    logits = torch.cat(list(router_logits), dim=0).float()
    m = _layer_masks(router_logits, mask)
    E = logits.shape[-1]
    probs = torch.softmax(logits, dim=-1)
    _, idx = torch.topk(probs, top_k, dim=-1)
    assign = F.one_hot(idx, E).float()  # (tokens, K, E)
    f = _masked_mean(assign, m)  # (K, E)
    P = _masked_mean(probs, m)  # (E,)
    return E * (f * P[None]).sum()


def router_z_loss(router_logits: Sequence[torch.Tensor], mask=None):
    """mean over non-padded tokens (and layers) of logsumexp(logits)²; ``mask`` as in load_balancing_loss."""
    logits = torch.cat(list(router_logits), dim=0).float()
    m = _layer_masks(router_logits, mask)
    return _masked_mean(torch.logsumexp(logits, dim=-1) ** 2, m)
