"""The `mixcon` command: every verb's happy path and its bad-input path (one line on stderr, exit 2, no
traceback). The training run (the built-in recipe, 20 steps, from an empty directory: tokenizer, data,
model) is made once and shared by generate, eval and export."""

import json
import os
import subprocess
import sys

import pytest
import torch

from helpers import ROOT

VERBS = ["train", "generate", "eval", "export", "convert", "prepare-data", "train-tokenizer", "bench", "study",
         "layout", "demo"]


def cli(*args, cwd=None, timeout=300):
    env = {**os.environ, "PYTHONPATH": ROOT, "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "-m", "mixcon", *args], capture_output=True, text=True, cwd=cwd,
                          env=env, timeout=timeout, stdin=subprocess.DEVNULL)


def run_main(capsys, *args):
    from mixcon.cli import main

    rc = main(list(args))
    out, err = capsys.readouterr()
    return rc, out, err


def assert_usage_error(rc, err, *words):
    assert rc == 2, (rc, err)
    lines = [x for x in err.strip().splitlines() if x.strip()]
    assert "Traceback" not in err and len(lines) == 1, err
    for w in words:
        assert w in err, (w, err)


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    """`mixcon train max_steps=20 out_dir=...` from an empty directory: the built-in recipe end to end."""
    cwd = tmp_path_factory.mktemp("cwd")
    res = cli("train", "--no-progress", "max_steps=20", "eval_every=10", "save_every=10", "out_dir=run", cwd=cwd)
    assert res.returncode == 0, res.stderr[-3000:]
    return cwd / "run", res


# ---------------------------------------------------------------------------------------------- the command
def test_bare_command_and_help_list_every_verb(capsys):
    rc, out, _ = run_main(capsys)
    assert rc == 0 and all(v in out for v in VERBS)
    res = cli("--help")
    assert res.returncode == 0 and all(v in res.stdout for v in VERBS)


@pytest.mark.parametrize("verb", VERBS)
def test_every_verb_has_help(verb, capsys):
    from mixcon.cli import main

    with pytest.raises(SystemExit) as exc:
        main([verb, "--help"])
    assert exc.value.code == 0 and "usage: mixcon " + verb in capsys.readouterr().out


# ---------------------------------------------------------------------------------------------- train
def test_train_writes_a_loadable_model_log_plot_and_sample(run_dir):
    run, res = run_dir
    for f in ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"):
        assert (run / "model" / f).exists(), f
    assert (run / "loss.png").exists() and (run / "log.csv").exists()
    assert "held-out loss:" in res.stdout and "sample:" in res.stdout
    rows = (run / "log.csv").read_text().splitlines()
    assert len(rows) == 21  # header + 20 steps


def test_train_bad_inputs(tmp_path, capsys):
    rc, _, err = run_main(capsys, "train", "max_steps=abc")
    assert_usage_error(rc, err, "max_steps", "integer")
    rc, _, err = run_main(capsys, "train", "no_such_field=1")
    assert_usage_error(rc, err, "no_such_field", "allowed")
    rc, _, err = run_main(capsys, "train", "--recipe", str(tmp_path))
    assert_usage_error(rc, err, "directory")
    (tmp_path / "r.yaml").write_text("max_steps: [1\n")
    rc, _, err = run_main(capsys, "train", "--recipe", str(tmp_path / "r.yaml"))
    assert_usage_error(rc, err, "not valid YAML")
    (tmp_path / "b.yaml").write_bytes(b"\xff\xfe max_steps: 1")
    rc, _, err = run_main(capsys, "train", "--recipe", str(tmp_path / "b.yaml"))
    assert_usage_error(rc, err, "not UTF-8")
    rc, _, err = run_main(capsys, "train", "model_config=nope", f"out_dir={tmp_path / 'x'}")
    assert_usage_error(rc, err, "nope", "shipped")
    rc, _, err = run_main(capsys, "train", f"out_dir={tmp_path / 'x'}", "corpus=null", f"data={tmp_path}")
    assert_usage_error(rc, err, "tokenizer", "mixcon train-tokenizer")


def test_train_refuses_a_bad_model_config_before_training(tmp_path, capsys):
    (tmp_path / "c.json").write_text(json.dumps({"hidden_size": "64"}))
    from mixcon.train.loop import build_model
    from mixcon.train.recipe import load_recipe
    from mixcon.resources import UsageError

    r = load_recipe("tiny", [f"model_config={tmp_path / 'c.json'}", f"out_dir={tmp_path}"])
    with pytest.raises(UsageError, match="hidden_size"):
        build_model(r, 100)


