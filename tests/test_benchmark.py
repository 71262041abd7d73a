"""The benchmark package ``rnn_ext.bench`` at its seams: each mode run on a tiny shape through the
command line (``rnn-ext-benchmark``, ``python -m rnn_ext.benchmark``) and through its own module, and
the shapes, tables and timing the modes share (no real timing)."""
import sys

import pytest
import torch

from rnn_ext.bench import cell, cli, inputs, layer, packed, report, threads, timing
from rnn_ext.bench.shapes import SHAPE_SETS, Shape, forward_flops, parse_shape, parse_shapes


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
    reference, ours = inputs.build_models(shape, torch.float64, torch.device("cpu"), 0, batch_first=True)
    _, batch = inputs.make_batches(shape, torch.float64, torch.device("cpu"), 0, "lengths", batch_first=True)
    assert batch.lengths is not None and batch.input.shape == (3, 6, 2)
    assert inputs.max_forward_difference(reference, ours, batch) < 1e-12


def test_packed_and_lengths_exclude_each_other(capsys):
    with pytest.raises(SystemExit):
        cli.main(["--packed", "--lengths"])
    assert "not allowed with argument" in capsys.readouterr().err


def test_cli_rejects_bad_shape_with_usage_error(capsys):
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["--shapes", "1,2,banana,4"])
    assert exit_info.value.code == 2
    assert "--shapes: shape '1,2,banana,4': I must be a positive integer" in capsys.readouterr().err


def test_forward_flops_counts_layers_and_directions():
    # layer 0: 2*(I*H + H*H) per token and direction; layer 1 reads D*H features.
    shape = Shape(2, 3, 4, 5, 2, True)
    per_token = 2 * (4 * 5 + 25) * 2 + 2 * (10 * 5 + 25) * 2
    assert forward_flops(shape, tokens=6) == per_token * 6


@pytest.mark.parametrize("variable, batch_first", [(None, False), ("packed", False), ("lengths", False),
                                                   ("lengths", True), ("packed", True)])
def test_main_writes_table_markdown_and_plot(tmp_path, monkeypatch, variable, batch_first):
    monkeypatch.setattr(timing, "PEAK_SIZE", 64)  # the real 2048^3 peak takes seconds
    markdown, plot = tmp_path / "bench.md", tmp_path / "bench.png"
    argv = ["--shapes", "2,5,3,4,1,yes", "--rounds", "1", "--min-time", "0"]
    argv += ["--markdown", str(markdown), "--plot", str(plot)]
    argv += [f"--{variable}"] if variable else []
    rows = cli.main(argv + (["--batch-first"] if batch_first else []))

    assert len(rows) == 1 and rows[0].rounds == 1
    assert isinstance(rows[0], packed.VariableRow) == (variable is not None)
    assert getattr(rows[0], "variable", None) == variable
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
    monkeypatch.setattr(timing, "PEAK_SIZE", 64)
    markdown = tmp_path / "bench.md"
    seen = []
    real_run = inputs.run_model_as_is

    def spy(model, batch):  # which dtype each model computes in, inside the timed calls
        output, h_n = real_run(model, batch)
        seen.append((type(model).__module__.split(".")[0], output.dtype, torch.is_autocast_enabled("cpu")))
        return output, h_n

    monkeypatch.setattr(inputs, "run_model_as_is", spy)
    argv = ["--autocast", "--shapes", "2,5,3,4,2,yes", "--rounds", "1", "--min-time", "0", "--markdown", str(markdown)]
    rows = cli.main(argv + ([f"--{variable}"] if variable else []))
    assert len(rows) == 1 and rows[0].speedup("fwd_bwd") > 0
    assert {package for package, _, _ in seen} == {"torch", "rnn_ext"}
    assert all(dtype == torch.bfloat16 and enabled for _, dtype, enabled in seen)
    assert "float32 under autocast(bfloat16)" in capsys.readouterr().out
    assert "- dtype: float32, under torch.autocast('cpu', dtype=torch.bfloat16)" in markdown.read_text()


def test_autocast_mode_needs_float32_models(capsys):
    with pytest.raises(SystemExit):
        cli.main(["--autocast", "--dtype", "bfloat16"])
    assert "--autocast runs float32 models" in capsys.readouterr().err


