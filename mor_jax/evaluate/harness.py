"""lm-evaluation-harness adapter: `MoRJaxLM`, an `lm_eval.api.model.LM` backed by our JAX model.

Importing this module registers it as model "mor_jax" (needs the optional `lm-eval` package:
`pip install -r requirements-eval.txt`). lm_eval's own CLI does not import third-party models, so run it
through this module, which registers the model and then hands the arguments to lm_eval's CLI:

    python -m mor_jax.evaluate.harness run --model mor_jax --model_args workdir=W[,step=N,routing=causal,
        threshold=0.5,max_length=1024] --tasks hellaswag --num_fewshot 0 --batch_size 8

or from Python: `import mor_jax.evaluate.harness; lm_eval.simple_evaluate(model="mor_jax",
model_args="workdir=W", tasks=[...])`.

Scoring: loglikelihood / loglikelihood_rolling run full sequences with causal threshold routing by default
(`routing=causal`: what generation does; right padding then cannot change a request's score) or the training
top-k (`routing=topk`; the top-k then sees the bucket padding). Requests are sorted by length, batched
(batch_size rows) and right-padded to power-of-two bucket lengths (>= 16, <= max_length), so a run compiles at
most a handful of programs. Context + continuation longer than max_length + 1 tokens keep their last tokens.
generate_until uses mor_jax.infer.Generator (greedy unless `temperature` > 0 in the task's gen_kwargs).

Offline tasks: see mor_jax/evaluate/README.md (local `dataset_path: json` tasks, the paper's task list).
"""

from __future__ import annotations

import functools
import sys

import jax
import jax.numpy as jnp
import numpy as np

try:
  from lm_eval.api.model import LM
  from lm_eval.api.registry import register_model
  from lm_eval import utils as lm_utils
except ImportError as e:  # pragma: no cover - exercised only without the optional dependency
  raise ImportError("the lm-evaluation-harness adapter needs the optional package lm-eval: "
                    "pip install -r requirements-eval.txt") from e

from mor_jax.evaluate.nll import row_forward
from mor_jax.infer.prompts import bucket_length


@functools.lru_cache(maxsize=None)
def _scorer(cfg, mode, threshold):
  def fn(variables, inputs_BT, targets_BT, step):
    logits, _ = row_forward(cfg, variables, inputs_BT, mode=mode, threshold=threshold, step=step)
    logp = jax.nn.log_softmax(logits, axis=-1)
    tgt = jnp.take_along_axis(logp, targets_BT[..., None], axis=-1)[..., 0]
    greedy = jnp.argmax(logits, axis=-1) == targets_BT
    return tgt, greedy
  return jax.jit(fn)


