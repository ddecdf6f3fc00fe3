"""Knowledge distillation (config.distill, docs/distillation.md): a student trains on

    alpha * CE(labels) + (1 - alpha) * T^2 * KL(softmax(teacher / T) || softmax(student / T))

(Hinton et al. 2015; the T^2 keeps the soft term's gradients on the scale of the hard one's as T
grows), per distribution of the task's `distill_view`: one per example (classification), token
(NER, causal LM, SFT) or answer end (QA), weighted so the KD term is a mean over the same count
as the loss.

The teacher is another run (a jaxft workdir or a Hugging Face directory with the same tokenizer
and label set) or, for self-distillation, an exponential moving average of the student itself
(kept in the optimizer state: checkpointed, sharded like the params, resumed bit-exactly). Its
logits are computed inside the train step, frozen (no gradient) and sharded like the student's
activations, and reach the loss as the batch entry TEACHER_LOGITS, so gradient accumulation and
adversarial training see them like any other input. The teacher's variables travel to the step
beside the frozen variables, under the reserved key steps.AUX (see jaxft/run/steps.py).
"""

import dataclasses
import os

import jax
import jax.numpy as jnp
import numpy as np

from jaxft import tasks, trees
from jaxft.data.tokenizer import load_tokenizer
from jaxft.parallel import sharding
from jaxft.run import loader, optim
from jaxft.run import state as state_lib

TEACHER_LOGITS = "teacher_logits"  # the batch entry the distillation loss reads
CACHE_FILE = "teacher_logits.npy"  # config.distill.cache: the training rows' teacher logits
_LM_TASKS = ("causal_lm", "sft")  # a causal LM's next-token distributions, whatever its data


@dataclasses.dataclass(frozen=True)
class Settings:
  teacher: str  # a run directory ("" = self-distillation from the EMA)
  alpha: float
  temperature: float
  ema_decay: float
  cache: bool = False  # the teacher's logits of the training rows computed once, saved


def settings(config) -> Settings | None:
  """config.distill, checked; None when distillation is off."""
  d = config.get("distill")
  if d is None or (not d.get("teacher") and not d.get("ema_decay")):
    return None
  s = Settings(str(d.teacher or ""), float(d.alpha), float(d.temperature), float(d.ema_decay),
               bool(d.get("cache", False)))
  if s.teacher and s.ema_decay:
    raise ValueError(f"config.distill.teacher={s.teacher!r} and config.distill.ema_decay="
                     f"{s.ema_decay} both set: a teacher run, or self-distillation from the "
                     "student's moving average; set the other to ''/0")
  if not 0.0 <= s.alpha <= 1.0:
    raise ValueError(f"config.distill.alpha={s.alpha} must lie in [0, 1] (the weight of the "
                     "labels' cross-entropy; 1 - alpha weighs the teacher's KL)")
  if s.temperature <= 0:
    raise ValueError(f"config.distill.temperature={s.temperature} must be > 0 (1 = the "
                     "softmax itself; 2-4 is usual)")
  if s.cache and s.ema_decay:
    raise ValueError("config.distill.cache=True with config.distill.ema_decay: the moving "
                     "average changes every step, so its logits cannot be cached; set "
                     "cache=False")
  if s.ema_decay and not 0.0 < s.ema_decay < 1.0:
    raise ValueError(f"config.distill.ema_decay={s.ema_decay} must lie in (0, 1), e.g. 0.999")
  return s


def kl_sum(teacher_logits, student_logits, weights, temperature: float):
  """sum over distributions of weight * KL(softmax(t / T) || softmax(s / T)), in float32."""
  t = jax.nn.log_softmax(teacher_logits.astype(jnp.float32) / temperature, axis=-1)
  s = jax.nn.log_softmax(student_logits.astype(jnp.float32) / temperature, axis=-1)
  kl = jnp.sum(jnp.exp(t) * (t - s), axis=-1)
  return jnp.sum(kl * weights)


def make_loss(task, s: Settings):
  """The student's loss(variables, batch, rng, deterministic) -> (sum, aux) with the KD term;
  aux adds "mean/ce" and "mean/kd" (logged as ce and kd: the two terms' per-weight means)."""
  def loss(variables, batch, rng, deterministic: bool = False):
    outputs = task.outputs(variables, batch, rng, deterministic)
    ce_sum, aux = task.loss_from_outputs(outputs, batch)
    student, weights = task.distill_view(outputs, batch)
    kd_sum = s.temperature ** 2 * kl_sum(batch[TEACHER_LOGITS], student, weights,
                                         s.temperature)
    total = s.alpha * ce_sum + (1.0 - s.alpha) * kd_sum
    return total, {**aux, "mean/ce": ce_sum, "mean/kd": kd_sum}
  return loss


@dataclasses.dataclass
class Teacher:
  """The teacher's task (its model over the student's batches) and variables on the mesh
  (None: the student's EMA, read from the optimizer state in the step)."""

  task: object
  variables: dict | None
  permutation: np.ndarray | None  # teacher class index of each student class
  shardings: dict | None
  cached: bool = False  # the batches carry the logits (cache_logits): the step runs no teacher

  def logits_fn(self, mesh, axis_rules):
    """fn(aux inputs, the student's frozen variables, its train state, batch) -> the teacher's
    distill_view logits, frozen: the teacher run's variables, or the student's EMA params."""
    outputs = sharding.constrained(self.task.outputs, mesh, axis_rules)
    view, perm = self.task.distill_view, self.permutation
    own = self.variables is None and not self.cached

    def fn(aux, frozen, state, batch):
      variables = (trees.combine(frozen, optim.ema_params(state.opt_state)) if own
                   else aux["teacher"])
      logits, _ = view(outputs(variables, batch), batch)
      if perm is not None:
        logits = jnp.take(logits, jnp.asarray(perm), axis=-1)
      return jax.lax.stop_gradient(logits)
    return fn


