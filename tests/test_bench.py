"""The benchmark harness's logic on tiny configurations: fields, FLOP counts against a hand count, MFU, the
files it writes, and PyTorch's absence. No timing is ever asserted."""
import csv
import json
import sys

import jax
import pytest
from flax import nnx

from jaxconv import bench
from jaxconv import functional as F
from jaxconv import layers as L
from jaxconv import onednn
from jaxconv.cli import main
from jaxconv.models import Builder

GIVEN_PEAK = (1e12, "given")


def one_conv():
    """8x8x1 -> 3x3 conv, 4 channels, VALID -> 6x6x4: per example 144 outputs x 9 taps = 1,296 multiply-adds
    (2,592 FLOPs) plus 144 bias adds = 2,736 FLOPs."""
    return Builder((8, 8, 1)).conv(4, (3, 3)).build("one_conv")


def test_flops_agree_with_a_hand_count_and_with_xla(monkeypatch):
    # XLA's convolution counts multiply-adds as the hand count does; on a CPU a conv with one input channel is a
    # sum of its taps, where XLA counts 17 FLOPs an output (the first tap has no add) and the bias add
    monkeypatch.setattr(F, "TAP_SUM_MAX", 0)
    inference = bench.measure(one_conv(), batch=2, mode="inference", steps=2, peak=GIVEN_PEAK)
    assert inference["flops_model"] == 2 * 2736
    assert inference["flops_xla"] == pytest.approx(2 * 2736, rel=0.05)
    train = bench.measure(one_conv(), batch=2, mode="train", steps=2, peak=GIVEN_PEAK)
    # forward and weight gradient: no step computes the gradient of the data (shapes.training_flops)
    assert train["flops_model"] == 2 * 2 * 2736
    # XLA's count of the traced step, with the loss (a softmax per output position) and the optimizer
    assert train["flops_model"] < train["flops_xla"] < train["flops_model"] * 1.5
    # the compiled program's count, beside it: where oneDNN runs the conv (a custom call), XLA does not see its work
    if onednn.available():
        assert inference["flops_xla_compiled"] < 0.1 * 2 * 2736
    else:
        assert inference["flops_xla_compiled"] == pytest.approx(2 * 2736, rel=0.05)
    # where a backend has no analysis of a lowered program (GPUs), the step lowered for a CPU device counts
    assert bench.cpu_traced_flops(one_conv(), 2, "inference", "float32") == pytest.approx(2 * 2736, rel=0.05)
    assert bench.cpu_traced_flops(one_conv(), 2, "train", "float32") == train["flops_xla"]


def test_without_an_analysis_of_the_lowered_step_the_step_lowered_for_a_cpu_counts(monkeypatch):
    """GPU backends give no cost analysis of a lowered program: the bench then lowers the same step for a CPU
    device, before its timed steps donate (delete) the model's arrays."""
    from jax.stages import Lowered
    real, calls = Lowered.cost_analysis, []

    def none_first(self):
        calls.append(self)
        return None if len(calls) == 1 else real(self)
    monkeypatch.setattr(Lowered, "cost_analysis", none_first)
    row = bench.measure(one_conv(), batch=2, mode="train", steps=2, peak=GIVEN_PEAK)
    assert len(calls) == 2
    assert row["flops_xla"] == bench.cpu_traced_flops(one_conv(), 2, "train", "float32") > row["flops_model"] * 0.5


def test_every_field_is_consistent():
    row = bench.measure("mnist1d_cnn", batch=8, mode="train", steps=3, peak=GIVEN_PEAK)
    assert (row["model"], row["mode"], row["batch"], row["dtype"], row["grad"], row["devices"]) == (
        "mnist1d_cnn", "train", 8, "float32", "auto", 1)
    assert row["steps"] == 3 and row["step_q25_s"] <= row["step_s"] <= row["step_q75_s"]
    assert row["images_per_s"] == pytest.approx(8 / row["step_s"])
    assert row["images_per_s_per_device"] == row["images_per_s"]
    assert row["achieved_flops_per_s"] == pytest.approx(row["flops_model"] / row["step_s"])
    assert row["mfu"] == pytest.approx(row["achieved_flops_per_s"] / 1e12)
    assert (row["peak_flops_per_s"], row["peak_source"]) == (1e12, "given")
    assert row["compile_s"] > 0 and row["first_call_s"] > 0 and row["memory_bytes"] > 0
    assert row["flops_ratio"] == pytest.approx(row["flops_xla"] / row["flops_model"])


def test_peaks_come_from_the_table_or_a_measured_matmul():
    assert bench.table_peak("NVIDIA H100 80GB HBM3", "bfloat16") == (989e12, "bfloat16")
    assert bench.table_peak("TPU v5 lite", "bfloat16") == (197e12, "bfloat16")
    assert bench.table_peak("TPU v5p", "bfloat16") == (459e12, "bfloat16")
    assert bench.table_peak("cpu", "float32") is None
    peak, source = bench._peak("cpu", "float32")
    assert peak > 1e9 and source.startswith("measured: float32 2048x2048 matmul")


