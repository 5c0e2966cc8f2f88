"""The one tiny-config factory the tests share (instead of a `tiny()` per test file).

`tiny_config(...)` returns a full ConfigDict (mor_jax's defaults with a few-thousand-parameter model) that a
test overrides further; `tiny_model_config(...)` validates it for one device and returns the model config.
Overrides are given as `section__field=value` (e.g. `train__num_steps=6`, `mor__cap_warmup_steps=2`).
"""

from __future__ import annotations

import ml_collections

from mor_jax.config import defaults as get_config   # the defaults (every field declared once)
from mor_jax import config as C


def layers_for(strategy: str, R: int, depth: int = 1) -> int:
  """Layers of the equivalent vanilla model for a shared block of `depth` layers applied R times."""
  if strategy == "none":
    return max(1, depth)
  return (2 if strategy.startswith("middle") else 0) + R * depth


def tiny_config(strategy: str = "none", R: int = 1, mor: str | None = None, *, depth: int = 1,
                vocab: int = 128, seq_len: int = 16, max_seq_len: int = 64, num_layers: int | None = None,
                **overrides) -> ml_collections.ConfigDict:
  """A tiny model: hidden 32, 4 heads / 2 KV heads, MLP 64; `mor` = None | 'expert' | 'token'."""
  c = get_config()
  c.name = "tiny"
  c.model.update(vocab_size=vocab, hidden_size=32, intermediate_size=64,
                 num_layers=num_layers if num_layers is not None else layers_for(strategy, R, depth),
                 num_heads=4, num_kv_heads=2, max_seq_len=max_seq_len)
  c.data.seq_len = seq_len
  c.train.routing_pictures = False      # an extra compile per run; tests/test_train_routing_pictures.py turns it on
  c.recursion.update(strategy=strategy, num_recursions=R)
  if mor:
    c.mor.update(enable=True, type=mor)
    if mor == "token":
      c.mor.update(router_func="softmax", alpha=1.0)
  for key, value in overrides.items():
    section, field = key.split("__")
    c[section][field] = value
  return c


def tiny_model_config(*args, **kwargs):
  """`tiny_config(...)` validated for one device, as the frozen model config."""
  return C.model_config(C.validate(tiny_config(*args, **kwargs), num_devices=1))
