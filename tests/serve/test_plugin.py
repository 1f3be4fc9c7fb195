"""The vLLM plugin's packaging: mixcon never needs vLLM, the model module says what is missing, the
entry point names the plugin. Runs with or without vLLM installed."""

import importlib.util
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
HAS_VLLM = importlib.util.find_spec("vllm") is not None


def _run(code):
    env = dict(os.environ, PYTHONPATH=ROOT)
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, cwd=ROOT,
                          timeout=300)


def test_mixcon_imports_without_vllm():
    """In a fresh interpreter: `import mixcon` (and the plugin module) loads no vLLM module; without
    vLLM, the model module raises an ImportError that says how to install it (one subprocess: an
    import of transformers takes seconds here)."""
    r = _run("import sys, mixcon, mixcon.serve, mixcon.serve.plugin\n"
             "print(any(m == 'vllm' or m.startswith('vllm.') for m in sys.modules))\n"
             "try:\n"
             "    import mixcon.serve.vllm_model\n"
             "except ImportError as e:\n"
             "    print('ImportError:', e)\n")
    assert r.returncode == 0, r.stderr[-2000:]
    lines = r.stdout.strip().splitlines()
    assert lines[0] == "False"
    if not HAS_VLLM:
        assert lines[1].startswith("ImportError: mixcon's vLLM plugin needs vLLM, which is not installed")
        assert "tools/setup.sh vllm" in lines[1]


def test_entry_point_is_declared():
    import tomllib

    with open(os.path.join(ROOT, "pyproject.toml"), "rb") as f:
        project = tomllib.load(f)["project"]
    assert project["entry-points"]["vllm.general_plugins"] == {"mixcon": "mixcon.serve.plugin:register"}
    assert "vllm" in project["optional-dependencies"]
    from mixcon.serve import plugin

    module, cls = plugin.MODEL_CLASS.split(":")
    assert module == "mixcon.serve.vllm_model" and cls == plugin.ARCHITECTURE == "MixConForCausalLM"


@pytest.mark.skipif(not HAS_VLLM, reason="vLLM is not installed (bash tools/setup.sh vllm)")
def test_vllm_loads_the_plugin():
    """vLLM's own plugin loader finds the entry point and the architecture is then registered."""
    r = _run("from vllm.plugins import load_general_plugins; load_general_plugins(); "
             "from vllm import ModelRegistry; print('MixConForCausalLM' in ModelRegistry.get_supported_archs())")
    assert r.returncode == 0, r.stderr[-2000:]
    assert r.stdout.strip().splitlines()[-1] == "True"
