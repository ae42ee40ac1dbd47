"""One example or a batch: every op, its hand-written vjp and the layers that know their rank take an
input without its batch axis, as PyTorch's do, so ``jax.vmap`` over examples equals the batched call.

The reference is the batched call itself (already tested against NumPy and PyTorch elsewhere); the
per-example results are computed by ``jax.vmap`` and by a Python loop over examples, in float64."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jaxconv import functional as F
from jaxconv import grads as G
from jaxconv import layers as L

pytestmark = pytest.mark.x64


def _normal(rng, *shape):
    return jnp.asarray(rng.standard_normal(shape))


# (forward op, its vjp, x's batched shape, the arguments after x, options, cotangents beyond dx that sum
# over the batch)
def _cases(rng):
    w1, w2, w3 = _normal(rng, 3, 2, 4), _normal(rng, 3, 3, 2, 4), _normal(rng, 2, 2, 2, 2, 3)
    wt = _normal(rng, 3, 3, 2, 3)  # transposed: [*K, C_in, C_out // groups]
    b4, b3 = _normal(rng, 4), _normal(rng, 3)
    return [
        ("conv 1-D", F.conv, G.conv_vjp, (3, 9, 2), (w1, b4), dict(stride=2, padding=1), 2),
        ("conv 2-D", F.conv, G.conv_vjp, (3, 7, 8, 2), (w2, b4), dict(padding="SAME", dilation=2), 2),
        ("conv 3-D", F.conv, G.conv_vjp, (2, 4, 5, 5, 2), (w3, b3), dict(stride=(1, 2, 1)), 2),
        ("conv groups", F.conv, G.conv_vjp, (3, 6, 6, 4), (_normal(rng, 3, 3, 2, 4), None), dict(groups=2), 1),
        ("conv2d", F.conv2d, G.conv_vjp, (3, 7, 8, 2), (w2, b4), dict(padding=1), 2),
        ("conv_transpose", F.conv_transpose, G.conv_transpose_vjp, (3, 5, 4, 2), (wt, b3),
         dict(stride=2, padding=1, output_padding=1), 2),
        ("max_pool", F.max_pool, G.max_pool_vjp, (3, 7, 6, 2), ((3, 2),), dict(stride=2, padding="SAME"), 0),
        ("avg_pool", F.avg_pool, G.avg_pool_vjp, (3, 7, 6, 2), ((2, 3),),
         dict(padding=1, count_include_pad=False), 0),
        ("upsample bilinear", F.upsample, G.upsample_vjp, (3, 4, 5, 2), ((2, 3),), dict(method="bilinear"), 0),
        ("global_avg_pool", F.global_avg_pool, G.global_avg_pool_vjp, (3, 4, 5, 2), (), dict(spatial_rank=2), 0),
        ("dense", F.dense, G.dense_vjp, (4, 5), (_normal(rng, 5, 3), b3), {}, 2),
        ("batch_norm", F.batch_norm, G.batch_norm_vjp, (3, 4, 2),
         (_normal(rng, 2), _normal(rng, 2), _normal(rng, 2), jnp.abs(_normal(rng, 2)) + 0.5), {}, 4),
        ("layer_norm", F.layer_norm, G.layer_norm_vjp, (3, 4, 5), (_normal(rng, 5), _normal(rng, 5)), {}, 2),
        ("relu", F.relu, G.relu_vjp, (3, 4, 2), (), {}, 0),
    ]


CASES = [c[0] for c in _cases(np.random.default_rng(0))]


@pytest.mark.parametrize("name", CASES)
def test_vmap_over_examples_equals_the_batched_call(name):
    rng = np.random.default_rng(CASES.index(name))
    _, op, vjp, shape, args, options, n_param_cts = _cases(rng)[CASES.index(name)]
    x = _normal(rng, *shape)
    y = op(x, *args, **options)
    per_example = jax.vmap(lambda xi: op(xi, *args, **options))(x)
    looped = jnp.stack([op(xi, *args, **options) for xi in x])
    np.testing.assert_allclose(per_example, y, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(looped, y, rtol=1e-12, atol=1e-12)
    assert op(x[0], *args, **options).shape == y.shape[1:]

    g = _normal(rng, *y.shape)
    batched = vjp(g, x, *args, **options)
    batched = batched if isinstance(batched, tuple) else (batched,)
    each = [vjp(gi, xi, *args, **options) for gi, xi in zip(g, x)]
    each = [c if isinstance(c, tuple) else (c,) for c in each]
    np.testing.assert_allclose(jnp.stack([c[0] for c in each]), batched[0], rtol=1e-10, atol=1e-12)
    for k in range(1, 1 + n_param_cts):   # a batch's parameter cotangent is the sum of its examples'
        np.testing.assert_allclose(sum(c[k] for c in each), batched[k], rtol=1e-10, atol=1e-12)
    # and the hand-written rule under jax.grad of one example is autodiff's
    manual = jax.grad(lambda xi: jnp.vdot(G.manual(op)(xi, *args, **options), g[0]))(x[0])
    auto = jax.grad(lambda xi: jnp.vdot(op(xi, *args, **options), g[0]))(x[0])
    np.testing.assert_allclose(manual, auto, rtol=1e-10, atol=1e-12)


def test_cross_entropy_of_one_example_is_that_examples_loss():
    rng = np.random.default_rng(3)
    logits, labels = _normal(rng, 5, 4), jnp.asarray([0, 3, 1, 1, 2])
    losses = F.cross_entropy(logits, labels, label_smoothing=0.1, reduction="none")
    one = jax.vmap(lambda z, y: F.cross_entropy(z, y, label_smoothing=0.1))(logits, labels)
    np.testing.assert_allclose(one, losses, rtol=1e-12)
    expected = -np.log(np.exp(logits[1, 3]) / np.exp(logits[1]).sum()) * 0.9 - 0.1 / 4 * np.asarray(
        jax.nn.log_softmax(logits[1])).sum()
    np.testing.assert_allclose(F.cross_entropy(logits[1], labels[1], label_smoothing=0.1), expected, rtol=1e-12)
    d = G.cross_entropy_vjp(jnp.asarray(1.0), logits[1], labels[1], label_smoothing=0.1)
    np.testing.assert_allclose(d, jax.grad(lambda z: F.cross_entropy(z, labels[1], label_smoothing=0.1))(logits[1]),
                               rtol=1e-12)


def test_per_example_gradients_of_a_small_convnet_sum_to_the_batch_gradient():
    """The DP-SGD idiom: ``vmap(grad)`` over examples, written with the plain ops on one example each."""
    rng = np.random.default_rng(4)
    params = {"w": _normal(rng, 3, 3, 1, 4) * 0.3, "b": _normal(rng, 4) * 0.1, "v": _normal(rng, 4, 10) * 0.3}
    x, y = _normal(rng, 6, 8, 8, 1), jnp.asarray(rng.integers(0, 10, 6))

    def loss(p, xi, yi):  # one example: xi [8, 8, 1], yi a scalar
        h = F.relu(F.conv(xi, p["w"], p["b"], padding=1))
        h = F.max_pool(h, (2, 2))
        return F.cross_entropy(F.dense(F.global_avg_pool(h, spatial_rank=2), p["v"]), yi)

    per_example = jax.jit(jax.vmap(jax.grad(loss), in_axes=(None, 0, 0)))(params, x, y)
    assert per_example["w"].shape == (6, 3, 3, 1, 4)

    def batch_loss(p):
        h = F.max_pool(F.relu(F.conv(x, p["w"], p["b"], padding=1)), (2, 2))
        return F.cross_entropy(F.dense(F.global_avg_pool(h), p["v"]), y)

    batch = jax.jit(jax.grad(batch_loss))(params)
    for k in params:
        np.testing.assert_allclose(per_example[k].mean(0), batch[k], rtol=1e-10, atol=1e-14)


@pytest.mark.parametrize("grad", ["auto", "manual"])
def test_layers_that_know_their_rank_take_one_example(grad):
    rngs = nnx.Rngs(0)
    x = jax.random.normal(jax.random.PRNGKey(1), (3, 6, 6, 2), jnp.float64)
    for layer in [L.Conv2d(2, 4, 3, padding=1, grad=grad, rngs=rngs), L.MaxPool2d(2, grad=grad),
                  L.AvgPool((3, 3), stride=1, grad=grad), L.Upsample((2, 1), grad=grad),
                  L.ConvTranspose2d(2, 3, 3, stride=2, grad=grad, rngs=rngs), L.LayerNorm(2, rngs=rngs)]:
        @jax.jit  # one program per layer (op by op, each primitive would compile on its own)
        def batch_and_examples(x, layer=layer):
            f = lambda v: jnp.sum(jnp.sin(layer(v)))
            y0, back = layer.forward_and_backward(x[0])
            return (layer(x), jnp.stack([layer(xi) for xi in x]), jax.grad(f)(x),
                    jnp.stack([jax.grad(f)(xi) for xi in x]), back(jnp.cos(y0))[0])
        y, ys, g, g1, dx0 = batch_and_examples(x)
        np.testing.assert_allclose(ys, y, rtol=1e-12, atol=1e-12, err_msg=type(layer).__name__)
        np.testing.assert_allclose(g1, g, rtol=1e-10, atol=1e-12, err_msg=type(layer).__name__)
        np.testing.assert_allclose(dx0, g[0], rtol=1e-10, atol=1e-12, err_msg=type(layer).__name__)
    dense = L.Dense(5, 2, grad=grad, rngs=rngs)
    v = jax.random.normal(jax.random.PRNGKey(2), (4, 5), jnp.float64)
    np.testing.assert_allclose(jnp.stack([dense(vi) for vi in v]), dense(v), rtol=1e-12)


def test_ambiguous_ranks_stay_batches_and_wrong_ranks_are_named():
    x = jnp.ones((4, 6, 2))
    # an int window fits any rank: a rank-3 input is a batch of 1-D signals, as before
    assert F.max_pool(x, 2).shape == (4, 3, 2)
    assert F.max_pool(x, (2, 2)).shape == (2, 3, 2)   # per-axis window: one 4x6 example, 2 channels
    with pytest.raises(ValueError, match=r"max_pool: `x` must have rank >= 3, got rank 2"):
        F.max_pool(jnp.ones((6, 2)), 2)
    with pytest.raises(ValueError, match=r"global_avg_pool: `x` must have rank 4, got rank 5"):
        F.global_avg_pool(jnp.ones((2, 3, 4, 5, 6)), spatial_rank=2)
    with pytest.raises(ValueError, match=r"conv: `x` must be a batch \[N, \*spatial, C\] of rank 4 or one example of rank 3"):
        F.conv(jnp.ones((2,)), jnp.ones((3, 3, 1, 2)))
    with pytest.raises(ValueError, match=r"conv_vjp: `g` must have the forward output.s shape \(1, 4, 4, 2\), got \(1, 5, 5, 2\) \(one example"):
        G.conv_vjp(jnp.ones((5, 5, 2)), jnp.ones((6, 6, 1)), jnp.ones((3, 3, 1, 2)))
