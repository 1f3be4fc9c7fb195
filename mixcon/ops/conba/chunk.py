"""Chunk-parallel Conba scan in Triton for a held control signal (docs/conba.md, step 6, P > 1).

With a sampled-data controller the control signal f is held for P real steps, so between two
sampling instants the state update is a linear recurrence with known inputs, of order τ with the
delay:

    h_t = a_t · h_(t−1) + r_t · h_(t−τ) + x_t,   a_t = α_t (1 − ρ) Ā_t,  r_t = α_t ρ,
    x_t = Δ_t B_t (u_t − f) (+ σ_w ξ_t)

(τ = 0: r = 0; τ = 1: the two terms merge). Written on the companion state
s_t = (h_t, h_(t−1), …, h_(t−τ+1)) — exactly the decode state's delay line — it is
s_t = M_t s_(t−1) + x_t e1 with a τ×τ companion matrix M_t (1×1 for τ ≤ 1); a padded step is the
identity with no input, so a padded step keeps h, the delay line, k, e and the phase.

Files (fla's layout): `chunk_fwd.py` and `chunk_bwd.py` hold the kernels and their launchers
`chunk_conba_fwd` / `chunk_conba_bwd`; this file the autograd Function over the two, the block sizes
and `conba_scan_chunk`; `chunk_common.py` the Triton helpers both kernels use; `chunk_algebra.py` the
scan algebra, written by `codegen.py`; `host.py` the host side shared with `fused_recurrent.py`, the
per-step kernels that remain the P = 1 path.

One program owns one batch row and a block of whole control groups. It walks the sequence in blocks
of BT ≤ P time positions, so a block holds at most one sampling instant of its row (the row's phase
and mask put it anywhere in the block). Per block:

  1. the block's inputs are loaded as tiles ([BT, channels] for u, δ, z, α; [BT, N] for B, C);
  2. the recurrence is solved for the whole block by one `tl.associative_scan` over its positions,
     whose elements are the affine steps (M_t, x_t) — composed as matrices, (B·A, B·a + b) —
     with the block's start state folded into the first position, and a second input column
     w_t = −Δ_t B_t on the positions after the row's sampling instant: by linearity the state is
     v_t + δf · W_t, where v is the state under the old held signal and δf = f_new − f_old;
  3. y and e for the block come from v; the error at the instant (a real step, which still sees
     the old signal) sets k and the new held signal, so δf is known and the state and output after
     the instant are corrected;
  4. only the controller's update (k, the sampled e) and the block's last companion state are
     carried to the next block.

When every instant is a block's last step (no mask, no initial state, P a multiple of the block:
the common case in training and in the benchmark) the second column is dropped (ALIGNED); the
backward then folds the error's adjoint into the block's last source before its scan.

Backward: the same structure reversed. The forward saves the carry (companion state, k, e) every
CHECKPOINT_INTERVAL steps (a whole number of blocks); the backward walks these segments from last to
first, recomputes a segment's blocks forward from its checkpoint (keeping their start carries in a
per-row scratch), then walks its blocks from last to first (`_bwd_block`): it recomputes a block
from its carry and solves the adjoint recurrence λ_t = src_t e1 + M_(t+1)^T λ_(t+1) by a reverse
associative scan of the transposed companion matrices, again with two columns: the sources known in
advance (the output's gradient, the carry's adjoint) and a unit source at the instant, whose
weight — the error's adjoint, which depends on λ after the instant through δf — is known once the
scan is done. The controller's chain between blocks is carried sequentially over blocks, as the
carry is in the forward. The previous position's state (for ∂/∂a, ∂/∂r) and the next position's
step (for the adjoint scan) come from `tl.gather` shifts of the block's tiles.

Everything accumulates in float32 whatever the input dtype; tanh, softplus and the noise hash are
the exact-path helpers of `common.py` (no libdevice), so the same code runs in Triton's
interpreter on CPU, where the tests check it against the float64 reference.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
import triton

from .chunk_bwd import chunk_conba_bwd
from .chunk_fwd import chunk_conba_fwd
from .host import CHECKPOINT_INTERVAL, ScanConfig, empty_scan, scan_args, start_state
from .params import ConbaParams, ConbaState, keyword_interface

# time positions per block (a power of two; capped at the control period P), channels per program (whole
# groups) and warps: the largest block whose forward compiles for sm_90 without spilling (docs/kernels.md,
# "Spills", for the registers and the choice). bwd_block_t: the backward's own block (None: the forward's):
# shorter blocks spill less but walk more blocks one after another, a GPU question that
# `bash tools/gpu_benchmarks.sh tune-chunk` answers. To sweep by hand: mixcon bench conba
# --chunk-block-t / --chunk-bwd-block-t / --chunk-channels / --chunk-warps.
TUNING = dict(block_t=16, bwd_block_t=None, channels=8, num_warps=4)


# ---------------------------------------------------------------------------------- blocks
def _prev_pow2(x: int) -> int:
    return 1 << (int(x).bit_length() - 1)


def block_size(T: int, control_period: int, control: bool) -> int:
    """Time positions per block: a power of two, at most P with control on (so a block holds at most
    one sampling instant of a row), at most TUNING["block_t"], and no longer than needed for T."""
    bt = TUNING["block_t"]
    if control:
        bt = min(bt, _prev_pow2(control_period))
    return max(2, min(bt, triton.next_power_of_2(max(T, 1))))


def bwd_block_size(T: int, control_period: int, control: bool, fwd_block: int) -> int:
    """The backward's block: TUNING["bwd_block_t"] under the forward's caps (`block_size`), and at most
    the steps between two saved carries (it recomputes from them); None: the forward's block."""
    if TUNING["bwd_block_t"] is None:
        return fwd_block
    bt = min(int(TUNING["bwd_block_t"]), _checkpoint_interval(fwd_block))
    if control:
        bt = min(bt, _prev_pow2(control_period))
    return max(2, min(bt, triton.next_power_of_2(max(T, 1))))


