"""Output-size arithmetic (the seeds' numbers), receptive fields, FLOPs and the summary table."""
import re

import pytest

from jaxconv import MODELS, create_model, receptive_field, summary
from jaxconv import functional as F
from jaxconv import onednn_conv
from jaxconv.shapes import conv_output_size


def test_seed6_sizes():
    assert conv_output_size(7, 3, stride=1) == 5
    assert conv_output_size(7, 3, stride=2) == 3
    assert conv_output_size(7, 3, stride=3) == 2  # floor, as every framework does
    with pytest.raises(ValueError, match=re.escape("(7 + 0 - 3)/3 + 1 = 2.33")):
        conv_output_size(7, 3, stride=3, strict=True)
    assert conv_output_size(7, 3, stride=2, strict=True) == 3
    assert conv_output_size(11, 3, padding=1, stride=2) == 6
    assert conv_output_size(13, 3, stride=3) == 4
    assert conv_output_size(11, 1, stride=2) == 6
    # dilation 2 on K=3 spans M=5: a 5-wide input gives one output, a 4-wide one none.
    assert conv_output_size(5, 3, dilation=2) == 1
    with pytest.raises(ValueError, match="effective kernel 5 is larger than the padded input 4"):
        conv_output_size(4, 3, dilation=2)
    assert conv_output_size(32, 5, padding=2) == 32
    assert conv_output_size(10, 3, padding=(2, 0)) == 10


def test_conv_output_size_bad_input():
    with pytest.raises(ValueError, match="`stride` must be an int >= 1, got 0"):
        conv_output_size(7, 3, stride=0)
    with pytest.raises(ValueError, match="`padding` must be >= 0"):
        conv_output_size(7, 3, padding=-1)


def test_receptive_fields():
    # mnist1d_cnn: three K=3, S=2 convs: 1 + 2*1 + 2*2 + 2*4 = 15
    assert receptive_field(create_model("mnist1d_cnn")) == (15,)
    # seed_cnn: conv3 (3) -> pool2 (4) -> conv3 (8) -> pool2 (10)
    assert receptive_field(create_model("seed_cnn")) == (10, 10)
    assert receptive_field(create_model("lenet5")) == (16, 16)


def test_summary_table_lenet5():
    s = summary(create_model("lenet5"))
    assert s.total_params == 61_706
    first_conv = s.rows[0]
    assert first_conv[:3] == ("Conv", (28, 28, 6), 156)
    # 5 taps on 28 inputs padded by 2: outputs 0 and 27 see 3 real inputs, 1 and 26 see 4, the other 24 see 5
    taps = (3 + 4 + 24 * 5 + 4 + 3) ** 2
    assert first_conv.flops == 2 * taps * 1 * 6 + 28 * 28 * 6  # multiply-add = 2, plus the bias
    assert s.rows[3].flops == 2 * (10 * 10 * 25) * 6 * 16 + 10 * 10 * 16  # unpadded: every tap is real
    assert s.rows[-1][:3] == ("Dense", (10,), 850)
    assert s.rows[-1].flops == 2 * 84 * 10 + 10
    text = str(s)
    for piece in ("layer", "output shape", "params", "FLOPs", "receptive field", "61,706", "(5, 5, 16)", "global"):
        assert piece in text


def test_valid_taps_against_a_direct_count():
    for size, k, s, d, lo in [(28, 5, 1, 1, 2), (7, 3, 2, 2, 3), (9, 4, 3, 1, 0), (5, 3, 1, 3, 4)]:
        hi = lo
        out = (size + lo + hi - (k + (k - 1) * (d - 1))) // s + 1
        padded = [0] * lo + [1] * size + [0] * hi
        direct = sum(padded[o * s + t * d] for o in range(out) for t in range(k))
        assert F.valid_taps(size, k, s, d, lo, out) == direct


