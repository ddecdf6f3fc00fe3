"""Masks on a model's attention heads, MLP neurons and layers, applied from outside the model.

A trimmed model is the original with some heads, neurons or layers removed; the same function is
the original model with those units multiplied by 0. The masks here do that through flax's
method interception, so the model code stays as it is and every family (GPT-2, BERT, the
Llama-style decoders) is masked the same way:

  heads   [L, H] (or [L, B, H], one row per example): scales each head's attention output
          [B, T, H, Dh] at the input of the output projection (attn/out), so a masked head
          contributes nothing, exactly as a removed one;
  mlp     [L, F] (or [L, B, F]): scales each neuron of the MLP's hidden activation at the input
          of its down projection (mlp/proj, mlp/down);
  layers  [L] (or [L, B]): a gate g on each layer's residual update, x + g·(layer(x) - x):
          g = 0 skips the layer, exactly as dropping it.

With all masks at 1 the model is unchanged; the gradient of the loss with respect to the masks
at 1 is the first-order Taylor importance (scores.py).
"""

import contextlib
import dataclasses
import re

import jax.numpy as jnp
from flax import linen as nn


@dataclasses.dataclass(frozen=True)
class Family:
  """Where a family keeps what trimming removes (config.model field names, module names)."""

  stack: str  # the layer modules' name prefix: "{stack}_{i}"
  layers_field: str
  heads_field: str
  width_field: str
  mlp_field: str  # the MLP width field of config.model
  mlp_in: tuple[str, ...]  # the MLP's [embed, mlp] projections
  mlp_out: str  # the MLP's [mlp, embed] projection


FAMILIES = {
    "bert": Family("layer", "num_hidden_layers", "num_attention_heads", "hidden_size",
                   "intermediate_size", ("fc",), "proj"),
    "gpt2": Family("h", "n_layer", "n_head", "n_embd", "n_inner", ("fc",), "proj"),
    "llama": Family("layers", "num_hidden_layers", "num_attention_heads", "hidden_size",
                    "intermediate_size", ("gate", "up"), "down"),
}


def family_of(model_config) -> Family:
  family = model_config.get("family", "gpt2")
  if family not in FAMILIES:
    raise ValueError(f"config.model.family={family!r} cannot be trimmed; jaxft trims "
                     f"{', '.join(FAMILIES)}")
  return FAMILIES[family]


def shape_of(model_cfg, family: Family) -> dict[str, int]:
  """The unit counts of a model (its family dataclass): layers, heads, kv heads, MLP width,
  head size."""
  heads = getattr(model_cfg, family.heads_field)
  mlp = (model_cfg.mlp_width if family.mlp_field == "n_inner"
         else getattr(model_cfg, family.mlp_field))
  return {"layers": getattr(model_cfg, family.layers_field), "heads": heads,
          "kv_heads": getattr(model_cfg, "kv_heads", heads), "mlp": mlp,
          "head_dim": model_cfg.dim_per_head}


def ones(shape: dict[str, int], batch: int | None = None) -> dict:
  """Masks that change nothing: {heads [L, (B,) H], mlp [L, (B,) F], layers [L, (B,)]}."""
  b = () if batch is None else (batch,)
  n = shape["layers"]
  return {"heads": jnp.ones((n, *b, shape["heads"])), "mlp": jnp.ones((n, *b, shape["mlp"])),
          "layers": jnp.ones((n, *b))}


def _layer(path: tuple[str, ...], stack: str) -> int | None:
  for name in path:
    m = re.fullmatch(rf"{stack}_(\d+)", name)
    if m:
      return int(m.group(1))
  return None


def _scale(x, m, unit_axis_from_end: int):
  """x [B, T, ..., U, ...] times m [U] or [B, U] broadcast over every other axis."""
  shape = [1] * x.ndim
  shape[x.ndim - unit_axis_from_end] = m.shape[-1]
  if m.ndim == 2:
    shape[0] = m.shape[0]
  return x * m.reshape(shape).astype(x.dtype)


@contextlib.contextmanager
def applied(masks: dict, family: Family):
  """Within: every call of the model runs with `masks` (ones(...)-shaped; any subset of keys).
  The model must have one module per layer (not config.model.scan_layers)."""

  def interceptor(next_fun, args, kwargs, context):
    if context.method_name != "__call__":
      return next_fun(*args, **kwargs)
    path = context.module.path
    if not path:
      return next_fun(*args, **kwargs)
    i = _layer(path, family.stack)
    if i is None:
      return next_fun(*args, **kwargs)
    if "heads" in masks and path[-2:] == ("attn", "out"):  # input [B, T, H, Dh]
      return next_fun(_scale(args[0], masks["heads"][i], 2), *args[1:], **kwargs)
    if "mlp" in masks and path[-2:] == ("mlp", family.mlp_out):  # input [B, T, F]
      return next_fun(_scale(args[0], masks["mlp"][i], 1), *args[1:], **kwargs)
    if "layers" in masks and path[-1] == f"{family.stack}_{i}":
      # The Llama blocks carry (x, layer index); GPT-2 and BERT carry x.
      carry = args[0]
      x = carry[0] if isinstance(carry, tuple) else carry
      out, aux = next_fun(*args, **kwargs)
      y = out[0] if isinstance(out, tuple) else out
      g = masks["layers"][i]
      g = g.reshape((-1,) + (1,) * (x.ndim - 1)).astype(x.dtype)
      y = x + g * (y - x)
      return ((y, *out[1:]) if isinstance(out, tuple) else y), aux
    return next_fun(*args, **kwargs)

  with nn.intercept_methods(interceptor):
    yield
