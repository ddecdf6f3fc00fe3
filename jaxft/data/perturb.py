"""Text perturbations for evaluation-time robustness checks: character typos and synonym swaps,
each applied to a word with probability `rate`, all randomness from the numpy Generator given
(the same generator state gives the same perturbed text).

Unlike the EDA operations (jaxft/data/augment.py) these keep the text's layout: only the
letters of the words chosen change; whitespace, digits and punctuation stay as they are.
"""

import re

import numpy as np

from jaxft.data import lexicon

# A QWERTY keyboard; rows are staggered, so the key at (row r, column i) touches (r, i +- 1),
# (r - 1, i), (r - 1, i + 1), (r + 1, i - 1) and (r + 1, i).
_ROWS = ("qwertyuiop", "asdfghjkl", "zxcvbnm")


def _neighbours() -> dict[str, str]:
  out = {}
  for r, row in enumerate(_ROWS):
    for i, key in enumerate(row):
      near = [(r, i - 1), (r, i + 1), (r - 1, i), (r - 1, i + 1), (r + 1, i - 1), (r + 1, i)]
      out[key] = "".join(_ROWS[a][b] for a, b in near
                         if 0 <= a < len(_ROWS) and 0 <= b < len(_ROWS[a]))
  return out


NEIGHBOURS = _neighbours()
TYPO_KINDS = ("swap", "delete", "insert", "substitute")
_LETTERS = re.compile(r"[A-Za-z]+")
_WORD = re.compile(r"[A-Za-z]+(?:['-][A-Za-z]+)*")


def _check_rate(rate: float):
  if not 0 <= rate <= 1:
    raise ValueError(f"rate={rate} must be in [0, 1] (the probability a word is perturbed)")


def _near(ch: str, rng: np.random.Generator) -> str:
  """A key next to `ch` on the keyboard, in `ch`'s case."""
  keys = NEIGHBOURS[ch.lower()]
  key = keys[int(rng.integers(len(keys)))]
  return key.upper() if ch.isupper() else key


def typo(word: str, kind: str, rng: np.random.Generator) -> str:
  """One typo in a word of ASCII letters: swap two adjacent letters, delete one, insert a key
  next to one, or substitute a letter by a key next to it."""
  n = len(word)
  if kind == "swap":
    i = int(rng.integers(n - 1))
    return word[:i] + word[i + 1] + word[i] + word[i + 2:]
  if kind == "delete":
    i = int(rng.integers(n))
    return word[:i] + word[i + 1:]
  if kind == "insert":
    i = int(rng.integers(n + 1))
    return word[:i] + _near(word[min(i, n - 1)], rng) + word[i:]
  if kind == "substitute":
    i = int(rng.integers(n))
    return word[:i] + _near(word[i], rng) + word[i + 1:]
  raise ValueError(f"typo kind {kind!r} is not one of {', '.join(TYPO_KINDS)}")


def typos(text: str, rate: float, rng: np.random.Generator) -> str:
  """Each run of letters gets one typo with probability `rate`; a one-letter word only gets
  an insertion or a substitution (swapping or deleting would not leave a word)."""
  _check_rate(rate)

  def one(m: re.Match) -> str:
    word = m.group()
    if rng.random() >= rate:
      return word
    kinds = TYPO_KINDS if len(word) > 1 else ("insert", "substitute")
    return typo(word, kinds[int(rng.integers(len(kinds)))], rng)

  return _LETTERS.sub(one, text)


def synonym_swap(text: str, rate: float, rng: np.random.Generator) -> str:
  """Each word with WordNet synonyms (stop words have none) is replaced with probability
  `rate` by one of them, in the original's capitalisation."""
  _check_rate(rate)

  def one(m: re.Match) -> str:
    word = m.group()
    options = lexicon.synonyms(word)
    if not options or rng.random() >= rate:
      return word
    return lexicon.match_case(options[int(rng.integers(len(options)))], word)

  return _WORD.sub(one, text)
