"""Each layer's answers to the protocol's questions, leaf by leaf and composite by composite, against
references that do not use the layer's own arithmetic:

* ``forward_and_backward`` against ``jax.vjp`` of the layer's ``__call__`` (float64, 1e-10);
* ``output_shape`` against the shape the forward pass really returns;
* ``flops`` against XLA's cost analysis of the jitted forward (which counts the same multiply-adds but
  not the bias adds) or, where XLA counts otherwise, a hand count written out here;
* ``receptive_field`` against the input positions each output really depends on: a NaN put in one
  input position spreads to exactly the outputs that read it.

Small shapes, no model training: these are the tests mutation testing runs against ``layers.py``.
"""
from fractions import Fraction
import itertools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jaxconv import functional as F
from jaxconv import layers as L
from jaxconv import onednn_conv
from jaxconv.backprop import _flatten

F64 = dict(param_dtype=jnp.float64)


def _leaves():
    """(id, factory, one example's shape) — factories, so that float64 parameters are made under x64."""
    r = lambda: nnx.Rngs(0)
    return [
        ("conv2d_pad", lambda: L.Conv2d(2, 3, 3, padding=1, rngs=r(), **F64), (5, 5, 2)),
        ("conv2d_strided_dilated_groups", lambda: L.Conv2d(4, 6, 3, stride=2, dilation=2, groups=2, padding="SAME",
                                                           rngs=r(), **F64), (9, 8, 4)),
        ("conv1d_nobias", lambda: L.Conv1d(2, 4, 3, use_bias=False, rngs=r(), **F64), (7, 2)),
        ("conv3d", lambda: L.Conv3d(2, 2, 2, stride=(1, 2, 1), rngs=r(), **F64), (3, 4, 5, 2)),
        ("convT2d_pad_outpad_groups", lambda: L.ConvTranspose2d(4, 6, 3, stride=2, padding=1, output_padding=1,
                                                                groups=2, rngs=r(), **F64), (4, 5, 4)),
        ("convT1d", lambda: L.ConvTranspose1d(2, 3, 4, stride=3, rngs=r(), **F64), (5, 2)),
        ("convT1d_same", lambda: L.ConvTranspose1d(2, 2, 3, stride=2, padding="SAME", dilation=2, rngs=r(), **F64),
         (5, 2)),
        ("dense", lambda: L.Dense(6, 4, rngs=r(), **F64), (6,)),
        ("dense_nobias", lambda: L.Dense(6, 4, use_bias=False, rngs=r(), **F64), (6,)),
        ("maxpool2d", lambda: L.MaxPool2d(3, stride=2, padding=1), (7, 7, 3)),
        ("maxpool_tuple", lambda: L.MaxPool((2, 1)), (6, 5, 2)),
        ("avgpool2d", lambda: L.AvgPool2d(2), (6, 6, 3)),
        ("avgpool_excl_pad", lambda: L.AvgPool2d(3, stride=2, padding=1, count_include_pad=False), (6, 6, 3)),
        ("global_avg_pool", lambda: L.GlobalAvgPool(), (4, 4, 3)),
        ("flatten", lambda: L.Flatten(), (3, 4, 2)),
        ("relu", lambda: L.ReLU(), (4, 4, 3)),
        ("identity", lambda: L.Identity(), (4, 3)),
        ("upsample_bilinear", lambda: L.Upsample(2, method="bilinear"), (3, 4, 2)),
        ("upsample_nearest_per_axis", lambda: L.Upsample((2, 3)), (3, 4, 2)),
        ("dropout", lambda: L.Dropout(0.5, rngs=nnx.Rngs(dropout=1)), (4, 4, 3)),
        ("batchnorm_train", lambda: L.BatchNorm(3, **F64), (4, 4, 3)),
        ("batchnorm_eval", lambda: L.BatchNorm(3, use_running_average=True, **F64), (4, 4, 3)),
        ("layernorm", lambda: L.LayerNorm(3, **F64), (4, 4, 3)),
        ("groupnorm", lambda: L.GroupNorm(4, 2, **F64), (4, 4, 4)),
    ]


def _composites():
    # Rngs made when a case is built, not at collection: JAX starts no threads in a process that only collects
    # (mutmut forks its workers from one)
    seeds = itertools.count()
    r = lambda: nnx.Rngs(next(seeds))
    conv = lambda c_in, c_out, k, **kw: L.Conv2d(c_in, c_out, k, rngs=r(), **F64, **kw)
    return [
        ("sequential_nested", lambda: L.Sequential([conv(2, 3, 3, padding=1), L.ReLU(),
                                                     L.Sequential([conv(3, 3, 3), L.BatchNorm(3, **F64)]),
                                                     L.GlobalAvgPool(), L.Dense(3, 2, rngs=r(), **F64)]), (6, 6, 2)),
        ("residual_identity", lambda: L.Residual(L.Sequential([conv(3, 3, 3, padding=1), conv(3, 3, 3, padding=1)])),
         (5, 5, 3)),
        ("residual_projection", lambda: L.Residual(conv(2, 4, 3, stride=2, padding=1), conv(2, 4, 1, stride=2)),
         (6, 6, 2)),
        ("concat", lambda: L.Concat(L.Identity(), conv(2, 3, 3, padding=1),
                                    L.Sequential([L.MaxPool2d(2), L.Upsample(2)])), (4, 4, 2)),
    ]


