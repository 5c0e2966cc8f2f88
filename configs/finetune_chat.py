"""Supervised fine-tuning on chat data, starting from any model in a workdir (docs/fine-tuning.md).

  python main.py --config=configs/finetune_chat.py --config.init.from_path=W --config.data.path=train.jsonl \
      --workdir=OUT
  python main.py --mode=generate --workdir=OUT --chat --interactive
  python main.py --mode=serve --workdir=OUT

W is a mor-jax workdir (a GGUF or Hugging Face import, an uptrained recursive or MoR model, one of our own
runs) or a Hugging Face Llama directory. The architecture is left unset here, so it comes from W, with W's
weights (copied whole, routers included), tokenizer and chat template; setting an architecture field on purpose
(e.g. --config.recursion.strategy=middle_cycle --config.recursion.num_recursions=2 with model.num_layers) turns
a vanilla W into that model first (config.init.strategy, as uptraining does).

train.jsonl holds one conversation per line, {"messages": [{"role": ..., "content": ...}, ...]} or {"prompt":
..., "completion": ...}. The loss counts the assistant turns' tokens (data.loss_on=all: every token); several
conversations are packed into each sequence of data.seq_len tokens without attending to each other. 5% of the
conversations are held out for the validation loss. Malformed records and conversations longer than seq_len are
skipped, counted and listed in the report (data.on_corrupt_record=fail, data.on_long_record=fail|truncate
otherwise). A model whose tokenizer has no chat template: --config.data.chat_template=chatml (the fine-tuned
workdir keeps it).

Defaults: 2 epochs (train.epochs sets train.num_steps from the data), 8 sequences of 512 tokens per step, AdamW
at 1e-4 with a 10% warm-up and cosine decay to 1e-5, no weight decay, MoR routers trained along
(train.freeze_routers=True keeps them). Resume, run safety, reports and W&B work as for any training run.
"""

from ml_collections import config_dict

from mor_jax.config import defaults, schema


def get_config(arg: str | None = None):
  del arg
  c = defaults()
  c.name = "chat-{model}"
  for f in schema.ARCH_FIELDS:               # unset: taken from config.init.from_path (the model in W)
    section, name = f.key.split(".")
    c[section][name] = config_dict.placeholder(type(f.default))
  c.data.add_bos = config_dict.placeholder(bool)   # as W's model was trained
  c.execution.dtype = "float32"
  c.data.update(corpus="chat", path="", tokenizer_path="", chat_template="", loss_on="assistant", seq_len=512,
                document_mask=True, val_fraction=0.05, on_corrupt_record="skip", on_long_record="skip",
                num_workers=0)
  c.train.update(epochs=2.0, num_steps=1, total_batch_size=8, per_device_batch_size=2, learning_rate=1e-4,
                 schedule="cosine", warmup_fraction=0.1, warmup_steps=0, min_lr_ratio=0.1, weight_decay=0.0,
                 grad_clip=1.0, freeze_routers=False, log_every_steps=5, eval_every_steps=20, eval_sequences=-1,
                 save_interval=0.25, keep_checkpoints=2)
  return c
