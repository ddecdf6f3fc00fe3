"""A synthetic classification task that in-context examples help with, for jaxft.prompt_eval.

    python -m jaxft.data.synthetic_icl --out runs/icl_data
    # a 4-layer GPT (configs/gpt2.py's default shape) on this corpus and word-level tokenizer:
    # 1,500 steps of 32 x 128 tokens, ~6-8 minutes on 2 CPU cores
    python -m jaxft.train --config configs/gpt2.py --workdir runs/icl \
        --config.data.files=runs/icl_data/pretrain/train.jsonl \
        --config.data.validation_files=runs/icl_data/pretrain/validation.jsonl \
        --config.data.tokenizer=runs/icl_data/tokenizer --config.model.vocab_size=64 \
        --config.batch_size=32 --config.num_steps=1500 --config.optim.warmup_steps=100 \
        --config.eval_every=500 --config.checkpoint_every=500 --config.log_every=50 \
        --config.sample.max_new_tokens=0
    for k in 0 1 4; do python -m jaxft.prompt_eval --workdir runs/icl --k $k \
        --train runs/icl_data/labeled/train.jsonl \
        --validation runs/icl_data/labeled/validation.jsonl \
        --test runs/icl_data/labeled/test.jsonl; done

An example is a few words, each from one of four categories (animal, color, food, tool); its
label is a category, picked by one of two hidden rules:

  first   the category of the first word
  last    the category of the last word

The last word shares the first word's category with probability --agree (1/3 by default), so
on the other examples the two rules disagree. A pretraining document is a run of examples, all
under one rule (picked per document, half and half), written exactly as prompt_eval's default
prompt (`DEFAULT_TEMPLATE` joined by `DEFAULT_SEPARATOR`):

    horse bread red cat
    Label: animal

    sheep rice knife
    Label: animal
    ...

A model that learns this corpus cannot know the rule of a lone query: zero-shot it can only be
sure where the rules agree (accuracy at least --agree, about (1 + agree) / 2 if it splits the
rest evenly; chance is 1/4). Demonstrations whose rules disagree reveal the rule, so accuracy
should rise with k (towards 1).

Writes under --out:
  pretrain/train.jsonl, pretrain/validation.jsonl  {"text": document}, for jaxft.train
  labeled/{train,validation,test}.jsonl            {"text", "label"} under rule --labeled_rule
  tokenizer/                                       a word-level tokenizer of this vocabulary
                                                   (tokenizer.json, special_tokens_map.json)

The tokenizer keeps the LM head to VOCAB_SIZE rows instead of GPT-2's 50,257, so a small GPT
trains on it in minutes on a CPU; the text is also plain English words, so GPT-2's BPE
(the default tokenizer) works as well, only slower. The same --seed gives identical files.
"""

import json
import os

import numpy as np
import tokenizers
from absl import app, flags
from tokenizers import Regex, decoders, models, pre_tokenizers

from jaxft.data.prompts import DEFAULT_SEPARATOR, DEFAULT_TEMPLATE, Template

CATEGORIES = {
    "animal": ("cat", "dog", "horse", "cow", "sheep", "goat"),
    "color": ("red", "blue", "green", "yellow", "black", "white"),
    "food": ("bread", "apple", "cheese", "rice", "soup", "cake"),
    "tool": ("hammer", "saw", "drill", "knife", "rope", "brush"),
}
LABELS = tuple(CATEGORIES)
CATEGORY_OF = {w: c for c, words in CATEGORIES.items() for w in words}
RULES = ("first", "last")
EOS = "<|endoftext|>"
UNK = "[UNK]"
VOCAB_SIZE = 64  # the tokenizer's 61 ids, rounded up: use as --config.model.vocab_size
_TEMPLATE = Template.parse(DEFAULT_TEMPLATE)
# Pretraining corpus of --docs documents: this share goes to the validation file.
_VALIDATION_SHARE = 0.02


def label_of(words: list[str], rule: str) -> str:
  if rule not in RULES:
    raise ValueError(f"rule={rule!r} is not one of {', '.join(RULES)}")
  return CATEGORY_OF[words[0] if rule == "first" else words[-1]]


def make_words(rng: np.random.Generator, agree: float, min_words: int = 3,
               max_words: int = 5) -> list[str]:
  """min_words..max_words words; the last shares the first's category with probability agree."""
  n = int(rng.integers(min_words, max_words + 1))
  words = [str(rng.choice(list(CATEGORY_OF))) for _ in range(n - 1)]
  first = CATEGORY_OF[words[0]]
  if rng.random() < agree:
    last_category = first
  else:
    last_category = str(rng.choice([c for c in LABELS if c != first]))
  return [*words, str(rng.choice(CATEGORIES[last_category]))]


def make_example(rng: np.random.Generator, rule: str, agree: float) -> dict:
  words = make_words(rng, agree)
  return {"text": " ".join(words), "label": label_of(words, rule)}


def make_document(rng: np.random.Generator, rule: str, agree: float, n_examples: int) -> str:
  examples = [make_example(rng, rule, agree) for _ in range(n_examples)]
  return DEFAULT_SEPARATOR.join(_TEMPLATE.example(e["text"], e["label"]) for e in examples)


