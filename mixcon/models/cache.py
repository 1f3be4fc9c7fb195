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

**Static mode** (``MixConCache(config, max_cache_len=..., batch_size=...)``, what
``generate(..., cache_implementation="static")`` builds): every buffer is allocated once, at the first
write, for (batch, max_cache_len) and then written in place, so that a decode step has fixed shapes and
fixed addresses (``is_compileable = True``: transformers compiles the decode step and captures it in a
CUDA graph). The number of tokens seen is a 0-dim device tensor (``cache.length``), advanced in place
by the model; nothing reads it back to the host while decoding. Per layer kind:

- attention / MoM round: `StaticAttentionLayer`, K/V (b, KV, max_cache_len, hd), slots ≥ length unused
  (the model's mask hides them, and per-row left padding);
- Mixture-of-Depths attention: `StaticRoutedAttentionLayer`, the same plus ``key_positions``
  (b, max_cache_len), −1 for slots of tokens the router did not select (every token's K/V is written;
  the unselected ones are masked out, which keeps the shapes fixed);
- Conba: `StaticConbaLayer`, the conv window and ConbaState (h, delay line, k, e, phase), fixed-size
  anyway, copied into the same tensors after a prefill chunk and updated in place by the decode step;
- spatial: `StaticSpatialLayer`, the gate inputs (b, max_cache_len, width) and positions (b,
  max_cache_len), −1 where empty.
"""

from __future__ import annotations

import torch
from transformers.cache_utils import Cache, CacheLayerMixin, DynamicCache, DynamicLayer, StaticCache


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


def _mark_static(*tensors) -> None:
    """Tag buffers as fixed addresses for torch.compile / CUDA graphs (skipped while tracing)."""
    if torch.compiler.is_compiling():
        return
    for t in tensors:
        if isinstance(t, torch.Tensor):
            torch._dynamo.mark_static_address(t)


def _copy_into(dst, src):
    """src's values written into dst's tensors (same structure), in place; dst is returned."""
    for d, s in zip(_tensors(dst), _tensors(src)):
        if d is not s:
            d.copy_(s)
    return dst


class _Counter:
    """The number of tokens a static cache has seen: a 0-dim long tensor shared by its layers.

    ``window``: during an eager forward (prefill), the slots in use after it (a host int the model
    sets and clears): the layers then return only those slots, so a long prefill attends over
    past + T keys rather than max_cache_len (None under torch.compile: fixed shapes)."""

    def __init__(self, device=None):
        self.value = torch.zeros((), dtype=torch.long, device=device)
        self.window = None
        _mark_static(self.value)

    def view(self, x: torch.Tensor, dim: int) -> torch.Tensor:
        return x if self.window is None else x.narrow(dim, 0, self.window)

    def to_(self, device) -> None:
        if self.value.device != torch.device(device):
            self.value = self.value.to(device)
            _mark_static(self.value)


class StaticAttentionLayer(CacheLayerMixin):
    """K/V buffers (b, KV, max_cache_len, hd), allocated at the first write and written in place at
    slots length … length + T − 1 (the cache's token count, a device tensor). ``update`` returns the
    whole buffers: the model's mask hides the slots not written yet."""

    is_compileable = True
    is_sliding = False

    def __init__(self, max_cache_len: int, counter: _Counter):
        super().__init__()
        self.max_cache_len = max_cache_len
        self._counter = counter

    def lazy_initialization(self, key_states, value_states) -> None:
        b, kv, _, hd = key_states.shape
        self.dtype, self.device = key_states.dtype, key_states.device
        self.keys = torch.zeros(b, kv, self.max_cache_len, hd, dtype=key_states.dtype, device=key_states.device)
        self.values = torch.zeros(b, kv, self.max_cache_len, value_states.shape[-1], dtype=value_states.dtype,
                                  device=value_states.device)
        _mark_static(self.keys, self.values)
        self.is_initialized = True

    def _slots(self, T: int, device):
        return self._counter.value.to(device) + torch.arange(T, device=device)

    def update(self, key_states, value_states, *args, **kwargs):
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        idx = self._slots(key_states.shape[-2], self.keys.device)
        self.keys.index_copy_(2, idx, key_states.to(self.keys.dtype))
        self.values.index_copy_(2, idx, value_states.to(self.values.dtype))
        return self._counter.view(self.keys, 2), self._counter.view(self.values, 2)

    def get_seq_length(self) -> int:
        return self._counter.value if self.is_initialized else 0

    def get_max_length(self) -> int:
        return self.max_cache_len

    def get_mask_sizes(self, query_length: int, *args, **kwargs) -> tuple[int, int]:
        return self.max_cache_len, 0

    def map_(self, fn) -> None:
        """fn (a batch gather) applied in place: the buffers keep their addresses."""
        if self.is_initialized:
            self.keys.copy_(fn(self.keys))
            self.values.copy_(fn(self.values))

    def reorder_cache(self, beam_idx) -> None:
        self.map_(lambda x: x.index_select(0, beam_idx.to(x.device)))

    def reset(self) -> None:
        if self.is_initialized:
            self.keys.zero_()
            self.values.zero_()


class StaticRoutedAttentionLayer(StaticAttentionLayer):
    """A Mixture-of-Depths attention layer's static K/V and ``key_positions`` (b, max_cache_len): the
    position of the token in each slot, −1 where the router did not select it (or nothing is written)."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.key_positions = None

    def write_positions(self, qpos: torch.Tensor) -> torch.Tensor:
        """qpos (b, T) (−1 = not selected) written at this step's slots → every slot's position (b, max_cache_len)."""
        if self.key_positions is None:
            self.key_positions = torch.full((qpos.shape[0], self.max_cache_len), -1, dtype=torch.long,
                                            device=qpos.device)
            _mark_static(self.key_positions)
        self.key_positions.index_copy_(1, self._slots(qpos.shape[1], qpos.device), qpos.long())
        return self._counter.view(self.key_positions, 1)

    def map_(self, fn) -> None:
        super().map_(fn)
        if self.key_positions is not None:
            self.key_positions.copy_(fn(self.key_positions))

    def reset(self) -> None:
        super().reset()
        if self.key_positions is not None:
            self.key_positions.fill_(-1)


class _StaticStateMixin:
    """A state layer whose tensors, once allocated, keep their addresses: a new state (after a prefill
    chunk) is copied into them, batch reorders are done in place."""

    is_compileable = True

    def store(self, new: dict) -> None:
        """new: the state dict the mixer returned (the same tensors after a decode step)."""
        if not self.state:
            self.state.update(new)
            _mark_static(*_tensors(self.state))
            return
        for k, v in new.items():
            _copy_into(self.state[k], v)

    def map_(self, fn) -> None:
        for x in _tensors(self.state):
            x.copy_(fn(x))

    def reset(self) -> None:
        for x in _tensors(self.state):
            x.zero_()
        self._reset_extra()

    def _reset_extra(self) -> None:
        pass


class StaticConbaLayer(_StaticStateMixin, ConbaLayer):
    """A Conba layer's state in a static cache (fixed size; kept at the same addresses).

    ``reset`` cannot restore k = k0 without the model: the cache is reset by the model
    (`MixConCache.reset` drops and re-creates Conba states at the next prefill instead)."""

    def reset(self) -> None:
        self.state.clear()  # re-allocated (k = k0) at the next prefill: k0 is the model's parameter


class StaticSpatialLayer(SpatialLayer):
    """A spatial layer's history in a static cache: {"v": (b, max_cache_len, width), "pos": (b,
    max_cache_len)}, −1 positions where empty; ``append`` writes this chunk at the cache's slots."""

    is_compileable = True

    def __init__(self, max_cache_len: int, counter: _Counter):
        super().__init__()
        self.max_cache_len = max_cache_len
        self._counter = counter

    def append(self, v: torch.Tensor, positions: torch.Tensor):
        """v (b, T, width), positions (b, T) → (every slot's v (b, max_cache_len, width), positions)."""
        b, T, W = v.shape
        if not self.state:
            self.state["v"] = torch.zeros(b, self.max_cache_len, W, dtype=v.dtype, device=v.device)
            self.state["pos"] = torch.full((b, self.max_cache_len), -1, dtype=torch.long, device=v.device)
            _mark_static(self.state["v"], self.state["pos"])
        idx = self._counter.value.to(v.device) + torch.arange(T, device=v.device)
        self.state["v"].index_copy_(1, idx, v.to(self.state["v"].dtype))
        self.state["pos"].index_copy_(1, idx, positions.long())
        return self._counter.view(self.state["v"], 1), self._counter.view(self.state["pos"], 1)

    def map_(self, fn) -> None:
        for x in _tensors(self.state):
            x.copy_(fn(x))

    def reset(self) -> None:
        if self.state:
            self.state["v"].zero_()
            self.state["pos"].fill_(-1)


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


