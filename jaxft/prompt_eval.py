"""Zero- and few-shot prompting: a causal LM classifies by scoring each label's words.

    python -m jaxft.prompt_eval --workdir runs/gpt2 --train train.jsonl --test test.jsonl --k 4
    python -m jaxft.prompt_eval --init_from /path/to/hf_gpt2_dir --dataset bbc_news --k 0 \
        --verbalizer business=Business,entertainment=Entertainment,politics=Politics,\
sports=Sport,tech=Technology --scoring mean --output report.json

Data comes through the fine-tuning loader (`jaxft.data.labeled`, "classification"): the built-in
--dataset bbc_news, or your CSV/TSV/JSONL text,label files in --train [--validation --test]
(splits you do not give are carved from train as in fine-tuning: --validation_fraction,
--test_fraction, --split_seed). Messages from the loader name these flags.

Prompt, for an evaluated example x with k in-context examples d_1..d_k drawn from the train split
(per example, from --seed and the example's index, so a run is reproducible; never x itself
when the train split is the one evaluated):

    [EOS] template(d_1, verbaliser(label_1)) SEP ... template(d_k, ...) SEP head(x)

where SEP is --separator, template is --template with its {text} and {label} fields, and
head(x) is the template up to {label}, without its trailing whitespace. Each label's candidate
continuation is that whitespace followed by the label's verbaliser (--verbalizer; default the
label name): GPT-2's BPE attaches a space to the word after it, so " Sport" scored after
"Label:" is tokenized as it is inside the demonstrations. A candidate's score is the sum
(--scoring sum) or the per-token mean (--scoring mean) of the log-probabilities of its tokens;
the prediction is the best-scoring label. The leading EOS (--bos, on by default) matches how
jaxft packs pretraining documents ([EOS] + text).

Every (prompt, candidate) pair is one row: rows are right-padded (segment id 0) to a few bucket
lengths (powers of two up to the context) and scored by one jitted function in batches of
--batch_size. A prompt that does not fit the context (the model's n_positions, or --max_len)
with the longest candidate is cut from the left: its oldest tokens go, the EOS and the candidate
stay. A warning says how many were cut.

Output: accuracy, the per-class table (jaxft.scoring), chance (1 / number of labels) and the
majority-class rate of the evaluated examples; --output writes them, the settings and the
per-example scores as JSON.
"""

import collections
import dataclasses
import json
import logging
import os
import re
import string
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from absl import app, flags

from jaxft import scoring

log = logging.getLogger("jaxft")

DEFAULT_TEMPLATE = "{text}\nLabel: {label}"
DEFAULT_SEPARATOR = "\n\n"
SCORINGS = ("sum", "mean")
SPLITS = ("train", "validation", "test")
# The HF classes whose weights are a GPT-2 language model (GPT2Model: the LM head is the tied
# embedding); anything else in config.json "architectures" was trained for another task.
_LM_ARCHITECTURES = ("GPT2LMHeadModel", "GPT2Model")
_MIN_BUCKET = 16


# ---------------------------------------------------------------------------------------------
# Prompt text

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


def parse_verbalizer(spec: str | dict | None, labels: Sequence[str]) -> dict[str, str]:
  """--verbalizer ("label=words,label=words", a JSON file {label: words}, or a dict) checked
  against the dataset's labels; None = each label's own name."""
  if not spec:
    return {label: label for label in labels}
  if isinstance(spec, dict):
    mapping = dict(spec)
  elif spec.endswith(".json") or os.path.isfile(spec):
    if not os.path.isfile(spec):
      raise FileNotFoundError(f"--verbalizer={spec!r} is not a file; give a JSON file "
                              "{label: words} or label=words,label=words")
    with open(spec, encoding="utf-8") as f:
      try:
        mapping = json.load(f)
      except json.JSONDecodeError as e:
        raise ValueError(f"--verbalizer={spec} is not valid JSON ({e.msg})") from None
    if not isinstance(mapping, dict):
      raise ValueError(f"--verbalizer={spec} holds a JSON {type(mapping).__name__}; it must be "
                       "an object {label: words}")
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


# ---------------------------------------------------------------------------------------------
# Scoring

