"""Tokenizer, data preparation and the training tool, end to end on tiny sizes."""

import csv
import glob
import os
import subprocess
import sys
import sysconfig

import pytest
import torch

from helpers import ROOT

STDLIB = sorted(glob.glob(os.path.join(sysconfig.get_paths()["stdlib"], "*.py")))


@pytest.fixture(scope="module")
def tok_and_data(tmp_path_factory):
    from transformers import AutoTokenizer

    from mixcon.train.data import prepare_data
    from mixcon.train.tokenizer import train_tokenizer

    d = tmp_path_factory.mktemp("corpus")
    train_tokenizer(STDLIB[:30], str(d / "tok"), vocab_size=600, input_sentence_size=50_000)
    tok = AutoTokenizer.from_pretrained(d / "tok")
    prepare_data(STDLIB[:30], tok, str(d / "data"), heldout_fraction=0.2, progress=False)
    return d, tok


SAMPLES = ["digits 0123456789 and 2026-11-22, pi=3.14159", "  leading, double  and trailing spaces   ",
           "tabs\tand\nnew\n\nlines", "unicode: naïve café 東京 Привет ∑", "emoji 🎉🚀👍🏽", "", " ", "x" * 50]


def test_tokenizer_encodes_exactly_as_sentencepiece(tok_and_data):
    import sentencepiece as spm

    d, tok = tok_and_data
    sp = spm.SentencePieceProcessor(model_file=str(d / "tok" / "tokenizer.model"))
    for text in SAMPLES + [open(STDLIB[40]).read()[:2000]]:
        ids = tok.encode(text, add_special_tokens=False)
        assert ids == sp.encode(text), repr(text)
        assert tok.decode(ids) == text
    ids = tok.encode("year 2026", add_special_tokens=False)
    assert all(len(tok.convert_ids_to_tokens(i).strip("▁")) == 1 for i in ids[-4:])  # every digit its own token
    assert tok.pad_token_id is not None and tok.eos_token_id is not None


def test_prepare_data_is_resumable_and_refuses_another_tokenizer(tok_and_data, tmp_path):
    from mixcon.train.data import TokenShards, prepare_data
    from mixcon.train.tokenizer import train_tokenizer

    d, tok = tok_and_data
    meta1 = prepare_data(STDLIB[:3], tok, str(tmp_path / "data"), heldout_fraction=0.3, progress=False)
    assert len(meta1["done"]) == 3
    mtimes = {p: os.path.getmtime(p) for p in glob.glob(str(tmp_path / "data" / "*.bin"))}
    meta2 = prepare_data(STDLIB[:5], tok, str(tmp_path / "data"), heldout_fraction=0.3, progress=False)
    assert len(meta2["done"]) == 5
    assert all(os.path.getmtime(p) == t for p, t in mtimes.items())  # the first three were not redone
    shards = TokenShards(str(tmp_path / "data"), "train")
    expected = sum(len(tok.encode(open(p).read(), add_special_tokens=False)) + 1 for p in STDLIB[:5])
    held = TokenShards(str(tmp_path / "data"), "heldout").num_tokens if meta2["shards"]["heldout"] else 0
    assert shards.num_tokens + held == expected
    b1, b2 = shards.batch(7, 4, 16, seed=1), shards.batch(7, 4, 16, seed=1)
    assert b1.shape == (4, 17) and (b1 == b2).all() and not (shards.batch(8, 4, 16, seed=1) == b1).all()
    other = train_tokenizer(STDLIB[:10], str(tmp_path / "tok2"), vocab_size=400, input_sentence_size=20_000)
    with pytest.raises(ValueError, match="another tokenizer"):
        prepare_data(STDLIB[:6], other, str(tmp_path / "data"), progress=False)
    with pytest.raises(ValueError, match="does not fit"):
        TokenShards(str(tmp_path / "data"), "train", vocab_size=100)


