// The Python module of the compiled CPU kernels (mixcon/ops/cpu/__init__.py builds and loads it).
#include <torch/extension.h>

#include "common.h"

using namespace mixcon_cpu;

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
  m.def("decode_weights", &decode_weights, "the names of the tensors decode_layer takes, in the order it reads them");
}
