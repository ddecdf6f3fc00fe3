"""Config -> model. The one place that knows which module a (`config.model.family`, head) names."""

import dataclasses

import jax.numpy as jnp
import ml_collections

from jaxft.models import bert, gpt2, heads

_DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}

# (family, head) -> (jaxft module, the transformers class with the same tensors).
HEADS = {
    ("gpt2", "causal_lm"): (gpt2.GPT2LMHeadModel, "GPT2LMHeadModel"),
    ("gpt2", "classification"): (heads.GPT2ForSequenceClassification,
                                 "GPT2ForSequenceClassification"),
    ("bert", "masked_lm"): (heads.BertForMaskedLM, "BertForMaskedLM"),
    ("bert", "classification"): (heads.BertForSequenceClassification,
                                 "BertForSequenceClassification"),
    ("bert", "token_classification"): (heads.BertForTokenClassification,
                                       "BertForTokenClassification"),
    ("bert", "question_answering"): (heads.BertForQuestionAnswering, "BertForQuestionAnswering"),
}
_WITH_LABELS = ("classification", "token_classification")


def _dtype(name: str, field: str):
  if name not in _DTYPES:
    raise ValueError(f"{field}={name!r} is not a dtype jaxft knows; use one of {list(_DTYPES)}")
  return _DTYPES[name]


def _dataclass_from(cls, model_cfg: ml_collections.ConfigDict):
  fields = {f.name for f in dataclasses.fields(cls)}
  kwargs = {k: v for k, v in model_cfg.items() if k in fields}
  kwargs["dtype"] = _dtype(model_cfg.get("dtype", "float32"), "config.model.dtype")
  kwargs["param_dtype"] = jnp.float32
  return cls(**kwargs)


def gpt2_config(model_cfg: ml_collections.ConfigDict) -> gpt2.GPT2Config:
  cfg = _dataclass_from(gpt2.GPT2Config, model_cfg)
  if cfg.n_embd % cfg.n_head:
    raise ValueError(f"config.model.n_embd={cfg.n_embd} must be divisible by "
                     f"config.model.n_head={cfg.n_head}")
  return cfg


def bert_config(model_cfg: ml_collections.ConfigDict) -> bert.BertConfig:
  cfg = _dataclass_from(bert.BertConfig, model_cfg)
  if cfg.hidden_size % cfg.num_attention_heads:
    raise ValueError(f"config.model.hidden_size={cfg.hidden_size} must be divisible by "
                     f"config.model.num_attention_heads={cfg.num_attention_heads}")
  return cfg


def hf_architecture(family: str, head: str) -> str:
  _check(family, head)
  return HEADS[(family, head)][1]


def _check(family: str, head: str) -> None:
  if (family, head) not in HEADS:
    options = ", ".join(f"{f}+{h}" for f, h in HEADS)
    raise ValueError(f"config.model.family={family!r} has no {head!r} head; jaxft has: {options}")


def _family(model_cfg: ml_collections.ConfigDict) -> str:
  family = model_cfg.get("family", "gpt2")
  if family not in ("gpt2", "bert"):
    raise ValueError(f"config.model.family={family!r} is unknown; jaxft has: gpt2, bert")
  return family


def model_config(model_cfg: ml_collections.ConfigDict):
  """config.model -> the family's frozen dataclass (GPT2Config / BertConfig), checked."""
  return gpt2_config(model_cfg) if _family(model_cfg) == "gpt2" else bert_config(model_cfg)


def build_model(model_cfg: ml_collections.ConfigDict, head: str = "causal_lm",
                num_labels: int = 0):
  """Returns (flax module, its frozen dataclass config)."""
  family = _family(model_cfg)
  _check(family, head)
  cfg = model_config(model_cfg)
  module = HEADS[(family, head)][0]
  if head in _WITH_LABELS:
    if num_labels < 1:
      raise ValueError(f"a {head} head needs at least one label (got {num_labels})")
    return module(cfg, num_labels), cfg
  return module(cfg), cfg
