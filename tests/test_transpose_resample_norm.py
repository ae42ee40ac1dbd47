"""conv_transpose, upsample, add/concat, layer/group norm and per-position cross-entropy: forward
against NumPy loops and PyTorch, backward against PyTorch autograd, and their error messages."""
import functools
import itertools
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxconv import functional as F
from jaxconv import grads as G
from jaxconv import gradcheck as GC
from jaxconv.gradcheck import rel_error

pytestmark = pytest.mark.x64  # float64 references at tight tolerances


def conv_transpose_loop(x, w, b, stride, pads, output_padding, dilation, groups):
    """Scatter definition: input x[i] adds x[i] * w[k] to output position i*S + k*D - P_lo."""
    n = x.ndim - 2
    kernel = w.shape[:n]
    c_in, c_out_g = w.shape[-2], w.shape[-1]
    c_in_g = c_in // groups
    full = [(x.shape[1 + a] - 1) * stride[a] + dilation[a] * (kernel[a] - 1) + 1 + output_padding[a] for a in range(n)]
    y = np.zeros((x.shape[0], *full, c_out_g * groups))
    for i in itertools.product(*[range(v) for v in x.shape[1:-1]]):
        for k in itertools.product(*[range(v) for v in kernel]):
            pos = tuple(i[a] * stride[a] + k[a] * dilation[a] for a in range(n))
            for g in range(groups):
                xin = x[(slice(None), *i, slice(g * c_in_g, (g + 1) * c_in_g))]
                y[(slice(None), *pos, slice(g * c_out_g, (g + 1) * c_out_g))] += xin @ w[(*k, slice(g * c_in_g, (g + 1) * c_in_g))]
    crop = tuple(slice(lo, full[a] - hi) for a, (lo, hi) in enumerate(pads))
    y = y[(slice(None), *crop)]
    return y if b is None else y + b


random_transpose_case = GC.torch_conv_transpose_case


@pytest.mark.parametrize("n_sp", [1, 2])
def test_conv_transpose_matches_numpy_scatter_loop(rng, n_sp):
    for trial in range(8):
        x, w, b, o = random_transpose_case(rng, n_sp)
        pads = tuple((p, p) for p in o["padding"])
        if trial % 2:  # asymmetric (lo, hi) crops, which PyTorch cannot express
            pads = tuple((int(rng.integers(0, 3)), int(rng.integers(0, 3))) for _ in range(n_sp))
            o = {**o, "padding": list(pads)}
        try:
            got = jax.jit(functools.partial(F.conv_transpose, **o))(x, w, b)
        except ValueError as err:  # a crop larger than the output: the loop would give an empty array
            assert "crops the whole output away" in str(err)
            continue
        want = conv_transpose_loop(x, w, b, o["stride"], pads, o["output_padding"], o["dilation"], o["groups"])
        np.testing.assert_allclose(got, want, rtol=1e-10, atol=1e-10)


def test_conv_transpose_and_its_vjp_match_torch(rng):
    torch = pytest.importorskip("torch")
    tf = torch.nn.functional
    cases = 0
    for trial in range(40):
        n_sp = 1 + trial % 2
        x, w, b, o = random_transpose_case(rng, n_sp)
        y = jax.jit(functools.partial(F.conv_transpose, **o))(x, w, b)  # one program, not op by op
        xt = torch.tensor(np.moveaxis(x, -1, 1), requires_grad=True)
        wt = torch.tensor(np.ascontiguousarray(np.moveaxis(w, (-2, -1), (0, 1))), requires_grad=True)  # (C_in, C_out/G, *K)
        bt = torch.tensor(b, requires_grad=True)
        conv_t = tf.conv_transpose1d if n_sp == 1 else tf.conv_transpose2d
        yt = conv_t(xt, wt, bt, stride=o["stride"], padding=o["padding"], output_padding=o["output_padding"],
                    groups=o["groups"], dilation=o["dilation"])
        np.testing.assert_allclose(y, np.moveaxis(yt.detach().numpy(), 1, -1), rtol=1e-10, atol=1e-10)
        g = rng.normal(size=y.shape)
        yt.backward(torch.tensor(np.moveaxis(g, -1, 1)))
        dx, dw, db = jax.jit(functools.partial(G.conv_transpose_vjp, **o))(g, x, w, b)
        np.testing.assert_allclose(dx, np.moveaxis(xt.grad.numpy(), 1, -1), rtol=1e-10, atol=1e-10)
        np.testing.assert_allclose(dw, np.moveaxis(wt.grad.numpy(), (0, 1), (-2, -1)), rtol=1e-10, atol=1e-10)
        np.testing.assert_allclose(db, bt.grad.numpy(), rtol=1e-10, atol=1e-10)
        cases += 1
    assert cases == 40


