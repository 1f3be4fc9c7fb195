"""Training recipes: a dataclass loaded from YAML, with ``key=value`` command-line overrides."""

from __future__ import annotations

import dataclasses
import os
import typing
from dataclasses import dataclass, field
from typing import Optional

import yaml

from mixcon.resources import UsageError, read_text, recipe_path


@dataclass
class Recipe:
    model_config: str = "tiny"  # a shipped config name (mixcon/configs/NAME.json) or a MixCon config.json
    model_overrides: dict = field(default_factory=dict)  # fields of MixConConfig to change
    # a save_pretrained model (e.g. another run's --export) to start from: the same architecture loads
    # its weights; a Mixture-of-Modules model from a dense transformer fills its pool (MoM's stage 2)
    init_from: Optional[str] = None
    # "stdlib": the tokenizer and the data are made from the Python standard library's source when missing
    # (every machine with Python has it); None: the tokenizer and data directories must exist
    corpus: Optional[str] = None
    tokenizer: Optional[str] = None  # tokenizer directory (`mixcon train-tokenizer`); None = out_dir/tokenizer
    data: Optional[str] = None  # prepared shards (`mixcon prepare-data`); None = out_dir/data
    out_dir: str = "runs/train"
    seq_len: int = 256
    batch_size: int = 8  # global, in sequences per optimizer step (over all processes and micro-steps)
    grad_accum: int = 1  # micro-steps per optimizer step
    max_steps: int = 200
    lr: float = 3e-3
    min_lr_ratio: float = 0.1  # cosine decays to lr · min_lr_ratio
    warmup_steps: int = 20
    weight_decay: float = 0.1
    betas: tuple = (0.9, 0.95)
    grad_clip: float = 1.0
    dtype: str = "auto"  # auto = bf16 autocast on a GPU, fp32 on CPU; or "bf16", "fp32"
    activation_checkpointing: bool = False
    compile: bool = False  # torch.compile each decoder layer
    parallel: str = "fsdp"  # under torchrun: "fsdp" (FSDP2 fully_shard) or "ddp"
    eval_every: int = 50
    eval_batches: int = 4
    save_every: int = 100
    keep_checkpoints: int = 1  # published checkpoints kept in out_dir/checkpoints (the newest ones)
    log_every: int = 10
    seed: int = 0
    peak_tflops: Optional[float] = None  # for MFU; None = guess from the GPU name, none on CPU
    # CPU threads per process for torch's operators; 0 = torch's default. Small models train faster on
    # one: on a shared 2-core machine two threads of the tiny model's small matrices ran 5-10x slower
    cpu_threads: int = 0
    sample_prompt: Optional[str] = "def "  # generated from at the end (None: no sample)

    def __post_init__(self):
        if self.tokenizer is None:
            self.tokenizer = os.path.join(self.out_dir, "tokenizer")
        if self.data is None:
            self.data = os.path.join(self.out_dir, "data")

    def validate(self):
        _check_types(self)
        for name in ("seq_len", "batch_size", "grad_accum", "max_steps", "eval_every", "save_every", "log_every",
                     "keep_checkpoints"):
            if getattr(self, name) < 1:
                raise ValueError(f"recipe {name}={getattr(self, name)!r} must be >= 1")
        if self.dtype not in ("auto", "bf16", "fp32"):
            raise ValueError(f"recipe dtype={self.dtype!r} must be one of auto, bf16, fp32")
        if self.parallel not in ("fsdp", "ddp"):
            raise ValueError(f"recipe parallel={self.parallel!r} must be 'fsdp' or 'ddp'")
        if self.corpus not in (None, "stdlib"):
            raise ValueError(f"recipe corpus={self.corpus!r} must be 'stdlib' or null")
        if self.cpu_threads < 0:
            raise ValueError(f"recipe cpu_threads={self.cpu_threads!r} must be >= 0 (0 = torch's default)")
        if self.batch_size % self.grad_accum:
            raise ValueError(f"batch_size={self.batch_size} must be a multiple of grad_accum={self.grad_accum}")
        return self


_TYPES = {int: "an integer", float: "a number", str: "a string", bool: "true or false", dict: "a mapping",
          tuple: "a list of two numbers"}


def _check_types(r: "Recipe") -> None:
    """Every field of the type its annotation says (a YAML typo such as max_steps: 1e3 or lr: fast)."""
    hints = typing.get_type_hints(Recipe)
    for f in dataclasses.fields(Recipe):
        v, t = getattr(r, f.name), hints[f.name]
        optional = typing.get_origin(t) is typing.Union
        if optional:
            t = next(a for a in typing.get_args(t) if a is not type(None))
            if v is None:
                continue
        if t is float and isinstance(v, str):  # YAML reads 1e-3 (no dot) as a string
            try:
                v = float(v)
                setattr(r, f.name, v)
            except ValueError:
                pass
        ok = (isinstance(v, t) and not (t is int and isinstance(v, bool))) or (t is float and isinstance(v, int)
                                                                               and not isinstance(v, bool))
        if t is tuple:
            ok = isinstance(v, (tuple, list)) and len(v) == 2 and all(isinstance(x, (int, float)) for x in v)
        if not ok:
            raise ValueError(f"recipe {f.name}={v!r} must be {_TYPES[t]}{' or null' if optional else ''}")


def load_recipe(path: Optional[str] = None, overrides=()) -> Recipe:
    """A shipped recipe name or a YAML file (optional), then ``key=value`` overrides (values parsed as YAML;
    dotted ``model_overrides.FIELD=value`` reaches the model config). Every problem is a ``UsageError``
    naming the file or the override and what is allowed."""
    try:
        return _load_recipe(path, overrides)
    except UsageError:
        raise
    except (ValueError, TypeError) as exc:
        raise UsageError(str(exc)) from None


def _load_recipe(path, overrides) -> Recipe:
    data = {}
    if path:
        path = recipe_path(path)
        try:
            data = yaml.safe_load(read_text(path, "recipe")) or {}
        except yaml.YAMLError as exc:
            raise UsageError(f"recipe {path!r} is not valid YAML: {str(exc).splitlines()[0]}") from None
        if not isinstance(data, dict):
            raise UsageError(f"recipe {path!r} holds a YAML {type(data).__name__}; a recipe is a mapping "
                             f"of fields (key: value)")
    names = {f.name for f in dataclasses.fields(Recipe)}
    for ov in overrides:
        if "=" not in ov:
            raise ValueError(f"override {ov!r} must be KEY=VALUE")
        k, v = ov.split("=", 1)
        try:
            v = yaml.safe_load(v)
        except yaml.YAMLError:
            pass  # a plain string
        if k.startswith("model_overrides."):
            data.setdefault("model_overrides", {})[k.split(".", 1)[1]] = v
        else:
            data[k] = v
    unknown = set(data) - names
    if unknown:
        raise ValueError(f"unknown recipe field(s) {sorted(unknown)}; allowed: {', '.join(sorted(names))}")
    if isinstance(data.get("model_overrides"), dict) is False and "model_overrides" in data:
        raise ValueError(f"recipe model_overrides={data['model_overrides']!r} must be a mapping of MixConConfig fields")
    r = Recipe(**data)
    if isinstance(r.betas, list):
        r.betas = tuple(r.betas)
    return r.validate()
