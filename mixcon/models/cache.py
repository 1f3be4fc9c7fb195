"""MixConCache: attention K/V (growing) beside Conba decode states (constant size).

A subclass of transformers' `Cache` built from one `DynamicLayer` per layer (stable across
transformers 5.x); the Conba states live in this object's own fields so that `generate()`,
beam search and left-padded batches work without the hybrid-cache API that keeps changing.
"""

from __future__ import annotations

import torch
from transformers.cache_utils import Cache, DynamicLayer

from ..ops.conba import ConbaState


def _nbytes(x: torch.Tensor) -> int:
    return x.numel() * x.element_size()


class MixConCache(Cache):
    is_compileable = False

    def __init__(self, config, **kwargs):
        n = config.num_hidden_layers
        super().__init__(layers=[DynamicLayer() for _ in range(n)])
        self.layers_block_type = list(config.layers_block_type)
        self._init_states()

    def _init_states(self):
        # per Conba layer: {"conv": (b, d_inner, d_conv − 1), "ssm": ConbaState} once filled
        self.conba_states: list = [{} if kind == "conba" else None for kind in self.layers_block_type]
        # per spatial (sparse all-MLP) layer: {"v": (b, n, width) normalised gate inputs, "pos": (b, n)
        # their positions (−1 = padding), "route": (b, width) learned expert per feature, once decided}
        self.spatial_states: list = [{} if kind == "spatial" else None for kind in self.layers_block_type]
        # per Mixture-of-Depths-routed attention layer: (b, n) positions of the cached keys, −1 where a
        # slot holds no token (the row did not select one); its K/V hold only the selected tokens
        self.key_positions: list = [None] * len(self.layers_block_type)
        self._seen_tokens = 0  # also counts tokens for models without attention layers

    # ------------------------------------------------------------------ lengths
    def get_seq_length(self, layer_idx: int = 0) -> int:
        return self._seen_tokens

    def get_max_length(self, layer_idx=None) -> int:
        return -1

    def has_previous_state(self, layer_idx=None, state_idx=None) -> bool:
        return self._seen_tokens > 0

    # ------------------------------------------------------------------ batch ops
    def _attention_layers(self):
        for kind, layer in zip(self.layers_block_type, self.layers):
            if kind in ("attention", "mom") and getattr(layer, "is_initialized", False) and layer.keys is not None:
                yield layer

    def _map_states(self, fn):
        for st in self.conba_states:
            if st:
                st["conv"] = fn(st["conv"])
                st["ssm"] = ConbaState(*(fn(x) for x in st["ssm"]))
        for st in self.spatial_states:
            if st:
                for k in list(st):
                    st[k] = fn(st[k])
        self.key_positions = [fn(x) if x is not None else None for x in self.key_positions]

    def reorder_cache(self, beam_idx: torch.LongTensor):
        for layer in self._attention_layers():
            idx = beam_idx.to(layer.keys.device)
            layer.keys, layer.values = layer.keys.index_select(0, idx), layer.values.index_select(0, idx)
        self._map_states(lambda x: x.index_select(0, beam_idx.to(x.device)))

    def batch_select_indices(self, indices: torch.Tensor):
        for layer in self._attention_layers():
            layer.keys, layer.values = layer.keys[indices, ...], layer.values[indices, ...]
        self._map_states(lambda x: x[indices.to(x.device), ...])

    def batch_repeat_interleave(self, repeats: int):
        for layer in self._attention_layers():
            layer.keys = layer.keys.repeat_interleave(repeats, dim=0)
            layer.values = layer.values.repeat_interleave(repeats, dim=0)
        self._map_states(lambda x: x.repeat_interleave(repeats, dim=0))

    def crop(self, tokens_to_remove: int):
        raise NotImplementedError(
            "MixConCache cannot be cropped: a Conba state cannot be rewound (assisted generation and "
            "cache cropping are not supported for recurrent layers)")

    def reset(self):
        for layer in self.layers:
            layer.reset()
        self._init_states()

    # ------------------------------------------------------------------ size
    def nbytes(self) -> int:
        """Bytes held: attention K/V, Conba conv windows and states, spatial histories, MoD key positions."""
        total = self.attention_nbytes()
        for st in self.conba_states:
            if st:
                total += _nbytes(st["conv"]) + sum(_nbytes(x) for x in st["ssm"])
        for st in self.spatial_states:
            if st:
                total += sum(_nbytes(x) for x in st.values())
        return total + sum(_nbytes(x) for x in self.key_positions if x is not None)

    def attention_nbytes(self) -> int:
        return sum(_nbytes(layer.keys) + _nbytes(layer.values) for layer in self._attention_layers())