@pytest.mark.parametrize("kernel, stride", [(3, 2), (1, 3), (4, 2), (2, 3), (5, 1)])
def test_conv_transpose_same_is_w_times_s_and_the_gradient_of_a_same_conv(rng, kernel, stride):
    x = jnp.asarray(rng.normal(size=(2, 5, 4, 3)))
    w = jnp.asarray(rng.normal(size=(kernel, kernel, 3, 4)))
    y = F.conv_transpose(x, w, stride=stride, padding="SAME")
    assert y.shape == (2, 5 * stride, 4 * stride, 4)
    _, vjp = jax.vjp(lambda z: F.conv(z, jnp.swapaxes(w, -1, -2), stride=stride, padding="SAME"),
                     jnp.zeros((2, 5 * stride, 4 * stride, 4)))
    np.testing.assert_allclose(y, vjp(x)[0], rtol=1e-10, atol=1e-10)


def test_conv_transpose_output_size_formula():
    x, w = jnp.zeros((1, 7, 2)), jnp.zeros((3, 2, 5))
    # (W - 1) S - P_lo - P_hi + D (K - 1) + output_padding + 1 = 6*2 - 1 - 2 + 2*2 + 1 + 1 = 15
    y = F.conv_transpose(x, w, stride=2, padding=[(1, 2)], output_padding=1, dilation=2)
    assert y.shape == (1, 15, 5)


def test_upsample_matches_torch(rng):
    torch = pytest.importorskip("torch")
    for shape, scale, method, mode in [((2, 5, 3), 3, "nearest", "nearest"), ((2, 4, 5, 3), (2, 3), "nearest", "nearest"),
                                       ((2, 5, 3), 2, "bilinear", "linear"), ((2, 4, 5, 3), (3, 2), "bilinear", "bilinear"),
                                       ((1, 3, 4, 2, 2), 2, "bilinear", "trilinear")]:
        x = rng.normal(size=shape)
        got = F.upsample(jnp.asarray(x), scale, method=method)
        up = torch.nn.Upsample(scale_factor=scale if isinstance(scale, int) else tuple(float(s) for s in scale),
                               mode=mode, **({} if mode == "nearest" else {"align_corners": False}))
        xt = torch.tensor(np.moveaxis(x, -1, 1), requires_grad=True)
        yt = up(xt)
        np.testing.assert_allclose(got, np.moveaxis(yt.detach().numpy(), 1, -1), rtol=1e-10, atol=1e-12)
        g = rng.normal(size=got.shape)
        yt.backward(torch.tensor(np.moveaxis(g, -1, 1)))
        np.testing.assert_allclose(G.upsample_vjp(jnp.asarray(g), jnp.asarray(x), scale, method=method),
                                   np.moveaxis(xt.grad.numpy(), 1, -1), rtol=1e-10, atol=1e-12)


def test_nearest_upsample_by_hand():
    x = jnp.array([[1.0, 2.0], [3.0, 4.0]])[None, :, :, None]
    np.testing.assert_array_equal(F.upsample(x, 2)[0, :, :, 0],
                                  [[1, 1, 2, 2], [1, 1, 2, 2], [3, 3, 4, 4], [3, 3, 4, 4]])
    np.testing.assert_array_equal(G.upsample_vjp(jnp.ones((1, 4, 4, 1)), x, 2)[0, :, :, 0], [[4, 4], [4, 4]])


