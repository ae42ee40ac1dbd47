"""jaxconv: pure-function convolutional networks on JAX/Flax, with hand-written backward passes.

The names below load on first use (PEP 562), so ``import jaxconv`` and ``jaxconv --help`` do not start JAX.
"""
import importlib

__version__ = "0.1.0"

_SUBMODULES = ("compiler", "functional", "grads", "layers", "models", "shapes", "bench", "parallel", "config")
_NAMES = {
    "manual_value_and_grad": "jaxconv.backprop", "jit": ("jaxconv.compiler", "nnx_jit"), "load": "jaxconv.inference",
    "Concat": "jaxconv.layers", "Residual": "jaxconv.layers", "Sequential": "jaxconv.layers",
    "MODELS": "jaxconv.models", "Builder": "jaxconv.models", "count_params": "jaxconv.models",
    "create_model": "jaxconv.models", "register_model": "jaxconv.models",
    "conv_output_size": "jaxconv.shapes", "receptive_field": "jaxconv.shapes", "summary": "jaxconv.shapes",
}

__all__ = [*_SUBMODULES, *_NAMES]


def __getattr__(name):
    if name in _SUBMODULES:
        return importlib.import_module(f"jaxconv.{name}")
    if name in _NAMES:
        module, attr = _NAMES[name] if isinstance(_NAMES[name], tuple) else (_NAMES[name], name)
        value = getattr(importlib.import_module(module), attr)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'jaxconv' has no attribute {name!r}")


def __dir__():
    return sorted(list(globals()) + __all__)
