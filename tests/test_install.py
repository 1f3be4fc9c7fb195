"""A model saved by `mixcon train` loads in a new process, from another directory, in an environment where
this project was installed with plain `pip install <repository>` (not editable, not on the path), and its
tokenizer loads without any prompt (stdin closed: a prompt would fail)."""

import os
import shutil
import subprocess
import sys
import zipfile

import pytest

from helpers import ROOT

LOAD = """
import sys
import mixcon, torch
from transformers import AutoModelForCausalLM, AutoTokenizer
assert not mixcon.__file__.startswith(sys.argv[2]), mixcon.__file__  # the installed copy, not the checkout
tok = AutoTokenizer.from_pretrained(sys.argv[1])
model = AutoModelForCausalLM.from_pretrained(sys.argv[1]).eval()
ids = tok("def f(x):", return_tensors="pt").input_ids
print("ok", model.generate(ids, max_new_tokens=4, do_sample=False).shape[1] - ids.shape[1])
"""


def see_running_packages(py: str) -> None:
    """Let the venv at ``py`` import what the running interpreter can. ``venv --system-site-packages``
    exposes the base interpreter's packages only: run from inside a virtual environment (as the README's
    test command may be), the running venv's torch and transformers would be missing. A ``.pth`` file
    lists the running interpreter's site-packages as plain paths: their own ``.pth`` files (this
    checkout's editable install among them) are not processed, so the wheel's copy of mixcon is the one
    imported."""
    import site

    if sys.prefix == sys.base_prefix:
        return  # not in a venv: --system-site-packages already sees everything
    dirs = [d for d in site.getsitepackages() if os.path.isdir(d)]
    purelib = subprocess.run([py, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                             capture_output=True, text=True, check=True).stdout.strip()
    with open(os.path.join(purelib, "zz-running-interpreter.pth"), "w") as f:
        f.write("\n".join(dirs) + "\n")


@pytest.mark.slow
def test_saved_model_loads_after_pip_install_in_a_fresh_venv(tmp_path):
    from mixcon import MixConForCausalLM
    from mixcon.resources import load_config
    from mixcon.train.tokenizer import train_tokenizer
    import glob
    import sysconfig

    files = sorted(glob.glob(os.path.join(sysconfig.get_paths()["stdlib"], "*.py")))[:5]
    train_tokenizer(files, str(tmp_path / "tok"), vocab_size=500, input_sentence_size=20_000)
    from transformers import AutoTokenizer

    MixConForCausalLM(load_config("tiny", vocab_size=500)).save_pretrained(tmp_path / "model")
    AutoTokenizer.from_pretrained(tmp_path / "tok").save_pretrained(tmp_path / "model")
    # the venv sees the system's torch and transformers (not reinstalled); this project goes in as a wheel
    subprocess.run([sys.executable, "-m", "venv", "--system-site-packages", str(tmp_path / "venv")], check=True)
    py = str(tmp_path / "venv" / "bin" / "python")
    see_running_packages(py)
    src = tmp_path / "src"  # a copy, so the build leaves nothing in the checkout
    shutil.copytree(ROOT, src, ignore=shutil.ignore_patterns(".git", "runs", "build", "*.egg-info", "__pycache__",
                                                             "eval", "tests"), symlinks=True)
    # the wheel is built by this interpreter's setuptools (the venv's own may predate bdist_wheel), offline
    res = subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", "--no-index",
                          "-w", str(tmp_path / "wheel"), str(src)], capture_output=True, text=True, cwd=tmp_path)
    assert res.returncode == 0, res.stderr[-3000:]
    wheel = next((tmp_path / "wheel").glob("mixcon-*.whl"))
    shipped = set(zipfile.ZipFile(wheel).namelist())  # the CPU kernels' sources, built at first use
    csrc = os.path.join(ROOT, "mixcon", "ops", "cpu", "csrc")
    assert {f"mixcon/ops/cpu/csrc/{f}" for f in os.listdir(csrc)} <= shipped
    res = subprocess.run([py, "-m", "pip", "install", "-q", "--no-deps", "--no-index", str(wheel)],
                         capture_output=True, text=True, cwd=tmp_path)
    assert res.returncode == 0, res.stderr[-3000:]
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    work = tmp_path / "elsewhere"
    work.mkdir()
    res = subprocess.run([py, "-c", LOAD, str(tmp_path / "model"), ROOT], capture_output=True, text=True, cwd=work,
                         env=env, stdin=subprocess.DEVNULL, timeout=300)
    assert res.returncode == 0 and "ok 4" in res.stdout, (res.stdout[-1000:], res.stderr[-3000:])
    assert "trust_remote_code" not in res.stderr and "[y/N]" not in res.stdout + res.stderr
    res = subprocess.run([str(tmp_path / "venv" / "bin" / "mixcon"), "layout", "mixcon-1b"], capture_output=True,
                         text=True, cwd=work, env=env)
    assert res.returncode == 0 and "block 3" in res.stdout, res.stderr[-2000:]  # package data in the wheel
