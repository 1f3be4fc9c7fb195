"""mixcon: the MixCon family of hybrid language models (attention + Conba + MoE) for transformers.

Importing registers the classes with AutoConfig / AutoModel / AutoModelForCausalLM.
"""

from transformers import AutoConfig, AutoModel, AutoModelForCausalLM

from .models import MixConCache, MixConConfig, MixConForCausalLM, MixConModel, resolve_layout

__version__ = "0.1.0"
__all__ = ["MixConConfig", "MixConModel", "MixConForCausalLM", "MixConCache", "resolve_layout"]

AutoConfig.register("mixcon", MixConConfig, exist_ok=True)
AutoModel.register(MixConConfig, MixConModel, exist_ok=True)
AutoModelForCausalLM.register(MixConConfig, MixConForCausalLM, exist_ok=True)
# save_pretrained copies the configuration/modeling files and writes auto_map, so a process that
# never imported mixcon can load the checkpoint with trust_remote_code=True.
MixConConfig.register_for_auto_class()
MixConModel.register_for_auto_class("AutoModel")
MixConForCausalLM.register_for_auto_class("AutoModelForCausalLM")
