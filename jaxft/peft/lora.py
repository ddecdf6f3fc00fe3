"""LoRA (Hu et al. 2021) and AdaLoRA's SVD form (Zhang et al. 2023) on Dense layers.

LoRA adds (alpha / r) * dropout(x) A B to a frozen kernel W: A [in, r] (Kaiming-uniform, as
transformers' PEFT), B [r, out] (zeros), so training starts from the base model exactly.
AdaLoRA writes the update as P diag(E) Q: P [in, r0], E [r0] (zeros), Q [r0, out]; its rank
budget allocator (jaxft/peft/adalora.py) zeroes the least important (P_i, E_i, Q_i) triplets.
For a DenseGeneral whose kernel is [embed, heads, head_dim] the "in" and "out" sides keep their
axes (A [embed, r], B [r, heads, head_dim]) and their logical names, so LoRA shards like W.
`merge` folds the update into W: the merged model is a plain model of the same class.
"""

import math

import jax
import jax.numpy as jnp
import numpy as np
from flax import linen as nn
from flax import traverse_util

from jaxft.models.dropout import dropout
from jaxft.peft import adalora
from jaxft.peft.base import COLLECTION, Method, logical_names, module_path, peft_variable
from jaxft.trees import by_module, flat


def _sides(module: nn.Module, x) -> tuple[int, tuple[int, ...], tuple[int, ...]]:
  """(number of contracted trailing axes of x, their sizes, the output feature shape)."""
  if isinstance(module, nn.Dense):
    return 1, (x.shape[-1],), (module.features,)
  axis = module.axis if isinstance(module.axis, tuple) else (module.axis,)
  n = len(axis)
  if sorted(a % x.ndim for a in axis) != list(range(x.ndim - n, x.ndim)) or module.batch_dims:
    raise ValueError(f"{module_path(module)}: LoRA supports layers that contract the trailing "
                     f"axes of their input (this one contracts {axis}); exclude it from "
                     "config.peft.targets")
  features = module.features if isinstance(module.features, tuple) else (module.features,)
  return n, tuple(x.shape[-n:]), tuple(features)


def _kaiming_uniform(fan_in: int):
  bound = 1.0 / math.sqrt(fan_in)  # torch's kaiming_uniform_(a=sqrt(5)), as PEFT initialises A
  return lambda key, shape, dtype: jax.random.uniform(key, shape, dtype, -bound, bound)


def _contract(x, w, n: int):
  """x [..., *in (n axes)] . w [*in, *rest] -> [..., *rest]."""
  return jnp.tensordot(x, w.astype(x.dtype), axes=(tuple(range(x.ndim - n, x.ndim)),
                                                   tuple(range(n))))


def _low_rank_product(a: np.ndarray, b: np.ndarray, kernel_shape: tuple) -> np.ndarray:
  """A [*S, *in, r] B [*S, r, *out] -> [*S, *in, *out] = kernel_shape, where S are the layer
  axes config.model.scan_layers stacks (none without it): one product per layer."""
  r = a.shape[-1]
  stacked = a.ndim + b.ndim - 2 - len(kernel_shape)
  layers = math.prod(kernel_shape[:stacked])
  return np.matmul(a.reshape(layers, -1, r), b.reshape(layers, r, -1)).reshape(kernel_shape)


class LoRA(Method):
  name = "lora"
  default_targets = r"attn/(query|value)$"  # W_q and W_v, as in the LoRA paper
  default_lr = 1e-3

  @property
  def rank(self) -> int:
    r = int(self.cfg.rank)
    if r < 1:
      raise ValueError(f"config.peft.rank={r} must be >= 1")
    return r

  @property
  def scale(self) -> float:
    return float(self.cfg.alpha) / self.rank

  def _dropout(self, module, x, deterministic: bool):
    rate = float(self.cfg.dropout)
    if deterministic or rate == 0:
      return x
    return dropout(module.make_rng("dropout"), rate, x)

  def intercept(self, f, args, kwargs, context, *, deterministic: bool):
    y = f(*args, **kwargs)
    if not self.targets_call(context, (nn.Dense, nn.DenseGeneral)):
      return y
    module, x = context.module, args[0]
    n, in_shape, out_shape = _sides(module, x)
    names = logical_names(module, "kernel", len(in_shape) + len(out_shape))
    in_names, out_names = names[:len(in_shape)], names[len(in_shape):]
    return y + self.delta(module, self._dropout(module, x, deterministic), n, in_shape,
                          out_shape, in_names, out_names).astype(y.dtype)

  def delta(self, module, x, n, in_shape, out_shape, in_names, out_names):
    r = self.rank
    a = peft_variable(module, "lora_a", _kaiming_uniform(math.prod(in_shape)), (*in_shape, r),
                      (*in_names, None))
    b = peft_variable(module, "lora_b", nn.initializers.zeros, (r, *out_shape),
                      (None, *out_names))
    return _contract(_contract(x, a, n), b, 1) * self.scale

  def kernel_delta(self, leaves: dict, kernel_shape: tuple) -> np.ndarray:
    """The merged update (alpha / r) A B, shaped like the kernel."""
    a, b = np.asarray(leaves["lora_a"], np.float32), np.asarray(leaves["lora_b"], np.float32)
    return _low_rank_product(a, b, kernel_shape) * self.scale

  def merge(self, variables) -> dict:
    params = {k: np.asarray(v) for k, v in flat(jax.device_get(variables["params"])).items()}
    for path, leaves in by_module(jax.device_get(variables.get(COLLECTION, {}))).items():
      kernel = params[(*path, "kernel")]
      params[(*path, "kernel")] = (kernel.astype(np.float32)
                                   + self.kernel_delta(leaves, kernel.shape)).astype(kernel.dtype)
    return {"params": traverse_util.unflatten_dict(params)}

  def describe(self) -> str:
    return (f"lora r={self.rank} alpha={self.cfg.alpha} dropout={self.cfg.dropout} "
            f"targets={self.targets.pattern!r}")


