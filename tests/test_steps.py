"""What a training step is made of, each against an independent expectation: the learning-rate schedules
(their formulas), the optimizers (their update rules in NumPy), input normalisation, augmentation (properties
only a correct crop and flip have), evaluation over a padded last batch, and the confusion matrix."""
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jaxconv import parallel
from jaxconv.data import DATASETS
from jaxconv.models import create_model
from jaxconv.steps import (augment, confusion_matrix, evaluate, init_replicas, make_optimizer, make_replica_steps,
                           make_schedule, normalise)
from jaxconv.train import TrainConfig, resolve


def config(**kw):
    return resolve(TrainConfig(out="unused", **kw))


def lrs(schedule, steps):
    return np.array([float(schedule(t)) for t in steps])


# ----------------------------------------------------------------------------------------- schedules


def test_constant_and_cosine_schedules_follow_their_formulas():
    t = np.arange(0, 101)
    np.testing.assert_allclose(lrs(make_schedule(config(schedule="constant", lr=0.3, epochs=10), 10), t), 0.3)
    cosine = lrs(make_schedule(config(schedule="cosine", lr=0.2, epochs=10), 10), t)  # T = 100 steps, no warm-up
    np.testing.assert_allclose(cosine, 0.2 * 0.5 * (1 + np.cos(np.pi * t / 100)), rtol=1e-5, atol=1e-8)
    warm = lrs(make_schedule(config(schedule="cosine", lr=0.2, epochs=10, warmup_epochs=1.5), 10), t)  # W = 15
    expected = np.where(t < 15, 0.2 * t / 15, 0.2 * 0.5 * (1 + np.cos(np.pi * (t - 15) / 85)))
    np.testing.assert_allclose(warm, expected, rtol=1e-5, atol=1e-8)


@pytest.mark.parametrize("warmup_epochs, rise", [(0, 25), (2, 20)])  # 25 % of 100 steps, or the warm-up given
def test_one_cycle_rises_then_falls_along_two_cosines(warmup_epochs, rise):
    lr, t = 0.1, np.arange(0, 101)
    got = lrs(make_schedule(config(schedule="onecycle", lr=lr, epochs=10, warmup_epochs=warmup_epochs), 10), t)
    start, end = lr / 25, lr / 25 / 1e4  # optax's div_factor and final_div_factor
    up = start + (lr - start) * (1 - np.cos(np.pi * t / rise)) / 2
    down = lr + (end - lr) * (1 - np.cos(np.pi * (t - rise) / (100 - rise))) / 2
    np.testing.assert_allclose(got, np.where(t <= rise, up, down), rtol=1e-5, atol=1e-9)
    assert int(np.argmax(got)) == rise


# ----------------------------------------------------------------------------------------- optimizers


def numpy_updates(name, lr, wd, p, grads):
    """The parameters after each gradient in ``grads``, by the textbook rules optax documents."""
    p, m, v, out = p.astype(np.float64), 0.0, 0.0, []
    for k, g in enumerate(grads, start=1):
        g = g.astype(np.float64)
        if name in ("sgd", "nesterov"):
            g = g + wd * p  # L2 weight decay, added to the gradient before momentum
            m = g + 0.9 * m
            p = p - lr * (g + 0.9 * m if name == "nesterov" else m)
        else:
            g = g + wd * p if name == "adam" else g
            m, v = 0.9 * m + 0.1 * g, 0.999 * v + 0.001 * g * g
            step = (m / (1 - 0.9 ** k)) / (np.sqrt(v / (1 - 0.999 ** k)) + 1e-8)
            p = p - lr * (step + (wd * p if name == "adamw" else 0))  # AdamW: decoupled decay
        out.append(p)
    return out


@pytest.mark.parametrize("name", ["sgd", "nesterov", "adam", "adamw"])
@pytest.mark.parametrize("wd", [0.0, 0.05])
def test_each_optimizer_makes_its_textbook_updates(name, wd):
    rng = np.random.default_rng(0)
    p0 = rng.normal(size=7).astype(np.float32)
    grads = [rng.normal(size=7).astype(np.float32) for _ in range(3)]
    tx = make_optimizer(config(optimizer=name, lr=0.05, schedule="constant", weight_decay=wd), 10)
    p, ours = jnp.asarray(p0), []
    state = tx.init(p)
    for g in grads:
        updates, state = tx.update(jnp.asarray(g), state, p)
        p = p + updates
        ours.append(np.asarray(p))
    for got, want in zip(ours, numpy_updates(name, 0.05, wd, p0, grads)):
        np.testing.assert_allclose(got, want, rtol=2e-5, atol=1e-6)