def _run(args, env_extra=None, torchrun=0):
    env = {**os.environ, "PYTHONPATH": ROOT, "OMP_NUM_THREADS": "1", **(env_extra or {})}
    cmd = [sys.executable] + (["-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={torchrun}"]
                              if torchrun else []) + ["-m", "mixcon", "train", "--no-progress"] + args
    return subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=ROOT, timeout=600)


def _losses(out_dir):
    with open(os.path.join(out_dir, "log.csv")) as f:
        return [(int(r["step"]), float(r["loss"])) for r in csv.DictReader(f)]


def _recipe(d, out, **kw):
    base = dict(model_config="tiny", tokenizer=str(d / "tok"), data=str(d / "data"), corpus="null",
                out_dir=str(out), seq_len=24, batch_size=4, max_steps=4, warmup_steps=2, eval_every=2,
                eval_batches=1, save_every=2, lr=0.01, sample_prompt="null", cpu_threads=1)
    base.update(kw)
    return ["--recipe", "tiny"] + [f"{k}={v}" for k, v in base.items()]


def _rows(out_dir):
    with open(os.path.join(out_dir, "log.csv")) as f:
        return list(csv.DictReader(f))


def test_kill_while_saving_then_resume_continues_bit_for_bit_and_export_loads(tok_and_data, tmp_path):
    """SIGKILL in the middle of publishing step 4's checkpoint (shards and JSON written, not yet renamed):
    step 2's checkpoint stays whole, and --resume from it repeats steps 3-4 with the same losses, bit for
    bit, Conba's training noise included (its seeds come from torch's RNG, restored from the checkpoint)."""
    from mixcon.train.checkpoint import list_checkpoints

    d, _ = tok_and_data
    kw = dict(grad_accum=2, **{"model_overrides.process_noise": 0.05, "model_overrides.observation_noise": 0.05})
    full = _run(_recipe(d, tmp_path / "full", **kw))
    assert full.returncode == 0, full.stderr[-3000:]
    killed = _run(_recipe(d, tmp_path / "split", **kw), env_extra={"MIXCON_FAULT_KILL_IN_SAVE_AT_STEP": "4"})
    assert killed.returncode == -9, (killed.returncode, killed.stderr[-3000:])
    assert [s for s, _ in list_checkpoints(tmp_path / "split")] == [2]
    assert os.path.exists(tmp_path / "split" / "checkpoints" / ".tmp-step-00000004" / "trainer_state.json")
    second = _run(_recipe(d, tmp_path / "split", **kw) + ["--resume"])
    assert second.returncode == 0 and "resumed" in second.stdout, second.stderr[-3000:]
    assert [s for s, _ in list_checkpoints(tmp_path / "split")] == [4]  # the newest only (keep_checkpoints=1)
    assert not os.path.exists(tmp_path / "split" / "checkpoints" / ".tmp-step-00000004")
    a, b = _rows(tmp_path / "full"), _rows(tmp_path / "split")
    assert [r["step"] for r in a] == [r["step"] for r in b] == ["1", "2", "3", "4"]
    assert [(r["loss"], r["heldout_loss"], r["grad_norm"]) for r in a] == \
        [(r["loss"], r["heldout_loss"], r["grad_norm"]) for r in b]  # the decimal strings: bit for bit
    assert os.path.exists(tmp_path / "full" / "loss.png")
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(tmp_path / "full" / "model", trust_remote_code=True)
    tok = AutoTokenizer.from_pretrained(tmp_path / "full" / "model")
    ids = tok("def f(x):", return_tensors="pt").input_ids
    assert model.generate(ids, max_new_tokens=3, do_sample=False).shape[1] == ids.shape[1] + 3


def test_nan_loss_stops_and_keeps_the_last_good_checkpoint(tok_and_data, tmp_path):
    from mixcon.train.checkpoint import latest_checkpoint, model_from_checkpoint, read_trainer_state

    d, _ = tok_and_data
    res = _run(_recipe(d, tmp_path), env_extra={"MIXCON_FAULT_NAN_AT_STEP": "3"})
    assert res.returncode != 0 and "non-finite loss" in (res.stdout + res.stderr)
    ckpt = latest_checkpoint(tmp_path)
    assert read_trainer_state(ckpt)["step"] == 2 and ckpt in res.stdout + res.stderr
    assert all(torch.isfinite(v).all() for v in model_from_checkpoint(ckpt).state_dict().values())


