"""Runs for ``tests/test_parallel.py`` in a process of its own, started with ``JAX_NUM_CPU_DEVICES=4`` (JAX
reads it once, at start): ``python -m tests.parallel_runs MODE OUT`` prints one JSON line of histories."""
from __future__ import annotations

import json
import os
import signal
import sys

from jaxconv.data import Dataset, Split, load_dataset
from jaxconv.train import Stopped, TrainConfig, fit


def subset(n_train: int, n_test: int) -> Dataset:
    data = load_dataset("mnist1d")
    return Dataset(data.name, Split(data.train.images[:n_train], data.train.labels[:n_train]),
                   Split(data.test.images[:n_test], data.test.labels[:n_test]), data.source)


def stop_after_first_epoch(line: str) -> None:
    """A log that sends this process SIGINT when epoch 1 ends: the run checkpoints and stops (a preemption)."""
    if line.startswith("epoch   1/"):
        os.kill(os.getpid(), signal.SIGINT)


def devices(out: str, n_train: int = 600, n_test: int = 200) -> dict:
    """The same 3-epoch run on 1 and on 4 devices: a plain CNN in float32; a BatchNorm CNN in float64 (its float32
    training amplifies rounding differences: see tests/test_parallel.py)."""
    import jax
    data = subset(n_train, n_test)
    result = {}
    for model, dtype in (("mnist1d_cnn", "float32"), ("mnist1d_deep", "float64")):
        jax.config.update("jax_enable_x64", dtype == "float64")
        for n in (1, 4):
            config = TrainConfig(model=model, epochs=3, devices=n, dtype=dtype, out=f"{out}/{model}_{dtype}_{n}")
            result[f"{model}/{dtype}/{n}"] = fit(config, dataset=data, log=lambda *a: None)
    jax.config.update("jax_enable_x64", False)
    for n in (1, 4):  # many seeds compose with devices: each replica's batch split across them
        result[f"seeds/{n}"] = fit(TrainConfig(epochs=2, seeds=2, devices=n, out=f"{out}/seeds_{n}"), dataset=data,
                                   log=lambda *a: None)
    return result


def programs_made_while_saving() -> list:
    """From now on, count the programs JAX lowers (compiled or found in a cache) while :func:`checkpoints.save`
    runs: one entry per program."""
    import jax

    from jaxconv import checkpoints
    made, saving = [], []

    def listen(event, duration, **kwargs):
        if saving and event == "/jax/core/compile/jaxpr_to_mlir_module_duration":
            made.append(event)
    jax.monitoring.register_event_duration_secs_listener(listen)
    save = checkpoints.save

    def counted(*args, **kwargs):
        saving.append(True)
        try:
            return save(*args, **kwargs)
        finally:
            saving.pop()
    checkpoints.save = counted
    return made


def portable(out: str) -> dict:
    """A run stopped after epoch 1 on ``a`` devices and resumed on ``b``, against one never stopped; and how
    many programs saving the checkpoints of a state replicated on 4 devices made."""
    data = subset(600, 200)
    made = programs_made_while_saving()
    result = {"whole": fit(TrainConfig(epochs=2, devices=4, out=f"{out}/whole"), dataset=data, log=lambda *a: None)}
    result["programs_made_while_saving"] = len(made)
    for a, b in ((4, 1), (1, 4)):
        config = TrainConfig(epochs=2, devices=a, out=f"{out}/{a}to{b}")
        try:
            fit(config, dataset=data, log=stop_after_first_epoch)
            raise AssertionError("the run was not stopped")
        except Stopped:
            pass
        config.devices = b
        result[f"{a}to{b}"] = fit(config, dataset=data, resume=True, log=lambda *a: None)
    return result


def bad_batch(out: str) -> dict:
    """A batch of 30 on 4 devices: refused when --devices 4 is asked for; the default takes the 3 it divides by."""
    result = {"error": None}
    try:
        fit(TrainConfig(epochs=1, batch_size=30, devices=4, out=out), dataset=subset(300, 50), log=lambda *a: None)
    except ValueError as err:
        result["error"] = str(err)
    lines = []
    history = fit(TrainConfig(epochs=1, batch_size=30, out=f"{out}_all"), dataset=subset(300, 50), log=lines.append)
    return {**result, "default_devices": history[0]["devices"], "opening": lines[0]}


if __name__ == "__main__":
    mode, out = sys.argv[1], sys.argv[2]
    print(json.dumps({"devices": devices, "portable": portable, "bad_batch": bad_batch}[mode](out)))
