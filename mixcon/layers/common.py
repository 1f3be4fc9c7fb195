"""What the layers and the model share: the initialisers on plain torch, the static-cache test."""

from __future__ import annotations

import torch
from torch import nn


class TorchInit:
    """The initialisers `_init_weights` and the layers' ``reset_parameters`` use, on plain torch: the
    stand-in for ``transformers.initialization`` (which also skips tensors loaded from a checkpoint)
    where that module is absent, and for a layer built outside a model."""

    normal_ = staticmethod(nn.init.normal_)
    kaiming_uniform_ = staticmethod(nn.init.kaiming_uniform_)
    uniform_ = staticmethod(nn.init.uniform_)
    constant_ = staticmethod(nn.init.constant_)
    ones_ = staticmethod(nn.init.ones_)
    zeros_ = staticmethod(nn.init.zeros_)

    @staticmethod
    def copy_(tensor, other):
        with torch.no_grad():
            return tensor.copy_(other)


def is_static_cache(cache) -> bool:
    """Whether ``cache`` is a static `MixConCache` (fixed-size tensors, a compiled decode step), read by
    its flag: mixcon.layers does not import mixcon.models, and transformers' caches have no
    ``is_static``."""
    return bool(getattr(cache, "is_static", False))
