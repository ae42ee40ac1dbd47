"""Checkpoints keyed by the state's own path names, through Orbax.

A run keeps two folders of checkpoints, each numbered by the global training step:

* ``OUT/checkpoints/`` — the latest two (written at every epoch's end, every ``--checkpoint-every``
  steps, and when the run is stopped by a signal);
* ``OUT/best/`` — the one with the best validation accuracy so far (runs with ``--val-split``).

The state is saved as a nested dict whose keys are its tree's path names —
``params/layers/0/kernel``, ``opt_state/0/mu/layers/0/kernel``, ``step`` — so a checkpoint reads
back without the live model (:func:`read`), and restoring it into a different model fails by name
(:func:`restore`, :func:`restore_into`). A checkpoint holds no device layout: it is read onto whatever
devices the reader's state lives on, so a run saved on 4 devices (or processes) continues on 1 and back. Orbax writes each checkpoint into a temporary folder and renames it when
complete: a process killed mid-write leaves the previous checkpoint as the latest one.
"""
from __future__ import annotations

import errno
import os

import jax
import jax.numpy as jnp
import numpy as np
from jax.tree_util import DictKey, FlattenedIndexKey, GetAttrKey, SequenceKey

from jaxconv import parallel


class CheckpointMismatch(ValueError):
    """A checkpoint does not fit the state it is restored into; the message names the paths."""


def _key_name(key) -> str:
    if isinstance(key, DictKey):
        return str(key.key)
    if isinstance(key, GetAttrKey):
        return key.name
    if isinstance(key, SequenceKey):
        return str(key.idx)
    if isinstance(key, FlattenedIndexKey):
        return str(key.key)
    raise TypeError(f"cannot name the tree key {key!r}")


def path_name(path) -> str:
    """``(GetAttrKey('params'), DictKey('layers'), DictKey(0), DictKey('kernel'), GetAttrKey('value'))``
    -> ``'params/layers/0/kernel'`` (an NNX Variable's ``value`` attribute is not part of the name)."""
    names = [_key_name(k) for k in path]
    if names and isinstance(path[-1], GetAttrKey) and names[-1] == "value":
        names.pop()
    return "/".join(names)


def named_leaves(tree) -> dict[str, jax.Array]:
    """Every leaf of ``tree`` by its path name."""
    named = {}
    for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
        name = path_name(path)
        if name in named:
            raise ValueError(f"two leaves of the state share the name {name!r}")
        named[name] = leaf
    return named


def nest(named: dict[str, object]) -> dict:
    """``{'a/b': x, 'a/c': y}`` -> ``{'a': {'b': x, 'c': y}}``."""
    root: dict = {}
    for name, leaf in named.items():
        *parents, last = name.split("/")
        node = root
        for part in parents:
            node = node.setdefault(part, {})
        node[last] = leaf
    return root


def flatten(nested: dict, prefix: str = "") -> dict[str, object]:
    """The inverse of :func:`nest`."""
    flat = {}
    for key, value in nested.items():
        name = f"{prefix}/{key}" if prefix else str(key)
        if isinstance(value, dict):
            flat.update(flatten(value, name))
        else:
            flat[name] = value
    return flat


def manager(folder: str, *, keep: int):
    """The writer's Orbax manager of ``folder``: keeps the newest ``keep`` checkpoints, writes synchronously,
    and removes the temporary folders of writes a kill interrupted."""
    import orbax.checkpoint as ocp
    return ocp.CheckpointManager(
        os.path.abspath(folder), item_handlers=ocp.StandardCheckpointHandler(),
        options=ocp.CheckpointManagerOptions(max_to_keep=keep, enable_async_checkpointing=False,
                                             cleanup_tmp_directories=True))


def reader(folder: str):
    """A manager that only reads ``folder``: it creates nothing and leaves temporary folders alone, so
    loading a run while it trains cannot remove the checkpoint being written."""
    import orbax.checkpoint as ocp
    return ocp.CheckpointManager(
        os.path.abspath(folder), item_handlers=ocp.StandardCheckpointHandler(),
        options=ocp.CheckpointManagerOptions(create=False, cleanup_tmp_directories=False))


