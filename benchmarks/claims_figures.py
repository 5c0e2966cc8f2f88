"""Renderers of the generated figures (`benchmarks/claims_registry.py` says which files each one reads).

Each renderer gets one `Source(path, data)` per source file and returns the text that stands between the claim's
markers. Only the standard library: `python benchmarks/claims.py --check` must run in a second, anywhere.
"""

from __future__ import annotations

import ast
import collections
import os
import re

HERE = os.path.dirname(os.path.abspath(__file__))
Source = collections.namedtuple("Source", "path data")

# Results committed before benchmarks wrote provenance: the commit and date of the file's last change in git
# (`git log -1 --format='%h %ad' --date=short -- FILE`; tests/test_claims.py checks them against the history).
LEGACY = {
    "benchmarks/results/ab_one_house_cpu.json": ("81818df", "2026-12-02"),
    "benchmarks/results/cpu_train_step_avx512.json": ("6cd9d0a", "2026-11-27"),
    "benchmarks/results/gpu_h100_train_throughput.json": ("219133c", "2026-11-26"),
    "benchmarks/results/gpu_h100_train_throughput.log": ("219133c", "2026-11-26"),
    "benchmarks/results/gpu_h200_train_throughput.json": ("b2c743f", "2026-11-26"),
    "benchmarks/results/isoflop/isoflop.json": ("219133c", "2026-11-26"),
    "benchmarks/results/isoflop_seeds/isoflop_seeds.json": ("ca8ddac", "2026-12-03"),
    "benchmarks/results/token_depths/default_job_step300.json": ("8562ced", "2026-12-03"),
    "benchmarks/results/uptrain/uptrain.json": ("c742f27", "2026-12-03"),
    "benchmarks/results/uptrain_long/uptrain.json": ("c742f27", "2026-12-03"),
}

VARIANT_LABELS = {
    "vanilla": "vanilla", "recursive_middle_cycle_rec2": "recursive middle_cycle R=2",
    "mor_expert_rec2_cap1-0.5": "MoR expert R=2 (capacity 1, 0.5)", "mor_expert_rec3": "MoR expert R=3",
    "mor_token_rec3": "MoR token-choice R=3",
}
ISA = {"avx512": "AVX-512", "avx2": "AVX2"}


# ------------------------------------------------------------------ helpers

def origin(src: Source, short: bool = False) -> str:
  """Where a result comes from: its provenance ('commit X': measured at X), or for an older file the commit that
  added it ('committed in X', from git history), said so."""
  prov = src.data.get("provenance") if isinstance(src.data, dict) else None
  if prov:
    commit = (prov.get("commit") or "unknown")[:7] + ("+uncommitted changes" if prov.get("dirty") else "")
    return f"commit {commit}" if short else f"commit {commit}, {prov.get('date', '')[:10]}"
  if src.path not in LEGACY:
    raise KeyError(f"{src.path} has no provenance and no LEGACY entry in benchmarks/claims_figures.py")
  commit, date = LEGACY[src.path]
  return f"committed in {commit}" if short else f"committed in {commit} on {date}, no provenance recorded"


def sci(v: float) -> str:
  """2 significant digits in e-notation without a padded exponent: 2.4e-6."""
  return re.sub(r"e([+-])0*(\d)", r"e\1\2", f"{v:.1e}").replace("e+", "e")


def rng(values, fmt="{:.2f}", suffix="x") -> str:
  lo, hi = fmt.format(min(values)), fmt.format(max(values))
  return f"{lo}{suffix}" if lo == hi else f"{lo}-{hi}{suffix}"


def log_field(log: str, pattern: str, what: str) -> str:
  m = re.search(pattern, log, re.M)
  if not m:
    raise ValueError(f"the log does not give {what} (pattern {pattern!r})")
  return m.group(1)


def weights_of(src: Source, log: str = "") -> str:
  """'random-weight' or 'trained' routers: the result's conditions, else what the benchmark's log says."""
  prov = src.data.get("provenance") if isinstance(src.data, dict) else None
  if prov and prov.get("conditions", {}).get("weights"):
    return str(prov["conditions"]["weights"]).replace("random", "random-weight")
  if "random weights" in log:
    return "random-weight"
  raise ValueError(f"{src.path}: cannot tell random from trained weights")


def table(header, rows, align=None) -> str:
  align = align or ["---"] * len(header)
  lines = ["| " + " | ".join(header) + " |", "| " + " | ".join(align) + " |"]
  return "\n".join(lines + ["| " + " | ".join(str(c) for c in r) + " |" for r in rows])


# ------------------------------------------------------------------ parity, GGUF

