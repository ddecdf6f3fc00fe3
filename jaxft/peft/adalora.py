"""AdaLoRA's rank budget allocator (Zhang et al. 2023, Algorithm 1) as an optax wrapper.

After each optimizer update it scores every SVD triplet (P_i, E_i, Q_i) of every adapted
module: the sensitivity I = |w * grad| of each entry, smoothed (I_bar, EMA beta1) and weighed by
its uncertainty (U_bar = EMA beta2 of |I - I_bar|); a triplet scores s(E_i) + mean s(P_i) +
mean s(Q_i) with s = I_bar * U_bar. The total budget (sum of ranks) stays at init_rank per
module for the first warmup steps, falls cubically to rank per module until the last
final_fraction of training, and every mask_every steps the lowest-scoring triplets beyond it have
E_i set to 0 (they may regrow in between, as in the paper). From T - t_final on the mask is
fixed. The allocator's state (EMAs, mask) is part of the optimizer state, so a resumed run
continues the same allocation.
"""

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax
from flax import traverse_util

from jaxft.parallel import distributed
from jaxft.peft.base import COLLECTION
from jaxft.trees import by_module, flat


class AllocatorState(NamedTuple):
  inner: Any
  count: jax.Array  # optimizer steps taken
  ipt: Any  # I_bar, shaped like the "peft" subtree
  unc: Any  # U_bar
  keep: Any  # {module path: {"lora_e": bool [r0]}}: the mask last applied


def _triplet_scores(ipt, unc) -> dict[tuple, jax.Array]:
  """{module path: [*S, r0] scores} (S: stacked layers, none without scan_layers)."""
  s_ipt, s_unc = by_module(ipt), by_module(unc)
  scores = {}
  for path, leaves in s_ipt.items():
    s = {k: leaves[k] * s_unc[path][k] for k in leaves}
    stacked = s["lora_e"].ndim - 1  # E [*S, r0]: S = layers stacked by scan_layers, if any
    p_axes = tuple(range(stacked, s["lora_a"].ndim - 1))  # P [*S, *in, r0]: mean over in
    q_axes = tuple(range(stacked + 1, s["lora_b"].ndim))  # Q [*S, r0, *out]: mean over out
    scores[path] = s["lora_e"] + s["lora_a"].mean(p_axes) + s["lora_b"].mean(q_axes)
  return scores


def budget(step, *, num_steps: int, t_init: int, t_final: int, init_total: int,
           target_total: int):
  """Total rank allowed at `step`: init_total, then a cubic fall to target_total."""
  span = max(num_steps - t_final - t_init, 1)
  progress = jnp.clip((step - t_init) / span, 0.0, 1.0)
  return jnp.floor((init_total - target_total) * (1 - progress) ** 3 + target_total)


def rank_allocator(tx: optax.GradientTransformation, cfg, num_steps: int, init_rank: int,
                   target_rank: int) -> optax.GradientTransformation:
  beta1, beta2 = float(cfg.beta1), float(cfg.beta2)
  t_init = int(float(cfg.warmup_fraction) * num_steps)
  t_final = int(float(cfg.final_fraction) * num_steps)
  every = max(int(cfg.mask_every), 1)
  if t_init + t_final >= num_steps:
    raise ValueError(f"config.peft.warmup_fraction={cfg.warmup_fraction} + final_fraction="
                     f"{cfg.final_fraction} leave no steps in between to reallocate ranks over "
                     f"{num_steps} steps; lower them")

  def init(params):
    peft = params[COLLECTION]
    zeros = jax.tree.map(jnp.zeros_like, peft)
    keep = traverse_util.unflatten_dict(
        {k: jnp.ones(v.shape, bool) for k, v in flat(peft).items() if k[-1] == "lora_e"})
    return AllocatorState(tx.init(params), jnp.zeros([], jnp.int32), zeros, zeros, keep)

  def update(grads, state, params):
    updates, inner = tx.update(grads, state.inner, params)
    step = state.count
    peft, peft_grads = params[COLLECTION], grads[COLLECTION]
    new_peft = jax.tree.map(lambda p, u: p + u, peft, updates[COLLECTION])
    # Sensitivities are only tracked while the budget still moves (as PEFT's implementation).
    tracking = step < num_steps - t_final
    now = jax.tree.map(lambda w, g: jnp.abs(w * g), new_peft, peft_grads)
    ipt = jax.tree.map(lambda old, x: jnp.where(tracking, beta1 * old + (1 - beta1) * x, old),
                       state.ipt, now)
    unc = jax.tree.map(lambda old, x, i: jnp.where(tracking,
                                                   beta2 * old + (1 - beta2) * jnp.abs(x - i),
                                                   old), state.unc, now, ipt)
    scores = _triplet_scores(ipt, unc)
    n_modules = sum(s.size // init_rank for s in scores.values())  # a stacked layer counts
    total = budget(step, num_steps=num_steps, t_init=t_init, t_final=t_final,
                   init_total=init_rank * n_modules, target_total=target_rank * n_modules)
    everything = jnp.concatenate([s.reshape(-1) for s in scores.values()])
    n_pruned = (init_rank * n_modules - total).astype(jnp.int32)
    threshold = jnp.where(n_pruned > 0, jnp.sort(everything)[jnp.maximum(n_pruned - 1, 0)],
                          -jnp.inf)
    fixed = step > num_steps - t_final  # the final mask, kept as it was at T - t_final
    mask_now = (step > t_init) & ((step % every == 0) | (step >= num_steps - t_final))
    old_keep = {k[:-1]: v for k, v in flat(state.keep).items()}
    keep = {path: jnp.where(fixed, old_keep[path], jnp.where(mask_now, s > threshold,
                                                              old_keep[path]))
            for path, s in scores.items()}
    # A pruned E_i is set to 0: its update becomes -E_i (before the optimizer's step).
    apply_mask = mask_now | fixed
    new_updates, old, new = dict(flat(updates)), flat(peft), flat(new_peft)
    for path, k in keep.items():
      e = (*path, "lora_e")
      new_updates[(COLLECTION, *e)] = jnp.where(apply_mask & ~k, 0.0, new[e]) - old[e]
    keep_tree = traverse_util.unflatten_dict({(*p, "lora_e"): k for p, k in keep.items()})
    return (traverse_util.unflatten_dict(new_updates),
            AllocatorState(inner, step + 1, ipt, unc, keep_tree))

  return optax.GradientTransformation(init, update)


def rank_pattern(opt_state) -> dict[str, int] | None:
  """{module path: ranks kept} from a train state's optimizer state (None if not AdaLoRA)."""
  # The allocator may sit inside a chain (self-distillation appends a params EMA).
  found = [s for s in jax.tree.leaves(opt_state, is_leaf=lambda x: isinstance(
      x, AllocatorState)) if isinstance(s, AllocatorState)]
  if not found:
    return None
  opt_state = found[0]
  pattern = {}
  for k, v in flat(distributed.to_host(opt_state.keep)).items():
    path = "/".join(k[:-1])
    if v.ndim == 1:
      pattern[path] = int(v.sum())
    else:  # stacked by scan_layers: one entry per layer
      rows = v.reshape(-1, v.shape[-1])
      pattern.update({f"{path}[{i}]": int(row.sum()) for i, row in enumerate(rows)})
  return pattern
