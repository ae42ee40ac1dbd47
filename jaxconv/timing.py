"""Timing steps on a noisy machine: one sampler for ``jaxconv bench``, ``jaxconv gradcheck``'s step-time ratio
and the benchmark scripts, and the jitted training step they time.

:func:`time_calls` alternates the contenders round by round, so that load on the machine slows all of
them alike, and in each round leaves a contender's first call untimed when ``block > 1``: measured here,
the busy-waiting threads one library leaves behind (OpenMP's in PyTorch, Eigen's in XLA) otherwise get
charged to the next contender's first call. Only ratios of its medians are meant to be cited.
"""
from __future__ import annotations

import time
from typing import Callable

import jax
import numpy as np
import optax
from flax import nnx

from jaxconv import compiler
from jaxconv import functional as F


def time_calls(runs: dict[str, Callable[[], object]], *, steps: int = 20, warmup: int = 2,
               block: int = 3) -> dict[str, dict]:
    """For each ``runs[name]`` (a call that waits for its own result): its first call's seconds, then
    ``steps`` timed calls. After ``warmup`` untimed rounds, each round calls every contender ``block`` times
    in a row and times all but the first of them (every call when ``block`` is 1).

    Returns ``{name: {"first_s", "median_s", "q25_s", "q75_s", "samples", "times_s"}}``; ``times_s`` are the timed
    calls in order, so that the i-th of every contender comes from the same round (:func:`ratio_quartiles`)."""
    if steps < 1 or block < 1 or warmup < 0:
        raise ValueError(f"time_calls: steps and block must be >= 1 and warmup >= 0, got {steps}, {block}, {warmup}")
    first = {}
    for name, run in runs.items():
        start = time.perf_counter()
        run()
        first[name] = time.perf_counter() - start
    for _ in range(warmup):
        for run in runs.values():
            run()
    timed_per_round = max(block - 1, 1)
    samples = {name: [] for name in runs}
    while len(next(iter(samples.values()))) < steps:
        for name, run in runs.items():
            if block > 1:
                run()
            for _ in range(timed_per_round):
                start = time.perf_counter()
                run()
                samples[name].append(time.perf_counter() - start)
    return {name: dict(first_s=first[name], median_s=float(np.median(s[:steps])),
                       q25_s=float(np.percentile(s[:steps], 25)), q75_s=float(np.percentile(s[:steps], 75)),
                       samples=len(s[:steps]), times_s=list(s[:steps])) for name, s in samples.items()}


def ratio_quartiles(theirs: dict, ours: dict) -> tuple[float, float]:
    """The 25th and 75th percentiles of ``theirs``' time over ``ours``, call by call within a round (two
    :func:`time_calls` results): the spread of our speed-up, what a single ratio of medians does not show. It
    measures the noise within one run; on a machine whose speed drifts between runs, a ratio can move more than
    that from one run to the next."""
    ratios = np.asarray(theirs["times_s"]) / np.asarray(ours["times_s"])
    return float(np.percentile(ratios, 25)), float(np.percentile(ratios, 75))


def medians(runs: dict, *, steps: int = 60, block: int = 3) -> dict[str, float]:
    """Median seconds per call of each contender (:func:`time_calls`, compiled beforehand by its caller)."""
    return {name: t["median_s"] for name, t in time_calls(runs, steps=steps, warmup=0, block=block).items()}


def jitted_train_step(model, x, y, tx, *, jit=compiler.jit):
    """A jitted ``step(params, opt_state, rest) -> (params, opt_state, rest, loss)`` for ``model`` on a
    fixed batch, and its initial ``(params, opt_state, rest)``: what the timing scripts run.

    ``jit`` compiles it: jaxconv's (with :mod:`jaxconv.compiler`'s options) unless told otherwise,
    e.g. ``jit=jax.jit`` for XLA's defaults."""
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)

    @jit
    def step(p, opt_state, r):
        def loss_fn(p):
            m = nnx.merge(graphdef, p, r, copy=True)
            return F.cross_entropy(m(x), y), nnx.state(m, nnx.Not(nnx.Param))
        (loss, r), g = jax.value_and_grad(loss_fn, has_aux=True)(p)
        updates, opt_state = tx.update(g, opt_state, p)
        return optax.apply_updates(p, updates), opt_state, r, loss

    return step, (params, tx.init(params), rest)


def step_runner(step, state):
    """A no-argument call that advances ``step``'s state by one step and waits for the loss."""
    state = list(state)

    def run():
        *state[:], loss = step(*state)
        jax.block_until_ready(loss)
    return run
