"""The sparse all-MLP's token mixer (Yu et al. 2022): sMoE over feature chunks of causal spatial
gating units.

    z = gelu(in_proj(x));  u, v = split(z);  v̂ = LayerNorm(v)
    s_t[c] = g[c] · Σ_{j ≤ t} W_{e(c)}[p_t, p_j] · v̂_j[c] + b_{e(c)}[p_t]      (per feature c)
    y = out_proj(u ⊙ s)

Expert e is one causal (time × time) mixing matrix W_e with a per-position bias b_e (gMLP's spatial
gating unit; W starts near 0 and b at 1, so a fresh unit is a per-token MLP). The features of v̂
are routed to experts:

- ``spatial_routing="deterministic"`` (the paper's scaled variant): chunk i of the features → expert i,
  g = 1. With one expert (the first ``dense_layers`` layers) this is a dense gMLP token mixer.
- ``"learned"``: a router reads each feature's values over the first P = ``spatial_route_prefix``
  positions (the paper's partial prediction: the routing is decided from a prefix) and sends the
  feature to its top-1 expert with gate g = its probability, for every later position. Positions
  before P use the deterministic routing, so no position is ever computed from later tokens —
  nothing leaks and every token is trained on. This option computes every expert's mixing and
  selects (E× the mixing FLOPs): it is for studying the routing, not a fast path.

Positions p are the tokens' positions in their sequence (left padding excluded), so a padded batch
gives the rows' unpadded results; ``spatial_max_len`` bounds them (W is max_len × max_len). With a
cache the layer keeps v̂ and the positions of every past token (it grows like a K/V cache).
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from ..ops import to_acc


class SpatialMixer(nn.Module):
    def __init__(self, config, layer_idx: int):
        super().__init__()
        self.layer_idx = layer_idx
        self.width = W = config.spatial_width
        self.n_experts = E = 1 if layer_idx < config.dense_layers else config.spatial_experts
        self.max_len = L = config.spatial_max_len
        self.routing = config.spatial_routing if E > 1 else "deterministic"
        self.prefix = min(config.spatial_route_prefix, L)
        self.in_proj = nn.Linear(config.hidden_size, 2 * W, bias=False)
        self.norm = nn.LayerNorm(W, eps=config.rms_norm_eps)
        self.spatial_weight = nn.Parameter(torch.empty(E, L, L))
        self.spatial_bias = nn.Parameter(torch.empty(E, L))
        self.out_proj = nn.Linear(W, config.hidden_size, bias=False)
        if self.routing == "learned":
            self.router = nn.Linear(self.prefix, E)
        self.register_buffer("chunk_expert", torch.arange(W) // (W // E), persistent=False)

    def reset_parameters_(self, init):
        """Parameters and the non-persistent ``chunk_expert`` buffer (not in a checkpoint: after
        `from_pretrained` it must be rebuilt here, or it holds whatever memory it was given)."""
        init.normal_(self.spatial_weight, mean=0.0, std=1e-3)
        init.ones_(self.spatial_bias)
        chunks = torch.arange(self.width, device=self.chunk_expert.device) // (self.width // self.n_experts)
        copy = getattr(init, "copy_", None)
        if copy is not None:
            copy(self.chunk_expert, chunks)
        else:
            with torch.no_grad():
                self.chunk_expert.copy_(chunks)

    def route(self, v_all: torch.Tensor, kpos: torch.Tensor):
        """Learned routing from the first P positions: (expert (b, W) long, gate (b, W) float)."""
        P = self.prefix
        onehot = (kpos[:, :, None] == torch.arange(P, device=kpos.device)).to(v_all.dtype)  # (b, n, P)
        prefix = torch.einsum("bnp,bnw->bwp", onehot, v_all)  # each feature's first P values
        logits = self.router(prefix)
        probs = torch.softmax(to_acc(logits), dim=-1)  # (b, W, E)
        gate, expert = probs.max(-1)
        return expert, gate

    def forward(self, x: torch.Tensor, positions: torch.Tensor, state: Optional[dict] = None):
        """x (b, T, D); positions (b, T) long, −1 = padding; state: None, the layer's cache dict (grown
        here), or a static history with ``append(v, positions) → (v_all, kpos)`` (slots not written hold
        position −1)."""
        b, T, _ = x.shape
        u, v = F.gelu(self.in_proj(x)).chunk(2, dim=-1)
        v = self.norm(v) * (positions >= 0)[..., None].to(x.dtype)
        kpos, v_all = positions, v
        if state is not None and hasattr(state, "append"):  # a static history: written in place, fixed size
            v_all, kpos = state.append(v, positions)
        elif state is not None:
            if state:
                kpos, v_all = torch.cat([state["pos"], positions], 1), torch.cat([state["v"], v], 1)
            state["pos"], state["v"] = kpos, v_all
        qpos = positions
        if not torch.compiler.is_compiling() and int(qpos.max()) >= self.max_len:
            raise ValueError(f"position {int(qpos.max())} is beyond spatial_max_len={self.max_len}: the spatial "
                             "gating units mix at most spatial_max_len tokens")
        qc, kc = qpos.clamp(min=0), kpos.clamp(min=0)
        allowed = (kpos[:, None, :] >= 0) & (kpos[:, None, :] <= qpos[:, :, None])  # (b, T, n)
        Wsub = self.spatial_weight[:, qc[:, :, None], kc[:, None, :]] * allowed.to(x.dtype)  # (E, b, T, n)
        bias = self.spatial_bias[:, qc]  # (E, b, T)
        E, C = self.n_experts, self.width // self.n_experts
        if self.routing == "deterministic":
            s = torch.einsum("ebtn,bnec->btec", Wsub, v_all.view(b, -1, E, C)) + bias.permute(1, 2, 0)[..., None]
            s = s.reshape(b, T, self.width)
        else:
            s_all = torch.einsum("ebtn,bnw->btew", Wsub, v_all)  # every expert on every feature
            expert, gate = self.route(v_all, kpos)
            pick = lambda e: torch.gather(s_all, 2, e[:, None, None, :].expand(b, T, 1, self.width))[:, :, 0]
            pick_b = lambda e: torch.gather(bias.permute(1, 2, 0), 2, e[:, None, :].expand(b, T, self.width))
            det = self.chunk_expert[None].expand(b, -1)
            s_det = pick(det) + pick_b(det)
            s_learn = pick(expert) * gate[:, None, :].to(x.dtype) + pick_b(expert)
            s = torch.where((qpos >= self.prefix)[..., None], s_learn, s_det)
        return self.out_proj(u * s)