def test_summary_matches_real_forward_shapes():
    """The summary's shapes against those the layers' own ops give, layer by layer (traced abstractly: the
    shapes JAX's ops compute, without compiling each op for each shape)."""
    import jax
    from flax import nnx
    for name in ("mnist1d_cnn", "seed_cnn", "convnetjs_cifar", "cifar_vgg", "resnet20", "unet_small"):
        model = nnx.eval_shape(lambda: create_model(name))
        x = jax.ShapeDtypeStruct((2, *model.input_shape), jax.numpy.float32)
        top = [row for row in summary(model).rows if row.depth == 0]
        assert len(top) == len(model.layers)
        for layer, row in zip(model.layers, top):
            x = nnx.eval_shape(lambda layer, x: layer(x), layer, x)
            assert x.shape[1:] == row.output_shape, (name, row)


def test_residual_summary_nests_and_counts_what_a_user_block_holds():
    # The example: a conv then a residual block of two 3x3 convs. The block's receptive field
    # is 7x7 (3 + 2 + 2) and its FLOPs are both convs plus the add, not 0.
    from flax import nnx
    from jaxconv import layers as L
    rngs = nnx.Rngs(0)
    body = L.Sequential([L.Conv(8, 8, (3, 3), padding=1, rngs=rngs), L.ReLU(), L.Conv(8, 8, (3, 3), padding=1, rngs=rngs)])
    model = L.Sequential([L.Conv(3, 8, (3, 3), padding=1, rngs=rngs), L.Residual(body)], input_shape=(16, 16, 3))
    s = summary(model)
    assert [(r.depth, r.label, r.layer) for r in s.rows] == [
        (0, "0", "Conv"), (0, "1", "Residual"), (1, "body", "Sequential"), (2, "0", "Conv"), (2, "1", "ReLU"),
        (2, "2", "Conv"), (1, "shortcut", "Identity")]
    assert s.rows[1].receptive_field == (7, 7)
    assert s.rows[-1].receptive_field == (3, 3)  # the identity shortcut sees what the block's input sees
    conv_taps = (2 + 14 * 3 + 2) ** 2  # 3 taps on 16 inputs padded by 1: the two edge outputs see 2
    conv = 2 * conv_taps * 8 * 8 + 16 * 16 * 8
    assert s.rows[1].flops == 2 * conv + 16 * 16 * 8 + 16 * 16 * 8  # two convs, the ReLU, the add
    assert s.total_flops == s.rows[0].flops + s.rows[1].flops
    assert receptive_field(model) == (7, 7)
    assert "  body: Sequential" in str(s) and "    2: Conv" in str(s)
    assert [r.layer for r in summary(model, depth=0).rows] == ["Conv", "Residual"]


def test_receptive_field_of_resnet20_and_unet():
    # resnet20: stem 3, then 9 blocks of two 3x3 convs; jumps 1, 2, 4 per stage:
    # 3 + 3*2*2*1 + (2*1 + 2*2) + 2*2*2*2 + (2*2 + 2*4) + 2*2*2*4 = 81
    assert receptive_field(create_model("resnet20")) == (81, 81)


@pytest.mark.parametrize("name", sorted(MODELS))
def test_summary_flops_agree_with_xla_cost_analysis(name):
    """An independent count: XLA's HLO cost analysis of the jitted forward (batch 1, eval mode). Both
    count a multiply-add as 2 and skip the taps that land on padding; XLA also counts a few
    elementwise operations differently (a max pool's compare-and-select chain, BatchNorm's affine)."""
    import jax
    import jax.numpy as jnp
    from flax import nnx
    model = create_model(name)
    model.eval()
    graphdef, state = nnx.split(model)
    x = jax.ShapeDtypeStruct((1, *model.input_shape), jnp.float32)
    with onednn_conv.xla_convolutions():  # XLA's analysis sees no custom call's work
        xla = jax.jit(lambda s, x: nnx.merge(graphdef, s)(x)).lower(state, x).cost_analysis()["flops"]
    ours = summary(model).total_flops
    assert abs(xla - ours) / ours < 0.03, (name, ours, xla)


def test_a_layer_that_cannot_count_is_an_error_not_zero():
    from flax import nnx
    from jaxconv import layers as L

    class Mystery(L.Pointwise):
        def flops(self, in_shape):
            return super(L.Pointwise, self).flops(in_shape)

    model = L.Sequential([L.Conv(1, 2, (3, 3), rngs=nnx.Rngs(0)), Mystery()], input_shape=(8, 8, 1))
    with pytest.raises(NotImplementedError, match="Mystery does not implement `flops"):
        summary(model)


