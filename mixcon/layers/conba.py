"""The Conba mixer (docs/conba.md, steps 1–7): Mamba's selective SSM plus a delayed state,
dynamic state scaling, an adaptive output-feedback controller and training noise."""

from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from ..ops import to_acc as _acc, tracing
from ..ops.conba import ConbaParams, ConbaState, conba_scan, conba_step, empty_state
from ..ops.conba import cpu
from ..ops.conba.library import conba_decode_layer_op, cpu_kernels_built
from ..ops.conv import causal_conv1d, causal_conv1d_step
from .common import TorchInit
from .linear import Linear
from .norm import RMSNorm


def _inv_softplus(y: float) -> float:
    return math.log(math.expm1(y))


def _logit(p: float) -> float:
    return math.log(p / (1.0 - p))


RHO_INIT = 0.05  # ρ at initialisation (docs/conba.md first said sigmoid(−9) ≈ 1e-4: its gradient was ~1e-10)


def _reflect(k0: torch.Tensor) -> torch.Tensor:
    """|k0| with derivative +1 at 0: the initial gain is never negative, so the gain law's clamp at 0
    never binds and k0 keeps a gradient (a negative k0 was clamped to 0 and stopped learning)."""
    return torch.where(k0 >= 0, k0, -k0)


# the gain law's rates per step (docs/conba.md, step 6: η = 1e-2, λ = 0.05 at P = 1)
ETA_PER_STEP, LAM_PER_STEP = 1e-2, 0.05
# control_init="live" (docs/conba.md, "Initialisation"): λ 10× slower, so that the gain remembers about 200 tokens (3 periods at
# P = 64) instead of 20 (λ_64 = 0.96 forgot the gain within one period), and k0 at the law's fixed point
# η/λ · rms(e) for the error's RMS at initialisation (≈ 0.25 on the tiny configs: k = 2 · 0.25 = 0.5)
LIVE_LAM_PER_STEP, LIVE_K0 = 0.005, 0.5


def control_init_values(control_period: int, control_init: str = "spec") -> tuple[float, float, float]:
    """(η, λ, k0) at initialisation for ``control_init`` ("spec": the spec's values, k0 = 0; "live":
    λ₁ = 0.005 and k0 = 0.5), η and λ per sampling instant by `gain_law_init`."""
    if control_init == "spec":
        return (*gain_law_init(control_period), 0.0)
    if control_init == "live":
        return (*gain_law_init(control_period, LIVE_LAM_PER_STEP), LIVE_K0)
    raise ValueError(f"control_init={control_init!r} must be 'spec' or 'live'")


def gain_law_init(control_period: int, lam_per_step: float = LAM_PER_STEP) -> tuple[float, float]:
    """Initial (η, λ) per sampling instant for control period P: the zero-order-hold equivalent of
    the per-step law. P per-step updates with a constant error r take k to
    (1 − λ₁)^P · k + η₁ · r · (1 − (1 − λ₁)^P) / λ₁, so one update every P steps starts with
    λ_P = 1 − (1 − λ₁)^P and η_P = η₁ · λ_P / λ₁ (P = 1: the spec's values). Without it the gain of
    a P = 64 controller rises 64× more slowly per token and λ starts with ~100× less gradient than at
    P = 1 (measured on the tiny config)."""
    lam = 1.0 - (1.0 - lam_per_step) ** control_period
    return ETA_PER_STEP * lam / lam_per_step, lam


