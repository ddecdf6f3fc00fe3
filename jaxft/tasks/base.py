"""The interface every task implements: the train loop (jaxft/training/), the steps
(jaxft/run/steps.py), evaluation and the inference commands call nothing else of a task, and
never ask which task it is; what differs between tasks is a method or a declared capability.

Model calls go through `init` / `apply`, which carry the PEFT method of config.peft
(jaxft/peft/): a task never knows which one it is.
"""

import abc

import jax.numpy as jnp
import ml_collections

from jaxft import peft
from jaxft.models import flops
from jaxft.models.registry import build_model, hf_architecture


class Task(abc.ABC):
  name = ""  # config.task, and the head the model registry builds (jaxft/models/registry.py)
  head = ""  # the model head when it is not `name` (SFT and DPO train a causal LM)
  # Early stopping default: (metric, "max" | "min"); config.early_stopping.metric overrides.
  default_metric = ("loss", "min")
  has_labels = False
  # Regex of the head's params (within "params"): trained even when PEFT freezes the backbone.
  trainable_head = ""
  # Capabilities the inference commands check instead of a task's name:
  generative = False  # a causal LM: jaxft.generate and prompt scoring accept it
  prediction_fields: tuple[str, ...] = ()  # jaxft.predict: the string fields of an input record
  # Library defaults where a config has none (opening a Hugging Face directory): the config.data
  # fields the task reads, and the row length (0 = the model's context).
  data_defaults: dict = {}
  default_seq_len = 0
  needs_start = False  # `prepare` derives data from the starting model (DPO's reference)
  distillable = False  # implements outputs / loss_from_outputs / distill_view (config.distill)

  def __init__(self, config: ml_collections.ConfigDict, labels: list[str] | None = None):
    self.config = config
    self.labels = labels
    num_labels = len(labels) if labels else 0
    head = self.head or self.name
    self.model, self.model_cfg = build_model(config.model, head, num_labels)
    self.architecture = hf_architecture(config.model.get("family", "gpt2"), head, config.model)
    self.peft = peft.make(config.get("peft"))
    self.peft.check_layout(bool(config.model.get("scan_layers", False)))

  # -- what the train loop calls ----------------------------------------------------------------

  @abc.abstractmethod
  def loss(self, variables, batch, rng, deterministic: bool = False):
    """(sum of losses, aux sums): aux has "weight" (what the loss sum is divided by: tokens,
    examples; the step divides by the global weight, so gradient accumulation is exact),
    "tokens" (real input tokens, for tokens/s) and "correct" (accuracy numerator over weight)."""

  @abc.abstractmethod
  def train_iterator(self, seed: int, process_index: int = 0, process_count: int = 1):
    """Endless checkpointable grain iterator of this process's rows of each global batch."""

  @abc.abstractmethod
  def eval_batches(self, split: str = "validation", process_index: int = 0,
                   process_count: int = 1) -> list[dict]:
    """Fixed-shape batches of a split, the same every call."""

  @abc.abstractmethod
  def eval_outputs(self, variables, batch) -> dict:
    """Jitted per evaluation batch; the host collects the outputs for `summarize`/`report`."""

  @abc.abstractmethod
  def summarize(self, outputs, split: str = "validation") -> dict[str, float]:
    """{metric: value} of one evaluation pass."""

  def num_train_examples(self) -> int | None:
    """Rows of one training epoch (None: a stream without epochs, e.g. packed LM text)."""
    return None

  def head_weights_per_token(self, seq_len: int) -> dict[str, float]:
    """{parameter path: matmul weights one token of a [seq_len] row pays for} of the head (an
    LM head's d·V; a per-example head's weights over the row length): the paths say which
    the PEFT method trains (`trainable_head`). See jaxft/models/flops.py."""
    del seq_len
    return {}

  def flops_per_token(self, seq_len: int) -> float:
    """Model FLOPs of one trained token (MaxText's convention: jaxft/models/flops.py)."""
    trained = frozen = 0.0
    for path, weights in self.head_weights_per_token(seq_len).items():
      if self.peft.trains(path, self.trainable_head):
        trained += weights
      else:
        frozen += weights
    return flops.training_flops_per_token(self.model_cfg.flops_backbone, seq_len, trained,
                                          frozen, frozen_base=self.peft.name != "none")

  def init(self, rng, seq_len: int):
    tokens = jnp.zeros((1, seq_len), jnp.int32)
    return self.init_model(rng, tokens, jnp.ones_like(tokens))

  def init_model(self, rng, *args, **kwargs):
    """model.init with the PEFT method's parameters created alongside the model's."""
    with self.peft.active():
      variables = self.model.init(rng, *args, **kwargs)
    self.peft.check_initialized(variables)
    return variables

  def apply(self, variables, *args, rng=None, deterministic: bool = True, **kwargs):
    """model.apply with the PEFT method; rng feeds dropout when not deterministic."""
    with self.peft.active(deterministic):
      return self.model.apply(variables, *args, deterministic=deterministic,
                              rngs=None if deterministic else {"dropout": rng}, **kwargs)

  def report_split(self) -> str | None:
    """The held-out split scored (with the best params) and reported at the end of training."""
    return None

  def report(self, outputs, split: str) -> tuple[str, dict]:
    """(printable table, JSON-able dict) of one evaluation pass; default: the summary."""
    summary = self.summarize(outputs, split)
    return "\n".join(f"{k}: {v:.4f}" for k, v in summary.items()), summary

  def finish(self, workdir: str, variables, val: dict, eval_batches) -> None:
    """End of training (process 0): print what a user wants to see (default: nothing more
    than the loop has logged)."""
    del workdir, variables, val, eval_batches

  def prepare(self, workdir: str, variables) -> None:
    """Before the data is read for training or evaluation (every process): what the task
    derives from the starting model (`variables`, a new run) or saved in `workdir` (None: a
    resumed or finished run). Default: nothing. Tasks that need it set needs_start = True."""
    del workdir, variables

  def before_training(self, workdir: str, variables) -> None:
    """Start of a new run (process 0, step 0, the starting variables on the host): measure
    what `finish` compares the trained model with (default: nothing)."""
    del workdir, variables

  def benchmark_batch(self, seed: int = 0) -> dict:
    """A training batch for jaxft.bench: the first of the task's own training data (its loss
    needs real labels); causal LM overrides it with random tokens (the step's time alone)."""
    return next(self.train_iterator(seed))

  def hf_inputs(self, batch: dict) -> dict:
    """A training batch as the keyword arguments (numpy) of the task's transformers model, its
    loss included: the peer jaxft.bench --torch times on the same batch."""
    out = {"input_ids": batch["inputs"], "attention_mask": batch["segment_ids"] > 0}
    if self.config.model.get("family", "gpt2") == "bert":
      out["token_type_ids"] = batch["token_types"]
    return {**out, **self.hf_labels(batch)}

  def hf_labels(self, batch: dict) -> dict:
    """The label keyword arguments of the transformers peer's loss."""
    raise NotImplementedError(f"the {self.name} task has no transformers peer for --torch")

  # -- knowledge distillation (jaxft/run/distill.py) --------------------------------------------
  # A task that implements these three trains with config.distill: the loss is then
  # loss_from_outputs(outputs(...)) plus the KL between the teacher's and the student's
  # distill_view of the same batch, so the student's forward pass is shared by both terms.

  def outputs(self, variables, batch, rng=None, deterministic: bool = True):
    """The model outputs the loss reads (logits; QA's start and end logits)."""
    raise NotImplementedError(f"the {self.name} task does not support distillation")

  def loss_from_outputs(self, outputs, batch):
    """`loss` given `outputs(variables, batch, ...)`: (loss sum, aux sums)."""
    raise NotImplementedError(f"the {self.name} task does not support distillation")

  def distill_view(self, outputs, batch):
    """(logits [B, ..., C], weights [B, ...]): the distributions a teacher and its student
    compare, one per example, token or answer end, with weights that sum to the loss's
    "weight" (so the KD term is a mean over the same count as the loss)."""
    raise NotImplementedError(f"the {self.name} task does not support distillation")

  # -- jaxft.predict (tasks with prediction_fields) ---------------------------------------------

  def prediction_inputs(self, records: list[dict]) -> list[dict]:
    """Raw input records -> examples."""
    raise NotImplementedError(f"the {self.name} task does not serve jaxft.predict")

  def prediction_features(self, examples: list[dict]) -> dict:
    """Examples -> featurised arrays (incl. what `predictions` reads back)."""
    raise NotImplementedError(f"the {self.name} task does not serve jaxft.predict")

  def prediction_batches(self, features: dict) -> list[dict]:
    raise NotImplementedError(f"the {self.name} task does not serve jaxft.predict")

  def predictions(self, examples, features, outputs) -> list[dict]:
    """One JSON-able prediction per example, from eval_outputs over `features`."""
    raise NotImplementedError(f"the {self.name} task does not serve jaxft.predict")
