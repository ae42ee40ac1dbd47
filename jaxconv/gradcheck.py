"""Hand-written gradients against autodiff and finite differences.

* :func:`random_op_cases` / :func:`op_error` — every ``*_vjp`` of :mod:`jaxconv.grads` against
  ``jax.vjp`` over random configurations.
* :func:`model_report` — per parameter of a registered model: manual backprop vs ``jax.grad`` vs a
  central finite difference along a random direction, in float32 and float64.

Relative error of a tensor is ``max|a - b| / max|b|``; where a true gradient is (near) zero — a
conv bias feeding BatchNorm, say — the denominator is floored at ``1e-6 * max|grad|`` over the
whole model, so round-off on a zero gradient does not read as a large relative error.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from jaxconv import functional as F
from jaxconv import grads as G
from jaxconv.backprop import manual_value_and_grad
from jaxconv.models import create_model

TOLERANCE = {"float64": 1e-10, "float32": 1e-4}


def rel_error(a, b, floor: float = 0.0) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.max(np.abs(a - b), initial=0.0) / max(np.max(np.abs(b), initial=0.0), floor, 1e-300))


# --------------------------------------------------------------------------- per-op random cases


def _ints(rng, lo, hi, n):
    return tuple(int(v) for v in rng.integers(lo, hi, n))


def _padding(rng, n_sp, *, causal_ok=True):
    kinds = ["VALID", "SAME", "int", "per-axis", "pairs"] + (["CAUSAL"] if n_sp == 1 and causal_ok else [])
    kind = str(rng.choice(kinds))
    if kind == "int":
        return int(rng.integers(0, 3))
    if kind == "per-axis":
        return list(_ints(rng, 0, 3, n_sp))
    if kind == "pairs":
        return [_ints(rng, 0, 3, 2) for _ in range(n_sp)]
    return kind


def _conv_case(rng, n_sp, dtype):
    c = int(rng.choice([2, 4]))
    groups = int(rng.choice([1, 2, c]))  # dense, grouped, depthwise
    c_out = groups * int(rng.integers(1, 3))
    kernel, stride, dilation = _ints(rng, 1, 4, n_sp), _ints(rng, 1, 4, n_sp), _ints(rng, 1, 4, n_sp)
    size = _ints(rng, 9, 13, n_sp)
    x = rng.normal(size=(2, *size, c)).astype(dtype)
    w = rng.normal(size=(*kernel, c // groups, c_out)).astype(dtype)
    b = rng.normal(size=(c_out,)).astype(dtype)
    return F.conv, (x, w, b), dict(stride=stride, padding=_padding(rng, n_sp), dilation=dilation, groups=groups)


def _conv_transpose_case(rng, n_sp, dtype):
    """A PyTorch-expressible case, half the time with ``"SAME"`` or asymmetric ``(lo, hi)`` padding
    (each side within the case's own crop bound, so the output is never empty)."""
    x, w, b, options = torch_conv_transpose_case(rng, n_sp)
    kind = str(rng.choice(["int", "SAME", "pairs"]))
    if kind == "SAME":
        options.update(padding="SAME", output_padding=0)
    elif kind == "pairs":
        options["padding"] = [(int(rng.integers(0, p + 1)), int(rng.integers(0, p + 1))) for p in options["padding"]]
    return F.conv_transpose, tuple(a.astype(dtype) for a in (x, w, b)), options


def torch_conv_transpose_case(rng, n_sp, *, max_size: int = 6):
    """A random ``conv_transpose`` call PyTorch can express too (symmetric int padding, at most what
    its ``dilation * (K - 1)`` allows): ``(x, w, b, options)`` as NumPy float64, w in jaxconv's layout."""
    groups = int(rng.choice([1, 2, 3]))
    c_in, c_out = groups * int(rng.integers(1, 3)), groups * int(rng.integers(1, 3))
    k, s, d = (_ints(rng, 1, 4, n_sp) for _ in range(3))
    op = tuple(int(rng.integers(0, max(si, di))) for si, di in zip(s, d))
    pad = tuple(int(rng.integers(0, (di * (ki - 1)) // 2 + 1)) for ki, di in zip(k, d))
    x = rng.normal(size=(2, *rng.integers(2, max_size, n_sp), c_in))
    w = rng.normal(size=(*k, c_in, c_out // groups))
    return x, w, rng.normal(size=c_out), dict(stride=s, padding=pad, output_padding=op, dilation=d, groups=groups)


def _pool_case(rng, n_sp, dtype, forward):
    window, stride = _ints(rng, 1, 4, n_sp), _ints(rng, 1, 4, n_sp)
    x = rng.normal(size=(2, *_ints(rng, 6, 10, n_sp), 3)).astype(dtype)
    options = dict(stride=stride, padding=_padding(rng, n_sp, causal_ok=False))
    if forward is F.avg_pool:
        options["count_include_pad"] = bool(rng.integers(0, 2))
    return forward, (x, window), options


def random_op_cases(rng, per_op: int, dtype=np.float64):
    """``(name, forward, args, options)`` for every op with a hand-written vjp, ``per_op`` each."""
    for i in range(per_op):
        n_sp = 1 + i % 2
        yield "conv", *_conv_case(rng, n_sp, dtype)
        yield "max_pool", *_pool_case(rng, n_sp, dtype, F.max_pool)
        yield "avg_pool", *_pool_case(rng, n_sp, dtype, F.avg_pool)
        x = rng.normal(size=(3, *_ints(rng, 2, 6, n_sp), 4)).astype(dtype)
        yield "global_avg_pool", F.global_avg_pool, (x,), {}
        yield "relu", F.relu, (x,), {}
        yield "flatten", F.flatten, (x,), {}
        yield "batch_norm_train", F.batch_norm_train, (x, rng.normal(size=4).astype(dtype),
                                                       rng.normal(size=4).astype(dtype)), {}
        stats = (rng.normal(size=4).astype(dtype), rng.uniform(0.5, 2, 4).astype(dtype))
        yield "batch_norm", F.batch_norm, (x, rng.normal(size=4).astype(dtype), rng.normal(size=4).astype(dtype),
                                           *stats), {}
        yield "dropout", F.dropout, (x, jax.random.key(i)), dict(drop_rate=float(rng.uniform(0.1, 0.7)))
        yield "conv_transpose", *_conv_transpose_case(rng, n_sp, dtype)
        yield "add", F.add, (x, rng.normal(size=x.shape).astype(dtype)), {}
        yield "concat", F.concat, ([x, rng.normal(size=(*x.shape[:-1], 2)).astype(dtype)],), {}
        yield "identity", F.identity, (x,), {}
        yield "upsample", F.upsample, (x, _ints(rng, 1, 4, n_sp)), dict(method=str(rng.choice(["nearest",
                                                                                               "bilinear"])))
        affine = (rng.normal(size=4).astype(dtype), rng.normal(size=4).astype(dtype))
        yield "layer_norm", F.layer_norm, (x, *affine), {}
        yield "group_norm", F.group_norm, (x, *affine), dict(num_groups=int(rng.choice([1, 2, 4])))
        d_in, d_out = _ints(rng, 1, 9, 2)
        yield "dense", F.dense, (rng.normal(size=(5, d_in)).astype(dtype), rng.normal(size=(d_in, d_out)).astype(dtype),
                                 rng.normal(size=d_out).astype(dtype)), {}
        z = (rng.normal(size=(6, 5)) * 3).astype(dtype)
        yield "log_softmax", F.log_softmax, (z,), {}
        yield "softmax", F.softmax, (z,), {}
        yield "cross_entropy", F.cross_entropy, (z, rng.integers(0, 5, 6)), dict(
            label_smoothing=float(rng.choice([0.0, 0.1])), reduction=str(rng.choice(["mean", "sum", "none"])))


def op_error(forward, args, options, rng) -> float:
    """Worst relative error of the hand-written vjp against ``jax.vjp``, over all differentiable args (both in one
    compiled program: op by op, each primitive of either would compile on its own)."""
    n_arrays, n_diff = G._RULES[forward][1:]
    arrays = [jax.tree.map(jnp.asarray, a) for a in args[:n_arrays]]
    rest = args[n_arrays:]
    y = jax.eval_shape(lambda *a: forward(*a, *rest, **options), *arrays)
    g = jnp.asarray(rng.normal(size=y.shape), y.dtype)

    @jax.jit
    def both(arrays, g):
        diff, fixed = arrays[:n_diff], arrays[n_diff:]
        _, vjp = jax.vjp(lambda *d: forward(*d, *fixed, *rest, **options), *diff)
        got = G.vjp_of(forward)(g, *arrays, *rest, **options)
        return (got if isinstance(got, tuple) else (got,)), vjp(g)
    got, want = both(arrays, g)
    return max(rel_error(a, b) for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want)))


# --------------------------------------------------------------------------- whole models


def random_batch(model, n, seed, dtype):
    """Random inputs and labels for ``model``: ``[n]`` classes, or ``[n, *spatial]`` for a per-position model."""
    key_x, key_y = jax.random.split(jax.random.key(seed))
    x = jax.random.normal(key_x, (n, *model.input_shape), dtype)
    *positions, classes = model.output_shape(model.input_shape)
    return x, jax.random.randint(key_y, (n, *positions), 0, classes)


def model_report(name: str, *, batch: int = 8, seed: int = 0, fd_steps: tuple = (1e-6, 1e-7)):
    """Rows ``(dtype, param path, max abs err, rel err manual-vs-auto, rel err manual-vs-FD)``.

    float64 rows compare against a central difference along a random unit direction per tensor,
    taking the better of ``fd_steps``. ReLU and max-pool make the loss piecewise smooth: a step that
    carries some pre-activations across a kink reads an error that shrinks with the step (seed_cnn's
    first kernel read 1.8e-3 at 1e-5 and 6.5e-16 against autodiff; resnet20's stem BatchNorm scale,
    batch 4, read 4.4e-2 at 1e-4, 2.3e-3 at 1e-5 and 7.4e-9 at 1e-6; a block deeper read 3.8e-3 at
    1e-6 and 6.9e-9 at 1e-7), while float64 round-off grows below 1e-7.
    float32 rows run at ``Precision.HIGHEST`` and compare manual to autodiff only (a float32 finite
    difference is too coarse to say anything at 1e-4).
    """
    rows = []
    for dtype in (jnp.float64, jnp.float32):
        model = create_model(name, seed=seed, param_dtype=dtype)
        graphdef, params, rest = nnx.split(model, nnx.Param, ...)
        x, y = random_batch(model, batch, seed, dtype)

        @jax.jit  # compiled once; the finite differences call it twice per step size and tensor
        def loss_fn(p, r=rest):
            return F.cross_entropy(nnx.merge(graphdef, p, r, copy=True)(x), y)

        with jax.default_matmul_precision("highest"):
            _, manual = jax.jit(lambda p: manual_value_and_grad(model, p, x, y))(params)
            auto = jax.grad(loss_fn)(params)
        flat_m, flat_a = nnx.to_flat_state(manual), nnx.to_flat_state(auto)
        scale = max(float(jnp.max(jnp.abs(v[...]))) for v in flat_a.leaves)
        fd_rng = np.random.default_rng(seed)
        for (path, gm), (_, ga) in zip(flat_m, flat_a):
            gm, ga = np.asarray(gm[...]), np.asarray(ga[...])
            fd_err = float("nan")
            if dtype == jnp.float64:
                direction = fd_rng.normal(size=gm.shape)
                direction /= np.linalg.norm(direction)
                shift = lambda h: _shift(params, path, h * direction)
                analytic = float(np.sum(gm * direction))
                errors = []
                for h in fd_steps:
                    with jax.default_matmul_precision("highest"):
                        fd = (float(loss_fn(shift(h))) - float(loss_fn(shift(-h)))) / (2 * h)
                    errors.append(abs(fd - analytic) / max(abs(fd), 1e-6 * scale))
                fd_err = min(errors)
            rows.append((jnp.dtype(dtype).name, "/".join(map(str, path[1:])), float(np.max(np.abs(gm - ga))),
                         rel_error(gm, ga, 1e-6 * scale), fd_err))
    return rows


def _shift(params, path, delta):
    flat = [(p, v.replace(v[...] + delta) if p == path else v) for p, v in nnx.to_flat_state(params)]
    return nnx.from_flat_state(flat)


def step_time_ratio(name: str, *, batch: int = 128, rounds: int = 30, seed: int = 0):
    """Median seconds of a jitted SGD training step with ``grad="manual"`` and ``grad="auto"``, compiled
    first, then timed alternately (:func:`jaxconv.timing.medians`, ``2 * rounds`` timed steps each)."""
    from jaxconv.timing import jitted_train_step, medians, step_runner
    runs = {}
    for grad in ("auto", "manual"):
        model = create_model(name, seed=seed, grad=grad)
        step, state = jitted_train_step(model, *random_batch(model, batch, seed, jnp.float32), optax.sgd(0.01))
        runs[grad] = step_runner(step, state)
        runs[grad]()
    med = medians(runs, steps=2 * rounds)
    return med["manual"], med["auto"]
