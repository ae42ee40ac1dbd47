"""The package build compiles jaxconv's oneDNN library (``jaxconv/native/onednn_conv.cc``) on Linux x86-64.

The extension is optional: without a C++ compiler, or where the build requirements (oneDNN's headers, jaxlib's FFI
headers) are missing, setuptools says why and installs jaxconv without it; convolutions are then XLA's
(``jaxconv.onednn.status()`` says so). Nothing is compiled after installation. Everything else is in pyproject.toml.
"""
import importlib.metadata
import importlib.util
import os
import platform

from setuptools import Extension, setup

HERE = os.path.dirname(os.path.abspath(__file__))


def _locate():
    path = os.path.join(HERE, "jaxconv", "native", "locate.py")
    spec = importlib.util.spec_from_file_location("_jaxconv_locate", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def native_extensions() -> list:
    if platform.system() != "Linux" or platform.machine() not in ("x86_64", "AMD64"):
        return []
    if os.environ.get("JAXCONV_ONEDNN", "").strip().lower() in ("0", "false", "no", "off"):
        print("jaxconv: JAXCONV_ONEDNN is off: building without the oneDNN library")
        return []
    locate = _locate()
    try:
        onednn_include, dnnl = locate.include_dir(), locate.library()
        jaxlib = importlib.util.find_spec("jaxlib")
        if jaxlib is None:
            raise LookupError("jaxlib is not installed")
        ffi_include = os.path.join(list(jaxlib.submodule_search_locations)[0], "include")
        jaxlib_version = importlib.metadata.version("jaxlib")
    except LookupError as err:
        print(f"jaxconv: building without the oneDNN library: {err}")
        return []
    # Linked by soname with no run path: jaxconv.onednn loads the installed libdnnl.so.3 first (the build
    # environment's copy is gone after an isolated build).
    return [Extension("jaxconv._onednn_conv", sources=["jaxconv/native/onednn_conv.cc"], language="c++",
                      include_dirs=[ffi_include, onednn_include], library_dirs=[os.path.dirname(dnnl)],
                      extra_compile_args=["-O2", "-g0", "-std=c++17", "-w", f'-DJAXCONV_JAXLIB="{jaxlib_version}"'],
                      extra_link_args=[f"-l:{locate.SONAME}"], optional=True)]


setup(ext_modules=native_extensions())
