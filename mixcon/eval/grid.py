"""Shared pieces of the grid studies (`mixcon study recall | control | ablation | family`): the built-in
corpus, Conba's mechanism switches as config overrides, members the installed config cannot express,
a wall-clock budget over a list of runs (optionally in parallel processes), the run log, the check that
a resumed study keeps its settings, the checkpoint of a run in progress and the training loop that
saves and resumes it, mean ± spread, the paired comparison and its plot.

Imports stay light (no torch at import) so that worker processes start quickly.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import shutil
import statistics
import sys
import time
from typing import Any, Callable, Optional


# Conba's switches (docs/conba.md). With all of them off Conba is a Mamba-1 mixer.
NOISE = 0.01  # σ_w = σ_v when the training noise is on (the config's default is 0 = off)
MECHANISMS_OFF = dict(delay=0, state_scaling=False, control=False, process_noise=0.0, observation_noise=0.0,
                      selection="linear")
MECHANISM_ON = {  # one mechanism, alone, on top of MECHANISMS_OFF
    "delay": dict(delay=2),
    "scaling": dict(state_scaling=True),
    "control": dict(control=True),
    "noise": dict(process_noise=NOISE, observation_noise=NOISE),
    "selection": dict(selection="swiglu"),
}
ALL_ON = {k: v for on in MECHANISM_ON.values() for k, v in on.items()}


def mechanisms(*names: str) -> dict:
    """Config overrides: every Conba mechanism off except ``names`` (keys of MECHANISM_ON)."""
    unknown = set(names) - set(MECHANISM_ON)
    if unknown:
        raise ValueError(f"unknown mechanisms {sorted(unknown)}; allowed: {list(MECHANISM_ON)}")
    out = dict(MECHANISMS_OFF)
    for n in names:
        out.update(MECHANISM_ON[n])
    return out


def config_fields() -> set:
    """The keyword arguments the installed MixConConfig takes. (Unknown keywords would be stored silently
    by transformers' PretrainedConfig, so a member asking for a field the config lacks must be caught here.)"""
    import inspect

    from mixcon import MixConConfig

    return set(inspect.signature(MixConConfig.__init__).parameters) - {"self", "kwargs"}


def config_defaults(*names: str) -> dict:
    """The installed MixConConfig's defaults of ``names`` that it has (e.g. control_period), for run headers."""
    import inspect

    from mixcon import MixConConfig

    params = inspect.signature(MixConConfig.__init__).parameters
    return {n: params[n].default for n in names if n in params}


def missing_fields(overrides: dict) -> list:
    return sorted(set(overrides) - config_fields())


def load_builtin(recipe_path: str, overrides=()):
    """The recipe (YAML + ``key=value`` overrides) and its tokenizer; the built-in corpus (a tokenizer and
    shards from the Python standard library's source, as `mixcon train` makes them) is prepared
    when the recipe's tokenizer or data directory is missing."""
    from transformers import AutoTokenizer

    from mixcon.train.recipe import load_recipe
    from mixcon.train.run import ensure_stdlib_corpus

    base = load_recipe(recipe_path, list(overrides))
    if not os.path.exists(os.path.join(base.tokenizer, "tokenizer.json")) or not os.path.isdir(base.data):
        ensure_stdlib_corpus(base)
    return base, AutoTokenizer.from_pretrained(base.tokenizer)


def spread(values) -> dict:
    """mean, sample standard deviation (0 for one value), min, max and n of the finite values."""
    v = [float(x) for x in values if x is not None and math.isfinite(float(x))]
    if not v:
        return dict(mean=float("nan"), std=float("nan"), min=float("nan"), max=float("nan"), n=0)
    return dict(mean=statistics.fmean(v), std=statistics.stdev(v) if len(v) > 1 else 0.0, min=min(v), max=max(v),
                n=len(v))



# the 0.975 quantile of Student's t (two-sided 5 %) for df 1 .. 10, when SciPy is missing
_T975 = (12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228)


def t_critical(df: int) -> float:
    """The 0.975 quantile of Student's t with ``df`` degrees of freedom (4.303 at df 2)."""
    try:
        from scipy.stats import t

        return float(t.ppf(0.975, df))
    except ImportError:
        return _T975[df - 1] if df <= len(_T975) else 1.96


def paired(a: dict, b: dict) -> dict:
    """A paired comparison of two members' runs keyed by seed (``{seed: value}``), over the seeds both have:
    the differences a − b per seed, their mean and sample standard deviation, the paired t (mean / (sd /
    √n)), Cohen's d_z (mean / sd), whether the sign holds in every seed, and a verdict: "a > b" or "a < b"
    when the sign holds in every seed and |t| exceeds `t_critical` (df = n − 1); "no difference" when every
    difference is 0; otherwise "undecided"."""
    seeds = sorted(set(a) & set(b), key=str)
    d = [float(a[s]) - float(b[s]) for s in seeds]
    n = len(d)
    out = dict(n=n, seeds=seeds, diffs=d, mean=float("nan"), sd=float("nan"), t=float("nan"), d_z=float("nan"),
               same_sign=False, verdict="undecided")
    if n == 0:
        return out
    mean = statistics.fmean(d)
    sd = statistics.stdev(d) if n > 1 else float("nan")
    out.update(mean=mean, sd=sd, same_sign=all(x > 0 for x in d) or all(x < 0 for x in d))
    if all(x == 0 for x in d):
        out.update(verdict="no difference", t=0.0, d_z=0.0)
        return out
    if n > 1 and sd > 0:
        out.update(t=mean / (sd / math.sqrt(n)), d_z=mean / sd)
    elif n > 1:  # every difference equal and non-zero: the sign holds, t is unbounded
        out.update(t=math.copysign(math.inf, mean), d_z=math.copysign(math.inf, mean))
    if n > 1 and out["same_sign"] and abs(out["t"]) > t_critical(n - 1):
        out["verdict"] = "a > b" if mean > 0 else "a < b"
    return out

@dataclasses.dataclass
class Job:
    key: Any  # identifies the run in the results and in the list of runs that did not run
    fn: Callable  # a module-level function (picklable: it may run in another process)
    args: tuple = ()
    kwargs: dict = dataclasses.field(default_factory=dict)
    cost_key: Any = None  # runs with the same cost_key are expected to take the same time


def _init_worker(threads: int):
    import torch

    torch.set_num_threads(threads)


def run_jobs(jobs: list, budget_s: Optional[float], n_jobs: int = 1, progress: bool = True, desc: str = "runs",
             on_result: Optional[Callable] = None):
    """Run ``jobs`` in order, ``n_jobs`` at a time (separate processes, one thread each, when > 1), within a
    wall-clock budget: a job starts only if, by the time the last run of its ``cost_key`` took, it
    would end before the deadline (a job whose cost is still unknown starts while time is left).
    Returns (results: {key: value}, skipped: [key]). ``on_result(key, value)`` is called as each ends."""
    from tqdm import tqdm

    if n_jobs < 1:
        raise ValueError(f"n_jobs={n_jobs} must be >= 1")
    deadline = time.monotonic() + budget_s if budget_s is not None else math.inf
    cost: dict = {}
    results, skipped = {}, []
    bar = tqdm(total=len(jobs), desc=desc, disable=not progress)

    def fits(job):
        est = cost.get(job.cost_key, 0.0)
        return time.monotonic() + est <= deadline

    def finish(job, value, seconds):
        cost[job.cost_key] = seconds
        results[job.key] = value
        bar.update(1)
        if on_result is not None:
            on_result(job.key, value)

    if n_jobs == 1:
        for job in jobs:
            if not fits(job):
                skipped.append(job.key)
                bar.update(1)
                continue
            t0 = time.monotonic()
            value = job.fn(*job.args, **job.kwargs)
            finish(job, value, time.monotonic() - t0)
        bar.close()
        return results, skipped

    import multiprocessing as mp
    from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait

    pending = list(jobs)
    running = {}
    with ProcessPoolExecutor(n_jobs, mp_context=mp.get_context("spawn"), initializer=_init_worker,
                             initargs=(1,)) as pool:
        while pending or running:
            while pending and len(running) < n_jobs:
                job = pending.pop(0)
                if not fits(job):
                    skipped.append(job.key)
                    bar.update(1)
                    continue
                running[pool.submit(job.fn, *job.args, **job.kwargs)] = (job, time.monotonic())
            if not running:
                continue
            done, _ = wait(list(running), return_when=FIRST_COMPLETED)
            for fut in done:
                job, t0 = running.pop(fut)
                finish(job, fut.result(), time.monotonic() - t0)
    bar.close()
    return results, skipped


class RunLog:
    """The runs of a grid as they end, one JSON line each (``runs.jsonl`` under ``out``), so that a study
    cut short keeps what finished: with ``resume`` the runs already there are kept and their jobs
    dropped from ``jobs``; without it the log starts empty (and the runs' checkpoints, `Checkpoint`, are
    removed)."""

    def __init__(self, out: str, resume: bool):
        self.path = os.path.join(out, "runs.jsonl")
        self.done = {}
        if resume and os.path.exists(self.path):
            with open(self.path) as f:
                for line in f:
                    rec = json.loads(line)
                    self.done[tuple(rec["key"])] = rec["row"]
        elif not resume:
            if os.path.exists(self.path):
                os.remove(self.path)
            shutil.rmtree(os.path.join(out, CHECKPOINTS), ignore_errors=True)

    def pending(self, jobs: list) -> list:
        return [j for j in jobs if j.key not in self.done]

    def add(self, key, row) -> None:
        with open(self.path, "a") as f:
            f.write(json.dumps(dict(key=list(key), row=row)) + "\n")


def check_resume(out: str, settings: dict) -> None:
    """Refuse (ValueError) to resume into ``out`` whose kept runs were made with other settings: a run is
    kept by its key alone, so a call that changed, say, --steps would mix two budgets in one table.
    ``settings``: {row field: (option, this call's value)}; a row without the field (an older run) is not
    checked for it."""
    path = os.path.join(out, "runs.jsonl")
    for row in RunLog(out, resume=True).done.values():
        for field, (option, value) in settings.items():
            if field in row and row[field] != value:
                which = ", ".join(f"{k} {row[k]}" for k in ("member", "lr", "seed") if k in row)
                raise ValueError(f"--resume: {path} holds runs made with {option} {row[field]} ({which}); this "
                                 f"call says {option} {value}: resume with that setting, or write to another --out")


CHECKPOINTS = "checkpoints"  # under a study's OUT; not committed (.gitignore)


class Checkpoint:
    """One run's training state, saved every few steps, so that a run stopped part-way (a session's end, a
    kill) continues from its last save rather than from step 0, and ends as the uninterrupted run would
    have: the model's and the optimizer's state, the torch RNG (the training noise draws from it), the step
    and whatever the loop carries (losses, seconds so far). The data of a step is a pure function of the
    step, so nothing else is needed. ``fingerprint`` (the run's settings) is stored with it; a checkpoint
    whose fingerprint differs is ignored, not resumed. Saved through a temporary file and a rename;
    ``clear`` once the run's row is in the log. With ``out`` None every call does nothing."""

    def __init__(self, out: Optional[str], key, fingerprint: Optional[dict] = None):
        name = "_".join(str(k) for k in key).replace("/", "-").replace(":", "-").replace(" ", "")
        self.path = os.path.join(out, CHECKPOINTS, name + ".pt") if out else None
        self.fingerprint = json.loads(json.dumps(fingerprint, sort_keys=True, default=str))

    def load(self, model, optimizer) -> Optional[dict]:
        """The saved ``carry`` (with ``step``) after restoring model, optimizer and RNG; None if there is no
        checkpoint of these settings."""
        import torch

        if self.path is None or not os.path.exists(self.path):
            return None
        state = torch.load(self.path, map_location="cpu", weights_only=True)
        if state.get("fingerprint") != json.dumps(self.fingerprint, sort_keys=True):
            return None
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        torch.set_rng_state(state["rng"])
        if state.get("cuda_rng") is not None and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(state["cuda_rng"])
        return state["carry"]

    def save(self, model, optimizer, carry: dict) -> None:
        import torch

        if self.path is None:
            return
        os.makedirs(os.path.dirname(self.path), exist_ok=True)
        tmp = self.path + ".tmp"
        torch.save(dict(fingerprint=json.dumps(self.fingerprint, sort_keys=True), model=model.state_dict(),
                        optimizer=optimizer.state_dict(), rng=torch.get_rng_state(), carry=carry,
                        cuda_rng=torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None), tmp)
        os.replace(tmp, self.path)

    def clear(self) -> None:
        if self.path is not None and os.path.exists(self.path):
            os.remove(self.path)


def train_steps(model, optimizer, recipe, loss_at: Callable, check: Optional[Callable] = None,
                eval_every: int = 100, checkpoint: Optional[Checkpoint] = None, desc: Optional[str] = None) -> tuple:
    """The studies' training loop. Steps 1 … ``recipe.max_steps``: the learning rate of `lr_at`, the loss
    ``loss_at(model, step)`` (its batch a pure function of the step), backward, clipping at
    ``recipe.grad_clip``, the optimizer's step. Every ``eval_every`` steps and at the last, ``check(model)``,
    in eval mode, returns (value, stop): the value is kept (``checks``) and ``stop`` ends the training; after
    a check that does not stop, the state goes to ``checkpoint``, from which a run of the same settings
    stopped part-way continues and ends as the uninterrupted run would. ``desc``: a progress bar with that
    title. Returns the model in eval mode and {step, losses, checks: [[step, value], …], seconds,
    cpu_seconds} (the time of the whole run, its resumed parts added)."""
    import torch
    from tqdm import tqdm

    from mixcon.train.loop import lr_at

    steps = recipe.max_steps
    carry = checkpoint.load(model, optimizer) if checkpoint is not None else None
    carry = _carry(carry) if carry else dict(step=0, losses=[], checks=[], seconds=0.0, cpu_seconds=0.0)
    t0, c0 = time.perf_counter() - carry["seconds"], time.process_time() - carry["cpu_seconds"]
    bar = tqdm(total=steps, initial=carry["step"], desc=desc, leave=False, disable=desc is None)
    model.train()
    for step in range(carry["step"] + 1, steps + 1):
        for g in optimizer.param_groups:
            g["lr"] = lr_at(step, recipe)
        loss = loss_at(model, step)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), recipe.grad_clip)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        carry["losses"].append(loss.item())
        carry["step"] = step
        bar.update(1)
        if check is not None and (step % eval_every == 0 or step == steps):
            model.eval()
            value, stop = check(model)
            model.train()
            carry["checks"].append([step, value])
            bar.set_postfix(loss=f"{carry['losses'][-1]:.3f}", check=f"{value:.3f}")
            if stop:
                break
        if checkpoint is not None and step % eval_every == 0 and step < steps:
            carry.update(seconds=time.perf_counter() - t0, cpu_seconds=time.process_time() - c0)
            checkpoint.save(model, optimizer, carry)
    bar.close()
    carry.update(seconds=time.perf_counter() - t0, cpu_seconds=time.process_time() - c0)
    return model.eval(), carry


