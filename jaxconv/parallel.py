"""Where a run computes: a 1-D mesh over the data axis, on one device, every device of a host, or many hosts.

jaxconv never assumes one device or one process. A run's parameters, optimizer state and whole dataset are
replicated on every device of the mesh; each global batch is split across the devices along the ``data``
axis inside one jitted step (each device gathers its share of the batch from its own copy of the data),
and XLA inserts the gradient all-reduce. Batch statistics (BatchNorm) are therefore computed over the
global batch, exactly as on one device.

Across hosts, :func:`initialize` calls ``jax.distributed.initialize`` (with CPU collectives over gloo on
CPU hosts) before anything else touches JAX; every process then puts its own copy of the data on its own
devices (``jax.make_array_from_process_local_data``), and all of them run the same program. Only process 0
writes the run folder's files; checkpoints go through Orbax, which every process joins.
"""
from __future__ import annotations

import functools
import os
import sys
import time

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from jaxconv.heartbeat import Heartbeat

AXIS = "data"


def initialize(coordinator: str, num_processes: int, process_id: int, *, silence_s: float = 10.0) -> None:
    """Join a multi-process run: ``jax.distributed.initialize``, gloo collectives on CPU, and a watchdog that
    stops this process with one line naming a peer silent for ``silence_s`` seconds (:mod:`jaxconv.heartbeat`,
    through the coordinator's host at the coordinator's port + 1).

    JAX's own heartbeat (set to ``6 * silence_s``; it declares a task dead after about 60 % of that) stays as
    the backstop: it aborts with a native stack trace, so the watchdog must speak first. When process 0 is
    lost, the coordination service it hosts goes with it, and JAX's client ends the other processes at once
    with its own message ("the leader task was preempted/died"); that abort cannot be answered from Python."""
    if num_processes < 1 or not 0 <= process_id < num_processes:
        raise ValueError(f"--process-id must be in [0, {num_processes}) for --num-processes {num_processes}, "
                         f"got {process_id}")
    if ":" not in coordinator:
        raise ValueError(f"--coordinator must be HOST:PORT, got {coordinator!r}")
    jax.config.update("jax_cpu_collectives_implementation", "gloo")  # only CPU reads it; GPUs/TPUs have their own
    jax.distributed.initialize(coordinator, num_processes, process_id,
                               heartbeat_timeout_seconds=int(6 * silence_s), initialization_timeout=120)
    if num_processes > 1:
        host, port = coordinator.rsplit(":", 1)
        _WATCHDOG.append(Heartbeat(process_id, num_processes, host.strip("[]"), int(port) + 1, silence_s,
                                   functools.partial(_lost, process_id, num_processes)))
        _WATCHDOG[-1].start()


_WATCHDOG: list = []


def shutdown() -> None:
    """Leave a multi-process run cleanly: wait for every peer, stop the watchdog, disconnect."""
    if jax.process_count() > 1:
        sync("shutdown")
        for dog in _WATCHDOG:
            dog.stop()
        jax.distributed.shutdown()


def failed_collective(err: BaseException) -> str | None:
    """For an error of a multi-process run that a lost peer explains (a collective's connection closed): give the
    watchdog the time to name the lost process (it ends this process), else one line for the CLI. Else ``None``."""
    if not _WATCHDOG or not isinstance(err, jax.errors.JaxRuntimeError):
        return None
    deadline = time.monotonic() + _WATCHDOG[0].limit + 3
    while time.monotonic() < deadline:  # the watchdog's _lost() exits the process from its own thread
        time.sleep(0.5)
    first = str(err).strip().splitlines()[0][:200]
    return (f"a collective operation with the other processes failed ({first}); restart every process with "
            f"--resume to continue from the last checkpoint")


def leave_now(status: int) -> None:
    """End a multi-process run's process at once: JAX's exit handler would wait at a shutdown barrier that the
    lost peer never reaches, and then abort with a native stack trace."""
    if _WATCHDOG:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(status)


def _lost(me: int, count: int, peer: int, why: str) -> None:
    sys.stderr.write(f"jaxconv: process {me} of {count}: lost process {peer} ({why}); stopping. Restart every "
                     f"process with --resume to continue from the last checkpoint.\n")
    sys.stderr.flush()
    os._exit(1)


