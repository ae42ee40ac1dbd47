"""bfloat16 matrix products: float32 accumulation on the low-precision kernel, forward and backward, and forward mode."""
import re

import jax
import jax.extend
import jax.numpy as jnp
import numpy as np
import pytest

from jaxconv import functional as F
from jaxconv import grads as G


def dots(fn, *args):
    """(operand dtypes, preferred dtype) of every dot_general in ``fn``'s program, sub-jaxprs included."""
    found = []

    def walk(jaxpr):
        for eqn in jaxpr.eqns:
            if eqn.primitive.name == "dot_general":
                found.append((tuple(str(v.aval.dtype) for v in eqn.invars), str(eqn.params["preferred_element_type"])))
            for sub in jax.extend.core.jaxprs_in_params(eqn.params):
                walk(sub)
    walk(jax.make_jaxpr(fn)(*args).jaxpr)
    return found


def bf16_rounding_of_float32(a, b):
    return np.asarray(jnp.dot(a.astype(jnp.float32), b.astype(jnp.float32)).astype(jnp.bfloat16), np.float32)


@pytest.fixture
def operands():
    k1, k2, k3 = jax.random.split(jax.random.PRNGKey(0), 3)
    return (jax.random.normal(k1, (16, 300), jnp.bfloat16), jax.random.normal(k2, (300, 24), jnp.bfloat16),
            jax.random.normal(k3, (16, 24), jnp.bfloat16))


def test_bfloat16_dense_accumulates_in_float32_forward_and_backward(operands):
    x, w, g = operands
    y = F.dense(x, w)
    assert y.dtype == jnp.bfloat16
    np.testing.assert_array_equal(np.asarray(y, np.float32), bf16_rounding_of_float32(x, w))

    _, pullback = jax.vjp(lambda x, w: F.dense(x, w), x, w)
    dx, dw = pullback(g)
    assert dx.dtype == dw.dtype == jnp.bfloat16
    np.testing.assert_array_equal(np.asarray(dx, np.float32), bf16_rounding_of_float32(g, w.T))
    np.testing.assert_array_equal(np.asarray(dw, np.float32), bf16_rounding_of_float32(x.T, g))
    mdx, mdw, _ = G.dense_vjp(g, x, w)
    np.testing.assert_array_equal(np.asarray(mdx, np.float32), np.asarray(dx, np.float32))
    np.testing.assert_array_equal(np.asarray(mdw, np.float32), np.asarray(dw, np.float32))

    low = (("bfloat16", "bfloat16"), "float32")
    assert set(dots(lambda x, w: F.dense(x, w), x, w)) == {low}
    assert dots(lambda x, w, g: G.dense_vjp(g, x, w)[:2], x, w, g) == [low, low]


def exported_dots(fn, platform, *args) -> set:
    """(lhs, rhs, result) element types of every dot in ``fn``'s program lowered for ``platform`` (no device of that
    kind needed: the program JAX would hand that platform's compiler)."""
    text = jax.export.export(jax.jit(fn), platforms=[platform])(*args).mlir_module()
    return set(re.findall(r"stablehlo.dot_general.*: \(tensor<[\dx]*x(\w+)>, tensor<[\dx]*x(\w+)>\) -> tensor<[\dx]*x(\w+)>",
                          text))


def test_bfloat16_backward_products_are_low_precision_dots_on_gpus_and_tpus(operands):
    """Reverse mode transposes the low-precision matmul's derivative into bfloat16 dots for GPUs and TPUs (their
    matrix units accumulate in float32), not into dots of a float32 cotangent, which they would run in float32.
    A CPU gets float32 dots of converted operands, what XLA:CPU makes of either form (values exact above)."""
    x, w, g = operands
    backward = lambda x, w, g: jax.vjp(lambda x, w: F.dense(x, w), x, w)[1](g)
    for platform in ("cuda", "tpu"):
        assert exported_dots(backward, platform, x, w, g) == {("bf16", "bf16", "bf16")}, platform
    assert exported_dots(backward, "cpu", x, w, g) == {("f32", "f32", "f32")}
    assert exported_dots(lambda x, w: F.dense(x, w), "cuda", x, w) == {("bf16", "bf16", "f32")}


def test_bfloat16_dense_forward_mode_is_the_sum_of_two_rounded_products(operands):
    """``jax.jvp`` (and so ``jax.hessian``) works through the low-precision matmul: its tangent is
    ``dx @ w + x @ dw``, each product accumulated in float32 and rounded to bfloat16, then added in bfloat16."""
    x, w, _ = operands
    dx, dw = (jax.random.normal(jax.random.key(k), a.shape, jnp.bfloat16) for k, a in ((5, x), (6, w)))
    _, tangent = jax.jvp(lambda x, w: F.dense(x, w), (x, w), (dx, dw))
    assert tangent.dtype == jnp.bfloat16
    want = (jnp.asarray(bf16_rounding_of_float32(dx, w), jnp.bfloat16)
            + jnp.asarray(bf16_rounding_of_float32(x, dw), jnp.bfloat16))
    np.testing.assert_array_equal(np.asarray(tangent, np.float32), np.asarray(want, np.float32))
    curvature = jax.hessian(lambda v: jnp.sum(F.dense(x, v[:, None]).astype(jnp.float32)))(w[:, 0])
    np.testing.assert_array_equal(curvature, np.zeros((w.shape[0],) * 2))  # linear in w: no curvature


def test_float32_dense_keeps_jax_s_own_dot_and_forward_mode(operands):
    x, w, g = (a.astype(jnp.float32) for a in operands)
    assert {ops for ops, _ in dots(lambda x, w, g: jax.vjp(lambda x, w: F.dense(x, w), x, w)[1](g), x, w, g)} == \
        {("float32", "float32")}
    tangent = jnp.ones_like(x)
    np.testing.assert_allclose(jax.jvp(lambda x: F.dense(x, w), (x,), (tangent,))[1], tangent @ w, rtol=1e-6)
