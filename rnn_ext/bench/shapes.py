"""Layer shapes ``B,L,I,H[,layers[,bidir]]``: the named sets, the ``--shapes`` syntax and the FLOPs
a shape costs."""
from dataclasses import dataclass


@dataclass(frozen=True)
class Shape:
    batch: int
    seq_len: int
    input_size: int
    hidden_size: int
    num_layers: int = 1
    bidirectional: bool = False

    @property
    def directions(self):
        return 2 if self.bidirectional else 1

    @property
    def label(self):
        """The shape in ``--shapes`` syntax: B,L,I,H,layers,yes|no."""
        bidir = "yes" if self.bidirectional else "no"
        return f"{self.batch},{self.seq_len},{self.input_size},{self.hidden_size},{self.num_layers},{bidir}"


SHAPE_SETS = {
    "default": (
        Shape(1, 100, 32, 32),
        Shape(8, 100, 64, 64),
        Shape(1, 1000, 64, 256),
        Shape(8, 1000, 256, 256, 2),
        Shape(32, 200, 128, 128),
        Shape(16, 50, 128, 128, 2, True),
        Shape(64, 100, 256, 256, 2),
        Shape(128, 50, 1024, 1024),
    ),
    "packed": (
        Shape(32, 200, 64, 64),
        Shape(64, 500, 128, 128),
    ),
    "lengths": (
        Shape(32, 200, 64, 64),
        Shape(64, 500, 128, 128),
        Shape(16, 1000, 32, 32),
        Shape(128, 100, 256, 256),
        Shape(8, 100, 64, 64),
        Shape(256, 50, 64, 64),
        Shape(32, 100, 128, 128, 2, True),
        Shape(64, 200, 512, 512),
    ),
}
_BOOLS = {"yes": True, "y": True, "true": True, "1": True, "no": False, "n": False, "false": False, "0": False}
SHAPE_SYNTAX = "B,L,I,H[,layers[,bidir]] with positive integers and bidir one of yes/no/true/false/1/0"


def parse_shape(text):
    """``"B,L,I,H[,layers[,bidir]]"`` -> Shape; ValueError naming the problem otherwise."""
    fields = [field.strip() for field in text.split(",")]
    if not 4 <= len(fields) <= 6:
        raise ValueError(f"shape {text!r}: expected {SHAPE_SYNTAX}; got {len(fields)} fields")
    bidirectional = False
    if len(fields) == 6:
        bidir = fields.pop().lower()
        if bidir not in _BOOLS:
            raise ValueError(f"shape {text!r}: bidir must be one of yes/no/true/false/1/0, got {bidir!r}")
        bidirectional = _BOOLS[bidir]
    names = ("B", "L", "I", "H", "layers")
    sizes = []
    for name, field in zip(names, fields):
        if not field.isdigit() or int(field) <= 0:
            raise ValueError(f"shape {text!r}: {name} must be a positive integer, got {field!r}")
        sizes.append(int(field))
    return Shape(*sizes, bidirectional=bidirectional)


def parse_shapes(tokens):
    """Each token is a named set (``default``, ``packed``) or one shape; returns the shapes in order."""
    shapes = []
    for token in tokens:
        if token in SHAPE_SETS:
            shapes.extend(SHAPE_SETS[token])
        elif "," in token:
            shapes.append(parse_shape(token))
        else:
            raise ValueError(f"unknown shape set {token!r}: use one of {', '.join(SHAPE_SETS)} or {SHAPE_SYNTAX}")
    return shapes


def forward_flops(shape, tokens):
    """Multiply-adds x 2 of every layer's input and recurrent GEMMs over ``tokens`` (B*L dense)."""
    total = 0
    for layer in range(shape.num_layers):
        layer_input = shape.input_size if layer == 0 else shape.directions * shape.hidden_size
        total += 2 * (layer_input * shape.hidden_size + shape.hidden_size**2) * tokens * shape.directions
    return total