def parity_worst(s: Source) -> str:
  d = s.data
  return f"{sci(d['worst'])} over the {d['fixtures']} fixtures (`{s.path}`, {origin(s)})"


def gguf_logits(s: Source) -> str:
  return sci(s.data["max_abs_logit_diff"])


def gguf_logits_detail(s: Source) -> str:
  d = s.data
  agree = "all" if d["argmax_agree"] == d["tokens"] else f"{d['argmax_agree']} of the"
  cpu = d["provenance"]["machine"]["cpu"]
  return (f"on {d['tokens']} tokens of English text the largest logit difference is {sci(d['max_abs_logit_diff'])} "
          f"and the argmax agrees at {agree} {d['tokens']} positions ({cpu}; `{s.path}`, {origin(s)})")


def lm_eval_common_mc(s: Source) -> str:
  d = s.data
  return (f"**{d['acc']:.3f}** ({round(d['acc'] * d['questions'])}/{d['questions']}) ± {d['acc_stderr']:.3f} | "
          f"{d['acc_norm']:.3f} ± {d['acc_norm_stderr']:.3f}")


def lm_eval_origin(s: Source) -> str:
  d = s.data
  return (f"lm-eval {d['lm_eval']}, {'zero-shot' if d['num_fewshot'] == 0 else str(d['num_fewshot']) + '-shot'}, "
          f"CPU; `{s.path}`, {origin(s)}")


# ------------------------------------------------------------------ iso-FLOP

def _budget_key(d, which=max):
  return f"{which(d['budgets']):g}x"


def causal_gap(s: Source) -> str:
  d = s.data
  gap = max(r["gap"] for r in d["runs"] if r["causal_evaluated"])
  return (f"at most {gap:.4f} nats over top-k in any of the {len(d['runs'])} iso-FLOP runs "
          f"({len(d['seeds'])} seeds x {len(d['budgets'])} budgets)")


def isoflop_3x_order(s: Source) -> str:
  key = _budget_key(s.data)
  models = s.data["summary"][key]["models"]
  chosen = sorted(("mor_ec2", "vanilla", "rec2"), key=lambda m: models[m]["val_nll_topk"])
  seeds = models[chosen[0]]["val_nll_topk_by_seed"]
  every = all([models[m]["val_nll_topk_by_seed"][sd] for m in chosen] ==
              sorted(models[m]["val_nll_topk_by_seed"][sd] for m in chosen) for sd in seeds)
  text = " < ".join(f"{models[m]['label']} {models[m]['val_nll_topk']:.3f} ± {models[m]['val_nll_topk_std']:.3f}"
                    for m in chosen)
  return (f"validation NLL at {key}, mean ± sd: {text} "
          f"({'same order every seed' if every else 'not the same order for every seed'})")


def _flops(v: float) -> str:
  mant, exp = f"{v:.2e}".split("e")
  return f"{mant}e{int(exp)}"


def isoflop_seeds_means(s: Source) -> str:
  d = s.data
  keys = [f"{b:g}x" for b in d["budgets"]]
  names = list(d["summary"][keys[0]]["models"])
  header = ["model", "unique params"] + [f"{k}: {_flops(d['summary'][k]['models']['vanilla']['train_flops'])} FLOPs"
                                         for k in keys]
  rows = []
  for n in names:
    m0 = d["summary"][keys[0]]["models"][n]
    ms = [d["summary"][k]["models"][n] for k in keys]
    cells = [f"{m['val_nll_topk']:.3f} ± {m['val_nll_topk_std']:.3f}" for m in ms]
    rows.append([m0["label"], f"{m0['unique_params'] / 1e6:.2f}M"] + cells)
  return table(header, rows, ["---", "---:"] + ["---:"] * len(keys))


PAIRS = [("vanilla", "mor_ec2"), ("rec2", "vanilla"), ("rec2", "mor_ec2"), ("mor_ec3", "mor_ec2"),
         ("mor_tc3", "mor_ec3"), ("vanilla", "mor_tc3")]


def isoflop_seeds_paired(s: Source) -> str:
  d = s.data
  keys = [f"{b:g}x" for b in d["budgets"]]
  labels = d["summary"][keys[0]]["models"]
  rows = []
  for a, b in PAIRS:
    cells = []
    for k in keys:
      pairs = d["summary"][k]["pairs"]
      p, sign = (pairs[f"{a} - {b} (topk)"], 1) if f"{a} - {b} (topk)" in pairs else (pairs[f"{b} - {a} (topk)"], -1)
      mark = (" *" if p["significant"] else "") + ((" all" if p["significant"] else ", all") if p["all_same_sign"]
                                                   else "")
      cells.append(f"{sign * p['mean']:+.3f} ± {p['se']:.3f}{mark}")
    rows.append([f"{labels[a]['label']} - {labels[b]['label']}"] + cells)
  return table(["a - b: mean ± standard error"] + keys, rows, ["---"] + ["---:"] * len(keys))