def test_the_optimizer_takes_the_schedules_rate_of_each_step():
    """Plain SGD's first two updates are -lr(0) g and -lr(1) (g + 0.9 g): the schedule starts at step 0."""
    c = config(optimizer="sgd", lr=0.1, schedule="onecycle", epochs=1, weight_decay=0.0)
    schedule, tx = make_schedule(c, 8), make_optimizer(c, 8)
    p = jnp.zeros(3)
    g = jnp.array([1.0, -2.0, 0.5])
    state = tx.init(p)
    first, state = tx.update(g, state, p)
    second, _ = tx.update(g, state, p)
    np.testing.assert_allclose(first, -float(schedule(0)) * g, rtol=1e-6)
    np.testing.assert_allclose(second, -float(schedule(1)) * 1.9 * g, rtol=1e-6)


# ----------------------------------------------------------------------------------------- inputs


def test_normalise_maps_pixels_through_255_and_floats_as_they_are():
    x = np.array([[0, 51, 255]], np.uint8)
    mean, std = jnp.asarray([0.5], jnp.float32), jnp.asarray([0.25], jnp.float32)
    np.testing.assert_allclose(normalise(jnp.asarray(x), mean, std), (x / 255 - 0.5) / 0.25, rtol=1e-6)
    f = np.array([[-1.0, 0.0, 3.0]], np.float32)
    np.testing.assert_allclose(normalise(jnp.asarray(f), mean, std), (f - 0.5) / 0.25, rtol=1e-6)
    per_channel = normalise(jnp.full((1, 2, 2, 3), 255, jnp.uint8), jnp.asarray([0.1, 0.2, 0.3]),
                            jnp.asarray([1.0, 2.0, 4.0]))
    np.testing.assert_allclose(per_channel[0, 0, 0], [(1 - 0.1) / 1, (1 - 0.2) / 2, (1 - 0.3) / 4], rtol=1e-6)


def windows(x, crop):
    """Every crop of ``x`` [H, W, C] zero-padded by ``crop``, by offset."""
    padded = np.pad(x, [(crop, crop), (crop, crop), (0, 0)])
    h, w = x.shape[:2]
    return {(i, j): padded[i:i + h, j:j + w] for i in range(2 * crop + 1) for j in range(2 * crop + 1)}


def test_random_crop_and_flip_are_a_padded_window_and_a_mirror_with_every_outcome_drawn():
    rng = np.random.default_rng(0)
    x = rng.integers(1, 256, (64, 6, 5, 2)).astype(np.float32)  # no zeros: padding is recognisable
    out = np.asarray(augment(jax.random.key(3), jnp.asarray(x), crop=2, flip=True))
    offsets, mirrored = set(), 0
    for image, got in zip(x, out):
        found = [(off, flip) for off, win in windows(image, 2).items() for flip in (False, True)
                 if np.array_equal(got, win[:, ::-1] if flip else win)]
        assert found, "an output that is no crop of its padded input, mirrored or not"
        offsets.add(found[0][0])
        mirrored += found[0][1]
    assert len(offsets) >= 15  # of the 25 offsets 0..4 x 0..4, drawn for each image
    assert 16 <= mirrored <= 48  # about half of 64 are mirrored
    again = np.asarray(augment(jax.random.key(3), jnp.asarray(x), crop=2, flip=True))
    np.testing.assert_array_equal(again, out)  # a function of the key
    np.testing.assert_array_equal(augment(jax.random.key(3), jnp.asarray(x), crop=0, flip=False), x)


def test_random_crop_of_one_dimensional_signals_draws_every_shift_alike():
    n = 1000
    x = np.arange(1, 41, dtype=np.float32)[None, :, None].repeat(n, 0)  # [1000, 40, 1]
    out = np.asarray(augment(jax.random.key(0), jnp.asarray(x), crop=3, flip=True))  # flip: 2-D only
    padded = np.pad(np.arange(1, 41, dtype=np.float32), 3)
    shifts = []
    for got in out[:, :, 0]:
        match = [s for s in range(7) if np.array_equal(got, padded[s:s + 40])]
        assert match
        shifts.append(match[0])
    share = np.bincount(shifts, minlength=7) / n
    assert share.min() > 0.10 and share.max() < 0.19  # uniform over the 7 shifts: 1/7 = 0.143 each


