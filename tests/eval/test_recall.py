"""The recall study (`mixcon study recall`, mixcon/eval/recall.py): Zoology's MQAR generator, the protocol's
pieces (learning-rate choice, pilot gate, the f ≡ 0 counterfactual), the paired comparisons and the smoke run."""

import json
import math

import numpy as np
import pytest


@pytest.mark.parametrize("random_fill", [False, True])
@pytest.mark.parametrize("seq_len,pairs,vocab", [(64, 4, 128), (256, 16, 512), (48, 12, 49)])
def test_mqar_no_key_outside_its_pair_and_its_query(seq_len, pairs, vocab, random_fill):
    """Zoology's task: a key of a sequence appears exactly twice — in its pair and at its query — and
    nowhere else, whatever fills the gaps; the default filler is 0."""
    from mixcon.eval.recall import mqar

    x, y = mqar((5, seq_len), 300, seq_len, pairs, vocab, random_fill=random_fill)
    for row, tgt in zip(x, y):
        keys = set(row[0:2 * pairs:2].tolist())
        queries = np.flatnonzero(tgt != -100)
        for k in keys:
            where = np.flatnonzero(row == k)
            assert len(where) == 2 and where[0] < 2 * pairs and where[1] in queries, (k, where)
        filler = np.ones(seq_len, dtype=bool)
        filler[:2 * pairs] = False
        filler[queries] = False
        if random_fill:
            assert not keys & set(row[filler].tolist()) and (row[filler] > 0).mean() == 1
        else:
            assert (row[filler] == 0).all()
    if random_fill:  # the fillers are random: every non-key token of the vocabulary turns up
        assert len(set(x[:, 2 * pairs:].ravel().tolist())) > vocab // 2


def test_mqar_refuses_a_vocabulary_not_above_the_length():
    from mixcon.eval.recall import mqar

    with pytest.raises(ValueError, match=r"vocab=256 must be > seq_len=256"):
        mqar(0, 1, 256, 4, 256)
    mqar(0, 1, 256, 4, 257)


def test_best_lr_and_final_rows():
    from mixcon.eval.recall import best_lr, final_rows

    base = dict(member="m", width=8, seq_len=16, pairs=2)
    sweep = [dict(base, lr=1e-3, seed=0, accuracy=1.0, steps=900, answer_loss=0.1),
             dict(base, lr=3e-3, seed=0, accuracy=1.0, steps=300, answer_loss=0.2),
             dict(base, lr=1e-2, seed=0, accuracy=0.5, steps=3000, answer_loss=0.9)]
    assert best_lr(sweep) == 3e-3  # equal accuracy: the one that reached the target first
    assert best_lr(sweep[::2]) == 1e-3
    rows = sweep + [dict(base, lr=3e-3, seed=s, accuracy=0.9, steps=3000, answer_loss=0.3) for s in (1, 2)]
    assert [(r["lr"], r["seed"]) for r in final_rows(rows)] == [(3e-3, 0), (3e-3, 1), (3e-3, 2)]


def test_gate_needs_every_seed():
    from mixcon.eval.recall import gate

    rows = [dict(member="attention", width=8, seq_len=16, pairs=2, lr=1e-3, seed=s, accuracy=a, steps=10,
                 answer_loss=0.1) for s, a in enumerate((1.0, 0.97, 0.94))]
    g = gate(rows, 8, 16, 2, 0.95)
    assert not g["passed"] and g["min_accuracy"] == 0.94 and g["seeds"] == 3
    assert gate(rows[:2], 8, 16, 2, 0.95)["passed"]
    assert not gate([], 8, 16, 2, 0.95)["passed"]


def test_paired_comparison():
    from mixcon.eval.grid import paired, t_critical

    assert t_critical(2) == pytest.approx(4.303, abs=1e-3)
    p = paired({0: 0.50, 1: 0.60, 2: 0.70, 3: 0.9}, {0: 0.40, 1: 0.45, 2: 0.62})  # seed 3 unpaired: left out
    d = [0.10, 0.15, 0.08]
    t = np.mean(d) / (np.std(d, ddof=1) / math.sqrt(3))
    assert p["n"] == 3 and p["diffs"] == pytest.approx(d) and p["t"] == pytest.approx(t)
    assert p["d_z"] == pytest.approx(np.mean(d) / np.std(d, ddof=1)) and p["same_sign"] and p["verdict"] == "a > b"
    p = paired({0: 0.5, 1: 0.6, 2: 0.4}, {0: 0.4, 1: 0.5, 2: 0.5})  # the sign flips in one seed
    assert not p["same_sign"] and p["verdict"] == "undecided"
    p = paired({0: 0.1, 1: 0.2, 2: 0.3}, {0: 0.11, 1: 0.25, 2: 0.31})  # one sign, but |t| small
    assert p["same_sign"] and abs(p["t"]) < 4.303 and p["verdict"] == "undecided"
    assert paired({0: 1, 1: 1}, {0: 1, 1: 1})["verdict"] == "no difference"
    assert paired({0: 1.0}, {0: 0.5})["verdict"] == "undecided"  # one seed decides nothing


