"""The command line: the main job, summary, gradcheck, eval, and one-line errors with exit status 2."""
import os
import subprocess
import sys

import numpy as np
import pytest

from jaxconv.cli import main


def run_cli(*args, env=None):
    return subprocess.run([sys.executable, "-m", "jaxconv", *args], capture_output=True, text=True, timeout=600,
                          env={**os.environ, **(env or {})})


def test_bare_train_defaults_and_eval(tmp_path):
    # The README's main job with fewer epochs: MNIST-1D, mnist1d_cnn, no download.
    done = run_cli("train", "--epochs", "2", "--out", str(tmp_path / "run"))
    assert done.returncode == 0, done.stderr
    assert "mnist1d" in done.stdout and "mnist1d_cnn" in done.stdout and "epoch   2/2" in done.stdout
    assert "confusion matrix" in done.stdout
    for name in ("metrics.jsonl", "curves.png", "config.json", "checkpoints", "results.json"):
        assert (tmp_path / "run" / name).exists()
    evaluated = run_cli("eval", "--out", str(tmp_path / "run"))
    assert evaluated.returncode == 0, evaluated.stderr
    assert "latest checkpoint: step 80, epoch 2" in evaluated.stdout
    import json
    final = json.load(open(tmp_path / "run" / "results.json"))["latest"]  # the run's own end-of-run evaluation
    assert f"test loss {final['test_loss']:.4f} accuracy {final['test_accuracy']:.4f}" in evaluated.stdout


@pytest.mark.parametrize("argv, message", [
    (["train", "--model", "resnet9000"], "argument --model: invalid choice: 'resnet9000'"),
    (["train", "--dataset", "svhn"], "argument --dataset: invalid choice: 'svhn'"),
    (["train", "--epochs", "-3"], "--epochs must be >= 0, got -3"),
    (["train", "--dataset", "mnist1d", "--model", "lenet5"],
     "create_model: lenet5 takes 2-D inputs like (28, 28, 1), got input shape (40, 1)"),
    (["train", "--dataset", "mnist", "--data-dir", "/no/such/dir"], "--data-dir /no/such/dir does not exist"),
    (["train", "--lr", "abc"], "argument --lr: invalid float value: 'abc'"),
    (["summary"], "the following arguments are required: --model"),
])
def test_bad_flags_one_line_exit_2(tmp_path, capsys, argv, message):
    if argv[0] == "train":
        argv = argv + ["--out", str(tmp_path / "r")]
    with pytest.raises(SystemExit) as exit_info:
        code = main(argv)
        raise SystemExit(code)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert message in err
    assert len(err.strip().splitlines()) == 1, err


def test_missing_dataset_files_exit_2_fast(tmp_path):
    done = run_cli("train", "--dataset", "cifar10", "--out", str(tmp_path / "r"),
                   env={"JAXCONV_DATA": str(tmp_path / "empty"), "HOME": str(tmp_path)})
    assert done.returncode == 2
    assert "no cifar10 data on this machine" in done.stderr and len(done.stderr.strip().splitlines()) == 1


def test_summary_prints_the_table(capsys):
    assert main(["summary", "--model", "lenet5"]) == 0
    out = capsys.readouterr().out
    assert "total params: 61,706" in out and "receptive field" in out
    assert main(["summary", "--model", "seed_cnn", "--dataset", "cifar10"]) == 0
    assert "input (32, 32, 3)" in capsys.readouterr().out
    assert main(["summary", "--model", "resnet20", "--depth", "1"]) == 0
    out = capsys.readouterr().out
    assert "3: Residual" in out and "  body: Sequential" in out and "    0: Conv" not in out
    assert "total params: 272,474" in out


def test_gradcheck_passes_and_reports_the_ratio():
    done = run_cli("gradcheck", "--model", "mnist1d_cnn", "--timing-batch", "32")
    assert done.returncode == 0, done.stdout + done.stderr
    assert "float64" in done.stdout and "float32" in done.stdout and "manual/auto =" in done.stdout
    assert "all within" in done.stdout


def test_resume_from_the_command_line_extends_a_run(tmp_path):
    out = str(tmp_path / "run")
    assert run_cli("train", "--epochs", "1", "--out", out).returncode == 0
    done = run_cli("train", "--resume", "--epochs", "2", "--out", out)
    assert done.returncode == 0, done.stderr
    assert "resuming" in done.stdout and "at step 40 (epoch 2, step 1 of 40)" in done.stdout
    assert "epoch   2/2" in done.stdout
    assert "epoch   1/" not in done.stdout
    missing = run_cli("train", "--resume", "--out", str(tmp_path / "nothing"))
    assert missing.returncode == 2 and "no run to resume" in missing.stderr


