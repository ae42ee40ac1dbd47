"""Forward ops against the seeds' worked numbers, a NumPy loop, PyTorch, and their error messages."""
import functools
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxconv import functional as F
from tests import reference as R


def rows(text):
    return np.array([[int(c) for c in row] for row in text.split(" / ")], dtype=np.float32)


# ----------------------------------------------------------------------------- seed numbers


def test_seed1_two_filters_stride2_pad1():
    x = np.stack([rows("0000000 / 0101010 / 0211120 / 0112120 / 0112220 / 0111110 / 0000000"),
                  rows("0000000 / 0111000 / 0102200 / 0211000 / 0201010 / 0222120 / 0000000"),
                  rows("0000000 / 0121100 / 0102100 / 0001010 / 0221220 / 0021020 / 0000000")], axis=-1)
    x = x[1:-1, 1:-1][None]  # the 5x5x3 input; its zero border is the padding
    w0 = np.stack([[[-1, -1, 1], [0, -1, 1], [-1, -1, 0]], [[1, 1, -1], [-1, 0, 1], [-1, -1, 1]],
                   [[-1, -1, -1], [1, -1, 0], [1, -1, 1]]], axis=-1)
    w1 = np.stack([[[0, 0, 0], [0, 1, 0], [1, 1, 1]], [[-1, 1, 0], [-1, -1, 0], [1, 0, -1]],
                   [[1, 0, 1], [0, 0, -1], [-1, -1, 0]]], axis=-1)
    w = np.stack([w0, w1], axis=-1).astype(np.float32)  # [3, 3, 3, 2] HWIO
    y = F.conv2d(jnp.asarray(x), jnp.asarray(w), jnp.array([1.0, 0.0], jnp.float32), stride=2, padding=1)
    assert y.shape == (1, 3, 3, 2)
    np.testing.assert_array_equal(y[0, :, :, 0], [[-4, -3, -3], [-2, -7, -9], [1, -4, -10]])
    np.testing.assert_array_equal(y[0, :, :, 1], [[0, -3, 5], [0, 5, 1], [1, 2, 1]])


def test_seed2_feature_map_valid():
    image = rows("0000000 / 0100010 / 0000000 / 0001000 / 0100010 / 0011100 / 0000000")
    detector = np.array([[0, 0, 1], [1, 0, 0], [0, 1, 1]], np.float32)
    y = F.conv2d(jnp.asarray(image)[None, :, :, None], jnp.asarray(detector)[:, :, None, None])[0, :, :, 0]
    expected = [[0, 1, 0, 0, 0], [0, 1, 1, 1, 0], [1, 0, 0, 2, 1], [1, 4, 2, 1, 0], [0, 0, 1, 2, 1]]
    np.testing.assert_array_equal(y, expected)
    # The lecture slide shows 1 at row 3, column 3; the window there covers no 1 under the detector.
    assert y[2, 2] == 0


def test_seed3_max_pool():
    x = jnp.array([[1, 1, 2, 4], [5, 6, 7, 8], [3, 2, 1, 0], [1, 2, 3, 4]], jnp.float32)[None, :, :, None]
    np.testing.assert_array_equal(F.max_pool(x, 2, stride=2)[0, :, :, 0], [[6, 8], [3, 4]])
    np.testing.assert_array_equal(F.max_pool(x, 2)[0, :, :, 0], [[6, 8], [3, 4]])  # stride defaults to window


def test_seed4_relu_backward_through_autodiff():
    x = jnp.array([1.0, -2.0, 3.0, -1.0])
    _, vjp = jax.vjp(F.relu, x)
    np.testing.assert_array_equal(vjp(jnp.array([4.0, -1.0, 5.0, 9.0]))[0], [4, 0, 5, 0])
    assert jax.grad(lambda v: F.relu(v))(0.0) == 0.0


def test_seed5_same_size_with_pad2():
    x = jnp.zeros((1, 32, 32, 3), jnp.float32)
    w = jnp.zeros((5, 5, 3, 10), jnp.float32)
    assert F.conv(x, w, jnp.zeros(10, jnp.float32), padding=2).shape == (1, 32, 32, 10)
    assert w.size + 10 == 760


# ----------------------------------------------------------------------------- random references


