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
    with pytest.raises(ValueError, match="MaxPool: `window` must be >= 1 on every axis, got \\(0, 2\\)"):
        L.MaxPool((0, 2))
    with pytest.raises(ValueError, match="GroupNorm: `num_groups` \\(=3\\) must be a positive int dividing"):
        L.GroupNorm(8, 3)
    with pytest.raises(ValueError, match="Upsample: `method` must be 'nearest' or 'bilinear', got 'cubic'"):
        L.Upsample(2, method="cubic")
    with pytest.raises(ValueError, match="Upsample: `scale` must be >= 1 on every axis, got \\(2, 0\\)"):
        L.Upsample((2, 0))
    with pytest.raises(ValueError, match="BatchNorm: `momentum` must be in \\[0, 1\\]"):
        L.BatchNorm(4, momentum=1.5)
    with pytest.raises(ValueError, match="LayerNorm: `epsilon` must be > 0, got 0"):
        L.LayerNorm(4, epsilon=0)
    with pytest.raises(ValueError, match="ConvTranspose: `output_padding` must be >= 0"):
        L.ConvTranspose(4, 4, (2, 2), output_padding=-1, rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="Dropout: `drop_rate` must be in \\[0, 1\\), got 1.0"):
        L.Dropout(1.0, rngs=nnx.Rngs(0))


@pytest.mark.parametrize("name, params", [("mnist1d_cnn", 2_050), ("mnist1d_mlp", 59_065), ("lenet5", 61_706),
                                          ("seed_cnn", 824_458), ("convnetjs_cifar", 22_466), ("resnet20", 272_474),
                                          ("cifar_resnet18", 11_173_962), ("resnet18", 11_689_512),
                                          ("resnet50", 25_557_032), ("mobilenet_v2", 2_236_682)])
def test_parameter_counts(name, params):
    assert count_params(nnx.eval_shape(lambda: create_model(name))) == params  # the architecture's: no weights drawn


@pytest.mark.parametrize("name, options", [("mnist1d_deep", {}), ("lenet5", dict(grad="manual", seed=5)),
                                           ("unet_small", dict(dtype=jnp.bfloat16, seed=2))])
def test_create_model_draws_the_op_by_op_weights_in_one_program(name, options):
    """create_model builds the initial state in one compiled program: the same parameters, BatchNorm statistics
    and dropout keys, bit for bit, as building the model op by op from the same generators."""
    seed = options.get("seed", 0)
    one = create_model(name, **options)
    ops = create_model(name, **options, rngs=nnx.Rngs(params=seed, dropout=seed + 1))
    assert nnx.graphdef(one) == nnx.graphdef(ops)
    unkey = lambda a: jax.random.key_data(a) if jnp.issubdtype(a.dtype, jax.dtypes.prng_key) else a
    for a, b in zip(jax.tree.leaves(nnx.state(one)), jax.tree.leaves(nnx.state(ops)), strict=True):
        np.testing.assert_array_equal(np.asarray(unkey(a)), np.asarray(unkey(b)))


def test_every_model_runs_in_both_grad_modes():
    for name in MODELS:
        if MODELS[name].input_shape == (224, 224, 3):
            continue  # the ImageNet ResNets: their twins and FLOP tests run them
        auto, manual = create_model(name, seed=3), create_model(name, seed=3, grad="manual")
        x = jax.random.normal(jax.random.key(0), (2, *auto.input_shape))
        auto.eval(), manual.eval()
        y_auto, y_manual = (nnx.jit(lambda m: m(x))(m) for m in (auto, manual))  # one program each, not op by op
        np.testing.assert_array_equal(y_auto, y_manual)
        assert y_auto.shape == (2, *auto.output_shape(auto.input_shape))
        assert y_auto.shape[-1] == (2 if name == "unet_small" else 10)


def test_grad_mode_switches_on_a_built_model_in_one_call():
    model = create_model("resnet20")
    modes = lambda: {m.grad for _, m in nnx.iter_modules(model) if isinstance(m, L.Layer)}
    assert modes() == {"auto"}
    model.set_attributes(grad="manual")
    assert modes() == {"manual"}
    with pytest.raises(ValueError, match="`grad` must be 'auto' or 'manual', got 'fast'"):
        model.set_attributes(grad="fast")


def test_residual_adds_branches_and_concat_joins_channels(rng):
    rngs = nnx.Rngs(0)
    body = L.Sequential([L.Conv(4, 4, (3, 3), padding=1, rngs=rngs), L.ReLU()])
    short = L.Conv(4, 4, (1, 1), rngs=rngs)
    x = jnp.asarray(rng.normal(size=(2, 6, 6, 4)), jnp.float32)
    np.testing.assert_array_equal(L.Residual(body)(x), body(x) + x)
    np.testing.assert_array_equal(L.Residual(body, short)(x), body(x) + short(x))
    cat = L.Concat(L.Identity(), body, short)
    np.testing.assert_array_equal(cat(x), jnp.concatenate([x, body(x), short(x)], axis=-1))
    assert cat.output_shape((6, 6, 4)) == (6, 6, 12)


