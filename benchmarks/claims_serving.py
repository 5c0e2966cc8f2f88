"""Renderers of the serving and decoding figures (README.md, docs/serving.md, docs/inference.md): the text between
claim markers, from `serve_trained.json` (benchmarks/serve_load.py), `serve_real.json` (benchmarks/serve_real.py)
and `depthwise_batching.json` (benchmarks/depthwise_batching.py). Registered in benchmarks/claims_registry.py."""

from __future__ import annotations

from claims_figures import Source, origin, table  # noqa: E402  (benchmarks/claims_figures.py)


def _machine(s: Source) -> str:
  """'2-core AMD EPYC with AVX2' (the CPU and its vector extensions: this VM kind has come as different CPUs, and
  which products are fast depends on them) or the accelerator's kind."""
  m = s.data["provenance"]["machine"]
  if m.get("backend") != "cpu":
    return f"{m.get('device_kind')}"
  flags = " with " + ", ".join(f.upper().replace("_", "-") for f in m["cpu_flags"]) if m.get("cpu_flags") else ""
  cpu = (m.get('cpu') or 'CPU').replace('(R)', '').replace('(TM)', '')
  return f"{m['cores']}-core {cpu}{flags}"


def _mor(rows: list) -> list:
  return [r for r in rows if r["model"] != "vanilla"]


def _trained(s: Source) -> str:
  """'trained 300 steps' (the benchmark writes 'trained, 300 steps') or 'random-weight'."""
  w = s.data["provenance"]["conditions"]["weights"]
  return "random-weight" if w == "random" else w.replace(", ", " ")


def _xs(values, fmt="{:.2f}x") -> str:
  return "/".join(fmt.format(v) for v in values)


def _depthwise_engine(s: Source) -> list:
  return [r for r in s.data["results"] if r["mode"] == "engine"]


# ------------------------------------------------------------------ README features table

def readme_serving(trained: Source, real: Source) -> str:
  """Through the server first: trained MoR vs trained vanilla, and the real model against transformers."""
  mor, a = _mor(trained.data["models"]), trained.data["args"]
  srv, hf = real.data["server"], real.data["hf"]
  return (f"through the server (default flags, {a['clients']} streaming clients, models {_trained(trained)} on the "
          f"embedded corpus): MoR R={'/'.join(str(r['recursions']) for r in mor)} at "
          f"{_xs(r['vs_vanilla'] for r in mor)} vanilla's tokens/s (routing ideal {_xs(r['ideal'] for r in mor)}); "
          f"SmolLM2-135M: {srv['batch']['tok_s']:.0f} tokens/s for {srv['batch']['clients']} streams "
          f"({srv['batch']['tok_s'] / hf['batch_tok_s']:.2f}x transformers at batch {len(real.data['prompts'])}), "
          f"{srv['single']['tok_s']:.0f} for one ({srv['single']['tok_s'] / hf['single_tok_s']:.2f}x)" +
          (f"; with `--dtype=bfloat16` {real.data['server_bf16']['batch']['tok_s']:.0f} for 16 streams "
           f"({real.data['ratios_bf16']['server_batch_vs_hf_batch']['value']:.2f}x transformers in bf16)"
           if "server_bf16" in real.data else "") +
          (f" ({_machine(real)}; trained models {origin(trained, True)}, SmolLM2 {origin(real, True)})"
           if _machine(trained) == _machine(real) else
           f" (trained models {_machine(trained)}, {origin(trained, True)}; SmolLM2 {_machine(real)}, "
           f"{origin(real, True)})"))


def readme_engine(s: Source) -> str:
  eng = _depthwise_engine(s)
  mor = _mor(eng)
  best = max(mor, key=lambda r: r["vs_vanilla_batched"])
  return (f"engine alone (models {_trained(s)}, batch {mor[0]['batch']}, {_machine(s)}): MoR "
          f"R={'/'.join(str(r['recursions']) for r in mor)} at {_xs(r['vs_vanilla_engine'] for r in mor)} vanilla on "
          f"the same engine (routing ideal {_xs(r['ideal'] for r in mor)}); best {best['vs_vanilla_batched']:.2f}x "
          f"vanilla batched decoding ({origin(s, True)})")


# ------------------------------------------------------------------ docs/serving.md