def save(mgr, step: int, state) -> None:
    """Write ``state`` as checkpoint ``step`` (a step already saved is left as it is: same step, same state).

    Replicated arrays are copied to the host first, one copy per array, and Orbax writes those: handed arrays
    replicated over several devices, Orbax splits each into a slice per device to write them in parallel
    (``use_replica_parallel``), which compiles a slicing program per array shape and device on the first save
    (ResNet-50's state on 4 CPU devices, ``benchmarks/checkpoint_save.py``: 5.0-5.2 s against 0.4-1.2 s from
    the host, later saves 1.2-1.6 s against 0.5-1.0 s); a training state replicated on every device is that
    case. Arrays split across devices are handed to Orbax as they are."""
    import orbax.checkpoint as ocp
    if step in mgr.all_steps():
        return
    on_host = {name: parallel.fetch(value) if _replicated(value) else value
               for name, value in named_leaves(state).items()}
    try:
        mgr.save(step, args=ocp.args.StandardSave(nest(on_host)), force=True)
        mgr.wait_until_finished()
    except Exception as err:  # Orbax reports a full disk as a ValueError from its writer threads
        if "No space left on device" in str(err) or "os_error_code='28'" in str(err):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(mgr.directory)) from None
        raise


def _replicated(value) -> bool:
    return isinstance(value, jax.Array) and value.sharding.is_fully_replicated


def stored(mgr, step: int) -> dict[str, tuple[tuple, np.dtype]]:
    """``{path name: (shape, dtype)}`` of checkpoint ``step``, read from its metadata (no arrays)."""
    tree = mgr.item_metadata(step).tree
    return {name: (tuple(m.shape), np.dtype(m.dtype)) for name, m in flatten(tree).items()}


def read(mgr, step: int | None = None) -> tuple[dict[str, np.ndarray], int | None]:
    """A checkpoint's arrays by path name, with no live model needed: ``({'params/...': array}, step)``.
    ``step`` defaults to the latest; ``({}, None)`` when the folder holds none."""
    import orbax.checkpoint as ocp
    step = mgr.latest_step() if step is None else step
    if step is None:
        return {}, None
    here = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
    target = {name: jax.ShapeDtypeStruct(shape, dtype, sharding=here) for name, (shape, dtype) in stored(mgr, step).items()}
    tree = mgr.restore(step, args=ocp.args.StandardRestore(nest(target)))
    return {name: np.asarray(value) for name, value in flatten(tree).items()}, step


def restore(mgr, template, step: int, *, where: str = "the checkpoint"):
    """``template``'s tree read from checkpoint ``step``, each array placed as ``template``'s leaf is (its
    sharding): any device count, any process count. A checkpoint of another model raises
    :class:`CheckpointMismatch` naming the paths, before any array is read."""
    import orbax.checkpoint as ocp
    paths, treedef = jax.tree_util.tree_flatten_with_path(template)
    want = {path_name(p): leaf for p, leaf in paths}
    _check_fits(want, stored(mgr, step), where)
    target = {name: jax.ShapeDtypeStruct(leaf.shape, leaf.dtype, sharding=leaf.sharding) for name, leaf in want.items()}
    tree = flatten(mgr.restore(step, args=ocp.args.StandardRestore(nest(target))))
    return jax.tree.unflatten(treedef, [tree[name] for name in want])


def _check_fits(want: dict, have: dict[str, tuple], where: str) -> None:
    missing = [n for n in want if n not in have]
    extra = [n for n in have if n not in want]
    if missing or extra:
        parts = []
        if missing:
            parts.append(f"it lacks {_few(missing)}")
        if extra:
            parts.append(f"it has {_few(extra)}, which this model does not")
        raise CheckpointMismatch(f"{where} belongs to a different model or optimizer: {'; '.join(parts)}")
    for name, leaf in want.items():
        shape, dtype = have[name]
        if tuple(shape) != tuple(leaf.shape) or np.dtype(dtype) != np.dtype(leaf.dtype):
            raise CheckpointMismatch(f"{where} holds {name} as {np.dtype(dtype)}{list(shape)}, this model wants "
                                     f"{np.dtype(leaf.dtype)}{list(leaf.shape)}")


def restore_into(template, named: dict[str, np.ndarray], *, where: str = "the checkpoint"):
    """``template``'s tree with every leaf taken from ``named`` by path name; the shapes and dtypes must match.

    Missing names, extra names and shape or dtype changes raise :class:`CheckpointMismatch` naming them."""
    paths, treedef = jax.tree_util.tree_flatten_with_path(template)
    want = {path_name(p): leaf for p, leaf in paths}
    _check_fits(want, {n: (v.shape, v.dtype) for n, v in named.items()}, where)
    return jax.tree.unflatten(treedef, [jnp.asarray(named[name]) for name in want])


def _few(names, k: int = 3) -> str:
    shown = ", ".join(names[:k])
    return shown + (f" and {len(names) - k} more" if len(names) > k else "")
