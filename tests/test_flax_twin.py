"""Plain Flax NNX twins (what `jaxconv bench --compare flax` times): the same outputs as the jaxconv model,
from Flax's own layers, for every registered model; and the same training step."""
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from jaxconv import MODELS, create_model
from jaxconv import functional as F
from jaxconv import layers as L
from jaxconv.flax_twin import flax_twin


def _shape(name):  # the ImageNet models on a smaller image: same layers, less time
    return (64, 64, 3) if MODELS[name].input_shape == (224, 224, 3) else None


@pytest.mark.parametrize("name", sorted(MODELS))
def test_every_model_and_its_flax_twin_give_the_same_logits(name):
    model = create_model(name, seed=2, input_shape=_shape(name))
    model.eval()
    twin = flax_twin(model, input_shape=model.input_shape)
    twin.eval()
    x = jax.random.normal(jax.random.key(1), (2, *model.input_shape))
    ours, theirs = (np.asarray(nnx.jit(lambda m: m(x))(m)) for m in (model, twin))  # one program each, not op by op
    assert ours.shape == theirs.shape
    assert np.abs(ours - theirs).max() <= 1e-5 * np.abs(ours).max(), name
    flax_types = {type(m).__module__.split(".")[0] for _, m in nnx.iter_modules(twin)}
    assert "flax" in flax_types   # built from Flax's layers, not jaxconv's
    assert not any(isinstance(m, L.Layer) for _, m in nnx.iter_modules(twin))


def test_one_training_step_matches():
    """Training mode: BatchNorm on the batch's statistics in both, SGD with momentum, one step."""
    model = create_model("resnet20", seed=0)
    twin = flax_twin(model)
    x = jax.random.normal(jax.random.key(0), (8, 32, 32, 3))
    y = jax.random.randint(jax.random.key(1), (8,), 0, 10)
    losses = []
    for net, loss_of in ((model, lambda m: F.cross_entropy(m(x), y)),
                         (twin, lambda m: optax.softmax_cross_entropy_with_integer_labels(m(x), y).mean())):
        net.train()
        opt = nnx.Optimizer(net, optax.sgd(0.1, momentum=0.9), wrt=nnx.Param)

        @nnx.jit  # one program per step (op by op, each primitive of resnet20's step would compile on its own)
        def step(net, opt, loss_of=loss_of):
            loss, grads = nnx.value_and_grad(loss_of)(net)
            opt.update(net, grads)
            return loss
        for _ in range(2):
            losses.append(float(step(net, opt)))
    np.testing.assert_allclose(losses[:2], losses[2:], rtol=1e-4)   # flax's fast variance: E[x^2] - E[x]^2
    # the running statistics moved alike (Flax's momentum means what jaxconv's does): the eval outputs agree
    # to the drift two SGD steps at lr 0.1 make of float32 round-off (measured 0.4 %; a BatchNorm momentum of
    # 0.99 instead of 0.9 moves them by far more)
    model.eval(), twin.eval()
    twin_logits, logits = (nnx.jit(lambda net: net(x))(net) for net in (twin, model))
    np.testing.assert_allclose(twin_logits, logits, rtol=2e-2, atol=2e-2 * float(jnp.abs(logits).max()))


def test_layers_without_a_flax_twin_are_named():
    grouped = L.Sequential([L.ConvTranspose2d(4, 4, 3, groups=2, rngs=nnx.Rngs(0))], input_shape=(8, 8, 4))
    with pytest.raises(TypeError, match="nnx.ConvTranspose has no groups"):
        flax_twin(grouped)

    class Odd(L.Pointwise):
        op = staticmethod(jnp.tanh)
    with pytest.raises(TypeError, match=r"no Flax converter for Odd; register one with @jaxconv.flax_twin.converts\(Odd\)"):
        flax_twin(L.Sequential([Odd()], input_shape=(3,)))
