"""Shared test fixtures: tiny configs and synthetic batches following the batch contract."""

import json
import os

import numpy as np

from configs import gpt2 as gpt2_configs

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def tiny_config(**model):
  config = gpt2_configs.get_config("tiny")
  config.model.update(dict(vocab_size=512, n_layer=2, n_embd=64, n_head=8, n_positions=64,
                           embd_pdrop=0.0, attn_pdrop=0.0, resid_pdrop=0.0), **model)
  config.seq_len = 16
  config.batch_size = 8
  return config


def random_batch(config, seed=0, batch_size=None):
  """Packed rows with two segments per row and a few masked targets."""
  rng = np.random.default_rng(seed)
  b, t = batch_size or config.batch_size, config.seq_len
  tokens = rng.integers(0, config.model.vocab_size, size=(b, t + 1), dtype=np.int32)
  cut = t // 2
  segment_ids = np.where(np.arange(t) < cut, 1, 2).astype(np.int32)[None].repeat(b, 0)
  positions = np.where(np.arange(t) < cut, np.arange(t), np.arange(t) - cut).astype(np.int32)
  loss_mask = np.ones((b, t), np.float32)
  loss_mask[:, cut - 1] = 0.0  # the target of a segment's last token lies in the next segment
  return {"inputs": tokens[:, :-1], "targets": tokens[:, 1:], "loss_mask": loss_mask,
          "positions": positions[None].repeat(b, 0), "segment_ids": segment_ids}


WORDS = ("the king queen speak lord lady night day love death sword crown castle war peace "
         "thou thee art hath doth come go fair foul heart blood sleep dream honour").split()


def write_corpus(directory, n_docs=24, words_per_doc=300, seed=0):
  """Small .txt documents of pseudo-English; returns the glob that matches them."""
  rng = np.random.default_rng(seed)
  os.makedirs(directory, exist_ok=True)
  for i in range(n_docs):
    lines = []
    for _ in range(words_per_doc // 10):
      lines.append(" ".join(rng.choice(WORDS, size=10)).capitalize() + ".")
    with open(os.path.join(directory, f"doc{i:03d}.txt"), "w") as f:
      f.write("\n".join(lines) + "\n")
  return os.path.join(directory, "*.txt")


def train_config(tmp_path, **overrides):
  """The tiny variant on a generated corpus, with its TFDS cache inside tmp_path."""
  from configs import gpt2 as gpt2_configs
  config = gpt2_configs.get_config("tiny")
  config.data.files = write_corpus(str(tmp_path / "corpus"))
  config.data.data_dir = str(tmp_path / "tfds")
  return set_fields(config, overrides)


def set_fields(config, overrides: dict):
  """Dotted overrides ({"optim.lr": 1e-3}), as --config.optim.lr=1e-3 would set them."""
  for key, value in overrides.items():
    node = config
    *parents, leaf = key.split(".")
    for p in parents:
      node = node[p]
    node[leaf] = value
  return config


def cached_logits(model, variables, tokens, positions, prefill: int):
  """Logits [B, T, V] of `tokens` decoded through the KV cache: the first `prefill` tokens at
  once, then one token a step (what jaxft.generate does)."""
  import jax.numpy as jnp

  from jaxft.models import generation
  ones = jnp.ones_like(tokens)
  cache = generation.empty_cache(model, tokens.shape[0], tokens.shape[1])
  out, start = [], 0
  for end in [prefill, *range(prefill + 1, tokens.shape[1] + 1)]:
    logits, mutated = model.apply({**variables, "cache": cache}, tokens[:, start:end],
                                  positions[:, start:end], ones[:, start:end], decode=True,
                                  mutable=["cache"])
    cache, start = mutated["cache"], end
    out.append(logits)
  return jnp.concatenate(out, axis=1)


# -- fine-tuning: a tiny random BERT with all-MiniLM-L6-v2's tokenizer, keyword topics --------

TINY_BERT = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                 intermediate_size=64, max_position_embeddings=128)
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                   "vocab.txt")
SPORT = "match goal team coach striker league cup score season player".split()
MONEY = "bank shares profit market investor economy price trade growth fund".split()
FILLER = "the a of and in on with for today said".split()


