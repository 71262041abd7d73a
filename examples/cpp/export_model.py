"""Export a small model holding rnn_ext.RNN as an AOTInductor package for run_rnn (see CMakeLists.txt).

    python examples/cpp/export_model.py OUT_DIR

writes OUT_DIR/rnn.pt2 (batch and time dynamic), OUT_DIR/inputs.pt (inputs of another batch and
time size than the exported ones, for run_rnn) and OUT_DIR/expected.pt (the model's outputs on
them, run in Python).
"""
import argparse
import pathlib

import torch

import rnn_ext


class Tagger(torch.nn.Module):
    """A 2-layer bidirectional RNN and a linear head on every step: x [B, T, 8] -> [B, T, 3], h_n."""

    def __init__(self):
        super().__init__()
        self.rnn = rnn_ext.RNN(8, 16, num_layers=2, bidirectional=True, batch_first=True)
        self.head = torch.nn.Linear(32, 3)

    def forward(self, x, lengths):
        output, h_n = self.rnn(x, lengths=lengths)
        return self.head(output), h_n


def export(out_dir):
    out_dir.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(0)
    model = Tagger().eval()
    batch, time = torch.export.Dim("batch", min=1), torch.export.Dim("time", min=1)
    example = (torch.randn(4, 10, 8), torch.tensor([10, 3, 7, 1]))
    program = torch.export.export(model, example, dynamic_shapes=({0: batch, 1: time}, {0: batch}))
    torch._inductor.aoti_compile_and_package(program, package_path=str(out_dir / "rnn.pt2"))

    inputs = [torch.randn(3, 13, 8), torch.tensor([5, 13, 9])]
    torch.save(inputs, out_dir / "inputs.pt")
    with torch.no_grad():
        torch.save(list(model(*inputs)), out_dir / "expected.pt")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out_dir", type=pathlib.Path)
    export(parser.parse_args().out_dir)
