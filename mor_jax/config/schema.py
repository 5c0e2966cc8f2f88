"""The one config schema: every field mor-jax reads, with its default and what it means.

`defaults()` is the ConfigDict that config files in configs/ start from (they
override what differs). A field marked `arch` belongs to the model's
architecture: it is a field of the frozen `ModelConfig` (config/model.py) that
the model is built from and that a checkpoint records, under the name given
(`True`: the field's own name). `check` is an interval the value must lie in
("(0, 1]", "[0, inf)"), or a tuple of allowed choices; validate.py enforces it.
The `execution` section is how this backend runs the model (kernels/policy.py
resolves it into an ExecPolicy); it never changes the numbers beyond float
rounding, nor the parameters.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import ml_collections

from mor_jax.config.upgrade import RENAMED

STRATEGIES = ("none", "cycle", "sequence", "middle_cycle", "middle_sequence")
INIT_STRATEGIES = ("stepwise", "average", "lower", "upper", "random")   # spec section 7 (config.init.strategy)
REMAT_POLICIES = ("none", "full", "dots", "dots_no_batch", "save_attn_out", "dots_attn", "auto")
ATTENTION_IMPLS = ("auto", "custom", "dot_product")
AUTO_ON_OFF = ("auto", "on", "off")


@dataclasses.dataclass(frozen=True)
class Field:
  """One config field: `section.name`, its default, a one-line meaning, architecture name, value check."""
  key: str
  default: Any
  doc: str
  arch: str | bool = False
  check: str | tuple | None = None

  @property
  def arch_name(self) -> str | None:
    if not self.arch:
      return None
    return self.key.split(".")[1] if self.arch is True else self.arch


def _section(name: str, *fields):
  return tuple(Field(f"{name}.{f[0]}", *f[1:]) for f in fields)


POS, NONNEG, UNIT, OPEN_UNIT = "(0, inf)", "[0, inf)", "[0, 1]", "(0, 1]"

FIELDS = (
    Field("name", "base", "run name (logs, summaries); '{model}' stands for the model, e.g. mor-expert-r2"),
    *_section(
        "model",
        ("vocab_size", 49152, "vocabulary size", True, "[1, inf)"),
        ("hidden_size", 960, "model width D", True, "[1, inf)"),
        ("intermediate_size", 2560, "SwiGLU MLP width F", True, "[1, inf)"),
        ("num_layers", 32, "layers of the equivalent vanilla model (L)", True, "[1, inf)"),
        ("num_heads", 15, "query heads", True, "[1, inf)"),
        ("num_kv_heads", 5, "key/value heads (grouped-query attention; divides num_heads)", True, "[1, inf)"),
        ("rope_theta", 10000.0, "RoPE base", True, POS),
        ("rms_eps", 1e-5, "RMSNorm epsilon", True, POS),
        ("max_seq_len", 2048, "context length (RoPE positions, generation limit)", True, "[1, inf)"),
        ("tie_embeddings", False, "the head reuses the embedding matrix", True),
        ("init_std", 0.02, "standard deviation of the normal initialisers", True, POS),
        ("scan_layers", True, "nn.scan over the shared block's layers, params stacked (False: unrolled modules, "
         "per-layer params)", True),
    ),
    *_section(
        "execution",   # how this backend runs the model (kernels/policy.py); old keys model.<name> still work
        ("dtype", "float32", "compute dtype (params stay float32)", False, ("float32", "bfloat16")),
        ("remat_policy", "none", "rematerialisation of each layer in the backward pass; auto: none, else dots, "
         "else full, the first whose compiled train step fits execution.memory_budget_gib (mor_jax/train/fit.py)",
         False, REMAT_POLICIES),
        ("memory_budget_gib", 0.0, "per-device memory the automatic choices (train.per_device_batch_size=0, "
         "remat_policy=auto) must fit: 0 = the device's limit minus 10% (CPU: host memory / local devices minus "
         "10%)", False, NONNEG),
        ("scan_unroll", 0, "scanned layers per loop iteration: 0 auto (loop on CPU, fully unrolled on GPU/TPU), "
         "n fixed", False, NONNEG),
        ("batch_groups", 0, "independent batch groups per layer: 0 auto (2 on CPU, 1 on GPU/TPU), n fixed",
         False, NONNEG),
        ("loss_chunk_tokens", 0, "head + cross entropy over chunks of this many tokens: 0 auto (512 on CPU, the "
         "whole batch on GPU/TPU), n fixed", False, NONNEG),
        ("attention_impl", "auto", "auto (dot_product on GPU/TPU, custom on CPU) | custom (hand-written VJP, "
         "fastest on CPU) | dot_product (jax.nn.dot_product_attention: cuDNN on GPU for causal masks)",
         False, ATTENTION_IMPLS),
        ("cpu_kernels", "auto", "custom-gradient linear / fused norm / SwiGLU kernels tuned for XLA:CPU: auto (on "
         "on CPU) | on | off", False, AUTO_ON_OFF),
    ),
    *_section(
        "recursion",
        ("strategy", "none", "parameter sharing: none (vanilla) | cycle | sequence | middle_cycle | "
         "middle_sequence", True, STRATEGIES),
        ("num_recursions", 1, "R, recursions of the shared block", True, "[1, inf)"),
    ),
    *_section(
        "mor",
        ("enable", False, "mixture-of-recursions routing", "mor_enable"),
        ("type", "expert", "expert | token (choice)", "mor_type", ("expert", "token")),
        ("router_type", "linear", "linear | mlp", True, ("linear", "mlp")),
        ("router_func", "sigmoid", "expert: sigmoid | tanh | none; token: softmax | sigmoid", True),
        ("alpha", 0.1, "router score scale (expert default 0.1; token-choice configs usually 1.0)", True),
        ("router_temperature", 1.0, "router inputs are divided by it", True, POS),
        ("rand_router", False, "ablation: random scores instead of a learned router", True),
        ("z_loss", False, "add the router z-loss", True),
        ("z_coeff", 1e-3, "z-loss coefficient", True, NONNEG),
        ("gating", "weighted", "weighted | identity: how a recursion's output is added", True,
         ("weighted", "identity")),
        ("capacity_fractions", (), "expert-choice: fraction of the tokens selected at each recursion; () -> "
         "(R - r) / R", True),
        ("expert_router_loss", "bce", "expert-choice router loss: bce (the reference's sampling loss) | none",
         True, ("bce", "none")),
        ("aux_coeff", 1e-3, "expert router loss coefficient", True, NONNEG),
        ("cap_warmup_steps", 0, "expert-choice: optimizer steps of capacity warm-up (0: off)", True, NONNEG),
        ("balancing", "loss", "token-choice balancing: loss | loss_free | none", True,
         ("loss", "loss_free", "none")),
        ("bal_coeff", 0.1, "token-choice balancing loss coefficient", True, NONNEG),
        ("bal_update_rate", 1e-3, "loss-free balancing bias step u", True, NONNEG),
        ("bal_warmup_steps", 0, "token-choice: steps at full depth before routing", True, NONNEG),
        ("token_buffer_fraction", 1.0, "token-choice: active-token buffer per recursion as a fraction of T "
         "(1.0: exact)", True, OPEN_UNIT),
        ("threshold", 0.5, "causal routing at inference / evaluation: sigmoid router threshold", True),
    ),
    Field("kv_sharing.enable", False, "recursive KV sharing (expert-choice MoR)", "kv_sharing"),
    *_section(
        "init",   # applied to a fresh training run only (a run that resumes keeps its checkpoint)
        ("from_path", "", "spec's init.from: '' random | a Hugging Face Llama/SmolLM directory | a mor-jax "
         "workdir/checkpoint (vanilla or recursive; any model of the same architecture, MoR included, is copied "
         "whole); architecture fields left unset (None, as configs/finetune_chat.py leaves them) and data.add_bos "
         "/ tokenizer_path come from it"),
        ("strategy", "stepwise", "stepwise | average | lower | upper | random (seeded by train.seed)", False,
         INIT_STRATEGIES),
    ),
    *_section(
        "data",
        ("corpus", "shakespeare", "shakespeare (embedded) | local | chat (JSONL conversations for fine-tuning: "
         "data/chat.py)"),
        ("path", "", "local corpus: directory or glob of .txt/.jsonl[.gz]/.parquet"),
        ("text_column", "text", "text field of .jsonl / .parquet records"),
        ("val_fraction", 0.01, "fraction of documents in the validation split", False, "[0, 1)"),
        ("val_files", (), "names of files that form the validation split (overrides val_fraction); "
         "shakespeare: play slugs, e.g. ('hamlet',)"),
        ("data_dir", "", "where prepared datasets live ('' -> ~/.cache/mor_jax/datasets)"),
        ("tokenizer_path", "", "tokenizer.json or directory; '' -> train a BPE on the corpus"),
        ("seq_len", 1024, "training sequence length", False, "[1, inf)"),
        ("add_bos", False, "prepend BOS to every document"),
        ("pretokenized", False, "read token-id shards written by --mode=prepare"),
        ("num_workers", 0, "grain worker processes", False, NONNEG),
        ("prefetch", 2, "grain prefetch buffer", False, NONNEG),
        ("shuffle_seed", 0, "data shuffling seed"),
        ("on_corrupt_record", "skip", "a corrupt record (chat: a malformed conversation): skip (counted, reported) "
         "| fail", False, ("skip", "fail")),
        ("chat_template", "", "chat: '' the tokenizer's own chat template (tokenizer_config.json) | chatml (for "
         "models without one; the fine-tuned workdir keeps it for --chat and serving)"),
        ("loss_on", "assistant", "chat: the loss counts the assistant turns' tokens | all tokens", False,
         ("assistant", "all")),
        ("on_long_record", "skip", "chat: a conversation longer than seq_len + 1 tokens: skip | truncate | fail "
         "(counted and reported)", False, ("skip", "truncate", "fail")),
        ("document_mask", False, "packed documents do not attend to each other (the reference lets them)"),
        ("txt_separator", "", "local .txt files: split into documents at this string ('' -> one per file)"),
        ("eos_token", "", "end-of-text token of a loaded tokenizer ('' -> tokenizer_config.json or a known name)"),
        ("bos_token", "", "BOS token for add_bos ('' -> tokenizer_config.json or a well-known name)"),
        ("tokenizer_train_bytes", 500_000_000, "cap on training text used to train the BPE (0: all)", False,
         NONNEG),
        ("prepare_workers", 0, "processes that pre-tokenize shards in --mode=prepare (0: all CPU cores)", False,
         NONNEG),
        ("read_threads", 2, "threads reading (and tokenizing) documents per pipeline process", False, "[1, inf)"),
    ),
    *_section(
        "train",
        ("seed", 0, "initialisation / router seed"),
        ("num_steps", 1000, "optimizer steps of the run", False, "[1, inf)"),
        ("epochs", 0.0, "chat data: > 0 sets num_steps to this many passes over the training examples (packed rows "
         "/ total_batch_size, at least 1 step)", False, NONNEG),
        ("total_batch_size", 32, "sequences per optimizer step", False, "[1, inf)"),
        ("per_device_batch_size", 8, "sequences per device and micro-step (the micro-batch); 0 = automatic: the "
         "largest divisor of total / devices whose compiled train step fits execution.memory_budget_gib", False,
         NONNEG),
        ("grad_accum_steps", -1, "derived: total / (per_device x devices); -1 to derive", False),
        ("learning_rate", 3e-3, "peak learning rate", False, NONNEG),
        ("schedule", "cosine", "cosine | wsd | constant", False, ("cosine", "wsd", "constant")),
        ("warmup_steps", 100, "linear warm-up steps", False, NONNEG),
        ("warmup_fraction", 0.0, "> 0: warmup_steps = round(fraction x num_steps) (runs whose length the data sets)",
         False, UNIT),
        ("min_lr_ratio", 0.0, "cosine floor as a fraction of the peak", False, UNIT),
        ("decay_fraction", 0.2, "wsd: linear cool-down over the last fraction of the run", False, UNIT),
        ("beta1", 0.9, "AdamW beta1", False, "[0, 1)"),
        ("beta2", 0.95, "AdamW beta2", False, "[0, 1)"),
        ("eps", 1e-8, "AdamW epsilon", False, POS),
        ("weight_decay", 0.1, "AdamW decoupled weight decay", False, NONNEG),
        ("grad_clip", 1.0, "global gradient-norm clip (0: off)", False, NONNEG),
        ("freeze_routers", False, "MoR: the routers' weights keep their initial (or loaded) values; the rest trains"),
        ("log_every_steps", 10, "metrics every n steps", False, "[1, inf)"),
        ("eval_every_steps", 200, "validation every n steps, also before the first and after the last (0: only "
         "those two; train.eval_sequences=0: none)", False, NONNEG),
        ("eval_sequences", 64, "validation sequences per evaluation (-1: the whole split; 0: none)", False,
         "[-1, inf)"),
        ("save_interval", 0.1, "checkpoint every fraction of the run", False, UNIT),
        ("save_every_steps", 0, "if > 0, overrides save_interval", False, NONNEG),
        ("keep_checkpoints", 3, "checkpoints kept", False, "[1, inf)"),
        ("async_checkpoints", True, "write checkpoints in the background (arrays are copied to host first)"),
        ("max_steps_per_run", 0, "> 0: stop after this many steps in one invocation (rerun to go on)", False,
         NONNEG),
        ("progress_bar", True, "tqdm bar on the main process (else log lines every log_every_steps)"),
        ("allow_changes", (), "config fields (section.name) that may differ from the checkpoint's on resume"),
        ("profile_steps", "", "'START,COUNT': a jax.profiler trace of steps START..START+COUNT-1 into "
         "WORKDIR/profile ('' off)"),
        ("routing_pictures", True, "routed MoR models: depth of a validation sample at each evaluation "
         "(routing.jsonl, TensorBoard histogram, routing.png, routing_sample.html/.png in report.md)"),
    ),
    *_section(
        "logging",   # Weights & Biases (mor_jax/train/wandb_log.py); metrics.jsonl and TensorBoard are always on
        ("wandb", "off", "Weights & Biases: off | offline (local run folder, `wandb sync` later) | online", False,
         ("off", "offline", "online")),
        ("wandb_project", "mor-jax", "W&B project"),
        ("wandb_entity", "", "W&B entity (team or user; '' -> your default)"),
        ("wandb_run_name", "", "W&B run name ('' -> the run's name)"),
        ("wandb_tags", (), "W&B tags, e.g. ('mor', 'ablation'); on the command line also mor,ablation"),
    ),
    *_section(
        "parallel",
        ("mode", "pjit", "pjit (jax.jit over a device mesh) | pmap (replicated jax.pmap)", False, ("pjit", "pmap")),
        ("num_devices", 0, "use the first N devices (0: all; pjit: global, pmap: local devices)", False, NONNEG),
        ("data", -1, "pjit mesh axis 'data' (-1: the devices left after fsdp)", False),
        ("fsdp", 1, "pjit mesh axis 'fsdp': params and optimizer state sharded over it (1: off; -1: the rest)",
         False),
        ("prefetch", 0, "batches put on the devices ahead by a background thread (0: inline)", False, NONNEG),
    ),
    *_section(
        "distributed",   # multi-process runs; see mor_jax/distributed.py
        ("enable", "auto", "auto (these fields, JAX_COORDINATOR_ADDRESS or SLURM with > 1 task) | on | off"),
        ("coordinator_address", "", "host:port of process 0 ('' -> environment)"),
        ("coordinator_port", 0, "SLURM: coordinator port (0 -> JAX_COORDINATOR_PORT or from SLURM_JOB_ID)"),
        ("num_processes", 0, "0 -> environment (JAX_NUM_PROCESSES, SLURM_NTASKS)", False, NONNEG),
        ("process_id", -1, "-1 -> environment (JAX_PROCESS_ID, SLURM_PROCID)"),
        ("local_device_ids", (), "devices this process uses (() -> all visible; SLURM: SLURM_LOCALID)"),
        ("initialization_timeout", 300, "seconds to wait for all processes", False, "[1, inf)"),
    ),
)

BY_KEY = {f.key: f for f in FIELDS}
ARCH_FIELDS = tuple(f for f in FIELDS if f.arch)


def defaults() -> ml_collections.ConfigDict:
  """A fresh ConfigDict holding every field at its default (what config files start from).

  Renamed keys (config/upgrade.py) are there too as empty placeholders, so that an old command-line
  override (`--config.model.dtype=bfloat16`) still parses; validation moves a set one to its new name
  with a warning and drops the rest.
  """
  c = ml_collections.ConfigDict()
  for f in FIELDS:
    _node(c, f.key)[f.key.split(".")[-1]] = f.default
  for old, new in RENAMED.items():
    _node(c, old)[old.split(".")[-1]] = ml_collections.config_dict.placeholder(type(BY_KEY[new].default))
  return c


def _node(c, key: str):
  for s in key.split(".")[:-1]:
    if s not in c:
      c[s] = ml_collections.ConfigDict()
    c = c[s]
  return c


def get_field(c, key: str):
  """The value of the dotted field `key` ('train.num_steps') in `c`, or None when it or its section is missing."""
  for part in key.split("."):
    c = c.get(part) if hasattr(c, "get") else None
    if c is None:
      return None
  return c
