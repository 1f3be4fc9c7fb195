"""Shared pieces of the benchmarks in tools/ and eval/: the run header (git revision, device,
versions), a median timer with CUDA events, and the device's copy bandwidth measured in-process."""

from __future__ import annotations

import os
import subprocess
import sys
import time

import torch


def git_rev() -> str:
    try:
        return subprocess.check_output(["git", "rev-parse", "--short", "HEAD"], text=True,
                                       cwd=os.path.dirname(os.path.abspath(__file__))).strip()
    except Exception:
        return "unknown"


def portable_path(path) -> str:
    """A path as results files may hold it: relative to the working directory when under it, a shipped
    config by its name, otherwise the file name alone (never an absolute path)."""
    path = str(path)
    if not os.path.isabs(path):
        return path
    here = os.getcwd()
    configs = os.path.join(os.path.dirname(os.path.abspath(__file__)), "configs")
    if os.path.dirname(path) == configs:
        return os.path.splitext(os.path.basename(path))[0]
    if path.startswith(here + os.sep):
        return os.path.relpath(path, here)
    return os.path.basename(path)


def portable_command(argv=None) -> str:
    """The command line with the program as its name (``mixcon``) and no absolute paths."""
    argv = list(sys.argv if argv is None else argv)
    if argv:
        argv[0] = "mixcon" if os.path.basename(argv[0]) in ("mixcon", "__main__.py", "cli.py") else \
            portable_path(argv[0])
    return " ".join(portable_path(a) if os.path.isabs(a) else a for a in argv)


def header(device, **extra) -> dict:
    """Git revision, date, device and library versions, plus ``extra`` (dtype, shapes, ...)."""
    import transformers

    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = None
    return dict(rev=git_rev(), date=time.strftime("%Y-%m-%d %H:%M"),
                device=torch.cuda.get_device_name() if device.type == "cuda" else "cpu",
                torch=torch.__version__, triton=triton_version, transformers=transformers.__version__,
                cuda=torch.version.cuda, **extra, command=portable_command())


def timeit(fn, device, warmup=3, reps=10) -> float:
    """Median seconds per call."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(reps):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            torch.cuda.synchronize()
            times.append(start.elapsed_time(end) / 1e3)
        else:
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
    times.sort()
    return times[len(times) // 2]


def copy_bandwidth(device, nbytes=2 << 30) -> float:
    """Bytes per second of a device-to-device copy (read + write counted)."""
    n = nbytes // 4 if device.type == "cuda" else (64 << 20) // 4
    src = torch.empty(n, device=device, dtype=torch.float32)
    dst = torch.empty_like(src)
    t = timeit(lambda: dst.copy_(src), device)
    return 2 * n * 4 / t


def print_row(row: dict, cols) -> None:
    """One tab-separated table row (floats to 4 significant digits, blanks for missing)."""
    print("\t".join(f"{row[c]:.4g}" if isinstance(row.get(c), float) else str(row.get(c, "")) for c in cols),
          flush=True)


def save_results(out_dir: str, rows, cols, meta: dict, **extra) -> None:
    """results.csv (the table) and results.json (the header, ``extra`` and the rows) in ``out_dir``, each
    through a temporary file and a rename."""
    import csv
    import json

    os.makedirs(out_dir, exist_ok=True)
    path = os.path.join(out_dir, "results.csv")
    with open(path + ".tmp", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=cols, extrasaction="ignore")
        w.writeheader()
        w.writerows(rows)
    os.replace(path + ".tmp", path)
    path = os.path.join(out_dir, "results.json")
    with open(path + ".tmp", "w") as f:
        json.dump(dict(meta=meta, **extra, rows=rows), f, indent=1)
    os.replace(path + ".tmp", path)


def parse_run_args(ap, argv, smoke_help: str):
    """Add the options every benchmark shares (--dtype, --out, --smoke), parse, and return
    (args, device, dtype); ``args.dtype`` becomes the torch dtype."""
    ap.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    ap.add_argument("--out", default=None, help="folder for the results (CSV, JSON, plot)")
    ap.add_argument("--smoke", action="store_true", help=smoke_help)
    args = ap.parse_args(argv)
    args.dtype = getattr(torch, args.dtype)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return args, device, args.dtype


def count_flops(fn) -> dict:
    """Run ``fn()`` and count what it executes: ``matmul`` = FLOPs of matrix products, convolutions
    and attention (torch.utils.flop_counter's formulas, plus the CPU flash-attention kernels it lacks),
    ``elementwise`` = output elements of floating-point pointwise ops (one op each: the scans, gates,
    norms and activations a matmul count misses)."""
    import torch.utils.flop_counter as fc
    from torch.utils._python_dispatch import TorchDispatchMode

    registry = dict(fc.flop_registry)
    aten = torch.ops.aten
    if hasattr(aten, "_scaled_dot_product_flash_attention_for_cpu"):
        registry[aten._scaled_dot_product_flash_attention_for_cpu] = (
            lambda q, k, v, *a, out_val=None, **kw: fc.sdpa_flop_count(q.shape, k.shape, v.shape))
        registry[aten._scaled_dot_product_flash_attention_for_cpu_backward] = (
            lambda g, q, k, v, *a, out_val=None, **kw: fc.sdpa_backward_flop_count(g.shape, q.shape, k.shape, v.shape))
    counts = {"matmul": 0, "elementwise": 0}

    class _Counter(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            kwargs = kwargs or {}
            out = func(*args, **kwargs)
            packet = func._overloadpacket
            if packet in registry:
                counts["matmul"] += int(registry[packet](*args, **kwargs, out_val=out))
            elif torch.Tag.pointwise in func.tags and isinstance(out, torch.Tensor) and out.is_floating_point():
                counts["elementwise"] += out.numel()
            return out

    with _Counter():
        fn()
    return counts