LENET5_TABLE = """\
----------------------------------------------------------
layer       output shape  params    FLOPs  receptive field
----------------------------------------------------------
0: Conv     (28, 28, 6)      156  220,176  5x5            
1: ReLU     (28, 28, 6)        0    4,704  5x5            
2: AvgPool  (14, 14, 6)        0    4,704  6x6            
3: Conv     (10, 10, 16)   2,416  481,600  14x14          
4: ReLU     (10, 10, 16)       0    1,600  14x14          
5: AvgPool  (5, 5, 16)         0    1,600  16x16          
6: Flatten  (400,)             0        0  global         
7: Dense    (120,)        48,120   96,120  global         
8: ReLU     (120,)             0      120  global         
9: Dense    (84,)         10,164   20,244  global         
10: ReLU    (84,)              0       84  global         
11: Dense   (10,)            850    1,690  global         
----------------------------------------------------------
lenet5: input (28, 28, 1)
total params: 61,706
total FLOPs per example (forward): 832,642"""


def test_the_summary_table_of_lenet5_word_for_word():
    """Checked by hand: params 5*5*1*6+6, 5*5*6*16+16, 400*120+120, 120*84+84, 84*10+10; fields 5, 5+1,
    6+4*2, 14+1*2; a ReLU or pool costs one FLOP per output value; a Dense 2*in*out + out; the first
    conv's taps on its zero padding are not counted: along each axis the 28 outputs see 3, 4, 5 (x24), 4, 3
    real pixels, 134 in all, so 2 * 6 channels * 134**2 multiply-adds + 4,704 bias adds."""
    assert str(summary(create_model("lenet5"))) == LENET5_TABLE
    assert 2 * 6 * (3 + 4 + 5 * 24 + 4 + 3) ** 2 + 28 * 28 * 6 == 220_176


@pytest.mark.parametrize("kwargs, message", [
    (dict(size=0, kernel=3), "conv_output_size: `size` must be an int >= 1, got 0"),
    (dict(size=7, kernel=0), "conv_output_size: `kernel` must be an int >= 1, got 0"),
    (dict(size=7, kernel=3, stride=1.0), "conv_output_size: `stride` must be an int >= 1, got 1.0"),
    (dict(size=7, kernel=3, dilation=0), "conv_output_size: `dilation` must be an int >= 1, got 0"),
    (dict(size=7, kernel=3, padding=(1, -1)), "conv_output_size: `padding` must be >= 0, got (1, -1)"),
    (dict(size=7, kernel=3, padding=(-1, 1)), "conv_output_size: `padding` must be >= 0, got (-1, 1)"),
    (dict(size=2, kernel=5, padding=(1, 1)), "conv_output_size: effective kernel 5 is larger than the padded input 4"),
    (dict(size=8, kernel=3, stride=3, padding=1, strict=True),
     "conv_output_size: the filter does not tile the input: (8 + 2 - 3)/3 + 1 = 3.33, not an integer"),
    (dict(size=9, kernel=3, stride=3, padding=(1, 0), strict=True),
     "conv_output_size: the filter does not tile the input: (9 + 1 - 3)/3 + 1 = 3.33, not an integer"),
])
def test_conv_output_size_names_every_bad_argument(kwargs, message):
    with pytest.raises(ValueError) as err:
        conv_output_size(**kwargs)
    assert str(err.value) == message


def test_receptive_field_of_a_model_without_spatial_layers_and_without_an_input_shape():
    from flax import nnx
    from jaxconv import layers as L
    rngs = nnx.Rngs(0)
    head = L.Sequential([L.Flatten(), L.Dense(12, 3, rngs=rngs)])
    with pytest.raises(ValueError, match=re.escape("receptive_field/summary: pass `input_shape` (per example, e.g. "
                                                   "(28, 28, 1)) for a model built without one")):
        receptive_field(head)
    assert receptive_field(head, (2, 2, 3)) == (1, 1)  # nothing spatial: each output sees one pixel per axis
    assert receptive_field(L.Sequential([L.Flatten(), L.Dense(12, 3, rngs=rngs)], input_shape=(12, 1))) == (1,)
    with pytest.raises(ValueError, match="pass `input_shape`"):  # a bare leaf has no input_shape attribute at all
        summary(L.Conv(1, 2, (3, 3), rngs=rngs))
    conv = L.Sequential([L.Conv(1, 2, (3, 3), rngs=rngs)])
    assert receptive_field(conv, (9, 9, 1)) == (3, 3)
    assert summary(conv, (9, 9, 1)).rows[0].output_shape == (7, 7, 2)  # the shape given is the one used


