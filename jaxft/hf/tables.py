"""The HF <-> jaxft tensor tables: one `Row` per Hugging Face tensor, one `Arch` per transformers
class (a backbone table under a prefix plus its head rows).

A row names an HF tensor, the jaxft leaves it becomes and how the axes map. HF GPT-2 uses
Conv1D, whose weight is (in, out): the same layout as a flax kernel, so no GPT-2 row needs a
transpose; c_attn packs q, k and v along its output axis and jaxft keeps them as separate
[embed, heads, head_dim] kernels. BERT's nn.Linear weights are (out, in): transposed. The
readers, writers and shape checks that use the tables are in jaxft/hf/convert.py.
"""

import dataclasses
import logging
import math

import numpy as np

log = logging.getLogger("jaxft")

SAFETENSORS_FILE = "model.safetensors"
TORCH_FILE = "pytorch_model.bin"


@dataclasses.dataclass(frozen=True)
class Row:
  """One HF tensor <-> one or more jaxft leaves.

  hf: the HF name, "{i}" standing for the layer index.
  jaxft: "/"-separated param paths; several means the HF tensor is their concatenation along
    its last axis (equal parts, in this order).
  merge: for each HF axis, the consecutive jaxft axes it flattens (None: same shape). E.g.
    ((0,), (1, 2)) turns an [embed, heads, head_dim] kernel into HF's [embed, heads * head_dim].
  """

  hf: str
  jaxft: tuple[str, ...]
  merge: tuple[tuple[int, ...], ...] | None = None
  transpose: bool = False  # HF nn.Linear (out, in) weights: transposed before merging axes

  def hf_shape(self, jaxft_shapes: list[tuple[int, ...]]) -> tuple[int, ...]:
    parts = [self._hf_part_shape(s) for s in jaxft_shapes]
    shape = (*parts[0][:-1], sum(p[-1] for p in parts))
    return shape[::-1] if self.transpose else shape

  def to_jaxft(self, tensor: np.ndarray, jaxft_shapes: list[tuple[int, ...]]) -> list[np.ndarray]:
    # The merged axes are consecutive and in order, so splitting then reshaping is exact.
    parts = np.split(tensor.T if self.transpose else tensor, len(self.jaxft), axis=-1)
    return [np.ascontiguousarray(p.reshape(s)) for p, s in zip(parts, jaxft_shapes)]

  def to_hf(self, leaves: list[np.ndarray]) -> np.ndarray:
    parts = [x.reshape(self._hf_part_shape(x.shape)) for x in leaves]
    out = np.concatenate(parts, axis=-1)
    return np.ascontiguousarray(out.T if self.transpose else out)

  def _hf_part_shape(self, shape: tuple[int, ...]) -> tuple[int, ...]:
    if self.merge is None:
      return tuple(shape)
    return tuple(math.prod(shape[a] for a in axes) for axes in self.merge)


def _linear(hf: str, jaxft: str, merge=None) -> list[Row]:
  """An HF nn.Linear (weight (out, in), bias) <-> a flax Dense/DenseGeneral (kernel, bias)."""
  return [Row(f"{hf}.weight", (f"{jaxft}/kernel",), merge=merge, transpose=True),
          Row(f"{hf}.bias", (f"{jaxft}/bias",), merge=None if merge is None else ((0, 1),))]


def _layer_norm(hf: str, jaxft: str) -> list[Row]:
  return [Row(f"{hf}.weight", (f"{jaxft}/scale",)), Row(f"{hf}.bias", (f"{jaxft}/bias",))]


def _gpt2_backbone(n_layer: int, pooler: bool = False, paths=frozenset()) -> list[Row]:
  """HF GPT2Model <-> jaxft GPT2Model (Conv1D weights are (in, out): no transposes)."""
  del pooler, paths  # GPT-2 has no pooler, and every layer has the same tensors
  rows = [Row("wte.weight", ("wte/embedding",)), Row("wpe.weight", ("wpe/embedding",))]
  for i in range(n_layer):
    h, j = f"h.{i}", f"h_{i}"
    rows += [
        *_layer_norm(f"{h}.ln_1", f"{j}/ln_1"),
        Row(f"{h}.attn.c_attn.weight",
            (f"{j}/attn/query/kernel", f"{j}/attn/key/kernel", f"{j}/attn/value/kernel"),
            merge=((0,), (1, 2))),  # 3 x [embed, heads, head_dim] -> [embed, 3 * embed]
        Row(f"{h}.attn.c_attn.bias",
            (f"{j}/attn/query/bias", f"{j}/attn/key/bias", f"{j}/attn/value/bias"),
            merge=((0, 1),)),  # 3 x [heads, head_dim] -> [3 * embed]
        Row(f"{h}.attn.c_proj.weight", (f"{j}/attn/out/kernel",),
            merge=((0, 1), (2,))),  # [heads, head_dim, embed] -> [embed, embed]
        Row(f"{h}.attn.c_proj.bias", (f"{j}/attn/out/bias",)),
        *_layer_norm(f"{h}.ln_2", f"{j}/ln_2"),
        Row(f"{h}.mlp.c_fc.weight", (f"{j}/mlp/fc/kernel",)),
        Row(f"{h}.mlp.c_fc.bias", (f"{j}/mlp/fc/bias",)),
        Row(f"{h}.mlp.c_proj.weight", (f"{j}/mlp/proj/kernel",)),
        Row(f"{h}.mlp.c_proj.bias", (f"{j}/mlp/proj/bias",)),
    ]
  return rows + _layer_norm("ln_f", "ln_f")


