"""Opening weights: a trained run (a jaxft workdir, an adapter-only directory or a Hugging Face
model directory) as config, labels, task and variables, and a new run's starting weights
(config.init_from, or the seed's random init).

Every command that reads a model (training's init_from, evaluate, predict, generate,
prompt_eval, export) goes through `open_run`. A workdir gives its best checkpoint
(workdir/best, kept by early stopping) unless a step is asked for, else its latest; only the
trainable variables are restored (no optimizer state), onto one local device; a PEFT run's
frozen base is rebuilt from its config.init_from (or `init_from`, where the base has moved).
A Hugging Face directory is opened with the task its transformers class names
(GPT2LMHeadModel -> causal_lm, BertForSequenceClassification -> classification, ...) and its
tokenizer and label names (id2label).

config.init_from is either a Hugging Face directory or a jaxft workdir (e.g. a GPT-2 you
pretrained, to fine-tune or prompt-tune). Either way the architecture (config.model) and, unless
config.data.tokenizer names one, the tokenizer come from it. A workdir's weights are its best
(else latest) checkpoint with any LoRA folded in, converted through the Hugging Face tables, so
a causal-LM run can start a classifier just as an HF checkpoint can.
"""

import dataclasses
import logging
import os

import jax
import ml_collections
from flax import linen as nn

from jaxft import hf, peft, quant, tasks, trees
from jaxft.data.tokenizer import has_tokenizer, load_tokenizer
from jaxft.hf import peft_adapter
from jaxft.models import registry
from jaxft.parallel import sharding
from jaxft.run import checkpoint
from jaxft.run import state as state_lib
from jaxft.run import workdir as workdir_lib

log = logging.getLogger("jaxft")

_KEPT_FROM_USER = ("dtype", "remat", "scan_layers", "attention_impl")  # how to compute
_ONE_DEVICE = ml_collections.ConfigDict({"data": 1, "fsdp": 1, "tensor": 1})


@dataclasses.dataclass
class Run:
  """A trained model, ready for inference."""

  path: str
  config: ml_collections.ConfigDict  # the resolved training config (built for an HF directory)
  task: tasks.Task
  variables: dict  # {"params": ..., and the PEFT method's collection}

  @property
  def labels(self) -> list[str] | None:
    return self.task.labels

  @property
  def model(self):
    """The flax module carrying the run's PEFT method (jaxft.peft.bind)."""
    return peft.bind(self.task.model, self.task.peft)

  def tokenizer(self):
    return load_tokenizer(self.config.data.get("tokenizer") or None)


def open_run(path: str, *, step: int | None = None, best: bool = True,
             init_from: str | None = None, seq_len: int | None = None) -> Run:
  """The model in `path`: a jaxft workdir or adapter directory (its config.json has a "model"
  block) or a Hugging Face directory. `seq_len` (HF directories) sets the rows' length; the
  default is the task's (tasks.Task.default_seq_len, else the model's context)."""
  if not os.path.isdir(path):
    raise FileNotFoundError(f"{path} is not a directory; give a jaxft training directory or a "
                            "Hugging Face model directory")
  if not os.path.exists(os.path.join(path, workdir_lib.CONFIG_FILE)):
    workdir_lib.load_config(path)  # raises: neither a jaxft run nor a Hugging Face directory
  if quant.is_quantized(path):  # written by python -m jaxft.quantize
    return _open_quantized(path, step)
  if workdir_lib.is_workdir(path):
    return _open_workdir(path, step, best, init_from)
  if step is not None:
    raise ValueError(f"{path} is a Hugging Face directory: it has no checkpoint steps")
  return _open_hf(path, seq_len)


