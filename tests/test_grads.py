"""Hand-written backward passes against jax.vjp, finite differences and torch.autograd (float64)."""
import functools
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.test_util import check_grads

from jaxconv import create_model
from jaxconv import functional as F
from jaxconv import grads as G
from jaxconv import gradcheck as GC
from jaxconv.backprop import manual_value_and_grad

PER_OP = 4  # random configurations per op (x 20 ops), 1-D and 2-D alternating; experiments/autodiff_vs_manual.py runs more

pytestmark = pytest.mark.x64  # float64 references at tight tolerances


def test_every_vjp_matches_jax_vjp_on_random_configurations(rng):
    worst, counts = {}, {}
    for name, forward, args, options in GC.random_op_cases(rng, PER_OP):
        err = GC.op_error(forward, args, options, rng)
        worst[name] = max(worst.get(name, 0.0), err)
        counts[name] = counts.get(name, 0) + 1
        assert err <= 1e-10, (name, options, err)
    assert set(counts) == {"conv", "max_pool", "avg_pool", "global_avg_pool", "relu", "flatten", "batch_norm_train",
                           "batch_norm", "dropout", "dense", "log_softmax", "softmax", "cross_entropy",
                           "conv_transpose", "add", "concat", "identity", "upsample", "layer_norm", "group_norm"}
    assert set(counts) | {"conv1d", "conv2d"} == {f.__name__ for f in G._RULES}  # every registered vjp is covered


def test_seed4_relu_vjp():
    got = G.relu_vjp(jnp.array([4.0, -1.0, 5.0, 9.0]), jnp.array([1.0, -2.0, 3.0, -1.0]))
    np.testing.assert_array_equal(got, [4, 0, 5, 0])
    assert float(G.relu_vjp(jnp.array([3.0]), jnp.array([0.0]))[0]) == 0.0


