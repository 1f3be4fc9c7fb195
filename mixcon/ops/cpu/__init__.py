"""The compiled CPU kernels: one C++ extension built from ``csrc/`` at first use with
torch.utils.cpp_extension, and the checks of when a compiled call may replace PyTorch.

`kernels()` returns the built module, or None where it cannot be built (no C++ compiler or ninja,
``MIXCON_CPU_KERNELS=0``, a failed build: then a warning): callers then run their pure-PyTorch path,
which gives the same results. `pip install` needs no compiler; the build happens once per machine and
source version and is cached (`build_directory`: under TORCH_EXTENSIONS_DIR, default
~/.cache/torch_extensions, a folder per Python and torch version), under a name that carries a digest
of every source, header and flag, so two checkouts never rebuild each other's.
A build killed part-way (SIGKILL, a machine taken away) leaves torch's lock file behind, on which every
later build would wait forever: a lock older than `STALE_LOCK_S` is removed, with a warning.

``csrc/`` by job (common.h lists them): the training noise, the Conba block scan forward and backward,
the decode step, a whole Conba layer's decode token, and general kernels (gemv, the few-row linear,
the prefill's causal conv). Conba's wrappers are mixcon/ops/conba/cpu.py, the conv's and linear's
mixcon/ops/conv.py and linear.py. What runs compiled and what it measured: docs/kernels.md,
"Compiled on CPU".

A user of the module may check it once when it is loaded (`after_load`): Conba's layer decode checks
that the kernel reads the weights it is given in the order the layer hands them over.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import sys
import threading
import time
import warnings
from typing import Callable

import torch

from .. import tracing

__all__ = ["kernels", "built", "after_load", "applies", "empty", "SOURCES", "HEADERS"]

CSRC = os.path.join(os.path.dirname(os.path.abspath(__file__)), "csrc")
SOURCES = ("noise.cpp", "scan_fwd.cpp", "scan_bwd.cpp", "step.cpp", "layer_decode.cpp", "dense.cpp", "bindings.cpp")
HEADERS = ("common.h", "noise.h", "scan.h")

STALE_LOCK_S = 600.0  # a build takes about a minute on 2 cores: a lock this old outlived a killed build

_lock = threading.RLock()
_module = None
_tried = False
_error: Exception | None = None  # a failed load check: raised again by every kernels() call
_checks: list[Callable] = []


def _flags() -> list[str]:
    # OpenMP where torch runs on it, so that at::parallel_for splits the tasks over torch's threads (the
    # module then uses the libgomp torch has already loaded); without it the kernels run on one thread
    omp = ["-fopenmp"] if "OpenMP" in torch.__config__.parallel_info() else []
    cap = torch.backends.cpu.get_cpu_capability()
    if cap in ("AVX2", "AVX512"):  # ATen's 256-bit vectors (and Sleef's exp) exported by libtorch_cpu
        return ["-O3", "-mavx2", "-mfma", "-DCPU_CAPABILITY=AVX2", "-DCPU_CAPABILITY_AVX2", *omp]
    return ["-O3", *omp]  # ATen's portable vectors: correct everywhere, slower


def _digest(flags: list[str]) -> str:
    """A digest of every source and header (name and bytes) and the flags: the build's name."""
    h = hashlib.sha1()
    for name in SOURCES + HEADERS:
        with open(os.path.join(CSRC, name), "rb") as f:
            h.update(name.encode() + b"\0" + f.read() + b"\0")
    h.update(" ".join(flags).encode())
    return h.hexdigest()[:10]


def build_directory(name: str) -> str:
    """Where extension ``name`` is built and cached: under TORCH_EXTENSIONS_DIR (else torch's default
    root), a folder per Python and torch version (a module built against another libtorch must not be
    loaded), then ``name``. Made here, not by torch, so that its lock can be read."""
    from torch.utils.cpp_extension import get_default_build_root

    root = os.environ.get("TORCH_EXTENSIONS_DIR") or get_default_build_root()
    python = f"py{sys.version_info.major}{sys.version_info.minor}{getattr(sys, 'abiflags', '')}"
    return os.path.join(root, f"{python}-torch{torch.__version__}", name)