def select_devices(devices: str | int) -> list:
    """The mesh's devices: ``"all"`` (every device of every process), or ``N`` per process (the first N of
    each process's local devices; N must divide the batch, see :func:`check_batch`)."""
    if devices == "all":
        return list(jax.devices())
    n = int(devices)
    local = jax.local_device_count()
    if not 1 <= n <= local:
        raise ValueError(f"--devices {n}: this process has {local} {jax.default_backend()} device(s)"
                         + ("; on a CPU host set JAX_NUM_CPU_DEVICES before starting for more" if
                            jax.default_backend() == "cpu" else ""))
    by_process: dict[int, list] = {}
    for d in jax.devices():
        by_process.setdefault(d.process_index, []).append(d)
    return [d for p in sorted(by_process) for d in by_process[p][:n]]


def make_mesh(devices: str | int = "all", *, batch: int | None = None) -> Mesh:
    """A 1-D mesh named ``data`` over :func:`select_devices`. With ``devices="all"`` and a ``batch``, the most
    devices per process that the batch divides by (8 GPUs and the MNIST-1D recipe's batch of 100 train on 4):
    the default adapts where an explicit count is held to (:func:`check_batch`)."""
    if devices == "all" and batch is not None:
        processes = jax.process_count()
        fitting = [k for k in range(jax.local_device_count(), 0, -1) if batch % (k * processes) == 0]
        devices = fitting[0] if fitting else "all"
    chosen = select_devices(devices)
    # Auto axes: jit's sharding propagation places everything but the batch split, which each step states.
    return jax.make_mesh((len(chosen),), (AXIS,), devices=chosen, axis_types=(jax.sharding.AxisType.Auto,))


def check_batch(batch: int, mesh: Mesh, flag: str = "--batch-size") -> None:
    n = mesh.size
    if batch % n:
        lower, upper = batch - batch % n, batch + n - batch % n
        raise ValueError(f"{flag} {batch} is the global batch and must divide by the {n} devices it is split "
                         f"across; try {lower or upper} or {upper}")


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P())


def split(mesh: Mesh) -> NamedSharding:
    """Leading axis split over the devices."""
    return NamedSharding(mesh, P(AXIS))


def put(mesh: Mesh, array) -> jax.Array:
    """This process's full copy of ``array`` on each of its devices of the mesh (one global, replicated array)."""
    return jax.make_array_from_process_local_data(replicated(mesh), np.asarray(array))


def fetch(array) -> np.ndarray:
    """A replicated (or single-device) array's value on the host, in any process."""
    if isinstance(array, jax.Array) and not array.is_fully_addressable:
        return np.asarray(array.addressable_data(0))
    return np.asarray(array)


def is_writer() -> bool:
    """Only process 0 writes a run's files."""
    return jax.process_index() == 0


def sync(name: str) -> None:
    """Every process waits here for the others (nothing with one process)."""
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils
        multihost_utils.sync_global_devices(f"jaxconv:{name}")


def one_step_in_flight(mesh: Mesh) -> bool:
    """Whether a program on ``mesh`` must finish before the next is dispatched: on a mesh of several CPU devices.
    There, programs dispatched ahead deadlock XLA's CPU client now and then under load: a launch of the next
    program, blocked on its device's in-flight limit, holds one of the client's few pool threads, and another
    device's share of the current program's all-reduce then never starts. Seen both ways on this project's
    2-core CI: 2 processes x 2 devices waiting in a gloo all-reduce for good, and 1 process x 4 devices aborted
    by XLA ("Expected 4 threads to join the rendezvous, but only 2 of them arrived"). GPUs and TPUs keep their
    streams ahead of the host."""
    return mesh.size > 1 and any(d.platform == "cpu" for d in mesh.devices.flat)


def device_kinds(mesh: Mesh) -> list[str]:
    return sorted({d.device_kind for d in mesh.devices.flat})


def describe(mesh: Mesh) -> str:
    hosts = jax.process_count()
    return (f"{mesh.size} {'/'.join(device_kinds(mesh))} device(s)" + (f" in {hosts} processes" if hosts > 1 else ""))
