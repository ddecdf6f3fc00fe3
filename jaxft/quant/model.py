"""A whole model quantised: which parameters are matmul weights (found by tracing the model, not
by guessing from names), their quantisation, and the module that runs on them.

Every matmul weight of every family lives in one of three flax modules: nn.Dense and
nn.DenseGeneral kernels (attention projections, MLPs, poolers, classifier heads) and nn.Embed
tables (token and position embeddings, GPT-2's and tied Llamas' LM head through `attend`,
Llama's untied lm_head). Tracing `init` with a method interceptor records each one's path and
axes, so a new family built from these modules is covered without a table. Norm scales and
biases stay float (a few KB).

The quantised model keeps the QArrays in its variables and dequantises them inside the caller's
jit (`Dequantized.apply`): stored weights are int8 / packed int4, the float copy is a temporary
of the compiled computation. On CPU this is as fast as scaling after the matmul (measured in
docs/quantization.md): both pay for the int -> float conversion of the weight.
"""

import copy
import logging

import jax
from flax import linen as nn

from jaxft import trees
from jaxft.quant import core

log = logging.getLogger("jaxft")


def layouts(init_fn) -> dict[tuple[str, ...], tuple[core.Layout, int]]:
  """{param path ("transformer", "h_0", "mlp", "fc", "kernel"): (its Layout without batch
  axes, the weight's own rank)} of every matmul weight that `init_fn()` (a model init) creates.
  The abstract init costs no compute."""
  found = {}

  def record(f, args, kwargs, context):
    m = context.module
    if context.method_name in ("__call__", "attend"):
      if isinstance(m, nn.Embed):
        found[tuple(m.path) + ("embedding",)] = (core.Layout("embedding"), 2)
      elif isinstance(m, nn.Dense):
        found[tuple(m.path) + ("kernel",)] = (core.Layout("kernel", 0, 1), 2)
      elif isinstance(m, nn.DenseGeneral):
        axis = m.axis if isinstance(m.axis, (tuple, list)) else (m.axis,)
        features = m.features if isinstance(m.features, (tuple, list)) else (m.features,)
        found[tuple(m.path) + ("kernel",)] = (core.Layout("kernel", 0, len(axis)),
                                              len(axis) + len(features))
    return f(*args, **kwargs)

  with nn.intercept_methods(record):
    # A new function each time: jax caches traces by function, and a cached trace would not
    # call the interceptor.
    jax.eval_shape(lambda: init_fn())
  return found


def task_layouts(task) -> dict:
  return layouts(lambda: task.init(jax.random.key(0), min(8, task.config.seq_len)))


def quantize_params(params, found: dict, bits: int, group_size: int = 128) -> dict:
  """`params` with every weight in `found` replaced by its QArray (a scanned stack's leading
  axes become per-layer scales)."""
  core.check_bits(bits)
  out = {}
  for path, w in trees.flat(params).items():
    if path not in found:
      out[path] = w
      continue
    layout, rank = found[path]
    n_batch = w.ndim - rank
    if n_batch < 0:
      raise ValueError(f"parameter {trees.path_str(path)} has shape {w.shape}, fewer axes than "
                       "its module makes: the checkpoint does not belong to this model")
    out[path] = core.quantize(w, core.Layout(layout.kind, n_batch, layout.n_in), bits,
                              group_size)
  return trees.unflat(out)


def is_qarray(x) -> bool:
  return isinstance(x, core.QArray)


def dequantize_tree(tree):
  """The float variables a quantised tree stands for (QArrays dequantised, the rest as is)."""
  return jax.tree.map(lambda x: core.dequantize(x) if is_qarray(x) else x, tree,
                      is_leaf=is_qarray)


class Dequantized:
  """A flax model that runs on quantised variables: `apply` dequantises them, inside the jit that
  calls it, and applies the float model; `init`, `cfg` and the model's methods (passed as
  `method=`) are the float model's. Hashable by identity (a static jit argument, as
  jaxft.models.generation takes it)."""

  def __init__(self, model: nn.Module):
    self.model = model

  def __getattr__(self, name):
    if name == "model":  # not set yet (copy, pickle): no recursion
      raise AttributeError(name)
    return getattr(self.model, name)

  def init(self, *args, **kwargs):
    return self.model.init(*args, **kwargs)

  def apply(self, variables, *args, **kwargs):
    return self.model.apply(dequantize_tree(variables), *args, **kwargs)

  def __hash__(self):
    return id(self)

  def __eq__(self, other):
    return self is other


def attach(task) -> None:
  """Makes `task` (its apply, eval_outputs, predictions; Run.model for generation) run on
  quantised variables."""
  if not isinstance(task.model, Dequantized):
    task.model = Dequantized(task.model)


def quantized_config(config, bits: int, group_size: int, source: str, step):
  """The run's config for its quantised copy: PEFT merged away, a "quantization" block."""
  config = copy.deepcopy(config)
  with config.unlocked():
    if "peft" in config:
      config.peft.method = "none"
      if "init_adapter" in config.peft:
        config.peft.init_adapter = ""
    config.quantization = {"bits": bits, "group_size": group_size if bits == 4 else None,
                           "scheme": "symmetric; int8 per output channel (embeddings per row); "
                           "int4 in [-7, 7], groups along the input dimension",
                           "source": source, "step": step}
  return config


def quantize_run(run, bits: int, group_size: int = 128, step=None):
  """(config, quantised variables) of an opened run (anything with .config, .task, .variables,
  .path: jaxft.run.loader.Run); a PEFT run is merged into its base first."""
  core.check_bits(bits)
  params = run.task.peft.merge(run.variables)["params"]  # no-op without PEFT; raises if it can't
  config = quantized_config(run.config, bits, group_size, run.path, step)
  # Traced with the run's PEFT method active: it wraps the modules it targets but still calls
  # them, so the base model's weights are all found (paths only PEFT has are not in `params`).
  found = task_layouts(run.task)
  qparams = quantize_params(jax.device_get(params), found, bits, group_size)
  log.info("quantised %d weights to int%d", len(found), bits)
  return config, {"params": qparams}
