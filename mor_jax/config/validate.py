"""Config validation and derived values.

`validate(config)` is called once, before anything is built. It moves renamed
keys to their new names (config/upgrade.py), fills fields a file leaves out
with their defaults, checks every value against the schema (type, finite,
interval or choices) and the fields against each other, and returns an
unlocked copy with derived fields filled in. Every error is a one-line
`ConfigError` naming the field and the fix.
"""

from __future__ import annotations

import math

from absl import logging
import ml_collections

from mor_jax.config import naming, schema
from mor_jax.config.upgrade import upgrade
from mor_jax.errors import ConfigError


def _fail(field: str, msg: str):
  raise ConfigError(f"config.{field}: {msg}")


def validate(config: ml_collections.ConfigDict, num_devices: int | None = None) -> ml_collections.ConfigDict:
  """Checks `config` and returns an unlocked copy with derived fields set.

  `num_devices` (default: all devices when a train section needs it) is used
  to derive gradient accumulation.
  """
  c = ml_collections.ConfigDict(_with_defaults(upgrade(config.to_dict())))
  _check_set(c)
  for f in schema.FIELDS:
    _check_field(f, _get(c, f.key))
  _check_model(c)
  _check_mor(c)
  if c.init.from_path and c.recursion.strategy == "none" and c.init.strategy != "stepwise":
    _fail("init.strategy", f"{c.init.strategy!r} chooses pretrained layers for a shared block, but "
          "recursion.strategy is 'none' (vanilla), whose layers are copied one to one; set recursion.strategy "
          "(and num_recursions) or leave init.strategy at 'stepwise'.")
  if c.data.seq_len > c.model.max_seq_len:
    _fail("data.seq_len", f"{c.data.seq_len} exceeds model.max_seq_len {c.model.max_seq_len}.")
  _check_data(c)
  _check_train(c, num_devices)
  c.name = naming.run_name(c)
  return c


def _check_set(c):
  """Fields a config leaves unset (None) are taken from config.init.from_path before validation (the trainer does
  it: interop/pretrained_init.resolve_from_path); any still unset here has no source."""
  unset = [f.key for f in schema.FIELDS if _get(c, f.key) is None]
  if unset:
    more = f" (and {len(unset) - 1} more: {', '.join(unset[1:4])}{', ...' if len(unset) > 4 else ''})" \
        if len(unset) > 1 else ""
    fix = ("training reads them from config.init.from_path; this command does not (--mode=info --workdir=W "
           "describes W's model)" if c.init.from_path else "set --config.init.from_path=W (a mor-jax workdir or a "
           "Hugging Face model directory), or set the field")
    _fail(unset[0], f"is not set{more}. A config that leaves the architecture unset (configs/finetune_chat.py) "
          f"takes it from the model it starts from: {fix}.")


def _check_data(c):
  d, t = c.data, c.train
  if d.corpus == "chat" and not d.document_mask:
    _fail("data.document_mask", "is False, but packed chat examples must not attend to each other; set it to True.")
  if t.epochs > 0 and d.corpus != "chat":
    _fail("train.epochs", f"is {t.epochs}, but runs are measured in epochs only on chat data (data.corpus='chat'); "
          "set train.num_steps instead and train.epochs=0.")
  if t.freeze_routers and not c.mor.enable:
    _fail("train.freeze_routers", "is True but the model has no routers (mor.enable is False); set it to False.")


def _get(c, key):
  for part in key.split("."):
    c = c[part]
  return c


def _with_defaults(d: dict) -> dict:
  """`d` with every schema field it lacks set to its default; unknown fields are kept and reported."""
  known = set()
  for f in schema.FIELDS:
    *sections, name = f.key.split(".")
    node = d
    for s in sections:
      node = node.setdefault(s, {})
    node.setdefault(name, f.default)
    known.add(f.key)
  for key in _leaf_keys(d):
    if key not in known and key != "train.eval_batches":
      logging.warning("config.%s is not a mor-jax field (a typo?); it is ignored.", key)
  return d


def _leaf_keys(d: dict, prefix: str = ""):
  for k, v in d.items():
    if isinstance(v, dict):
      yield from _leaf_keys(v, f"{prefix}{k}.")
    else:
      yield f"{prefix}{k}"


def _check_field(f: schema.Field, v):
  """Type of the default, a finite number, inside its interval or one of its choices."""
  d = f.default
  if isinstance(d, bool):
    if not isinstance(v, bool):
      _fail(f.key, f"must be True or False, got {v!r}.")
  elif isinstance(d, (int, float)):
    if isinstance(v, bool) or not isinstance(v, (int, float)):
      _fail(f.key, f"must be a number, got {v!r}.")
    if not math.isfinite(v):
      _fail(f.key, f"must be a finite number, got {v!r}.")
    if isinstance(d, int) and v != int(v):
      _fail(f.key, f"must be a whole number, got {v!r}.")
  elif isinstance(d, str) and not isinstance(v, str):
    _fail(f.key, f"must be a string, got {v!r}.")
  elif isinstance(d, tuple) and not isinstance(v, (tuple, list)):
    _fail(f.key, f"must be a tuple, got {v!r}.")
  if isinstance(f.check, tuple) and v not in f.check:
    _fail(f.key, f"unknown value {v!r}; choose one of {f.check}.")
  elif isinstance(f.check, str) and not _inside(v, f.check):
    _fail(f.key, f"must be in {f.check}, got {v!r}.")


