"""Config -> model. The one place that knows which module a `config.model.family` names."""

import dataclasses

import jax.numpy as jnp
import ml_collections

from jaxft.models import gpt2

_DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}


def _dtype(name: str, field: str):
  if name not in _DTYPES:
    raise ValueError(f"{field}={name!r} is not a dtype jaxft knows; use one of {list(_DTYPES)}")
  return _DTYPES[name]


def gpt2_config(model_cfg: ml_collections.ConfigDict) -> gpt2.GPT2Config:
  fields = {f.name for f in dataclasses.fields(gpt2.GPT2Config)}
  kwargs = {k: v for k, v in model_cfg.items() if k in fields}
  kwargs["dtype"] = _dtype(model_cfg.get("dtype", "float32"), "config.model.dtype")
  kwargs["param_dtype"] = jnp.float32
  cfg = gpt2.GPT2Config(**kwargs)
  if cfg.n_embd % cfg.n_head:
    raise ValueError(f"config.model.n_embd={cfg.n_embd} must be divisible by "
                     f"config.model.n_head={cfg.n_head}")
  return cfg


def build_model(model_cfg: ml_collections.ConfigDict):
  """Returns (flax module, its frozen dataclass config)."""
  family = model_cfg.get("family", "gpt2")
  if family == "gpt2":
    cfg = gpt2_config(model_cfg)
    return gpt2.GPT2LMHeadModel(cfg), cfg
  raise ValueError(f"config.model.family={family!r} is unknown; jaxft has: gpt2")