def _bert_backbone(n_layer: int, pooler: bool = True, paths=frozenset()) -> list[Row]:
  """HF BertModel <-> jaxft BertModel (nn.Linear weights are (out, in): transposed)."""
  del paths
  rows = [Row("embeddings.word_embeddings.weight", ("word/embedding",)),
          Row("embeddings.position_embeddings.weight", ("position/embedding",)),
          Row("embeddings.token_type_embeddings.weight", ("token_type/embedding",)),
          *_layer_norm("embeddings.LayerNorm", "ln_embed")]
  for i in range(n_layer):
    h, j = f"encoder.layer.{i}", f"layer_{i}"
    for name in ("query", "key", "value"):  # [embed, heads, head_dim] <- [embed, embed]
      rows += _linear(f"{h}.attention.self.{name}", f"{j}/attn/{name}", ((0,), (1, 2)))
    rows += [Row(f"{h}.attention.output.dense.weight", (f"{j}/attn/out/kernel",),
                 merge=((0, 1), (2,)), transpose=True),  # [heads, head_dim, embed]
             Row(f"{h}.attention.output.dense.bias", (f"{j}/attn/out/bias",)),
             *_layer_norm(f"{h}.attention.output.LayerNorm", f"{j}/attn/ln"),
             *_linear(f"{h}.intermediate.dense", f"{j}/mlp/fc"),
             *_linear(f"{h}.output.dense", f"{j}/mlp/proj"),
             *_layer_norm(f"{h}.output.LayerNorm", f"{j}/ln")]
  if pooler:
    rows += _linear("pooler.dense", "pooler")
  return rows


def _decoder_backbone(n_layer: int, pooler: bool = False, paths=frozenset()) -> list[Row]:
  """HF LlamaModel (MistralModel, Qwen2Model, Qwen3Model, Gemma*Model) <-> jaxft LlamaModel.

  Rows for every optional tensor (biases, q/k norms, Gemma's post norms); `Arch.rows` keeps
  those the model has. HF's post_attention_layernorm is the norm before the MLP in Llama but
  the one after attention in Gemma 2/3, which put pre_feedforward_layernorm before the MLP."""
  del pooler
  gemma_norms = "layers_0/ln_attn_out/scale" in paths or "layers/ln_attn_out/scale" in paths
  rows = [Row("embed_tokens.weight", ("embed/embedding",)), Row("norm.weight", ("norm/scale",))]
  for i in range(n_layer):
    h, j = f"layers.{i}", f"layers_{i}"
    for hf, name in (("q", "query"), ("k", "key"), ("v", "value")):  # [embed, heads, head_dim]
      rows += _linear(f"{h}.self_attn.{hf}_proj", f"{j}/attn/{name}", ((0,), (1, 2)))
    rows += [Row(f"{h}.self_attn.o_proj.weight", (f"{j}/attn/out/kernel",),
                 merge=((0, 1), (2,)), transpose=True),  # [heads, head_dim, embed]
             Row(f"{h}.self_attn.o_proj.bias", (f"{j}/attn/out/bias",)),
             Row(f"{h}.self_attn.q_norm.weight", (f"{j}/attn/query_norm/scale",)),
             Row(f"{h}.self_attn.k_norm.weight", (f"{j}/attn/key_norm/scale",)),
             Row(f"{h}.input_layernorm.weight", (f"{j}/ln_attn/scale",))]
    for name in ("gate", "up", "down"):
      rows += _linear(f"{h}.mlp.{name}_proj", f"{j}/mlp/{name}")
    if gemma_norms:
      rows += [Row(f"{h}.post_attention_layernorm.weight", (f"{j}/ln_attn_out/scale",)),
               Row(f"{h}.pre_feedforward_layernorm.weight", (f"{j}/ln_mlp/scale",)),
               Row(f"{h}.post_feedforward_layernorm.weight", (f"{j}/ln_mlp_out/scale",))]
    else:
      rows.append(Row(f"{h}.post_attention_layernorm.weight", (f"{j}/ln_mlp/scale",)))
  return rows


