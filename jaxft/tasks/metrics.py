"""Evaluation metrics of the fine-tuning tasks, each matching the reference implementation that
published numbers are computed with, so that scores are comparable with the literature:

- classification: scikit-learn's precision_recall_fscore_support with zero_division=0;
- NER: conlleval.pl (CoNLL-2000/2003) entity-level scores, with the IOBES pairs of its widely used
  IOBES variant added (plain conlleval.pl merges "S-PER S-PER" into one entity);
- extractive QA: the official SQuAD v1.1 / v2.0 evaluation scripts.

Pure Python + numpy, so scoring never needs an accelerator and every result is JSON-serialisable.
"""

import collections
import logging
import re
import string
from collections.abc import Mapping, Sequence

import numpy as np

log = logging.getLogger(__name__)


def _prf(correct: int, predicted: int, actual: int) -> dict[str, float]:
  """Precision, recall and F1 with every 0/0 scored 0 (sklearn's zero_division=0, conlleval)."""
  precision = correct / predicted if predicted else 0.0
  recall = correct / actual if actual else 0.0
  total = precision + recall
  return {"precision": precision, "recall": recall,
          "f1": 2 * precision * recall / total if total else 0.0}


def _table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
  """Right-aligned columns; the first column is as wide as its longest cell."""
  width = max(len(row[0]) for row in [header, *rows] if row)
  lines = []
  for row in [header, *rows]:
    if not row:
      lines.append("")
      continue
    lines.append(f"{row[0]:>{width}}" + "".join(f" {cell:>10}" for cell in row[1:]))
  return "\n".join(lines) + "\n"


# --- Classification -------------------------------------------------------------------------


def accuracy(y_true: Sequence, y_pred: Sequence) -> float:
  t, p = np.asarray(y_true), np.asarray(y_pred)
  if t.shape != p.shape:
    raise ValueError(f"y_true has shape {t.shape} but y_pred has shape {p.shape}")
  return float(np.mean(t == p)) if t.size else 0.0


def classification_report(y_true: Sequence[int], y_pred: Sequence[int],
                          label_names: list[str]) -> dict:
  """Per-class and averaged precision/recall/F1 over every label in `label_names`.

  Classes absent from both y_true and y_pred still count in the macro average (as zeros), as
  sklearn does when given `labels`: macro F1 then depends on the label set, not only the data.
  """
  k = len(label_names)
  if not k or len(set(label_names)) != k:
    raise ValueError(f"label_names must be non-empty and unique, got {label_names}")
  t, p = np.asarray(y_true, dtype=np.int64), np.asarray(y_pred, dtype=np.int64)
  if t.ndim != 1 or t.shape != p.shape:
    raise ValueError(f"y_true has shape {t.shape} but y_pred has shape {p.shape}")
  for name, labels in (("y_true", t), ("y_pred", p)):
    if labels.size and (labels.min() < 0 or labels.max() >= k):
      raise ValueError(f"{name} has labels outside [0, {k}) (label_names has {k} entries)")
  confusion = np.bincount(t * k + p, minlength=k * k).reshape(k, k)  # rows: truth, cols: guess
  correct, predicted, support = np.diag(confusion), confusion.sum(0), confusion.sum(1)
  total = int(support.sum())

  per_class = {}
  for name, c, n_pred, n_true in zip(label_names, correct, predicted, support):
    per_class[name] = {**_prf(int(c), int(n_pred), int(n_true)), "support": int(n_true)}
  keys = ("precision", "recall", "f1")
  scores = np.array([[m[key] for key in keys] for m in per_class.values()])
  weighted = support @ scores / total if total else np.zeros(3)
  return {
      "accuracy": accuracy(t, p),
      "per_class": per_class,
      "macro": dict(zip(keys, scores.mean(0).tolist())),
      "micro": _prf(int(correct.sum()), int(predicted.sum()), total),
      "weighted": dict(zip(keys, weighted.tolist())),
      "support": total,
  }


def format_classification_report(report: dict) -> str:
  """sklearn's classification_report layout, plus the micro average."""
  def row(name, m, support):
    return [name, f"{m['precision']:.4f}", f"{m['recall']:.4f}", f"{m['f1']:.4f}", str(support)]

  total = report["support"]
  rows = [row(name, m, m["support"]) for name, m in report["per_class"].items()]
  rows += [[], ["accuracy", "", "", f"{report['accuracy']:.4f}", str(total)]]
  rows += [row(f"{avg} avg", report[avg], total) for avg in ("macro", "weighted", "micro")]
  return _table(["", "precision", "recall", "f1-score", "support"], [[], *rows])


