"""Output-size arithmetic (the seeds' numbers), receptive fields, FLOPs and the summary table."""
import re

import pytest

from jaxconv import create_model, receptive_field, summary
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
    assert first_conv[3] == 2 * 28 * 28 * 6 * 25  # multiply-add = 2 FLOPs
    assert s.rows[-1][:3] == ("Dense", (10,), 850)
    text = str(s)
    for piece in ("layer", "output shape", "params", "FLOPs", "receptive field", "61,706", "(5, 5, 16)", "global"):
        assert piece in text


def test_summary_matches_real_forward_shapes():
    import jax.numpy as jnp
    for name in ("mnist1d_cnn", "seed_cnn", "convnetjs_cifar", "cifar_vgg"):
        model = create_model(name)
        x = jnp.zeros((2, *model.input_shape), jnp.float32)
        for layer, row in zip(model.layers, summary(model).rows):
            x = layer(x)
            assert x.shape[1:] == row[1], (name, row)
