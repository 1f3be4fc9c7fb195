"""The host side of the two Triton scans — `chunk.py` (chunk-parallel, control period P > 1) and
`fused_recurrent.py` (per step, P = 1) — and of the decode step: what their kernels are specialised on
(`ScanConfig`), the grouped kernel arguments (`ARG_GROUPS`), the scan's inputs as the kernels take them,
the buffers a forward and a backward launch write, and the backward's reduction of per-program partials
into the inputs' gradients.

Names: Δ is ``delta`` here (``dt`` in the kernels), the delay line is ``line`` (its initial and final
values ``line0``, ``lineT``), the delay τ is ``tau``; the forward saves its state every
``checkpoint_interval`` steps for the backward to recompute from ("chunk" is only the chunk-parallel
algorithm).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Optional

import torch

from .noise import M32, SEED_SALT
from .params import ConbaParams, ConbaState

# steps between the forward's saved states (checkpoints): the backward recomputes the steps in between, so the
# saved state is ~1/64 of the sequence's
CHECKPOINT_INTERVAL = 64


@dataclass(frozen=True)
class ScanConfig:
    """One call's kernel configuration: the constexpr flags and the scalars (what `flags` and `kernel_groups`
    pass). The fields after ``checkpoint_interval`` belong to the chunk-parallel scan alone."""

    tau: int  # the delay τ (0: none)
    group_size: int  # channels per control group
    control: bool  # the output-feedback controller runs
    softplus: bool  # Δ goes through softplus (after its bias)
    k_max: float
    sigma_w: float  # training noise on the state (0: off)
    sigma_v: float  # on the output
    seed: int
    has_D: bool
    has_bias: bool
    has_z: bool
    has_alpha: bool
    has_mask: bool
    checkpoint_interval: int = CHECKPOINT_INTERVAL
    block_t: Optional[int] = None  # time positions per block; None: the per-step kernels (no chunk flags)
    period: int = 1  # the control period P
    fix_h: bool = False  # an initial h that may differ from its delay line's first entry
    aligned: bool = False  # every sampling instant is a block's last step

    @classmethod
    def of(cls, params: ConbaParams, z, alpha, mask, **chunk) -> "ScanConfig":
        p = params
        return cls(tau=p.tau, group_size=p.group_size, control=p.control, softplus=bool(p.delta_softplus),
                   k_max=float(p.k_max), sigma_w=float(p.sigma_w), sigma_v=float(p.sigma_v), seed=int(p.seed),
                   has_D=p.D is not None, has_bias=p.delta_bias is not None, has_z=z is not None,
                   has_alpha=alpha is not None, has_mask=mask is not None, **chunk)

    def replace(self, **changes) -> "ScanConfig":
        return dataclasses.replace(self, **changes)

    def flags(self) -> dict:
        """The kernels' constexpr flags (the chunk kernels' FIX_H and ALIGNED with ``block_t`` set)."""
        f = dict(TAU=self.tau, CONTROL=self.control, HAS_ALPHA=self.has_alpha, HAS_BIAS=self.has_bias,
                 SOFTPLUS=self.softplus, HAS_D=self.has_D, HAS_Z=self.has_z, HAS_MASK=self.has_mask,
                 NOISE_W=self.sigma_w > 0.0, NOISE_V=self.sigma_v > 0.0)
        if self.block_t is not None:
            f.update(FIX_H=self.fix_h, ALIGNED=self.aligned)
        return f


# ---------------------------------------------------------------------------------- kernel arguments
# The scan kernels take most arguments as groups (tuples; Triton unpacks them at compile time, so a group
# costs nothing at run time): the names of their members in the kernels, in order. A kernel module's
# ARG_GROUPS is its scan's entry here (kernel_report reads it for the ahead-of-time signatures). The decode
# step keeps flat arguments: it runs per token, and its ``do_not_specialize`` names t_idx and period.
_SHARED_GROUPS = {
    "ins": ("u_ptr", "dt_ptr", "z_ptr", "B_ptr", "C_ptr", "al_ptr", "m_ptr"),  # per-token inputs
    "prm": ("A_ptr", "bias_ptr", "D_ptr", "wr_ptr", "rho_ptr", "eta_ptr", "lam_ptr"),  # ConbaParams' tensors
    "strides": ("s_u_b", "s_u_t", "s_dt_b", "s_dt_t", "s_z_b", "s_z_t", "s_B_b", "s_B_t", "s_C_b", "s_C_t",
                "s_al_b", "s_al_t"),
    "scalars": ("k_max", "sigma_w", "sigma_v", "seed_key"),
    # the initial state (b, d, N), (b, τ, d, N), (b, ng), (b, d); the final state and the gradients alike
    "state0": ("h0_ptr", "line0_ptr", "k0_ptr", "e0_ptr"),
    "stateT": ("hT_ptr", "lineT_ptr", "kT_ptr", "eT_ptr"),
    "gstateT": ("ghT_ptr", "glineT_ptr", "gkT_ptr", "geT_ptr"),  # fp32
    "gins": ("gu_ptr", "gdt_ptr", "gz_ptr", "gal_ptr"),  # per-token gradients, contiguous like their inputs
    "gBC": ("gB_ptr", "gC_ptr"),  # partials (b, T, n_cb, N) fp32
    "gprm": ("gA_ptr", "gbias_ptr", "gD_ptr", "gwr_ptr", "grho_ptr", "geta_ptr", "glam_ptr"),  # partials per row
    "gstate0": ("gh0_ptr", "gline0_ptr", "gk0_ptr", "ge0_ptr"),  # the initial state's gradients (fp32)
}
ARG_GROUPS = {
    "chunk": {
        **_SHARED_GROUPS,
        "dims": ("T", "d", "NG", "N", "n_blk", "n_ck", "period"),
        "clock": ("ph_ptr", "t1_ptr"),  # (b, n_blk) int32 phase at each block's start; (b,) int32 first real step
        "carries": ("ck_s_ptr", "ck_k_ptr", "ck_e_ptr"),  # the carry (companion state, k, e) at each checkpoint
        "scratch": ("sc_s_ptr", "sc_k_ptr", "sc_e_ptr"),  # the start carries of one segment's blocks
    },
    "fused_recurrent": {
        **_SHARED_GROUPS,
        "dims": ("T", "d", "NG", "N", "n_ck"),
        "carries": ("ck_h_ptr", "ck_line_ptr", "ck_k_ptr", "ck_e_ptr"),  # the state at each checkpoint
        "scratch": ("sc_h_ptr", "sc_line_ptr", "sc_k_ptr", "sc_e_ptr"),  # one segment's pre-step states
    },
}


def _mix32_int(x: int) -> int:
    x ^= x >> 16
    x = (x * 0x7FEB352D) & M32
    x ^= x >> 15
    x = (x * 0x846CA68B) & M32
    x ^= x >> 16
    return x


def _seed_key(seed: int) -> int:
    """noise.step_key's per-seed part, as a signed int32 kernel argument (the kernel bitcasts it)."""
    s = _mix32_int((int(seed) ^ SEED_SALT) & M32)
    return s - (1 << 32) if s >= (1 << 31) else s


