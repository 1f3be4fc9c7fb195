"""MixCon as a vLLM model (docs/serving.md): attention through vLLM's paged `Attention`, Conba layers
with their state in vLLM's per-sequence state slots, MoE and MLP as this project's modules.

The modules reuse this project's layers (`ConbaMixer` and its scan/step, `SparseMoE`, `SwiGLUMLP`,
`RMSNorm`, the attention projections and RoPE), under the same parameter names as the transformers
model, so the safetensors that `save_pretrained` writes load as they are.

vLLM hands the model a flat batch of tokens: the decode requests first (one token each), then the
prefill requests (a prompt, or a piece of one with chunked prefill) back to back. Attention reads
its paged K/V; a Conba layer reads its metadata (`Mamba1AttentionMetadata`: slot of each request,
whether a prefill continues a state) and runs `conba_step` on the decodes (batched) and the
chunked scan on each prefill, reading and writing the request's slot. A slot is reset (the state
before the first token: zeros and k = k₀) when a prefill starts a new sequence.

Supported: tensor parallel (heads, Conba channels by whole control groups, expert features), compiled
or eager mode, prefix caching ("align"), no speculative decoding; layers of attention or Conba with an
MLP, MoE or no FFN (no Mixture of Depths, Mixture of Modules or spatial layers).
"""

from __future__ import annotations

from collections.abc import Iterable
import torch
from torch import nn

try:
    from vllm.config import VllmConfig, get_current_vllm_config
    from vllm.distributed import (get_tensor_model_parallel_rank, get_tensor_model_parallel_world_size,
                                  tensor_model_parallel_all_reduce)
    from vllm.forward_context import get_forward_context
    from vllm.model_executor.layers.attention import Attention
    from vllm.model_executor.layers.linear import (ColumnParallelLinear, MergedColumnParallelLinear,
                                                   RowParallelLinear)
    from vllm.model_executor.layers.mamba.abstract import MambaBase
    from vllm.model_executor.layers.mamba.mamba_utils import MambaCopySpec
    from vllm.model_executor.models.interfaces import HasInnerState, IsHybrid, SupportsMambaPrefixCaching
    from vllm.utils.torch_utils import direct_register_custom_op
    from vllm.v1.attention.backends.registry import MambaAttentionBackendEnum
except ImportError as e:  # pragma: no cover - exercised without vLLM in tests/serve/test_plugin.py
    from mixcon.serve.plugin import VLLM_MISSING

    raise ImportError(VLLM_MISSING) from e

from mixcon.layers.attention import MixConAttention, apply_rope, rope_cos_sin
from mixcon.layers.conba import ConbaMixer
from mixcon.layers.mlp import SwiGLUMLP
from mixcon.layers.moe import SparseMoE
from mixcon.layers.norm import RMSNorm
from mixcon.models.configuration_mixcon import MixConConfig
from mixcon.ops.conba import ConbaState
from mixcon.serve.plugin import CONBA_MIXER_OP

# ------------------------------------------------------------------------------------ Conba state

