"""Direct preference optimisation (DPO, Rafailov et al. 2023) of a causal LM.

Data (jaxft/data/chat_records.py): JSONL of {"prompt", "chosen", "rejected"}, text or message
lists (rendered with the chat template; the completion is what follows the prompt's generation
prompt). A pair's log-probabilities are sums over its completion tokens (the assistant's, with
the end-of-turn token). With beta and label smoothing eps (conservative DPO):

    z = beta * ((log pi(chosen) - log pi(rejected)) - (log ref(chosen) - log ref(rejected)))
    loss = -(1 - eps) * log sigmoid(z) - eps * log sigmoid(-z)

The reference policy is the starting model (config.init_from: an SFT run or a Hugging Face
directory), its log-probabilities computed once before the first step for every pair of every
split and saved in the workdir (dpo_reference.npz): no second copy of the weights is held
during training, whether the run fine-tunes every weight or, with LoRA, trains an adapter that
starts at zero (so the reference is the base without the adapter). Logged: reward accuracy
(the implicit reward beta * (log pi - log ref) of chosen above rejected), margin, chosen and
rejected rewards and log-probabilities; evaluation adds how often the policy itself gives the
chosen answer the higher log-probability (preference accuracy).
"""

import json
import logging
import os

import jax
import jax.numpy as jnp
import numpy as np

from jaxft.data import chat
from jaxft.models.lm_loss import lm_head_cross_entropy
from jaxft.tasks.base import Task
from jaxft.tasks.causal_lm import CausalLM, token_cross_entropy
from jaxft.tasks.labeled import LabeledTask
from jaxft.tasks.sft import encode_text_pair, trim_trailing_whitespace

log = logging.getLogger("jaxft")
REFERENCE_FILE = "dpo_reference.npz"
BEFORE_FILE = "dpo_before_training.json"
_SIDES = ("chosen", "rejected")


def dpo_loss(policy, reference, beta: float, label_smoothing: float = 0.0):
  """Per-pair loss and implicit rewards from (chosen, rejected) sequence log-probs [B] each."""
  rewards = [beta * (p - r) for p, r in zip(policy, reference)]
  z = rewards[0] - rewards[1]
  loss = (-(1 - label_smoothing) * jax.nn.log_sigmoid(z)
          - label_smoothing * jax.nn.log_sigmoid(-z))
  return loss, rewards


def last_runs(mask: list[bool], k: int) -> list[bool]:
  """`mask` with only its last k runs of True kept."""
  out, runs = [False] * len(mask), 0
  for i in range(len(mask) - 1, -1, -1):
    if mask[i]:
      if i + 1 == len(mask) or not mask[i + 1]:
        runs += 1
      if runs > k:
        break
      out[i] = True
  return out


