from .cache import MixConCache
from .configuration_mixcon import MixConConfig, resolve_layout
from .modeling_mixcon import MixConForCausalLM, MixConModel, MixConPreTrainedModel

__all__ = ["MixConConfig", "MixConModel", "MixConForCausalLM", "MixConPreTrainedModel", "MixConCache", "resolve_layout"]