def serve_trained_table(s: Source) -> str:
  a, rows = s.data["args"], []
  cond = s.data["provenance"]["conditions"]
  budget = cond["slots"] * cond["step_tokens"]           # tokens a step makes when every slot is busy
  for r in s.data["models"]:
    rows.append([r["model"], f"{r['mean_recursions']:.2f} / {r['recursions']}", f"{r['ideal']:.2f}x",
                 f"{r['tok_s']:,.0f}", f"{r['vs_vanilla']:.2f}x", f"{r['vs_vanilla'] / r['ideal']:.0%}",
                 f"{r['engine_tok_s']:,.0f}", f"{r['tok_s'] / r['engine_tok_s']:.0%}",
                 f"{r['tokens_per_step'] / budget:.0%}",
                 f"{r['ttft_p50_ms']:.0f} / {r['ttft_p99_ms']:.0f}", f"{r['itl_p50_ms']:.1f} / {r['itl_p99_ms']:.1f}",
                 f"{r['server_cores']:.2f}"])
  return (f"`python benchmarks/serve_load.py --json=benchmarks/results/serve_trained.json`: {a['clients']} streaming "
          f"clients, {a['requests']} requests of {a['prompt_len']}-token prompts x {a['max_tokens']} new tokens, "
          f"greedy, EOS ignored, default server flags, models {_trained(s)} ({_machine(s)}, {origin(s)}):\n\n" +
          table(["model", "mean recursions / R", "routing ideal", "tok/s", "vs vanilla", "of ideal",
                 "engine alone tok/s", "server / engine", "slots busy", "TTFT p50 / p99 ms", "ITL p50 / p99 ms",
                 "server cores"],
                rows))


def _server_rows(srv: dict, tag: str = "") -> list:
  return [[f"server{tag}, {label}", f"{r['tok_s']:.1f}", f"{r['ttft_p50_ms']:.0f} / {r['ttft_p99_ms']:.0f}",
           f"{r['itl_p50_ms']:.1f} / {r['itl_p99_ms']:.1f}"]
          for label, r in (("one stream", srv["single"]), (f"{srv['batch']['clients']} streams", srv["batch"]))]


def serve_real_table(s: Source) -> str:
  d = s.data
  cli, hf, srv, a = d["cli"], d["hf"], d["server"], d["args"]
  n = len(d["prompts"])
  rows = [["`--mode=generate`, one process per prompt (compilation excluded)", f"{cli['tok_s']:.1f}", "-", "-"],
          ["`--mode=generate --interactive` (compiled once)", f"{cli['warm_tok_s']:.1f}", "-", "-"],
          [f"transformers {hf['transformers']} `generate`, one stream", f"{hf['single_tok_s']:.1f}", "-", "-"],
          [f"transformers `generate`, batch {n}", f"{hf['batch_tok_s']:.1f}", "-", "-"]] + _server_rows(srv)
  targets = [[k.replace("_", " "), f"{t['value']:.2f}", t["target"], "met" if t["pass"] else "not met",
              f"{t['with_cli_warm']:.2f}"] for k, t in d["ratios"].items()]
  out = (f"`python benchmarks/serve_real.py --bf16 --json=benchmarks/results/serve_real.json`: "
         f"SmolLM2-135M-Instruct, {a['prompts']} prompts of {a['prompt_words']} words, greedy, "
         f"{a['max_new_tokens']} new tokens, EOS ignored, "
         f"{a['threads']} threads each; server ready in {srv['startup_s']:.0f} s ({_machine(s)}, {origin(s)}).\n\n"
         "float32 (ours and transformers'):\n\n" +
         table(["run", "tokens/s", "TTFT p50 / p99 ms", "ITL p50 / p99 ms"], rows) + "\n\n" +
         table(["target (issue 34), float32", "measured", "goal", "", "with the CLI's compiled-once rate"], targets))
  if "server_bf16" not in d:
    return out
  b, hb = d["cli_bf16"], d["hf_bf16"]
  rows = [["`--mode=generate --dtype=bfloat16`, one process per prompt", f"{b['tok_s']:.1f}", "-", "-"],
          ["`--mode=generate --dtype=bfloat16 --interactive`", f"{b['warm_tok_s']:.1f}", "-", "-"],
          ["transformers, model in bfloat16, one stream", f"{hb['single_tok_s']:.1f}", "-", "-"],
          [f"transformers, model in bfloat16, batch {n}", f"{hb['batch_tok_s']:.1f}", "-", "-"]]
  rows += _server_rows(d["server_bf16"], " `--dtype=bfloat16`")
  targets = [[k.replace("_", " "), f"{t['value']:.2f}", t["target"], "met" if t["pass"] else "not met"]
             for k, t in d["ratios_bf16"].items()]
  return (out + "\n\nbfloat16 (ours and transformers'):\n\n" +
          table(["run", "tokens/s", "TTFT p50 / p99 ms", "ITL p50 / p99 ms"], rows) + "\n\n" +
          table(["target (issue 34), bfloat16 on both sides", "measured", "goal", ""], targets))


