// Runs an AOTInductor package of a model holding rnn_ext.RNN, from C++ alone.
//
//   run_rnn MODEL.pt2 INPUTS.pt [OUTPUTS.pt]
//
// INPUTS.pt holds the model's inputs as a list of tensors saved by torch.save (export_model.py
// writes one); the outputs are printed and, with OUTPUTS.pt, saved for torch.load. rnn_ext's ops
// are registered by librnn_ext_ops.so, linked in (see CMakeLists.txt).
#include <torch/csrc/inductor/aoti_package/model_package_loader.h>
#include <torch/serialize.h>
#include <torch/torch.h>

#include <fstream>
#include <iostream>
#include <iterator>
#include <vector>

namespace {

std::vector<char> read_file(const char* path) {
  std::ifstream file(path, std::ios::binary);
  TORCH_CHECK(file, "cannot open ", path);
  return {std::istreambuf_iterator<char>(file), std::istreambuf_iterator<char>()};
}

void write_file(const char* path, const std::vector<char>& bytes) {
  std::ofstream file(path, std::ios::binary);
  TORCH_CHECK(file, "cannot write ", path);
  file.write(bytes.data(), static_cast<std::streamsize>(bytes.size()));
}

std::vector<at::Tensor> load_tensors(const char* path) {
  const c10::IValue saved = torch::pickle_load(read_file(path));
  TORCH_CHECK(saved.isList(), path, " must hold a list of tensors (torch.save([x, ...], path))");
  std::vector<at::Tensor> tensors;
  for (const auto& value : saved.toListRef()) {
    tensors.push_back(value.toTensor());
  }
  return tensors;
}

}  // namespace

int main(int argc, char** argv) {
  if (argc < 3 || argc > 4) {
    std::cerr << "usage: " << argv[0] << " MODEL.pt2 INPUTS.pt [OUTPUTS.pt]\n";
    return 2;
  }
  try {
    torch::NoGradGuard no_grad;
    torch::inductor::AOTIModelPackageLoader loader(argv[1]);
    const std::vector<at::Tensor> inputs = load_tensors(argv[2]);
    const std::vector<at::Tensor> outputs = loader.run(inputs);
    for (size_t i = 0; i < outputs.size(); ++i) {
      std::cout << "output " << i << ": " << outputs[i].sizes() << "\n" << outputs[i] << "\n";
    }
    if (argc == 4) {  // a tuple of tensors, which torch.load reads with weights_only=True
      std::vector<c10::IValue> values(outputs.begin(), outputs.end());
      write_file(argv[3], torch::pickle_save(c10::ivalue::Tuple::create(std::move(values))));
    }
  } catch (const std::exception& error) {
    std::cerr << "run_rnn: " << error.what() << "\n";
    return 1;
  }
  return 0;
}
