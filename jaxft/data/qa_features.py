"""Extractive QA (SQuAD v1.1 / v2.0): examples -> windowed features, span logits -> answers.

Follows HF transformers' run_qa.py with a fast tokenizer: the question and the context are
encoded as a pair ([CLS] question [SEP] context [SEP] for BERT), and a context too long for
`max_len` is split into overlapping windows by the tokenizers library's own "only_second"
truncation with a stride, so window boundaries match what transformers produces. Every window is
a feature; `example_index` maps it back to its example. Character offsets of the context tokens
let post-processing return the original context substring (with its casing and accents), never a
detokenised string.

An example is a dict:
  {"id": str, "question": str, "context": str,
   "answers": {"text": [str, ...], "answer_start": [int, ...]}, "is_impossible": bool}
(`is_impossible` may be left out for SQuAD v1.1 data; it then counts as False).
"""

from collections.abc import Mapping, Sequence

import numpy as np
import tokenizers

from jaxft.data.tokenizer import Tokenizer

_CONTEXT = 1  # sequence id of the context in a (question, context) pair encoding


def _answers(example: Mapping) -> tuple[list[str], list[int]]:
  answers = example.get("answers") or {}
  return list(answers.get("text", [])), [int(s) for s in answers.get("answer_start", [])]


def _check_example(example: Mapping) -> None:
  """Raise ValueError for labels that would silently train on (or score against) the wrong span."""
  ex_id = example["id"]
  texts, starts = _answers(example)
  if len(texts) != len(starts):
    raise ValueError(f"QA example {ex_id!r} has {len(texts)} answer texts but {len(starts)} "
                     "answer_start values; give one answer_start per answer text")
  if example.get("is_impossible", False):
    if texts:
      raise ValueError(f"QA example {ex_id!r} is marked is_impossible=True but has answers "
                       f"{texts!r}; empty its answers (SQuAD v2 keeps them under "
                       "plausible_answers) or set is_impossible=False")
    return
  if not texts:
    raise ValueError(f"QA example {ex_id!r} has no answers but is_impossible=False; give its "
                     "answer text and answer_start, or mark it is_impossible=True (SQuAD v2)")
  context = example["context"]
  for text, start in zip(texts, starts, strict=True):
    held = context[start:start + len(text)] if start >= 0 else ""
    if not text or held != text:
      raise ValueError(
          f"QA answer not found in its context: example {ex_id!r}, answer {text!r} at "
          f"answer_start={start}, but context[{start}:{start + len(text)}] is {held!r}. Fix the "
          "answer_start (a character index into the context, 0-based) or the answer text in "
          "the data")


def references(examples: Sequence[Mapping]) -> dict[str, list[str]]:
  """Gold answer texts per example id ([] for an impossible question), for SQuAD EM/F1."""
  return {ex["id"]: [] if ex.get("is_impossible", False) else _answers(ex)[0]
          for ex in examples}


def _check_unique_ids(examples: Sequence[Mapping]) -> None:
  seen: set[str] = set()
  for ex in examples:
    if ex["id"] in seen:  # predictions are keyed by id: a duplicate would overwrite another
      raise ValueError(f"QA example id {ex['id']!r} appears more than once; ids must be unique")
    seen.add(ex["id"])


def _truncate_question(tok: tokenizers.Tokenizer, question: str, max_tokens: int) -> str:
  """The longest prefix of `question` that encodes to at most `max_tokens` tokens.

  The question is cut as text (at a token's end offset) rather than as tokens: the pair is then
  encoded in one call, so the windows come from the tokenizer's own pair truncation. Re-encoding
  a cut can in principle give more tokens (BPE merges), hence the loop.
  """
  enc = tok.encode(question, add_special_tokens=False)
  n = max_tokens
  while len(enc.ids) > max_tokens:
    question = question[:enc.offsets[n - 1][1]] if n > 0 else ""
    enc = tok.encode(question, add_special_tokens=False)
    n -= 1
  return question


