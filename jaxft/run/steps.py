"""train_step / eval_step: pure functions of (state, batch). They never know the task.

Losses are sums (over masked tokens, or examples) divided by the task's global "weight" of the
whole step (its token or example count), so gradient accumulation over micro-batches gives the
full-batch gradient (up to float summation order).
"""

import jax
import jax.numpy as jnp
import optax

from jaxft import trees
from jaxft.models import dropout
from jaxft.parallel import sharding
from jaxft.run import adversarial as adversarial_lib
from jaxft.run import distill, ewc
from jaxft.run.state import TrainState

AUX = "_aux"  # reserved key of the train step's `frozen`: inputs that are not the model's


def split_aux(frozen) -> tuple[dict, dict]:
  """(the model's frozen variables, the AUX inputs) of the train step's `frozen` argument."""
  frozen = dict(frozen)
  return frozen, frozen.pop(AUX, {})


def _split_micro(batch, n: int):
  """[B, ...] -> [n, B/n, ...] taking every n-th row, so each micro-batch keeps rows on every
  data-parallel shard (a contiguous split would put each micro-batch on a subset of devices)."""
  def split(x):
    x = x.reshape(x.shape[0] // n, n, *x.shape[1:])
    return jnp.swapaxes(x, 0, 1)
  return jax.tree.map(split, batch)


def gradient_fn(loss_fn, regularizer=None, adversarial=None, penalty=None):
  """grad_fn(params, frozen, batch, rng, row_ids) -> ((loss_sum, aux), grads of params): the
  loss of the variables combine(frozen, params), dropout drawn per example by row_ids.
  `regularizer(variables)` (AdaLoRA's orthogonality penalty) and `penalty(variables, inputs)`
  (EWC's, reading frozen's AUX inputs) add to the mean loss, once per step.
  `adversarial` (config.adversarial, checked): FGM / PGD / FreeLB on the token embeddings
  (jaxft/run/adversarial.py)."""
  perturbed_loss = adversarial_lib.with_deltas(loss_fn)

  def penalties(params, frozen):
    frozen, inputs = split_aux(frozen)
    variables = trees.combine(frozen, params)
    total = 0.0
    if regularizer is not None:
      total = total + regularizer(variables)
    if penalty is not None:
      total = total + penalty(variables, inputs)
    return total

  def data_loss(params, deltas, frozen, batch, rng, row_ids):
    variables = trees.combine(split_aux(frozen)[0], params)
    with dropout.per_example(row_ids):
      return perturbed_loss(variables, deltas, batch, rng, False)

  def loss_of_trainable(params, frozen, batch, rng, row_ids):
    loss_sum, aux = data_loss(params, None, frozen, batch, rng, row_ids)
    # x weight: the step divides the sum by the total weight
    return loss_sum + penalties(params, frozen) * aux["weight"], aux

  if adversarial is None:
    return jax.value_and_grad(loss_of_trainable, has_aux=True)
  # The adversarial passes see the data loss only: a penalty counts once, not once per pass.
  adversarial_grad = adversarial_lib.make_grad_fn(data_loss, adversarial)
  if regularizer is None and penalty is None:
    return adversarial_grad
  penalty_grad = jax.value_and_grad(penalties)

  def grad_fn(params, frozen, batch, rng, row_ids):
    (loss_sum, aux), grads = adversarial_grad(params, frozen, batch, rng, row_ids)
    value, g_penalty = penalty_grad(params, frozen)
    weight = aux["weight"]
    return ((loss_sum + value * weight, aux),
            jax.tree.map(lambda g, p: g + p * weight, grads, g_penalty))

  return grad_fn


def make_train_step(loss_fn, tx: optax.GradientTransformation, schedule, grad_accum_steps: int,
                    regularizer=None, adversarial=None, teacher_logits=None, penalty=None):
  """loss_fn(variables, batch, rng, deterministic) -> (loss_sum, aux sums: 'weight', 'tokens',
  'correct'); see jaxft/tasks/base.py. The step is train_step(state, frozen, batch): gradients
  are taken for state.params (the trainable variables) only; `frozen` completes the variables,
  and its reserved entry AUX (if any) holds inputs that are not the model's (a
  distillation teacher's variables, EWC's Fisher). `regularizer`, `penalty` and
  `adversarial`: see gradient_fn.
  `teacher_logits(aux, frozen, state, batch)` (jaxft/run/distill.py) adds the teacher's logits
  of each (micro-)batch as batch[distill.TEACHER_LOGITS] before the loss reads it: per
  micro-batch, so gradient accumulation bounds the teacher's activations too."""
  loss_grad_fn = gradient_fn(loss_fn, regularizer, adversarial, penalty)

  def grad_fn(params, frozen, batch, rng, row_ids, state):
    if teacher_logits is not None:
      model_frozen, inputs = split_aux(frozen)
      batch = {**batch, distill.TEACHER_LOGITS: teacher_logits(inputs, model_frozen, state,
                                                                batch)}
    return loss_grad_fn(params, frozen, batch, rng, row_ids)

  def train_step(state: TrainState, frozen, batch):
    step_key = jax.random.fold_in(jax.random.wrap_key_data(state.rng), state.step)
    rows = {x.shape[0] for x in jax.tree.leaves(batch)}
    if len(rows) != 1:
      raise ValueError(f"a batch's arrays must share their leading (row) axis; got {rows}")
    rows = rows.pop()
    if grad_accum_steps == 1:
      (loss_sum, aux), grads = grad_fn(state.params, frozen, batch, step_key,
                                       jnp.arange(rows, dtype=jnp.int32), state)
    else:
      # Every micro-batch gets the step key: dropout draws per example (its row in the whole
      # batch), so each example's masks, and the sum of the micro-batches, match the full step.
      def accumulate(carry, xs):
        i, micro = xs
        row_ids = jnp.arange(rows // grad_accum_steps, dtype=jnp.int32) * grad_accum_steps + i
        out = grad_fn(state.params, frozen, micro, step_key, row_ids, state)
        return jax.tree.map(jnp.add, carry, out), None

      micro = _split_micro(batch, grad_accum_steps)
      first = jax.tree.map(lambda x: x[0], micro)
      abstract = jax.eval_shape(grad_fn, state.params, frozen, first, step_key,
                                jnp.zeros((rows // grad_accum_steps,), jnp.int32), state)
      zeros = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), abstract)
      ((loss_sum, aux), grads), _ = jax.lax.scan(
          accumulate, zeros, (jnp.arange(grad_accum_steps), micro))
    weight = jnp.maximum(aux["weight"], 1.0)
    grads = jax.tree.map(lambda g: g / weight, grads)
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    new_state = state.replace(step=state.step + 1, params=optax.apply_updates(state.params,
                                                                              updates),
                              opt_state=opt_state)
    # update_norm catches a NaN/inf that only the update carries (e.g. from the learning rate)
    # before a checkpoint of the broken params could be written.
    metrics = {"loss": loss_sum / weight, "grad_norm": optax.tree.norm(grads),
               "update_norm": optax.tree.norm(updates),
               "lr": schedule(state.step), "tokens": aux["tokens"],
               "accuracy": aux["correct"] / weight}
    # A task's further per-weight means (DPO's margins and log-probs): "mean/x" logs as x.
    metrics.update({k.removeprefix("mean/"): v / weight for k, v in aux.items()
                    if k.startswith("mean/")})
    return new_state, metrics

  return train_step


def jit_steps(task, tx, schedule, config, lay, shardings, mesh, teacher=None, ewc_inputs=None):
  """(train_step, eval_step, batch sharding, frozen-variable shardings), jitted with the
  shardings of everything they take. `teacher` (distill.make_teacher) and `ewc_inputs` (the
  shardings of EWC's {"fisher", "anchor"}): the train step's `frozen` then carries
  distill.aux_inputs(teacher) and {"ewc": ...} under AUX."""
  batch_sh = sharding.batch_sharding(mesh, config.axis_rules)
  _, frozen_sh = lay.split(lay.shardings)
  loss, teacher_logits, step_frozen_sh = task.loss, None, frozen_sh
  if teacher is not None:
    loss = distill.make_loss(task, distill.settings(config))
    if not teacher.cached:  # else the batches carry them
      teacher_logits = teacher.logits_fn(mesh, config.axis_rules)
  aux_sh = distill.aux_inputs(teacher)[1]
  penalty = None
  if ewc_inputs is not None:
    aux_sh = {**aux_sh, "ewc": ewc_inputs}
    weight = float(config.continual.ewc_weight)
    penalty = lambda variables, inputs: ewc.penalty(  # noqa: E731
        variables["params"], inputs["ewc"], weight)
  if aux_sh:
    step_frozen_sh = {**frozen_sh, AUX: aux_sh}
  loss = sharding.constrained(loss, mesh, config.axis_rules)
  eval_outputs = sharding.constrained(task.eval_outputs, mesh, config.axis_rules)
  train_step = jax.jit(
      make_train_step(loss, tx, schedule, config.grad_accum_steps,
                      regularizer=task.peft.regularizer,
                      adversarial=adversarial_lib.settings(config),
                      teacher_logits=teacher_logits, penalty=penalty),
      in_shardings=(shardings, step_frozen_sh, None), out_shardings=(shardings, None),
      donate_argnums=0)
  eval_step = jax.jit(lambda p, f, b: eval_outputs(trees.combine(f, p), b),
                      in_shardings=(shardings.params, frozen_sh, None))
  return train_step, eval_step, batch_sh, frozen_sh