def _blocking(d: int, group_size: int, n: int):
    """(GP, BG, NP, n_cblocks, num_warps): whole groups of about TUNING["channels"] lanes per program."""
    gp = triton.next_power_of_2(group_size)
    ng = d // group_size
    bg = max(1, min(max(TUNING["channels"] // gp, 1), triton.next_power_of_2(ng)))
    return gp, bg, triton.next_power_of_2(n), triton.cdiv(ng, bg), TUNING["num_warps"]


def _segment(bt: int) -> int:
    """Blocks per saved carry."""
    return max(1, CHECKPOINT_INTERVAL // bt)


def _checkpoint_interval(bt: int) -> int:
    """Time steps between the forward's saved carries when its blocks are ``bt`` long (a whole number of
    blocks, at least one)."""
    return bt * _segment(bt)


def _clock(mask, phase0, b, T, bt, period, device):
    """Per row: the controller's phase at each block's start (b, n_blk) int32, the first real step (b,)
    int32 (−1: none) and the number of real steps (b,) int64 — from the mask on the host side, without
    a synchronisation."""
    n_blk = triton.cdiv(T, bt)
    if mask is None:
        real = torch.full((b, n_blk), bt, dtype=torch.long, device=device)
        real[:, -1] = T - (n_blk - 1) * bt
        t1 = torch.zeros(b, dtype=torch.int32, device=device)
    else:
        m = (mask != 0).to(torch.int32)
        real = F.pad(m, (0, n_blk * bt - T)).view(b, n_blk, bt).sum(-1).long()
        t1 = torch.where(m.amax(1) > 0, m.argmax(1), -1).to(torch.int32)  # argmax: the first maximum
    before = real.cumsum(1) - real
    ph = ((phase0.to(torch.long)[:, None] + before) % period).to(torch.int32).contiguous()
    return ph, t1.contiguous(), real.sum(1)


# ---------------------------------------------------------------------------------- autograd
class _ChunkScan(torch.autograd.Function):
    @staticmethod
    def forward(ctx, cfg, blocking, ph, t1, bcfg, ph_b, *args):
        # bcfg, ph_b: the backward's configuration and clock (its blocks may be shorter than the forward's)
        y, final, ck = chunk_conba_fwd(cfg, blocking, args, ph, t1, save=True)
        u, delta, A, B, C, D, z, delta_bias, alpha, rho, eta, lam, w_r, h0, line0, k_init, e0, mask = args
        ctx.bcfg, ctx.blocking = bcfg, blocking
        ctx.save_for_backward(u, delta, A, B, C, D, z, delta_bias, alpha, rho, eta, lam, w_r, h0, mask, ph_b, t1, *ck)
        ctx.set_materialize_grads(False)
        return (y, *final)

    @staticmethod
    def backward(ctx, gy, ghT, glineT, gkT, geT):
        u, delta, A, B, C, D, z, delta_bias, alpha, rho, eta, lam, w_r, h0, mask, ph, t1, *ck = ctx.saved_tensors
        args = (u, delta, A, B, C, D, z, delta_bias, alpha, rho, eta, lam, w_r, h0, None, None, None, mask)
        grads = chunk_conba_bwd(ctx.bcfg, ctx.blocking, args, ph, t1, ck, gy, (ghT, glineT, gkT, geT))
        return (None,) * 6 + grads  # cfg, blocking, ph, t1, bcfg, ph_b


@keyword_interface("u", "delta")
def conba_scan_chunk(u, delta, B, C, params: ConbaParams, *, z=None, alpha=None, mask=None, initial_state=None,
                     return_final_state=False, block_t=None, bwd_block_t=None):
    """The chunk-parallel scan (arguments as `mixcon.ops.conba.conba_scan`, already validated there).
    ``block_t``: time positions per block (a power of two ≤ P with control on; default `block_size`);
    ``bwd_block_t``: the backward's (the same rules, and at most the steps between the forward's saved
    carries; default `bwd_block_size`)."""
    p = params
    b, T, d = u.shape
    control, P = p.control, int(p.control_period)
    state0, phase0 = start_state(u, p, initial_state)
    if T == 0:
        return empty_scan(u, state0, phase0, return_final_state)
    bt = int(block_t) if block_t is not None else block_size(T, P, control)
    if bt < 1 or bt & (bt - 1) or (control and bt > P):
        raise ValueError(f"block_t={block_t!r} must be a power of two, at most control_period={P} with control on")
    bt_b = int(bwd_block_t) if bwd_block_t is not None else bwd_block_size(T, P, control, bt)
    if bt_b < 1 or bt_b & (bt_b - 1) or (control and bt_b > P) or bt_b > _checkpoint_interval(bt):
        raise ValueError(f"bwd_block_t={bwd_block_t!r} must be a power of two, at most control_period={P} with "
                         f"control on and at most {_checkpoint_interval(bt)} (the steps between saved carries)")
    args, needs_grad = scan_args(u, delta, B, C, p, z, alpha, mask, state0)
    mask = args[-1]
    ph, t1, n_real = _clock(mask, phase0, b, T, bt, P, u.device)
    # phase 0, no padding and P a multiple of the block: every instant is a block's last step
    aligned = lambda block: control and mask is None and initial_state is None and P % block == 0  # noqa: E731
    cfg = ScanConfig.of(p, z, alpha, mask, checkpoint_interval=_checkpoint_interval(bt), block_t=bt, period=P,
                        fix_h=p.tau > 0 and initial_state is not None, aligned=aligned(bt))
    blocking = _blocking(d, p.group_size, p.A.shape[1])
    if needs_grad:
        bcfg, ph_b = cfg, ph
        if bt_b != bt:
            bcfg = cfg.replace(block_t=bt_b, aligned=aligned(bt_b))
            ph_b = _clock(mask, phase0, b, T, bt_b, P, u.device)[0]
        y, hT, lineT, kT, eT = _ChunkScan.apply(cfg, blocking, ph, t1, bcfg, ph_b, *args)
    else:
        y, (hT, lineT, kT, eT), _ = chunk_conba_fwd(cfg, blocking, args, ph, t1, save=False)
    h0, line0, k_init, e0 = state0
    if control:
        phase = (phase0.to(torch.long) + n_real) % P
    else:  # without control k, e and the phase pass through untouched (their gradients too)
        kT, eT, phase = k_init, e0, phase0.clone()
    if p.tau == 0:
        lineT = line0.clone() if not needs_grad else lineT
    if return_final_state:
        return y, ConbaState(hT, lineT, kT, eT, phase.to(phase0.dtype))
    return y
