// Conba's plant on CPU, fused: the block scan (forward, and its adjoint for the backward) and the
// decode step. Built at run time by mixcon/ops/conba/cpu.py (torch.utils.cpp_extension), which
// falls back to the pure-PyTorch path (chunk_torch.py) where no compiler is present.
//
// The block scan, for each row b and each step t < steps[b] (time-major; state laid out (N, d)):
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
// its key, step by step and tile by tile, as the Triton kernels do: the process noise ξ is never
// stored, the backward draws it again where it recomputes the states.
#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <ATen/cpu/vec/vec.h>

#ifndef _WIN32
#include <dlfcn.h>
#endif

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <vector>

using at::vec::Vectorized;

namespace {

constexpr int64_t SEG = 32;  // steps per recompute segment of the backward (>= the largest delay)

// ---------------------------------------------------------------------------------------------
// The counter-based noise of noise.py, bit for bit: lane = c·(N + 1) + n (n = N: the observation noise
// ζ), h1 = mix32(lane ^ key), h2 = mix32(h1 ^ salt), u1 = ((h1 >> 8) + 0.5) 2^−24, u2 = (h2 >> 8) 2π 2^−24
// (float32, rounded as torch rounds them), normal = sqrt(−2 log u1) cos u2. The log, the sqrt and the cos
// must be the ones torch computes for a contiguous float32 tensor: MKL's vector math (high accuracy) in a
// torch built with MKL — found in the loaded libtorch_cpu at run time — else ATen's vectorised functions.
// (MKL's sqrt is not the correctly rounded one: on this project's machine it differs from it in 2.9M of
// the 2^24 inputs the hash can give; tests/ops/test_conba_cpu.py compares the draw with noise.py bit for
// bit, and each transform with torch's over all 2^24 inputs.)
constexpr uint32_t SECOND_DRAW_SALT = 0x68E31DA4u;

inline uint32_t mix32(uint32_t x) {
  x ^= x >> 16;
  x *= 0x7FEB352Du;
  x ^= x >> 15;
  x *= 0x846CA68Bu;
  x ^= x >> 16;
  return x;
}

using vml_fn = void (*)(const long long*, const float*, float*, const long long*);

struct Vml {
  vml_fn ln = nullptr, sqrt = nullptr, cos = nullptr;
};

const Vml& vml() {
  static const Vml v = [] {
    Vml r;
#ifndef _WIN32
    void* lib = dlopen("libtorch_cpu.so", RTLD_NOW | RTLD_NOLOAD);
    for (void* h : {lib, RTLD_DEFAULT}) {
      if (!h || r.ln) continue;
      // the 64-bit-count interface of vmsLn, vmsSqrt, vmsCos
      r.ln = reinterpret_cast<vml_fn>(dlsym(h, "VMSLN_64_"));
      r.sqrt = reinterpret_cast<vml_fn>(dlsym(h, "VMSSQRT_64_"));
      r.cos = reinterpret_cast<vml_fn>(dlsym(h, "VMSCOS_64_"));
      if (!r.ln || !r.sqrt || !r.cos) r.ln = r.sqrt = r.cos = nullptr;
    }
#endif
    return r;
  }();
  return v;
}

// as at::vml: high accuracy, denormals kept, errors ignored (VML_HA | VML_FTZDAZ_OFF | VML_ERRMODE_IGNORE)
constexpr long long VML_MODE = 0x00000002 | 0x00140000 | 0x00000100;

// x ← sqrt(−2 log x), c ← cos c over n floats, as noise.py's torch ops compute them (−2 log x is exact)
inline void radius_cos(float* x, float* c, int64_t n) {
  using V = Vectorized<float>;
  const Vml& m = vml();
  if (m.ln) {
    const long long cnt = n;
    m.ln(&cnt, x, x, &VML_MODE);
    for (int64_t i = 0; i < n; i += V::size()) {
      const int64_t k = std::min<int64_t>(V::size(), n - i);
      (V::loadu(x + i, k) * V(-2.0f)).store(x + i, k);
    }
    m.sqrt(&cnt, x, x, &VML_MODE);
    m.cos(&cnt, c, c, &VML_MODE);
    return;
  }
  for (int64_t i = 0; i < n; i += V::size()) {
    const int64_t k = std::min<int64_t>(V::size(), n - i);
    (V::loadu(x + i, k).log() * V(-2.0f)).sqrt().store(x + i, k);
    V::loadu(c + i, k).cos().store(c + i, k);
  }
}

constexpr float U_SCALE = 5.9604644775390625e-08f;                          // 2^−24
constexpr float ANGLE_SCALE = static_cast<float>(2.0 * M_PI * 5.9604644775390625e-08);  // as torch rounds 2π 2^−24

// the two uniforms of one (key, lane)
inline void uniforms(uint32_t key, uint32_t lane, float& u1, float& u2) {
  const uint32_t h1 = mix32(lane ^ key), h2 = mix32(h1 ^ SECOND_DRAW_SALT);
  // h >> 8 < 2^24: exact through int32 (which vectorises, where uint32 → float does not under AVX2)
  u1 = (static_cast<float>(static_cast<int32_t>(h1 >> 8)) + 0.5f) * U_SCALE;  // in (0, 1]: the add rounds as float32
  u2 = static_cast<float>(static_cast<int32_t>(h2 >> 8)) * ANGLE_SCALE;
}

// out[i] = σ · normal(u1[i], u2[i]), the normal in float32 (then in T, as `sigma * xi.to(acc)`);
// u1 and u2 are overwritten
template <typename T>
inline void box_muller(float* u1, float* u2, int64_t n, T sigma, T* out) {
  radius_cos(u1, u2, n);
  for (int64_t i = 0; i < n; ++i) out[i] = sigma * static_cast<T>(u1[i] * u2[i]);
}

// The noise of one scan: keys (L, b), uint32 values of noise.step_key in int64, and the process noise's σ
// (T(0): none). A task draws ξ of its (N, TW) tile for one step into `buf`.
template <typename T>
struct Noise {
  const int64_t* keys = nullptr;
  T sigma = T(0);
  int64_t b = 0, N = 0;
  explicit operator bool() const { return keys != nullptr; }
};

template <typename T>
struct NoiseScratch {
  std::vector<float> u1, u2;
  std::vector<T> xi;
  explicit NoiseScratch(int64_t size) : u1(size), u2(size), xi(size) {}
};

// ξ_t of the tile (N rows of TW channels from c0; channels past d draw finite values that are never read)
template <typename T>
inline const T* draw_tile(const Noise<T>& nz, int64_t t, int64_t bi, int64_t c0, NoiseScratch<T>& sc, int64_t TW) {
  const uint32_t key = static_cast<uint32_t>(nz.keys[t * nz.b + bi]);
  const int64_t N = nz.N;
  const uint32_t stride = static_cast<uint32_t>(N + 1);  // lanes wrap to 32 bits, as noise.py's int32 copy
  for (int64_t n = 0; n < N; ++n) {
    float* a = sc.u1.data() + n * TW;
    float* c = sc.u2.data() + n * TW;
    const uint32_t lane0 = static_cast<uint32_t>(c0 * (N + 1) + n);
    for (int64_t j = 0; j < TW; ++j) uniforms(key, lane0 + static_cast<uint32_t>(j) * stride, a[j], c[j]);
  }
  box_muller(sc.u1.data(), sc.u2.data(), N * TW, nz.sigma, sc.xi.data());
  return sc.xi.data();
}

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

// softplus (linear above 20, as torch's) and silu over a vector
template <typename T>
inline Vectorized<T> vsoftplus(const Vectorized<T>& x) {
  return Vectorized<T>::blendv(x.exp().log1p(), x, x > Vectorized<T>(T(20)));
}

template <typename T>
inline Vectorized<T> vsilu(const Vectorized<T>& x) { return x / (Vectorized<T>(T(1)) + x.neg().exp()); }

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
      // exp_u20 (float: ATen's polynomial, within 4e-7 relative, half the time of Sleef's u10; double: Sleef)
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
void scan_fwd_task(const Scan<T>& s, int64_t bi, int64_t c0, int64_t w, T* y, T* h_last, T* dl_last) {
  constexpr int64_t TW = tile_width<T>();
  const int64_t R = s.N * TW, NS = s.N * s.d, hist = std::max<int64_t>(s.tau, 1);
  const int64_t Lb = row_steps(s, bi);
  // rows for the longest segment this row has (a block of P = 1 is one step: no SEG-long buffers to fill)
  std::vector<T> Hv((hist + std::min(SEG, Lb)) * R), H0v(R);
  NoiseScratch<T> ns(s.noise ? R : 0);
  T* H = Hv.data();
  init_history(s, bi, c0, w, H, H0v.data());
  int64_t last = hist - 1;  // row of h_{Lb−1} in H
  for (int64_t s0 = 0; s0 < Lb; s0 += SEG) {
    const int64_t len = std::min(SEG, Lb - s0);
    run_segment(s, bi, c0, w, s0, len, H, H0v.data(), y, static_cast<T*>(nullptr), &ns);
    last = hist + len - 1;
    if (s0 + len < Lb) {
      std::memmove(H, H + len * R, hist * R * sizeof(T));
      last = hist - 1;
    }
  }
  for (int64_t t = Lb; t < s.L; ++t) std::fill_n(y + (t * s.b + bi) * s.d + c0, w, T(0));
  store_tile(h_last + bi * NS, Lb > 0 ? H + last * R : H0v.data(), s.N, s.d, c0, w);
  for (int64_t i = 0; i < s.tau; ++i)  // dl_last[i] = h_{Lb−1−i}: history rows below `last`
    store_tile(dl_last + (i * s.b + bi) * NS, H + (last - i) * R, s.N, s.d, c0, w);
}

// A training forward with the per-step controller (P = 1): the plant step by step, the controller between
// steps (the task holds whole groups), k_t and e_t kept for the backward.
template <typename T>
void p1_fwd_task(const Scan<T>& s, int64_t bi, int64_t c0, int64_t w, T* y, T* h_last, T* dl_last) {
  using V = Vectorized<T>;
  constexpr int64_t TW = tile_width<T>();
  const Ctl1<T>& c = *s.c1;
  const int64_t R = s.N * TW, NS = s.N * s.d, hist = std::max<int64_t>(s.tau, 1), ring = hist + 1;
  const int64_t G = c.G, ng = s.d / G, g0 = c0 / G, ngt = (w + G - 1) / G;
  const int64_t Lb = row_steps(s, bi);
  std::vector<T> Hv(ring * R), H0v(R), k(ngt), e(w), f(TW, T(0)), yb(TW, T(0));
  NoiseScratch<T> ns(s.noise ? R : 0);
  T* H = Hv.data();
  init_history(s, bi, c0, w, H, H0v.data());
  auto row = [&](int64_t t) { return H + ((t + hist) % ring + ring) % ring * R; };
  for (int64_t j = 0; j < ngt; ++j) k[j] = c.k0[bi * ng + g0 + j];
  for (int64_t j = 0; j < w; ++j) e[j] = c.e0[bi * s.d + c0 + j];
  for (int64_t t = 0; t < Lb; ++t) {
    const int64_t rw = t * s.b + bi, off = rw * s.d + c0;
    for (int64_t j = 0; j < w; ++j) f[j] = k[j / G] * std::tanh(e[j]);
    std::copy(k.begin(), k.end(), c.K + rw * ng + g0);
    StepIn<T> in = step_in(s, t, bi, c0);
    if (s.noise) in.xi = draw_tile(s.noise, t, bi, c0, ns, TW);
    const T* hp = t == 0 ? H0v.data() : row(t - 1);
    const T* hd = s.tau > 0 ? row(t - s.tau) : nullptr;
    step_tile(in, s.At + c0, s.d, s.N, w, hp, hd, row(t), yb.data(), static_cast<T*>(nullptr), f.data());
    if (s.hs) store_tile(s.hs + rw * NS, row(t), s.N, s.d, c0, w);
    std::memcpy(y + off, yb.data(), w * sizeof(T));
    const T* ut = s.u + off;
    for (int64_t j = 0; j < ngt; ++j) {  // the error of every channel, the gain law of every group
      T ss = 0;
      for (int64_t i = j * G; i < std::min(w, (j + 1) * G); ++i) {
        const T m = yb[i] + (c.extra ? c.extra[off + i] : T(0));
        const T et = m - (c.w_r ? c.w_r[c0 + i] : T(1)) * ut[i];
        e[i] = et;
        ss += et * et;
      }
      const T rms = std::sqrt(ss + T(1e-12)) / std::sqrt(T(G));
      const T lam = c.lam ? c.lam[g0 + j] : T(0), eta = c.eta ? c.eta[g0 + j] : T(0);
      k[j] = std::min(std::max((T(1) - lam) * k[j] + eta * rms, T(0)), c.k_max);
    }
    std::memcpy(c.E + off, e.data(), w * sizeof(T));
  }
  for (int64_t t = Lb; t < s.L; ++t) std::fill_n(y + (t * s.b + bi) * s.d + c0, w, T(0));
  store_tile(h_last + bi * NS, Lb > 0 ? row(Lb - 1) : H0v.data(), s.N, s.d, c0, w);
  for (int64_t i = 0; i < s.tau; ++i) store_tile(dl_last + (i * s.b + bi) * NS, row(Lb - 1 - i), s.N, s.d, c0, w);
  for (int64_t j = 0; j < ngt; ++j) c.kT[bi * ng + g0 + j] = k[j];
  for (int64_t j = 0; j < w; ++j) c.eT[bi * s.d + c0 + j] = e[j];
}

// The controller of docs/conba.md (6) inside the forward (no gradient): a task holds whole control
// groups (the tile width is a multiple of G), so it runs its row's held signal f = k[g] · tanh(e), and at
// each of its row's sampling instants ((phase0 + t + 1) % P == 0) the error e = y + D u (+ σ_v ζ) − w_r u, its
// group rms and the gain law, with no other task involved.
template <typename T>
struct Ctl {
  const T* k0; const T* e0; const int64_t* phase0;  // (b, ng), (b, d), (b,)
  const T* eta; const T* lam; const T* w_r;          // (ng), (ng), (d); null: 0, 0, 1
  T* k; T* e;              // (b, ng), (b, d) out
  int64_t P, G;
  T k_max;
};

// The prefill: the whole line from the raw per-token inputs, so that no (L, b, d) intermediate is formed
// in PyTorch: Δ = softplus(δ + bias) per step, coef = α (1 − ρ) and r = α ρ from the per-group α and ρ,
// the measured output y + D u (+ σ_v ζ), and the gate silu(z) applied to what is written out.
template <typename T>
struct Raw {
  const T* delta; const T* bias;   // (L, b, d), (d) or null
  const T* alpha; const T* rho;    // (L, b, ng) or null, (ng) or null (no delay)
  const T* D; const T* z;          // (d) or null, (L, b, d) or null
  const T* zeta;                   // (L, b, d) or null: σ_v ζ
  bool softplus;
  int64_t G;                       // channels per group of α and ρ
};

template <typename T>
void prefill_task(const Scan<T>& s, const Raw<T>& q, const Ctl<T>* c, int64_t bi, int64_t c0, int64_t w, T* y,
                  T* h_last, T* dl_last) {
  using V = Vectorized<T>;
  constexpr int64_t VS = V::size();
  constexpr int64_t TW = tile_width<T>();
  const int64_t R = s.N * TW, NS = s.N * s.d, hist = std::max<int64_t>(s.tau, 1);
  const int64_t G = c ? c->G : 1, ng = c ? s.d / G : 0, Ga = q.G, nga = s.d / Ga;
  const int64_t Lb = row_steps(s, bi), g0 = c0 / G, ngt = w / G;
  const int64_t ring = hist + 1;
  std::vector<T> Hv(ring * R), H0v(R), k(c ? ngt : 0), e(c ? w : 0), f(TW, T(0)), dtb(TW, T(0)), cfb(TW, T(1)),
      rb(TW, T(0)), yb(TW, T(0));
  NoiseScratch<T> ns(s.noise ? R : 0);
  T* H = Hv.data();
  init_history(s, bi, c0, w, H, H0v.data());
  auto row = [&](int64_t t) { return H + ((t + hist) % ring + ring) % ring * R; };
  if (c) {
    for (int64_t j = 0; j < ngt; ++j) k[j] = c->k0[bi * ng + g0 + j];
    for (int64_t j = 0; j < w; ++j) e[j] = c->e0[bi * s.d + c0 + j];
  }
  auto held = [&] {
    for (int64_t j = 0; j < w; ++j) f[j] = k[j / G] * std::tanh(e[j]);
  };
  if (c) held();
  const int64_t ph0 = c ? c->phase0[bi] : 0;
  for (int64_t t = 0; t < Lb; ++t) {
    const int64_t rw = t * s.b + bi, off = rw * s.d + c0;
    // per-step, per-channel quantities of the tile
    for (int64_t v = 0; v < w; v += VS) {
      const int64_t cnt = std::min(VS, w - v);
      V x = V::loadu(q.delta + off + v, cnt);
      if (q.bias) x = x + V::loadu(q.bias + c0 + v, cnt);
      if (q.softplus) x = vsoftplus(x);
      x.store(dtb.data() + v, cnt);
    }
    for (int64_t j = 0; j < w; ++j) {
      const int64_t gc = (c0 + j) / Ga;
      const T a = q.alpha ? q.alpha[rw * nga + gc] : T(1);
      if (q.rho) {
        cfb[j] = a * (T(1) - q.rho[gc]);
        rb[j] = a * q.rho[gc];
      } else {
        cfb[j] = a;
      }
    }
    StepIn<T> in = step_in(s, t, bi, c0);
    in.dt = dtb.data();
    in.coef = (q.alpha || q.rho) ? cfb.data() : nullptr;
    in.r = q.rho ? rb.data() : nullptr;
    if (s.noise) in.xi = draw_tile(s.noise, t, bi, c0, ns, TW);
    const T* hp = t == 0 ? H0v.data() : row(t - 1);
    const T* hd = s.tau > 0 ? row(t - s.tau) : nullptr;
    step_tile(in, s.At + c0, s.d, s.N, w, hp, hd, row(t), yb.data(), static_cast<T*>(nullptr), c ? f.data() : nullptr);
    const T* ut = s.u + off;
    for (int64_t j = 0; j < w; ++j) {  // the measured output
      T yv = yb[j];
      if (q.D) yv += q.D[c0 + j] * ut[j];
      if (q.zeta) yv += q.zeta[off + j];
      yb[j] = yv;
    }
    if (c && (ph0 + t + 1) % c->P == 0) {  // a sampling instant of this row
      for (int64_t j = 0; j < ngt; ++j) {
        T ss = 0;
        for (int64_t i = j * G; i < (j + 1) * G; ++i) {
          const T et = yb[i] - (c->w_r ? c->w_r[c0 + i] : T(1)) * ut[i];
          e[i] = et;
          ss += et * et;
        }
        const T rms = std::sqrt(ss + T(1e-12)) / std::sqrt(T(G));
        const T lam = c->lam ? c->lam[g0 + j] : T(0), eta = c->eta ? c->eta[g0 + j] : T(0);
        k[j] = std::min(std::max((T(1) - lam) * k[j] + eta * rms, T(0)), c->k_max);
      }
      held();
    }
    T* yo = y + off;
    if (q.z) {
      for (int64_t v = 0; v < w; v += VS) {
        const int64_t cnt = std::min(VS, w - v);
        const V zv = V::loadu(q.z + off + v, cnt);
        (V::loadu(yb.data() + v, cnt) * vsilu(zv)).store(yo + v, cnt);
      }
    } else {
      std::memcpy(yo, yb.data(), w * sizeof(T));
    }
  }
  for (int64_t t = Lb; t < s.L; ++t) std::fill_n(y + (t * s.b + bi) * s.d + c0, w, T(0));
  store_tile(h_last + bi * NS, Lb > 0 ? row(Lb - 1) : H0v.data(), s.N, s.d, c0, w);
  for (int64_t i = 0; i < s.tau; ++i) store_tile(dl_last + (i * s.b + bi) * NS, row(Lb - 1 - i), s.N, s.d, c0, w);
  if (c) {
    for (int64_t j = 0; j < ngt; ++j) c->k[bi * ng + g0 + j] = k[j];
    for (int64_t j = 0; j < w; ++j) c->e[bi * s.d + c0 + j] = e[j];
  }
}

template <typename T>
struct Grads {
  const T* gy;       // (L, b, d) or null
  const T* gh_last;  // (b, N, d) or null
  const T* gdl_last; // (tau, b, N, d) or null
  T* gdt; T* gu; T* gcoef; T* gr;  // (L, b, d); gcoef, gr null when absent
  T* gAt;            // (b, N, d): per row, summed by the caller
  T* gB; T* gC;      // (L, b, ntiles, N): per tile, summed by the caller
  T* gh0;            // (b, N, d)
  T* gdl0;           // (tau, b, N, d)
  int64_t ntiles;
};

template <typename T>
void scan_bwd_task(const Scan<T>& s, const Grads<T>& g, int64_t bi, int64_t tile, int64_t c0, int64_t w) {
  using V = Vectorized<T>;
  constexpr int64_t VS = V::size();
  constexpr int64_t TW = tile_width<T>();
  const int64_t R = s.N * TW, NS = s.N * s.d, N = s.N, tau = s.tau, hist = std::max<int64_t>(tau, 1);
  const int64_t Lb = row_steps(s, bi);
  const int64_t nseg = (Lb + SEG - 1) / SEG;
  const int64_t rows = std::min(SEG, Lb);  // the longest segment (buffers of a short block stay short)
  std::vector<T> Hv((hist + rows) * R), H0v(R), Ev(rows * R), Lv((hist + rows) * R, T(0)), ckv(s.hs ? 0 : nseg * hist * R);
  std::vector<T> gA(R, T(0)), gh0(R, T(0)), tmp(R), gBv(N * VS), gCv(N * VS);
  NoiseScratch<T> ns(s.noise && !s.hs ? R : 0);
  // the per-step controller's adjoint (P = 1): ge_prev holds what reaches e_{t−1} through f_t, gk_next the
  // adjoint of k_{t+1}
  const Ctl1<T>* c1 = s.c1;
  const int64_t G = c1 ? c1->G : 1, ngt = c1 ? (w + G - 1) / G : 0, ngr = c1 ? s.d / G : 0, g0 = c0 / G;
  std::vector<T> fb(c1 ? TW : 0, T(0)), te(c1 ? TW : 0), ge(c1 ? TW : 0), gyb(c1 ? TW : 0, T(0)),
      ge_prev(c1 ? TW : 0, T(0)), gk_next(ngt, T(0)), gk_carry(ngt, T(0)), gk_t(ngt, T(0));
  T *H = Hv.data(), *H0 = H0v.data(), *E = Ev.data(), *Lam = Lv.data();
  init_history(s, bi, c0, w, H, H0);
  std::vector<T> init;  // kept states: the history before t = 0, as init_history left it
  if (s.hs) init.assign(H, H + hist * R);
  // checkpoints: the history rows at the start of every segment (kept states: none needed)
  for (int64_t sg = 0; sg < (s.hs ? 0 : nseg); ++sg) {
    const int64_t s0 = sg * SEG, len = std::min(SEG, Lb - s0);
    std::memcpy(ckv.data() + sg * hist * R, H, hist * R * sizeof(T));
    if (sg + 1 < nseg) {
      run_segment(s, bi, c0, w, s0, len, H, H0, static_cast<T*>(nullptr), static_cast<T*>(nullptr), &ns);
      std::memmove(H, H + len * R, hist * R * sizeof(T));
    }
  }
  // the final state's gradients enter at t = Lb − 1 (h) and t = Lb − 1 − i (delay line)
  for (int64_t sg = nseg - 1; sg >= 0; --sg) {
    const int64_t s0 = sg * SEG, len = std::min(SEG, Lb - s0);
    if (s.hs) {
      load_segment(s, bi, c0, w, s0, len, H, init.data(), E);
    } else {
      std::memcpy(H, ckv.data() + sg * hist * R, hist * R * sizeof(T));
      run_segment(s, bi, c0, w, s0, len, H, H0, static_cast<T*>(nullptr), E, &ns);
    }
    for (int64_t k = len - 1; k >= 0; --k) {
      const int64_t t = s0 + k, row = t * s.b + bi, off = row * s.d + c0;
      T* lam = Lam + (hist + k) * R;
      if (g.gh_last && t == Lb - 1) {
        load_tile(tmp.data(), g.gh_last + bi * NS, N, s.d, c0, w);
        for (int64_t j = 0; j < R; ++j) lam[j] += tmp[j];
      }
      if (g.gdl_last && Lb - 1 - t < tau) {
        load_tile(tmp.data(), g.gdl_last + ((Lb - 1 - t) * s.b + bi) * NS, N, s.d, c0, w);
        for (int64_t j = 0; j < R; ++j) lam[j] += tmp[j];
      }
      const T* ht = H + (hist + k) * R;
      const T* hp = t == 0 ? H0 : H + (hist + k - 1) * R;
      const T* hd = tau > 0 ? H + (hist + k - tau) * R : nullptr;
      T* pp = t == 0 ? gh0.data() : Lam + (hist + k - 1) * R;  // pending of h_{t−1}
      T* pd = tau > 0 ? Lam + (hist + k - tau) * R : nullptr;   // pending of h_{t−τ}
      const T* Bt = s.B + row * N;
      const T* Ct = s.C + row * N;
      std::fill(gBv.begin(), gBv.end(), T(0));
      std::fill(gCv.begin(), gCv.end(), T(0));
      const T* Kt = c1 ? c1->K + row * ngr + g0 : nullptr;
      if (c1) {  // what reaches the measured output m_t = y_t + extra_t through e_t
        held_p1(s, t, bi, c0, w, fb.data(), te.data());
        const T* Et = c1->E + off;
        if (t == Lb - 1) {
          for (int64_t j = 0; j < ngt; ++j) gk_next[j] = c1->gkT ? c1->gkT[bi * ngr + g0 + j] : T(0);
          for (int64_t j = 0; j < w; ++j) ge_prev[j] = c1->geT ? c1->geT[bi * s.d + c0 + j] : T(0);
        }
        for (int64_t j = 0; j < w; ++j) ge[j] = ge_prev[j];
        for (int64_t j = 0; j < ngt; ++j) {  // k_{t+1} = clamp((1 − λ) k_t + η rms(e_t), 0, k_max)
          T ss = 0;
          for (int64_t i = j * G; i < std::min(w, (j + 1) * G); ++i) ss += Et[i] * Et[i];
          const T root = std::sqrt(ss + T(1e-12)), rms = root / std::sqrt(T(G));
          const T lam = c1->lam ? c1->lam[g0 + j] : T(0), eta = c1->eta ? c1->eta[g0 + j] : T(0);
          const T vk = (T(1) - lam) * Kt[j] + eta * rms;
          const bool act = vk >= T(0) && vk <= c1->k_max;  // torch.clamp's gradient: within the bounds
          const T gk = act ? gk_next[j] : T(0);
          for (int64_t i = j * G; i < std::min(w, (j + 1) * G); ++i) ge[i] += gk * eta * Et[i] / (root * std::sqrt(T(G)));
          if (c1->eta) c1->geta[bi * ngr + g0 + j] += gk * rms;
          if (c1->lam) c1->glam[bi * ngr + g0 + j] -= gk * Kt[j];
          gk_carry[j] = gk * (T(1) - lam);
        }
        const T* ut = s.u + off;
        for (int64_t j = 0; j < w; ++j) {
          if (c1->g_extra) c1->g_extra[off + j] = ge[j];
          if (c1->w_r) c1->gw_r[bi * s.d + c0 + j] -= ge[j] * ut[j];
          gyb[j] = (g.gy ? g.gy[off + j] : T(0)) + ge[j];
        }
      }
      for (int64_t v = 0; v < w; v += VS) {
        const int64_t cnt = std::min(VS, w - v);
        const V dtv = V::loadu(s.dt + off + v, cnt);
        const V uv = c1 ? V::loadu(s.u + off + v, cnt) - V::loadu(fb.data() + v, cnt) : V::loadu(s.u + off + v, cnt);
        const V dtu = dtv * uv;
        const V cf = s.coef ? V::loadu(s.coef + off + v, cnt) : V(T(1));
        const V rv = s.r ? V::loadu(s.r + off + v, cnt) : V(T(0));
        const V gyv = c1 ? V::loadu(gyb.data() + v, cnt) : g.gy ? V::loadu(g.gy + off + v, cnt) : V(T(0));
        V g_dtu(T(0)), g_cf(T(0)), g_dta(T(0)), g_r(T(0));
        for (int64_t n = 0; n < N; ++n) {
          const int64_t o = n * TW + v;
          const V l = V::loadu(lam + o) + V(Ct[n]) * gyv;
          const V e = V::loadu(E + k * R + o);
          const V Av = V::loadu(s.At + n * s.d + c0 + v, cnt);
          (V::loadu(gCv.data() + n * VS) + gyv * V::loadu(ht + o)).store(gCv.data() + n * VS);
          (V::loadu(gBv.data() + n * VS) + l * dtu).store(gBv.data() + n * VS);
          g_dtu = g_dtu + l * V(Bt[n]);
          const V ga = l * V::loadu(hp + o);  // ∂/∂a_t
          g_cf = g_cf + ga * e;
          const V gda = ga * e * cf;  // ∂/∂(Δ_t A)
          g_dta = g_dta + gda * Av;
          (V::loadu(gA.data() + o) + gda * dtv).store(gA.data() + o);
          (V::loadu(pp + o) + e * cf * l).store(pp + o);
          if (tau > 0) {
            g_r = g_r + l * V::loadu(hd + o);
            (V::loadu(pd + o) + rv * l).store(pd + o);
          }
        }
        (g_dta + g_dtu * uv).store(g.gdt + off + v, cnt);
        (g_dtu * dtv).store(g.gu + off + v, cnt);
        if (g.gcoef) g_cf.store(g.gcoef + off + v, cnt);
        if (g.gr) g_r.store(g.gr + off + v, cnt);
      }
      if (c1) {  // f_t = k_t tanh(e_{t−1}) was subtracted from u_t: its adjoint goes to k_t and e_{t−1}
        std::fill(gk_t.begin(), gk_t.end(), T(0));
        T* gu = g.gu + off;
        for (int64_t j = 0; j < w; ++j) {
          const T g_ut = gu[j], gf = -g_ut;
          gu[j] = g_ut - (c1->w_r ? c1->w_r[c0 + j] : T(1)) * ge[j];
          gk_t[j / G] += gf * te[j];
          ge_prev[j] = gf * Kt[j / G] * (T(1) - te[j] * te[j]);
        }
        for (int64_t j = 0; j < ngt; ++j) gk_next[j] = gk_t[j] + gk_carry[j];
      }
      T* gBo = g.gB + (row * g.ntiles + tile) * N;
      T* gCo = g.gC + (row * g.ntiles + tile) * N;
      for (int64_t n = 0; n < N; ++n) {
        T sb = 0, sc = 0;
        for (int64_t j = 0; j < VS; ++j) { sb += gBv[n * VS + j]; sc += gCv[n * VS + j]; }
        gBo[n] = sb;
        gCo[n] = sc;
      }
    }
    // the pending adjoints of h_{s0−hist} … h_{s0−1} become the previous segment's last rows
    if (sg > 0) {
      std::vector<T> front(Lam, Lam + hist * R);
      std::fill(Lv.begin(), Lv.end(), T(0));
      std::memcpy(Lam + SEG * R, front.data(), hist * R * sizeof(T));
    }
  }
  // h0 and the delay line: what reached them through the scan, plus the final state's own gradient
  // where a row had fewer steps than the line is long
  if (g.gh_last && Lb == 0) {
    load_tile(tmp.data(), g.gh_last + bi * NS, N, s.d, c0, w);
    for (int64_t j = 0; j < R; ++j) gh0[j] += tmp[j];
  }
  store_tile(g.gh0 + bi * NS, gh0.data(), N, s.d, c0, w);
  if (tau > 0) {
    for (int64_t i = 0; i < tau; ++i) {  // H row j ↔ h_{−hist+j} = dl0[hist−1−j]; nseg == 0: no scan
      std::vector<T> acc(R, T(0));
      if (nseg > 0) std::memcpy(acc.data(), Lam + (hist - 1 - i) * R, R * sizeof(T));
      if (g.gdl_last && i + Lb < tau) {  // dl_last[i + Lb] = dl0[i]
        load_tile(tmp.data(), g.gdl_last + ((i + Lb) * s.b + bi) * NS, N, s.d, c0, w);
        for (int64_t j = 0; j < R; ++j) acc[j] += tmp[j];
      }
      store_tile(g.gdl0 + (i * s.b + bi) * NS, acc.data(), N, s.d, c0, w);
    }
  }
  store_tile(g.gAt + bi * NS, gA.data(), N, s.d, c0, w);
  if (c1) {  // the initial gain and error: through step 0, or straight from the final state's (no step)
    for (int64_t j = 0; j < ngt; ++j)
      c1->gk0[bi * ngr + g0 + j] = Lb > 0 ? gk_next[j] : (c1->gkT ? c1->gkT[bi * ngr + g0 + j] : T(0));
    for (int64_t j = 0; j < w; ++j)
      c1->ge0[bi * s.d + c0 + j] = Lb > 0 ? ge_prev[j] : (c1->geT ? c1->geT[bi * s.d + c0 + j] : T(0));
  }
}

template <typename T>
const T* opt(const torch::Tensor& x) { return x.numel() ? x.data_ptr<T>() : nullptr; }

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

void check(const std::vector<torch::Tensor>& xs, const torch::Tensor& like) {
  for (const auto& x : xs) {
    TORCH_CHECK(x.numel() == 0 || (x.is_contiguous() && x.scalar_type() == like.scalar_type() && x.device().is_cpu()),
                "conba_cpu: every tensor must be a contiguous CPU tensor of the scan's dtype");
  }
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

std::vector<torch::Tensor> scan_fwd(torch::Tensor dt, torch::Tensor u, torch::Tensor coef, torch::Tensor r,
                                    torch::Tensor At, torch::Tensor B, torch::Tensor C, torch::Tensor keys,
                                    double sigma_w, torch::Tensor h0, torch::Tensor dl0, torch::Tensor steps,
                                    int64_t tau, torch::Tensor y_out, torch::Tensor hs_out) {
  check({dt, u, coef, r, At, B, C, h0, dl0, y_out}, dt);
  TORCH_CHECK(tau >= 0 && tau <= SEG, "conba_cpu: tau out of range");
  TORCH_CHECK(y_out.numel() == 0 || y_out.sizes() == dt.sizes(), "conba_cpu: y_out must have dt's shape");
  auto y = y_out.numel() ? y_out : torch::empty_like(dt);  // written in place when given
  auto h_last = torch::empty_like(h0);
  auto dl_last = torch::empty({tau, dt.size(1), At.size(0), dt.size(2)}, dt.options());
  AT_DISPATCH_FLOATING_TYPES(dt.scalar_type(), "conba_scan_fwd", [&] {
    auto s = make_scan<scalar_t>(dt, u, coef, r, At, B, C, keys, sigma_w, h0, dl0, steps, tau, hs_out);
    for_tasks<scalar_t>(s.b, s.d, [&](int64_t bi, int64_t, int64_t c0, int64_t w) {
      scan_fwd_task(s, bi, c0, w, y.data_ptr<scalar_t>(), h_last.data_ptr<scalar_t>(),
                    tau > 0 ? dl_last.data_ptr<scalar_t>() : nullptr);
    });
  });
  return {y, h_last, dl_last};
}

std::vector<torch::Tensor> prefill(torch::Tensor delta, torch::Tensor bias, bool softplus_, torch::Tensor u,
                                   torch::Tensor alpha, torch::Tensor rho, torch::Tensor At, torch::Tensor B,
                                   torch::Tensor C, torch::Tensor D, torch::Tensor z, torch::Tensor keys,
                                   double sigma_w, torch::Tensor zeta, torch::Tensor h0, torch::Tensor dl0,
                                   torch::Tensor steps,
                                   int64_t tau, int64_t G, bool control, torch::Tensor k0, torch::Tensor e0,
                                   torch::Tensor phase0, int64_t P, torch::Tensor eta, torch::Tensor lam,
                                   torch::Tensor w_r, double k_max) {
  check({delta, bias, u, alpha, rho, At, B, C, D, z, zeta, h0, dl0, k0, e0, eta, lam, w_r}, delta);
  TORCH_CHECK(tau >= 0 && tau <= SEG, "conba_cpu: tau out of range");
  TORCH_CHECK(!control || (phase0.scalar_type() == at::kLong && phase0.is_contiguous()), "conba_cpu: phase0 must be int64");
  auto y = torch::empty_like(delta);
  auto h_last = torch::empty_like(h0);
  auto dl_last = torch::empty({tau, delta.size(1), At.size(0), delta.size(2)}, delta.options());
  auto k = control ? torch::empty_like(k0) : k0;
  auto e = control ? torch::empty_like(e0) : e0;
  AT_DISPATCH_FLOATING_TYPES(delta.scalar_type(), "conba_prefill", [&] {
    TORCH_CHECK(G >= 1 && tile_width<scalar_t>() % G == 0 && delta.size(2) % G == 0,
                "conba_cpu: the group size must divide the tile width and d_inner");
    auto empty = torch::empty({0}, delta.options());
    auto s = make_scan<scalar_t>(delta, u, empty, empty, At, B, C, keys, sigma_w, h0, dl0, steps, tau);
    Raw<scalar_t> q;
    q.delta = delta.data_ptr<scalar_t>(); q.bias = opt<scalar_t>(bias); q.alpha = opt<scalar_t>(alpha);
    q.rho = tau > 0 ? opt<scalar_t>(rho) : nullptr; q.D = opt<scalar_t>(D); q.z = opt<scalar_t>(z);
    q.zeta = opt<scalar_t>(zeta); q.softplus = softplus_; q.G = G;
    Ctl<scalar_t> c;
    if (control) {
      c.k0 = k0.data_ptr<scalar_t>(); c.e0 = e0.data_ptr<scalar_t>();
      c.phase0 = phase0.data_ptr<int64_t>(); c.eta = opt<scalar_t>(eta); c.lam = opt<scalar_t>(lam);
      c.w_r = opt<scalar_t>(w_r); c.k = k.data_ptr<scalar_t>(); c.e = e.data_ptr<scalar_t>();
      c.P = P; c.G = G; c.k_max = static_cast<scalar_t>(k_max);
    }
    for_tasks<scalar_t>(s.b, s.d, [&](int64_t bi, int64_t, int64_t c0, int64_t w) {
      prefill_task(s, q, control ? &c : nullptr, bi, c0, w, y.data_ptr<scalar_t>(), h_last.data_ptr<scalar_t>(),
                   tau > 0 ? dl_last.data_ptr<scalar_t>() : nullptr);
    });
  });
  return {y, h_last, dl_last, k, e};
}

std::vector<torch::Tensor> scan_bwd(torch::Tensor dt, torch::Tensor u, torch::Tensor coef, torch::Tensor r,
                                    torch::Tensor At, torch::Tensor B, torch::Tensor C, torch::Tensor keys,
                                    double sigma_w, torch::Tensor h0, torch::Tensor dl0, torch::Tensor steps,
                                    int64_t tau, torch::Tensor gy, torch::Tensor gh_last, torch::Tensor gdl_last,
                                    torch::Tensor hs) {
  check({dt, u, coef, r, At, B, C, h0, dl0, gy, gh_last, gdl_last}, dt);
  const int64_t L = dt.size(0), b = dt.size(1), d = dt.size(2), N = At.size(0);
  torch::Tensor gdt, gu, gcoef, gr, gAt, gB, gC, gh0, gdl0;
  AT_DISPATCH_FLOATING_TYPES(dt.scalar_type(), "conba_scan_bwd", [&] {
    constexpr int64_t TW = tile_width<scalar_t>();
    const int64_t nt = (d + TW - 1) / TW;
    auto o = dt.options();
    gdt = torch::zeros_like(dt); gu = torch::zeros_like(dt);
    gcoef = coef.numel() ? torch::zeros_like(dt) : torch::empty({0}, o);
    gr = r.numel() ? torch::zeros_like(dt) : torch::empty({0}, o);
    gAt = torch::empty({b, N, d}, o);
    gB = torch::zeros({L, b, nt, N}, o); gC = torch::zeros({L, b, nt, N}, o);
    gh0 = torch::empty_like(h0); gdl0 = torch::empty({tau, b, N, d}, o);
    auto s = make_scan<scalar_t>(dt, u, coef, r, At, B, C, keys, sigma_w, h0, dl0, steps, tau, hs);
    Grads<scalar_t> g;
    g.gy = opt<scalar_t>(gy); g.gh_last = opt<scalar_t>(gh_last); g.gdl_last = opt<scalar_t>(gdl_last);
    g.gdt = gdt.data_ptr<scalar_t>(); g.gu = gu.data_ptr<scalar_t>();
    g.gcoef = coef.numel() ? gcoef.data_ptr<scalar_t>() : nullptr;
    g.gr = r.numel() ? gr.data_ptr<scalar_t>() : nullptr;
    g.gAt = gAt.data_ptr<scalar_t>(); g.gB = gB.data_ptr<scalar_t>(); g.gC = gC.data_ptr<scalar_t>();
    g.gh0 = gh0.data_ptr<scalar_t>(); g.gdl0 = tau > 0 ? gdl0.data_ptr<scalar_t>() : nullptr; g.ntiles = nt;
    for_tasks<scalar_t>(b, d, [&](int64_t bi, int64_t tile, int64_t c0, int64_t w) {
      scan_bwd_task(s, g, bi, tile, c0, w);
    });
  });
  return {gdt, gu, gcoef, gr, gAt.sum(0), gB.sum(2), gC.sum(2), gh0, gdl0};
}

// The block scan with the per-step controller (P = 1) of a training scan (Ctl1): ctl = (extra, w_r, eta, lam, k0,
// e0), each empty where absent (extra, w_r, eta, lam). Returns (y, h_last, dl_last, k_T, e_T, K, E); y without
// extra, as scan_fwd's.
std::vector<torch::Tensor> p1_fwd(torch::Tensor dt, torch::Tensor u, torch::Tensor coef, torch::Tensor r,
                                  torch::Tensor At, torch::Tensor B, torch::Tensor C, torch::Tensor keys,
                                  double sigma_w, torch::Tensor h0, torch::Tensor dl0, torch::Tensor steps,
                                  int64_t tau, torch::Tensor hs_out, std::vector<torch::Tensor> ctl, int64_t G,
                                  double k_max) {
  TORCH_CHECK(ctl.size() == 6, "conba_cpu.p1_fwd: ctl = (extra, w_r, eta, lam, k0, e0)");
  check({dt, u, coef, r, At, B, C, h0, dl0}, dt);
  check(ctl, dt);
  TORCH_CHECK(tau >= 0 && tau <= SEG, "conba_cpu: tau out of range");
  const int64_t L = dt.size(0), b = dt.size(1), d = dt.size(2);
  auto y = torch::empty_like(dt);
  auto h_last = torch::empty_like(h0);
  auto dl_last = torch::empty({tau, b, At.size(0), d}, dt.options());
  auto kT = torch::empty({b, d / G}, dt.options()), eT = torch::empty({b, d}, dt.options());
  auto K = torch::empty({L, b, d / G}, dt.options()), E = torch::empty({L, b, d}, dt.options());
  AT_DISPATCH_FLOATING_TYPES(dt.scalar_type(), "conba_p1_fwd", [&] {
    TORCH_CHECK(G >= 1 && tile_width<scalar_t>() % G == 0 && d % G == 0,
                "conba_cpu: the group size must divide the tile width and d_inner");
    auto s = make_scan<scalar_t>(dt, u, coef, r, At, B, C, keys, sigma_w, h0, dl0, steps, tau, hs_out);
    Ctl1<scalar_t> c;
    c.extra = opt<scalar_t>(ctl[0]); c.w_r = opt<scalar_t>(ctl[1]); c.eta = opt<scalar_t>(ctl[2]);
    c.lam = opt<scalar_t>(ctl[3]); c.k0 = ctl[4].data_ptr<scalar_t>(); c.e0 = ctl[5].data_ptr<scalar_t>();
    c.K = K.data_ptr<scalar_t>(); c.E = E.data_ptr<scalar_t>();
    c.kT = kT.data_ptr<scalar_t>(); c.eT = eT.data_ptr<scalar_t>();
    c.G = G; c.k_max = static_cast<scalar_t>(k_max);
    s.c1 = &c;
    for_tasks<scalar_t>(b, d, [&](int64_t bi, int64_t, int64_t c0, int64_t w) {
      p1_fwd_task(s, bi, c0, w, y.data_ptr<scalar_t>(), h_last.data_ptr<scalar_t>(),
                  tau > 0 ? dl_last.data_ptr<scalar_t>() : nullptr);
    });
  });
  return {y, h_last, dl_last, kT, eT, K, E};
}

// p1_fwd's backward: ctl = (extra, w_r, eta, lam, k0, e0, K, E, gk_T, ge_T) (gk_T, ge_T empty: no gradient).
// Returns scan_bwd's nine and (g_extra, gw_r, geta, glam, gk0, ge0).
std::vector<torch::Tensor> p1_bwd(torch::Tensor dt, torch::Tensor u, torch::Tensor coef, torch::Tensor r,
                                  torch::Tensor At, torch::Tensor B, torch::Tensor C, torch::Tensor keys,
                                  double sigma_w, torch::Tensor h0, torch::Tensor dl0, torch::Tensor steps,
                                  int64_t tau, torch::Tensor gy, torch::Tensor gh_last, torch::Tensor gdl_last,
                                  torch::Tensor hs, std::vector<torch::Tensor> ctl, int64_t G, double k_max) {
  TORCH_CHECK(ctl.size() == 10, "conba_cpu.p1_bwd: ctl = (extra, w_r, eta, lam, k0, e0, K, E, gk_T, ge_T)");
  check({dt, u, coef, r, At, B, C, h0, dl0, gy, gh_last, gdl_last}, dt);
  check(ctl, dt);
  const int64_t L = dt.size(0), b = dt.size(1), d = dt.size(2), N = At.size(0), ng = d / G;
  torch::Tensor gdt, gu, gcoef, gr, gAt, gB, gC, gh0, gdl0;
  auto o = dt.options();
  auto g_extra = ctl[0].numel() ? torch::zeros_like(dt) : torch::empty({0}, o);
  auto gw_r = ctl[1].numel() ? torch::zeros({b, d}, o) : torch::empty({0}, o);
  auto geta = ctl[2].numel() ? torch::zeros({b, ng}, o) : torch::empty({0}, o);
  auto glam = ctl[3].numel() ? torch::zeros({b, ng}, o) : torch::empty({0}, o);
  auto gk0 = torch::empty({b, ng}, o), ge0 = torch::empty({b, d}, o);
  AT_DISPATCH_FLOATING_TYPES(dt.scalar_type(), "conba_p1_bwd", [&] {
    constexpr int64_t TW = tile_width<scalar_t>();
    TORCH_CHECK(G >= 1 && TW % G == 0 && d % G == 0, "conba_cpu: the group size must divide the tile width and d_inner");
    const int64_t nt = (d + TW - 1) / TW;
    gdt = torch::zeros_like(dt); gu = torch::zeros_like(dt);
    gcoef = coef.numel() ? torch::zeros_like(dt) : torch::empty({0}, o);
    gr = r.numel() ? torch::zeros_like(dt) : torch::empty({0}, o);
    gAt = torch::empty({b, N, d}, o);
    gB = torch::zeros({L, b, nt, N}, o); gC = torch::zeros({L, b, nt, N}, o);
    gh0 = torch::empty_like(h0); gdl0 = torch::empty({tau, b, N, d}, o);
    auto s = make_scan<scalar_t>(dt, u, coef, r, At, B, C, keys, sigma_w, h0, dl0, steps, tau, hs);
    Ctl1<scalar_t> c;
    c.extra = opt<scalar_t>(ctl[0]); c.w_r = opt<scalar_t>(ctl[1]); c.eta = opt<scalar_t>(ctl[2]);
    c.lam = opt<scalar_t>(ctl[3]); c.k0 = ctl[4].data_ptr<scalar_t>(); c.e0 = ctl[5].data_ptr<scalar_t>();
    c.K = ctl[6].data_ptr<scalar_t>(); c.E = ctl[7].data_ptr<scalar_t>();
    c.gkT = opt<scalar_t>(ctl[8]); c.geT = opt<scalar_t>(ctl[9]);
    auto out = [](torch::Tensor& x) { return x.numel() ? x.data_ptr<scalar_t>() : nullptr; };
    c.g_extra = out(g_extra); c.gw_r = out(gw_r); c.geta = out(geta); c.glam = out(glam);
    c.gk0 = gk0.data_ptr<scalar_t>(); c.ge0 = ge0.data_ptr<scalar_t>();
    c.G = G; c.k_max = static_cast<scalar_t>(k_max);
    s.c1 = &c;
    Grads<scalar_t> g;
    g.gy = opt<scalar_t>(gy); g.gh_last = opt<scalar_t>(gh_last); g.gdl_last = opt<scalar_t>(gdl_last);
    g.gdt = gdt.data_ptr<scalar_t>(); g.gu = gu.data_ptr<scalar_t>();
    g.gcoef = coef.numel() ? gcoef.data_ptr<scalar_t>() : nullptr;
    g.gr = r.numel() ? gr.data_ptr<scalar_t>() : nullptr;
    g.gAt = gAt.data_ptr<scalar_t>(); g.gB = gB.data_ptr<scalar_t>(); g.gC = gC.data_ptr<scalar_t>();
    g.gh0 = gh0.data_ptr<scalar_t>(); g.gdl0 = tau > 0 ? gdl0.data_ptr<scalar_t>() : nullptr; g.ntiles = nt;
    for_tasks<scalar_t>(b, d, [&](int64_t bi, int64_t tile, int64_t c0, int64_t w) {
      scan_bwd_task(s, g, bi, tile, c0, w);
    });
  });
  auto sum0 = [](const torch::Tensor& x) { return x.numel() ? x.sum(0) : x; };
  return {gdt, gu, gcoef, gr, gAt.sum(0), gB.sum(2), gC.sum(2), gh0, gdl0,
          g_extra, sum0(gw_r), sum0(geta), sum0(glam), gk0, ge0};
}

// ---------------------------------------------------------------------------------------------
// The decode step: docs/conba.md (6) for one token, as naive._one_step, the state updated in place.
// State layout as ConbaState: h (b, d, N), delay (b, τ, d, N), k (b, ng), e (b, d), phase (b,).
template <typename T>
struct Step {
  T* h; T* delay; T* k; T* e; int64_t* phase;
  const T* u; const T* delta; const T* A; const T* B; const T* C;
  const T* D; const T* z; const T* bias; const T* alpha; const T* rho;
  const T* eta; const T* lam; const T* w_r; const int64_t* mask;
  T* y;
  // per (row, channel), filled by run_step before the groups run, vectorised: Δ = softplus(δ + bias),
  // tanh(e) (control) and silu(z) (gate)
  const T* dtv = nullptr; const T* te = nullptr; const T* gz = nullptr;
  int64_t b, d, N, tau, G, P;
  bool softplus, control;
  T k_max;
};

template <typename T>
inline T softplus(T x) { return x > T(20) ? x : std::log1p(std::exp(x)); }

template <typename T>
inline T silu(T x) { return x / (T(1) + std::exp(-x)); }

template <typename T>
void step_group(const Step<T>& s, int64_t bi, int64_t g, T* hn /* G*N scratch */) {
  using V = Vectorized<T>;
  constexpr int64_t VS = V::size();
  const int64_t N = s.N, G = s.G, ng = s.d / G;
  const bool real = s.mask ? s.mask[bi] != 0 : true;
  const T kf = s.control ? s.k[bi * ng + g] : T(0);
  const T al = s.alpha ? s.alpha[bi * ng + g] : T(1);
  const T rh = s.tau > 0 ? s.rho[g] : T(0);
  const T* Bt = s.B + bi * N;
  const T* Ct = s.C + bi * N;
  T yv[64];  // G <= 64 (checked by the caller)
  for (int64_t j = 0; j < G; ++j) {
    const int64_t c = g * G + j, bc = bi * s.d + c;
    const T dt = s.dtv[bc];
    const T u = s.u[bc];
    const T uc = s.control ? u - kf * s.te[bc] : u;
    const T* hp = s.h + bc * N;
    const T* hd = s.tau > 0 ? s.delay + ((bi * s.tau + (s.tau - 1)) * s.d + c) * N : nullptr;
    const T* Ac = s.A + c * N;
    T* ho = hn + j * N;
    V yacc(T(0));
    for (int64_t n = 0; n < N; n += VS) {
      const int64_t cnt = std::min(VS, N - n);
      V h = (V(dt) * V::loadu(Ac + n, cnt)).exp() * V::loadu(hp + n, cnt);
      if (hd) h = V(T(1) - rh) * h + V(rh) * V::loadu(hd + n, cnt);
      if (s.alpha) h = V(al) * h;
      h = h + V(dt * uc) * V::loadu(Bt + n, cnt);
      h.store(ho + n, cnt);
      yacc = yacc + h * V::loadu(Ct + n, cnt);  // lanes past N hold 0 · 0
    }
    T buf[VS];
    yacc.store(buf);
    T y = 0;
    for (int64_t i = 0; i < VS; ++i) y += buf[i];
    if (s.D) y += s.D[c] * u;
    yv[j] = y;
  }
  if (s.control) {
    T ss = 0;
    for (int64_t j = 0; j < G; ++j) {
      const T et = yv[j] - (s.w_r ? s.w_r[g * G + j] : T(1)) * s.u[bi * s.d + g * G + j];
      ss += et * et;
    }
    // the phase is the row's: every group of the row sees the same count, group 0 writes it back
    const bool sample = s.phase[bi] + (real ? 1 : 0) == s.P;  // as the loop: never on a padded step
    if (sample) {
      const T rms = std::sqrt(ss + T(1e-12)) / std::sqrt(T(G));
      const T lam = s.lam ? s.lam[g] : T(0), eta = s.eta ? s.eta[g] : T(0);
      s.k[bi * ng + g] = std::min(std::max((T(1) - lam) * kf + eta * rms, T(0)), s.k_max);
      for (int64_t j = 0; j < G; ++j) {
        const int64_t bc = bi * s.d + g * G + j;
        s.e[bc] = yv[j] - (s.w_r ? s.w_r[g * G + j] : T(1)) * s.u[bc];
      }
    }
  }
  for (int64_t j = 0; j < G; ++j) {
    const int64_t c = g * G + j, bc = bi * s.d + c;
    T y = real ? yv[j] : T(0);
    if (s.z) y *= s.gz[bc];
    s.y[bc] = y;
    if (!real) continue;
    if (s.tau > 0) {  // delay[:, i] ← delay[:, i − 1], delay[:, 0] ← h_new
      for (int64_t i = s.tau - 1; i > 0; --i)
        std::memcpy(s.delay + ((bi * s.tau + i) * s.d + c) * N, s.delay + ((bi * s.tau + i - 1) * s.d + c) * N,
                    N * sizeof(T));
      std::memcpy(s.delay + (bi * s.tau * s.d + c) * N, hn + j * N, N * sizeof(T));
    }
    std::memcpy(s.h + bc * N, hn + j * N, N * sizeof(T));
  }
}

template <typename T>
void run_step(Step<T>& s) {
  const int64_t ng = s.d / s.G, G = s.G, P = s.P;
  const bool control = s.control;
  using V = Vectorized<T>;
  constexpr int64_t VS = V::size();
  std::vector<T> dtv(s.b * s.d), te(control ? s.b * s.d : 0), gz(s.z ? s.b * s.d : 0);
  for (int64_t bi = 0; bi < s.b; ++bi) {
    for (int64_t c = 0; c < s.d; c += VS) {
      const int64_t cnt = std::min(VS, s.d - c), bc = bi * s.d + c;
      V x = V::loadu(s.delta + bc, cnt);
      if (s.bias) x = x + V::loadu(s.bias + c, cnt);
      if (s.softplus) x = vsoftplus(x);
      x.store(dtv.data() + bc, cnt);
      if (control) V::loadu(s.e + bc, cnt).tanh().store(te.data() + bc, cnt);
      if (s.z) vsilu(V::loadu(s.z + bc, cnt)).store(gz.data() + bc, cnt);
    }
  }
  s.dtv = dtv.data();
  s.te = control ? te.data() : nullptr;
  s.gz = s.z ? gz.data() : nullptr;
  // one token is ~b·d·N work (an exp per state): split it over threads in chunks of ≥ 4K states
  const int64_t grain = std::max<int64_t>(1, 4096 / std::max<int64_t>(1, G * s.N));
  at::parallel_for(0, s.b * ng, grain, [&](int64_t begin, int64_t end) {
    std::vector<T> hn(G * s.N);
    for (int64_t i = begin; i < end; ++i) step_group(s, i / ng, i % ng, hn.data());
  });
  if (control) {  // the controller's clock: real steps since the last instant
    for (int64_t bi = 0; bi < s.b; ++bi) {
      const int64_t ph = s.phase[bi] + ((s.mask ? s.mask[bi] != 0 : true) ? 1 : 0);
      s.phase[bi] = ph == P ? 0 : ph;
    }
  }
}

void step(torch::Tensor h, torch::Tensor delay, torch::Tensor k, torch::Tensor e, torch::Tensor phase,
          torch::Tensor u, torch::Tensor delta, torch::Tensor A, torch::Tensor B, torch::Tensor C, torch::Tensor D,
          torch::Tensor z, torch::Tensor bias, bool softplus_, torch::Tensor alpha, torch::Tensor rho, int64_t tau,
          bool control, torch::Tensor eta, torch::Tensor lam, torch::Tensor w_r, double k_max, int64_t G,
          torch::Tensor mask, int64_t P, torch::Tensor y) {
  check({h, delay, k, e, u, delta, A, B, C, D, z, bias, alpha, rho, eta, lam, w_r, y}, h);
  TORCH_CHECK(G >= 1 && G <= 64 && u.size(1) % G == 0, "conba_cpu.step: group size must divide d_inner, <= 64");
  TORCH_CHECK(phase.scalar_type() == at::kLong && phase.is_contiguous(), "conba_cpu.step: phase must be int64");
  TORCH_CHECK(mask.numel() == 0 || (mask.scalar_type() == at::kLong && mask.is_contiguous()),
              "conba_cpu.step: mask must be int64");
  AT_DISPATCH_FLOATING_TYPES(h.scalar_type(), "conba_step", [&] {
    Step<scalar_t> s;
    s.h = h.data_ptr<scalar_t>(); s.delay = tau > 0 ? delay.data_ptr<scalar_t>() : nullptr;
    s.k = k.data_ptr<scalar_t>(); s.e = e.data_ptr<scalar_t>(); s.phase = phase.data_ptr<int64_t>();
    s.u = u.data_ptr<scalar_t>(); s.delta = delta.data_ptr<scalar_t>(); s.A = A.data_ptr<scalar_t>();
    s.B = B.data_ptr<scalar_t>(); s.C = C.data_ptr<scalar_t>();
    s.D = opt<scalar_t>(D); s.z = opt<scalar_t>(z); s.bias = opt<scalar_t>(bias); s.alpha = opt<scalar_t>(alpha);
    s.rho = opt<scalar_t>(rho); s.eta = opt<scalar_t>(eta); s.lam = opt<scalar_t>(lam); s.w_r = opt<scalar_t>(w_r);
    s.mask = mask.numel() ? mask.data_ptr<int64_t>() : nullptr;
    s.y = y.data_ptr<scalar_t>();
    s.b = u.size(0); s.d = u.size(1); s.N = A.size(1); s.tau = tau; s.G = G; s.P = P;
    s.softplus = softplus_; s.control = control; s.k_max = static_cast<scalar_t>(k_max);
    run_step(s);
  });
}

// ---------------------------------------------------------------------------------------------
// A whole Conba layer's decode token between in_proj and out_proj (docs/conba.md, steps 2–6 and the
// gate of 8), as ConbaMixer._step computes it, in one call: the padded token zeroed, the causal conv
// window shifted in place, the selection (x_proj, the SwiGLU correction, the optional RMSNorms of
// Jamba), Δ's projection, the mechanisms' parameter transforms, then the step above. w holds the
// layer's tensors in the order of cpu.LAYER_WEIGHTS (empty where a mechanism is off); the conv weight
// (d, 1, K) or (d, K).
enum W { CONV_W, CONV_B, X_PROJ, SEL_GATE, SEL_VALUE, SEL_OUT, DT_NORM, B_NORM, C_NORM, DT_PROJ, DT_BIAS, A_NEG,
         D_SKIP, ALPHA_BIAS, RHO_RAW, ETA_RAW, LAM_RAW, W_R, N_WEIGHTS };

torch::Tensor rms_norm(const torch::Tensor& x, const torch::Tensor& weight, double eps) {
  if (!weight.numel()) return x;
  const torch::Tensor xf = x.to(at::kFloat);  // as layers/norm.py: computed in float32, scaled in x's dtype
  return weight * (xf * at::rsqrt(xf.pow(2).mean(-1, true) + eps)).to(x.scalar_type());
}

// y[o] (+)= Σ_i W[o, i] x[i]: a decode token's projections (a library GEMV call costs more than its
// arithmetic at these sizes, and streams the weights from memory at about half the speed), four rows at a
// time so that four independent streams are in flight
template <typename T>
inline T hsum(const Vectorized<T>& v) {
  T buf[Vectorized<T>::size()];
  v.store(buf);
  T s = 0;
  for (int64_t l = 0; l < Vectorized<T>::size(); ++l) s += buf[l];
  return s;
}

template <typename T>
void gemv(const T* W, const T* x, T* y, int64_t O, int64_t I, bool accumulate) {
  using V = Vectorized<T>;
  constexpr int64_t VS = V::size();
  const int64_t Iv = I - I % VS;
  int64_t o = 0;
  for (; o + 4 <= O; o += 4) {
    const T *r0 = W + o * I, *r1 = r0 + I, *r2 = r1 + I, *r3 = r2 + I;
    V a0(T(0)), a1(T(0)), a2(T(0)), a3(T(0));
    for (int64_t i = 0; i < Iv; i += VS) {
      const V xv = V::loadu(x + i);
      a0 = at::vec::fmadd(V::loadu(r0 + i), xv, a0);
      a1 = at::vec::fmadd(V::loadu(r1 + i), xv, a1);
      a2 = at::vec::fmadd(V::loadu(r2 + i), xv, a2);
      a3 = at::vec::fmadd(V::loadu(r3 + i), xv, a3);
    }
    T s[4] = {hsum(a0), hsum(a1), hsum(a2), hsum(a3)};
    for (int64_t i = Iv; i < I; ++i) {
      s[0] += r0[i] * x[i]; s[1] += r1[i] * x[i]; s[2] += r2[i] * x[i]; s[3] += r3[i] * x[i];
    }
    for (int64_t j = 0; j < 4; ++j) y[o + j] = accumulate ? y[o + j] + s[j] : s[j];
  }
  for (; o < O; ++o) {
    const T* row = W + o * I;
    V acc(T(0));
    for (int64_t i = 0; i < Iv; i += VS) acc = at::vec::fmadd(V::loadu(row + i), V::loadu(x + i), acc);
    T sum = hsum(acc);
    for (int64_t i = Iv; i < I; ++i) sum += row[i] * x[i];
    y[o] = accumulate ? y[o] + sum : sum;
  }
}

// gemv over torch's threads, in chunks of ≥ 16K multiply-adds (a decode token's weights come from memory,
// so a second thread's bandwidth is worth more than the fork)
template <typename T>
void gemv_par(const T* W, const T* x, T* y, int64_t O, int64_t I, bool accumulate) {
  at::parallel_for(0, O, std::max<int64_t>(1, 16384 / std::max<int64_t>(1, I)), [&](int64_t begin, int64_t end) {
    gemv(W + begin * I, x, y + begin, end - begin, I, accumulate);
  });
}

template <typename T>
inline T sigmoid(T x) { return T(1) / (T(1) + std::exp(-x)); }

template <typename T>
void decode_layer_impl(const torch::Tensor& xz, const int64_t* mk, torch::Tensor& conv_state, Step<T>& s,
                       const std::vector<torch::Tensor>& w, int64_t R, double eps) {
  const int64_t b = s.b, d = s.d, N = s.N, K = w[CONV_W].size(-1), ng = d / s.G, S = w[SEL_GATE].size(0);
  const int64_t n_sel = w[X_PROJ].size(0);
  const bool swiglu = w[SEL_GATE].numel() > 0, norm = w[DT_NORM].numel() > 0;
  const T* xzp = xz.data_ptr<T>();
  const T* cw = w[CONV_W].data_ptr<T>();
  const T* cb = opt<T>(w[CONV_B]);
  T* cs = conv_state.data_ptr<T>();
  std::vector<T> uc(b * d), z(b * d), q(n_sel), hs(2 * S), delta(b * d), B(b * N), C(b * N), alpha, rho, eta, lam;
  for (int64_t bi = 0; bi < b; ++bi) {
    const bool real = mk ? mk[bi] != 0 : true;  // a padded token shifts a zero into the window
    const T* u = xzp + bi * 2 * d;
    T* ur = uc.data() + bi * d;
    std::memcpy(z.data() + bi * d, u + d, d * sizeof(T));
    for (int64_t c = 0; c < d; ++c) {  // causal depthwise conv, window shifted in place, then silu
      T* win = cs + (bi * d + c) * (K - 1);
      const T x = real ? u[c] : T(0);
      T acc = cb ? cb[c] : T(0);
      for (int64_t j = 0; j < K - 1; ++j) acc += win[j] * cw[c * K + j];
      acc += x * cw[c * K + K - 1];
      for (int64_t j = 0; j + 1 < K - 1; ++j) win[j] = win[j + 1];
      if (K > 1) win[K - 2] = x;
      ur[c] = silu(acc);
    }
    // selection: q = x_proj·u (+ sel_out·(silu(sel_gate·u) ⊙ sel_value·u))
    gemv_par(w[X_PROJ].data_ptr<T>(), ur, q.data(), n_sel, d, false);
    if (swiglu) {
      gemv_par(w[SEL_GATE].data_ptr<T>(), ur, hs.data(), S, d, false);
      gemv_par(w[SEL_VALUE].data_ptr<T>(), ur, hs.data() + S, S, d, false);
      for (int64_t i = 0; i < S; ++i) hs[i] = silu(hs[i]) * hs[S + i];
      gemv_par(w[SEL_OUT].data_ptr<T>(), hs.data(), q.data(), n_sel, S, true);
    }
    if (norm) {  // Jamba's RMSNorms on δ, B, C: through ATen, exactly as layers/norm.py (float32 inside)
      auto qt = torch::from_blob(q.data(), {n_sel}, xz.options());
      qt.narrow(0, 0, R).copy_(rms_norm(qt.narrow(0, 0, R), w[DT_NORM], eps));
      qt.narrow(0, R, N).copy_(rms_norm(qt.narrow(0, R, N), w[B_NORM], eps));
      qt.narrow(0, R + N, N).copy_(rms_norm(qt.narrow(0, R + N, N), w[C_NORM], eps));
    }
    gemv_par(w[DT_PROJ].data_ptr<T>(), q.data(), delta.data() + bi * d, d, R, false);
    std::memcpy(B.data() + bi * N, q.data() + R, N * sizeof(T));
    std::memcpy(C.data() + bi * N, q.data() + R + N, N * sizeof(T));
    if (w[ALPHA_BIAS].numel()) {
      if (alpha.empty()) alpha.resize(b * ng);
      const T* ab = w[ALPHA_BIAS].data_ptr<T>();
      for (int64_t g = 0; g < ng; ++g) alpha[bi * ng + g] = sigmoid(q[R + 2 * N + g] + ab[g]);
    }
  }
  if (s.tau > 0) {
    rho.resize(ng);
    for (int64_t g = 0; g < ng; ++g) rho[g] = sigmoid(w[RHO_RAW].data_ptr<T>()[g]);
  }
  if (s.control) {
    eta.resize(ng), lam.resize(ng);
    for (int64_t g = 0; g < ng; ++g) {
      eta[g] = softplus(w[ETA_RAW].data_ptr<T>()[g]);
      lam[g] = sigmoid(w[LAM_RAW].data_ptr<T>()[g]);
    }
  }
  s.u = uc.data(); s.z = z.data(); s.delta = delta.data(); s.B = B.data(); s.C = C.data();
  s.A = w[A_NEG].data_ptr<T>(); s.D = opt<T>(w[D_SKIP]); s.bias = opt<T>(w[DT_BIAS]);
  s.alpha = alpha.empty() ? nullptr : alpha.data();
  s.rho = rho.empty() ? nullptr : rho.data();
  s.eta = eta.empty() ? nullptr : eta.data();
  s.lam = lam.empty() ? nullptr : lam.data();
  s.w_r = s.control ? opt<T>(w[W_R]) : nullptr;
  s.softplus = true;
  run_step(s);
}

// The causal depthwise conv of a prefill, time-major: y[b, t, c] = act(bias[c] + Σ_j w[c, j] · xp[b, t + j, c])
// with xp = (state, x) along time (state (b, ch, K − 1) the inputs before x); returns y (b, T, ch) and the
// final state (b, ch, K − 1). ATen's route transposes, concatenates and convolves channel-major, three
// passes over (b, ch, T) and a strided copy; this is one pass, vectorised over channels.
std::vector<torch::Tensor> conv_prefill(torch::Tensor x, torch::Tensor w, torch::Tensor bias, torch::Tensor state,
                                        bool silu_) {
  TORCH_CHECK(x.dim() == 3 && w.dim() == 2 && w.size(0) == x.size(2), "conba_cpu.conv_prefill: x (b, T, ch), w (ch, K)");
  const int64_t b = x.size(0), T = x.size(1), ch = x.size(2), K = w.size(1);
  TORCH_CHECK(state.numel() == 0 || (state.size(0) == b && state.size(1) == ch && state.size(2) == K - 1),
              "conba_cpu.conv_prefill: state (b, ch, K - 1)");
  check({x, w, bias, state}, x);
  torch::Tensor y = torch::empty({b, T, ch}, x.options());
  torch::Tensor fin = torch::empty({b, ch, K - 1}, x.options());
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "conv_prefill", [&] {
    using T_ = scalar_t;
    using V = Vectorized<T_>;
    constexpr int64_t VS = V::size();
    const T_ *xp = x.data_ptr<T_>(), *wp = w.data_ptr<T_>(), *bp = opt<T_>(bias), *sp = opt<T_>(state);
    T_ *yp = y.data_ptr<T_>(), *fp = fin.data_ptr<T_>();
    std::vector<T_> wt(K * ch);  // (K, ch): tap j of every channel contiguous
    for (int64_t c = 0; c < ch; ++c)
      for (int64_t j = 0; j < K; ++j) wt[j * ch + c] = wp[c * K + j];
    // the input at padded time p of row bi, channel c (p < K − 1: the state)
    auto at_ = [&](int64_t bi, int64_t p, int64_t c) -> T_ {
      if (p >= K - 1) return xp[(bi * T + p - (K - 1)) * ch + c];
      return sp ? sp[(bi * ch + c) * (K - 1) + p] : T_(0);
    };
    at::parallel_for(0, b * T, std::max<int64_t>(1, 32768 / std::max<int64_t>(1, ch * K)), [&](int64_t begin, int64_t end) {
      for (int64_t i = begin; i < end; ++i) {
        const int64_t bi = i / T, t = i % T;
        T_* yo = yp + i * ch;
        if (t >= K - 1) {  // every tap inside x: vectorised over channels
          const T_* x0 = xp + (bi * T + t - (K - 1)) * ch;
          for (int64_t c = 0; c < ch; c += VS) {
            const int64_t cnt = std::min(VS, ch - c);
            V acc = bp ? V::loadu(bp + c, cnt) : V(T_(0));
            for (int64_t j = 0; j < K; ++j)
              acc = at::vec::fmadd(V::loadu(wt.data() + j * ch + c, cnt), V::loadu(x0 + j * ch + c, cnt), acc);
            if (silu_) acc = vsilu(acc);
            acc.store(yo + c, cnt);
          }
        } else {
          for (int64_t c = 0; c < ch; ++c) {
            T_ acc = bp ? bp[c] : T_(0);
            for (int64_t j = 0; j < K; ++j) acc += wp[c * K + j] * at_(bi, t + j, c);
            yo[c] = silu_ ? acc / (T_(1) + std::exp(-acc)) : acc;
          }
        }
      }
    });
    for (int64_t bi = 0; bi < b; ++bi)
      for (int64_t c = 0; c < ch; ++c)
        for (int64_t k = 0; k < K - 1; ++k) fp[(bi * ch + c) * (K - 1) + k] = at_(bi, T + k, c);
  });
  return {y, fin};
}

// F.linear for a few rows (a decode token): x (M, I), W (O, I), bias (O) or empty → (M, O), the output
// rows split over torch's threads
torch::Tensor linear_rows(torch::Tensor x, torch::Tensor W, torch::Tensor bias) {
  TORCH_CHECK(x.dim() == 2 && W.dim() == 2 && x.size(1) == W.size(1), "conba_cpu.linear_rows: x (M, I), W (O, I)");
  TORCH_CHECK(bias.numel() == 0 || bias.numel() == W.size(0), "conba_cpu.linear_rows: bias (O,)");
  check({x, W, bias}, x);
  const int64_t M = x.size(0), O = W.size(0), I = W.size(1);
  torch::Tensor y = torch::empty({M, O}, x.options());
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "linear_rows", [&] {
    using T = scalar_t;
    const T *xp = x.data_ptr<T>(), *wp = W.data_ptr<T>(), *bp = opt<T>(bias);
    T* yp = y.data_ptr<T>();
    at::parallel_for(0, O, std::max<int64_t>(4, 16384 / std::max<int64_t>(1, I)), [&](int64_t begin, int64_t end) {
      for (int64_t m = 0; m < M; ++m) {
        gemv(wp + begin * I, xp + m * I, yp + m * O + begin, end - begin, I, false);
        if (bp)
          for (int64_t o = begin; o < end; ++o) yp[m * O + o] += bp[o];
      }
    });
  });
  return y;
}

