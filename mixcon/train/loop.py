"""The training loop. Parallelism is applied outside the model in one fixed order:
activation checkpointing → compile → FSDP2 / DDP (torchtitan's order)."""

from __future__ import annotations

import csv
import io
import math
import os
import time

import torch
import torch.distributed as dist
from tqdm import tqdm

from mixcon import MixConConfig, MixConForCausalLM
from mixcon.train.checkpoint import latest_checkpoint, load_checkpoint, save_checkpoint
from mixcon.train.checkpoint import save_model_dir, unwrap
from mixcon.train import faults
from mixcon.train.data import TokenShards
from mixcon.train.files import atomic_write_text, publish
from mixcon.train.recipe import Recipe

CSV_FIELDS = ["step", "tokens", "loss", "aux_loss", "lr", "grad_norm", "tokens_per_s", "mfu",
              "heldout_loss", "heldout_ppl", "expert_load"]


class NonFiniteLoss(RuntimeError):
    pass


def lr_at(step: int, r: Recipe) -> float:
    """Linear warmup, then cosine from lr to lr · min_lr_ratio at max_steps (step counts from 1)."""
    if step <= r.warmup_steps:
        return r.lr * step / max(1, r.warmup_steps)
    prog = min(1.0, (step - r.warmup_steps) / max(1, r.max_steps - r.warmup_steps))
    return r.lr * (r.min_lr_ratio + (1 - r.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * prog)))


def _world():
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def setup_distributed():
    """Initialise the process group under torchrun (gloo on CPU, nccl on GPU)."""
    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and not dist.is_initialized():
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        dist.init_process_group(backend)
        if torch.cuda.is_available():
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
    return _world()


def build_model(r: Recipe, vocab_size: int) -> MixConForCausalLM:
    from mixcon.resources import UsageError, read_config_dict

    kw = read_config_dict(r.model_config)
    kw.update(r.model_overrides)
    if kw.get("vocab_size", 0) < vocab_size:
        kw["vocab_size"] = vocab_size  # the tokenizer decides the vocabulary of a new model
    try:
        config = MixConConfig(**kw)
    except (ValueError, TypeError) as exc:
        raise UsageError(f"model config {r.model_config!r} with model_overrides {r.model_overrides}: {exc}") from None
    torch.manual_seed(r.seed)
    model = MixConForCausalLM(config)
    if r.init_from:
        init_model_from(model, r.init_from)
    return model


def init_model_from(model: MixConForCausalLM, path: str) -> None:
    """Weights from a saved model: the same architecture loads them all; a Mixture-of-Modules model
    given a dense transformer initialises its pool from the dense layers (`init_pool_from_dense`)."""
    from mixcon.layers.mom import init_pool_from_dense

    src = MixConForCausalLM.from_pretrained(path)
    if src.config.vocab_size != model.config.vocab_size:
        raise ValueError(f"init_from={path!r} has vocab_size {src.config.vocab_size}, the model being trained "
                         f"{model.config.vocab_size}: use the same tokenizer")
    if model.model.mom_pool is not None and src.model.mom_pool is None:
        init_pool_from_dense(model, src)
        return
    missing, unexpected = model.load_state_dict(src.state_dict(), strict=False)
    if missing or unexpected:
        raise ValueError(f"init_from={path!r} is another architecture: missing {missing[:5]}, unexpected "
                         f"{unexpected[:5]}; only a MoM model can start from a dense transformer")


def parallelize(model, r: Recipe, device):
    """Activation checkpointing → compile → FSDP2 / DDP."""
    if r.activation_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    if r.compile:
        for layer in model.model.layers:
            layer.compile()
    rank, world = _world()
    if world == 1:
        return model
    if r.parallel == "ddp":
        from torch.nn.parallel import DistributedDataParallel

        return DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
    from torch.distributed.fsdp import fully_shard

    for layer in model.model.layers:
        fully_shard(layer)
    fully_shard(model)
    return model


def _peak_flops(r: Recipe, device):
    if r.peak_tflops:
        return r.peak_tflops * 1e12
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        for key, tf in (("H200", 989), ("H100", 989), ("A100", 312)):
            if key in name:
                return tf * 1e12
    return None


def flops_per_token(config: MixConConfig, seq_len: int) -> float:
    """Training FLOPs per token: 6 · active parameters (+ attention scores, 12 · layers · d · T)."""
    from mixcon.models.sizes import active_parameters

    n_attn = config.layers_block_type.count("attention")
    return 6 * active_parameters(config) + 12 * n_attn * config.num_attention_heads * config.head_dim * seq_len


