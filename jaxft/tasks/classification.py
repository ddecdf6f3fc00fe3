"""Sequence classification (BERT's pooled [CLS], or GPT-2's last token): one label per text.

Metrics: loss, accuracy, macro/micro/weighted F1; the report is the per-class precision /
recall / F1 / support table (jaxft/tasks/metrics.py).
"""

import jax
import jax.numpy as jnp
import numpy as np

from jaxft.tasks import metrics
from jaxft.tasks.labeled import LabeledTask


def cross_entropy(logits, labels):
  """Per-row -log p(label), softmax in float32."""
  logits = logits.astype(jnp.float32)
  return (jax.nn.logsumexp(logits, axis=-1)
          - jnp.take_along_axis(logits, labels[..., None], axis=-1)[..., 0])


def pad_encodings(encodings, max_len: int, pad_id: int) -> dict[str, np.ndarray]:
  """tokenizers Encodings (already truncated) -> inputs / segment_ids / token_types
  [N, max_len], right-padded; segment id 1 marks real tokens. An empty encoding (GPT-2's
  empty text) reads as one pad (EOS) token, so every example has a token to classify, alone in
  its row or packed with others."""
  n = len(encodings)
  out = {"inputs": np.full((n, max_len), pad_id, np.int32),
         "segment_ids": np.zeros((n, max_len), np.int32),
         "token_types": np.zeros((n, max_len), np.int32)}
  for i, e in enumerate(encodings):
    length = len(e.ids)
    out["inputs"][i, :length] = e.ids
    out["segment_ids"][i, :max(length, 1)] = 1
    out["token_types"][i, :length] = e.type_ids
  return out


def encode_texts(tokenizer, texts: list[str], max_len: int, family: str) -> dict[str, np.ndarray]:
  """Texts -> inputs / segment_ids / token_types [N, max_len], truncated and right-padded.

  BERT: [CLS] text [SEP] through the tokenizer's own post-processor (truncation keeps room for
  the special tokens); the Llama-style decoders: theirs too (Llama's <|begin_of_text|>, none
  for Qwen), as transformers' tokenizers encode by default. GPT-2: the text's tokens alone (the
  classifier reads the last one).
  """
  encodings = tokenizer.private_copy(max_len).encode_batch(
      texts, add_special_tokens=family != "gpt2")
  pad = (tokenizer.special_id("pad_token") if "pad_token" in tokenizer.special
         else tokenizer.eos_id or 0)
  return pad_encodings(encodings, max_len, pad)


class SequenceClassification(LabeledTask):
  name = "classification"
  distillable = True
  trainable_head = r"^(classifier|score)/"  # BERT's classifier, the decoders' score
  kind = "classification"
  has_labels = True
  default_metric = ("accuracy", "max")
  batch_keys = ("labels",)
  prediction_fields = ("text",)
  pools_per_slot = True  # packed rows: [CLS] / the last token of each segment

  def head_weights_per_token(self, seq_len: int) -> dict[str, float]:
    # Once per example (every slot of a packed row): BERT's pooler d·d, the classifier d·n.
    d = self.model_cfg.flops_backbone.width
    share = (self.slots if self.packing else 1) / seq_len
    if self.config.model.get("family", "gpt2") == "bert":
      return {"bert/pooler/kernel": share * d * d,
              "classifier/kernel": share * d * len(self.labels)}
    return {"score/kernel": share * d * len(self.labels)}

  def label_values(self, example):
    return [example["label"]]

  def featurize(self, examples, split: str, with_labels: bool = True):
    examples = list(examples)
    family = self.config.model.get("family", "gpt2")
    out = encode_texts(self.tokenizer, [e["text"] for e in examples], self.max_len, family)
    out["labels"] = np.asarray(
        [self.label_id(e["label"], split, i) if with_labels else 0
         for i, e in enumerate(examples)], np.int32)
    return out

  def hf_labels(self, batch):
    return {"labels": batch["labels"]}

  def prediction_inputs(self, records):
    return [{"text": r["text"]} for r in records]

  def predictions(self, examples, features, outputs):
    logits = self.gather(outputs, "logits", len(examples))
    probs = np.exp(logits - logits.max(-1, keepdims=True))
    probs /= probs.sum(-1, keepdims=True)
    return [{"text": e["text"], "label": self.labels[int(np.argmax(p))],
             "probabilities": {name: round(float(q), 6) for name, q in zip(self.labels, p)}}
            for e, p in zip(examples, probs)]

  def loss(self, variables, batch, rng, deterministic: bool = False):
    return self.loss_from_outputs(self.logits(variables, batch, rng, deterministic), batch)

  def outputs(self, variables, batch, rng=None, deterministic: bool = True):
    return self.logits(variables, batch, rng, deterministic)

  def distill_view(self, logits, batch):
    return logits.astype(jnp.float32), batch["example_mask"]  # [B, (slots,) C], [B, (slots)]

  def loss_from_outputs(self, logits, batch):
    mask = batch["example_mask"]
    correct = (jnp.argmax(logits, -1) == batch["labels"]).astype(jnp.float32)
    return (jnp.sum(cross_entropy(logits, batch["labels"]) * mask),
            {"weight": jnp.sum(mask), "tokens": jnp.sum(batch["segment_ids"] > 0),
             "correct": jnp.sum(correct * mask)})

  def eval_outputs(self, variables, batch):
    logits = self.logits(variables, batch)
    mask = batch["example_mask"]
    out = {"logits": logits.astype(jnp.float32), "weight": jnp.sum(mask),
           "loss_sum": jnp.sum(cross_entropy(logits, batch["labels"]) * mask)}
    return {**out, **self.packed_outputs(batch)}

  def _predictions(self, outputs, split):
    y_true = self.features(split)["labels"]
    y_pred = np.argmax(self.gather(outputs, "logits", len(y_true)), axis=-1)
    return y_true, y_pred

  def summarize(self, outputs, split: str = "validation") -> dict[str, float]:
    y_true, y_pred = self._predictions(outputs, split)
    report = metrics.classification_report(y_true, y_pred, self.labels)
    return {"loss": self.mean_loss(outputs), "accuracy": report["accuracy"],
            "macro_f1": report["macro"]["f1"], "micro_f1": report["micro"]["f1"],
            "weighted_f1": report["weighted"]["f1"]}

  def report(self, outputs, split: str):
    y_true, y_pred = self._predictions(outputs, split)
    report = metrics.classification_report(y_true, y_pred, self.labels)
    report["loss"] = self.mean_loss(outputs)
    return metrics.format_classification_report(report), report