def _conv_flops(taps_per_axis, c_in, c_out, outputs):
    return 2 * taps_per_axis ** 2 * c_in * c_out + outputs * c_out  # multiply-adds x 2, one bias add per output


def test_training_flops_skip_the_gradient_of_the_data_and_follow_branches():
    """Hand counts: 3x the forward where gradients pass, 2x for a layer with parameters that reads the data
    (forward and weight gradient), 1x for a parameter-free layer before any parameter (forward only)."""
    from flax import nnx
    from jaxconv import layers as L
    from jaxconv.shapes import training_flops
    rngs = nnx.Rngs(0)
    first = _conv_flops(2 + 6 * 3 + 2, 3, 4, 64)  # 3x3, padding 1 on 8x8: the edge outputs see 2 taps per axis
    second = _conv_flops(2 + 6 * 3 + 2, 4, 4, 64)
    relu = 8 * 8 * 4
    chain = L.Sequential([L.Conv2d(3, 4, 3, padding=1, rngs=rngs), L.ReLU(), L.Conv2d(4, 4, 3, padding=1, rngs=rngs)],
                         input_shape=(8, 8, 3))
    assert summary(chain).total_flops == first + relu + second
    assert training_flops(chain) == 2 * first + 3 * relu + 3 * second
    pool_first = L.Sequential([L.MaxPool(2), L.Conv2d(3, 4, 3, padding=1, rngs=rngs)], input_shape=(16, 16, 3))
    assert training_flops(pool_first) == 1 * (8 * 8 * 3 * 4) + 2 * first
    # a block on the data itself: both branches read the images (no input gradient for either conv); the add
    # and everything after it lie below parameters
    project = L.Conv2d(3, 4, 1, rngs=rngs)
    block = L.Residual(L.Sequential([L.Conv2d(3, 4, 3, padding=1, rngs=rngs), L.ReLU(),
                                     L.Conv2d(4, 4, 3, padding=1, rngs=rngs)]), project)
    residual_first = L.Sequential([block, L.ReLU()], input_shape=(8, 8, 3))
    one_by_one = _conv_flops(8, 3, 4, 64)
    assert training_flops(residual_first) == (2 * first + 3 * relu + 3 * second + 2 * one_by_one + 3 * relu
                                              + 3 * relu)
    # parameter-free branches on the data: the identity and a pool cost their forward alone
    skip = L.Sequential([L.Concat(L.Identity(), L.Conv2d(3, 4, 3, padding=1, rngs=rngs)), L.ReLU()],
                        input_shape=(8, 8, 3))
    assert training_flops(skip) == 2 * first + 3 * (8 * 8 * 7)


@pytest.mark.parametrize("name", ["lenet5", "convnetjs_cifar", "resnet20", "unet_small"])
def test_training_flops_agree_with_xla_cost_analysis_of_the_gradient(name):
    """An independent count: XLA's cost analysis of the traced loss-and-gradient program (batch 1, training
    mode). Without the data's gradient left out, lenet5 and convnetjs_cifar would be 9 % and 12 % over it."""
    import jax
    import jax.numpy as jnp
    from flax import nnx
    from jaxconv.shapes import training_flops
    model = create_model(name)
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    *positions, classes = model.output_shape(model.input_shape)

    def loss(p, x, y):
        return F.cross_entropy(nnx.merge(graphdef, p, rest, copy=True)(x), y)
    x = jax.ShapeDtypeStruct((1, *model.input_shape), jnp.float32)
    y = jax.ShapeDtypeStruct((1, *positions), jnp.int32)
    with onednn_conv.xla_convolutions():  # XLA's analysis sees no custom call's work
        xla = jax.jit(jax.grad(loss)).lower(params, x, y).cost_analysis()["flops"]
    ours = training_flops(model)
    assert abs(xla - ours) / ours < 0.03, (name, ours, xla)