def test_feedback_off_is_f_zero_and_restores():
    """`feedback_off` switches the controller of every Conba layer off (f ≡ 0) — the logits change when the
    controller acts (P = 4 over 32 tokens) and equal those of the same weights with control=False — and
    puts it back afterwards."""
    import torch

    from mixcon import MixConForCausalLM
    from mixcon.eval.recall import feedback_off, member_config

    torch.manual_seed(0)
    cfg = member_config("conba-live", 32, 2, 64, 32, dict(control_period=4, process_noise=0.0, observation_noise=0.0))
    model = MixConForCausalLM(cfg).eval()
    for m in model.modules():  # a trained-like controller: a gain far from its start
        if hasattr(m, "eta_raw"):
            with torch.no_grad():
                m.eta_raw.fill_(3.0)
    ids = torch.randint(1, 64, (2, 32))
    with torch.no_grad():
        on = model(ids).logits
        with feedback_off(model) as n:
            off = model(ids).logits
        again = model(ids).logits
    assert n == 2 and torch.equal(on, again)
    assert (on - off).abs().max() > 1e-4
    off_cfg = member_config("conba-live", 32, 2, 64, 32, dict(control_period=4, process_noise=0.0,
                                                                   observation_noise=0.0, control=False))
    plain = MixConForCausalLM(off_cfg).eval()
    plain.load_state_dict(model.state_dict(), strict=False)
    with torch.no_grad():
        torch.testing.assert_close(plain(ids).logits, off, rtol=1e-5, atol=1e-5)
    with feedback_off(plain) as n:
        assert n == 0


def test_recall_smoke(tmp_path):
    """Every claim member in one tiny cell: the sweep at the first seed, the other seed at the best lr; the
    gate computed (and overridden in the smoke); summary.csv, the paired table and a plot per cell."""
    from mixcon.eval import recall

    rows, gates = recall.main(["--smoke", "--out", str(tmp_path), "--no-progress", "--members", "attention",
                               "mamba", "conba-all", "conba-noctl", "conba-deep"])
    by = {}
    for r in rows:
        by.setdefault(r["member"], []).append(r)
    for m, rs in by.items():
        assert sorted((r["seed"], r["role"]) for r in rs) == [(0, "sweep"), (0, "sweep"), (1, "seed")]
        assert {r["lr"] for r in rs if r["seed"] == 0} == {1e-3, 3e-3}
        assert all(0 <= r["accuracy"] <= 1 and r["answer_loss"] > 0 and r["steps"] <= 3 for r in rs)
        assert all((r["accuracy_f0"] is not None) == (m in ("conba-all", "conba-deep")) for r in rs)
    assert by["conba-deep"][0]["depth"] == 8 and by["conba-all"][0]["depth"] == 2
    assert gates[(16, 16, 2)]["seeds"] == 2
    res = json.load(open(tmp_path / "results.json"))
    names = {p["comparison"] for p in res["paired"]}
    assert {"control on − off", "Conba − Mamba", "conba-all: as trained − f≡0", "Conba depth 8 − depth 2"} <= names
    header = (tmp_path / "summary.csv").read_text().splitlines()[0].split(",")
    assert header[:9] == ["member", "width", "depth", "heads", "seq_len", "pairs", "vocab", "lr", "seed"]
    assert (tmp_path / "recall-L16-p2-w16.png").exists() and "Pilot gate" in (tmp_path / "recall.md").read_text()
    assert (tmp_path / "recall-L16-p2-w16-paired.png").stat().st_size > 10_000
    # resumable: a second call runs nothing new
    again, _ = recall.main(["--smoke", "--out", str(tmp_path), "--no-progress", "--members", "attention", "mamba",
                            "--resume"])
    assert len(again) == len(rows)
    (tmp_path / "recall.md").unlink()
    reported, _ = recall.main(["--out", str(tmp_path), "--report", "--no-progress"])
    assert len(reported) == len(rows) and "| conba-deep |" in (tmp_path / "recall.md").read_text()