def sequence_logprobs(model, params, tokens, positions, segment_ids, starts, targets,
                      target_mask):
  """Summed log p(targets) per row [B]; the one place the model runs.

  tokens, positions, segment_ids [B, T]: prompt + candidate, right-padded (segment 0). The
  candidate's C tokens (targets [B, C], target_mask [B, C] marks the real ones) sit at
  positions starts .. starts + C - 1, so they are predicted at starts - 1 .. : only those C
  positions reach the LM head ([B, C, V] logits, never [B, T, V]). `params` is the params tree
  or the whole variables dict ({"params": ..., plus e.g. a PEFT collection}), as in generate.
  """
  variables = params if "params" in params else {"params": params}
  width = targets.shape[1]

  def forward(module, tokens, positions, segment_ids):
    hidden = module.hidden(tokens, positions, segment_ids, deterministic=True)  # [B, T, D]
    at = jnp.clip(starts[:, None] - 1 + jnp.arange(width)[None], 0, tokens.shape[1] - 1)
    hidden = jnp.take_along_axis(hidden, at[..., None], axis=1)  # [B, C, D]
    return module.transformer.logits(hidden)  # [B, C, V]

  logits = model.apply(variables, tokens, positions, segment_ids, method=forward)
  logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
  picked = jnp.take_along_axis(logp, targets[..., None], axis=-1)[..., 0]  # [B, C]
  return jnp.sum(jnp.where(target_mask, picked, 0.0), axis=-1)


_score_batch = jax.jit(sequence_logprobs, static_argnames=("model",))


@dataclasses.dataclass
class Scores:
  logprobs: np.ndarray  # [N, L] summed log-probability of candidate j after prompt i
  prompts: list[list[int]]  # the token ids each prompt was scored with (prefix, truncation)
  truncated: int  # prompts cut from the left to fit the context


def fit_prompt(prompt: Sequence[int], room: int, prefix: Sequence[int] = ()) -> list[int]:
  """prefix + the newest tokens of prompt, at most `room` tokens in all."""
  keep = room - len(prefix)
  return [*prefix, *(prompt[len(prompt) - keep:] if len(prompt) > keep else prompt)]


def _bucket(length: int, max_len: int) -> int:
  """Padded row length: the next power of two (at least _MIN_BUCKET), at most max_len."""
  size = _MIN_BUCKET
  while size < length:
    size *= 2
  return min(size, max_len)


def score_candidates(model, params, prompts: Sequence[Sequence[int]],
                     candidates: Sequence[Sequence[int]], *, max_len: int, batch_size: int,
                     prefix: Sequence[int] = ()) -> Scores:
  """Log-likelihood of every candidate continuation after every prompt.

  Each prompt is `prefix + prompt`, cut from the left (the prefix stays) so that it fits
  `max_len` tokens with the longest candidate; every candidate of a prompt sees the same tokens.
  """
  if not candidates or any(not c for c in candidates):
    raise ValueError("every candidate needs at least one token (is a verbaliser empty after "
                     "tokenization?)")
  width = max(len(c) for c in candidates)
  room = max_len - width
  if room < len(prefix) + 1:
    raise ValueError(f"the longest label continuation has {width} tokens, which leaves no room "
                     f"for a prompt in {max_len} tokens of context; shorten the --verbalizer "
                     "words or raise --max_len (up to the model's n_positions)")
  params = jax.device_put(params)  # once, not per batch (HF weights arrive as numpy)
  fitted = [fit_prompt(p, room, prefix) for p in prompts]
  truncated = sum(len(prefix) + len(p) > room for p in prompts)
  for i, p in enumerate(fitted):
    if not p:
      raise ValueError(f"prompt {i} has no tokens; keep --bos on (the EOS token starts it) or "
                       "use a --template with text before {label}")

  rows = [(i, j) for i in range(len(fitted)) for j in range(len(candidates))]
  by_length = collections.defaultdict(list)
  for i, j in rows:
    by_length[_bucket(len(fitted[i]) + len(candidates[j]), max_len)].append((i, j))
  pending = []
  for length, bucket in sorted(by_length.items()):
    for start in range(0, len(bucket), batch_size):
      chunk = bucket[start:start + batch_size]
      # A short last batch is padded to a power of two: few shapes, few compilations.
      b = min(batch_size, 1 << (len(chunk) - 1).bit_length())
      tokens = np.zeros((b, length), np.int32)
      positions = np.zeros((b, length), np.int32)
      segments = np.zeros((b, length), np.int32)
      starts = np.ones((b,), np.int32)
      targets = np.zeros((b, width), np.int32)
      mask = np.zeros((b, width), bool)
      for r, (i, j) in enumerate(chunk):
        row = fitted[i] + list(candidates[j])
        tokens[r, :len(row)] = row
        positions[r, :len(row)] = np.arange(len(row))
        segments[r, :len(row)] = 1
        starts[r] = len(fitted[i])
        targets[r, :len(candidates[j])] = candidates[j]
        mask[r, :len(candidates[j])] = True
      pending.append((chunk, _score_batch(model, params, tokens, positions, segments, starts,
                                          targets, mask)))
  logprobs = np.zeros((len(fitted), len(candidates)), np.float64)
  for chunk, out in pending:
    out = np.asarray(jax.device_get(out))
    for r, (i, j) in enumerate(chunk):
      logprobs[i, j] = out[r]
  return Scores(logprobs, fitted, truncated)


