"""Adversarial training on the token embeddings (config.adversarial), and the embedding-space
PGD attack the robustness check evaluates under.

Perturbations delta are [B, T, D] per token-embedding call (jaxft/models/perturb.py), bounded
per example: ||delta_b||_2 <= epsilon over the row's T x D entries. Gradients g are normalised
per example the same way.

- FGM (Miyato et al. 2017): delta = epsilon * g / ||g|| at delta = 0; the step's gradient is
  that of L(clean) + weight * L(delta).
- PGD (Madry et al. 2018): `steps` ascents delta <- proj(delta + step_size * g / ||g||) from
  0; the gradient is that of L(clean) + weight * L(delta_K). K + 1 forward/backward passes.
- FreeLB (Zhu et al. 2020): delta_0 uniform in [-init, init] per entry, scaled by
  1/sqrt(T * D) as the paper does; K ascents as PGD, and the parameters get the mean of the
  K gradients taken on the way (no clean term). K passes.

Dropout draws are the same in every pass of a step (one key), so the passes differ only by
delta. Perturbations are constants for the parameter gradient (no gradient flows through the
attack), as in all three papers.
"""

import jax
import jax.numpy as jnp
import ml_collections

from jaxft.models import perturb

METHODS = ("none", "fgm", "pgd", "freelb")
_FIELD = "config.adversarial"


def settings(config) -> ml_collections.ConfigDict | None:
  """The checked config.adversarial block, or None when adversarial training is off."""
  adv = config.get("adversarial")
  if adv is None or adv.get("method", "none") == "none":
    return None
  method = adv.method
  if method not in METHODS:
    raise ValueError(f"{_FIELD}.method={method!r} is not one of {', '.join(METHODS)}")
  if not adv.epsilon > 0:
    raise ValueError(f"{_FIELD}.epsilon={adv.epsilon} must be > 0 (the L2 radius of each "
                     "example's perturbation)")
  if method in ("pgd", "freelb"):
    if int(adv.steps) < 1:
      raise ValueError(f"{_FIELD}.steps={adv.steps} must be >= 1 for {method}")
    if not adv.step_size > 0:
      raise ValueError(f"{_FIELD}.step_size={adv.step_size} must be > 0 for {method}")
  if adv.get("weight", 1.0) < 0:
    raise ValueError(f"{_FIELD}.weight={adv.weight} must be >= 0")
  return adv


def passes(config) -> int:
  """Forward/backward passes of a training step: 1, FGM 2, PGD steps + 1, FreeLB steps."""
  adv = settings(config)
  if adv is None:
    return 1
  return {"fgm": 2, "pgd": int(adv.steps) + 1, "freelb": int(adv.steps)}[adv.method]


def _row_norms(xs):
  """Per-example L2 norm of each array [B, ...] -> [B, 1, ..., 1]."""
  return [jnp.sqrt(jnp.sum(jnp.square(x), axis=tuple(range(1, x.ndim)), keepdims=True))
          for x in xs]


def normalize(grads):
  """g / ||g|| per example (0 where the gradient is 0, e.g. an all-padding row)."""
  return [g / jnp.maximum(n, 1e-12) for g, n in zip(grads, _row_norms(grads))]


def project(deltas, epsilon: float):
  """Each example's perturbation scaled back into the L2 ball of radius epsilon."""
  return [d * jnp.minimum(1.0, epsilon / jnp.maximum(n, 1e-12))
          for d, n in zip(deltas, _row_norms(deltas))]


def ascend(deltas, grads, step_size: float, epsilon: float):
  return project([d + step_size * u for d, u in zip(deltas, normalize(grads))], epsilon)


def _zeros(shapes):
  return jax.tree.map(lambda x: jnp.zeros(x.shape, x.dtype), shapes)


def _add(a, b, scale=1.0):
  return jax.tree.map(lambda x, y: x + scale * y, a, b)


