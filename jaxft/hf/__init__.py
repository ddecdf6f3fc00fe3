"""Hugging Face interop: tensor tables per transformers class (tables.py), config.json <->
config.model (config.py), and reading / writing model directories (convert.py)."""

from jaxft.hf.config import (
  CONFIG_FILE,
  bert_config_dict,
  gpt2_config_dict,
  label_names,
  model_overrides,
  read_hf_config,
)
from jaxft.hf.convert import (
  config_dict,
  load_bert_params,
  load_hf_params,
  load_params,
  read_tensors,
  save_hf,
  select_layers,
  to_hf_tensors,
)
from jaxft.hf.tables import ARCHITECTURES, Arch, Row

__all__ = ["ARCHITECTURES", "CONFIG_FILE", "Arch", "Row", "bert_config_dict", "config_dict",
           "gpt2_config_dict", "label_names", "load_bert_params", "load_hf_params", "load_params",
           "model_overrides", "read_hf_config", "read_tensors", "save_hf", "select_layers",
           "to_hf_tensors"]