torch::Tensor decode_layer(torch::Tensor xz, torch::Tensor mask, torch::Tensor conv_state, torch::Tensor h,
                           torch::Tensor delay, torch::Tensor k, torch::Tensor e, torch::Tensor phase,
                           std::vector<torch::Tensor> w, int64_t R, int64_t tau, int64_t G, int64_t P, bool control,
                           double k_max, double eps) {
  TORCH_CHECK(w.size() == N_WEIGHTS, "conba_cpu.decode_layer: expected ", int64_t(N_WEIGHTS), " weights");
  TORCH_CHECK(xz.dim() == 2 && xz.size(1) % 2 == 0, "conba_cpu.decode_layer: xz must be (batch, 2 d_inner)");
  const int64_t b = xz.size(0), d = xz.size(1) / 2, K = w[CONV_W].size(-1), N = w[A_NEG].size(1);
  TORCH_CHECK(G >= 1 && G <= 64 && d % G == 0, "conba_cpu.decode_layer: group size must divide d_inner, <= 64");
  TORCH_CHECK(conv_state.size(0) == b && conv_state.size(1) == d && conv_state.size(2) == K - 1,
              "conba_cpu.decode_layer: the conv state must be (batch, d_inner, d_conv - 1)");
  TORCH_CHECK(w[X_PROJ].size(1) == d && w[DT_PROJ].size(0) == d && w[DT_PROJ].size(1) == R &&
              w[X_PROJ].size(0) >= R + 2 * N + (w[ALPHA_BIAS].numel() ? d / G : 0),
              "conba_cpu.decode_layer: x_proj / dt_proj do not match d_inner, dt_rank and d_state");
  TORCH_CHECK(mask.numel() == 0 || (mask.scalar_type() == at::kLong && mask.is_contiguous()),
              "conba_cpu.decode_layer: mask must be int64");
  check({h, delay, k, e, conv_state, xz}, h);
  check(w, h);
  torch::Tensor y = torch::empty({b, d}, xz.options());
  AT_DISPATCH_FLOATING_TYPES(h.scalar_type(), "conba_decode_layer", [&] {
    Step<scalar_t> s;
    s.h = h.data_ptr<scalar_t>(); s.delay = tau > 0 ? delay.data_ptr<scalar_t>() : nullptr;
    s.k = k.data_ptr<scalar_t>(); s.e = e.data_ptr<scalar_t>(); s.phase = phase.data_ptr<int64_t>();
    s.mask = mask.numel() ? mask.data_ptr<int64_t>() : nullptr;
    s.y = y.data_ptr<scalar_t>();
    s.b = b; s.d = d; s.N = N; s.tau = tau; s.G = G; s.P = P;
    s.control = control; s.k_max = static_cast<scalar_t>(k_max);
    decode_layer_impl<scalar_t>(xz, s.mask, conv_state, s, w, R, eps);
  });
  return y;
}

}  // namespace

