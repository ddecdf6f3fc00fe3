"""What every PEFT method shares: the "peft" variable collection, interception, and the split of
a model's variables into trainable and frozen parts.

A method never edits the backbone. It installs a flax method interceptor (`Method.active`) that
wraps the calls of the modules it targets (Dense layers for LoRA/adapters, the backbone's
`ExtendKeys` / `ExtendInputs` extension points for prefix/prompt tuning) and keeps its own
parameters in the "peft" collection, at the path of the module they belong to:

    {"params": <the base model, as imported from Hugging Face>,
     "peft":   {"bert": {"layer_0": {"attn": {"query": {"lora_a": ..., "lora_b": ...}}}}}}

`trainable_mask` says which leaves the optimizer sees: every "peft" leaf, the task head (a new
classifier must learn) and whatever config.peft.trainable adds; the rest stay frozen.
"""

import contextlib
import functools
import re
from collections.abc import Callable, Mapping

import jax
import jax.numpy as jnp
from flax import linen as nn
from flax import traverse_util

from jaxft.trees import flat, path_str

COLLECTION = "peft"


# -- methods -------------------------------------------------------------------------------------

class Method:
  """No PEFT: full fine-tuning, every parameter trainable. Subclasses intercept modules."""

  name = "none"
  default_targets = ""
  # Peak learning rate when config.peft.lr is 0: few parameters, far from their optimum, learn
  # at rates well above full fine-tuning's (literature values for short runs).
  default_lr: float | None = None

  def __init__(self, cfg):
    self.cfg = cfg
    pattern = cfg.get("targets", "") or self.default_targets
    try:
      self.targets = re.compile(pattern)
    except re.error as e:
      raise ValueError(f"config.peft.targets={pattern!r} is not a regular expression: {e}") from e
    self.seen: set[str] = set()  # candidate module paths met while tracing (for error messages)

  def __hash__(self):  # static argument of jitted functions (jaxft.generate)
    return id(self)

  def __eq__(self, other):
    return self is other

  @contextlib.contextmanager
  def active(self, deterministic: bool = True):
    """Model calls inside this context carry the method (its parameters and computation)."""
    if type(self).intercept is Method.intercept:
      yield
      return
    with nn.intercept_methods(functools.partial(self.intercept, deterministic=deterministic)):
      yield

  def intercept(self, f, args, kwargs, context, *, deterministic: bool):
    return f(*args, **kwargs)

  def targets_call(self, context, module_types) -> bool:
    """Whether an intercepted call is `__call__` of a `module_types` module whose path matches
    config.peft.targets (every candidate path is remembered for the no-match error)."""
    module = context.module
    if context.method_name != "__call__" or not isinstance(module, module_types):
      return False
    path = module_path(module)
    self.seen.add(path)
    return bool(self.targets.search(path))

  def learning_rate(self, optim_lr: float) -> float:
    """config.peft.lr, else the method's default; full fine-tuning keeps config.optim.lr."""
    if self.name == "none":
      return optim_lr
    lr = float(self.cfg.get("lr", 0.0))
    return lr if lr > 0 else float(self.default_lr)

  def trainable_mask(self, variables: Mapping, head: str = "") -> dict:
    """True for the leaves the optimizer updates. `head`: regex of the task head's params."""
    if self.name == "none":
      return jax.tree.map(lambda _: True, dict(variables))
    extra = self.cfg.get("trainable", "")
    params = [path_str(k[1:]) for k in flat(variables) if k[0] != COLLECTION]
    if extra and not any(re.search(extra, p) for p in params):
      raise ValueError(f"config.peft.trainable={extra!r} matches no parameter of the model; "
                       f"its parameter paths look like {', '.join(params[:6])}, ...")

    def trainable(path):
      return path[0] == COLLECTION or self.trains(path_str(path[1:]), head)

    return traverse_util.unflatten_dict({k: trainable(k) for k in flat(variables)})

  def trains(self, param_path: str, head: str = "") -> bool:
    """Whether the model parameter at `param_path` ("transformer/wte/embedding") trains: every
    one without PEFT; with it, the task head's (regex `head`) and config.peft.trainable's."""
    if self.name == "none":
      return True
    return any(re.search(p, param_path) for p in (head, self.cfg.get("trainable", "")) if p)

  def check_layout(self, scan_layers: bool) -> None:
    """Under config.model.scan_layers every layer is one module with stacked params: a pattern
    naming one layer (h_3, layer_11) can select nothing on its own."""
    if not scan_layers or self.name == "none":
      return
    for field in ("targets", "trainable"):
      pattern = self.cfg.get(field, "")
      if pattern and re.search(r"(^|[^a-z])(h|layer)_\d", pattern):
        raise ValueError(
            f"config.peft.{field}={pattern!r} names a single layer, but with "
            "config.model.scan_layers=True the layers are one module ('h' / 'layer', params "
            "stacked on a leading axis) and one layer cannot be chosen on its own; set "
            "config.model.scan_layers=False, or name the module for every layer (e.g. "
            "'attn/query$')")

  def check_initialized(self, variables: Mapping) -> None:
    if self.name != "none" and not flat(variables.get(COLLECTION, {})):
      seen = sorted(self.seen)
      raise ValueError(
          f"config.peft.targets={self.targets.pattern!r} matches no module of this model, so "
          f"{self.name} has nothing to train; module paths it can target: "
          f"{', '.join(seen[:12])}{' ...' if len(seen) > 12 else ''}")

  def regularizer(self, variables: Mapping):
    """A penalty added to the mean loss (AdaLoRA's orthogonality); none by default."""
    return 0.0

  def wrap_optimizer(self, tx, num_steps: int):
    """The optimizer, wrapped when the method acts between steps (AdaLoRA's rank budget)."""
    return tx

  def merge(self, variables: Mapping) -> dict:
    """{"params": ...} of a plain model that computes the same function."""
    if self.name != "none":
      raise ValueError(f"config.peft.method={self.name!r} adds computation that no plain "
                       "transformers model has, so it cannot be merged into one; save the "
                       "adapter instead (python -m jaxft.export --adapter_only)")
    return {"params": variables["params"]}

  def final_report(self, opt_state) -> str | None:
    """A line for the end of training about what the method learned (AdaLoRA: the ranks it
    kept per module), from the final optimizer state; None: nothing to say."""
    return None

  def describe(self) -> str:
    return self.name


