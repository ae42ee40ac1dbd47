"""Scale-out evidence on one CPU host: simulated devices (JAX_NUM_CPU_DEVICES) and real processes (jax.distributed
over gloo on 127.0.0.1), with the default MNIST-1D job.

    python experiments/scale_out.py

1. The same 3-epoch run on 1 and on 4 devices: mnist1d_cnn (float32), mnist1d_deep (BatchNorm; float32 and
   float64) - the worst relative difference of the per-epoch losses, and the test accuracies.
2. 2 processes x 2 devices against 1 process x 4 devices (`jaxconv train --coordinator ...`), 3 epochs.
3. A lost peer: process 1 of 2 killed (SIGKILL) after 2 epochs; what process 0 printed and how long it took;
   then both restarted with --resume.
4. Checkpoints across device counts: 2 epochs on 4 devices resumed for a third on 1 (and 1 -> 4), against
   the same on one device count throughout.

Writes runs/experiments/scale_out.md. Cost: about 4 minutes on 2 CPU cores.
"""
from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import tempfile
import time

OUT = os.path.join("runs", "experiments")
LOSSES = ("train_loss", "test_loss")


def env_with(devices: int, **extra) -> dict:
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    env.update(JAX_NUM_CPU_DEVICES=str(devices), **extra)
    return env


def train(out, args, *, devices=4, processes=1, wait=True):
    port = free_port()
    procs = []
    for i in range(processes):
        dist = ["--coordinator", f"127.0.0.1:{port}", "--num-processes", str(processes),
                "--process-id", str(i)] if processes > 1 else []
        procs.append(subprocess.Popen([sys.executable, "-m", "jaxconv", "train", "--out", out, *args, *dist],
                                      env=env_with(devices), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                      text=True))
    if not wait:
        return procs
    results = [p.communicate(timeout=600) for p in procs]
    if any(p.returncode for p in procs):
        raise SystemExit(f"jaxconv train {' '.join(args)} failed:\n" + "\n".join(
            f"process {i} (exit {p.returncode}): {err[-2000:]}" for i, (p, (_, err)) in enumerate(zip(procs, results))))
    return results


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def metrics(out) -> list[dict]:
    with open(os.path.join(out, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


def worst(a, b) -> float:
    return max(abs(x[k] - y[k]) / abs(x[k]) for x, y in zip(a, b) for k in LOSSES)


def accuracies(history) -> str:
    return ", ".join(f"{h['test_accuracy']:.3f}" for h in history)


def devices_worker(tmp):
    """In a process started with 4 simulated devices: the runs of part 1 (float64 needs the Python API)."""
    import jax
    from jaxconv.train import TrainConfig, fit
    result = {}
    for model, dtype in (("mnist1d_cnn", "float32"), ("mnist1d_deep", "float32"), ("mnist1d_deep", "float64")):
        jax.config.update("jax_enable_x64", dtype == "float64")
        for n in (1, 4):
            config = TrainConfig(model=model, epochs=3, devices=n, dtype=dtype, out=f"{tmp}/{model}_{dtype}_{n}")
            result[f"{model} {dtype} {n}"] = fit(config, log=lambda *a: None)
    print(json.dumps(result))


def main():
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        # 1. one device against four
        done = subprocess.run([sys.executable, __file__, "--devices-worker", tmp], env=env_with(4),
                              capture_output=True, text=True, timeout=1200)
        if done.returncode:
            raise SystemExit(done.stderr[-3000:])
        runs = json.loads(done.stdout.strip().splitlines()[-1])
        rows.append("| comparison | worst relative loss difference (3 epochs) | test accuracy per epoch |")
        rows.append("|---|---:|---|")
        for key in ("mnist1d_cnn float32", "mnist1d_deep float32", "mnist1d_deep float64"):
            one, four = runs[f"{key} 1"], runs[f"{key} 4"]
            rows.append(f"| {key}: 1 device vs 4 | {worst(one, four):.2e} | {accuracies(one)} vs {accuracies(four)} |")

        # 2. two processes against one
        train(f"{tmp}/one", ["--epochs", "3"], devices=4)
        results = train(f"{tmp}/two", ["--epochs", "3"], devices=2, processes=2)
        one, two = metrics(f"{tmp}/one"), metrics(f"{tmp}/two")
        rows.append(f"| mnist1d_cnn: 2 processes x 2 devices vs 1 x 4 | {worst(one, two):.2e} | "
                    f"{accuracies(two)} vs {accuracies(one)} |")
        printed_by_1 = sum(1 for line in results[1][0].splitlines() if line.startswith("epoch"))

        # 4. checkpoints across device counts: 2 epochs on A devices, then a third on B
        for a, b in ((4, 1), (1, 4)):
            train(f"{tmp}/moved{a}{b}", ["--epochs", "2", "--devices", str(a)])
            train(f"{tmp}/moved{a}{b}", ["--epochs", "3", "--resume", "--devices", str(b)])
            train(f"{tmp}/stay{a}{b}", ["--epochs", "2", "--devices", str(b)])
            train(f"{tmp}/stay{a}{b}", ["--epochs", "3", "--resume", "--devices", str(b)])
            moved, stay = metrics(f"{tmp}/moved{a}{b}"), metrics(f"{tmp}/stay{a}{b}")
            rows.append(f"| checkpoint at epoch 2 on {a} device(s), epoch 3 on {b}, vs all on {b} | "
                        f"{worst(stay, moved):.2e} | {accuracies(moved)} vs {accuracies(stay)} |")

        # 3. a lost peer
        out = f"{tmp}/fault"
        procs = train(out, ["--epochs", "100"], devices=2, processes=2, wait=False)
        while not (os.path.exists(f"{out}/metrics.jsonl") and len(metrics(out)) >= 2):
            time.sleep(0.2)
        procs[1].kill()
        killed = time.monotonic()
        _, err = procs[0].communicate(timeout=300)
        took = time.monotonic() - killed
        procs[1].communicate()
        last_line = err.strip().splitlines()[-1]
        saved = max(int(n) for n in os.listdir(f"{out}/checkpoints") if n.isdigit())
        epochs = len(metrics(out)) + 1
        restarted = train(out, ["--resume", "--epochs", str(epochs)], devices=2, processes=2)
        resumed_line = next(line for line in restarted[0][0].splitlines() if line.startswith("resuming"))

    text = "\n".join([
        "Scale-out on one CPU host (2 cores; simulated devices, real processes over gloo on 127.0.0.1); the default "
        "MNIST-1D job (4,000 train / 1,000 test, batch 100), 3 epochs.", "", *rows, "",
        f"Process 1 of a 2-process run printed {printed_by_1} epoch lines (only process 0 reports).", "",
        f"Lost peer: process 1 killed (SIGKILL) after epoch 2; process 0 exited {took:.1f} s later with status "
        f"{procs[0].returncode}, printing:", "", f"    {last_line}", "",
        f"Both restarted with --resume --epochs {epochs}: `{resumed_line}` (the last checkpoint was step {saved}); "
        f"the run finished with {epochs} epochs of metrics.", ""])
    os.makedirs(OUT, exist_ok=True)
    with open(os.path.join(OUT, "scale_out.md"), "w") as f:
        f.write(text)
    print(text)


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "--devices-worker":
        devices_worker(sys.argv[2])
    else:
        main()
