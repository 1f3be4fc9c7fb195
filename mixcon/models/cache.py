"""MixConCache: attention K/V (growing) beside Conba decode states (constant size).

A subclass of transformers' `Cache` whose ``layers`` list describes what each layer holds:

- an attention layer or a Mixture-of-Modules round: a `DynamicLayer` (keys/values);
- a Mixture-of-Depths-routed attention layer: a `RoutedAttentionLayer`, a `DynamicLayer` that also
  keeps the positions of the keys it cached (only the tokens the router selected);
- a Conba layer: a `ConbaLayer`, whose ``state`` dict holds {"conv": (b, d_inner, d_conv − 1),
  "ssm": ConbaState} once filled (no keys, values or sequence length: the state has a fixed size);
- a spatial (sparse all-MLP) layer: a `SpatialLayer`, whose ``state`` holds the normalised gate
  inputs and positions of every past token.

The layer types are this package's own (`CacheLayerMixin` subclasses) rather than transformers'
`LinearAttentionLayer`, whose interface differs across 5.x and which holds one tensor per state
where a Conba state is a tuple of them. ``conba_states`` / ``spatial_states`` / ``key_positions``
are views on the layers, kept for the model's code.
"""

from __future__ import annotations

import torch
from transformers.cache_utils import Cache, CacheLayerMixin, DynamicLayer


def _nbytes(x) -> int:
    return x.numel() * x.element_size() if isinstance(x, torch.Tensor) else 0


def _map(fn, x):
    """fn applied to every tensor in x (a tensor, a (named) tuple of them, or anything else, kept)."""
    if isinstance(x, torch.Tensor):
        return fn(x)
    if isinstance(x, tuple):
        items = [_map(fn, v) for v in x]
        return type(x)(*items) if hasattr(x, "_fields") else type(x)(items)
    return x


def _tensors(x):
    if isinstance(x, torch.Tensor):
        yield x
    elif isinstance(x, (tuple, list)):
        for v in x:
            yield from _tensors(v)
    elif isinstance(x, dict):
        for v in x.values():
            yield from _tensors(v)


class _StateLayer(CacheLayerMixin):
    """A layer that holds a state dict instead of keys/values; the model reads and writes ``state``."""

    is_compileable = False
    is_croppable = False
    kind = "state"

    def __init__(self):
        super().__init__()
        self.state: dict = {}

    def __repr__(self):
        return f"{type(self).__name__}({', '.join(self.state) or 'empty'})"

    def lazy_initialization(self, key_states=None, value_states=None) -> None:
        pass

    def update(self, key_states, value_states, *args, **kwargs):
        raise TypeError(f"a {type(self).__name__} holds a {self.kind} state, not attention keys/values")

    def get_seq_length(self) -> int:
        return 0

    def get_max_length(self) -> int:
        return -1

    def get_mask_sizes(self, query_length: int, *args, **kwargs) -> tuple[int, int]:
        return query_length, 0

    @property
    def is_initialized(self) -> bool:  # noqa: D401
        return bool(self.state)

    @is_initialized.setter
    def is_initialized(self, value) -> None:  # CacheLayerMixin.__init__ assigns it
        pass

    def map_(self, fn) -> None:
        for k in list(self.state):
            self.state[k] = _map(fn, self.state[k])

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        self.map_(lambda x: x.index_select(0, beam_idx.to(x.device)))

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        self.map_(lambda x: x[indices.to(x.device), ...])

    def batch_repeat_interleave(self, repeats: int) -> None:
        self.map_(lambda x: x.repeat_interleave(repeats, dim=0))

    def crop(self, max_length: int) -> None:
        raise NotImplementedError(f"a {self.kind} state cannot be rewound: it cannot be cropped")

    def reset(self) -> None:
        self.state.clear()

    def offload(self):
        pass

    def prefetch(self):
        pass

    def nbytes(self) -> int:
        return sum(_nbytes(x) for x in _tensors(self.state))


class ConbaLayer(_StateLayer):
    """A Conba layer's decode state: {"conv": rolling conv window, "ssm": ConbaState} (fixed size)."""

    kind = "Conba recurrent"


class SpatialLayer(_StateLayer):
    """A spatial (sparse all-MLP) layer's history: {"v": (b, n, width), "pos": (b, n), "route": (b, width)}."""

    kind = "spatial-mixer history"


