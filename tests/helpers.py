"""Shared test fixtures: tiny configs and synthetic batches following the batch contract."""

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