def _rows(x):
    """x with a unit stride on its last dim (strides of the leading dims are passed to the kernel)."""
    if x is None:
        return None
    return x if x.stride(-1) == 1 else x.contiguous()


def _strides(*xs):
    out = []
    for x in xs:
        out += [x.stride(0), x.stride(1)] if x is not None else [0, 0]
    return out


def kernel_groups(cfg: ScanConfig, args: tuple, dummy):
    """The groups every scan kernel takes — ins, prm, strides, scalars, state0 — from the scan's ``args``
    (`scan_args`' order; absent optional inputs: ``dummy``)."""
    u, delta, A, B, C, D, z, delta_bias, alpha, rho, eta, lam, w_r, h0, line0, k_init, e0, mask = args
    o = lambda x: x if x is not None else dummy  # noqa: E731
    return ((u, delta, o(z), B, C, o(alpha), o(mask)), (A, o(delta_bias), o(D), o(w_r), o(rho), o(eta), o(lam)),
            tuple(_strides(u, delta, z, B, C, alpha)),
            (float(cfg.k_max), float(cfg.sigma_w), float(cfg.sigma_v), _seed_key(cfg.seed)),
            state_group(cfg, (h0, line0, k_init, e0), dummy))


def state_group(cfg: ScanConfig, state, dummy):
    """A state (h, line, k, e) as a kernel group: the line is ``dummy`` at τ = 0."""
    h, line, k, e = state
    return (h, line if cfg.tau else dummy, k, e)


