"""Token classification (NER): one BIO tag per word, predicted at the word's first sub-token.

Words are tokenised as pre-split words (the tokenizer's `is_pretokenized` mode), so each
sub-token knows its word; only a word's first sub-token carries a label (the rest, [CLS], [SEP]
and padding are masked out of the loss), as in BERT's CoNLL-2003 recipe. Scoring is at word
level with conlleval semantics (jaxft/tasks/metrics.py): a word cut off by seq_len is predicted "O"
and still counts, so the score is over every gold entity of the split.
"""

import re

import jax.numpy as jnp
import numpy as np

from jaxft.tasks import metrics
from jaxft.tasks.classification import cross_entropy, pad_encodings
from jaxft.tasks.labeled import LabeledTask

OUTSIDE = "O"


def encode_words(tokenizer, sentences: list[list[str]], max_len: int) -> dict[str, np.ndarray]:
  """Pre-split words -> inputs / segment_ids / token_types [N, T] and first_token [N, T]: the
  word index at a word's first sub-token, -1 elsewhere."""
  encodings = tokenizer.private_copy(max_len).encode_batch(
      sentences, is_pretokenized=True, add_special_tokens=True)
  out = pad_encodings(encodings, max_len, tokenizer.special_id("pad_token"))
  out["first_token"] = np.full((len(sentences), max_len), -1, np.int32)
  for i, e in enumerate(encodings):
    previous = None
    for t, w in enumerate(e.word_ids):
      if w is not None and w != previous:
        out["first_token"][i, t] = w
      previous = w
  return out


def word_tags(first_token: np.ndarray, predictions: np.ndarray, n_words: int,
              labels: list[str]) -> list[str]:
  """A row's predicted tag ids at first sub-tokens -> one tag per word ("O" if truncated)."""
  tags = [OUTSIDE] * n_words
  for t in np.nonzero(first_token >= 0)[0]:
    tags[first_token[t]] = labels[predictions[t]]
  return tags


class TokenClassification(LabeledTask):
  name = "token_classification"
  distillable = True
  trainable_head = r"^classifier/"
  kind = "ner"
  has_labels = True
  default_metric = ("f1", "max")
  batch_keys = ("labels", "label_mask")
  token_batch_keys = batch_keys  # packed rows carry them along the tokens
  per_token_outputs = ("predictions",)
  prediction_fields = ("text",)

  def head_weights_per_token(self, seq_len: int) -> dict[str, float]:
    return {"classifier/kernel": self.model_cfg.flops_backbone.width * len(self.labels)}

  def label_values(self, example):
    return example["tags"]

  def featurize(self, examples, split: str, with_labels: bool = True):
    examples = list(examples)
    out = encode_words(self.tokenizer, [e["tokens"] for e in examples], self.max_len)
    out["labels"] = np.zeros_like(out["inputs"])
    out["label_mask"] = (out["first_token"] >= 0).astype(np.float32)
    if with_labels:
      for i, e in enumerate(examples):
        ids = [self.label_id(tag, split, i) for tag in e["tags"]]
        first = out["first_token"][i]
        out["labels"][i] = np.where(first >= 0, np.asarray(ids + [0])[first], 0)
    return out

  def hf_labels(self, batch):
    return {"labels": np.where(batch["label_mask"] > 0, batch["labels"], -100)}

  def prediction_inputs(self, records):
    """Raw text -> words split at whitespace (as WNUT / CoNLL text is), with their character
    spans so that predicted entities map back onto the text."""
    examples = []
    for r in records:
      words = list(re.finditer(r"\S+", r["text"]))
      examples.append({"text": r["text"], "tokens": [w.group() for w in words],
                       "spans": [w.span() for w in words]})
    return examples

  def predictions(self, examples, features, outputs):
    predicted = self.gather(outputs, "predictions", len(examples))
    rows = []
    for i, e in enumerate(examples):
      tags = word_tags(features["first_token"][i], predicted[i], len(e["tokens"]), self.labels)
      entities = []
      for kind, start, end in metrics.extract_entities(tags):
        a, b = e["spans"][start][0], e["spans"][end - 1][1]
        entities.append({"type": kind, "start": a, "end": b, "text": e["text"][a:b]})
      rows.append({"text": e["text"], "entities": entities, "tags": tags})
    return rows

  def _loss_terms(self, logits, batch):
    # Padding rows and padding tokens (packed or not) have label_mask 0.
    mask = batch["label_mask"]
    loss_sum = jnp.sum(cross_entropy(logits, batch["labels"]) * mask)
    return loss_sum, mask

  def loss(self, variables, batch, rng, deterministic: bool = False):
    return self.loss_from_outputs(self.logits(variables, batch, rng, deterministic), batch)

  def outputs(self, variables, batch, rng=None, deterministic: bool = True):
    return self.logits(variables, batch, rng, deterministic)

  def distill_view(self, logits, batch):
    return logits.astype(jnp.float32), batch["label_mask"]  # [B, T, C], [B, T]

  def loss_from_outputs(self, logits, batch):
    loss_sum, mask = self._loss_terms(logits, batch)
    correct = (jnp.argmax(logits, -1) == batch["labels"]).astype(jnp.float32)
    return loss_sum, {"weight": jnp.sum(mask), "tokens": jnp.sum(batch["segment_ids"] > 0),
                      "correct": jnp.sum(correct * mask)}

  def eval_outputs(self, variables, batch):
    logits = self.logits(variables, batch)
    loss_sum, mask = self._loss_terms(logits, batch)
    return {"predictions": jnp.argmax(logits, -1).astype(jnp.int32), "loss_sum": loss_sum,
            "weight": jnp.sum(mask), **self.packed_outputs(batch)}

  def _tags(self, outputs, split):
    examples = self.splits[split]
    first = self.features(split)["first_token"]
    predictions = self.gather(outputs, "predictions", len(first))
    gold = [examples[i]["tags"] for i in range(len(first))]
    pred = [word_tags(first[i], predictions[i], len(gold[i]), self.labels)
            for i in range(len(first))]
    return gold, pred

  def summarize(self, outputs, split: str = "validation") -> dict[str, float]:
    scores = metrics.entity_scores(*self._tags(outputs, split))
    return {"loss": self.mean_loss(outputs), "precision": scores["precision"],
            "recall": scores["recall"], "f1": scores["f1"], "accuracy": scores["accuracy"]}

  def report(self, outputs, split: str):
    scores = metrics.entity_scores(*self._tags(outputs, split))
    scores["loss"] = self.mean_loss(outputs)
    return metrics.format_entity_report(scores), scores
