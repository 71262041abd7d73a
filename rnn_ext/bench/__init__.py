"""rnn_ext's benchmark against torch.nn.RNN, as a small package (the command: ``rnn-ext-benchmark``,
``python -m rnn_ext.benchmark``; see ``cli``).

Data flows one way: ``cli`` parses the command line and runs one mode; a mode measures shapes and
reports them; the modes build on the shared modules below them, and no module imports one that
imports it.

* ``cli``: the arguments, their checks, and the choice of mode.
* modes: ``layer`` (rnn_ext.RNN against nn.RNN, dense batches), ``packed`` (``--packed`` and
  ``--lengths``: variable-length batches, built on ``layer``), ``cell`` (``--cell``: loops of
  RNNCell), ``threads`` (``--threads 1,2,4,8,16``: thread scaling).
* shared: ``shapes`` (layer shapes and their syntax), ``inputs`` (models with the same weights,
  batches, the functions timed), ``timing`` (interleaved rounds, medians, the SGEMM peak),
  ``report`` (terminal and markdown tables, progress, plots).
"""
