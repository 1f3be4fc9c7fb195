"""Training recipes: a dataclass loaded from YAML, with ``key=value`` command-line overrides."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Optional

import yaml


@dataclass
class Recipe:
    model_config: str = "configs/tiny.json"  # a MixCon config.json
    model_overrides: dict = field(default_factory=dict)  # fields of MixConConfig to change
    # a save_pretrained model (e.g. another run's --export) to start from: the same architecture loads
    # its weights; a Mixture-of-Modules model from a dense transformer fills its pool (MoM's stage 2)
    init_from: Optional[str] = None
    tokenizer: str = "runs/tokenizer"  # directory of a tokenizer (tools/train_tokenizer.py)
    data: str = "runs/data"  # directory of prepared shards (tools/prepare_data.py)
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
    debug_nan_at_step: int = -1  # fault injection for tests: make this step's loss NaN
    # fault injection for tests: SIGKILL rank 0 while saving this step (shards written, not yet published)
    debug_kill_in_save_at_step: int = -1

    def validate(self):
        for name in ("seq_len", "batch_size", "grad_accum", "max_steps", "eval_every", "save_every", "log_every",
                     "keep_checkpoints"):
            if getattr(self, name) < 1:
                raise ValueError(f"recipe {name}={getattr(self, name)!r} must be >= 1")
        if self.dtype not in ("auto", "bf16", "fp32"):
            raise ValueError(f"recipe dtype={self.dtype!r} must be one of auto, bf16, fp32")
        if self.parallel not in ("fsdp", "ddp"):
            raise ValueError(f"recipe parallel={self.parallel!r} must be 'fsdp' or 'ddp'")
        if self.batch_size % self.grad_accum:
            raise ValueError(f"batch_size={self.batch_size} must be a multiple of grad_accum={self.grad_accum}")
        return self


def load_recipe(path: Optional[str] = None, overrides=()) -> Recipe:
    """YAML file (optional) then ``key=value`` overrides (values parsed as YAML; dotted
    ``model_overrides.FIELD=value`` reaches the model config)."""
    data = yaml.safe_load(open(path)) or {} if path else {}
    names = {f.name for f in dataclasses.fields(Recipe)}
    for ov in overrides:
        if "=" not in ov:
            raise ValueError(f"override {ov!r} must be KEY=VALUE")
        k, v = ov.split("=", 1)
        if k.startswith("model_overrides."):
            data.setdefault("model_overrides", {})[k.split(".", 1)[1]] = yaml.safe_load(v)
        else:
            data[k] = yaml.safe_load(v)
    unknown = set(data) - names
    if unknown:
        raise ValueError(f"unknown recipe fields {sorted(unknown)}; allowed: {sorted(names)}")
    if "betas" in data:
        data["betas"] = tuple(data["betas"])
    return Recipe(**data).validate()
