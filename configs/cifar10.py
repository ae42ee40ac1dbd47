"""CIFAR-10 with ``convnetjs_cifar`` (the ConvNetJS demo's network, 22k parameters).

    jaxconv train --dataset cifar10 --data-dir DIR     # or: --config configs/cifar10.py

DIR holds ``cifar-10-batches-py`` (``../shared/tools/cifar10_from_jpeg.py`` rebuilds it from the JPEGs).
Cost on the 2-core CPU: about 1,080 s of training (70 epochs, about 3,500 images/s).
Measured: 75.64 % test accuracy (target >= 75 %), first reached at epoch 61.
"""
from jaxconv.config import TrainConfig


def get_config() -> TrainConfig:
    return TrainConfig(dataset="cifar10", model="convnetjs_cifar", epochs=70, batch_size=128, optimizer="adam",
                       lr=4e-3, schedule="onecycle", warmup_epochs=0, weight_decay=0.0, label_smoothing=0.0,
                       crop=2, flip=True)
