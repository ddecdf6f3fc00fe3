"""Where a run's starting weights come from: config.init_from, or the seed's random init.

config.init_from is either a Hugging Face model directory (config.json + safetensors, e.g.
all-MiniLM-L6-v2 or a GPT-2 export) or a jaxft training directory (e.g. a GPT-2 you pretrained,
to fine-tune or prompt-tune). Either way the architecture (config.model) and, unless
config.data.tokenizer names one, the tokenizer come from it. A workdir's weights are its best
(else latest) checkpoint with any LoRA folded in, converted through the Hugging Face tables, so
a causal-LM run can start a classifier just as an HF checkpoint can.
"""

import json
import logging
import os

import jax
from flax import linen as nn

from jaxft import hf

log = logging.getLogger("jaxft")

_KEPT_FROM_USER = ("dtype", "remat", "scan_layers")  # how to compute, not what the weights are


def is_workdir(path: str) -> bool:
  """A jaxft training (or adapter) directory rather than a Hugging Face one."""
  from jaxft import checkpoint

  cfg = os.path.join(path, checkpoint.CONFIG_FILE)
  if not os.path.isfile(cfg):
    return False
  with open(cfg) as f:
    return "model" in json.load(f)


def resolve(config):
  """Fills config.model (and config.data.tokenizer) from config.init_from."""
  path = config.get("init_from", "")
  if not path:
    return config
  if not os.path.isdir(path):
    raise FileNotFoundError(f"config.init_from={path!r} is not a directory; give a Hugging Face "
                            "model directory or a jaxft training directory")
  from jaxft.data.tokenizer import has_tokenizer

  if is_workdir(path):
    from jaxft import checkpoint

    base = checkpoint.load_config(path)
    overrides = {k: v for k, v in base.model.items() if k not in _KEPT_FROM_USER}
    tokenizer = base.data.get("tokenizer", "")
  else:
    overrides = hf.model_overrides(hf.read_hf_config(path))
    tokenizer = path if has_tokenizer(path) else ""
  changed = {k: (config.model.get(k), v) for k, v in overrides.items()
             if config.model.get(k) != v}
  if changed:
    log.info("init_from %s sets config.model fields: %s", path, changed)
  with config.unlocked():
    config.model.update(overrides)
    if not config.data.tokenizer and tokenizer:
      config.data.tokenizer = tokenizer
  return config


def _workdir_tensors(path: str) -> dict:
  """A jaxft workdir's weights as the HF state dict of its architecture."""
  from jaxft import checkpoint

  _, task, variables = checkpoint.load_params(path)
  params = task.peft.merge(variables)["params"]
  return hf.to_hf_tensors(params, task.architecture)


def initial_variables(task, config, lay) -> dict:
  """Every variable of the task's model in the layout's shardings: the seed's random init, with
  the "params" from config.init_from when it is set (a head it lacks keeps its random init)."""
  from jaxft import state as state_lib

  variables = state_lib.random_variables(task, config.seq_len, config.seed, lay)
  path = config.get("init_from", "")
  if not path:
    return variables
  tensors = _workdir_tensors(path) if is_workdir(path) else None

  def head_init():  # a new head's init draws from the seed itself (the figures in README)
    return nn.unbox(task.init(jax.random.key(config.seed), config.seq_len))["params"]

  params = hf.load_params(path, lay.abstract["params"], task.architecture, init_fn=head_init,
                          tensors=tensors)
  return {**variables, "params": jax.device_put(params, lay.shardings["params"])}
