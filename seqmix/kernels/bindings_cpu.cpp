// The Python module of the C++ CPU kernels (seqmix/kernels/cpu.py builds every source in its SOURCES into
// one module): each source defines a bind_<name> function that adds its functions, and this is the one
// PYBIND11_MODULE.
#include "torch_cpu.h"
#include "vec_cpu.h"

void bind_selective_scan(pybind11::module& m);
void bind_recurrent_steps(pybind11::module& m);
void bind_row_norms(pybind11::module& m);
void bind_conv_step(pybind11::module& m);
void bind_mlp_step(pybind11::module& m);
void bind_delta_rule(pybind11::module& m);
void bind_conv_train(pybind11::module& m);
void bind_ssd(pybind11::module& m);
void bind_swiglu(pybind11::module& m);
void bind_rms_norm(pybind11::module& m);
void bind_attention_step(pybind11::module& m);
void bind_decoder(pybind11::module& m);
void bind_sample(pybind11::module& m);
void bind_rotary(pybind11::module& m);

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  // The bytes of the vectors the kernels compute in (the state rows some of them store are padded to them).
  m.attr("vector_bytes") = seqmix_cpu::kVectorBytes;
  bind_selective_scan(m);
  bind_recurrent_steps(m);
  bind_row_norms(m);
  bind_conv_step(m);
  bind_mlp_step(m);
  bind_delta_rule(m);
  bind_conv_train(m);
  bind_ssd(m);
  bind_swiglu(m);
  bind_rms_norm(m);
  bind_attention_step(m);
  bind_decoder(m);
  bind_sample(m);
  bind_rotary(m);
}
