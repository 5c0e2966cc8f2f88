"""SmolLM shapes (spec section 1) and the shared recipe for the smollm configs.

Not a config file itself: `configs/smollm*.py` call `make(...)`. Parameter
strings (after ':' on the command line) are comma-separated options:
  tiny           a few-step CPU variant through the same code path (tiny dims,
                 embedded Shakespeare corpus, shipped SmolLM tokenizer)
  rec=R          recursions (sharing middle_cycle unless sharing=... is given)
  sharing=S      cycle | sequence | middle_cycle | middle_sequence
  mor=expert|token, kv_sharing, bf16, fp32
"""

from __future__ import annotations

import os

from mor_jax.config import defaults

SHAPES = {
    # name: hidden, layers, heads, kv heads, ffn, tied embeddings
    "135m": (576, 30, 9, 3, 1536, True),
    "360m": (960, 32, 15, 5, 2560, False),
    "1.7b": (2048, 24, 32, 32, 8192, True),
}

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SMOLLM_TOKENIZER = os.path.join(REPO, "assets", "tokenizers", "smollm")


def parse(arg: str | None) -> dict:
  opts = {}
  for item in filter(None, (arg or "").split(",")):
    key, _, val = item.partition("=")
    opts[key.strip()] = val.strip() if val else True
  return opts


def make(size: str, *, strategy: str = "none", recursions: int = 1, num_layers: int | None = None,
         tie: bool | None = None, arg: str | None = None):
  """A full-scale SmolLM config (FineWeb-Edu-style local corpus, SmolLM tokenizer)."""
  opts = parse(arg)
  hidden, layers, heads, kv, ffn, tied = SHAPES[size]
  c = defaults()
  c.name = f"smollm-{size}"
  c.model.update(vocab_size=49152, hidden_size=hidden, intermediate_size=ffn, num_layers=num_layers or layers,
                 num_heads=heads, num_kv_heads=kv, rope_theta=10000.0, rms_eps=1e-5, max_seq_len=2048,
                 tie_embeddings=tied if tie is None else tie, init_std=0.02)
  c.execution.dtype = "bfloat16"
  if "rec" in opts:
    recursions = int(opts["rec"])
    strategy = opts.get("sharing", "middle_cycle")
  elif "sharing" in opts:
    strategy = opts["sharing"]
  c.recursion.strategy = strategy
  c.recursion.num_recursions = recursions
  if strategy != "none":
    c.name += f"-{strategy}-rec{recursions}"
  if "mor" in opts:
    c.mor.enable = True
    c.mor.type = opts["mor"]
    if c.mor.type == "token":
      c.mor.router_func, c.mor.alpha, c.mor.balancing = "softmax", 1.0, "loss"
    c.name += f"-mor-{c.mor.type}"
  if "kv_sharing" in opts:
    c.kv_sharing.enable = True
  # data: a local FineWeb-Edu copy (data.path must be set) with the SmolLM tokenizer
  c.data.corpus = "local"
  c.data.path = ""
  c.data.tokenizer_path = SMOLLM_TOKENIZER
  c.data.seq_len = 1024
  if "fp32" in opts:
    c.execution.dtype = "float32"
  if "bf16" in opts:
    c.execution.dtype = "bfloat16"
  if "tiny" in opts:
    shrink_to_tiny(c)
  return c


def shrink_to_tiny(c):
  """Same code path, CPU-sized: tiny dims, embedded corpus, a few steps."""
  R = c.recursion.num_recursions
  body = 2 * R if c.recursion.strategy != "none" else 4
  c.name += "-tiny"
  c.model.update(hidden_size=64, intermediate_size=128, num_heads=4, num_kv_heads=2,
                 num_layers=body + (2 if c.recursion.strategy.startswith("middle_") else 0), max_seq_len=256)
  c.execution.dtype = "float32"
  c.data.corpus = "shakespeare"
  c.data.seq_len = 64
  c.train.update(num_steps=4, total_batch_size=8, per_device_batch_size=1, warmup_steps=1, log_every_steps=1,
                 eval_every_steps=4, eval_sequences=1)