class ConbaMixer(nn.Module):
    """Parameter names follow Mamba/Jamba (in_proj, conv1d, x_proj, dt_proj, A_log, D, out_proj)
    so that their weights map one to one; the SwiGLU correction of the selection is
    sel_gate/sel_value/sel_out (docs/conba.md, step 3)."""

    def __init__(self, config, layer_idx: int):
        super().__init__()
        self.layer_idx = layer_idx
        self.hidden_size = config.hidden_size
        self.d_inner = d = config.d_inner
        self.d_state = N = config.d_state
        self.d_conv = config.d_conv
        self.dt_rank = R = config.dt_rank
        self.group_size = G = config.control_group
        self.n_groups = ng = d // G
        self.tau = config.delay
        self.state_scaling = config.state_scaling
        self.control = config.control
        self.k_max = config.k_max
        self.control_period = config.control_period
        self.control_init = getattr(config, "control_init", "spec")
        self.process_noise = config.process_noise
        self.observation_noise = config.observation_noise
        self.selection = config.selection
        self.backend = config.conba_backend
        self.n_sel = R + 2 * N + (ng if self.state_scaling else 0)  # δ, B, C and a (one per group)

        self.in_proj = Linear(config.hidden_size, 2 * d, bias=config.proj_bias)
        self.conv1d = nn.Conv1d(d, d, config.d_conv, groups=d, padding=config.d_conv - 1, bias=config.conv_bias)
        self.x_proj = Linear(d, self.n_sel, bias=False)  # Mamba's linear selection
        if self.selection == "swiglu":  # plus a SwiGLU correction whose output matrix starts at zero
            S = config.selection_hidden
            self.sel_gate = Linear(d, S, bias=False)
            self.sel_value = Linear(d, S, bias=False)
            self.sel_out = Linear(S, self.n_sel, bias=False)
            nn.init.zeros_(self.sel_out.weight)
        self.dt_proj = Linear(R, d, bias=True)
        if config.ssm_norm:
            self.dt_layernorm = RMSNorm(R, eps=config.rms_norm_eps)
            self.b_layernorm = RMSNorm(N, eps=config.rms_norm_eps)
            self.c_layernorm = RMSNorm(N, eps=config.rms_norm_eps)
        self.ssm_norm = config.ssm_norm
        self.A_log = nn.Parameter(torch.log(torch.arange(1, N + 1, dtype=torch.float32)).repeat(d, 1))
        self.D = nn.Parameter(torch.ones(d))
        if self.state_scaling:
            self.alpha_bias = nn.Parameter(torch.full((ng,), 6.9))  # α ≈ 0.999 at start
        if self.tau > 0:
            self.rho_raw = nn.Parameter(torch.full((ng,), _logit(RHO_INIT)))
        if self.control:
            eta0, lam0, k00 = control_init_values(self.control_period, self.control_init)
            self.eta_raw = nn.Parameter(torch.full((ng,), _inv_softplus(eta0)))
            self.lam_raw = nn.Parameter(torch.full((ng,), _logit(lam0)))
            self.k0 = nn.Parameter(torch.full((ng,), k00))
            self.w_r = nn.Parameter(torch.zeros(d))  # 0: the error is the output itself
        self.out_proj = Linear(d, config.hidden_size, bias=config.proj_bias)
        self._dt_init = (config.dt_min, config.dt_max, config.dt_init_floor)

    @torch.no_grad()
    def reset_parameters(self, init=None):
        """docs/conba.md, "Initialisation (normative)": in_proj, conv1d, x_proj and the SwiGLU's
        sel_gate/sel_value as PyTorch's default (as mamba_ssm leaves them; projection biases 0),
        sel_out = 0, then `reset_ssm_parameters`. out_proj is left to the model-wide init.
        ``init`` is a namespace of in-place initialisers (transformers.initialization, which skips
        tensors loaded from a checkpoint); plain torch when None."""
        init = init or TorchInit
        # looked up at call time, so that transformers' guard (which patches torch.nn.init while it
        # initialises a loaded model) applies when its namespace lacks kaiming_uniform_
        kaiming = getattr(init, "kaiming_uniform_", None) or (lambda t, **kw: nn.init.kaiming_uniform_(t, **kw))
        sel = [self.x_proj] + ([self.sel_gate, self.sel_value] if self.selection == "swiglu" else [])
        for lin in [self.in_proj, self.conv1d] + sel:
            kaiming(lin.weight, a=math.sqrt(5))  # nn.Linear / nn.Conv1d's own default
        if self.in_proj.bias is not None:
            init.zeros_(self.in_proj.bias)
        if self.conv1d.bias is not None:  # PyTorch's default: U(±1/sqrt(fan_in)), fan_in = d_conv
            bound = 1.0 / math.sqrt(self.d_conv)
            init.uniform_(self.conv1d.bias, -bound, bound)
        if self.selection == "swiglu":
            init.zeros_(self.sel_out.weight)
        self.reset_ssm_parameters(init)

    @torch.no_grad()
    def reset_ssm_parameters(self, init=None):
        """Mamba's initialisation of dt_proj (Δ log-uniform in [dt_min, dt_max]), A_log, D and
        the control parameters (docs/conba.md, steps 4–6; w_r = 0)."""
        init = init or TorchInit
        dt_min, dt_max, floor = self._dt_init
        std = self.dt_rank ** -0.5
        init.uniform_(self.dt_proj.weight, -std, std)
        dt = torch.exp(torch.rand(self.d_inner) * (math.log(dt_max) - math.log(dt_min)) + math.log(dt_min))
        dt = dt.clamp(min=floor)
        init.copy_(self.dt_proj.bias, dt + torch.log(-torch.expm1(-dt)))  # inverse softplus
        init.copy_(self.A_log, torch.log(torch.arange(1, self.d_state + 1, dtype=torch.float32)).repeat(self.d_inner, 1))
        init.ones_(self.D)
        if self.state_scaling:
            init.constant_(self.alpha_bias, 6.9)
        if self.tau > 0:
            init.constant_(self.rho_raw, _logit(RHO_INIT))
        if self.control:
            eta0, lam0, k00 = control_init_values(self.control_period, self.control_init)
            init.constant_(self.eta_raw, _inv_softplus(eta0))
            init.constant_(self.lam_raw, _logit(lam0))
            init.constant_(self.k0, k00)
            init.zeros_(self.w_r)

    # ------------------------------------------------------------------ helpers
    def empty_state(self, batch: int, device) -> tuple[torch.Tensor, ConbaState]:
        conv_state = torch.zeros(batch, self.d_inner, self.d_conv - 1, device=device, dtype=self.conv1d.weight.dtype)
        k0 = _reflect(self.k0) if self.control else None
        return conv_state, empty_state(batch, self.d_inner, self.d_state, self.tau, self.group_size, k0, device)

    def _scan_params(self, u: torch.Tensor):
        """Selection network (step 3), Δ projection (4) and the mechanisms' parameters (5, 6): the
        per-token inputs as a dict (delta, B, C, alpha) and the layer's `ConbaParams` under "params"."""
        q = self.x_proj(u)  # (..., R + 2N [+ ng])
        if self.selection == "swiglu":
            q = q + self.sel_out(F.silu(self.sel_gate(u)) * self.sel_value(u))
        sizes = [self.dt_rank, self.d_state, self.d_state] + ([self.n_groups] if self.state_scaling else [])
        parts = torch.split(q, sizes, dim=-1)
        dt, B, C = parts[:3]
        if self.ssm_norm:
            dt, B, C = self.dt_layernorm(dt), self.b_layernorm(B), self.c_layernorm(C)
        x = dict(delta=F.linear(dt, self.dt_proj.weight), B=B, C=C)  # bias and softplus are applied inside the scan
        p = dict(A=-torch.exp(_acc(self.A_log)), D=self.D, delta_bias=self.dt_proj.bias, delta_softplus=True,
                 group_size=self.group_size, k_max=self.k_max)
        if self.state_scaling:
            x["alpha"] = torch.sigmoid(_acc(parts[3]) + _acc(self.alpha_bias))
        if self.tau > 0:
            p["rho"], p["tau"] = torch.sigmoid(_acc(self.rho_raw)), self.tau
        if self.control:
            p.update(k0=_reflect(self.k0), eta=F.softplus(_acc(self.eta_raw)), lam=torch.sigmoid(_acc(self.lam_raw)),
                     w_r=self.w_r, control_period=self.control_period)
        if self.training and (self.process_noise > 0 or self.observation_noise > 0):
            # a fresh key per forward, drawn from torch's RNG so runs are reproducible under manual_seed
            p.update(sigma_w=self.process_noise, sigma_v=self.observation_noise,
                     seed=int(torch.randint(0, 2**31 - 1, (1,)).item()))
        x["params"] = ConbaParams(**p)
        return x

    # ------------------------------------------------------------------ forward
    def forward(self, x: torch.Tensor, mask: Optional[torch.Tensor] = None, state=None):
        """x (b, T, hidden); mask (b, T) with 1 = token, 0 = padding, or None;
        state: None (no cache) or a dict {"conv": (b, d_inner, d_conv − 1), "ssm": ConbaState}
        that is read and replaced by the state after this chunk."""
        b, T, _ = x.shape
        xz = self.in_proj(x)
        if state is not None and T == 1 and state.get("ssm") is not None and self._fused_step_applies(x):
            y = self._fused_step(xz[:, 0], mask, state)
            if y is not None:
                return self.out_proj(y)[:, None]
        u, z = xz.chunk(2, dim=-1)  # (b, T, d_inner) each
        if mask is not None:
            u = u * mask[..., None].to(u.dtype)  # padded positions are zeroed before the conv
        weight = self.conv1d.weight[:, 0, :]  # (d_inner, d_conv)
        if state is not None and T == 1 and state.get("ssm") is not None:
            return self._step(u[:, 0], z[:, 0], weight, mask, state)[:, None]
        conv_state = state.get("conv") if state is not None else None
        u, conv_final = causal_conv1d(u, weight, self.conv1d.bias, initial_state=conv_state, activation="silu",
                                      return_final_state=True)
        p = self._scan_params(u)
        init = state.get("ssm") if state is not None else None
        out = conba_scan(u, z=z, initial_state=init, return_final_state=state is not None, mask=mask,
                         backend=self.backend, **p)
        if state is not None:
            y, final = out
            state["conv"], state["ssm"] = conv_final, final
        else:
            y = out
        return self.out_proj(y)

    def _fused_step_applies(self, x) -> bool:
        """Whether a decode token can take the compiled CPU layer step: on CPU, the backend not the
        reference loop, no training noise, no gradient wanted. Under torch.compile it is the registered
        op (ops/conba/library.py), taken when the kernels were built before the trace (a prefill builds
        them); a trace never builds them."""
        if x.device.type != "cpu" or self.backend not in ("auto", "chunk_torch"):
            return False
        if tracing() and not (torch.compiler.is_compiling() and cpu_kernels_built()):
            return False  # FX symbolic tracing (proxies, no dtypes to check): the PyTorch step
        if self.training and (self.process_noise > 0 or self.observation_noise > 0):
            return False
        return not (torch.is_grad_enabled() and (x.requires_grad or any(p.requires_grad for p in self.parameters())))

    def _fused_step(self, xz, mask, state):
        """`_step` from in_proj's output to out_proj's input in one compiled call (ops/conba/cpu.py,
        `decode_layer`), or None where it does not apply. Runs once per layer and token: the weights are
        handed over by name (`cpu.DECODE_WEIGHTS`, found in the modules' parameter dicts by
        `cpu.find_decode_weights`), A = −exp(A_log) is kept until A_log changes."""
        if self.conv1d.weight.dtype != xz.dtype:
            return None
        mods = self._modules
        A_log = self._parameters["A_log"]
        traced = tracing()
        if traced:  # in the graph: no host-side cache keyed by data_ptr under a trace
            A_neg = -torch.exp(A_log)
        else:
            key = (A_log._version, A_log.data_ptr(), A_log.dtype)
            if getattr(self, "_A_key", None) != key:
                self._A_neg, self._A_key = (-torch.exp(A_log)).contiguous(), key
            A_neg = self._A_neg
        w = cpu.find_decode_weights(self, {"A": A_neg}, cpu.empty(xz.dtype))
        eps = mods["dt_layernorm"].variance_epsilon if self.ssm_norm else 0.0
        m = mask[:, 0] if mask is not None else None
        if traced:  # the same kernel as one opaque op of the graph; the state is written in place
            s = state["ssm"]
            if s.h.dtype != xz.dtype or xz.dtype not in (torch.float32, torch.float64) or self.group_size > 64:
                return None  # what cpu.decode_layer refuses: the PyTorch step is traced instead
            m = m.to(torch.long).contiguous() if m is not None else cpu.empty(torch.long)
            return conba_decode_layer_op(xz.contiguous(), m, state["conv"], *s, [x.contiguous() for x in w],
                                         self.dt_rank, self.tau, self.group_size, self.control_period,
                                         self.control, float(self.k_max), float(eps))
        return cpu.decode_layer(xz, m, state["conv"], state["ssm"], w, self.dt_rank, self.tau, self.group_size,
                                self.control_period, self.control, self.k_max, eps)

    def _step(self, u, z, weight, mask, state):
        """One token with the cache: rolling conv state, then `conba_step` (state updated in place)."""
        m = mask[:, 0] if mask is not None else None
        # u is already zeroed where padded: the conv window shifts in a zero, as in the full scan
        u = causal_conv1d_step(state["conv"], u, weight, self.conv1d.bias, activation="silu")
        p = self._scan_params(u)
        y = conba_step(state["ssm"], u, z=z, mask=m, backend=self.backend, **p)
        return self.out_proj(y)