def test_sweep_stops_at_the_first_lr_that_reaches_the_target(monkeypatch):
    from mixcon.eval import recall

    calls = []

    def fake(lr, seed, role, **kw):
        calls.append((lr, seed))
        return dict(member=kw["member"], width=8, seq_len=16, pairs=2, lr=lr, seed=seed, role=role,
                    accuracy=1.0 if lr == 3e-3 else 0.3, val_accuracy=1.0 if lr == 3e-3 else 0.3,
                    steps=10, answer_loss=0.1, accuracy_f0=None, step_time_s=0.01)

    monkeypatch.setattr(recall, "train_member", fake)
    spec = dict(member="mamba", width=8, seq_len=16, pairs=2, seeds=[0, 1, 2], lrs=[1e-3, 3e-3, 1e-2], target=0.99,
                sweep_stop=True, out="unused")
    rows = recall.run_member(spec, {}, None)
    assert calls == [(1e-3, 0), (3e-3, 0), (3e-3, 1), (3e-3, 2)] and len(rows) == 4
    calls.clear()
    recall.run_member(dict(spec, sweep_stop=False), {}, None)
    assert calls == [(1e-3, 0), (3e-3, 0), (1e-2, 0), (3e-3, 1), (3e-3, 2)]


def test_recall_gate_stops_the_cell(tmp_path, capsys):
    from mixcon.eval import recall

    # the smoke passes --no-gate: the gate on, through the parser
    args = recall.build_parser().parse_args(["--out", str(tmp_path / "g"), "--members", "attention", "mamba",
                                             "--cells", "16:2", "--vocab", "32", "--widths", "16", "--steps", "2",
                                             "--batch", "4", "--eval-examples", "8", "--val-examples", "8",
                                             "--seeds", "0", "--lrs", "1e-3", "--no-progress"])
    recall.check_args(args)
    rows, gates = recall.run(args)
    assert not gates[(16, 16, 2)]["passed"] and {r["member"] for r in rows} == {"attention"}
    assert "not run in this cell" in capsys.readouterr().out


