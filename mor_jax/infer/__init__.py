"""Inference: restore a trained model, recursion-wise KV caches, causal routing, generation.

Public API:
  restore(path, step=None, config=None, sharding=None) -> mor_jax.checkpoint.ParamsRestore   params + config
  load_tokenizer(config, cfg) -> Tokenizer           --tokenizer, WORKDIR/tokenizer/ or the config's; vocab-checked
  Generator(cfg, variables, tokenizer, threshold=None, kv_capacity="full", add_bos=False)
      .generate(prompts, max_new_tokens=, sampling=, seed=, stop=, on_text=, ...) -> [Generation]
  SamplingParams(temperature, top_k, top_p);  sample_logits(keys, logits, sampling)    (sampling.py)
  prompts.py: encode_prompt(s), bucket_length, prompt_length, read_prompts_file (the checks every inference path shares)
  forward_cached(cfg, plan, variables, cache, tokens, positions, valid, threshold=) -> (h, cache, info)
  make_plan(cfg, max_len, capacity) -> CachePlan;  init_cache(cfg, plan, batch);  KVCache;  cache_stats(cache, plan)
  Engine(cfg, variables, tokenizer, slots=, max_new_tokens=, ...).generate(prompts, max_new_tokens=[...])
      / .submit + .run: continuous depth-wise batching (engine/: layout, tick, scheduler), the same outputs as
      Generator at a higher decode throughput
  main_generate(config, workdir, prompt=..., interactive=..., prompts_file=..., ...)   the generate command
      (options.py: GenerateOptions, each flag's default and help declared once, and the checks eval shares)
  cli.define_flags(), cli.run_from_flags(config, workdir)                            main.py wiring

Names are imported lazily, so `from mor_jax.infer import cli` (flag definitions) does not import JAX.
"""

import importlib

_EXPORTS = {
    "CachePlan": "cache", "KVCache": "cache", "cache_stats": "cache", "init_cache": "cache", "make_plan": "cache",
    "InferenceError": "errors", "forward_cached": "decode", "logits_fn": "decode",
    "Generation": "generate", "Generator": "generate", "SamplingParams": "sampling", "sample_logits": "sampling",
    "Engine": "engine",
    "find_checkpoints": "checkpoint", "load_tokenizer": "checkpoint", "restore": "checkpoint",
    "main_generate": "cli",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name):
  if name in _EXPORTS:
    return getattr(importlib.import_module(f"mor_jax.infer.{_EXPORTS[name]}"), name)
  raise AttributeError(f"module 'mor_jax.infer' has no attribute {name!r}")
