"""Task heads on the BERT and GPT-2 backbones, each the same math as its transformers namesake.

A head returns logits only; the task (jaxft/tasks/) owns the loss, predictions and metrics.
Parameter names: the backbone under "bert" / "transformer" (so a bare BertModel / GPT2Model
checkpoint fills it), then the head's own leaves; `jaxft.hf` maps both to HF names.
Every head takes (tokens, segment_ids, token_types, positions): segment_ids > 0 marks real tokens
(HF's attention_mask), token_types are BERT's sentence A/B ids.
"""

import jax
import jax.numpy as jnp
from flax import linen as nn

from jaxft.models import bert, gpt2, llama
from jaxft.models.dropout import Dropout
from jaxft.parallel import sharding


def _dropout_rate(cfg: bert.BertConfig) -> float:
  return cfg.hidden_dropout_prob if cfg.classifier_dropout is None else cfg.classifier_dropout


def _classifier(cfg: bert.BertConfig, n: int, name: str) -> nn.Dense:
  # Labels are few: the label axis is never sharded.
  return bert.dense(cfg, n, name, ("embed", None))


class BertForMaskedLM(nn.Module):
  """BERT + HF's MLM head: dense -> GELU -> LayerNorm -> decoder tied to the word embedding,
  plus a per-token bias. With `mlm_positions` [B, K] only those positions are scored (the
  [B, K, V] logits of the masked tokens instead of [B, T, V]), as in the original BERT."""

  cfg: bert.BertConfig

  @nn.compact
  def __call__(self, tokens, segment_ids=None, token_types=None, positions=None,
               mlm_positions=None, *, deterministic: bool = True):
    cfg = self.cfg
    backbone = bert.BertModel(cfg, add_pooling_layer=False, name="bert")
    hidden, _ = backbone(tokens, segment_ids, token_types, positions,
                         deterministic=deterministic)
    if mlm_positions is not None:
      hidden = jnp.take_along_axis(hidden, mlm_positions[..., None], axis=1)  # [B, K, D]
    h = bert.dense(cfg, cfg.hidden_size, "mlm_transform", ("embed", None))(hidden)
    h = bert.LayerNorm(cfg, name="mlm_ln")(jax.nn.gelu(h, approximate=False))
    embedding = nn.unbox(backbone.variables["params"]["word"]["embedding"])  # [V, D]
    bias = self.param("mlm_bias", nn.with_logical_partitioning(nn.initializers.zeros, ("vocab",)),
                      (cfg.vocab_size,), cfg.param_dtype)
    logits = jnp.einsum("...d,vd->...v", h, embedding.astype(cfg.dtype)) + bias
    return sharding.constrain(logits, ("batch", "length", "act_vocab"))


def segment_masks(segment_ids, slots: int):
  """[B, T] segment ids of packed rows -> [B, slots, T]: True where token t is in segment k+1."""
  return segment_ids[:, None, :] == jnp.arange(1, slots + 1)[None, :, None]


def segment_token_index(segment_ids, slots: int, last: bool):
  """[B, T] segment ids of packed rows -> [B, slots]: the index of segment k + 1's first (or
  last) token in its row; 0 for a slot with no segment."""
  t = segment_ids.shape[-1]
  in_segment = segment_masks(segment_ids, slots)  # [B, K, T]
  idx = jnp.arange(t)[None, None, :]
  if last:
    return jnp.max(jnp.where(in_segment, idx, 0), axis=-1)
  return jnp.min(jnp.where(in_segment, idx, t - 1), axis=-1) * jnp.any(in_segment, axis=-1)


class BertForSequenceClassification(nn.Module):
  """Pooled [CLS] -> dropout -> linear: [B, num_labels]; packed rows (`slots` given): each
  segment's first token ([CLS]) pooled, [B, slots, num_labels]."""

  cfg: bert.BertConfig
  num_labels: int

  @nn.compact
  def __call__(self, tokens, segment_ids=None, token_types=None, positions=None, *,
               slots: int | None = None, deterministic: bool = True):
    pool = None if slots is None else segment_token_index(segment_ids, slots, last=False)
    _, pooled = bert.BertModel(self.cfg, name="bert")(tokens, segment_ids, token_types, positions,
                                                      pool_positions=pool,
                                                      deterministic=deterministic)
    pooled = Dropout(_dropout_rate(self.cfg))(pooled, deterministic=deterministic)
    return _classifier(self.cfg, self.num_labels, "classifier")(pooled)


