"""tools/gpu_benchmarks.sh: the quick run fits one GPU lease (15 minutes with start-up; at most 10 a
call), its plan runs nothing, and each of its Python steps has a working CPU path."""

import os
import re
import subprocess

import pytest

from helpers import ROOT

SCRIPT = os.path.join(ROOT, "tools", "gpu_benchmarks.sh")
QUICK_STEPS = ["device", "tests", "conba", "prefill", "decode", "max_context"]
BUDGET_S = 480
# what the lent machines' image lacks of what this project imports (the device tool's KINDS.md list)
GPU_MACHINE_LACKS = {"lm_eval", "parameterized", "mamba_ssm", "causal_conv1d", "vllm", "datasets"}


def _run(*args, env=None, timeout=60):
    e = dict(os.environ, **(env or {}))
    return subprocess.run(["bash", SCRIPT, *args], capture_output=True, text=True, timeout=timeout, env=e)


def _plan(out):
    return [(m.group(1), int(m.group(2))) for m in re.finditer(r"^(\S+)\s+limit\s+(\d+) s\b", out, re.M)]


def test_quick_plan_lists_every_step_and_fits_the_budget(tmp_path):
    results = tmp_path / "quick"
    r = _run("quick", "--plan", env=dict(RESULTS=str(results)))
    assert r.returncode == 0, r.stderr
    plan = _plan(r.stdout)
    assert [name for name, _ in plan] == QUICK_STEPS
    total = sum(limit for _, limit in plan)
    assert total <= BUDGET_S, plan
    assert f"sum of limits: {total} s" in r.stdout
    assert all(limit <= 600 for _, limit in plan)  # and so each fits one device call
    assert not results.exists()  # --plan ran nothing, not even the results folder
    # the headline shapes are in the plan
    conba = next(line for line in r.stdout.splitlines() if line.startswith("conba"))
    assert "--seqlen 32768 131072" in conba and "--d-inner 4096" in conba and "--control-period 64" in conba
    assert "--memory-cap-gib" in next(line for line in r.stdout.splitlines() if line.startswith("max_context"))


def test_full_run_steps_stay_available_and_bad_steps_are_refused():
    steps = ["tests", "conba", "moe", "throughput", "decode", "max_context", "tune", "tune-chunk"]
    r = _run(*steps, "--plan")
    assert r.returncode == 0, r.stderr
    plan = _plan(r.stdout)
    assert [n for n, _ in plan] == steps
    # the spill question is the second call of a lease: with quick's budget it fits 15 minutes' device time
    assert dict(plan)["tune-chunk"] + BUDGET_S <= 660
    r = _run("bogus", "--plan")
    assert r.returncode == 2 and "unknown step bogus" in r.stdout
    assert _run().returncode == 2


@pytest.mark.slow
def test_quick_smoke_runs_each_python_step_on_cpu(tmp_path):
    """``quick --smoke``: every Python step of the quick run through its CPU path (tiny sizes, Triton's
    interpreter), the device step and the GPU test subset skipped. ~1-2 minutes on 2 cores."""
    results = tmp_path / "quick"
    # the packages the lent GPU machines lack (docs/kernels.md, "A GPU lease") are hidden from Python
    hide = tmp_path / "hide"
    hide.mkdir()
    (hide / "sitecustomize.py").write_text(
        "import sys\n"
        f"ABSENT = {sorted(GPU_MACHINE_LACKS)!r}\n"
        "class _Absent:\n"
        "    def find_spec(self, name, path=None, target=None):\n"
        "        if name.split('.')[0] in ABSENT:\n"
        "            raise ModuleNotFoundError(f'No module named {name!r} (not on the GPU machines)')\n"
        "sys.meta_path.insert(0, _Absent())\n")
    env = dict(RESULTS=str(results), GPU_SITE=str(tmp_path / "no-site"),
               PYTHONPATH=os.pathsep.join([str(hide), ROOT, os.environ.get("PYTHONPATH", "")]))
    r = _run("quick", "--smoke", env=env, timeout=1500)
    assert r.returncode == 0, r.stdout[-3000:]
    for name in ("conba", "prefill", "decode", "max_context"):
        assert f"=== {name}: exit 0" in r.stdout, r.stdout[-3000:]
        assert (results / "logs" / f"{name}.log").exists()
    for name in ("device", "tests"):
        assert f"=== {name}: no CPU path" in r.stdout
    assert "(not on the GPU machines)" in (results / "logs" / "conba.log").read_text()  # the hiding took
    assert (results / "conba" / "results.csv").exists() and (results / "max_context" / "max_context.md").exists()


def test_tune_chunk_smoke_times_every_configuration_and_writes_its_choice(tmp_path):
    """`mixcon bench conba-tune --chunk --smoke`: the chunk scan's forward and backward per forward and
    backward block and the P = 1 backward per warps, through Triton's interpreter at tiny sizes; the
    rows, and chunk_best.txt (what the full conba step reads), written."""
    pytest.importorskip("triton")
    from mixcon.bench import conba_tune
    from mixcon.ops.conba import chunk, fused_recurrent

    before = (dict(chunk.TUNING), dict(fused_recurrent.TUNING))
    rows = conba_tune.main(["--smoke", "--out", str(tmp_path)])
    assert (dict(chunk.TUNING), dict(fused_recurrent.TUNING)) == before  # the shipped settings restored
    assert {(r["kernel"], r["bwd_block_t"], r["bwd_channels_per_warp"]) for r in rows} == {
        ("chunk", 8, None), ("chunk", 2, None), ("p1", None, 32), ("p1", None, 8)}
    assert all(r["fwd_bwd_ms"] > r["fwd_ms"] > 0 for r in rows)
    best = (tmp_path / "chunk_best.txt").read_text().split()
    assert len(best) == 4 and best[1] in ("8", "2") and best[3] in ("32", "8")
    assert (tmp_path / "chunk" / "results.csv").exists()


def test_prepare_copies_the_baselines_source_for_the_lease(tmp_path):
    """`prepare` (run before a lease, no GPU): mamba_ssm's Python source into GPU_SITE (.gpu/site), which
    the plan then reports and the steps put on PYTHONPATH; without mamba_ssm installed, one line saying so."""
    import importlib.util

    site = tmp_path / "site"
    r = _run("prepare", env=dict(GPU_SITE=str(site)))
    if importlib.util.find_spec("mamba_ssm") is None:
        assert r.returncode == 2 and "mamba_ssm is not installed" in r.stdout
        return
    assert r.returncode == 0, r.stdout + r.stderr
    assert (site / "mamba_ssm" / "ops" / "triton" / "ssd_combined.py").exists()
    assert not list(site.rglob("__pycache__"))
    plan = _run("quick", "--plan", env=dict(GPU_SITE=str(site))).stdout
    assert f"baselines: {site}/mamba_ssm present" in plan
    plan = _run("quick", "--plan", env=dict(GPU_SITE=str(tmp_path / "absent"))).stdout
    assert "run 'bash tools/gpu_benchmarks.sh prepare' first" in plan