def random_conv_case(rng, n_sp, *, symmetric):
    groups = int(rng.choice([1, 2, 3]))
    c_in, c_out = groups * int(rng.integers(1, 3)), groups * int(rng.integers(1, 3))
    if rng.random() < 0.2:  # depthwise
        c_in = c_out = groups
    k = tuple(int(v) for v in rng.integers(1, 4, n_sp))
    s = tuple(int(v) for v in rng.integers(1, 4, n_sp))
    d = tuple(int(v) for v in rng.integers(1, 4, n_sp))
    size = tuple(int(v) for v in rng.integers(7, 12 if n_sp == 2 else 16, n_sp))
    if symmetric:
        padding = tuple(int(v) for v in rng.integers(0, 3, n_sp))
    else:
        padding = str(rng.choice(["VALID", "SAME", "int", "pairs"] + (["CAUSAL"] if n_sp == 1 else [])))
        if padding == "int":
            padding = int(rng.integers(0, 4))
        elif padding == "pairs":
            padding = [tuple(int(v) for v in rng.integers(0, 4, 2)) for _ in range(n_sp)]
    x = rng.normal(size=(2, *size, c_in)).astype(np.float32)
    w = rng.normal(size=(*k, c_in // groups, c_out)).astype(np.float32)
    b = rng.normal(size=(c_out,)).astype(np.float32)
    return x, w, b, dict(stride=s, padding=padding, dilation=d, groups=groups)


def rel_err(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.max(np.abs(a - b)) / max(np.max(np.abs(b)), 1e-30))


@pytest.mark.parametrize("n_sp", [1, 2])
def test_conv_matches_numpy_loop(rng, n_sp):
    worst, ran = 0.0, 0
    while ran < 60:
        x, w, b, opts = random_conv_case(rng, n_sp, symmetric=False)
        pads = F.resolve_padding(opts["padding"], fn="t", in_spatial=x.shape[1:-1], window=w.shape[:n_sp],
                                 stride=opts["stride"], dilation=opts["dilation"])
        if any(R.out_size(x.shape[1 + i], *pads[i], w.shape[i], opts["stride"][i], opts["dilation"][i]) < 1
               for i in range(n_sp)):
            continue
        got = jax.jit(functools.partial(F.conv, precision="highest", **opts))(x, w, b)  # one program, not op by op
        want = R.conv(x.astype(np.float64), w.astype(np.float64), b, opts["stride"], pads, opts["dilation"],
                      opts["groups"])
        assert got.shape == want.shape, opts
        worst = max(worst, rel_err(got, want))
        ran += 1
    assert worst <= 1e-5, worst


def test_conv_matches_torch(rng):
    torch = pytest.importorskip("torch")
    worst = 0.0
    for trial in range(120):
        n_sp = 1 + trial % 2
        x, w, b, opts = random_conv_case(rng, n_sp, symmetric=True)
        pads = [(p, p) for p in opts["padding"]]
        if any(R.out_size(x.shape[1 + i], *pads[i], w.shape[i], opts["stride"][i], opts["dilation"][i]) < 1
               for i in range(n_sp)):
            continue
        got = jax.jit(functools.partial(F.conv, precision="highest", **opts))(x, w, b)
        conv = torch.nn.functional.conv1d if n_sp == 1 else torch.nn.functional.conv2d
        xt = torch.from_numpy(np.moveaxis(x, -1, 1).copy())
        wt = torch.from_numpy(np.transpose(w, (n_sp + 1, n_sp) + tuple(range(n_sp))).copy())  # OI*K
        yt = conv(xt, wt, torch.from_numpy(b), stride=opts["stride"], padding=opts["padding"],
                  dilation=opts["dilation"], groups=opts["groups"]).numpy()
        worst = max(worst, rel_err(got, np.moveaxis(yt, 1, -1)))
    assert worst <= 1e-5, worst


def random_pool_case(rng, n_sp):
    window = tuple(int(v) for v in rng.integers(1, 4, n_sp))
    stride = tuple(int(v) for v in rng.integers(1, 4, n_sp))
    padding = tuple(int(rng.integers(0, k // 2 + 1)) for k in window)  # torch: pad <= window / 2
    x = rng.normal(size=(2, *rng.integers(5, 10, n_sp), 3)).astype(np.float32)
    return x, window, stride, padding


@pytest.mark.parametrize("n_sp", [1, 2])
def test_pools_match_numpy_loop(rng, n_sp):
    for _ in range(30):
        x, window, stride, padding = random_pool_case(rng, n_sp)
        padding = str(rng.choice(["VALID", "SAME"])) if rng.random() < 0.3 else padding
        pads = F.resolve_padding(padding, fn="t", in_spatial=x.shape[1:-1], window=window, stride=stride)
        pools = jax.jit(lambda x: (F.max_pool(x, window, stride=stride, padding=padding),
                                   *(F.avg_pool(x, window, stride=stride, padding=padding, count_include_pad=include)
                                     for include in (True, False))))
        maximum, *averages = pools(x)
        np.testing.assert_allclose(maximum, R.pool(x, window, stride, pads, "max"), rtol=1e-6)
        for include, average in zip((True, False), averages):
            np.testing.assert_allclose(average, R.pool(x, window, stride, pads, "avg", include), rtol=1e-5, atol=1e-6)


def test_pools_match_torch(rng):
    torch = pytest.importorskip("torch")
    tf = torch.nn.functional
    for trial in range(80):
        n_sp = 1 + trial % 2
        x, window, stride, padding = random_pool_case(rng, n_sp)
        xt = torch.from_numpy(np.moveaxis(x, -1, 1).copy())
        back = lambda t: np.moveaxis(t.numpy(), 1, -1)
        pools = jax.jit(lambda x: (F.max_pool(x, window, stride=stride, padding=padding),
                                   *(F.avg_pool(x, window, stride=stride, padding=padding, count_include_pad=include)
                                     for include in (True, False))))
        maximum, *averages = pools(x)
        max_t = (tf.max_pool1d if n_sp == 1 else tf.max_pool2d)(xt, window, stride, padding)
        np.testing.assert_allclose(maximum, back(max_t))
        for include, average in zip((True, False), averages):
            avg_t = (tf.avg_pool1d if n_sp == 1 else tf.avg_pool2d)(xt, window, stride, padding,
                                                                     count_include_pad=include)
            np.testing.assert_allclose(average, back(avg_t), rtol=1e-5, atol=1e-6)


def test_max_pool_pads_with_minus_infinity():
    x = -jnp.ones((1, 2, 2, 1), jnp.float32)
    assert float(F.max_pool(x, 2, stride=2, padding=1).max()) == -1.0


def test_padding_resolver_forms():
    kw = dict(fn="t", in_spatial=(7, 10), window=(3, 4), stride=(2, 3), dilation=(1, 2))
    assert F.resolve_padding("VALID", **kw) == ((0, 0), (0, 0))
    # SAME: out = ceil(W/S); total = (out-1)*S + M - W; the odd pixel goes high.
    assert F.resolve_padding("same", **kw) == ((1, 1), (3, 3))
    assert F.resolve_padding("SAME", fn="t", in_spatial=(8,), window=(2,), stride=(1,)) == ((0, 1),)
    for w_in, k, s, d in [(7, 3, 2, 1), (10, 4, 3, 2), (5, 5, 1, 1), (9, 2, 4, 3), (4, 3, 5, 1)]:
        expect = jax.lax.padtype_to_pads((w_in,), ((k - 1) * d + 1,), (s,), "SAME")
        assert F.resolve_padding("SAME", fn="t", in_spatial=(w_in,), window=(k,), stride=(s,), dilation=(d,)) \
            == tuple(map(tuple, expect))
    assert F.resolve_padding(2, **kw) == ((2, 2), (2, 2))
    assert F.resolve_padding([1, 2], **kw) == ((1, 1), (2, 2))
    assert F.resolve_padding([(0, 1), 3], **kw) == ((0, 1), (3, 3))
    assert F.resolve_padding("CAUSAL", fn="t", in_spatial=(9,), window=(3,), stride=(1,), dilation=(2,)) == ((4, 0),)


def test_same_matches_jax_with_stride_and_dilation(rng):
    x = jnp.asarray(rng.normal(size=(1, 11, 9, 2)), jnp.float32)
    w = jnp.asarray(rng.normal(size=(3, 2, 2, 4)), jnp.float32)
    ours = F.conv(x, w, stride=(2, 3), dilation=(2, 1), padding="SAME")
    theirs = jax.lax.conv_general_dilated(x, w, (2, 3), "SAME", rhs_dilation=(2, 1),
                                          dimension_numbers=("NHWC", "HWIO", "NHWC"))
    np.testing.assert_allclose(ours, theirs, rtol=1e-6)


def test_causal_conv_sees_no_future(rng):
    x = jnp.asarray(rng.normal(size=(1, 12, 1)), jnp.float32)
    w = jnp.ones((3, 1, 1), jnp.float32)
    y = F.conv1d(x, w, padding="CAUSAL", dilation=2)
    assert y.shape == x.shape
    x2 = x.at[0, 8:, 0].set(100.0)  # changing the future leaves the past alone
    np.testing.assert_array_equal(F.conv1d(x2, w, padding="CAUSAL", dilation=2)[0, :8], y[0, :8])


# ----------------------------------------------------------------------------- dense, activations, losses


@pytest.mark.x64  # compared with float64 NumPy at 1e-12
def test_dense_relu_flatten_global_pool(rng):
    x = rng.normal(size=(3, 4)).astype(np.float32)
    w = rng.normal(size=(4, 5)).astype(np.float32)
    b = rng.normal(size=5).astype(np.float32)
    np.testing.assert_allclose(F.dense(jnp.asarray(x), jnp.asarray(w), jnp.asarray(b), precision="highest"),
                               x @ w + b, rtol=1e-5)
    np.testing.assert_array_equal(F.relu(jnp.array([-1.0, 0.0, 2.0])), [0, 0, 2])
    assert np.isnan(F.relu(jnp.array([np.nan])))[0]  # as torch.relu: a NaN is not hidden
    assert F.flatten(jnp.zeros((2, 3, 4, 5))).shape == (2, 60)
    img = rng.normal(size=(2, 3, 4, 5))
    np.testing.assert_allclose(F.global_avg_pool(jnp.asarray(img)), img.mean(axis=(1, 2)), rtol=1e-12)


def test_softmax_and_log_softmax_are_stable():
    z = jnp.array([[1000.0, 0.0, -1000.0]], jnp.float32)
    assert np.isfinite(np.asarray(F.log_softmax(z))).all()
    np.testing.assert_allclose(F.softmax(z).sum(), 1.0, rtol=1e-6)


@pytest.mark.parametrize("eps", [0.0, 0.1])
def test_cross_entropy_against_loop_and_torch(rng, eps):
    logits = (rng.normal(size=(6, 5)) * 10).astype(np.float32)
    labels = rng.integers(0, 5, 6)
    got = F.cross_entropy(jnp.asarray(logits), jnp.asarray(labels), label_smoothing=eps)
    np.testing.assert_allclose(got, R.cross_entropy(logits, labels, eps), rtol=1e-5)
    per = F.cross_entropy(jnp.asarray(logits), jnp.asarray(labels), label_smoothing=eps, reduction="none")
    np.testing.assert_allclose(per.mean(), got, rtol=1e-6)
    torch = pytest.importorskip("torch")
    want = torch.nn.functional.cross_entropy(torch.from_numpy(logits), torch.from_numpy(labels),
                                             label_smoothing=eps).item()
    np.testing.assert_allclose(got, want, rtol=1e-5)


def test_cross_entropy_huge_logits_finite():
    z = jnp.array([[1e30, -1e30]], jnp.float32)
    assert np.isfinite(float(F.cross_entropy(z, jnp.array([1]))))


@pytest.mark.x64  # compared with float64 NumPy at 1e-12
def test_batch_norm_and_dropout(rng):
    x = jnp.asarray(rng.normal(size=(8, 3, 4)) * 3 + 1)
    y = F.batch_norm_train(x, jnp.ones(4), jnp.zeros(4))
    np.testing.assert_allclose(y.mean(axis=(0, 1)), 0, atol=1e-12)
    np.testing.assert_allclose(y.var(axis=(0, 1)), 1, rtol=1e-4)
    d = F.dropout(jnp.ones((1000,)), jax.random.key(0), drop_rate=0.25)
    assert set(np.unique(np.asarray(d)).tolist()) <= {0.0, 1 / 0.75}
    assert abs(float((d == 0).mean()) - 0.25) < 0.05
    assert F.dropout(x, jax.random.key(0), drop_rate=0.5, deterministic=True) is x


# ----------------------------------------------------------------------------- bad input


X2 = jnp.zeros((2, 8, 8, 3), jnp.float32)
W2 = jnp.zeros((3, 3, 3, 4), jnp.float32)

BAD_CALLS = [
    (lambda: F.conv(jnp.zeros((8, 3)), W2), ValueError, "conv: `x` must be a batch [N, *spatial, C] of rank 4 or one example of rank 3, to match the kernel `w` (3, 3, 3, 4); got shape (8, 3)"),
    (lambda: F.conv(X2, jnp.zeros((3, 3, 4))), ValueError, "conv: `x` must be a batch [N, *spatial, C] of rank 3 or one example of rank 2"),
    (lambda: F.conv(X2, jnp.zeros((3, 4))), ValueError, "conv: `w` must be a kernel [*kernel, C_in, C_out] with 1, 2 or 3 spatial axes, got shape (3, 4)"),
    (lambda: F.conv2d(jnp.zeros((2, 8, 3)), jnp.zeros((3, 3, 4))), ValueError, "conv2d: `x` must be [N, *spatial, C] with 2"),
    (lambda: F.conv1d(X2, W2), ValueError, "conv1d: `x` must be [N, *spatial, C] with 1 spatial axes"),
    (lambda: F.conv(X2, jnp.zeros((3, 3, 2, 4))), ValueError,
     "conv: `x.shape[-1]` (=3) must equal `w.shape[-2] * groups` (=2 * 1 = 2)"),
    (lambda: F.conv(X2, jnp.zeros((3, 3, 1, 4)), groups=2), ValueError,
     "conv: `x.shape[-1]` (C_in=3) must be divisible by `groups` (=2)"),
    (lambda: F.conv(jnp.zeros((2, 8, 8, 4)), jnp.zeros((3, 3, 2, 3)), groups=2), ValueError,
     "conv: `w.shape[-1]` (C_out=3) must be divisible by `groups` (=2)"),
    (lambda: F.conv(X2, jnp.zeros((9, 9, 3, 4))), ValueError,
     "conv: kernel span 9 (K=9, dilation=1) on spatial axis 0 is larger than the padded input 8"),
    (lambda: F.conv(X2, W2, dilation=5), ValueError, "conv: kernel span 11 (K=3, dilation=5)"),
    (lambda: F.conv(X2, W2, stride=0), ValueError, "conv: `stride` must be >= 1 on every axis, got (0, 0)"),
    (lambda: F.conv(X2, W2, dilation=(1, -1)), ValueError, "conv: `dilation` must be >= 1 on every axis, got (1, -1)"),
    (lambda: F.conv(X2, W2, stride=1.5), TypeError, "conv: `stride` must be an int or a sequence of 2 ints"),
    (lambda: F.conv(X2, W2, padding="FULL"), ValueError, "conv: `padding` must be 'VALID', 'SAME', 'CAUSAL'"),
    (lambda: F.conv(X2, W2, padding=[1, 1, 1]), ValueError,
     "conv: `padding` must have one entry per spatial axis (2), got 3"),
    (lambda: F.conv(X2, W2, padding=(1, -1)), ValueError, "conv: `padding` must be >= 0"),
    (lambda: F.conv(X2, W2, padding="CAUSAL"), ValueError,
     "conv: `padding`='CAUSAL' is only defined for 1-D inputs, got 2 spatial axes"),
    (lambda: F.conv(X2.astype(jnp.int32), W2), TypeError, "conv: `x` must be a floating-point array, got dtype int32"),
    (lambda: F.conv(X2, W2, jnp.zeros(3)), ValueError, "conv: `b` must have shape (4,)"),
    (lambda: F.conv(X2, W2, groups=0), ValueError, "conv: `groups` must be a positive int, got 0"),
    (lambda: F.max_pool(X2, 0), ValueError, "max_pool: `window` must be >= 1 on every axis, got (0, 0)"),
    (lambda: F.max_pool(X2, 2, stride=-1), ValueError, "max_pool: `stride` must be >= 1 on every axis"),
    (lambda: F.max_pool(X2, 9), ValueError, "max_pool: window span 9"),
    (lambda: F.avg_pool(X2, (2, 2, 2, 2)), ValueError, "avg_pool: `window` must have one entry per spatial axis (2), got 4"),
    (lambda: F.avg_pool(X2, 2, padding="CAUSAL"), ValueError, "avg_pool: `padding`='CAUSAL' is only defined for 1-D"),
    (lambda: F.dense(jnp.zeros((2, 3)), jnp.zeros((4, 5))), ValueError,
     "dense: `x.shape[1]` (=3) must equal `w.shape[0]` (=4)"),
    (lambda: F.cross_entropy(jnp.zeros((2, 3)), jnp.array([0, 3])), ValueError,
     "cross_entropy: `labels` must lie in [0, 2] for 3 classes, got values in [0, 3]"),
    (lambda: F.cross_entropy(jnp.zeros((2, 3)), jnp.array([-1, 0])), ValueError, "cross_entropy: `labels` must lie in [0, 2]"),
    (lambda: F.cross_entropy(jnp.zeros((2, 3)), jnp.array([0.0, 1.0])), TypeError,
     "cross_entropy: `labels` must be integer class indices, got dtype float"),
    (lambda: F.cross_entropy(jnp.zeros((2, 3)), jnp.array([0, 1]), label_smoothing=1.5), ValueError,
     "cross_entropy: `label_smoothing` must be in [0, 1)"),
]


@pytest.mark.parametrize("call, error, message", BAD_CALLS, ids=[m[:40] for _, _, m in BAD_CALLS])
def test_bad_input_raises_before_xla(call, error, message, monkeypatch):
    def no_xla(*args, **kwargs):
        raise AssertionError("reached lax.conv_general_dilated")
    monkeypatch.setattr(jax.lax, "conv_general_dilated", no_xla)
    monkeypatch.setattr(jax.lax, "reduce_window", no_xla)
    with pytest.raises(error, match=re.escape(message)):
        call()


def test_label_range_not_checked_under_jit():
    # Traced labels have no values at trace time; the check applies only when they are concrete.
    f = jax.jit(lambda z, y: F.cross_entropy(z, y))
    assert np.isfinite(float(f(jnp.zeros((2, 3)), jnp.array([0, 2]))))


@pytest.mark.x64  # float64 against the NumPy loop and lax's convolution at 1e-12
def test_what_a_cpu_runs_for_a_conv_keeps_its_numbers(rng, monkeypatch):
    """One-group convs on 1-3 spatial axes with stride, dilation and uneven padding, where a CPU runs something else
    than XLA's convolution for part of them (functional.cpu_kernels): a sum of taps forward for at most
    TAP_SUM_MAX multiply-adds per output; an input gradient spread back over the input for few input channels or
    where the transposed convolution would waste work (stride 2); a matrix product for a 1x1 kernel's weight
    gradient. Values and forward-mode derivatives (jax.jvp) equal the direct loop's, gradients
    lax.conv_general_dilated's."""
    from jax import lax
    worst, ran, paths = 0.0, 0, set()
    while ran < 48:
        n_sp = 1 + ran % 3
        c_in = int(rng.integers(1, F.SCATTER_MAX_CHANNELS + 1)) if ran % 2 else int(rng.integers(9, 13))
        kernel = tuple(int(k) for k in rng.integers(1, 4, n_sp)) if ran % 4 != 2 else (1,) * n_sp
        stride, dilation = (tuple(int(v) for v in rng.integers(1, 3, n_sp)) for _ in range(2))
        pads = tuple((int(lo), int(hi)) for lo, hi in rng.integers(0, 3, (n_sp, 2)))
        size = tuple(int(v) for v in rng.integers(5, 9, n_sp))
        if any(R.out_size(s, *p, k, st, d) < 1 for s, p, k, st, d in zip(size, pads, kernel, stride, dilation)):
            continue
        paths.add(F.cpu_kernels((2, *size, c_in), (*kernel, c_in, 1), stride, pads, dilation))
        x = rng.normal(size=(2, *size, c_in))
        w = rng.normal(size=(*kernel, c_in, int(rng.integers(1, 5))))
        loop = R.conv(x, w, None, stride, pads, dilation, 1)
        g = rng.normal(size=loop.shape)
        tangents = (rng.normal(size=x.shape), rng.normal(size=w.shape))

        @jax.jit  # one program per configuration (op by op, each primitive would compile on its own)
        def derivatives(x, w, g, tangents):
            mine = lambda x, w: F.conv(x, w, stride=stride, padding=pads, dilation=dilation)
            xla = lambda x, w: lax.conv_general_dilated(x, w, stride, pads, rhs_dilation=dilation,
                                                        dimension_numbers=F.conv_dimension_numbers(n_sp))
            (got, vjp), (want, want_vjp) = jax.vjp(mine, x, w), jax.vjp(xla, x, w)
            return got, want, jax.jvp(mine, (x, w), tangents)[1], vjp(g), want_vjp(g)
        got, want, forward_mode, grads, want_grads = derivatives(x, w, g, tangents)
        worst = max(worst, rel_err(got, loop), rel_err(want, loop),
                    rel_err(forward_mode, R.conv(tangents[0], w, None, stride, pads, dilation, 1)
                            + R.conv(x, tangents[1], None, stride, pads, dilation, 1)),
                    *(rel_err(a, b) for a, b in zip(grads, want_grads)))
        ran += 1
    assert worst <= 1e-12, worst
    for part in range(3):  # each part ran both ways
        assert {p[part] for p in paths} == {True, False}, (part, paths)

    def ops(fn, *args):
        return jax.jit(fn).lower(*args).compile().as_text()

    def convolves(x, w, **opts):
        """Whether the forward, the input gradient and the weight gradient hold a convolution on this CPU."""
        return (" convolution(" in ops(lambda x, w: F.conv(x, w, **opts), x, w),
                " convolution(" in ops(jax.grad(lambda x, w: F.conv(x, w, **opts).sum()), x, w),
                " convolution(" in ops(jax.grad(lambda w, x: F.conv(x, w, **opts).sum()), w, x))
    x, w = jnp.ones((4, 12, 12, 3)), jnp.ones((3, 3, 3, 8))  # 27 multiply-adds per output, 3 input channels
    assert convolves(x, w, padding=1) == (False, False, True)
    x16 = jnp.ones((4, 12, 12, 16))
    assert convolves(jnp.ones((4, 12, 12, 8)), jnp.ones((3, 3, 8, 8)), padding=1) == (True, False, True)
    assert convolves(x16, jnp.ones((3, 3, 16, 8)), padding=1) == (True, True, True)  # nothing wasted: XLA's
    assert convolves(x16, jnp.ones((3, 3, 16, 8)), padding=1, stride=2) == (True, False, True)  # 4 inputs per output
    assert convolves(jnp.ones((4, 5, 5, 16)), jnp.ones((3, 3, 16, 8))) == (True, False, True)  # 5x5 -> 3x3: 2.8
    assert convolves(jnp.ones((4, 7, 7, 16)), jnp.ones((3, 3, 16, 8))) == (True, True, True)  # 7x7 -> 5x5: 1.96
    assert convolves(jnp.ones((4, 8, 16)), jnp.ones((3, 16, 8)), padding=1, stride=2) == (True, False, True)  # 2
    one_by_one = jnp.ones((1, 1, 16, 8))  # XLA makes the forward and input gradient dots; the weight gradient is x^T g
    assert not convolves(x16, one_by_one)[2]
    monkeypatch.setattr(F, "TAP_SUM_MAX", 26)  # one multiply-add short: XLA's convolution
    monkeypatch.setattr(F, "SCATTER_MAX_CHANNELS", 2)
    assert convolves(x, w, padding=1) == (True, True, True)
    monkeypatch.setattr(F, "SCATTER_MIN_RATIO", 4.01)  # stride 2 wastes 4 multiply-adds per useful one: too few now
    assert convolves(x16, jnp.ones((3, 3, 16, 8)), padding=1, stride=2) == (True, True, True)
    monkeypatch.setattr(F, "DOT_WEIGHT_GRAD_MAX_TAPS", 0)  # and XLA's 12x12-window convolution for that gradient
    assert convolves(x16, one_by_one)[2]


@pytest.mark.x64  # float64 against the NumPy loop and lax's convolution at 1e-12
def test_depthwise_and_grouped_convs_keep_their_numbers_on_a_cpu(rng):
    """Depthwise convs (channel multiplier 1-3) and grouped ones of 2-4 channels per group on 1-3 spatial axes with
    stride, dilation and uneven padding, which a CPU runs as sums of taps (jaxconv.grouped, two primitives with their
    transposes written):
    values and forward-mode derivatives equal the direct loop's, gradients lax.conv_general_dilated's; jax.vmap
    (over x, w or both), jax.hessian and reverse over reverse mode go through."""
    from jax import lax
    worst, ran = 0.0, 0
    while ran < 12:
        n_sp = 1 + ran % 3
        groups, multiplier, group_channels = int(rng.integers(2, 5)), 1 + ran // 3 % 3, (1, 2, 1, 4)[ran % 4]
        c_in = groups * group_channels
        kernel = tuple(int(k) for k in rng.integers(1, 4, n_sp))
        stride, dilation = (tuple(int(v) for v in rng.integers(1, 3, n_sp)) for _ in range(2))
        pads = tuple((int(lo), int(hi)) for lo, hi in rng.integers(0, 3, (n_sp, 2)))
        size = tuple(int(v) for v in rng.integers(5, 9, n_sp))
        if any(R.out_size(s, *p, k, st, d) < 1 for s, p, k, st, d in zip(size, pads, kernel, stride, dilation)):
            continue
        x = rng.normal(size=(2, *size, c_in))
        w = rng.normal(size=(*kernel, group_channels, groups * multiplier))
        loop = R.conv(x, w, None, stride, pads, dilation, groups)
        g = rng.normal(size=loop.shape)
        tangents = (rng.normal(size=x.shape), rng.normal(size=w.shape))

        @jax.jit  # one program per configuration
        def derivatives(x, w, g, tangents):
            mine = lambda x, w: F.conv(x, w, stride=stride, padding=pads, dilation=dilation, groups=groups)
            xla = lambda x, w: lax.conv_general_dilated(x, w, stride, pads, rhs_dilation=dilation,
                                                        dimension_numbers=F.conv_dimension_numbers(n_sp),
                                                        feature_group_count=groups)
            (got, vjp), (want, want_vjp) = jax.vjp(mine, x, w), jax.vjp(xla, x, w)
            return got, want, jax.jvp(mine, (x, w), tangents)[1], vjp(g), want_vjp(g)
        got, want, forward_mode, grads, want_grads = derivatives(x, w, g, tangents)
        worst = max(worst, rel_err(got, loop), rel_err(want, loop),
                    rel_err(forward_mode, R.conv(tangents[0], w, None, stride, pads, dilation, groups)
                            + R.conv(x, tangents[1], None, stride, pads, dilation, groups)),
                    *(rel_err(a, b) for a, b in zip(grads, want_grads)))
        ran += 1
    assert worst <= 1e-12, worst

    grad_of_grad = lambda f: jax.grad(lambda x, w: sum(jnp.sum(jnp.cos(t)) for t in jax.grad(f, (0, 1))(x, w)), (0, 1))
    for groups, x, w in [(3, rng.normal(size=(2, 6, 5, 3)), rng.normal(size=(3, 2, 1, 6))),  # depthwise
                         (2, rng.normal(size=(2, 6, 5, 4)), rng.normal(size=(3, 2, 2, 6)))]:  # 2 channels per group
        mine = lambda x, w, groups=groups: jnp.sum(jnp.sin(F.conv(x, w, padding=1, groups=groups)))
        xla = lambda x, w, groups=groups: jnp.sum(jnp.sin(lax.conv_general_dilated(
            x, w, (1, 1), ((1, 1), (1, 1)), dimension_numbers=F.conv_dimension_numbers(2), feature_group_count=groups)))
        xs, ws = np.stack([x, 2 * x]), np.stack([w, -w])
        for transform, args in [(jax.hessian, (x, w)), (grad_of_grad, (x, w)), *[
                (lambda f, axes=axes: jax.vmap(jax.grad(f, (0, 1)), axes),
                 (xs if axes[0] == 0 else x, ws if axes[1] == 0 else w)) for axes in ((0, None), (None, 0), (0, 0))]]:
            for a, b in zip(jax.tree.leaves(jax.jit(transform(mine))(*args)),
                            jax.tree.leaves(jax.jit(transform(xla))(*args))):
                assert rel_err(a, b) <= 1e-12

    def convolves(fn, *args, platform="cpu"):
        return "convolution" in jax.export.export(jax.jit(fn), platforms=[platform])(*args).mlir_module() \
            if platform != "cpu" else " convolution(" in jax.jit(fn).lower(*args).compile().as_text()
    for w in (jnp.ones((3, 3, 1, 8)), jnp.ones((3, 3, 2, 8))):  # depthwise; 2 channels in each of 4 groups
        x = jnp.ones((4, 10, 10, 4 * w.shape[-2]))
        conv = lambda x, w: F.conv(x, w, padding=1, groups=4).sum()
        assert not convolves(conv, x, w)
        assert not convolves(jax.grad(conv), x, w)
        assert not convolves(jax.grad(conv, 1), x, w)
        assert "jaxconv_grouped_weight_grad" in str(jax.make_jaxpr(jax.grad(conv, 1))(x, w))  # the written transpose
        for platform in ("cuda", "tpu"):  # their convolutions throughout
            assert all(convolves(fn, x, w, platform=platform) for fn in (conv, jax.grad(conv), jax.grad(conv, 1)))
    # more than grouped.MAX_GROUP_CHANNELS per group: one dense conv per group on a CPU, XLA's grouped one elsewhere
    for n_sp, groups, per_group in ((1, 3, 9), (2, 2, 10), (3, 2, 9)):
        x = rng.normal(size=(2, *(6,) * n_sp, groups * per_group))
        w = rng.normal(size=(*(3,) * n_sp, per_group, 2 * groups))
        mine = lambda x, w, groups=groups: F.conv(x, w, stride=2, padding=1, groups=groups)
        xla = lambda x, w, groups=groups, n_sp=n_sp: lax.conv_general_dilated(
            x, w, (2,) * n_sp, ((1, 1),) * n_sp, dimension_numbers=F.conv_dimension_numbers(n_sp),
            feature_group_count=groups)
        g = rng.normal(size=xla(x, w).shape)
        got = jax.jit(lambda x, w, g: (mine(x, w), *jax.vjp(mine, x, w)[1](g)))(x, w, g)
        want = jax.jit(lambda x, w, g: (xla(x, w), *jax.vjp(xla, x, w)[1](g)))(x, w, g)
        assert max(rel_err(a, b) for a, b in zip(got, want)) <= 1e-12
        for fn in (mine, jax.grad(lambda x, w: jnp.sum(mine(x, w) ** 2), (0, 1))):
            text = jax.jit(fn).lower(x, w).compile().as_text()
            assert f"group_count={groups}" not in text  # no grouped convolution (a dense group may sum taps)
        cuda = jax.export.export(jax.jit(mine), platforms=["cuda"])(x, w).mlir_module()
        assert f"feature_group_count = {groups}" in cuda


def test_a_depthwise_conv_keeps_the_batch_sharding_of_its_types(rng):
    """Under explicit sharding (jax.sharding.AxisType.Explicit; a one-device mesh, as the types are what is
    checked) the output and the input gradient keep x's batch sharding, the weight gradient is replicated, the
    numbers are the unsharded ones; a sharded spatial axis is refused by name."""
    from jax.sharding import NamedSharding, PartitionSpec as P
    x, w = rng.normal(size=(4, 6, 6, 3)).astype(np.float32), rng.normal(size=(3, 3, 1, 6)).astype(np.float32)
    loss = lambda x, w: jnp.sum(jnp.sin(F.conv(x, w, padding=1, groups=3)))
    want = jax.jit(jax.grad(loss, (0, 1)))(x, w)
    mesh = jax.make_mesh((1,), ("data",), axis_types=(jax.sharding.AxisType.Explicit,))
    with jax.set_mesh(mesh):
        xs, ws = jax.device_put(x, NamedSharding(mesh, P("data"))), jax.device_put(w, NamedSharding(mesh, P()))
        y = jax.jit(lambda x, w: F.conv(x, w, padding=1, groups=3))(xs, ws)
        got = jax.jit(jax.grad(loss, (0, 1)))(xs, ws)
        assert y.sharding.spec == P("data", None, None, None) and got[0].sharding.spec == P("data", None, None, None)
        assert got[1].sharding.spec == P(None, None, None, None)
        for a, b in zip(got, want):
            np.testing.assert_array_equal(a, b)
        with pytest.raises(ValueError, match="conv primitives shard only the batch axis"):
            jax.jit(loss)(jax.device_put(x, NamedSharding(mesh, P(None, "data"))), ws)


def test_a_bfloat16_depthwise_conv_accumulates_in_float32(rng):
    x = jnp.asarray(rng.normal(size=(2, 10, 10, 4)), jnp.bfloat16)
    w = jnp.asarray(rng.normal(size=(5, 5, 1, 8)), jnp.bfloat16)
    got, exact = jax.jit(lambda x, w: (F.conv(x, w, padding=2, groups=4),  # one program, not op by op
                                       F.conv(x.astype(jnp.float32), w.astype(jnp.float32), padding=2, groups=4)))(x, w)
    assert got.dtype == jnp.bfloat16
    np.testing.assert_array_equal(np.asarray(got, np.float32), np.asarray(exact.astype(jnp.bfloat16), np.float32))


def test_a_bfloat16_tap_sum_accumulates_in_float32(rng):
    x = jnp.asarray(rng.normal(size=(2, 10, 10, 3)), jnp.bfloat16)
    w = jnp.asarray(rng.normal(size=(3, 3, 3, 4)), jnp.bfloat16)
    got = F.conv(x, w, padding=1)
    exact = F.conv(x.astype(jnp.float32), w.astype(jnp.float32), padding=1)
    assert got.dtype == jnp.bfloat16
    np.testing.assert_array_equal(np.asarray(got, np.float32), np.asarray(exact.astype(jnp.bfloat16), np.float32))