class PreferenceTuning(LabeledTask, CausalLM):
  name = "dpo"
  distillable = False  # its loss compares two sequences with a reference, not one target
  head = "causal_lm"
  kind = "preference"
  generative = True
  batch_keys = ("targets", "loss_mask", "rejected_inputs", "rejected_targets",
                "rejected_loss_mask", "rejected_segment_ids", "ref_chosen", "ref_rejected")
  default_seq_len = 1024
  default_metric = ("reward_accuracy", "max")
  needs_start = True

  def __init__(self, config, labels=None):
    d = config.get("dpo", {})
    self.beta = float(d.get("beta", 0.1))
    self.label_smoothing = float(d.get("label_smoothing", 0.0))
    self.template = d.get("chat_template", "") or ""
    if self.beta <= 0:
      raise ValueError(f"config.dpo.beta={self.beta} must be > 0 (typical: 0.1)")
    if not 0 <= self.label_smoothing < 0.5:
      raise ValueError(f"config.dpo.label_smoothing={self.label_smoothing} must be in [0, 0.5)")
    if config.data.get("packing", False):
      raise ValueError("config.data.packing=True: DPO rows hold one pair each (set it False)")
    self._reference: dict[str, np.ndarray] | None = None  # set by prepare
    super().__init__(config, labels)

  # jaxft.bench times the task's own first training batch (CausalLM's are random text).
  benchmark_batch = Task.benchmark_batch

  # -- features ------------------------------------------------------------------------------

  def _encode(self, example: dict) -> dict[str, tuple[list[int], list[bool]]]:
    """A pair -> {side: (ids of prompt + completion, which ids are the completion's)}."""
    tok, out = self.tokenizer, {}
    if isinstance(example["prompt"], list):
      for side in _SIDES:
        ids, learned = chat.encode_conversation(tok, example["prompt"] + example[side],
                                                template=self.template or None)
        learned = trim_trailing_whitespace(tok, ids, learned)
        # The answer is the last assistant message(s): the prompt's own assistant turns (a
        # multi-turn prompt) are context. Found by the mask's runs rather than by comparing
        # the prompt's ids, which BPE merges across the boundary may change.
        answers = sum(m["role"] == "assistant" for m in example[side])
        out[side] = (ids, last_runs(learned, answers))
      return out
    return {side: encode_text_pair(tok, example["prompt"], example[side]) for side in _SIDES}

  def featurize(self, examples, split: str, with_labels: bool = True):
    del with_labels
    examples, t = list(examples), self.max_len
    n, pad = len(examples), self.tokenizer.eos_id or 0
    out = {"token_types": np.zeros((n, t), np.int32),
           "ref_chosen": np.zeros((n,), np.float32), "ref_rejected": np.zeros((n,), np.float32)}
    for prefix in ("", "rejected_"):
      out.update({f"{prefix}inputs": np.full((n, t), pad, np.int32),
                  f"{prefix}targets": np.full((n, t), pad, np.int32),
                  f"{prefix}loss_mask": np.zeros((n, t), np.float32),
                  f"{prefix}segment_ids": np.zeros((n, t), np.int32)})
    cut = 0
    for i, example in enumerate(examples):
      for side, (ids, learned) in self._encode(example).items():
        prefix = "" if side == "chosen" else "rejected_"
        inputs, targets, mask = ids[:-1], ids[1:], learned[1:]  # predict token j + 1 at j
        if len(inputs) > t:
          cut += 1
          inputs, targets, mask = inputs[:t], targets[:t], mask[:t]
        out[f"{prefix}inputs"][i, :len(inputs)] = inputs
        out[f"{prefix}targets"][i, :len(inputs)] = targets
        out[f"{prefix}loss_mask"][i, :len(inputs)] = mask
        out[f"{prefix}segment_ids"][i, :max(len(inputs), 1)] = 1
    if cut:
      log.warning("%d of the %d %s answers (chosen or rejected) are longer than config.seq_len "
                  "+ 1 = %d tokens and were cut: raise config.seq_len to keep them whole", cut,
                  2 * n, split, t + 1)
    if self._reference is not None:
      out["ref_chosen"] = self._reference[f"{split}_chosen"]
      out["ref_rejected"] = self._reference[f"{split}_rejected"]
    return out

  # -- the model's log-probabilities of both answers ------------------------------------------

  def sequence_logps(self, variables, batch, rng=None, deterministic: bool = True):
    """(chosen, rejected) sums of log p(completion token) [B] each, one forward for both."""
    both = {k: jnp.concatenate([batch[k], batch[f"rejected_{k}"]])
            for k in ("inputs", "targets", "loss_mask", "segment_ids")}
    positions = jnp.concatenate([batch["positions"], batch["positions"]])
    mask = both["loss_mask"].astype(jnp.float32)
    if self.loss_chunk:  # the fused LM head, per row (vmapped): no [2B, T, V] logits
      hidden = self.apply(variables, both["inputs"], positions, both["segment_ids"], rng=rng,
                          deterministic=deterministic, method="hidden")
      embedding = self.model.apply(variables, method="embedding")

      def row(h, t, m):
        nll, _ = lm_head_cross_entropy(h[None], embedding, t[None], m[None],
                                       chunk=self.loss_chunk, embedding_grad=self.embedding_trains,
                                       softcap=self.logit_softcap)
        return -nll
      logps = jax.vmap(row)(hidden, both["targets"], mask)
    else:
      logits = self.apply(variables, both["inputs"], positions, both["segment_ids"], rng=rng,
                          deterministic=deterministic)
      logps = -jnp.sum(token_cross_entropy(logits, both["targets"]) * mask, axis=-1)
    b = batch["inputs"].shape[0]
    return logps[:b], logps[b:]

  def _sums(self, variables, batch, rng, deterministic):
    policy = self.sequence_logps(variables, batch, rng, deterministic)
    reference = (batch["ref_chosen"], batch["ref_rejected"])
    loss, rewards = dpo_loss(policy, reference, self.beta, self.label_smoothing)
    real = batch["example_mask"].astype(jnp.float32)
    tokens = (jnp.sum(batch["segment_ids"] > 0) + jnp.sum(batch["rejected_segment_ids"] > 0))
    s = lambda x: jnp.sum(x * real)  # noqa: E731
    aux = {"weight": jnp.sum(real), "tokens": tokens.astype(jnp.float32),
           "correct": s((rewards[0] > rewards[1]).astype(jnp.float32)),
           "mean/margin": s(rewards[0] - rewards[1]),
           "mean/chosen_reward": s(rewards[0]), "mean/rejected_reward": s(rewards[1]),
           "mean/chosen_logp": s(policy[0]), "mean/rejected_logp": s(policy[1]),
           "mean/preference_accuracy": s((policy[0] > policy[1]).astype(jnp.float32))}
    return s(loss), aux

  def loss(self, variables, batch, rng, deterministic: bool = False):
    return self._sums(variables, batch, rng, deterministic)

  def eval_outputs(self, variables, batch):
    loss_sum, aux = self._sums(variables, batch, None, True)
    return {"loss_sum": loss_sum, **aux}

  def summarize(self, outputs, split: str = "validation") -> dict[str, float]:
    sums = jax.tree.map(lambda *x: float(np.sum(x)), *outputs)
    pairs = max(sums["weight"], 1.0)
    out = {"loss": sums["loss_sum"] / pairs, "reward_accuracy": sums["correct"] / pairs}
    out.update({k.removeprefix("mean/"): v / pairs for k, v in sums.items()
                if k.startswith("mean/")})
    return out

  def head_weights_per_token(self, seq_len: int) -> dict[str, float]:
    return CausalLM.head_weights_per_token(self, seq_len)

  # -- the reference policy -------------------------------------------------------------------

  def prepare(self, workdir: str, variables) -> None:
    """Reference log-probabilities of every pair: computed from `variables` (the starting
    model) and saved in the workdir, or (variables None: a resumed run, or a finished one
    opened for evaluation) read back from it."""
    path = os.path.join(workdir, REFERENCE_FILE)
    if variables is None:
      if not os.path.exists(path):
        raise FileNotFoundError(f"{path} is missing: a DPO run saves its reference policy's "
                                "log-probabilities there before its first step; start the run "
                                "again in a new workdir")
      with np.load(path) as f:
        self._reference = dict(f)
    else:
      fn = jax.jit(lambda v, b: self.sequence_logps(v, b))
      reference = {}
      for split in ("train", "validation", "test"):
        rows = self.device_arrays(self.features(split))
        chosen, rejected = [], []
        for batch in self.batches(rows):
          c, r = fn(variables, batch)
          chosen.append(np.asarray(c))
          rejected.append(np.asarray(r))
        n = len(rows["inputs"])
        reference[f"{split}_chosen"] = np.concatenate(chosen)[:n]
        reference[f"{split}_rejected"] = np.concatenate(rejected)[:n]
      self._reference = reference
      if jax.process_index() == 0:
        np.savez(path, **reference)
    self._features.clear()  # featurised again, now with the reference columns

  # -- inference commands ---------------------------------------------------------------------

  def prediction_inputs(self, records):
    raise ValueError("a DPO run answers with jaxft.generate, not jaxft.predict")

  def predictions(self, examples, features, outputs):
    raise ValueError("a DPO run answers with jaxft.generate, not jaxft.predict")

  def _validation(self, variables) -> dict[str, float]:
    fn = jax.jit(self.eval_outputs)
    return self.summarize([jax.device_get(fn(variables, b)) for b in self.eval_batches()])

  def before_training(self, workdir: str, variables) -> None:
    val = self._validation(variables)
    with open(os.path.join(workdir, BEFORE_FILE), "w") as f:
      json.dump(val, f, indent=2)
    print(f"before training (policy = reference): validation preference accuracy "
          f"{val['preference_accuracy']:.3f}, reward accuracy {val['reward_accuracy']:.3f}")

  def finish(self, workdir, variables, val, eval_batches) -> None:
    print("validation: " + ", ".join(f"{k} {v:.4f}" for k, v in val.items()))
    before_file = os.path.join(workdir, BEFORE_FILE)
    if os.path.exists(before_file):
      with open(before_file) as f:
        before = json.load(f)
      print(f"reward accuracy {before['reward_accuracy']:.3f} -> {val['reward_accuracy']:.3f}, "
            f"preference accuracy (the policy's own log-probs) "
            f"{before['preference_accuracy']:.3f} -> {val['preference_accuracy']:.3f} on "
            "held-out validation pairs")