def serve_real_bf16(s: Source) -> str:
  d = s.data
  b, f, ag = d["cli_bf16"], d["cli"], d["bf16_agreement"]
  text = (f"{b['tok_s'] / f['tok_s']:.2f}x float32's tokens/s per `--mode=generate` process, "
          f"{b['warm_tok_s'] / f['warm_tok_s']:.2f}x compiled once")
  if "server_bf16" in d:
    sb, sf = d["server_bf16"], d["server"]
    text += (f"; through the server {sb['batch']['tok_s'] / sf['batch']['tok_s']:.2f}x for "
             f"{sb['batch']['clients']} streams and {sb['single']['tok_s'] / sf['single']['tok_s']:.2f}x for one")
  if "teacher_forced_top1" in ag:
    text += (f"; on the same inputs (teacher-forced, {ag['teacher_forced_positions']} positions) its next token "
             f"agrees with float32's at {ag['teacher_forced_top1']:.1%} of them (mean KL "
             f"{ag['teacher_forced_kl']:.4f} nats)")
  return (text + f"; greedy output identical to float32's for {ag['identical']:.0%} of the prompts and "
          f"{ag['mean_prefix_agreement']:.0%} of each continuation before the first difference (`{s.path}`, "
          f"{origin(s, True)})")


# ------------------------------------------------------------------ docs/inference.md

def engine_table(s: Source) -> str:
  a, res, rows = s.data["args"], s.data["results"], []
  for r in res:
    label = "vanilla" if r["recursions"] == 1 else f"MoR R={r['recursions']}"
    rows.append([label, r["mode"], f"{r['tok_s']:,.0f}", f"{r['vs_vanilla_batched']:.2f}x",
                 f"{r['vs_vanilla_engine']:.2f}x", f"{r['ideal']:.2f}x",
                 f"{r['mean_recursions']:.2f} / {r['recursions']}", f"{r['slot_utilisation']:.2f}"])
  return (f"`python benchmarks/depthwise_batching.py --json=benchmarks/results/depthwise_batching.json`: models "
          f"{_trained(s)}, batch {a['batch']}, {a['requests']} requests, prompts {a['prompt_min']}-{a['prompt_max']} "
          f"tokens, {a['min_new']}-{a['max_new']} new tokens, greedy, best of {a['repeats']} ({_machine(s)}, "
          f"{origin(s)}):\n\n" +
          table(["model", "decoding", "tok/s", "vs vanilla batched", "vs vanilla engine", "routing ideal",
                 "mean recursions / R", "slot utilisation"], rows))


def serving_trained(s: Source) -> str:
  mor = _mor(s.data["models"])
  of_ideal = "/".join(f"{r['vs_vanilla'] / r['ideal']:.0%}" for r in mor)
  return (f"MoR R={'/'.join(str(r['recursions']) for r in mor)} at {_xs(r['vs_vanilla'] for r in mor)} vanilla's "
          f"tokens/s ({of_ideal} of the routing ideal; {origin(s, True)})")


def block_attention(s: Source) -> str:
  """docs/inference.md: the engine's block attention, gathered against masked, and what 'auto' picks."""
  rows, sm = s.data["rows"], s.data["summary"]
  label = lambda r: f"R={r['recursions']} at {r['capacity']} entries"
  best, worst = max(rows, key=lambda r: r["gather_vs_masked"]), min(rows, key=lambda r: r["gather_vs_masked"])
  return (f"gathering ran {best['gather_vs_masked']:.2f}x masked's tokens/s at best ({label(best)}) and "
          f"{worst['gather_vs_masked']:.2f}x at worst ({label(worst)}); 'auto' reached {sm['auto_vs_best']:.0%} or "
          f"more of the faster setting at every point (trained models, {s.data['args']['slots']} slots, "
          f"{_machine(s)}, {origin(s, True)})")
