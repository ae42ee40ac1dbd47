"""TensorBoard event files: every epoch's numbers at its step, as in metrics.jsonl; a resumed run drops what
the interrupted process wrote after its last checkpoint (TensorBoard's purge_step)."""
import glob
import os
import shutil
import struct

import numpy as np
from tensorboardX.proto import event_pb2
from tensorboardX.record_writer import masked_crc32c

from jaxconv.data import load_dataset
from jaxconv.events import crc32c, tag
from jaxconv.train import TrainConfig, fit
from tests.test_train import quiet, subset


def read_events(path):
    """The events of one file, read as TFRecords (length, its CRC, the Event proto, its CRC), every checksum
    checked with tensorboardX's own."""
    events, raw = [], open(path, "rb").read()
    at = 0
    while at < len(raw):
        (length,) = struct.unpack("<Q", raw[at:at + 8])
        assert struct.unpack("<I", raw[at + 8:at + 12])[0] == masked_crc32c(raw[at:at + 8])
        data = raw[at + 12:at + 12 + length]
        assert struct.unpack("<I", raw[at + 12 + length:at + 16 + length])[0] == masked_crc32c(data)
        events.append(event_pb2.Event.FromString(data))
        at += 12 + length + 4
    assert at == len(raw)
    return events


def scalars(folder):
    """{tag: {step: value}} as TensorBoard shows them: the files in the order written, each START session
    log at step p dropping what earlier files held at steps >= p."""
    shown = {}
    for path in sorted(glob.glob(os.path.join(folder, "tensorboard", "events.out.tfevents.*")), key=os.path.getmtime):
        for e in read_events(path):
            if e.HasField("session_log") and e.session_log.status == event_pb2.SessionLog.START:
                for steps in shown.values():
                    for s in [s for s in steps if s >= e.step]:
                        del steps[s]
            for v in e.summary.value:
                assert e.step not in shown.get(v.tag, {}), f"{v.tag} written twice at step {e.step}"
                shown.setdefault(v.tag, {})[e.step] = v.simple_value
    return shown


def check_against(history, shown):
    fields = [f for f in history[0] if f not in ("epoch", "step", "devices", "device_kind", "processes")]
    assert sorted(shown) == sorted(tag(f) for f in fields)
    for field in fields:
        expected = {h["step"]: h[field] for h in history}
        got = shown[tag(field)]
        assert sorted(got) == sorted(expected), field
        np.testing.assert_allclose([got[s] for s in sorted(got)], [expected[s] for s in sorted(expected)],
                                   rtol=1e-6, err_msg=field)   # TensorBoard keeps float32


def test_event_files_hold_every_epoch_and_a_resume_drops_the_lost_steps(tmp_path):
    data = subset(load_dataset("mnist1d"), 400, 100)
    out = str(tmp_path / "run")
    config = TrainConfig(epochs=2, out=out, val_split=0.25, test_every_epoch=True)
    history = fit(config, dataset=data, log=quiet)
    shown = scalars(out)
    [path] = glob.glob(os.path.join(out, "tensorboard", "events.out.tfevents.*"))
    assert read_events(path)[0].file_version == "brain.Event:2"
    assert {"loss/train", "accuracy/val", "accuracy/test", "lr", "throughput/images_per_s"} <= set(shown)
    check_against(history, shown)

    # The process is killed after epoch 2's metrics and events but before its checkpoint: resume from epoch 1.
    steps = history[0]["step"]
    shutil.rmtree(os.path.join(out, "checkpoints", str(2 * steps)))
    resumed = fit(TrainConfig(epochs=3, out=out, val_split=0.25, test_every_epoch=True), dataset=data, log=quiet,
                  resume=True)
    assert [h["step"] for h in resumed] == [steps, 2 * steps, 3 * steps]
    assert len(glob.glob(os.path.join(out, "tensorboard", "events.out.tfevents.*"))) == 2
    check_against(resumed, scalars(out))


def test_tags_group_the_splits():
    assert [tag(f) for f in ("train_loss", "val_accuracy", "test_loss", "lr", "images_per_s_per_device", "wall_s")] == [
        "loss/train", "accuracy/val", "loss/test", "lr", "throughput/images_per_s_per_device", "time/wall_s"]


def test_the_checksum_is_crc32c():
    assert crc32c(b"123456789") == 0xE3069283  # the CRC-32C check value
    assert crc32c(b"") == 0
