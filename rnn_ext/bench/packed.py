"""The variable-length modes, built on the layer mode.

``--packed``: each batch has lengths drawn uniformly from [1, L] (seeded) and is packed with
``pack_padded_sequence(enforce_sorted=False)``; rnn_ext also runs the same batch padded to all L
steps (dense), and the table gives rnn_ext's packed/padded time ratio.

``--lengths``: the batch is padded, with lengths drawn the same way: rnn_ext runs
``model(x, lengths=lengths)``; nn.RNN runs the pipeline a user needs for the same result,
``pack_padded_sequence(x, lengths, enforce_sorted=False)`` -> nn.RNN ->
``pad_packed_sequence(total_length=L)``, timed whole; rnn_ext also runs ``x`` without lengths
(dense), and the table gives rnn_ext's lengths/dense time ratio.
"""
from dataclasses import dataclass

from . import layer
from .inputs import MODES
from .report import MODE_TITLES

RATIO_TITLES = {"packed": "packed/padded", "lengths": "lengths/dense"}
TERMINAL_NOTES = {
    "packed": "vs dense = rnn_ext on the PackedSequence / rnn_ext on the same batch padded to L steps",
    "lengths": "vs dense = rnn_ext with lengths= / rnn_ext on the same x without them",
}
MARKDOWN_NOTES = {
    "packed": "Packed rows: lengths uniform in [1, L]; fill = real tokens / (B*L); packed/padded = rnn_ext "
    "time on the PackedSequence / rnn_ext time on the same batch padded to L steps.",
    "lengths": "Lengths rows: lengths uniform in [1, L]; nn.RNN times are of "
    "pack_padded_sequence(enforce_sorted=False) -> nn.RNN -> pad_packed_sequence(total_length=L), rnn_ext's of rnn_ext.RNN(x, lengths=lengths); "
    "fill = real tokens / (B*L); lengths/dense = rnn_ext with lengths / rnn_ext on the same x without them.",
}


@dataclass
class VariableRow(layer.Row):
    """A layer row of a variable-length batch, with rnn_ext's times on the same batch dense (padded)."""

    padded: dict | None = None  # mode -> seconds, rnn_ext on the padded batch
    variable: str = "packed"  # "packed" or "lengths"

    @property
    def label(self):
        return f"{self.shape.label} {self.variable}"

    @property
    def fill(self):
        """Real tokens / padded tokens."""
        return self.tokens / (self.shape.batch * self.shape.seq_len)

    def dense_ratio(self, mode):
        """rnn_ext's time on the variable-length batch / its time on the same batch dense."""
        return self.ours[mode] / self.padded[mode]


def benchmark_shape(variable):
    """The layer mode's ``benchmark_shape`` for ``variable`` ("packed" or "lengths") batches."""

    def benchmark(shape, args, device, dtype, timer, on_round):
        reference, ours, dense, varied = layer.models_and_batches(shape, args, device, dtype, variable)
        runs = {"reference": (reference, varied), "ours": (ours, varied), "padded": (ours, dense)}
        times, rounds = layer.time_runs(runs, args, timer, on_round)
        return VariableRow(shape, rounds, varied.tokens, times["reference"], times["ours"], padded=times["padded"],
                           variable=variable)

    return benchmark


def additions(variable):
    """The fill and the ratio to dense, in both tables, and the notes saying what they are."""
    ratio = RATIO_TITLES[variable]
    columns = [("fill %", lambda row: f"{100 * row.fill:.0f}")]
    for mode in MODES:
        columns.append((f"{MODE_TITLES[mode]} {ratio}", lambda row, mode=mode: f"{row.dense_ratio(mode):.2f}"))
    return layer.Additions(
        terminal_column=("vs dense", lambda row, mode: f"{row.dense_ratio(mode):.2f}"),
        markdown_columns=columns,
        terminal_notes=[TERMINAL_NOTES[variable]],
        markdown_notes=[MARKDOWN_NOTES[variable]],
    )


def run(args, shapes, device, variable):
    """The rows of every shape with ``variable`` batches; prints the table and writes --markdown and
    --plot when given."""
    rows, peak_gflops = layer.measure(shapes, args, device, benchmark_shape(variable))
    layer.publish(rows, args, device, peak_gflops, additions(variable))
    return rows
