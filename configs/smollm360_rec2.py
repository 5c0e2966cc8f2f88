"""The reference run (spec section 8): 250720_pretrain_smollm-360m_rec2_middle_cycle_random_lr3e-3.

SmolLM-360M shape, middle_cycle sharing, R = 2 (1 + 15 + 1 unique layers), no
router, untied head: 261,522,240 parameters. FineWeb-Edu (dedup) with the
SmolLM tokenizer; total batch 1,024 x 1,024 tokens (per device 2 x
accumulation 128 x 4 GPUs); AdamW lr 3e-3, betas (0.9, 0.95), wd 0.1, clip
1.0; 57 warm-up steps, 9,438 steps, cosine; bf16; checkpoint every 10%.

  python main.py --config=configs/smollm360_rec2.py --config.data.path=/data/fineweb-edu-dedup
  python main.py --config=configs/smollm360_rec2.py:tiny --workdir=/tmp/tiny   # a few CPU steps
"""

from configs import smollm_family


def get_config(arg: str | None = None):
  c = smollm_family.make("360m", strategy="middle_cycle", recursions=2, arg=arg)
  if "tiny" in smollm_family.parse(arg):
    return c
  c.name = "smollm-360m-rec2-middle_cycle"
  c.train.update(num_steps=9438, total_batch_size=1024, per_device_batch_size=2, learning_rate=3e-3,
                 schedule="cosine", warmup_steps=57, min_lr_ratio=0.0, beta1=0.9, beta2=0.95, weight_decay=0.1,
                 grad_clip=1.0, save_interval=0.1, log_every_steps=10, eval_every_steps=500)
  return c
