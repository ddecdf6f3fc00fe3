"""The optax chain: warmup + cosine or linear schedule, AdamW with a weight-decay mask, clipping."""

import re
from typing import NamedTuple

import jax
import jax.numpy as jnp
import optax


def lr_schedule(optim_cfg, num_steps: int) -> optax.Schedule:
  """Linear warmup from 0 to lr (warmup_steps, or warmup_fraction of num_steps), then cosine
  decay to lr * min_lr_ratio at num_steps, or (schedule "linear", BERT's) linear decay to 0."""
  warmup = int(optim_cfg.warmup_steps) or int(optim_cfg.get("warmup_fraction", 0) * num_steps)
  warmup = min(warmup, max(num_steps - 1, 0))
  kind = optim_cfg.get("schedule", "cosine")
  if kind == "linear":
    return optax.join_schedules([
        optax.linear_schedule(0.0, optim_cfg.lr, warmup),
        optax.linear_schedule(optim_cfg.lr, 0.0, max(num_steps - warmup, 1))], [warmup])
  if kind != "cosine":
    raise ValueError(f"config.optim.schedule={kind!r} is unknown; use 'cosine' or 'linear'")
  return optax.warmup_cosine_decay_schedule(
      init_value=0.0, peak_value=optim_cfg.lr, warmup_steps=warmup,
      decay_steps=max(num_steps, warmup + 1), end_value=optim_cfg.lr * optim_cfg.min_lr_ratio)


_EMBEDDING = re.compile(r"(^|/)(wte|wpe|embedding|word_embeddings|position_embeddings)(/|$)")
# GPT-2's ln_1/ln_2/ln_f, BERT's ln/ln_embed/mlm_ln, the decoders' ln_attn/.../norm and q/k
# query_norm/key_norm, and biases incl. the MLM head's mlm_bias.
_NORM_OR_BIAS = re.compile(
    r"(^|/)(ln|ln_\w+|\w+_ln|norm|\w+_norm|layer_?norm\w*|LayerNorm)(/|$)|(^|/)(\w+_)?bias$")


def weight_decay_mask(params, optim_cfg):
  """True where AdamW decays: matmul kernels always; embeddings, norms and biases if asked."""

  def decays(path, _):
    name = "/".join(str(getattr(k, "key", k)) for k in path)
    if _EMBEDDING.search(name):
      return bool(optim_cfg.decay_embeddings)
    if _NORM_OR_BIAS.search(name):
      return bool(optim_cfg.decay_norms_and_biases)
    return True

  return jax.tree_util.tree_map_with_path(decays, params)


class ParamsEmaState(NamedTuple):
  ema: optax.Params


def params_ema(decay: float) -> optax.GradientTransformation:
  """Keeps ema <- decay * ema + (1 - decay) * params after each update (the params the update
  makes), starting at the initial params; the updates pass through unchanged. In the optimizer
  state, the EMA is checkpointed and resumed with it, sharded like the params."""
  def init(params):
    return ParamsEmaState(ema=jax.tree.map(jnp.asarray, params))

  def update(updates, state, params=None):
    if params is None:
      raise ValueError("params_ema needs the params: call tx.update(grads, state, params)")
    new = optax.apply_updates(params, updates)
    ema = jax.tree.map(lambda e, p: decay * e + (1.0 - decay) * p.astype(e.dtype), state.ema,
                       new)
    return updates, ParamsEmaState(ema=ema)

  return optax.GradientTransformation(init, update)


def ema_params(opt_state):
  """The EMA of the params kept by params_ema inside an optimizer state."""
  found = [s for s in jax.tree.leaves(opt_state, is_leaf=lambda x: isinstance(
      x, ParamsEmaState)) if isinstance(s, ParamsEmaState)]
  if len(found) != 1:
    raise ValueError(f"the optimizer state holds {len(found)} parameter EMAs; self-"
                     "distillation needs exactly one (config.distill.ema_decay)")
  return found[0].ema


def make_optimizer(optim_cfg, num_steps: int, peft_method=None, ema_decay: float = 0.0
                   ) -> tuple[optax.GradientTransformation, optax.Schedule]:
  """The chain for the trainable params. A PEFT method sets the peak learning rate
  (config.peft.lr or its default) and may wrap the chain (AdaLoRA's rank budget).
  `ema_decay` > 0 keeps an EMA of the params after it (params_ema: self-distillation)."""
  if peft_method is not None and peft_method.name != "none":
    optim_cfg = optim_cfg.copy_and_resolve_references()
    with optim_cfg.unlocked():
      optim_cfg.lr = peft_method.learning_rate(optim_cfg.lr)
  schedule = lr_schedule(optim_cfg, num_steps)
  chain = []
  if optim_cfg.clip_norm and optim_cfg.clip_norm > 0:
    chain.append(optax.clip_by_global_norm(optim_cfg.clip_norm))
  chain.append(optax.adamw(schedule, b1=optim_cfg.b1, b2=optim_cfg.b2, eps=optim_cfg.eps,
                           weight_decay=optim_cfg.weight_decay,
                           mask=lambda p: weight_decay_mask(p, optim_cfg)))
  tx = optax.chain(*chain)
  if peft_method is not None:
    tx = peft_method.wrap_optimizer(tx, num_steps)
  if ema_decay:
    tx = optax.chain(tx, params_ema(ema_decay))
  return tx, schedule