CASES = _leaves() + _composites()
IDS = [c[0] for c in CASES]


def _reference(layer, x, g):
    """``y``, ``dx`` and the parameter cotangents by path, from ``jax.vjp`` of the layer's ``__call__``
    on a copy (so batch statistics and dropout keys stay as they were)."""
    graphdef, params, rest = nnx.split(layer, nnx.Param, ...)

    @jax.jit  # one program (op by op, each primitive would compile on its own)
    def reference(x, p, g):
        y, vjp = jax.vjp(lambda x, p: nnx.merge(graphdef, p, rest, copy=True)(x), x, p)
        return y, *vjp(g)
    y, dx, dparams = reference(x, params, g)
    return y, dx, {path: v[...] for path, v in nnx.to_flat_state(dparams)}


def _output(layer, x):
    """The shape and dtype of ``layer(x)``, traced abstractly (the layer's state left as it is)."""
    return nnx.eval_shape(lambda layer, x: layer(x), layer, x)


@pytest.mark.x64
@pytest.mark.parametrize("name, make, shape", CASES, ids=IDS)
def test_forward_and_backward_equals_jax_vjp_and_output_shape_is_the_real_one(name, make, shape):
    layer = make()
    key = jax.random.key(len(name))
    x = jax.random.normal(key, (3, *shape), jnp.float64)
    y_ref, dx_ref, grads_ref = _reference(layer, x, g := jax.random.normal(jax.random.key(7), _output(layer, x).shape))

    @nnx.jit  # one program (op by op, each primitive would compile on its own)
    def by_hand(layer, x, g):
        y, back = layer.forward_and_backward(x)
        return y, *back(g)
    y, dx, grads = by_hand(layer, x, g)
    assert y.shape == (3, *layer.output_shape(shape))
    np.testing.assert_allclose(y, y_ref, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(dx, dx_ref, rtol=1e-10, atol=1e-10)
    grads = dict(_flatten(grads))  # by path, as manual_value_and_grad reads them
    assert sorted(grads, key=str) == sorted(grads_ref, key=str)
    for path, want in grads_ref.items():
        np.testing.assert_allclose(grads[path], want, rtol=1e-10, atol=1e-10, err_msg=str(path))


@pytest.mark.x64
@pytest.mark.parametrize("name, make, shape", CASES, ids=IDS)
def test_grad_manual_runs_the_hand_written_rules_and_agrees_with_autodiff(name, make, shape):
    layer = make()
    x = jax.random.normal(jax.random.key(3), (2, *shape), jnp.float64)
    g = jax.random.normal(jax.random.key(4), _output(layer, x).shape)
    _, dx_auto, grads_auto = _reference(layer, x, g)
    def rules():  # how many of grads.manual's custom_vjp calls the forward pass makes (on a copy of the layer)
        graphdef, state = nnx.split(layer)
        return str(jax.make_jaxpr(lambda x: nnx.merge(graphdef, state, copy=True)(x))(x)).count("bwd=f_bwd")

    assert rules() == 0
    layer.set_attributes(grad="manual")
    assert rules() >= 1
    _, dx_manual, grads_manual = _reference(layer, x, g)
    np.testing.assert_allclose(dx_manual, dx_auto, rtol=1e-10, atol=1e-10)
    for path, want in grads_auto.items():
        np.testing.assert_allclose(grads_manual[path], want, rtol=1e-10, atol=1e-10, err_msg=str(path))


@pytest.mark.parametrize("make, shape", [
    (lambda: L.Conv2d(2, 3, 3, stride=2, rngs=nnx.Rngs(0)), (7, 6, 2)),
    (lambda: L.ConvTranspose1d(2, 3, 3, stride=2, rngs=nnx.Rngs(0)), (5, 2)),
    (lambda: L.Dense(6, 4, rngs=nnx.Rngs(0)), (6,)),
    (lambda: L.MaxPool2d(2), (6, 4, 3)),
    (lambda: L.AvgPool((2, 2), stride=1), (4, 5, 3)),
    (lambda: L.Upsample((2, 1)), (3, 4, 2)),
    (lambda: L.ReLU(), (4, 2)),
], ids=["conv2d", "convT1d", "dense", "maxpool2d", "avgpool_tuple", "upsample_tuple", "relu"])
def test_one_example_without_a_batch_axis_gives_that_examples_row_of_the_batch(make, shape):
    layer = make()
    x = jax.random.normal(jax.random.key(0), (3, *shape))
    batch = layer(x)
    one = layer(x[1])
    assert one.shape == batch.shape[1:] == layer.output_shape(shape)
    np.testing.assert_allclose(one, batch[1], rtol=1e-6, atol=1e-6)


# ---------------------------------------------------------------------------------------------- FLOPs

def _bias_adds(layer, shape):
    """What jaxconv counts and XLA (which fuses the bias add) does not: one add per output of a layer with a bias."""
    if getattr(layer, "bias", None) is None or isinstance(layer, L.Pointwise):
        return 0
    return math.prod(layer.output_shape(shape))


def _xla_flops(layer, shape):
    with onednn_conv.xla_convolutions():  # XLA's cost analysis sees no custom call's work
        return jax.jit(lambda x: layer(x)).lower(jnp.ones((1, *shape))).compile().cost_analysis()["flops"]


XLA_COUNTED = ["conv2d_pad", "conv2d_strided_dilated_groups", "conv1d_nobias", "conv3d", "convT2d_pad_outpad_groups",
               "convT1d", "convT1d_same", "dense", "dense_nobias", "avgpool2d", "avgpool_excl_pad", "global_avg_pool",
               "residual_identity", "residual_projection"]


@pytest.mark.x64
@pytest.mark.parametrize("name, make, shape", [c for c in CASES if c[0] in XLA_COUNTED], ids=XLA_COUNTED)
def test_flops_equal_xla_cost_analysis_plus_the_bias_adds(name, make, shape, monkeypatch):
    """Convolutions (taps on padding, or cropped by a transposed conv's padding, not counted), dense,
    average pools and the residual add, layer by layer; a residual's bias adds are its convs'. Counted on XLA's
    convolution (a CPU sums the taps of a conv with few input channels, or of few per group, padding included)."""
    from jaxconv import grouped
    monkeypatch.setattr(F, "TAP_SUM_MAX", 0)
    monkeypatch.setattr(grouped, "MAX_GROUP_CHANNELS", 0)
    layer = make()
    bias = sum(_bias_adds(m, s) for _, m, s, _ in _walk(layer, shape))
    assert layer.flops(shape) == _xla_flops(layer, shape) + bias


def _walk(layer, shape):
    out = [("", layer, shape, None)]
    for label, child, child_shape, _ in layer.children(shape):
        out += _walk(child, child_shape)
    return out


def test_conv_flops_by_hand():
    # along each axis the 5 outputs of a 3-tap kernel on 1 pixel of padding see 2, 3, 3, 3, 2 real pixels
    conv = L.Conv2d(2, 3, 3, padding=1, rngs=nnx.Rngs(0))
    assert conv.flops((5, 5, 2)) == 2 * (2 + 3 + 3 + 3 + 2) ** 2 * 2 * 3 + 5 * 5 * 3 == 2103
    # transposed, stride 3, kernel 4, no padding: every input meets every tap; output 4*3+4 = 16 long
    convt = L.ConvTranspose1d(2, 3, 4, stride=3, rngs=nnx.Rngs(0))
    assert convt.flops((5, 2)) == 2 * 5 * 4 * 2 * 3 + 16 * 3 == 288
    # padding 1 crops the first and last output: of the 20 (input, tap) pairs, input 0 tap 0 and input 4 tap 3 go
    convt = L.ConvTranspose1d(2, 3, 4, stride=3, padding=1, rngs=nnx.Rngs(0))
    assert convt.flops((5, 2)) == 2 * 18 * 2 * 3 + 14 * 3


@pytest.mark.parametrize("make, shape, flops", [
    (lambda: L.MaxPool2d(3, stride=2, padding=1), (7, 7, 3), 4 * 4 * 3 * 9),  # one compare per window element
    (lambda: L.MaxPool((2, 1)), (6, 5, 2), 3 * 5 * 2 * 2),
    (lambda: L.ReLU(), (4, 4, 3), 48),
    (lambda: L.Identity(), (4, 3), 0),
    (lambda: L.Flatten(), (3, 4, 2), 0),
    (lambda: L.Dropout(0.5, rngs=nnx.Rngs(0)), (4, 4, 3), 48),
    (lambda: L.Upsample(2), (3, 4, 2), 0),  # nearest: copies
    # bilinear: 3 FLOPs per output of each axis' pass: (6, 4, 2) after the first, (6, 8, 2) after the second
    (lambda: L.Upsample(2, method="bilinear"), (3, 4, 2), 3 * 48 + 3 * 96),
    (lambda: L.Upsample((1, 2), method="bilinear"), (3, 4, 2), 3 * 48),  # a scale of 1 costs nothing
    (lambda: L.BatchNorm(3), (4, 4, 3), 2 * 48),  # scale and shift per element
    (lambda: L.LayerNorm(3), (4, 4, 3), 2 * 48),
    (lambda: L.GroupNorm(4, 2), (4, 4, 4), 2 * 64),
    (lambda: L.Concat(L.Identity(), L.ReLU(), L.MaxPool((1, 1))), (4, 4, 3), 48 + 48),  # joining is free
    (lambda: L.Sequential([L.ReLU(), L.MaxPool2d(2), L.ReLU()]), (4, 4, 3), 48 + 12 * 4 + 12),
    (lambda: L.Residual(L.ReLU()), (4, 4, 3), 48 + 48),  # the body, and the add
], ids=["maxpool2d", "maxpool_tuple", "relu", "identity", "flatten", "dropout", "upsample_nearest",
        "upsample_bilinear", "upsample_bilinear_scale_1", "batchnorm", "layernorm", "groupnorm", "concat", "sequential",
        "residual"])
def test_flops_by_hand_where_xla_counts_otherwise(make, shape, flops):
    assert make().flops(shape) == flops


# ------------------------------------------------------------------------------------ receptive fields

def _dependencies(layer, in_shape, by="nan"):
    """For every output position, the input positions it reads: a batch with one NaN per example, at each
    input position in turn (all channels), and which outputs turn NaN; or (``by="grad"``, for ops that
    multiply every input by a weight, zero or not, such as bilinear interpolation) where the Jacobian is
    nonzero. Returns a bool array ``[*in_spatial, *out_spatial]``."""
    spatial = in_shape[:-1]
    if by == "grad":
        jac = jax.jacobian(lambda x: layer(x[None])[0])(jnp.ones(in_shape))  # [*out, C_out, *in, C_in]
        jac = np.abs(np.asarray(jac)).sum(axis=(len(in_shape) - 1, -1)) > 0  # [*out_spatial, *in_spatial]
        rank = len(spatial)
        return np.moveaxis(jac, tuple(range(rank)), tuple(range(rank, 2 * rank)))
    n = math.prod(spatial)
    poison = np.eye(n, dtype=bool).reshape(n, *spatial, 1)
    x = jnp.where(jnp.asarray(poison), jnp.nan, jnp.ones((n, *in_shape)))
    y = np.isnan(np.asarray(layer(x)))
    if y.ndim == 2:  # a layer that ends the spatial axes: [inputs, features]
        return y.reshape(*spatial, -1)
    return y.any(-1).reshape(*spatial, *y.shape[1:-1])


def _measured_field(layer, in_shape, by="nan"):
    """Per axis (largest extent an output reads, input step between outputs), or GLOBAL when every output
    reads every input; the step measured as p/q where outputs q apart start p inputs apart, over all outputs
    whose windows do not touch an input edge."""
    deps = _dependencies(layer, in_shape, by)
    rank = len(in_shape) - 1
    if deps.ndim == rank + 1 and deps.all():
        return L.GLOBAL
    out_spatial = deps.shape[rank:]
    starts, sizes = {}, [0] * rank
    for o in np.ndindex(*out_spatial):
        where = np.argwhere(deps[(Ellipsis, *o)])
        if not len(where):
            continue  # an output that reads no input (a dilated transposed kernel's gaps)
        lo, hi = where.min(0), where.max(0)
        starts[o] = (lo, hi)
        sizes = [max(s, int(h - lo_) + 1) for s, h, lo_ in zip(sizes, hi, lo)]
    field = []
    for axis in range(rank):
        steps, checked = set(), 0
        for q in range(1, 4):  # outputs q apart, for q = the denominator of the step
            for o, (lo, hi) in starts.items():
                o2 = tuple(v + q * (a == axis) for a, v in enumerate(o))
                if o2 not in starts:
                    continue
                lo2, hi2 = starts[o2]
                if lo[axis] == 0 or hi2[axis] == in_shape[axis] - 1:
                    continue  # clipped by the input's edge
                steps.add(Fraction(int(lo2[axis] - lo[axis]), q))
                checked += 1
            if len(steps) == 1:
                break
            steps = set()
        assert checked and len(steps) == 1, f"no constant step along axis {axis}"
        field.append((sizes[axis], steps.pop()))
    return field


def _fields():
    seeds = itertools.count()
    r = lambda: nnx.Rngs(next(seeds))
    c1 = lambda k, **kw: L.Conv1d(1, 1, k, rngs=r(), **kw)
    return [
        ("conv", lambda: c1(3), (20, 1)),
        ("conv_strided_dilated_pool_conv", lambda: L.Sequential([c1(3, stride=2, dilation=2), L.MaxPool1d(2),
                                                                  c1(3)]), (70, 1)),
        ("avgpool_relu_conv_padded", lambda: L.Sequential([L.AvgPool1d(3, stride=2, padding=1), L.ReLU(),
                                                           c1(5, padding=2)]), (40, 1)),
        ("maxpool_overlapping", lambda: L.MaxPool1d(4, stride=3), (30, 1)),
        ("upsample_nearest_conv", lambda: L.Sequential([L.Upsample(2), c1(3)]), (16, 1)),
        ("upsample_bilinear", lambda: L.Upsample(3, method="bilinear"), (8, 1)),
        # 2 + 2 * 1/3 = 8/3 input pixels: read as 3, the fractional size rounded up as summary shows it
        ("upsample_bilinear_conv", lambda: L.Sequential([L.Upsample(3, method="bilinear"), c1(3)]), (12, 1)),
        ("conv_transpose", lambda: L.ConvTranspose1d(1, 1, 3, stride=2, rngs=r()), (12, 1)),
        ("conv_transpose_padded_conv", lambda: L.Sequential([L.ConvTranspose1d(1, 1, 4, stride=2, padding=1, rngs=r()),
                                                             c1(3, stride=2)]), (14, 1)),
        ("conv_transpose_dilated", lambda: L.ConvTranspose1d(1, 1, 3, stride=2, dilation=2, rngs=r()), (12, 1)),
        ("residual_two_convs", lambda: L.Residual(L.Sequential([c1(3, padding=1), L.ReLU(), c1(3, padding=1)])),
         (20, 1)),
        ("residual_strided_projection", lambda: L.Residual(c1(3, stride=2, padding=1), c1(1, stride=2)), (20, 1)),
        ("residual_wide_shortcut", lambda: L.Residual(L.Identity(), c1(7, padding=3)), (20, 1)),
        ("concat", lambda: L.Concat(L.Identity(), c1(5, padding=2), L.MaxPool1d(3, stride=1, padding=1)), (20, 1)),
        ("conv2d_per_axis", lambda: L.Sequential([L.Conv2d(1, 1, (3, 5), stride=(1, 2), rngs=r()), L.MaxPool((2, 1))]),
         (14, 19, 1)),
        ("global", lambda: L.Sequential([c1(3), L.GlobalAvgPool()]), (10, 1)),
        ("global_then_dense", lambda: L.Sequential([c1(3), L.Flatten(), L.Dense(8, 2, rngs=r())]), (10, 1)),
    ]


@pytest.mark.parametrize("name, make, shape", _fields(), ids=[f[0] for f in _fields()])
def test_receptive_field_is_what_each_output_really_reads(name, make, shape):
    layer = make()
    start = tuple((1, 1) for _ in shape[:-1])
    want = layer.receptive_field(shape, start)
    got = _measured_field(layer, shape, by="grad" if "bilinear" in name else "nan")
    assert (want if want == L.GLOBAL else [(math.ceil(s), Fraction(j)) for s, j in want]) == got


def test_receptive_field_after_global_stays_global_and_composites_have_no_window():
    model = L.Sequential([L.GlobalAvgPool(), L.Dense(3, 2, rngs=nnx.Rngs(0)), L.ReLU()])
    assert model.receptive_field((5, 3), ((1, 1),)) == L.GLOBAL
    assert L.ReLU().receptive_field((5, 3), L.GLOBAL) == L.GLOBAL
    assert L.ReLU().receptive_field((5, 3), ((4, 2),)) == ((4, 2),)
    with pytest.raises(TypeError, match="Residual is a composite: ask `receptive_field`"):
        L.Residual(L.ReLU()).window((5, 3))
    with pytest.raises(TypeError, match="Sequential is a composite: it has no single op"):
        L.Sequential([L.ReLU()]).spec(jnp.ones((1, 5, 3)))


# ------------------------------------------------------------------------------------ the rest

def test_children_and_shapes_walk_the_tree_with_each_childs_input():
    r = nnx.Rngs(0)
    model = L.Sequential([L.Conv2d(1, 2, 3, rngs=r), L.Residual(L.Conv2d(2, 2, 3, padding=1, rngs=r)),
                          L.Concat(L.Identity(), L.ReLU()), L.MaxPool2d(2)], input_shape=(8, 8, 1))
    assert [(label, type(c).__name__, s, f) for label, c, s, f in model.children((8, 8, 1), ((1, 1), (1, 1)))] == [
        ("0", "Conv2d", (8, 8, 1), ((1, 1), (1, 1))), ("1", "Residual", (6, 6, 2), ((3, 1), (3, 1))),
        ("2", "Concat", (6, 6, 2), ((5, 1), (5, 1))), ("3", "MaxPool2d", (6, 6, 4), ((5, 1), (5, 1)))]
    assert model.shapes() == [(6, 6, 2), (6, 6, 2), (6, 6, 4), (3, 3, 4)]
    assert model.shapes((10, 10, 1))[-1] == (4, 4, 4)
    assert [c[0] for c in model.layers[1].children((6, 6, 2))] == ["body", "shortcut"]
    assert [c[::2] for c in model.layers[2].children((6, 6, 2), None)] == [("0", (6, 6, 2)), ("1", (6, 6, 2))]
    # a transposed conv's window, exactly: an output reads at most ceil(5 / 2) = 3 inputs, half an input apart
    assert L.ConvTranspose1d(1, 1, 3, dilation=2, stride=2, rngs=r).window((5, 1)) == [(3, Fraction(1, 2))]
    assert L.ReLU().children((3, 1)) == []


def test_recording_lists_every_leaf_call_in_order_and_only_inside_the_block():
    r = nnx.Rngs(0)
    model = L.Sequential([L.Conv1d(1, 2, 3, rngs=r), L.Residual(L.ReLU()), L.GlobalAvgPool()])
    x = jax.random.normal(jax.random.key(0), (2, 8, 1))
    with L.recording() as outer:
        with L.recording() as seen:
            y = model(x)
        model.layers[0](x)
    assert [type(layer).__name__ for layer, _ in seen] == ["Conv1d", "ReLU", "Identity", "GlobalAvgPool"]
    h = model.layers[0](x)
    np.testing.assert_array_equal(seen[0][1], h)
    np.testing.assert_array_equal(seen[1][1], jnp.maximum(h, 0))
    np.testing.assert_array_equal(seen[-1][1], y)
    assert [type(layer).__name__ for layer, _ in outer] == ["Conv1d"]
    model(x)
    assert len(seen) == 4 and len(outer) == 1


def test_batch_norm_statistics_and_running_average_against_numpy(rng):
    x = rng.normal(size=(6, 5, 3)) * [1.0, 2.0, 0.5] + [3.0, -1.0, 0.0]
    bn = L.BatchNorm(3, momentum=0.8, epsilon=1e-3)
    bn.scale[...] = jnp.array([1.0, 2.0, 3.0])
    bn.bias[...] = jnp.array([0.5, 0.0, -0.5])
    y = bn(jnp.asarray(x, jnp.float32))
    mean, var = x.mean((0, 1)), x.var((0, 1))  # biased, over every axis but the channels
    np.testing.assert_allclose(y, (x - mean) / np.sqrt(var + 1e-3) * [1, 2, 3] + [0.5, 0, -0.5], rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(bn.mean[...], 0.2 * mean, rtol=1e-5)
    np.testing.assert_allclose(bn.var[...], 0.8 * 1.0 + 0.2 * var, rtol=1e-5)
    bn(jnp.asarray(2 * x, jnp.float32))  # a second update starts from the first one's statistics
    np.testing.assert_allclose(bn.mean[...], 0.8 * 0.2 * mean + 0.2 * 2 * mean, rtol=1e-5)
    np.testing.assert_allclose(bn.var[...], 0.8 * (0.8 + 0.2 * var) + 0.2 * 4 * var, rtol=1e-5)
    bn.use_running_average = True
    run_mean, run_var = np.asarray(bn.mean[...]), np.asarray(bn.var[...])
    np.testing.assert_allclose(bn(jnp.asarray(x, jnp.float32)),
                               (x - run_mean) / np.sqrt(run_var + 1e-3) * [1, 2, 3] + [0.5, 0, -0.5], rtol=1e-4,
                               atol=1e-5)
    np.testing.assert_allclose(bn.mean[...], run_mean)  # evaluation leaves the statistics alone


def test_torch_initialiser_is_uniform_within_one_over_sqrt_fan_in():
    w = L.Conv2d(8, 64, 3, kernel_init="torch", rngs=nnx.Rngs(0)).kernel[...]
    bound = 1 / np.sqrt(8 * 9)
    assert float(jnp.abs(w).max()) <= bound and float(jnp.abs(w).max()) > 0.98 * bound
    np.testing.assert_allclose(float(jnp.std(w)), bound / np.sqrt(3), rtol=0.05)
    for name in ("he_uniform", "lecun_uniform", "glorot_uniform"):
        w = L.Dense(100, 200, kernel_init=name, rngs=nnx.Rngs(0)).kernel[...]
        fan = {"he_uniform": 100 / 2, "lecun_uniform": 100, "glorot_uniform": 150}[name]
        np.testing.assert_allclose(float(jnp.std(w)), np.sqrt(1 / fan), rtol=0.05, err_msg=name)
    custom = lambda key, shape, dtype: jnp.full(shape, 0.25, dtype)
    assert float(L.Dense(2, 3, kernel_init=custom, rngs=nnx.Rngs(0)).kernel[...].sum()) == 1.5


@pytest.mark.parametrize("call, message", [
    (lambda: L.Conv2d(1, 2, 3, rngs=nnx.Rngs(0)).output_shape((5, 5)),
     "Conv2d: a 2-D kernel needs inputs [*spatial, C] of rank 3, got shape (5, 5)"),
    (lambda: L.ConvTranspose1d(1, 2, 3, rngs=nnx.Rngs(0)).output_shape((5, 5, 1)),
     "ConvTranspose: a 1-D kernel needs inputs [*spatial, C] of rank 2, got shape (5, 5, 1)"),
    (lambda: L.Dense(4, 2, rngs=nnx.Rngs(0)).output_shape((5,)), "Dense: expects inputs of shape (4,), got (5,)"),
    (lambda: L.Dense(4, 2, rngs=nnx.Rngs(0)).output_shape((4, 1)), "Dense: expects inputs of shape (4,), got (4, 1)"),
    (lambda: L.Conv(4, 6, 3, groups=3, rngs=nnx.Rngs(0)),
     "Conv: `in_features` (=4) must be divisible by `groups` (=3)"),
    (lambda: L.MaxPool(2, stride=(1, 0)), "MaxPool: `stride` must be >= 1 on every axis, got (1, 0)"),
    (lambda: L.AvgPool1d(3).output_shape((2, 1)), "AvgPool1d: window span 3 (K=3, dilation=1) on spatial axis 0 is larger than the padded input 2 "
                                                "(size 2 + padding 0+0)"),
    (lambda: L.Conv1d(1, 1, 5, rngs=nnx.Rngs(0)).output_shape((3, 1)),
     "Conv1d: kernel span 5 (K=5, dilation=1) on spatial axis 0 is larger than the padded input 3 (size 3 + "
     "padding 0+0)"),
    (lambda: L.Conv2d(1, 2, (3, 0), rngs=nnx.Rngs(0)), "Conv2d: `kernel_size` must be >= 1 on every axis, got (3, 0)"),
    (lambda: L.Conv2d(1, 2, 3, stride=(1,), rngs=nnx.Rngs(0)),
     "Conv2d: `stride` must have one entry per spatial axis (2), got 1: (1,)"),
    (lambda: L.Conv2d(1, 2, 3, dilation=(1, 1, 1), rngs=nnx.Rngs(0)),
     "Conv2d: `dilation` must have one entry per spatial axis (2), got 3: (1, 1, 1)"),
    (lambda: L.Conv(1, 2, 3, rngs=nnx.Rngs(0)).output_shape((5, 5, 1)),
     "Conv: an int kernel_size (3) means a 1-D kernel, but the input (5, 5, 1) has 2 spatial axes: give "
     "kernel_size=(3, 3), or use Conv2d, where 3 means 3x3"),
    (lambda: L.Conv2d(1, 1, 3, rngs=nnx.Rngs(0)).output_shape((5, 2, 1)),
     "Conv2d: kernel span 3 (K=3, dilation=1) on spatial axis 1 is larger than the padded input 2 (size 2 + "
     "padding 0+0)"),
    (lambda: L.MaxPool((2, 2, 2)).output_shape((4, 4, 1)),
     "MaxPool: `window` must have one entry per spatial axis (2), got 3: (2, 2, 2)"),
    (lambda: L.AvgPool(2, stride=(1, 1, 1)).output_shape((4, 4, 1)),
     "AvgPool: `stride` must have one entry per spatial axis (2), got 3: (1, 1, 1)"),
    (lambda: L.Upsample((2, 2, 2)).output_shape((4, 4, 1)),
     "Upsample: `scale` must have one entry per spatial axis (2), got 3: (2, 2, 2)"),
    (lambda: L.BatchNorm(3, momentum=-0.1), "BatchNorm: `momentum` must be in [0, 1]"),
    (lambda: L.Dropout(-0.1, rngs=nnx.Rngs(0)), "Dropout: `drop_rate` must be in [0, 1), got -0.1"),
    (lambda: L.GroupNorm(8, 0), "GroupNorm: `num_groups` (=0) must be a positive int dividing `num_features` (=8)"),
    (lambda: L.Residual(L.ReLU(), shortcut="conv"),
     "Residual: `shortcut` must be a jaxconv.layers.Layer (subclass it and declare `spec`, `output_shape`, "
     "`window` and `flops`), got str"),
    (lambda: L.Concat(L.ReLU(), 3), "Concat: branch 1 must be a jaxconv.layers.Layer"),
    (lambda: L.initializer("xavier"), "initializer: unknown `kernel_init` 'xavier'; expected one of ['glorot_uniform', "
                                      "'he_normal', 'he_uniform', 'lecun_normal', 'lecun_uniform', 'torch'] or a "
                                      "callable"),
])
def test_bad_shapes_and_options_are_named(call, message):
    with pytest.raises((ValueError, TypeError)) as err:
        call()
    assert str(err.value).startswith(message), str(err.value)


def test_a_leaf_that_declares_nothing_says_what_it_lacks():
    class Bare(L.Layer):
        pass

    bare, x = Bare(), jnp.ones((1, 4, 2))
    for call, message in ((lambda: bare(x), "Bare must declare `spec(x)` (its op, params and options) or implement "
                                            "`__call__` and `forward_and_backward` as a composite"),
                          (lambda: bare.forward_and_backward(x), "Bare must declare `spec(x)`"),
                          (lambda: bare.output_shape((4, 2)), "Bare does not implement `output_shape(in_shape)`"),
                          (lambda: bare.window((4, 2)), "Bare does not implement `window(in_shape)` (needed for its "
                                                        "receptive field)"),
                          (lambda: bare.receptive_field((4, 2), ((1, 1),)), "Bare does not implement `window"),
                          (lambda: bare.flops((4, 2)), "Bare does not implement `flops(in_shape)`")):
        with pytest.raises(NotImplementedError) as err:
            call()
        assert str(err.value).startswith(message)


def test_pools_with_a_stride_other_than_the_window_against_numpy():
    """Windows of 3 at stride 1 and 2, padded by 1 (average over the window's real inputs, or over all 9 taps)."""
    x = np.random.default_rng(0).normal(size=(2, 6, 5, 3))
    padded = np.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)), constant_values=np.nan)
    for stride in (1, 2):
        rows, cols = range(0, 6, stride), range(0, 5, stride)
        windows = np.stack([np.stack([padded[:, i:i + 3, j:j + 3] for j in cols], 1) for i in rows], 1)
        want = {"max": np.nanmax(windows, (3, 4)), "avg_excl": np.nanmean(windows, (3, 4)),
                "avg_incl": np.nansum(windows, (3, 4)) / 9}
        layers = {"max": L.MaxPool2d(3, stride=stride, padding=1),
                  "avg_excl": L.AvgPool2d(3, stride=stride, padding=1, count_include_pad=False),
                  "avg_incl": L.AvgPool2d(3, stride=stride, padding=1)}
        for name, layer in layers.items():
            got = layer(jnp.asarray(x, jnp.float32))
            assert got.shape == want[name].shape == (2, *layer.output_shape((6, 5, 3))), (name, stride)
            np.testing.assert_allclose(got, want[name], rtol=1e-6, atol=1e-6, err_msg=f"{name} stride {stride}")


