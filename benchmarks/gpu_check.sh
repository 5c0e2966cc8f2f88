#!/usr/bin/env bash
# One prepared GPU check (issue 9): training throughput of configs/smollm360_rec2.py in bf16 on one GPU.
#
#   bash benchmarks/gpu_check.sh            # from the repository root; results under $OUT (default /tmp/mor_gpu_check)
#
# Runs, each in its own process (clean peak-memory figures) and under its own time limit:
#   1. smollm360_rec2, seq 1024, 16 sequences per device    (required)
#   2. smollm360_rec2, seq 2048,  8 sequences per device    (required)
#   3. MoR expert-choice R=2 variant, seq 1024, 16 / device (if time is left)
#   4. smollm360_rec2, seq 1024, 32 / device                (if time is left: larger batch, higher MFU?)
# Wall time: about 4-6 minutes, at most ~7.5 (BUDGET_S=450: runs 3 and 4 only start when enough time is left;
# each run: start-up + compile about 1 minute, then 12 steps of well under a second).
# Writes $OUT/seq1024.json, seq2048.json, mor1024.json, b32_1024.json, gpu_check.log and summary.json.
#
# Needs jax with CUDA, flax, optax, orbax-checkpoint, absl, numpy, PyYAML (the GPU image has them) and
# ml_collections: installed from ./.whl/ (carried) when missing; `pip install -r requirements-gpu.txt` is tried
# only where jax itself is missing (it needs network access).
# MODE=sweep: instead, an MFU sweep (scan vs unrolled layers, batch 32, cuBLAS-only GEMMs, seq 2048, MoR), with a
# device-kernel profile of the first two runs (train_throughput.py --profile).
# Dry run on CPU: GPU_CHECK_ALLOW_CPU=1 EXTRA_ARGS="--tiny --steps 1 --warmup 1" BUDGET_S=0 bash benchmarks/gpu_check.sh
set -u
OUT="${OUT:-/tmp/mor_gpu_check}"
mkdir -p "$OUT"
LOG="$OUT/gpu_check.log"
cd "$(dirname "$0")/.."
PY="${PYTHON:-python3}"
export PYTHONUNBUFFERED=1 MOR_JAX_HUGEPAGES=0 XLA_PYTHON_CLIENT_MEM_FRACTION=${XLA_PYTHON_CLIENT_MEM_FRACTION:-0.94}
T0=$(date +%s)
log() { echo "[gpu_check +$(( $(date +%s) - T0 ))s] $*" | tee -a "$LOG"; }

log "python: $($PY -c 'import sys; print(sys.executable, sys.version.split()[0])')"
if ! $PY -c 'import jax' 2>/dev/null; then
  log "jax missing: trying pip install -r requirements-gpu.txt"
  $PY -m pip install -q -r requirements-gpu.txt 2>&1 | tail -3 | tee -a "$LOG"
