"""The compiled pieces of training: the state, the optimizer, on-device batches, train and eval steps.

The state is a pytree (params, model state such as batch statistics, optimizer state, step, key, and
the running sums of the current epoch's training loss and accuracy, so that a run resumed mid-epoch
reports the same epoch metrics). Each step gathers its batch from the on-device arrays by index,
augments it inside ``jit`` and applies an Optax update; nothing crosses the host boundary but indices.
"""
from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any

import flax
import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from jaxconv import compiler, parallel
from jaxconv import functional as F
from jaxconv.config import TrainConfig
from jaxconv.models import create_model

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float64": jnp.float64}  # float64 needs jax_enable_x64


@flax.struct.dataclass
class TrainState:
    params: Any
    model_state: Any      # everything of the model that is not a Param: batch statistics, dropout RNG
    opt_state: Any
    step: jax.Array
    key: jax.Array        # the run's base key (raw uint32[2]); per-step keys are folded from it
    loss_sum: jax.Array   # the current epoch's summed training loss, and its summed correct share
    correct_sum: jax.Array

    def new_epoch(self) -> "TrainState":
        return self.replace(loss_sum=jnp.zeros_like(self.loss_sum), correct_sum=jnp.zeros_like(self.correct_sum))


def make_schedule(config: TrainConfig, steps_per_epoch: int) -> optax.Schedule:
    """The learning rate at each step: constant; cosine decay (after a linear warm-up if one is given);
    one-cycle (up for 25 % of the run, or for the warm-up given, then cosine down)."""
    total = max(config.epochs * steps_per_epoch, 1)
    warmup = int(config.warmup_epochs * steps_per_epoch)
    if config.schedule == "constant":
        return optax.constant_schedule(config.lr)
    if config.schedule == "cosine":
        return optax.warmup_cosine_decay_schedule(0.0 if warmup else config.lr, config.lr, warmup, total)
    return optax.cosine_onecycle_schedule(total, config.lr, pct_start=(warmup / total) if warmup else 0.25)


def make_optimizer(config: TrainConfig, steps_per_epoch: int) -> optax.GradientTransformation:
    lr = make_schedule(config, steps_per_epoch)
    if config.optimizer in ("sgd", "nesterov"):
        tx = optax.sgd(lr, momentum=0.9, nesterov=config.optimizer == "nesterov")
        return optax.chain(optax.add_decayed_weights(config.weight_decay), tx) if config.weight_decay else tx
    if config.optimizer == "adamw":
        return optax.adamw(lr, weight_decay=config.weight_decay)
    tx = optax.adam(lr)
    return optax.chain(optax.add_decayed_weights(config.weight_decay), tx) if config.weight_decay else tx


# --------------------------------------------------------------------------- on-device batches


def normalise(x, mean, std):
    """uint8 pixels -> (x / 255 - mean) / std; float data -> (x - mean) / std (in ``mean``'s dtype)."""
    if jnp.issubdtype(x.dtype, jnp.integer):
        x = x.astype(mean.dtype) / 255.0
    return (x.astype(mean.dtype) - mean) / std


def augment(key, x, *, crop: int, flip: bool):
    """Random crop of every spatial axis after zero padding by ``crop``; random horizontal flip (2-D)."""
    if crop:
        n_sp = x.ndim - 2
        key, sub = jax.random.split(key)
        padded = jnp.pad(x, [(0, 0)] + [(crop, crop)] * n_sp + [(0, 0)])
        offsets = jax.random.randint(sub, (x.shape[0], n_sp), 0, 2 * crop + 1)
        take = lambda img, off: jax.lax.dynamic_slice(img, (*off, 0), x.shape[1:])
        x = jax.vmap(take)(padded, offsets)
    if flip and x.ndim == 4:
        mirror = jax.random.bernoulli(key, 0.5, (x.shape[0], 1, 1, 1))
        x = jnp.where(mirror, x[:, :, ::-1], x)
    return x


def make_steps(graphdef_train, graphdef_eval, tx, config: TrainConfig, info, mesh=None):
    """``(train_step, eval_step)`` of one replica, jitted; with a ``mesh``, each batch is split across its devices.

    ``train_step(state, images, labels, order, i) -> (state, loss)`` trains on ``images[order[i]]``;
    ``eval_step(state, images, labels, idx, mask, s) -> (loss_sum, correct_sum, pred)`` evaluates
    ``images[idx[s]]``, counting only the rows where ``mask[s]`` is 1.
    """
    single, evaluate_one = _step_functions(graphdef_train, graphdef_eval, tx, config, info, mesh)
    out = {} if mesh is None else dict(out_shardings=parallel.replicated(mesh))
    return compiler.jit(single, donate_argnums=0, **out), compiler.jit(evaluate_one, **out)


