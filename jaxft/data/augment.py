"""EDA text augmentation (Wei & Zou 2019, "EDA: Easy Data Augmentation Techniques for Boosting
Performance on Text Classification Tasks"): synonym replacement (sr), random insertion of a
synonym (ri), random swap (rs) and random deletion (rd), each at a rate alpha of the words.

Every operation works on (word, tag) pairs so that one implementation serves both text
classification (every tag "O") and NER, where entity words (tag != "O") are never replaced,
moved or deleted, an inserted word is tagged "O" and goes only where it cannot split an entity
(next to an "O" word or at either end), so the tags stay aligned with the words. Words are
whitespace-separated tokens; synonym lookups see the word inside its punctuation
(jaxft/data/lexicon.py) and keep the original capitalisation. An augmented text's words are
joined by single spaces (line breaks go; the tokenizers treat them alike).

All randomness comes from the numpy Generator given, and `Augmenter` seeds one per (seed,
epoch, example index, copy): an example is augmented the same way whenever that epoch is
replayed (resumed training is bit-exact) and differently every epoch.
"""

import dataclasses

import numpy as np

from jaxft.data import lexicon

OUTSIDE = "O"
METHODS = ("none", "eda")
OPS = ("sr", "ri", "rs", "rd")
KINDS = ("classification", "ner")

Pairs = list[tuple[str, str]]


def n_changes(alpha: float, n_words: int) -> int:
  """EDA's count of words an operation touches: max(1, int(alpha * n))."""
  return max(1, int(alpha * n_words))


def _pick(rng: np.random.Generator, items):
  return items[int(rng.integers(len(items)))]


def synonym_replacement(pairs: Pairs, alpha: float, rng: np.random.Generator) -> Pairs:
  """Up to n distinct "O" words that WordNet knows, each replaced by one of its synonyms."""
  candidates = [i for i, (w, t) in enumerate(pairs) if t == OUTSIDE and lexicon.token_synonyms(w)]
  out = list(pairs)
  if not candidates:
    return out
  n = min(n_changes(alpha, len(pairs)), len(candidates))
  for i in rng.permutation(candidates)[:n]:
    word, tag = pairs[i]
    out[i] = (lexicon.replace_token(word, _pick(rng, lexicon.token_synonyms(word))), tag)
  return out


def _insertion_slots(pairs: Pairs) -> list[int]:
  """Positions k (insert before pairs[k]) that cannot split an entity."""
  n = len(pairs)
  return [k for k in range(n + 1)
          if k in (0, n) or pairs[k - 1][1] == OUTSIDE or pairs[k][1] == OUTSIDE]


def random_insertion(pairs: Pairs, alpha: float, rng: np.random.Generator) -> Pairs:
  """n times: a synonym of a random "O" word of the text, inserted (lowercase, tagged "O") at
  a random position that splits no entity."""
  out = list(pairs)
  for _ in range(n_changes(alpha, len(pairs))):
    sources = [w for w, t in out if t == OUTSIDE and lexicon.token_synonyms(w)]
    if not sources:
      break
    synonym = _pick(rng, lexicon.token_synonyms(_pick(rng, sources)))
    out.insert(_pick(rng, _insertion_slots(out)), (synonym, OUTSIDE))
  return out


def random_swap(pairs: Pairs, alpha: float, rng: np.random.Generator) -> Pairs:
  """n times: two random "O" words trade places (entity words stay where they are)."""
  out = list(pairs)
  free = [i for i, (_, t) in enumerate(pairs) if t == OUTSIDE]
  if len(free) < 2:
    return out
  for _ in range(n_changes(alpha, len(pairs))):
    i, j = rng.choice(free, size=2, replace=False)
    out[i], out[j] = out[j], out[i]
  return out


def random_deletion(pairs: Pairs, alpha: float, rng: np.random.Generator) -> Pairs:
  """Each "O" word is deleted with probability alpha; a text is never emptied (one random word
  survives, as in EDA)."""
  if len(pairs) <= 1:
    return list(pairs)
  draws = rng.random(len(pairs))
  out = [p for p, u in zip(pairs, draws) if p[1] != OUTSIDE or u >= alpha]
  return out or [_pick(rng, pairs)]


OPERATIONS = {"sr": synonym_replacement, "ri": random_insertion, "rs": random_swap,
              "rd": random_deletion}


def eda_text(text: str, op: str, alpha: float, rng: np.random.Generator) -> str:
  """One EDA operation on a text's whitespace-separated words."""
  words = text.split()
  if not words:
    return text
  return " ".join(w for w, _ in OPERATIONS[op]([(w, OUTSIDE) for w in words], alpha, rng))


