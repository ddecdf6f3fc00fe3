"""Direct preference optimisation (DPO) of a decoder LM, usually after SFT.

    python -m jaxft.train --config configs/dpo.py:VARIANT --workdir runs/dpo \
        --config.init_from=runs/sft [--config.data.train=prefs.jsonl] [--config.peft.method=lora]

Variants:
  default      CPU demo: generated preference pairs (the right answer to a string instruction
               against a plausible mistake; jaxft/data/synthetic_instructions.py) from the SFT
               demo's run (--config.init_from=runs/sft, configs/sft.py); prints the held-out
               reward and preference accuracy before and after (docs/llm.md)
  preferences  your data: JSONL {"prompt", "chosen", "rejected"} (text or message lists) from
               config.init_from (a jaxft SFT run or a Hugging Face decoder directory)
The reference policy is the starting model: its log-probabilities are computed once, before
the first step (jaxft/tasks/dpo.py).
"""

import ml_collections

from configs import sft

VARIANTS = ("default", "preferences")


def get_config(variant: str = "default") -> ml_collections.ConfigDict:
  variant = variant or "default"
  if variant not in VARIANTS:
    raise ValueError(f"unknown variant {variant!r} of configs/dpo.py; choose one of "
                     f"{', '.join(VARIANTS)}")
  c = sft.base_config()
  c.variant = variant
  c.task = "dpo"
  del c.sft
  c.dpo = ml_collections.ConfigDict()
  c.dpo.beta = 0.1  # strength of the KL anchor to the reference (higher: stay closer)
  c.dpo.label_smoothing = 0.0  # conservative DPO: the share of pairs assumed mislabelled
  c.dpo.chat_template = ""  # a Jinja chat template replacing the tokenizer's ("" = its own)
  c.data.packing = False  # one pair per row
  c.seq_len = 512
  c.batch_size = 16
  c.num_epochs = 1
  c.optim.update(lr=5e-7, warmup_fraction=0.1)
  c.early_stopping.metric = "reward_accuracy"
  c.early_stopping.mode = "max"
  if variant == "default":
    c.data.dataset = "instruction_preferences"
    c.data.tokenizer = "builtin:chars"
    c.seq_len = 96
    c.batch_size = 32
    c.num_epochs = 0
    c.num_steps = 200
    c.lm_loss_chunk = 0
    c.optim.update(lr=1e-5, warmup_steps=10, warmup_fraction=0.0, weight_decay=0.0)
    c.eval_every = 50
  return c
