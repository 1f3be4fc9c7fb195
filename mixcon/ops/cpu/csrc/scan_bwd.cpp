// The block scan's backward (scan.h): the reverse-time adjoint of a task's tile, the states recomputed from
// checkpoints every SEG steps (or read where the forward kept them), with the per-step controller's adjoint
// inside the plant's for the P = 1 training scan.
#include "scan.h"

namespace mixcon_cpu {

namespace {

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

// The plant's gradients of a backward (scan_bwd, p1_bwd): allocated for a scan of dt's shape with N states
// and delay tau, B's and C's per tile (summed in `results`), and the kernels' view of them (`view`).
struct PlantGrads {
  torch::Tensor gdt, gu, gcoef, gr, gAt, gB, gC, gh0, gdl0;
  int64_t ntiles;

  PlantGrads(const torch::Tensor& dt, const torch::Tensor& coef, const torch::Tensor& r, const torch::Tensor& h0,
             int64_t N, int64_t tau, int64_t tw) {
    const int64_t L = dt.size(0), b = dt.size(1), d = dt.size(2);
    auto o = dt.options();
    ntiles = (d + tw - 1) / tw;
    gdt = torch::zeros_like(dt); gu = torch::zeros_like(dt);
    gcoef = coef.numel() ? torch::zeros_like(dt) : torch::empty({0}, o);
    gr = r.numel() ? torch::zeros_like(dt) : torch::empty({0}, o);
    gAt = torch::empty({b, N, d}, o);
    gB = torch::zeros({L, b, ntiles, N}, o); gC = torch::zeros({L, b, ntiles, N}, o);
    gh0 = torch::empty_like(h0); gdl0 = torch::empty({tau, b, N, d}, o);
  }

  // what flows in (gy, gh_last, gdl_last: empty where none) and these outputs, as scan_bwd_task takes them
  template <typename T>
  Grads<T> view(const torch::Tensor& gy, const torch::Tensor& gh_last, const torch::Tensor& gdl_last, int64_t tau) {
    Grads<T> g;
    g.gy = opt<T>(gy); g.gh_last = opt<T>(gh_last); g.gdl_last = opt<T>(gdl_last);
    g.gdt = gdt.data_ptr<T>(); g.gu = gu.data_ptr<T>(); g.gcoef = opt_out<T>(gcoef); g.gr = opt_out<T>(gr);
    g.gAt = gAt.data_ptr<T>(); g.gB = gB.data_ptr<T>(); g.gC = gC.data_ptr<T>();
    g.gh0 = gh0.data_ptr<T>(); g.gdl0 = tau > 0 ? gdl0.data_ptr<T>() : nullptr; g.ntiles = ntiles;
    return g;
  }

  // (gdt, gu, gcoef, gr, gAt, gB, gC, gh0, gdl0), A's summed over rows, B's and C's over tiles
  std::vector<torch::Tensor> results() const {
    return {gdt, gu, gcoef, gr, gAt.sum(0), gB.sum(2), gC.sum(2), gh0, gdl0};
  }
};

}  // namespace

std::vector<torch::Tensor> scan_bwd(torch::Tensor dt, torch::Tensor u, torch::Tensor coef, torch::Tensor r,
                                    torch::Tensor At, torch::Tensor B, torch::Tensor C, torch::Tensor keys,
                                    double sigma_w, torch::Tensor h0, torch::Tensor dl0, torch::Tensor steps,
                                    int64_t tau, torch::Tensor gy, torch::Tensor gh_last, torch::Tensor gdl_last,
                                    torch::Tensor hs) {
  check({dt, u, coef, r, At, B, C, h0, dl0, gy, gh_last, gdl_last}, dt);
  const int64_t b = dt.size(1), d = dt.size(2), N = At.size(0);
  std::vector<torch::Tensor> out;
  AT_DISPATCH_FLOATING_TYPES(dt.scalar_type(), "conba_scan_bwd", [&] {
    PlantGrads pg(dt, coef, r, h0, N, tau, tile_width<scalar_t>());
    auto s = make_scan<scalar_t>(dt, u, coef, r, At, B, C, keys, sigma_w, h0, dl0, steps, tau, hs);
    const Grads<scalar_t> g = pg.view<scalar_t>(gy, gh_last, gdl_last, tau);
    for_tasks<scalar_t>(b, d, [&](int64_t bi, int64_t tile, int64_t c0, int64_t w) {
      scan_bwd_task(s, g, bi, tile, c0, w);
    });
    out = pg.results();
  });
  return out;
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
  const int64_t b = dt.size(1), d = dt.size(2), N = At.size(0), ng = d / G;
  std::vector<torch::Tensor> out;
  auto o = dt.options();
  auto g_extra = ctl[0].numel() ? torch::zeros_like(dt) : torch::empty({0}, o);
  auto gw_r = ctl[1].numel() ? torch::zeros({b, d}, o) : torch::empty({0}, o);
  auto geta = ctl[2].numel() ? torch::zeros({b, ng}, o) : torch::empty({0}, o);
  auto glam = ctl[3].numel() ? torch::zeros({b, ng}, o) : torch::empty({0}, o);
  auto gk0 = torch::empty({b, ng}, o), ge0 = torch::empty({b, d}, o);
  AT_DISPATCH_FLOATING_TYPES(dt.scalar_type(), "conba_p1_bwd", [&] {
    constexpr int64_t TW = tile_width<scalar_t>();
    TORCH_CHECK(G >= 1 && TW % G == 0 && d % G == 0, "conba_cpu: the group size must divide the tile width and d_inner");
    PlantGrads pg(dt, coef, r, h0, N, tau, TW);
    auto s = make_scan<scalar_t>(dt, u, coef, r, At, B, C, keys, sigma_w, h0, dl0, steps, tau, hs);
    Ctl1<scalar_t> c = ctl1_inputs<scalar_t>(ctl, G, k_max);
    c.K = ctl[6].data_ptr<scalar_t>(); c.E = ctl[7].data_ptr<scalar_t>();
    c.gkT = opt<scalar_t>(ctl[8]); c.geT = opt<scalar_t>(ctl[9]);
    c.g_extra = opt_out<scalar_t>(g_extra); c.gw_r = opt_out<scalar_t>(gw_r); c.geta = opt_out<scalar_t>(geta);
    c.glam = opt_out<scalar_t>(glam);
    c.gk0 = gk0.data_ptr<scalar_t>(); c.ge0 = ge0.data_ptr<scalar_t>();
    s.c1 = &c;
    const Grads<scalar_t> g = pg.view<scalar_t>(gy, gh_last, gdl_last, tau);
    for_tasks<scalar_t>(b, d, [&](int64_t bi, int64_t tile, int64_t c0, int64_t w) {
      scan_bwd_task(s, g, bi, tile, c0, w);
    });
    out = pg.results();
  });
  auto sum0 = [](const torch::Tensor& x) { return x.numel() ? x.sum(0) : x; };
  out.insert(out.end(), {g_extra, sum0(gw_r), sum0(geta), sum0(glam), gk0, ge0});
  return out;
}

}  // namespace mixcon_cpu