// The noise of lane c·(N + 1) + n for every (t, b, c) of a scan: keys (L, b) as in Noise, → (L, b, d) float32
// normals (n = N: the observation noise ζ; n < N: ξ of state index n), split over torch's threads.
torch::Tensor noise(torch::Tensor keys, int64_t d, int64_t N, int64_t n) {
  TORCH_CHECK(keys.scalar_type() == at::kLong && keys.is_contiguous() && keys.dim() == 2,
              "conba_cpu.noise: keys must be a contiguous int64 (L, b) tensor");
  TORCH_CHECK(n >= 0 && n <= N && d >= 0, "conba_cpu.noise: the state index n must be in [0, N]");
  const int64_t rows = keys.numel();
  torch::Tensor out = torch::empty({keys.size(0), keys.size(1), d}, keys.options().dtype(at::kFloat));
  const int64_t* kp = keys.data_ptr<int64_t>();
  float* op = out.data_ptr<float>();
  at::parallel_for(0, rows, std::max<int64_t>(1, 16384 / std::max<int64_t>(1, d)), [&](int64_t begin, int64_t end) {
    std::vector<float> u1(d), u2(d);
    for (int64_t i = begin; i < end; ++i) {
      const uint32_t key = static_cast<uint32_t>(kp[i]);
      const uint32_t stride = static_cast<uint32_t>(N + 1), lane0 = static_cast<uint32_t>(n);
      for (int64_t c = 0; c < d; ++c) uniforms(key, lane0 + static_cast<uint32_t>(c) * stride, u1[c], u2[c]);
      box_muller(u1.data(), u2.data(), d, 1.0f, op + i * d);
    }
  });
  return out;
}

