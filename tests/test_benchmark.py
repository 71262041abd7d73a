"""Smoke test of ``rnn-ext-benchmark`` (``python -m rnn_ext.benchmark``) and its shape parsing (no real timing)."""
import sys

import pytest
import torch

from rnn_ext import benchmark
from rnn_ext.benchmark import SHAPE_SETS, Shape, parse_shape, parse_shapes


def test_parse_shape_fields_and_defaults():
    assert parse_shape("1,100,32,32") == Shape(1, 100, 32, 32, 1, False)
    assert parse_shape("8,1000,256,256,2") == Shape(8, 1000, 256, 256, 2, False)
    assert parse_shape(" 16, 50, 128, 128, 2, yes ") == Shape(16, 50, 128, 128, 2, True)
    assert parse_shape("2,3,4,5,1,no").bidirectional is False


def test_shape_label_parses_back():
    for shape in SHAPE_SETS["default"] + SHAPE_SETS["packed"]:
        assert parse_shape(shape.label) == shape


def test_parse_shapes_expands_named_sets():
    shapes = parse_shapes(["1,2,3,4", "packed"])
    assert shapes == [Shape(1, 2, 3, 4), *SHAPE_SETS["packed"]]
    assert len(parse_shapes(["default"])) == 8


@pytest.mark.parametrize(
    "text, message",
    [
        ("1,2,3", "got 3 fields"),
        ("1,2,3,4,5,6,7", "got 7 fields"),
        ("1,2,x,4", "I must be a positive integer, got 'x'"),
        ("1,0,3,4", "L must be a positive integer, got '0'"),
        ("1,2,3,-4", "H must be a positive integer"),
        ("1,2,3,4,1,maybe", "bidir must be one of"),
    ],
)
def test_parse_shape_rejects_garbage(text, message):
    with pytest.raises(ValueError, match=message):
        parse_shape(text)


def test_unknown_shape_set_is_named():
    with pytest.raises(ValueError, match="unknown shape set 'small'"):
        parse_shapes(["small"])


def test_run_model_with_lengths_matches_between_implementations():
    shape = Shape(3, 6, 2, 4, 2, True)
    reference, ours = benchmark.build_models(shape, torch.float64, torch.device("cpu"), 0, batch_first=True)
    _, batch = benchmark.make_batches(shape, torch.float64, torch.device("cpu"), 0, "lengths", batch_first=True)
    assert batch.lengths is not None and batch.input.shape == (3, 6, 2)
    assert benchmark.max_forward_difference(reference, ours, batch) < 1e-12


def test_packed_and_lengths_exclude_each_other(capsys):
    with pytest.raises(SystemExit):
        benchmark.main(["--packed", "--lengths"])
    assert "not allowed with argument" in capsys.readouterr().err


def test_cli_rejects_bad_shape_with_usage_error(capsys):
    with pytest.raises(SystemExit) as exit_info:
        benchmark.main(["--shapes", "1,2,banana,4"])
    assert exit_info.value.code == 2
    assert "--shapes: shape '1,2,banana,4': I must be a positive integer" in capsys.readouterr().err


def test_forward_flops_counts_layers_and_directions():
    # layer 0: 2*(I*H + H*H) per token and direction; layer 1 reads D*H features.
    shape = Shape(2, 3, 4, 5, 2, True)
    per_token = 2 * (4 * 5 + 25) * 2 + 2 * (10 * 5 + 25) * 2
    assert benchmark.forward_flops(shape, tokens=6) == per_token * 6


@pytest.mark.parametrize("variable, batch_first", [(None, False), ("packed", False), ("lengths", False),
                                                   ("lengths", True), ("packed", True)])
def test_main_writes_table_markdown_and_plot(tmp_path, monkeypatch, variable, batch_first):
    monkeypatch.setattr(benchmark, "PEAK_SIZE", 64)  # the real 2048^3 peak takes seconds
    markdown, plot = tmp_path / "bench.md", tmp_path / "bench.png"
    argv = ["--shapes", "2,5,3,4,1,yes", "--rounds", "1", "--min-time", "0"]
    argv += ["--markdown", str(markdown), "--plot", str(plot)]
    argv += [f"--{variable}"] if variable else []
    rows = benchmark.main(argv + (["--batch-first"] if batch_first else []))

    assert len(rows) == 1 and rows[0].rounds == 1 and rows[0].packed == (variable is not None)
    assert rows[0].variable == variable
    text = markdown.read_text()
    assert "| shape B,L,I,H,layers,bidir | rounds | fwd nn.RNN ms | fwd rnn_ext ms | fwd speedup |" in text
    assert "| 2,5,3,4,1,yes | 1 |" in text
    assert ("packed/padded" in text) == (variable == "packed")
    assert ("lengths/dense" in text) == (variable == "lengths")
    assert ("batch-first" in text) == batch_first
    assert "- dtype: float32" in text and "- threads: " in text and "- SGEMM peak: " in text
    assert "{" not in text  # every header field was formatted
    assert plot.read_bytes().startswith(b"\x89PNG")


