"""``python -m rnn_ext.benchmark``: the same as the ``rnn-ext-benchmark`` command, which times
``rnn_ext.RNN`` against ``torch.nn.RNN`` (and ``--cell``, ``--threads``, ``--packed``, ``--lengths``).

The benchmark itself is the package ``rnn_ext.bench``: ``cli`` (the command line), one module per
mode, and the shapes, inputs, timing and reports they share. Run ``rnn-ext-benchmark --help``.
"""
from rnn_ext.bench.cli import main

if __name__ == "__main__":
    main()
