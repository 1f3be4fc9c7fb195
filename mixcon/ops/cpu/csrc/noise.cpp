// The training noise's transforms (as torch computes them: MKL's vector math where torch has it, found in
// the loaded libtorch_cpu at run time, else ATen's vectorised functions) and the draw of one state index
// for a whole scan (noise.h has the hash and the per-tile draw the scan kernels use).
#include "noise.h"

#ifndef _WIN32
#include <dlfcn.h>
#endif

namespace mixcon_cpu {

namespace {

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

}  // namespace

// x ← sqrt(−2 log x), c ← cos c over n floats, as noise.py's torch ops compute them (−2 log x is exact)
void radius_cos(float* x, float* c, int64_t n) {
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

}  // namespace mixcon_cpu