def clear_stale_lock(build_dir: str, stale_s: float = STALE_LOCK_S, poll_s: float = 0.5) -> bool:
    """Wait while ``build_dir``'s build lock is younger than ``stale_s`` (another process is building);
    remove it, with a warning naming it, once it is older (its build was killed: torch would wait on it
    forever). Returns whether a lock was removed."""
    lock = os.path.join(build_dir, "lock")
    while True:
        try:
            age = time.time() - os.path.getmtime(lock)
        except FileNotFoundError:
            return False
        if age >= stale_s:
            warnings.warn(f"mixcon: removing the build lock {lock}, {age / 60:.0f} minutes old: a build of the CPU "
                          f"kernels was killed part-way and left it (a build takes about a minute)")
            try:
                os.remove(lock)
            except FileNotFoundError:
                pass
            return True
        time.sleep(min(poll_s, stale_s - age))


def _run_checks(checks) -> None:
    global _error
    for check in checks:
        try:
            check(_module)
        except Exception as exc:
            _error = exc
            raise


def kernels():
    """The compiled module, or None (then use the PyTorch path). Raises where a load check failed
    (`after_load`): the Python side and the compiled code disagree, which no fallback should hide."""
    global _module, _tried
    if _tried:
        if _error is not None:
            raise _error
        return _module
    with _lock:
        if _tried:
            return kernels()
        _tried = True
        if os.environ.get("MIXCON_CPU_KERNELS", "1") == "0":
            return None
        if shutil.which(os.environ.get("CXX", "c++")) is None or shutil.which("ninja") is None:
            return None
        try:
            from torch.utils.cpp_extension import load

            flags = _flags()
            name = "mixcon_cpu_" + ("avx2" if "-mavx2" in flags else "base") + "_" + _digest(flags)
            build_dir = build_directory(name)
            os.makedirs(build_dir, exist_ok=True)
            clear_stale_lock(build_dir)
            _module = load(name=name, sources=[os.path.join(CSRC, s) for s in SOURCES], extra_cflags=flags,
                           extra_ldflags=["-fopenmp"] if "-fopenmp" in flags else [], build_directory=build_dir,
                           verbose=False)
        except Exception as exc:  # noqa: BLE001 — any build failure means: use the PyTorch path
            warnings.warn(f"mixcon: the compiled CPU kernels could not be built ({type(exc).__name__}: "
                          f"{str(exc)[:200]}); using the pure-PyTorch path (same results, slower). "
                          f"Set MIXCON_CPU_KERNELS=0 to skip the attempt.")
            _module = None
        if _module is not None:
            _run_checks(list(_checks))
    return _module


def built() -> bool:
    """Whether the kernels are built and loaded (never builds them: safe to call under a trace)."""
    return _module is not None and _error is None


def after_load(check: Callable) -> Callable:
    """Register ``check(module)``, run once when the module is loaded (at once where it already is); an
    exception it raises is the load's error (`kernels` raises it). Returns ``check``."""
    with _lock:
        _checks.append(check)
        if _module is not None and _error is None:
            _run_checks([check])
    return check


def applies(*tensors) -> bool:
    """Whether a compiled call may replace PyTorch for these tensors (None ones skipped): on CPU, one
    dtype of float32/float64 throughout, no gradient wanted, not under a trace, the kernels built."""
    ts = [t for t in tensors if t is not None]
    dtype = ts[0].dtype
    if ts[0].device.type != "cpu" or dtype not in (torch.float32, torch.float64) or any(t.dtype != dtype for t in ts):
        return False
    if (torch.is_grad_enabled() and any(t.requires_grad for t in ts)) or tracing():
        return False
    return kernels() is not None


_EMPTY: dict = {}


def empty(dtype) -> torch.Tensor:
    """The placeholder the kernels take for an absent tensor (one per dtype, never written)."""
    e = _EMPTY.get(dtype)
    if e is None:
        e = _EMPTY[dtype] = torch.empty(0, dtype=dtype)
    return e