# --- Entity-level NER (conlleval) -----------------------------------------------------------

# (previous prefix, prefix) pairs between which conlleval.pl sees a chunk end / start; the pairs
# with S, and E followed by B, come from its IOBES variant. They never involve a B/I/O-only pair,
# so IOB1, IOB2 and IOE input is chunked exactly as by conlleval.pl itself.
_ENDS = frozenset({("B", "B"), ("B", "O"), ("I", "B"), ("I", "O"), ("E", "E"), ("E", "I"),
                   ("E", "O"), ("B", "S"), ("I", "S"), ("E", "S"), ("E", "B"), ("S", "B"),
                   ("S", "I"), ("S", "E"), ("S", "S"), ("S", "O")})
_STARTS = frozenset({("B", "B"), ("I", "B"), ("O", "B"), ("O", "I"), ("E", "E"), ("E", "I"),
                     ("O", "E"), ("S", "B"), ("E", "B"), ("B", "S"), ("I", "S"), ("O", "S"),
                     ("S", "S"), ("E", "S"), ("S", "I"), ("S", "E")})


def _split_tag(tag: str) -> tuple[str, str]:
  """conlleval splits at the first hyphen, so types may contain hyphens; a tag without one is all
  prefix, with the empty type."""
  prefix, _, chunk_type = tag.partition("-")
  return prefix, chunk_type


def _chunk_ends(prev: tuple[str, str], cur: tuple[str, str]) -> bool:
  (prev_tag, prev_type), (tag, chunk_type) = prev, cur
  return ((prev_tag, tag) in _ENDS or prev_tag in ("[", "]")
          or (prev_tag not in ("O", ".") and prev_type != chunk_type))


def _chunk_starts(prev: tuple[str, str], cur: tuple[str, str]) -> bool:
  (prev_tag, prev_type), (tag, chunk_type) = prev, cur
  return ((prev_tag, tag) in _STARTS or tag in ("[", "]")
          or (tag not in ("O", ".") and prev_type != chunk_type))


def extract_entities(tags: Sequence[str]) -> list[tuple[str, int, int]]:
  """(type, start, end-exclusive) of every chunk, by conlleval's start/end rules.

  conlleval treats a sentence boundary as an "O" token, which ends every typed chunk. Type-less
  tags (no hyphen, e.g. a bare "PER") only start a chunk right after a typed one and nothing but a
  type change ends it; such a chunk ends here at the next chunk start or the sentence end, where
  conlleval would run on into the next sentence.
  """
  entities = []
  prev, start, chunk_type = ("O", ""), None, ""
  for i, tag in enumerate(tags):
    cur = _split_tag(tag)
    starts = _chunk_starts(prev, cur)
    if start is not None and (starts or _chunk_ends(prev, cur)):
      entities.append((chunk_type, start, i))
      start = None
    if starts:
      start, chunk_type = i, cur[1]
    prev = cur
  if start is not None:
    entities.append((chunk_type, start, len(tags)))
  return entities


def entity_scores(true_seqs: Sequence[Sequence[str]],
                  pred_seqs: Sequence[Sequence[str]]) -> dict:
  """conlleval's scores, in [0, 1]: a predicted entity is correct only if its type, start and end
  all match a gold entity of the same sentence; precision/recall/F1 are micro over all entities.

  "support" is the number of gold entities of a type. The empty type of type-less tags is scored
  like any other, as conlleval does.
  """
  if len(true_seqs) != len(pred_seqs):
    raise ValueError(f"{len(true_seqs)} gold sentences but {len(pred_seqs)} predicted")
  gold, guessed, correct = collections.Counter(), collections.Counter(), collections.Counter()
  tokens = right_tags = 0
  for i, (true_tags, pred_tags) in enumerate(zip(true_seqs, pred_seqs)):
    if len(true_tags) != len(pred_tags):
      raise ValueError(f"sentence {i}: {len(true_tags)} gold tags but {len(pred_tags)} predicted")
    true_entities, pred_entities = extract_entities(true_tags), extract_entities(pred_tags)
    gold.update(e[0] for e in true_entities)
    guessed.update(e[0] for e in pred_entities)
    correct.update(e[0] for e in set(true_entities) & set(pred_entities))
    tokens += len(true_tags)
    right_tags += sum(_split_tag(a) == _split_tag(b) for a, b in zip(true_tags, pred_tags))

  per_type = {t: {**_prf(correct[t], guessed[t], gold[t]), "support": gold[t],
                  "predicted": guessed[t]} for t in sorted(gold.keys() | guessed.keys())}
  n_correct, n_guessed, n_gold = correct.total(), guessed.total(), gold.total()
  return {**_prf(n_correct, n_guessed, n_gold), "accuracy": right_tags / tokens if tokens else 0.0,
          "per_type": per_type, "true_entities": n_gold, "predicted_entities": n_guessed,
          "correct": n_correct, "tokens": tokens}


