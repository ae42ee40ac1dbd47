"""``jit`` with the XLA options jaxconv measured faster for convnets, applied per compiled function.

XLA:CPU in jaxlib 0.10 hands every convolution to YNNPACK (the ``LIBRARY_FUSION_TYPE_INDIVIDUAL_
CONVOLUTION`` library fusion). Its weight gradient is slow: for seed_cnn's second conv (batch 128,
14x14x32 -> 64, 3x3) it takes 27 ms where XLA's own Eigen convolution takes 6.5 ms, and the whole
seed_cnn training step drops from 66 to 34 ms when convolutions stay with Eigen while dots and
reductions still go to YNNPACK (measured with ``benchmarks/train_step_vs_torch.py`` before it became a thin call of
``jaxconv bench``; ``JAXCONV_XLA_OPTIONS=0 jaxconv bench ...`` times the defaults).

The option is passed as ``compiler_options`` to each ``jax.jit`` that jaxconv makes, never through
the process-wide ``XLA_FLAGS``: other code in the process keeps XLA's defaults. It is left out

- off the CPU (GPU and TPU compilers have their own conv paths);
- when ``XLA_FLAGS`` already sets ``xla_cpu_experimental_ynn_fusion_type`` (the user decided);
- when ``JAXCONV_XLA_OPTIONS=0`` is in the environment;
- when this jaxlib rejects the option (it is experimental and may be renamed): a one-off probe
  compile finds out, so an unknown option never breaks training.
"""
from __future__ import annotations

import functools
import os

import jax
import numpy as np

CPU_OPTIONS = {
    "xla_cpu_experimental_ynn_fusion_type": "LIBRARY_FUSION_TYPE_DOT,LIBRARY_FUSION_TYPE_REDUCE",
}
# For a program that runs once (building a model's initial state), LLVM's optimisation level 1 instead of XLA's
# default: the same numbers, bit for bit (all 13 registered models, two seeds each), compiled 2-3x sooner
# (ResNet-20's 4.24 -> 1.39 s, mnist1d_cnn's 1.41 -> 0.51 s; level 0 is sooner still but rounds differently).
ONCE_CPU_OPTIONS = {"xla_backend_optimization_level": 1}


def compiler_options(backend: str | None = None, *, once: bool = False) -> dict:
    """The XLA options jaxconv adds to its compiled functions on ``backend`` (default: JAX's); ``once``: to a
    program that runs once (:func:`jit_once`)."""
    if switched_off(os.environ.get("JAXCONV_XLA_OPTIONS")):
        return {}
    if (backend or jax.default_backend()) != "cpu":
        return {}
    flags = os.environ.get("XLA_FLAGS", "")
    options = _accepted_cpu_options(tuple(CPU_OPTIONS.items()))
    if once:
        options += _accepted_cpu_options(tuple(ONCE_CPU_OPTIONS.items()))
    return {k: v for k, v in options if k not in flags}


@functools.cache
def _accepted_cpu_options(candidates: tuple) -> tuple:
    accepted = []
    for key, value in candidates:
        try:
            jax.jit(lambda x: x + 1, compiler_options={key: value}).lower(1.0).compile()
        except Exception:  # noqa: BLE001 - any rejection means: keep XLA's default for this option
            continue
        accepted.append((key, value))
    return tuple(accepted)


def jit(fun, **kwargs):
    """``jax.jit(fun, **kwargs)`` with :func:`compiler_options` for the default backend added."""
    options = {**compiler_options(), **(kwargs.pop("compiler_options", None) or {})}
    return jax.jit(fun, compiler_options=options or None, **kwargs)


def jit_once(fun, **kwargs):
    """:func:`jit` for a program that runs once, such as building a model's initial state: on a CPU it is
    compiled with less optimisation (``ONCE_CPU_OPTIONS``), where the compile, not the run, is what takes time."""
    options = {**compiler_options(once=True), **(kwargs.pop("compiler_options", None) or {})}
    return jax.jit(fun, compiler_options=options or None, **kwargs)


