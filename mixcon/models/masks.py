"""Attention masks of MixConModel: from the 2-D padding mask, from a caller's 4-D mask, and the
fixed-shape masks of a static cache's compiled decode step.

Imported absolutely by `modeling_mixcon` (whose copy next to exported weights imports the installed package).
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

from mixcon.models.inputs import tracing


def build_attention_mask(mask2d: Optional[torch.Tensor], T: int, past: int, device) -> Optional[torch.Tensor]:
    """Bool (b, 1, T, past + T) mask, True = may attend, or None without padding (causal attention,
    which `mixcon.layers.attention.attend` runs without building a T × (past + T) mask).

    A query at a padded position whose every key is masked would give NaN in SDPA; it is let attend
    to itself (its output is never read by a real token, whose mask excludes padded keys)."""
    if mask2d is None:
        return None
    q_pos = past + torch.arange(T, device=device)
    k_pos = torch.arange(past + T, device=device)
    allowed = (k_pos[None, :] <= q_pos[:, None])[None, None]  # (1, 1, T, past + T)
    if mask2d is not None:
        allowed = allowed & mask2d.bool()[:, None, None, :]
        diag = (k_pos[None, :] == q_pos[:, None])[None, None]
        allowed = allowed | (diag & ~allowed.any(-1, keepdim=True))
    return allowed


def custom_attention_mask(config, mask4d: torch.Tensor, b: int, T: int, past: int, static: bool) -> torch.Tensor:
    """A 4-D attention mask given by the caller (one row of keys per query, e.g. sequences packed behind a
    shared prefix, as transformers' models take it) → bool (b or 1, 1, T, past + T), True = may attend.

    bool: True attends; integer: 1 attends, 0 not; float: additive, 0 attends and ≤ −1e4 (−inf, the
    dtype's min) does not. Only a model whose every layer attends (no Conba, spatial or Mixture-of-Depths
    layer: those mix or route tokens in sequence order, which a key mask cannot change) takes one. A
    query whose every key is masked attends to itself (as with `build_attention_mask`)."""
    kinds = set(config.layers_block_type) - {"attention", "mom"}
    routed = any(m != "none" for m in config.layers_mod_type)
    if kinds or routed:
        what = ", ".join(sorted(kinds | ({"Mixture-of-Depths"} if routed else set())))
        raise ValueError(
            f"a 4-D attention_mask (a mask per query) needs every layer to attend; this model has {what} layers, "
            "which mix or route tokens in sequence order whatever the mask says. Pass a 2-D (batch, past + time) "
            "mask of 1 for tokens and 0 for padding (or run each sequence separately)")
    if static:
        raise ValueError("a 4-D attention_mask is not supported with a static cache; use the dynamic cache")
    if tuple(mask4d.shape[1:]) != (1, T, past + T) or mask4d.shape[0] not in (1, b):
        raise ValueError(f"a 4-D attention_mask has shape {tuple(mask4d.shape)}, expected (batch or 1, 1, time, "
                         f"past + time) = ({b}, 1, {T}, {past + T})")
    if mask4d.is_complex():
        raise ValueError(f"attention_mask must be bool, integer or float, got {mask4d.dtype}")
    if mask4d.dtype == torch.bool:
        allowed = mask4d
    elif mask4d.is_floating_point():
        if not tracing() and not bool(((mask4d == 0) | (mask4d <= -1e4)).all()):
            raise ValueError("a float 4-D attention_mask is additive: it must hold 0 (attend) and large negative "
                             "values (≤ −1e4, −inf or the dtype's minimum: masked) only")
        allowed = mask4d == 0
    else:
        if not tracing() and not bool(((mask4d == 0) | (mask4d == 1)).all()):
            raise ValueError("an integer 4-D attention_mask must hold only 1 (attend) and 0 (masked)")
        allowed = mask4d == 1
    diag = (torch.arange(past + T, device=allowed.device)[None, :]
            == past + torch.arange(T, device=allowed.device)[:, None])[None, None]
    return allowed | (diag & ~allowed.any(-1, keepdim=True))


def static_masks(cache, attention_mask, position_ids, b: int, T: int, device):
    """Static cache: (seq_mask (b, T), attention mask (b, 1, T, max_cache_len) bool, position_ids (b, T)),
    with the fixed shapes a captured decode step needs and no host sync. The queries sit at slots
    L … L + T − 1 (L = the cache's device counter); a key is visible when its slot is ≤ the query's and
    holds a token (the 2-D mask: (b, max_cache_len) as `create_masks_for_generate` gives it, or
    (b, past + T) in eager calls, padded here). A query at a padded place attends to itself only."""
    M = cache.max_cache_len
    L = cache.length
    q_slot = L + torch.arange(T, device=device)  # (T,)
    k_slot = torch.arange(M, device=device)
    if attention_mask is None:
        keymask = torch.ones(b, M, dtype=torch.bool, device=device)
    else:
        keymask = attention_mask.to(device).bool()
        if keymask.shape[1] < M:
            keymask = F.pad(keymask, (0, M - keymask.shape[1]))
    seq_mask = keymask.gather(1, q_slot[None].expand(b, T))  # (b, T)
    causal = k_slot[None, :] <= q_slot[:, None]  # (T, M)
    allowed = keymask[:, None, None, :] & causal[None, None]
    diag = (k_slot[None, :] == q_slot[:, None])[None, None]
    allowed = allowed | (diag & ~seq_mask[:, None, :, None])
    if position_ids is None:
        position_ids = (keymask.long().cumsum(-1) - 1).clamp(min=0).gather(1, q_slot[None].expand(b, T))
    return seq_mask, allowed, position_ids