@pytest.mark.parametrize("parallel", ["ddp", "fsdp"])
def test_two_processes_give_the_loss_of_one_on_the_same_global_batch(tok_and_data, tmp_path, parallel):
    d, _ = tok_and_data
    # The Switch loss is nonlinear in the batch (a product of per-batch means), so each process's
    # share differs from the global one; it is off here to make the comparison exact.
    kw = dict(parallel=parallel, **{"model_overrides.router_aux_loss_coef": 0.0})
    one = _run(_recipe(d, tmp_path / "one", **kw))
    assert one.returncode == 0, one.stderr[-3000:]
    two = _run(_recipe(d, tmp_path / "two", **kw), torchrun=2)
    assert two.returncode == 0, two.stderr[-3000:]
    a, b = _losses(tmp_path / "one"), _losses(tmp_path / "two")
    assert len(a) == len(b) == 4
    for (_, x), (_, y) in zip(a, b):
        assert abs(x - y) < 1e-4 * abs(x), (a, b)


@pytest.mark.parametrize("config", ["mod-tiny.json", "smlp-tiny.json"])
def test_members_train_export_and_generate(tok_and_data, tmp_path, config):
    d, _ = tok_and_data
    res = _run(_recipe(d, tmp_path / "run", model_config=config))
    assert res.returncode == 0, res.stderr[-3000:]
    losses = [l for _, l in _losses(tmp_path / "run")]
    assert len(losses) == 4 and all(l == l for l in losses) and losses[-1] < losses[0]
    _generate_from(tmp_path / "run" / "model")


