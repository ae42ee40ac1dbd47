"""jaxconv: pure-function convolutional networks on JAX/Flax, with hand-written backward passes."""
from jaxconv import compiler, functional, grads, layers, models, shapes
from jaxconv.backprop import manual_value_and_grad
from jaxconv.compiler import nnx_jit as jit
from jaxconv.inference import load
from jaxconv.layers import Concat, Residual, Sequential
from jaxconv.models import MODELS, Builder, count_params, create_model, register_model
from jaxconv.shapes import conv_output_size, receptive_field, summary

__version__ = "0.1.0"

__all__ = [
    "compiler", "functional", "grads", "layers", "models", "shapes", "jit", "load", "manual_value_and_grad", "MODELS", "Builder",
    "Concat", "Residual", "Sequential", "count_params", "create_model", "register_model", "conv_output_size",
    "receptive_field", "summary",
]
