// General CPU kernels, not Conba's: the decode token's GEMV (a Conba layer's projections, and every
// few-row F.linear through mixcon/ops/linear.py), the prefill's causal depthwise conv (mixcon/ops/conv.py)
// and the RMSNorm of the layer decode.
#include "common.h"

namespace mixcon_cpu {

torch::Tensor rms_norm(const torch::Tensor& x, const torch::Tensor& weight, double eps) {
  if (!weight.numel()) return x;
  const torch::Tensor xf = x.to(at::kFloat);  // as layers/norm.py: computed in float32, scaled in x's dtype
  return weight * (xf * at::rsqrt(xf.pow(2).mean(-1, true) + eps)).to(x.scalar_type());
}

// y[o] (+)= Σ_i W[o, i] x[i]: a decode token's projections (why not the library's GEMV: docs/kernels.md,
// "Compiled on CPU"), four rows at a time so that four independent streams are in flight
template <typename T>
inline T hsum(const Vectorized<T>& v) {
  T buf[Vectorized<T>::size()];
  v.store(buf);
  T s = 0;
  for (int64_t l = 0; l < Vectorized<T>::size(); ++l) s += buf[l];
  return s;
}

namespace {

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

}  // namespace

// gemv over torch's threads, in chunks of ≥ 16K multiply-adds (a decode token's weights come from memory,
// so a second thread's bandwidth is worth more than the fork)
template <typename T>
void gemv_par(const T* W, const T* x, T* y, int64_t O, int64_t I, bool accumulate) {
  at::parallel_for(0, O, std::max<int64_t>(1, 16384 / std::max<int64_t>(1, I)), [&](int64_t begin, int64_t end) {
    gemv(W + begin * I, x, y + begin, end - begin, I, accumulate);
  });
}

template void gemv_par<float>(const float*, const float*, float*, int64_t, int64_t, bool);
template void gemv_par<double>(const double*, const double*, double*, int64_t, int64_t, bool);

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

}  // namespace mixcon_cpu