def make_replica_steps(graphdef_train, graphdef_eval, tx, config: TrainConfig, info, mesh, replicas: int):
    """``make_steps`` over a state with a leading replica axis (many seeds in one program, one compile and one
    dispatch per step for all): ``jax.vmap`` over the replicas, or, where :func:`jaxconv.compiler.replica_strategy`
    says so (XLA:CPU), one copy of the step per replica inside the one program; one replica is the single program.

    The train step runs several steps per dispatch: ``train_steps(state, images, labels, order, i, n) ->
    (state, losses)`` makes steps ``i .. i+n-1`` of ``order`` (``n`` static; one program per distinct ``n``), a
    ``lax.scan`` over the one-step program when ``n > 1``, and returns their losses ``[n, replicas]``.

    ``order`` is ``[replicas, steps, batch]``; eval's ``idx`` is ``[replicas, steps, batch]``; every output
    gains the leading replica axis."""
    single, evaluate_one = _step_functions(graphdef_train, graphdef_eval, tx, config, info, mesh)
    train = _over_replicas(single, (0, None, None, 0, None), replicas)
    evaluate_all = _over_replicas(evaluate_one, (0, None, None, 0, None, None), replicas)

    def train_steps(state, images, labels, order, i, n: int):
        if n == 1:  # the one-step program itself, not a loop of one
            state, loss = train(state, images, labels, order, i)
            return state, loss[None]
        return jax.lax.scan(lambda s, j: train(s, images, labels, order, j), state, i + jnp.arange(n))

    out = dict(out_shardings=parallel.replicated(mesh))
    return (_one_at_a_time(compiler.jit(train_steps, donate_argnums=0, static_argnums=5, **out), mesh),
            _one_at_a_time(compiler.jit(evaluate_all, **out), mesh))


def _one_at_a_time(step, mesh):
    """``step`` itself, or, where :func:`jaxconv.parallel.one_step_in_flight` says so (a mesh of several CPU
    devices), ``step`` waiting for its own result before it returns, so no program is dispatched ahead."""
    if not parallel.one_step_in_flight(mesh):
        return step

    @functools.wraps(step)
    def waited(*args):
        return jax.block_until_ready(step(*args))
    return waited


def _over_replicas(fn, in_axes, replicas: int):
    """``fn`` over a leading replica axis of the arguments whose ``in_axes`` is 0, as one program."""
    if replicas > 1 and compiler.replica_strategy() == "vmap":
        return jax.vmap(fn, in_axes=in_axes)

    def unrolled(*args):  # one copy of the program per replica; for one replica, the program itself
        outs = [fn(*[jax.tree.map(lambda a: a[k], x) if axis == 0 else x for x, axis in zip(args, in_axes)])
                for k in range(replicas)]
        return jax.tree.map(lambda *o: jnp.stack(o), *outs)
    return unrolled


def _step_functions(graphdef_train, graphdef_eval, tx, config: TrainConfig, info, mesh):
    real = jnp.float64 if config.dtype == "float64" else jnp.float32
    mean, std = jnp.asarray(info.mean, real), jnp.asarray(info.std, real)
    # Each device gathers its share of the batch from its own copy of the data; the rest follows from jit.
    spread = (lambda idx: idx) if mesh is None else (
        lambda idx: jax.lax.with_sharding_constraint(idx, parallel.split(mesh)))

    def train_step(state: TrainState, images, labels, order, i):
        idx = spread(jax.lax.dynamic_index_in_dim(order, i, keepdims=False))
        x, y = normalise(images[idx], mean, std), labels[idx]
        x = augment(jax.random.fold_in(state.key, state.step), x, crop=config.crop, flip=config.flip)

        def loss_fn(params):
            model = nnx.merge(graphdef_train, params, state.model_state, copy=True)
            logits = model(x).astype(real)
            loss = F.cross_entropy(logits, y, label_smoothing=config.label_smoothing)
            return loss, (logits, nnx.state(model, nnx.Not(nnx.Param)))

        (loss, (logits, model_state)), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
        updates, opt_state = tx.update(grads, state.opt_state, state.params)
        correct = jnp.sum(jnp.argmax(logits, -1) == y) / math.prod(y.shape[1:])
        new = state.replace(params=optax.apply_updates(state.params, updates), model_state=model_state,
                            opt_state=opt_state, step=state.step + 1,
                            loss_sum=state.loss_sum + loss.astype(state.loss_sum.dtype),
                            correct_sum=state.correct_sum + correct.astype(state.correct_sum.dtype))
        return new, loss

    def eval_step(state: TrainState, images, labels, idx, mask, s):
        idx = spread(jax.lax.dynamic_index_in_dim(idx, s, keepdims=False))
        mask = spread(jax.lax.dynamic_index_in_dim(mask, s, keepdims=False))
        model = nnx.merge(graphdef_eval, state.params, state.model_state)
        logits = model(normalise(images[idx], mean, std)).astype(real)
        y = labels[idx]
        mask_y = mask.reshape(mask.shape + (1,) * (y.ndim - 1))  # per-position labels: mask every position
        positions = math.prod(y.shape[1:])
        losses = F.cross_entropy(logits, y, reduction="none")
        pred = jnp.argmax(logits, -1)
        return jnp.sum(losses * mask_y) / positions, jnp.sum((pred == y) * mask_y) / positions, pred

    return train_step, eval_step