def _carry(old: dict) -> dict:
    """A checkpoint's carry in `train_steps`' fields; checkpoints of runs started before the studies shared
    one loop (before rev 9e183d7) named them per study (train_s, train_cpu, val_acc)."""
    carry = dict(old)
    carry.setdefault("seconds", carry.pop("train_s", 0.0))
    carry.setdefault("cpu_seconds", carry.pop("train_cpu", 0.0))
    acc = carry.pop("val_acc", None)
    carry.setdefault("checks", [[carry["step"], acc]] if acc is not None else [])
    return carry


def pyplot():
    """matplotlib's pyplot on the Agg backend, or None when matplotlib is missing."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    return plt


def plot_paired(paired_rows: list, metrics: list, path: str, title: str) -> None:
    """The paired comparisons as they are read: one row per comparison, one panel per metric; each seed's
    difference a − b (dots), their mean (a bar) and its 95 % interval (mean ± t·sd/√n, `t_critical`), the
    zero line, and the verdict at the right. ``paired_rows``: dicts with comparison, metric and `paired`'s
    fields. Nothing is drawn without matplotlib or rows."""
    plt = pyplot()
    names = list(dict.fromkeys(r["comparison"] for r in paired_rows if r["metric"] in metrics and r["n"]))
    if plt is None or not names:
        return
    fig, axes = plt.subplots(1, len(metrics), figsize=(3.2 * len(metrics) + 2.5, 0.42 * len(names) + 1.2),
                             sharey=True, squeeze=False)
    for ax, metric in zip(axes[0], metrics):
        for i, name in enumerate(names):
            r = next((r for r in paired_rows if r["comparison"] == name and r["metric"] == metric), None)
            if r is None or not r["n"]:
                continue
            ax.plot(r["diffs"], [i] * r["n"], "o", color="C0", ms=3.5, alpha=0.8)
            ax.plot([r["mean"]], [i], "|", color="k", ms=12, mew=2)
            if r["n"] > 1 and math.isfinite(r["sd"]):
                half = t_critical(r["n"] - 1) * r["sd"] / math.sqrt(r["n"])
                ax.plot([r["mean"] - half, r["mean"] + half], [i, i], "-", color="k", lw=1)
            called = r["verdict"] in ("a > b", "a < b")
            ax.annotate(f"{r['verdict']} (n={r['n']})", (1.0, i), xycoords=("axes fraction", "data"), xytext=(4, 0),
                        textcoords="offset points", va="center", fontsize=6, color="C3" if called else "gray")
        ax.axvline(0, color="gray", lw=0.8)
        ax.set_title(metric, fontsize=8)
        linear = symlog_threshold([r["diffs"] for r in paired_rows if r["metric"] == metric and r["n"]])
        if linear is not None:  # one comparison dwarfs another: linear within ±linear, logarithmic beyond
            ax.set_xscale("symlog", linthresh=linear)
            fmt = ax.xaxis.get_major_formatter()  # decades inside the linear range sit on 0: no label there
            ax.xaxis.set_major_formatter(plt.FuncFormatter(
                lambda t, pos, lin=linear, fmt=fmt: "" if 0 < abs(t) < lin else fmt(t, pos)))
        ax.set_xlabel("a − b per seed" + (" (symlog)" if linear is not None else ""), fontsize=7)
        ax.tick_params(labelsize=7)
        ax.grid(alpha=0.3, axis="x")
    axes[0][0].set_yticks(range(len(names)), names, fontsize=7)
    axes[0][0].invert_yaxis()
    fig.suptitle(title, fontsize=8)
    fig.tight_layout()
    save_figure(fig, path)


def symlog_threshold(groups: list, ratio: float = 20.0, decades: float = 2.0):
    """For one panel of `plot_paired`: where the largest |difference| of some comparison is more than
    ``ratio`` times that of another (so on a linear axis the smaller one would be a dot at 0), the linear
    range of a symlog axis: the smaller one's largest |difference|, but at most ``decades`` decades below
    the largest (differences smaller still are drawn at 0, as they are); else None."""
    spans = [max(abs(d) for d in g if math.isfinite(d)) for g in groups if any(math.isfinite(d) for d in g)]
    spans = [v for v in spans if v > 0]
    if not spans or max(spans) <= ratio * min(spans):
        return None
    return max(min(spans), max(spans) / 10**decades)


def save_figure(fig, path: str) -> None:
    """Through a temporary file and a rename."""
    plt = pyplot()
    tmp = path + ".tmp.png"
    fig.savefig(tmp, dpi=120)
    os.replace(tmp, path)
    plt.close(fig)


def write_text(path: str, text: str) -> None:
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        f.write(text)
    os.replace(tmp, path)


def fmt(v, p: int = 3) -> str:
    if v is None or v == "" or (isinstance(v, float) and math.isnan(v)):
        return ""
    return f"{v:.{p}f}" if isinstance(v, float) else str(v)
