"""Training recipes as files, the Flax examples' convention: ``configs/<name>.py`` defines ``get_config()``
returning a :class:`jaxconv.config.TrainConfig`; its docstring gives the command, the cost on the
2-core CPU this project is developed on, and the measured result.

``<dataset>.py`` is the recipe ``jaxconv train --dataset <dataset>`` uses; another file whose config
names a dataset and a model (``cifar10_resnet20.py``) is the recipe for that pair. ``jaxconv train --config configs/NAME.py`` (or
``--config NAME``) starts from the file and takes any flag on top. Installed, this folder is the
package ``jaxconv.configs``.
"""
