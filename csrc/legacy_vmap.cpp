// The ops under PyTorch's legacy vmap (torch._vmap_internals, the Batched dispatch key), which
// autograd itself uses for torch.autograd.grad(..., is_grads_batched=True),
// torch.autograd.functional.jacobian(vectorize=True) and gradcheck's batched-gradient checks.
// torch.func.vmap has its own rules (rnn_ext/batching.py).
//
// The legacy fallback refuses ops with tensor-list arguments or returns, which
// rnn_layer_backward and rnn_cell_backward have. This kernel runs such an op once per sample
// instead: every batched argument is turned physical (its vmap dims first, aligned and expanded
// across arguments), the op runs on each sample's slices, and each output stacks the samples and
// becomes batched again.
#include <ATen/ATen.h>
#include <ATen/LegacyVmapTransforms.h>
#include <torch/library.h>

#include <functional>

namespace rnn_ext {

namespace {

// Calls f on every tensor in an argument (a Tensor, an optional Tensor or a list of them).
void for_each_tensor(c10::IValue& arg, const std::function<void(at::Tensor&)>& f) {
  if (arg.isTensor()) {
    f(arg.toTensor());
  } else if (arg.isTensorList()) {
    auto list = arg.toTensorList();
    for (size_t k = 0; k < list.size(); ++k) {
      at::Tensor t = list[k];
      f(t);
      list[k] = t;
    }
  }
}

void per_sample_loop(const c10::OperatorHandle& op, torch::jit::Stack* stack) {
  const size_t num_args = op.schema().arguments().size();
  const size_t num_returns = op.schema().returns().size();
  std::vector<c10::IValue> args(stack->end() - num_args, stack->end());
  torch::jit::drop(*stack, num_args);

  std::vector<at::Tensor> batched;
  for (auto& arg : args) {
    for_each_tensor(arg, [&](at::Tensor& t) {
      if (t.defined() && at::isBatchedTensor(t)) batched.push_back(t);
    });
  }
  TORCH_INTERNAL_ASSERT(!batched.empty());
  const auto views = at::MultiBatchVmapTransform::logicalToPhysical(batched);
  const int64_t batch_dims = views[0].numBatchDims();
  const auto batch_shape = views[0].tensor().sizes().slice(0, batch_dims).vec();
  std::vector<at::Tensor> physical;  // [samples, logical shape...], in the order of `batched`
  for (const auto& view : views) physical.push_back(view.tensor().flatten(0, batch_dims - 1));
  const int64_t samples = physical[0].size(0);

  std::vector<std::vector<c10::IValue>> results(num_returns);
  for (int64_t v = 0; v < samples; ++v) {
    torch::jit::Stack call;
    size_t next = 0;
    for (const auto& arg : args) {
      c10::IValue sample = arg.isTensorList() ? c10::IValue(arg.toTensorList().copy()) : arg;
      for_each_tensor(sample, [&](at::Tensor& t) {
        if (t.defined() && at::isBatchedTensor(t)) t = physical[next++].select(0, v);
      });
      call.push_back(std::move(sample));
    }
    op.callBoxed(call);
    for (size_t r = 0; r < num_returns; ++r) results[r].push_back(std::move(call[r]));
  }

  const auto to_logical = views[0].getPhysicalToLogicalMap();
  const auto restack = [&](const std::vector<at::Tensor>& per_sample) {
    auto stacked = at::stack(per_sample);  // [samples, ...] -> the batch dims, then logical
    std::vector<int64_t> shape(batch_shape);
    shape.insert(shape.end(), stacked.sizes().begin() + 1, stacked.sizes().end());
    return to_logical.apply(stacked.view(shape));
  };
  for (size_t r = 0; r < num_returns; ++r) {
    if (results[r][0].isTensor()) {
      std::vector<at::Tensor> per_sample;
      for (const auto& result : results[r]) per_sample.push_back(result.toTensor());
      stack->emplace_back(restack(per_sample));
    } else {
      const size_t count = results[r][0].toTensorList().size();
      c10::List<at::Tensor> outputs;
      for (size_t k = 0; k < count; ++k) {
        std::vector<at::Tensor> per_sample;
        for (const auto& result : results[r]) per_sample.push_back(result.toTensorList().get(k));
        outputs.push_back(restack(per_sample));
      }
      stack->emplace_back(std::move(outputs));
    }
  }
}

}  // namespace

TORCH_LIBRARY_IMPL(rnn_ext, Batched, m) {
  m.impl("rnn_layer_backward", torch::CppFunction::makeFromBoxedFunction<&per_sample_loop>());
  m.impl("rnn_cell_backward", torch::CppFunction::makeFromBoxedFunction<&per_sample_loop>());
}

}  // namespace rnn_ext
