"""Base configuration: every field mor-jax reads, with its default.

Config files in this folder start from `get_config()` here and override what
they need. `mor_jax.config.validate(config)` checks a finished config once,
before anything is built, and derives values (base depth, capacities,
gradient accumulation). Fields marked "derived" are filled in there.
"""

import ml_collections


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  del arg
  c = ml_collections.ConfigDict()
  c.name = "base"

  # ---------------------------------------------------------------- model
  m = c.model = ml_collections.ConfigDict()
  m.vocab_size = 49152
  m.hidden_size = 960
  m.intermediate_size = 2560
  m.num_layers = 32            # layers of the equivalent vanilla model (L)
  m.num_heads = 15
  m.num_kv_heads = 5
  m.rope_theta = 10000.0
  m.rms_eps = 1e-5
  m.max_seq_len = 2048         # context length (RoPE positions, generation limit)
  m.tie_embeddings = False
  m.init_std = 0.02
  m.dtype = "float32"          # compute dtype: float32 | bfloat16 (params stay float32)
  m.remat_policy = "none"      # none | full | dots | dots_no_batch | save_attn_out
  m.scan_layers = True         # nn.scan over the shared block's layers, params stacked (False: unrolled modules, per-layer params)
  m.scan_unroll = 0            # scanned layers per loop iteration: 0 auto (loop on CPU, fully unrolled on GPU/TPU: +35% tokens/s on H100), n fixed
  m.batch_groups = 0          # independent batch groups per layer: 0 auto (2 on CPU, where they run side by side on the cores; 1 on GPU/TPU), n fixed
  m.loss_chunk_tokens = 0      # training/validation loss: head + cross entropy over chunks of this many tokens: 0 auto (512 on CPU, where chunks run side by side on the cores; whole batch on GPU/TPU), n fixed
  m.attention_impl = "auto"    # auto (dot_product on GPU/TPU, custom on CPU) | custom (hand-written VJP, fastest on CPU) | dot_product (jax.nn.dot_product_attention: cuDNN flash attention on GPU for causal masks, XLA otherwise)

  # ---------------------------------------------------- parameter sharing
  r = c.recursion = ml_collections.ConfigDict()
  r.strategy = "none"          # none (vanilla) | cycle | sequence | middle_cycle | middle_sequence
  r.num_recursions = 1         # R

  # ------------------------------------------------- mixture-of-recursions
  mor = c.mor = ml_collections.ConfigDict()
  mor.enable = False
  mor.type = "expert"          # expert | token
  mor.router_type = "linear"   # linear | mlp
  mor.router_func = "sigmoid"  # expert: sigmoid | tanh | none; token: softmax | sigmoid
  mor.alpha = 0.1              # expert default 0.1; token-choice configs usually use 1.0
  mor.temperature = 1.0
  mor.rand_router = False      # ablation: random scores instead of a learned router
  mor.z_loss = False
  mor.z_coeff = 1e-3
  mor.gating = "weighted"      # weighted | identity
  # expert-choice
  mor.capacity = ()            # per-recursion capacity factors; () -> (R - r) / R
  mor.sampling = "aux_loss"    # aux_loss (BCE sampling loss) | none
  mor.aux_coeff = 1e-3
  mor.cap_warmup_steps = 0     # optimizer steps of capacity warm-up (0: off)
  # token-choice
  mor.balancing = "loss"       # loss | loss_free | none
  mor.bal_coeff = 0.1
  mor.bal_update_rate = 1e-3   # loss-free bias step u
  mor.bal_warmup_steps = 0
  mor.capacity_factor = 1.0    # token-choice active-token buffer as a fraction of T (1.0: exact)
  # causal routing at inference / evaluation
  mor.threshold = 0.5

  kv = c.kv_sharing = ml_collections.ConfigDict()
  kv.enable = False

  # ------------------------------- initialise from a pretrained model (spec section 7)
  # Applied to a fresh training run only (a run that resumes keeps its checkpoint). `from_path` stands for the
  # spec's `init.from` ('from' is a Python keyword): a Hugging Face Llama/SmolLM directory (config.json +
  # model.safetensors or pytorch_model.bin) or a mor-jax workdir/checkpoint of a vanilla or recursive model.
  init = c.init = ml_collections.ConfigDict()
  init.from_path = ""          # '' -> random initialisation (train from scratch)
  init.strategy = "stepwise"   # stepwise | average | lower | upper | random (random: seeded by train.seed)

  # ----------------------------------------------------------------- data
  d = c.data = ml_collections.ConfigDict()
  d.corpus = "shakespeare"     # shakespeare (embedded) | local
  d.path = ""                  # local corpus: directory or glob of .txt/.jsonl[.gz]/.parquet
  d.text_column = "text"
  d.val_fraction = 0.01
  d.val_files = ()             # names of files that form the validation split (overrides val_fraction); shakespeare: play slugs, e.g. ("hamlet",)
  d.data_dir = ""              # where prepared datasets live ('' -> ~/.cache/mor_jax/datasets)
  d.tokenizer_path = ""        # tokenizer.json or directory; '' -> train a BPE on the corpus
  d.seq_len = 1024
  d.add_bos = False
  d.pretokenized = False       # read token-id shards written by --mode=prepare
  d.num_workers = 0            # grain worker processes
  d.prefetch = 2
  d.shuffle_seed = 0
  d.on_corrupt_record = "skip"  # skip | fail
  d.document_mask = False      # training: pass segment_ids/positions so packed documents do not attend to each other (the reference does not)
  d.txt_separator = ""         # local .txt files: split into documents at this string ('' -> one document per file)
  d.eos_token = ""             # end-of-text token of a loaded tokenizer ('' -> tokenizer_config.json or a well-known name)
  d.bos_token = ""             # BOS token for add_bos ('' -> tokenizer_config.json or a well-known name)
  d.tokenizer_train_bytes = 500_000_000  # cap on training-split text used to train the BPE (0: all)
  d.prepare_workers = 0        # processes that pre-tokenize shards in --mode=prepare (0: all CPU cores)
  d.read_threads = 2           # threads reading (and, without workers, tokenizing) documents per pipeline process

  # ---------------------------------------------------------------- train
  t = c.train = ml_collections.ConfigDict()
  t.seed = 0
  t.num_steps = 1000
  t.total_batch_size = 32      # sequences per optimizer step
  t.per_device_batch_size = 8
  t.grad_accum_steps = -1      # derived: total / (per_device * devices)
  t.learning_rate = 3e-3
  t.schedule = "cosine"        # cosine | wsd | constant
  t.warmup_steps = 100
  t.min_lr_ratio = 0.0         # cosine floor as a fraction of the peak
  t.decay_fraction = 0.2       # wsd: linear cool-down over the last fraction of the run
  t.beta1 = 0.9
  t.beta2 = 0.95
  t.eps = 1e-8
  t.weight_decay = 0.1
  t.grad_clip = 1.0
  t.log_every_steps = 10
  t.eval_every_steps = 200
  t.eval_batches = 8           # validation batches per evaluation (-1: the whole split; 0: no evaluation)
  t.save_interval = 0.1        # checkpoint every fraction of the run
  t.save_every_steps = 0       # if > 0, overrides save_interval
  t.keep_checkpoints = 3
  t.async_checkpoints = True   # write checkpoints in the background (arrays are copied to host first)
  t.max_steps_per_run = 0      # > 0: stop after this many steps in one invocation (checkpoint, status 'paused'); rerun to go on
  t.progress_bar = True        # tqdm bar on the main process (else log lines every log_every_steps)

  p = c.parallel = ml_collections.ConfigDict()
  p.mode = "pjit"              # pjit (jax.jit over a device mesh) | pmap (replicated jax.pmap)
  p.num_devices = 0            # use the first N devices (0: all; pjit: global devices, pmap: local devices)
  p.data = -1                  # pjit mesh axis 'data': pure data parallelism (-1: the devices left after fsdp)
  p.fsdp = 1                   # pjit mesh axis 'fsdp': parameters and optimizer state sharded over it (1: off; -1: the rest)
  p.prefetch = 0               # batches read and put on the devices ahead by a background thread (0: inline)

  # ---------------------------------------------- multi-process (multi-host) runs; see mor_jax/distributed.py
  dist = c.distributed = ml_collections.ConfigDict()
  dist.enable = "auto"         # auto (these fields, JAX_COORDINATOR_ADDRESS or SLURM with > 1 task) | on | off
  dist.coordinator_address = ""  # host:port of process 0 ('' -> environment)
  dist.coordinator_port = 0    # SLURM: coordinator port (0 -> JAX_COORDINATOR_PORT or derived from SLURM_JOB_ID)
  dist.num_processes = 0       # 0 -> environment (JAX_NUM_PROCESSES, SLURM_NTASKS)
  dist.process_id = -1         # -1 -> environment (JAX_PROCESS_ID, SLURM_PROCID)
  dist.local_device_ids = ()   # devices this process uses (() -> all visible; SLURM with several tasks per node: SLURM_LOCALID)
  dist.initialization_timeout = 300  # seconds to wait for all processes

  return c
