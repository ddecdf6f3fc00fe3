"""Parameter-efficient fine-tuning, chosen by config.peft.method; see jaxft/peft/base.py."""

from jaxft.peft.adapters import Adapter
from jaxft.peft.base import COLLECTION, Bound, Method, bind
from jaxft.peft.lora import AdaLoRA, LoRA
from jaxft.peft.prompts import Prefix, Prompt

METHODS = {m.name: m for m in (Method, LoRA, AdaLoRA, Adapter, Prefix, Prompt)}

__all__ = ["COLLECTION", "METHODS", "Bound", "Method", "bind", "make"]


def make(peft_cfg) -> Method:
  """The method config.peft names ("none": full fine-tuning)."""
  name = (peft_cfg.get("method", "none") if peft_cfg is not None else "none") or "none"
  if name not in METHODS:
    raise ValueError(f"config.peft.method={name!r} is unknown; use one of {', '.join(METHODS)}")
  return METHODS[name](peft_cfg if peft_cfg is not None else {})
