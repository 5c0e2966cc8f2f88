"""Custom-gradient projections for XLA:CPU: plain linear, RMSNorm->linear, SwiGLU->down.

Training on XLA:CPU is bound by memory traffic and by the layouts its matmul
runs fast. These kernels compute exactly what model/layers.py writes plainly
(same parameters, same products up to float rounding) with hand-written
backward passes that
- keep only their inputs as residuals (x and its rstd; the gate/up output)
  instead of four to six activations of the same size, recomputing the cheap
  elementwise parts backward (the layer scan stacks every residual);
- take weight gradients in the layout XLA:CPU runs fastest (`weight_grad`).
The model uses them when the execution policy says `cpu_kernels`
(kernels/policy.py); GPUs keep XLA's own fusion.
"""

from __future__ import annotations

import functools
import itertools

import jax
import jax.numpy as jnp
from flax import linen as nn


def split_widths(y, widths):
  """y cut along its last axis into consecutive pieces of the given widths.

  jnp.split rather than slices: its gradient is one concatenate, where slices'
  would be a sum of zero-padded arrays.
  """
  return jnp.split(y, list(itertools.accumulate(widths))[:-1], axis=-1)


def _mm(x, w):
  return jax.lax.dot_general(x, w, (((x.ndim - 1,), (0,)), ((), ())))


def _dx(g, w, dtype=None):
  """g @ w^T (the input gradient of x @ w)."""
  return jax.lax.dot_general(g, w, (((g.ndim - 1,), (1,)), ((), ())), preferred_element_type=dtype)


def weight_grad(x, g, direct: bool = False):
  """x^T g over all leading axes.

  XLA:CPU's matmul runs the token-contracting form at very different speeds
  per shape: for the qkv, o_proj and head shapes a materialised x^T is faster
  (the barrier keeps XLA from folding the transpose back), for the MLP's
  gate/up and down shapes the direct contraction is (measured per core,
  transposed -> direct: gate/up 80 -> 90, down 56 -> 62 GFLOP/s; qkv 75 -> 57),
  and it saves writing the transpose. `direct` picks the direct form.
  """
  x2, g2 = x.reshape(-1, x.shape[-1]), g.reshape(-1, g.shape[-1])
  if direct:
    return jax.lax.dot_general(x2, g2, (((0,), (0,)), ((), ())))
  return jnp.dot(jax.lax.optimization_barrier(x2.T), g2)


@jax.custom_vjp
def linear(x, w):
  """x @ w whose backward pass takes dW in XLA:CPU's fast layout (see weight_grad)."""
  return _mm(x, w)


def _linear_fwd(x, w):
  return linear(x, w), (x, w)


def _linear_bwd(res, g):
  x, w = res
  return _dx(g, w).astype(x.dtype), weight_grad(x, g).astype(w.dtype)


linear.defvjp(_linear_fwd, _linear_bwd)


def linear_dot_general(lhs, rhs, dimension_numbers, precision=None, preferred_element_type=None, **kw):
  """nn.Dense's dot_general, routed to `linear` for the plain [.., D] x [D, N] form."""
  (lc, rc), (lb, rb) = dimension_numbers
  if tuple(lc) == (lhs.ndim - 1,) and tuple(rc) == (0,) and not lb and not rb and rhs.ndim == 2 \
      and preferred_element_type in (None, lhs.dtype) and lhs.dtype == rhs.dtype:
    return linear(lhs, rhs)
  return jax.lax.dot_general(lhs, rhs, dimension_numbers, precision=precision,
                             preferred_element_type=preferred_element_type, **kw)


def _normalise(x, scale, eps):
  """RMSNorm as model/layers.py writes it (float32 statistics, cast back, times scale)."""
  x32 = x.astype(jnp.float32)
  y = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + eps)
  return y.astype(x.dtype) * scale.astype(x.dtype)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4))
def norm_linear(x, scale, kernels, eps, direct_dw):
  """RMSNorm(x; scale) @ concat(kernels), whose backward pass recomputes the normalised x from x and rstd.

  The kernels come in separately and are concatenated inside, forward and
  backward: the residuals are then the layer's own parameters, which a scan
  over layers forwards as they are, rather than a concatenated copy that it
  would stack per layer (and zero-fill) every step. `direct_dw` picks the
  weight-gradient form (see weight_grad).
  """
  return _mm(_normalise(x, scale, eps), jnp.concatenate(kernels, axis=1))


def _norm_linear_fwd(x, scale, kernels, eps, direct_dw):
  del direct_dw
  x32 = x.astype(jnp.float32)
  rstd = jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + eps)
  n = (x32 * rstd).astype(x.dtype) * scale.astype(x.dtype)
  return _mm(n, jnp.concatenate(kernels, axis=1)), (x, rstd, scale, kernels)


def _norm_linear_bwd(eps, direct_dw, res, g):
  del eps
  x, rstd, scale, kernels = res
  w = jnp.concatenate(kernels, axis=1)
  xhat = x.astype(jnp.float32) * rstd
  n = xhat.astype(x.dtype) * scale.astype(x.dtype)
  dws = split_widths(weight_grad(n, g, direct_dw).astype(w.dtype), [k.shape[1] for k in kernels])
  dn = _dx(g, w, jnp.float32)
  lead = tuple(range(x.ndim - 1))
  dscale = jnp.sum(dn * xhat.astype(x.dtype).astype(jnp.float32), axis=lead).astype(scale.dtype)
  dxhat = dn * scale.astype(jnp.float32)
  dx = rstd * (dxhat - xhat * jnp.mean(dxhat * xhat, axis=-1, keepdims=True))
  return dx.astype(x.dtype), dscale, tuple(dws)


norm_linear.defvjp(_norm_linear_fwd, _norm_linear_bwd)


@jax.custom_vjp
def swiglu_down(gu, w):
  """(silu(g) * u) @ w for gu = [g, u]; the backward pass recomputes the activation from gu."""
  n = w.shape[0]
  return _mm(nn.silu(gu[..., :n]) * gu[..., n:], w)


def _swiglu_down_fwd(gu, w):
  return swiglu_down(gu, w), (gu, w)


def _swiglu_down_bwd(res, dy):
  gu, w = res
  n = w.shape[0]
  g, u = gu[..., :n], gu[..., n:]
  h = nn.silu(g) * u
  dw = weight_grad(h, dy, direct=True).astype(w.dtype)
  dh = _dx(dy, w, jnp.float32)
  g32, u32 = g.astype(jnp.float32), u.astype(jnp.float32)
  sg = jax.nn.sigmoid(g32)
  dg = dh * u32 * sg * (1 + g32 * (1 - sg))
  du = dh * g32 * sg
  return jnp.concatenate([dg, du], axis=-1).astype(gu.dtype), dw


swiglu_down.defvjp(_swiglu_down_fwd, _swiglu_down_bwd)
