"""lm-evaluation-harness on the tiny model with an offline task set (local JSONL + YAML).

Checks that the three request kinds run, that batching (right padding for log-likelihoods, left
padding for generation) gives what one request at a time gives, that a multiple-choice
log-likelihood equals our own computation, and that ``lm_eval --model hf`` loads a saved MixCon
in a fresh process through trust_remote_code.
"""

import glob
import json
import os
import subprocess
import sys
import sysconfig

import pytest
import torch

pytest.importorskip("lm_eval")

from helpers import ROOT, randomize_, tiny_config  # noqa: E402

STDLIB = sorted(glob.glob(os.path.join(sysconfig.get_paths()["stdlib"], "*.py")))

WORDS = ["alpha", "beta", "gamma", "delta", "import os", "def main():", "return None", "class Foo:", "self.x = 1"]


def _task_files(d):
    """Three offline tasks: multiple choice, generate-until and rolling log-likelihood."""
    g = torch.Generator().manual_seed(0)
    pick = lambda: WORDS[int(torch.randint(len(WORDS), (1,), generator=g))]  # noqa: E731
    mc = [{"question": f"{pick()} {pick()} then", "choices": [pick(), pick() + " " + pick(), pick()],
           "label": int(torch.randint(3, (1,), generator=g))} for _ in range(6)]
    gen = [{"prompt": f"{pick()} {pick()}", "answer": pick()} for _ in range(5)]
    roll = [{"text": " ".join(pick() for _ in range(int(torch.randint(3, 12, (1,), generator=g))))} for _ in range(5)]
    for name, rows in (("mc", mc), ("gen", gen), ("roll", roll)):
        with open(d / f"{name}.jsonl", "w") as f:
            f.writelines(json.dumps(r) + "\n" for r in rows)
    common = lambda name: (f"dataset_path: json\ndataset_kwargs:\n  data_files:\n    test: {d / name}.jsonl\n"  # noqa: E731
                           "test_split: test\n")
    (d / "mc.yaml").write_text(
        "task: mixcon_offline_mc\noutput_type: multiple_choice\n" + common("mc")
        + "doc_to_text: '{{question}}'\ndoc_to_choice: '{{choices}}'\ndoc_to_target: label\n"
        "metric_list:\n  - metric: acc\n")
    (d / "gen.yaml").write_text(
        "task: mixcon_offline_gen\noutput_type: generate_until\n" + common("gen")
        + "doc_to_text: '{{prompt}}'\ndoc_to_target: '{{answer}}'\n"
        "generation_kwargs:\n  until: ['\\n']\n  max_gen_toks: 6\n  do_sample: false\n"
        "metric_list:\n  - metric: exact_match\n")
    (d / "roll.yaml").write_text(
        "task: mixcon_offline_roll\noutput_type: loglikelihood_rolling\n" + common("roll")
        + "doc_to_text: ''\ndoc_to_target: '{{text}}'\n"
        "metric_list:\n  - metric: word_perplexity\n  - metric: bits_per_byte\n")


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    from transformers import AutoTokenizer

    from mixcon import MixConForCausalLM
    from mixcon.train.tokenizer import train_tokenizer

    d = tmp_path_factory.mktemp("harness")
    train_tokenizer(STDLIB[:20], str(d / "model"), vocab_size=400, input_sentence_size=30_000)
    tok = AutoTokenizer.from_pretrained(d / "model")
    torch.manual_seed(0)
    cfg = tiny_config(vocab_size=len(tok), max_position_embeddings=256, bos_token_id=tok.bos_token_id,
                      eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    model = randomize_(MixConForCausalLM(cfg), scale=0.2).eval()
    model.save_pretrained(d / "model")
    tasks = d / "tasks"
    tasks.mkdir()
    _task_files(tasks)
    return d, model, tok


def _samples(res, task):
    return res["samples"][task]


NAMES = ["mixcon_offline_mc", "mixcon_offline_gen", "mixcon_offline_roll"]


def _batched_equals_unbatched(model, tok, tasks):
    from mixcon.eval.harness import evaluate

    runs = [evaluate(model, tok, NAMES, include_path=str(tasks), batch_size=bs, log_samples=True)
            for bs in (1, 4)]
    for name in ("mixcon_offline_mc", "mixcon_offline_roll"):
        for s1, s4 in zip(_samples(runs[0], name), _samples(runs[1], name)):
            ll1 = [r[0][0] if isinstance(r[0], (list, tuple)) else r[0] for r in s1["resps"]]
            ll4 = [r[0][0] if isinstance(r[0], (list, tuple)) else r[0] for r in s4["resps"]]
            assert ll1 == pytest.approx(ll4, rel=1e-4, abs=1e-4), name
    gen1 = [s["resps"] for s in _samples(runs[0], "mixcon_offline_gen")]
    gen4 = [s["resps"] for s in _samples(runs[1], "mixcon_offline_gen")]
    assert gen1 == gen4  # left-padded batched greedy generation == one prompt at a time
    return runs


@pytest.mark.parametrize("config", ["mod-tiny.json", "mom-tiny.json", "smlp-tiny.json"])
def test_members_through_the_harness_batched_equal_unbatched(saved, config):
    from mixcon import MixConConfig, MixConForCausalLM

    d, _, tok = saved
    kw = json.load(open(os.path.join(ROOT, "mixcon", "configs", config)))
    kw.pop("model_type")
    kw.update(vocab_size=len(tok), bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
              pad_token_id=tok.pad_token_id, max_position_embeddings=256)
    torch.manual_seed(0)
    model = randomize_(MixConForCausalLM(MixConConfig(**kw)), scale=0.05).eval()
    runs = _batched_equals_unbatched(model, tok, d / "tasks")
    assert runs[0]["results"]["mixcon_offline_roll"]["word_perplexity,none"] > 1.0


def test_three_request_kinds_batched_equal_unbatched(saved):
    d, model, tok = saved
    names = NAMES
    runs = _batched_equals_unbatched(model, tok, d / "tasks")
    for name in names:
        assert name in runs[0]["results"]
    assert 0.0 <= runs[0]["results"]["mixcon_offline_mc"]["acc,none"] <= 1.0
    assert runs[0]["results"]["mixcon_offline_roll"]["word_perplexity,none"] > 1.0
    gen1 = [s["resps"] for s in _samples(runs[0], "mixcon_offline_gen")]
    assert any(r[0][0] for r in gen1)  # something was generated

    # one multiple-choice log-likelihood against our own computation
    s = _samples(runs[1], "mixcon_offline_mc")[0]
    doc = s["doc"]
    ctx, cont = doc["question"], " " + doc["choices"][0]
    ctx_ids = tok(ctx, add_special_tokens=False).input_ids
    whole = tok(ctx + cont, add_special_tokens=False).input_ids
    cont_ids = whole[len(ctx_ids):]
    ids = torch.tensor([ctx_ids + cont_ids])
    with torch.no_grad():
        logp = torch.log_softmax(model(ids).logits[0, :-1].double(), -1)
    ours = sum(logp[len(ctx_ids) - 1 + i, t].item() for i, t in enumerate(cont_ids))
    theirs = s["resps"][0][0][0]
    assert theirs == pytest.approx(ours, rel=1e-4, abs=1e-4)


def test_lm_eval_cli_hf_model_in_a_fresh_process(saved, tmp_path):
    d, _, _ = saved
    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "lm_eval", "--model", "hf", "--model_args",
           f"pretrained={d / 'model'},trust_remote_code=True,dtype=float32,max_length=256", "--device", "cpu",
           "--tasks", "mixcon_offline_mc", "--include_path", str(d / "tasks"), "--batch_size", "2",
           "--output_path", str(out)]
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    res = subprocess.run(cmd, capture_output=True, text=True, cwd=tmp_path, env=env, timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    results = [json.load(open(p)) for p in glob.glob(str(out / "**" / "results*.json"), recursive=True)]
    assert results and "mixcon_offline_mc" in results[0]["results"]