@register_model("mor_jax")
class MoRJaxLM(LM):
  """lm_eval model backed by a mor_jax checkpoint (workdir) or by given (cfg, variables, tokenizer)."""

  def __init__(self, workdir: str | None = None, step: int | None = None, routing: str = "causal",
               threshold: float | None = None, batch_size: int | str = 8, max_length: int | None = None,
               *, cfg=None, variables=None, tokenizer=None, restored_step: int = 0, **unused):
    super().__init__()
    if workdir is not None:
      from mor_jax.infer import load_tokenizer, restore  # pylint: disable=g-import-not-at-top
      r = restore(str(workdir), step=None if step in (None, "") else int(step))
      cfg, variables, restored_step = r.cfg, r.variables, r.step
      if tokenizer is None or isinstance(tokenizer, str):    # model_args tokenizer=PATH overrides the workdir's
        tokenizer = load_tokenizer(r.config, r.cfg, directory=r.directory, override=tokenizer or None)
    if cfg is None or variables is None or tokenizer is None:
      raise ValueError("MoRJaxLM needs workdir=... (or cfg, variables and tokenizer).")
    if routing not in ("causal", "topk"):
      raise ValueError(f"routing must be 'causal' or 'topk', got {routing!r}")
    self.cfg, self.variables, self.tokenizer = cfg, variables, tokenizer
    self.routing = routing
    self.threshold = None if threshold in (None, "") else float(threshold)
    self.batch_size = 8 if str(batch_size).startswith("auto") else int(batch_size)
    self.max_length = int(max_length) if max_length else int(cfg.max_seq_len)
    self.step = int(restored_step)
    self.eot_token_id = tokenizer.eos_id
    self._generator = None

  # ------------------------------------------------------------------ tokens
  def tok_encode(self, text: str) -> list[int]:
    return list(self.tokenizer.encode(text)) if text else []

  def _encode_pair(self, context: str, continuation: str):
    n_space = len(context) - len(context.rstrip())     # move trailing spaces onto the continuation
    if n_space:
      continuation = context[-n_space:] + continuation
      context = context[:-n_space]
    whole = self.tok_encode(context + continuation)
    ctx = self.tok_encode(context)
    if whole[:len(ctx)] != ctx:       # the tokenizer merged across the boundary: encode the parts separately
      return ctx, self.tok_encode(continuation)
    return ctx, whole[len(ctx):]

  # ------------------------------------------------------------------ scoring
  def score_tokens(self, pairs: list[tuple[list[int], list[int]]], disable_tqdm: bool = True
                   ) -> list[tuple[float, bool]]:
    """(sum log p(continuation | context), continuation is greedy) for (context ids, continuation ids) pairs.
    An empty context is replaced by the EOS token."""
    fn = _scorer(self.cfg, self.routing, self.threshold)
    seqs = []
    for ctx, cont in pairs:
      if not cont:
        raise ValueError("empty continuation")
      ctx = list(ctx) or [self.eot_token_id]
      seq = (ctx + list(cont))[-(self.max_length + 1):]
      seqs.append((seq, min(len(cont), len(seq) - 1)))
    order = sorted(range(len(seqs)), key=lambda i: -len(seqs[i][0]))
    out = [None] * len(seqs)
    B = self.batch_size
    step = jnp.int32(self.step)
    for start in range(0, len(order), B):
      idx = order[start:start + B]
      L = bucket_length(max(len(seqs[i][0]) - 1 for i in idx), self.max_length)
      inputs = np.zeros((B, L), np.int32)
      targets = np.zeros((B, L), np.int32)
      for row, i in enumerate(idx):
        seq = seqs[i][0]
        inputs[row, :len(seq) - 1] = seq[:-1]
        targets[row, :len(seq) - 1] = seq[1:]
      logp, greedy = jax.device_get(fn(self.variables, inputs, targets, step))
      for row, i in enumerate(idx):
        seq, n = seqs[i]
        end = len(seq) - 1
        out[i] = (float(np.sum(logp[row, end - n:end], dtype=np.float64)), bool(np.all(greedy[row, end - n:end])))
    return out

  def loglikelihood(self, requests, disable_tqdm: bool = False):
    pairs = [self._encode_pair(*req.args[:2]) for req in requests]
    return self.score_tokens(pairs)

  def loglikelihood_rolling(self, requests, disable_tqdm: bool = False):
    results = []
    for req in requests:
      tokens = self.tok_encode(req.args[0])
      windows = [lm_utils.make_disjoint_window(w) for w in lm_utils.get_rolling_token_windows(
          token_list=tokens, prefix_token=self.eot_token_id, max_seq_len=self.max_length, context_len=1)]
      results.append(sum(ll for ll, _ in self.score_tokens(windows)) if windows else 0.0)
    return results

  def generate_until(self, requests, disable_tqdm: bool = False):
    from mor_jax.infer import Generator, SamplingParams  # pylint: disable=g-import-not-at-top
    if self._generator is None:
      self._generator = Generator(self.cfg, self.variables, self.tokenizer, threshold=self.threshold)
    out = []
    for req in requests:
      context, kwargs = req.args[0], dict(req.args[1] if len(req.args) > 1 else {})
      until = kwargs.get("until") or []
      until = [until] if isinstance(until, str) else list(until)
      max_new = int(kwargs.get("max_gen_toks", 256))
      max_new = max(1, min(max_new, self.max_length - 1))
      ids = self.tok_encode(context)[-(self.max_length - max_new):] or [self.eot_token_id]
      temperature = float(kwargs.get("temperature", 0.0) or 0.0)
      g = self._generator.generate([ids], max_new_tokens=max_new, sampling=SamplingParams(temperature=temperature),
                                   stop=tuple(until))[0]
      text = g.text
      for s in until:
        if s and s in text:
          text = text[:text.index(s)]
      out.append(text)
    return out


def main(argv=None):
  """`python -m mor_jax.evaluate.harness run --model mor_jax --model_args workdir=W --tasks ...`."""
  from lm_eval.__main__ import cli_evaluate  # pylint: disable=g-import-not-at-top
  if argv is not None:
    sys.argv = [sys.argv[0]] + list(argv)
  cli_evaluate()


if __name__ == "__main__":
  main()
