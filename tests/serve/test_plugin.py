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


def test_import_mixcon_does_not_import_vllm():
    r = _run("import sys, mixcon, mixcon.serve, mixcon.serve.plugin; "
             "print(any(m == 'vllm' or m.startswith('vllm.') for m in sys.modules))")
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "False"


@pytest.mark.skipif(HAS_VLLM, reason="vLLM is installed: the message for its absence cannot be seen")
def test_model_module_without_vllm_says_how_to_install():
    r = _run("import mixcon.serve.vllm_model")
    assert r.returncode != 0
    assert "ImportError: mixcon's vLLM plugin needs vLLM, which is not installed" in r.stderr
    assert "tools/setup.sh vllm" in r.stderr


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