# ---------------------------------------------------------------------------------------------- generate
def test_generate_streams_text(run_dir):
    run, _ = run_dir
    res = cli("generate", str(run / "model"), "--prompt", "def ", "--max-new-tokens", "8", "--temperature", "0")
    assert res.returncode == 0, res.stderr[-2000:]
    assert res.stdout.startswith("def ") and len(res.stdout) > len("def ")  # the prompt, then its continuation


def test_generate_static_cache_gives_the_dynamic_tokens(run_dir, capsys):
    run, _ = run_dir
    out = []
    for flag in ([], ["--static"]):
        rc, text, err = run_main(capsys, "generate", str(run / "model"), "--prompt", "import ", "--max-new-tokens", "6",
                                 "--temperature", "0", *flag)
        assert rc == 0, err
        out.append(text)
    assert out[0] == out[1]


def test_generate_bad_inputs(run_dir, tmp_path, capsys):
    run, _ = run_dir
    rc, _, err = run_main(capsys, "generate", str(tmp_path / "none"), "--prompt", "x")
    assert_usage_error(rc, err, "not a directory")
    rc, _, err = run_main(capsys, "generate", str(run), "--prompt", "x")
    assert_usage_error(rc, err, "no config.json", "model")  # the run directory: names OUT/model
    rc, _, err = run_main(capsys, "generate", str(run / "model"), "--prompt", "")
    assert_usage_error(rc, err, "prompt is empty")
    with pytest.raises(SystemExit) as exc:
        run_main(capsys, "generate", str(run / "model"), "--prompt", "x", "--max-new-tokens", "0")
    assert exc.value.code == 2


# ---------------------------------------------------------------------------------------------- eval
def test_eval_runs_a_local_task(run_dir, tmp_path, capsys):
    pytest.importorskip("lm_eval")
    run, _ = run_dir
    rows = [{"question": f"def f{i}(x):", "choices": ["return x", "pass", "import os"], "label": i % 3}
            for i in range(4)]
    (tmp_path / "mc.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (tmp_path / "mc.yaml").write_text(
        "task: mixcon_cli_mc\noutput_type: multiple_choice\ndataset_path: json\ndataset_kwargs:\n  data_files:\n"
        f"    test: {tmp_path / 'mc.jsonl'}\ntest_split: test\ndoc_to_text: '{{{{question}}}}'\n"
        "doc_to_choice: '{{choices}}'\ndoc_to_target: label\nmetric_list:\n  - metric: acc\n")
    rc, out, err = run_main(capsys, "eval", str(run / "model"), "--tasks", "mixcon_cli_mc", "--include_path",
                            str(tmp_path), "--output", str(tmp_path / "res.json"))
    assert rc == 0, err
    assert "mixcon_cli_mc" in out and 0 <= json.load(open(tmp_path / "res.json"))["results"]["mixcon_cli_mc"]["acc,none"] <= 1


def test_eval_bad_inputs(run_dir, tmp_path, capsys):
    run, _ = run_dir
    rc, _, err = run_main(capsys, "eval", str(tmp_path / "none"), "--tasks", "x")
    assert_usage_error(rc, err, "not a directory")
    rc, _, err = run_main(capsys, "eval", str(run / "model"), "--tasks", "x", "--include_path", str(tmp_path / "no"))
    assert_usage_error(rc, err, "--include_path")


# ---------------------------------------------------------------------------------------------- export
def test_export_a_run_with_its_tokenizer(run_dir, tmp_path, capsys):
    run, _ = run_dir
    rc, out, err = run_main(capsys, "export", str(run), str(tmp_path / "exp"), "--dtype", "fp32")
    assert rc == 0, err
    assert (tmp_path / "exp" / "model.safetensors").exists() and (tmp_path / "exp" / "tokenizer.json").exists()
    rc, _, err = run_main(capsys, "export", str(tmp_path), str(tmp_path / "exp2"))
    assert_usage_error(rc, err, "neither a checkpoint")