@torch.no_grad()
def evaluate(model, heldout: TokenShards, r: Recipe, device, autocast) -> float:
    """Mean next-token loss on fixed held-out windows (the same windows at every evaluation)."""
    rank, world = _world()
    was = model.training
    model.eval()
    total = torch.zeros(2, dtype=torch.float64, device=device)
    for i in range(r.eval_batches):
        win = torch.from_numpy(heldout.batch(i, r.batch_size // r.grad_accum, r.seq_len, seed=r.seed + 99991))
        win = win[rank::world].to(device)
        with autocast():
            logits = model(win[:, :-1], use_cache=False).logits.float()
        loss = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), win[:, 1:].reshape(-1),
                                                 reduction="sum")
        total += torch.stack([loss.double(), torch.tensor(win[:, 1:].numel(), dtype=torch.float64, device=device)])
    if dist.is_initialized():
        dist.all_reduce(total)
    model.train(was)
    return (total[0] / total[1]).item()


def plot_losses(rows, path):
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.plot([r["step"] for r in rows], [r["loss"] for r in rows], label="train")
    ev = [r for r in rows if r.get("heldout_loss") not in (None, "")]
    if ev:
        ax.plot([r["step"] for r in ev], [r["heldout_loss"] for r in ev], "o-", label="held-out")
    ax.set_xlabel("step")
    ax.set_ylabel("loss (nats/token)")
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    tmp = path + ".tmp.png"
    fig.savefig(tmp, dpi=120)
    publish(tmp, path)
    plt.close(fig)


def make_optimizer(model, r: Recipe, device) -> torch.optim.AdamW:
    """AdamW with weight decay on matrices only (norms, biases and 1-D Conba parameters undecayed)."""
    decay = [p for n, p in model.named_parameters() if p.dim() >= 2]
    no_decay = [p for n, p in model.named_parameters() if p.dim() < 2]
    return torch.optim.AdamW([{"params": decay, "weight_decay": r.weight_decay},
                              {"params": no_decay, "weight_decay": 0.0}], lr=r.lr, betas=r.betas,
                             fused=device.type == "cuda")


