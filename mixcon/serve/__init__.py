"""Serving MixCon with vLLM (docs/serving.md): an out-of-tree model plugin.

Nothing here imports vLLM at package import time: `plugin.register` is vLLM's entry point
(group ``vllm.general_plugins``) and registers ``MixConForCausalLM`` by name, so vLLM imports
`mixcon.serve.vllm_model` only when it builds the model. Install with ``pip install ".[vllm]"``
(or ``bash tools/setup.sh vllm``).
"""
