// A whole Conba layer's decode token between in_proj and out_proj (docs/conba.md, steps 2–6 and the
// gate of 8), as ConbaMixer._step computes it, in one call: the padded token zeroed, the causal conv
// window shifted in place, the selection (x_proj, the SwiGLU correction, the optional RMSNorms of
// Jamba), Δ's projection, the mechanisms' parameter transforms, then the decode step (step.cpp).
#include "common.h"

namespace mixcon_cpu {

namespace {

// The layer's tensors decode_layer takes, in the order it reads them: (enum value, name). The names are
// the layer's own (mixcon/layers/conba.py; "A" is −exp(A_log)), exported by `decode_weights` and checked
// once at load against mixcon/ops/conba/cpu.py's DECODE_WEIGHTS, which the layer looks them up by. A tensor
// is empty where its mechanism is off (conv1d.bias: none); the conv weight is (d, 1, K) or (d, K).
#define MIXCON_DECODE_WEIGHTS(X)                                                                              \
  X(CONV_W, "conv1d.weight") X(CONV_B, "conv1d.bias") X(X_PROJ, "x_proj.weight")                             \
  X(SEL_GATE, "sel_gate.weight") X(SEL_VALUE, "sel_value.weight") X(SEL_OUT, "sel_out.weight")               \
  X(DT_NORM, "dt_layernorm.weight") X(B_NORM, "b_layernorm.weight") X(C_NORM, "c_layernorm.weight")          \
  X(DT_PROJ, "dt_proj.weight") X(DT_BIAS, "dt_proj.bias") X(A_NEG, "A") X(D_SKIP, "D")                       \
  X(ALPHA_BIAS, "alpha_bias") X(RHO_RAW, "rho_raw") X(ETA_RAW, "eta_raw") X(LAM_RAW, "lam_raw") X(W_R, "w_r")

#define MIXCON_ENUM(e, name) e,
enum W { MIXCON_DECODE_WEIGHTS(MIXCON_ENUM) N_WEIGHTS };
#undef MIXCON_ENUM

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

}  // namespace

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

std::vector<std::string> decode_weights() {
#define MIXCON_NAME(e, name) name,
  return {MIXCON_DECODE_WEIGHTS(MIXCON_NAME)};
#undef MIXCON_NAME
}

}  // namespace mixcon_cpu
