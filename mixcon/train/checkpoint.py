"""Sharded training checkpoints (``torch.distributed.checkpoint``, DCP) and their export.

Layout under a run's ``out_dir``::

    checkpoints/step-00000200/        one published checkpoint
        .metadata                     DCP's index of every tensor's chunks (which file, offset)
        __<rank>_0.distcp             each rank's own shards of the model and AdamW state
        trainer_state.json            step, recipe, model config, RNG, data position, log rows,
                                      the optimizer's hyper-parameters (param_groups)
    checkpoints/.tmp-step-00000300/   being written; never read

Each rank writes only its own shards (FSDP2's DTensor shards, or its share of replicated tensors);
nothing is gathered. Everything goes to a temporary directory, every file is fsync'ed, then rank 0
renames the directory to ``step-N`` and fsyncs the parent: a kill at any moment leaves the last
published checkpoint whole. DCP stores every tensor's global shape, so a checkpoint loads on any
number of processes (resharding on load) and into a plain single-process model.

Nothing executes on load: the checkpoint holds only tensors and JSON. DCP's ``.metadata`` is a
pickle, so it is read by an unpickler that knows DCP's own data classes and nothing else, and any
pickled (non-tensor) item is refused; tensors are read with ``torch.load(weights_only=True)``.
"""

from __future__ import annotations

import base64
import contextlib
import dataclasses
import json
import os
import pickle
import re
import shutil

import torch
import torch.distributed as dist

from mixcon.train import faults
from mixcon.train.files import atomic_write_text, fsync_path, publish

STATE_FILE = "trainer_state.json"
FORMAT = "mixcon-dcp-1"
CHECKPOINTS = "checkpoints"
_STEP_DIR = re.compile(r"^step-(\d+)$")


class UnsafeCheckpointError(ValueError):
    """The checkpoint holds something other than tensors, JSON and DCP's metadata records."""


# ---------------------------------------------------------------------------- finding checkpoints
def _rank_world():
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def list_checkpoints(out_dir: str) -> list[tuple[int, str]]:
    """Published checkpoints of a run, oldest first, as (step, path)."""
    root = os.path.join(out_dir, CHECKPOINTS)
    if not os.path.isdir(root):
        return []
    found = []
    for name in os.listdir(root):
        m = _STEP_DIR.match(name)
        if m and os.path.exists(os.path.join(root, name, STATE_FILE)):
            found.append((int(m.group(1)), os.path.join(root, name)))
    return sorted(found)


def latest_checkpoint(out_dir: str):
    """The newest published checkpoint of a run directory, or None."""
    found = list_checkpoints(out_dir)
    return found[-1][1] if found else None


def resolve_checkpoint(path: str) -> str:
    """A checkpoint directory, or a run's out_dir (its newest checkpoint)."""
    if os.path.exists(os.path.join(path, STATE_FILE)):
        return path
    latest = latest_checkpoint(path)
    if latest is None:
        raise ValueError(f"{path} is neither a checkpoint directory (with {STATE_FILE}) nor a run directory "
                         f"with {CHECKPOINTS}/step-N checkpoints")
    return latest


def read_trainer_state(path: str) -> dict:
    with open(os.path.join(path, STATE_FILE)) as f:
        state = json.load(f)
    if state.get("format") != FORMAT:
        raise ValueError(f"{path}/{STATE_FILE} has format {state.get('format')!r}, expected {FORMAT!r}")
    return state


# ---------------------------------------------------------------------------- RNG
def _b64(t: torch.Tensor) -> str:
    return base64.b64encode(t.numpy().tobytes()).decode("ascii")


def _unb64(s: str) -> torch.Tensor:
    return torch.frombuffer(bytearray(base64.b64decode(s)), dtype=torch.uint8).clone()


def rng_state() -> dict:
    """torch's generators (the Conba training noise draws its seeds from them). Every rank holds
    the same state (same seed, same number of draws), so rank 0's is saved and restored everywhere."""
    out = {"torch_cpu": _b64(torch.get_rng_state())}
    if torch.cuda.is_available():
        out["torch_cuda"] = _b64(torch.cuda.get_rng_state())
    return out


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(_unb64(state["torch_cpu"]))
    if torch.cuda.is_available() and "torch_cuda" in state:
        torch.cuda.set_rng_state(_unb64(state["torch_cuda"]))


