"""Elastic weight consolidation (Kirkpatrick et al. 2017) for continual learning
(docs/continual-learning.md): the diagonal empirical Fisher of a finished stage, its file, and
the quadratic penalty a later stage adds to its loss (config.continual.ewc_file / ewc_weight).

    F_i = sum_n m_n (d log p(y_n | x_n) / d theta_i)^2 / sum_n m_n
    penalty = weight / 2 * sum_i F_i (theta_i - anchor_i)^2

over the examples n of the stage (m_n: the batch's example_mask, 0 for padding rows) with their
true labels y_n (the *empirical* Fisher: what the task's loss differentiates, one example at a
time), and anchor = the params the stage ended with. Trees are shaped like variables["params"];
a leaf missing from the Fisher (e.g. frozen by PEFT) is not penalised.
"""

import os

import jax
import jax.numpy as jnp
import numpy as np

from jaxft import trees

FILE = "ewc.npz"


def fisher_diagonal(task, variables, batches, trainable_mask=None) -> dict:
  """The diagonal empirical Fisher over `batches` (the task's eval batches: one example per
  row), as a params-shaped tree of float32 numpy arrays. trainable_mask (params-shaped bools)
  keeps only the leaves it marks True. Per-example gradients come from a jitted scan over a
  batch's rows, so memory holds one gradient and the running sum, never one per row."""
  if getattr(task, "packing", False):
    raise ValueError("the EWC Fisher needs one example per row: set config.data.packing=False "
                     "for the stage it is computed on")
  params = variables["params"]
  rest = {k: v for k, v in variables.items() if k != "params"}

  def example_loss(p, row):
    batch = jax.tree.map(lambda x: x[None], row)
    batch["example_mask"] = jnp.ones((1,), jnp.float32)  # weighted below, not inside the loss
    loss, _ = task.loss({**rest, "params": p}, batch, None, deterministic=True)
    return loss  # -log p(y | x) of this one example

  grad = jax.grad(example_loss)

  @jax.jit
  def batch_sum(p, batch):
    def body(acc, row):
      g = grad(p, row)
      m = row["example_mask"].astype(jnp.float32)
      # where, not m * g^2: a padding row's loss may be NaN (no real token), and 0 * NaN is NaN.
      return jax.tree.map(lambda a, x: a + jnp.where(m > 0, m * jnp.square(
          x.astype(jnp.float32)), 0.0), acc, g), None

    zeros = jax.tree.map(lambda x: jnp.zeros(x.shape, jnp.float32), p)
    acc, _ = jax.lax.scan(body, zeros, batch)
    return acc, jnp.sum(batch["example_mask"].astype(jnp.float32))

  total, weight = None, 0.0
  for batch in batches:
    acc, w = batch_sum(params, batch)
    total = acc if total is None else jax.tree.map(jnp.add, total, acc)
    weight += float(w)
  if total is None or weight <= 0:
    raise ValueError("the EWC Fisher needs at least one real example (example_mask > 0)")
  fisher = jax.tree.map(lambda x: np.asarray(x) / weight, total)
  if trainable_mask is not None:
    fisher, _ = trees.split(fisher, trainable_mask)
  return fisher


def accumulate(previous: dict | None, fisher: dict, anchor: dict) -> dict:
  """The EWC state after one more stage: Fishers summed over all stages so far, anchored at the
  newest stage's params (online EWC, Schwarz et al. 2018, with no decay). Why one anchor rather
  than one penalty per stage (Kirkpatrick et al.'s form): the cost and the file stay one
  Fisher-sized tree however many stages pass, and each later stage starts from the newest
  params, which were themselves held near the older anchors by the penalty."""
  if previous is None:
    return {"fisher": fisher, "anchor": anchor}
  old, new = trees.flat(previous["fisher"]), trees.flat(fisher)
  for path in old.keys() & new.keys():
    if np.shape(old[path]) != np.shape(new[path]):
      raise ValueError(f"EWC Fisher leaf {trees.path_str(path)} has shape "
                       f"{np.shape(new[path])}, but the earlier stages' has {np.shape(old[path])}")
  summed = {p: np.asarray(old.get(p, 0.0)) + np.asarray(new.get(p, 0.0))
            for p in old.keys() | new.keys()}
  return {"fisher": trees.unflat(summed), "anchor": anchor}


