"""jaxconv.compiler: per-function XLA options, and when they are left out; the compilation cache."""
import os

import jax
import numpy as np
import optax
import pytest

from jaxconv import compiler
from jaxconv.timing import jitted_train_step
from jaxconv.models import create_model

KEY = "xla_cpu_experimental_ynn_fusion_type"


@pytest.fixture
def fresh_probe():
    compiler._accepted_cpu_options.cache_clear()
    yield
    compiler._accepted_cpu_options.cache_clear()


def test_cpu_gets_the_options(monkeypatch, fresh_probe):
    monkeypatch.delenv("JAXCONV_XLA_OPTIONS", raising=False)
    monkeypatch.setenv("XLA_FLAGS", "")
    assert compiler.compiler_options("cpu") == compiler.CPU_OPTIONS


def test_a_program_run_once_gets_less_optimisation_on_a_cpu_only(monkeypatch, fresh_probe):
    monkeypatch.delenv("JAXCONV_XLA_OPTIONS", raising=False)
    monkeypatch.setenv("XLA_FLAGS", "")
    assert compiler.compiler_options("cpu", once=True) == {**compiler.CPU_OPTIONS, **compiler.ONCE_CPU_OPTIONS}
    assert compiler.compiler_options("gpu", once=True) == {}
    seen = {}
    monkeypatch.setattr(compiler.jax, "jit", lambda f, **kw: seen.update(kw) or f)
    compiler.jit_once(abs)
    assert seen["compiler_options"] == compiler.compiler_options(once=True)


@pytest.mark.parametrize("env, flags, backend", [
    ({"JAXCONV_XLA_OPTIONS": "0"}, "", "cpu"),
    ({"JAXCONV_XLA_OPTIONS": "off"}, "", "cpu"),
    ({}, f"--{KEY}=", "cpu"),
    ({}, "", "gpu"),
    ({}, "", "tpu"),
])
def test_options_left_out(monkeypatch, env, flags, backend):
    monkeypatch.delenv("JAXCONV_XLA_OPTIONS", raising=False)
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    monkeypatch.setenv("XLA_FLAGS", flags)
    assert compiler.compiler_options(backend) == {}


def test_an_option_this_jaxlib_rejects_is_dropped(monkeypatch, fresh_probe):
    monkeypatch.setattr(compiler, "CPU_OPTIONS", {"xla_cpu_no_such_option": "1", KEY: "NOT_A_FUSION_TYPE"})
    monkeypatch.setenv("XLA_FLAGS", "")
    assert compiler.compiler_options("cpu") == {}
    assert float(compiler.jit(lambda x: x * 2)(3.0)) == 6.0


def test_caller_options_win(monkeypatch):
    seen = {}
    monkeypatch.setattr(compiler.jax, "jit", lambda f, **kw: seen.update(kw) or f)
    compiler.jit(abs, compiler_options={KEY: "LIBRARY_FUSION_TYPE_DOT"}, donate_argnums=0)
    assert seen["compiler_options"][KEY] == "LIBRARY_FUSION_TYPE_DOT" and seen["donate_argnums"] == 0


def test_training_steps_agree_with_xla_defaults():
    """Same model, same batch: jaxconv's options change the kernels XLA picks, not the numbers."""
    model = create_model("lenet5", seed=3)
    x = jax.random.normal(jax.random.key(0), (16, *model.input_shape))
    y = jax.random.randint(jax.random.key(1), (16,), 0, 10)
    losses = {}
    for name, jit in (("jaxconv", compiler.jit), ("xla", jax.jit)):
        step, state = jitted_train_step(model, x, y, optax.sgd(0.1, momentum=0.9), jit=jit)
        trace = []
        for _ in range(5):
            *state, loss = step(*state)
            trace.append(float(loss))
        losses[name] = trace
    np.testing.assert_allclose(losses["jaxconv"], losses["xla"], rtol=1e-5)
    assert losses["xla"][-1] < losses["xla"][0]


def test_the_command_keeps_compiled_steps_for_the_next_run(tmp_path):
    """`jaxconv train` turns on JAX's persistent compilation cache under jaxconv's cache folder; a second run
    finds its steps there (entries are not re-written) and trains to the same numbers."""
    import json
    import subprocess
    import sys
    env = {**os.environ, "JAXCONV_DATA": str(tmp_path / "cache"), "JAXCONV_COMPILATION_CACHE": "1"}
    env.pop("JAX_COMPILATION_CACHE_DIR", None)
    runs = []
    for name in ("cold", "warm"):
        done = subprocess.run([sys.executable, "-m", "jaxconv", "train", "--epochs", "1", "--out", str(tmp_path / name)],
                              env=env, capture_output=True, text=True, timeout=300)
        assert done.returncode == 0, done.stderr[-2000:]
        runs.append(sorted(os.listdir(tmp_path / "cache" / "xla")))
    assert runs[0] and runs[1] == runs[0]  # the warm run added nothing: every step came from the cache
    from jaxconv.train import TIMING_FIELDS
    strip = lambda name: [{k: v for k, v in json.loads(line).items() if k not in TIMING_FIELDS}
                          for line in open(tmp_path / name / "metrics.jsonl")]
    assert strip("cold") == strip("warm")


