// The block scan's forward (scan.h): the plain scan (training and the blocks of a prefill), the training
// forward with the per-step controller (P = 1) inside, and the prefill of a whole line from the raw inputs.
#include "scan.h"

namespace mixcon_cpu {

namespace {

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

}  // namespace

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
    Ctl1<scalar_t> c = ctl1_inputs<scalar_t>(ctl, G, k_max);
    c.K = K.data_ptr<scalar_t>(); c.E = E.data_ptr<scalar_t>();
    c.kT = kT.data_ptr<scalar_t>(); c.eT = eT.data_ptr<scalar_t>();
    s.c1 = &c;
    for_tasks<scalar_t>(b, d, [&](int64_t bi, int64_t, int64_t c0, int64_t w) {
      p1_fwd_task(s, bi, c0, w, y.data_ptr<scalar_t>(), h_last.data_ptr<scalar_t>(),
                  tau > 0 ? dl_last.data_ptr<scalar_t>() : nullptr);
    });
  });
  return {y, h_last, dl_last, kT, eT, K, E};
}

}  // namespace mixcon_cpu