def save(path: str, fisher: dict, anchor: dict) -> None:
  """One .npz: keys "fisher/<a/b/c>" and "anchor/<a/b/c>" (flat param paths)."""
  arrays = {f"fisher/{k}": np.asarray(v, np.float32) for k, v in trees.flat_paths(fisher).items()}
  flat_fisher = trees.flat_paths(fisher)
  for k, v in trees.flat_paths(anchor).items():
    if k in flat_fisher:  # only the anchors the penalty reads
      arrays[f"anchor/{k}"] = np.asarray(v, np.float32)
  with open(path + ".tmp", "wb") as f:  # a file object: savez would append .npz to the name
    np.savez(f, **arrays)
  os.replace(path + ".tmp", path)


def load(path: str) -> dict:
  """{"fisher": tree, "anchor": tree} of a file `save` wrote."""
  try:
    with np.load(path) as data:
      flat = {k: data[k] for k in data.files}
  except FileNotFoundError as e:
    raise FileNotFoundError(f"config.continual.ewc_file={path!r} does not exist; give the "
                            f"{FILE} a continual-learning stage wrote, or '' for no EWC") from e
  out = {}
  for part in ("fisher", "anchor"):
    out[part] = trees.unflat_paths({k[len(part) + 1:]: v for k, v in flat.items()
                                    if k.startswith(part + "/")})
  missing = set(trees.flat_paths(out["fisher"])) - set(trees.flat_paths(out["anchor"]))
  if not out["fisher"] or missing:
    raise ValueError(f"config.continual.ewc_file={path!r} is not an EWC file: it needs "
                     f"fisher/ and anchor/ arrays for the same paths (missing anchors: "
                     f"{sorted(missing)[:3]})")
  return out


def penalty(params, ewc: dict, weight) -> jax.Array:
  """weight / 2 * sum_i F_i (theta_i - anchor_i)^2 over the leaves of ewc["fisher"]."""
  flat_params = trees.flat_paths(params)
  anchors = trees.flat_paths(ewc["anchor"])
  total = jnp.zeros((), jnp.float32)
  for path, f in trees.flat_paths(ewc["fisher"]).items():
    if path not in flat_params:
      raise KeyError(f"the EWC file's Fisher has {path}, which the model's params lack: it was "
                     "computed for another architecture (config.continual.ewc_file)")
    d = flat_params[path].astype(jnp.float32) - anchors[path]
    total = total + jnp.sum(f * jnp.square(d))
  return 0.5 * weight * total


def step_inputs(config, lay):
  """(EWC's {"fisher", "anchor"} on the mesh, their shardings) for the train step (jaxft/run/
  steps.py adds `penalty` with them), or (None, None) without config.continual.ewc_file."""
  c = config.get("continual")
  if not c or not c.get("ewc_file") or not c.get("ewc_weight"):
    return None, None
  if float(c.ewc_weight) < 0:
    raise ValueError(f"config.continual.ewc_weight={c.ewc_weight} must be >= 0 (EWC's lambda)")
  state = load(c.ewc_file)
  param_sh = trees.flat_paths(lay.shardings["params"])
  missing = sorted(set(trees.flat_paths(state["fisher"])) - set(param_sh))
  if missing:
    raise ValueError(f"config.continual.ewc_file={c.ewc_file!r} has a Fisher for {missing[:3]}, "
                     "which this model's params lack: it was computed for another "
                     "architecture")
  shardings = {part: trees.unflat_paths({k: param_sh[k] for k in trees.flat_paths(tree)})
               for part, tree in state.items()}
  return jax.device_put(state, shardings), shardings