def _windows(encoding: tokenizers.Encoding, ex_id: str) -> list[tokenizers.Encoding]:
  """The first window and its overflowing windows, each exactly once, in context order.

  tokenizers puts every later window in the first one's `overflowing` (transformers reads them
  the same way). A nested overflow or windows out of order would mean duplicated or missing
  features, so that is an error rather than something to flatten silently.
  """
  windows = [encoding, *encoding.overflowing]
  first_tokens = []
  for w in windows[1:]:
    if w.overflowing:
      raise RuntimeError(f"tokenizers returned nested overflowing windows for QA example "
                         f"{ex_id!r}; this tokenizers version splits pairs differently than "
                         "jaxft expects")
  for w in windows:
    starts = [o[0] for o, s in zip(w.offsets, w.sequence_ids, strict=True) if s == _CONTEXT]
    first_tokens.append(starts[0] if starts else -1)
  if any(b <= a for a, b in zip(first_tokens, first_tokens[1:], strict=False)):
    raise RuntimeError(f"QA example {ex_id!r}: context windows are not in increasing order "
                       f"(first characters {first_tokens})")
  return windows


def _span_labels(offsets: np.ndarray, context_mask: np.ndarray, start_char: int,
                 end_char: int) -> tuple[int, int]:
  """Token (start, end) of the character span [start_char, end_char) in one window, or (0, 0).

  As run_qa.py: the span's first token is the last context token starting at or before
  start_char, its last token the first context token (from the right) ending at or after
  end_char; a span not fully inside the window points at [CLS] (position 0).
  """
  ctx = np.flatnonzero(context_mask)
  if ctx.size == 0:
    return 0, 0
  first, last = ctx[0], ctx[-1]
  if not (offsets[first, 0] <= start_char and offsets[last, 1] >= end_char):
    return 0, 0
  start = first
  while start <= last and offsets[start, 0] <= start_char:
    start += 1
  end = last
  while end >= first and offsets[end, 1] >= end_char:
    end -= 1
  return int(start - 1), int(end + 1)


