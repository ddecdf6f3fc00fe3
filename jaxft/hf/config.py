"""Hugging Face config.json <-> jaxft `config.model` fields, for GPT-2 and BERT.

Reading rejects the variants jaxft does not implement (rather than loading weights into the wrong
math); writing produces a config.json that transformers reads back as exactly the jaxft model,
with the architecture name of its head and, for classifiers, the label names (id2label).
"""

import json
import os

from jaxft.hf.decoder_config import DEFAULTS as DECODER_DEFAULTS
from jaxft.hf.decoder_config import decoder_overrides
from jaxft.models.bert import BertConfig
from jaxft.models.gpt2 import GPT2Config

CONFIG_FILE = "config.json"
GPT2_EOS_ID = 50256  # <|endoftext|> of GPT-2's BPE: HF's bos/eos/pad for gpt2 checkpoints


def read_hf_config(path: str) -> dict:
  """The HF config.json of directory `path` (given as config.init_from or --init_from)."""
  if not os.path.isdir(path):
    raise FileNotFoundError(f"config.init_from / --init_from={path!r} is not a directory; point "
                            "it at a local Hugging Face model directory (config.json + "
                            "model.safetensors or pytorch_model.bin)")
  file = os.path.join(path, CONFIG_FILE)
  if not os.path.exists(file):
    raise FileNotFoundError(f"config.init_from / --init_from={path!r} has no {CONFIG_FILE}; it "
                            "should be a directory written by save_pretrained")
  with open(file) as f:
    return json.load(f)


def _reject(hf_config: dict, unsupported: dict[str, bool], family: str) -> None:
  for field, bad in unsupported.items():
    if bad:
      raise ValueError(f"unsupported architecture: config.json has {field}="
                       f"{hf_config.get(field)!r}, which jaxft's {family} does not implement")


def _gpt2_overrides(hf_config: dict) -> dict:
  # gelu_pytorch_tanh is the same tanh approximation as gelu_new.
  activation = hf_config.get("activation_function", "gelu_new")
  if activation not in ("gelu_new", "gelu_pytorch_tanh"):
    raise ValueError(f"unsupported architecture: config.json has activation_function="
                     f"{activation!r}; jaxft's GPT-2 uses 'gelu_new' (tanh-approximated GELU)")
  n_embd = hf_config.get("n_embd", 768)
  n_inner = hf_config.get("n_inner")
  # Fields whose non-default values change the math jaxft implements.
  _reject(hf_config, {
      "scale_attn_weights": not hf_config.get("scale_attn_weights", True),
      "scale_attn_by_inverse_layer_idx": hf_config.get("scale_attn_by_inverse_layer_idx", False),
      "add_cross_attention": hf_config.get("add_cross_attention", False),
      "tie_word_embeddings": not hf_config.get("tie_word_embeddings", True),
  }, "GPT-2")
  return {
      "family": "gpt2",
      "n_layer": int(hf_config.get("n_layer", 12)),
      "n_embd": int(n_embd),
      "n_head": int(hf_config.get("n_head", 12)),
      # A trimmed GPT-2's MLP is narrower than 4 * n_embd (None: the default width).
      "n_inner": 0 if n_inner in (None, 4 * n_embd) else int(n_inner),
      "vocab_size": int(hf_config.get("vocab_size", 50257)),
      # Old configs carry n_ctx next to n_positions; the position table is n_positions long.
      "n_positions": int(hf_config.get("n_positions", hf_config.get("n_ctx", 1024))),
      "layer_norm_epsilon": float(hf_config.get("layer_norm_epsilon", 1e-5)),
      "embd_pdrop": float(hf_config.get("embd_pdrop", 0.1)),
      "attn_pdrop": float(hf_config.get("attn_pdrop", 0.1)),
      "resid_pdrop": float(hf_config.get("resid_pdrop", 0.1)),
  }


def _bert_overrides(hf_config: dict) -> dict:
  _reject(hf_config, {
      "hidden_act": hf_config.get("hidden_act", "gelu") != "gelu",
      "position_embedding_type": hf_config.get("position_embedding_type",
                                               "absolute") != "absolute",
      "is_decoder": hf_config.get("is_decoder", False),
      "add_cross_attention": hf_config.get("add_cross_attention", False),
  }, "BERT")
  defaults = BertConfig()
  out = {"family": "bert"}
  for field in ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads",
                "intermediate_size", "max_position_embeddings", "type_vocab_size"):
    out[field] = int(hf_config.get(field, getattr(defaults, field)))
  for field in ("hidden_dropout_prob", "attention_probs_dropout_prob", "layer_norm_eps"):
    out[field] = float(hf_config.get(field, getattr(defaults, field)))
  if hf_config.get("classifier_dropout") is not None:
    out["classifier_dropout"] = float(hf_config["classifier_dropout"])
  return out