def candidate_scores(logprobs: np.ndarray, lengths: Sequence[int], method: str) -> np.ndarray:
  """sum: the summed log-probability; mean: divided by the candidate's token count."""
  if method == "sum":
    return logprobs
  if method == "mean":
    return logprobs / np.asarray(lengths, np.float64)[None]
  raise ValueError(f"--scoring={method!r} is not one of {', '.join(SCORINGS)}")


# ---------------------------------------------------------------------------------------------
# Evaluation

@dataclasses.dataclass(frozen=True)
class Options:
  k: int = 0  # in-context examples per prompt; 0 = zero-shot
  seed: int = 0  # demonstrations (and the --max_examples subset) derive from it
  template: str = DEFAULT_TEMPLATE
  separator: str = DEFAULT_SEPARATOR
  scoring: str = "sum"  # "sum" or "mean" (length-normalised)
  max_len: int | None = None  # context in tokens; None = the model's n_positions
  batch_size: int = 16  # rows (prompt, candidate) per jitted call
  bos: bool = True  # start every prompt with the tokenizer's EOS token

  def validate(self) -> None:
    if self.k < 0:
      raise ValueError(f"--k={self.k} must be >= 0 (0 = zero-shot)")
    if self.seed < 0:
      raise ValueError(f"--seed={self.seed} must be >= 0")
    if self.scoring not in SCORINGS:
      raise ValueError(f"--scoring={self.scoring!r} is not one of {', '.join(SCORINGS)}")
    if self.batch_size < 1:
      raise ValueError(f"--batch_size={self.batch_size} must be >= 1")
    if self.max_len is not None and self.max_len < 2:
      raise ValueError(f"--max_len={self.max_len} must be >= 2")


def context_length(model, max_len: int | None) -> int:
  n_positions = model.cfg.n_positions
  if max_len is None:
    return n_positions
  if max_len > n_positions:
    raise ValueError(f"--max_len={max_len} exceeds the model's n_positions={n_positions} (its "
                     f"learned position table); use at most {n_positions}")
  return max_len


