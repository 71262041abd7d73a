// Autocast for rnn_layer and rnn_cell: under torch.autocast, run in the autocast dtype (bfloat16 on the CPU,
// float16 or bfloat16 on CUDA by default), as nn.RNN's path does. The eligible floating tensors
// are cast (weights through autocast's cache) and the op runs below autocast. The backward op
// needs no autocast kernel: it sees the saved low-precision tensors.
#include <ATen/autocast_mode.h>
#include <torch/library.h>

#include "rnn.h"

namespace rnn_ext {

namespace {

template <c10::DeviceType device, c10::DispatchKey autocast_key>
std::tuple<at::Tensor, at::Tensor> rnn_layer_autocast(
    const at::Tensor& input, const at::Tensor& hx, const at::Tensor& w_ih, const at::Tensor& w_hh,
    const std::optional<at::Tensor>& b_ih, const std::optional<at::Tensor>& b_hh,
    const std::optional<at::Tensor>& w_ih_reverse, const std::optional<at::Tensor>& w_hh_reverse,
    const std::optional<at::Tensor>& b_ih_reverse, const std::optional<at::Tensor>& b_hh_reverse,
    const std::optional<at::Tensor>& batch_sizes, bool relu, const std::optional<at::Tensor>& lengths) {
  c10::impl::ExcludeDispatchKeyGuard no_autocast(autocast_key);
  const auto dtype = at::autocast::get_autocast_dtype(device);
  const auto cast = [&](const auto& t) { return at::autocast::cached_cast(dtype, t, device); };
  static const auto op = c10::Dispatcher::singleton()
                             .findSchemaOrThrow("rnn_ext::rnn_layer", "")
                             .typed<decltype(rnn_layer_autocast<device, autocast_key>)>();
  return op.call(
      cast(input), cast(hx), cast(w_ih), cast(w_hh), cast(b_ih), cast(b_hh), cast(w_ih_reverse),
      cast(w_hh_reverse), cast(b_ih_reverse), cast(b_hh_reverse), batch_sizes, relu, lengths);
}

// rnn_cell under autocast: the same casts, as nn.RNNCell's GEMMs (linear) get.
template <c10::DeviceType device, c10::DispatchKey autocast_key>
at::Tensor rnn_cell_autocast(
    const at::Tensor& input, const at::Tensor& hx, const at::Tensor& w_ih, const at::Tensor& w_hh,
    const std::optional<at::Tensor>& b_ih, const std::optional<at::Tensor>& b_hh, bool relu) {
  c10::impl::ExcludeDispatchKeyGuard no_autocast(autocast_key);
  const auto dtype = at::autocast::get_autocast_dtype(device);
  const auto cast = [&](const auto& t) { return at::autocast::cached_cast(dtype, t, device); };
  static const auto op = c10::Dispatcher::singleton()
                             .findSchemaOrThrow("rnn_ext::rnn_cell", "")
                             .typed<decltype(rnn_cell_autocast<device, autocast_key>)>();
  return op.call(cast(input), cast(hx), cast(w_ih), cast(w_hh), cast(b_ih), cast(b_hh), relu);
}

}  // namespace

TORCH_LIBRARY_IMPL(rnn_ext, AutocastCPU, m) {
  m.impl("rnn_layer", &rnn_layer_autocast<c10::DeviceType::CPU, c10::DispatchKey::AutocastCPU>);
  m.impl("rnn_cell", &rnn_cell_autocast<c10::DeviceType::CPU, c10::DispatchKey::AutocastCPU>);
}

TORCH_LIBRARY_IMPL(rnn_ext, AutocastCUDA, m) {
  m.impl("rnn_layer", &rnn_layer_autocast<c10::DeviceType::CUDA, c10::DispatchKey::AutocastCUDA>);
  m.impl("rnn_cell", &rnn_cell_autocast<c10::DeviceType::CUDA, c10::DispatchKey::AutocastCUDA>);
}

}  // namespace rnn_ext
