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
    r = _run("tests", "conba", "moe", "throughput", "decode", "max_context", "tune", "--plan")
    assert r.returncode == 0, r.stderr
    assert [n for n, _ in _plan(r.stdout)] == ["tests", "conba", "moe", "throughput", "decode", "max_context", "tune"]
    r = _run("bogus", "--plan")
    assert r.returncode == 2 and "unknown step bogus" in r.stdout
    assert _run().returncode == 2


@pytest.mark.slow
def test_quick_smoke_runs_each_python_step_on_cpu(tmp_path):
    """``quick --smoke``: every Python step of the quick run through its CPU path (tiny sizes, Triton's
    interpreter), the device step and the GPU test subset skipped. ~1-2 minutes on 2 cores."""
    results = tmp_path / "quick"
    env = dict(RESULTS=str(results), PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    r = _run("quick", "--smoke", env=env, timeout=1500)
    assert r.returncode == 0, r.stdout[-3000:]
    for name in ("conba", "prefill", "decode", "max_context"):
        assert f"=== {name}: exit 0" in r.stdout, r.stdout[-3000:]
        assert (results / "logs" / f"{name}.log").exists()
    for name in ("device", "tests"):
        assert f"=== {name}: no CPU path" in r.stdout
    assert (results / "conba" / "results.csv").exists() and (results / "max_context" / "max_context.md").exists()