// sqrt(−2 log u1) and cos u2 over float32 tensors, as the kernels compute them (a test compares them with
// torch's over every input the hash can give)
std::vector<torch::Tensor> noise_transforms(torch::Tensor u1, torch::Tensor u2) {
  TORCH_CHECK(u1.scalar_type() == at::kFloat && u2.scalar_type() == at::kFloat && u1.is_contiguous() &&
              u2.is_contiguous() && u1.numel() == u2.numel(), "conba_cpu.noise_transforms: two float32 tensors");
  torch::Tensor r = u1.clone(), c = u2.clone();
  float *rp = r.data_ptr<float>(), *cp = c.data_ptr<float>();
  radius_cos(rp, cp, r.numel());
  return {r, c};
}

bool noise_uses_mkl() { return vml().ln != nullptr; }

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("noise", &noise, "Conba's counter-based training noise of one state index for a scan's keys (CPU)");
  m.def("noise_transforms", &noise_transforms, "the noise's sqrt(-2 log u1) and cos u2, as the kernels compute them");
  m.def("noise_uses_mkl", &noise_uses_mkl, "whether the noise's log and cos are MKL's (as torch's) or ATen's");
  m.def("scan_fwd", &scan_fwd, "Conba block scan, forward (CPU)");
  m.def("scan_bwd", &scan_bwd, "Conba block scan, backward (CPU)");
  m.def("p1_fwd", &p1_fwd, "Conba scan with the per-step controller (P = 1), training forward (CPU)");
  m.def("p1_bwd", &p1_bwd, "Conba scan with the per-step controller (P = 1), backward (CPU)");
  m.def("prefill", &prefill, "Conba prefill from the raw inputs, controller and gate included (CPU)");
  m.def("step", &step, "Conba decode step, state updated in place (CPU)");
  m.def("conv_prefill", &conv_prefill, "causal depthwise conv of a prefill, time-major, with its final state (CPU)");
  m.def("linear_rows", &linear_rows, "F.linear for a few rows, split over threads by output (CPU)");
  m.def("decode_layer", &decode_layer, "a Conba layer's decode token from in_proj's output to the gated y (CPU)");
}