@dataclasses.dataclass(frozen=True)
class Arch:
  """How one transformers class lays out its tensors relative to the jaxft module.

  The backbone sits under `hf_prefix` in HF names and `jaxft_prefix` in jaxft paths; `head`
  rows are top-level in both. A checkpoint of another class of the same family (e.g. a bare
  BertModel for a BertForSequenceClassification) fills the backbone; the head and the pooler
  may be absent from it and are then newly initialised, as transformers does. `tied` names HF
  tensors that duplicate another one (checked equal, never loaded twice).
  """

  family: str
  hf_prefix: str
  jaxft_prefix: str
  pooler: bool = False
  head: tuple[Row, ...] = ()
  tied: tuple[tuple[str, str], ...] = ()

  def rows(self, n_layer: int, with_hf_prefix: bool, paths=None) -> list[Row]:
    """The table for a model of `n_layer` layers; `paths` (the jaxft leaf paths of the model,
    per layer) keeps the rows of the tensors it has where a family's tensors vary by
    configuration (decoder biases, norms, an untied LM head)."""
    jp = f"{self.jaxft_prefix}/" if self.jaxft_prefix else ""
    local = frozenset(p.removeprefix(jp) for p in paths or ())
    backbone = BACKBONES[self.family].rows(n_layer, self.pooler, local)
    hp = f"{self.hf_prefix}." if self.hf_prefix and with_hf_prefix else ""
    rows = [Row(hp + r.hf, tuple(jp + p for p in r.jaxft), r.merge, r.transpose)
            for r in backbone] + list(self.head)
    if not BACKBONES[self.family].varies:
      return rows
    return [r for r in rows if set(r.jaxft) <= set(paths)]

  def optional(self, n_layer: int) -> set[str]:
    """jaxft paths a checkpoint of a sibling class may lack: the head and the pooler."""
    jp = f"{self.jaxft_prefix}/" if self.jaxft_prefix else ""
    paths = {p for r in self.head for p in r.jaxft}
    if self.pooler:
      paths |= {jp + p for r in _linear("pooler.dense", "pooler") for p in r.jaxft}
    return paths


@dataclasses.dataclass(frozen=True)
class Backbone:
  """What the readers and writers need to know of a family's backbone."""

  rows: object  # (n_layer, pooler) -> [Row] of one backbone, without any prefix
  hf_prefix: str  # its HF state-dict prefix in the task classes ("transformer.", "bert.")
  layers: str  # the jaxft layer stack: "h" -> h_0 .. h_{n-1}, or one scanned module "h"
  display: str  # the family's name in messages
  varies: bool = False  # its tensors depend on the configuration (rows filtered by leaves)


# config.model.family -> its backbone; a new family is a table function and a line here.
BACKBONES = {
    "gpt2": Backbone(_gpt2_backbone, "transformer.", "h", "GPT-2"),
    "bert": Backbone(_bert_backbone, "bert.", "layer", "BERT"),
    "llama": Backbone(_decoder_backbone, "model.", "layers", "decoder (Llama-style)",
                      varies=True),
}
WORD_EMBEDDINGS = "bert.embeddings.word_embeddings.weight"
ARCHITECTURES = {
    "GPT2LMHeadModel": Arch("gpt2", "transformer", "transformer",
                            tied=(("lm_head.weight", "transformer.wte.weight"),)),
    "GPT2ForSequenceClassification": Arch(
        "gpt2", "transformer", "transformer",
        head=(Row("score.weight", ("score/kernel",), transpose=True),)),
    "BertModel": Arch("bert", "", "", pooler=True),
    "BertForMaskedLM": Arch(
        "bert", "bert", "bert",
        head=(*_linear("cls.predictions.transform.dense", "mlm_transform"),
              *_layer_norm("cls.predictions.transform.LayerNorm", "mlm_ln"),
              Row("cls.predictions.bias", ("mlm_bias",))),
        tied=(("cls.predictions.decoder.weight", WORD_EMBEDDINGS),
              ("cls.predictions.decoder.bias", "cls.predictions.bias"))),
    "BertForSequenceClassification": Arch("bert", "bert", "bert", pooler=True,
                                          head=tuple(_linear("classifier", "classifier"))),
    "BertForTokenClassification": Arch("bert", "bert", "bert",
                                       head=tuple(_linear("classifier", "classifier"))),
    "BertForQuestionAnswering": Arch("bert", "bert", "bert",
                                     head=tuple(_linear("qa_outputs", "qa_outputs"))),
}
# transformers' decoder classes (every model_type, jaxft/models/registry.py DECODER_CLASSES).
_DECODER_PREFIXES = ("Llama", "Mistral", "Qwen2", "Qwen3", "Gemma", "Gemma2", "Gemma3")
for _p in _DECODER_PREFIXES:
  ARCHITECTURES[f"{_p}ForCausalLM"] = Arch(
      "llama", "model", "model", head=(Row("lm_head.weight", ("lm_head/embedding",)),),
      tied=(("lm_head.weight", "model.embed_tokens.weight"),))
  ARCHITECTURES[f"{_p}ForSequenceClassification"] = Arch(
      "llama", "model", "model", head=(Row("score.weight", ("score/kernel",), transpose=True),))
ARCHITECTURES["Gemma3TextForSequenceClassification"] = ARCHITECTURES[
    "Gemma3ForSequenceClassification"]
# Tensors some HF checkpoints carry that are buffers, not parameters.
IGNORED_SUFFIXES = (".attn.bias", ".attn.masked_bias", "position_ids", "rotary_emb.inv_freq")