@pytest.mark.parametrize("variable", [None, "packed", "lengths"])
def test_autocast_mode_runs_both_models_under_autocast(tmp_path, monkeypatch, capsys, variable):
    monkeypatch.setattr(benchmark, "PEAK_SIZE", 64)
    markdown = tmp_path / "bench.md"
    seen = []
    real_run = benchmark.run_model_as_is

    def spy(model, batch):  # which dtype each model computes in, inside the timed calls
        output, h_n = real_run(model, batch)
        seen.append((type(model).__module__.split(".")[0], output.dtype, torch.is_autocast_enabled("cpu")))
        return output, h_n

    monkeypatch.setattr(benchmark, "run_model_as_is", spy)
    argv = ["--autocast", "--shapes", "2,5,3,4,2,yes", "--rounds", "1", "--min-time", "0", "--markdown", str(markdown)]
    rows = benchmark.main(argv + ([f"--{variable}"] if variable else []))
    assert len(rows) == 1 and rows[0].speedup("fwd_bwd") > 0
    assert {package for package, _, _ in seen} == {"torch", "rnn_ext"}
    assert all(dtype == torch.bfloat16 and enabled for _, dtype, enabled in seen)
    assert "float32 under autocast(bfloat16)" in capsys.readouterr().out
    assert "- dtype: float32, under torch.autocast('cpu', dtype=torch.bfloat16)" in markdown.read_text()


def test_autocast_mode_needs_float32_models(capsys):
    with pytest.raises(SystemExit):
        benchmark.main(["--autocast", "--dtype", "bfloat16"])
    assert "--autocast runs float32 models" in capsys.readouterr().err


def test_cell_mode_writes_table_and_markdown(tmp_path, capsys):
    markdown = tmp_path / "cell.md"
    rows = benchmark.main(["--cell", "--shapes", "2,3,4,5", "1,6,8", "--rounds", "1", "--min-time", "0",
                           "--markdown", str(markdown)])
    assert [row.shape.label for row in rows] == ["2,3,4,5", "1,6,8,100"]
    assert all(row.rounds == 1 and row.speedup("fwd") > 0 and row.speedup("fwd_bwd") > 0 for row in rows)
    printed = capsys.readouterr().out
    assert "fwd+bwd, us/step" in printed and "2,3,4,5" in printed
    text = markdown.read_text()
    assert "| shape B,I,H,T | rounds | fwd nn us/step |" in text and "| 2,3,4,5 | 1 |" in text
    assert "{" not in text


@pytest.mark.parametrize("argv, message", [
    (["--cell", "--shapes", "1,2"], "cell shape '1,2'"),
    (["--cell", "--shapes", "1,2,0"], "cell shape '1,2,0'"),
    (["--cell", "--lengths"], "not allowed with argument"),
    (["--cell", "--batch-first"], "--cell takes no --batch-first"),
])
def test_cell_mode_rejects_bad_arguments(argv, message, capsys):
    with pytest.raises(SystemExit):
        benchmark.main(argv)
    assert message in capsys.readouterr().err


def test_threads_mode_writes_table_and_markdown(tmp_path, capsys):
    markdown = tmp_path / "threads.md"
    threads_before = torch.get_num_threads()
    rows = benchmark.main(["--threads", "2,3", "--shapes", "8,50,3,64", "1,4,2,4,1,yes", "--rounds", "1",
                           "--min-time", "0", "--markdown", str(markdown)])
    assert torch.get_num_threads() == threads_before
    assert [(row.shape.label, row.threads) for row in rows] == [
        ("8,50,3,64,1,no", 2), ("8,50,3,64,1,no", 3), ("1,4,2,4,1,yes", 2), ("1,4,2,4,1,yes", 3)]
    assert rows[0].split == "2x1" and rows[2].split == "1x1 + 1x1"
    for row in rows:
        assert row.speedup("fwd") > 0 and row.efficiency("ours", "fwd_bwd") > 0 and row.efficiency("reference", "fwd") > 0
    printed = capsys.readouterr().out
    assert "eff ours" in printed and "8,50,3,64,1,no" in printed
    text = markdown.read_text()
    assert "| shape B,L,I,H,layers,bidir | threads | rnn_ext split |" in text and "| 8,50,3,64,1,no | 3 | 2x1 |" in text
    assert "{" not in text


