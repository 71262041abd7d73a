// The backward ops under PyTorch's legacy vmap (torch._vmap_internals, the Batched dispatch key),
// which autograd itself uses for torch.autograd.grad(..., is_grads_batched=True),
// torch.autograd.functional.jacobian(vectorize=True) and gradcheck's batched-gradient checks.
// torch.func.vmap has its own rules (rnn_ext/batching.py).
//
// The legacy fallback refuses ops with tensor-list arguments or returns, which
// rnn_layer_backward and rnn_cell_backward have. This kernel runs such an op once per sample
// instead: every batched argument is turned physical (its vmap dims first, aligned and expanded
// across arguments, then flattened into one), the op runs on each sample's slices, and each output
// stacks the samples and becomes batched again.
#include <ATen/ATen.h>
#include <ATen/LegacyVmapTransforms.h>
#include <torch/library.h>

#include <functional>

namespace rnn_ext {

namespace {

// Calls f on every tensor of an argument: a Tensor, or each element of a Tensor[]. (An absent
// optional tensor is None, not a tensor.)
void for_each_tensor(const c10::IValue& arg, const std::function<void(const at::Tensor&)>& f) {
  if (arg.isTensor()) {
    f(arg.toTensor());
  } else if (arg.isTensorList()) {
    for (const at::Tensor& t : arg.toTensorList()) f(t);
  }
}

bool is_batched(const at::Tensor& t) {
  return t.defined() && at::isBatchedTensor(t);
}

// The batched arguments' physical tensors, one vmap dim of all samples first, and what turns a
// result of that layout back into a batched tensor.
struct PhysicalArgs {
  std::vector<at::Tensor> tensors;  // [samples, logical shape...], in argument order
  std::vector<int64_t> batch_shape;  // the vmap dims flattened into samples, outermost first
  std::optional<at::VmapPhysicalToLogicalMap> to_logical;
  int64_t samples = 0;
};

PhysicalArgs physical_args(const std::vector<c10::IValue>& args) {
  std::vector<at::Tensor> batched;  // in argument order, as sample_args walks them
  for (const auto& arg : args) {
    for_each_tensor(arg, [&](const at::Tensor& t) {
      if (is_batched(t)) batched.push_back(t);
    });
  }
  TORCH_INTERNAL_ASSERT(!batched.empty());
  const auto views = at::MultiBatchVmapTransform::logicalToPhysical(batched);
  PhysicalArgs physical;
  const int64_t batch_dims = views[0].numBatchDims();
  physical.batch_shape = views[0].tensor().sizes().slice(0, batch_dims).vec();
  for (const auto& view : views) physical.tensors.push_back(view.tensor().flatten(0, batch_dims - 1));
  physical.to_logical = views[0].getPhysicalToLogicalMap();
  physical.samples = physical.tensors[0].size(0);
  TORCH_CHECK(physical.samples > 0, "rnn_ext: vmap over a dimension of size 0 is not supported");
  return physical;
}

// The op's arguments for sample v: each batched tensor replaced by its slice.
torch::jit::Stack sample_args(const std::vector<c10::IValue>& args, const PhysicalArgs& physical, int64_t v) {
  size_t next = 0;
  const auto slice = [&](const at::Tensor& t) { return is_batched(t) ? physical.tensors[next++].select(0, v) : t; };
  torch::jit::Stack stack;
  for (const auto& arg : args) {
    if (arg.isTensor()) {
      stack.emplace_back(slice(arg.toTensor()));
    } else if (arg.isTensorList()) {
      c10::List<at::Tensor> list;
      for (const at::Tensor& t : arg.toTensorList()) list.push_back(slice(t));
      stack.emplace_back(std::move(list));
    } else {
      stack.push_back(arg);
    }
  }
  return stack;
}

// One output of every sample, stacked and batched again.
at::Tensor restack(const std::vector<at::Tensor>& per_sample, const PhysicalArgs& physical) {
  const auto stacked = at::stack(per_sample);  // [samples, ...]
  std::vector<int64_t> shape(physical.batch_shape);
  shape.insert(shape.end(), stacked.sizes().begin() + 1, stacked.sizes().end());
  return physical.to_logical->apply(stacked.view(shape));
}

void per_sample_loop(const c10::OperatorHandle& op, torch::jit::Stack* stack) {
  const size_t num_args = op.schema().arguments().size();
  const size_t num_returns = op.schema().returns().size();
  std::vector<c10::IValue> args(stack->end() - num_args, stack->end());
  torch::jit::drop(*stack, num_args);
  const auto physical = physical_args(args);

  std::vector<torch::jit::Stack> results;  // per sample, the op's returns
  for (int64_t v = 0; v < physical.samples; ++v) {
    results.push_back(sample_args(args, physical, v));
    op.callBoxed(results.back());
  }
  for (size_t r = 0; r < num_returns; ++r) {
    const auto output_of = [&](int64_t v, std::optional<size_t> element) {
      const auto& value = results[v][r];
      return element ? value.toTensorList().get(*element) : value.toTensor();
    };
    const auto batched = [&](std::optional<size_t> element) {
      std::vector<at::Tensor> per_sample;
      for (int64_t v = 0; v < physical.samples; ++v) per_sample.push_back(output_of(v, element));
      return restack(per_sample, physical);
    };
    if (results[0][r].isTensor()) {
      stack->emplace_back(batched(std::nullopt));
    } else {
      c10::List<at::Tensor> outputs;
      for (size_t k = 0; k < results[0][r].toTensorList().size(); ++k) outputs.push_back(batched(k));
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
