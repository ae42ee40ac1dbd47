"""Modules equal the pure functions they wrap; registered models have the seeds' parameter counts."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jaxconv import MODELS, count_params, create_model
from jaxconv import functional as F
from jaxconv import layers as L


def test_conv_module_equals_function(rng):
    layer = L.Conv(4, 6, (3, 3), stride=2, padding="SAME", dilation=1, groups=2, rngs=nnx.Rngs(0))
    x = jnp.asarray(rng.normal(size=(2, 9, 9, 4)), jnp.float32)
    want = F.conv(x, layer.kernel[...], layer.bias[...], stride=2, padding="SAME", groups=2)
    np.testing.assert_array_equal(layer(x), want)
    assert layer.kernel.shape == (3, 3, 2, 6)
    assert count_params(layer) == 3 * 3 * 2 * 6 + 6


def test_seed5_conv_layer_has_760_params():
    layer = L.Conv(3, 10, (5, 5), padding=2, rngs=nnx.Rngs(0))
    assert count_params(layer) == 760
    assert layer(jnp.zeros((1, 32, 32, 3), jnp.float32)).shape == (1, 32, 32, 10)


def test_dense_pool_layers_equal_functions(rng):
    x = jnp.asarray(rng.normal(size=(2, 8, 8, 3)), jnp.float32)
    np.testing.assert_array_equal(L.MaxPool(3, stride=2, padding=1)(x), F.max_pool(x, 3, stride=2, padding=1))
    np.testing.assert_array_equal(L.AvgPool(2, count_include_pad=False, padding=1)(x),
                                  F.avg_pool(x, 2, padding=1, count_include_pad=False))
    np.testing.assert_array_equal(L.GlobalAvgPool()(x), F.global_avg_pool(x))
    np.testing.assert_array_equal(L.ReLU()(x), F.relu(x))
    dense = L.Dense(192, 7, rngs=nnx.Rngs(1))
    flat = L.Flatten()(x)
    np.testing.assert_array_equal(dense(flat), F.dense(flat, dense.kernel[...], dense.bias[...]))


def test_initialisers_he_and_lecun_have_the_right_scale():
    for init, gain in (("he_normal", 2.0), ("lecun_normal", 1.0)):
        layer = L.Conv(64, 256, (3, 3), kernel_init=init, rngs=nnx.Rngs(0))
        std = float(jnp.std(layer.kernel[...]))
        assert abs(std - np.sqrt(gain / (64 * 9))) / np.sqrt(gain / (64 * 9)) < 0.05
        assert float(jnp.abs(layer.bias[...]).max()) == 0.0
    with pytest.raises(ValueError, match="unknown `kernel_init` 'bogus'"):
        L.Conv(1, 1, 3, kernel_init="bogus", rngs=nnx.Rngs(0))


def test_batch_norm_train_and_eval(rng):
    bn = L.BatchNorm(3, momentum=0.5)
    x = jnp.asarray(rng.normal(size=(16, 5, 3)) * 2 + 3, jnp.float32)
    y = bn(x)
    np.testing.assert_allclose(y.mean(axis=(0, 1)), 0, atol=1e-5)
    np.testing.assert_allclose(bn.mean[...], 0.5 * x.mean(axis=(0, 1)), rtol=1e-5)
    bn.eval()
    np.testing.assert_allclose(bn(x), F.batch_norm(x, bn.scale[...], bn.bias[...], bn.mean[...], bn.var[...]),
                               rtol=1e-6)


def test_dropout_train_eval():
    drop = L.Dropout(0.5, rngs=nnx.Rngs(dropout=0))
    x = jnp.ones((100,))
    a, b = drop(x), drop(x)
    assert not np.array_equal(a, b)  # a fresh key per call
    drop.eval()
    assert drop(x) is x


def test_bad_layer_arguments():
    with pytest.raises(ValueError, match="Conv: `out_features` \\(=5\\) must be divisible by `groups` \\(=2\\)"):
        L.Conv(4, 5, 3, groups=2, rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="Conv: `grad` must be 'auto' or 'manual', got 'fast'"):
        L.Conv(4, 4, 3, grad="fast", rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="Dropout: `drop_rate` must be in \\[0, 1\\), got 1.0"):
        L.Dropout(1.0, rngs=nnx.Rngs(0))


@pytest.mark.parametrize("name, params", [("mnist1d_cnn", 2_050), ("mnist1d_mlp", 59_065), ("lenet5", 61_706),
                                          ("seed_cnn", 824_458), ("convnetjs_cifar", 22_466)])
def test_parameter_counts(name, params):
    assert count_params(create_model(name)) == params


def test_every_model_runs_in_both_grad_modes():
    for name in MODELS:
        auto, manual = create_model(name, seed=3), create_model(name, seed=3, grad="manual")
        x = jax.random.normal(jax.random.key(0), (2, *auto.input_shape))
        auto.eval(), manual.eval()
        np.testing.assert_array_equal(auto(x), manual(x))
        assert auto(x).shape == (2, 10)


def test_models_adapt_or_refuse_input_shapes():
    assert create_model("seed_cnn", input_shape=(32, 32, 3))(jnp.zeros((1, 32, 32, 3))).shape == (1, 10)
    with pytest.raises(ValueError, match=r"create_model: mnist1d_cnn takes 1-D inputs like \(40, 1\), got input shape \(28, 28, 1\)"):
        create_model("mnist1d_cnn", input_shape=(28, 28, 1))
    with pytest.raises(ValueError, match=r"create_model: lenet5 does not fit input shape \(8, 8, 1\)"):
        create_model("lenet5", input_shape=(8, 8, 1))
    with pytest.raises(ValueError, match="create_model: unknown model 'resnet9000'; available: "):
        create_model("resnet9000")


def test_bf16_compute_keeps_fp32_params():
    model = create_model("seed_cnn", dtype=jnp.bfloat16)
    y = model(jnp.zeros((2, 28, 28, 1), jnp.float32))
    assert y.dtype == jnp.bfloat16
    assert model.layers[0].kernel[...].dtype == jnp.float32