def test_composites_refuse_what_they_cannot_combine():
    rngs = nnx.Rngs(0)
    with pytest.raises(ValueError, match=r"Residual: the body's output \(3, 3, 4\) and the shortcut's \(6, 6, 4\) "
                                         r"differ .* give a projection shortcut"):
        L.Residual(L.Conv(4, 4, (3, 3), stride=2, padding=1, rngs=rngs)).output_shape((6, 6, 4))
    with pytest.raises(ValueError, match=r"Concat: the branches' outputs \[\(6, 6, 4\), \(3, 3, 4\)\] differ"):
        L.Concat(L.Identity(), L.MaxPool(2)).output_shape((6, 6, 4))
    with pytest.raises(TypeError, match="Sequential: layer 1 must be a jaxconv.layers.Layer .* got Linear"):
        L.Sequential([L.ReLU(), nnx.Linear(2, 2, rngs=rngs)])
    with pytest.raises(ValueError, match="Concat: needs at least 2 branches, got 1"):
        L.Concat(L.Identity())


def test_a_user_leaf_declares_op_and_params_and_gets_everything_else():
    """A leaf written outside jaxconv: it names its op and parameters; __call__, the manual backward and
    summary come from the base class."""
    from jaxconv import functional as F, summary
    from jaxconv.backprop import manual_value_and_grad

    class Scale(L.Pointwise):
        def __init__(self, c):
            super().__init__()
            self.scale = nnx.Param(jnp.full((c,), 2.0))
            self.bias = nnx.Param(jnp.zeros((c,)))

        def spec(self, x):
            return L.Spec(F.layer_norm, {"scale": self.scale[...], "bias": self.bias[...]}, options={"epsilon": 1e-5})

    rngs = nnx.Rngs(0)
    model = L.Sequential([L.Conv(1, 4, (3, 3), rngs=rngs), Scale(4), L.Flatten(), L.Dense(64, 3, rngs=rngs)],
                         input_shape=(6, 6, 1))
    x = jax.random.normal(jax.random.key(0), (5, 6, 6, 1))
    y = jnp.array([0, 1, 2, 0, 1])
    _, params, rest = nnx.split(model, nnx.Param, ...)
    graphdef = nnx.graphdef(model)
    auto = jax.grad(lambda p: F.cross_entropy(nnx.merge(graphdef, p, rest, copy=True)(x), y))(params)
    _, manual = manual_value_and_grad(model, params, x, y)
    for (path, a), (_, m) in zip(nnx.to_flat_state(auto), nnx.to_flat_state(manual)):
        np.testing.assert_allclose(m[...], a[...], rtol=1e-4, atol=1e-6, err_msg=str(path))
    assert summary(model).rows[1].params == 8


def test_register_model_and_builder():
    from jaxconv.models import Builder, register_model

    @register_model("test_tiny_resnet", input_shape=(8, 8, 1))
    def tiny(b: Builder, num_classes):
        b.conv(4, (3, 3), padding=1).relu()
        b.residual(lambda r: r.conv(4, (3, 3), padding=1).relu(), lambda s: s.conv(4, (1, 1))).relu()
        b.global_avg_pool().dense(num_classes)

    try:
        model = create_model("test_tiny_resnet", num_classes=3)
        assert model(jnp.zeros((2, 8, 8, 1))).shape == (2, 3)
        assert count_params(model) == (9 * 4 + 4) + (9 * 16 + 4) + (4 * 4 + 4) + (4 * 3 + 3)
        with pytest.raises(ValueError, match="register_model: a model named 'test_tiny_resnet' is already registered"):
            register_model("test_tiny_resnet", input_shape=(8, 8, 1))(tiny)
        with pytest.raises(TypeError):
            MODELS["x"] = None  # the registry is read-only
    finally:
        from jaxconv import models
        models._REGISTRY.pop("test_tiny_resnet", None)


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


def test_pytorch_named_aliases_fix_the_spatial_rank():
    from jaxconv import layers as L
    conv = L.Conv2d(1, 4, 3, padding=1, rngs=nnx.Rngs(0))
    assert conv.kernel.shape == (3, 3, 1, 4) and conv(jnp.ones((2, 8, 8, 1))).shape == (2, 8, 8, 4)
    assert L.Conv3d(2, 4, 3, rngs=nnx.Rngs(0)).kernel.shape == (3, 3, 3, 2, 4)
    assert L.Conv1d(2, 4, 3, rngs=nnx.Rngs(0)).kernel.shape == (3, 2, 4)
    assert L.ConvTranspose2d(4, 2, 2, stride=2, rngs=nnx.Rngs(0))(jnp.ones((1, 4, 4, 4))).shape == (1, 8, 8, 2)
    assert L.MaxPool2d(2)(jnp.ones((2, 8, 8, 1))).shape == (2, 4, 4, 1)
    assert L.AvgPool1d(2)(jnp.ones((2, 8, 3))).shape == (2, 4, 3)
    with pytest.raises(ValueError, match=r"Conv2d: `kernel_size` must be an int or 2 ints, got \(3, 3, 3\)"):
        L.Conv2d(1, 4, (3, 3, 3), rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match=r"MaxPool2d: takes inputs \[\*spatial, C\] with 2 spatial axes, got shape "
                                         r"\(8, 1\)"):
        L.MaxPool2d(2).output_shape((8, 1))
    # the generic Conv keeps Flax's meaning (an int is 1-D) and says how to write a 2-D kernel
    with pytest.raises(ValueError, match=r"Conv: an int kernel_size \(3\) means a 1-D kernel, but the input "
                                         r"\(2, 8, 8, 1\) has 2 spatial axes: give kernel_size=\(3, 3\), or use "
                                         r"Conv2d, where 3 means 3x3"):
        L.Conv(1, 4, 3, rngs=nnx.Rngs(0))(jnp.ones((2, 8, 8, 1)))
    assert L.Conv(1, 4, 3, rngs=nnx.Rngs(0))(jnp.ones((2, 8, 1))).shape == (2, 6, 4)
