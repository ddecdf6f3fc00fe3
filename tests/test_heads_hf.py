"""Task heads against transformers' PyTorch classes, both directions, random init (fp32, 1e-4):
HF -> jaxft (save_pretrained, load_params) and jaxft -> HF (save_hf, from_pretrained)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers
from flax import linen as nn

from jaxft import hf
from jaxft.models import bert, gpt2, heads

BERT = dict(vocab_size=500, hidden_size=48, num_hidden_layers=2, num_attention_heads=4,
            intermediate_size=96, max_position_embeddings=64, type_vocab_size=2)
GPT2 = dict(vocab_size=300, n_positions=64, n_embd=32, n_layer=2, n_head=4)
LABELS = ["negative", "neutral", "positive"]

# architecture -> (jaxft module factory, transformers class, output of the HF model to compare)
BERT_ARCHS = {
    "BertForMaskedLM": (lambda c: heads.BertForMaskedLM(c), transformers.BertForMaskedLM),
    "BertForSequenceClassification": (lambda c: heads.BertForSequenceClassification(c, 3),
                                      transformers.BertForSequenceClassification),
    "BertForTokenClassification": (lambda c: heads.BertForTokenClassification(c, 3),
                                   transformers.BertForTokenClassification),
    "BertForQuestionAnswering": (lambda c: heads.BertForQuestionAnswering(c),
                                 transformers.BertForQuestionAnswering),
}


def _batch(vocab, pad_id=0, seed=0):
  rng = np.random.default_rng(seed)
  tokens = rng.integers(1, vocab, size=(3, 20))
  tokens[tokens == pad_id] = 1  # the pad id never occurs inside a text
  mask = np.ones((3, 20), np.int64)
  mask[1, 14:] = 0  # right padding, as HF tokenizers pad
  mask[2, 5:] = 0
  tokens = np.where(mask == 1, tokens, pad_id)
  types = np.zeros((3, 20), np.int64)
  types[0, 10:] = 1
  return tokens, mask, types


def _hf_outputs(model, tokens, mask, types=None):
  kwargs = {"input_ids": torch.from_numpy(tokens), "attention_mask": torch.from_numpy(mask)}
  if types is not None:
    kwargs["token_type_ids"] = torch.from_numpy(types)
  with torch.no_grad():
    out = model(**kwargs)
  if hasattr(out, "start_logits"):
    return np.stack([out.start_logits.numpy(), out.end_logits.numpy()])
  return out.logits.numpy()


def _ours(module, params, tokens, mask, types=None):
  out = module.apply({"params": params}, jnp.asarray(tokens, jnp.int32),
                     jnp.asarray(mask, jnp.int32),
                     None if types is None else jnp.asarray(types, jnp.int32))
  return np.stack([np.asarray(o) for o in out]) if isinstance(out, tuple) else np.asarray(out)


def _compare(ours, theirs, mask):
  if ours.ndim >= 3 or (ours.ndim == 2 and ours.shape == mask.shape):
    real = mask.astype(bool)  # per-token outputs: HF's values at padding are not meaningful
    if ours.shape[0] == 2 and ours.shape[1:] == mask.shape:  # QA: (start, end) stacked
      ours, theirs = ours[:, real], theirs[:, real]
    else:
      ours, theirs = ours[real], theirs[real]
  np.testing.assert_allclose(ours, theirs, atol=1e-4, rtol=0)


def _abstract(module, tokens):
  return jax.eval_shape(lambda: nn.unbox(module.init(jax.random.key(0), tokens))["params"])


def _init(module, tokens, seed=1):
  params = nn.unbox(module.init(jax.random.key(seed), tokens))["params"]
  # flax zero-initialises biases and HF's bias init is zero too: perturb every leaf so a bias
  # mapped to the wrong tensor cannot hide behind equal zeros.
  leaves, tree = jax.tree.flatten(params)
  keys = jax.random.split(jax.random.key(seed + 1), len(leaves))
  return jax.tree.unflatten(tree, [x + 0.02 * jax.random.normal(k, x.shape)
                                   for x, k in zip(leaves, keys)])


@pytest.mark.parametrize("scan_layers", [False, True])
@pytest.mark.parametrize("architecture", list(BERT_ARCHS))
def test_bert_heads_import_and_export_match_transformers(tmp_path, architecture, scan_layers):
  make, hf_class = BERT_ARCHS[architecture]
  module = make(bert.BertConfig(**BERT, scan_layers=scan_layers))
  tokens, mask, types = _batch(BERT["vocab_size"])

  torch.manual_seed(0)
  n_labels = 3 if "Classification" in architecture else 2  # QA's qa_outputs has num_labels=2
  reference = hf_class(transformers.BertConfig(**BERT, num_labels=n_labels)).eval()
  reference.save_pretrained(tmp_path / "hf")
  params = hf.load_params(str(tmp_path / "hf"), _abstract(module, tokens[:1]), architecture)
  _compare(_ours(module, params, tokens, mask, types),
           _hf_outputs(reference, tokens, mask, types), mask)

  mine = _init(module, tokens[:1])
  hf.save_hf(str(tmp_path / "out"), mine, module.cfg, architecture=architecture,
             labels=LABELS if "Classification" in architecture else None)
  exported = hf_class.from_pretrained(tmp_path / "out").eval()
  assert exported.config.architectures == [architecture]
  _compare(_ours(module, mine, tokens, mask, types), _hf_outputs(exported, tokens, mask, types),
           mask)
  if "Classification" in architecture:  # label names travel in config.json
    assert exported.config.id2label == dict(enumerate(LABELS))
    assert hf.label_names(hf.read_hf_config(str(tmp_path / "out"))) == LABELS


def test_masked_lm_scores_only_the_given_positions():
  module = heads.BertForMaskedLM(bert.BertConfig(**BERT))
  tokens, mask, _ = _batch(BERT["vocab_size"])
  params = _init(module, tokens[:1])
  full = module.apply({"params": params}, tokens, mask)
  where = jnp.asarray([[1, 4, 7], [0, 2, 13], [3, 4, 4]])
  picked = module.apply({"params": params}, tokens, mask, mlm_positions=where)
  np.testing.assert_allclose(picked, jnp.take_along_axis(full, where[..., None], axis=1),
                             atol=1e-5, rtol=0)


def test_gpt2_sequence_classification_both_directions(tmp_path):
  module = heads.GPT2ForSequenceClassification(gpt2.GPT2Config(**GPT2), 3)
  pad = 7
  tokens, mask, _ = _batch(GPT2["vocab_size"], pad_id=pad)

  torch.manual_seed(0)
  reference = transformers.GPT2ForSequenceClassification(
      transformers.GPT2Config(**GPT2, num_labels=3, pad_token_id=pad)).eval()
  reference.save_pretrained(tmp_path / "hf")
  params = hf.load_params(str(tmp_path / "hf"), _abstract(module, tokens[:1]),
                          "GPT2ForSequenceClassification")
  np.testing.assert_allclose(_ours(module, params, tokens, mask),
                             _hf_outputs(reference, tokens, mask), atol=1e-4, rtol=0)

  mine = _init(module, tokens[:1])
  hf.save_hf(str(tmp_path / "out"), mine, module.cfg,
             architecture="GPT2ForSequenceClassification", labels=LABELS)
  exported = transformers.GPT2ForSequenceClassification.from_pretrained(tmp_path / "out").eval()
  exported.config.pad_token_id = pad  # the tokens above pad with 7 (the exported file says EOS)
  np.testing.assert_allclose(_ours(module, mine, tokens, mask),
                             _hf_outputs(exported, tokens, mask), atol=1e-4, rtol=0)


def test_backbone_checkpoint_fills_a_head_model_and_new_leaves_are_named(tmp_path, caplog):
  """A bare BertModel directory (like all-MiniLM-L6-v2) loads into a classifier: backbone and
  pooler from the file, the classifier newly initialised with a warning naming it."""
  torch.manual_seed(0)
  backbone = transformers.BertModel(transformers.BertConfig(**BERT)).eval()
  backbone.save_pretrained(tmp_path)
  module = heads.BertForSequenceClassification(bert.BertConfig(**BERT), 4)
  tokens, mask, types = _batch(BERT["vocab_size"])
  init = lambda: nn.unbox(module.init(jax.random.key(3), tokens[:1]))["params"]  # noqa: E731
  with caplog.at_level("WARNING", logger="jaxft"):
    params = hf.load_params(str(tmp_path), _abstract(module, tokens[:1]),
                            "BertForSequenceClassification", init_fn=init)
  assert "classifier/kernel" in caplog.text and "newly initialised" in caplog.text
  np.testing.assert_array_equal(params["classifier"]["kernel"], init()["classifier"]["kernel"])
  hidden, pooled = bert.BertModel(bert.BertConfig(**BERT)).apply(
      {"params": params["bert"]}, tokens, mask, types)
  with torch.no_grad():
    out = backbone(input_ids=torch.from_numpy(tokens), attention_mask=torch.from_numpy(mask),
                   token_type_ids=torch.from_numpy(types))
  np.testing.assert_allclose(np.asarray(pooled), out.pooler_output.numpy(), atol=1e-4, rtol=0)

  with pytest.raises(ValueError, match="no weights for classifier"):
    hf.load_params(str(tmp_path), _abstract(module, tokens[:1]), "BertForSequenceClassification")


def test_wrong_number_of_labels_is_named(tmp_path):
  torch.manual_seed(0)
  transformers.BertForSequenceClassification(
      transformers.BertConfig(**BERT, num_labels=5)).save_pretrained(tmp_path)
  module = heads.BertForSequenceClassification(bert.BertConfig(**BERT), 3)
  with pytest.raises(ValueError, match=r"classifier\.weight.*\(5, 48\).*\(3, 48\).*labels"):
    hf.load_params(str(tmp_path), _abstract(module, jnp.zeros((1, 4), jnp.int32)),
                   "BertForSequenceClassification")