def evaluate(model, params, tokenizer, train: Sequence[dict], examples: Sequence[dict],
             labels: Sequence[str], verbalizer: dict[str, str] | None = None,
             options: Options = Options(), *, indices: Sequence[int] | None = None,
             same_split: bool = False, split: str = "test") -> dict:
  """Scores `examples` ({"text", "label"}; `indices` are their positions in their split, which
  seed the demonstrations) and returns the report (see the module docstring)."""
  options.validate()
  if not examples:
    raise ValueError(f"the {split} split holds no examples; pick another --split or give a "
                     f"--{split} file with examples")
  indices = list(range(len(examples))) if indices is None else list(indices)
  labels = list(labels)
  verbalizer = parse_verbalizer(verbalizer, labels)
  for name, rows, where in (("train", train, range(len(train))), (split, examples, indices)):
    for n, e in zip(where, rows):
      if e["label"] not in labels:
        raise ValueError(f"{name} example {n} has label {e['label']!r}, which is not in the "
                         f"label set {labels}; add it to --labels")
  template = Template.parse(options.template)
  max_len = context_length(model, options.max_len)
  prefix = []
  if options.bos:
    if tokenizer.eos_id is None:
      raise ValueError("--bos starts prompts with the tokenizer's end-of-text token, but this "
                       "tokenizer has none; pass --nobos")
    prefix = [tokenizer.eos_id]

  demos = sample_demonstrations(len(train), indices, options.k, options.seed, same_split)
  texts = []
  for e, picks in zip(examples, demos):
    shots = [(train[p]["text"], verbalizer[train[p]["label"]]) for p in picks]
    texts.append(build_prompt(template, options.separator, e["text"], shots))
  prompts = tokenizer.encode_batch(texts)
  candidates = [tokenizer.encode(template.gap + verbalizer[label]) for label in labels]
  vocab = model.cfg.vocab_size
  if max(max(p, default=0) for p in [*prompts, *candidates]) >= vocab:
    raise ValueError(f"the tokenizer produced ids >= the model's vocab_size={vocab}: it is not "
                     "the model's tokenizer")

  scored = score_candidates(model, params, prompts, candidates, max_len=max_len,
                            batch_size=options.batch_size, prefix=prefix)
  if scored.truncated:
    lost, fix = (("the start of their first in-context example", "lower --k, shorten "
                  "--template / --separator") if options.k else
                 ("the start of the text", "shorten --template or the texts"))
    log.warning("%d of %d prompts were longer than the %d-token context (with the longest "
                "label) and lost their oldest tokens (%s); to avoid it %s, or use a model with a "
                "longer context", scored.truncated, len(prompts), max_len, lost, fix)
  lengths = [len(c) for c in candidates]
  scores = candidate_scores(scored.logprobs, lengths, options.scoring)
  predicted = np.argmax(scores, axis=-1)
  truth = [labels.index(e["label"]) for e in examples]
  report = scoring.classification_report(truth, predicted.tolist(), labels)
  counts = collections.Counter(e["label"] for e in examples)
  majority, majority_n = max(counts.items(), key=lambda kv: (kv[1], -labels.index(kv[0])))
  return {
      "split": split, "examples": len(examples), "k": options.k, "seed": options.seed,
      "scoring": options.scoring, "template": options.template,
      "separator": options.separator, "bos": options.bos, "max_len": max_len,
      "verbalizer": verbalizer, "candidate_tokens": dict(zip(labels, lengths)),
      "accuracy": report["accuracy"], "chance": 1.0 / len(labels),
      "majority_label": majority, "majority_rate": majority_n / len(examples),
      "truncated_prompts": scored.truncated, "report": report,
      "predictions": [
          {"index": n, "label": e["label"], "prediction": labels[p],
           "logprobs": dict(zip(labels, row.tolist()))}
          for n, e, p, row in zip(indices, examples, predicted, scored.logprobs)],
  }


def format_report(result: dict) -> str:
  labels = len(result["report"]["per_class"])
  return (scoring.format_classification_report(result["report"])
          + f"\n{result['split']}: accuracy {result['accuracy']:.4f} on {result['examples']} "
          f"examples (k={result['k']}, scoring={result['scoring']}); chance 1/{labels} = "
          f"{result['chance']:.4f}; majority class {result['majority_label']!r} = "
          f"{result['majority_rate']:.4f}\n")


# ---------------------------------------------------------------------------------------------
# Model and data