def _open_workdir(path: str, step, best: bool, init_from: str | None) -> Run:
  config = workdir_lib.load_config(path)
  if init_from:
    config.init_from = init_from
  task = tasks.make_task(config, labels=workdir_lib.load_labels(path))
  if task.needs_start:  # what the run derived from its starting model (DPO's reference)
    task.prepare(path, None)
  lay, trainable = open_trainable(path, task, step, best)
  frozen = {}
  if lay.has_frozen:
    if not config.init_from:
      log.info("%s: no init_from recorded; the frozen base is the seed's random init", path)
    base = config
    if config.get("peft", {}).get("init_adapter"):
      # What the adapter loaded trains, so the checkpoint holds it: the frozen base needs only
      # init_from (and the adapter directory may be gone since).
      base = config.copy_and_resolve_references()
      base.peft.init_adapter = ""
    frozen = lay.split(initial_variables(task, base, lay))[1]
  return Run(path, config, task, trees.combine(frozen, trainable))


def _open_quantized(path: str, step) -> Run:
  """A quantised run: its variables hold int8 / int4 weights (jaxft.quant.QArray) that its
  task's model (jaxft.quant.Dequantized) dequantises inside jit."""
  if step is not None:
    raise ValueError(f"{path} is a quantised run (python -m jaxft.quantize): it has no "
                     "checkpoint steps; drop --step (quantise another step into a new directory)")
  config = workdir_lib.load_config(path)
  task = tasks.make_task(config, labels=workdir_lib.load_labels(path))
  return Run(path, config, task, quant.load_variables(path, task))


def one_device_layout(task) -> state_lib.Layout:
  mesh = sharding.make_mesh(_ONE_DEVICE, jax.local_devices()[:1])
  return state_lib.layout(task, task.config.seq_len, mesh, task.config.get("axis_rules", ()))


def open_trainable(path: str, task, step: int | None = None, best: bool = True):
  """(the variables' layout on one device, the trainable variables of the checkpoint or of the
  adapter file in `path`)."""
  lay = one_device_layout(task)
  abstract, _ = lay.split(jax.tree.map(
      lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh), lay.abstract,
      lay.shardings))
  if os.path.exists(os.path.join(path, checkpoint.ADAPTER_FILE)):
    return lay, checkpoint.read_adapter(path, abstract)
  return lay, checkpoint.restore_params(path, abstract, step, best)


def hf_run_config(path: str, seq_len: int | None = None) -> ml_collections.ConfigDict:
  """The config of a Hugging Face directory's model: the task its class names, config.model
  from its config.json, its tokenizer; data defaults are the task's own."""
  hf_config = hf.read_hf_config(path)
  architecture = (hf_config.get("architectures") or [""])[0]
  _, head, _ = registry.head_of_architecture(architecture, hf_config.get("model_type", ""))
  task_cls = tasks.task_class(head)
  config = ml_collections.ConfigDict({
      "task": head, "seed": 0, "init_from": path, "model": {},
      "data": {"tokenizer": path if has_tokenizer(path) else "", **task_cls.data_defaults},
      "seq_len": 0, "batch_size": 64, "eval_batch_size": 0, "axis_rules": ()})
  resolve(config)
  context = config.model.get("n_positions") or config.model.get("max_position_embeddings")
  config.seq_len = int(seq_len or task_cls.default_seq_len or context)
  return config


def _open_hf(path: str, seq_len: int | None) -> Run:
  config = hf_run_config(path, seq_len)
  labels = None
  if tasks.task_class(config.task).has_labels:
    hf_config = hf.read_hf_config(path)
    labels = hf.label_names(hf_config)
    if labels is None:
      n = int(hf_config.get("num_labels", len(hf_config.get("id2label", {})) or 2))
      labels = [f"LABEL_{i}" for i in range(n)]
  task = tasks.make_task(config, labels=labels)
  lay = one_device_layout(task)
  params = hf.load_params(path, lay.abstract["params"], task.architecture)
  return Run(path, config, task, {"params": jax.device_put(params, jax.local_devices()[0])})


# -- a new run's starting weights --------------------------------------------------------------

