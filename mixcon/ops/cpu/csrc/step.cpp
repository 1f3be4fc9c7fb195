// The decode step: docs/conba.md (6) for one token, as naive._one_step, the state (common.h, Step) updated
// in place: every (row, control group) a task, Δ, tanh(e) and the gate computed vectorised beforehand.
#include "common.h"

namespace mixcon_cpu {

namespace {

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

}  // namespace

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

template void run_step<float>(Step<float>&);
template void run_step<double>(Step<double>&);

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

}  // namespace mixcon_cpu