# ---------------------------------------------------------------------------- safe reading
_DCP_CLASSES = {
    "torch.distributed.checkpoint.metadata": {"Metadata", "TensorStorageMetadata", "BytesStorageMetadata",
                                              "ChunkStorageMetadata", "TensorProperties", "MetadataIndex",
                                              "StorageMeta", "_MEM_FORMAT_ENCODING"},
    "torch.distributed.checkpoint.filesystem": {"_StorageInfo"},
    "torch": {"Size"},
    "torch.serialization": {"_get_layout"},  # name → one of torch's layouts (how torch pickles a layout)
    "collections": {"OrderedDict"},
    "pathlib": {"PosixPath", "PurePosixPath", "WindowsPath", "PureWindowsPath"},
    "pathlib._local": {"PosixPath", "PurePosixPath", "WindowsPath", "PureWindowsPath"},
}


def _enum_member(cls, name: str):
    """``getattr`` as some Pythons pickle an enum member (3.11.0–3.11.4 pickle DCP's
    ``_MEM_FORMAT_ENCODING.TORCH_CONTIGUOUS_FORMAT`` as ``getattr(cls, "TORCH_CONTIGUOUS_FORMAT")``):
    only a member of an enum this unpickler admits, nothing else."""
    import enum

    allowed = isinstance(cls, type) and issubclass(cls, enum.Enum) and cls.__name__ in _DCP_CLASSES.get(
        cls.__module__, ())
    if not allowed or not isinstance(name, str) or name not in cls.__members__:
        raise UnsafeCheckpointError(f"checkpoint metadata asks for getattr({cls!r}, {name!r}); only a member of "
                                    f"one of DCP's metadata enums is read")
    return cls[name]


class _MetadataUnpickler(pickle.Unpickler):
    """Builds DCP's metadata records and refuses every other global (functions, ``os.system``...)."""

    def find_class(self, module, name):
        if name in _DCP_CLASSES.get(module, ()):
            return super().find_class(module, name)
        if (module, name) == ("builtins", "getattr"):
            return _enum_member
        if module == "torch" and isinstance(getattr(torch, name, None), (torch.dtype, torch.layout,
                                                                          torch.memory_format)):
            return getattr(torch, name)
        raise UnsafeCheckpointError(
            f"checkpoint metadata refers to {module}.{name}, which is not one of DCP's metadata types; refusing "
            f"to unpickle it (a pickle can run code when loaded). A mixcon checkpoint holds only tensors and JSON")


def _safe_reader(path: str):
    from torch.distributed.checkpoint import FileSystemReader
    from torch.distributed.checkpoint.metadata import StorageMeta

    class SafeFileSystemReader(FileSystemReader):
        def read_metadata(self, *args, **kwargs):
            rank = kwargs.get("rank")
            name = ".metadata" if rank is None else f"__{rank}.metadata"
            with open(os.path.join(self.path, name), "rb") as f:
                try:
                    metadata = _MetadataUnpickler(f).load()
                except UnsafeCheckpointError as exc:
                    raise UnsafeCheckpointError(f"{path}: {exc}") from None
            if getattr(metadata, "storage_meta", None) is None:
                metadata.storage_meta = StorageMeta()
            metadata.storage_meta.load_id = getattr(self, "load_id", None)
            return metadata

    return SafeFileSystemReader(path)


def _tensor_only_planner(path: str, **kw):
    from torch.distributed.checkpoint import DefaultLoadPlanner

    class TensorOnlyLoadPlanner(DefaultLoadPlanner):
        def load_bytes(self, read_item, value):
            raise UnsafeCheckpointError(
                f"{path}: item {read_item.dest_index.fqn!r} is a pickled object, not a tensor; refusing to "
                f"unpickle it (a pickle can run code when loaded)")

    return TensorOnlyLoadPlanner(**kw)