def test_cell_mode_writes_table_and_markdown(tmp_path, capsys):
    markdown = tmp_path / "cell.md"
    rows = cli.main(["--cell", "--shapes", "2,3,4,5", "1,6,8", "--rounds", "1", "--min-time", "0",
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
        cli.main(argv)
    assert message in capsys.readouterr().err


def test_threads_mode_writes_table_and_markdown(tmp_path, capsys):
    markdown = tmp_path / "threads.md"
    threads_before = torch.get_num_threads()
    rows = cli.main(["--threads", "2,3", "--shapes", "8,50,3,64", "1,4,2,4,1,yes", "--rounds", "1",
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
    times = lambda seconds: {"fwd": seconds, "fwd_bwd": 3 * seconds}  # noqa: E731
    row = threads.ThreadRow(Shape(1, 2, 3, 4), 4, 5, "4x1", times(1.0), times(0.5), times(2.0), times(1.5))
    assert row.speedup("fwd") == 2.0
    assert row.efficiency("reference", "fwd") == 0.5 and row.efficiency("ours", "fwd_bwd") == 0.75
    assert max(len(line) for line in threads.format_terminal_table([row]).splitlines()) <= report.TERMINAL_WIDTH


@pytest.mark.parametrize("argv, message", [
    (["--threads", "0"], "--threads takes positive integers"),
    (["--threads", "2,x"], "--threads takes positive integers"),
    (["--threads", "1,2", "--cell"], "several --threads take no --cell"),
    (["--threads", "1,2", "--packed"], "several --threads take no"),
])
def test_threads_mode_rejects_bad_arguments(argv, message, capsys):
    with pytest.raises(SystemExit):
        cli.main(argv)
    assert message in capsys.readouterr().err


def _row(shape, seconds, variable=None):
    modes, tokens = inputs.MODES, shape.batch * shape.seq_len
    reference, ours = {mode: seconds for mode in modes}, {mode: seconds / 3 for mode in modes}
    if variable is None:
        return layer.Row(shape, 15, tokens, reference, ours, peak_gflops=100.0)
    return packed.VariableRow(shape, 15, tokens, reference, ours, peak_gflops=100.0,
                              padded={mode: seconds / 2 for mode in modes}, variable=variable)


@pytest.mark.parametrize("variable", [None, "packed", "lengths"])
def test_terminal_table_fits_the_terminal_width(variable):
    # The widest labels and times a run prints: a 6-field shape, times up to 999999 ms.
    rows = [_row(Shape(1024, 10000, 4096, 4096, 12, True), 999.999, variable),
            _row(Shape(1, 1, 1, 1), 1e-6, variable)]
    table = layer.format_terminal_table(rows, packed.additions(variable) if variable else layer.Additions())
    assert max(len(line) for line in table.splitlines()) <= report.TERMINAL_WIDTH
    assert "1024,10000,4096,4096,12,yes" in table and "999999" in table
    assert ("vs dense" in table) == (variable is not None)
    assert ("with lengths=" in table) == (variable == "lengths") and ("PackedSequence" in table) == (variable == "packed")


def test_cell_terminal_table_fits_the_terminal_width():
    row = cell.CellRow(cell.CellShape(1024, 4096, 4096, 10000), 15,
                                 {"fwd": 99.0, "fwd_bwd": 999.0}, {"fwd": 33.0, "fwd_bwd": 333.0})
    table = cell.format_terminal_table([row])
    assert max(len(line) for line in table.splitlines()) <= report.TERMINAL_WIDTH
    assert "1024,4096,4096,10000" in table


def test_runs_without_tqdm(monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "tqdm", None)  # `import tqdm` raises ImportError
    monkeypatch.setattr(timing, "PEAK_SIZE", 64)
    rows = cli.main(["--shapes", "2,5,3,4", "1,2,3,4", "--rounds", "2", "--min-time", "0"])
    assert len(rows) == 2
    captured = capsys.readouterr()
    assert "[0/4 rounds] 2,5,3,4,1,no" in captured.err and "[2/4 rounds] 1,2,3,4,1,no" in captured.err
    assert "speedup" in captured.out


def test_plot_without_matplotlib_is_a_usage_error(monkeypatch, capsys):
    monkeypatch.setattr(cli.importlib.util, "find_spec", lambda name: None)  # nothing installed
    with pytest.raises(SystemExit):
        cli.main(["--shapes", "2,5,3,4", "--plot", "x.png"])
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


def _args(argv):
    """The arguments a mode gets from the command line."""
    args = cli.build_parser().parse_args(argv)
    args.command = "test"
    return args


TINY = ["--rounds", "1", "--min-time", "0", "--shape-budget", "0"]


@pytest.mark.parametrize("mode", ["layer", "packed", "lengths", "cell", "threads"])
def test_each_mode_runs_through_its_module_as_through_the_command_line(monkeypatch, capsys, tmp_path, mode):
    """The seam between the command line and a mode: the mode's own ``run`` on parsed arguments
    gives the rows and the printed table the command line gives."""
    monkeypatch.setattr(timing, "PEAK_SIZE", 64)
    shape = ["--shapes", "2,3,4,5"] if mode == "cell" else ["--shapes", "2,5,3,4,1,yes"]
    flags = {"layer": [], "packed": ["--packed"], "lengths": ["--lengths"], "cell": ["--cell"],
             "threads": ["--threads", "1,2"]}[mode]
    argv = flags + shape + TINY
    from_cli = cli.main(argv)
    printed_by_cli = capsys.readouterr().out

    device, args = torch.device("cpu"), _args(argv)
    if mode == "layer":
        rows = layer.run(args, parse_shapes(args.shapes), device)
    elif mode in ("packed", "lengths"):
        rows = packed.run(args, parse_shapes(args.shapes), device, mode)
    elif mode == "cell":
        rows = cell.run(args, cell.parse_cell_shapes(args.shapes), device)
    else:
        rows = threads.run(args, parse_shapes(args.shapes), device, threads.parse_threads(args.threads))
    printed = capsys.readouterr().out

    assert [type(row) for row in rows] == [type(row) for row in from_cli] and rows
    assert [row.shape for row in rows] == [row.shape for row in from_cli]
    assert all(row.speedup("fwd") > 0 and row.speedup("fwd_bwd") > 0 for row in rows)
    headers = lambda text: [line for line in text.splitlines() if "speedup" in line]  # noqa: E731
    assert headers(printed) == headers(printed_by_cli) and headers(printed)


def test_layer_mode_writes_the_files_it_is_given(monkeypatch, tmp_path):
    monkeypatch.setattr(timing, "PEAK_SIZE", 64)
    markdown, plot = tmp_path / "layer.md", tmp_path / "layer.png"
    args = _args(["--shapes", "2,5,3,4", *TINY, "--markdown", str(markdown), "--plot", str(plot)])
    (row,) = layer.run(args, parse_shapes(args.shapes), torch.device("cpu"))
    assert f"| {row.shape.label} | 1 |" in markdown.read_text() and "- command: test" in markdown.read_text()
    assert plot.read_bytes().startswith(b"\x89PNG")


def test_packed_rows_add_fill_and_ratio_columns_to_the_layer_tables():
    rows = [_row(Shape(4, 10, 3, 5), 1e-3, "packed")]
    rows[0].tokens = 20
    markdown = layer.format_markdown_table(rows, packed.additions("packed"))
    header, _, line = markdown.splitlines()
    assert header.endswith("| fill % | fwd packed/padded | fwd+bwd packed/padded |")
    assert line.endswith("| 50 | 0.67 | 0.67 |")  # 20 of 40 tokens; (1/3) / (1/2)
    assert "fill" not in layer.format_markdown_table([_row(Shape(4, 10, 3, 5), 1e-3)])


def test_python_dash_m_runs_a_mode():
    import subprocess

    from reference import subprocess_env

    result = subprocess.run([sys.executable, "-m", "rnn_ext.benchmark", "--cell", "--shapes", "1,2,3,2", *TINY],
                            env=subprocess_env(), capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "1,2,3,2" in result.stdout and "us/step" in result.stdout


def test_no_module_of_the_package_imports_one_that_imports_it():
    """Data flows one way (command line -> mode -> timing and report): the package's imports of its
    own modules form no cycle."""
    import ast
    import pathlib

    import rnn_ext.bench

    package = pathlib.Path(rnn_ext.bench.__file__).parent
    imports = {}
    for path in package.glob("*.py"):
        tree = ast.parse(path.read_text())
        found = set()
        for node in ast.walk(tree):
            if not isinstance(node, ast.ImportFrom):
                continue
            module = node.module or ""
            if node.level == 0:
                if not module.startswith("rnn_ext.bench"):
                    continue
                module = module.removeprefix("rnn_ext.bench").lstrip(".")
            found |= {module.split(".")[0]} if module else {alias.name for alias in node.names}
        imports[path.stem] = found & {p.stem for p in package.glob("*.py")}
    assert imports["cli"] >= {"layer", "packed", "cell", "threads"}

    def reaches(start, target, seen=()):
        return any(name == target or (name not in seen and reaches(name, target, (*seen, name)))
                   for name in imports[start])

    assert [name for name in imports if reaches(name, name)] == []
