"""Smoke test of ``python -m rnn_ext.benchmark`` and its shape parsing (no real timing)."""
import pytest

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


@pytest.mark.parametrize("packed", [False, True])
def test_main_writes_table_markdown_and_plot(tmp_path, monkeypatch, packed):
    monkeypatch.setattr(benchmark, "PEAK_SIZE", 64)  # the real 2048^3 peak takes seconds
    markdown, plot = tmp_path / "bench.md", tmp_path / "bench.png"
    argv = ["--shapes", "2,5,3,4,1,yes", "--rounds", "1", "--min-time", "0"]
    argv += ["--markdown", str(markdown), "--plot", str(plot)]
    rows = benchmark.main(argv + (["--packed"] if packed else []))

    assert len(rows) == 1 and rows[0].rounds == 1 and rows[0].packed == packed
    text = markdown.read_text()
    assert "| shape B,L,I,H,layers,bidir | rounds | fwd nn.RNN ms | fwd rnn_ext ms | fwd speedup |" in text
    assert "| 2,5,3,4,1,yes | 1 |" in text
    assert ("packed/padded" in text) == packed
    assert "- dtype: float32" in text and "- threads: " in text and "- SGEMM peak: " in text
    assert "{" not in text  # every header field was formatted
    assert plot.read_bytes().startswith(b"\x89PNG")