def test_layers_keep_the_dtypes_and_initialisers_they_are_given():
    r, x = nnx.Rngs(0), jnp.ones((2, 6, 6, 4))
    for layer in (L.Conv2d(4, 3, 3, dtype=jnp.bfloat16, rngs=r), L.ConvTranspose2d(4, 3, 3, dtype=jnp.bfloat16, rngs=r),
                  L.BatchNorm(4, dtype=jnp.bfloat16), L.GroupNorm(4, 2, dtype=jnp.bfloat16),
                  L.LayerNorm(4, dtype=jnp.bfloat16)):
        assert layer(x).dtype == jnp.bfloat16, type(layer).__name__
    for layer in (L.Dense(4, 2, param_dtype=jnp.bfloat16, rngs=r), L.Conv2d(4, 3, 3, param_dtype=jnp.bfloat16, rngs=r),
                  L.ConvTranspose2d(4, 3, 3, param_dtype=jnp.bfloat16, rngs=r), L.BatchNorm(4, param_dtype=jnp.bfloat16),
                  L.GroupNorm(4, 2, param_dtype=jnp.bfloat16), L.LayerNorm(4, param_dtype=jnp.bfloat16)):
        params = nnx.state(layer, nnx.Param)
        assert {str(a.dtype) for a in jax.tree.leaves(params)} == {"bfloat16"}, type(layer).__name__
    quarter = lambda key, shape, dtype: jnp.full(shape, 0.25, dtype)
    for layer in (L.Conv2d(4, 3, 3, kernel_init=quarter, rngs=r), L.ConvTranspose2d(4, 3, 3, kernel_init=quarter, rngs=r)):
        assert bool(jnp.all(layer.kernel[...] == 0.25)), type(layer).__name__


def test_manual_composites_join_their_branches_with_hand_written_rules_too():
    """grad="manual" on a Residual or Concat reaches its add or concatenation, not only the leaves inside."""
    x = jnp.ones((2, 4, 4, 3))

    def rules(layer):
        graphdef, state = nnx.split(layer)
        return str(jax.make_jaxpr(lambda x: nnx.merge(graphdef, state, copy=True)(x))(x)).count("bwd=f_bwd")
    relu, identity = L.ReLU(grad="manual"), L.Identity(grad="manual")
    assert rules(relu) == rules(identity) == 1
    for layer in (L.Residual(L.ReLU()), L.Concat(L.Identity(), L.ReLU())):  # a Residual's shortcut: Identity
        layer.set_attributes(grad="manual")
        assert rules(layer) == 3, type(layer).__name__

