"""What differs across the transformers 5.x releases this package supports, in one place.

From transformers 5.24 `generate` hands the cache to ``forward`` as ``cache=`` (it was
``past_key_values=``, and ``cache_params=`` for Mamba-style models) and reads it back from the output
field ``cache``. MixCon's ``forward`` takes the cache under every one of those names
(`resolve_cache`), writes it into the output field that the installed version's ``generate`` reads
(`CACHE_FIELD`), and refuses keyword arguments it does not know (`check_kwargs`), so that the next
rename fails loudly instead of decoding without history.
"""

from __future__ import annotations

import inspect

from transformers import GenerationMixin
from transformers.modeling_outputs import MoeCausalLMOutputWithPast

# The output field that holds the cache ("cache" from 5.24, "past_key_values" before).
CACHE_FIELD = "cache" if "cache" in MoeCausalLMOutputWithPast.__dataclass_fields__ else "past_key_values"

# The name under which `generate` keeps the cache in its model kwargs and passes it to forward.
GENERATE_CACHE_KEY = ("cache" if "cache" in inspect.signature(GenerationMixin.prepare_inputs_for_generation).parameters
                      else "past_key_values")

CACHE_NAMES = ("cache", "past_key_values", "cache_params")

try:  # the keyword arguments transformers documents for forward (attention backends, losses, outputs)
    from transformers.utils.generic import TransformersKwargs

    _DOCUMENTED = set(getattr(TransformersKwargs, "__annotations__", {}))
except ImportError:  # pragma: no cover - every supported version has it
    _DOCUMENTED = set()
_DOCUMENTED |= {"num_items_in_batch", "output_hidden_states", "output_attentions", "output_router_logits",
                "cu_seq_lens_q", "cu_seq_lens_k", "max_length_q", "max_length_k", "is_causal", "seq_idx"}
# Passed by transformers itself on some 5.x releases and meaningless to MixCon (positions come from the
# attention mask and the cache's own length).
_IGNORED = {"cache_position"}
PASS_THROUGH = frozenset(_DOCUMENTED | _IGNORED)


def resolve_cache(cache=None, past_key_values=None, cache_params=None):
    """The one cache given under any of its names (None when none is). Two different objects under two
    names is an error: which one is meant cannot be known."""
    given = {name: c for name, c in zip(CACHE_NAMES, (cache, past_key_values, cache_params)) if c is not None}
    first = next(iter(given.values()), None)
    # `is`, not id(): under torch.compile an id() is a guard on the object's address, so every new
    # cache (every generate call) would recompile the decode step
    if any(c is not first for c in given.values()):
        raise ValueError(f"two different caches were passed ({', '.join(given)}); pass one, as `cache` (or "
                         "`past_key_values`)")
    return first


def check_kwargs(owner: str, kwargs: dict, allowed=PASS_THROUGH) -> None:
    """A TypeError naming the keyword arguments ``owner`` does not take (as a function without **kwargs
    would), except those transformers documents for every model's forward."""
    unknown = sorted(k for k in kwargs if k not in allowed)
    if unknown:
        names = ", ".join(repr(k) for k in unknown)
        raise TypeError(f"{owner}() got unexpected keyword argument{'s' if len(unknown) > 1 else ''} {names}")


def cache_kwargs(cache) -> dict:
    """``cache`` as the keyword argument a transformers model's forward takes on the installed version
    (``cache=`` from 5.24, ``past_key_values=`` before; MixCon takes both): for code that runs
    transformers' own models beside ours (the benchmarks' Mixtral)."""
    return {GENERATE_CACHE_KEY: cache}


def output_cache(output):
    """The cache a model or generate output holds, under whichever field name the installed
    transformers gives it (``cache`` from 5.24, ``past_key_values`` before)."""
    for name in ("cache", "past_key_values"):
        if name in getattr(output, "__dataclass_fields__", {}):
            return getattr(output, name)
    return None
