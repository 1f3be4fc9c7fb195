// What the compiled CPU kernels share: the includes, small inline helpers (optional pointers, the tensor
// check, softplus/silu/sigmoid, scalar and vectorised), the decode step's state (Step, used by step.cpp and
// layer_decode.cpp) and the declarations of every entry point, defined by job:
//
//   noise.h, noise.cpp        the counter-based training noise of noise.py, bit for bit
//   scan.h                    the block scan's tiles, step and segments (shared by its forward and backward)
//   scan_fwd.cpp              the block scan forward, the training forward with the per-step controller, the prefill
//   scan_bwd.cpp              their backward (the adjoint, states recomputed from checkpoints or kept)
//   step.cpp                  the decode step
//   layer_decode.cpp          a whole Conba layer's decode token (the named-weight contract with the layer)
//   dense.cpp                 general kernels: gemv, the few-row linear, the prefill conv, rms_norm
//   bindings.cpp              the Python module
//
// Built at run time by mixcon/ops/cpu/__init__.py (torch.utils.cpp_extension); docs/kernels.md, "Compiled
// on CPU", says what runs here and what was measured.
#pragma once

#include <torch/types.h>  // not torch/extension.h (the C++ frontend and pybind11): only bindings.cpp needs them
#include <ATen/Parallel.h>
#include <ATen/cpu/vec/vec.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <string>
#include <vector>

