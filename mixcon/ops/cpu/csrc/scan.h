// Conba's plant on CPU, fused: what the block scan's forward (scan_fwd.cpp) and backward (scan_bwd.cpp)
// share. The block scan, for each row b and each step t < steps[b] (time-major; state laid out (N, d)):
//
//   a_t = coef_t · exp(Δ_t A),   h_t = a_t ⊙ h_{t−1} + r_t ⊙ h_{t−τ} + (Δ_t u_t) B_t + ξ_t,
//   y_t = Σ_n C_t[n] h_t[n, ·]
//
// with h_{−1} = h0 in the a-term and h_{−1−i} = dl0[i] in the r-term (the reference keeps h and the
// delay line apart). Work is split into tasks of (row, tile of channels); a task keeps its tile's
// state in a small buffer and runs the whole time line over it, so nothing of size (L, b, N, d) is
// ever formed. The backward recomputes the states from checkpoints taken every SEG steps.
//
// Training noise (docs/conba.md, step 6; noise.py is the definition) is drawn inside the kernels from
// its key, step by step and tile by tile, as the Triton kernels do (noise.h): the process noise ξ is
// never stored, the backward draws it again where it recomputes the states.
#pragma once

#include "common.h"
#include "noise.h"

namespace mixcon_cpu {

namespace {  // internal to each file that includes it

constexpr int64_t SEG = 32;  // steps per recompute segment of the backward (>= the largest delay)

// The per-step controller (P = 1) of a training scan, run inside the kernels (docs/conba.md, step 6): at
// every real step t, f_t = k_t tanh(e_{t−1}) (per channel, k per group of G), the plant's input u_t − f_t,
// the measured output m_t = y_t + extra_t (extra: D u + σ_v ζ), e_t = m_t − w_r u_t and
// k_{t+1} = clamp((1 − λ) k_t + η ‖e_t[group]‖₂ / √G, 0, k_max). The forward keeps k_t and e_t of every step
// (sizes of y) for the backward, which runs the controller's adjoint with the plant's.
template <typename T>
struct Ctl1 {
  const T* extra = nullptr;                                    // (L, b, d) or null
  const T* w_r = nullptr; const T* eta = nullptr; const T* lam = nullptr;  // (d), (ng), (ng); null: 1, 0, 0
  const T* k0 = nullptr; const T* e0 = nullptr;                // (b, ng), (b, d)
  T* K = nullptr; T* E = nullptr;                              // (L, b, ng) k_t, (L, b, d) e_t
  T* kT = nullptr; T* eT = nullptr;                            // (b, ng), (b, d): after each row's last step
  const T* gkT = nullptr; const T* geT = nullptr;              // their gradients, or null
  T* g_extra = nullptr; T* gw_r = nullptr;                     // (L, b, d), (b, d) per row
  T* geta = nullptr; T* glam = nullptr; T* gk0 = nullptr;      // (b, ng) per row
  T* ge0 = nullptr;                                            // (b, d)
  int64_t G = 1;
  T k_max = T(0);
};

// The controller's inputs and constants from ctl = (extra, w_r, eta, lam, k0, e0, ...) of p1_fwd and p1_bwd
template <typename T>
Ctl1<T> ctl1_inputs(const std::vector<torch::Tensor>& ctl, int64_t G, double k_max) {
  Ctl1<T> c;
  c.extra = opt<T>(ctl[0]); c.w_r = opt<T>(ctl[1]); c.eta = opt<T>(ctl[2]);
  c.lam = opt<T>(ctl[3]); c.k0 = ctl[4].data_ptr<T>(); c.e0 = ctl[5].data_ptr<T>();
  c.G = G; c.k_max = static_cast<T>(k_max);
  return c;
}

template <typename T>
struct Scan {
  const T* dt;     // (L, b, d)
  const T* u;      // (L, b, d), the plant's input (u − f)
  const T* coef;   // (L, b, d) or null (1)
  const T* r;      // (L, b, d) or null (no delay)
  const T* At;     // (N, d)
  const T* B;      // (L, b, N)
  const T* C;      // (L, b, N)
  Noise<T> noise;  // the process noise, drawn per step and tile (keys null: none)
  T* hs;           // (L, b, N, d) or null: every state, written by a training forward with noise, read by its backward
  const Ctl1<T>* c1 = nullptr;  // the per-step controller (P = 1), or null: the plant's input is u as given
  const T* h0;     // (b, N, d)
  const T* dl0;    // (tau, b, N, d)
  const int64_t* steps;  // (b,) or null (L)
  int64_t L, b, d, N, tau;
};

template <typename T>
constexpr int64_t tile_width() { return 8 * Vectorized<T>::size(); }

template <typename T>
inline int64_t row_steps(const Scan<T>& s, int64_t bi) {
  return s.steps ? std::min(std::max<int64_t>(s.steps[bi], 0), s.L) : s.L;
}

// a (N, d) slab of row bi ↔ the task's (N, TW) tile buffer
template <typename T>
inline void load_tile(T* dst, const T* src, int64_t N, int64_t d, int64_t c0, int64_t w) {
  constexpr int64_t TW = tile_width<T>();
  for (int64_t n = 0; n < N; ++n) {
    std::memcpy(dst + n * TW, src + n * d + c0, w * sizeof(T));
    std::fill(dst + n * TW + w, dst + (n + 1) * TW, T(0));
  }
}

template <typename T>
inline void store_tile(T* dst, const T* src, int64_t N, int64_t d, int64_t c0, int64_t w) {
  constexpr int64_t TW = tile_width<T>();
  for (int64_t n = 0; n < N; ++n) std::memcpy(dst + n * d + c0, src + n * TW, w * sizeof(T));
}

template <typename T>
inline void add_tile(T* dst, const T* src, int64_t N, int64_t d, int64_t c0, int64_t w) {
  constexpr int64_t TW = tile_width<T>();
  for (int64_t n = 0; n < N; ++n)
    for (int64_t j = 0; j < w; ++j) dst[n * d + c0 + j] += src[n * TW + j];
}

// One step's inputs for one tile, already offset to (t, row, first channel): dt, u, coef, r (w values;
// coef, r may be null), B, C (N values), xi (N rows of stride TW, the tile's drawn noise, or null).
template <typename T>
struct StepIn {
  const T* dt; const T* u; const T* coef; const T* r; const T* B; const T* C; const T* xi;
};

template <typename T>
inline StepIn<T> step_in(const Scan<T>& s, int64_t t, int64_t bi, int64_t c0) {
  const int64_t row = t * s.b + bi, off = row * s.d + c0;
  return {s.dt + off, s.u + off, s.coef ? s.coef + off : nullptr, s.r ? s.r + off : nullptr, s.B + row * s.N,
          s.C + row * s.N, nullptr};
}

// One step of one tile: hc = a ⊙ hp + r ⊙ hd + Δ (u − f) B (+ ξ); y (w values) when yout; exp(Δ A) into
// ebuf when given. At: A transposed, offset to the tile's first channel, rows of stride d.
template <typename T>
inline void step_tile(const StepIn<T>& in, const T* At, int64_t d, int64_t N, int64_t w, const T* hp, const T* hd,
                      T* hc, T* yout, T* ebuf, const T* f = nullptr) {
  using V = Vectorized<T>;
  constexpr int64_t VS = V::size();
  constexpr int64_t TW = tile_width<T>();
  for (int64_t v = 0; v < w; v += VS) {
    const int64_t cnt = std::min(VS, w - v);
    const V dtv = V::loadu(in.dt + v, cnt);
    const V uv = f ? V::loadu(in.u + v, cnt) - V::loadu(f + v, cnt) : V::loadu(in.u + v, cnt);
    const V x = dtv * uv;
    const V cf = in.coef ? V::loadu(in.coef + v, cnt) : V(T(1));
    const V rv = in.r ? V::loadu(in.r + v, cnt) : V(T(0));
    V y(T(0));
    for (int64_t n = 0; n < N; ++n) {
      // exp_u20 in float (ATen's polynomial; its accuracy and cost: docs/kernels.md, "Compiled on CPU"), Sleef in double
      const V e = (dtv * V::loadu(At + n * d + v, cnt)).exp_u20();
      V h = (e * cf) * V::loadu(hp + n * TW + v) + x * V(in.B[n]);
      if (hd) h = h + rv * V::loadu(hd + n * TW + v);
      if (in.xi) h = h + V::loadu(in.xi + n * TW + v);
      h.store(hc + n * TW + v);
      if (ebuf) e.store(ebuf + n * TW + v);
      y = y + V(in.C[n]) * h;
    }
    if (yout) y.store(yout + v, cnt);
  }
}

// The task's buffer H holds hist = max(τ, 1) rows of history then SEG rows: H[hist + k] = h_{s0 + k},
// H[j] = h_{s0 − hist + j}; at s0 = 0 the history is the delay line (h0 when τ = 0).
template <typename T>
inline void init_history(const Scan<T>& s, int64_t bi, int64_t c0, int64_t w, T* H, T* H0) {
  constexpr int64_t TW = tile_width<T>();
  const int64_t NS = s.N * s.d, hist = std::max<int64_t>(s.tau, 1);
  load_tile(H0, s.h0 + bi * NS, s.N, s.d, c0, w);
  for (int64_t j = 0; j < hist; ++j) {
    const T* src = s.tau > 0 ? s.dl0 + ((hist - 1 - j) * s.b + bi) * NS : s.h0 + bi * NS;
    load_tile(H + j * s.N * TW, src, s.N, s.d, c0, w);
  }
}

// f_t = k_t tanh(e_{t−1}) of the tile from the kept k_t and e_{t−1} (e0 at t = 0); te: tanh(e_{t−1}) when given
template <typename T>
inline void held_p1(const Scan<T>& s, int64_t t, int64_t bi, int64_t c0, int64_t w, T* f, T* te = nullptr) {
  const Ctl1<T>& c = *s.c1;
  const int64_t ng = s.d / c.G;
  const T* kt = c.K + (t * s.b + bi) * ng + c0 / c.G;
  const T* ep = t == 0 ? c.e0 + bi * s.d + c0 : c.E + ((t - 1) * s.b + bi) * s.d + c0;
  for (int64_t j = 0; j < w; ++j) {
    const T th = std::tanh(ep[j]);
    f[j] = kt[j / c.G] * th;
    if (te) te[j] = th;
  }
}

template <typename T>
inline void run_segment(const Scan<T>& s, int64_t bi, int64_t c0, int64_t w, int64_t s0, int64_t len, T* H,
                        const T* H0, T* y, T* E, NoiseScratch<T>* ns) {
  constexpr int64_t TW = tile_width<T>();
  const int64_t R = s.N * TW, hist = std::max<int64_t>(s.tau, 1);
  std::vector<T> f(s.c1 ? TW : 0, T(0));
  for (int64_t k = 0; k < len; ++k) {
    const int64_t t = s0 + k;
    const T* hp = t == 0 ? H0 : H + (hist + k - 1) * R;
    const T* hd = s.tau > 0 ? H + (hist + k - s.tau) * R : nullptr;
    StepIn<T> in = step_in(s, t, bi, c0);
    if (s.noise) in.xi = draw_tile(s.noise, t, bi, c0, *ns, TW);
    if (s.c1) held_p1(s, t, bi, c0, w, f.data());
    step_tile(in, s.At + c0, s.d, s.N, w, hp, hd, H + (hist + k) * R,
              y ? y + (t * s.b + bi) * s.d + c0 : nullptr, E ? E + k * R : nullptr, s.c1 ? f.data() : nullptr);
    if (s.hs) store_tile(s.hs + (t * s.b + bi) * s.N * s.d, H + (hist + k) * R, s.N, s.d, c0, w);
  }
}

// The backward's segment from the states the forward kept (s.hs): H's rows as run_segment would leave them
// (history rows before t = 0 from `init`, the rows init_history filled) and exp(Δ_t A) into E, as step_tile
// computes it; no step, no noise drawn again.
template <typename T>
inline void load_segment(const Scan<T>& s, int64_t bi, int64_t c0, int64_t w, int64_t s0, int64_t len, T* H,
                         const T* init, T* E) {
  using V = Vectorized<T>;
  constexpr int64_t VS = V::size();
  constexpr int64_t TW = tile_width<T>();
  const int64_t R = s.N * TW, NS = s.N * s.d, hist = std::max<int64_t>(s.tau, 1);
  for (int64_t j = 0; j < hist + len; ++j) {
    const int64_t t = s0 - hist + j;
    if (t >= 0) load_tile(H + j * R, s.hs + (t * s.b + bi) * NS, s.N, s.d, c0, w);
    else std::memcpy(H + j * R, init + (t + hist) * R, R * sizeof(T));
  }
  for (int64_t k = 0; k < len; ++k) {
    const T* dt = s.dt + ((s0 + k) * s.b + bi) * s.d + c0;
    for (int64_t v = 0; v < w; v += VS) {
      const int64_t cnt = std::min(VS, w - v);
      const V dtv = V::loadu(dt + v, cnt);
      for (int64_t n = 0; n < s.N; ++n)
        (dtv * V::loadu(s.At + c0 + n * s.d + v, cnt)).exp_u20().store(E + k * R + n * TW + v);
    }
  }
}

template <typename T>
Scan<T> make_scan(const torch::Tensor& dt, const torch::Tensor& u, const torch::Tensor& coef, const torch::Tensor& r,
                  const torch::Tensor& At, const torch::Tensor& B, const torch::Tensor& C, const torch::Tensor& keys,
                  double sigma_w, const torch::Tensor& h0, const torch::Tensor& dl0, const torch::Tensor& steps,
                  int64_t tau, const torch::Tensor& hs = torch::Tensor()) {
  Scan<T> s;
  s.hs = nullptr;
  if (hs.defined() && hs.numel()) {
    TORCH_CHECK(hs.is_contiguous() && hs.scalar_type() == dt.scalar_type() && hs.dim() == 4 && hs.size(0) == dt.size(0) &&
                hs.size(1) == dt.size(1) && hs.size(2) == At.size(0) && hs.size(3) == dt.size(2),
                "conba_cpu: the kept states must be a contiguous (L, b, N, d) tensor of the scan's dtype");
    s.hs = hs.data_ptr<T>();
  }
  s.dt = dt.data_ptr<T>(); s.u = u.data_ptr<T>(); s.coef = opt<T>(coef); s.r = opt<T>(r);
  s.At = At.data_ptr<T>(); s.B = B.data_ptr<T>(); s.C = C.data_ptr<T>();
  if (keys.numel()) {
    TORCH_CHECK(keys.scalar_type() == at::kLong && keys.is_contiguous() && keys.dim() == 2 &&
                keys.size(0) == dt.size(0) && keys.size(1) == dt.size(1),
                "conba_cpu: the noise keys must be a contiguous int64 (L, b) tensor");
    // σ as torch multiplies a float32 tensor by a Python float: rounded to T first
    s.noise.keys = keys.data_ptr<int64_t>(); s.noise.sigma = static_cast<T>(sigma_w);
    s.noise.b = dt.size(1); s.noise.N = At.size(0);
  }
  s.h0 = h0.data_ptr<T>(); s.dl0 = opt<T>(dl0);
  s.steps = steps.numel() ? steps.data_ptr<int64_t>() : nullptr;
  s.L = dt.size(0); s.b = dt.size(1); s.d = dt.size(2); s.N = At.size(0); s.tau = tau;
  return s;
}

template <typename T, typename F>
void for_tasks(int64_t b, int64_t d, F f) {
  constexpr int64_t TW = tile_width<T>();
  const int64_t nt = (d + TW - 1) / TW;
  at::parallel_for(0, b * nt, 1, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      const int64_t bi = i / nt, tile = i % nt, c0 = tile * TW;
      f(bi, tile, c0, std::min(TW, d - c0));
    }
  });
}

}  // namespace

}  // namespace mixcon_cpu
