"""Validation NLL of a checkpoint with top-k routing (as trained / as the reference reported) and with causal
threshold routing (as generation runs), their gap, and average recursions per token.

    python main.py --mode=eval --workdir=W            ->  main_eval(config, W)

Every batch row is scored on its own (`jax.vmap` over rows: expert-choice top-k picks tokens within a row, as
in training), the rows are sharded over the local devices (batch padded with empty rows to a multiple of the
device count), and each row returns (NLL sum, counted targets, mean recursions of its positions). The host adds
the rows up in float64 in row order, so the totals do not depend on how rows are batched or spread over devices.

Recursions per token: the mean over a row's positions of the recursions each position went through
(aux["mean_recursions"] of the row), weighted by the row's counted targets. With top-k routing it is fixed by
the capacities; with causal routing it is what the router decides. Non-routed recursive models report their
fixed depth.
"""

from __future__ import annotations

import functools
import math
import os
import time
from typing import Iterable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from mor_jax import checkpoint as ckpt_lib
from mor_jax import files as files_lib
from mor_jax.config import ModelConfig
from mor_jax.model import depths
from mor_jax.model.transformer import MoRLM
from mor_jax.train.step import target_mask

MODES = ("topk", "causal")
MODE_NAMES = {"topk": "top-k (training)", "causal": "causal (threshold)"}
RESULTS_FILE = "eval_results_step{step}.json"
DEPTHS_FILE = "token_depths_step{step}"           # .md and .json


def _fixed_recursions(cfg: ModelConfig) -> float:
  return float(cfg.recursions) if cfg.strategy != "none" else 1.0


def _rngs(cfg: ModelConfig):
  # the random-router ablation draws its scores from a fixed key at evaluation (as the trainer's eval_step)
  return {"router": jax.random.PRNGKey(0x7FFFFFFF)} if cfg.rand_router else None


def row_forward(cfg: ModelConfig, variables, tokens_BT, positions_BT=None, segment_ids_BT=None, *, mode: str,
                threshold=None, step=None, per_token: bool = False):
  """(float32 logits [B, T, V], mean recursions of each row [B]): the model applied to every row alone.
  With `per_token` (routed models), also the recursions of each position [B, T] (depths.token_recursions)."""
  model = MoRLM(cfg)
  fixed = jnp.float32(_fixed_recursions(cfg))

  def one(tok_T, pos_T, seg_T):
    logits, aux = model.apply(variables, tok_T[None], None if pos_T is None else pos_T[None],
                              None if seg_T is None else seg_T[None], routing_mode=mode, threshold=threshold,
                              step=step, rngs=_rngs(cfg))
    out = (logits[0], jnp.asarray(aux.get("mean_recursions", fixed), jnp.float32))
    return out + (depths.token_recursions(cfg, aux, tok_T.shape[0])[0],) if per_token else out

  in_axes = (0, None if positions_BT is None else 0, None if segment_ids_BT is None else 0)
  return jax.vmap(one, in_axes=in_axes)(tokens_BT, positions_BT, segment_ids_BT)


def _row_sums(variables, batch, step, *, cfg, mode, threshold, document_mask):
  tokens = batch["tokens"]
  inputs, targets = tokens[:, :-1], tokens[:, 1:]
  seg = batch.get("segment_ids")
  mask = target_mask(batch)            # with chat data's loss_mask: the trained (assistant) tokens only
  mask = jnp.ones(targets.shape, bool) if mask is None else mask
  pos = batch["positions"][:, :-1] if document_mask and "positions" in batch else None
  seg_in = seg[:, :-1] if document_mask and seg is not None else None
  per_token = mode == "causal" and depths.is_routed(cfg)     # which tokens go deep (token_depths_step<N>.md)
  logits, rec, *token_rec = row_forward(cfg, variables, inputs, pos, seg_in, mode=mode, threshold=threshold,
                                        step=step, per_token=per_token)
  logp = jax.nn.log_softmax(logits, axis=-1)
  tgt = jnp.take_along_axis(logp, targets[..., None], axis=-1)[..., 0]
  m = mask.astype(jnp.float32)
  out = {"nll": -jnp.sum(tgt * m, axis=-1), "count": jnp.sum(m, axis=-1), "recursions": rec}
  if per_token:
    out["token_recursions"] = token_rec[0]
  return out


