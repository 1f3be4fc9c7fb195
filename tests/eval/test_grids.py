"""The grid studies' logic on CPU: the MQAR data (mixcon/eval/recall.py), the members each grid builds, the time
budget over runs (eval/grid.py) and the ablation smoke runs."""

import json
import math
import os
import sys
import time

import numpy as np
import pytest

from helpers import ROOT



@pytest.mark.parametrize("seq_len,pairs,vocab", [(64, 4, 128), (128, 8, 256), (40, 10, 48)])
def test_mqar_answers_are_the_values_paired_with_the_queried_keys(seq_len, pairs, vocab):
    from mixcon.eval.recall import mqar

    x, y = mqar(7, 50, seq_len, pairs, vocab)
    assert x.shape == y.shape == (50, seq_len) and x.dtype == y.dtype == np.int64
    assert x.min() >= 0 and x.max() < vocab
    half = vocab // 2
    for row, tgt in zip(x, y):
        keys, values = row[0:2 * pairs:2], row[1:2 * pairs:2]
        assert len(set(keys.tolist())) == pairs and ((1 <= keys) & (keys < half)).all()
        assert ((half <= values) & (values < vocab)).all()
        pos = np.flatnonzero(tgt != -100)
        assert len(pos) == pairs and pos.min() >= 2 * pairs and ((pos - 2 * pairs) % 2 == 0).all()
        paired = dict(zip(keys.tolist(), values.tolist()))
        assert sorted(row[pos].tolist()) == sorted(keys.tolist())  # every key queried once
        assert all(tgt[p] == paired[row[p]] for p in pos)


def test_mqar_is_a_pure_function_of_the_seed():
    from mixcon.eval.recall import mqar

    a, b = mqar((3, 11), 8, 64, 4, 128), mqar((3, 11), 8, 64, 4, 128)
    assert all((u == v).all() for u, v in zip(a, b))
    c = mqar((3, 12), 8, 64, 4, 128)
    assert not (a[0] == c[0]).all()
    for fill in (False, True):
        x, y = mqar(0, 8, 64, 4, 128, random_fill=fill)
        filler = y == -100
        filler[:, :8] = False  # the context
        assert (x[filler] == 0).all() if not fill else (x[filler] != 0).mean() > 0.8


