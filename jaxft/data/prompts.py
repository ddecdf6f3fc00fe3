"""Prompt text for few/zero-shot classification: a --template split at its {label} field,
verbalisers (the words each label is scored as), in-context demonstrations drawn per example
from a seed, and the prompt that strings them together (see jaxft/inference/prompting.py for
the whole method)."""

import collections
import dataclasses
import os
import re
import string
from collections.abc import Sequence

import numpy as np

from jaxft.data import textio
from jaxft.data.errors import bad_input

DEFAULT_TEMPLATE = "{text}\nLabel: {label}"
DEFAULT_SEPARATOR = "\n\n"


@dataclasses.dataclass(frozen=True)
class Template:
  """A --template split at its {label} field."""

  template: str
  head: tuple[tuple[str, bool], ...]  # (literal, is the {text} field) parts before {label}
  tail: str  # literal text after {label}

  @classmethod
  def parse(cls, template: str) -> "Template":
    try:
      parts = list(string.Formatter().parse(template))
    except ValueError as e:
      raise ValueError(f"--template={template!r} is not a valid format string ({e}); write "
                       "literal braces as {{ and }}") from None
    head: list[tuple[str, bool]] = []
    tail, seen_label, seen_text = "", False, False
    for literal, field, spec, conversion in parts:
      if field is not None and (spec or conversion):
        raise ValueError(f"--template={template!r}: write plain {{text}} and {{label}} fields, "
                         "without a format spec or conversion")
      if field not in (None, "text", "label"):
        raise ValueError(f"--template={template!r} has a field {{{field}}}; only {{text}} and "
                         "{label} are filled (write literal braces as {{ and }})")
      if seen_label:
        if field is not None:
          raise ValueError(f"--template={template!r} has a field after {{label}}; the label "
                           "must come last (the query leaves it open), e.g. "
                           f"{DEFAULT_TEMPLATE!r}")
        tail += literal
        continue
      head.append((literal, False))
      if field == "text":
        head.append(("", True))
        seen_text = True
      elif field == "label":
        seen_label = True
    if not seen_label or not seen_text:
      raise ValueError(f"--template={template!r} needs a {{text}} field and then one {{label}} "
                       f"field, e.g. {DEFAULT_TEMPLATE!r}")
    return cls(template, tuple(head), tail)

  @property
  def gap(self) -> str:
    """The whitespace right before {label}: it starts every candidate continuation."""
    literal = self.head[-1][0]
    return literal[len(literal.rstrip()):]

  def query(self, text: str) -> str:
    """The template up to {label}, without the gap: the open prompt of an example."""
    head = "".join(text if is_text else literal for literal, is_text in self.head)
    return head[:len(head) - len(self.gap)]

  def example(self, text: str, verbal: str) -> str:
    """A demonstration: the whole template with the label's words filled in."""
    return self.query(text) + self.gap + verbal + self.tail


def unescape(value: str) -> str:
  r"""\n, \t and \\ written on a command line -> newline, tab, backslash."""
  return re.sub(r"\\([nt\\])", lambda m: {"n": "\n", "t": "\t", "\\": "\\"}[m.group(1)], value)


def parse_verbalizer(spec: str | dict | None, labels: Sequence[str],
                     encoding: textio.Encoding = textio.FLAGS_UTF8) -> dict[str, str]:
  """--verbalizer ("label=words,label=words", a JSON file {label: words} in `encoding`, or a
  dict) checked against the dataset's labels; None = each label's own name."""
  if not spec:
    return {label: label for label in labels}
  if isinstance(spec, dict):
    mapping = dict(spec)
  elif spec.endswith(".json") or os.path.isfile(spec):
    if not os.path.isfile(spec):
      raise FileNotFoundError(f"--verbalizer={spec!r} is not a file; give a JSON file "
                              "{label: words} or label=words,label=words")
    mapping = textio.json_value(textio.read_text(spec, encoding), spec, None,
                                "--verbalizer takes a JSON object {label: words}")
    if not isinstance(mapping, dict):
      raise bad_input(spec, None, f"holds a JSON {textio.json_type(mapping)}",
                      "--verbalizer takes a JSON object {label: words}")
  else:
    mapping = {}
    for item in spec.split(","):
      label, eq, verbal = item.partition("=")
      if not eq or not label.strip():
        raise ValueError(f"--verbalizer entry {item!r} is not label=words; write e.g. "
                         "business=Business,sport=Sport (or give a JSON file for labels that "
                         "hold ',' or '=')")
      if label.strip() in mapping:
        raise ValueError(f"--verbalizer names label {label.strip()!r} twice")
      mapping[label.strip()] = unescape(verbal.strip())
  for label, verbal in mapping.items():
    if not isinstance(verbal, str) or not verbal.strip():
      raise ValueError(f"--verbalizer gives label {label!r} the words {verbal!r}; give each "
                       "label a non-empty string")
  missing = [label for label in labels if label not in mapping]
  if missing:
    raise ValueError(f"--verbalizer has no words for label(s) {missing} (the dataset's labels: "
                     f"{list(labels)}); add {missing[0]}=WORDS for each, or drop --verbalizer "
                     "to use the label names themselves")
  unknown = [label for label in mapping if label not in labels]
  if unknown:
    raise ValueError(f"--verbalizer names label(s) {unknown} that are not in the dataset (its "
                     f"labels: {list(labels)}); fix their spelling or remove them")
  by_words = collections.defaultdict(list)
  for label in labels:
    by_words[mapping[label]].append(label)
  clashes = [names for names in by_words.values() if len(names) > 1]
  if clashes:
    raise ValueError(f"--verbalizer gives labels {clashes[0]} the same words "
                     f"{mapping[clashes[0][0]]!r}; they could never be told apart")
  return {label: mapping[label] for label in labels}


def sample_demonstrations(n_train: int, indices: Sequence[int], k: int, seed: int,
                          same_split: bool) -> list[list[int]]:
  """For each evaluated example index, k distinct train indices drawn from (seed, index).

  With same_split (the evaluated split is train) an example never demonstrates itself."""
  pool = n_train - 1 if same_split else n_train
  if k > pool:
    where = " (less the evaluated example itself)" if same_split else ""
    raise ValueError(f"--k={k} in-context examples asked for, but the train split has {pool}"
                     f"{where}; lower --k to at most {pool} or give more training examples")
  out = []
  for i in indices:
    picks = np.random.default_rng([seed, int(i)]).choice(pool, size=k, replace=False)
    if same_split:
      picks = picks + (picks >= i)  # skip the example itself
    out.append([int(p) for p in picks])
  return out


def build_prompt(template: Template, separator: str, text: str,
                 demonstrations: Sequence[tuple[str, str]]) -> str:
  """Demonstrations [(text, verbalised label)] then the open query (without the gap)."""
  parts = [template.example(t, v) for t, v in demonstrations]
  return separator.join([*parts, template.query(text)])
