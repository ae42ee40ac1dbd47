"""One registry per twin kind (PyTorch, plain Flax): layer type -> converter, looked up along the MRO, so
a subclass of a registered layer converts as its parent unless it registers its own."""
from __future__ import annotations


class Converters:
    def __init__(self, twin: str, framework: str):
        self.twin, self.framework = twin, framework  # twin: the module name under jaxconv
        self._by_type = {}

    def register(self, layer_type):
        """Decorator: ``@converts(LayerType)`` registers ``convert(layer, in_shape)`` for that type."""
        def decorate(fn):
            self._by_type[layer_type] = fn
            return fn
        return decorate

    def __call__(self, layer, in_shape):
        for cls in type(layer).__mro__:
            if cls in self._by_type:
                return self._by_type[cls](layer, tuple(in_shape))
        name = type(layer).__name__
        raise TypeError(f"{self.twin}: no {self.framework} converter for {name}; register one with "
                        f"@jaxconv.{self.twin}.converts({name})")