# ---------------------------------------------------------------------------------------------- data, tokenizer
def test_train_tokenizer_and_prepare_data(tmp_path, capsys):
    import glob
    import sysconfig

    files = sorted(glob.glob(os.path.join(sysconfig.get_paths()["stdlib"], "*.py")))[:6]
    (tmp_path / "docs.jsonl").write_text("".join(json.dumps({"text": open(f).read()[:2000]}) + "\n" for f in files))
    rc, out, err = run_main(capsys, "train-tokenizer", str(tmp_path / "tok"), *files, str(tmp_path / "docs.jsonl"),
                            "--vocab-size", "500")
    assert rc == 0 and "500-token tokenizer" in out, err
    rc, out, err = run_main(capsys, "prepare-data", *files, str(tmp_path / "docs.jsonl"), "--tokenizer",
                            str(tmp_path / "tok"), "--out", str(tmp_path / "data"), "--heldout", "0.2")
    assert rc == 0 and "train:" in out, err
    rc, _, err = run_main(capsys, "prepare-data", str(tmp_path), "--tokenizer", str(tmp_path / "tok"), "--out", "x")
    assert_usage_error(rc, err, "directory")
    rc, _, err = run_main(capsys, "prepare-data", files[0], "--tokenizer", str(tmp_path), "--out", "x")
    assert_usage_error(rc, err, "--tokenizer")
    rc, _, err = run_main(capsys, "train-tokenizer", str(tmp_path / "t2"), files[0], "--vocab-size", "100")
    assert_usage_error(rc, err, "vocab_size")


# ---------------------------------------------------------------------------------------------- layout, demo
def test_layout_by_name_from_anywhere(tmp_path):
    res = cli("layout", "mixcon-1b", cwd=tmp_path)
    assert res.returncode == 0 and res.stdout.count("block ") == 4 and "layer  31" in res.stdout, res.stderr


@pytest.mark.parametrize("content,words", [
    (b"model_type: mixcon\nhidden_size: 64\n", ["not valid JSON", "YAML"]),
    (b"\xff\xfe{}", ["not UTF-8"]),
    (b'{"hidden_sise": 64}', ["hidden_sise", "hidden_size"]),
    (b'{"hidden_size": "64"}', ["hidden_size", "integer"]),
    (b"[1, 2]", ["JSON list", "object"]),
])
def test_layout_bad_config_files(tmp_path, capsys, content, words):
    (tmp_path / "c.json").write_bytes(content)
    rc, _, err = run_main(capsys, "layout", str(tmp_path / "c.json"))
    assert_usage_error(rc, err, *words)


def test_layout_bad_names(tmp_path, capsys):
    rc, _, err = run_main(capsys, "layout", "no-such-config")
    assert_usage_error(rc, err, "shipped", "mixcon-1b")
    rc, _, err = run_main(capsys, "layout", str(tmp_path))
    assert_usage_error(rc, err, "directory")


def test_demo(capsys):
    rc, out, err = run_main(capsys, "demo", "--context", "128", "--new-tokens", "3")
    assert rc == 0 and "smaller for MixCon" in out, err
    rc, _, err = run_main(capsys, "demo", "--config", "nope")
    assert_usage_error(rc, err, "shipped")


# ---------------------------------------------------------------------------------------------- bench
def test_bench_kv_cache_and_moe_smoke(tmp_path, capsys):
    rc, out, err = run_main(capsys, "bench", "kv-cache", "--context", "1024", "--models", "llama-2-70b",
                            "mixcon-paper", "--out", str(tmp_path / "kv"))
    assert rc == 0 and "mixcon-paper" in out, err
    rc, out, err = run_main(capsys, "bench", "moe", "--smoke", "--out", str(tmp_path / "moe"))
    assert rc == 0, err
    meta = json.load(open(tmp_path / "moe" / "results.json"))["meta"]
    assert {"rev", "device", "torch", "transformers"} <= set(meta)
    assert not any(str(v).startswith("/") or " /" in str(v) for v in meta.values()), meta  # no absolute paths


@pytest.mark.parametrize("which", ["conba", "conba-tune"])
def test_bench_conba_runs_from_the_package(which, capsys, monkeypatch):
    """The Conba benchmarks are package modules (a wheel has no tools/): their options parse, and on a
    CPU without --smoke they stop with one line saying they measure a GPU."""
    with pytest.raises(SystemExit) as exc:
        run_main(capsys, "bench", which, "--help")
    assert exc.value.code == 0 and "--d-inner" in capsys.readouterr().out
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(SystemExit) as exc:
        run_main(capsys, "bench", which, "--batch", "1")
    assert str(exc.value.code).startswith(f"mixcon bench {which} ") and "GPU" in str(exc.value.code)