@pytest.mark.parametrize("groups", [1, 2, 6])
def test_group_norm_matches_numpy_and_torch(rng, groups):
    x = rng.normal(size=(3, 4, 5, 6)) * 3 + 1
    scale, bias = rng.normal(size=6), rng.normal(size=6)
    got = F.group_norm(jnp.asarray(x), jnp.asarray(scale), jnp.asarray(bias), num_groups=groups)
    xg = x.reshape(3, 4, 5, groups, 6 // groups)
    mean = xg.mean(axis=(1, 2, 4), keepdims=True)
    var = ((xg - mean) ** 2).mean(axis=(1, 2, 4), keepdims=True)
    want = ((xg - mean) / np.sqrt(var + 1e-5)).reshape(x.shape) * scale + bias
    np.testing.assert_allclose(got, want, rtol=1e-10, atol=1e-10)
    torch = pytest.importorskip("torch")
    xt = torch.tensor(np.moveaxis(x, -1, 1), requires_grad=True)
    norm = torch.nn.GroupNorm(groups, 6).double()
    with torch.no_grad():
        norm.weight.copy_(torch.tensor(scale))
        norm.bias.copy_(torch.tensor(bias))
    yt = norm(xt)
    g = rng.normal(size=x.shape)
    yt.backward(torch.tensor(np.moveaxis(g, -1, 1)))
    dx, dscale, dbias = G.group_norm_vjp(jnp.asarray(g), jnp.asarray(x), jnp.asarray(scale), jnp.asarray(bias),
                                         num_groups=groups)
    np.testing.assert_allclose(dx, np.moveaxis(xt.grad.numpy(), 1, -1), rtol=1e-8, atol=1e-10)
    np.testing.assert_allclose(dscale, norm.weight.grad.numpy(), rtol=1e-8)
    np.testing.assert_allclose(dbias, norm.bias.grad.numpy(), rtol=1e-8)


def test_layer_norm_matches_torch_on_channels(rng):
    torch = pytest.importorskip("torch")
    x = rng.normal(size=(2, 3, 5)) * 2
    scale, bias = rng.normal(size=5), rng.normal(size=5)
    xt = torch.tensor(x, requires_grad=True)
    norm = torch.nn.LayerNorm(5).double()
    with torch.no_grad():
        norm.weight.copy_(torch.tensor(scale))
        norm.bias.copy_(torch.tensor(bias))
    yt = norm(xt)
    np.testing.assert_allclose(F.layer_norm(jnp.asarray(x), jnp.asarray(scale), jnp.asarray(bias)),
                               yt.detach().numpy(), rtol=1e-10, atol=1e-10)
    g = rng.normal(size=x.shape)
    yt.backward(torch.tensor(g))
    dx, ds, db = G.layer_norm_vjp(jnp.asarray(g), jnp.asarray(x), jnp.asarray(scale), jnp.asarray(bias))
    np.testing.assert_allclose(dx, xt.grad.numpy(), rtol=1e-8, atol=1e-10)
    np.testing.assert_allclose(ds, norm.weight.grad.numpy(), rtol=1e-8)


def test_float32_running_statistics_normalise_float64_data_in_float64(rng):
    # BatchNorm keeps its running statistics in float32 (as Flax); float64 data is normalised at float64
    # precision, by the op and by its hand-written backward alike (a float32 rsqrt is ~3e-8 off)
    x, g = rng.normal(size=(4, 3)), rng.normal(size=(4, 3))
    scale, bias = rng.normal(size=3), rng.normal(size=3)
    mean, var = np.float32([0.1, -0.2, 0.3]), np.float32([1.0, 0.7, 2.1])
    inv = 1 / np.sqrt(var.astype(np.float64) + 1e-5)
    y = F.batch_norm(*map(jnp.asarray, (x, scale, bias, mean, var)))
    assert y.dtype == jnp.float64
    np.testing.assert_allclose(y, (x - mean.astype(np.float64)) * inv * scale + bias, rtol=1e-14, atol=1e-14)
    dx, dscale, *_ = G.batch_norm_vjp(*map(jnp.asarray, (g, x, scale, bias, mean, var)))
    np.testing.assert_allclose(dx, g * scale * inv, rtol=1e-14, atol=1e-14)
    np.testing.assert_allclose(dscale, np.sum(g * (x - mean.astype(np.float64)) * inv, axis=0), rtol=1e-13)


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_per_position_cross_entropy_matches_torch(rng, reduction):
    torch = pytest.importorskip("torch")
    logits = rng.normal(size=(2, 4, 3, 5)) * 2
    labels = rng.integers(0, 5, (2, 4, 3))
    got = F.cross_entropy(jnp.asarray(logits), jnp.asarray(labels), label_smoothing=0.1, reduction=reduction)
    zt = torch.tensor(np.moveaxis(logits, -1, 1), requires_grad=True)  # PyTorch: [N, K, *spatial]
    want = torch.nn.functional.cross_entropy(zt, torch.tensor(labels), label_smoothing=0.1, reduction=reduction)
    np.testing.assert_allclose(got, want.detach().numpy(), rtol=1e-10)
    g = rng.normal(size=labels.shape) if reduction == "none" else 1.3
    want.backward(torch.tensor(g, dtype=torch.float64))
    np.testing.assert_allclose(G.cross_entropy_vjp(jnp.asarray(g), jnp.asarray(logits), jnp.asarray(labels),
                                                   label_smoothing=0.1, reduction=reduction),
                               np.moveaxis(zt.grad.numpy(), 1, -1), rtol=1e-10, atol=1e-12)


def test_concat_and_add_and_their_vjps(rng):
    a, b = jnp.asarray(rng.normal(size=(2, 3, 4))), jnp.asarray(rng.normal(size=(2, 3, 1)))
    np.testing.assert_array_equal(F.concat([a, b]), np.concatenate([a, b], -1))
    g = jnp.asarray(rng.normal(size=(2, 3, 5)))
    da, db = G.concat_vjp(g, [a, b])
    np.testing.assert_array_equal(da, g[..., :4])
    np.testing.assert_array_equal(db, g[..., 4:])
    np.testing.assert_array_equal(F.add(a, a), 2 * a)


@pytest.mark.parametrize("call, error, message", [
    (lambda: F.conv_transpose(jnp.ones((1, 5, 2)), jnp.ones((3, 4, 1))), ValueError,
     "conv_transpose: `w.shape[-2]` (=4) must equal `x.shape[-1]` (C_in=2)"),
    (lambda: F.conv_transpose(jnp.ones((1, 5, 2)), jnp.ones((3, 2, 1)), stride=2, output_padding=2), ValueError,
     "conv_transpose: `output_padding` must be smaller than the stride or the dilation"),
    (lambda: F.conv_transpose(jnp.ones((1, 2, 2)), jnp.ones((1, 2, 1)), padding=1), ValueError,
     "conv_transpose: `padding` ((1, 1),) crops the whole output away"),
    (lambda: F.conv_transpose(jnp.ones((1, 5, 2)), jnp.ones((3, 2, 1)), padding="CAUSAL"), ValueError,
     "conv_transpose: `padding`='CAUSAL' is not defined for transposed convolutions"),
    (lambda: F.upsample(jnp.ones((1, 5, 2)), 2, method="cubic"), ValueError,
     "upsample: `method` must be 'nearest' or 'bilinear', got 'cubic'"),
    (lambda: F.upsample(jnp.ones((1, 5, 2)), 0), ValueError, "upsample: `scale` must be >= 1"),
    (lambda: F.add(jnp.ones((2, 3)), jnp.ones((3,))), ValueError,
     "add: `a` and `b` must have the same shape, got (2, 3) and (3,)"),
    (lambda: F.concat([jnp.ones((2, 3)), jnp.ones((3, 3))]), ValueError,
     "concat: every axis but -1 must agree: `xs[0]` has shape (2, 3), `xs[1]` has (3, 3)"),
    (lambda: F.group_norm(jnp.ones((2, 4, 6)), jnp.ones(6), jnp.ones(6), num_groups=4), ValueError,
     "group_norm: `num_groups` must be a positive int dividing C=6, got 4"),
    (lambda: F.layer_norm(jnp.ones((2, 4)), jnp.ones(3), jnp.ones(4)), ValueError,
     "layer_norm: `scale` must have shape (4,) to match `x.shape[-1]`, got (3,)"),
    (lambda: F.cross_entropy(jnp.ones((2, 3, 4)), jnp.zeros((2, 4), jnp.int32)), ValueError,
     "cross_entropy: `labels` must have the shape of `logits` without its class axis, (2, 3), got (2, 4)"),
])
def test_bad_input_to_new_ops(call, error, message):
    with pytest.raises(error, match=re.escape(message)):
        call()


@pytest.mark.parametrize("seed", [5, 6, 7])
def test_conv_transpose_gradients_against_finite_differences(seed):
    """conv_transpose carries its own derivative (a custom_jvp whose transpose is faster than autodiff's on
    XLA:CPU); check it, both modes, first and second order, against central differences, and the hand-written
    vjp against it."""
    from jax.test_util import check_grads
    x, w, b, o = random_transpose_case(np.random.default_rng(seed), 2)
    args = (jnp.asarray(x), jnp.asarray(w), jnp.asarray(b))
    transpose = jax.jit(lambda *a: F.conv_transpose(*a, **o))  # each derivative one program, not op by op
    check_grads(transpose, args, order=2, modes=["fwd", "rev"])
    y, vjp = jax.vjp(transpose, *args)
    g = jnp.asarray(np.random.default_rng(seed).normal(size=y.shape))
    for got, want in zip(jax.jit(lambda *a: G.conv_transpose_vjp(*a, **o))(g, *args), vjp(g)):
        assert rel_error(got, want) < 1e-12


def test_conv_transpose_forward_mode_is_the_scatter_loop_of_its_tangents(rng):
    """jax.jvp and jax.hessian work through conv_transpose (its derivative is a custom_jvp, not a custom_vjp):
    the tangent of a bilinear map is T(dx, w) + T(x, dw), each the NumPy scatter loop."""
    for trial in range(12):
        x, w, b, o = random_transpose_case(rng, 1 + trial % 2)
        dx, dw = rng.normal(size=x.shape), rng.normal(size=w.shape)
        tangent = jax.jit(lambda *a: jax.jvp(lambda x, w: F.conv_transpose(x, w, b, **o), a[:2], a[2:])[1])(x, w, dx, dw)
        pads = tuple((p, p) for p in o["padding"])
        loop = functools.partial(conv_transpose_loop, b=None, stride=o["stride"], pads=pads,
                                 output_padding=o["output_padding"], dilation=o["dilation"], groups=o["groups"])
        np.testing.assert_allclose(tangent, loop(dx, w) + loop(x, dw), rtol=1e-10, atol=1e-10)
    # second order: d2/dw2 of 1/2 |T(x, w)|^2 is T(x, .)^T T(x, .), whatever w is
    x, w, b, o = random_transpose_case(rng, 1)
    loss = lambda w: 0.5 * jnp.sum(F.conv_transpose(jnp.asarray(x), w, **o) ** 2)
    hessian = jax.hessian(loss)(jnp.asarray(w)).reshape(w.size, w.size)
    pads = tuple((p, p) for p in o["padding"])
    columns = [conv_transpose_loop(x, basis.reshape(w.shape), None, o["stride"], pads, o["output_padding"],
                                   o["dilation"], o["groups"]).ravel() for basis in np.eye(w.size)]
    jacobian = np.stack(columns, axis=1)
    np.testing.assert_allclose(hessian, jacobian.T @ jacobian, rtol=1e-10, atol=1e-10)


def test_conv_transpose_gradient_runs_no_spread_convolution_but_its_forward():
    """Reverse mode transposes the JVP into the fast programs: a strided conv for dx and the weight-gradient conv
    for dw. Autodiff of the zero-spread form would compute dw as a second convolution with lhs_dilation (25x
    slower on XLA:CPU)."""
    x, w = jnp.ones((4, 7, 7, 6)), jnp.ones((2, 2, 6, 4))
    loss = lambda x, w: jnp.sum(F.conv_transpose(x, w, stride=2) ** 2)
    hlo = jax.jit(jax.grad(loss, argnums=(0, 1))).lower(x, w).as_text()
    convolutions = [line for line in hlo.splitlines() if "stablehlo.convolution" in line]
    assert len(convolutions) == 3
    assert sum("lhs_dilate = [2, 2]" in line for line in convolutions) == 1
