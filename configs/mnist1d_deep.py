"""MNIST-1D with ``mnist1d_deep`` (42,922 parameters, BatchNorm).

    jaxconv train --model mnist1d_deep     # or: jaxconv train --config configs/mnist1d_deep.py

Cost on the 2-core CPU: about 11 s of training (30 epochs).
Measured: 99.00 % test accuracy (target >= 98 % within 20 s), reached 98 % after 4.6 s.
"""
from jaxconv.config import TrainConfig


def get_config() -> TrainConfig:
    return TrainConfig(dataset="mnist1d", model="mnist1d_deep", epochs=30, batch_size=100, optimizer="adam",
                       lr=1e-2, schedule="cosine", warmup_epochs=0, weight_decay=0.0, label_smoothing=0.0,
                       crop=4, flip=False)
