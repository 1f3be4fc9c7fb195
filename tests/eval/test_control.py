"""Issue 27's controller instruments (mixcon/eval/control.py), the reference loop's per-step internals
and the studies' data and drivers (mixcon/eval/control_study.py, recall --control-period / --resume).
Control is tested over >= 4·P tokens: it acts only at sampling instants."""

import json
import math

import numpy as np
import pytest
import torch

from helpers import conba_inputs
from mixcon.ops.conba.naive import conba_scan_ref


P = 4
T = 4 * P + 3  # four sampling instants and a partial period


@pytest.mark.parametrize("period", [1, P])
def test_internals_replay_the_gain_law_by_hand(period):
    x = conba_inputs(b=2, T=T, d=16, n=4, G=8, dtype=torch.float64, mechanisms=("control", "delay", "scaling"), seed=3)
    x["k_max"] = 5.0  # the clamp stays in the law, but the gain keeps moving (k_max = 0.8 saturates it)
    y_plain = conba_scan_ref(**x, control_period=period)
    y, sig = conba_scan_ref(**x, control_period=period, return_internals=True)
    assert torch.equal(y, y_plain)  # the option changes nothing else
    # y_ssm is y before the gate; e is y_ssm − w_r · u
    assert torch.allclose(sig["y_ssm"] * torch.nn.functional.silu(x["z"]), y, rtol=0, atol=1e-12)
    e = sig["y_ssm"] - x["w_r"].double() * x["u"]
    assert torch.allclose(sig["e"], e, rtol=0, atol=1e-12)
    # replay: k changes only at every period-th step, by the clamped law on the group RMS of e
    eta, lam, k_max, G = x["eta"].double(), x["lam"].double(), x["k_max"], 8
    k = x["k0"].double().expand(2, -1).clone()
    held_e = torch.zeros(2, 16, dtype=torch.float64)
    assert torch.allclose(sig["k"][:, 0], k, rtol=0, atol=1e-12)
    moved = 0
    for t in range(T):
        f = k.repeat_interleave(G, -1) * torch.tanh(held_e)
        assert torch.allclose(sig["f"][:, t], f, rtol=0, atol=1e-12), t
        if (t + 1) % period == 0:
            rms = e[:, t].view(2, -1, G).pow(2).sum(-1).add(1e-12).sqrt() / math.sqrt(G)
            k_new = ((1 - lam) * k + eta * rms).clamp(0.0, k_max)
            moved += int(not torch.allclose(k_new, k))
            k, held_e = k_new, e[:, t]
        assert torch.allclose(sig["k"][:, t + 1], k, rtol=0, atol=1e-12), t
    assert moved >= 4


def test_internals_without_control_are_zero():
    x = conba_inputs(b=1, T=T, d=16, n=4, dtype=torch.float64, mechanisms=("delay",), seed=1)
    y, sig = conba_scan_ref(**x, return_internals=True)
    assert torch.count_nonzero(sig["f"]) == 0 and torch.count_nonzero(sig["e"]) == 0
    assert torch.equal(y, conba_scan_ref(**x))


def _model(**kw):
    from mixcon import MixConForCausalLM
    from mixcon.eval.recall import member_config

    torch.manual_seed(0)
    return MixConForCausalLM(member_config("conba-all", 16, 2, 32, 4 * P + 8, dict(control_period=P, **kw)))


def test_effect_is_zero_without_gain_and_matches_the_layer():
    from mixcon.eval import control

    model = _model()
    ids = torch.randint(0, 32, (2, T))
    mixer = control.conba_mixers(model)[0]
    hidden = torch.randn(2, T, 16)
    sig = control.mixer_signals(mixer, hidden)
    # the instrument's "on" output is the layer's own forward (the production scan, an independent path)
    with torch.no_grad():
        mixer.eval()
        ref = mixer(hidden).double()
    assert torch.allclose(sig["series"]["out"], ref, rtol=1e-4, atol=1e-6)
    assert sig["effect"] > 0 and sig["feedback"] > 0 and sig["k_max_dev"] > 0 and sig["state_share"] > 0
    with torch.no_grad():  # no gain ever: k0 = 0 and η = softplus(−200) ≈ 1e-87
        mixer.k0.zero_()
        mixer.eta_raw.fill_(-200.0)
    sig = control.mixer_signals(mixer, hidden)
    assert sig["effect"] < 1e-12 and sig["feedback"] < 1e-12 and sig["k_max_dev"] < 1e-12
    rows = control.model_signals(model, ids)
    assert [r["layer"] for r in rows] == [0, 1]
    with pytest.raises(ValueError, match="control=False"):
        control.mixer_signals(control.conba_mixers(_model(control=False))[0], hidden)