def test_float32_peaks_follow_the_matmul_precision_in_force():
    """JAX's default precision runs float32 convolutions on TF32 tensor cores (NVIDIA) or bfloat16 passes
    (TPU); "highest" keeps them in float32, which a TPU has no listed rate for."""
    assert bench.table_peak("NVIDIA A100-SXM4-40GB", "float32") == (156e12, "tf32")
    assert bench.table_peak("NVIDIA H200", "float32", "default") == (494.5e12, "tf32")
    assert bench.table_peak("NVIDIA H200", "float32", "tensorfloat32") == (494.5e12, "tf32")
    assert bench.table_peak("NVIDIA A100-SXM4-40GB", "float32", "highest") == (19.5e12, "float32")
    assert bench.table_peak("NVIDIA H200", "float32", "float32") == (67e12, "float32")
    assert bench.table_peak("TPU v4", "float32") == (275e12, "bfloat16")
    assert bench.table_peak("TPU v4", "float32", "highest") is None
    assert bench.table_peak("NVIDIA H200", "bfloat16", "highest") == (989e12, "bfloat16")
    with jax.default_matmul_precision("highest"):
        assert bench._peak("NVIDIA H200", "float32") == (67e12, "table: NVIDIA H200 float32")
    assert bench._peak("NVIDIA H200", "float32") == (
        494.5e12, "table: NVIDIA H200 tf32, the unit JAX's default precision uses for float32 here")


def test_without_torch_the_comparison_is_skipped_with_a_reason(monkeypatch):
    monkeypatch.setitem(sys.modules, "torch", None)  # `import torch` raises ImportError
    row = bench.measure("mnist1d_cnn", batch=4, mode="inference", steps=2, compare_torch=True, peak=GIVEN_PEAK)
    assert "torch_step_s" not in row
    assert row["torch_error"].endswith("install torch==2.13.0 to compare")


def test_the_plain_flax_program_is_timed_beside_it():
    row = bench.measure("mnist1d_cnn", batch=4, mode="train", steps=2, compare_flax=True, peak=GIVEN_PEAK)
    assert row["flax_step_s"] > 0 and row["flax_first_call_s"] > 0
    assert row["speed_vs_flax"] == pytest.approx(row["flax_step_s"] / row["step_s"])
    assert 0 < row["speed_vs_flax_q25"] <= row["speed_vs_flax_q75"]  # the call-by-call ratios' quartiles
    grouped = Builder((8, 8, 4)).add(L.ConvTranspose2d(4, 4, 3, groups=2, rngs=nnx.Rngs(0))).build("grouped")
    row = bench.measure(grouped, batch=2, mode="inference", steps=2, compare_flax=True, peak=GIVEN_PEAK)
    assert "flax_step_s" not in row and "has no groups" in row["flax_error"]


def test_the_command_writes_table_json_csv_and_plot(tmp_path, capsys):
    paths = {k: tmp_path / f"b.{k}" for k in ("jsonl", "csv", "png")}
    assert main(["bench", "--model", "mnist1d_cnn", "--batch-size", "4,8", "--mode", "inference", "--steps", "2",
                 "--json", str(paths["jsonl"]), "--csv", str(paths["csv"]), "--plot", str(paths["png"])]) == 0
    out = capsys.readouterr().out
    assert "mnist1d_cnn  inference  4" in out and "mnist1d_cnn  inference  8" in out
    assert "multiply-add = 2 in both columns" in out
    rows = [json.loads(line) for line in open(paths["jsonl"])]
    assert [r["batch"] for r in rows] == [4, 8]
    assert rows[0]["environment"]["jax"] and rows[0]["environment"]["device_count"] == 1
    table = list(csv.DictReader(open(paths["csv"])))
    assert [int(r["batch"]) for r in table] == [4, 8] and "env_jax" in table[0]
    assert paths["png"].stat().st_size > 1000


def test_bad_lists_are_one_line(capsys):
    assert main(["bench", "--model", "mnist1d_cnn,nope"]) == 2
    assert "jaxconv bench: error: --model: unknown 'nope'; choose from mnist1d_cnn" in capsys.readouterr().err
    assert main(["bench", "--model", "mnist1d_cnn", "--batch-size", "8,0"]) == 2
    assert capsys.readouterr().err == "jaxconv bench: error: --batch-size: '0' is not a count >= 1\n"


def test_devices_split_the_batch_and_the_flax_program_stays_on_one(tmp_path):
    """Two simulated devices in a process of its own: a row per device count, per-device throughput halved."""
    import os
    import subprocess
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    env["JAX_NUM_CPU_DEVICES"] = "2"
    out = tmp_path / "b.jsonl"
    done = subprocess.run([sys.executable, "-m", "jaxconv", "bench", "--model", "mnist1d_cnn", "--batch-size", "8",
                           "--devices", "1,2", "--steps", "2", "--compare", "flax", "--json", str(out)],
                          env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    rows = [json.loads(line) for line in open(out)]
    assert [r["devices"] for r in rows] == [1, 2]
    assert rows[1]["images_per_s_per_device"] == pytest.approx(rows[1]["images_per_s"] / 2)
    assert rows[1]["peak_flops_per_s"] == pytest.approx(2 * rows[0]["peak_flops_per_s"])
    assert rows[0]["flax_step_s"] > 0 and "compare it with --devices 1" in rows[1]["flax_error"]
    assert rows[0]["environment"]["device_count"] == 2


def test_the_table_shows_a_speed_up_with_its_spread_over_the_rounds():
    row = dict(model="m", mode="train", batch=8, dtype="float32", grad="auto", devices=1, step_s=0.01,
               torch_step_s=0.0104, speed_vs_torch=1.04, speed_vs_torch_q25=0.95, speed_vs_torch_q75=1.13)
    header, _, line = bench.format_table([row]).splitlines()
    assert header.split()[-5:] == ["torch", "ms", "vs", "torch", "rounds"]
    assert line.split()[-3:] == ["10.40", "1.04x", "0.95-1.13"]
