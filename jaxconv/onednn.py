"""oneDNN's convolution kernels on a CPU, called from XLA programs as FFI custom calls.

XLA:CPU runs a convolution with Eigen's kernels and, for the weight gradient, behind two layout transposes of the
activations; those convolutions hold 67-92 % of a ResNet's step on a CPU (``benchmarks/step_profile.py``). PyTorch
runs oneDNN's. ``jaxconv/native/onednn_conv.cc`` calls oneDNN's forward, input-gradient and weight-gradient
convolutions on jaxconv's channels-last arrays. The package build compiles it (``setup.py``: an optional extension,
against the headers of ``onednn-devel-cpu-gomp`` and jaxlib's FFI headers) into ``jaxconv/_onednn_conv*.so``; this
module loads it with the ``libdnnl.so.3`` of ``onednn-cpu-gomp`` (``pip install 'jaxconv[onednn]'``) and registers
its three handlers with XLA for the CPU platform, once per process. Nothing is compiled here.

Nothing depends on it: where the library was not built, oneDNN is not installed, the CPU is not x86-64, or
``JAXCONV_ONEDNN=0`` is set, :func:`status` says why, one log line says it once (not for ``JAXCONV_ONEDNN=0``, the
user's own choice), and convolutions stay XLA's. Where the library loads, :func:`builds` asks oneDNN, once per
geometry and dtype, whether it can build that conv's primitives on this CPU (bfloat16 needs AVX-512 in oneDNN 3.2);
where it cannot, that conv is XLA's.
"""
from __future__ import annotations

import ctypes
import functools
import importlib.machinery
import importlib.metadata
import logging
import os
import platform

import jax
import numpy as np

from jaxconv.compiler import switched_off
from jaxconv.native import locate

FOLDER = os.path.dirname(os.path.abspath(__file__))
# the custom-call names jaxconv.onednn_conv lowers to, and the handler symbols the library exports
TARGETS = {"jaxconv_onednn_conv": "JaxconvOnednnConv", "jaxconv_onednn_input_grad": "JaxconvOnednnInputGrad",
           "jaxconv_onednn_weight_grad": "JaxconvOnednnWeightGrad"}
DTYPE_CODES = {"float32": 0, "bfloat16": 1}
HOW = "pip install 'jaxconv[onednn]' with a C++ compiler (g++) present"
log = logging.getLogger("jaxconv")


def available() -> bool:
    """Whether oneDNN's convolutions are registered with XLA for the CPU (loaded on the first call)."""
    return status()[0]


def library_path() -> str | None:
    """The library the package build compiled for this interpreter, or ``None`` where it did not."""
    for suffix in importlib.machinery.EXTENSION_SUFFIXES:
        path = os.path.join(FOLDER, f"_onednn_conv{suffix}")
        if os.path.exists(path):
            return path
    return None


@functools.cache
def status() -> tuple[bool, str]:
    """``(True, path of the loaded library)`` or ``(False, why not)``; loads and registers once per process, and
    logs the reason once where oneDNN was wanted but cannot run."""
    ok, why = _load()
    if not ok and why != "JAXCONV_ONEDNN is off":
        log.warning("jaxconv: convolutions are XLA's, not oneDNN's (%s); for oneDNN's: %s, or set JAXCONV_ONEDNN=0 "
                    "to silence this", why, HOW)
    return ok, why


