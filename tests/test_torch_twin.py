"""Every registered model against its PyTorch twin, weights copied both ways; a U-Net trains on real digits."""
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jaxconv import MODELS, create_model
from jaxconv import compiler
from jaxconv import functional as F
from jaxconv.gradcheck import rel_error
from tests.conftest import SHARED_DATA

torch = pytest.importorskip("torch")
from jaxconv.torch_twin import load_torch_state_dict, torch_twin  # noqa: E402


@nnx.jit  # one program per model and mode (op by op, each primitive would compile on its own)
def _forward(model, x):
    return model(x)


def _nchw(x):
    return torch.tensor(np.moveaxis(np.asarray(x), -1, 1))


def _small_input(name):
    """The ImageNet ResNets at 64x64 (the same layers; a twelfth of the work of 224x224); the rest as designed."""
    return (64, 64, 3) if MODELS[name].input_shape == (224, 224, 3) else None


def _eval_with_running_stats(name, seed):
    """A model in eval mode whose BatchNorm statistics are not the initial 0/1 (one training-mode pass)."""
    model = create_model(name, seed=seed, input_shape=_small_input(name))
    model.train()
    _forward(model, jax.random.normal(jax.random.key(seed), (2, *model.input_shape), jnp.float32) * 2 + 0.5)
    model.eval()
    return model


@pytest.mark.parametrize("name", sorted(MODELS))
def test_forward_agrees_with_the_twin_and_torch_weights_load_back(name):
    torch.manual_seed(0)
    model = _eval_with_running_stats(name, 1)
    x = jax.random.normal(jax.random.key(3), (2, *model.input_shape), jnp.float32)
    net = torch_twin(model).eval()
    with torch.no_grad():
        out_t = net(_nchw(x)).numpy()
    out = np.asarray(_forward(model, x))
    if out.ndim > 2:
        out_t = np.moveaxis(out_t, 1, -1)
    assert rel_error(out, out_t) <= 1e-4
    # the other direction: a PyTorch state_dict (here the twin's, trained one step so it differs) into jaxconv
    net.train()
    opt = torch.optim.SGD(net.parameters(), lr=0.1)
    net(_nchw(x)).square().mean().backward()
    opt.step()
    net.eval()
    with torch.no_grad():
        out_t = net(_nchw(x)).numpy()
    other = create_model(name, seed=7, input_shape=_small_input(name))
    other.eval()
    load_torch_state_dict(other, net.state_dict())
    out = np.asarray(_forward(other, x))
    if out.ndim > 2:
        out_t = np.moveaxis(out_t, 1, -1)
    assert rel_error(out, out_t) <= 1e-4


def test_state_dict_keys_follow_jaxconv_paths_and_mismatches_are_named():
    model = create_model("resnet20")
    state = torch_twin(model).state_dict()
    assert tuple(state["layers.3.body.layers.0.weight"].shape) == (16, 16, 3, 3)  # (O, I, KH, KW)
    assert tuple(state["layers.9.shortcut.layers.0.weight"].shape) == (32, 16, 1, 1)
    assert "layers.22.weight" in state and "layers.1.running_var" in state
    del state["layers.22.bias"]
    with pytest.raises(ValueError, match="load_torch_state_dict: the state_dict has no 'layers.22.bias'"):
        load_torch_state_dict(model, state)
    state = torch_twin(create_model("resnet20", num_classes=5)).state_dict()
    with pytest.raises(ValueError, match=r"'layers.22.weight' has shape \(64, 5\) .* layers/22/kernel has \(64, 10\)"):
        load_torch_state_dict(model, state)



def test_a_layer_without_a_converter_is_named_and_a_subclass_converts_as_its_parent():
    from jaxconv import layers as L

    class Odd(L.Pointwise):
        op = staticmethod(jnp.tanh)
    with pytest.raises(TypeError, match=r"no PyTorch converter for Odd; register one with @jaxconv.torch_twin.converts\(Odd\)"):
        torch_twin(L.Sequential([Odd()], input_shape=(3,)))

    class MyReLU(L.ReLU):
        pass
    net = torch_twin(L.Sequential([MyReLU()], input_shape=(3,)))
    x = np.array([[-1.0, 0.5, 2.0]], np.float32)
    np.testing.assert_array_equal(net(torch.from_numpy(x)).numpy(), [[0.0, 0.5, 2.0]])

needs_mnist = pytest.mark.skipif(not os.path.isdir(os.path.join(SHARED_DATA, "mnist")),
                                 reason="../shared/data/mnist not present")


@needs_mnist
@pytest.mark.parametrize("grad", ["auto", "manual"])
def test_unet_learns_a_foreground_mask_on_real_digits(grad):
    """unet_small, per-pixel cross-entropy, 60 Adam steps on 256 real MNIST digits: pixel accuracy on 256
    held-out digits must beat predicting "background" everywhere by a wide margin."""
    import optax
    from jaxconv.backprop import manual_value_and_grad
    from jaxconv.data import read_idx
    images = read_idx(os.path.join(SHARED_DATA, "mnist", "t10k-images-idx3-ubyte.gz"), expect_ndim=3)[:512]
    x = jnp.asarray(images[..., None], jnp.float32) / 255.0
    masks = jnp.asarray(images > 127, jnp.int32)
    model = create_model("unet_small", seed=0, grad=grad)
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    tx = optax.adam(3e-3)
    opt = tx.init(params)

    def loss_and_grad(p, xb, yb):
        if grad == "manual":  # backprop by hand through Concat, ConvTranspose, GroupNorm...
            return manual_value_and_grad(nnx.merge(graphdef, p, rest), p, xb, yb)
        return jax.value_and_grad(lambda q: F.cross_entropy(nnx.merge(graphdef, q, rest, copy=True)(xb), yb))(p)

    @compiler.jit
    def step(p, o, i):
        xb, yb = jax.lax.dynamic_slice_in_dim(x, i * 32, 32), jax.lax.dynamic_slice_in_dim(masks, i * 32, 32)
        loss, g = loss_and_grad(p, xb, yb)
        updates, o = tx.update(g, o, p)
        return optax.apply_updates(p, updates), o, loss

    losses = []
    for i in range(60):
        params, opt, loss = step(params, opt, i % 8)
        losses.append(float(loss))
    pred = compiler.jit(lambda p, xb: jnp.argmax(nnx.merge(graphdef, p, rest, copy=True)(xb), -1))(params, x[256:])
    accuracy = float(jnp.mean(pred == masks[256:]))
    background = float(jnp.mean(masks[256:] == 0))
    assert np.isfinite(losses).all() and losses[-1] < 0.5 * losses[0]
    assert accuracy > background + 0.5 * (1 - background), (accuracy, background)