namespace mixcon_cpu {

using at::vec::Vectorized;

// Helpers local to each file (internal linkage, inlined as the compiler sees fit there)
namespace {

template <typename T>
const T* opt(const torch::Tensor& x) { return x.numel() ? x.data_ptr<T>() : nullptr; }

// an output that may be absent (empty: null)
template <typename T>
T* opt_out(const torch::Tensor& x) { return x.numel() ? x.data_ptr<T>() : nullptr; }

inline void check(const std::vector<torch::Tensor>& xs, const torch::Tensor& like) {
  for (const auto& x : xs) {
    TORCH_CHECK(x.numel() == 0 || (x.is_contiguous() && x.scalar_type() == like.scalar_type() && x.device().is_cpu()),
                "conba_cpu: every tensor must be a contiguous CPU tensor of the scan's dtype");
  }
}

// softplus (linear above 20, as torch's) and silu over a vector
template <typename T>
inline Vectorized<T> vsoftplus(const Vectorized<T>& x) {
  return Vectorized<T>::blendv(x.exp().log1p(), x, x > Vectorized<T>(T(20)));
}

template <typename T>
inline Vectorized<T> vsilu(const Vectorized<T>& x) { return x / (Vectorized<T>(T(1)) + x.neg().exp()); }

template <typename T>
inline T softplus(T x) { return x > T(20) ? x : std::log1p(std::exp(x)); }

template <typename T>
inline T silu(T x) { return x / (T(1) + std::exp(-x)); }

template <typename T>
inline T sigmoid(T x) { return T(1) / (T(1) + std::exp(-x)); }

}  // namespace

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

// ---------------------------------------------------------------------------------------------
// Shared between the files (defined for float and double where a template)

// step.cpp: the decode step over the whole batch, the state updated in place
template <typename T>
void run_step(Step<T>& s);

// dense.cpp: y[o] (+)= Σ_i W[o, i] x[i] over torch's threads; rms_norm as layers/norm.py
template <typename T>
void gemv_par(const T* W, const T* x, T* y, int64_t O, int64_t I, bool accumulate);
torch::Tensor rms_norm(const torch::Tensor& x, const torch::Tensor& weight, double eps);

// ---------------------------------------------------------------------------------------------
// The entry points (bindings.cpp); each file's comments say what they compute

// noise.cpp
torch::Tensor noise(torch::Tensor keys, int64_t d, int64_t N, int64_t n);
std::vector<torch::Tensor> noise_transforms(torch::Tensor u1, torch::Tensor u2);
bool noise_uses_mkl();

// scan_fwd.cpp
std::vector<torch::Tensor> scan_fwd(torch::Tensor dt, torch::Tensor u, torch::Tensor coef, torch::Tensor r,
                                    torch::Tensor At, torch::Tensor B, torch::Tensor C, torch::Tensor keys,
                                    double sigma_w, torch::Tensor h0, torch::Tensor dl0, torch::Tensor steps,
                                    int64_t tau, torch::Tensor y_out, torch::Tensor hs_out);
std::vector<torch::Tensor> prefill(torch::Tensor delta, torch::Tensor bias, bool softplus_, torch::Tensor u,
                                   torch::Tensor alpha, torch::Tensor rho, torch::Tensor At, torch::Tensor B,
                                   torch::Tensor C, torch::Tensor D, torch::Tensor z, torch::Tensor keys,
                                   double sigma_w, torch::Tensor zeta, torch::Tensor h0, torch::Tensor dl0,
                                   torch::Tensor steps,
                                   int64_t tau, int64_t G, bool control, torch::Tensor k0, torch::Tensor e0,
                                   torch::Tensor phase0, int64_t P, torch::Tensor eta, torch::Tensor lam,
                                   torch::Tensor w_r, double k_max);
std::vector<torch::Tensor> p1_fwd(torch::Tensor dt, torch::Tensor u, torch::Tensor coef, torch::Tensor r,
                                  torch::Tensor At, torch::Tensor B, torch::Tensor C, torch::Tensor keys,
                                  double sigma_w, torch::Tensor h0, torch::Tensor dl0, torch::Tensor steps,
                                  int64_t tau, torch::Tensor hs_out, std::vector<torch::Tensor> ctl, int64_t G,
                                  double k_max);

// scan_bwd.cpp
std::vector<torch::Tensor> scan_bwd(torch::Tensor dt, torch::Tensor u, torch::Tensor coef, torch::Tensor r,
                                    torch::Tensor At, torch::Tensor B, torch::Tensor C, torch::Tensor keys,
                                    double sigma_w, torch::Tensor h0, torch::Tensor dl0, torch::Tensor steps,
                                    int64_t tau, torch::Tensor gy, torch::Tensor gh_last, torch::Tensor gdl_last,
                                    torch::Tensor hs);
std::vector<torch::Tensor> p1_bwd(torch::Tensor dt, torch::Tensor u, torch::Tensor coef, torch::Tensor r,
                                  torch::Tensor At, torch::Tensor B, torch::Tensor C, torch::Tensor keys,
                                  double sigma_w, torch::Tensor h0, torch::Tensor dl0, torch::Tensor steps,
                                  int64_t tau, torch::Tensor gy, torch::Tensor gh_last, torch::Tensor gdl_last,
                                  torch::Tensor hs, std::vector<torch::Tensor> ctl, int64_t G, double k_max);

// step.cpp
void step(torch::Tensor h, torch::Tensor delay, torch::Tensor k, torch::Tensor e, torch::Tensor phase,
          torch::Tensor u, torch::Tensor delta, torch::Tensor A, torch::Tensor B, torch::Tensor C, torch::Tensor D,
          torch::Tensor z, torch::Tensor bias, bool softplus_, torch::Tensor alpha, torch::Tensor rho, int64_t tau,
          bool control, torch::Tensor eta, torch::Tensor lam, torch::Tensor w_r, double k_max, int64_t G,
          torch::Tensor mask, int64_t P, torch::Tensor y);

// layer_decode.cpp
torch::Tensor decode_layer(torch::Tensor xz, torch::Tensor mask, torch::Tensor conv_state, torch::Tensor h,
                           torch::Tensor delay, torch::Tensor k, torch::Tensor e, torch::Tensor phase,
                           std::vector<torch::Tensor> w, int64_t R, int64_t tau, int64_t G, int64_t P, bool control,
                           double k_max, double eps);
std::vector<std::string> decode_weights();

// dense.cpp
std::vector<torch::Tensor> conv_prefill(torch::Tensor x, torch::Tensor w, torch::Tensor bias, torch::Tensor state,
                                        bool silu_);
torch::Tensor linear_rows(torch::Tensor x, torch::Tensor W, torch::Tensor bias);

}  // namespace mixcon_cpu
