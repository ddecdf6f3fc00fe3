"""Supervised instruction tuning (SFT) of a decoder LM on chat data.

    python -m jaxft.train --config configs/sft.py:VARIANT --workdir runs/sft \
        [--config.init_from=HF_DIR] [--config.data.train=chats.jsonl] [--config.peft.method=lora]

Variants:
  default  CPU demo on generated instructions with checkable answers (uppercase, capitalise,
           reverse, repeat a random word; jaxft/data/synthetic_instructions.py): a small Llama from
           scratch with a character-level ChatML tokenizer; prints held-out exact-match
           accuracy before and after (docs/llm.md)
  chat     your model and data: --config.init_from=/models/Qwen2.5-0.5B-Instruct (any local
           Llama / Mistral / Qwen / Gemma directory; its config.json sets config.model, its
           tokenizer and chat template are used) --config.data.train=chats.jsonl
Records: {"messages": [...]} or {"prompt": ..., "completion": ...} (jaxft/data/chat_records.py).
"""

import ml_collections

from configs import common, llama

VARIANTS = ("default", "chat")


def base_config() -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.task = "sft"
  c.seed = 0
  c.init_from = ""  # a local HF decoder directory, or a jaxft workdir (e.g. an earlier SFT)
  c.init_layers = ""  # "0,5": a shallower model from init_from's layers 0 and 5 ("" = all)
  c.model = llama.model()  # filled from init_from's config.json when it is set

  c.data = ml_collections.ConfigDict()
  c.data.dataset = ""  # built-in: instructions (generated); "" = the files below
  c.data.train = ""  # JSONL conversations
  c.data.validation = ""  # "" = carved from train (validation_fraction)
  c.data.test = ""  # "" = carved from train: held-out conversations answered at the end
  c.data.encoding = "utf-8"
  c.data.encoding_errors = "strict"
  c.data.validation_fraction = 0.05
  c.data.test_fraction = 0.05
  c.data.split_seed = 0
  c.data.tokenizer = ""  # "" = init_from's tokenizer (and its chat template)
  c.data.data_dir = ""
  c.data.shuffle_seed = 0
  c.data.packing = True  # several conversations per row (segment ids keep them apart)
  c.data.pack_slots = 0  # conversations per row at most; 0 = seq_len // 8

  c.sft = ml_collections.ConfigDict()
  c.sft.loss_on = "assistant"  # assistant (its tokens and end-of-turn) | all
  c.sft.chat_template = ""  # a Jinja chat template replacing the tokenizer's ("" = its own)
  c.sft.eval_answers = 32  # held-out test conversations answered greedily, before and after
  c.sft.max_new_tokens = 64  # of each such answer

  c.seq_len = 1024
  c.batch_size = 16
  c.eval_batch_size = 16
  c.grad_accum_steps = 1
  c.lm_loss_chunk = 32
  c.num_epochs = 2
  c.num_steps = 0  # > 0 overrides num_epochs

  c.optim = common.optimizer(lr=2e-5, schedule="cosine", warmup_steps=0, warmup_fraction=0.03,
                             min_lr_ratio=0.0, b2=0.999, weight_decay=0.0)
  c.mesh = common.mesh()
  c.axis_rules = common.AXIS_RULES
  c.early_stopping = common.early_stopping()
  c.adversarial = common.adversarial()  # --config.adversarial.method=fgm|pgd|freelb
  c.distill = common.distill()  # --config.distill.teacher=RUN or .ema_decay: distillation
  c.peft = common.peft(targets=r"attn/(query|key|value|out)$|mlp/(gate|up|down)$")

  c.log_every = 10
  c.eval_every = 0  # 0 = once per epoch
  c.checkpoint_every = 0
  c.keep_checkpoints = 2
  return c


def get_config(variant: str = "default") -> ml_collections.ConfigDict:
  variant = variant or "default"
  if variant not in VARIANTS:
    raise ValueError(f"unknown variant {variant!r} of configs/sft.py; choose one of "
                     f"{', '.join(VARIANTS)}")
  c = base_config()
  c.variant = variant
  if variant == "default":
    c.data.dataset = "instructions"
    c.data.tokenizer = "builtin:chars"  # one token per character, ChatML special tokens
    # 8 query heads (4 KV heads): with 4 the copying the tasks need took ~1,200 steps to
    # appear, with 8 under 500 (docs/llm.md).
    c.model.update(vocab_size=100, hidden_size=128, intermediate_size=344, num_hidden_layers=4,
                   num_attention_heads=8, num_key_value_heads=4, max_position_embeddings=512,
                   tie_word_embeddings=True)
    c.seq_len = 128
    c.batch_size = 16
    c.num_epochs = 0
    c.num_steps = 1500
    c.lm_loss_chunk = 0  # a 100-token vocabulary: the plain head is cheaper than chunking
    c.optim.update(lr=3e-3, warmup_steps=100, warmup_fraction=0.0, weight_decay=0.1)
    c.eval_every = 500
    c.sft.eval_answers = 200
    c.sft.max_new_tokens = 16
  return c