fi
if ! $PY -c 'import ml_collections' 2>/dev/null; then
  if ls .whl/*.whl >/dev/null 2>&1; then
    log "installing carried wheels from .whl/"
    $PY -m pip install -q --no-index --no-deps --no-compile --target /tmp/mor_site .whl/*.whl 2>&1 | tail -3 | tee -a "$LOG"
    export PYTHONPATH="/tmp/mor_site${PYTHONPATH:+:$PYTHONPATH}"
  else
    log "ml_collections missing and no .whl/ folder: trying pip install ml_collections==1.1.0"
    $PY -m pip install -q ml_collections==1.1.0 2>&1 | tail -3 | tee -a "$LOG"
  fi
fi
$PY - <<'EOF' 2>&1 | tee -a "$LOG"
import importlib
import jax
print("jax", jax.__version__, "devices:", jax.devices(), "backend:", jax.default_backend())
for m in ("flax", "optax", "orbax.checkpoint", "ml_collections"):
  mod = importlib.import_module(m)
  print(m, getattr(mod, "__version__", "?"))
d = jax.devices()[0]
print("device_kind:", d.device_kind, "compute capability:", getattr(d, "compute_capability", "?"))
EOF
if [ -z "${GPU_CHECK_ALLOW_CPU:-}" ] && ! $PY -c 'import jax, sys; sys.exit(jax.default_backend() != "gpu")'; then
  log "no GPU backend: stopping (the CPU path is covered by 'python benchmarks/train_throughput.py --tiny')"
  exit 1
fi
nvidia-smi --query-gpu=name,memory.total,clocks.max.sm --format=csv 2>/dev/null | tee -a "$LOG"

bench() {   # name, time limit (s), then train_throughput.py arguments
  local name=$1 limit=$2; shift 2
  log "run $name: $*"
  timeout -k 10 "$limit" $PY benchmarks/train_throughput.py --no_hugepages --json "$OUT/$name.json" "$@" ${EXTRA_ARGS:-} 2>&1 \
    | grep -v -E '^(W|I)[0-9]{4} ' | tee -a "$LOG"
  log "run $name finished (status ${PIPESTATUS[0]})"
}
left() { echo $(( ${BUDGET_S:-450} - ($(date +%s) - T0) )); }

if [ "${MODE:-check}" = sweep ]; then
  # MFU sweep: where the step's time goes (device-kernel profile) and which settings raise MFU.
  # Each run only starts when its time limit still fits in BUDGET_S.
  sweep() { local name=$1 limit=$2; shift 2
    if [ "$(left)" -gt "$limit" ]; then bench "$name" "$limit" "$@"; else log "skip $name (budget)"; fi; }
  sweep scan_b16 100 --variants rec2 --seq 1024 --batch 16 --steps 10 --warmup 2 --scan on --profile "$OUT/prof"
  sweep unroll_b16 130 --variants rec2 --seq 1024 --batch 16 --steps 10 --warmup 2 --scan off --profile "$OUT/prof_unroll"
  sweep unroll_b32 130 --variants rec2 --seq 1024 --batch 32 --steps 10 --warmup 2 --scan off
  XLA_FLAGS="--xla_gpu_enable_triton_gemm=false" sweep unroll_b16_cublas 130 --variants rec2 --seq 1024 --batch 16 \
    --steps 10 --warmup 2 --scan off
  sweep unroll_s2048 130 --variants rec2 --seq 2048 --batch 8 --steps 10 --warmup 2 --scan off
  sweep unroll_mor 130 --variants mor_expert --seq 1024 --batch 16 --steps 10 --warmup 2 --scan off
else
  bench seq1024 180 --variants rec2 --seq 1024 --batch 16 --steps 10 --warmup 2
  bench seq2048 180 --variants rec2 --seq 2048 --batch 8 --steps 10 --warmup 2
  if [ "$(left)" -gt 120 ]; then bench mor1024 110 --variants mor_expert --seq 1024 --batch 16 --steps 10 --warmup 2; fi
  if [ "$(left)" -gt 100 ]; then bench b32_1024 $(( $(left) - 10 )) --variants rec2 --seq 1024 --batch 32 --steps 10 --warmup 2; fi
fi

$PY - "$OUT" <<'EOF' 2>&1 | tee -a "$LOG"
import glob, json, os, sys
sys.path.insert(0, os.getcwd())   # the repository root (cd above)
from mor_jax.tools.provenance import write_result
out = sys.argv[1]
rows = []
for path in sorted(glob.glob(os.path.join(out, "*.json"))):
  if path.endswith("summary.json"):
    continue
  for r in json.load(open(path)).get("rows", []):
    r["run"] = os.path.basename(path)[:-5]
    rows.append(r)
print(f"{'run':10s} {'variant':12s} {'attention':20s} {'B/dev':>5s} {'seq':>5s} {'tok/s':>9s} {'TFLOP/s':>8s} "
      f"{'MFU':>6s} {'peak GiB':>8s}")
for r in rows:
  if "error" in r:
    print(f"{r['run']:10s} {r['variant']:12s} error: {r['error'][:150]}")
    continue
  mfu = f"{100 * r['mfu']:5.1f}%" if r.get("mfu") is not None else "   n/a"
  peak = f"{r['peak_memory_bytes'] / 2**30:.1f}" if r.get("peak_memory_bytes") else "n/a"
  print(f"{r['run']:10s} {r['variant']:12s} {r['attention']:20s} {r['per_device_batch']:5d} {r['seq_len']:5d} "
        f"{r['tokens_per_s']:9,.0f} {r['tflops_per_device']:8.1f} {mfu} {peak:>8s}")
write_result(os.path.join(out, "summary.json"), {"rows": rows},
             conditions={"what": "the rows of every run above (each run's file has its own provenance)"})
EOF
log "done"
