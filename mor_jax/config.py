"""Config validation and derived values.

`validate(config)` is called once, before anything is built. It raises
`ConfigError` naming the field and the fix, and returns a copy with derived
fields filled in. `model_config(config)` turns the validated ConfigDict into
the frozen `ModelConfig` dataclass the model is built from.
"""

from __future__ import annotations

import dataclasses
import math

import ml_collections

STRATEGIES = ("none", "cycle", "sequence", "middle_cycle", "middle_sequence")
INIT_STRATEGIES = ("stepwise", "average", "lower", "upper", "random")   # spec section 7 (config.init.strategy)
REMAT_POLICIES = ("none", "full", "dots", "dots_no_batch", "save_attn_out", "dots_attn")
ATTENTION_IMPLS = ("auto", "custom", "dot_product")


class ConfigError(ValueError):
  """A config value is invalid; the message names the field and the fix."""


@dataclasses.dataclass(frozen=True)
class ModelConfig:
  """Everything the model needs, frozen (hashable, so usable as a static arg)."""

  vocab_size: int
  hidden_size: int
  intermediate_size: int
  num_layers: int
  num_heads: int
  num_kv_heads: int
  rope_theta: float = 10000.0
  rms_eps: float = 1e-5
  max_seq_len: int = 2048
  tie_embeddings: bool = False
  init_std: float = 0.02
  dtype: str = "float32"
  remat_policy: str = "none"
  scan_layers: bool = True
  scan_unroll: int = 1           # layers per loop iteration of the scan (resolved; see resolve_scan_unroll)
  batch_groups: int = 1          # independent batch groups per layer (resolved; see resolve_batch_groups)
  loss_chunk_tokens: int = 0     # tokens per head + cross-entropy chunk in the loss, 0 = whole batch (resolved; see resolve_loss_chunk_tokens)
  attention_impl: str = "auto"   # auto | custom | dot_product (see mor_jax/model/fused_attention.py)
  # sharing
  strategy: str = "none"
  num_recursions: int = 1
  # MoR
  mor_enable: bool = False
  mor_type: str = "expert"
  router_type: str = "linear"
  router_func: str = "sigmoid"
  alpha: float = 0.1
  temperature: float = 1.0
  rand_router: bool = False
  z_loss: bool = False
  z_coeff: float = 1e-3
  gating: str = "weighted"
  capacity: tuple[float, ...] = ()
  sampling: str = "aux_loss"
  aux_coeff: float = 1e-3
  cap_warmup_steps: int = 0
  balancing: str = "loss"
  bal_coeff: float = 0.1
  bal_update_rate: float = 1e-3
  bal_warmup_steps: int = 0
  capacity_factor: float = 1.0
  threshold: float = 0.5
  kv_sharing: bool = False

  @property
  def head_dim(self) -> int:
    return self.hidden_size // self.num_heads

  @property
  def has_middle(self) -> bool:
    """True when the first and last layers are unique (middle_* strategies)."""
    return self.strategy.startswith("middle_")

  @property
  def base_depth(self) -> int:
    """Layers in the shared block (all L layers for vanilla)."""
    if self.strategy == "none":
      return self.num_layers
    body = self.num_layers - (2 if self.has_middle else 0)
    return body // self.num_recursions

  @property
  def recursions(self) -> int:
    return 1 if self.strategy == "none" else self.num_recursions

  @property
  def capacities(self) -> tuple[float, ...]:
    if self.capacity:
      return tuple(self.capacity)
    r = self.recursions
    return tuple((r - i) / r for i in range(r))

  def capacity_k(self, seq_len: int) -> tuple[int, ...]:
    """Tokens selected at each recursion: k_r = max(1, floor(c_r * T))."""
    return tuple(max(1, int(math.floor(c * seq_len + 1e-9))) for c in self.capacities)

  @property
  def compute_dtype(self):
    import jax.numpy as jnp
    return {"float32": jnp.float32, "bfloat16": jnp.bfloat16}[self.dtype]


def _fail(field: str, msg: str):
  raise ConfigError(f"config.{field}: {msg}")


