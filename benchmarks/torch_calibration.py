"""Same-machine calibration: the PyTorch training step that `cpu_speed.json` timed, timed here and now.

  python benchmarks/torch_calibration.py                    # vanilla and recursive middle_cycle R=2, sdpa
  python benchmarks/torch_calibration.py --attn eager --json /tmp/torch.json

The stored reference (`benchmarks/results/reference_pytorch_cpu_speed.json`, a copy
of the reference data's `cpu_speed.json`) was measured once, on another machine of
this kind; a shared 2-core VM's speed drifts by tens of percent over a day.
This script reruns its step definition (transformers LlamaForCausalLM,
fp32, 2 threads, batch 8 x 256, forward with labels, backward,
clip_grad_norm_(1.0), torch AdamW(lr 3e-3, betas (0.9, 0.95), wd 0.1),
zero_grad) so `benchmarks/train_step.py --calibrate` can put our step time
next to PyTorch's on the same machine at the same time. The recursive model
shares layer modules in middle_cycle order (first and last unique, the
middle cycled R times). MoR variants need the reference fork, which is not
shipped. Needs torch and transformers (requirements-interop.txt).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from mor_jax.tools.provenance import write_result  # noqa: E402


def build(variant: str, attn: str):
  import torch  # pylint: disable=import-outside-toplevel
  from transformers import LlamaConfig, LlamaForCausalLM  # pylint: disable=import-outside-toplevel
  cfg = LlamaConfig(vocab_size=8192, hidden_size=256, intermediate_size=688, num_hidden_layers=8,
                    num_attention_heads=8, num_key_value_heads=4, max_position_embeddings=2048, rms_norm_eps=1e-5,
                    rope_theta=10000.0, tie_word_embeddings=False, initializer_range=0.02,
                    attn_implementation=attn)
  torch.manual_seed(0)
  model = LlamaForCausalLM(cfg)
  if variant == "recursive_middle_cycle_rec2":
    layers = model.model.layers
    middle = [layers[1], layers[2], layers[3]]
    model.model.layers = torch.nn.ModuleList([layers[0], *middle, *middle, layers[7]])
  return model


def time_variant(variant: str, attn: str, batch: int, seq: int, steps: int, warmup: int = 3) -> dict:
  import torch  # pylint: disable=import-outside-toplevel
  torch.set_num_threads(2)
  model = build(variant, attn)
  model.train()
  opt = torch.optim.AdamW(model.parameters(), lr=3e-3, betas=(0.9, 0.95), weight_decay=0.1)
  gen = torch.Generator().manual_seed(1)
  ids = torch.randint(0, 8192, (batch, seq), generator=gen)
  ones = torch.ones_like(ids)
  times = []
  for i in range(warmup + steps):
    t = time.perf_counter()
    out = model(input_ids=ids, attention_mask=ones, labels=ids, num_items_in_batch=batch * seq, use_cache=False)
    out.loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    opt.step()
    opt.zero_grad(set_to_none=True)
    if i >= warmup:
      times.append(time.perf_counter() - t)
  med = statistics.median(times)
  return {"variant": variant, "attn": attn, "params": sum(p.numel() for p in model.parameters()),
          "step_s_median": med, "tokens_per_s": batch * seq / med, "step_s_all": times,
          "loss": float(out.loss), "torch": torch.__version__}


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--variants", default="vanilla,recursive_middle_cycle_rec2")
  p.add_argument("--attn", default="sdpa", choices=("sdpa", "eager"))
  p.add_argument("--batch", type=int, default=8)
  p.add_argument("--seq", type=int, default=256)
  p.add_argument("--steps", type=int, default=10)
  p.add_argument("--json", default="")
  args = p.parse_args(argv)
  rows = []
  for v in args.variants.split(","):
    r = time_variant(v, args.attn, args.batch, args.seq, args.steps)
    print(f"torch {r['torch']} {v:30s} {args.attn:5s} params {r['params']:,}  step {1e3 * r['step_s_median']:.0f} ms  "
          f"{r['tokens_per_s']:.0f} tok/s", flush=True)
    rows.append(r)
  if args.json:
    write_result(args.json, {"rows": rows}, conditions={"attn": args.attn, "batch": f"{args.batch} x {args.seq}",
                                                        "dtype": "float32", "weights": "random", "threads": 2})
  return rows


if __name__ == "__main__":
  main()
