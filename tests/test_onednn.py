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
    same = dict(stride=(1, 1), dilation=(1, 1))
    assert onednn_conv.runs(x, w, pads=((1, 1), (1, 1)), **same)
    assert not onednn_conv.runs(np.zeros(x.shape), np.zeros(w.shape), pads=((1, 1), (1, 1)), **same)
    assert not onednn_conv.runs(x, w, pads=((-1, 1), (1, 1)), **same)  # negative padding crops: XLA's
    # 1-D: XLA's (whole MNIST-1D steps were slower)
    assert not onednn_conv.runs(x[:, 0], w[0], stride=(1,), pads=((1, 1),), dilation=(1,))


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
    y = jax.jit(lambda x, w: F.conv(x, w, padding=1))(x, w)  # oneDNN's where this CPU builds it, else XLA's
    assert y.dtype == jnp.bfloat16
    exact = _xla(x.astype(jnp.float32), w.astype(jnp.float32), (1, 1), ((1, 1), (1, 1)), (1, 1))
    assert rel_error(y.astype(jnp.float32), exact) <= 2 ** -7


def test_without_onednn_convs_are_xla_and_one_log_line_says_why(monkeypatch, caplog, rng):
    x = jnp.asarray(rng.normal(size=(2, 6, 6, 3)), jnp.float32)
    w = jnp.asarray(rng.normal(size=(3, 3, 3, 4)), jnp.float32)
    was = onednn.status()
    try:
        onednn.status.cache_clear()
        monkeypatch.setenv("JAXCONV_ONEDNN", "0")
        with caplog.at_level("WARNING", logger="jaxconv"):
            assert onednn.status() == (False, "JAXCONV_ONEDNN is off")
        assert caplog.records == []  # the user's own choice: nothing to say
        text = jax.jit(lambda x, w: F.conv(x, w, padding=1)).lower(x, w).compile().as_text()
        assert "jaxconv_onednn" not in text
        assert onednn.describe() == "XLA (oneDNN: JAXCONV_ONEDNN is off)"
        if LINUX_X86:  # installed without the library (no compiler then): the reason and the remedy, once
            onednn.status.cache_clear()
            monkeypatch.setenv("JAXCONV_ONEDNN", "1")
            monkeypatch.setattr(onednn, "library_path", lambda: None)
            with caplog.at_level("WARNING", logger="jaxconv"):
                ok, why = onednn.status()
                onednn.status()
            assert not ok and why.startswith("jaxconv was installed without its oneDNN library")
            assert [r.getMessage() for r in caplog.records] == [
                f"jaxconv: convolutions are XLA's, not oneDNN's ({why}); for oneDNN's: pip install "
                "'jaxconv[onednn]' with a C++ compiler (g++) present, or set JAXCONV_ONEDNN=0 to silence this"]
    finally:
        onednn.status.cache_clear()
        monkeypatch.undo()
        assert onednn.status() == was


@needs_onednn
def test_a_conv_onednn_cannot_build_on_this_cpu_is_xla_s(monkeypatch, rng):
    """oneDNN is asked per geometry and dtype; where it says no (bfloat16 on an AVX2-only CPU), the conv and its
    derivatives are XLA's convolutions with XLA's numbers, never a failure at run time."""
    x = jnp.asarray(rng.normal(size=(2, 6, 6, 3)), jnp.float32)
    w = jnp.asarray(rng.normal(size=(3, 3, 3, 4)), jnp.float32)
    loss = lambda x, w: jnp.sum(F.conv(x, w, padding=1) ** 2)
    asked = []
    monkeypatch.setattr(onednn, "builds", lambda dtype, *geometry: asked.append(dtype) or False)
    text = jax.jit(jax.value_and_grad(loss, (0, 1))).lower(x, w).compile().as_text()
    assert asked and "jaxconv_onednn" not in text and " convolution(" in text
    got = jax.jit(jax.value_and_grad(loss, (0, 1)))(x, w)
    want = jax.value_and_grad(lambda x, w: jnp.sum(_xla(x, w, (1, 1), ((1, 1), (1, 1)), (1, 1)) ** 2), (0, 1))(x, w)
    for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
        assert rel_error(a, b) <= 1e-6


AVX2_ONLY = """
import jax, jax.numpy as jnp, numpy as np
from jaxconv import functional as F, onednn
x = jnp.asarray(np.random.default_rng(0).normal(size=(2, 6, 6, 8)), jnp.bfloat16)
w = jnp.asarray(np.random.default_rng(1).normal(size=(3, 3, 8, 4)), jnp.bfloat16)
loss = lambda x, w: jnp.sum(F.conv(x, w, padding=1).astype(jnp.float32) ** 2)
step = jax.jit(jax.value_and_grad(loss, (0, 1)))
print(onednn.describe())
print("bfloat16 custom call:", "jaxconv_onednn" in step.lower(x, w).compile().as_text())
f32 = jax.jit(jax.value_and_grad(loss, (0, 1))).lower(x.astype(jnp.float32), w.astype(jnp.float32))
print("float32 custom call:", "jaxconv_onednn" in f32.compile().as_text())
print("value:", float(step(x, w)[0]))
"""


@needs_onednn
def test_bfloat16_on_a_cpu_without_avx512_runs_xla_s_convs(tmp_path):
    """oneDNN limited to AVX2 (``ONEDNN_MAX_CPU_ISA``, as on an AMD EPYC of this workplace) builds no bfloat16
    convolution: those convs are XLA's, float32's stay oneDNN's, and the step runs."""
    import subprocess
    import sys
    env = {**os.environ, "ONEDNN_MAX_CPU_ISA": "AVX2", "JAX_PLATFORMS": "cpu"}
    done = subprocess.run([sys.executable, "-c", AVX2_ONLY], env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    lines = done.stdout.splitlines()
    assert lines[0].startswith("oneDNN 3.") and "(float32; bfloat16 not on this CPU: XLA's)" in lines[0], lines
    assert lines[1:3] == ["bfloat16 custom call: False", "float32 custom call: True"], lines
    assert np.isfinite(float(lines[3].split()[-1]))