@contextlib.contextmanager
def _single_process_warnings():
    """DCP warns that it runs without a process group; that is intended when none is initialised."""
    import warnings

    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*assuming the intent is to (save|load) in a single process")
        yield


def _dcp_load(state: dict, path: str) -> None:
    import torch.distributed.checkpoint as dcp

    from torch.distributed.checkpoint.metadata import BytesStorageMetadata

    metadata = _safe_reader(path).read_metadata()  # refuses unknown pickled types, before DCP starts
    pickled = [k for k, md in metadata.state_dict_metadata.items() if isinstance(md, BytesStorageMetadata)]
    if pickled:  # DCP stores non-tensors with torch.save and loads them with weights_only=False
        raise UnsafeCheckpointError(f"{path}: items {pickled[:3]} are pickled objects, not tensors; refusing to "
                                    f"unpickle them (a pickle can run code when loaded)")
    with _single_process_warnings():
        dcp.load(state, storage_reader=_safe_reader(path), planner=_tensor_only_planner(path))


# ---------------------------------------------------------------------------- save / load (training)
def save_checkpoint(out_dir: str, model, optimizer, step: int, recipe, rows: list, keep: int = 1) -> str:
    """Every rank writes its own shards of the model and optimizer state to
    ``out_dir/checkpoints/.tmp-step-N``; rank 0 adds ``trainer_state.json`` and publishes the directory
    as ``step-N``; then all but the newest ``keep`` checkpoints are removed. Collective under torchrun."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint import FileSystemWriter
    from torch.distributed.checkpoint.state_dict import get_state_dict

    rank, world = _rank_world()
    root = os.path.join(out_dir, CHECKPOINTS)
    name = f"step-{step:08d}"
    tmp, final = os.path.join(root, ".tmp-" + name), os.path.join(root, name)
    if rank == 0:
        if not os.path.isdir(root):
            os.makedirs(root)
            fsync_path(os.path.abspath(out_dir))
        shutil.rmtree(tmp, ignore_errors=True)  # left by a run killed while saving
    if world > 1:
        dist.barrier()
    msd, osd = get_state_dict(model, optimizer)  # sharded (DTensor) under FSDP2: no gathering
    # tensors only in the shards; the optimizer's hyper-parameters (floats, bools, names) go to JSON
    with _single_process_warnings():
        dcp.save({"model": msd, "optim": osd["state"]}, storage_writer=FileSystemWriter(tmp, sync_files=True))
    if rank == 0:
        config = unwrap(model).config
        state = {"format": FORMAT, "step": step, "world_size": world, "recipe": dataclasses.asdict(recipe),
                 "model_config": json.loads(config.to_json_string()),
                 "data": {"seed": recipe.seed, "next_step": step + 1},  # a batch is a pure function of (seed, step)
                 "rng": rng_state(), "param_groups": osd["param_groups"], "rows": rows}
        atomic_write_text(os.path.join(tmp, STATE_FILE), json.dumps(state))
        faults.kill_in_save(step)
        if os.path.exists(final):  # a stale one from an earlier run in this out_dir
            shutil.rmtree(final)
        publish(tmp, final)
        older = [p for s, p in list_checkpoints(out_dir) if s < step]
        stale = [p for s, p in list_checkpoints(out_dir) if s > step]  # from an earlier run in this out_dir
        for p in stale + older[:max(0, len(older) - (keep - 1))]:
            shutil.rmtree(p, ignore_errors=True)
    if world > 1:
        dist.barrier()
    return final


def load_checkpoint(path: str, model, optimizer) -> dict:
    """Load a checkpoint into ``model`` and ``optimizer`` in place, on any number of processes and with
    any parallelism (DCP reshards: each rank reads the pieces of the stored tensors its shards cover);
    restores torch's RNG; returns the trainer state (step, rows, ...). Collective under torchrun."""
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

    state = read_trainer_state(path)
    msd, osd = get_state_dict(model, optimizer)  # this run's layout; allocates AdamW's state (a zero-lr step)
    _dcp_load({"model": msd, "optim": osd["state"]}, path)
    groups = state["param_groups"]
    if len(groups) != len(osd["param_groups"]):
        raise ValueError(f"{path} has {len(groups)} optimizer parameter groups, this optimizer "
                         f"{len(osd['param_groups'])}")
    for g in groups:
        if "betas" in g:
            g["betas"] = tuple(g["betas"])
    osd["param_groups"] = groups
    set_state_dict(model, optimizer, model_state_dict=msd, optim_state_dict=osd)
    set_rng_state(state["rng"])
    return state