def source_and_origin(s: Source) -> str:
  return f"`{s.path}`, {origin(s)}"


def isoflop_seeds_time(s: Source) -> str:
  d = s.data
  key = max(d["budgets"])
  runs = [r for r in d["runs"] if r["budget_x"] == key]
  expert = [r["wall_s"] / 60 for r in runs if r["name"] != "mor_tc3"]
  token = [r["wall_s"] / 60 for r in runs if r["name"] == "mor_tc3"]
  return (f"took {d['wall_s_this_call'] / 60:.0f} minutes with `--workers={d['args']['workers']}`: a {key:g}x run "
          f"takes {rng(expert, '{:.0f}', '')} minutes on one core, token-choice {rng(token, '{:.0f}', '')}")


def uptrain_table(s: Source) -> str:
  return s.data["table_markdown"]


def uptrain_time(s: Source) -> str:
  n = len(s.data["results"])
  return f"{n} models in {s.data['wall_s_all_models'] / 60:.0f} minutes ({origin(s)})"


def token_depths(s: Source) -> str:
  d = s.data
  return (f"{d['tokens']:,} validation tokens, {d['mean_recursions']:.2f} recursions per token; "
          f"{origin(s, True)}")


def isoflop_1seed_table(s: Source) -> str:
  return s.data["table_markdown"]


def isoflop_1seed_origin(s: Source) -> str:
  d = s.data
  return (f"jax {d['jax']}, {d['cpu_count']} CPU cores, one seed ({d['args']['seed']}), "
          f"{d['total_wall_s'] / 60:.1f} minutes in all; {origin(s)}")


# ------------------------------------------------------------------ CPU and GPU training speed

def _reference_rows() -> dict:
  """benchmarks/train_step.py's VARIANTS: our variant -> the reference's row name (read, not imported: no jax)."""
  with open(os.path.join(HERE, "train_step.py"), encoding="utf-8") as f:
    tree = ast.parse(f.read())
  for node in tree.body:
    if isinstance(node, ast.Assign) and any(getattr(t, "id", "") == "VARIANTS" for t in node.targets):
      return {k: v[4] for k, v in ast.literal_eval(node.value).items()}
  raise ValueError("benchmarks/train_step.py has no VARIANTS")


def _stored_best(ref: Source) -> dict:
  best: dict = {}
  for r in ref.data["results"]:
    best[r["variant"]] = max(best.get(r["variant"], 0.0), r["train_tokens_per_s"])
  return best


def _cpu_rows(js: Source, ref: Source):
  names, best = _reference_rows(), _stored_best(ref)
  for r in js.data["rows"]:
    stored = best.get(names.get(r["variant"]) or "")
    yield r, stored, (r["tokens_per_s"] / stored if stored else None)


def _cpu_machine(js: Source, log: Source) -> str:
  m = js.data["machine"]
  jax = log_field(log.data, r"^jax (\S+?),", "the jax version")
  return f"{m['cores']}-core {m['cpu']} with {ISA.get(m['isa'], m['isa'])}, jax {jax}, {m['utc'][:10]}"


def cpu_step(js: Source, log: Source, ref: Source) -> str:
  ratios = [x for _, _, x in _cpu_rows(js, ref) if x]
  return f"CPU step {rng(ratios)} the reference's stored PyTorch speed ({_cpu_machine(js, log)}, {origin(js, True)})"


def cpu_peak(js: Source, log: Source) -> str:
  return f"{js.data['peak_gflops']:.1f} GFLOP/s"