def test_bench_bad_inputs(capsys):
    with pytest.raises(SystemExit) as exc:
        run_main(capsys, "bench", "nope")
    assert exc.value.code == 2
    with pytest.raises(SystemExit) as exc:
        run_main(capsys, "bench", "throughput", "--config", "mixcon-1b", "--no-such-option")
    assert exc.value.code == 2


# ---------------------------------------------------------------------------------------------- convert
def test_convert_bad_source(tmp_path, capsys):
    rc, _, err = run_main(capsys, "convert", "jamba", str(tmp_path / "none"), str(tmp_path / "out"))
    assert_usage_error(rc, err, "not a checkpoint directory")


def test_bench_conba_cpu_smoke(tmp_path, capsys):
    """`mixcon bench conba-cpu` at toy sizes: every part runs, each row beside its baseline, the header
    and the results files written (no absolute paths)."""
    out = tmp_path / "cpu"
    rc, stdout, err = run_main(capsys, "bench", "conba-cpu", "--parts", "layer", "model", "scan", "--layer-T", "64",
                               "--model-T", "64", "--scan-T", "16", "--reps", "1", "--decode-tokens", "2",
                               "--threads", "1", "--out", str(out))
    assert rc == 0, err
    import json

    res = json.loads((out / "results.json").read_text())
    parts = {r["part"] for r in res["rows"]}
    assert parts == {"layer fwd+bwd", "model", "scan fwd+bwd"}
    model = next(r for r in res["rows"] if r["part"] == "model")
    assert model["attn_decode_ms"] > 0 and model["hybrid_decode_ms"] > 0 and model["decode_speedup"] > 0
    assert model["decode_roofline"] > 0
    assert res["meta"]["threads"] == 1 and str(tmp_path) not in (out / "results.json").read_text()


def test_decode_bytes_counts_weights_cache_and_state():
    """The roofline's bytes per decode token: the cache term grows with the context by each attention
    layer's keys and values, the weights by every parameter but the unread embedding rows."""
    from mixcon.bench.conba_cpu import decode_bytes, model_configs
    from mixcon.models.modeling_mixcon import MixConForCausalLM

    cfgs = model_configs(hidden=64, layers=8, intermediate=128, max_ctx=1024)
    for name, cfg in cfgs.items():
        m = MixConForCausalLM(cfg)
        n_attn = cfg.layers_block_type.count("attention")
        per_token = 2 * n_attn * cfg.num_key_value_heads * (cfg.hidden_size // cfg.num_attention_heads) * 4
        assert decode_bytes(m, 300) - decode_bytes(m, 100) == 200 * per_token
        weights = sum(p.numel() for p in m.parameters()) - (cfg.vocab_size - 1) * cfg.hidden_size
        assert decode_bytes(m, 0) >= weights * 4


def test_bench_decode_smoke(tmp_path, capsys):
    """`mixcon bench decode` at a toy size: the three decode paths (which must pick the same tokens) and the
    roofline in one row per model and context; the compiled path through dynamo's eager backend here (the
    bench's default, inductor, compiles for about a minute on this CPU)."""
    out = tmp_path / "decode"
    rc, stdout, err = run_main(capsys, "bench", "decode", "--models", "tiny", "--T", "16", "--tokens", "2",
                               "--reps", "1", "--backend", "eager", "--out", str(out))
    assert rc == 0, err
    import json

    res = json.loads((out / "results.json").read_text())
    (row,) = res["rows"]
    assert (row["model"], row["T"], row["tokens"]) == ("tiny", 16, 2)
    for k in ("eager_ms", "static_ms", "compiled_ms", "roofline_ms", "compile_s"):
        assert row[k] > 0, k
    assert "eager_ms\tstatic_ms\tcompiled_ms\troofline_ms" in stdout


def test_bench_decode_bad_inputs(capsys):
    for args, words in ((("--T", "0"), ("--T",)), (("--tokens", "0"), ("--tokens",)),
                        (("--models", "nope"), ("--models", "nope"))):
        with pytest.raises(SystemExit) as exc:
            run_main(capsys, "bench", "decode", *args)
        assert exc.value.code == 2
        err = capsys.readouterr().err
        assert all(w in err for w in words), err