def validate(config: ml_collections.ConfigDict, num_devices: int | None = None) -> ml_collections.ConfigDict:
  """Checks `config` and returns an unlocked copy with derived fields set.

  `num_devices` (default: all local devices when a train section needs it) is
  used to derive gradient accumulation.
  """
  c = ml_collections.ConfigDict(config.to_dict())
  m, r, mor = c.model, c.recursion, c.mor
  for f in ("vocab_size", "hidden_size", "intermediate_size", "num_layers", "num_heads", "num_kv_heads", "max_seq_len"):
    if int(m[f]) <= 0:
      _fail(f"model.{f}", f"must be a positive integer, got {m[f]}.")
  if m.hidden_size % m.num_heads:
    _fail("model.num_heads", f"hidden_size {m.hidden_size} is not divisible by num_heads {m.num_heads}; pick heads that divide it.")
  head_dim = m.hidden_size // m.num_heads
  if head_dim % 2:
    _fail("model.num_heads", f"head_dim = hidden_size / num_heads = {head_dim} is odd; RoPE needs an even head_dim.")
  if m.num_heads % m.num_kv_heads:
    _fail("model.num_kv_heads", f"num_kv_heads {m.num_kv_heads} must divide num_heads {m.num_heads} (grouped-query attention).")
  if m.dtype not in ("float32", "bfloat16"):
    _fail("model.dtype", f"unknown compute dtype {m.dtype!r}; use 'float32' or 'bfloat16'.")
  if int(m.get("scan_unroll", 0)) < 0:
    _fail("model.scan_unroll", f"must be >= 0 (0: auto, n: layers per loop iteration), got {m.scan_unroll}.")
  if int(m.get("batch_groups", 0)) < 0:
    _fail("model.batch_groups", f"must be >= 0 (0: auto, n: independent batch groups per layer), got {m.batch_groups}.")
  if int(m.get("loss_chunk_tokens", 0)) < 0:
    _fail("model.loss_chunk_tokens", f"must be >= 0 (0: auto, n: tokens per head + cross-entropy chunk), "
          f"got {m.loss_chunk_tokens}.")
  if m.remat_policy not in REMAT_POLICIES:
    _fail("model.remat_policy", f"unknown policy {m.remat_policy!r}; choose one of {REMAT_POLICIES}.")
  if m.get("attention_impl", "auto") not in ATTENTION_IMPLS:
    _fail("model.attention_impl", f"unknown implementation {m.attention_impl!r}; choose one of {ATTENTION_IMPLS}.")
  if r.strategy not in STRATEGIES:
    _fail("recursion.strategy", f"unknown strategy {r.strategy!r}; choose one of {STRATEGIES}.")
  R = int(r.num_recursions)
  if R < 1:
    _fail("recursion.num_recursions", f"must be >= 1, got {R}.")
  if r.strategy == "none" and R != 1:
    _fail("recursion.num_recursions", f"vanilla (strategy 'none') needs num_recursions = 1, got {R}; set a sharing strategy to recurse.")
  if r.strategy != "none":
    body = m.num_layers - (2 if r.strategy.startswith("middle_") else 0)
    what = "num_layers - 2" if r.strategy.startswith("middle_") else "num_layers"
    if body < R:
      _fail("model.num_layers", f"{what} = {body} is smaller than num_recursions {R}.")
    if body % R:
      lo, hi = (body // R) * R, (body // R + 1) * R
      extra = 2 if r.strategy.startswith("middle_") else 0
      _fail("model.num_layers", f"{what} = {body} is not divisible by recursion.num_recursions = {R}; "
            f"use num_layers = {lo + extra} or {hi + extra} (layers are never re-picked silently).")
  if mor.enable:
    if r.strategy not in ("cycle", "middle_cycle"):
      _fail("recursion.strategy", f"MoR routing needs strategy 'cycle' or 'middle_cycle', got {r.strategy!r}.")
    if mor.type not in ("expert", "token"):
      _fail("mor.type", f"unknown routing type {mor.type!r}; use 'expert' or 'token'.")
    if mor.router_type not in ("linear", "mlp"):
      _fail("mor.router_type", f"unknown router {mor.router_type!r}; use 'linear' or 'mlp'.")
    funcs = ("sigmoid", "tanh", "none") if mor.type == "expert" else ("softmax", "sigmoid")
    if mor.router_func not in funcs:
      _fail("mor.router_func", f"{mor.router_func!r} is not valid for {mor.type}-choice; use one of {funcs}.")
    if mor.gating not in ("weighted", "identity"):
      _fail("mor.gating", f"unknown gating {mor.gating!r}; use 'weighted' or 'identity'.")
    if mor.temperature <= 0:
      _fail("mor.temperature", f"must be > 0, got {mor.temperature}.")
    if mor.type == "expert":
      cap = tuple(float(x) for x in mor.capacity)
      if cap:
        if len(cap) != R:
          _fail("mor.capacity", f"has {len(cap)} entries but num_recursions is {R}; give one factor per recursion.")
        if any(not 0 < x <= 1 for x in cap):
          _fail("mor.capacity", f"factors must be in (0, 1], got {cap}.")
        if any(b > a for a, b in zip(cap, cap[1:])):
          _fail("mor.capacity", f"factors must be non-increasing (deeper recursions take fewer tokens), got {cap}; sort them descending.")
      if mor.sampling not in ("aux_loss", "none"):
        _fail("mor.sampling", f"unknown sampling {mor.sampling!r}; use 'aux_loss' or 'none'.")
      if mor.cap_warmup_steps < 0:
        _fail("mor.cap_warmup_steps", "must be >= 0.")
    else:
      if mor.balancing not in ("loss", "loss_free", "none"):
        _fail("mor.balancing", f"unknown balancing {mor.balancing!r}; use 'loss', 'loss_free' or 'none'.")
      if not 0 < mor.capacity_factor <= 1:
        _fail("mor.capacity_factor", f"must be in (0, 1], got {mor.capacity_factor}.")
  if c.kv_sharing.enable and not (mor.enable and mor.type == "expert"):
    _fail("kv_sharing.enable", "KV sharing is implemented for expert-choice MoR; enable mor with type 'expert' or turn it off.")
  if "init" in c:
    _validate_init(c.init, r.strategy)
  if "train" in c:
    _validate_train(c, num_devices)
  if "data" in c and c.data.get("seq_len", 0) > m.max_seq_len:
    _fail("data.seq_len", f"{c.data.seq_len} exceeds model.max_seq_len {m.max_seq_len}.")
  return c


def _validate_init(init, sharing):
  """config.init (pretrained initialisation); the source itself is checked when a fresh run reads it."""
  path, strategy = init.get("from_path", ""), init.get("strategy", "stepwise")
  if not isinstance(path, str):
    _fail("init.from_path", f"must be a path string ('' for random initialisation), got {path!r}.")
  if strategy not in INIT_STRATEGIES:
    _fail("init.strategy", f"unknown strategy {strategy!r}; choose one of {INIT_STRATEGIES}.")
  if path and sharing == "none" and strategy != "stepwise":
    _fail("init.strategy", f"{strategy!r} chooses pretrained layers for a shared block, but recursion.strategy is "
          "'none' (vanilla), whose layers are copied one to one; set recursion.strategy (and num_recursions) or "
          "leave init.strategy at 'stepwise'.")


def _validate_train(c, num_devices):
  t = c.train
  if num_devices is None:
    import jax
    num_devices = jax.device_count()
  if t.per_device_batch_size <= 0 or t.total_batch_size <= 0:
    _fail("train.total_batch_size", "batch sizes must be positive.")
  per_step = t.per_device_batch_size * num_devices
  if t.total_batch_size % per_step:
    _fail("train.total_batch_size", f"{t.total_batch_size} is not divisible by per_device_batch_size x devices = "
          f"{t.per_device_batch_size} x {num_devices} = {per_step}; adjust total_batch_size or per_device_batch_size.")
  accum = t.total_batch_size // per_step
  if t.get("grad_accum_steps", -1) not in (-1, accum):
    _fail("train.grad_accum_steps", f"is {t.grad_accum_steps} but total / (per_device x devices) = {accum}; set it to -1 to derive it.")
  t.grad_accum_steps = accum
  if t.num_steps <= 0:
    _fail("train.num_steps", "must be positive.")
  if t.schedule not in ("cosine", "wsd", "constant"):
    _fail("train.schedule", f"unknown schedule {t.schedule!r}; use 'cosine', 'wsd' or 'constant'.")
  if not 0 <= t.warmup_steps <= t.num_steps:
    _fail("train.warmup_steps", f"must be between 0 and num_steps ({t.num_steps}).")
  if "parallel" in c and c.parallel.mode not in ("pjit", "pmap"):
    _fail("parallel.mode", f"unknown mode {c.parallel.mode!r}; use 'pjit' or 'pmap'.")
  if "parallel" in c:
    _validate_mesh(c.parallel, num_devices)
  if "distributed" in c:
    _validate_distributed(c.distributed)


def _validate_mesh(p, num_devices):
  data, fsdp = int(p.get("data", -1)), int(p.get("fsdp", 1))
  if p.mode == "pmap" and fsdp != 1:
    _fail("parallel.fsdp", f"is {fsdp}, but FSDP needs parallel.mode 'pjit' (pmap replicates the state); set it to 1.")
  if p.mode == "pjit":
    resolve_mesh_shape(num_devices, data, fsdp)
  if int(p.get("prefetch", 0)) < 0:
    _fail("parallel.prefetch", "must be >= 0 (0: no background prefetch).")


def _validate_distributed(d):
  if str(d.get("enable", "auto")).lower() not in ("auto", "on", "off", "true", "false"):
    _fail("distributed.enable", f"unknown value {d.enable!r}; use 'auto', 'on' or 'off'.")
  if d.get("coordinator_address") and ":" not in str(d.coordinator_address):
    _fail("distributed.coordinator_address", f"{d.coordinator_address!r} needs host:port (the address of process 0).")
  if int(d.get("num_processes", 0)) < 0:
    _fail("distributed.num_processes", "must be >= 0 (0: from the environment).")
  n, pid = int(d.get("num_processes", 0)), int(d.get("process_id", -1))
  if pid < -1 or (n > 0 and pid >= n):
    _fail("distributed.process_id", f"is {pid}; it must be -1 (from the environment) or in [0, num_processes = {n}).")


def resolve_mesh_shape(num_devices: int, data: int = -1, fsdp: int = 1) -> tuple[int, int]:
  """(data, fsdp) sizes for `num_devices`; -1 means 'the rest'. Raises ConfigError naming the field."""
  data, fsdp = int(data), int(fsdp)
  for name, v in (("data", data), ("fsdp", fsdp)):
    if v == 0 or v < -1:
      raise ConfigError(f"config.parallel.{name}: {v} is not a mesh axis size; use a positive size or -1 (the rest).")
  if data == -1 and fsdp == -1:
    raise ConfigError("config.parallel.fsdp: parallel.data and parallel.fsdp are both -1; give one of them a size.")
  if data == -1:
    data, rest = divmod(num_devices, fsdp)
    if rest or data == 0:
      raise ConfigError(f"config.parallel.fsdp: {fsdp} does not divide the {num_devices} devices; pick a divisor.")
  elif fsdp == -1:
    fsdp, rest = divmod(num_devices, data)
    if rest or fsdp == 0:
      raise ConfigError(f"config.parallel.data: {data} does not divide the {num_devices} devices; pick a divisor.")
  if data * fsdp != num_devices:
    raise ConfigError(f"config.parallel.fsdp: mesh data x fsdp = {data} x {fsdp} = {data * fsdp} but {num_devices} "
                      "devices are used; set one of parallel.data / parallel.fsdp to -1.")
  return data, fsdp


def resolve_scan_unroll(scan_unroll: int, backend: str | None = None) -> int:
  """model.scan_unroll 0 (auto): a loop on CPU, fully unrolled on GPU/TPU.

  Unrolling changes only the compiled program, never the parameter layout (the
  scanned layers' parameters stay stacked), so a checkpoint moves freely between
  machines. Measured (H100, smollm360_rec2, bf16, 16 x 1024): MFU 29.7% as a
  loop, 40.2% unrolled (XLA fuses across layers and drops the per-iteration
  residual copies); on CPU the loop is faster and compiles much faster.
  """
  if scan_unroll > 0:
    return scan_unroll
  import jax  # pylint: disable=import-outside-toplevel  (only here: the config module stays jax-free)
  return 1 if (backend or jax.default_backend()) == "cpu" else 1_000_000   # lax.scan caps it at the length


def resolve_batch_groups(batch_groups: int, backend: str | None = None) -> int:
  """model.batch_groups 0 (auto): 2 on CPU, 1 on GPU/TPU.

  XLA:CPU's runtime hands ready operations to a second worker only when
  more than 8 are ready at once (the ThunkExecutor's split threshold in XLA's
  source), so one chain of dependent matmuls per layer mostly runs on one
  worker while the other core spins (the process shows ~1.85 busy cores
  either way; even with two groups, the profiled backward pass has the MLP's
  input-gradient matmuls starting 10-17 ms after their inputs are ready while
  the other core runs nothing). Splitting the batch into independent groups
  inside each layer gives the runtime two chains to run side by side:
  training steps 1.06-1.12x faster on four of the five benchmark variants
  (interleaved A/B). Every row is still computed exactly as before (attention
  and routing are per sequence), only the weight-gradient sums are split in two.
  Accelerators parallelise each matmul themselves and keep one group.
  """
  if batch_groups > 0:
    return batch_groups
  import jax  # pylint: disable=import-outside-toplevel
  return 2 if (backend or jax.default_backend()) == "cpu" else 1


def resolve_loss_chunk_tokens(loss_chunk_tokens: int, backend: str | None = None) -> int:
  """model.loss_chunk_tokens 0 (auto): chunks of 512 tokens on CPU, the whole batch (0) on GPU/TPU.

  The training loss runs the vocabulary head and the cross entropy per chunk
  of tokens (`MoRLM.loss_terms`). On CPU the head's matmul and the
  vocabulary-wide softmax passes are otherwise one long chain of operations
  that the runtime keeps on one worker (see resolve_batch_groups); independent
  chunks run side by side. Measured on the
  2-core benchmark machine (4 chunks of 512 tokens against one [2048, 8192]
  head, several interleaved A/B runs): training steps 1.05-1.08x (vanilla),
  0.99-1.10x (MoR expert R=2), 1.03x (token-choice R=3). The sums are the
  same up to float rounding.
  """
  if loss_chunk_tokens > 0:
    return loss_chunk_tokens
  import jax  # pylint: disable=import-outside-toplevel
  return 512 if (backend or jax.default_backend()) == "cpu" else 0


def model_config(config: ml_collections.ConfigDict) -> ModelConfig:
  """Builds the frozen ModelConfig from a validated config."""
  m, r, mor = config.model, config.recursion, config.mor
  return ModelConfig(
      vocab_size=int(m.vocab_size), hidden_size=int(m.hidden_size), intermediate_size=int(m.intermediate_size),
      num_layers=int(m.num_layers), num_heads=int(m.num_heads), num_kv_heads=int(m.num_kv_heads),
      rope_theta=float(m.rope_theta), rms_eps=float(m.rms_eps), max_seq_len=int(m.max_seq_len),
      tie_embeddings=bool(m.tie_embeddings), init_std=float(m.init_std), dtype=str(m.dtype),
      remat_policy=str(m.remat_policy), scan_layers=bool(m.scan_layers),
      scan_unroll=resolve_scan_unroll(int(m.get("scan_unroll", 0))),
      batch_groups=resolve_batch_groups(int(m.get("batch_groups", 0))),
      loss_chunk_tokens=resolve_loss_chunk_tokens(int(m.get("loss_chunk_tokens", 0))),
      attention_impl=str(m.get("attention_impl", "auto")),
      strategy=str(r.strategy), num_recursions=int(r.num_recursions),
      mor_enable=bool(mor.enable), mor_type=str(mor.type), router_type=str(mor.router_type),
      router_func=str(mor.router_func), alpha=float(mor.alpha), temperature=float(mor.temperature),
      rand_router=bool(mor.rand_router), z_loss=bool(mor.z_loss), z_coeff=float(mor.z_coeff),
      gating=str(mor.gating), capacity=tuple(float(x) for x in mor.capacity), sampling=str(mor.sampling),
      aux_coeff=float(mor.aux_coeff), cap_warmup_steps=int(mor.cap_warmup_steps), balancing=str(mor.balancing),
      bal_coeff=float(mor.bal_coeff), bal_update_rate=float(mor.bal_update_rate),
      bal_warmup_steps=int(mor.bal_warmup_steps), capacity_factor=float(mor.capacity_factor),
      threshold=float(mor.threshold), kv_sharing=bool(config.kv_sharing.enable))