@pytest.mark.parametrize("out, message", [
    ("FILE", "--out {tmp}/FILE is a file, not a folder"),
    ("FILE/run", "--out {tmp}/FILE/run cannot be created: {tmp}/FILE is a file, not a folder"),
])
def test_an_unusable_out_folder_is_one_line_before_any_work(tmp_path, capsys, out, message):
    (tmp_path / "FILE").write_text("a user's file")
    assert main(["train", "--out", str(tmp_path / out)]) == 2
    err = capsys.readouterr().err
    assert err == f"jaxconv train: error: {message.format(tmp=tmp_path)}\n"
    assert (tmp_path / "FILE").read_text() == "a user's file"


def test_failures_a_user_meets_are_one_line(tmp_path):
    import errno
    import jax
    from jaxconv.cli import explain
    from jaxconv.train import _explain_out_of_memory
    full = OSError(errno.ENOSPC, "No space left on device", "/runs/a/metrics.jsonl.tmp")
    assert explain(full) == ("error: No space left on device (/runs/a/metrics.jsonl.tmp); free some space or "
                             "choose another --out, then --resume", 1)
    with pytest.raises(Exception) as info:
        with _explain_out_of_memory("training", "--batch-size", 512):
            raise jax.errors.JaxRuntimeError("RESOURCE_EXHAUSTED: Out of memory while trying to allocate 9 GiB.")
    assert explain(info.value) == ("error: the device ran out of memory in a training step of batch size 512; "
                                   "try --batch-size 256", 1)
    with pytest.raises(jax.errors.JaxRuntimeError):  # any other runtime error is not dressed up as memory
        with _explain_out_of_memory("training", "--batch-size", 512):
            raise jax.errors.JaxRuntimeError("INTERNAL: something else")
    assert explain(RuntimeError("a bug")) == (None, 0)  # bugs keep their traceback


def test_a_full_disk_is_one_line_and_the_run_resumes(tmp_path):
    """A real full disk: a 200 KiB tmpfs (needs root to mount; skipped where it cannot be mounted)."""
    disk = tmp_path / "disk"
    disk.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=200k", "tmpfs", str(disk)], capture_output=True).returncode:
        pytest.skip("cannot mount a tmpfs here")
    try:
        done = run_cli("train", "--epochs", "30", "--out", str(disk / "run"))
        assert done.returncode == 1, done.stdout + done.stderr
        assert done.stderr.count("\n") == 1 and "No space left on device" in done.stderr, done.stderr
        assert done.stderr.endswith("free some space or choose another --out, then --resume\n")
        epochs_done = len((disk / "run" / "metrics.jsonl").read_text().splitlines())
        assert epochs_done >= 1
        subprocess.run(["cp", "-r", str(disk / "run"), str(tmp_path / "moved")], check=True)
    finally:
        subprocess.run(["umount", str(disk)])
    resumed = run_cli("train", "--resume", "--epochs", "3", "--out", str(tmp_path / "moved"))
    assert resumed.returncode == 0, resumed.stderr


def test_a_corrupt_mnist1d_cache_is_made_again(tmp_path):
    (tmp_path / "mnist1d.npz").write_bytes(b"PK\x03\x04 torn")
    with pytest.warns(UserWarning, match="the cache .*mnist1d.npz is unreadable"):
        from jaxconv.data import generate_mnist1d
        train, test = generate_mnist1d(str(tmp_path))
    assert (len(train), len(test)) == (4000, 1000)
    again, _ = generate_mnist1d(str(tmp_path))  # the cache was replaced by a readable one
    np.testing.assert_array_equal(again.images, train.images)


def test_bare_jaxconv_lists_its_commands_and_train_help_shows_the_recipes(capsys):
    assert main([]) == 0
    out = capsys.readouterr().out
    for command in ("train", "eval", "predict", "summary", "bench", "gradcheck"):
        assert f"    {command} " in out
    with pytest.raises(SystemExit):
        main(["train", "--help"])
    out = capsys.readouterr().out
    assert "  mnist1d: dataset=mnist1d, model=mnist1d_cnn, epochs=120, batch_size=100, optimizer=adam, lr=0.01" in out
    assert ("  cifar10_resnet20: dataset=cifar10, model=resnet20, epochs=60, batch_size=128, optimizer=nesterov, "
            "lr=0.1, schedule=onecycle, warmup_epochs=0, weight_decay=0.0005") in out


def test_help_and_import_start_no_jax():
    """`jaxconv --help` answers without importing JAX (it is the slow part of starting); so does `import jaxconv`."""
    probe = ("import sys\nfrom jaxconv.cli import main\ntry:\n    main(['--help'])\nexcept SystemExit as e:\n"
             "    assert e.code == 0\nimport jaxconv\nassert 'jax' not in sys.modules, 'jax was imported'\n"
             "assert callable(jaxconv.create_model) and 'jax' in sys.modules\nprint('ok')")
    done = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0 and done.stdout.split()[-1] == "ok", done.stderr
    assert "train               train a registered model" in done.stdout
