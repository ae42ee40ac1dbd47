"""CIFAR-10 with ``resnet20`` (He et al. 2016, section 4.2; 272,474 parameters): the paper's optimiser
(SGD with Nesterov momentum 0.9, batch 128, 4-pixel crops and flips; weight decay 5e-4 here) on a
40-epoch one-cycle schedule instead of 164 epochs of step decay, with label smoothing 0.1.

    jaxconv train --dataset cifar10 --model resnet20 --data-dir DIR     # or: --config configs/cifar10_resnet20.py

Cost on the 2-core CPU: about 150 s per epoch when idle (335-340 images/s), so about 100 minutes.
Measured: 87.96 % test accuracy (this recipe; 87.84 % at epoch 38). Without label smoothing: 87.60 %
after 30 epochs, 87.86 % after 40. The target, 88 %, is missed by 0.04 points (4 test images).
"""
from jaxconv.config import TrainConfig


def get_config() -> TrainConfig:
    return TrainConfig(dataset="cifar10", model="resnet20", epochs=40, batch_size=128, optimizer="nesterov",
                       lr=0.1, schedule="onecycle", warmup_epochs=0, weight_decay=5e-4, label_smoothing=0.1,
                       crop=4, flip=True)