def format_entity_report(scores: dict) -> str:
  """Per-type rows then the micro average; conlleval's summary line comes first."""
  def row(name, m, support, predicted):
    return [name, f"{m['precision']:.4f}", f"{m['recall']:.4f}", f"{m['f1']:.4f}",
            str(support), str(predicted)]

  rows = [row(t or "(no type)", m, m["support"], m["predicted"])
          for t, m in scores["per_type"].items()]
  rows += [[], row("micro avg", scores, scores["true_entities"], scores["predicted_entities"])]
  summary = (f"processed {scores['tokens']} tokens with {scores['true_entities']} entities; "
             f"found: {scores['predicted_entities']}; correct: {scores['correct']}; "
             f"token accuracy: {scores['accuracy']:.4f}\n\n")
  return summary + _table(["", "precision", "recall", "f1-score", "support", "predicted"],
                          [[], *rows])


# --- SQuAD ----------------------------------------------------------------------------------

_PUNCTUATION = frozenset(string.punctuation)
_ARTICLES = re.compile(r"\b(a|an|the)\b")


def normalize_answer(s: str) -> str:
  """The official scripts' normalisation, in their order: punctuation goes before articles, so
  "the-cat" becomes "thecat", not "cat"."""
  s = "".join(ch for ch in s.lower() if ch not in _PUNCTUATION)
  return " ".join(_ARTICLES.sub(" ", s).split())


def exact_match(prediction: str, truth: str) -> float:
  return float(normalize_answer(prediction) == normalize_answer(truth))


def f1(prediction: str, truth: str) -> float:
  """Bag-of-tokens F1; an empty side scores 1 only against another empty side (v2.0's rule, so
  abstaining on an unanswerable question is rewarded)."""
  pred_tokens, true_tokens = normalize_answer(prediction).split(), normalize_answer(truth).split()
  if not pred_tokens or not true_tokens:
    return float(pred_tokens == true_tokens)
  same = sum((collections.Counter(pred_tokens) & collections.Counter(true_tokens)).values())
  return _prf(same, len(pred_tokens), len(true_tokens))["f1"]


def squad_scores(predictions: Mapping[str, str],
                 references: Mapping[str, Sequence[str]]) -> dict:
  """Official SQuAD scores in percent: per question, the best score over its gold answers.

  As in v2.0, gold answers that normalise to nothing are dropped and a question left without one
  is unanswerable (gold ""). As in v1.1, a question without a prediction scores 0 and still counts
  in the total (v2.0 would leave it out of the total). Predictions for unknown ids are ignored.
  HasAns_*/NoAns_* break the scores down when both kinds of question are present.
  """
  missing = sum(qid not in predictions for qid in references)
  if missing:
    log.warning("%d of %d questions have no prediction; they score 0", missing, len(references))
  exact, overlap = dict.fromkeys(references, 0.0), dict.fromkeys(references, 0.0)
  for qid, answers in references.items():
    if qid in predictions:
      golds = [a for a in answers if normalize_answer(a)] or [""]
      exact[qid] = max(exact_match(predictions[qid], g) for g in golds)
      overlap[qid] = max(f1(predictions[qid], g) for g in golds)

  def percent(scores, qids):
    return 100.0 * sum(scores[q] for q in qids) / len(qids) if qids else 0.0

  qids = list(references)
  out = {"exact_match": percent(exact, qids), "f1": percent(overlap, qids), "total": len(qids)}
  has_ans = [q for q in qids if references[q]]
  no_ans = [q for q in qids if not references[q]]
  if has_ans and no_ans:
    for name, group in (("HasAns", has_ans), ("NoAns", no_ans)):
      out.update({f"{name}_exact": percent(exact, group), f"{name}_f1": percent(overlap, group),
                  f"{name}_total": len(group)})
  return out