def _generate_from(path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(path, trust_remote_code=True).eval()
    tok = AutoTokenizer.from_pretrained(path)
    ids = tok("def f(x):", return_tensors="pt").input_ids
    with_cache = model.generate(ids, max_new_tokens=5, do_sample=False)
    assert torch.equal(with_cache, model.generate(ids, max_new_tokens=5, do_sample=False, use_cache=False))
    return model


def test_mom_second_stage_starts_from_a_trained_dense_export(tok_and_data, tmp_path):
    """MoM's two-stage training through the tool: a dense transformer, exported, fills the pool."""
    d, _ = tok_and_data
    dense = _run(_recipe(d, tmp_path / "dense", model_config="dense-tiny"))
    assert dense.returncode == 0, dense.stderr[-3000:]
    mom = _run(_recipe(d, tmp_path / "mom", model_config="mom-tiny", max_steps=2,
                       init_from=str(tmp_path / "dense" / "model"), lr=0.0, warmup_steps=1))
    assert mom.returncode == 0, mom.stderr[-3000:]
    model = _generate_from(tmp_path / "mom" / "model")
    from transformers import AutoModelForCausalLM

    dense_model = AutoModelForCausalLM.from_pretrained(tmp_path / "dense" / "model")
    # lr = 0: the exported pool is exactly the dense layers (8 layers → 8 modules, layer j → module j)
    for j, layer in enumerate(dense_model.model.layers):
        assert torch.equal(model.model.mom_pool.q_proj[j], layer.mixer.q_proj.weight)
        assert torch.equal(model.model.mom_pool.ffn.down_proj[j], layer.feed_forward.down_proj.weight)


class _Payload:
    """Unpickling this runs code: it writes a marker file."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (exec, (f"open({self.marker!r}, 'w').write('ran')",))


def _tiny_trained(tmp_path):
    from helpers import tiny_config

    from mixcon import MixConForCausalLM
    from mixcon.train.checkpoint import save_checkpoint
    from mixcon.train.recipe import Recipe

    torch.manual_seed(0)
    model = MixConForCausalLM(tiny_config())
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    ids = torch.randint(3, model.config.vocab_size, (2, 10))
    model(ids, labels=ids).loss.backward()
    opt.step()
    return model, opt, save_checkpoint(str(tmp_path / "run"), model, opt, 1, Recipe(), [])


@pytest.mark.filterwarnings("ignore:.*assuming the intent is to save in a single process")
def test_checkpoint_carrying_a_pickled_callable_is_refused(tmp_path):
    import pickle
    import shutil

    import torch.distributed.checkpoint as dcp

    from helpers import tiny_config

    from mixcon import MixConForCausalLM
    from mixcon.train.checkpoint import UnsafeCheckpointError, load_checkpoint, load_model_weights

    model, _, ckpt = _tiny_trained(tmp_path)
    marker = tmp_path / "payload-ran"
    fresh = MixConForCausalLM(tiny_config())
    load_model_weights(ckpt, fresh)  # the untouched checkpoint loads
    assert all(torch.equal(a, b) for a, b in zip(fresh.state_dict().values(), model.state_dict().values()))

    # 1. DCP's .metadata is a pickle: a callable hidden in it is refused before anything runs
    with open(os.path.join(ckpt, ".metadata"), "rb") as f:
        metadata = pickle.load(f)  # our own file: trusted here
    metadata.planner_data = _Payload(str(marker))
    with open(os.path.join(ckpt, ".metadata"), "wb") as f:
        pickle.dump(metadata, f)
    for load in (lambda: load_model_weights(ckpt, fresh), lambda: load_checkpoint(ckpt, fresh, torch.optim.AdamW(fresh.parameters()))):
        with pytest.raises(UnsafeCheckpointError, match=r"builtins\.exec.*refusing to unpickle"):
            load()
    assert issubclass(UnsafeCheckpointError, ValueError) and not marker.exists()

    # 2. a pickled object stored in place of a weight (DCP writes non-tensors with torch.save)
    evil = str(tmp_path / "evil")
    state = {"model": {k: (_Payload(str(marker)) if k == "lm_head.weight" else v)
                       for k, v in model.state_dict().items()}}
    dcp.save(state, storage_writer=dcp.FileSystemWriter(evil))
    shutil.copy(os.path.join(ckpt, "trainer_state.json"), evil)
    with pytest.raises(UnsafeCheckpointError, match=r"lm_head\.weight.*pickled objects.*refusing"):
        load_model_weights(evil, fresh)
    assert not marker.exists()


@pytest.mark.slow
def test_sharded_checkpoint_resumes_on_another_world_size_and_exports(tok_and_data, tmp_path, monkeypatch):
    """Two FSDP2 processes save sharded checkpoints (each rank its own file, nothing gathered); resuming
    step 2's checkpoint with two processes gives the uninterrupted run's losses, with one process the
    same to float rounding; the export reads the model's tensors only."""
    import importlib.util
    import shutil

    from torch.distributed.checkpoint import DefaultLoadPlanner

    from mixcon.train.checkpoint import list_checkpoints, model_from_checkpoint, read_trainer_state

    d, _ = tok_and_data
    kw = dict(parallel="fsdp", keep_checkpoints=2, **{"model_overrides.router_aux_loss_coef": 0.0})
    full = _run(_recipe(d, tmp_path / "full", **kw), torchrun=2)
    assert full.returncode == 0, full.stderr[-3000:]
    (s2, ck2), (s4, ck4) = list_checkpoints(tmp_path / "full")
    assert (s2, s4) == (2, 4) and read_trainer_state(ck4)["world_size"] == 2
    shards = [os.path.getsize(os.path.join(ck4, f"__{r}_0.distcp")) for r in (0, 1)]
    assert max(shards) < 0.75 * sum(shards), shards  # each rank wrote about half of the state
    for world in (1, 2):
        run = tmp_path / f"resume{world}"
        shutil.copytree(tmp_path / "full", run)
        shutil.rmtree(run / "checkpoints" / os.path.basename(ck4))
        res = _run(_recipe(d, run, **kw) + ["--resume"], torchrun=world if world > 1 else 0)
        assert res.returncode == 0 and "resumed" in res.stdout, res.stderr[-3000:]
        a, b = _losses(tmp_path / "full"), _losses(run)
        assert [s for s, _ in b] == [1, 2, 3, 4] and a[:2] == b[:2]
        if world == 2:
            assert a == b
        else:  # one process sums the batch in another order
            assert all(abs(x - y) < 1e-5 * abs(x) for (_, x), (_, y) in zip(a[2:], b[2:])), (a, b)

    read = []
    original = DefaultLoadPlanner.resolve_tensor
    monkeypatch.setattr(DefaultLoadPlanner, "resolve_tensor",
                        lambda self, item: read.append(item.dest_index.fqn) or original(self, item))
    from mixcon.cli import main as cli

    assert cli(["export", str(tmp_path / "full"), str(tmp_path / "export"), "--tokenizer", str(d / "tok")]) == 0
    assert read and all(k.startswith("model.") for k in read)  # no optimizer state was read
    from transformers import AutoModelForCausalLM

    exported = AutoModelForCausalLM.from_pretrained(tmp_path / "export")
    reference = model_from_checkpoint(ck4)  # float32
    assert exported.model.embed_tokens.weight.dtype == torch.bfloat16
    for k, v in reference.state_dict().items():
        assert torch.equal(exported.state_dict()[k], v.to(exported.state_dict()[k].dtype)), k
    _generate_from(tmp_path / "export")


@pytest.mark.filterwarnings("ignore:.*assuming the intent is to save in a single process")
def test_model_from_checkpoint_casts_each_tensor_and_keeps_tied_embeddings(tmp_path):
    from helpers import tiny_config

    from mixcon import MixConForCausalLM
    from mixcon.train.checkpoint import model_from_checkpoint, save_checkpoint
    from mixcon.train.recipe import Recipe

    model = MixConForCausalLM(tiny_config(tie_word_embeddings=True))
    opt = torch.optim.AdamW(model.parameters())
    ids = torch.randint(3, model.config.vocab_size, (2, 10))
    model(ids, labels=ids).loss.backward()
    opt.step()
    ckpt = save_checkpoint(str(tmp_path), model, opt, 1, Recipe(), [])
    loaded = model_from_checkpoint(str(tmp_path), torch.bfloat16)  # the run directory: its newest checkpoint
    assert loaded.lm_head.weight is loaded.model.embed_tokens.weight and ckpt.endswith("step-00000001")
    for k, v in model.state_dict().items():
        got = loaded.state_dict()[k]
        assert got.dtype == (torch.float32 if k.endswith("A_log") else torch.bfloat16), k  # A_log stays fp32
        assert torch.equal(got, v.to(got.dtype)), k


class _ByName:
    """Pickles as ``getattr(target, name)``: how Python 3.11.0–3.11.4 pickle an enum member."""

    def __init__(self, target, name):
        self.target, self.name = target, name

    def __reduce__(self):
        return getattr, (self.target, self.name)


def test_metadata_reads_enum_members_pickled_by_name_and_nothing_else():
    import io
    import os as os_module
    import pickle

    from torch.distributed.checkpoint.metadata import _MEM_FORMAT_ENCODING

    from mixcon.train.checkpoint import UnsafeCheckpointError, _MetadataUnpickler

    def load(obj):
        return _MetadataUnpickler(io.BytesIO(pickle.dumps(obj))).load()

    member = _MEM_FORMAT_ENCODING.TORCH_CHANNELS_LAST
    assert load(_ByName(_MEM_FORMAT_ENCODING, member.name)) is member
    for target, name in ((str, "format"), (_MEM_FORMAT_ENCODING, "__class__"), (_MEM_FORMAT_ENCODING, "mro"),
                         (torch.Tensor, "add"), (os_module.stat_result, "n_fields")):
        with pytest.raises(UnsafeCheckpointError, match="getattr|refusing"):
            load(_ByName(target, name))
