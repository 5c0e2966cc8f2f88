"""Independent batch groups: a layer run once per group of rows, for XLA:CPU (see policy.resolve_batch_groups).

Every row is computed exactly as in one call (attention and routing are per
sequence); only the weight-gradient sums are split. jnp.split cuts the rows,
so the gradient is a concatenate.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def run_in_groups(fn, groups: int, kv_axis: int, x_BTD, *row_args):
  """fn(x, *row_args) -> (out, kv) run on `groups` groups of rows; outputs and kv concatenated back in order.

  Arrays in `row_args` (pytrees allowed) whose leading axis is the batch are
  split with x; others (None, arrays broadcast over the batch) go whole to
  every group. kv is concatenated on `kv_axis`.
  """
  B = x_BTD.shape[0]

  def parts(a):
    return [a] * groups if a is None or a.shape[0] != B else jnp.split(a, groups, axis=0)

  xs = parts(x_BTD)
  split_args = [jax.tree.map(parts, a) for a in row_args]
  is_parts = lambda l: isinstance(l, list)
  outs = [fn(xs[g], *[jax.tree.map(lambda l, g=g: l[g], a, is_leaf=is_parts) for a in split_args])
          for g in range(groups)]
  return (jnp.concatenate([o[0] for o in outs], axis=0),
          jax.tree.map(lambda *a: jnp.concatenate(a, axis=kv_axis), *[o[1] for o in outs]))
