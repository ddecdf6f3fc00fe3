"""Config -> model. The one place that knows which module a (`config.model.family`, head) names."""

import dataclasses

import jax.numpy as jnp
import ml_collections

from jaxft.models import attention, bert, gpt2, heads, llama

_DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}

@dataclasses.dataclass(frozen=True)
class Family:
  config: type  # the frozen dataclass config.model fills (defaults: the family's own)
  heads_divide: tuple[str, str]  # (width field, head-count field): heads must divide the width


# config.model.family -> its config; a new family is a line here and its HEADS lines below.
FAMILIES = {
    "gpt2": Family(gpt2.GPT2Config, ("n_embd", "n_head")),
    "bert": Family(bert.BertConfig, ("hidden_size", "num_attention_heads")),
    # Llama, Mistral, Qwen 2/3, Gemma 2/3: head_dim may differ from hidden / heads, so its
    # own validate() checks the shapes.
    "llama": Family(llama.LlamaConfig, ()),
}

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
    # "{}": the class prefix of the model's transformers model_type (DECODER_CLASSES).
    ("llama", "causal_lm"): (llama.LlamaForCausalLM, "{}ForCausalLM"),
    ("llama", "classification"): (heads.LlamaForSequenceClassification,
                                  "{}ForSequenceClassification"),
}
# transformers model_type -> its class prefix, for the decoder family (config.model.model_type).
DECODER_CLASSES = {"llama": "Llama", "mistral": "Mistral", "qwen2": "Qwen2", "qwen3": "Qwen3",
                   "gemma": "Gemma", "gemma2": "Gemma2", "gemma3_text": "Gemma3"}
# Where a model_type's class for a head is not "{prefix}{head class}".
_CLASS_EXCEPTIONS = {("gemma3_text", "classification"): "Gemma3TextForSequenceClassification"}
_WITH_LABELS = ("classification", "token_classification")


def _dtype(name: str, field: str):
  if name not in _DTYPES:
    raise ValueError(f"{field}={name!r} is not a dtype jaxft knows; use one of {list(_DTYPES)}")
  return _DTYPES[name]


def _dataclass_from(cls, model_cfg: ml_collections.ConfigDict):
  fields = {f.name for f in dataclasses.fields(cls)}
  # Lists (layer_types read from JSON) become tuples: the dataclass is hashed as a static arg.
  kwargs = {k: tuple(v) if isinstance(v, list) else v for k, v in model_cfg.items()
            if k in fields}
  kwargs["dtype"] = _dtype(model_cfg.get("dtype", "float32"), "config.model.dtype")
  kwargs["param_dtype"] = jnp.float32
  attention.check_impl(kwargs.get("attention_impl", "xla"))
  return cls(**kwargs)


def hf_architecture(family: str, head: str, model_cfg=None) -> str:
  """The transformers class of (family, head); for the decoder family, of the model_type of
  `model_cfg` (config.model, or the family's dataclass)."""
  _check(family, head)
  name = HEADS[(family, head)][1]
  if "{}" not in name:
    return name
  model_type = (model_cfg.get("model_type", "llama") if hasattr(model_cfg, "get")
                else getattr(model_cfg, "model_type", "llama"))
  if model_type not in DECODER_CLASSES:
    raise ValueError(f"config.model.model_type={model_type!r} is unknown; use one of "
                     f"{list(DECODER_CLASSES)}")
  return _CLASS_EXCEPTIONS.get((model_type, head), name.format(DECODER_CLASSES[model_type]))


def _architectures() -> dict[str, tuple[str, str]]:
  """Every transformers class jaxft opens -> (family, head)."""
  out = {}
  for (family, head), (_, name) in HEADS.items():
    types = DECODER_CLASSES if "{}" in name else ("",)
    for model_type in types:
      out[hf_architecture(family, head, {"model_type": model_type})] = (family, head)
  return out


def _check(family: str, head: str) -> None:
  if (family, head) not in HEADS:
    options = ", ".join(f"{f}+{h}" for f, h in HEADS)
    raise ValueError(f"config.model.family={family!r} has no {head!r} head; jaxft has: {options}")


def _family(model_cfg: ml_collections.ConfigDict) -> str:
  family = model_cfg.get("family", "gpt2")
  if family not in FAMILIES:
    raise ValueError(f"config.model.family={family!r} is unknown; jaxft has: "
                     f"{', '.join(FAMILIES)}")
  return family


def model_config(model_cfg: ml_collections.ConfigDict):
  """config.model -> the family's frozen dataclass (GPT2Config / BertConfig), checked."""
  family = FAMILIES[_family(model_cfg)]
  cfg = _dataclass_from(family.config, model_cfg)
  if hasattr(cfg, "validate"):
    cfg.validate()
    return cfg
  width, heads_field = family.heads_divide
  # An explicit head_dim (a trimmed model's pruned heads) lifts the divisibility rule.
  if not cfg.head_dim and getattr(cfg, width) % getattr(cfg, heads_field):
    raise ValueError(f"config.model.{width}={getattr(cfg, width)} must be divisible by "
                     f"config.model.{heads_field}={getattr(cfg, heads_field)}")
  return cfg


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


# Hugging Face classes without a head of their own whose weights serve a jaxft head as they are
# (GPT2Model: the LM head is the tied token embedding).
_HEADLESS = {"GPT2Model": ("gpt2", "causal_lm")}
# config.json without "architectures": the class its model_type usually means.
_DEFAULT_ARCHITECTURE = {"gpt2": "GPT2LMHeadModel",
                         **{t: f"{p}ForCausalLM" for t, p in DECODER_CLASSES.items()}}


def head_of_architecture(architecture: str, model_type: str = "") -> tuple[str, str, str]:
  """(family, head, jaxft's transformers class) for a Hugging Face class name (config.json
  "architectures"; empty = the usual class of `model_type`). Raises naming what jaxft reads."""
  architecture = architecture or _DEFAULT_ARCHITECTURE.get(model_type, "")
  if architecture in _HEADLESS:
    family, head = _HEADLESS[architecture]
    return family, head, HEADS[(family, head)][1]
  known = _architectures()
  if architecture in known:
    return (*known[architecture], architecture)
  known = sorted(set(known) | set(_HEADLESS))
  raise ValueError(f"config.json names {architecture or f'model_type={model_type!r}'}, which "
                   f"has no jaxft task head; jaxft opens {', '.join(known)}")