def _inside(v, interval: str) -> bool:
  lo, hi = (float(x) for x in interval[1:-1].split(","))
  above = v >= lo if interval[0] == "[" else v > lo
  below = v <= hi if interval[-1] == "]" else v < hi
  return above and below


def _check_model(c):
  m, r = c.model, c.recursion
  if m.hidden_size % m.num_heads:
    _fail("model.num_heads", f"hidden_size {m.hidden_size} is not divisible by num_heads {m.num_heads}; "
          "pick heads that divide it.")
  head_dim = m.hidden_size // m.num_heads
  if head_dim % 2:
    _fail("model.num_heads", f"head_dim = hidden_size / num_heads = {head_dim} is odd; RoPE needs an even head_dim.")
  if m.num_heads % m.num_kv_heads:
    _fail("model.num_kv_heads", f"num_kv_heads {m.num_kv_heads} must divide num_heads {m.num_heads} "
          "(grouped-query attention).")
  R = int(r.num_recursions)
  if r.strategy == "none" and R != 1:
    _fail("recursion.num_recursions", f"vanilla (strategy 'none') needs num_recursions = 1, got {R}; set a "
          "sharing strategy to recurse.")
  if r.strategy != "none":
    extra = 2 if r.strategy.startswith("middle_") else 0
    body = m.num_layers - extra
    what = "num_layers - 2" if extra else "num_layers"
    if body < R:
      _fail("model.num_layers", f"{what} = {body} is smaller than num_recursions {R}.")
    if body % R:
      lo, hi = (body // R) * R, (body // R + 1) * R
      _fail("model.num_layers", f"{what} = {body} is not divisible by recursion.num_recursions = {R}; "
            f"use num_layers = {lo + extra} or {hi + extra} (layers are never re-picked silently).")


def _check_mor(c):
  mor, R = c.mor, int(c.recursion.num_recursions)
  if c.kv_sharing.enable and not (mor.enable and mor.type == "expert"):
    _fail("kv_sharing.enable", "KV sharing is implemented for expert-choice MoR; enable mor with type 'expert' "
          "or turn it off.")
  if not mor.enable:
    return
  if c.recursion.strategy not in ("cycle", "middle_cycle"):
    _fail("recursion.strategy", f"MoR routing needs strategy 'cycle' or 'middle_cycle', got "
          f"{c.recursion.strategy!r}.")
  funcs = ("sigmoid", "tanh", "none") if mor.type == "expert" else ("softmax", "sigmoid")
  if mor.router_func not in funcs:
    _fail("mor.router_func", f"{mor.router_func!r} is not valid for {mor.type}-choice; use one of {funcs}.")
  if mor.type != "expert":
    return
  fractions = tuple(mor.capacity_fractions)
  if fractions:
    if len(fractions) != R:
      _fail("mor.capacity_fractions", f"has {len(fractions)} entries but num_recursions is {R}; give one "
            "fraction per recursion.")
    if any(not isinstance(x, (int, float)) or not 0 < x <= 1 for x in fractions):
      _fail("mor.capacity_fractions", f"fractions must be in (0, 1], got {fractions}.")
    if any(b > a for a, b in zip(fractions, fractions[1:])):
      _fail("mor.capacity_fractions", f"fractions must be non-increasing (deeper recursions take fewer tokens), "
            f"got {fractions}; sort them descending.")


def _check_train(c, num_devices):
  t = c.train
  if "eval_batches" in t:
    _convert_eval_batches(c, num_devices)
  if num_devices is None:
    import jax  # pylint: disable=import-outside-toplevel  (only here: the config package stays jax-free)
    num_devices = jax.device_count()
  if t.per_device_batch_size == 0:          # automatic (mor_jax/train/fit.py): the trainer sets both
    _check_automatic_batch(t, num_devices)
  else:
    _derive_accumulation(t, num_devices)
  if t.warmup_steps > t.num_steps:
    _fail("train.warmup_steps", f"must be between 0 and num_steps ({t.num_steps}), got {t.warmup_steps}.")
  if not all(isinstance(x, str) and x.count(".") == 1 and x in schema.BY_KEY for x in t.allow_changes):
    _fail("train.allow_changes", f"must list config fields as 'section.name' (e.g. 'train.learning_rate'), "
          f"got {tuple(t.allow_changes)}.")
  profile_steps(t.profile_steps)
  if not all(isinstance(x, str) and x for x in c.logging.wandb_tags):
    _fail("logging.wandb_tags", f"must be a tuple of non-empty strings, e.g. ('mor', 'ablation'), got "
          f"{tuple(c.logging.wandb_tags)}.")
  _check_mesh(c.parallel, num_devices)
  _check_distributed(c.distributed)


def _check_automatic_batch(t, num_devices):
  if t.total_batch_size % num_devices:
    _fail("train.total_batch_size", f"{t.total_batch_size} is not divisible by the {num_devices} devices; the "
          "automatic micro-batch (per_device_batch_size=0) divides each device's share, so pick a multiple of "
          f"{num_devices}.")
  if t.grad_accum_steps != -1:
    _fail("train.grad_accum_steps", f"is {t.grad_accum_steps}, but per_device_batch_size=0 (automatic) derives it "
          "from the micro-batch it chooses; set it to -1.")


def _derive_accumulation(t, num_devices):
  per_step = t.per_device_batch_size * num_devices
  if t.total_batch_size % per_step:
    _fail("train.total_batch_size", f"{t.total_batch_size} is not divisible by per_device_batch_size x devices = "
          f"{t.per_device_batch_size} x {num_devices} = {per_step}; adjust total_batch_size or "
          "per_device_batch_size.")
  accum = t.total_batch_size // per_step
  if t.grad_accum_steps not in (-1, accum):
    _fail("train.grad_accum_steps", f"is {t.grad_accum_steps} but total / (per_device x devices) = {accum}; set it "
          "to -1 to derive it.")
  t.grad_accum_steps = accum


def profile_steps(value: str) -> tuple[int, int] | None:
  """train.profile_steps 'START,COUNT' -> (START, COUNT) (steps START..START+COUNT-1, 1-based); '' -> None."""
  if not str(value).strip():
    return None
  parts = str(value).split(",")
  try:
    start, count = (int(p) for p in parts)
  except ValueError:
    start = count = 0
  if len(parts) != 2 or start < 1 or count < 1:
    _fail("train.profile_steps", f"{value!r} is not 'START,COUNT' with START >= 1 and COUNT >= 1 (e.g. "
          "--config.train.profile_steps=10,5 traces steps 10 to 14); '' turns profiling off.")
  return start, count


def _convert_eval_batches(c, num_devices):
  """The deprecated train.eval_batches (validation batches of per_device x devices rows) -> eval_sequences."""
  t = c.train
  batches = t.eval_batches
  del t["eval_batches"]
  if batches is None:   # the unset placeholder (schema.defaults)
    return
  batches = int(batches)
  rows = max(1, int(t.per_device_batch_size)) * (num_devices or 1)
  t.eval_sequences = batches if batches <= 0 else batches * rows
  logging.warning("config.train.eval_batches is deprecated: use config.train.eval_sequences (validation sequences "
                  "per evaluation); eval_batches=%d read as eval_sequences=%d.", batches, t.eval_sequences)


def _check_mesh(p, num_devices):
  if p.mode == "pmap" and p.fsdp != 1:
    _fail("parallel.fsdp", f"is {p.fsdp}, but FSDP needs parallel.mode 'pjit' (pmap replicates the state); "
          "set it to 1.")
  if p.mode == "pjit":
    resolve_mesh_shape(num_devices, p.data, p.fsdp)


def _check_distributed(d):
  if str(d.enable).lower() not in ("auto", "on", "off", "true", "false"):
    _fail("distributed.enable", f"unknown value {d.enable!r}; use 'auto', 'on' or 'off'.")
  if d.coordinator_address and ":" not in str(d.coordinator_address):
    _fail("distributed.coordinator_address", f"{d.coordinator_address!r} needs host:port (the address of "
          "process 0).")
  n, pid = int(d.num_processes), int(d.process_id)
  if pid < -1 or (n > 0 and pid >= n):
    _fail("distributed.process_id", f"is {pid}; it must be -1 (from the environment) or in [0, num_processes = "
          f"{n}).")


def resolve_mesh_shape(num_devices: int, data: int = -1, fsdp: int = 1) -> tuple[int, int]:
  """(data, fsdp) sizes for `num_devices`; -1 means 'the rest'. Raises ConfigError naming the field."""
  data, fsdp = int(data), int(fsdp)
  for name, v in (("data", data), ("fsdp", fsdp)):
    if v == 0 or v < -1:
      _fail(f"parallel.{name}", f"{v} is not a mesh axis size; use a positive size or -1 (the rest).")
  if data == -1 and fsdp == -1:
    _fail("parallel.fsdp", "parallel.data and parallel.fsdp are both -1; give one of them a size.")
  if data == -1:
    data, rest = divmod(num_devices, fsdp)
    if rest or data == 0:
      _fail("parallel.fsdp", f"{fsdp} does not divide the {num_devices} devices; pick a divisor.")
  elif fsdp == -1:
    fsdp, rest = divmod(num_devices, data)
    if rest or fsdp == 0:
      _fail("parallel.data", f"{data} does not divide the {num_devices} devices; pick a divisor.")
  if data * fsdp != num_devices:
    _fail("parallel.fsdp", f"mesh data x fsdp = {data} x {fsdp} = {data * fsdp} but {num_devices} devices are "
          "used; set one of parallel.data / parallel.fsdp to -1.")
  return data, fsdp