def test_live_init_gives_the_controller_a_larger_share():
    from mixcon.eval import control

    ids = torch.randint(0, 32, (2, 4 * P + 8))
    spec = control.model_signals(_model(), ids)
    live = control.model_signals(_model(control_init="live"), ids)
    for s, v in zip(spec, live):
        assert v["k_start"] == pytest.approx(0.5) and s["k_start"] == 0
        assert v["feedback"] > 3 * s["feedback"] and v["effect"] > 3 * s["effect"]
    with pytest.raises(ValueError, match="control_init"):
        _model(control_init="loud")


def test_piecewise_unigram():
    from mixcon.eval.control_study import piecewise_unigram

    x, change = piecewise_unigram(5, 6, 200, 64, support=4)
    x2, change2 = piecewise_unigram(5, 6, 200, 64, support=4)
    assert (x == x2).all() and (change == change2).all()
    assert ((change >= 50) & (change < 150)).all()
    for row, c in zip(x, change):
        assert len(set(row[:c])) <= 4 and len(set(row[c:])) <= 4 and set(row[:c]) != set(row[c:])
    y, since = piecewise_unigram(5, 2, 300, 64, support=4, changes="many", segment=30)
    assert since.shape == y.shape and len(set(y[0])) > 8 and (since[:, 0] == 0).all()
    for row, s in zip(y, since):
        starts = np.flatnonzero(s == 0)
        assert len(starts) > 4 and (np.diff(s)[np.diff(s) != 1] == -s[:-1][np.diff(s) != 1]).all()  # +1 or reset
        segments = np.split(row, starts[1:])
        assert all(len(set(seg)) <= 4 for seg in segments)
        assert any(set(a) != set(b) for a, b in zip(segments, segments[1:]))
    assert (piecewise_unigram(5, 2, 300, 64, support=4, changes="many", segment=30)[0] == y).all()


def test_extrapolation_windows(tmp_path, monkeypatch):
    """The window losses of an extrapolation run select the targets 0–16 and >= 64 tokens after a change,
    at each length: checked against the stream's own segments, with per-token losses that name the target
    (the token's id) in place of the model's."""
    from mixcon.eval import control_study

    monkeypatch.setattr(control_study, "_token_losses", lambda model, ids, batch: ids[:, 1:].astype(float))
    a = dict(vocab=64, support=4, train_len=32, eval_lens=[160, 320], segment=48, width=16, depth=2, steps=2,
             batch=2, lr=1e-3, warmup=1, eval_every=2, eval_examples=3, bin=32, out=str(tmp_path), seeds=[1])
    row = control_study.run_extrapolation("conba-all", 0, a)
    x, since = control_study.piecewise_unigram((0, 2**32 - 1), 3, 320, 64, 4, "many", 48)
    for n in (32, 160, 320):
        fresh = [x[i, t] for i in range(3) for t in range(1, n) if since[i, t] < 16]
        settled = [x[i, t] for i in range(3) for t in range(1, n) if since[i, t] >= 64]
        assert row[f"loss_after_0_16_{n}"] == pytest.approx(np.mean(fresh))
        assert math.isnan(row[f"loss_after_64_end_{n}"]) if not settled else (
            row[f"loss_after_64_end_{n}"] == pytest.approx(np.mean(settled)))
    assert len([t for t in range(1, 320) if since[0, t] >= 64]) > 20  # the window is not empty at 320
    assert row["loss_after_0_16_320_f0"] == pytest.approx(row["loss_after_0_16_320"])  # the same fake losses
    assert (math.isnan(row["after_64_gap"]) and math.isnan(row["loss_after_64_end_32"])) or (
        row["after_64_gap"] == pytest.approx(row["loss_after_64_end_32"] - math.log(4)))


