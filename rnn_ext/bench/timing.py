"""Timing: ``time_interleaved`` (rounds of one sample per function, medians) with a CPU or CUDA
timer that runs with the garbage collector off, and this machine's SGEMM peak."""
import gc
import math
import statistics
import time

import torch

PEAK_SIZE = 2048
PEAK_SAMPLES = 5
MIN_ROUNDS = 3


def without_gc(timer):
    """``timer`` with Python's garbage collector off while it runs, as ``timeit`` does: a
    collection then lands in no sample, whichever function's garbage set it off."""

    def timed(fn, n):
        enabled = gc.isenabled()
        gc.disable()
        try:
            return timer(fn, n)
        finally:
            if enabled:
                gc.enable()

    return timed


def make_timer(device):
    """``timer(fn, n)`` -> seconds per call of ``fn`` over ``n`` back-to-back calls."""
    if device.type == "cuda":

        def cuda_timer(fn, n):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            torch.cuda.synchronize(device)
            start.record()
            for _ in range(n):
                fn()
            end.record()
            end.synchronize()
            return start.elapsed_time(end) / 1e3 / n

        return without_gc(cuda_timer)

    def cpu_timer(fn, n):
        start = time.perf_counter()
        for _ in range(n):
            fn()
        return (time.perf_counter() - start) / n

    return without_gc(cpu_timer)


def calls_per_sample(fn, timer, min_time):
    """Warms ``fn`` up with a timed call, and when that was shorter than ``min_time`` times one
    more; returns ``(calls per sample of at least min_time seconds, seconds per call)``."""
    seconds = timer(fn, 1)
    if seconds < min_time:
        seconds = timer(fn, 1)
    return max(1, math.ceil(min_time / max(seconds, 1e-9))), seconds


def time_interleaved(fns, timer, rounds, min_time, budget=0.0, on_round=None):
    """Median seconds per call of each of ``fns`` (a name -> callable dict), timed in rounds.

    Each round takes one sample (of enough calls to last ``min_time``, after one untimed call) of
    every function, in an order reversed every other round. ``budget`` (seconds for warm-up and rounds, 0: none) lowers
    the rounds when they are slow, down to MIN_ROUNDS (or ``rounds`` if fewer). Returns
    ``(medians, rounds_run)``.
    """
    start = time.perf_counter()
    counts, round_cost = {}, 0.0
    for name, fn in fns.items():
        counts[name], seconds = calls_per_sample(fn, timer, min_time)
        round_cost += counts[name] * seconds
    if budget > 0:
        left = budget - (time.perf_counter() - start)
        rounds = min(rounds, max(MIN_ROUNDS, int(left / max(round_cost, 1e-9))))
    samples = {name: [] for name in fns}
    names = list(fns)
    for index in range(rounds):
        for name in names if index % 2 == 0 else reversed(names):
            fns[name]()  # untimed: the sample does not pay for the caches and threads the last function left
            samples[name].append(timer(fns[name], counts[name]))
        if on_round is not None:
            on_round()
    return {name: statistics.median(values) for name, values in samples.items()}, rounds


def sgemm_seconds(device, timer):
    """Seconds of each of PEAK_SAMPLES PEAK_SIZE-cubed float32 ``torch.mm`` runs (after a warm-up)."""
    gen = torch.Generator().manual_seed(0)
    a, b = (torch.randn(PEAK_SIZE, PEAK_SIZE, generator=gen).to(device) for _ in range(2))
    timer(lambda: torch.mm(a, b), 1)
    return [timer(lambda: torch.mm(a, b), 1) for _ in range(PEAK_SAMPLES)]


def sgemm_gflops(seconds):
    """GFLOP/s of the fastest run: a busy machine only slows runs down, so the fastest is the
    steadiest estimate of what the machine can do (a median drifts with the load)."""
    return 2 * PEAK_SIZE**3 / min(seconds) / 1e9


def peak_description():
    """How the SGEMM peak was measured, for a report's header."""
    return (f"{PEAK_SIZE}^3 float32 torch.mm, fastest of {PEAK_SAMPLES} runs before and {PEAK_SAMPLES} after "
            "the shapes")