def cpu_table(js: Source, log: Source, ref: Source) -> str:
  rows = []
  for r, stored, x in _cpu_rows(js, ref):
    now = (f"{r['repeat_tokens_per_s']:,.0f} / {r['torch_now_tokens_per_s']:,.0f} "
           f"({r['repeat_tokens_per_s'] / r['torch_now_tokens_per_s']:.2f}x)" if "torch_now_tokens_per_s" in r else "-")
    rows.append([VARIANT_LABELS.get(r["variant"], r["variant"]), f"{r['tokens_per_s']:,.0f}",
                 f"{r['gflops'] / js.data['peak_gflops']:.0%}", f"{stored:,.0f}" if stored else "-",
                 f"{x:.2f}x" if x else "-", now])
  ratios = js.data.get("mor_r2_over_recursive_r2", {})
  by = {r["variant"]: r for r in js.data["rows"]}
  f_ratio = by["mor_expert_rec2_cap1-0.5"]["train_flops_per_token"] / by["recursive_middle_cycle_rec2"][
      "train_flops_per_token"]
  notes = "; ".join(f"{v / f_ratio:.3f} ({k})" for k, v in ratios.items())
  return (f"{_cpu_machine(js, log)} ({origin(js)}; `{js.path}` and `.log`), fp32 matmul peak "
          f"{js.data['peak_gflops']:.1f} GFLOP/s measured in the run; stored reference: `{ref.path}`:\n\n" +
          table(["variant", "tokens/s", "of matmul peak", "stored PyTorch reference, best of eager/sdpa",
                 "x stored", "PyTorch now, back to back: ours / PyTorch tokens/s"], rows,
                ["---", "---:", "---:", "---:", "---:", "---:"]) +
          f"\n\nMoR R=2 / recursive R=2 step time over their FLOPs ratio ({f_ratio:.3f}): {notes}.")


def _gpu_row(r: dict, label: str) -> list:
  return [label, f"{r['per_device_batch']} x {r['seq_len']}", f"{r['tokens_per_s']:,.0f}",
          f"{r['tflops_per_device']:.0f}", f"{r['mfu']:.1%}", f"{r['peak_memory_bytes'] / 2**30:.1f} GiB"]


def gpu_mfu(s: Source) -> str:
  r = s.data["default_config_rows"][0]
  jax = log_field(s.data["device"], r"jax (\S+)", "the jax version")
  return f"{r['mfu']:.1%} MFU on one H100 ({origin(s, True)}, jax {jax}; not remeasured since)"


def gpu_table(s: Source) -> str:
  d = s.data
  rows = [_gpu_row(r, {"rec2": "rec2", "mor_expert": "MoR expert R=2"}[r["variant"]])
          for r in d["default_config_rows"]]
  sweep = {r["run"]: r for r in d["sweep_rows"]}
  rows.insert(2, _gpu_row(sweep["sweep_unroll_b32"], "rec2 (sweep)"))
  rows.append(_gpu_row(sweep["sweep_scan_b16"], "rec2, layers as a loop (`scan_unroll=1`)"))
  peak = d["default_config_rows"][0]["peak_tflops_per_device"]
  return (f"{d['device']}; {origin(s)}; not remeasured since:\n\n" +
          table(["run", "batch x seq", "tokens/s", "TFLOP/s", f"MFU ({peak:.0f} peak)", "peak memory"], rows))


def gpu_profile(log: Source) -> str:
  """The kernel-time split of the unrolled rec2 step at batch 16 (gpu_check.sh's `unroll_b16` run)."""
  line = log_field(log.data, r"run unroll_b16:.*\n.*\n\s*profile \(rec2\): (.*)$", "the unroll_b16 profile")
  kinds = dict((k, float(v)) for k, v in re.findall(r"([\w/]+) ([\d.]+)%", line.split("by kind", 1)[1]))
  names = {"matmul": "matmuls", "elementwise/fusion": "elementwise fusions", "reduce/scatter/sort": "reductions",
           "attention": "cuDNN attention"}
  parts = [f"{v:.0f}% {names[k]}" for k, v in kinds.items() if k in names]
  return f"{', '.join(parts[:-1])} and {parts[-1]} of the device time ({origin(log, True)})"


def gpu_h200(s: Source, log: Source) -> str:
  mfu = rng([r["mfu"] * 100 for r in s.data], "{:.0f}", "%")
  jax = log_field(log.data, r"^jax (\S+)", "the jax version")
  return f"{mfu} MFU (`{s.path[:-5]}.*`, {origin(s, True)}, jax {jax})"


def ab_table(s: Source) -> str:
  d = s.data
  rows = [[VARIANT_LABELS.get(r["variant"], r["variant"]), f"{r['base_tokens_per_s']:,.0f}",
           f"{r['new_tokens_per_s']:,.0f}", f"{r['ratio_new_over_base']:.3f}"] for r in d["table"]]
  lo = min(r["ratio_range"][0] for r in d["table"])
  hi = max(r["ratio_range"][1] for r in d["table"])
  return (f"{d['rounds']} rounds of {d['steps']} steps ({origin(s)}):\n\n" +
          table(["variant", "base tok/s", "new tok/s", "new/base (median of per-round ratios)"], rows,
                ["---", "---:", "---:", "---:"]) + f"\n\nPer-round ratios ranged {lo:.2f}-{hi:.2f}.")
