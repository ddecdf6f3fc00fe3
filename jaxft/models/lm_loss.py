"""Cross-entropy through the tied LM head without materialising the [B, T, V] logits.

At GPT-2's 50k vocabulary the LM head and its softmax dominate small models: the logits, their
softmax and its gradient are each a [B, T, V] float32 array, and every extra pass over them
(loss, argmax, backward) costs memory traffic, not FLOPs. This computes the loss over chunks of
the sequence and, when differentiated, the gradients of the hidden states and of the embedding
in the same pass (the loss is a sum, so its gradient is known in the forward pass): the
backward only scales them. Matmuls run in the compute dtype with float32 accumulation; the
softmax is float32.
"""

import functools

import jax
import jax.numpy as jnp


def _chunks(x, chunk: int):
  """[B, T, ...] -> [T / chunk, B, chunk, ...]: scan over the sequence, keep batch sharding."""
  b, t = x.shape[:2]
  return jnp.swapaxes(x.reshape(b, t // chunk, chunk, *x.shape[2:]), 0, 1)


def _unchunk(x):
  n, b, c = x.shape[:3]
  return jnp.swapaxes(x, 0, 1).reshape(b, n * c, *x.shape[3:])


def _chunk_size(t: int, chunk: int) -> int:
  chunk = min(chunk, t)
  while t % chunk:  # the largest divisor of T not above the requested size
    chunk -= 1
  return chunk


def _scan(hidden, embedding, targets, mask, chunk: int, with_grads: bool, embedding_grad: bool,
          softcap: float = 0.0):
  dtype = hidden.dtype
  w = embedding.astype(dtype)
  vocab = w.shape[0]

  def body(carry, xs):
    loss, correct, d_wt = carry
    h, t, m = xs  # [B, c, D], [B, c], [B, c]
    logits = jnp.einsum("bcd,vd->bcv", h, w, preferred_element_type=jnp.float32)
    if softcap:  # Gemma 2's final-logit soft-capping: c·tanh(z / c)
      capped = jnp.tanh(logits / softcap)
      logits = capped * softcap
    # One exp pass serves both the log-sum-exp and the softmax of the gradient: on CPU the
    # exp over [B, c, V] costs as much as a matmul. The max doubles as the argmax test.
    top = jax.lax.stop_gradient(jnp.max(logits, axis=-1))
    exp = jnp.exp(logits - top[..., None])
    total = jnp.sum(exp, axis=-1)
    target_logit = jnp.take_along_axis(logits, t[..., None], axis=-1)[..., 0]
    loss += jnp.sum((top + jnp.log(total) - target_logit) * m)
    correct += jnp.sum((target_logit >= top) * m)  # the target is (one of) the argmax
    if not with_grads:
      return (loss, correct, d_wt), None
    # d loss / d logits = (softmax - onehot(target)) * mask, as one fused elementwise pass.
    probs = exp * (1.0 / total)[..., None]
    is_target = jax.lax.broadcasted_iota(jnp.int32, logits.shape, 2) == t[..., None]
    d_logits = jnp.where(is_target, probs - 1.0, probs) * m[..., None]
    if softcap:  # through c·tanh(z / c): times 1 - tanh²
      d_logits = d_logits * (1.0 - capped * capped)
    d_logits = d_logits.astype(dtype)
    d_h = jnp.einsum("bcv,vd->bcd", d_logits, w, preferred_element_type=jnp.float32)
    if not embedding_grad:  # a frozen embedding (PEFT): a third of the head's FLOPs saved
      return (loss, correct, d_wt), d_h.astype(dtype)
    # The embedding's gradient is accumulated transposed, [D, V]: d_logits is then the
    # matmul's right operand in its own layout; as [V, D] = d_logitsᵀ @ h, XLA on CPU
    # recomputed d_logits transposed in every chunk (a second pass over [B, c, V]).
    d_wt += jnp.einsum("bcd,bcv->dv", h, d_logits, preferred_element_type=jnp.float32)
    return (loss, correct, d_wt), d_h.astype(dtype)

  zero = jnp.zeros((), jnp.float32)
  d_wt0 = (jnp.zeros((w.shape[1], vocab), jnp.float32) if with_grads and embedding_grad
           else zero)
  xs = (_chunks(hidden, chunk), _chunks(targets, chunk), _chunks(mask.astype(jnp.float32), chunk))
  (loss, correct, d_wt), d_h = jax.lax.scan(body, (zero, zero, d_wt0), xs)
  d_w = d_wt.T if with_grads and embedding_grad else jnp.zeros_like(embedding, jnp.float32)
  return loss, correct, d_w, (None if d_h is None else _unchunk(d_h))


@functools.partial(jax.custom_vjp, nondiff_argnums=(4, 5, 6))
def _lm_loss(hidden, embedding, targets, mask, chunk, embedding_grad, softcap):
  loss, correct, _, _ = _scan(hidden, embedding, targets, mask, chunk, False, embedding_grad,
                              softcap)
  return loss, correct


def _lm_loss_fwd(hidden, embedding, targets, mask, chunk, embedding_grad, softcap):
  loss, correct, d_w, d_h = _scan(hidden, embedding, targets, mask, chunk, True, embedding_grad,
                                  softcap)
  return (loss, correct), (d_h, d_w.astype(embedding.dtype), targets, mask)


def _lm_loss_bwd(chunk, embedding_grad, softcap, residuals, cotangents):
  del chunk, embedding_grad, softcap
  d_h, d_w, targets, mask = residuals
  g = cotangents[0]  # the correct-count output has no gradient
  return (d_h * g.astype(d_h.dtype), d_w * g.astype(d_w.dtype),
          jnp.zeros(targets.shape, jax.dtypes.float0), jnp.zeros_like(mask))


_lm_loss.defvjp(_lm_loss_fwd, _lm_loss_bwd)


def lm_head_cross_entropy(hidden, embedding, targets, mask, *, chunk: int = 128,
                          embedding_grad: bool = True, softcap: float = 0.0):
  """(sum over masked positions of -log softmax(hidden @ embedding.T)[target],
      count of masked positions whose argmax is the target).

  hidden [B, T, D] (compute dtype), embedding [V, D], targets [B, T] int, mask [B, T].
  `chunk` positions of the sequence are processed at a time (rounded down to divide T).
  `embedding_grad=False` (a frozen embedding) skips the embedding's gradient, whose matmul the
  custom gradient would otherwise compute in the forward pass: its gradient is then zero.
  `softcap` > 0 caps the logits as c·tanh(z / c) first (Gemma 2's final_logit_softcapping).
  """
  return _lm_loss(hidden, embedding, targets.astype(jnp.int32), mask.astype(jnp.float32),
                  _chunk_size(hidden.shape[1], chunk), embedding_grad, float(softcap))