def replica_strategy(backend: str | None = None) -> str:
    """How a many-seed run (``--seeds K``) runs its K replicas inside one compiled step: ``"vmap"`` or ``"unroll"``.

    ``jax.vmap`` turns each convolution of K models into one grouped convolution (``feature_group_count``
    K) and its weight gradient into a ``batch_group_count`` one. XLA:CPU runs those no faster than K separate
    convolutions, and the weight gradient slower: for mnist1d_cnn with K = 8 a vmapped training step took
    5.42 ms, K copies of the step in the same program 2.58 ms, one replica 0.59 ms (2-core CPU,
    ``benchmarks/replicas_vmap_vs_unroll.py``). The unrolled program also computes each replica exactly as a
    one-seed run does; it compiles longer (3.71 s against 1.19 s there). So on CPU the replicas are unrolled;
    on GPUs and TPUs, whose grouped convolutions are native, they are vmapped. ``JAXCONV_REPLICAS=vmap`` or
    ``unroll`` overrides the choice."""
    chosen = os.environ.get("JAXCONV_REPLICAS", "").strip().lower()
    if chosen in ("vmap", "unroll"):
        return chosen
    return "unroll" if (backend or jax.default_backend()) == "cpu" else "vmap"


# Training steps per compiled program on GPUs and TPUs (a lax.scan of this many steps); 1 on CPUs.
ACCELERATOR_STEPS_PER_DISPATCH = 32


def steps_per_dispatch(backend: str | None = None) -> int:
    """``jaxconv train``'s training steps per dispatch when ``--steps-per-dispatch`` is not given: 1 on a CPU, where
    XLA:CPU runs a convolution's weight gradient far slower inside a loop (MNIST-1D's epoch 2.5x slower scanned,
    ``benchmarks/scan_vs_step.py``, ``benchmarks/conv_in_loop.py``); :data:`ACCELERATOR_STEPS_PER_DISPATCH`
    on GPUs and TPUs, where each dispatch of a small step costs more than the step: on an H200, an epoch of
    MNIST-1D (40 steps of 100) took 21.0 ms one step at a time, 8.0 ms at 8 steps per dispatch, 6.7 ms at 32
    and 6.4 ms as one program; LeNet-5 on MNIST (78 steps of 128) 69.6, 20.3, 15.6 and 15.6 ms
    (``benchmarks/gpu_session.sh scan_fine``). 32 keeps most of the gain while a signal or the progress bar still
    gets a turn every 32 steps. Not measured on a TPU."""
    return 1 if (backend or jax.default_backend()) == "cpu" else ACCELERATOR_STEPS_PER_DISPATCH


def enable_compilation_cache(folder: str | None = None) -> str | None:
    """Turn on JAX's persistent compilation cache in ``folder`` (default ``$JAXCONV_COMPILATION_CACHE`` where that
    names a folder, else ``~/.cache/jaxconv/xla`` or ``$JAXCONV_DATA/xla``), so a second run of the same program
    loads its compiled steps instead of compiling.

    The ``jaxconv`` command calls it; a script may. It changes nothing when the user chose a cache already
    (``JAX_COMPILATION_CACHE_DIR`` or ``jax.config.jax_compilation_cache_dir``) or when
    ``JAXCONV_COMPILATION_CACHE=0``. Entries are kept whatever their compile time (JAX's default skips those
    under a second, which is most of jaxconv's steps on a CPU). Returns the folder in use, or ``None``."""
    value = os.environ.get("JAXCONV_COMPILATION_CACHE")
    if switched_off(value):
        return None
    chosen = os.environ.get("JAX_COMPILATION_CACHE_DIR") or jax.config.jax_compilation_cache_dir
    if chosen:
        return chosen
    from jaxconv.data import cache_dir
    named = (value or "").strip()
    if named.lower() in ("", "1", "true", "yes", "on"):
        named = ""
    folder = folder or named or os.path.join(cache_dir(), "xla")
    use_compilation_cache(folder)
    return folder


