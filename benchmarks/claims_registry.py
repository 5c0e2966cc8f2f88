"""Which result files each generated figure of README.md and docs/*.md reads, and how it becomes text.

`CLAIMS[ID] = Claim(sources, render, block)`: `render(*sources)` gets a `claims_figures.Source(path, data)` per
source (path relative to the repository; data: parsed JSON for .json files, text otherwise) and returns the text
that goes between `<!-- claim:ID -->` and `<!-- /claim -->`; `block=True` for tables (the text then stands on lines
of its own).
Point a claim at a new result by changing its sources (and its renderer if the file's layout differs): the next
`python benchmarks/claims.py` rewrites every place that quotes it.

Results written before `mor_jax.tools.provenance` existed carry no provenance; `claims_figures.LEGACY` says where git
history puts them (`git log -1 --format='%h %ad' --date=short -- FILE`), and `claims_figures.origin()` labels them
so. A result rewritten by its benchmark carries its own provenance, and `origin()` uses that instead.
"""

from __future__ import annotations

import dataclasses
import re
from typing import Callable

import claims_figures as F  # noqa: E402  (benchmarks/claims_figures.py: the renderers, LEGACY and origin())
import claims_serving as S  # noqa: E402  (benchmarks/claims_serving.py: serving and decoding renderers)

R = "benchmarks/results/"


@dataclasses.dataclass(frozen=True)
class Claim:
  sources: tuple            # paths relative to the repository
  render: Callable[..., str]  # render(*[claims_figures.Source(path, contents) for each source]) -> text
  block: bool = False       # a table or paragraphs: the text stands on lines of its own between the markers


def claim(render, *sources, block=False) -> Claim:
  return Claim(tuple(R + s for s in sources), render, block)


CLAIMS = {
    # README.md: the paragraph on parity and the features table (one entry per row's figure)
    "parity-worst": claim(F.parity_worst, "parity_worst.json"),
    "causal-gap": claim(F.causal_gap, "isoflop_seeds/isoflop_seeds.json"),
    "isoflop-3x-order": claim(F.isoflop_3x_order, "isoflop_seeds/isoflop_seeds.json"),
    "cpu-step": claim(F.cpu_step, "cpu_train_step_avx512.json", "cpu_train_step_avx512.log",
                      "reference_pytorch_cpu_speed.json"),
    "gpu-mfu": claim(F.gpu_mfu, "gpu_h100_train_throughput.json"),
    "readme-serving": claim(S.readme_serving, "serve_trained.json", "serve_real.json"),
    "readme-engine": claim(S.readme_engine, "depthwise_batching.json"),
    "gguf-logits": claim(F.gguf_logits, "gguf_logits.json"),
    # docs/interop.md, docs/uptraining.md
    "gguf-logits-detail": claim(F.gguf_logits_detail, "gguf_logits.json"),
    "lm-eval-common-mc": claim(F.lm_eval_common_mc, "lm_eval_common_mc.json"),
    "lm-eval-origin": claim(F.lm_eval_origin, "lm_eval_common_mc.json"),
    "uptrain-table": claim(F.uptrain_table, "uptrain/uptrain.json", block=True),
    "uptrain-time": claim(F.uptrain_time, "uptrain/uptrain.json"),
    "uptrain-long-table": claim(F.uptrain_table, "uptrain_long/uptrain.json", block=True),
    "uptrain-long-time": claim(F.uptrain_time, "uptrain_long/uptrain.json"),
    # docs/model.md
    "token-depths": claim(F.token_depths, "token_depths/default_job_step300.json"),
    # docs/inference.md
    "serving-trained": claim(S.serving_trained, "serve_trained.json"),
    "engine-table": claim(S.engine_table, "depthwise_batching.json", block=True),
    "block-attention": claim(S.block_attention, "block_attention.json"),
    # docs/serving.md
    "serve-trained-table": claim(S.serve_trained_table, "serve_trained.json", block=True),
    "serve-real-table": claim(S.serve_real_table, "serve_real.json", block=True),
    "serve-real-bf16": claim(S.serve_real_bf16, "serve_real.json"),
    # docs/performance.md
    "perf-cpu-avx512": claim(F.cpu_table, "cpu_train_step_avx512.json", "cpu_train_step_avx512.log",
                             "reference_pytorch_cpu_speed.json", block=True),
    "perf-cpu-peak": claim(F.cpu_peak, "cpu_train_step_avx512.json", "cpu_train_step_avx512.log"),
    "perf-gpu-h100": claim(F.gpu_table, "gpu_h100_train_throughput.json", block=True),
    "perf-gpu-profile": claim(F.gpu_profile, "gpu_h100_train_throughput.log"),
    "perf-gpu-h200": claim(F.gpu_h200, "gpu_h200_train_throughput.json", "gpu_h200_train_throughput.log"),
    "perf-ab-one-house": claim(F.ab_table, "ab_one_house_cpu.json", block=True),
    # docs/reproduction.md
    "isoflop-1seed-table": claim(F.isoflop_1seed_table, "isoflop/isoflop.json", block=True),
    "isoflop-1seed-origin": claim(F.isoflop_1seed_origin, "isoflop/isoflop.json"),
    "isoflop-seeds-means": claim(F.isoflop_seeds_means, "isoflop_seeds/isoflop_seeds.json", block=True),
    "isoflop-seeds-paired": claim(F.isoflop_seeds_paired, "isoflop_seeds/isoflop_seeds.json", block=True),
    "isoflop-seeds-origin": claim(F.source_and_origin, "isoflop_seeds/isoflop_seeds.json"),
    "isoflop-seeds-time": claim(F.isoflop_seeds_time, "isoflop_seeds/isoflop_seeds.json"),
}

assert all(re.fullmatch(r"[A-Za-z0-9_.-]+", k) for k in CLAIMS), "claim IDs: letters, digits, _ . - only"