@pytest.mark.parametrize("case", [
    dict(stride=2, padding="SAME", dilation=1, groups=1),
    dict(stride=(1, 3), padding=[(2, 0), (1, 3)], dilation=(2, 1), groups=2),
    dict(stride=1, padding=1, dilation=2, groups=4),
])
def test_manual_conv_against_finite_differences(rng, case):
    x = jnp.asarray(rng.normal(size=(2, 7, 6, 4)))
    w = jnp.asarray(rng.normal(size=(3, 2, 4 // case["groups"], 4)))
    b = jnp.asarray(rng.normal(size=4))
    check_grads(lambda x, w, b: G.manual(F.conv)(x, w, b, **case), (x, w, b), order=1, modes=["rev"])


def test_manual_pools_and_loss_against_finite_differences(rng):
    x = jnp.asarray(rng.normal(size=(2, 7, 7, 3)))  # continuous values: no ties
    check_grads(lambda x: G.manual(F.max_pool)(x, 3, stride=2, padding=1), (x,), order=1, modes=["rev"])
    check_grads(lambda x: G.manual(F.avg_pool)(x, 3, stride=2, padding=1, count_include_pad=False), (x,), order=1,
                modes=["rev"])
    z = jnp.asarray(rng.normal(size=(5, 4)))
    check_grads(lambda z: G.manual(F.cross_entropy)(z, jnp.array([0, 1, 2, 3, 0]), label_smoothing=0.1), (z,),
                order=1, modes=["rev"])
    scale, bias = jnp.asarray(rng.normal(size=3)), jnp.asarray(rng.normal(size=3))
    check_grads(lambda x, s, b: G.manual(F.batch_norm_train)(x, s, b), (x, scale, bias), order=1, modes=["rev"])


def test_max_pool_ties_go_to_the_first_maximum_and_overlaps_add():
    x = jnp.array([[1.0, 5.0, 5.0], [5.0, 0.0, 2.0], [0.0, 1.0, 3.0]])[None, :, :, None]
    g = jnp.ones((1, 2, 2, 1))
    got = G.max_pool_vjp(g, x, 2, stride=1)[0, :, :, 0]
    # windows: {1,5,5,0} -> first 5 at (0,1); {5,5,0,2} -> (0,1); {5,0,0,1} -> (1,0); {0,2,1,3} -> (2,2)
    np.testing.assert_array_equal(got, [[0, 2, 0], [1, 0, 0], [0, 0, 1]])
    _, vjp = jax.vjp(lambda v: F.max_pool(v, 2, stride=1), x)
    np.testing.assert_array_equal(vjp(g)[0][0, :, :, 0], got)  # same rule as JAX autodiff


def test_max_pool_nan_window_sends_its_gradient_where_autodiff_does():
    x = jnp.array([[1.0, 5.0, 2.0, 3.0], [4.0, jnp.nan, 7.0, jnp.nan]]).reshape(1, 2, 4, 1)
    g = jnp.array([10.0, 20.0]).reshape(1, 1, 2, 1)
    auto = jax.vjp(lambda x: F.max_pool(x, 2), x)[1](g)[0]
    manual = G.max_pool_vjp(g, x, 2)
    np.testing.assert_array_equal(manual, auto)
    # the first NaN in row-major window order takes each window's gradient
    np.testing.assert_array_equal(manual.reshape(2, 4), [[0, 0, 0, 0], [0, 10, 0, 20]])


def test_the_hand_written_grouped_backward_matches_torch_autograd(rng):
    """Depthwise convs (channel multiplier 1-3) and grouped ones of 2-3 channels per group, whose hand-written
    backward a CPU runs by taps (jaxconv.grouped.input_grad, weight_grad), and of 9 per group, which it runs one
    dense group at a time: dx and dw equal torch.autograd's on 1-D and 2-D, lax's convolution gradients on 3-D; the
    program holds no convolution on the CPU and keeps XLA's convolutions for a GPU."""
    torch = pytest.importorskip("torch")
    from jax import lax
    for trial in range(9):
        n_sp, multiplier, groups = 1 + trial % 3, 1 + trial % 4 // 2 + trial % 2, int(rng.integers(2, 5))
        group_channels = (1, 2, 9, 3)[trial % 4]  # 9: one dense conv per group on a CPU
        c = groups * group_channels
        k, s, d = (tuple(int(v) for v in rng.integers(1, 4, n_sp)) for _ in range(3))
        pad = tuple(int(v) for v in rng.integers(0, 3, n_sp))
        x = rng.normal(size=(2, *rng.integers(9, 12, n_sp), c))
        w = rng.normal(size=(*k, group_channels, groups * multiplier))
        opts = dict(stride=s, padding=pad, dilation=d, groups=groups)
        y = jax.jit(functools.partial(F.conv, **opts))(x, w)
        g = rng.normal(size=y.shape)
        dx, dw, _ = jax.jit(functools.partial(G.conv_vjp, **opts))(g, x, w)
        if n_sp == 3:
            want = jax.vjp(lambda x, w: lax.conv_general_dilated(
                x, w, s, [(p, p) for p in pad], rhs_dilation=d, dimension_numbers=F.conv_dimension_numbers(3),
                feature_group_count=groups), x, w)[1](g)
        else:
            xt = torch.tensor(np.moveaxis(x, -1, 1), requires_grad=True)
            wt = torch.tensor(np.transpose(w, (n_sp + 1, n_sp, *range(n_sp))), requires_grad=True)
            conv = torch.nn.functional.conv1d if n_sp == 1 else torch.nn.functional.conv2d
            conv(xt, wt, stride=s, padding=pad, dilation=d, groups=groups).backward(torch.tensor(np.moveaxis(g, -1, 1)))
            want = np.moveaxis(xt.grad.numpy(), 1, -1), np.transpose(wt.grad.numpy(), (*range(2, n_sp + 2), 1, 0))
        np.testing.assert_allclose(dx, want[0], rtol=1e-10, atol=1e-12)
        np.testing.assert_allclose(dw, want[1], rtol=1e-10, atol=1e-12)

    x, w, g = jnp.ones((2, 8, 8, 4)), jnp.ones((3, 3, 1, 8)), jnp.ones((2, 8, 8, 8))
    backward = jax.jit(lambda g, x, w: G.conv_vjp(g, x, w, padding=1, groups=4))
    assert " convolution(" not in backward.lower(g, x, w).compile().as_text()
    assert "convolution" in jax.export.export(backward, platforms=["cuda"])(g, x, w).mlir_module()
    x, w, g = jnp.ones((2, 8, 8, 18)), jnp.ones((3, 3, 9, 4)), jnp.ones((2, 8, 8, 4))  # 9 channels per group
    text = jax.jit(lambda g, x, w: G.conv_vjp(g, x, w, padding=1, groups=2)).lower(g, x, w).compile().as_text()
    assert "group_count=2" not in text  # no grouped convolution on the CPU: a dense one per group


def test_the_hand_written_conv_backward_runs_what_autodiff_runs_on_a_cpu(rng, monkeypatch):
    """One-group convs where functional.cpu_kernels chooses products for the input gradient (few input channels, a
    stride that wastes work) or the weight gradient (1x1): the hand-written backward equals autodiff's, and its CPU
    program holds a convolution for a part exactly where autodiff's does."""
    cases = [((2, 9, 9, 3), (3, 3, 3, 5), dict(padding=1)), ((2, 9, 9, 12), (3, 3, 12, 4), dict(stride=2, padding=1)),
             ((2, 8, 8, 12), (1, 1, 12, 6), {}), ((2, 10, 12), (1, 12, 6), dict(stride=2)),
             ((2, 7, 7, 12), (3, 3, 12, 4), dict(padding=1)), ((2, 6, 5, 4, 2), (2, 3, 1, 2, 3), dict(dilation=2)),
             ((2, 7, 6, 12), (3, 2, 12, 4), dict(padding=1, dilation=(1, 2)))]  # the last with products for 6 taps
    chosen = []
    for i, (x_shape, w_shape, opts) in enumerate(cases):
        monkeypatch.setattr(F, "DOT_WEIGHT_GRAD_MAX_TAPS", 6 if i == len(cases) - 1 else 1)
        chosen.append(F.cpu_kernels(x_shape, w_shape, *F.conv_geometry(
            jnp.zeros(x_shape), jnp.zeros(w_shape), fn="t", groups=1, **{"stride": 1, "padding": "VALID",
                                                                          "dilation": 1, **opts}))[1:])
        x, w = rng.normal(size=x_shape), rng.normal(size=w_shape)
        g = rng.normal(size=jax.eval_shape(lambda x, w: F.conv(x, w, **opts), x, w).shape)
        manual = lambda g, x, w: G.conv_vjp(g, x, w, **opts)[:2]
        auto = lambda g, x, w: jax.vjp(lambda x, w: F.conv(x, w, **opts), x, w)[1](g)
        for a, b in zip(*jax.jit(lambda g, x, w: (manual(g, x, w), auto(g, x, w)))(g, x, w)):  # one program
            np.testing.assert_allclose(a, b, rtol=1e-12, atol=1e-12)

        def convolves(fn, part):
            return " convolution(" in jax.jit(lambda g, x, w: fn(g, x, w)[part]).lower(g, x, w).compile().as_text()
        for part in range(2):
            assert convolves(manual, part) == convolves(auto, part), (x_shape, w_shape, opts, part)
    assert chosen == [  # (input gradient, weight gradient) by products
        (True, False), (True, False), (False, True), (True, True), (False, False), (True, False), (False, True)]


def test_conv_and_pool_gradients_match_torch_autograd(rng):
    torch = pytest.importorskip("torch")
    tf = torch.nn.functional
    for trial in range(20):
        n_sp = 1 + trial % 2
        groups = int(rng.choice([1, 2]))
        k, s, d = (tuple(int(v) for v in rng.integers(1, 4, n_sp)) for _ in range(3))
        pad = tuple(int(v) for v in rng.integers(0, 3, n_sp))
        x = rng.normal(size=(2, *rng.integers(9, 12, n_sp), 2 * groups))
        w = rng.normal(size=(*k, 2, 2 * groups))
        opts = dict(stride=s, padding=pad, dilation=d, groups=groups)  # each call one program, not op by op
        y = jax.jit(functools.partial(F.conv, **opts))(x, w)
        g = rng.normal(size=y.shape)
        dx, dw, _ = jax.jit(functools.partial(G.conv_vjp, **opts))(g, x, w)
        xt = torch.tensor(np.moveaxis(x, -1, 1), requires_grad=True)
        wt = torch.tensor(np.transpose(w, (n_sp + 1, n_sp, *range(n_sp))), requires_grad=True)
        conv = tf.conv1d if n_sp == 1 else tf.conv2d
        conv(xt, wt, stride=s, padding=pad, dilation=d, groups=groups).backward(torch.tensor(np.moveaxis(g, -1, 1)))
        np.testing.assert_allclose(dx, np.moveaxis(xt.grad.numpy(), 1, -1), rtol=1e-10, atol=1e-12)
        np.testing.assert_allclose(dw, np.transpose(wt.grad.numpy(), (*range(2, n_sp + 2), 1, 0)), rtol=1e-10,
                                   atol=1e-12)

        window = tuple(int(v) for v in rng.integers(1, 4, n_sp))
        pool_pad = tuple(int(rng.integers(0, kk // 2 + 1)) for kk in window)
        for kind in ("max", "avg_incl", "avg_excl"):
            opts = dict(stride=s, padding=pool_pad)
            xt = torch.tensor(np.moveaxis(x, -1, 1), requires_grad=True)
            if kind == "max":
                out_t = (tf.max_pool1d if n_sp == 1 else tf.max_pool2d)(xt, window, s, pool_pad)
                ours = jax.jit(lambda gg, x: G.max_pool_vjp(gg, x, window, **opts))
            else:
                incl = kind == "avg_incl"
                out_t = (tf.avg_pool1d if n_sp == 1 else tf.avg_pool2d)(xt, window, s, pool_pad,
                                                                         count_include_pad=incl)
                ours = jax.jit(lambda gg, x, incl=incl: G.avg_pool_vjp(gg, x, window, count_include_pad=incl, **opts))
            gp = rng.normal(size=out_t.shape)
            out_t.backward(torch.tensor(gp))
            np.testing.assert_allclose(ours(np.moveaxis(gp, 1, -1), x),
                                       np.moveaxis(xt.grad.numpy(), 1, -1), rtol=1e-10, atol=1e-12)


def _flat_errors(manual, auto):
    flat_a = nnx.to_flat_state(auto)
    scale = max(float(jnp.max(jnp.abs(v[...]))) for v in flat_a.leaves)
    return [GC.rel_error(m[...], a[...], 1e-6 * scale) for m, a in zip(nnx.to_flat_state(manual).leaves, flat_a.leaves)]


# float64 for every kind of layer; float32, the production dtype, for the models whose layers hold the dtype-
# sensitive rules (pools, dense, BatchNorm, GroupNorm, concat, transposed conv); ResNet-20's float32 run (13 s) adds
# only a residual add to them.
@pytest.mark.parametrize("name, dtype, tol", [
    *[(name, jnp.float64, 1e-10) for name in ("lenet5", "mnist1d_cnn", "seed_cnn", "mnist1d_deep", "resnet20",
                                              "unet_small")],
    *[(name, jnp.float32, 1e-4) for name in ("lenet5", "mnist1d_deep", "unet_small")]])
def test_whole_model_manual_backprop_equals_jax_grad(name, dtype, tol):
    model = create_model(name, seed=1, param_dtype=dtype)
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    x, y = GC.random_batch(model, 4, 0, dtype)
    graphdef_m, _, rest_m = nnx.split(create_model(name, seed=1, param_dtype=dtype, grad="manual"), nnx.Param, ...)
    loss = lambda graphdef, rest: lambda p: F.cross_entropy(nnx.merge(graphdef, p, rest, copy=True)(x), y)

    @jax.jit  # the three gradients in one program
    def gradients(p):
        # the custom_vjp route (grad="manual" layers) gives the same gradients through jax.grad
        return (manual_value_and_grad(model, p, x, y)[1], jax.grad(loss(graphdef, rest))(p),
                jax.grad(loss(graphdef_m, rest_m))(p))
    with jax.default_matmul_precision("highest"):
        manual, auto, custom = gradients(params)
    assert max(_flat_errors(manual, auto)) <= tol
    assert max(_flat_errors(custom, auto)) <= tol
    assert jax.tree.structure(manual) == jax.tree.structure(auto)


def test_model_report_fd_column_is_small():
    rows = GC.model_report("mnist1d_cnn")
    assert {r[0] for r in rows} == {"float64", "float32"}
    assert max(r[3] for r in rows if r[0] == "float64") <= 1e-10
    assert max(r[4] for r in rows if r[0] == "float64") <= 1e-5


VJP_BAD = [
    (lambda: G.conv_vjp(jnp.zeros((1, 3, 3, 4)), jnp.zeros((1, 8, 8, 3)), jnp.zeros((3, 3, 3, 4))), ValueError,
     "conv_vjp: `g` must have the forward output's shape (1, 6, 6, 4), got (1, 3, 3, 4)"),
    (lambda: G.conv_vjp(jnp.zeros((1, 6, 6, 4)), jnp.zeros((1, 8, 8, 3)), jnp.zeros((3, 3, 3, 4)), stride=0),
     ValueError, "conv_vjp: `stride` must be >= 1"),
    (lambda: G.conv_vjp(jnp.zeros((1, 6, 6, 4)), jnp.zeros((1, 8, 8, 3)), jnp.zeros((3, 3, 2, 4))), ValueError,
     "conv_vjp: `x.shape[-1]` (=3) must equal `w.shape[-2] * groups`"),
    (lambda: G.max_pool_vjp(jnp.zeros((1, 3, 3, 2)), jnp.zeros((1, 8, 8, 2)), 2), ValueError,
     "max_pool_vjp: `g` must have the forward output's shape (1, 4, 4, 2), got (1, 3, 3, 2)"),
    (lambda: G.avg_pool_vjp(jnp.zeros((1, 4, 4, 2)), jnp.zeros((1, 8, 8, 2)), 2, padding="FULL"), ValueError,
     "avg_pool_vjp: `padding` must be 'VALID', 'SAME', 'CAUSAL'"),
    (lambda: G.dense_vjp(jnp.zeros((2, 4)), jnp.zeros((2, 3)), jnp.zeros((3, 5))), ValueError,
     "dense_vjp: `g` must have the forward output's shape (2, 5), got (2, 4)"),
    (lambda: G.relu_vjp(jnp.zeros(3), jnp.zeros(4)), ValueError, "relu_vjp: `g` must have the forward output's shape (4,)"),
    (lambda: G.cross_entropy_vjp(jnp.ones(2), jnp.zeros((2, 3)), jnp.array([0, 1])), ValueError,
     "cross_entropy_vjp: `g` must have the forward output's shape (), got (2,)"),
]


@pytest.mark.parametrize("call, error, message", VJP_BAD, ids=[m[:30] for _, _, m in VJP_BAD])
def test_vjp_bad_input(call, error, message):
    with pytest.raises(error, match=re.escape(message)):
        call()