def evaluate(eval_step, state, images, labels, rows, batch_size: int, mesh):
    """Each replica's loss, accuracy and predictions over its examples ``rows`` (``[replicas, n]`` indices into
    ``images``), with a replica-axis ``eval_step`` (:func:`make_replica_steps`): ``([K], [K], [K, n])``.
    Batches are rounded up to a whole share for every device; the last one is padded and masked."""
    rows = np.asarray(rows)
    n = rows.shape[1]
    batch_size = -(-min(batch_size, n) // mesh.size) * mesh.size
    steps = math.ceil(n / batch_size)
    idx = np.zeros((rows.shape[0], steps * batch_size), np.int32)
    idx[:, :n] = rows
    mask = np.zeros(steps * batch_size, np.float32)
    mask[:n] = 1
    idx = parallel.put(mesh, idx.reshape(-1, steps, batch_size))
    mask = parallel.put(mesh, mask.reshape(steps, batch_size))
    outs = [eval_step(state, images, labels, idx, mask, s) for s in range(steps)]  # dispatched, then read
    loss_sum = sum(parallel.fetch(l).astype(np.float64) for l, _, _ in outs)
    correct = sum(parallel.fetch(c).astype(np.float64) for _, c, _ in outs)
    preds = np.concatenate([parallel.fetch(p) for _, _, p in outs], axis=1)[:, :n]
    return loss_sum / n, correct / n, preds


def confusion_matrix(labels, preds, num_classes: int):
    m = np.zeros((num_classes, num_classes), np.int64)
    np.add.at(m, (np.asarray(labels), np.asarray(preds)), 1)
    return m


def build_model(config: TrainConfig, input_shape, num_classes: int):
    """The run's model, as ``create_model`` builds it from the config (float64 parameters for float64 runs)."""
    return create_model(config.model, input_shape=input_shape, num_classes=num_classes, grad=config.grad,
                        dtype=DTYPES[config.dtype] if config.dtype == "bfloat16" else None,
                        param_dtype=jnp.float64 if config.dtype == "float64" else jnp.float32, seed=config.seed)


def init_replicas(config: TrainConfig, seeds, input_shape, num_classes: int, steps_per_epoch: int, mesh):
    """The states of one run per seed in ``seeds``, stacked on a leading replica axis and replicated over ``mesh``.

    The model is built once, inside ``jit`` and ``vmap`` over the seeds: every process of a multi-process run
    computes its own identical copy, and each seed's slice equals what a one-seed run of that seed builds. The
    graph definitions come from an abstract build (``nnx.eval_shape``): building a concrete model eagerly only to
    read them compiled every initialiser shape on its own (ResNet-20: 4.6 s in a fresh process)."""
    graphdef_train, graphdef_eval = graphdefs(nnx.eval_shape(lambda: build_model(config, input_shape, num_classes)))
    tx = make_optimizer(config, steps_per_epoch)

    def build(seed):
        return init_state(dataclasses.replace(config, seed=seed), input_shape, num_classes, steps_per_epoch)[0]

    seeds = jnp.asarray(list(seeds), jnp.int32)
    states = compiler.jit_once(jax.vmap(build), out_shardings=parallel.replicated(mesh))(seeds)
    return states, graphdef_train, graphdef_eval, tx


def graphdefs(model):
    """``(training graph definition, evaluation graph definition)`` of ``model``, which is left in eval mode."""
    model.train()
    graphdef_train = nnx.graphdef(model)
    model.eval()
    return graphdef_train, nnx.graphdef(model)


def init_state(config: TrainConfig, input_shape, num_classes: int, steps_per_epoch: int):
    model = build_model(config, input_shape, num_classes)
    graphdef_train, graphdef_eval = graphdefs(model)
    params, model_state = nnx.state(model, nnx.Param, ...)
    tx = make_optimizer(config, steps_per_epoch)
    real = jnp.float64 if config.dtype == "float64" else jnp.float32
    state = TrainState(params, model_state, tx.init(params), jnp.zeros((), jnp.int32),
                       jax.random.PRNGKey(config.seed), jnp.zeros((), real), jnp.zeros((), real))
    return state, graphdef_train, graphdef_eval, tx
