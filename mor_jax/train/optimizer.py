"""The optax optimizer: AdamW with a decay mask, global-norm clipping, schedules.

Schedules (all start at 0 and warm up linearly over `train.warmup_steps`; the
value at optimizer step t is the learning rate of the update that makes step
t + 1, as in the reference's trainer):
- `cosine`: cosine decay from the peak to `peak * min_lr_ratio` at step
  `num_steps` (the default, as the user asked);
- `wsd`: warmup-stable-decay (the official configs): constant peak, then a
  linear cool-down to `peak * min_lr_ratio` over the last `decay_fraction`
  of the run;
- `constant`: constant peak after the warm-up.

Weight decay applies to matrices and embeddings, not to norm weights or
biases (the reference's trainer excludes those by name). With
`train.freeze_routers` the MoR routers' parameters get no update at all (nor
weight decay); their gradients do not count in the clipping norm.
"""

from __future__ import annotations

import jax
import ml_collections
import optax

NO_DECAY_NAMES = ("scale", "bias")


def make_schedule(config: ml_collections.ConfigDict) -> optax.Schedule:
  """The learning-rate schedule of `config.train` (a function of the optimizer step)."""
  t = config.train
  peak = float(t.learning_rate)
  total = int(t.num_steps)
  warmup = int(t.warmup_steps)
  floor = peak * float(t.min_lr_ratio)
  if t.schedule == "cosine":
    if warmup >= total:
      return optax.linear_schedule(0.0, peak, max(1, warmup))
    return optax.warmup_cosine_decay_schedule(init_value=0.0, peak_value=peak, warmup_steps=warmup,
                                              decay_steps=total, end_value=floor)
  warm = optax.linear_schedule(0.0, peak, max(1, warmup))
  if t.schedule == "constant":
    return optax.join_schedules([warm, optax.constant_schedule(peak)], [warmup]) if warmup else \
        optax.constant_schedule(peak)
  if t.schedule == "wsd":
    decay = max(1, int(round(float(t.decay_fraction) * total)))
    start = max(warmup, total - decay)
    cool = optax.linear_schedule(peak, floor, max(1, total - start))
    pieces, bounds = [optax.constant_schedule(peak), cool], [start]
    if warmup:
      pieces, bounds = [warm] + pieces, [warmup] + bounds
    return optax.join_schedules(pieces, bounds)
  raise ValueError(f"config.train.schedule: unknown schedule {t.schedule!r}; use 'cosine', 'wsd' or 'constant'.")


def decay_mask(params):
  """True for the leaves that get weight decay: every kernel and embedding, no norm weight or bias."""
  def keep(path, _):
    names = [getattr(k, "key", getattr(k, "name", str(k))) for k in path]
    names = [str(n) for n in names]
    return not (names[-1] in NO_DECAY_NAMES or any("norm" in n for n in names[:-1]))
  return jax.tree_util.tree_map_with_path(keep, params)


def make_optimizer(config: ml_collections.ConfigDict) -> tuple[optax.GradientTransformation, optax.Schedule]:
  """(tx, schedule): clip_by_global_norm(train.grad_clip) (0: off), then AdamW with `decay_mask`.

  The optimizer state holds only moments and counts (no hyperparameters), so
  a resumed run uses the hyperparameters of its current config; the schedule
  is returned for logging (the learning rate of step t is `schedule(t)`).
  """
  t = config.train
  schedule = make_schedule(config)
  adamw = optax.adamw(learning_rate=schedule, b1=float(t.beta1), b2=float(t.beta2), eps=float(t.eps),
                      weight_decay=float(t.weight_decay), mask=decay_mask)
  clip = optax.clip_by_global_norm(float(t.grad_clip)) if t.grad_clip and t.grad_clip > 0 else optax.identity()
  tx = optax.chain(clip, adamw)
  if t.freeze_routers:
    tx = optax.multi_transform({"train": tx, "frozen": optax.set_to_zero()}, router_labels)
  return tx, schedule


def router_labels(params):
  """'frozen' for the MoR routers' parameters (modules router, router_<r>), 'train' for the others."""
  def label(path, _):
    names = [str(getattr(k, "key", getattr(k, "name", k))) for k in path]
    return "frozen" if any(n == "router" or n.startswith("router_") for n in names) else "train"
  return jax.tree_util.tree_map_with_path(label, params)