def _load() -> tuple[bool, str]:
    if switched_off(os.environ.get("JAXCONV_ONEDNN")):
        return False, "JAXCONV_ONEDNN is off"
    if platform.system() != "Linux" or platform.machine() not in ("x86_64", "AMD64"):
        return False, f"oneDNN's library is built for Linux x86-64 only, not {platform.system()} {platform.machine()}"
    path = library_path()
    if path is None:
        return False, "jaxconv was installed without its oneDNN library (no C++ compiler or no oneDNN headers then)"
    try:
        ctypes.CDLL(locate.library(), mode=ctypes.RTLD_GLOBAL)  # the library's libdnnl.so.3, by soname
    except LookupError as err:
        return False, str(err)
    except OSError as err:
        return False, f"loading {locate.SONAME} failed: {err}"
    try:
        library = ctypes.CDLL(path)
        library.JaxconvBuiltWith.restype = ctypes.c_char_p
        built_with = library.JaxconvBuiltWith().decode()
        running = importlib.metadata.version("jaxlib")
        if _older(running, built_with):
            return False, (f"{os.path.basename(path)} was built against jaxlib {built_with}, newer than this "
                           f"jaxlib {running}; reinstall jaxconv")
        for target, symbol in TARGETS.items():
            jax.ffi.register_ffi_target(target, jax.ffi.pycapsule(getattr(library, symbol)), platform="cpu")
    except (OSError, AttributeError) as err:
        return False, f"loading {os.path.basename(path)} failed: {err}"
    _LIBRARY.append(library)
    return True, path


_LIBRARY: list = []  # the loaded library, for builds()


def _older(version: str, than: str) -> bool:
    def numbers(v):
        return tuple(int(p) for p in v.split(".")[:3] if p.isdigit())
    return than != "unknown" and numbers(version) < numbers(than)


def builds(dtype, x_shape, w_shape, y_shape, stride, dilation, pads) -> bool:
    """Whether oneDNN builds this conv's forward, input-gradient and weight-gradient primitives on this CPU (asked
    once per geometry and dtype). False where oneDNN is not loaded."""
    name = np.dtype(dtype).name
    if name not in DTYPE_CODES or not available():
        return False
    return _builds(name, tuple(map(int, x_shape)), tuple(map(int, w_shape)), tuple(map(int, y_shape)),
                   tuple(map(int, stride)), tuple(map(int, dilation)), tuple((int(lo), int(hi)) for lo, hi in pads))


@functools.cache
def _builds(dtype: str, x_shape, w_shape, y_shape, stride, dilation, pads) -> bool:
    arrays = [np.asarray(v, np.int64) for v in (x_shape, w_shape, y_shape, stride, dilation,
                                                [lo for lo, _ in pads], [hi for _, hi in pads])]
    pointers = [a.ctypes.data_as(ctypes.POINTER(ctypes.c_int64)) for a in arrays]
    return bool(_LIBRARY[0].JaxconvOnednnBuilds(DTYPE_CODES[dtype], len(stride), *pointers))


def describe() -> str:
    """One line naming the CPU convolution kernels this process runs: oneDNN's (with its version and the dtypes
    this CPU builds) or XLA's, and why."""
    ok, why = status()
    if not ok:
        return f"XLA (oneDNN: {why})"
    version = _onednn_version()
    probe = dict(x_shape=(1, 4, 4, 8), w_shape=(3, 3, 8, 8), y_shape=(1, 4, 4, 8), stride=(1, 1), dilation=(1, 1),
                 pads=((1, 1), (1, 1)))
    dtypes = [d for d in DTYPE_CODES if builds(d, **probe)]
    missing = [d for d in DTYPE_CODES if d not in dtypes]
    return (f"oneDNN {version} for one-group 2-D/3-D convs ({', '.join(dtypes) or 'no dtype'}"
            + (f"; {', '.join(missing)} not on this CPU: XLA's" if missing else "") + "), XLA's for the rest")


def _onednn_version() -> str:
    class Version(ctypes.Structure):
        _fields_ = [("major", ctypes.c_int), ("minor", ctypes.c_int), ("patch", ctypes.c_int)]
    try:
        dnnl = ctypes.CDLL(locate.library())
        dnnl.dnnl_version.restype = ctypes.POINTER(Version)
        v = dnnl.dnnl_version().contents
        return f"{v.major}.{v.minor}.{v.patch}"
    except (OSError, AttributeError, LookupError):
        return "(version unknown)"
