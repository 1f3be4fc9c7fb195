"""Mixture-of-Modules (Gong et al. 2024): a pool of attention and FFN modules, plus SKIP, that
routers assemble anew for every token in every round.

The pool lives once in the model (`MoMPool`); each "m" layer of the layout is one round with its
own norms and two routers (an MLP d → hidden → modules + 1, softmax with a temperature, top-K).
A round computes, per token,

    q, k, v = Σ_k w_k · W_{q,k,v}^{m_k} · x          (router-weighted projections, SKIP adds nothing)
    a       = Σ_k ŵ_k · W_o^{m_k} · attention(q, k, v) (ŵ: the weights renormalised over non-SKIP picks)
    f       = Σ_k w_k · FFN^{m_k}(norm(x + a))

so one attention runs per round (one K/V per round in the cache, every token's K/V depending only on
that token) and only the chosen modules' weights are applied. A token that picks SKIP K times passes
the round unchanged. The routers are kept balanced by a Switch loss; `init_pool_from_dense` is the
paper's second stage: the pool initialised from a trained dense model of this project.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..ops import acc_dtype, to_acc
from ..ops.moe import load_balancing_loss, moe_gather, moe_loop
from .attention import apply_rope, attend, eager_attend
from .moe import MoEExperts


class MoMPool(nn.Module):
    """Stacked modules: attention projections (M_A, out, in) and SwiGLU FFNs (M_F, ·, ·)."""

    def __init__(self, config):
        super().__init__()
        M, D, hd = config.mom_attn_modules, config.hidden_size, config.head_dim
        H, KV = config.num_attention_heads, config.num_key_value_heads
        self.q_proj = nn.Parameter(torch.empty(M, H * hd, D))
        self.k_proj = nn.Parameter(torch.empty(M, KV * hd, D))
        self.v_proj = nn.Parameter(torch.empty(M, KV * hd, D))
        self.o_proj = nn.Parameter(torch.empty(M, D, H * hd))
        self.ffn = MoEExperts(config.mom_ffn_modules, D, config.intermediate_size)


class ModuleRouter(nn.Module):
    def __init__(self, hidden_size: int, router_hidden: int, n_modules: int, top_k: int, temperature: float):
        super().__init__()
        self.top_k, self.temperature, self.skip = top_k, temperature, n_modules
        self.fc1 = nn.Linear(hidden_size, router_hidden, bias=False)
        self.fc2 = nn.Linear(router_hidden, n_modules + 1, bias=False)  # the last column is SKIP

    def forward(self, x: torch.Tensor):
        """x (N, D) → (weights (N, K) float32, indices (N, K), logits (N, modules + 1))."""
        logits = self.fc2(F.gelu(self.fc1(x)))
        logits = to_acc(logits) / self.temperature
        weights, indices = torch.softmax(logits, dim=-1).topk(self.top_k, dim=-1)
        return weights, indices, logits


def _gather_path(n_tokens: int, top_k: int, n_modules: int) -> bool:
    """The gather path (each (token, pick) reads its module's weights; fixed shapes, no host sync) for
    a handful of tokens (decoding) and always under torch.compile; the per-module loop otherwise."""
    return torch.compiler.is_compiling() or n_tokens * top_k <= n_modules


def routed_linear_gather(x, weight, w, idx):
    """`routed_linear` by gathering the picked modules' weights: (N, K, out, in), for a few tokens."""
    M = weight.shape[0]
    acc = acc_dtype(x)
    keep = idx < M  # SKIP (idx == M) reads module M − 1 with weight 0
    ws = weight[idx.clamp(max=M - 1)]  # (N, K, out, in)
    y = torch.matmul(ws, x[:, None, :, None].to(ws.dtype))[..., 0]  # (N, K, out)
    return (y.to(acc) * (w * keep)[..., None].to(acc)).sum(1).to(x.dtype)


def routed_linear(x: torch.Tensor, weight: torch.Tensor, w: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """Σ_k w[:, k] · weight[idx[:, k]] x for x (N, in), weight (M, out, in); idx == M is SKIP (adds
    nothing). Each module multiplies only the tokens that chose it (`routed_linear_gather` for a few
    tokens or under torch.compile)."""
    if _gather_path(x.shape[0], idx.shape[1], weight.shape[0]):
        return routed_linear_gather(x, weight, w, idx)
    acc = acc_dtype(x)
    out = torch.zeros(x.shape[0], weight.shape[1], dtype=acc, device=x.device)
    for m in range(weight.shape[0]):
        tok, slot = torch.where(idx == m)
        if tok.numel():
            out.index_add_(0, tok, F.linear(x[tok], weight[m]).to(acc) * w[tok, slot, None])
    return out.to(x.dtype)


class MoMRound(nn.Module):
    """One round: an assembled attention then an assembled FFN (each pre-normed, residual)."""

    def __init__(self, config, layer_idx: int):
        super().__init__()
        self.layer_idx = layer_idx
        self.num_heads, self.num_kv_heads, self.head_dim = (
            config.num_attention_heads, config.num_key_value_heads, config.head_dim)
        self.aux_coef = config.mom_aux_loss_coef
        args = (config.hidden_size, config.mom_router_hidden)
        self.attn_router = ModuleRouter(*args, config.mom_attn_modules, config.mom_top_k, config.mom_router_temperature)
        self.ffn_router = ModuleRouter(*args, config.mom_ffn_modules, config.mom_top_k, config.mom_router_temperature)
        self.last_choices = None  # (attention indices, FFN indices) of the latest forward, for analysis

    def attention(self, x, pool: MoMPool, attn_mask=None, rope=None, past_key_values=None, impl: str = "sdpa"):
        """→ (out (b, T, D), router logits, chosen modules, attention weights (b, H, T, S) with impl="eager"
        or None)."""
        b, T, D = x.shape
        flat = x.reshape(-1, D)
        w, idx, logits = self.attn_router(flat)
        q = routed_linear(flat, pool.q_proj, w, idx).view(b, T, self.num_heads, self.head_dim).transpose(1, 2)
        k = routed_linear(flat, pool.k_proj, w, idx).view(b, T, self.num_kv_heads, self.head_dim).transpose(1, 2)
        v = routed_linear(flat, pool.v_proj, w, idx).view(b, T, self.num_kv_heads, self.head_dim).transpose(1, 2)
        if rope is not None:
            q, k = apply_rope(q, *rope), apply_rope(k, *rope)
        if past_key_values is not None:
            k, v = past_key_values.update(k, v, self.layer_idx)
        weights = None
        if impl == "eager":
            o, weights = eager_attend(q, k, v, attn_mask)
        else:
            o = attend(q, k, v, attn_mask)
        o = o.transpose(1, 2).reshape(b * T, self.num_heads * self.head_dim)
        real = (idx != self.attn_router.skip).float()
        w_o = w * real / (w * real).sum(-1, keepdim=True).clamp(min=1e-9)  # convex over the non-SKIP picks
        return routed_linear(o, pool.o_proj, w_o, idx).view(b, T, D), logits, idx, weights

    def ffn(self, x, pool: MoMPool):
        b, T, D = x.shape
        flat = x.reshape(-1, D)
        w, idx, logits = self.ffn_router(flat)
        gu, dn = pool.ffn.gate_up_proj, pool.ffn.down_proj
        M = gu.shape[0]
        if _gather_path(flat.shape[0], idx.shape[1], M):  # SKIP (idx == M) reads module M − 1 with weight 0
            y = moe_gather(flat, gu, dn, w * (idx < M), idx.clamp(max=M - 1))
        else:  # moe_loop visits experts 0..M−1 only, so the SKIP index M contributes nothing
            y = moe_loop(flat, gu, dn, w, idx)
        return y.view(b, T, D), logits, idx

    def balance_loss(self, attn_logits, ffn_logits, token_mask=None):
        """mom_aux_loss_coef · mean of the two routers' Switch losses (SKIP counts as a module)."""
        k = self.attn_router.top_k
        return self.aux_coef * 0.5 * (load_balancing_loss([attn_logits], k, token_mask)
                                      + load_balancing_loss([ffn_logits], k, token_mask))


@torch.no_grad()
def init_pool_from_dense(model, dense) -> None:
    """The paper's second stage: fill ``model``'s MoM pool, embeddings, head and norms from a trained
    dense transformer of this project (every layer attention + dense MLP, same sizes).

    Consecutive layers map to modules: with L dense layers and M modules (M divides L), module j is
    the mean of layers j·L/M … (j+1)·L/M − 1 (M = L: layer j → module j). Round h takes the norms of
    layer ⌊h·L/H⌋. Routers keep their fresh initialisation."""
    cfg, dcfg = model.config, dense.config
    L = dcfg.num_hidden_layers
    if set(dcfg.layers_block_type) != {"attention"} or set(dcfg.layers_ffn_type) != {"mlp"}:
        raise ValueError("init_pool_from_dense needs a dense transformer (every layer attention with a dense MLP); "
                         f"got mixers {sorted(set(dcfg.layers_block_type))}, FFNs {sorted(set(dcfg.layers_ffn_type))}")
    for name in ("hidden_size", "intermediate_size", "num_attention_heads", "num_key_value_heads", "head_dim",
                 "vocab_size"):
        if getattr(cfg, name) != getattr(dcfg, name):
            raise ValueError(f"{name} differs: MoM model {getattr(cfg, name)} vs dense model {getattr(dcfg, name)}")
    for M, what in ((cfg.mom_attn_modules, "mom_attn_modules"), (cfg.mom_ffn_modules, "mom_ffn_modules")):
        if L % M:
            raise ValueError(f"{what}={M} must divide the dense model's {L} layers (consecutive layers → one module)")
    pool = model.model.mom_pool
    dl = dense.model.layers

    def fill(dst, M, get):
        g = L // M
        for j in range(M):
            dst[j].copy_(torch.stack([get(dl[i]) for i in range(j * g, (j + 1) * g)]).mean(0))

    fill(pool.q_proj, cfg.mom_attn_modules, lambda l: l.mixer.q_proj.weight)
    fill(pool.k_proj, cfg.mom_attn_modules, lambda l: l.mixer.k_proj.weight)
    fill(pool.v_proj, cfg.mom_attn_modules, lambda l: l.mixer.v_proj.weight)
    fill(pool.o_proj, cfg.mom_attn_modules, lambda l: l.mixer.o_proj.weight)
    fill(pool.ffn.gate_up_proj, cfg.mom_ffn_modules,
         lambda l: torch.cat([l.feed_forward.gate_proj.weight, l.feed_forward.up_proj.weight]))
    fill(pool.ffn.down_proj, cfg.mom_ffn_modules, lambda l: l.feed_forward.down_proj.weight)
    model.model.embed_tokens.weight.copy_(dense.model.embed_tokens.weight)
    model.model.final_layernorm.weight.copy_(dense.model.final_layernorm.weight)
    model.lm_head.weight.copy_(dense.lm_head.weight)
    rounds = [l for l in model.model.layers if l.mixer_type == "mom"]
    for h, layer in enumerate(rounds):
        src = dl[h * L // len(rounds)]
        layer.input_layernorm.weight.copy_(src.input_layernorm.weight)
        layer.pre_ff_layernorm.weight.copy_(src.pre_ff_layernorm.weight)
