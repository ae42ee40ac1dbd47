"""oneDNN's convolution kernels on a CPU, called from XLA programs as FFI custom calls.

XLA:CPU runs a convolution with Eigen's kernels and, for the weight gradient, behind two layout transposes of the
activations; those convolutions hold 67-92 % of a ResNet's step on a CPU (``benchmarks/step_profile.py``). PyTorch
runs oneDNN's. ``jaxconv/native/onednn_conv.cc`` calls oneDNN's forward, input-gradient and weight-gradient
convolutions on jaxconv's channels-last arrays; this module builds it once per machine against the oneDNN of the
``onednn-devel-cpu-gomp`` package (a dependency on Linux x86-64) and jaxlib's FFI headers, with the system's C++
compiler, into jaxconv's cache folder (``~/.cache/jaxconv/native`` or ``$JAXCONV_DATA/native``), and registers its
three handlers with XLA for the CPU platform. ``jaxconv.dense`` lowers one-group convs to them on a CPU.

Nothing depends on it: where the package, the compiler or the build is missing, or ``JAXCONV_ONEDNN=0`` is set,
:func:`status` says why and convolutions stay XLA's.
"""
from __future__ import annotations

import ctypes
import functools
import hashlib
import importlib.metadata
import os
import shutil
import subprocess
import tempfile

import jax

from jaxconv.compiler import switched_off

SOURCE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "native", "onednn_conv.cc")
PACKAGE = "onednn-devel-cpu-gomp"  # headers; it requires onednn-cpu-gomp, the library
# the custom-call names jaxconv.dense lowers to, and the handler symbols the library exports
TARGETS = {"jaxconv_onednn_conv": "JaxconvOnednnConv", "jaxconv_onednn_input_grad": "JaxconvOnednnInputGrad",
           "jaxconv_onednn_weight_grad": "JaxconvOnednnWeightGrad"}


def available() -> bool:
    """Whether oneDNN's convolutions are registered with XLA for the CPU (built and loaded on the first call)."""
    return status()[0]


@functools.cache
def status() -> tuple[bool, str]:
    """``(True, path of the built library)`` or ``(False, why not)``; builds and registers once per process."""
    if switched_off(os.environ.get("JAXCONV_ONEDNN")):
        return False, "JAXCONV_ONEDNN is off"
    try:
        include, lib = locate()
    except LookupError as err:
        return False, str(err)
    cxx = os.environ.get("CXX") or shutil.which("g++") or shutil.which("c++")
    if not cxx:
        return False, "no C++ compiler: set CXX or install g++"
    try:
        path = build(cxx, include, lib)
        library = ctypes.cdll.LoadLibrary(path)
        for target, symbol in TARGETS.items():
            jax.ffi.register_ffi_target(target, jax.ffi.pycapsule(getattr(library, symbol)), platform="cpu")
    except (OSError, subprocess.SubprocessError, AttributeError) as err:
        return False, f"building or loading {os.path.basename(SOURCE)} failed: {err}"
    return True, path


def locate() -> tuple[str, str]:
    """The include folder holding ``oneapi/dnnl/dnnl.hpp`` and the folder holding ``libdnnl.so``, from the
    installed packages' file lists. Raises LookupError naming what is missing."""
    try:
        headers = importlib.metadata.distribution(PACKAGE)
        library = importlib.metadata.distribution("onednn-cpu-gomp")
    except importlib.metadata.PackageNotFoundError as err:
        raise LookupError(f"{err.name} is not installed (pip install {PACKAGE}, Linux x86-64)") from None
    hpp = [f for f in headers.files or () if str(f).replace(os.sep, "/").endswith("include/oneapi/dnnl/dnnl.hpp")]
    so = [f for f in library.files or () if os.path.basename(str(f)) == "libdnnl.so.3"]
    if not hpp or not so:
        raise LookupError(f"{PACKAGE}'s header or onednn-cpu-gomp's libdnnl.so.3 is not where its file list says")
    include = os.path.normpath(os.path.join(os.path.dirname(str(headers.locate_file(hpp[0]))), "..", ".."))
    return include, os.path.normpath(os.path.dirname(str(library.locate_file(so[0]))))


def build(cxx: str, include: str, lib: str) -> str:
    """The compiled library's path, building it when no build of this source, oneDNN, jaxlib and compiler exists.
    A build is written under a temporary name and renamed into place, so concurrent first calls (test workers)
    and a process killed mid-build leave no half library."""
    flags = ["-O2", "-std=c++17", "-shared", "-fPIC", "-w", f"-I{jax.ffi.include_dir()}", f"-I{include}",
             SOURCE, f"-L{lib}", "-l:libdnnl.so.3", f"-Wl,-rpath,{lib}"]
    with open(SOURCE, "rb") as f:
        key = hashlib.sha256(f.read() + repr((cxx, flags, jax.__version__)).encode()).hexdigest()[:16]
    folder = _cache_folder()
    path = os.path.join(folder, f"jaxconv_onednn_{key}.so")
    if os.path.exists(path):
        return path
    os.makedirs(folder, exist_ok=True)
    fd, partial = tempfile.mkstemp(prefix=".jaxconv_onednn_", suffix=".so", dir=folder)
    os.close(fd)
    try:
        subprocess.run([cxx, *flags, "-o", partial], check=True, capture_output=True, timeout=300)
        os.replace(partial, path)
    finally:
        if os.path.exists(partial):
            os.remove(partial)
    return path


def _cache_folder() -> str:
    from jaxconv.data import cache_dir
    return os.path.join(cache_dir(), "native")