# ----------------------------------------------------------------------------------------- initial state


@pytest.mark.parametrize("model, dataset", [("mnist1d_deep", "mnist1d"), ("lenet5", "mnist")])
def test_each_replica_starts_from_create_models_weights_bit_for_bit(model, dataset):
    """The run's initial state, built in one program for all seeds (compiled with less optimisation on a CPU,
    graph definitions from an abstract build), holds exactly the weights and statistics of the model built op by
    op for each seed, and its graph definitions merge them into the same model."""
    c = config(model=model, dataset=dataset)
    info = DATASETS[dataset]
    state, g_train, g_eval, _ = init_replicas(c, [3, 4], info.input_shape, info.num_classes, 5,
                                              parallel.make_mesh(1))
    x = jax.random.normal(jax.random.key(0), (2, *info.input_shape))
    for k, seed in enumerate((3, 4)):
        eager = create_model(model, input_shape=info.input_shape, num_classes=info.num_classes,
                             rngs=nnx.Rngs(params=seed, dropout=seed + 1))  # op by op, as create_model's seed
        mine = jax.tree.map(lambda a: a[k], (state.params, state.model_state))
        theirs = (nnx.state(eager, nnx.Param), nnx.state(eager, nnx.Not(nnx.Param)))
        assert jax.tree.structure(mine) == jax.tree.structure(theirs)
        for a, b in zip(jax.tree.leaves(mine), jax.tree.leaves(theirs)):
            np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
        eager.eval()
        np.testing.assert_array_equal(np.asarray(nnx.merge(g_eval, *mine)(x)), np.asarray(eager(x)))
        eager.train()
        assert nnx.graphdef(eager) == g_train


# ----------------------------------------------------------------------------------------- evaluation


def test_evaluation_over_a_padded_last_batch_equals_numpy_on_each_replicas_rows():
    """Two seeds, each with its own 23 rows, in batches of 10 (the last one padded with 7 masked rows): loss,
    accuracy and predictions from the model's own logits computed directly."""
    c = config(model="mnist1d_mlp", seeds=2)
    info = DATASETS["mnist1d"]
    mesh = parallel.make_mesh("all", batch=10)
    state, g_train, g_eval, tx = init_replicas(c, [0, 1], info.input_shape, info.num_classes, 5, mesh)
    _, eval_step = make_replica_steps(g_train, g_eval, tx, c, info, mesh, 2)
    rng = np.random.default_rng(0)
    images = rng.normal(size=(40, 40, 1)).astype(np.float32)
    labels = rng.integers(0, 10, 40).astype(np.int32)
    rows = np.stack([np.arange(0, 23), np.arange(17, 40)])
    loss, accuracy, preds = evaluate(eval_step, state, parallel.put(mesh, images), parallel.put(mesh, labels), rows,
                                     10, mesh)
    for k in range(2):
        model = nnx.merge(g_eval, jax.tree.map(lambda a: a[k], state.params),
                          jax.tree.map(lambda a: a[k], state.model_state))
        logits = np.asarray(model(jnp.asarray(images[rows[k]])), np.float64)  # mnist1d: mean 0, std 1
        logp = logits - logits.max(-1, keepdims=True)
        logp -= np.log(np.exp(logp).sum(-1, keepdims=True))
        y = labels[rows[k]]
        np.testing.assert_array_equal(preds[k], logits.argmax(-1))
        assert math.isclose(accuracy[k], np.mean(logits.argmax(-1) == y), rel_tol=1e-12)
        assert math.isclose(loss[k], -np.mean(logp[np.arange(23), y]), rel_tol=1e-5)
    assert not np.array_equal(preds[0], preds[1])


def test_confusion_matrix_counts_true_by_predicted():
    labels, preds = np.array([0, 1, 2, 2, 1, 0, 2]), np.array([0, 2, 2, 1, 1, 0, 2])
    expected = np.zeros((3, 3), int)
    for t, p in zip(labels, preds):
        expected[t, p] += 1
    np.testing.assert_array_equal(confusion_matrix(labels, preds, 3), expected)
    assert confusion_matrix(labels, preds, 3).dtype.kind == "i"  # counts, written as integers
    assert confusion_matrix(labels, preds, 4).shape == (4, 4) and confusion_matrix(labels, preds, 4)[3].sum() == 0