def resolve(config):
  """Fills config.model (and config.data.tokenizer) from config.init_from."""
  path = config.get("init_from", "")
  layers = init_layers(config)  # checked first: it needs init_from
  if not path:
    return config
  if not os.path.isdir(path):
    raise FileNotFoundError(f"config.init_from={path!r} is not a directory; give a Hugging Face "
                            "model directory or a jaxft training directory")
  if workdir_lib.is_workdir(path):
    base = workdir_lib.load_config(path)
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
    if layers:  # a shallower model started from some of init_from's layers
      field = _layers_field(config.model)
      if max(layers) >= config.model[field]:
        raise ValueError(f"config.init_layers={config.init_layers!r}: {path} has "
                         f"{config.model[field]} layers (0..{config.model[field] - 1})")
      config.model[field] = len(layers)
      if config.model.get("layer_types"):  # per-layer attention kinds (sliding, full)
        config.model.layer_types = tuple(config.model.layer_types[i] for i in layers)
    if not config.data.get("tokenizer") and tokenizer:
      config.data.tokenizer = tokenizer
  return config


def _layers_field(model_config) -> str:
  return "n_layer" if model_config.get("family", "gpt2") == "gpt2" else "num_hidden_layers"


def init_layers(config) -> list[int]:
  """config.init_layers ("0,5": the model's layers are init_from's layers 0 and 5), parsed;
  [] = all of init_from's layers."""
  spec = str(config.get("init_layers", "") or "").strip()
  if not spec:
    return []
  try:
    layers = [int(x) for x in spec.split(",")]
  except ValueError:
    raise ValueError(f"config.init_layers={spec!r}: give comma-separated layer indices of "
                     "config.init_from, e.g. '0,5'") from None
  if len(set(layers)) != len(layers) or min(layers) < 0:
    raise ValueError(f"config.init_layers={spec!r}: layer indices must be distinct and >= 0")
  if not config.get("init_from"):
    raise ValueError(f"config.init_layers={spec!r} needs config.init_from: the model whose "
                     "layers start the run")
  return layers


def _workdir_tensors(path: str) -> dict:
  """A jaxft workdir's weights as the HF state dict of its architecture."""
  if quant.is_quantized(path):
    raise ValueError(f"config.init_from={path!r} is a quantised run (inference only); start "
                     "from the float run it was made from (its config.json's "
                     "quantization.source)")
  run = _open_workdir(path, None, True, None)
  params = run.task.peft.merge(run.variables)["params"]
  return hf.to_hf_tensors(params, run.task.architecture)


def initial_variables(task, config, lay) -> dict:
  """Every variable of the task's model in the layout's shardings: the seed's random init, with
  the "params" from config.init_from when it is set (a head it lacks keeps its random init) and
  the LoRA of config.peft.init_adapter (a Hugging Face PEFT adapter) when that is set."""
  path = config.get("init_from", "")
  adapter = config.get("peft", {}).get("init_adapter", "")
  if adapter and not path:
    raise ValueError(f"config.peft.init_adapter={adapter!r} needs config.init_from: the base "
                     "model the adapter was trained on")
  variables = state_lib.random_variables(task, config.seq_len, config.seed, lay)
  if not path:
    return variables
  tensors = _workdir_tensors(path) if workdir_lib.is_workdir(path) else None
  layers = init_layers(config)
  if layers:
    tensors = hf.select_layers(tensors if tensors is not None else hf.read_tensors(path), layers)

  def head_init():  # a new head's init draws from the seed itself (the figures in the docs)
    return nn.unbox(task.init(jax.random.key(config.seed), config.seq_len))["params"]

  params = hf.load_params(path, lay.abstract["params"], task.architecture, init_fn=head_init,
                          tensors=tensors)
  variables = {**variables, "params": jax.device_put(params, lay.shardings["params"])}
  if adapter:  # a Hugging Face PEFT LoRA adapter's weights start the run's LoRA
    variables = jax.device_put(peft_adapter.load_peft_adapter(adapter, task, variables),
                               lay.shardings)
  return variables