def save_tiny_bert(path, seed: int = 0) -> str:
  """A random-init transformers BertModel directory with the real all-MiniLM-L6-v2 tokenizer."""
  import shutil

  import torch
  import transformers

  from configs import common

  torch.manual_seed(seed)
  transformers.BertModel(transformers.BertConfig(**TINY_BERT)).save_pretrained(path)
  for name in TOKENIZER_FILES:
    shutil.copy(os.path.join(common.minilm_dir(), name), path)
  return str(path)


def topic_rows(n, seed):
  """Two keyword topics (sport / money) a tiny model learns in a few dozen steps."""
  rng = np.random.default_rng(seed)
  rows = []
  for i in range(n):
    label, words = ("sport", SPORT) if i % 2 else ("money", MONEY)
    text = " ".join(rng.choice(list(words) * 2 + FILLER, size=12))
    rows.append({"text": text, "label": label})
  return rows


def write_csv(path, rows):
  import csv

  with open(path, "w", newline="") as f:
    w = csv.DictWriter(f, fieldnames=["text", "label"])
    w.writeheader()
    w.writerows(rows)
  return str(path)


def open_trained(path, **kwargs):
  """(config, task, variables) of a trained run, through the one loader (jaxft/run/loader.py)."""
  from jaxft.run import loader

  run = loader.open_run(str(path), **kwargs)
  return run.config, run.task, run.variables


def eval_outputs(task, variables, batches):
  """Host outputs of the task's eval_outputs over `batches` on one device (the inference path)."""
  from jaxft.run import evaluation

  return evaluation.run_batches(evaluation.single_device_eval(task), batches, variables)


def loss_rows(workdir) -> list[tuple]:
  """(step, train loss, validation loss) of each metrics row that has either, in file order."""
  from jaxft.run import workdir as workdir_lib

  return [(r["step"], r.get("train/loss"), r.get("val/loss"))
          for r in workdir_lib.read_metrics(workdir) if "train/loss" in r or "val/loss" in r]


def write_conll(path, n, seed):
  """n CoNLL sentences of 4-8 chunks: Paris (B-LOC), John Smith (B-PER I-PER), filler (O)."""
  rng = np.random.default_rng(seed)
  lines = []
  for _ in range(n):
    words, tags = [], []
    for _ in range(rng.integers(4, 9)):
      r = rng.random()
      if r < 0.2:
        words += ["Paris"]
        tags += ["B-LOC"]
      elif r < 0.35:
        words += ["John", "Smith"]
        tags += ["B-PER", "I-PER"]
      else:
        words += [str(rng.choice(FILLER))]
        tags += ["O"]
    lines += [f"{w} X {t}" for w, t in zip(words, tags)] + [""]
  path.write_text("\n".join(lines) + "\n")
  return str(path)


def write_squad(path, n, seed, bad=False):
  """n SQuAD 1.1 questions whose answer is the city of a context of 11-67 words; `bad`: one
  answer_start off by one."""
  rng = np.random.default_rng(seed)
  paragraphs = []
  for i in range(n):
    city = str(rng.choice(["Paris", "Rome", "Oslo", "Lima", "Cairo"]))
    filler = " ".join(rng.choice(FILLER, size=int(rng.integers(3, 30))))
    context = f"{filler} the meeting was held in {city} . {filler}"
    start = context.index(city) + (1 if bad and i == 3 else 0)
    paragraphs.append({"context": context, "qas": [{
        "id": f"q{i}", "question": "where was the meeting held ?",
        "answers": [{"text": city, "answer_start": start}]}]})
  path.write_text(json.dumps({"version": "1.1", "data": [{"title": "t",
                                                            "paragraphs": paragraphs}]}))
  return str(path)
