"""Input checks of MixConModel.forward: bad input raises one ValueError naming what was given and
what is allowed, before any kernel runs.

Imported absolutely by `modeling_mixcon` (whose copy next to exported weights imports the installed package).
"""

from __future__ import annotations

import torch
from transformers.cache_utils import Cache

from mixcon.models.cache import MixConCache
from mixcon.layers.common import is_static_cache
from mixcon.ops import tracing  # noqa: F401 — also imported from here by modeling_mixcon and masks

ID_DTYPES = (torch.long, torch.int32)


def _shape_in(x: torch.Tensor, shapes) -> bool:
    """x's shape is one of ``shapes``, compared by ==: under torch.export with dynamic shapes the sizes are
    SymInts, which cannot be hashed (a set lookup raised TypeError)."""
    return any(tuple(x.shape) == tuple(s) for s in shapes)


def check_inputs(config, input_ids, inputs_embeds, attention_mask, past_key_values, labels=None,
                  shift_labels=None, position_ids=None):
    """Bad input raises a ValueError naming what was given and what is allowed, before any kernel.

    Shapes, dtypes and types are checked always (no device work). The values (token ids within the
    vocabulary, masks of 0/1, labels within the vocabulary or −100) need the data: they are read back
    in one transfer in eager mode and skipped under torch.compile / torch.export."""
    if (input_ids is None) == (inputs_embeds is None):
        raise ValueError("pass exactly one of input_ids or inputs_embeds")
    if input_ids is not None:
        if not isinstance(input_ids, torch.Tensor) or input_ids.dim() != 2:
            raise ValueError(f"input_ids must be a (batch, time) tensor, got {getattr(input_ids, 'shape', type(input_ids))}")
        if input_ids.dtype not in ID_DTYPES:
            raise ValueError(f"input_ids must be an integer tensor of dtype torch.long or torch.int32, got {input_ids.dtype}")
        b, T = input_ids.shape
    else:
        if not isinstance(inputs_embeds, torch.Tensor) or inputs_embeds.dim() != 3 \
                or inputs_embeds.shape[-1] != config.hidden_size:
            raise ValueError(f"inputs_embeds has shape {tuple(getattr(inputs_embeds, 'shape', ()))}, expected "
                             f"(batch, time, {config.hidden_size})")
        if not inputs_embeds.is_floating_point():
            raise ValueError(f"inputs_embeds must be floating point, got {inputs_embeds.dtype}")
        b, T = inputs_embeds.shape[:2]
    if b == 0 or T == 0:
        raise ValueError(f"the input is empty: batch {b}, time {T}; pass at least one sequence of at least one token")
    past_length = 0
    if past_key_values is not None:
        if not isinstance(past_key_values, Cache):
            raise ValueError(
                f"past_key_values is a {type(past_key_values).__name__}; MixCon takes a MixConCache (or None), not "
                "the legacy tuple format: a Conba layer's state is not a (key, value) pair")
        if isinstance(past_key_values, MixConCache):
            static = past_key_values.is_static
            # a static cache counts on the device: read back in eager mode only (no sync under compile)
            past_length = 0 if static and tracing() else past_key_values.get_seq_length()
            if static and past_length + T > past_key_values.max_cache_len:
                raise ValueError(
                    f"the static cache holds max_cache_len={past_key_values.max_cache_len} tokens; {past_length} are "
                    f"cached and {T} more were given. Build it larger (generate: max_new_tokens / max_cache_len)")
            cb = past_key_values.batch_size
            if cb is not None and cb != b:
                raise ValueError(f"past_key_values holds a batch of {cb} sequences but the input has {b}; continue a "
                                 "cache with the batch it was built for (or start a new MixConCache)")
            if len(past_key_values.layers) != config.num_hidden_layers:
                raise ValueError(f"past_key_values has {len(past_key_values.layers)} layers, the model "
                                 f"{config.num_hidden_layers}: it was built for another config")
    if attention_mask is not None:
        allowed = [(b, past_length + T)] + ([(b, T)] if past_length == 0 else [])
        if is_static_cache(past_key_values):  # create_masks_for_generate's fixed-width mask
            allowed.append((b, past_key_values.max_cache_len))
        if not isinstance(attention_mask, torch.Tensor) or attention_mask.dim() != 2 \
                or not _shape_in(attention_mask, allowed):
            raise ValueError(
                f"attention_mask has shape {tuple(getattr(attention_mask, 'shape', ()))}, expected (batch, past + "
                f"time) = {(b, past_length + T)} (a 2-D mask of 1 for tokens and 0 for padding)")
        if attention_mask.is_complex():
            raise ValueError(f"attention_mask must be bool, integer or float, got {attention_mask.dtype}")
    if position_ids is not None:  # read by RoPE, the spatial mixers and MoD's causal order: checked for every model
        if not isinstance(position_ids, torch.Tensor) or not _shape_in(position_ids, [(b, T), (1, T)]):
            raise ValueError(
                f"position_ids has shape {tuple(getattr(position_ids, 'shape', ())) or type(position_ids).__name__}, "
                f"expected (batch, time) = {(b, T)} or {(1, T)} (shared by the batch): one position per input token "
                "(or None: from the attention mask)")
        if position_ids.dtype not in ID_DTYPES:
            raise ValueError(f"position_ids must be an integer tensor of dtype torch.long or torch.int32, got "
                             f"{position_ids.dtype}")
    for name, lab in (("labels", labels), ("shift_labels", shift_labels)):
        if lab is None:
            continue
        shapes = [(b, T), (b, T + 1)] if name == "labels" else [(b, T)]
        if not isinstance(lab, torch.Tensor) or lab.dim() != 2 or not _shape_in(lab, shapes):
            raise ValueError(
                f"{name} has shape {tuple(getattr(lab, 'shape', ()))}; expected the shape of input_ids {(b, T)}"
                + (f" (or {(b, T + 1)}: the ids with the token after the last one)" if name == "labels" else "")
                + ", with −100 where no loss is taken")
        if lab.dtype not in ID_DTYPES:
            raise ValueError(f"{name} must be an integer tensor of dtype torch.long or torch.int32, got {lab.dtype}")
    if "spatial" in config.layers_block_type and past_length + T > config.spatial_max_len:
        raise ValueError(
            f"context of {past_length + T} tokens exceeds spatial_max_len={config.spatial_max_len} (the spatial "
            "gating units' time × time weights); shorten the input or build the model with a larger spatial_max_len")
    if config.use_rope and past_length + T > config.max_position_embeddings:
        raise ValueError(
            f"context of {past_length + T} tokens exceeds max_position_embeddings={config.max_position_embeddings} "
            "(RoPE is on); raise max_position_embeddings or shorten the input")
    if not tracing():
        check_values(config, input_ids, attention_mask, labels, shift_labels)
    return b, T, past_length