def unwrap(model):
    return model.module if hasattr(model, "module") else model


# ---------------------------------------------------------------------------- model only / export
def load_model_weights(path: str, model) -> None:
    """Only the model's tensors of a checkpoint into a plain (single-process) ``model``, in place and
    in ``model``'s dtype; the optimizer state is never read. Runs in one process, outside a process group
    (under torchrun, after ``train`` has returned: it closes the group it opened)."""
    if dist.is_available() and dist.is_initialized():
        raise ValueError("load_model_weights reads a checkpoint in one process; call it outside a process group "
                         "(torch.distributed is initialised here), or load with load_checkpoint on every rank")
    path = resolve_checkpoint(path)
    _dcp_load({"model": model.state_dict()}, path)


def model_from_checkpoint(path: str, dtype: torch.dtype = torch.float32):
    """A ``MixConForCausalLM`` in ``dtype`` holding a checkpoint's weights: the model is allocated in
    ``dtype`` without initialisation and each stored tensor is read and cast one at a time, so the
    peak memory is the model in ``dtype`` plus one tensor."""
    from mixcon import MixConConfig, MixConForCausalLM

    path = resolve_checkpoint(path)
    config = MixConConfig.from_dict(read_trainer_state(path)["model_config"])
    try:
        from transformers.initialization import no_init_weights
    except ImportError:  # older transformers: initialise, then overwrite
        no_init_weights = contextlib.nullcontext
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with no_init_weights():
            model = MixConForCausalLM(config)
    finally:
        torch.set_default_dtype(previous)
    model.tie_weights()  # skipped with the initialisation
    load_model_weights(path, model)
    return model.eval()


def export_pretrained(path: str, out: str, dtype: str = "bf16", tokenizer: str | None = None,
                      max_shard_size: str = "5GB") -> str:
    """A checkpoint (or a run's out_dir: its newest) → a ``save_pretrained`` directory (safetensors
    shards of at most ``max_shard_size``, config, modeling code), with ``tokenizer`` copied in when
    given. ``dtype``: "bf16" or "fp32". Reads the model's tensors only."""
    dtypes = {"bf16": torch.bfloat16, "fp32": torch.float32}
    if dtype not in dtypes:
        raise ValueError(f"export dtype={dtype!r} must be one of {sorted(dtypes)}")
    model = model_from_checkpoint(path, dtypes[dtype])
    model.save_pretrained(out, max_shard_size=max_shard_size)
    if tokenizer:
        from transformers import AutoTokenizer

        AutoTokenizer.from_pretrained(tokenizer).save_pretrained(out)
    return out



def save_model_dir(model, out: str, tokenizer: str | None = None) -> str:
    """The training model as a ``save_pretrained`` directory (config, safetensors, modeling code) with the
    tokenizer of ``tokenizer`` beside it, replacing ``out`` as a whole: written to ``out.tmp`` and renamed,
    so a reader sees the previous model or the new one. Collective under torchrun (FSDP gathers the
    full weights to rank 0, which writes)."""
    rank, world = _rank_world()
    state_dict = None
    if world > 1:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        state_dict = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    if rank == 0:
        tmp, old = out.rstrip("/") + ".tmp", out.rstrip("/") + ".old"
        for p in (tmp, old):
            shutil.rmtree(p, ignore_errors=True)
        unwrap(model).save_pretrained(tmp, state_dict=state_dict)
        if tokenizer:
            from transformers import AutoTokenizer

            AutoTokenizer.from_pretrained(tokenizer).save_pretrained(tmp)
        if os.path.exists(out):
            os.replace(out, old)
        os.replace(tmp, out)
        shutil.rmtree(old, ignore_errors=True)
    if world > 1:
        dist.barrier()
    return out
