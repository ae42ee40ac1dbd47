"""Tests run as production runs: float32, jax_enable_x64 off. Tests that compare gradients or ops to
float64 references carry ``@pytest.mark.x64`` (or a module-level ``pytestmark``), which turns float64 on
for that test alone."""
import os

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=1")

import jax  # noqa: E402
import pytest  # noqa: E402

from jaxconv import compiler  # noqa: E402


def _share_compiled_programs() -> None:
    """Most of the tests' time is XLA compiling the same small training programs again, test after test: the
    tests of one session share them through JAX's persistent compilation cache, in a folder of the session's own
    (made by the pytest process that starts the session, which hands it to xdist's workers through the
    environment, and removed when it ends). The ``jaxconv`` commands tests start use it too
    (``JAXCONV_COMPILATION_CACHE`` names it; never ~/.cache/jaxconv/xla): jaxconv writes each entry whole, so the
    processes tests kill mid-run leave no half entry (tests/test_compiler.py checks that, and the command's own
    cache, in folders of their own). ``JAXCONV_TEST_XLA_CACHE=0`` turns the sharing off."""
    import atexit
    import shutil
    import tempfile
    folder = os.environ.get("JAXCONV_TEST_XLA_CACHE")
    if folder is None:
        folder = os.environ["JAXCONV_TEST_XLA_CACHE"] = tempfile.mkdtemp(prefix="jaxconv-tests-xla-")
        atexit.register(shutil.rmtree, folder, ignore_errors=True)
    if compiler.switched_off(folder):
        os.environ.setdefault("JAXCONV_COMPILATION_CACHE", "0")
    else:
        os.environ.setdefault("JAXCONV_COMPILATION_CACHE", folder)
        compiler.use_compilation_cache(folder)


_share_compiled_programs()

def _shared_data() -> str:
    """``../shared/data`` beside the checkout; found from a copy of the tests one level deeper too (mutmut
    runs them from ``mutants/tests``)."""
    here = os.path.dirname(os.path.abspath(__file__))
    candidates = [os.path.join(here, *[".."] * up, "shared", "data") for up in (2, 3)]
    return os.path.normpath(next((c for c in candidates if os.path.isdir(c)), candidates[0]))


SHARED_DATA = _shared_data()


def shared_by_the_module(fixture_name, config) -> str:
    """The scope of a fixture that runs jaxconv code once for a module's tests: ``"module"``, but ``"function"``
    while mutmut records which tests reach which function (its "stats" pass): a module-scoped fixture would
    credit its code to the first test alone, and mutmut would not run the others against its mutants."""
    return "function" if os.environ.get("MUTANT_UNDER_TEST") == "stats" else "module"


def pytest_xdist_auto_num_workers(config):
    """``-n auto``: a worker per core, at most 4 (each test already uses every core XLA gives it, and some start
    several processes of their own)."""
    return max(1, min(4, len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1))


def pytest_configure(config):
    config.addinivalue_line("markers", "x64: run this test with jax_enable_x64 (float64 arrays)")


@pytest.fixture(autouse=True)
def _float64_where_marked(request):
    if request.node.get_closest_marker("x64") is None:
        assert not jax.config.jax_enable_x64, "a test left jax_enable_x64 on"
        yield
        return
    jax.config.update("jax_enable_x64", True)
    try:
        yield
    finally:
        jax.config.update("jax_enable_x64", False)


@pytest.fixture
def rng():
    import numpy as np
    return np.random.default_rng(0)