def load_model(workdir: str | None = None, init_from: str | None = None,
               step: int | None = None):
  """(model, params, tokenizer) of a causal LM: a jaxft run or a Hugging Face GPT-2 directory."""
  from jaxft import generate

  if (workdir is None) == (init_from is None):
    raise ValueError("give exactly one of --workdir (a jaxft run) or --init_from (a Hugging Face "
                     "GPT-2 directory)")
  if workdir is not None:
    from jaxft import checkpoint

    task = checkpoint.load_config(workdir).task
    if task != "causal_lm":
      raise ValueError(f"--workdir={workdir} trained a {task} model; prompting scores label "
                       "words with a causal LM: give a run of configs/gpt2.py (task causal_lm)")
    return generate.load_from_workdir(workdir, step)
  from jaxft import hf

  hf_config = hf.read_hf_config(init_from)
  architectures = hf_config.get("architectures") or []
  if hf_config.get("model_type") != "gpt2" or any(
      a not in _LM_ARCHITECTURES for a in architectures):
    what = architectures[0] if architectures else f"model_type={hf_config.get('model_type')!r}"
    raise ValueError(f"--init_from={init_from} holds a {what} (config.json), not a causal LM; "
                     "prompting scores label words with a language model: give a GPT-2 "
                     f"directory ({' or '.join(_LM_ARCHITECTURES)}) or a --workdir of "
                     "configs/gpt2.py")
  return generate.load_from_hf(init_from)


def data_config(dataset: str | None = None, train: str = "", validation: str = "",
                test: str = "", text_field: str = "text", label_field: str = "label",
                validation_fraction: float = 0.1, test_fraction: float = 0.1,
                split_seed: int = 0, data_dir: str = "") -> ml_collections.ConfigDict:
  """The `config.data` of configs/finetune.py that jaxft.data.labeled reads; dataset None =
  bbc_news unless --train is given."""
  c = ml_collections.ConfigDict()
  c.dataset = ("" if train else "bbc_news") if dataset is None else dataset
  c.train, c.validation, c.test = train, validation, test
  c.text_field, c.label_field = text_field, label_field
  c.validation_fraction, c.test_fraction = validation_fraction, test_fraction
  c.split_seed = split_seed
  c.data_dir = data_dir
  return c


def load_data(data_cfg) -> dict:
  """{split: examples} through jaxft.data.labeled, its messages speaking of this CLI's flags."""
  from jaxft.data import labeled

  try:
    return labeled.load_splits(data_cfg, "classification")
  except (ValueError, FileNotFoundError) as e:
    raise type(e)(str(e).replace("config.data.", "--")) from None


def label_names(train: Sequence[dict], examples: Sequence[dict], labels: str = "") -> list[str]:
  """--labels in its order, else the sorted labels of train and the evaluated examples."""
  found = {e["label"] for e in train} | {e["label"] for e in examples}
  if not labels:
    return sorted(found)
  names = [name.strip() for name in labels.split(",")]
  if len(set(names)) != len(names) or not all(names):
    raise ValueError(f"--labels={labels!r} must list distinct, non-empty names")
  missing = sorted(found - set(names))
  if missing:
    raise ValueError(f"--labels={labels!r} lacks {missing}, which the data holds; add them")
  return names


def select(n: int, max_examples: int | None, seed: int) -> list[int]:
  """Indices of the examples to score: all, or max_examples drawn with the seed (in order)."""
  if max_examples is None or max_examples >= n:
    return list(range(n))
  if max_examples < 1:
    raise ValueError(f"--max_examples={max_examples} must be >= 1")
  return sorted(int(i) for i in np.random.default_rng(seed).choice(n, max_examples,
                                                                   replace=False))


def run(*, workdir: str | None = None, init_from: str | None = None, step: int | None = None,
        split: str = "test", max_examples: int | None = None, labels: str = "",
        verbalizer: str | None = None, output: str | None = None, options: Options = Options(),
        **data) -> dict:
  """The CLI: load the model and data, score, print the report and write --output."""
  if split not in SPLITS:
    raise ValueError(f"--split={split!r} is not one of {', '.join(SPLITS)}")
  options.validate()
  model, params, tokenizer = load_model(workdir, init_from, step)
  splits = load_data(data_config(**data))
  train, source = splits["train"], splits[split]
  indices = select(len(source), max_examples, options.seed)
  examples = [source[i] for i in indices]
  train = [train[i] for i in range(len(train))]
  result = evaluate(model, params, tokenizer, train, examples,
                    label_names(train, examples, labels), verbalizer, options, indices=indices,
                    same_split=split == "train", split=split)
  print(format_report(result))
  if output:
    os.makedirs(os.path.dirname(os.path.abspath(output)), exist_ok=True)
    with open(output, "w") as f:
      json.dump({"model": workdir or init_from, **result}, f, indent=2, ensure_ascii=False)
    print(f"wrote {output}")
  return result