def make_row_scorer(cfg: ModelConfig, mode: str, *, threshold=None, document_mask: bool = False,
                    mesh: Mesh | None = None):
  """jit(fn(variables, batch, step) -> {'nll', 'count', 'recursions'} per row [B]) with the batch's rows sharded
  over `mesh` (axis 'data'; default: all local devices) and the variables replicated."""
  if mode not in MODES:
    raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
  mesh = mesh or Mesh(np.array(jax.local_devices()), ("data",))
  fn = functools.partial(_row_sums, cfg=cfg, mode=mode, threshold=threshold, document_mask=document_mask)
  rows = NamedSharding(mesh, PartitionSpec("data"))
  repl = NamedSharding(mesh, PartitionSpec())
  return jax.jit(fn, in_shardings=(repl, rows, repl), out_shardings=rows)


def _pad_rows(batch: dict, multiple: int) -> dict:
  n = batch["tokens"].shape[0]
  short = (-n) % multiple
  if not short:
    return batch
  return {k: np.concatenate([v, np.zeros((short,) + v.shape[1:], v.dtype)]) for k, v in batch.items()}


def evaluate_nll(cfg: ModelConfig, variables, batches: Iterable[dict], *, modes: Sequence[str] = MODES,
                 threshold: float | None = None, step: int = 0, document_mask: bool = False,
                 devices: Sequence[jax.Device] | None = None, max_batches: int | None = None,
                 progress: bool = False, expected_batches: int | None = None,
                 tally: depths.DepthTally | None = None) -> dict:
  """Validation NLL of `variables` over `batches` (numpy dicts: tokens [B, T+1], segment_ids, positions).

  Returns {mode: {'nll', 'perplexity', 'tokens', 'mean_recursions'}} for each mode, plus 'gap' (causal NLL -
  top-k NLL) when both ran, 'batches', 'num_devices' and 'threshold'.
  """
  devices = list(devices or jax.local_devices())
  mesh = Mesh(np.array(devices), ("data",))
  repl = NamedSharding(mesh, PartitionSpec())
  variables = jax.device_put(variables, repl)
  step_arr = jax.device_put(jnp.int32(step), repl)
  scorers = {m: make_row_scorer(cfg, m, threshold=threshold, document_mask=document_mask, mesh=mesh)
             for m in modes}
  rows = NamedSharding(mesh, PartitionSpec("data"))
  acc = {m: {"nll": [], "count": [], "recursions": []} for m in modes}
  bar = None
  if progress:
    from tqdm import tqdm  # pylint: disable=g-import-not-at-top
    total = max_batches if max_batches is not None else expected_batches
    bar = tqdm(total=total, desc="eval", unit="batch")
  n_batches = 0
  try:
    for batch in batches:
      if max_batches is not None and 0 <= max_batches <= n_batches:
        break
      batch = _pad_rows({k: np.asarray(v) for k, v in batch.items()}, len(devices))
      placed = jax.device_put(batch, rows)
      outs = {m: scorers[m](variables, placed, step_arr) for m in modes}   # dispatch all modes, then fetch
      for m in modes:
        got = jax.device_get(outs[m])
        token_rec = got.pop("token_recursions", None)
        if tally is not None and token_rec is not None:
          seg = batch.get("segment_ids")
          tally.add(batch["tokens"][:, :-1], token_rec, None if seg is None else seg[:, :-1] > 0)
        for k, v in got.items():
          acc[m][k].append(np.asarray(v, np.float64))
      n_batches += 1
      if bar is not None:
        bar.update(1)
  finally:
    if bar is not None:
      bar.close()
  result = {"batches": n_batches, "num_devices": len(devices),
            "threshold": float(cfg.threshold if threshold is None else threshold)}
  for m in modes:
    nll = np.concatenate(acc[m]["nll"]) if n_batches else np.zeros(0)
    count = np.concatenate(acc[m]["count"]) if n_batches else np.zeros(0)
    rec = np.concatenate(acc[m]["recursions"]) if n_batches else np.zeros(0)
    total = float(count.sum())
    mean = float(nll.sum() / total) if total else float("nan")
    result[m] = {"nll": mean, "perplexity": float(math.exp(mean)) if total else float("nan"), "tokens": int(total),
                 "mean_recursions": float((rec * count).sum() / total) if total else float("nan")}
  if "topk" in modes and "causal" in modes:
    result["gap"] = result["causal"]["nll"] - result["topk"]["nll"]
  return result


def format_table(result: dict) -> str:
  lines = [f"{'routing':<20} {'val NLL':>9} {'perplexity':>11} {'recursions/token':>17} {'tokens':>10}"]
  for m in MODES:
    if m in result:
      r = result[m]
      lines.append(f"{MODE_NAMES[m]:<20} {r['nll']:>9.4f} {r['perplexity']:>11.3f} {r['mean_recursions']:>17.3f} "
                   f"{r['tokens']:>10,}")
  if "gap" in result:
    lines.append(f"gap (causal - top-k): {result['gap']:+.4f} nats/token "
                 f"(threshold {result['threshold']:g})")
  return "\n".join(lines)


