"""oneDNN's convolutions on a CPU (jaxconv.onednn builds the caller; jaxconv.onednn_conv's primitives use it):
the same numbers as XLA's convolutions in every direction of differentiation, the custom calls in the CPU program
and XLA's convolutions elsewhere, and XLA's convolutions wherever oneDNN cannot run."""
import os
import platform
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import lax

from jaxconv import functional as F
from jaxconv import grads as G
from jaxconv import onednn, onednn_conv
from jaxconv.gradcheck import rel_error

LINUX_X86 = platform.system() == "Linux" and platform.machine() in ("x86_64", "AMD64")
needs_onednn = pytest.mark.skipif(not onednn.available(), reason=f"oneDNN: {onednn.status()[1]}")


def test_onednn_is_built_where_the_package_installs_it():
    # on Linux x86-64 the package is a dependency: a failed build must fail here, not fall back unseen
    if not LINUX_X86:
        pytest.skip("onednn-devel-cpu-gomp is a dependency on Linux x86-64 only")
    if not (os.environ.get("CXX") or shutil.which("g++") or shutil.which("c++")):
        pytest.skip("no C++ compiler on this machine: convolutions are XLA's")
    ok, where = onednn.status()
    assert ok, where
    assert where.endswith(".so")


def _xla(x, w, stride, pads, dilation):
    return lax.conv_general_dilated(x, w, stride, pads, rhs_dilation=dilation,
                                    dimension_numbers=F.conv_dimension_numbers(x.ndim - 2))


def _configurations(rng, count):
    """Random one-group convs: 1-3 spatial axes, strides and dilations 1-3, asymmetric pads (the floor of a stride
    leaving input rows unread included), 1-7 channels in and out."""
    made = 0
    while made < count:
        n_sp = int(rng.integers(1, 4))
        kernel = tuple(int(k) for k in rng.integers(1, 4, n_sp))
        stride = tuple(int(s) for s in rng.integers(1, 4, n_sp))
        dilation = tuple(int(d) for d in rng.integers(1, 3, n_sp))
        pads = tuple((int(lo), int(hi)) for lo, hi in rng.integers(0, 3, (n_sp, 2)))
        spatial = tuple(int(s) for s in rng.integers(4, 9 if n_sp < 3 else 6, n_sp))
        if any(o < 1 for o in F.output_spatial(spatial, pads, kernel, stride, dilation)):
            continue
        made += 1
        yield (int(rng.integers(1, 4)), spatial, int(rng.integers(1, 8)), int(rng.integers(1, 8)), kernel, stride,
               dilation, pads)


@needs_onednn
def test_the_three_kernels_equal_xla_convolutions_on_random_configurations(rng):
    for batch, spatial, c_in, c_out, kernel, stride, dilation, pads in _configurations(rng, 16):
        x = jnp.asarray(rng.normal(size=(batch, *spatial, c_in)), jnp.float32)
        w = jnp.asarray(rng.normal(size=(*kernel, c_in, c_out)), jnp.float32)
        geometry = dict(stride=stride, pads=pads, dilation=dilation)

        def mine(x, w, g):
            y = onednn_conv.conv(x, w, **geometry)
            return (y, onednn_conv.input_grad(g, w, spatial, **geometry),
                    onednn_conv.weight_grad(x, g, kernel, **geometry))

        def xla(x, w, g):
            y, back = jax.vjp(lambda x, w: _xla(x, w, stride, pads, dilation), x, w)
            return (y, *back(g))
        g = jnp.asarray(rng.normal(size=jax.eval_shape(lambda: _xla(x, w, stride, pads, dilation)).shape),
                        jnp.float32)
        got, want = jax.jit(mine)(x, w, g), jax.jit(xla)(x, w, g)
        for what, a, b in zip(("conv", "input grad", "weight grad"), got, want):
            assert a.shape == b.shape
            assert rel_error(a, b) <= 2e-6, (what, batch, spatial, c_in, c_out, kernel, stride, dilation, pads)


@needs_onednn
def test_functional_conv_runs_onednn_on_a_cpu_and_xla_convolutions_elsewhere(rng):
    x = jnp.asarray(rng.normal(size=(2, 9, 9, 5)), jnp.float32)
    w = jnp.asarray(rng.normal(size=(3, 3, 5, 6)), jnp.float32)
    loss = lambda x, w: jnp.sum(jnp.sin(F.conv(x, w, stride=2, padding=1)))
    for fn in (loss, jax.grad(loss, (0, 1))):
        text = jax.jit(fn).lower(x, w).compile().as_text()
        assert "jaxconv_onednn_conv" in text and " convolution(" not in text
        for platform_ in ("cuda", "tpu"):
            module = jax.export.export(jax.jit(fn), platforms=[platform_])(x, w).mlir_module()
            assert "convolution" in module and "jaxconv_onednn" not in module
    text = jax.jit(jax.grad(loss, (0, 1))).lower(x, w).compile().as_text()
    assert "jaxconv_onednn_input_grad" in text and "jaxconv_onednn_weight_grad" in text
    # float64 is XLA's (oneDNN has no float64 convolution)
    assert not onednn_conv.runs(np.zeros(x.shape), np.zeros(w.shape), ((1, 1), (1, 1)))
    assert not onednn_conv.runs(x, w, ((-1, 1), (1, 1)))  # negative padding crops: XLA's
    assert not onednn_conv.runs(x[:, 0], w[0], ((1, 1),))  # 1-D: XLA's (whole MNIST-1D steps were slower)