def test_extrapolation_smoke(tmp_path):
    from mixcon.eval import control_study

    rows = control_study.main(["extrapolation", "--smoke", "--members", "mamba", "conba-all", "--no-progress",
                               "--out", str(tmp_path)])
    mamba, conba = rows
    assert mamba["loss_128_f0"] is None and isinstance(conba["loss_128_f0"], float)
    assert conba["after_64_gap"] == pytest.approx(conba["loss_after_64_end_32"] - math.log(8), nan_ok=True)
    md = (tmp_path / "extrapolation.md").read_text()
    assert "loss_after_0_16_128" in md and "conba-all: as trained − f≡0 | loss_after_0_16_128 |" in md


def test_study_smoke_and_resume(tmp_path):
    from mixcon.eval import control_study, recall

    rows = control_study.main(["shift", "--smoke", "--members", "mamba", "conba-all", "--no-progress",
                               "--seq-len", "48", "--out", str(tmp_path / "s")])
    assert [r["member"] for r in rows] == ["mamba", "conba-all"] and all(r["loss_after"] > 0 for r in rows)
    assert (tmp_path / "s" / "shift.md").exists() and (tmp_path / "s" / "runs.jsonl").exists()
    assert (tmp_path / "s" / "shift-paired.png").stat().st_size > 10_000  # Conba − Mamba, as trained − f≡0
    (tmp_path / "s" / "shift.md").unlink()
    reported = control_study.main(["shift", "--smoke", "--members", "attention", "--no-progress", "--seq-len", "48",
                                   "--out", str(tmp_path / "s"), "--report"])  # trains nothing, reports every run
    key = lambda rs: [(r["member"], r["seed"], r["loss_after"]) for r in rs]  # noqa: E731
    assert key(reported) == key(rows) and (tmp_path / "s" / "shift.md").exists()
    out = str(tmp_path / "r")
    args = ["--smoke", "--members", "mamba", "conba-live", "--control-period", "2", "--out", out, "--no-progress",
            "--lrs", "1e-3"]
    rows, _ = recall.main(args + ["--seeds", "0"])
    assert all(r["control_period"] == 2 for r in rows)
    assert rows[1]["ctl_effect"] > 0 and rows[0]["ctl_effect"] is None
    again, _ = recall.main(args + ["--resume", "--seeds", "0", "1"])  # seed 0 kept, seed 1 run
    assert sorted((r["member"], r["seed"]) for r in again) == [("conba-live", 0), ("conba-live", 1), ("mamba", 0),
                                                              ("mamba", 1)]
    assert [json.loads(line)["key"][5] for line in open(f"{out}/runs.jsonl")] == [0, 0, 1, 1]
    assert next(r for r in again if r["seed"] == 0 and r["member"] == "mamba") == rows[0]


def test_a_shift_run_stopped_part_way_continues_from_its_checkpoint(tmp_path, monkeypatch):
    """Killed at its second stop check (step 4), the run resumes from the checkpoint of step 2, ends exactly
    as the uninterrupted run (conba-all's training noise included), and its checkpoint is gone once the run
    is in the log."""
    from helpers import dies_at_call
    from mixcon.eval import control_study

    args = ["shift", "--members", "conba-all", "--width", "16", "--steps", "6", "--batch", "2", "--seeds", "0",
            "--eval-examples", "2", "--val-examples", "2", "--eval-every", "2", "--seq-len", "48", "--no-progress"]
    whole = control_study.main(args + ["--out", str(tmp_path / "a")])[0]
    assert whole["steps"] == 6
    real = control_study._token_losses

    monkeypatch.setattr(control_study, "_token_losses", dies_at_call(real, 2))
    with pytest.raises(KeyboardInterrupt):
        control_study.main(args + ["--out", str(tmp_path / "b")])
    assert len(list((tmp_path / "b" / "checkpoints").iterdir())) == 1
    monkeypatch.setattr(control_study, "_token_losses", real)
    gen, drawn = control_study.piecewise_unigram, []
    monkeypatch.setattr(control_study, "piecewise_unigram", lambda seed, *a, **k: drawn.append(seed) or gen(seed, *a, **k))
    resumed = control_study.main(args + ["--out", str(tmp_path / "b"), "--resume"])[0]
    assert [s[1] for s in drawn if s[1] < 2**31] == [3, 4, 5, 6]  # the steps after the checkpoint only
    for k in ("steps", "train_loss", "loss_before", "loss_after", "loss_after_f0", "ctl_effect"):
        assert resumed[k] == whole[k], k
    assert not list((tmp_path / "b" / "checkpoints").iterdir())