def test_mqar_queries_follow_the_power_law():
    from mixcon.eval.recall import mqar

    # with power_a = 0.01 the weight of slot i is ∝ i^(-0.99): the first slot is chosen far more often
    # than the last (uniform slots would choose them equally)
    seq_len, pairs = 128, 4
    _, y = mqar(1, 2000, seq_len, pairs, 256)
    slots = (np.argwhere(y != -100)[:, 1] - 2 * pairs) // 2
    counts = np.bincount(slots, minlength=(seq_len - 2 * pairs) // 2)
    assert counts[0] > 5 * max(1, counts[-10:].mean())
    _, y = mqar(1, 2000, seq_len, pairs, 256, power_a=1.0)  # a = 1: uniform
    slots = (np.argwhere(y != -100)[:, 1] - 2 * pairs) // 2
    counts = np.bincount(slots, minlength=(seq_len - 2 * pairs) // 2)
    assert counts[0] < 2 * counts[-10:].mean()


def test_mqar_rejects_impossible_cells():
    from mixcon.eval.recall import mqar

    with pytest.raises(ValueError, match="seq_len"):
        mqar(0, 1, 30, 8, 64)
    with pytest.raises(ValueError, match="vocab=64 must be > seq_len=64"):
        mqar(0, 1, 64, 8, 64)


def test_recall_members_are_what_they_say():
    from mixcon.eval.recall import MEMBERS, member_config

    from mixcon import MixConForCausalLM

    for m in MEMBERS:
        c = member_config(m, 32, 4, 128, 64)
        kinds = c.layers_block_type
        if m == "attention":
            assert set(kinds) == {"attention"} and c.use_rope and len(kinds) == 4
        elif m == "conba-deep":
            assert set(kinds) == {"conba"} and len(kinds) == 8
        elif m.startswith("hybrid-"):
            a, b = (int(v) for v in m.split("-")[1].split(":"))
            assert kinds.count("attention") * b == kinds.count("conba") * a and len(kinds) == max(4, a + b)
        else:
            assert set(kinds) == {"conba"} and len(kinds) == 4
    model = MixConForCausalLM(member_config("conba+control", 32, 4, 64, 64))
    mixer = next(layer.mixer for layer in model.model.layers if layer.mixer_type == "conba")
    assert mixer.control and not mixer.state_scaling and mixer.tau == 0 and mixer.selection == "linear"
    assert mixer.process_noise == 0
    mixer = next(layer.mixer for layer in MixConForCausalLM(member_config("conba-all", 32, 4, 64, 64)).model.layers)
    assert mixer.control and mixer.state_scaling and mixer.tau == 2 and mixer.selection == "swiglu"
    assert mixer.process_noise > 0 and mixer.observation_noise > 0


def test_run_jobs_stops_at_the_budget_and_says_what_did_not_run():
    from mixcon.eval.grid import Job, run_jobs

    jobs = [Job(key=i, fn=time.sleep, args=(0.3,), cost_key="sleep") for i in range(3)]
    done, skipped = run_jobs(jobs, 0.5, progress=False)
    assert list(done) == [0] and skipped == [1, 2]  # the second would end at ~0.6 s
    done, skipped = run_jobs([Job(key=i, fn=math.sqrt, args=(i,)) for i in range(4)], 60, n_jobs=2, progress=False)
    assert done == {i: math.sqrt(i) for i in range(4)} and not skipped
    with pytest.raises(ValueError, match="n_jobs"):
        run_jobs(jobs, 1, n_jobs=0)


def test_spread():
    from mixcon.eval.grid import spread

    s = spread([1.0, 2.0, 4.0, float("nan")])
    assert s["n"] == 3 and s["mean"] == pytest.approx(7 / 3) and s["std"] == pytest.approx(np.std([1, 2, 4], ddof=1))
    assert spread([5.0])["std"] == 0 and spread([])["n"] == 0


def test_ablation_members_build_what_they_say():
    from mixcon.eval import ablation
    from mixcon.eval import grid

    from mixcon import MixConConfig

    kw = json.load(open(os.path.join(ROOT, "mixcon", "configs", "tiny.json")))
    kw.pop("model_type")
    fields = grid.config_fields()
    for a in (0, 1, 2, 4, 8):
        c = MixConConfig(**{**kw, **ablation.GRIDS["ratio"]["members"][f"{a}:{8 - a}"][1]})
        assert c.num_hidden_layers == 8 and c.layers_block_type.count("attention") == a
    for name in ablation.GRIDS:
        run, skipped = ablation.grid_members(name, fields)
        assert set(run) | {m for m, _ in skipped} == set(ablation.GRIDS[name]["members"])
        assert all("control_period" in ablation.GRIDS[name]["members"][m][1] for m, _ in skipped)
        if any("control_period" in ov for _, ov in ablation.GRIDS[name]["members"].values()):
            assert ("control_period" in fields) == (not skipped)
        for m, (_, ov) in run.items():
            MixConConfig(**{**kw, **ov})  # valid
    # a field the config lacks is refused, not stored silently
    run, skipped = ablation.grid_members("period", fields - {"control_period"})
    assert list(run) == ["control off", "all off"] and len(skipped) == 3 and "control_period" in skipped[0][1]


@pytest.fixture(scope="module")
def small_corpus(tmp_path_factory):
    import glob
    import sysconfig

    from transformers import AutoTokenizer

    from mixcon.train.data import prepare_data
    from mixcon.train.tokenizer import train_tokenizer

    d = tmp_path_factory.mktemp("corpus")
    files = sorted(glob.glob(os.path.join(sysconfig.get_paths()["stdlib"], "*.py")))[:12]
    train_tokenizer(files, str(d / "tok"), vocab_size=400, input_sentence_size=20_000)
    prepare_data(files, AutoTokenizer.from_pretrained(d / "tok"), str(d / "data"), heldout_fraction=0.2,
                 progress=False)
    (d / "r.yaml").write_text(f"tokenizer: {d / 'tok'}\ndata: {d / 'data'}\n")
    return d


def test_ablation_smoke_has_every_member_and_seed(tmp_path, small_corpus):
    from mixcon.eval import ablation

    members = ["off", "+control", "all"]
    summary, runs, not_run = ablation.main(
        ["mechanisms", "--smoke", "--recipe", str(small_corpus / "r.yaml"), "--members", *members,
         "--runs", str(tmp_path / "runs"), "--out", str(tmp_path / "out"), "--no-progress"])
    assert not not_run
    assert {(r["member"], r["seed"]) for r in runs} == {(m, s) for m in members for s in (0, 1)}
    res = json.load(open(tmp_path / "out" / "results.json"))
    assert res["lr"] in [x["lr"] for x in res["lr_sweep"]] and len(res["lr_sweep"]) == 2
    assert res["lr"] == min(res["lr_sweep"], key=lambda x: x["heldout_loss"])["lr"]
    assert all(r["lr"] == res["lr"] for r in runs)
    for s in summary:
        losses = [r["heldout_loss"] for r in runs if r["member"] == s["member"]]
        assert s["heldout_loss_mean"] == pytest.approx(sum(losses) / 2) and s["seeds"] == 2
    assert res["meta"]["shapes"]["seq_len"] == 16 and res["meta"]["rev"]
    from mixcon.eval import grid

    assert ("control_period" in res["meta"]["config_defaults"]) == ("control_period" in grid.config_fields())
    md = (tmp_path / "out" / "ablation.md").read_text()
    assert all(f"| {m} |" in md for m in members) and (tmp_path / "out" / "ablation.png").exists()
    # the reference member's seed-0 run of the sweep is reused, not trained twice
    assert len(os.listdir(tmp_path / "runs" / "mechanisms")) == 2 * len(members) + 1


def test_ablation_resume_keeps_earlier_runs_and_refuses_another_recipe(tmp_path, small_corpus, capsys):
    """A grid cut by its budget is finished by a second call with --resume: the first call's runs are kept
    as they were (not trained again), the table covers both calls, and a folder made with another recipe
    is refused (its runs would not be comparable)."""
    from mixcon.eval import ablation

    common = ["ratio", "--smoke", "--recipe", str(small_corpus / "r.yaml"), "--runs", str(tmp_path / "runs"),
              "--out", str(tmp_path / "out"), "--no-progress"]
    _, first, _ = ablation.main(common + ["--members", "2:6", "8:0"])
    capsys.readouterr()
    summary, runs, not_run = ablation.main(common + ["--members", "4:4", "--resume"])
    assert "resuming: " in capsys.readouterr().out and not not_run
    assert {r["member"] for r in runs} == {"2:6", "8:0", "4:4"} and {s["member"] for s in summary} == {"2:6", "8:0", "4:4"}
    kept = {(r["member"], r["seed"]): r["heldout_loss"] for r in runs}
    assert all(kept[(r["member"], r["seed"])] == r["heldout_loss"] for r in first)
    res = json.load(open(tmp_path / "out" / "results.json"))
    assert res["meta"]["reference"] == "2:6" and len(res["lr_sweep"]) == 2 and res["meta"]["resumed"]["rev"]
    assert "Resumed:" in (tmp_path / "out" / "ablation.md").read_text()
    with pytest.raises(SystemExit, match="another recipe.*max_steps"):
        ablation.main(common + ["--members", "4:4", "--resume", "max_steps=3"])


def test_ablation_period_grid_keeps_its_sequence_and_shrinks_the_model(tmp_path, small_corpus):
    from mixcon.eval import ablation

    summary, runs, _ = ablation.main(
        ["period", "--smoke", "--recipe", str(small_corpus / "r.yaml"), "--members", "control off", "--lr", "1e-3",
         "--runs", str(tmp_path / "runs"), "--out", str(tmp_path / "out"), "--no-progress", "max_steps=1"])
    res = json.load(open(tmp_path / "out" / "results.json"))
    assert res["meta"]["recipe"]["model_overrides"]["hidden_size"] == 32 and res["lr_sweep"] == []
    assert res["meta"]["recipe"]["max_steps"] == 1  # KEY=VALUE beats the grid's settings
    assert [r["member"] for r in runs] == ["control off"] * 2
    assert ablation.GRIDS["period"]["recipe"]["seq_len"] >= 16 * 64


def test_estimates_time_every_member(small_corpus, capsys):
    from mixcon.eval import ablation
    from mixcon.eval import recall

    rows = ablation.main(["ratio", "--smoke", "--estimate", "--recipe", str(small_corpus / "r.yaml")])
    assert [r["member"] for r in rows] == list(ablation.GRIDS["ratio"]["members"])
    assert all(r["cpu_s_per_step"] > 0 for r in rows) and rows[2]["runs"] == 3  # 2:6, the reference: 2 seeds + 1 lr
    # all attention costs less per step than all Conba (the Conba scan on CPU is a loop over time)
    assert rows[-1]["cpu_s_per_step"] < rows[0]["cpu_s_per_step"]
    assert recall.main(["--smoke", "--estimate", "--members", "attention", "mamba"]) > 0
    assert "CPU min" in capsys.readouterr().out


def test_plot_paired_uses_symlog_only_where_one_comparison_dwarfs_another(tmp_path, monkeypatch):
    from mixcon.eval import grid

    pytest.importorskip("matplotlib")
    rng = np.random.default_rng(3)
    small, large = list(rng.normal(0.01, 0.005, 3)), list(rng.normal(-1.5, 0.2, 3))
    assert grid.symlog_threshold([small, large]) == pytest.approx(max(abs(d) for d in small))
    assert grid.symlog_threshold([[1e-6], small, large]) == pytest.approx(max(abs(d) for d in large) / 100)
    assert grid.symlog_threshold([small, [d * 5 for d in small]]) is None
    assert grid.symlog_threshold([[0.0, 0.0], [float("nan")], small]) is None
    rows = [dict(comparison=c, metric=m, **grid.paired(dict(enumerate(d)), dict(enumerate([0.0] * 3))))
            for m, groups in (("wide", (small, large)), ("narrow", (small, small))) for c, d in zip("ab", groups)]
    figs = []
    monkeypatch.setattr(grid, "save_figure", lambda fig, path: figs.append(fig))
    grid.plot_paired(rows, ["wide", "narrow"], str(tmp_path / "p.png"), "t")
    wide, narrow = figs[0].axes[:2]
    assert wide.get_xscale() == "symlog" and narrow.get_xscale() == "linear"
    assert "(symlog)" in wide.get_xlabel()
    lin, fmt = max(abs(d) for d in small), wide.xaxis.get_major_formatter()  # no labels piled up on 0
    assert fmt(lin / 10, 0) == "" and fmt(-lin / 10, 0) == "" and fmt(0.0, 0) and fmt(1.0, 0) and fmt(-1.0, 0)


def _toy_run(tmp_path, steps=7, eval_every=3, stop_at=None):
    """A linear model fitted by `grid.train_steps`; its checks record the model's mode; ``stop_at``: the
    check that stops it."""
    import torch

    from mixcon.eval import grid
    from mixcon.train.recipe import Recipe

    torch.manual_seed(0)
    model = torch.nn.Linear(4, 1)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    r = Recipe(lr=1e-2, max_steps=steps, warmup_steps=1, batch_size=8, seq_len=4, min_lr_ratio=0.0)
    x = torch.randn(8, 4)
    modes = []  # the model's training flag at each check

    def check(m):
        modes.append(m.training)
        return float(((m(x) - 1) ** 2).mean()), stop_at is not None and len(modes) >= stop_at

    ck = grid.Checkpoint(str(tmp_path), ("toy",), dict(steps=steps))
    return grid.train_steps(model, opt, r, lambda m, step: ((m(x) - 1) ** 2).mean(), check, eval_every, ck), modes


def test_train_steps_checks_every_eval_every_and_at_the_end_and_stops(tmp_path):
    (model, run), modes = _toy_run(tmp_path / "a")
    assert run["step"] == 7 and len(run["losses"]) == 7 and run["losses"][-1] < run["losses"][0]
    assert [s for s, _ in run["checks"]] == [3, 6, 7] and modes == [False] * 3 and not model.training
    assert run["seconds"] > 0 and run["cpu_seconds"] > 0
    (_, run), _ = _toy_run(tmp_path / "b", stop_at=1)
    assert run["step"] == 3 and [s for s, _ in run["checks"]] == [3]


def test_train_steps_resumes_a_checkpoint_of_an_older_revision(tmp_path):
    """Checkpoints written while each study had its own loop carried train_s, train_cpu and val_acc
    (recall) or seconds (control): they resume, their time and last held-out value kept."""
    import torch

    from mixcon.eval import grid
    from mixcon.train.recipe import Recipe

    for old, checks in ((dict(step=6, losses=[1.0] * 6, val_acc=0.5, train_s=2.0, train_cpu=1.5), [[6, 0.5]]),
                        (dict(step=6, losses=[1.0] * 6, seconds=2.0), [])):
        model = torch.nn.Linear(2, 1)
        opt = torch.optim.AdamW(model.parameters())
        ck = grid.Checkpoint(str(tmp_path), ("old",), dict(v=1))
        ck.save(model, opt, old)
        r = Recipe(lr=1e-2, max_steps=6, warmup_steps=1, batch_size=2, seq_len=2)
        _, run = grid.train_steps(model, opt, r, lambda m, s: m(torch.ones(1, 2)).sum(), None, 3, ck)
        assert run["step"] == 6 and run["checks"] == checks and run["seconds"] >= 2.0 and len(run["losses"]) == 6