def eda_words(words: list[str], tags: list[str], op: str, alpha: float,
              rng: np.random.Generator) -> tuple[list[str], list[str]]:
  """One EDA operation on a NER example; entity words untouched, tags aligned."""
  if len(words) != len(tags):
    raise ValueError(f"{len(words)} words but {len(tags)} tags")
  if not words:
    return [], []
  out = OPERATIONS[op](list(zip(words, tags)), alpha, rng)
  return [w for w, _ in out], [t for _, t in out]


@dataclasses.dataclass(frozen=True)
class Settings:
  """config.augment, checked (see configs/common.py:augment)."""

  ops: tuple[str, ...]
  alphas: dict
  num_aug: int  # augmented copies per example per epoch (the original is kept)
  p: float  # with num_aug == 0: the probability an example is augmented in an epoch
  seed: int  # added to the training iterator's seed


def settings(cfg) -> Settings | None:
  """config.augment -> Settings, or None when augmentation is off (method 'none', or no
  augment block at all: a workdir written before it existed)."""
  if cfg is None:
    return None
  method = cfg.get("method", "none")
  if method not in METHODS:
    raise ValueError(f"config.augment.method={method!r} is not one of {', '.join(METHODS)} "
                     "(paraphrases are made offline: python -m jaxft.augment)")
  if method == "none":
    return None
  ops = tuple(o.strip() for o in str(cfg.get("ops", ",".join(OPS))).split(",") if o.strip())
  unknown = [o for o in ops if o not in OPS]
  if not ops or unknown:
    raise ValueError(f"config.augment.ops={cfg.get('ops')!r}: give a comma-separated subset of "
                     f"{','.join(OPS)}")
  alphas = {}
  for op in ops:
    alpha = float(cfg.get(f"alpha_{op}", 0.1))
    if not 0 < alpha <= 1:
      raise ValueError(f"config.augment.alpha_{op}={alpha} must be in (0, 1] (or drop {op!r} "
                       "from config.augment.ops)")
    alphas[op] = alpha
  num_aug = int(cfg.get("num_aug", 0))
  p = float(cfg.get("p", 0.5))
  if num_aug < 0:
    raise ValueError(f"config.augment.num_aug={num_aug} must be >= 0 (0 = augment each "
                     "example in place with probability config.augment.p)")
  if num_aug == 0 and not 0 < p <= 1:
    raise ValueError(f"config.augment.p={p} must be in (0, 1] when config.augment.num_aug=0")
  return Settings(ops=ops, alphas=alphas, num_aug=num_aug, p=p, seed=int(cfg.get("seed", 0)))


class Augmenter:
  """Augments labelled examples ({"text", "label"} or {"tokens", "tags"}) per (seed, epoch,
  index, copy). With num_aug > 0 an epoch holds each example 1 + num_aug times: copy 0 is the
  original, the others augmented; with num_aug == 0 each example is augmented with
  probability p. An augmented copy gets one operation, drawn uniformly from config.augment.ops
  (as EDA makes each augmented sentence with one operation)."""

  def __init__(self, s: Settings, kind: str):
    if kind not in KINDS:
      raise ValueError(f"config.augment.method='eda' works for text classification and NER, "
                       f"not {kind} (QA answer spans would move); set config.augment.method="
                       "'none'")
    self.settings, self.kind = s, kind
    self.copies = 1 + s.num_aug

  def rng(self, seed: int, epoch: int, index: int, copy: int) -> np.random.Generator:
    total = seed + self.settings.seed
    if total < 0:
      raise ValueError(f"config.augment.seed={self.settings.seed} + the data seed {seed} is "
                       "negative; use a seed >= 0")
    return np.random.default_rng([total, epoch, index, copy])

  def __call__(self, example: dict, seed: int, epoch: int, index: int, copy: int = 0) -> dict:
    s = self.settings
    if s.num_aug > 0 and copy == 0:
      return example
    rng = self.rng(seed, epoch, index, copy)
    if s.num_aug == 0 and rng.random() >= s.p:
      return example
    op = _pick(rng, s.ops)
    if self.kind == "classification":
      return {**example, "text": eda_text(example["text"], op, s.alphas[op], rng)}
    words, tags = eda_words(example["tokens"], example["tags"], op, s.alphas[op], rng)
    return {**example, "tokens": words, "tags": tags}


def from_config(cfg, kind: str) -> Augmenter | None:
  s = settings(cfg)
  return None if s is None else Augmenter(s, kind)
