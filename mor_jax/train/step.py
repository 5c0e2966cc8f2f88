"""The loss, `train_step(state, batch) -> (state, metrics)` and `eval_step`.

Both are pure functions of arrays. The same function runs under `jax.jit`
(pjit mode: it sees the global batch) and under `jax.pmap` (it sees one
device's shard and reduces over `axis_name`); see `parallel.py`.

Batch layout for training: every leaf is [accum, micro_batch, seq_len + 1]
(`tokens`, optional `segment_ids` / `positions` / `loss_mask`); micro-batch m
holds rows m * micro_batch ... of the global batch. Inputs are tokens[..., :-1],
targets tokens[..., 1:]; targets whose segment id is 0 (padding) are not
counted, nor, when the batch has a `loss_mask` (chat data), targets whose mask
is 0 (e.g. the user's turns): the loss is then per trained (assistant) token,
and the metrics add `examples` and `tokens` (non-padding) of the step.

Objective, exactly as for one large batch: the cross entropy is the sum of
token NLLs over the whole global batch divided by its number of counted
targets; the router's aux loss (already weighted) is averaged over the
micro-batches (and devices). Gradients are summed over micro-batches with
`lax.scan` (and over devices with `psum` in pmap mode) and applied once.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import optax

from mor_jax.config import ModelConfig
from mor_jax.kernels.policy import ExecPolicy
from mor_jax.model import routing
from mor_jax.model.transformer import MoRLM
from mor_jax.train.state import TrainState

# aux entries logged (averaged over micro-batches and devices); others (router_logits, selected, depth) are not
LOGGED_AUX = ("sampling_loss", "sampling_acc", "z_loss", "balancing_loss", "mean_recursions", "dropped_tokens",
              "tokens_per_recursion", "balancing_ratio")


def routing_mode_for_step(cfg: ModelConfig, step: int) -> str:
  """'topk_warmup' during expert-choice capacity warm-up (optimizer step < cap_warmup_steps), else 'topk'."""
  if cfg.mor_enable and cfg.mor_type == "expert" and cfg.cap_warmup_steps > 0 and step < cfg.cap_warmup_steps:
    return "topk_warmup"
  return "topk"


def split_batch(batch: dict, document_mask: bool):
  """(inputs, targets, target mask or None, positions or None, segment_ids or None) from [..., T+1] rows."""
  tokens = batch["tokens"]
  inputs, targets = tokens[..., :-1], tokens[..., 1:]
  seg = batch.get("segment_ids")
  mask = target_mask(batch)
  pos = batch["positions"][..., :-1] if document_mask and "positions" in batch else None
  seg_in = seg[..., :-1] if document_mask and seg is not None else None
  return inputs, targets, mask, pos, seg_in


def target_mask(batch: dict):
  """[..., T] bool: the targets that count (segment id > 0 and, with a `loss_mask`, a trained token); None: all."""
  seg, trained = batch.get("segment_ids"), batch.get("loss_mask")
  mask = None if seg is None else seg[..., 1:] > 0
  if trained is not None:
    mask = trained[..., 1:] > 0 if mask is None else mask & (trained[..., 1:] > 0)
  return mask


def _aux_stats(cfg: ModelConfig, aux: dict) -> dict:
  stats = {"aux_loss": jnp.asarray(aux.get("aux_loss", 0.0), jnp.float32)}
  for k in LOGGED_AUX:
    if k in aux:
      stats[k] = jnp.asarray(aux[k], jnp.float32)
  return stats


def _router_rngs(cfg: ModelConfig, state: TrainState, micro_index, axis_name):
  if not cfg.rand_router:
    return None
  key = jax.random.fold_in(jax.random.fold_in(state.rng, state.step), micro_index)
  if axis_name is not None:
    key = jax.random.fold_in(key, jax.lax.axis_index(axis_name))
  return {"router": key}


def _examples_and_tokens(batch: dict) -> dict:
  """Chat batches (with a `loss_mask`): {'examples': examples in the step (segments of whole examples, numbered
  1, 2, ... per row), 'tokens': non-padding tokens}; {} for other batches."""
  seg = batch.get("segment_ids")
  if "loss_mask" not in batch or seg is None:
    return {}
  return {"examples": jnp.sum(jnp.max(seg, axis=-1)).astype(jnp.float32),
          "tokens": jnp.sum(seg > 0).astype(jnp.float32)}


def train_step(state: TrainState, batch: dict, *, cfg: ModelConfig, tx: optax.GradientTransformation,
               schedule: optax.Schedule, routing_mode: str = "topk", document_mask: bool = False,
               axis_name: str | None = None, policy: ExecPolicy = ExecPolicy()) -> tuple[TrainState, dict]:
  """One optimizer step over `accum` micro-batches. Returns (new state, metrics of this step)."""
  model = MoRLM(cfg, policy)
  accum = batch["tokens"].shape[0]
  shards = jax.lax.psum(1, axis_name) if axis_name is not None else 1
  mask = target_mask(batch)
  count = jnp.sum(mask).astype(jnp.float32) if mask is not None else jnp.float32(batch["tokens"][..., 1:].size)
  seen = _examples_and_tokens(batch)
  if axis_name is not None:
    count = jax.lax.psum(count, axis_name)
    seen = jax.lax.psum(seen, axis_name)
  count = jnp.maximum(count, 1.0)
  extra = {"router_bias": state.router_bias} if state.router_bias else {}

  def objective(params, micro, micro_index):
    inputs, targets, mask, pos, seg_in = split_batch(micro, document_mask)
    nll, _, aux = model.apply({"params": params, **extra}, inputs, targets, mask, pos, seg_in,
                              routing_mode=routing_mode, step=state.step,
                              rngs=_router_rngs(cfg, state, micro_index, axis_name), method=MoRLM.loss_terms)
    stats = _aux_stats(cfg, aux)
    return nll / count + stats["aux_loss"] / (accum * shards), (nll, stats)

  grad_fn = jax.value_and_grad(objective, has_aux=True)

  def body(carry, xs):
    grads_acc, nll_acc = carry
    micro, i = xs
    (_, (nll, stats)), grads = grad_fn(state.params, micro, i)
    grads_acc = jax.tree.map(jnp.add, grads_acc, grads)
    return (grads_acc, nll_acc + nll), stats

  if accum == 1:  # no accumulation buffers: one fewer pass over the gradients
    (_, (nll_sum, stats)), grads = grad_fn(state.params, jax.tree.map(lambda x: x[0], batch), 0)
  else:
    zeros = jax.tree.map(jnp.zeros_like, state.params)
    (grads, nll_sum), stats = jax.lax.scan(body, (zeros, jnp.float32(0.0)), (batch, jnp.arange(accum)))
    stats = jax.tree.map(lambda x: jnp.mean(x, axis=0), stats)
  if axis_name is not None:
    grads = jax.lax.psum(grads, axis_name)
    nll_sum = jax.lax.psum(nll_sum, axis_name)
    stats = jax.lax.pmean(stats, axis_name)

  grad_norm = optax.tree.norm(grads)
  updates, opt_state = tx.update(grads, state.opt_state, state.params)
  params = optax.apply_updates(state.params, updates)
  router_bias = state.router_bias
  if router_bias and "balancing_ratio" in stats:
    router_bias = {"bias": routing.loss_free_bias_update(router_bias["bias"], stats["balancing_ratio"],
                                                           cfg.bal_update_rate)}
  loss = nll_sum / count
  metrics = {"loss": loss, "total_loss": loss + stats["aux_loss"], "grad_norm": grad_norm,
             "learning_rate": jnp.asarray(schedule(state.step), jnp.float32),
             "param_norm": optax.tree.norm(params), "target_tokens": count, **seen, **stats}
  if not cfg.mor_enable:     # no routers: no router loss to report
    metrics.pop("aux_loss")
  new_state = state.replace(step=state.step + 1, params=params, opt_state=opt_state, router_bias=router_bias)
  return new_state, metrics


def eval_step(state: TrainState, batch: dict, *, cfg: ModelConfig, document_mask: bool = False,
              axis_name: str | None = None, policy: ExecPolicy = ExecPolicy()) -> dict:
  """Validation sums over a batch of [B, seq_len + 1] rows: {'nll_sum', 'count'} (training-style top-k routing)."""
  model = MoRLM(cfg, policy)
  inputs, targets, mask, pos, seg_in = split_batch(batch, document_mask)
  rngs = {"router": jax.random.fold_in(state.rng, 0x7FFFFFFF)} if cfg.rand_router else None
  nll, count, _ = model.apply(state.variables(), inputs, targets, mask, pos, seg_in, routing_mode="topk",
                              step=state.step, rngs=rngs, method=MoRLM.loss_terms)
  out = {"nll_sum": nll, "count": count}
  if axis_name is not None:
    out = jax.lax.psum(out, axis_name)
  return out


def make_train_step(cfg: ModelConfig, tx, schedule, *, document_mask: bool = False, axis_name: str | None = None,
                    policy: ExecPolicy = ExecPolicy()):
  """`train_step` with everything static bound except (state, batch, routing_mode)."""
  return functools.partial(train_step, cfg=cfg, tx=tx, schedule=schedule, document_mask=document_mask,
                           axis_name=axis_name, policy=policy)


def make_eval_step(cfg: ModelConfig, *, document_mask: bool = False, axis_name: str | None = None,
                   policy: ExecPolicy = ExecPolicy()):
  return functools.partial(eval_step, cfg=cfg, document_mask=document_mask, axis_name=axis_name, policy=policy)