def make_grad_fn(loss_of, adv):
  """loss_of(params, deltas, frozen, batch, rng, row_ids) -> (loss_sum, aux) (the train step's
  loss, jaxft/run/steps.py). Returns grad_fn(params, frozen, batch, rng, row_ids) ->
  ((loss_sum, aux), grads) like jax.value_and_grad(has_aux=True) of the clean loss, with the
  adversarial method's gradient. The loss returned (logged as train/loss) is the clean one
  (FreeLB: the mean over its passes); aux gains "mean/adv_loss" (the last perturbed pass's
  loss for FGM / PGD, FreeLB's mean; logged as train/adv_loss)."""
  method, eps = adv.method, float(adv.epsilon)
  steps, alpha = int(adv.get("steps", 1)), float(adv.get("step_size", eps))
  weight = float(adv.get("weight", 1.0))
  both = jax.value_and_grad(loss_of, argnums=(0, 1), has_aux=True)
  of_params = jax.value_and_grad(loss_of, argnums=0, has_aux=True)
  of_deltas = jax.grad(lambda d, p, *a: loss_of(p, d, *a)[0])

  def grad_fn(params, frozen, batch, rng, row_ids):
    args = (frozen, batch, rng, row_ids)
    shapes = perturb.token_embedding_shapes(
        lambda p, *a: loss_of(p, None, *a), params, *args)
    zeros = [jnp.zeros(s.shape, s.dtype) for s in shapes]
    if method == "freelb":
      return _freelb(params, args, shapes, rng, row_ids)
    (clean, aux), (g_params, g_deltas) = both(params, zeros, *args)
    deltas = project([eps * u for u in normalize(g_deltas)], eps) if method == "fgm" else (
        ascend(zeros, g_deltas, alpha, eps))
    if method == "pgd" and steps > 1:  # a loop, so the step compiles once for any K
      deltas = jax.lax.fori_loop(
          1, steps, lambda _, d: ascend(d, of_deltas(d, params, *args), alpha, eps), deltas)
    (adv_loss, _), g_adv = of_params(params, jax.lax.stop_gradient(deltas), *args)
    aux = {**aux, "mean/adv_loss": adv_loss}
    return (clean, aux), _add(g_params, g_adv, weight)  # the clean loss is what is logged

  def _freelb(params, args, shapes, rng, row_ids):
    # The start is drawn per example (its row in the whole batch), so gradient accumulation
    # draws what the full batch would.
    init = float(adv.get("init", 0.0))
    key = jax.random.fold_in(rng, 0x5EED)
    deltas = []
    for i, s in enumerate(shapes):
      scale = init / jnp.sqrt(jnp.prod(jnp.asarray(s.shape[1:], jnp.float32)))
      draw = jax.vmap(lambda r, i=i, s=s: jax.random.uniform(
          jax.random.fold_in(jax.random.fold_in(key, i), r), s.shape[1:], s.dtype, -1.0, 1.0))
      deltas.append(draw(row_ids) * scale)
    deltas = project(deltas, eps)

    def one_pass(carry, _):
      deltas, loss_sum, aux_sum, grad_sum = carry
      (loss, aux), (g_params, g_deltas) = both(params, jax.lax.stop_gradient(deltas), *args)
      return (ascend(deltas, g_deltas, alpha, eps), loss_sum + loss,
              jax.tree.map(jnp.add, aux_sum, aux), _add(grad_sum, g_params)), None

    (loss, aux), grads = jax.eval_shape(both, params, deltas, *args)
    start = (deltas, *_zeros((loss, aux, grads[0])))
    (_, loss, aux, grads), _ = jax.lax.scan(one_pass, start, length=steps)
    # The mean over the K passes: the loss and its gradient, and aux counts of one pass.
    aux = {k: v / steps for k, v in aux.items()}
    aux["mean/adv_loss"] = loss / steps
    return (loss / steps, aux), jax.tree.map(lambda g: g / steps, grads)

  return grad_fn


def with_deltas(loss_fn):
  """loss_fn(variables, ...) -> loss_of(variables, deltas, ...) with the token embeddings
  perturbed by deltas (None: not perturbed)."""
  def loss_of(variables, deltas, *args, **kwargs):
    if deltas is None:
      return loss_fn(variables, *args, **kwargs)
    with perturb.token_embeddings_plus(deltas):
      return loss_fn(variables, *args, **kwargs)
  return loss_of


def pgd_attack(loss_of, variables, batch, *, epsilon: float, steps: int, step_size: float):
  """The perturbations (one list per token-embedding call) of a PGD attack that maximises
  loss_of(variables, deltas, batch) from 0 within each example's epsilon ball."""
  shapes = perturb.token_embedding_shapes(lambda v, b: loss_of(v, None, b), variables, batch)
  deltas = [jnp.zeros(s.shape, s.dtype) for s in shapes]
  grad = jax.grad(lambda d: loss_of(variables, d, batch)[0])
  return jax.lax.fori_loop(0, steps, lambda _, d: ascend(d, grad(d), step_size, epsilon),
                           deltas)