# ---------------------------------------------------------------------------------------------
# CLI

def _define_flags() -> None:
  """Only when run as a program (other modules define --workdir too)."""
  flags.DEFINE_string("workdir", None, "jaxft run of configs/gpt2.py (causal LM) to prompt")
  flags.DEFINE_integer("step", None, "checkpoint step in --workdir (default: the best/latest)")
  flags.DEFINE_string("init_from", None, "local Hugging Face GPT-2 directory instead")
  flags.DEFINE_string("dataset", None, "built-in dataset (bbc_news); default bbc_news unless "
                      "--train is given")
  flags.DEFINE_string("train", "", "your .csv/.tsv/.jsonl training file (demonstrations)")
  flags.DEFINE_string("validation", "", "validation file ('' = carved from --train)")
  flags.DEFINE_string("test", "", "test file ('' = carved from --train)")
  flags.DEFINE_string("text_field", "text", "column / JSON field holding the text")
  flags.DEFINE_string("label_field", "label", "column / JSON field holding the label")
  flags.DEFINE_float("validation_fraction", 0.1, "share of --train carved into validation")
  flags.DEFINE_float("test_fraction", 0.1, "share of --train carved into test")
  flags.DEFINE_integer("split_seed", 0, "shuffle seed for carving splits")
  flags.DEFINE_string("data_dir", "", "TFDS cache ('' = $JAXFT_DATA_DIR or ~/.cache/jaxft/tfds)")
  flags.DEFINE_enum("split", "test", list(SPLITS), "split to score")
  flags.DEFINE_integer("max_examples", None, "score this many examples of the split (drawn "
                       "with --seed); default all")
  flags.DEFINE_string("labels", "", "comma-separated label order of the report; default sorted")
  flags.DEFINE_integer("k", 0, "in-context examples per prompt, from the train split; 0 = "
                       "zero-shot")
  flags.DEFINE_integer("seed", 0, "seed of the in-context examples and --max_examples subset")
  flags.DEFINE_string("template", DEFAULT_TEMPLATE.replace("\n", "\\n"), "one example: "
                      "{text} then {label} (last); \\n and \\t are newline and tab")
  flags.DEFINE_string("separator", DEFAULT_SEPARATOR.replace("\n", "\\n"), "between examples "
                      "(\\n = newline)")
  flags.DEFINE_string("verbalizer", None, "label words: label=words,label=words or a JSON file "
                      "{label: words}; default the label names")
  flags.DEFINE_enum("scoring", "sum", list(SCORINGS), "candidate score: summed log-probability "
                    "or its per-token mean")
  flags.DEFINE_integer("max_len", None, "context in tokens (default the model's n_positions); "
                       "longer prompts lose their oldest tokens")
  flags.DEFINE_integer("batch_size", 16, "(prompt, label) rows per jitted call")
  flags.DEFINE_boolean("bos", True, "start each prompt with the EOS token, as jaxft "
                       "pretraining documents start")
  flags.DEFINE_string("output", None, "write the report, settings and per-example scores here "
                      "(JSON)")


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments {argv[1:]}")
  f = flags.FLAGS
  options = Options(k=f.k, seed=f.seed, template=unescape(f.template),
                    separator=unescape(f.separator), scoring=f.scoring, max_len=f.max_len,
                    batch_size=f.batch_size, bos=f.bos)
  try:
    run(workdir=f.workdir, init_from=f.init_from, step=f.step, split=f.split,
        max_examples=f.max_examples, labels=f.labels, verbalizer=f.verbalizer, output=f.output,
        options=options, dataset=f.dataset, train=f.train, validation=f.validation, test=f.test,
        text_field=f.text_field, label_field=f.label_field,
        validation_fraction=f.validation_fraction, test_fraction=f.test_fraction,
        split_seed=f.split_seed, data_dir=f.data_dir)
  except (ValueError, FileNotFoundError) as e:  # a setting to fix: the message, no traceback
    raise SystemExit(f"jaxft.prompt_eval: {e}") from None


if __name__ == "__main__":
  _define_flags()
  app.run(main)
