"""How robust a fine-tuned model is: its metrics on a split clean, under an embedding-space PGD
attack (jaxft/run/adversarial.py: each example's token embeddings moved within an L2 ball of
radius epsilon to raise its loss), and on the split's texts perturbed with character typos or
WordNet synonym swaps at a rate (jaxft/data/perturb.py). What `jaxft.evaluate --robustness`
prints.

The attack needs the labels (it ascends the loss) and runs for any task with a loss; the text
perturbations keep one label per text, so they run for sequence classification only (a typo
would move NER's word-to-token alignment, and QA's answer offsets).
"""

import dataclasses

import jax
import numpy as np

from jaxft.data import perturb as text_perturb
from jaxft.models import perturb
from jaxft.run import adversarial, evaluation

PERTURBATIONS = {"typos": text_perturb.typos, "synonyms": text_perturb.synonym_swap}


@dataclasses.dataclass(frozen=True)
class Checks:
  epsilon: float = 1.0  # the attack's L2 radius per example
  steps: int = 10  # PGD ascents
  step_size: float = 0.0  # 0 = 2.5 * epsilon / steps (Madry et al.'s choice)
  typo_rate: float = 0.1  # fraction of words given a character typo
  synonym_rate: float = 0.2  # fraction of (replaceable) words swapped for a synonym
  seed: int = 0  # the text perturbations' draws

  def __post_init__(self):
    if not self.epsilon > 0 or self.steps < 1:
      raise ValueError(f"the attack needs --attack_epsilon > 0 and --attack_steps >= 1 (got "
                       f"{self.epsilon}, {self.steps})")


def _attacked_outputs(task, checks: Checks):
  """jit(variables, batch) -> the task's eval outputs on the batch under the PGD attack."""
  loss_of = adversarial.with_deltas(lambda v, b: task.loss(v, b, None, True))
  step_size = checks.step_size or 2.5 * checks.epsilon / checks.steps

  @jax.jit
  def attacked(variables, batch):
    deltas = adversarial.pgd_attack(loss_of, variables, batch, epsilon=checks.epsilon,
                                    steps=checks.steps, step_size=step_size)
    with perturb.token_embeddings_plus(deltas):
      return task.eval_outputs(variables, batch)
  return attacked


def perturbed_examples(examples, kind: str, rate: float, seed: int) -> list[dict]:
  """The examples with their texts perturbed; example i draws from (seed, i), so a split's
  perturbed copy is the same on every call."""
  fn = PERTURBATIONS[kind]
  return [{**e, "text": fn(e["text"], rate, np.random.default_rng([seed, i]))}
          for i, e in enumerate(examples)]


def check(task, variables, split: str = "test", checks: Checks = Checks()) -> dict[str, dict]:
  """{"clean" | "pgd" | "typos" | "synonyms": the task's metrics on `split`} (the text rows for
  sequence classification only)."""
  eval_fn = evaluation.single_device_eval(task)
  batches = task.eval_batches(split)
  out = {"clean": task.summarize(evaluation.run_batches(eval_fn, batches, variables), split)}
  attacked = _attacked_outputs(task, checks)
  out["pgd"] = task.summarize([jax.device_get(attacked(variables, b)) for b in batches], split)
  if task.name != "classification":
    return out
  for kind, rate in (("typos", checks.typo_rate), ("synonyms", checks.synonym_rate)):
    examples = perturbed_examples(task.splits[split], kind, rate, checks.seed)
    features = task.complete(task.featurize(examples, split))
    outputs = evaluation.run_batches(eval_fn, task.batches(task.rows(features)), variables)
    out[kind] = task.summarize(outputs, split)
  return out


def format_table(results: dict[str, dict], checks: Checks, metric: str) -> str:
  """One line per condition: the metric, and its change from clean."""
  names = {"clean": "clean",
           "pgd": f"PGD on the embeddings (eps {checks.epsilon:g}, {checks.steps} steps)",
           "typos": f"character typos ({checks.typo_rate:.0%} of words)",
           "synonyms": f"synonym swaps ({checks.synonym_rate:.0%} of words)"}
  clean = results["clean"][metric]
  width = max(len(names[k]) for k in results)
  lines = [f"{'condition':<{width}}  {metric:>9}  {'change':>7}"]
  for k, r in results.items():
    lines.append(f"{names[k]:<{width}}  {r[metric]:>9.4f}  {r[metric] - clean:>+7.4f}")
  return "\n".join(lines)

