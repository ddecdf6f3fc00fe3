"""GPT-2 causal-LM pretraining.

    python -m jaxft.train --config configs/gpt2.py[:VARIANT] --workdir runs/gpt2 \
        [--config.FIELD=VALUE ...]

Variants: default (CPU demo on the embedded Shakespeare, minutes on 2 cores), tiny (tests),
cpu-bench (the shape benchmarked against transformers on CPU), 124m, 350m, 774m, 1.5b (GPT-2's
published shapes with a GPT-2/nanoGPT-style pretraining recipe; bring your own corpus with
--config.data.files).
"""

import ml_collections

from configs import common

# GPT-2's published shapes: (n_layer, n_embd, n_head).
_SHAPES = {
    "124m": (12, 768, 12),
    "350m": (24, 1024, 16),
    "774m": (36, 1280, 20),
    "1.5b": (48, 1600, 25),
}
VARIANTS = ("default", "tiny", "cpu-bench", *_SHAPES)


def base_config() -> ml_collections.ConfigDict:
  # Long by design: every field of the config, one per line, read top to bottom.
  c = ml_collections.ConfigDict()
  c.task = "causal_lm"  # which head/loss/eval the train loop uses (jaxft/tasks/)
  c.seed = 0  # params init and dropout masks (data order: data.shuffle_seed)
  c.init_from = ""  # a local HF GPT-2 directory (config.json + weights) to start from
  c.init_layers = ""  # "0,5": a shallower model from init_from's layers 0 and 5 ("" = all)

  c.model = ml_collections.ConfigDict()
  c.model.family = "gpt2"
  c.model.vocab_size = 50257
  c.model.n_positions = 1024  # size of the learned position table; >= seq_len
  c.model.n_layer = 12
  c.model.n_embd = 768
  c.model.n_head = 12
  c.model.embd_pdrop = 0.1
  c.model.attn_pdrop = 0.1
  c.model.resid_pdrop = 0.1
  c.model.layer_norm_epsilon = 1e-5
  c.model.dtype = "float32"  # compute dtype: "float32" or "bfloat16" (params stay float32)
  # Activation memory vs recompute (jaxft/models/layers.py REMAT_POLICIES): "none" | "full" |
  # "dots" (keep weight matmuls) | "dots_all" (and attention matmuls). scan_layers: one
  # nn.scan over the blocks, compiled once (faster compiles for deep models); the same function
  # of the same weights, but a seed's random init and dropout masks differ from the loop's.
  c.model.remat = "none"
  c.model.scan_layers = False
  c.model.attention_impl = "xla"  # xla | cudnn (GPU, bf16) | splash (TPU): models/attention.py

  c.data = ml_collections.ConfigDict()
  c.data.files = ""  # glob(s) of .txt / .jsonl training files; "" = embedded Shakespeare
  c.data.validation_files = ""  # glob(s); "" = embedded split, or a held-out fraction of files
  c.data.text_field = "text"  # the text field of .jsonl records
  c.data.encoding = "utf-8"  # of your files (any Python codec: latin-1, cp1252, utf-16, ...)
  c.data.encoding_errors = "strict"  # strict: undecodable bytes are an error; replace: U+FFFD
  c.data.validation_fraction = 0.05  # documents held out when validation_files is ""
  c.data.chunk_chars = 8000  # long documents are cut into chunks this long so shuffling mixes
  c.data.tokenizer = ""  # "" = GPT-2 byte-level BPE (offline); or a HF tokenizer directory
  c.data.data_dir = ""  # where the TFDS builder writes; "" = $JAXFT_DATA_DIR or ~/.cache/jaxft
  c.data.shuffle_seed = 0  # per-epoch shuffle seed of the training documents

  c.seq_len = 1024  # tokens per training row
  c.batch_size = 512  # global batch (rows) per optimizer step, across all devices and hosts
  # The LM head and softmax run over chunks of this many positions, with their gradient fused
  # into the forward pass, so the [B, T, V] logits never exist whole; 0 = plain full logits.
  c.lm_loss_chunk = 32
  c.grad_accum_steps = 1  # micro-batches per step; batch_size must divide by it
  c.num_steps = 600_000

  c.optim = common.optimizer()  # AdamW (0.9, 0.95), wd 0.1, warmup 2k, cosine to 10%
  c.mesh = common.mesh()
  c.axis_rules = common.AXIS_RULES
  c.early_stopping = common.early_stopping()
  c.peft = common.peft()  # --config.peft.method=lora|adalora|adapter|prefix|prompt
  c.distill = common.distill()  # --config.distill.teacher=RUN: a smaller LM from a larger one

  c.log_every = 10  # steps between metric writes
  c.eval_every = 500  # steps between validation passes (and at the end)
  c.eval_batches = 50  # cap on validation batches per pass; 0 = the whole split
  c.checkpoint_every = 1000  # steps between checkpoints (and at the end)
  c.keep_checkpoints = 3  # newest checkpoints kept on disk

  c.sample = ml_collections.ConfigDict()  # generations printed at the end of training
  c.sample.prompts = ("ROMEO:", "First Citizen:")
  c.sample.max_new_tokens = 60
  c.sample.temperature = 0.8
  c.sample.top_k = 40
  return c


def get_config(variant: str = "default") -> ml_collections.ConfigDict:
  variant = variant or "default"
  if variant not in VARIANTS:
    raise ValueError(f"unknown variant {variant!r} of configs/gpt2.py; choose one of "
                     f"{', '.join(VARIANTS)} (e.g. --config configs/gpt2.py:tiny)")
  c = base_config()
  c.variant = variant
  if variant in _SHAPES:
    c.model.n_layer, c.model.n_embd, c.model.n_head = _SHAPES[variant]
    if variant != "124m":  # nanoGPT/GPT-3-style: larger models, lower peak lr
      c.optim.lr = {"350m": 3e-4, "774m": 2.5e-4, "1.5b": 2e-4}[variant]
  elif variant == "default":
    # CPU demo: a small GPT on Shakespeare that trains in minutes on 2 cores.
    c.model.update(n_layer=4, n_embd=128, n_head=4, n_positions=256,
                   embd_pdrop=0.0, attn_pdrop=0.0, resid_pdrop=0.0)
    # ~4,000 tokens/s on 2 cores (the 50257-way LM head is most of the FLOPs): 300 steps of
    # 16 x 128 tokens take ~3 minutes, one pass over a seventh of the corpus (docs/pretraining.md).
    c.seq_len = 128
    c.batch_size = 16
    c.num_steps = 300
    c.optim.update(lr=2e-3, warmup_steps=30, weight_decay=0.1)
    c.log_every = 10
    c.eval_every = 100
    c.eval_batches = 20
    c.checkpoint_every = 100
  elif variant == "tiny":
    c.model.update(vocab_size=50257, n_layer=2, n_embd=32, n_head=2, n_positions=64)
    c.seq_len = 32
    c.batch_size = 8
    c.num_steps = 6
    c.optim.update(lr=1e-3, warmup_steps=2)
    c.log_every = 1
    c.eval_every = 3
    c.eval_batches = 2
    c.checkpoint_every = 3
    c.sample.max_new_tokens = 8
  elif variant == "cpu-bench":
    c.model.update(n_layer=4, n_embd=256, n_head=4, vocab_size=50257, n_positions=1024,
                   embd_pdrop=0.0, attn_pdrop=0.0, resid_pdrop=0.0, dtype="float32")
    c.seq_len = 256
    c.batch_size = 8
    c.num_steps = 100
    c.optim.update(warmup_steps=10)
  return c