class BertForTokenClassification(nn.Module):
  """Every token's hidden state -> dropout -> linear: [B, T, num_labels]."""

  cfg: bert.BertConfig
  num_labels: int

  @nn.compact
  def __call__(self, tokens, segment_ids=None, token_types=None, positions=None, *,
               deterministic: bool = True):
    hidden, _ = bert.BertModel(self.cfg, add_pooling_layer=False, name="bert")(
        tokens, segment_ids, token_types, positions, deterministic=deterministic)
    hidden = Dropout(_dropout_rate(self.cfg))(hidden, deterministic=deterministic)
    return _classifier(self.cfg, self.num_labels, "classifier")(hidden)


class BertForQuestionAnswering(nn.Module):
  """Every token's hidden state -> linear to 2: (start logits [B, T], end logits [B, T])."""

  cfg: bert.BertConfig

  @nn.compact
  def __call__(self, tokens, segment_ids=None, token_types=None, positions=None, *,
               deterministic: bool = True):
    hidden, _ = bert.BertModel(self.cfg, add_pooling_layer=False, name="bert")(
        tokens, segment_ids, token_types, positions, deterministic=deterministic)
    logits = _classifier(self.cfg, 2, "qa_outputs")(hidden).astype(jnp.float32)
    return logits[..., 0], logits[..., 1]


def last_token_index(segment_ids):
  """Index of each row's last real token (segment_ids > 0); 0 for an all-padding row.

  Equals transformers' GPT2ForSequenceClassification choice (the rightmost non-pad token)
  for right-padded rows whose text does not contain the pad id.
  """
  idx = jnp.arange(segment_ids.shape[-1])
  return jnp.max(jnp.where(segment_ids > 0, idx, 0), axis=-1)


class _LastTokenClassifier(nn.Module):
  """A decoder backbone -> bias-free linear "score" on the last real token: [B, num_labels];
  packed rows (`slots` given): on each segment's last token, [B, slots, num_labels]. The
  backbone sits under `backbone_name` (transformers' attribute name for it)."""

  cfg: object
  num_labels: int
  backbone_cls = None
  backbone_name = ""

  @nn.compact
  def __call__(self, tokens, segment_ids=None, token_types=None, positions=None, *,
               slots: int | None = None, deterministic: bool = True):
    del token_types  # decoders have no sentence A/B embedding
    if segment_ids is None:
      segment_ids = jnp.ones_like(tokens)
    if positions is None:
      positions = jnp.broadcast_to(jnp.arange(tokens.shape[1]), tokens.shape)
    hidden = self.backbone_cls(self.cfg, name=self.backbone_name)(
        tokens, positions, segment_ids, deterministic=deterministic)
    if slots is None:
      last = jnp.take_along_axis(hidden, last_token_index(segment_ids)[:, None, None], axis=1)
    else:
      index = segment_token_index(segment_ids, slots, last=True)
      last = jnp.take_along_axis(hidden, index[..., None], axis=1)  # [B, K, D]
    score = nn.Dense(self.num_labels, use_bias=False, dtype=self.cfg.dtype,
                     param_dtype=self.cfg.param_dtype, name="score",
                     kernel_init=nn.with_logical_partitioning(
                         nn.initializers.normal(self.cfg.initializer_range), ("embed", None)))
    return score(last[:, 0] if slots is None else last)


class GPT2ForSequenceClassification(_LastTokenClassifier):
  """transformers' GPT2ForSequenceClassification."""

  cfg: gpt2.GPT2Config
  backbone_cls = gpt2.GPT2Model
  backbone_name = "transformer"


class LlamaForSequenceClassification(_LastTokenClassifier):
  """transformers' LlamaForSequenceClassification (and Mistral's, Qwen's, Gemma's)."""

  cfg: llama.LlamaConfig
  backbone_cls = llama.LlamaModel
  backbone_name = "model"