# ---------------------------------------------------------------------------------- the scan's inputs
def start_state(u, params: ConbaParams, state: Optional[ConbaState]):
    """The initial state (h, line, k, e) in float32, contiguous — zeros and the gain k0 without one — and its
    phase."""
    p = params
    b, T, d = u.shape
    n, ng = p.A.shape[1], d // p.group_size
    f32 = dict(device=u.device, dtype=torch.float32)
    if state is None:
        k_init = p.k0.float().expand(b, ng) if (p.control and p.k0 is not None) else torch.zeros(b, ng, **f32)
        s = (torch.zeros(b, d, n, **f32), torch.zeros(b, p.tau, d, n, **f32), k_init, torch.zeros(b, d, **f32))
        phase0 = torch.zeros(b, dtype=torch.long, device=u.device)
    else:
        s = tuple(x.float() for x in state[:4])
        phase0 = state.phase
    return tuple(x.contiguous() for x in s), phase0


def empty_scan(u, state0, phase0, return_final_state: bool):
    """A scan over no steps: an empty output and the state passed through (copies)."""
    b, _, d = u.shape
    y = u.new_zeros(b, 0, d)
    return (y, ConbaState(*(x.clone() for x in state0), phase0.clone())) if return_final_state else y


def scan_args(u, delta, B, C, params: ConbaParams, z, alpha, mask, state0):
    """The kernels' tensor arguments, in the order the launchers and the autograd Functions take them: u, Δ,
    A, B, C, D, z, Δ's bias, α, ρ, η, λ, w_r, the initial state, the mask (int8) — inputs with a unit stride
    on their last dim, the controller's absent parameters at their neutral values — and whether a gradient
    is needed. Raises ValueError when one batch row passes 32-bit offsets."""
    p = params
    b, T, d = u.shape
    eta, lam, w_r = p.eta, p.lam, p.w_r
    if p.control:
        f32 = dict(device=u.device, dtype=torch.float32)
        eta = eta if eta is not None else torch.zeros(d // p.group_size, **f32)
        lam = lam if lam is not None else torch.zeros(d // p.group_size, **f32)
        w_r = w_r if w_r is not None else torch.ones(d, **f32)
    if mask is not None:
        mask = mask.to(torch.int8).contiguous()
    u = u.contiguous()
    # offsets inside one batch row are 32-bit (the batch offset is 64-bit)
    row = max(T * x.stride(1) for x in (u, delta, z, B, C, alpha) if x is not None)
    if row >= 2**31:
        raise ValueError(f"conba_scan (triton): one batch row spans {row} elements (T={T} × row stride); "
                         f"at most 2^31 - 1 are allowed: split the sequence and pass the state on "
                         f"(the model's chunked prefill does)")
    args = (u, _rows(delta), p.A.contiguous(), _rows(B), _rows(C), p.D, _rows(z), p.delta_bias, _rows(alpha),
            p.rho, eta, lam, w_r, *state0, mask)
    needs_grad = torch.is_grad_enabled() and any(isinstance(x, torch.Tensor) and x.requires_grad for x in args)
    return args, needs_grad


# ---------------------------------------------------------------------------------- launch buffers
def fwd_buffers(cfg: ScanConfig, u, n: int):
    """What a forward launch writes: y (like u) and the final state (h, line, k, e) in float32 (k and e: a
    dummy without control, where they pass through); and the dummy that stands for absent tensors."""
    b, T, d = u.shape
    f32 = dict(device=u.device, dtype=torch.float32)
    dummy = torch.empty(1, **f32)
    y = torch.empty(b, T, d, device=u.device, dtype=u.dtype)
    final = (torch.empty(b, d, n, **f32), torch.empty(b, cfg.tau, d, n, **f32),
             torch.empty(b, d // cfg.group_size, **f32) if cfg.control else dummy,
             torch.empty(b, d, **f32) if cfg.control else dummy)
    return y, final, dummy


def bwd_buffers(cfg: ScanConfig, u, delta, z, alpha, n: int, n_cb: int, gy, gfinal):
    """What a backward launch reads and writes, as kernel groups: the output's gradient (zeros when None),
    the final state's gradients (``gstateT``, zeros where None; with ``has_gfinal`` false the kernel reads
    none), the per-token gradients (``gins``), the B and C partials per channel block (``gBC``), the
    parameters' partials per row (``gprm``) and the initial state's gradients (``gstate0``); the dummy."""
    b, T, d = u.shape
    ng = d // cfg.group_size
    f32 = dict(device=u.device, dtype=torch.float32)
    dummy = torch.empty(1, **f32)
    ctl = lambda *shape: torch.empty(*shape, **f32) if cfg.control else dummy  # noqa: E731
    gy = torch.zeros_like(u) if gy is None else gy.contiguous()
    ghT, glineT, gkT, geT = gfinal
    has_gfinal = any(g is not None for g in gfinal)
    zf = lambda g, *shape: (torch.zeros(*shape, **f32) if g is None else g.float().contiguous())  # noqa: E731
    gstateT = (zf(ghT, b, d, n), zf(glineT, b, cfg.tau, d, n) if cfg.tau else dummy,
               zf(gkT, b, ng) if cfg.control else dummy, zf(geT, b, d) if cfg.control else dummy)
    like = lambda x, *shape: torch.empty(*shape, device=u.device, dtype=x.dtype)  # noqa: E731
    gins = (like(u, b, T, d), like(delta, b, T, d), like(z, b, T, d) if z is not None else dummy,
            like(alpha, b, T, ng) if alpha is not None else dummy)
    gBC = (torch.empty(b, T, n_cb, n, **f32), torch.empty(b, T, n_cb, n, **f32))
    gprm = (torch.empty(b, d, n, **f32), *(torch.empty(b, d, **f32) for _ in range(3)),
            *(torch.empty(b, ng, **f32) for _ in range(3)))
    gstate0 = (torch.empty(b, d, n, **f32), torch.empty(b, cfg.tau, d, n, **f32), ctl(b, ng), ctl(b, d))
    return gy, gstateT, has_gfinal, gins, gBC, gprm, gstate0, dummy


def input_grads(cfg: ScanConfig, args: tuple, gins, gBC, gprm, gstate0) -> tuple:
    """The gradients of ``args`` (`scan_args`' order) from what a backward launch wrote: the partials summed
    (deterministic, no atomics) and cast to their inputs' dtypes; None for inputs that are absent or that
    the configuration does not use."""
    u, delta, A, B, C, D, z, delta_bias, alpha, rho, eta, lam, w_r = args[:13]
    gu, gdelta, gz, galpha = gins
    gBp, gCp = gBC
    gAp, gbp, gDp, gwp, grp, gep, glp = gprm
    gh0, gline0, gk0, ge0 = gstate0
    like = lambda g, x: None if x is None else g.to(x.dtype)  # noqa: E731
    return (
        gu, gdelta, gAp.sum(0).to(A.dtype), gBp.sum(2).to(B.dtype), gCp.sum(2).to(C.dtype),
        like(gDp.sum(0), D), gz if z is not None else None, like(gbp.sum(0), delta_bias),
        galpha if alpha is not None else None,
        like(grp.sum(0), rho) if cfg.tau else None,
        like(gep.sum(0), eta) if cfg.control else None, like(glp.sum(0), lam) if cfg.control else None,
        like(gwp.sum(0), w_r) if cfg.control else None,
        gh0, gline0, gk0 if cfg.control else None, ge0 if cfg.control else None, None,
    )