def conba_state_layout(config, tp: int = 1) -> tuple[tuple[str, tuple[int, ...], torch.dtype], ...]:
    """(name, shape of one slot, dtype) of every state a Conba layer keeps between tokens, on one of
    ``tp`` tensor-parallel ranks (each holds d_inner / tp channels and their control groups).

    conv (d_inner, d_conv − 1): the conv window; h (d_inner, N): the SSM state; line (τ, d_inner, N):
    the delay line (only with τ > 0); k (d_inner / G,), e (d_inner,), phase (1,): the controller's gain,
    the error sampled at its last instant and the steps since (only with control). Everything is
    float32 (the scan accumulates in float32; the conv window holds inputs of the model's dtype, which
    float32 holds exactly) and the phase int32, so every state starts at a 4-byte boundary of a page."""
    d, N = config.d_inner // tp, config.d_state
    out = [("conv", (d, config.d_conv - 1), torch.float32), ("h", (d, N), torch.float32)]
    if config.delay > 0:
        out.append(("line", (config.delay, d, N), torch.float32))
    if config.control:
        out += [("k", (d // config.control_group,), torch.float32), ("e", (d,), torch.float32),
                ("phase", (1,), torch.int32)]
    return tuple(out)


def _whole_state_copy(state: torch.Tensor, block_ids: list[int], cur_block_idx: int,
                      num_accepted_tokens: int) -> MambaCopySpec:
    """Copy spec of one state for vLLM's prefix caching in align mode: the whole slot of the block
    that holds the state after the last accepted token (one token a step here: ``cur_block_idx``)."""
    src = state[block_ids[cur_block_idx + num_accepted_tokens - 1]]
    return MambaCopySpec(start_addr=src.data_ptr(), num_elements=src.numel())

# ------------------------------------------------------------------------------------ tensor parallel
#
# Each rank holds: attention, a contiguous share of the query heads and of the K/V heads (q/k/v_proj
# column-parallel, o_proj row-parallel); Conba, a contiguous share of the d_inner channels and of their
# control groups (the scan is independent per channel, the controller per group: no group may
# straddle two ranks) — in_proj column-parallel over u and z alike, conv1d, dt_proj, A_log, D, w_r
# and the per-group parameters by channel or group, x_proj (and the SwiGLU's gate/value) row-parallel
# (their outputs, δ's rank input, B, C and every group's scaling logit, depend on all channels: summed
# over ranks), sel_out replicated, and of the selection's output each rank keeps δ, B, C and its own
# groups' scaling logits (`_sel_rows`); out_proj row-parallel; MLP, gate/up column- and down row-parallel; MoE, every expert's
# intermediate features split (gate/up rows, down columns), the router replicated and the experts'
# output summed over ranks. Embeddings, norms and lm_head are replicated.


class _Local:
    """``config`` with some fields replaced (the per-rank sizes)."""

    def __init__(self, config, **fields):
        self._config, self._fields = config, fields

    def __getattr__(self, name):
        fields = self.__dict__.get("_fields", {})
        return fields[name] if name in fields else getattr(self.__dict__["_config"], name)


def tensor_parallel_sizes(config) -> list[int]:
    """The tensor_parallel_size values (up to 64) this config can be split over."""
    return [t for t in range(1, 65) if _tp_problem(config, t) is None]


def _tp_problem(config, tp: int) -> str | None:
    kinds = set(config.layers_block_type)
    if "attention" in kinds:
        if config.num_attention_heads % tp:
            return f"num_attention_heads = {config.num_attention_heads} is not divisible by it"
        if config.num_key_value_heads % tp:
            return f"num_key_value_heads = {config.num_key_value_heads} is not divisible by it"
    if "conba" in kinds:
        if config.d_inner % tp:
            return f"d_inner = {config.d_inner} is not divisible by it"
        if (config.d_inner // tp) % config.control_group:
            return (f"it splits a Conba control group: d_inner / tp = {config.d_inner // tp} channels per rank is "
                    f"not a multiple of control_group = {config.control_group}")
    if set(config.layers_ffn_type) & {"mlp", "moe"} and config.intermediate_size % tp:
        return f"intermediate_size = {config.intermediate_size} is not divisible by it"
    return None


def check_tensor_parallel(config, tp: int) -> None:
    problem = _tp_problem(config, tp)
    if problem is not None:
        raise ValueError(f"tensor_parallel_size={tp} cannot serve this MixCon model: {problem}; allowed: "
                         f"tensor_parallel_size in {tensor_parallel_sizes(config)}")


def _sel_rows(config, rank: int, tp: int) -> torch.Tensor:
    """Rows of the selection's output kept on ``rank``: δ's rank input, B and C, and (with state
    scaling) this rank's groups' scaling logits."""
    head = config.dt_rank + 2 * config.d_state
    rows = torch.arange(head)
    if config.state_scaling:
        ngl = config.d_inner // config.control_group // tp
        rows = torch.cat([rows, head + rank * ngl + torch.arange(ngl)])
    return rows


def shard_tensor(name: str, full: torch.Tensor, config, rank: int, tp: int) -> torch.Tensor:
    """The part of checkpoint tensor ``name`` (a transformers MixCon name) that tensor-parallel rank
    ``rank`` of ``tp`` holds (module comment above); the whole tensor where it is replicated."""
    if tp == 1:
        return full
    parts = name.split(".")
    if len(parts) < 5 or parts[0] != "model" or parts[1] != "layers":
        return full  # embeddings, final norm, lm_head
    i, module, leaf = int(parts[2]), parts[3], ".".join(parts[4:])

    def split(t, dim, size=None):  # this rank's contiguous share of dim (of its first `size` entries)
        n = (size or t.shape[dim]) // tp
        return t.narrow(dim, rank * n, n)

    if module == "mixer" and config.layers_block_type[i] == "attention":
        if leaf in ("q_proj.weight", "k_proj.weight", "v_proj.weight"):
            return split(full, 0)
        if leaf == "o_proj.weight":
            return split(full, 1)
        return full
    if module == "mixer":  # Conba
        d = config.d_inner
        if leaf in ("in_proj.weight", "in_proj.bias"):  # [u; z]: this rank's channels of each
            return torch.cat([split(full.narrow(0, 0, d), 0), split(full.narrow(0, d, d), 0)])
        if leaf in ("conv1d.weight", "conv1d.bias", "dt_proj.weight", "dt_proj.bias", "A_log", "D", "w_r",
                    "alpha_bias", "rho_raw", "eta_raw", "lam_raw", "k0"):
            return split(full, 0)
        if leaf in ("x_proj.weight", "sel_gate.weight", "sel_value.weight", "out_proj.weight"):
            return split(full, 1)
        return full  # sel_out, out_proj.bias (added once after the sum), the δ/B/C norms
    if module == "feed_forward":
        if leaf in ("gate_proj.weight", "up_proj.weight"):
            return split(full, 0)
        if leaf == "down_proj.weight":
            return split(full, 1)
        if leaf == "experts.gate_up_proj":  # (E, 2F, D): this rank's features of gate and of up
            F_ = full.shape[1] // 2
            return torch.cat([split(full.narrow(1, 0, F_), 1), split(full.narrow(1, F_, F_), 1)], dim=1)
        if leaf == "experts.down_proj":  # (E, D, F)
            return split(full, 2)
    return full


def _plain_gemm(layer):
    """On CPU vLLM repacks a linear layer's weight for oneDNN after loading and frees the weight; the
    flag it reads (``_cpu_skip_gemm_dispatch``) keeps the weight and `F.linear`: the Conba layer reads
    some weights directly (δ's projection, the compiled decode step), and the products stay those of
    the transformers model, so greedy tokens equal `generate`'s."""
    layer._cpu_skip_gemm_dispatch = True
    return layer


class _SelectionRows(RowParallelLinear):
    """x_proj: row-parallel over the channels, every output row (summed over ranks), then this rank's
    rows of it (`_sel_rows`)."""

    def __init__(self, d: int, n_sel: int, keep: torch.Tensor | None, prefix: str):
        super().__init__(d, n_sel, bias=False, input_is_parallel=True, return_bias=False, prefix=prefix)
        self.keep = keep
        _plain_gemm(self)

    def forward(self, x):
        y = super().forward(x)
        return y if self.keep is None else y.index_select(-1, self.keep.to(y.device))


class _KeepRows(nn.Linear):
    """sel_out: replicated, then this rank's rows of its output (`_sel_rows`)."""

    def __init__(self, inp: int, out: int, keep: torch.Tensor | None):
        super().__init__(inp, out, bias=False)
        self.keep = keep

    def forward(self, x):
        y = super().forward(x)
        return y if self.keep is None else y.index_select(-1, self.keep.to(y.device))


def _column(inp, out, bias, prefix):
    return _plain_gemm(ColumnParallelLinear(inp, out, bias=bias, return_bias=False, prefix=prefix))


def _row(inp, out, bias, prefix):
    return _plain_gemm(RowParallelLinear(inp, out, bias=bias, input_is_parallel=True, return_bias=False,
                                         prefix=prefix))


class VllmConbaMixer(ConbaMixer, MambaBase):
    """`ConbaMixer` (same parameters, same scan and step) whose state lives in vLLM's state slots."""

    def __init__(self, config, layer_idx: int, prefix: str, tp: int = 1):
        d = config.d_inner
        super().__init__(_Local(config, d_inner=d // tp), layer_idx)  # this rank's channels and groups
        self.tp = tp
        H, S = config.hidden_size, config.selection_hidden
        self.in_proj = _plain_gemm(MergedColumnParallelLinear(H, [d, d], bias=config.proj_bias, return_bias=False,
                                                              prefix=f"{prefix}.in_proj"))
        n_sel = config.dt_rank + 2 * config.d_state + (d // config.control_group if self.state_scaling else 0)
        keep = _sel_rows(config, get_tensor_model_parallel_rank(), tp) if tp > 1 else None
        self.x_proj = _SelectionRows(d, n_sel, keep, f"{prefix}.x_proj")
        if self.selection == "swiglu":
            self.sel_gate = _row(d, S, False, f"{prefix}.sel_gate")
            self.sel_value = _row(d, S, False, f"{prefix}.sel_value")
            self.sel_out = _KeepRows(S, n_sel, keep)
        self.dt_proj = _column(self.dt_rank, d, True, f"{prefix}.dt_proj")
        self.out_proj = _row(d, H, config.proj_bias, f"{prefix}.out_proj")
        self.prefix = prefix
        self.layout = conba_state_layout(config, tp)
        self.kv_cache = tuple(torch.tensor([]) for _ in self.layout)
        context = get_current_vllm_config().compilation_config.static_forward_context
        if prefix in context:
            raise ValueError(f"duplicate layer name {prefix!r}")
        context[prefix] = self  # vLLM binds the layer's slots and metadata by this name

    # MambaBase
    def get_state_shape(self) -> tuple[tuple[int, ...], ...]:
        d, N, tau = self.d_inner, self.d_state, self.tau
        shapes = [(d, self.d_conv - 1), (d, N)] + ([(tau, d, N)] if tau > 0 else [])
        if self.control:
            shapes += [(self.n_groups,), (d,), (1,)]
        return tuple(shapes)

    def get_state_dtype(self) -> tuple[torch.dtype, ...]:
        return tuple(torch.int32 if name == "phase" else torch.float32 for name, _, _ in self.layout)

    def _fused_step_applies(self, x) -> bool:
        """The compiled CPU decode step reads x_proj's weight whole: one rank's columns need the sum
        over ranks that the row-parallel layer does, so it runs only unsplit."""
        return self.tp == 1 and super()._fused_step_applies(x)

    @property
    def mamba_type(self) -> MambaAttentionBackendEnum:
        return MambaAttentionBackendEnum.MAMBA1  # its metadata (slots, has_initial_states) is what we read

    # state slots
    def _slots(self) -> dict[str, torch.Tensor]:
        return {name: t for (name, _, _), t in zip(self.layout, self.kv_cache)}

    def _read(self, slots, idx: torch.Tensor, fresh: torch.Tensor | None = None):
        """The states of slots ``idx`` as the mixer's cache dict; rows where ``fresh`` is true start empty."""
        n, device = idx.shape[0], idx.device
        conv0, empty = self.empty_state(n, device)
        conv = slots["conv"][idx].to(conv0.dtype)
        h = slots["h"][idx]
        line = slots["line"][idx] if self.tau > 0 else empty.line
        if self.control:
            k, e, phase = slots["k"][idx], slots["e"][idx], slots["phase"][idx, 0].long()
        else:
            k, e, phase = empty.k, empty.e, empty.phase
        state = ConbaState(h, line, k, e, phase)
        if fresh is not None:
            conv = torch.where(fresh[:, None, None], conv0, conv)
            state = ConbaState(*(torch.where(fresh.view(-1, *[1] * (a.dim() - 1)), b.to(a.dtype), a)
                                 for a, b in zip(state, empty)))
        return {"conv": conv, "ssm": state}

    def _write(self, slots, idx: torch.Tensor, state) -> None:
        slots["conv"][idx] = state["conv"].to(slots["conv"].dtype)
        s = state["ssm"]
        slots["h"][idx] = s.h.float()
        if self.tau > 0:
            slots["line"][idx] = s.line.float()
        if self.control:
            slots["k"][idx] = s.k.float()
            slots["e"][idx] = s.e.float()
            slots["phase"][idx, 0] = s.phase.to(torch.int32)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        """hidden_states (tokens, hidden) → (tokens, hidden) through the registered op
        ``mixcon::conba_mixer``: under torch.compile the op is one opaque node (its fake implementation
        gives the shapes), and a splitting op of vLLM's piecewise graphs, so the host-side work of
        `forward_impl` (the loop over prefills, ``.tolist()`` of the metadata) runs eagerly between the
        captured pieces."""
        output = torch.empty_like(hidden_states)
        torch.ops.mixcon.conba_mixer(hidden_states, output, self.prefix)
        return output

    def forward_impl(self, hidden_states: torch.Tensor) -> torch.Tensor:
        """hidden_states (tokens, hidden), decodes first then prefills → (tokens, hidden)."""
        meta = get_forward_context().attn_metadata
        meta = meta.get(self.prefix) if isinstance(meta, dict) else None
        if meta is None:  # vLLM's profiling run: no slots yet, only the shapes matter
            return self.out_proj(self.in_proj(hidden_states).chunk(2, dim=-1)[0])
        nd, npf = meta.num_decode_tokens, meta.num_prefill_tokens
        out = hidden_states.new_zeros(hidden_states.shape)
        slots = self._slots()
        if nd > 0:
            if meta.num_decodes != nd:
                raise NotImplementedError("MixCon's vLLM model runs one token per decode step "
                                          "(speculative decoding is not supported)")
            idx = meta.state_indices_tensor_d[:, 0].long()
            state = self._read(slots, idx)
            out[:nd] = super().forward(hidden_states[:nd, None], state=state)[:, 0]
            self._write(slots, idx, state)
        if npf > 0:
            starts = meta.query_start_loc_p.tolist()
            idx_p = meta.state_indices_tensor_p.long()
            fresh_p = ~meta.has_initial_states_p.bool()
            x = hidden_states[nd:nd + npf]
            for i in range(len(starts) - 1):  # one prompt (piece) at a time: the chunked scan over it
                s, e = starts[i], starts[i + 1]
                idx = idx_p[i:i + 1]
                state = self._read(slots, idx, fresh_p[i:i + 1])
                out[nd + s:nd + e] = super().forward(x[None, s:e], state=state)[0]
                self._write(slots, idx, state)
        return out


def _conba_mixer(hidden_states: torch.Tensor, output: torch.Tensor, layer_name: str) -> None:
    """The op's body: the layer named ``layer_name`` (vLLM's forward context holds it) writes its output."""
    layer = get_forward_context().no_compile_layers[layer_name]
    output.copy_(layer.forward_impl(hidden_states))


def _conba_mixer_fake(hidden_states: torch.Tensor, output: torch.Tensor, layer_name: str) -> None:
    return None


try:  # vLLM's breakable CUDA-graph capture runs such ops eagerly between captured segments
    from vllm.compilation.breakable_cudagraph import eager_break_during_capture as _eager_break
except ImportError:  # pragma: no cover - older vLLM
    _eager_break = lambda fn: fn  # noqa: E731

_MIXCON_LIB = torch.library.Library(CONBA_MIXER_OP.split("::")[0], "FRAGMENT")
direct_register_custom_op(op_name=CONBA_MIXER_OP.split("::")[1], op_func=_eager_break(_conba_mixer),
                          mutates_args=["output"], fake_impl=_conba_mixer_fake, target_lib=_MIXCON_LIB)


# ------------------------------------------------------------------------------------ attention


class VllmAttention(MixConAttention):
    """MixCon's attention projections and RoPE; the softmax over vLLM's paged K/V."""

    def __init__(self, config, layer_idx: int, prefix: str, cache_config=None, tp: int = 1):
        super().__init__(config, layer_idx)
        H, hd = config.hidden_size, self.head_dim
        self.q_proj = _column(H, self.num_heads * hd, False, f"{prefix}.q_proj")
        self.k_proj = _column(H, self.num_kv_heads * hd, False, f"{prefix}.k_proj")
        self.v_proj = _column(H, self.num_kv_heads * hd, False, f"{prefix}.v_proj")
        self.o_proj = _row(self.num_heads * hd, H, False, f"{prefix}.o_proj")
        self.num_heads, self.num_kv_heads = self.num_heads // tp, self.num_kv_heads // tp  # this rank's
        self.use_rope, self.rope_theta = config.use_rope, config.rope_theta
        self.attn = Attention(self.num_heads, self.head_dim, self.head_dim ** -0.5, num_kv_heads=self.num_kv_heads,
                              cache_config=cache_config, prefix=f"{prefix}.attn")

    def forward(self, x: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """x (tokens, hidden), positions (tokens,) → (tokens, hidden)."""
        T = x.shape[0]
        q, k, v = self.q_proj(x), self.k_proj(x), self.v_proj(x)
        if self.use_rope:
            cos, sin = rope_cos_sin(positions[None], self.head_dim, self.rope_theta, x.dtype)  # (1, 1, T, hd)
            q = apply_rope(q.view(1, T, -1, self.head_dim).transpose(1, 2), cos, sin).transpose(1, 2).reshape(T, -1)
            k = apply_rope(k.view(1, T, -1, self.head_dim).transpose(1, 2), cos, sin).transpose(1, 2).reshape(T, -1)
        return self.o_proj(self.attn(q, k, v))


# ------------------------------------------------------------------------------------ the model


def check_servable(config, tp: int = 1) -> None:
    """What this vLLM model runs: one clear error for anything else."""
    kinds = set(config.layers_block_type) - {"attention", "conba"}
    if kinds:
        raise ValueError(f"MixCon's vLLM model serves attention and Conba layers; this model has "
                         f"{', '.join(sorted(kinds))} layers (serve it with transformers' generate)")
    if any(m != "none" for m in config.layers_mod_type):
        raise ValueError("MixCon's vLLM model does not serve Mixture-of-Depths layers (layers_mod_type); "
                         "serve this model with transformers' generate")
    check_tensor_parallel(config, tp)


class VllmMLP(SwiGLUMLP):
    """`SwiGLUMLP` with gate/up column-parallel and down row-parallel."""

    def __init__(self, hidden_size: int, intermediate_size: int, prefix: str):
        super().__init__(hidden_size, intermediate_size)
        self.gate_proj = _column(hidden_size, intermediate_size, False, f"{prefix}.gate_proj")
        self.up_proj = _column(hidden_size, intermediate_size, False, f"{prefix}.up_proj")
        self.down_proj = _row(intermediate_size, hidden_size, False, f"{prefix}.down_proj")


class VllmMoE(SparseMoE):
    """`SparseMoE` whose experts hold this rank's intermediate features; the output is summed over ranks
    (the router's weighting is linear in it)."""

    def __init__(self, config, tp: int = 1):
        super().__init__(_Local(config, intermediate_size=config.intermediate_size // tp))
        self.tp = tp

    def forward(self, x: torch.Tensor):
        y, logits = super().forward(x)
        return (tensor_model_parallel_all_reduce(y) if self.tp > 1 else y), logits


class MixConDecoderLayer(nn.Module):
    def __init__(self, config, layer_idx: int, prefix: str, cache_config=None, tp: int = 1):
        super().__init__()
        self.mixer_type = config.layers_block_type[layer_idx]
        self.ffn_type = config.layers_ffn_type[layer_idx]
        self.input_layernorm = RMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        if self.mixer_type == "attention":
            self.mixer = VllmAttention(config, layer_idx, f"{prefix}.mixer", cache_config, tp)
        else:
            self.mixer = VllmConbaMixer(config, layer_idx, f"{prefix}.mixer", tp)
        if self.ffn_type != "none":
            self.pre_ff_layernorm = RMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        if self.ffn_type == "moe":
            self.feed_forward = VllmMoE(config, tp)
        elif self.ffn_type == "mlp":
            self.feed_forward = VllmMLP(config.hidden_size, config.intermediate_size, f"{prefix}.feed_forward")

    def forward(self, x: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        h = self.input_layernorm(x)
        h = self.mixer(h, positions) if self.mixer_type == "attention" else self.mixer(h)
        x = x + h
        if self.ffn_type == "none":
            return x
        h = self.pre_ff_layernorm(x)
        if self.ffn_type == "moe":
            return x + self.feed_forward(h[None])[0][0]
        return x + self.feed_forward(h)


class MixConModel(nn.Module):
    def __init__(self, config, prefix: str, cache_config=None, tp: int = 1):
        super().__init__()
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList([MixConDecoderLayer(config, i, f"{prefix}.layers.{i}", cache_config, tp)
                                     for i in range(config.num_hidden_layers)])
        self.final_layernorm = RMSNorm(config.hidden_size, eps=config.rms_norm_eps)

    def forward(self, input_ids, positions, inputs_embeds=None):
        x = self.embed_tokens(input_ids) if inputs_embeds is None else inputs_embeds
        for layer in self.layers:
            x = layer(x, positions)
        return self.final_layernorm(x)


class MixConForCausalLM(nn.Module, HasInnerState, IsHybrid, SupportsMambaPrefixCaching):
    """vLLM's MixCon. Parameter names are the transformers model's (model.layers.{i}.mixer.in_proj.weight, …).

    Prefix caching (vLLM's Mamba "align" mode): the scheduler ends every prefill piece that is not a
    prompt's last on a block boundary, and vLLM gives each request the state slot of the block that
    holds its latest token; before a step whose first token opens a new block, vLLM copies the
    previous block's slot into the new one with the copy functions below. A block's slot therefore
    keeps the state after exactly its last token, and a later request whose prompt shares those
    blocks starts from that slot (``has_initial_states``). Every state is copied — conv window, h,
    delay line, gain k, sampled error e and the controller's phase — so a continued prefix resumes
    at the right instant of the control period."""

    def __init__(self, *, vllm_config: VllmConfig, prefix: str = ""):
        super().__init__()
        config = vllm_config.model_config.hf_config
        if not isinstance(config, MixConConfig):
            config = MixConConfig.from_dict(config.to_dict())
        tp = vllm_config.parallel_config.tensor_parallel_size
        check_servable(config, tp)
        self.config, self.tp = config, tp
        self.tp_rank = get_tensor_model_parallel_rank() if tp > 1 else 0
        p = f"{prefix}." if prefix else ""
        self.model = MixConModel(config, f"{p}model", vllm_config.cache_config, tp)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        if config.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight
        self.eval()  # no training noise, no router jitter

    def embed_input_ids(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.model.embed_tokens(input_ids)

    def forward(self, input_ids: torch.Tensor | None, positions: torch.Tensor, intermediate_tensors=None,
                inputs_embeds: torch.Tensor | None = None, **kwargs) -> torch.Tensor:
        return self.model(input_ids, positions, inputs_embeds)

    def compute_logits(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return self.lm_head(hidden_states)

    # IsHybrid: the state of one Conba layer, declared from the config (the layers declare the same)
    @classmethod
    def get_mamba_state_shape_from_config(cls, vllm_config: VllmConfig) -> tuple[tuple[int, ...], ...]:
        return tuple(shape for _, shape, _ in conba_state_layout(
            vllm_config.model_config.hf_config, vllm_config.parallel_config.tensor_parallel_size))

    @classmethod
    def get_mamba_state_dtype_from_config(cls, vllm_config: VllmConfig) -> tuple[torch.dtype, ...]:
        return tuple(dtype for _, _, dtype in conba_state_layout(vllm_config.model_config.hf_config))

    @classmethod
    def get_mamba_state_copy_func(cls) -> tuple:
        """The copy functions of the two states every Conba layer has (conv, h), whole. The class
        cannot see the config, so vLLM's runner asks the model instance (`get_mamba_state_copy_funcs`),
        which adds the delay line and the controller's states where the config has them."""
        return (_whole_state_copy, _whole_state_copy)

    def get_mamba_state_copy_funcs(self, mamba_types) -> dict:
        """One whole-slot copy per state of this config's Conba layers (vLLM copies only as many states
        as it is given functions: with Mamba's two, the delay line, k, e and the phase of a new block
        would be the slot's stale contents)."""
        funcs = tuple(_whole_state_copy for _ in conba_state_layout(self.config))  # the same number on every rank
        return {mamba_type: funcs for mamba_type in mamba_types}

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> set[str]:
        """The checkpoint's tensors by their transformers names, each cut to this rank's part
        (`shard_tensor`); an unknown name is an error."""
        params = dict(self.named_parameters())
        loaded = set()
        for name, tensor in weights:
            if name == "lm_head.weight" and self.config.tie_word_embeddings:
                continue  # the embedding's
            if name not in params:
                raise ValueError(f"the checkpoint holds {name!r}, which MixCon's vLLM model does not have "
                                 f"(is it a MixCon save_pretrained directory of this config?)")
            p = params[name]
            tensor = shard_tensor(name, tensor, self.config, self.tp_rank, self.tp)
            if tuple(p.shape) != tuple(tensor.shape):
                raise ValueError(f"{name}: the checkpoint's shape {tuple(tensor.shape)} != the model's {tuple(p.shape)}")
            with torch.no_grad():
                p.copy_(tensor.to(p.dtype))
            loaded.add(name)
        return loaded
