"""Where the oneDNN wheels put their header and library, from the installed packages' file lists.

Standard library only: the package build (``setup.py``, to compile ``onednn_conv.cc``) and ``jaxconv.onednn`` (to
load ``libdnnl.so.3`` before the compiled library) both ask it.
"""
from __future__ import annotations

import importlib.metadata
import os

HEADERS = "onednn-devel-cpu-gomp"  # oneDNN's headers (a build requirement on Linux x86-64)
LIBRARY = "onednn-cpu-gomp"  # libdnnl.so.3, GNU OpenMP (what jaxconv[onednn] installs)
SONAME = "libdnnl.so.3"


def _files(package: str, wanted) -> list[str]:
    try:
        dist = importlib.metadata.distribution(package)
    except importlib.metadata.PackageNotFoundError:
        raise LookupError(f"{package} is not installed") from None
    found = [str(dist.locate_file(f)) for f in dist.files or () if wanted(str(f).replace(os.sep, "/"))]
    if not found:
        raise LookupError(f"{package} is installed, but not the file jaxconv needs from it")
    return found


def include_dir() -> str:
    """The folder holding ``oneapi/dnnl/dnnl.hpp``. Raises LookupError naming what is missing."""
    hpp = _files(HEADERS, lambda f: f.endswith("include/oneapi/dnnl/dnnl.hpp"))[0]
    return os.path.normpath(os.path.join(os.path.dirname(hpp), "..", ".."))


def library() -> str:
    """The path of ``libdnnl.so.3``. Raises LookupError naming what is missing."""
    return os.path.normpath(_files(LIBRARY, lambda f: os.path.basename(f) == SONAME)[0])
