"""Zero- and few-shot prompting: a causal LM classifies by scoring each label's words (the
library behind `python -m jaxft.prompt_eval`).

    python -m jaxft.prompt_eval --workdir runs/gpt2 --train train.jsonl --test test.jsonl --k 4
    python -m jaxft.prompt_eval --init_from /path/to/hf_gpt2_dir --dataset bbc_news --k 0 \
        --verbalizer business=Business,entertainment=Entertainment,politics=Politics,\
sports=Sport,tech=Technology --scoring mean --output report.json

Data comes through the fine-tuning loader (`jaxft.data.labeled`, "classification"): the built-in
--dataset bbc_news, or your CSV/TSV/JSONL text,label files in --train [--validation --test]
(splits you do not give are carved from train as in fine-tuning: --validation_fraction,
--test_fraction, --split_seed), decoded as --encoding (utf-8) with --encoding_errors (strict, or
replace). Messages from the loader name these flags.

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

Output: accuracy, the per-class table (jaxft.tasks.metrics), chance (1 / number of labels) and the
majority-class rate of the evaluated examples; --output writes them, the settings and the
per-example scores as JSON.
"""

import collections
import dataclasses
import json
import logging
import os
from collections.abc import Sequence

import ml_collections
import numpy as np

from jaxft import hf, tasks
from jaxft.data import labeled
from jaxft.data.errors import BadInputError
from jaxft.data.prompts import (
  DEFAULT_SEPARATOR,
  DEFAULT_TEMPLATE,
  Template,
  build_prompt,
  parse_verbalizer,
  sample_demonstrations,
)
from jaxft.data.textio import Encoding
from jaxft.inference.prompt_scoring import SCORINGS, candidate_scores, score_candidates
from jaxft.models import registry
from jaxft.models.generation import check_token_ids
from jaxft.run import loader
from jaxft.run import workdir as workdir_lib
from jaxft.tasks import metrics

log = logging.getLogger("jaxft")

SPLITS = ("train", "validation", "test")


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
  n_positions = model.cfg.context_length
  if max_len is None:
    return n_positions
  if max_len > n_positions:
    raise ValueError(f"--max_len={max_len} exceeds the model's n_positions={n_positions} (its "
                     f"learned position table); use at most {n_positions}")
  return max_len


def classify(model, params, tokenizer, train: Sequence[dict], examples: Sequence[dict],
             labels: Sequence[str], verbalizer: dict[str, str] | None = None,
             options: Options = Options(), *, indices: Sequence[int] | None = None,
             same_split: bool = False, split: str = "test") -> dict:
  """Scores `examples` ({"text", "label"}; `indices` are their positions in their split, which
  seed the demonstrations) and returns the report (see the module docstring)."""
  # One piece (~70 lines): checks, prompt building, scoring and the report are one pass that
  # reads in the order of the module docstring's method.
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
  check_token_ids(prompts, model.cfg.vocab_size)
  check_token_ids(candidates, model.cfg.vocab_size, "label continuation")

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
  report = metrics.classification_report(truth, predicted.tolist(), labels)
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
  return (metrics.format_classification_report(result["report"])
          + f"\n{result['split']}: accuracy {result['accuracy']:.4f} on {result['examples']} "
          f"examples (k={result['k']}, scoring={result['scoring']}); chance 1/{labels} = "
          f"{result['chance']:.4f}; majority class {result['majority_label']!r} = "
          f"{result['majority_rate']:.4f}\n")


def load_model(workdir: str | None = None, init_from: str | None = None,
               step: int | None = None):
  """(model, variables, tokenizer) of a causal LM: a jaxft run or a Hugging Face directory."""
  if (workdir is None) == (init_from is None):
    raise ValueError("give exactly one of --workdir (a jaxft run) or --init_from (a Hugging Face "
                     "GPT-2 directory)")
  if workdir is not None:
    task = workdir_lib.load_config(workdir).task
    if not tasks.task_class(task).generative:
      raise ValueError(f"--workdir={workdir} trained a {task} model; prompting scores label "
                       "words with a causal LM: give a run of configs/gpt2.py (task causal_lm)")
  else:
    hf_config = hf.read_hf_config(init_from)
    architecture = (hf_config.get("architectures") or [""])[0]
    try:
      _, head, _ = registry.head_of_architecture(architecture, hf_config.get("model_type", ""))
    except ValueError:
      head = None
    if head is None or not tasks.task_class(head).generative:
      what = architecture or f"model_type={hf_config.get('model_type')!r}"
      raise ValueError(f"--init_from={init_from} holds a {what} (config.json), not a causal "
                       "LM; prompting scores label words with a language model: give a GPT-2 "
                       "directory (GPT2LMHeadModel or GPT2Model) or a --workdir of "
                       "configs/gpt2.py")
  run = loader.open_run(workdir or init_from, step=step)
  return run.model, run.variables, run.tokenizer()


def data_config(dataset: str | None = None, train: str = "", validation: str = "",
                test: str = "", text_field: str = "text", label_field: str = "label",
                validation_fraction: float = 0.1, test_fraction: float = 0.1,
                split_seed: int = 0, data_dir: str = "", encoding: str = "utf-8",
                encoding_errors: str = "strict") -> ml_collections.ConfigDict:
  """The `config.data` of configs/finetune.py that jaxft.data.labeled reads; dataset None =
  bbc_news unless --train is given."""
  c = ml_collections.ConfigDict()
  c.dataset = ("" if train else "bbc_news") if dataset is None else dataset
  c.train, c.validation, c.test = train, validation, test
  c.text_field, c.label_field = text_field, label_field
  c.validation_fraction, c.test_fraction = validation_fraction, test_fraction
  c.split_seed = split_seed
  c.data_dir = data_dir
  c.encoding, c.encoding_errors = encoding, encoding_errors
  return c


def load_data(data_cfg) -> dict:
  """{split: examples} through jaxft.data.labeled, its messages speaking of this CLI's flags."""
  try:
    return labeled.load_splits(data_cfg, "classification")
  except BadInputError as e:
    raise e.replace("config.data.", "--") from None
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
  names = label_names(train, examples, labels)
  # A --verbalizer file is read in the data's --encoding.
  verbalizer = parse_verbalizer(verbalizer, names, Encoding.of(data, prefix="--"))
  result = classify(model, params, tokenizer, train, examples, names, verbalizer, options,
                    indices=indices, same_split=split == "train", split=split)
  print(format_report(result))
  if output:
    os.makedirs(os.path.dirname(os.path.abspath(output)), exist_ok=True)
    with open(output, "w") as f:
      json.dump({"model": workdir or init_from, **result}, f, indent=2, ensure_ascii=False)
    print(f"wrote {output}")
  return result
