"""mor_jax.kernels: the CPU attention kernel (blocked causal = masked = XLA's), the fused cross entropy, the CPU
kernels computing the plain model, and the execution policy resolved per backend."""

import dataclasses
import logging
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mor_jax.kernels import cpu_attention, policy as policy_lib
from mor_jax.kernels.policy import ExecPolicy
from mor_jax.model.attention import attend
from mor_jax.model.transformer import init_variables
from test_model import CPU, _loss_and_grads, run, tiny, tiny_cfg, tokens

pytestmark = pytest.mark.usefixtures("fast_compilation")


@pytest.mark.parametrize("T", [64, 256])
def test_blocked_causal_attention_matches_masked(T):
  """Local causal attention skips key blocks after each query block; it must equal the dense-mask path."""
  assert cpu_attention.causal_blocks(T) == T // 64  # the blocked path is exercised for T=256
  B, H, K, E = 2, 4, 2, 16
  ks = jax.random.split(jax.random.PRNGKey(3), 4)
  q, k, v = (jax.random.normal(ks[i], (B, T, n, E)) for i, n in enumerate((H, K, K)))
  g = jax.random.normal(ks[3], (B, T, H, E))
  mask = jnp.tril(jnp.ones((T, T), bool))[None].repeat(B, 0)

  def loss(fn):
    return jax.jit(jax.value_and_grad(lambda q, k, v: jnp.sum(fn(q, k, v) * g), argnums=(0, 1, 2)))(q, k, v)

  blocked = loss(lambda q, k, v: cpu_attention.attention(q, k, v, None))
  dense = loss(lambda q, k, v: cpu_attention.attention(q, k, v, mask))
  plain = loss(lambda q, k, v: attend(q, k, v, mask, ExecPolicy()))   # jax.nn.dot_product_attention (XLA)
  for a, b, c in zip(jax.tree.leaves(blocked), jax.tree.leaves(dense), jax.tree.leaves(plain)):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(a, c, rtol=1e-4, atol=1e-4)


def test_cross_entropy_gradient_matches_autodiff():
  from mor_jax.model.losses import cross_entropy
  ks = jax.random.split(jax.random.PRNGKey(4), 3)
  logits = 3 * jax.random.normal(ks[0], (2, 5, 11))
  targets = jax.random.randint(ks[1], (2, 5), 0, 11)
  mask = jax.random.bernoulli(ks[2], 0.7, (2, 5))

  def plain(l):
    nll = jax.nn.logsumexp(l, -1) - jnp.take_along_axis(l, targets[..., None], -1)[..., 0]
    return jnp.sum(nll * mask)

  np.testing.assert_allclose(cross_entropy(logits, targets, mask)[0], plain(logits), rtol=1e-6)
  np.testing.assert_allclose(jax.grad(lambda l: cross_entropy(l, targets, mask)[0])(logits), jax.grad(plain)(logits),
                             rtol=1e-5, atol=1e-6)


# --------------------------------------------------- execution policy, kernels
@pytest.mark.parametrize("kind", [("middle_cycle", 2, "expert"), ("middle_cycle", 3, "token"), ("sequence", 2, None)])
def test_cpu_kernels_compute_the_plain_model(kind):
  """The CPU policy (custom attention, fused norm/SwiGLU kernels, batch groups, loss chunks) = the plain Llama path."""
  cfg = tiny(*kind)
  p = init_variables(cfg, jax.random.PRNGKey(0))["params"]
  toks = tokens(B=4)
  plain = ExecPolicy()
  np.testing.assert_allclose(run(cfg, {"params": p}, toks, policy=CPU)[0],
                             run(cfg, {"params": p}, toks, policy=plain)[0], atol=2e-5)
  l0, g0 = _loss_and_grads(cfg, p, toks, policy=plain)
  l1, g1 = _loss_and_grads(cfg, p, toks, policy=CPU)
  np.testing.assert_allclose(l0, l1, rtol=1e-5)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=2e-5), g0, g1)


def test_policy_is_resolved_per_backend_and_decoding_gets_a_cached_kernel(caplog):
  c = tiny_cfg()
  gpu, tpu = policy_lib.resolve(c, "gpu"), policy_lib.resolve(c, "tpu")
  assert (CPU.attention, CPU.cpu_kernels, CPU.batch_groups, CPU.loss_chunk_tokens) == ("custom", True, 2, 512)
  assert (gpu.attention, gpu.cpu_kernels, gpu.batch_groups, gpu.loss_chunk_tokens) == ("cudnn", False, 1, 0)
  assert tpu.attention == "xla" and gpu.scan_unroll > 100 and CPU.scan_unroll == 1
  # cuDNN's kernel takes plain causal masks only: decoding (dense cache masks) runs XLA's on GPU, not the CPU kernel
  assert gpu.for_decoding().attention == "xla" and CPU.for_decoding().attention == "custom"
  assert dataclasses.replace(CPU, remat_policy="full", dtype="bfloat16").for_decoding() == \
      dataclasses.replace(CPU, batch_groups=1, loss_chunk_tokens=0, dtype="bfloat16")
  assert policy_lib.for_decoding() == ExecPolicy()
  assert policy_lib.resolve(tiny_cfg(execution__cpu_kernels="off"), "cpu").cpu_kernels is False
  assert "attention custom" in CPU.describe() and "batch_groups 2" in CPU.describe()
  # the old model.<knob> keys still work, with a warning naming the new key
  with caplog.at_level(logging.WARNING):
    old = tiny_cfg(model__attention_impl="dot_product", model__dtype="bfloat16")
  assert policy_lib.resolve(old, "cpu").attention == "xla" and policy_lib.resolve(old, "cpu").dtype == "bfloat16"
  assert "config.model.attention_impl is deprecated: renamed to config.execution.attention_impl" in caplog.text


def test_model_modules_never_ask_for_the_backend():
  root = pathlib.Path(__file__).parent.parent / "mor_jax"
  for f in (root / "model").glob("*.py"):
    assert "default_backend" not in f.read_text(), f
  assert not [f for f in root.rglob("*.py") if "import configs" in f.read_text() or "from configs" in f.read_text()]