def make_teacher(config, student, mesh) -> Teacher | None:
  """The teacher of config.distill for the `student` task, checked and on the mesh."""
  s = settings(config)
  if s is None:
    return None
  if not student.distillable:
    raise ValueError(f"config.distill is set but the {student.name} task does not distil; "
                     "distillation trains classification, token_classification, "
                     "question_answering, causal_lm and sft students")
  if not s.teacher:  # self-distillation: the student's own model over its EMA
    return Teacher(student, None, None, None)
  run = loader.open_run(s.teacher)
  _check_compatible(s.teacher, run, student, config)
  variables, peft_config = run.variables, run.config.get("peft")
  if run.task.peft.name == "lora":  # folded in: the teacher runs as a plain model
    variables, peft_config = run.task.peft.merge(variables), None
  teacher_config = config.copy_and_resolve_references()
  with teacher_config.unlocked():
    teacher_config.model = run.config.model
    teacher_config.peft = peft_config or {"method": "none"}
    teacher_config.distill = {"teacher": "", "ema_decay": 0.0}
    teacher_config.adversarial = {"method": "none"}
  task = tasks.make_task(teacher_config, labels=run.labels)
  lay = state_lib.layout(task, config.seq_len, mesh, config.axis_rules)
  host = jax.device_get(variables)
  variables = jax.device_put(host, lay.shardings)
  perm = None
  if student.labels and list(student.labels) != list(run.labels):
    perm = np.asarray([list(run.labels).index(name) for name in student.labels], np.int32)
  return Teacher(task, variables, perm, lay.shardings)


def _check_compatible(path: str, run, student, config) -> None:
  same_kind = run.task.name == student.name or (run.task.name in _LM_TASKS
                                                  and student.name in _LM_TASKS)
  if not same_kind or not run.task.distillable:
    raise ValueError(f"config.distill.teacher={path!r} is a {run.task.name} model; the "
                     f"{student.name} student needs a {student.name} teacher (the same "
                     "outputs to match)")
  if student.labels and sorted(student.labels) != sorted(run.labels or []):
    raise ValueError(f"config.distill.teacher={path!r} predicts the labels {run.labels}; the "
                     f"student's are {student.labels}: teacher and student need the same label "
                     "set (the order may differ)")
  model = run.config.model
  context = model.get("n_positions") or model.get("max_position_embeddings")
  if context and config.seq_len > context:
    raise ValueError(f"config.distill.teacher={path!r} reads at most {context} positions; the "
                     f"student's rows have config.seq_len={config.seq_len}: lower seq_len")
  t_vocab, s_vocab = run.config.model.vocab_size, config.model.vocab_size
  if student.name in _LM_TASKS and t_vocab != s_vocab:
    raise ValueError(f"config.distill.teacher={path!r} has vocab_size {t_vocab}, the student "
                     f"{s_vocab}: their next-token distributions must cover the same tokens")
  if run.tokenizer().spec() != load_tokenizer(config.data.get("tokenizer") or None).spec():
    raise ValueError(f"config.distill.teacher={path!r} tokenizes with "
                     f"{run.config.data.get('tokenizer') or 'GPT-2 BPE'}, the student with "
                     f"{config.data.get('tokenizer') or 'GPT-2 BPE'}: they must share a "
                     "tokenizer (the teacher reads the student's token ids)")


def cache_logits(teacher: Teacher, student, workdir: str, resuming: bool, mesh,
                 axis_rules) -> None:
  """config.distill.cache: the teacher's logits of every training example, computed once
  before the first step and saved in the workdir (read back on resume), become a column of
  the student's training rows; the step then runs no teacher."""
  if student.name in _LM_TASKS or not hasattr(student, "add_train_columns"):
    raise ValueError(f"config.distill.cache=True: a {student.name} student's cache would hold "
                     "[tokens x vocabulary] logits per example (or its rows stream); set "
                     "config.distill.cache=False (the teacher runs in the step)")
  if student.packing or student.augmenter:
    raise ValueError("config.distill.cache=True needs one unaugmented example per row: set "
                     "config.data.packing=False and config.augment.method='none', or "
                     "config.distill.cache=False")
  path = os.path.join(workdir, CACHE_FILE)
  n = len(student.features("train")["inputs"])
  if resuming and os.path.exists(path):
    logits = np.load(path)
  else:  # replicated: every process gets every row's logits
    fn = jax.jit(teacher.logits_fn(mesh, axis_rules), out_shardings=sharding.replicated(mesh))
    rows = student.device_arrays(student.features("train"))
    logits = np.concatenate([np.asarray(fn({"teacher": teacher.variables}, {}, None, batch))
                             for batch in student.batches(rows)])[:n]
    if jax.process_index() == 0:
      with open(path + ".tmp", "wb") as f:  # a file object: np.save would add .npy
        np.save(f, logits)
      os.replace(path + ".tmp", path)
  if len(logits) != n:
    raise ValueError(f"{path} holds teacher logits of {len(logits)} training examples, the data "
                     f"has {n}: the data changed since; delete the file to compute it again")
  student.add_train_columns({TEACHER_LOGITS: logits})
  teacher.cached, teacher.variables, teacher.shardings = True, None, None


def aux_inputs(teacher: Teacher | None) -> tuple[dict, dict]:
  """(the step's AUX entries, their shardings): the teacher's variables when it has any."""
  if teacher is None or teacher.variables is None:
    return {}, {}
  return {"teacher": teacher.variables}, {"teacher": teacher.shardings}