def check_values(config, input_ids, attention_mask, labels, shift_labels):
    """The data-dependent checks, read back to the host in one transfer."""
    V = config.vocab_size
    in_vocab = lambda x: (x >= 0) & (x < V)
    checks = [  # (name, tensor, elementwise condition, message for the offending values)
        ("input_ids", input_ids, in_vocab, f"input_ids hold {{}}, outside the vocabulary [0, {V})"),
        ("attention_mask", attention_mask if attention_mask is not None and attention_mask.dtype != torch.bool
         else None, lambda m: (m == 0) | (m == 1),
         "attention_mask holds {}; it must hold only 0 (padding) and 1 (token)"),
        ("labels", labels, lambda x: in_vocab(x) | (x == -100),
         f"labels hold {{}}, outside the vocabulary [0, {V}) (−100 = no loss)"),
        ("shift_labels", shift_labels, lambda x: in_vocab(x) | (x == -100),
         f"shift_labels hold {{}}, outside the vocabulary [0, {V}) (−100 = no loss)"),
    ]
    checks = [c for c in checks if c[1] is not None]
    if not checks:
        return
    ok = torch.stack([cond(x).all() for _, x, cond, _ in checks]).tolist()  # the one host sync
    for good, (name, x, cond, msg) in zip(ok, checks):
        if not good:
            vals = sorted(set(x[~cond(x)].flatten().tolist()))
            raise ValueError(msg.format(", ".join(map(str, vals[:3])) + (", ..." if len(vals) > 3 else "")))
