"""Extractive QA (SQuAD v1.1 / v2.0): start/end logits over context tokens.

Long contexts are cut into doc-stride windows (jaxft/data/qa_features.py); training rows are
windows, labelled with the answer's token span, or [CLS] when the answer is not inside the
window. Evaluation scores every window, picks each question's best span across its windows,
maps it back to characters of the original context and scores it with the official SQuAD EM/F1
against all gold answers.
"""

import jax.numpy as jnp
import numpy as np

from jaxft.data import qa_features
from jaxft.models import heads
from jaxft.tasks import metrics
from jaxft.tasks.classification import cross_entropy
from jaxft.tasks.labeled import LabeledTask


class QuestionAnswering(LabeledTask):
  name = "question_answering"
  distillable = True
  trainable_head = r"^qa_outputs/"
  kind = "qa"
  default_metric = ("f1", "max")
  batch_keys = ("start_positions", "end_positions")  # per window: into a packed row's slots
  per_token_outputs = ("start", "end")
  prediction_fields = ("question", "context")
  default_seq_len = 384
  # configs/finetune.py's values (for a Hugging Face directory opened without a config).
  data_defaults = {"doc_stride": 128, "max_question_len": 64, "max_answer_len": 30,
                   "version_2_with_negative": False}

  def head_weights_per_token(self, seq_len: int) -> dict[str, float]:
    return {"qa_outputs/kernel": 2 * self.model_cfg.flops_backbone.width}  # start, end logits

  def featurize(self, examples, split: str, with_labels: bool = True):
    d = self.config.data
    out = qa_features.featurize_qa(list(examples), self.tokenizer, self.max_len,
                                   doc_stride=int(d.doc_stride),
                                   max_question_len=int(d.max_question_len), train=with_labels)
    for key in self.batch_keys:  # unlabelled questions: the loss terms are ignored
      out.setdefault(key, np.zeros((len(out["inputs"]),), np.int32))
    return out

  def hf_labels(self, batch):
    return {"start_positions": batch["start_positions"], "end_positions": batch["end_positions"]}

  def prediction_inputs(self, records):
    return [{"id": str(r.get("id", i)), "question": r["question"], "context": r["context"]}
            for i, r in enumerate(records)]

  def predictions(self, examples, features, outputs):
    answers = self._answers(examples, features, outputs)
    return [{"id": e["id"], "question": e["question"], "answer": answers[e["id"]]["text"],
             "start": answers[e["id"]]["start"], "end": answers[e["id"]]["end"],
             "score": answers[e["id"]]["score"]} for e in examples]

  def _answers(self, examples, features, outputs) -> dict[str, dict]:
    n = len(features["inputs"])
    # Padding positions never compete for the n-best (HF's postprocess lets their logits in):
    # answers depend on a window's real tokens only, so packed and padded rows agree.
    padding = features["segment_ids"] == 0
    start, end = (np.where(padding, -np.inf, self.gather(outputs, key, n))
                  for key in ("start", "end"))
    return qa_features.postprocess_qa(
        examples, features, start, end,
        max_answer_len=int(self.config.data.max_answer_len),
        version_2=bool(self.config.data.version_2_with_negative))

  def _per_window(self, start, end, batch):
    """(start logits, end logits, start targets, end targets) of each window: [B, T] logits
    and [B] targets, or, packed, [B, slots, T] logits masked to each slot's segment and the
    targets moved by the segment's first position in the row."""
    if not self.packing:
      return start, end, batch["start_positions"], batch["end_positions"]
    seg = batch["segment_ids"]
    in_segment = heads.segment_masks(seg, self.slots)  # [B, K, T]
    first = heads.segment_token_index(seg, self.slots, last=False)  # [B, K]
    masked = lambda x: jnp.where(in_segment, x[:, None, :], -1e9)  # noqa: E731
    return (masked(start), masked(end), first + batch["start_positions"],
            first + batch["end_positions"])

  def _loss_terms(self, start, end, batch):
    """(loss sum, correct sum): HF's BertForQuestionAnswering loss, the mean of the start and
    end cross-entropies of each window; correct = both ends right."""
    start, end, start_at, end_at = self._per_window(start, end, batch)
    mask = batch["example_mask"]
    per_window = 0.5 * (cross_entropy(start, start_at) + cross_entropy(end, end_at))
    correct = ((jnp.argmax(start, -1) == start_at)
               & (jnp.argmax(end, -1) == end_at)).astype(jnp.float32)
    return jnp.sum(per_window * mask), jnp.sum(correct * mask)

  def loss(self, variables, batch, rng, deterministic: bool = False):
    return self.loss_from_outputs(self.logits(variables, batch, rng, deterministic), batch)

  def outputs(self, variables, batch, rng=None, deterministic: bool = True):
    return self.logits(variables, batch, rng, deterministic)

  def distill_view(self, outputs, batch):
    """The start and end distributions of each window (packed: of each slot's window), each
    weighing half an example, as the loss's mean of the two cross-entropies does."""
    start, end, _, _ = self._per_window(*outputs, batch)
    view = jnp.stack([start, end], axis=-2).astype(jnp.float32)  # [B, (K,) 2, T]
    weights = 0.5 * batch["example_mask"].astype(jnp.float32)
    return view, jnp.stack([weights, weights], axis=-1)

  def loss_from_outputs(self, outputs, batch):
    start, end = outputs
    loss_sum, correct = self._loss_terms(start, end, batch)
    return loss_sum, {"weight": jnp.sum(batch["example_mask"]),
                      "tokens": jnp.sum(batch["segment_ids"] > 0), "correct": correct}

  def eval_outputs(self, variables, batch):
    start, end = self.logits(variables, batch)
    return {"start": start, "end": end, "loss_sum": self._loss_terms(start, end, batch)[0],
            "weight": jnp.sum(batch["example_mask"]), **self.packed_outputs(batch)}

  def _scores(self, outputs, split):
    examples = list(self.splits[split])
    answers = self._answers(examples, self.features(split), outputs)
    predicted = {k: v["text"] for k, v in answers.items()}
    return metrics.squad_scores(predicted, qa_features.references(examples))

  def summarize(self, outputs, split: str = "validation") -> dict[str, float]:
    scores = self._scores(outputs, split)
    return {"loss": self.mean_loss(outputs), "exact_match": scores["exact_match"],
            "f1": scores["f1"]}

  def report(self, outputs, split: str):
    scores = self._scores(outputs, split)
    scores["loss"] = self.mean_loss(outputs)
    return "\n".join(f"{k}: {v:.4f}" if isinstance(v, float) else f"{k}: {v}"
                     for k, v in scores.items()), scores