class RoutedAttentionLayer(DynamicLayer):
    """K/V of a Mixture-of-Depths-routed attention layer, with ``key_positions`` (b, n): the positions
    of the cached keys, −1 where a slot holds no token (the row selected fewer tokens)."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.key_positions = None

    def _map_positions(self, fn):
        if self.key_positions is not None:
            self.key_positions = fn(self.key_positions)

    def reset(self) -> None:
        super().reset()
        self.key_positions = None


def _batch_size(layer):
    for x in _tensors(layer.state if isinstance(layer, _StateLayer) else [getattr(layer, "keys", None)]):
        return x.shape[0]
    return None


class _LayerView:
    """A list-like view of one attribute of the cache's layers (None for layers without it)."""

    def __init__(self, cache, attr, cls):
        self._cache, self._attr, self._cls = cache, attr, cls

    def __len__(self):
        return len(self._cache.layers)

    def __iter__(self):
        return (self[i] for i in range(len(self)))

    def __getitem__(self, i):
        layer = self._cache.layers[i]
        return getattr(layer, self._attr) if isinstance(layer, self._cls) else None

    def __setitem__(self, i, value):
        layer = self._cache.layers[i]
        if not isinstance(layer, self._cls):
            raise TypeError(f"layer {i} is a {type(layer).__name__}, it holds no {self._attr}")
        setattr(layer, self._attr, value)


def _make_layer(kind: str, mod: str):
    if kind == "conba":
        return ConbaLayer()
    if kind == "spatial":
        return SpatialLayer()
    return RoutedAttentionLayer() if mod == "layer" else DynamicLayer()


class MixConCache(Cache):
    is_compileable = False

    def __init__(self, config, **kwargs):
        self.layers_block_type = list(config.layers_block_type)
        mod = list(getattr(config, "layers_mod_type", None) or ["none"] * len(self.layers_block_type))
        super().__init__(layers=[_make_layer(k, m) for k, m in zip(self.layers_block_type, mod)])
        self.conba_states = _LayerView(self, "state", ConbaLayer)
        self.spatial_states = _LayerView(self, "state", SpatialLayer)
        self.key_positions = _LayerView(self, "key_positions", RoutedAttentionLayer)
        self._seen_tokens = 0  # also counts tokens for models without attention layers

    # ------------------------------------------------------------------ lengths
    def get_seq_length(self, layer_idx: int = 0) -> int:
        return self._seen_tokens

    def get_max_length(self, layer_idx=None) -> int:
        return -1

    def get_mask_sizes(self, query_length: int, layer_idx: int = 0, *args, **kwargs) -> tuple[int, int]:
        return self._seen_tokens + query_length, 0

    def has_previous_state(self, layer_idx=None, state_idx=None) -> bool:
        return self._seen_tokens > 0

    @property
    def batch_size(self):
        """The batch size of the states held, or None while the cache is empty."""
        for layer in self.layers:
            b = _batch_size(layer)
            if b is not None:
                return b
        return None

    # ------------------------------------------------------------------ batch ops
    def _attention_layers(self):
        for layer in self.layers:
            if isinstance(layer, DynamicLayer) and getattr(layer, "is_initialized", False) and layer.keys is not None:
                yield layer

    def _map_all(self, fn):
        for layer in self.layers:
            if isinstance(layer, _StateLayer):
                layer.map_(fn)
            elif isinstance(layer, RoutedAttentionLayer):
                layer._map_positions(fn)

    def reorder_cache(self, beam_idx: torch.LongTensor):
        for layer in self._attention_layers():
            idx = beam_idx.to(layer.keys.device)
            layer.keys, layer.values = layer.keys.index_select(0, idx), layer.values.index_select(0, idx)
        self._map_all(lambda x: x.index_select(0, beam_idx.to(x.device)))

    def batch_select_indices(self, indices: torch.Tensor):
        for layer in self._attention_layers():
            layer.keys, layer.values = layer.keys[indices, ...], layer.values[indices, ...]
        self._map_all(lambda x: x[indices.to(x.device), ...])

    def batch_repeat_interleave(self, repeats: int):
        for layer in self._attention_layers():
            layer.keys = layer.keys.repeat_interleave(repeats, dim=0)
            layer.values = layer.values.repeat_interleave(repeats, dim=0)
        self._map_all(lambda x: x.repeat_interleave(repeats, dim=0))

    def crop(self, tokens_to_remove: int):
        raise NotImplementedError(
            "MixConCache cannot be cropped: a Conba state cannot be rewound (assisted generation and "
            "cache cropping are not supported for recurrent layers)")

    def reset(self):
        for layer in self.layers:
            layer.reset()
        self._seen_tokens = 0

    # ------------------------------------------------------------------ size
    def nbytes(self) -> int:
        """Bytes held: attention K/V, Conba conv windows and states, spatial histories, MoD key positions."""
        total = self.attention_nbytes()
        for layer in self.layers:
            if isinstance(layer, _StateLayer):
                total += layer.nbytes()
            elif isinstance(layer, RoutedAttentionLayer):
                total += _nbytes(layer.key_positions)
        return total

    def attention_nbytes(self) -> int:
        return sum(_nbytes(layer.keys) + _nbytes(layer.values) for layer in self._attention_layers())