# A process that compiles one program into the cache at sys.argv[1]; the size of the files it may write is capped
# at sys.argv[2] bytes (0: none): a write past the cap stops part-way, as a write does when its process is killed.
CACHE_WRITER = """
import resource, sys
from jaxconv import compiler
compiler.use_compilation_cache(sys.argv[1])
cap = int(sys.argv[2])
if cap:
    resource.setrlimit(resource.RLIMIT_FSIZE, (cap, cap))
import jax, jax.numpy as jnp
print(float(jax.jit(lambda x: jnp.sin(x) @ x.T)(jnp.ones((32, 32))).sum()))
"""


def test_a_cache_entry_cut_off_while_written_costs_a_compile_not_a_wrong_result(tmp_path):
    """JAX writes each entry in place, so a write stopped part-way leaves a truncated entry (docs/upstream.md): the
    runs after it warn, compile that program again and compute the same number; jaxconv patches nothing of JAX's."""
    import subprocess
    import sys
    folder = str(tmp_path / "xla")
    os.makedirs(folder)
    env = {**os.environ, "PYTHONDONTWRITEBYTECODE": "1"}
    run = lambda cap: subprocess.run([sys.executable, "-c", CACHE_WRITER, folder, str(cap)], env=env,
                                     capture_output=True, text=True, timeout=120)
    cut = run(1000)  # every entry here is 1.5-4 KB compressed
    assert "Error writing persistent compilation cache entry" in cut.stderr, cut.stderr[-2000:]
    for _ in range(2):
        done = run(0)
        assert done.returncode == 0, done.stderr[-2000:]
        assert float(done.stdout) == float(cut.stdout or done.stdout)


def _nnx_step(jit):
    from flax import nnx
    from jaxconv import functional as F

    @jit
    def step(model, opt, x, y):
        loss, grads = nnx.value_and_grad(lambda m: F.cross_entropy(m(x), y))(model)
        opt.update(model, grads)
        return loss
    return step


def test_jaxconv_jit_is_nnx_jit_with_the_options_and_updates_in_place():
    from flax import nnx
    import jaxconv
    x = jax.random.normal(jax.random.key(0), (8, 40, 1))
    y = jax.numpy.arange(8) % 10
    losses, kernels = {}, {}
    for name, jit in (("jaxconv", jaxconv.jit), ("nnx", nnx.jit)):
        model = create_model("mnist1d_cnn")
        before = np.asarray(model.layers[0].kernel[...]).copy()
        opt = nnx.Optimizer(model, optax.sgd(0.1), wrt=nnx.Param)
        step = _nnx_step(jit)
        losses[name] = [float(step(model, opt, x, y)) for _ in range(3)]
        kernels[name] = np.asarray(model.layers[0].kernel[...])
        assert not np.allclose(before, kernels[name])  # the model was updated in place
    assert losses["jaxconv"][2] < losses["jaxconv"][0]
    np.testing.assert_allclose(losses["jaxconv"], losses["nnx"], rtol=1e-5)
    np.testing.assert_allclose(kernels["jaxconv"], kernels["nnx"], rtol=1e-5, atol=1e-7)


def test_jaxconv_jit_hands_its_options_to_xla(monkeypatch):
    """An option XLA does not know fails the compile, naming it: the options do reach the compiler."""
    from flax import nnx
    import jaxconv
    monkeypatch.setattr(compiler, "compiler_options", lambda backend=None: {"xla_jaxconv_no_such_option": "1"})
    model = create_model("mnist1d_cnn")
    step = _nnx_step(jaxconv.jit)
    with pytest.raises(Exception, match="xla_jaxconv_no_such_option"):
        step(model, nnx.Optimizer(model, optax.sgd(0.1), wrt=nnx.Param), jax.numpy.zeros((2, 40, 1)),
             jax.numpy.zeros(2, int))


def test_steps_per_dispatch_is_one_on_a_cpu_and_a_scan_on_accelerators():
    assert compiler.steps_per_dispatch("cpu") == 1
    assert compiler.steps_per_dispatch("gpu") == compiler.steps_per_dispatch("tpu") == 32
    assert compiler.steps_per_dispatch() == (1 if jax.default_backend() == "cpu" else 32)


def test_jaxconv_jit_donates_and_keeps_static_arguments_as_nnx_jit_does():
    """Donated: the model's state only (the batch stays usable); a static argument selects its own program."""
    from flax import nnx
    import jaxconv
    from jaxconv import functional as F
    x = jax.random.normal(jax.random.key(1), (8, 40, 1))
    y = jax.numpy.arange(8) % 10
    results = {}
    for name, jit in (("jaxconv", jaxconv.jit), ("nnx", nnx.jit)):
        model = create_model("mnist1d_cnn")
        opt = nnx.Optimizer(model, optax.sgd(0.1), wrt=nnx.Param)

        @jit(static_argnums=3, donate_argnums=(0, 1))
        def step(model, opt, x, scale, y):
            loss, grads = nnx.value_and_grad(lambda m: scale * F.cross_entropy(m(x), y))(model)
            opt.update(model, grads)
            return loss

        results[name] = [float(step(model, opt, x, s, y)) for s in (1.0, 2.0, 1.0)]
        results[name].append(float(x.sum()))  # x was not donated
        results[name].append(float(np.asarray(model.layers[0].kernel[...]).sum()))
    np.testing.assert_allclose(results["jaxconv"], results["nnx"], rtol=1e-5)
