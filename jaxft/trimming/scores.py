"""Importance of heads, MLP neurons and layers over a calibration set.

The first-order Taylor score of Michel et al. 2019 ("Are Sixteen Heads Really Better than
One?"): a unit's mask m (1 in the model as trained; masks.py) gets the score

    I = sum over calibration examples x of |dL(x) / dm|   at m = 1,

the loss change a first-order expansion predicts for removing the unit, example by example
(absolute values, so units that help some examples and hurt others are not scored as idle).
The masks carry a batch axis, so one backward pass over a batch gives every example's
gradient: the task's loss is a sum over examples (Task.loss), and d(sum)/d m[b] is example b's
own. Layers get the same score for the gate on their residual update.
"""

import jax
import jax.numpy as jnp
import numpy as np

from jaxft.trimming import masks as masks_lib


def _gradient(task, family: masks_lib.Family):
  """jit(d(sum of a batch's losses) / d masks)(masks, params, batch), dropout off."""

  def loss(m, params, batch):
    with masks_lib.applied(m, family):
      total, _ = task.loss({"params": params}, batch, None, deterministic=True)
    return total

  return jax.jit(jax.grad(loss))


def mask_gradients(task, params, batch, family: masks_lib.Family, shape: dict) -> dict:
  """Per-example gradients at masks = 1: {heads [L, B, H], mlp [L, B, F], layers [L, B]}."""
  batch = {k: jnp.asarray(v) for k, v in batch.items()}
  grads = _gradient(task, family)(masks_lib.ones(shape, len(batch["inputs"])), params, batch)
  return {k: np.asarray(v, np.float64) for k, v in jax.device_get(grads).items()}


def importance(task, params, batches, family: masks_lib.Family, shape: dict) -> dict:
  """Taylor scores over `batches` (the calibration set): {heads [L, H], mlp [L, F],
  layers [L]} (numpy float64), each the sum over examples of |gradient|."""
  params = jax.device_put(params, jax.local_devices()[0])
  b0 = len(batches[0]["inputs"]) if batches else 0
  grad = _gradient(task, family)  # one compilation: calibration batches share a shape
  total = None
  for batch in batches:
    batch = {k: jnp.asarray(v) for k, v in batch.items()}
    g = jax.device_get(grad(masks_lib.ones(shape, b0), params, batch))
    # Sum |per-example gradient| over the batch axis (axis 1; layers: [L, B]).
    s = {k: np.abs(np.asarray(v, np.float64)).sum(axis=1) for k, v in g.items()}
    total = s if total is None else {k: total[k] + s[k] for k in s}
  if total is None:
    raise ValueError("the calibration set is empty: give --calib_batches >= 1")
  return total
