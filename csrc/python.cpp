// The rnn_ext._C Python module. Importing it runs the ops' static registrations (TORCH_LIBRARY in
// ops.cpp and the backends); it also holds one Python entry point, rnn_ext._C.rnn_cell.
//
// rnn_ext._C.rnn_cell(input, hx, w_ih, w_hh, b_ih, b_hh, relu) calls the rnn_cell op through the
// dispatcher exactly as torch.ops.rnn_ext.rnn_cell does (autograd, autocast, every backend and
// dispatch mode), minus the generic schema-driven argument parsing and the release of the GIL
// around small steps: at B=1 those cost more than the step itself, and a cell runs once per
// iteration of a Python loop. Arguments it does not take as they are (anything but tensors, None
// biases and a bool; tensors with __torch_function__ overrides; an active TorchFunctionMode) get
// NotImplemented back, and the caller then uses the OpOverload.
#include <Python.h>
#include <ATen/ATen.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/csrc/Exceptions.h>
#include <torch/csrc/autograd/python_variable.h>
#include <ATen/PythonTorchFunctionTLS.h>

#include <optional>

namespace {

// Steps with fewer multiply-adds than this keep the GIL: releasing and retaking it costs more.
constexpr int64_t kReleaseGilMacs = int64_t{1} << 18;

// A torch.Tensor or nn.Parameter exactly: no subclass, so no __torch_function__ override.
bool plain_tensor(PyObject* obj) {
  return THPVariable_CheckExact(obj);
}

std::optional<at::Tensor> optional_tensor(PyObject* obj) {
  if (obj == Py_None) return std::nullopt;
  return THPVariable_Unpack(obj);
}

// Releases the GIL for its lifetime when asked to.
class MaybeReleaseGil {
 public:
  explicit MaybeReleaseGil(bool release) : state_(release ? PyEval_SaveThread() : nullptr) {}
  ~MaybeReleaseGil() {
    if (state_ != nullptr) PyEval_RestoreThread(state_);
  }
  MaybeReleaseGil(const MaybeReleaseGil&) = delete;
  MaybeReleaseGil& operator=(const MaybeReleaseGil&) = delete;

 private:
  PyThreadState* state_;
};

PyObject* rnn_cell(PyObject* /*module*/, PyObject* const* args, Py_ssize_t nargs) {
  HANDLE_TH_ERRORS
  if (nargs != 7 || !PyBool_Check(args[6]) || at::impl::torch_function_mode_enabled()) Py_RETURN_NOTIMPLEMENTED;
  for (Py_ssize_t i = 0; i < 6; ++i) {
    if (!(plain_tensor(args[i]) || (i >= 4 && args[i] == Py_None))) Py_RETURN_NOTIMPLEMENTED;
  }
  static const auto op = c10::Dispatcher::singleton()
                             .findSchemaOrThrow("rnn_ext::rnn_cell", "")
                             .typed<at::Tensor(
                                 const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&,
                                 const std::optional<at::Tensor>&, const std::optional<at::Tensor>&, bool)>();
  const at::Tensor& input = THPVariable_Unpack(args[0]);
  const at::Tensor& hx = THPVariable_Unpack(args[1]);
  const at::Tensor& w_ih = THPVariable_Unpack(args[2]);
  const at::Tensor& w_hh = THPVariable_Unpack(args[3]);
  const auto b_ih = optional_tensor(args[4]);
  const auto b_hh = optional_tensor(args[5]);
  const bool relu = args[6] == Py_True;
  at::Tensor h;
  {
    const int64_t hidden = w_hh.dim() > 0 ? w_hh.size(0) : 1;  // the op checks the shapes
    const int64_t macs = (input.numel() + hx.numel()) * hidden;
    MaybeReleaseGil release(macs >= kReleaseGilMacs);
    h = op.call(input, hx, w_ih, w_hh, b_ih, b_hh, relu);
  }
  return THPVariable_Wrap(std::move(h));
  END_HANDLE_TH_ERRORS
}

PyMethodDef methods[] = {
    {"rnn_cell", reinterpret_cast<PyCFunction>(reinterpret_cast<void (*)()>(&rnn_cell)), METH_FASTCALL,
     "rnn_cell(input, hx, w_ih, w_hh, b_ih, b_hh, relu): the rnn_cell op, or NotImplemented for arguments "
     "that need the OpOverload (see csrc/python.cpp)."},
    {nullptr, nullptr, 0, nullptr}};

}  // namespace

PyMODINIT_FUNC PyInit__C(void) {
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, methods};
  return PyModule_Create(&module_def);
}