def featurize_qa(examples: Sequence[Mapping], tokenizer: Tokenizer, max_len: int, doc_stride: int,
                 max_question_len: int = 64, train: bool = True) -> dict[str, np.ndarray]:
  """SQuAD-format examples -> one feature (row) per context window, padded to `max_len`.

  The question is cut to `max_question_len` tokens; the context is split into windows of at most
  `max_len` tokens in all (question and special tokens included), consecutive windows sharing
  `doc_stride` context tokens. Returns, over N features:
    inputs          [N, max_len] int32  token ids, padded with the tokenizer's pad id
    token_types     [N, max_len] int32  0 = [CLS] question [SEP], 1 = context [SEP], 0 = padding
    segment_ids     [N, max_len] int32  1 = real token, 0 = padding (jaxft's attention mask)
    example_index   [N] int32           which example the window belongs to
    context_mask    [N, max_len] bool   True on context tokens (where an answer may start/end)
    offsets         [N, max_len, 2] int32  [start, end) characters in the context for context
                                           tokens, -1 elsewhere
  and with `train` the labels, from the example's first answer:
    start_positions, end_positions  [N] int32  token indices of that answer in the window;
                                               0 ([CLS]) when it is not wholly inside the
                                               window, or the question is impossible.
  Evaluation features (`train=False`) carry no labels: a SQuAD dev question has several gold
  answers, and postprocess_qa + references score predictions against all of them.
  Answers are validated in both modes (ValueError on an answer not at its answer_start).
  """
  # One piece (~100 lines): it follows HF's run_qa prepare_*_features step by step, which
  # is what its tests compare against; split, the correspondence would be harder to check.
  if max_question_len < 1:
    raise ValueError(f"max_question_len={max_question_len} must be at least 1")
  if doc_stride < 0:
    raise ValueError(f"doc_stride={doc_stride} must be >= 0")
  _check_unique_ids(examples)
  for ex in examples:
    if train or "answers" in ex:  # unlabelled questions (jaxft.predict) carry no answers
      _check_example(ex)
  cls_id, pad_id = tokenizer.special_id("cls_token"), tokenizer.special_id("pad_token")

  # A private copy: truncation settings on the shared backend would change every other user's
  # encodings.
  tok = tokenizer.private_copy()
  n_special = tok.num_special_tokens_to_add(True)
  if max_len <= n_special + 1:
    raise ValueError(f"max_len={max_len} leaves no room for a question and a context next to "
                     f"{n_special} special tokens")

  # run_qa.py strips leading whitespace: with byte-level BPE it would cost tokens for nothing.
  questions = [_truncate_question(tok, ex["question"].lstrip(), max_question_len)
               for ex in examples]
  q_lens = [len(e.ids) for e in tok.encode_batch(questions, add_special_tokens=False)]
  for ex, q_len in zip(examples, q_lens, strict=True):
    budget = max_len - n_special - q_len  # context tokens per window
    if budget > doc_stride:
      continue
    # tokenizers only fails when the context actually has to be split; say which example.
    c_len = len(tok.encode(ex["context"], add_special_tokens=False).ids)
    if c_len > budget:
      raise ValueError(
          f"QA example {ex['id']!r}: its {q_len}-token question and {n_special} special tokens "
          f"leave {budget} context tokens per window of max_len={max_len}, not more than "
          f"doc_stride={doc_stride}, so the windows cannot advance. Lower doc_stride or "
          "max_question_len, or raise max_len")

  tok.enable_truncation(max_length=max_len, stride=doc_stride, strategy="only_second",
                        direction="right")
  encodings = tok.encode_batch([(q, ex["context"]) for q, ex in zip(questions, examples,
                                                                     strict=True)])
  rows: list[tuple[int, tokenizers.Encoding]] = []
  for i, (ex, enc) in enumerate(zip(examples, encodings, strict=True)):
    rows.extend((i, w) for w in _windows(enc, ex["id"]))

  n = len(rows)
  out = {
      "inputs": np.full((n, max_len), pad_id, np.int32),
      "token_types": np.zeros((n, max_len), np.int32),
      "segment_ids": np.zeros((n, max_len), np.int32),
      "example_index": np.zeros((n,), np.int32),
      "context_mask": np.zeros((n, max_len), bool),
      "offsets": np.full((n, max_len, 2), -1, np.int32),
  }
  if train:
    out["start_positions"] = np.zeros((n,), np.int32)
    out["end_positions"] = np.zeros((n,), np.int32)
  for row, (i, w) in enumerate(rows):
    length = len(w.ids)
    if length > max_len:
      raise RuntimeError(f"QA example {examples[i]['id']!r}: a window has {length} tokens, more "
                         f"than max_len={max_len}")
    if w.ids[0] != cls_id:  # position 0 is the "no answer" label and the null score's token
      raise ValueError(f"QA features need a tokenizer whose pair encoding starts with its "
                       f"cls_token (BERT-style); {tokenizer.source or 'gpt2'} starts with "
                       f"{w.tokens[0]!r}")
    out["inputs"][row, :length] = w.ids
    out["token_types"][row, :length] = w.type_ids
    out["segment_ids"][row, :length] = 1
    out["example_index"][row] = i
    is_ctx = np.array([s == _CONTEXT for s in w.sequence_ids], bool)
    out["context_mask"][row, :length] = is_ctx
    out["offsets"][row, :length][is_ctx] = np.asarray(w.offsets, np.int32)[is_ctx]
    if train and not examples[i].get("is_impossible", False):
      texts, starts = _answers(examples[i])
      start, end = _span_labels(out["offsets"][row], out["context_mask"][row], starts[0],
                                starts[0] + len(texts[0]))
      out["start_positions"][row], out["end_positions"][row] = start, end
  return out