@needs_onednn
def test_every_derivative_through_onednn_equals_xla(rng):
    """Reverse mode, forward mode, reverse over reverse, the hessian and vmap over the data, the weights and both:
    the transposes written in jaxconv.onednn_conv against XLA's convolution's own."""
    x = jnp.asarray(rng.normal(size=(2, 7, 6, 3)), jnp.float32)
    w = jnp.asarray(rng.normal(size=(3, 2, 3, 4)), jnp.float32)
    options = dict(stride=(2, 1), padding=((1, 0), (2, 1)), dilation=(1, 2))
    mine = lambda x, w: jnp.sum(jnp.sin(F.conv(x, w, **options)))
    xla = lambda x, w: jnp.sum(jnp.sin(_xla(x, w, (2, 1), ((1, 0), (2, 1)), (1, 2))))
    grad_of_grad = lambda f: jax.grad(lambda x, w: jnp.sum(jax.grad(f, (0, 1))(x, w)[0] ** 2), (0, 1))
    forward = lambda f: lambda x, w: jax.jvp(f, (x, w), (jnp.cos(x), -w))[1]
    xs, ws = jnp.stack([x, 2 * x]), jnp.stack([w, -w])
    cases = [
        (lambda f: jax.grad(f, (0, 1)), (x, w)), (forward, (x, w)), (grad_of_grad, (x, w)),
        (lambda f: jax.hessian(f, 1), (x, w)),
        *[(lambda f, axes=axes: jax.vmap(jax.grad(f, (0, 1)), axes), (xs if axes[0] == 0 else x,
                                                                       ws if axes[1] == 0 else w))
          for axes in ((0, None), (None, 0), (0, 0))]]
    for transform, args in cases:
        for a, b in zip(jax.tree.leaves(jax.jit(transform(mine))(*args)),
                        jax.tree.leaves(jax.jit(transform(xla))(*args))):
            assert rel_error(a, b) <= 5e-6


@needs_onednn
def test_the_hand_written_backward_runs_the_same_kernels(rng):
    x = jnp.asarray(rng.normal(size=(3, 8, 8, 4)), jnp.float32)
    w = jnp.asarray(rng.normal(size=(3, 3, 4, 5)), jnp.float32)
    g = jnp.asarray(rng.normal(size=(3, 4, 4, 5)), jnp.float32)
    by_hand = jax.jit(lambda g, x, w: G.conv_vjp(g, x, w, stride=2, padding=1))
    assert "jaxconv_onednn_weight_grad" in by_hand.lower(g, x, w).compile().as_text()
    dx, dw, db = by_hand(g, x, w)
    want = jax.vjp(lambda x, w: _xla(x, w, (2, 2), ((1, 1), (1, 1)), (1, 1)), x, w)[1](g)
    assert rel_error(dx, want[0]) <= 2e-6 and rel_error(dw, want[1]) <= 2e-6
    np.testing.assert_allclose(db, g.sum((0, 1, 2)), rtol=1e-6)


@needs_onednn
def test_bfloat16_convs_stay_within_bfloat16_rounding_of_float32(rng):
    x = jnp.asarray(rng.normal(size=(4, 10, 10, 8)), jnp.bfloat16)
    w = jnp.asarray(rng.normal(size=(3, 3, 8, 16)) * 0.2, jnp.bfloat16)
    y = jax.jit(lambda x, w: F.conv(x, w, padding=1))(x, w)
    assert y.dtype == jnp.bfloat16 and onednn_conv.runs(x, w, ((1, 1), (1, 1)))
    exact = _xla(x.astype(jnp.float32), w.astype(jnp.float32), (1, 1), ((1, 1), (1, 1)), (1, 1))
    assert rel_error(y.astype(jnp.float32), exact) <= 2 ** -7


def test_without_onednn_convs_are_xla_and_a_failed_build_says_why(monkeypatch, tmp_path, rng):
    x = jnp.asarray(rng.normal(size=(2, 6, 6, 3)), jnp.float32)
    w = jnp.asarray(rng.normal(size=(3, 3, 3, 4)), jnp.float32)
    was = onednn.status()
    try:
        onednn.status.cache_clear()
        monkeypatch.setenv("JAXCONV_ONEDNN", "0")
        assert onednn.status() == (False, "JAXCONV_ONEDNN is off")
        text = jax.jit(lambda x, w: F.conv(x, w, padding=1)).lower(x, w).compile().as_text()
        assert "jaxconv_onednn" not in text
        if LINUX_X86:  # a compiler that fails: the reason, and no library left in the (fresh) cache folder
            onednn.status.cache_clear()
            monkeypatch.setenv("JAXCONV_ONEDNN", "1")
            monkeypatch.setenv("CXX", "false")
            monkeypatch.setenv("JAXCONV_DATA", str(tmp_path))
            ok, why = onednn.status()
            assert not ok and why.startswith("building or loading onednn_conv.cc failed")
            assert list((tmp_path / "native").iterdir()) == []
    finally:
        onednn.status.cache_clear()
        monkeypatch.undo()
        assert onednn.status() == was
