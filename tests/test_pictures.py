"""Pictures of what the network sees: the feature maps are the layers' real outputs, and the commands write
their PNGs (whose content a person checks by eye; here: that they are images of the expected layout)."""
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image

from jaxconv import functional as F
from jaxconv import pictures
from jaxconv.cli import main
from jaxconv.inference import load
from jaxconv.models import create_model
from jaxconv.shapes import summary


def test_conv_outputs_are_each_conv_layers_output_in_call_order():
    model = create_model("lenet5", seed=3)
    x = jax.random.normal(jax.random.PRNGKey(0), (2, 28, 28, 1))
    logits, maps = pictures.conv_outputs(model, x)
    np.testing.assert_allclose(logits, model(x), rtol=1e-6)
    assert [name for name, _, _ in maps] == ["layers/0", "layers/3"]
    conv_rows = [r.output_shape for r in summary(model, depth=0).rows if r.layer == "Conv"]
    assert [m.shape for _, _, m in maps] == conv_rows == [(28, 28, 6), (10, 10, 16)]
    first = model.layers[0]  # written out: the first layer's convolution of the first example
    direct = F.conv(x[:1], first.kernel[...], first.bias[...], padding=first.padding)[0]
    np.testing.assert_allclose(maps[0][2], direct, rtol=1e-5, atol=1e-6)
    # the second conv sees the pooled ReLU of the first
    h = F.avg_pool(F.relu(direct[None]), 2, stride=2)
    second = model.layers[3]
    np.testing.assert_allclose(maps[1][2], F.conv(h, second.kernel[...], second.bias[...])[0], rtol=1e-4, atol=1e-5)
    path, kernel = pictures.first_conv_kernel(model)
    assert path == "layers/0" and kernel.shape == (5, 5, 1, 6)


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory):
    out = str(tmp_path_factory.mktemp("vis") / "run")
    assert main(["train", "--epochs", "1", "--out", out]) == 0
    return out


def _png(path):
    with Image.open(path) as img:
        assert img.format == "PNG"
        return img.size


def test_visualize_draws_filters_and_feature_maps_and_names_the_prediction(trained_run, capsys):
    capsys.readouterr()
    assert main(["visualize", "--out", trained_run, "--index", "5", "--channels", "4"]) == 0
    printed = capsys.readouterr().out.splitlines()
    folder = os.path.join(trained_run, "pictures")
    assert sorted(os.listdir(folder)) == ["feature_maps_test5.png", "filters.png"]
    width, height = _png(os.path.join(folder, "feature_maps_test5.png"))
    assert height > 300 and width > 300
    _png(os.path.join(folder, "filters.png"))
    # the printed classes are the loaded model's own prediction for that example
    from jaxconv.data import load_dataset
    image = load_dataset("mnist1d").test.images[5]
    top = load(trained_run).top(image, 3)
    assert printed[0] == "test5: " + ", ".join(f"{name} {p:.3f}" for name, p in top)
    assert printed[1].startswith("3 conv layers drawn; ")


def test_visualize_takes_an_npy_file_and_refuses_a_bad_index(trained_run, tmp_path, capsys):
    from jaxconv.data import load_dataset
    np.save(tmp_path / "signal.npy", load_dataset("mnist1d").test.images[0])
    assert main(["visualize", "--out", trained_run, "--image", str(tmp_path / "signal.npy")]) == 0
    assert os.path.exists(os.path.join(trained_run, "pictures", "feature_maps_signal.png"))
    capsys.readouterr()
    assert main(["visualize", "--out", trained_run, "--index", "99999"]) == 2
    err = capsys.readouterr().err
    assert "--index must be in [0, " in err and len(err.strip().splitlines()) == 1


def test_summary_plot_draws_the_receptive_fields(tmp_path, capsys):
    path = str(tmp_path / "rf.png")
    assert main(["summary", "--model", "resnet20", "--depth", "0", "--plot", path]) == 0
    assert capsys.readouterr().out.strip().endswith(f"receptive fields drawn in {path}")
    width, height = _png(path)
    assert width > height > 300
    assert main(["summary", "--model", "mnist1d_cnn", "--plot", str(tmp_path / "rf1d.png")]) == 0
    _png(str(tmp_path / "rf1d.png"))


def test_plot_functions_take_plain_arrays(tmp_path):
    rng = np.random.default_rng(0)
    kernel = rng.standard_normal((3, 3, 3, 8)).astype(np.float32)
    pictures.plot_filters(kernel, str(tmp_path / "f.png"))
    maps = [("a", None, rng.standard_normal((8, 8, 5))), ("b", None, rng.standard_normal((4, 4, 20)))]
    pictures.plot_feature_maps(rng.random((8, 8, 3)), maps, jnp.array([0.2, 0.8]), ["cat", "dog"],
                               str(tmp_path / "m.png"))
    assert _png(str(tmp_path / "f.png")) and _png(str(tmp_path / "m.png"))