def model_overrides(hf_config: dict) -> dict:
  """HF config.json -> `config.model` fields (incl. `family`). Rejects unsupported variants."""
  model_type = hf_config.get("model_type")
  if model_type == "gpt2":
    return _gpt2_overrides(hf_config)
  if model_type == "bert":
    return _bert_overrides(hf_config)
  if model_type in DECODER_DEFAULTS:
    return decoder_overrides(hf_config)
  raise ValueError(f"unsupported architecture: config.json has model_type={model_type!r}; "
                   "jaxft can load model_type 'gpt2' (GPT2Model / GPT2LMHeadModel / "
                   "GPT2ForSequenceClassification), 'bert' (BertModel / BertFor*) and the "
                   f"decoders {', '.join(DECODER_DEFAULTS)} (*ForCausalLM, "
                   "*ForSequenceClassification)")


def label_names(hf_config: dict) -> list[str] | None:
  """id2label in id order, when the checkpoint is a trained classifier (not HF's LABEL_i)."""
  id2label = hf_config.get("id2label")
  if not id2label:
    return None
  names = [id2label[k] for k in sorted(id2label, key=int)]
  if all(n == f"LABEL_{i}" for i, n in enumerate(names)):
    return None
  return names


def labels_dict(labels: list[str] | None) -> dict:
  if not labels:
    return {}
  return {"id2label": {str(i): n for i, n in enumerate(labels)},
          "label2id": {n: i for i, n in enumerate(labels)}, "num_labels": len(labels)}


def gpt2_config_dict(cfg: GPT2Config, eos_id: int | None = None,
                     architecture: str = "GPT2LMHeadModel",
                     labels: list[str] | None = None) -> dict:
  """A config.json that transformers' GPT2Config reads as exactly this model."""
  if eos_id is None and cfg.vocab_size > GPT2_EOS_ID:
    eos_id = GPT2_EOS_ID
  return {
      "architectures": [architecture],
      "model_type": "gpt2",
      "vocab_size": cfg.vocab_size,
      "n_positions": cfg.n_positions,
      "n_ctx": cfg.n_positions,  # read by older transformers releases
      "n_embd": cfg.n_embd,
      "n_layer": cfg.n_layer,
      "n_head": cfg.n_head,
      "n_inner": cfg.n_inner or None,  # None: 4 * n_embd
      "activation_function": "gelu_new",
      "resid_pdrop": cfg.resid_pdrop,
      "embd_pdrop": cfg.embd_pdrop,
      "attn_pdrop": cfg.attn_pdrop,
      "layer_norm_epsilon": cfg.layer_norm_epsilon,
      "initializer_range": cfg.initializer_range,
      "scale_attn_weights": True,
      "scale_attn_by_inverse_layer_idx": False,
      "reorder_and_upcast_attn": False,
      "tie_word_embeddings": True,
      "use_cache": True,
      "bos_token_id": eos_id,
      "eos_token_id": eos_id,
      # GPT2ForSequenceClassification scores the last token that is not pad_token_id.
      "pad_token_id": eos_id,
      "dtype": "float32",
      **labels_dict(labels),
  }


def bert_config_dict(cfg: BertConfig, architecture: str = "BertModel",
                     labels: list[str] | None = None, pad_id: int = 0) -> dict:
  """A config.json that transformers' BertConfig reads as exactly this model."""
  return {
      "architectures": [architecture],
      "model_type": "bert",
      "vocab_size": cfg.vocab_size,
      "hidden_size": cfg.hidden_size,
      "num_hidden_layers": cfg.num_hidden_layers,
      "num_attention_heads": cfg.num_attention_heads,
      "intermediate_size": cfg.intermediate_size,
      "hidden_act": "gelu",
      "hidden_dropout_prob": cfg.hidden_dropout_prob,
      "attention_probs_dropout_prob": cfg.attention_probs_dropout_prob,
      "max_position_embeddings": cfg.max_position_embeddings,
      "type_vocab_size": cfg.type_vocab_size,
      "initializer_range": cfg.initializer_range,
      "layer_norm_eps": cfg.layer_norm_eps,
      "position_embedding_type": "absolute",
      "classifier_dropout": cfg.classifier_dropout,
      "pad_token_id": pad_id,
      "tie_word_embeddings": True,
      "dtype": "float32",
      **labels_dict(labels),
  }