def use_compilation_cache(folder: str) -> None:
    """JAX's persistent compilation cache in ``folder``, keeping every program whatever its compile time and size.

    JAX writes an entry straight to its final name: a process killed during that write leaves a truncated entry,
    which later runs report ("Error reading persistent compilation cache entry") and compile again, never replacing
    it. jaxconv keeps JAX's behaviour (docs/upstream.md says how to reproduce it and what would mend it upstream):
    a torn entry costs a compile, never a wrong result."""
    jax.config.update("jax_compilation_cache_dir", folder)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", -1)


def switched_off(value: str | None) -> bool:
    """Whether an environment switch's value turns its feature off: 0, false, no or off (unset: on)."""
    return (value or "").strip().lower() in ("0", "false", "no", "off")


def nnx_jit(fun=None, **kwargs):
    """``flax.nnx.jit`` with :func:`compiler_options` added: a drop-in for NNX training loops (in-place updates of
    modules and ``nnx.Optimizer`` work as with ``nnx.jit``). Exported as ``jaxconv.jit``.

    ``nnx.jit`` takes no ``compiler_options``, so this is NNX's own functional pattern around ``jax.jit``: the
    arguments are split into a graph definition (static) and their state (traced) with ``nnx.split``, merged back
    inside the compiled function, which returns the new state of the arguments with its result; ``nnx.update``
    writes that state back into the caller's modules. Only public flax and jax names. Also a decorator with
    arguments: ``@jaxconv.jit(donate_argnums=0)``; ``static_argnums`` and ``donate_argnums`` count the arguments as
    ``jax.jit`` does."""
    from flax import nnx
    if fun is None:
        return lambda f: nnx_jit(f, **kwargs)
    options = {**compiler_options(), **(kwargs.pop("compiler_options", None) or {})}
    if not options:
        return nnx.jit(fun, **kwargs)
    return _SplitJit(fun, options, **kwargs)


class _SplitJit:
    """``fun`` of NNX objects and arrays compiled by ``jax.jit`` with ``compiler_options`` (see :func:`nnx_jit`)."""

    def __init__(self, fun, options: dict, *, static_argnums=(), donate_argnums=()):
        functools.update_wrapper(self, fun)
        self._fun = fun
        as_tuple = lambda v: (v,) if isinstance(v, int) else tuple(v)
        self._static, self._donate = as_tuple(static_argnums), as_tuple(donate_argnums)
        self._results: dict = {}  # the graph definition of (arguments, result), per input definition and statics
        # (graph definition and static arguments), the donated arguments' state, the other arguments' state
        self._jitted = jax.jit(self._pure, static_argnums=0, donate_argnums=1, compiler_options=options)

    def _pure(self, static, donated, kept):
        from flax import nnx
        graphdef, statics = static
        traced = nnx.merge(graphdef, nnx.State({**donated, **kept}))
        remaining, statics = iter(traced), dict(statics)
        args = [statics[i] if i in statics else next(remaining) for i in range(len(traced) + len(statics))]
        result = self._fun(*args)
        result_def, result_state = nnx.split((traced, result))
        self._results[static] = result_def
        return result_state

    def __call__(self, *args):
        from flax import nnx
        statics = tuple((i, args[i]) for i in self._static)
        positions = [i for i in range(len(args)) if i not in self._static]
        traced = tuple(args[i] for i in positions)
        graphdef, state = nnx.split(traced)
        donated = {k: v for k, v in state.items() if positions[k] in self._donate}
        kept = {k: v for k, v in state.items() if positions[k] not in self._donate}
        static = (graphdef, statics)
        new_state = self._jitted(static, donated, kept)
        new_traced, result = nnx.merge(self._results[static], new_state)
        _write_back(traced, new_traced)
        return result


def _write_back(old, new) -> None:
    """The compiled function's state of each argument written into the caller's objects (arrays are values)."""
    from flax import nnx
    if isinstance(old, tuple):
        for o, n in zip(old, new):
            _write_back(o, n)
    elif not isinstance(old, (jax.Array, np.ndarray, np.generic, int, float, complex, bool, str, type(None))):
        nnx.update(old, nnx.state(new))
