"""The main job behind `mixcon train`: a recipe (the built-in one by default) → tokenizer and data when
the recipe's corpus is the standard library and they are missing → training → ``out_dir/model`` (a
save_pretrained model with its tokenizer, rewritten at every checkpoint) → the held-out loss and a sample."""

from __future__ import annotations

import glob
import os
import sysconfig

import torch

from mixcon.resources import DEFAULT_RECIPE
from mixcon.train.recipe import Recipe, load_recipe


def stdlib_files(limit: int | None = None) -> list[str]:
    """The Python standard library's own top-level source files: a corpus every machine with Python has."""
    files = sorted(glob.glob(os.path.join(sysconfig.get_paths()["stdlib"], "*.py")))
    return files[:limit] if limit else files


def ensure_stdlib_corpus(r: Recipe, vocab_size: int = 2048) -> None:
    """The recipe's tokenizer and data directories, made from the standard library when missing."""
    from transformers import AutoTokenizer

    from mixcon.train.data import prepare_data
    from mixcon.train.tokenizer import train_tokenizer

    files = stdlib_files()
    if not os.path.exists(os.path.join(r.tokenizer, "tokenizer.json")):
        print(f"training a {vocab_size}-token tokenizer on {len(files)} standard-library files → {r.tokenizer}")
        train_tokenizer(files, r.tokenizer, vocab_size, input_sentence_size=300_000)
    tok = AutoTokenizer.from_pretrained(r.tokenizer)
    prepare_data(files, tok, r.data, heldout_fraction=0.05, progress=False)


def check_inputs(r: Recipe) -> None:
    """The recipe's model config, tokenizer and data exist (or will be made), before any process starts work."""
    from mixcon.resources import UsageError, read_config_dict

    read_config_dict(r.model_config)
    if r.corpus is None:
        if not os.path.exists(os.path.join(r.tokenizer, "tokenizer.json")):
            raise UsageError(f"tokenizer {r.tokenizer!r} has no tokenizer.json: train one with `mixcon train-tokenizer "
                             f"{r.tokenizer} FILES` (or use corpus=stdlib)")
        if not os.path.exists(os.path.join(r.data, "meta.json")):
            raise UsageError(f"data {r.data!r} has no meta.json: prepare it with `mixcon prepare-data FILES "
                             f"--tokenizer {r.tokenizer} --out {r.data}` (or use corpus=stdlib)")
    if r.init_from is not None and not os.path.exists(os.path.join(r.init_from, "config.json")):
        raise UsageError(f"init_from {r.init_from!r} is not a saved model (no config.json)")


def run(recipe: str | None = None, overrides=(), resume: bool = False, progress: bool = True) -> dict:
    """Train ``recipe`` (a shipped name or a YAML path; None = the built-in one) with ``key=value``
    overrides. Returns {"recipe", "rows", "model_dir"}; rank 0 prints the held-out loss and a sample."""
    import torch.distributed as dist

    from mixcon.train.loop import setup_distributed, train

    r = load_recipe(recipe or DEFAULT_RECIPE, overrides)
    check_inputs(r)
    if r.cpu_threads:
        torch.set_num_threads(r.cpu_threads)
    own_group = not (dist.is_available() and dist.is_initialized())
    rank, world = setup_distributed()
    if r.corpus == "stdlib" and rank == 0:
        ensure_stdlib_corpus(r)
    if world > 1:
        dist.barrier()
    try:
        rows = train(r, resume=resume, progress=progress)
    finally:
        if own_group and dist.is_initialized():
            dist.destroy_process_group()
    model_dir = os.path.join(r.out_dir, "model")
    if rank == 0:
        first = next((x for x in rows if x["heldout_loss"] != ""), None)
        if first is not None:
            last = [x for x in rows if x["heldout_loss"] != ""][-1]
            print(f"held-out loss: {first['heldout_loss']:.3f} at step {first['step']} → "
                  f"{last['heldout_loss']:.3f} at step {last['step']}  (log: {r.out_dir}/log.csv, "
                  f"plot: {r.out_dir}/loss.png)")
        print(f"model: {model_dir}  (mixcon generate {model_dir} --prompt TEXT)")
        if r.sample_prompt:
            from mixcon.generate import load, sample

            model, tok = load(model_dir)
            torch.manual_seed(0)  # sampled (greedy decoding of a small model repeats itself), reproducibly
            print("sample:", repr(sample(model, tok, r.sample_prompt, max_new_tokens=48)))
    return {"recipe": r, "rows": rows, "model_dir": model_dir}