def train(r: Recipe, resume: bool = False, progress: bool = True) -> list[dict]:
    """Run the recipe; returns the logged rows. Writes out_dir/{log.csv, loss.png}, sharded checkpoints
    out_dir/checkpoints/step-N (see mixcon.train.checkpoint) and, at each of them, out_dir/model: a
    save_pretrained model with its tokenizer (float32) that `from_pretrained` and `mixcon generate` load."""
    if r.cpu_threads:
        torch.set_num_threads(r.cpu_threads)
    own_group = not (dist.is_available() and dist.is_initialized())
    rank, world = setup_distributed()
    device = torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")
    micro = r.batch_size // r.grad_accum
    if micro % world:
        raise ValueError(f"batch_size / grad_accum = {micro} sequences per micro-step must divide among "
                         f"{world} processes")
    train_data = TokenShards(r.data, "train")
    heldout = TokenShards(r.data, "heldout")
    model = build_model(r, train_data.meta["tokenizer"]["vocab_size"]).to(device)
    config = model.config
    TokenShards(r.data, "train", vocab_size=config.vocab_size)  # refuses a vocab mismatch
    model.train()
    model = parallelize(model, r, device)
    optimizer = make_optimizer(model, r, device)
    use_bf16 = r.dtype == "bf16" or (r.dtype == "auto" and device.type == "cuda")
    autocast = (lambda: torch.autocast(device.type, dtype=torch.bfloat16)) if use_bf16 else \
        (lambda: torch.autocast(device.type, enabled=False))
    os.makedirs(r.out_dir, exist_ok=True)
    rows, start = [], 0
    ckpt_path = latest_checkpoint(r.out_dir) if resume else None
    if resume and ckpt_path is None and os.path.exists(os.path.join(r.out_dir, "checkpoint.pt")):
        raise ValueError(f"{r.out_dir}/checkpoint.pt is the old single-file format, which --resume no longer reads "
                         f"(it is unpickled with code execution); resume with the revision that wrote it")
    if ckpt_path is not None:
        ck = load_checkpoint(ckpt_path, model, optimizer)
        start, rows = ck["step"], ck["rows"]
        if rank == 0:
            print(f"resumed from {ckpt_path} at step {start} (saved by {ck['world_size']} processes, "
                  f"resumed on {world})")
    writer = None
    if rank == 0:
        try:
            from torch.utils.tensorboard import SummaryWriter

            writer = SummaryWriter(os.path.join(r.out_dir, "tb"))
        except Exception:
            writer = None
    peak = _peak_flops(r, device)
    fpt = flops_per_token(config, r.seq_len)
    moe_layers = [m for m in model.modules() if type(m).__name__ == "SparseMoE"]
    bar = tqdm(range(start + 1, r.max_steps + 1), desc="training", disable=not progress or rank != 0,
               initial=start, total=r.max_steps)
    nan_step = faults.nan_at_step()
    t_last = time.perf_counter()
    for step in bar:
        lr = lr_at(step, r)
        for g in optimizer.param_groups:
            g["lr"] = lr
        batch = torch.from_numpy(train_data.batch(step, r.batch_size, r.seq_len, seed=r.seed))
        lm_sum = torch.zeros((), dtype=torch.float64, device=device)
        aux_sum = torch.zeros((), dtype=torch.float64, device=device)
        load = torch.zeros(config.num_experts, dtype=torch.float64)
        for k in range(r.grad_accum):
            rows_k = batch[k * micro:(k + 1) * micro][rank::world].to(device)  # this process's share
            with autocast():
                out = model(rows_k[:, :-1], labels=rows_k, use_cache=False)
            aux = out.aux_loss if out.aux_loss is not None else torch.zeros((), device=device)
            lm = out.loss - aux
            if step == nan_step:
                lm = lm * float("nan")
            (lm + aux).div(r.grad_accum).backward()
            lm_sum += lm.detach().double() / r.grad_accum
            aux_sum += aux.detach().double() / r.grad_accum
            for m in moe_layers:
                if m.last_expert_load is not None:
                    load += m.last_expert_load.double().cpu()
        stats = torch.stack([lm_sum, aux_sum])
        if dist.is_initialized():
            dist.all_reduce(stats)
            stats /= world
        loss = stats[0].item()
        if not math.isfinite(loss):
            optimizer.zero_grad(set_to_none=True)
            msg = (f"non-finite loss {loss} at step {step}; stopping. The last good checkpoint is "
                   f"{latest_checkpoint(r.out_dir) or '(none yet)'}")
            if rank == 0:
                print(msg)
            raise NonFiniteLoss(msg)
        grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), r.grad_clip)
        grad_norm = grad_norm.full_tensor() if hasattr(grad_norm, "full_tensor") else grad_norm
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        now = time.perf_counter()
        tok_s = r.batch_size * r.seq_len / (now - t_last)
        t_last = now
        row = {"step": step, "tokens": step * r.batch_size * r.seq_len, "loss": loss, "aux_loss": stats[1].item(),
               "lr": lr, "grad_norm": float(grad_norm), "tokens_per_s": tok_s,
               "mfu": (tok_s * fpt / (peak * world)) if peak else "",
               "heldout_loss": "", "heldout_ppl": "",
               "expert_load": ";".join(f"{x:.3f}" for x in (load / load.sum()).tolist()) if load.sum() > 0 else ""}
        if step % r.eval_every == 0 or step == r.max_steps:
            hl = evaluate(model, heldout, r, device, autocast)
            row.update(heldout_loss=hl, heldout_ppl=math.exp(min(hl, 50)))
        rows.append(row)
        if rank == 0:
            bar.set_postfix(loss=f"{loss:.3f}", lr=f"{lr:.2e}", **({"heldout": f"{row['heldout_loss']:.3f}"}
                                                                  if row["heldout_loss"] != "" else {}))
            if writer is not None:
                for key in ("loss", "aux_loss", "lr", "grad_norm", "tokens_per_s", "heldout_loss"):
                    if row[key] != "":
                        writer.add_scalar(key, row[key], step)
        if step % r.save_every == 0 or step == r.max_steps:
            save_checkpoint(r.out_dir, model, optimizer, step, r, rows, keep=r.keep_checkpoints)
            save_model_dir(model, os.path.join(r.out_dir, "model"), tokenizer=r.tokenizer)
            if rank == 0:
                _write_csv(os.path.join(r.out_dir, "log.csv"), rows)
                plot_losses(rows, os.path.join(r.out_dir, "loss.png"))
    if writer is not None:
        writer.close()
    if own_group and dist.is_initialized():
        dist.destroy_process_group()  # rank 0 may go on alone (export, sample)
    return rows


def _write_csv(path, rows):
    buf = io.StringIO(newline="")
    w = csv.DictWriter(buf, fieldnames=CSV_FIELDS)
    w.writeheader()
    w.writerows(rows)
    atomic_write_text(path, buf.getvalue())