def main_eval(config, workdir: str, *, step: int | None = None, threshold: float | None = None,
              batches: int | None = None, progress: bool = True, devices=None, tokenizer: str | None = None) -> dict:
  """The eval command: restores a checkpoint of `workdir` (from any device count), scores the configured
  validation split (all of it, or `batches` batches of per_device_batch_size x devices rows) in both routing
  modes, prints a table and writes WORKDIR/eval_results_step<N>.json. Returns the result dict.

  `config` may be None (the checkpoint's own config is used); otherwise it must describe the same model.
  The text is tokenized with `tokenizer` (--tokenizer), else the workdir's tokenizer/, else the config's.
  """
  from mor_jax import data as data_lib  # pylint: disable=g-import-not-at-top
  from mor_jax.infer import restore  # pylint: disable=g-import-not-at-top
  from mor_jax.infer.options import check_threshold  # pylint: disable=g-import-not-at-top
  check_threshold(threshold)          # before the restore: --threshold=2.5 is refused at once
  if jax.process_index() == 0 and os.path.isdir(workdir):     # a read-only workdir: refused before computing
    ckpt_lib.require_writable(workdir, RESULTS_FILE.format(step="<N>"))
  devices = list(devices or jax.local_devices())
  mesh = Mesh(np.array(devices), ("data",))
  r = restore(workdir, step=step, config=config, sharding=NamedSharding(mesh, PartitionSpec()))
  cfg, cfgd = r.cfg, _with_tokenizer(r, tokenizer)
  per_device = int(cfgd.train.per_device_batch_size)         # the run's (0: automatic -> 1 row per device)
  rows = max(1, per_device) * len(devices)
  rows += (-rows) % max(1, jax.process_count())
  max_batches = batches if batches is not None and batches >= 0 else None
  expected = None
  if progress and max_batches is None:   # the whole split: the bar's total
    expected = data_lib.count_batches(cfgd, "validation", global_batch_size=rows,
                                      process_index=jax.process_index(), process_count=jax.process_count())
  it = data_lib.make_iterator(cfgd, "validation", global_batch_size=rows, num_epochs=1)
  tally = depths.DepthTally(cfg.vocab_size, depths.max_recursions(cfg)) if depths.is_routed(cfg) else None
  t0 = time.time()
  try:
    result = evaluate_nll(cfg, r.variables, it, threshold=threshold, step=r.step,
                          document_mask=bool(cfgd.data.document_mask), devices=devices,
                          max_batches=max_batches, progress=progress, expected_batches=expected, tally=tally)
  finally:
    close = getattr(it, "close", None)
    if callable(close):
      close()
  result.update({"step": r.step, "checkpoint": r.directory, "name": cfgd.name, "split": "validation",
                 "batch_rows": rows, "seconds": round(time.time() - t0, 3)})
  if jax.process_index() == 0:
    path = os.path.join(workdir, RESULTS_FILE.format(step=r.step))
    files_lib.write_json(path, result)
    result["results_file"] = path
    print(f"{result['name']} step {r.step}: validation split, {result['batches']} batches on "
          f"{len(devices)} device(s)")
    print(format_table(result))
    print(f"results: {path}")
    if tally is not None:
      decode = _decoder(cfgd)
      md, _ = tally.write(os.path.join(workdir, DEPTHS_FILE.format(step=r.step)), decode)
      result["token_depths_file"] = md
      print(f"which tokens go deepest (causal routing): {md}")
  return result


def _decoder(cfgd):
  """token ids -> text with the model's tokenizer, or None (ids are shown)."""
  try:
    from mor_jax.data import tokenizer as tokenizer_lib  # pylint: disable=g-import-not-at-top
    tok = tokenizer_lib.load_tokenizer(cfgd.data.tokenizer_path)
  except (OSError, ValueError, KeyError):   # no tokenizer: the table shows ids
    return None
  return tok.decode


def _with_tokenizer(r, override: str | None):
  """The restored config with data.tokenizer_path set to the model's tokenizer (vocabulary-checked), if found."""
  import ml_collections  # pylint: disable=g-import-not-at-top
  from mor_jax.infer import checkpoint as infer_ckpt  # pylint: disable=g-import-not-at-top
  cfgd = ml_collections.ConfigDict(r.config.to_dict())
  path = infer_ckpt.tokenizer_source(cfgd, directory=r.directory, override=override)
  if path is not None:
    infer_ckpt.load_tokenizer(cfgd, r.cfg, directory=r.directory, override=override)
    cfgd.data.tokenizer_path = path
  return cfgd