class AdaLoRA(LoRA):
  """SVD-form LoRA; the rank budget moves between modules during training (adalora.py)."""

  name = "adalora"
  default_lr = 1e-3

  @property
  def init_rank(self) -> int:
    r0 = int(self.cfg.init_rank)
    if r0 < self.rank:
      raise ValueError(f"config.peft.init_rank={r0} must be >= config.peft.rank={self.rank} "
                       "(AdaLoRA starts every module at init_rank and prunes to an average of "
                       "rank)")
    return r0

  @property
  def scale(self) -> float:
    return float(self.cfg.alpha) / self.init_rank

  def delta(self, module, x, n, in_shape, out_shape, in_names, out_names):
    r0 = self.init_rank
    normal = nn.initializers.normal(0.02)  # as PEFT's AdaLoRA: P, Q ~ N(0, 0.02), E = 0
    p = peft_variable(module, "lora_a", normal, (*in_shape, r0), (*in_names, None))
    e = peft_variable(module, "lora_e", nn.initializers.zeros, (r0,), (None,))
    q = peft_variable(module, "lora_b", normal, (r0, *out_shape), (None, *out_names))
    return _contract(_contract(x, p, n) * e.astype(x.dtype), q, 1) * self.scale

  def kernel_delta(self, leaves: dict, kernel_shape: tuple) -> np.ndarray:
    p = np.asarray(leaves["lora_a"], np.float32)  # [*S, *in, r0]
    e = np.asarray(leaves["lora_e"], np.float32)  # [*S, r0]
    e = e.reshape(*e.shape[:-1], *[1] * (p.ndim - e.ndim), e.shape[-1])
    return _low_rank_product(p * e, np.asarray(leaves["lora_b"], np.float32),
                             kernel_shape) * self.scale

  def regularizer(self, variables):
    """Mean over modules (and stacked layers) of ||P^T P - I||_F and ||Q Q^T - I||_F, times
    config.peft.orth_reg."""
    weight = float(self.cfg.orth_reg)
    norms = []
    for leaves in by_module(variables.get(COLLECTION, {})).values():
      e = leaves["lora_e"]  # [*S, r0]: S = layers stacked by scan_layers
      layers, r0 = math.prod(e.shape[:-1]), e.shape[-1]
      p = leaves["lora_a"].reshape(layers, -1, r0)  # [S, in, r0]
      q = jnp.swapaxes(leaves["lora_b"].reshape(layers, r0, -1), 1, 2)  # [S, out, r0]
      for m in (p.astype(jnp.float32), q.astype(jnp.float32)):
        gram = jnp.einsum("sfr,sfk->srk", m, m)
        norms.append(jnp.linalg.norm(gram - jnp.eye(r0), "fro", axis=(1, 2)))
    if not norms or weight == 0:
      return 0.0
    return weight * jnp.concatenate(norms).mean()

  def wrap_optimizer(self, tx, num_steps: int):
    return adalora.rank_allocator(tx, self.cfg, num_steps, self.init_rank, self.rank)

  def final_report(self, opt_state) -> str | None:
    ranks = adalora.rank_pattern(opt_state)
    if not ranks:
      return None
    return f"AdaLoRA ranks kept per module ({sum(ranks.values())} in all): {ranks}"

  def describe(self) -> str:
    return (f"adalora rank {self.init_rank} -> {self.rank} on average, alpha={self.cfg.alpha}, "
            f"targets={self.targets.pattern!r}")