def module_path(module: nn.Module) -> str:
  return path_str(module.path)


def peft_variable(module: nn.Module, name: str, init: Callable, shape: tuple[int, ...],
                  names: tuple) -> jax.Array:
  """The module's parameter `name` in the "peft" collection (created at init with `init` and
  logical axis `names`, so it shards like the weights it adapts)."""
  def make():
    return nn.LogicallyPartitioned(init(module.make_rng("params"), shape, jnp.float32), names)
  return module.variable(COLLECTION, name, make).value


def logical_names(module: nn.Module, param: str, ndim: int) -> tuple:
  """The logical axis names of one of the module's own params (known while initialising)."""
  if module.has_variable("params", param):
    boxed = module.scope.get_variable("params", param)
    if isinstance(boxed, nn.LogicallyPartitioned):
      return tuple(boxed.names)
  return (None,) * ndim


class Bound:
  """A model with its PEFT method: `.init` / `.apply` / `.cfg` like the flax module, for code
  that takes a model (jaxft.generate, jaxft.prompt_eval). Hashable by identity (a static jit
  argument)."""

  def __init__(self, model: nn.Module, method: Method):
    self.model, self.method = model, method

  @property
  def cfg(self):
    return self.model.cfg

  def init(self, *args, **kwargs):
    with self.method.active():
      return self.model.init(*args, **kwargs)

  def apply(self, variables, *args, **kwargs):
    with self.method.active(kwargs.get("deterministic", True)):
      return self.model.apply(variables, *args, **kwargs)


def bind(model: nn.Module, method: Method | None):
  """The model itself without PEFT, else a `Bound` that carries the method."""
  return model if method is None or method.name == "none" else Bound(model, method)