def postprocess_qa(examples: Sequence[Mapping], features: Mapping[str, np.ndarray], start_logits,
                   end_logits, n_best: int = 20, max_answer_len: int = 30,
                   version_2: bool = False, null_threshold: float = 0.0) -> dict[str, dict]:
  """Per-window span logits -> one answer per example: {id: {text, start, end, score}}.

  Over all windows of an example, the `n_best` highest start and end logits are paired; spans
  must lie in the context, end >= start, and cover at most `max_answer_len` tokens. The best
  span by start + end logit is mapped back through the offsets: text = context[start:end]
  (characters, end exclusive), the original substring. With `version_2` (SQuAD v2.0), the
  example's null score is the lowest start_logit[0] + end_logit[0] ([CLS]) over its windows,
  and "" (start = end = -1, score = the null score) is predicted when null score - best span
  score > `null_threshold`. An example with no valid span at all gets "" as well, with score
  -inf without version_2.
  """
  # One piece, like HF's postprocess_qa_predictions that it reproduces (n-best per window,
  # the best span across windows, the null score for v2).
  start_logits, end_logits = np.asarray(start_logits), np.asarray(end_logits)
  shape = np.shape(features["inputs"])
  if start_logits.shape != shape or end_logits.shape != shape:
    raise ValueError(f"start_logits {start_logits.shape} and end_logits {end_logits.shape} must "
                     f"both be [features, max_len] = {shape}, one row per feature")
  _check_unique_ids(examples)
  example_index = np.asarray(features["example_index"])
  if example_index.size and example_index.max() >= len(examples):
    raise ValueError(f"features refer to example {example_index.max()} but only "
                     f"{len(examples)} examples were given; pass the examples they came from")
  by_example: list[list[int]] = [[] for _ in examples]
  for row, i in enumerate(example_index):
    by_example[int(i)].append(row)
  missing = [ex["id"] for ex, rows in zip(examples, by_example, strict=True) if not rows]
  if missing:
    raise ValueError(f"QA examples {missing[:5]} have no features; pass the features "
                     "featurize_qa made from exactly these examples")
  context_mask = np.asarray(features["context_mask"], bool)
  offsets_all = np.asarray(features["offsets"])

  k = max(1, min(n_best, shape[1]))
  predictions = {}
  for i, ex in enumerate(examples):
    best = (-np.inf, -1, -1)  # (score, start char, end char)
    null_score = np.inf
    for row in by_example[i]:
      s_log, e_log = start_logits[row].astype(np.float64), end_logits[row].astype(np.float64)
      null_score = min(null_score, s_log[0] + e_log[0])
      # Stable sort: equal logits pick the earlier token, so results are reproducible.
      starts = np.argsort(-s_log, kind="stable")[:k]
      ends = np.argsort(-e_log, kind="stable")[:k]
      s, e = np.meshgrid(starts, ends, indexing="ij")
      mask = context_mask[row]
      ok = mask[s] & mask[e] & (e >= s) & (e - s + 1 <= max_answer_len)
      if not ok.any():
        continue
      scores = np.where(ok, s_log[s] + e_log[e], -np.inf)
      j = np.unravel_index(np.argmax(scores), scores.shape)
      if scores[j] > best[0]:
        offsets = offsets_all[row]
        best = (float(scores[j]), int(offsets[s[j], 0]), int(offsets[e[j], 1]))
    score, start, end = best
    if start < 0 or (version_2 and null_score - score > null_threshold):
      null = float(null_score) if version_2 else float("-inf")
      predictions[ex["id"]] = {"text": "", "start": -1, "end": -1, "score": null}
    else:
      predictions[ex["id"]] = {"text": ex["context"][start:end], "start": start, "end": end,
                               "score": score}
  return predictions
