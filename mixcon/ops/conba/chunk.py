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

One program owns one batch row and a block of whole control groups (layout fla's: this file for
the chunked kernels beside `fused_recurrent.py`, the per-step ones that remain the P = 1 path). It
walks the sequence in blocks of BT ≤ P time positions, so a block holds at most one sampling
instant of its row (the row's phase and mask put it anywhere in the block). Per block:

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
CHECKPOINT_STEPS steps; the backward walks these segments from last to first, recomputes a
segment's blocks forward from its checkpoint (keeping their start carries in a per-row scratch),
then walks its blocks from last to first: it recomputes a block from its carry and solves the
adjoint recurrence λ_t = src_t e1 + M_(t+1)^T λ_(t+1) by a reverse associative scan of the
transposed companion matrices, again with two columns: the sources known in
advance (the output's gradient, the carry's adjoint) and a unit source at the instant, whose
weight — the error's adjoint, which depends on λ after the instant through δf — is known once the
scan is done. The controller's chain between blocks is carried sequentially over blocks, as the
carry is in the forward. The previous position's state (for ∂/∂a, ∂/∂r) and the next position's
step (for the adjoint scan) come from `tl.gather` shifts of the block's tiles.

Everything accumulates in float32 whatever the input dtype; tanh, softplus and the noise hash are
the exact-path helpers of `fused_recurrent` (no libdevice), so the same code runs in Triton's
interpreter on CPU, where the tests check it against the float64 reference.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from .common import SHARED_GROUPS, _groups, _mix32, _normal, _rows, _softplus, _tanh
from .naive import ConbaState
from .params import ConbaParams, keyword_interface

# time positions per block (a power of two; capped at the control period P), channels per program (whole
# groups) and warps. Not timed on a GPU yet: 16 × 8 channels × 4 warps is the largest block whose
# forward compiles for sm_90 without spilling (ptxas, ahead of time: ~240 registers at τ = 2).
# bwd_block_t: the backward's own block (None: the forward's). The backward at 16 spills 0.6–2.2 KB
# per thread (mixcon bench kernel-report --arch sm_90); at 4 it spills 0–60 B but walks four times
# as many blocks one after another: which is faster is a GPU question (docs/kernels.md, "Spills"), and
# `bash tools/gpu_benchmarks.sh tune-chunk` answers it. To sweep by hand: mixcon bench conba
# --chunk-block-t / --chunk-bwd-block-t / --chunk-channels / --chunk-warps.
TUNING = dict(block_t=16, bwd_block_t=None, channels=8, num_warps=4)
# steps between the forward's saved carries (a multiple of the block, at least one block): the backward
# recomputes the blocks in between, so the saved state is ~1/64 of the sequence's, as in fused_recurrent
CHECKPOINT_STEPS = 64


# BEGIN GENERATED by mixcon/ops/conba/codegen.py (python -m mixcon.ops.conba.codegen --write); do not edit
# ---------------------------------------------------------------------------------- scan algebra
# Elements are affine maps s ↦ M s + v on the companion state, one tile per matrix entry and per
# vector component; _comb{m}_{nv}(A, a, B, b) = (B·A, B·a + b) composes "A then B" (m×m matrices,
# nv vector columns). The same composition serves the reverse scan of the transposed matrices.
# (Written out by a generator: Triton's combine functions take scalars, one per tile.)
@triton.jit
def _comb1_1(a00, ax_0, b00, bx_0):  # noqa: E501
    c00 = b00 * a00
    cx_0 = b00 * ax_0 + bx_0
    return c00, cx_0


@triton.jit
def _comb1_2(a00, ax_0, aw_0, b00, bx_0, bw_0):  # noqa: E501
    c00 = b00 * a00
    cx_0 = b00 * ax_0 + bx_0
    cw_0 = b00 * aw_0 + bw_0
    return c00, cx_0, cw_0


@triton.jit
def _comb2_1(a00, a01, a10, a11, ax_0, ax_1, b00, b01, b10, b11, bx_0, bx_1):  # noqa: E501
    c00 = b00 * a00 + b01 * a10
    c01 = b00 * a01 + b01 * a11
    c10 = b10 * a00 + b11 * a10
    c11 = b10 * a01 + b11 * a11
    cx_0 = b00 * ax_0 + b01 * ax_1 + bx_0
    cx_1 = b10 * ax_0 + b11 * ax_1 + bx_1
    return c00, c01, c10, c11, cx_0, cx_1


@triton.jit
def _comb2_2(a00, a01, a10, a11, ax_0, ax_1, aw_0, aw_1, b00, b01, b10, b11, bx_0, bx_1, bw_0, bw_1):  # noqa: E501
    c00 = b00 * a00 + b01 * a10
    c01 = b00 * a01 + b01 * a11
    c10 = b10 * a00 + b11 * a10
    c11 = b10 * a01 + b11 * a11
    cx_0 = b00 * ax_0 + b01 * ax_1 + bx_0
    cx_1 = b10 * ax_0 + b11 * ax_1 + bx_1
    cw_0 = b00 * aw_0 + b01 * aw_1 + bw_0
    cw_1 = b10 * aw_0 + b11 * aw_1 + bw_1
    return c00, c01, c10, c11, cx_0, cx_1, cw_0, cw_1


@triton.jit
def _comb3_1(a00, a01, a02, a10, a11, a12, a20, a21, a22, ax_0, ax_1, ax_2, b00, b01, b02, b10, b11, b12, b20, b21, b22, bx_0, bx_1, bx_2):  # noqa: E501
    c00 = b00 * a00 + b01 * a10 + b02 * a20
    c01 = b00 * a01 + b01 * a11 + b02 * a21
    c02 = b00 * a02 + b01 * a12 + b02 * a22
    c10 = b10 * a00 + b11 * a10 + b12 * a20
    c11 = b10 * a01 + b11 * a11 + b12 * a21
    c12 = b10 * a02 + b11 * a12 + b12 * a22
    c20 = b20 * a00 + b21 * a10 + b22 * a20
    c21 = b20 * a01 + b21 * a11 + b22 * a21
    c22 = b20 * a02 + b21 * a12 + b22 * a22
    cx_0 = b00 * ax_0 + b01 * ax_1 + b02 * ax_2 + bx_0
    cx_1 = b10 * ax_0 + b11 * ax_1 + b12 * ax_2 + bx_1
    cx_2 = b20 * ax_0 + b21 * ax_1 + b22 * ax_2 + bx_2
    return c00, c01, c02, c10, c11, c12, c20, c21, c22, cx_0, cx_1, cx_2


@triton.jit
def _comb3_2(a00, a01, a02, a10, a11, a12, a20, a21, a22, ax_0, ax_1, ax_2, aw_0, aw_1, aw_2, b00, b01, b02, b10, b11, b12, b20, b21, b22, bx_0, bx_1, bx_2, bw_0, bw_1, bw_2):  # noqa: E501
    c00 = b00 * a00 + b01 * a10 + b02 * a20
    c01 = b00 * a01 + b01 * a11 + b02 * a21
    c02 = b00 * a02 + b01 * a12 + b02 * a22
    c10 = b10 * a00 + b11 * a10 + b12 * a20
    c11 = b10 * a01 + b11 * a11 + b12 * a21
    c12 = b10 * a02 + b11 * a12 + b12 * a22
    c20 = b20 * a00 + b21 * a10 + b22 * a20
    c21 = b20 * a01 + b21 * a11 + b22 * a21
    c22 = b20 * a02 + b21 * a12 + b22 * a22
    cx_0 = b00 * ax_0 + b01 * ax_1 + b02 * ax_2 + bx_0
    cx_1 = b10 * ax_0 + b11 * ax_1 + b12 * ax_2 + bx_1
    cx_2 = b20 * ax_0 + b21 * ax_1 + b22 * ax_2 + bx_2
    cw_0 = b00 * aw_0 + b01 * aw_1 + b02 * aw_2 + bw_0
    cw_1 = b10 * aw_0 + b11 * aw_1 + b12 * aw_2 + bw_1
    cw_2 = b20 * aw_0 + b21 * aw_1 + b22 * aw_2 + bw_2
    return c00, c01, c02, c10, c11, c12, c20, c21, c22, cx_0, cx_1, cx_2, cw_0, cw_1, cw_2


@triton.jit
def _comb4_1(a00, a01, a02, a03, a10, a11, a12, a13, a20, a21, a22, a23, a30, a31, a32, a33, ax_0, ax_1, ax_2, ax_3, b00, b01, b02, b03, b10, b11, b12, b13, b20, b21, b22, b23, b30, b31, b32, b33, bx_0, bx_1, bx_2, bx_3):  # noqa: E501
    c00 = b00 * a00 + b01 * a10 + b02 * a20 + b03 * a30
    c01 = b00 * a01 + b01 * a11 + b02 * a21 + b03 * a31
    c02 = b00 * a02 + b01 * a12 + b02 * a22 + b03 * a32
    c03 = b00 * a03 + b01 * a13 + b02 * a23 + b03 * a33
    c10 = b10 * a00 + b11 * a10 + b12 * a20 + b13 * a30
    c11 = b10 * a01 + b11 * a11 + b12 * a21 + b13 * a31
    c12 = b10 * a02 + b11 * a12 + b12 * a22 + b13 * a32
    c13 = b10 * a03 + b11 * a13 + b12 * a23 + b13 * a33
    c20 = b20 * a00 + b21 * a10 + b22 * a20 + b23 * a30
    c21 = b20 * a01 + b21 * a11 + b22 * a21 + b23 * a31
    c22 = b20 * a02 + b21 * a12 + b22 * a22 + b23 * a32
    c23 = b20 * a03 + b21 * a13 + b22 * a23 + b23 * a33
    c30 = b30 * a00 + b31 * a10 + b32 * a20 + b33 * a30
    c31 = b30 * a01 + b31 * a11 + b32 * a21 + b33 * a31
    c32 = b30 * a02 + b31 * a12 + b32 * a22 + b33 * a32
    c33 = b30 * a03 + b31 * a13 + b32 * a23 + b33 * a33
    cx_0 = b00 * ax_0 + b01 * ax_1 + b02 * ax_2 + b03 * ax_3 + bx_0
    cx_1 = b10 * ax_0 + b11 * ax_1 + b12 * ax_2 + b13 * ax_3 + bx_1
    cx_2 = b20 * ax_0 + b21 * ax_1 + b22 * ax_2 + b23 * ax_3 + bx_2
    cx_3 = b30 * ax_0 + b31 * ax_1 + b32 * ax_2 + b33 * ax_3 + bx_3
    return c00, c01, c02, c03, c10, c11, c12, c13, c20, c21, c22, c23, c30, c31, c32, c33, cx_0, cx_1, cx_2, cx_3


@triton.jit
def _comb4_2(a00, a01, a02, a03, a10, a11, a12, a13, a20, a21, a22, a23, a30, a31, a32, a33, ax_0, ax_1, ax_2, ax_3, aw_0, aw_1, aw_2, aw_3, b00, b01, b02, b03, b10, b11, b12, b13, b20, b21, b22, b23, b30, b31, b32, b33, bx_0, bx_1, bx_2, bx_3, bw_0, bw_1, bw_2, bw_3):  # noqa: E501
    c00 = b00 * a00 + b01 * a10 + b02 * a20 + b03 * a30
    c01 = b00 * a01 + b01 * a11 + b02 * a21 + b03 * a31
    c02 = b00 * a02 + b01 * a12 + b02 * a22 + b03 * a32
    c03 = b00 * a03 + b01 * a13 + b02 * a23 + b03 * a33
    c10 = b10 * a00 + b11 * a10 + b12 * a20 + b13 * a30
    c11 = b10 * a01 + b11 * a11 + b12 * a21 + b13 * a31
    c12 = b10 * a02 + b11 * a12 + b12 * a22 + b13 * a32
    c13 = b10 * a03 + b11 * a13 + b12 * a23 + b13 * a33
    c20 = b20 * a00 + b21 * a10 + b22 * a20 + b23 * a30
    c21 = b20 * a01 + b21 * a11 + b22 * a21 + b23 * a31
    c22 = b20 * a02 + b21 * a12 + b22 * a22 + b23 * a32
    c23 = b20 * a03 + b21 * a13 + b22 * a23 + b23 * a33
    c30 = b30 * a00 + b31 * a10 + b32 * a20 + b33 * a30
    c31 = b30 * a01 + b31 * a11 + b32 * a21 + b33 * a31
    c32 = b30 * a02 + b31 * a12 + b32 * a22 + b33 * a32
    c33 = b30 * a03 + b31 * a13 + b32 * a23 + b33 * a33
    cx_0 = b00 * ax_0 + b01 * ax_1 + b02 * ax_2 + b03 * ax_3 + bx_0
    cx_1 = b10 * ax_0 + b11 * ax_1 + b12 * ax_2 + b13 * ax_3 + bx_1
    cx_2 = b20 * ax_0 + b21 * ax_1 + b22 * ax_2 + b23 * ax_3 + bx_2
    cx_3 = b30 * ax_0 + b31 * ax_1 + b32 * ax_2 + b33 * ax_3 + bx_3
    cw_0 = b00 * aw_0 + b01 * aw_1 + b02 * aw_2 + b03 * aw_3 + bw_0
    cw_1 = b10 * aw_0 + b11 * aw_1 + b12 * aw_2 + b13 * aw_3 + bw_1
    cw_2 = b20 * aw_0 + b21 * aw_1 + b22 * aw_2 + b23 * aw_3 + bw_2
    cw_3 = b30 * aw_0 + b31 * aw_1 + b32 * aw_2 + b33 * aw_3 + bw_3
    return c00, c01, c02, c03, c10, c11, c12, c13, c20, c21, c22, c23, c30, c31, c32, c33, cx_0, cx_1, cx_2, cx_3, cw_0, cw_1, cw_2, cw_3


@triton.jit
def _scan_fwd1(a, r, real, x, w, S0, S1, S2, S3, first, NV: tl.constexpr):
    """Inclusive scan of the block's affine steps s_t = M_t s_(t-1) + (x_t + δf·w_t) e1 with the start state folded into
    position 0; m = 1. Returns the state under the old held signal (v0..v3) and its response to a unit δf (w0..w3)."""
    z = tl.zeros_like(a)
    one = z + 1.0
    m00 = tl.where(real, a, one)
    x0 = x + tl.where(first, m00 * S0[None, :, :], z)
    if NV == 2:
        res = tl.associative_scan((m00, x0, w,), 0, _comb1_2)
        return res[1], z, z, z, res[2], z, z, z
    else:
        res = tl.associative_scan((m00, x0,), 0, _comb1_1)
        return res[1], z, z, z, z, z, z, z


@triton.jit
def _scan_bwd1(an, rn, realn, src, G0, G1, G2, G3, srcB, last, NV: tl.constexpr):
    """Reverse scan of the adjoint λ_t = src_t e1 + M_(t+1)^T λ_(t+1), the carry's adjoint G folded into the last position
    (an, rn, realn: the next position's step); a second column for a unit source srcB. m = 1. Returns λ (A column), λ (B column)."""
    z = tl.zeros_like(an)
    one = z + 1.0
    m00 = tl.where(realn, an, one)
    x0 = src + tl.where(last, G0[None, :, :], z)
    if NV == 2:
        res = tl.associative_scan((m00, x0, srcB,), 0, _comb1_2, reverse=True)
        return res[1], z, z, z, res[2], z, z, z
    else:
        res = tl.associative_scan((m00, x0,), 0, _comb1_1, reverse=True)
        return res[1], z, z, z, z, z, z, z


@triton.jit
def _scan_fwd2(a, r, real, x, w, S0, S1, S2, S3, first, NV: tl.constexpr):
    """Inclusive scan of the block's affine steps s_t = M_t s_(t-1) + (x_t + δf·w_t) e1 with the start state folded into
    position 0; m = 2. Returns the state under the old held signal (v0..v3) and its response to a unit δf (w0..w3)."""
    z = tl.zeros_like(a)
    one = z + 1.0
    m00 = tl.where(real, a, one)
    m0L = tl.where(real, r, z)
    sub = tl.where(real, one, z)
    dia = tl.where(real, z, one)
    x0 = x + tl.where(first, m00 * S0[None, :, :] + m0L * S1[None, :, :], z)
    x1 = tl.where(first, sub * S0[None, :, :] + dia * S1[None, :, :], z)
    if NV == 2:
        res = tl.associative_scan((m00, m0L, sub, dia, x0, x1, w, z,), 0, _comb2_2)
        return res[4], res[5], z, z, res[6], res[7], z, z
    else:
        res = tl.associative_scan((m00, m0L, sub, dia, x0, x1,), 0, _comb2_1)
        return res[4], res[5], z, z, z, z, z, z


@triton.jit
def _scan_bwd2(an, rn, realn, src, G0, G1, G2, G3, srcB, last, NV: tl.constexpr):
    """Reverse scan of the adjoint λ_t = src_t e1 + M_(t+1)^T λ_(t+1), the carry's adjoint G folded into the last position
    (an, rn, realn: the next position's step); a second column for a unit source srcB. m = 2. Returns λ (A column), λ (B column)."""
    z = tl.zeros_like(an)
    one = z + 1.0
    m00 = tl.where(realn, an, one)
    x0 = src + tl.where(last, G0[None, :, :], z)
    x1 = tl.where(last, G1[None, :, :], z)
    m0L = tl.where(realn, rn, z)
    sub = tl.where(realn, one, z)
    dia = tl.where(realn, z, one)
    if NV == 2:
        res = tl.associative_scan((m00, sub, m0L, dia, x0, x1, srcB, z,), 0, _comb2_2, reverse=True)
        return res[4], res[5], z, z, res[6], res[7], z, z
    else:
        res = tl.associative_scan((m00, sub, m0L, dia, x0, x1,), 0, _comb2_1, reverse=True)
        return res[4], res[5], z, z, z, z, z, z


@triton.jit
def _scan_fwd3(a, r, real, x, w, S0, S1, S2, S3, first, NV: tl.constexpr):
    """Inclusive scan of the block's affine steps s_t = M_t s_(t-1) + (x_t + δf·w_t) e1 with the start state folded into
    position 0; m = 3. Returns the state under the old held signal (v0..v3) and its response to a unit δf (w0..w3)."""
    z = tl.zeros_like(a)
    one = z + 1.0
    m00 = tl.where(real, a, one)
    m0L = tl.where(real, r, z)
    sub = tl.where(real, one, z)
    dia = tl.where(real, z, one)
    x0 = x + tl.where(first, m00 * S0[None, :, :] + m0L * S2[None, :, :], z)
    x1 = tl.where(first, sub * S0[None, :, :] + dia * S1[None, :, :], z)
    x2 = tl.where(first, sub * S1[None, :, :] + dia * S2[None, :, :], z)
    if NV == 2:
        res = tl.associative_scan((m00, z, m0L, sub, dia, z, z, sub, dia, x0, x1, x2, w, z, z,), 0, _comb3_2)
        return res[9], res[10], res[11], z, res[12], res[13], res[14], z
    else:
        res = tl.associative_scan((m00, z, m0L, sub, dia, z, z, sub, dia, x0, x1, x2,), 0, _comb3_1)
        return res[9], res[10], res[11], z, z, z, z, z


@triton.jit
def _scan_bwd3(an, rn, realn, src, G0, G1, G2, G3, srcB, last, NV: tl.constexpr):
    """Reverse scan of the adjoint λ_t = src_t e1 + M_(t+1)^T λ_(t+1), the carry's adjoint G folded into the last position
    (an, rn, realn: the next position's step); a second column for a unit source srcB. m = 3. Returns λ (A column), λ (B column)."""
    z = tl.zeros_like(an)
    one = z + 1.0
    m00 = tl.where(realn, an, one)
    x0 = src + tl.where(last, G0[None, :, :], z)
    x1 = tl.where(last, G1[None, :, :], z)
    x2 = tl.where(last, G2[None, :, :], z)
    m0L = tl.where(realn, rn, z)
    sub = tl.where(realn, one, z)
    dia = tl.where(realn, z, one)
    if NV == 2:
        res = tl.associative_scan((m00, sub, z, z, dia, sub, m0L, z, dia, x0, x1, x2, srcB, z, z,), 0, _comb3_2, reverse=True)
        return res[9], res[10], res[11], z, res[12], res[13], res[14], z
    else:
        res = tl.associative_scan((m00, sub, z, z, dia, sub, m0L, z, dia, x0, x1, x2,), 0, _comb3_1, reverse=True)
        return res[9], res[10], res[11], z, z, z, z, z


@triton.jit
def _scan_fwd4(a, r, real, x, w, S0, S1, S2, S3, first, NV: tl.constexpr):
    """Inclusive scan of the block's affine steps s_t = M_t s_(t-1) + (x_t + δf·w_t) e1 with the start state folded into
    position 0; m = 4. Returns the state under the old held signal (v0..v3) and its response to a unit δf (w0..w3)."""
    z = tl.zeros_like(a)
    one = z + 1.0
    m00 = tl.where(real, a, one)
    m0L = tl.where(real, r, z)
    sub = tl.where(real, one, z)
    dia = tl.where(real, z, one)
    x0 = x + tl.where(first, m00 * S0[None, :, :] + m0L * S3[None, :, :], z)
    x1 = tl.where(first, sub * S0[None, :, :] + dia * S1[None, :, :], z)
    x2 = tl.where(first, sub * S1[None, :, :] + dia * S2[None, :, :], z)
    x3 = tl.where(first, sub * S2[None, :, :] + dia * S3[None, :, :], z)
    if NV == 2:
        res = tl.associative_scan((m00, z, z, m0L, sub, dia, z, z, z, sub, dia, z, z, z, sub, dia, x0, x1, x2, x3, w, z, z, z,), 0, _comb4_2)
        return res[16], res[17], res[18], res[19], res[20], res[21], res[22], res[23]
    else:
        res = tl.associative_scan((m00, z, z, m0L, sub, dia, z, z, z, sub, dia, z, z, z, sub, dia, x0, x1, x2, x3,), 0, _comb4_1)
        return res[16], res[17], res[18], res[19], z, z, z, z


@triton.jit
def _scan_bwd4(an, rn, realn, src, G0, G1, G2, G3, srcB, last, NV: tl.constexpr):
    """Reverse scan of the adjoint λ_t = src_t e1 + M_(t+1)^T λ_(t+1), the carry's adjoint G folded into the last position
    (an, rn, realn: the next position's step); a second column for a unit source srcB. m = 4. Returns λ (A column), λ (B column)."""
    z = tl.zeros_like(an)
    one = z + 1.0
    m00 = tl.where(realn, an, one)
    x0 = src + tl.where(last, G0[None, :, :], z)
    x1 = tl.where(last, G1[None, :, :], z)
    x2 = tl.where(last, G2[None, :, :], z)
    x3 = tl.where(last, G3[None, :, :], z)
    m0L = tl.where(realn, rn, z)
    sub = tl.where(realn, one, z)
    dia = tl.where(realn, z, one)
    if NV == 2:
        res = tl.associative_scan((m00, sub, z, z, z, dia, sub, z, z, z, dia, sub, m0L, z, z, dia, x0, x1, x2, x3, srcB, z, z, z,), 0, _comb4_2, reverse=True)
        return res[16], res[17], res[18], res[19], res[20], res[21], res[22], res[23]
    else:
        res = tl.associative_scan((m00, sub, z, z, z, dia, sub, z, z, z, dia, sub, m0L, z, z, dia, x0, x1, x2, x3,), 0, _comb4_1, reverse=True)
        return res[16], res[17], res[18], res[19], z, z, z, z
# END GENERATED



# ---------------------------------------------------------------------------------- helpers
@triton.jit
def _gsum(x, BG: tl.constexpr, GP: tl.constexpr):
    """[BG·GP] per channel → [BG] per control group (sum)."""
    return tl.sum(tl.reshape(x, [BG, GP]), axis=1)


@triton.jit
def _gbc(x, BG: tl.constexpr, GP: tl.constexpr):
    """[BG] per group → [BG·GP] per channel (each group's value over its channels)."""
    return tl.reshape(tl.broadcast_to(x[:, None], [BG, GP]), [BG * GP])


@triton.jit
def _row(x, sel):
    """The tile's row where ``sel`` ([BT, 1, 1] or [BT, 1], true at one position) holds."""
    return tl.sum(tl.where(sel, x, 0.0), axis=0)


@triton.jit
def _prev(x, first, s, idx):
    """x shifted one position later along the block: row t holds x[t − 1], row 0 holds ``s``."""
    return tl.where(first, s[None, :, :], tl.gather(x, idx, 0))


@triton.jit
def _load_S(base, sd, sidx, smask, MS: tl.constexpr, NP: tl.constexpr, BC: tl.constexpr):
    """A companion state stored as MS slabs of (d, N) at ``base`` (zeros beyond MS)."""
    S0 = tl.load(base + sidx, mask=smask, other=0.0)
    S1 = tl.zeros([BC, NP], tl.float32)
    S2 = tl.zeros([BC, NP], tl.float32)
    S3 = tl.zeros([BC, NP], tl.float32)
    if MS > 1:
        S1 = tl.load(base + sd + sidx, mask=smask, other=0.0)
    if MS > 2:
        S2 = tl.load(base + 2 * sd + sidx, mask=smask, other=0.0)
    if MS > 3:
        S3 = tl.load(base + 3 * sd + sidx, mask=smask, other=0.0)
    return S0, S1, S2, S3


@triton.jit
def _store_S(base, sd, sidx, smask, S0, S1, S2, S3, MS: tl.constexpr):
    tl.store(base + sidx, S0, mask=smask)
    if MS > 1:
        tl.store(base + sd + sidx, S1, mask=smask)
    if MS > 2:
        tl.store(base + 2 * sd + sidx, S2, mask=smask)
    if MS > 3:
        tl.store(base + 3 * sd + sidx, S3, mask=smask)


@triton.jit
def _scan_fwd(a, r, real, x, w, S0, S1, S2, S3, first, MS: tl.constexpr, NV: tl.constexpr):
    if MS == 1:
        out = _scan_fwd1(a, r, real, x, w, S0, S1, S2, S3, first, NV)
    elif MS == 2:
        out = _scan_fwd2(a, r, real, x, w, S0, S1, S2, S3, first, NV)
    elif MS == 3:
        out = _scan_fwd3(a, r, real, x, w, S0, S1, S2, S3, first, NV)
    else:
        out = _scan_fwd4(a, r, real, x, w, S0, S1, S2, S3, first, NV)
    return out


@triton.jit
def _scan_bwd(an, rn, realn, src, G0, G1, G2, G3, srcB, last, MS: tl.constexpr, NV: tl.constexpr):
    if MS == 1:
        out = _scan_bwd1(an, rn, realn, src, G0, G1, G2, G3, srcB, last, NV)
    elif MS == 2:
        out = _scan_bwd2(an, rn, realn, src, G0, G1, G2, G3, srcB, last, NV)
    elif MS == 3:
        out = _scan_bwd3(an, rn, realn, src, G0, G1, G2, G3, srcB, last, NV)
    else:
        out = _scan_bwd4(an, rn, realn, src, G0, G1, G2, G3, srcB, last, NV)
    return out


@triton.jit
def _tile(pid_b, pid_c, N, NG, G: tl.constexpr, GP: tl.constexpr, BG: tl.constexpr, NP: tl.constexpr,
          BT: tl.constexpr):
    """Indices of one program's tile: groups [pid_c·BG, +BG) of batch row pid_b, BC = BG·GP channel
    lanes (GP ≥ G: padded lanes masked), NP ≥ N state lanes, BT time positions."""
    BC: tl.constexpr = BG * GP
    offs_i = tl.arange(0, BT)
    offs_n = tl.arange(0, NP)
    offs_l = tl.arange(0, BC)
    offs_g = pid_c * BG + tl.arange(0, BG)
    grp = pid_c * BG + offs_l // GP  # each lane's control group
    jl = offs_l % GP
    cmask = (jl < G) & (grp < NG)
    ch = grp * G + jl
    nmask = offs_n < N
    gmask = offs_g < NG
    smask = cmask[:, None] & nmask[None, :]
    sidx = ch[:, None] * N + offs_n[None, :]
    lane_w = (ch[:, None] * (N + 1) + offs_n[None, :]).to(tl.uint32)  # noise lanes, see noise.py
    lane_v = (ch * (N + 1) + N).to(tl.uint32)
    return offs_i, offs_n, offs_g, grp, cmask, ch, nmask, gmask, smask, sidx, lane_w, lane_v


@triton.jit
def _block(u_b, dl_b, z_b, B_b, C_b, al_b, m_b, t0, T, s_u_t, s_dl_t, s_z_t, s_B_t, s_C_t, s_al_t,
           offs_i, offs_n, nmask, grp, ch, cmask, smask, A, bias, rho_c, kb, lane_w, lane_v, sigma_w, sigma_v,
           TAU: tl.constexpr, HAS_ALPHA: tl.constexpr, HAS_BIAS: tl.constexpr, SOFTPLUS: tl.constexpr,
           HAS_Z: tl.constexpr, HAS_MASK: tl.constexpr, NOISE_W: tl.constexpr, NOISE_V: tl.constexpr):
    """A block's inputs as tiles and the step coefficients computed from them (float32)."""
    tt = t0 + offs_i
    inb = tt < T
    cm2 = inb[:, None] & cmask[None, :]
    nm2 = inb[:, None] & nmask[None, :]
    u = tl.load(u_b + tt[:, None] * s_u_t + ch[None, :], mask=cm2, other=0.0).to(tl.float32)
    xd = tl.load(dl_b + tt[:, None] * s_dl_t + ch[None, :], mask=cm2, other=0.0).to(tl.float32)
    if HAS_Z:
        z = tl.load(z_b + tt[:, None] * s_z_t + ch[None, :], mask=cm2, other=0.0).to(tl.float32)
    else:
        z = u
    Bv = tl.load(B_b + tt[:, None] * s_B_t + offs_n[None, :], mask=nm2, other=0.0).to(tl.float32)
    Cv = tl.load(C_b + tt[:, None] * s_C_t + offs_n[None, :], mask=nm2, other=0.0).to(tl.float32)
    if HAS_ALPHA:  # per channel: each lane reads its group's value
        al = tl.load(al_b + tt[:, None] * s_al_t + grp[None, :], mask=cm2, other=1.0).to(tl.float32)
    else:
        al = tl.full(u.shape, 1.0, tl.float32)
    if HAS_MASK:
        real = inb & (tl.load(m_b + tt, mask=inb, other=0) != 0)
    else:
        real = inb
    if HAS_BIAS:
        xd = xd + bias[None, :]
    if SOFTPLUS:
        dt = _softplus(xd)
    else:
        dt = xd
    dA = tl.exp(dt[:, :, None] * A[None, :, :])
    if TAU > 0:
        a = (al * (1.0 - rho_c[None, :]))[:, :, None] * dA
        r = al * rho_c[None, :]
    else:
        a = al[:, :, None] * dA
        r = al * 0.0
    xi = dA * 0.0
    zeta = u * 0.0
    if NOISE_W or NOISE_V:
        key = _mix32(kb ^ tt.to(tl.uint32))
        if NOISE_W:
            xi = tl.where(smask[None, :, :], sigma_w * _normal(key[:, None, None], lane_w[None, :, :]), 0.0)
        if NOISE_V:
            zeta = tl.where(cmask[None, :], sigma_v * _normal(key[:, None], lane_v[None, :]), 0.0)
    return tt, real, u, xd, dt, z, Bv, Cv, al, dA, a, r, xi, zeta


@triton.jit
def _load_params(A_ptr, bias_ptr, D_ptr, wr_ptr, rho_ptr, eta_ptr, lam_ptr, sidx, smask, ch, cmask, grp, offs_g, gmask,
                 BC: tl.constexpr, BG: tl.constexpr, TAU: tl.constexpr, CONTROL: tl.constexpr,
                 HAS_BIAS: tl.constexpr, HAS_D: tl.constexpr):
    """Per-channel ([BC]) and per-group ([BG]) parameters of this program (zeros when absent)."""
    A = tl.load(A_ptr + sidx, mask=smask, other=0.0).to(tl.float32)
    bias = tl.zeros([BC], tl.float32)
    Dp = tl.zeros([BC], tl.float32)
    wr = tl.zeros([BC], tl.float32)
    rho_c = tl.zeros([BC], tl.float32)
    eta = tl.zeros([BG], tl.float32)
    lam = tl.zeros([BG], tl.float32)
    if HAS_BIAS:
        bias = tl.load(bias_ptr + ch, mask=cmask, other=0.0).to(tl.float32)
    if HAS_D:
        Dp = tl.load(D_ptr + ch, mask=cmask, other=0.0).to(tl.float32)
    if TAU > 0:
        rho_c = tl.load(rho_ptr + grp, mask=cmask, other=0.0).to(tl.float32)
    if CONTROL:
        wr = tl.load(wr_ptr + ch, mask=cmask, other=0.0).to(tl.float32)
        eta = tl.load(eta_ptr + offs_g, mask=gmask, other=0.0).to(tl.float32)
        lam = tl.load(lam_ptr + offs_g, mask=gmask, other=0.0).to(tl.float32)
    return A, bias, Dp, wr, rho_c, eta, lam


@triton.jit
def _instant(real, ph, period, offs_i):
    """Where the row's sampling instant falls in the block (at most one: BT ≤ P): the real step at which
    phase + (real steps so far) reaches P; ``after``: the real steps past it, which see the new signal."""
    cnt = tl.cumsum(real.to(tl.int32), axis=0)
    inst = real & ((cnt + ph) == period)
    after = real & ((cnt + ph) > period)
    has = tl.sum(inst.to(tl.int32), axis=0) > 0
    return inst, after, has


@triton.jit
def _instant_bwd(gfn, gk, ge, th_s, kc_new, pre, k_max, eta, lam, kg, ss, rr, es, has, cmask,
                 G: tl.constexpr, BG: tl.constexpr, GP: tl.constexpr):
    """Adjoints at the instant, given δf's (gfn) and those of the carry after the block (gk, ge): the sampled
    error's, the η and λ increments, and the carry's before the block (the gain's, the error's)."""
    gkn = gk + _gsum(tl.where(cmask, gfn * th_s, 0.0), BG, GP)
    ges = ge + gfn * kc_new * (1.0 - th_s * th_s)
    gpre = tl.where((pre >= 0.0) & (pre <= k_max), gkn, 0.0)
    ges = ges + _gbc(eta * gpre / (ss * tl.sqrt(G * 1.0)), BG, GP) * es
    ges = tl.where(has & cmask, ges, 0.0)
    return (ges, tl.where(has, rr * gpre, 0.0), tl.where(has, -kg * gpre, 0.0), tl.where(has, (1.0 - lam) * gpre, gk),
            tl.where(has, 0.0, ge))


@triton.jit
def _controller(e_all, inst, kg, eta, lam, k_max, cmask, G: tl.constexpr, BG: tl.constexpr, GP: tl.constexpr):
    """The gain update at the instant: the sampled error e* (per channel), its group norm and the new gain."""
    es = tl.where(cmask, _row(e_all, inst[:, None]), 0.0)
    ss = tl.sqrt(_gsum(es * es, BG, GP) + 1e-12)  # [BG]
    rr = ss / tl.sqrt(G * 1.0)
    pre = (1.0 - lam) * kg + eta * rr
    kn = tl.minimum(tl.maximum(pre, 0.0), k_max)
    return es, ss, rr, pre, kn


# ---------------------------------------------------------------------------------- forward
@triton.jit
def _fwd_block(S0, S1, S2, S3, kg, e, blk, t0, T, ph_b, t1, cdiff, period,
               u_b, dl_b, z_b, B_b, C_b, al_b, m_b, s_u_t, s_dl_t, s_z_t, s_B_t, s_C_t, s_al_t,
               offs_i, offs_n, nmask, grp, ch, cmask, smask, first, last,
               A, bias, Dp, wr, rho_c, eta, lam, k_max, kb, lane_w, lane_v, sigma_w, sigma_v,
               G: tl.constexpr, GP: tl.constexpr, BG: tl.constexpr, BT: tl.constexpr, MS: tl.constexpr,
               TAU: tl.constexpr, CONTROL: tl.constexpr, HAS_ALPHA: tl.constexpr, HAS_BIAS: tl.constexpr,
               SOFTPLUS: tl.constexpr, HAS_D: tl.constexpr, HAS_Z: tl.constexpr, HAS_MASK: tl.constexpr,
               NOISE_W: tl.constexpr, NOISE_V: tl.constexpr, FIX_H: tl.constexpr, ALIGNED: tl.constexpr):
    """One block of the forward from its start carry (companion state S, gain, sampled error): the gated
    output [BT, BC] and the carry after the block."""
    BC: tl.constexpr = BG * GP
    NV: tl.constexpr = 1 if ALIGNED else (2 if CONTROL else 1)
    tt, real, u, xd, dt, z, Bv, Cv, al, dA, a, r, xi, zeta = _block(
        u_b, dl_b, z_b, B_b, C_b, al_b, m_b, t0, T, s_u_t, s_dl_t, s_z_t, s_B_t, s_C_t, s_al_t,
        offs_i, offs_n, nmask, grp, ch, cmask, smask, A, bias, rho_c, kb, lane_w, lane_v, sigma_w, sigma_v,
        TAU, HAS_ALPHA, HAS_BIAS, SOFTPLUS, HAS_Z, HAS_MASK, NOISE_W, NOISE_V)
    real3 = real[:, None, None]
    dB = dt[:, :, None] * Bv[:, None, :]  # Δ_t B_t
    f_old = tl.zeros([BC], tl.float32)
    if CONTROL:
        f_old = _gbc(kg, BG, GP) * _tanh(e)
    x = tl.where(real3, dB * (u - f_old[None, :])[:, :, None] + xi, 0.0)
    if FIX_H:
        x = x + tl.where((tt == t1)[:, None, None], a * cdiff[None, :, :], 0.0)
    w = x * 0.0
    inst = offs_i < 0
    after = inst
    has = False
    if CONTROL:
        ph = tl.load(ph_b + blk)
        inst, after, has = _instant(real, ph, period, offs_i)
        w = tl.where(after[:, None, None], -dB, 0.0)
    if TAU == 1:
        ae = a + r[:, :, None]  # h_(t−1) and h_(t−τ) are the same
    else:
        ae = a
    v0, v1, v2, v3, w0, w1, w2, w3 = _scan_fwd(ae, tl.broadcast_to(r[:, :, None], a.shape), real3, x, w,
                                               S0, S1, S2, S3, first, MS, NV)
    yb = tl.sum(v0 * Cv[:, None, :], axis=2) + zeta
    if HAS_D:
        yb = yb + Dp[None, :] * u
    if CONTROL:
        es, ss, rr, pre, kn = _controller(yb - wr[None, :] * u, inst, kg, eta, lam, k_max, cmask, G, BG, GP)
        if NV == 2:  # the steps after the instant see the new signal
            df = tl.where(has & cmask, _gbc(kn, BG, GP) * _tanh(es) - f_old, 0.0)
            df3 = df[None, :, None]
            yb = yb + df[None, :] * tl.sum(w0 * Cv[:, None, :], axis=2)
            v0 = v0 + df3 * w0
            v1 = v1 + df3 * w1
            v2 = v2 + df3 * w2
            v3 = v3 + df3 * w3
        kg = tl.where(has, kn, kg)
        e = tl.where(has, es, e)
    if HAS_Z:
        yb = yb * (z * tl.sigmoid(z))
    yb = tl.where(real[:, None], yb, 0.0)
    S0 = _row(v0, last)
    if MS > 1:
        S1 = _row(v1, last)
    if MS > 2:
        S2 = _row(v2, last)
    if MS > 3:
        S3 = _row(v3, last)
    return tt, yb, S0, S1, S2, S3, kg, e

@triton.jit
def _chunk_fwd_kernel(
    ins, prm, strides, scalars, dims, clock, carries,  # grouped as in the backward (ARG_GROUPS)
    state0,  # initial state (b, d, N), (b, τ, d, N), (b, ng), (b, d)
    y_ptr,
    stateT,  # final state, same shapes
    G: tl.constexpr, GP: tl.constexpr, BG: tl.constexpr, NP: tl.constexpr, BT: tl.constexpr, MS: tl.constexpr,
    TAU: tl.constexpr, CONTROL: tl.constexpr, HAS_ALPHA: tl.constexpr, HAS_BIAS: tl.constexpr,
    SOFTPLUS: tl.constexpr, HAS_D: tl.constexpr, HAS_Z: tl.constexpr, HAS_MASK: tl.constexpr,
    NOISE_W: tl.constexpr, NOISE_V: tl.constexpr, FIX_H: tl.constexpr, SAVE: tl.constexpr, SEG: tl.constexpr,
    ALIGNED: tl.constexpr,
):
    u_ptr, dl_ptr, z_ptr, B_ptr, C_ptr, al_ptr, m_ptr = ins
    A_ptr, bias_ptr, D_ptr, wr_ptr, rho_ptr, eta_ptr, lam_ptr = prm
    s_u_b, s_u_t, s_dl_b, s_dl_t, s_z_b, s_z_t, s_B_b, s_B_t, s_C_b, s_C_t, s_al_b, s_al_t = strides
    k_max, sigma_w, sigma_v, seed_key = scalars
    T, d, NG, N, n_blk, n_ck, period = dims
    ph_ptr, t1_ptr = clock
    ck_s_ptr, ck_k_ptr, ck_e_ptr = carries
    h0_ptr, ln0_ptr, k0_ptr, e0_ptr = state0
    hT_ptr, lnT_ptr, kT_ptr, eT_ptr = stateT
    BC: tl.constexpr = BG * GP
    pid_b = tl.program_id(0).to(tl.int64)  # batch offsets can pass 2^31
    pid_c = tl.program_id(1)
    offs_i, offs_n, offs_g, grp, cmask, ch, nmask, gmask, smask, sidx, lane_w, lane_v = _tile(
        pid_b, pid_c, N, NG, G, GP, BG, NP, BT)
    kb = _mix32(seed_key.to(tl.uint32, bitcast=True) ^ pid_b.to(tl.uint32))
    A, bias, Dp, wr, rho_c, eta, lam = _load_params(
        A_ptr, bias_ptr, D_ptr, wr_ptr, rho_ptr, eta_ptr, lam_ptr, sidx, smask, ch, cmask, grp, offs_g, gmask,
        BC, BG, TAU, CONTROL, HAS_BIAS, HAS_D)
    sd = d * N
    first = (offs_i == 0)[:, None, None]
    last = (offs_i == BT - 1)[:, None, None]
    # the companion state: h for τ = 0, the delay line (h_t, …, h_(t−τ+1)) for τ > 0
    if TAU == 0:
        S0, S1, S2, S3 = _load_S(h0_ptr + pid_b * sd, sd, sidx, smask, 1, NP, BC)
    else:
        S0, S1, S2, S3 = _load_S(ln0_ptr + pid_b * TAU * sd, sd, sidx, smask, MS, NP, BC)
    t1 = -1
    cdiff = tl.zeros([BC, NP], tl.float32)
    h0 = cdiff
    if FIX_H:  # the state's h may differ from its delay line's first entry: the first real step's a·h term
        h0 = tl.load(h0_ptr + pid_b * sd + sidx, mask=smask, other=0.0)
        cdiff = h0 - S0
        t1 = tl.load(t1_ptr + pid_b)
    kg = tl.zeros([BG], tl.float32)
    e = tl.zeros([BC], tl.float32)
    if CONTROL:
        kg = tl.load(k0_ptr + pid_b * NG + offs_g, mask=gmask, other=0.0)
        e = tl.load(e0_ptr + pid_b * d + ch, mask=cmask, other=0.0)

    u_b = u_ptr + pid_b * s_u_b
    dl_b = dl_ptr + pid_b * s_dl_b
    z_b = z_ptr + pid_b * s_z_b
    B_b = B_ptr + pid_b * s_B_b
    C_b = C_ptr + pid_b * s_C_b
    al_b = al_ptr + pid_b * s_al_b
    m_b = m_ptr + pid_b * T
    ph_b = ph_ptr + pid_b * n_blk
    y_b = y_ptr + pid_b * s_u_b  # y is allocated like a contiguous u

    for blk in range(0, n_blk):
        t0 = blk * BT
        if SAVE:  # the carry at every SEG-th block's start (masked stores: no branch)
            is_ck = (blk % SEG) == 0
            row = pid_b * n_ck + blk // SEG
            _store_S(ck_s_ptr + row * MS * sd, sd, sidx, smask & is_ck, S0, S1, S2, S3, MS)
            if CONTROL:
                tl.store(ck_k_ptr + row * NG + offs_g, kg, mask=gmask & is_ck)
                tl.store(ck_e_ptr + row * d + ch, e, mask=cmask & is_ck)
        tt, yb, S0n, S1n, S2n, S3n, kg, e = _fwd_block(
            S0, S1, S2, S3, kg, e, blk, t0, T, ph_b, t1, cdiff, period,
            u_b, dl_b, z_b, B_b, C_b, al_b, m_b, s_u_t, s_dl_t, s_z_t, s_B_t, s_C_t, s_al_t,
            offs_i, offs_n, nmask, grp, ch, cmask, smask, first, last,
            A, bias, Dp, wr, rho_c, eta, lam, k_max, kb, lane_w, lane_v, sigma_w, sigma_v,
            G, GP, BG, BT, MS, TAU, CONTROL, HAS_ALPHA, HAS_BIAS, SOFTPLUS, HAS_D, HAS_Z, HAS_MASK,
            NOISE_W, NOISE_V, FIX_H, ALIGNED)
        S0, S1, S2, S3 = S0n, S1n, S2n, S3n
        tl.store(y_b + tt[:, None] * s_u_t + ch[None, :], yb.to(y_ptr.dtype.element_ty),
                 mask=(tt < T)[:, None] & cmask[None, :])

    if TAU == 0:
        tl.store(hT_ptr + pid_b * sd + sidx, S0, mask=smask)
    else:
        _store_S(lnT_ptr + pid_b * TAU * sd, sd, sidx, smask, S0, S1, S2, S3, MS)
        hT = S0
        if FIX_H:
            hT = tl.where(t1 >= 0, S0, h0)  # no real step at all: h untouched
        tl.store(hT_ptr + pid_b * sd + sidx, hT, mask=smask)
    if CONTROL:
        tl.store(kT_ptr + pid_b * NG + offs_g, kg, mask=gmask)
        tl.store(eT_ptr + pid_b * d + ch, e, mask=cmask)


# ---------------------------------------------------------------------------------- backward
@triton.jit
def _chunk_bwd_kernel(
    ins, prm, strides, scalars, dims, clock, carries,  # the forward's groups (ARG_GROUPS)
    h0_ptr, gy_ptr, n_cb,
    scratch,  # (b, SEG, ...): the start carries of one segment's blocks
    gstateT,  # gradients of the final state (fp32)
    gins,  # per-step gradients (u, Δ, z, α), contiguous like their inputs
    gBC,  # partials (b, T, n_cb, N) fp32
    gprm,  # partials of prm's members: (b, d, N), (b, d) × 3, (b, ng) × 3, fp32
    gstate0,  # gradients of the initial state (fp32)
    G: tl.constexpr, GP: tl.constexpr, BG: tl.constexpr, NP: tl.constexpr, BT: tl.constexpr, MS: tl.constexpr,
    TAU: tl.constexpr, CONTROL: tl.constexpr, HAS_ALPHA: tl.constexpr, HAS_BIAS: tl.constexpr,
    SOFTPLUS: tl.constexpr, HAS_D: tl.constexpr, HAS_Z: tl.constexpr, HAS_MASK: tl.constexpr,
    NOISE_W: tl.constexpr, NOISE_V: tl.constexpr, FIX_H: tl.constexpr, HAS_GFINAL: tl.constexpr,
    SEG: tl.constexpr, ALIGNED: tl.constexpr,
):
    u_ptr, dl_ptr, z_ptr, B_ptr, C_ptr, al_ptr, m_ptr = ins
    A_ptr, bias_ptr, D_ptr, wr_ptr, rho_ptr, eta_ptr, lam_ptr = prm
    s_u_b, s_u_t, s_dl_b, s_dl_t, s_z_b, s_z_t, s_B_b, s_B_t, s_C_b, s_C_t, s_al_b, s_al_t = strides
    k_max, sigma_w, sigma_v, seed_key = scalars
    T, d, NG, N, n_blk, n_ck, period = dims
    ph_ptr, t1_ptr = clock
    ck_s_ptr, ck_k_ptr, ck_e_ptr = carries
    sc_s_ptr, sc_k_ptr, sc_e_ptr = scratch
    ghT_ptr, glnT_ptr, gkT_ptr, geT_ptr = gstateT
    gu_ptr, gdl_ptr, gz_ptr, gal_ptr = gins
    gB_ptr, gC_ptr = gBC
    gA_ptr, gbias_ptr, gD_ptr, gwr_ptr, grho_ptr, geta_ptr, glam_ptr = gprm
    gh0_ptr, gln0_ptr, gk0_ptr, ge0_ptr = gstate0
    BC: tl.constexpr = BG * GP
    NV: tl.constexpr = 1 if ALIGNED else (2 if CONTROL else 1)
    pid_b = tl.program_id(0).to(tl.int64)
    pid_c = tl.program_id(1)
    offs_i, offs_n, offs_g, grp, cmask, ch, nmask, gmask, smask, sidx, lane_w, lane_v = _tile(
        pid_b, pid_c, N, NG, G, GP, BG, NP, BT)
    kb = _mix32(seed_key.to(tl.uint32, bitcast=True) ^ pid_b.to(tl.uint32))
    A, bias, Dp, wr, rho_c, eta, lam = _load_params(
        A_ptr, bias_ptr, D_ptr, wr_ptr, rho_ptr, eta_ptr, lam_ptr, sidx, smask, ch, cmask, grp, offs_g, gmask,
        BC, BG, TAU, CONTROL, HAS_BIAS, HAS_D)
    sd = d * N
    first = (offs_i == 0)[:, None, None]
    last = (offs_i == BT - 1)[:, None, None]
    zero3 = tl.zeros([BT, BC, NP], tl.float32)
    idxp = tl.maximum(offs_i - 1, 0)[:, None, None] + zero3.to(tl.int32)  # previous position
    idxn = tl.minimum(offs_i + 1, BT - 1)[:, None, None] + zero3.to(tl.int32)  # next position
    idxn1 = tl.minimum(offs_i + 1, BT - 1)
    smask3 = smask[None, :, :]

    t1 = -1
    cdiff = tl.zeros([BC, NP], tl.float32)
    gh0 = tl.zeros([BC, NP], tl.float32)
    if FIX_H:
        t1 = tl.load(t1_ptr + pid_b)
        h0 = tl.load(h0_ptr + pid_b * sd + sidx, mask=smask, other=0.0)
        cdiff = h0 - tl.load(ck_s_ptr + pid_b * n_ck * MS * sd + sidx, mask=smask, other=0.0)
    # the adjoint of the carry after the current block, seeded by the final state's gradients
    G0 = tl.zeros([BC, NP], tl.float32)
    G1 = G0
    G2 = G0
    G3 = G0
    gk = tl.zeros([BG], tl.float32)
    ge = tl.zeros([BC], tl.float32)
    if HAS_GFINAL:
        if TAU == 0:
            G0 = tl.load(ghT_ptr + pid_b * sd + sidx, mask=smask, other=0.0)
        else:
            G0, G1, G2, G3 = _load_S(glnT_ptr + pid_b * TAU * sd, sd, sidx, smask, MS, NP, BC)
            ghT = tl.load(ghT_ptr + pid_b * sd + sidx, mask=smask, other=0.0)
            if FIX_H:  # with no real step the final h is the initial one
                G0 = G0 + tl.where(t1 >= 0, ghT, 0.0)
                gh0 = tl.where(t1 >= 0, 0.0, ghT)
            else:
                G0 = G0 + ghT
        if CONTROL:
            gk = tl.load(gkT_ptr + pid_b * NG + offs_g, mask=gmask, other=0.0)
            ge = tl.load(geT_ptr + pid_b * d + ch, mask=cmask, other=0.0)
    gA = tl.zeros([BC, NP], tl.float32)
    gcd = tl.zeros([BC, NP], tl.float32)
    gbias = tl.zeros([BC], tl.float32)
    gDp = tl.zeros([BC], tl.float32)
    gwr = tl.zeros([BC], tl.float32)
    grho = tl.zeros([BC], tl.float32)
    geta = tl.zeros([BG], tl.float32)
    glam = tl.zeros([BG], tl.float32)

    u_b = u_ptr + pid_b * s_u_b
    dl_b = dl_ptr + pid_b * s_dl_b
    z_b = z_ptr + pid_b * s_z_b
    B_b = B_ptr + pid_b * s_B_b
    C_b = C_ptr + pid_b * s_C_b
    al_b = al_ptr + pid_b * s_al_b
    m_b = m_ptr + pid_b * T
    ph_b = ph_ptr + pid_b * n_blk

    for si in range(0, n_ck):
        sg = n_ck - 1 - si  # segments of SEG blocks, last to first
        b0 = sg * SEG
        nb = tl.minimum(n_blk - b0, SEG)
        # --- the segment's forward from its checkpoint, keeping each block's start carry
        ckr = pid_b * n_ck + sg
        S0, S1, S2, S3 = _load_S(ck_s_ptr + ckr * MS * sd, sd, sidx, smask, MS, NP, BC)
        kg = tl.zeros([BG], tl.float32)
        e = tl.zeros([BC], tl.float32)
        if CONTROL:
            kg = tl.load(ck_k_ptr + ckr * NG + offs_g, mask=gmask, other=0.0)
            e = tl.load(ck_e_ptr + ckr * d + ch, mask=cmask, other=0.0)
        _store_S(sc_s_ptr + pid_b * SEG * MS * sd, sd, sidx, smask, S0, S1, S2, S3, MS)
        if CONTROL:
            tl.store(sc_k_ptr + pid_b * SEG * NG + offs_g, kg, mask=gmask)
            tl.store(sc_e_ptr + pid_b * SEG * d + ch, e, mask=cmask)
        for j in range(1, nb):
            blk = b0 + j - 1
            tt, yb, S0n, S1n, S2n, S3n, kg, e = _fwd_block(
                S0, S1, S2, S3, kg, e, blk, blk * BT, T, ph_b, t1, cdiff, period,
                u_b, dl_b, z_b, B_b, C_b, al_b, m_b, s_u_t, s_dl_t, s_z_t, s_B_t, s_C_t, s_al_t,
                offs_i, offs_n, nmask, grp, ch, cmask, smask, first, last,
                A, bias, Dp, wr, rho_c, eta, lam, k_max, kb, lane_w, lane_v, sigma_w, sigma_v,
                G, GP, BG, BT, MS, TAU, CONTROL, HAS_ALPHA, HAS_BIAS, SOFTPLUS, HAS_D, HAS_Z, HAS_MASK,
                NOISE_W, NOISE_V, FIX_H, ALIGNED)
            S0, S1, S2, S3 = S0n, S1n, S2n, S3n
            srow = pid_b * SEG + j
            _store_S(sc_s_ptr + srow * MS * sd, sd, sidx, smask, S0, S1, S2, S3, MS)
            if CONTROL:
                tl.store(sc_k_ptr + srow * NG + offs_g, kg, mask=gmask)
                tl.store(sc_e_ptr + srow * d + ch, e, mask=cmask)
        tl.debug_barrier()
        for jj in range(0, nb):
            j = nb - 1 - jj
            blk = b0 + j
            t0 = blk * BT
            srow = pid_b * SEG + j
            # --- recompute the block's forward from its start carry
            S0, S1, S2, S3 = _load_S(sc_s_ptr + srow * MS * sd, sd, sidx, smask, MS, NP, BC)
            kg = tl.zeros([BG], tl.float32)
            e = tl.zeros([BC], tl.float32)
            if CONTROL:
                kg = tl.load(sc_k_ptr + srow * NG + offs_g, mask=gmask, other=0.0)
                e = tl.load(sc_e_ptr + srow * d + ch, mask=cmask, other=0.0)
            tt, real, u, xd, dt, z, Bv, Cv, al, dA, a, r, xi, zeta = _block(
                u_b, dl_b, z_b, B_b, C_b, al_b, m_b, t0, T, s_u_t, s_dl_t, s_z_t, s_B_t, s_C_t, s_al_t,
                offs_i, offs_n, nmask, grp, ch, cmask, smask, A, bias, rho_c, kb, lane_w, lane_v, sigma_w, sigma_v,
                TAU, HAS_ALPHA, HAS_BIAS, SOFTPLUS, HAS_Z, HAS_MASK, NOISE_W, NOISE_V)
            real2 = real[:, None]
            real3 = real[:, None, None]
            dB = dt[:, :, None] * Bv[:, None, :]
            f_old = tl.zeros([BC], tl.float32)
            if CONTROL:
                f_old = _gbc(kg, BG, GP) * _tanh(e)
            x = tl.where(real3, dB * (u - f_old[None, :])[:, :, None] + xi, 0.0)
            if FIX_H:
                x = x + tl.where((tt == t1)[:, None, None], a * cdiff[None, :, :], 0.0)
            w = zero3
            inst = offs_i < 0
            after = inst
            has = False
            if CONTROL:
                ph = tl.load(ph_ptr + pid_b * n_blk + blk)
                inst, after, has = _instant(real, ph, period, offs_i)
                w = tl.where(after[:, None, None], -dB, 0.0)
            r3 = tl.broadcast_to(r[:, :, None], [BT, BC, NP])
            if TAU == 1:
                ae = a + r3
            else:
                ae = a
            v0, v1, v2, v3, w0, w1, w2, w3 = _scan_fwd(ae, r3, real3, x, w, S0, S1, S2, S3, first, MS, NV)
            yb = tl.sum(v0 * Cv[:, None, :], axis=2) + zeta
            if HAS_D:
                yb = yb + Dp[None, :] * u
            df = tl.zeros([BC], tl.float32)
            if CONTROL:
                es, ss, rr, pre, kn = _controller(yb - wr[None, :] * u, inst, kg, eta, lam, k_max, cmask, G, BG, GP)
                kc_new = _gbc(kn, BG, GP)
                th_s = _tanh(es)
                if NV == 2:
                    df = tl.where(has & cmask, kc_new * th_s - f_old, 0.0)
                    df3 = df[None, :, None]
                    yb = yb + df[None, :] * tl.sum(w0 * Cv[:, None, :], axis=2)
                    v0 = v0 + df3 * w0
                    v1 = v1 + df3 * w1
                    v2 = v2 + df3 * w2
                    v3 = v3 + df3 * w3
            # the state before each position: h_(t−1) and h_(t−τ)
            hprev = _prev(v0, first, S0, idxp)
            if TAU == 2:
                hdel = _prev(v1, first, S1, idxp)
            elif TAU == 3:
                hdel = _prev(v2, first, S2, idxp)
            elif TAU == 4:
                hdel = _prev(v3, first, S3, idxp)
            else:
                hdel = hprev
            # --- output gate
            cm2 = (tt < T)[:, None] & cmask[None, :]
            go = tl.load(gy_ptr + pid_b * s_u_b + tt[:, None] * s_u_t + ch[None, :], mask=cm2, other=0.0).to(tl.float32)
            if HAS_Z:
                sz = tl.sigmoid(z)
                gy = go * (z * sz)
                gz = go * yb * (sz * (1.0 + z * (1.0 - sz)))
            else:
                gy = go
                gz = go
            gy = tl.where(real2, gy, 0.0)
            # --- the adjoint recurrence, reversed over the block: λ_t = src_t e1 + M_(t+1)^T λ_(t+1)
            an = tl.gather(ae, idxn, 0)
            rn = tl.gather(r3, idxn, 0)
            realn = (tl.gather(real.to(tl.int32), idxn1, 0) != 0)[:, None, None]
            src = Cv[:, None, :] * gy[:, :, None]
            srcB = tl.where(inst[:, None, None], Cv[:, None, :] + zero3, 0.0)
            if CONTROL:
                if NV == 1:  # aligned: the instant is the block's last step, no step sees δf: its adjoint is 0
                    ges, dgeta, dglam, gk, ge = _instant_bwd(tl.zeros([BC], tl.float32), gk, ge, th_s, kc_new, pre,
                                                             k_max, eta, lam, kg, ss, rr, es, has, cmask, G, BG, GP)
                    src = src + tl.where(inst[:, None, None], Cv[:, None, :] * ges[None, :, None], 0.0)
            L0, L1, L2, L3, B0, B1, B2, B3 = _scan_bwd(an, rn, realn, src, G0, G1, G2, G3, srcB, last, MS, NV)
            gyp = gy
            if CONTROL:
                if NV == 2:
                    # the instant: δf's adjoint from the steps after it, then the error's (through the gain and
                    # the signal), whose response is the scan's second column
                    gfn = tl.sum(tl.sum(tl.where(after[:, None, None], -L0 * dB, 0.0), axis=2), axis=0)
                    ges, dgeta, dglam, gk, ge = _instant_bwd(gfn, gk, ge, th_s, kc_new, pre, k_max, eta, lam, kg,
                                                             ss, rr, es, has, cmask, G, BG, GP)
                    ges3 = ges[None, :, None]
                    L0 = L0 + ges3 * B0
                    L1 = L1 + ges3 * B1
                    L2 = L2 + ges3 * B2
                    L3 = L3 + ges3 * B3
                geta = geta + dgeta
                glam = glam + dglam
                gyp = gy + tl.where(inst[:, None], ges[None, :], 0.0)
            # --- per-position gradients
            uf = u - f_old[None, :] - tl.where(after[:, None], df[None, :], 0.0)  # ũ_t
            sB = tl.sum(L0 * Bv[:, None, :], axis=2)
            gdt = tl.where(real2, sB * uf, 0.0)
            gu = tl.where(real2, sB * dt, 0.0)
            if HAS_D:
                gu = gu + gyp * Dp[None, :]
            gDp = gDp + tl.sum(gyp * u, axis=0)
            if CONTROL:
                gu = gu - tl.where(inst[:, None], (ges * wr)[None, :], 0.0)
                gwr = gwr - tl.sum(tl.where(inst[:, None], ges[None, :] * u, 0.0), axis=0)
                gfo = -tl.sum(tl.where(real2 & (~after[:, None]), sB * dt, 0.0), axis=0)
                th_o = _tanh(e)
                gk = gk + _gsum(tl.where(cmask, gfo * th_o, 0.0), BG, GP)
                ge = ge + tl.where(cmask, gfo * _gbc(kg, BG, GP) * (1.0 - th_o * th_o), 0.0)
            keep = real3 & smask3
            gB_t = tl.sum(tl.where(keep, L0 * (dt * uf)[:, :, None], 0.0), axis=1)
            gC_t = tl.sum(tl.where(keep, gyp[:, :, None] * v0, 0.0), axis=1)
            gae = tl.where(keep, L0 * hprev, 0.0)
            ga = gae
            if TAU == 1:
                gr = gae
            else:
                gr = tl.where(keep, L0 * hdel, 0.0)
            if FIX_H:
                t1m = (tt == t1)[:, None, None]
                ga = ga + tl.where(t1m & smask3, L0 * cdiff[None, :, :], 0.0)
                gcd = gcd + tl.sum(tl.where(t1m, L0 * a, 0.0), axis=0)
            gadA = tl.sum(ga * dA, axis=2)
            if TAU > 0:
                grs = tl.sum(gr, axis=2)
                gdA = ga * (al * (1.0 - rho_c[None, :]))[:, :, None]
                gal = gadA * (1.0 - rho_c[None, :]) + grs * rho_c[None, :]
                grho = grho + tl.sum(al * (grs - gadA), axis=0)
            else:
                gdA = ga * al[:, :, None]
                gal = gadA
            gdAe = tl.where(smask3, gdA * dA, 0.0)
            gdt = gdt + tl.sum(gdAe * A[None, :, :], axis=2)
            gA = gA + tl.sum(gdAe * dt[:, :, None], axis=0)
            if SOFTPLUS:
                gx = gdt * tl.where(xd > 20.0, 1.0, tl.sigmoid(xd))
            else:
                gx = gdt
            gx = tl.where(real2, gx, 0.0)
            gbias = gbias + tl.sum(gx, axis=0)
            gro = pid_b * s_u_b + tt[:, None] * s_u_t + ch[None, :]  # gradient tensors are contiguous like u
            tl.store(gu_ptr + gro, gu.to(gu_ptr.dtype.element_ty), mask=cm2)
            tl.store(gdl_ptr + gro, gx.to(gdl_ptr.dtype.element_ty), mask=cm2)
            if HAS_Z:
                tl.store(gz_ptr + gro, tl.where(real2, gz, 0.0).to(gz_ptr.dtype.element_ty), mask=cm2)
            if HAS_ALPHA:
                galg = tl.sum(tl.reshape(tl.where(cmask[None, :], gal, 0.0), [BT, BG, GP]), axis=2)
                tl.store(gal_ptr + (pid_b * T + tt[:, None]) * NG + offs_g[None, :], galg.to(gal_ptr.dtype.element_ty),
                         mask=(tt < T)[:, None] & gmask[None, :])
            part = ((pid_b * T + tt[:, None]) * n_cb + pid_c) * N + offs_n[None, :]
            nm2 = (tt < T)[:, None] & nmask[None, :]
            tl.store(gB_ptr + part, gB_t, mask=nm2)
            tl.store(gC_ptr + part, gC_t, mask=nm2)
            # --- the carry's adjoint before the block: M_0^T λ_0
            R0 = _row(L0, first)
            a0 = _row(ae, first)
            real0 = tl.sum(tl.where(offs_i == 0, real.to(tl.int32), 0), axis=0) > 0
            if MS == 1:
                G0 = tl.where(real0, a0 * R0, R0)
            else:
                R1 = _row(L1, first)
                r0 = _row(r3, first)
                if MS == 2:
                    G0 = tl.where(real0, a0 * R0 + R1, R0)
                    G1 = tl.where(real0, r0 * R0, R1)
                elif MS == 3:
                    R2 = _row(L2, first)
                    G0 = tl.where(real0, a0 * R0 + R1, R0)
                    G1 = tl.where(real0, R2, R1)
                    G2 = tl.where(real0, r0 * R0, R2)
                else:
                    R2 = _row(L2, first)
                    R3 = _row(L3, first)
                    G0 = tl.where(real0, a0 * R0 + R1, R0)
                    G1 = tl.where(real0, R2, R1)
                    G2 = tl.where(real0, R3, R2)
                    G3 = tl.where(real0, r0 * R0, R3)
        tl.debug_barrier()  # the next segment rewrites the scratch

    if TAU == 0:
        tl.store(gh0_ptr + pid_b * sd + sidx, G0, mask=smask)
    else:
        if FIX_H:
            G0 = G0 - gcd
            gh0 = gh0 + gcd
        _store_S(gln0_ptr + pid_b * TAU * sd, sd, sidx, smask, G0, G1, G2, G3, MS)
        tl.store(gh0_ptr + pid_b * sd + sidx, gh0, mask=smask)
    if CONTROL:
        tl.store(gk0_ptr + pid_b * NG + offs_g, gk, mask=gmask)
        tl.store(ge0_ptr + pid_b * d + ch, ge, mask=cmask)
        tl.store(gwr_ptr + pid_b * d + ch, gwr, mask=cmask)
        tl.store(geta_ptr + pid_b * NG + offs_g, geta, mask=gmask)
        tl.store(glam_ptr + pid_b * NG + offs_g, glam, mask=gmask)
    tl.store(gA_ptr + pid_b * sd + sidx, gA, mask=smask)
    tl.store(gbias_ptr + pid_b * d + ch, gbias, mask=cmask)
    tl.store(gD_ptr + pid_b * d + ch, gDp, mask=cmask)
    if TAU > 0:
        tl.store(grho_ptr + pid_b * NG + offs_g, _gsum(tl.where(cmask, grho, 0.0), BG, GP), mask=gmask)


# ---------------------------------------------------------------------------------- Python side
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
    bt = min(int(TUNING["bwd_block_t"]), _checkpoint_steps(fwd_block))
    if control:
        bt = min(bt, _prev_pow2(control_period))
    return max(2, min(bt, triton.next_power_of_2(max(T, 1))))


def _blocking(d: int, group_size: int, n: int):
    """(GP, BG, NP, n_cblocks, num_warps): whole groups of about TUNING["channels"] lanes per program."""
    gp = triton.next_power_of_2(group_size)
    ng = d // group_size
    bg = max(1, min(max(TUNING["channels"] // gp, 1), triton.next_power_of_2(ng)))
    return gp, bg, triton.next_power_of_2(n), triton.cdiv(ng, bg), TUNING["num_warps"]


class _Cfg:
    __slots__ = ("tau", "group_size", "control", "softplus", "k_max", "sigma_w", "sigma_v", "seed", "period", "bt",
                 "fix_h", "aligned", "has_D", "has_bias", "has_z", "has_alpha", "has_mask")

    def __init__(self, **kw):
        for k, v in kw.items():
            setattr(self, k, v)


def _segment(bt: int) -> int:
    """Blocks per saved carry."""
    return max(1, CHECKPOINT_STEPS // bt)


def _checkpoint_steps(bt: int) -> int:
    """Time steps between the forward's saved carries when its blocks are ``bt`` long."""
    return bt * _segment(bt)


def _flags(cfg):
    return dict(TAU=cfg.tau, CONTROL=cfg.control, HAS_ALPHA=cfg.has_alpha, HAS_BIAS=cfg.has_bias,
                SOFTPLUS=cfg.softplus, HAS_D=cfg.has_D, HAS_Z=cfg.has_z, HAS_MASK=cfg.has_mask,
                NOISE_W=cfg.sigma_w > 0.0, NOISE_V=cfg.sigma_v > 0.0, FIX_H=cfg.fix_h, ALIGNED=cfg.aligned)


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


# The kernels' grouped arguments (tuples, unpacked at compile time): their members' names in the kernels,
# in order; the groups shared with fused_recurrent.py's scan kernels come from common.py. Forward and
# backward take the same groups for what they share; kernel_report reads this for the ahead-of-time
# signatures.
ARG_GROUPS = {
    **SHARED_GROUPS,
    "dims": ("T", "d", "NG", "N", "n_blk", "n_ck", "period"),
    "clock": ("ph_ptr", "t1_ptr"),  # (b, n_blk) int32 phase at each block's start; (b,) int32 first real step
    "carries": ("ck_s_ptr", "ck_k_ptr", "ck_e_ptr"),  # every SEG-th block's start carry
    "state0": ("h0_ptr", "ln0_ptr", "k0_ptr", "e0_ptr"),
    "stateT": ("hT_ptr", "lnT_ptr", "kT_ptr", "eT_ptr"),
    "scratch": ("sc_s_ptr", "sc_k_ptr", "sc_e_ptr"),
    "gstateT": ("ghT_ptr", "glnT_ptr", "gkT_ptr", "geT_ptr"),
    "gins": ("gu_ptr", "gdl_ptr", "gz_ptr", "gal_ptr"),
    "gBC": ("gB_ptr", "gC_ptr"),
    "gprm": ("gA_ptr", "gbias_ptr", "gD_ptr", "gwr_ptr", "grho_ptr", "geta_ptr", "glam_ptr"),
    "gstate0": ("gh0_ptr", "gln0_ptr", "gk0_ptr", "ge0_ptr"),
}


def _launch_fwd(cfg, u, delta, A, B, C, D, z, delta_bias, alpha, rho, eta, lam, w_r, h0, ln0, k_init, e0, mask,
                ph, t1, save: bool):
    b, T, d = u.shape
    n = A.shape[1]
    G, tau = cfg.group_size, cfg.tau
    ms = max(tau, 1)
    ng = d // G
    gp, bg, np_, n_cb, num_warps = _blocking(d, G, n)
    n_blk = triton.cdiv(T, cfg.bt)
    seg = _segment(cfg.bt)
    n_ck = triton.cdiv(n_blk, seg)
    f32 = dict(device=u.device, dtype=torch.float32)
    dummy = torch.empty(1, **f32)
    y = torch.empty(b, T, d, device=u.device, dtype=u.dtype)
    hT = torch.empty(b, d, n, **f32)
    lnT = torch.empty(b, tau, d, n, **f32)
    kT = torch.empty(b, ng, **f32) if cfg.control else dummy
    eT = torch.empty(b, d, **f32) if cfg.control else dummy
    if save:
        ck = (torch.empty(b, n_ck, ms, d, n, **f32),
              torch.empty(b, n_ck, ng, **f32) if cfg.control else dummy,
              torch.empty(b, n_ck, d, **f32) if cfg.control else dummy)
    else:
        ck = (dummy,) * 3
    ins, prm, strides, scalars = _groups(cfg, u, delta, z, B, C, alpha, mask, A, delta_bias, D, w_r, rho, eta, lam,
                                         dummy)
    _chunk_fwd_kernel[(b, n_cb)](
        ins, prm, strides, scalars, (T, d, ng, n, n_blk, n_ck, cfg.period), (ph, t1), ck,
        (h0, ln0 if tau else dummy, k_init, e0), y, (hT, lnT if tau else dummy, kT, eT),
        G=G, GP=gp, BG=bg, NP=np_, BT=cfg.bt, MS=ms, SAVE=save, SEG=seg, **_flags(cfg), num_warps=num_warps,
    )
    return y, (hT, lnT, kT, eT), ck


class _ChunkScan(torch.autograd.Function):
    @staticmethod
    def forward(ctx, cfg, ph, t1, bcfg, ph_b, u, delta, A, B, C, D, z, delta_bias, alpha, rho, eta, lam, w_r, h0, ln0,
                k_init, e0, mask):
        # bcfg, ph_b: the backward's configuration and clock (its blocks may be shorter than the forward's)
        y, final, ck = _launch_fwd(cfg, u, delta, A, B, C, D, z, delta_bias, alpha, rho, eta, lam, w_r,
                                   h0, ln0, k_init, e0, mask, ph, t1, save=True)
        ctx.cfg, ctx.bcfg, ctx.ck_steps = cfg, bcfg, _checkpoint_steps(cfg.bt)
        ctx.save_for_backward(u, delta, A, B, C, D, z, delta_bias, alpha, rho, eta, lam, w_r, h0, mask, ph_b, t1, *ck)
        ctx.set_materialize_grads(False)
        return (y, *final)

    @staticmethod
    def backward(ctx, gy, ghT, glnT, gkT, geT):
        cfg = ctx.bcfg
        u, delta, A, B, C, D, z, delta_bias, alpha, rho, eta, lam, w_r, h0, mask, ph, t1, *ck = ctx.saved_tensors
        b, T, d = u.shape
        n = A.shape[1]
        G, tau = cfg.group_size, cfg.tau
        ng = d // G
        gp, bg, np_, n_cb, num_warps = _blocking(d, G, n)
        n_blk = triton.cdiv(T, cfg.bt)
        seg = ctx.ck_steps // cfg.bt  # the backward's blocks between two of the forward's saved carries
        ms = max(tau, 1)
        f32 = dict(device=u.device, dtype=torch.float32)
        dummy = torch.empty(1, **f32)
        sc = (torch.empty(b, seg, ms, d, n, **f32), torch.empty(b, seg, ng, **f32) if cfg.control else dummy,
              torch.empty(b, seg, d, **f32) if cfg.control else dummy)
        gy = torch.zeros_like(u) if gy is None else gy.contiguous()
        has_gfinal = any(g is not None for g in (ghT, glnT, gkT, geT))
        zf = lambda g, *shape: (torch.zeros(*shape, **f32) if g is None else g.float().contiguous())  # noqa: E731
        ghT, glnT = zf(ghT, b, d, n), zf(glnT, b, tau, d, n)
        gkT = zf(gkT, b, ng) if cfg.control else dummy
        geT = zf(geT, b, d) if cfg.control else dummy
        gu = torch.empty(b, T, d, device=u.device, dtype=u.dtype)
        gdelta = torch.empty(b, T, d, device=u.device, dtype=delta.dtype)
        gz = torch.empty(b, T, d, device=u.device, dtype=z.dtype) if z is not None else dummy
        galpha = torch.empty(b, T, ng, device=u.device, dtype=alpha.dtype) if alpha is not None else dummy
        gBp = torch.empty(b, T, n_cb, n, **f32)
        gCp = torch.empty(b, T, n_cb, n, **f32)
        gAp = torch.empty(b, d, n, **f32)
        gbp, gDp, gwp = (torch.empty(b, d, **f32) for _ in range(3))
        grp, gep, glp = (torch.empty(b, ng, **f32) for _ in range(3))
        gh0 = torch.empty(b, d, n, **f32)
        gln0 = torch.empty(b, tau, d, n, **f32)
        gk0 = torch.empty(b, ng, **f32) if cfg.control else dummy
        ge0 = torch.empty(b, d, **f32) if cfg.control else dummy
        o = lambda x: x if x is not None else dummy  # noqa: E731
        ins, prm, strides, scalars = _groups(cfg, u, delta, z, B, C, alpha, mask, A, delta_bias, D, w_r, rho, eta,
                                             lam, dummy)
        _chunk_bwd_kernel[(b, n_cb)](
            ins, prm, strides, scalars, (T, d, ng, n, n_blk, triton.cdiv(n_blk, seg), cfg.period), (ph, t1),
            tuple(ck), h0, gy, n_cb, sc, (ghT, glnT if tau else dummy, gkT, geT), (gu, gdelta, gz, galpha),
            (gBp, gCp), (gAp, gbp, gDp, gwp, grp, gep, glp), (gh0, gln0 if tau else dummy, gk0, ge0),
            G=G, GP=gp, BG=bg, NP=np_, BT=cfg.bt, MS=ms, HAS_GFINAL=has_gfinal, SEG=seg, **_flags(cfg),
            num_warps=num_warps,
        )
        like = lambda g, x: None if x is None else g.to(x.dtype)  # noqa: E731
        return (
            None, None, None, None, None,  # cfg, ph, t1, bcfg, ph_b
            gu, gdelta, gAp.sum(0).to(A.dtype), gBp.sum(2).to(B.dtype), gCp.sum(2).to(C.dtype),
            like(gDp.sum(0), D), gz if z is not None else None, like(gbp.sum(0), delta_bias),
            galpha if alpha is not None else None,
            like(grp.sum(0), rho) if tau else None,
            like(gep.sum(0), eta) if cfg.control else None, like(glp.sum(0), lam) if cfg.control else None,
            like(gwp.sum(0), w_r) if cfg.control else None,
            gh0, gln0, gk0 if cfg.control else None, ge0 if cfg.control else None, None,
        )


@keyword_interface("u", "delta", defaults={"control_period": 64})
def conba_scan_chunk(u, delta, B, C, params: ConbaParams, *, z=None, alpha=None, mask=None, initial_state=None,
                     return_final_state=False, block_t=None, bwd_block_t=None):
    """The chunk-parallel scan (arguments as `mixcon.ops.conba.conba_scan`, already validated there).
    ``block_t``: time positions per block (a power of two ≤ P with control on; default `block_size`);
    ``bwd_block_t``: the backward's (the same rules, and at most the steps between the forward's saved
    carries; default `bwd_block_size`)."""
    p = params
    A, D, delta_bias, delta_softplus, rho, tau = p.A, p.D, p.delta_bias, p.delta_softplus, p.rho, p.tau
    k0, eta, lam, w_r, k_max, group_size = p.k0, p.eta, p.lam, p.w_r, p.k_max, p.group_size
    sigma_w, sigma_v, seed, control_period = p.sigma_w, p.sigma_v, p.seed, p.control_period
    b, T, d = u.shape
    n = A.shape[1]
    ng = d // group_size
    control = eta is not None or k0 is not None
    P = int(control_period)
    f32 = dict(device=u.device, dtype=torch.float32)
    if initial_state is None:
        h0 = torch.zeros(b, d, n, **f32)
        ln0 = torch.zeros(b, tau, d, n, **f32)
        k_init = k0.float().expand(b, ng) if (control and k0 is not None) else torch.zeros(b, ng, **f32)
        e0 = torch.zeros(b, d, **f32)
        phase0 = torch.zeros(b, dtype=torch.long, device=u.device)
    else:
        h0, ln0, k_init, e0 = (s.float() for s in initial_state[:4])
        phase0 = initial_state.phase
    h0, ln0, k_init, e0 = (s.contiguous() for s in (h0, ln0, k_init, e0))
    if T == 0:
        y = u.new_zeros(b, 0, d)
        fin = ConbaState(h0.clone(), ln0.clone(), k_init.clone(), e0.clone(), phase0.clone())
        return (y, fin) if return_final_state else y
    bt = int(block_t) if block_t is not None else block_size(T, P, control)
    if bt < 1 or bt & (bt - 1) or (control and bt > P):
        raise ValueError(f"block_t={block_t!r} must be a power of two, at most control_period={P} with control on")
    bt_b = int(bwd_block_t) if bwd_block_t is not None else bwd_block_size(T, P, control, bt)
    if bt_b < 1 or bt_b & (bt_b - 1) or (control and bt_b > P) or bt_b > _checkpoint_steps(bt):
        raise ValueError(f"bwd_block_t={bwd_block_t!r} must be a power of two, at most control_period={P} with "
                         f"control on and at most {_checkpoint_steps(bt)} (the steps between saved carries)")
    if control:
        eta = eta if eta is not None else torch.zeros(ng, **f32)
        lam = lam if lam is not None else torch.zeros(ng, **f32)
        w_r = w_r if w_r is not None else torch.ones(d, **f32)
    if mask is not None:
        mask = mask.to(torch.int8).contiguous()
    ph, t1, n_real = _clock(mask, phase0, b, T, bt, P, u.device)
    # phase 0, no padding and P a multiple of the block: every instant is a block's last step
    aligned = lambda block: control and mask is None and initial_state is None and P % block == 0  # noqa: E731
    cfg = _Cfg(tau=tau, group_size=group_size, control=control, softplus=bool(delta_softplus), k_max=float(k_max),
               sigma_w=float(sigma_w), sigma_v=float(sigma_v), seed=int(seed), period=P, bt=bt,
               fix_h=tau > 0 and initial_state is not None, aligned=aligned(bt),
               has_D=D is not None, has_bias=delta_bias is not None,
               has_z=z is not None, has_alpha=alpha is not None, has_mask=mask is not None)
    u = u.contiguous()
    row = max(T * x.stride(1) for x in (u, delta, z, B, C, alpha) if x is not None)
    if row >= 2**31:
        raise ValueError(f"conba_scan (triton): one batch row spans {row} elements (T={T} × row stride); "
                         f"at most 2^31 - 1 are allowed: split the sequence and pass the state on")
    args = (u, _rows(delta), A.contiguous(), _rows(B), _rows(C), D, _rows(z), delta_bias, _rows(alpha),
            rho, eta, lam, w_r, h0, ln0, k_init, e0, mask)
    needs_grad = torch.is_grad_enabled() and any(isinstance(x, torch.Tensor) and x.requires_grad for x in args)
    if needs_grad:
        bcfg, ph_b = cfg, ph
        if bt_b != bt:
            bcfg = _Cfg(**{k: getattr(cfg, k) for k in _Cfg.__slots__})
            bcfg.bt = bt_b
            bcfg.aligned = aligned(bt_b)
            ph_b = _clock(mask, phase0, b, T, bt_b, P, u.device)[0]
        y, hT, lnT, kT, eT = _ChunkScan.apply(cfg, ph, t1, bcfg, ph_b, *args)
    else:
        y, (hT, lnT, kT, eT), _ = _launch_fwd(cfg, *args, ph, t1, save=False)
    if control:
        phase = (phase0.to(torch.long) + n_real) % P
    else:  # without control k, e and the phase pass through untouched (their gradients too)
        kT, eT, phase = k_init, e0, phase0.clone()
    if tau == 0:
        lnT = ln0.clone() if not needs_grad else lnT
    if return_final_state:
        return y, ConbaState(hT, lnT, kT, eT, phase.to(phase0.dtype))
    return y