def _make_layer(kind: str, mod: str, max_cache_len=None, counter=None):
    if max_cache_len is not None:
        if kind == "conba":
            return StaticConbaLayer()
        if kind == "spatial":
            return StaticSpatialLayer(max_cache_len, counter)
        cls = StaticRoutedAttentionLayer if mod == "layer" else StaticAttentionLayer
        return cls(max_cache_len, counter)
    if kind == "conba":
        return ConbaLayer()
    if kind == "spatial":
        return SpatialLayer()
    return RoutedAttentionLayer() if mod == "layer" else DynamicLayer()


class MixConCache(Cache):
    """The model's cache. ``MixConCache(config)``: dynamic (K/V and spatial histories grow), a
    `MixConDynamicCache`. ``MixConCache(config, max_cache_len=n, batch_size=b)``: static (see the module
    docstring), the mode ``generate(..., cache_implementation="static")`` builds, a `MixConStaticCache`;
    ``device`` places its token counter (it follows the first input otherwise). Both are MixConCaches,
    and the first is a transformers `DynamicCache`, the second a `StaticCache`, as code that tells
    caches apart by type (transformers' generation tests among it) expects."""

    def __new__(cls, config=None, max_cache_len=None, *args, **kwargs):
        if cls is MixConCache:  # the mode picks the class
            cls = MixConDynamicCache if max_cache_len is None else MixConStaticCache
        return super().__new__(cls)

    def __init__(self, config, max_cache_len: int | None = None, batch_size: int | None = None, device=None,
                 **kwargs):
        self.layers_block_type = list(config.layers_block_type)
        mod = list(getattr(config, "layers_mod_type", None) or ["none"] * len(self.layers_block_type))
        self.is_static = max_cache_len is not None
        self._max_cache_len = max_cache_len
        self._static_batch = batch_size
        self._counter = None
        if self.is_static:
            if isinstance(max_cache_len, bool) or not isinstance(max_cache_len, int) or max_cache_len < 1:
                raise ValueError(f"max_cache_len={max_cache_len!r} must be a positive int (tokens the static cache holds)")
            if batch_size is not None and (isinstance(batch_size, bool) or not isinstance(batch_size, int)
                                           or batch_size < 1):
                raise ValueError(f"batch_size={batch_size!r} must be a positive int or None")
            spatial_max = getattr(config, "spatial_max_len", None)
            if "spatial" in self.layers_block_type and spatial_max is not None and max_cache_len > spatial_max:
                raise ValueError(
                    f"a static cache of max_cache_len={max_cache_len} tokens exceeds spatial_max_len={spatial_max}: "
                    "the spatial gating units mix at most spatial_max_len tokens (generate fewer tokens, or build "
                    "the model with a larger spatial_max_len)")
            self._counter = _Counter(device)
        # Cache's own constructor (DynamicCache's and StaticCache's build transformers' layer types)
        Cache.__init__(self, layers=[_make_layer(k, m, max_cache_len, self._counter)
                                 for k, m in zip(self.layers_block_type, mod)])
        self._seen_tokens = 0  # also counts tokens for models without attention layers (dynamic mode)

    @property
    def max_cache_len(self):
        """Static mode: the tokens the cache holds; None in dynamic mode. (A property of our own: some
        transformers 5.x releases define a read-only, deprecated one on `Cache`.)"""
        return self._max_cache_len

    # views made on access, not kept: the cache holds no reference to itself (code that walks an output's
    # attributes, as transformers' exporters do, would never end)
    @property
    def conba_states(self) -> _LayerView:
        return _LayerView(self, "state", ConbaLayer)

    @property
    def spatial_states(self) -> _LayerView:
        return _LayerView(self, "state", SpatialLayer)

    @property
    def key_positions(self) -> _LayerView:
        return _LayerView(self, "key_positions", (RoutedAttentionLayer, StaticRoutedAttentionLayer))

    @property
    def is_compileable(self) -> bool:  # noqa: D401 - transformers reads it as an attribute
        """True in static mode: generate() then compiles the decode step."""
        return self.is_static

    @property
    def length(self):
        """Static mode: the tokens seen, a 0-dim long tensor on the device (no host sync)."""
        return self._counter.value if self.is_static else self._seen_tokens

    def _advance(self, T: int, device) -> None:
        """After a forward over T tokens: count them (in place on the device in static mode)."""
        if self.is_static:
            self._counter.value.add_(T)
        else:
            self._seen_tokens += T

    # ------------------------------------------------------------------ lengths
    def get_seq_length(self, layer_idx: int = 0) -> int:
        """Tokens seen. Static mode: read back from the device (a host sync; the model itself never
        calls it while decoding)."""
        if self.is_static:
            return int(self._counter.value)
        return self._seen_tokens

    def get_max_length(self, layer_idx=None) -> int:
        return self.max_cache_len if self.is_static else -1

    def get_mask_sizes(self, query_length: int, layer_idx: int = 0, *args, **kwargs) -> tuple[int, int]:
        if self.is_static:
            return self.max_cache_len, 0
        return self._seen_tokens + query_length, 0

    def has_previous_state(self, layer_idx=None, state_idx=None) -> bool:
        return self.get_seq_length() > 0

    @property
    def batch_size(self):
        """The batch size of the states held (static mode: the one it was built for), or None while
        the cache is empty."""
        if self.is_static and self._static_batch is not None:
            return self._static_batch
        for layer in self.layers:
            b = _batch_size(layer)
            if b is not None:
                return b
        return None

    # ------------------------------------------------------------------ batch ops
    def _attention_layers(self):
        for layer in self.layers:
            if isinstance(layer, (DynamicLayer, StaticAttentionLayer)) and getattr(layer, "is_initialized", False) \
                    and layer.keys is not None:
                yield layer

    def _allocated(self) -> bool:
        """Whether any layer holds tensors yet (a static cache allocates at its first forward)."""
        return any(True for _ in self._attention_layers()) or any(
            getattr(layer, "state", None) for layer in self.layers)

    def _static_op(self, fn) -> bool:
        """Static mode: fn (a batch gather keeping the batch size) applied in place to every buffer."""
        if not self.is_static:
            return False
        for layer in self.layers:
            layer.map_(fn)
        return True

    def _map_all(self, fn):
        for layer in self.layers:
            if isinstance(layer, _StateLayer):
                layer.map_(fn)
            elif isinstance(layer, RoutedAttentionLayer):
                layer._map_positions(fn)

    def reorder_cache(self, beam_idx: torch.LongTensor):
        if self._static_op(lambda x: x.index_select(0, beam_idx.to(x.device))):
            return
        for layer in self._attention_layers():
            idx = beam_idx.to(layer.keys.device)
            layer.keys, layer.values = layer.keys.index_select(0, idx), layer.values.index_select(0, idx)
        self._map_all(lambda x: x.index_select(0, beam_idx.to(x.device)))

    def batch_select_indices(self, indices: torch.Tensor):
        if self.is_static:
            if not self._allocated():
                return  # nothing allocated yet
            raise NotImplementedError("a static MixConCache keeps its batch size: it cannot select a sub-batch")
        for layer in self._attention_layers():
            layer.keys, layer.values = layer.keys[indices, ...], layer.values[indices, ...]
        self._map_all(lambda x: x[indices.to(x.device), ...])

    def batch_repeat_interleave(self, repeats: int):
        if self.is_static:
            if not self._allocated():
                return  # allocated at the first forward, for the expanded batch it was built for
            raise NotImplementedError("a static MixConCache keeps its batch size: build it for the expanded batch")
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
        if self.is_static:
            self._counter.value.zero_()

    # ------------------------------------------------------------------ size
    def nbytes(self) -> int:
        """Bytes held: attention K/V, Conba conv windows and states, spatial histories, MoD key positions."""
        total = self.attention_nbytes()
        for layer in self.layers:
            if isinstance(layer, _StateLayer):
                total += layer.nbytes()
            elif isinstance(layer, (RoutedAttentionLayer, StaticRoutedAttentionLayer)):
                total += _nbytes(layer.key_positions)
        return total

    def attention_nbytes(self) -> int:
        return sum(_nbytes(layer.keys) + _nbytes(layer.values) for layer in self._attention_layers())


class MixConDynamicCache(MixConCache, DynamicCache):
    """A dynamic `MixConCache` (what ``MixConCache(config)`` returns): also a transformers `DynamicCache`
    (iterating it yields (keys, values, None) per layer: None, None for a Conba or spatial layer)."""


class MixConStaticCache(MixConCache, StaticCache):
    """A static `MixConCache` (what ``MixConCache(config, max_cache_len=n)`` returns): also a transformers
    `StaticCache`."""