def test_threads_efficiency_is_against_one_thread():
    from rnn_ext import thread_benchmark

    times = lambda seconds: {"fwd": seconds, "fwd_bwd": 3 * seconds}  # noqa: E731
    row = thread_benchmark.ThreadRow(Shape(1, 2, 3, 4), 4, 5, "4x1", times(1.0), times(0.5), times(2.0), times(1.5))
    assert row.speedup("fwd") == 2.0
    assert row.efficiency("reference", "fwd") == 0.5 and row.efficiency("ours", "fwd_bwd") == 0.75
    assert max(len(line) for line in thread_benchmark.format_terminal_table([row]).splitlines()) <= benchmark.TERMINAL_WIDTH


@pytest.mark.parametrize("argv, message", [
    (["--threads", "0"], "--threads takes positive integers"),
    (["--threads", "2,x"], "--threads takes positive integers"),
    (["--threads", "1,2", "--cell"], "several --threads take no --cell"),
    (["--threads", "1,2", "--packed"], "several --threads take no"),
])
def test_threads_mode_rejects_bad_arguments(argv, message, capsys):
    with pytest.raises(SystemExit):
        benchmark.main(argv)
    assert message in capsys.readouterr().err


def _row(shape, seconds, variable=None):
    modes = benchmark.MODES
    padded = {mode: seconds / 2 for mode in modes} if variable else None
    return benchmark.Row(shape, 15, shape.batch * shape.seq_len, {mode: seconds for mode in modes},
                         {mode: seconds / 3 for mode in modes}, padded, peak_gflops=100.0, variable=variable)


@pytest.mark.parametrize("variable", [None, "packed", "lengths"])
def test_terminal_table_fits_the_terminal_width(variable):
    # The widest labels and times a run prints: a 6-field shape, times up to 999999 ms.
    rows = [_row(Shape(1024, 10000, 4096, 4096, 12, True), 999.999, variable),
            _row(Shape(1, 1, 1, 1), 1e-6, variable)]
    table = benchmark.format_terminal_table(rows)
    assert max(len(line) for line in table.splitlines()) <= benchmark.TERMINAL_WIDTH
    assert "1024,10000,4096,4096,12,yes" in table and "999999" in table
    assert ("vs dense" in table) == (variable is not None)
    assert ("with lengths=" in table) == (variable == "lengths") and ("PackedSequence" in table) == (variable == "packed")


def test_cell_terminal_table_fits_the_terminal_width():
    from rnn_ext import cell_benchmark

    row = cell_benchmark.CellRow(cell_benchmark.CellShape(1024, 4096, 4096, 10000), 15,
                                 {"fwd": 99.0, "fwd_bwd": 999.0}, {"fwd": 33.0, "fwd_bwd": 333.0})
    table = cell_benchmark.format_terminal_table([row])
    assert max(len(line) for line in table.splitlines()) <= benchmark.TERMINAL_WIDTH
    assert "1024,4096,4096,10000" in table


def test_runs_without_tqdm(monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "tqdm", None)  # `import tqdm` raises ImportError
    monkeypatch.setattr(benchmark, "PEAK_SIZE", 64)
    rows = benchmark.main(["--shapes", "2,5,3,4", "1,2,3,4", "--rounds", "2", "--min-time", "0"])
    assert len(rows) == 2
    captured = capsys.readouterr()
    assert "[0/4 rounds] 2,5,3,4,1,no" in captured.err and "[2/4 rounds] 1,2,3,4,1,no" in captured.err
    assert "speedup" in captured.out


def test_plot_without_matplotlib_is_a_usage_error(monkeypatch, capsys):
    monkeypatch.setattr(benchmark.importlib.util, "find_spec", lambda name: None)  # nothing installed
    with pytest.raises(SystemExit):
        benchmark.main(["--shapes", "2,5,3,4", "--plot", "x.png"])
    assert "--plot needs matplotlib" in capsys.readouterr().err


def test_low_precision_accuracy_script_writes_its_table(tmp_path):
    """benchmarks/low_precision_accuracy.py (the accuracy half of results/cpu-bf16.md) still runs."""
    import os
    import subprocess

    from reference import subprocess_env

    script = os.path.join(os.path.dirname(__file__), "..", "benchmarks", "low_precision_accuracy.py")
    markdown = tmp_path / "accuracy.md"
    result = subprocess.run([sys.executable, script, "--shapes", "3,6,4,5,2,yes", "--markdown", str(markdown)],
                            env=subprocess_env(), capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    rows = [line for line in markdown.read_text().splitlines() if line.startswith("| 3,6,4,5,2,yes |")]
    assert [row.split(" | ")[1] for row in rows] == ["bfloat16", "autocast(bfloat16)", "float16"]
    for row in rows:  # output error, nn.RNN's, ratio, grads error, nn.RNN's, ratio: all positive numbers
        assert all(float(cell) > 0 for cell in row.strip("| ").split(" | ")[2:])
