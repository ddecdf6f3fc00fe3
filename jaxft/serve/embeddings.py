"""/v1/embeddings: sentence embeddings of a BERT-family model, as sentence-transformers'
all-MiniLM-L6-v2 pipeline computes them (its modules.json: Transformer -> Pooling with
pooling_mode_mean_tokens -> Normalize): the backbone's last hidden states averaged over the
real tokens (the attention mask), then L2-normalised.

Two sources: a Hugging Face BertModel directory (a headless encoder such as all-MiniLM-L6-v2,
which jaxft.run.loader.open_run does not open since it has no task head: the jaxft BertModel
is built from its config.json and filled through jaxft.hf's BertModel table), and any opened
BERT-family run (a fine-tuned classifier, tagger, QA or MLM model: its backbone's hidden
states, LoRA folded in). Texts are truncated to the row length, [CLS] and [SEP] kept: the
directory's sentence_bert_config.json max_seq_length (256 for all-MiniLM-L6-v2) when it has
one, else its position table; a run's config.seq_len.
"""

import json
import os
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import linen as nn

from jaxft import hf, quant
from jaxft.data.tokenizer import has_tokenizer, load_tokenizer
from jaxft.models import bert, registry
from jaxft.run import loader
from jaxft.run import workdir as workdir_lib
from jaxft.serve.buckets import BucketRunner
from jaxft.serve.items import check_items
from jaxft.tasks.classification import pad_encodings

ENDPOINT = "embeddings"
_ST_CONFIG = "sentence_bert_config.json"


def mean_pool_normalize(hidden, segment_ids):
  """[B, T, D] hidden states -> [B, D]: the mean over real tokens (segment id > 0), divided by
  its L2 norm; the clamps are sentence-transformers' (Pooling: 1e-9, Normalize: 1e-12)."""
  mask = (segment_ids > 0).astype(jnp.float32)[..., None]
  mean = jnp.sum(hidden.astype(jnp.float32) * mask, axis=1) / jnp.maximum(mask.sum(1), 1e-9)
  norm = jnp.linalg.norm(mean, axis=-1, keepdims=True)
  return mean / jnp.maximum(norm, 1e-12)


def is_headless_bert(path) -> bool:
  """A Hugging Face directory holding a bare BertModel (no task head, so no open_run)."""
  if not isinstance(path, str) or not os.path.isdir(path) or workdir_lib.is_workdir(path):
    return False
  if not os.path.exists(os.path.join(path, hf.CONFIG_FILE)):
    return False
  config = hf.read_hf_config(path)
  return (config.get("model_type") == "bert"
          and (config.get("architectures") or ["BertModel"])[0] == "BertModel")


class EmbeddingEndpoint:
  """{"text"} items -> {"embedding": [float, ...]} (unit length), in bucketed device calls."""

  name = ENDPOINT
  fields = ("text",)

  def __init__(self, cfg: bert.BertConfig, params, tokenizer, max_len: int, *,
               seq_buckets: Sequence[int], batch_buckets: Sequence[int]):
    module = bert.BertModel(cfg, add_pooling_layer="pooler" in params)
    self.max_len = max_len
    # One truncating copy for every batch (a copy re-parses the whole tokenizer).
    self._encoder = tokenizer.private_copy(max_len)
    self._pad = tokenizer.special_id("pad_token")

    def embed(variables, batch):
      # A quantised run's int weights become float inside this jit (jaxft/quant).
      hidden, _ = module.apply(quant.dequantize_tree(variables), batch["inputs"],
                               batch["segment_ids"],
                               batch["token_types"], batch["positions"])
      return {"embedding": mean_pool_normalize(hidden, batch["segment_ids"])}

    self.runner = BucketRunner(embed, {"params": params}, max_len, seq_buckets=seq_buckets,
                               batch_buckets=batch_buckets)

  def check(self, items) -> list[dict]:
    return [{"text": item["text"]} for item in check_items(items, self.fields, self.name)]

  def _rows(self, texts: list[str]) -> dict[str, np.ndarray]:
    # classification.encode_texts for BERT: [CLS] text [SEP], truncated, right-padded.
    rows = pad_encodings(self._encoder.encode_batch(texts, add_special_tokens=True),
                         self.max_len, self._pad)
    rows["positions"] = np.broadcast_to(np.arange(self.max_len, dtype=np.int32),
                                        rows["inputs"].shape).copy()
    return rows

  def warmup(self) -> None:
    self.runner.warmup(self._rows(["warm up"]))

  def __call__(self, items: list[dict]) -> list[dict]:
    out = self.runner.run(self._rows([item["text"] for item in items]))["embedding"]
    return [{"embedding": [float(x) for x in row]} for row in out]


def hf_dir_max_len(path: str, seq_len: int | None = None) -> int:
  """The row length of a headless BertModel directory: `seq_len` when given, else
  sentence-transformers' max_seq_length when the directory is a sentence-transformers model,
  else the model's position table."""
  context = int(hf.read_hf_config(path).get("max_position_embeddings", 512))
  if seq_len:
    if int(seq_len) > context:
      raise ValueError(f"seq_len={seq_len} is longer than {path}'s position table "
                       f"(max_position_embeddings={context})")
    return int(seq_len)
  st_config = os.path.join(path, _ST_CONFIG)
  if os.path.exists(st_config):
    with open(st_config, encoding="utf-8") as f:
      length = json.load(f).get("max_seq_length")
    if length:
      return min(int(length), context)
  return context


def from_hf_dir(path: str, max_len: int, **buckets) -> EmbeddingEndpoint:
  """The embedder of a Hugging Face BertModel directory (with its tokenizer files)."""
  if not has_tokenizer(path):
    raise ValueError(f"{path} has no tokenizer files (tokenizer.json or vocab.json); "
                     "embeddings need the model's own tokenizer")
  model_cfg = ml_collections.ConfigDict(hf.model_overrides(hf.read_hf_config(path)))
  cfg = registry.model_config(model_cfg)
  module = bert.BertModel(cfg)
  tokens = jnp.zeros((1, 8), jnp.int32)
  init = lambda: nn.unbox(module.init(jax.random.key(0), tokens))["params"]  # noqa: E731
  abstract = jax.eval_shape(init)
  # A checkpoint without the pooler (unused here) gets a random one rather than an error.
  params = hf.load_params(path, abstract, "BertModel", init_fn=init)
  params = jax.device_put(params, jax.local_devices()[0])
  return EmbeddingEndpoint(cfg, params, load_tokenizer(path), max_len, **buckets)


def from_run(run: loader.Run, **buckets) -> EmbeddingEndpoint | None:
  """The embedder of an opened BERT-family run's backbone; None when the run has none to
  offer (another family, or a PEFT method that cannot be folded into plain weights)."""
  if run.config.model.get("family", "gpt2") != "bert":
    return None
  try:
    params = run.task.peft.merge(run.variables)["params"]
  except ValueError:  # prefix / prompt tuning, adapters: computation BertModel does not have
    return None
  backbone = hf.ARCHITECTURES[run.task.architecture].jaxft_prefix
  params = params[backbone] if backbone else params
  cfg = run.task.model_cfg
  return EmbeddingEndpoint(cfg, params, run.tokenizer(), int(run.config.seq_len), **buckets)
