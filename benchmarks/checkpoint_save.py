"""Saving a training state replicated on several devices: handed to Orbax as device arrays against
`jaxconv.checkpoints.save`, which hands it replicated arrays as one host copy each.

    JAX_NUM_CPU_DEVICES=4 python benchmarks/checkpoint_save.py [--model resnet50] [--devices 4] [--saves 3]

Orbax slices each array replicated over several devices into one slice per device, to write the slices in
parallel (`use_replica_parallel`), compiling a slicing program per array shape and device: the first save
pays for those compiles. The state is the model's and an SGD-with-momentum optimizer state, replicated over
`--devices` devices; each save goes to a fresh step of a fresh folder under a temporary directory. The device
arrays are saved first, so neither way finds the other's programs compiled.
"""
import argparse
import tempfile
import time

import jax
import optax
from flax import nnx

from jaxconv import checkpoints as ckpt
from jaxconv import parallel
from jaxconv.models import create_model


def seconds_per_save(mgr, state, saves, save):
    times = []
    for step in range(saves):
        start = time.perf_counter()
        save(mgr, step, state)
        times.append(time.perf_counter() - start)
    return times


def orbax_device_arrays(mgr, step, state):
    """What jaxconv did before: the state's device arrays straight to Orbax."""
    import orbax.checkpoint as ocp
    mgr.save(step, args=ocp.args.StandardSave(ckpt.nest(ckpt.named_leaves(state))), force=True)
    mgr.wait_until_finished()


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="resnet50")
    parser.add_argument("--devices", type=int, default=4)
    parser.add_argument("--saves", type=int, default=3)
    args = parser.parse_args()
    mesh = parallel.make_mesh(args.devices)
    model = create_model(args.model)
    state = {"model": nnx.state(model), "opt": optax.sgd(0.1, momentum=0.9).init(nnx.state(model, nnx.Param))}
    state = jax.device_put(state, parallel.replicated(mesh))
    size = sum(leaf.nbytes for leaf in jax.tree.leaves(state))
    print(f"{args.model}: {size / 2 ** 20:.1f} MiB of state replicated on {args.devices} "
          f"{jax.devices()[0].platform} device(s); seconds per save, first save first")
    with tempfile.TemporaryDirectory() as folder:
        for name, save in (("device arrays to Orbax", orbax_device_arrays), ("checkpoints.save", ckpt.save)):
            mgr = ckpt.manager(f"{folder}/{name.split()[0]}", keep=args.saves)
            times = seconds_per_save(mgr, state, args.saves, save)
            print(f"{name:24s} " + " ".join(f"{t:6.2f}" for t in times))
