"""The default job: a small MoR expert-choice model on the embedded Shakespeare corpus.

  python main.py --config=configs/shakespeare_mor.py --workdir=/tmp/mor

Middle-cycle sharing with R = 2 (unique first and last layers around a shared
block of 2 layers that runs twice; 6 layer applications for a token that
takes both recursions), expert-choice routing with capacity fractions (1, 1/2), a
byte-level BPE of 2,048 tokens trained on the corpus at first use, 256-token
sequences, 300 steps of 16 x 256 tokens (1.2M tokens, ~0.7 epoch). Sized to
finish on a 2-core CPU in about 10 minutes (measured on a busy 2-core VM:
10m54s, validation loss 7.65 -> 4.55); on any accelerator it takes well
under a minute (`--config.train.num_steps=...` to train longer).
"""

from mor_jax.config import defaults


def get_config(arg: str | None = None):
  del arg
  c = defaults()
  c.name = "shakespeare-{model}"   # follows the model: shakespeare-mor-expert-r2, -vanilla, -middle_cycle-r2
  c.model.update(vocab_size=2048, hidden_size=192, intermediate_size=512, num_layers=6, num_heads=6,
                 num_kv_heads=2, max_seq_len=512, tie_embeddings=False)
  c.execution.dtype = "float32"
  c.recursion.update(strategy="middle_cycle", num_recursions=2)
  c.mor.update(enable=True, type="expert", router_type="linear", router_func="sigmoid", alpha=0.1,
               expert_router_loss="bce", aux_coeff=1e-3, cap_warmup_steps=0)
  c.data.update(corpus="shakespeare", tokenizer_path="", seq_len=256, pretokenized=True, num_workers=0)
  # 16 sequences per step: accumulation 4 on 1 device, 1 on 4 devices
  c.train.update(num_steps=300, total_batch_size=16, per_device_batch_size=4, learning_rate=3e-3,
                 schedule="cosine", warmup_steps=20, min_lr_ratio=0.1, weight_decay=0.1, grad_clip=1.0,
                 log_every_steps=10, eval_every_steps=50, eval_sequences=32, save_interval=0.2,
                 keep_checkpoints=2)
  return c