def test_study_verb_lists_the_studies_and_refuses_bad_cells(capsys):
    from mixcon.cli import main

    with pytest.raises(SystemExit):
        main(["study", "--help"])
    out = capsys.readouterr().out
    assert all(s in out for s in ("recall", "control", "ablation", "family"))
    assert main(["study", "recall", "--cells", "64:4", "--vocab", "64"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "vocab=64 must be > seq_len=64" in err
    assert main(["study", "recall", "--heads", "3"]) == 2
    assert "--heads 3 must divide" in capsys.readouterr().err


def test_summary_counts_the_seeds_that_solve_the_cell():
    from mixcon.eval.recall import summarize

    base = dict(member="m", width=8, seq_len=16, pairs=2, depth=2, lr=1e-3, answer_loss=0.1, steps=10,
                step_time_s=0.1)
    rows = [dict(base, seed=s, accuracy=a) for s, a in enumerate((0.99, 0.46, 0.95))]
    s, = summarize(rows)
    assert (s["solved"], s["seeds"]) == (2, 3)
    assert summarize(rows, solved_at=0.99)[0]["solved"] == 1


def test_matched_lr_table_pairs_the_runs_at_a_shared_learning_rate():
    from mixcon.eval.recall import final_rows, matched_table

    base = dict(width=8, seq_len=16, pairs=2, steps=3000, answer_loss=1.0)
    on = [dict(base, member="conba-all", lr=lr, seed=0, accuracy=a) for lr, a in ((1e-3, 0.26), (1e-2, 0.46))]
    on += [dict(base, member="conba-all", lr=1e-2, seed=s, accuracy=a) for s, a in ((1, 0.99), (2, 0.5))]
    off = [dict(base, member="conba-noctl", lr=lr, seed=0, accuracy=a) for lr, a in ((1e-3, 0.27), (1e-2, 0.14))]
    off += [dict(base, member="conba-noctl", lr=lr, seed=s, accuracy=a)
            for lr, s, a in ((1e-3, 1, 0.25), (1e-3, 2, 0.24), (1e-2, 1, 0.2), (1e-2, 2, 0.1))]
    rows = on + off
    # chosen: on at 1e-2, off at 1e-3 (its best seed-0 run), so neither rate is the chosen-rate table's
    assert {(r["member"], r["lr"]) for r in final_rows(rows)} == {("conba-all", 1e-2), ("conba-noctl", 1e-3)}
    acc = {p["lr"]: p for p in matched_table(rows) if p["metric"] == "accuracy" and p["a"] == "conba-all"}
    assert set(acc) == {1e-3, 1e-2}
    assert acc[1e-3]["seeds"] == [0] and abs(acc[1e-3]["diffs"][0] - (0.26 - 0.27)) < 1e-12
    assert acc[1e-2]["seeds"] == [0, 1, 2]
    assert [round(d, 6) for d in acc[1e-2]["diffs"]] == [0.32, 0.79, 0.4]
    # a rate that is both members' chosen one is left to the chosen-rate table
    same = [dict(r, lr=1e-2) if r["member"] == "conba-noctl" and r["lr"] == 1e-3 else r for r in rows
            if not (r["member"] == "conba-noctl" and r["lr"] == 1e-2)]
    assert all(p["lr"] != 1e-2 for p in matched_table(same) if p["a"] == "conba-all")


def test_a_run_stopped_part_way_continues_from_its_checkpoint(tmp_path, monkeypatch):
    """A run killed after its second held-out check continues from the checkpoint of the first (the data of
    steps 3.. only, not 1..) and ends exactly as the uninterrupted run; the training noise (conba-all's)
    draws from the restored RNG. A checkpoint of other settings is not resumed."""
    from helpers import dies_at_call
    import torch

    from mixcon.eval import grid, recall

    kw = dict(member="conba-all", width=16, depth=2, seq_len=16, pairs=2, vocab=32, steps=6, batch=4, lr=3e-3,
              warmup=1, seed=3, data_seed=3, eval_examples=16, eval_every=2, val_examples=8, target=2.0,
              extra=dict(control_period=4))
    whole = recall.train_member(**kw, checkpoint_dir=str(tmp_path / "a"))

    real_eval, real_mqar, drawn = recall.evaluate, recall.mqar, []

    monkeypatch.setattr(recall, "evaluate", dies_at_call(real_eval, 2))
    with pytest.raises(KeyboardInterrupt):
        recall.train_member(**kw, checkpoint_dir=str(tmp_path / "b"))
    monkeypatch.setattr(recall, "evaluate", real_eval)
    monkeypatch.setattr(recall, "mqar", lambda seed, *a, **k: drawn.append(seed) or real_mqar(seed, *a, **k))
    torch.manual_seed(12345)  # the resumed run must not depend on the RNG it starts with
    resumed = recall.train_member(**kw, checkpoint_dir=str(tmp_path / "b"))
    assert [s[1] for s in drawn if s[1] < 2**31] == [3, 4, 5, 6]
    assert [s for s, _ in whole["val_curve"]] == [2, 4, 6] and whole["val_curve"][-1][1] == whole["val_accuracy"]
    for k in ("steps", "accuracy", "answer_loss", "accuracy_f0", "answer_loss_f0", "train_loss", "val_accuracy",
              "val_curve"):
        assert resumed[k] == whole[k], k

    ck = grid.Checkpoint(str(tmp_path / "c"), ("x", 1), dict(lr=1.0))
    model, opt = torch.nn.Linear(2, 2), None
    opt = torch.optim.AdamW(model.parameters())
    ck.save(model, opt, dict(step=4))
    assert ck.load(model, opt) == dict(step=4)
    assert grid.Checkpoint(str(tmp_path / "c"), ("x", 1), dict(lr=2.0)).load(model, opt) is None
    ck.clear()
    assert ck.load(model, opt) is None


def test_resume_refuses_runs_made_with_other_settings(tmp_path, capsys):
    """A run is kept by its key alone, so --resume with another --steps (or vocabulary, batch, ...) would
    put two budgets in one table: refused with one line naming both values; the same settings resume."""
    from mixcon.cli import main
    from mixcon.eval import control_study, grid

    grid.RunLog(str(tmp_path), resume=False).add(("attention", 16, 16, 2, 1e-3, 0), dict(
        member="attention", lr=1e-3, seed=0, max_steps=3, vocab=32, batch=4))
    assert main(["study", "recall", "--cells", "16:2", "--vocab", "32", "--batch", "4", "--steps", "5", "--out",
                 str(tmp_path), "--resume", "--members", "attention", "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "--steps 3" in err and "--steps 5" in err
    (tmp_path / "s").mkdir()
    grid.RunLog(str(tmp_path / "s"), resume=False).add(("mamba", 0), dict(member="mamba", seed=0, max_steps=30,
                                                                          seq_len=48, batch=8))
    with pytest.raises(SystemExit):
        control_study.main(["shift", "--members", "mamba", "--steps", "30", "--seq-len", "48", "--batch", "4",
                            "--resume", "--out", str(tmp_path / "s"), "--no-progress"])
    assert "--batch 8" in capsys.readouterr().err