def pretraining_documents(seed: int, n_docs: int, agree: float, min_examples: int = 6,
                          max_examples: int = 12) -> list[dict]:
  """{"text", "rule"} documents, each rule on half of them (in random order)."""
  rng = np.random.default_rng([seed, 0])
  rules = np.array([RULES[i % 2] for i in range(n_docs)])
  rng.shuffle(rules)
  return [{"text": make_document(rng, str(rule), agree,
                                 int(rng.integers(min_examples, max_examples + 1))),
           "rule": str(rule)} for rule in rules]


def labeled_examples(seed: int, sizes: dict[str, int], rule: str, agree: float) -> dict:
  """{split: [{"text", "label"}]}, every split from its own stream of the seed."""
  out = {}
  for i, (split, n) in enumerate(sizes.items()):
    rng = np.random.default_rng([seed, 1, i])
    out[split] = [make_example(rng, rule, agree) for _ in range(n)]
  return out


def _vocabulary() -> list[str]:
  words = [*CATEGORY_OF, *LABELS]
  tokens = [EOS, UNK, "Label:", "\n", " "]
  for w in words:
    tokens += [w, " " + w]
  return tokens


def write_tokenizer(out_dir: str) -> None:
  """A word-level tokenizer: a word with the space before it is one token, as in GPT-2's BPE,
  so prompt_eval's " animal" after "Label:" is the token the corpus has there."""
  vocab = {t: i for i, t in enumerate(_vocabulary())}
  assert len(vocab) <= VOCAB_SIZE, len(vocab)
  tok = tokenizers.Tokenizer(models.WordLevel(vocab, unk_token=UNK))
  # Pieces: an optional space + a run of non-space characters, a newline, or other whitespace.
  tok.pre_tokenizer = pre_tokenizers.Split(Regex(r" ?[^\s]+|\n|[^\S\n]+"), behavior="isolated")
  tok.decoder = decoders.Fuse()
  tok.add_special_tokens([tokenizers.AddedToken(EOS, special=True)])
  os.makedirs(out_dir, exist_ok=True)
  tok.save(os.path.join(out_dir, "tokenizer.json"))
  special = {"eos_token": EOS, "bos_token": EOS, "unk_token": UNK}
  with open(os.path.join(out_dir, "special_tokens_map.json"), "w") as f:
    json.dump(special, f, indent=2)
  with open(os.path.join(out_dir, "tokenizer_config.json"), "w") as f:
    json.dump({"tokenizer_class": "PreTrainedTokenizerFast", "model_max_length": 1024,
               **special}, f, indent=2)


def _write_jsonl(path: str, records: list[dict]) -> None:
  os.makedirs(os.path.dirname(path), exist_ok=True)
  with open(path, "w", encoding="utf-8") as f:
    for r in records:
      f.write(json.dumps(r) + "\n")


def write_task(out: str, *, seed: int = 0, n_docs: int = 40_000, agree: float = 1 / 3,
               labeled_rule: str = "first",
               sizes: dict[str, int] | None = None) -> dict[str, str]:
  """Writes the corpus, the labeled splits and the tokenizer; returns their paths."""
  if not 0 <= agree <= 1:
    raise ValueError(f"--agree={agree} must be in [0, 1]")
  if labeled_rule not in RULES:
    raise ValueError(f"--labeled_rule={labeled_rule!r} is not one of {', '.join(RULES)}")
  if n_docs < 2:
    raise ValueError(f"--docs={n_docs} must be >= 2 (some go to validation)")
  sizes = sizes or {"train": 1000, "validation": 200, "test": 500}
  docs = pretraining_documents(seed, n_docs, agree)
  n_val = max(1, int(round(n_docs * _VALIDATION_SHARE)))
  paths = {"pretrain_train": os.path.join(out, "pretrain", "train.jsonl"),
           "pretrain_validation": os.path.join(out, "pretrain", "validation.jsonl"),
           "tokenizer": os.path.join(out, "tokenizer")}
  _write_jsonl(paths["pretrain_train"], docs[n_val:])
  _write_jsonl(paths["pretrain_validation"], docs[:n_val])
  for split, examples in labeled_examples(seed, sizes, labeled_rule, agree).items():
    paths[split] = os.path.join(out, "labeled", f"{split}.jsonl")
    _write_jsonl(paths[split], examples)
  write_tokenizer(paths["tokenizer"])
  return paths


def _define_flags() -> None:
  flags.DEFINE_string("out", None, "directory to write the task into")
  flags.DEFINE_integer("seed", 0, "everything written derives from it")
  flags.DEFINE_integer("docs", 40_000, "pretraining documents (6-12 examples each)")
  flags.DEFINE_float("agree", 1 / 3, "probability that the last word's category is the first's")
  flags.DEFINE_enum("labeled_rule", "first", list(RULES), "rule of the labeled splits")


def main(argv):
  del argv
  f = flags.FLAGS
  if not f.out:
    raise app.UsageError("give --out DIR")
  paths = write_task(f.out, seed=f.seed, n_docs=f.docs, agree=f.agree,
                     labeled_rule=f.labeled_rule)
  for name, path in paths.items():
    print(f"{name}: {path}")


if __name__ == "__main__":
  _define_flags()
  app.run(main)
