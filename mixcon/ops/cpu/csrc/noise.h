// The counter-based noise of noise.py, bit for bit: lane = c·(N + 1) + n (n = N: the observation noise
// ζ), h1 = mix32(lane ^ key), h2 = mix32(h1 ^ salt), u1 = ((h1 >> 8) + 0.5) 2^−24, u2 = (h2 >> 8) 2π 2^−24
// (float32, rounded as torch rounds them), normal = sqrt(−2 log u1) cos u2. The log, the sqrt and the cos
// must be the ones torch computes for a contiguous float32 tensor: MKL's vector math (high accuracy) in a
// torch built with MKL — found in the loaded libtorch_cpu at run time — else ATen's vectorised functions
// (noise.cpp, `radius_cos`; why no other will do: docs/kernels.md, "Training noise on CPU").
// tests/ops/test_conba_cpu.py compares the draw with noise.py bit for bit, and each transform with torch's
// over all 2^24 inputs.
#pragma once

#include "common.h"

namespace mixcon_cpu {

// x ← sqrt(−2 log x), c ← cos c over n floats, as noise.py's torch ops compute them (noise.cpp)
void radius_cos(float* x, float* c, int64_t n);

namespace {  // internal to each file that includes it

constexpr uint32_t SECOND_DRAW_SALT = 0x68E31DA4u;

inline uint32_t mix32(uint32_t x) {
  x ^= x >> 16;
  x *= 0x7FEB352Du;
  x ^= x >> 15;
  x *= 0x846CA68Bu;
  x ^= x >> 16;
  return x;
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

}  // namespace

}  // namespace mixcon_cpu
