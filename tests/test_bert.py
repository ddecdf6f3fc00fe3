"""jaxft's BertModel against transformers' PyTorch BertModel: random init and the real
all-MiniLM-L6-v2 weights (mean-pooled, L2-normalised sentence embeddings)."""


import jax
import jax.numpy as jnp
import numpy as np
import torch
import transformers
from flax import linen as nn

from configs import common
from jaxft import hf
from jaxft.data.tokenizer import load_tokenizer
from jaxft.models.bert import BertConfig, BertModel

SHAPE = dict(vocab_size=500, hidden_size=48, num_hidden_layers=2, num_attention_heads=4,
             intermediate_size=96, max_position_embeddings=64, type_vocab_size=2)


def _jaxft_bert(cfg: BertConfig, path: str):
  model = BertModel(cfg)
  dummy = jnp.zeros((1, 4), jnp.int32)
  expected = jax.eval_shape(lambda: nn.unbox(model.init(jax.random.key(0), dummy))["params"])
  return model, hf.load_bert_params(path, expected)


def _padded_batch(vocab, seed=0):
  rng = np.random.default_rng(seed)
  tokens = rng.integers(1, vocab, size=(3, 20))
  mask = np.ones((3, 20), np.int64)
  mask[1, 14:] = 0  # right padding, as HF tokenizers pad
  mask[2, 5:] = 0
  types = np.zeros((3, 20), np.int64)
  types[0, 10:] = 1
  return tokens, mask, types


def test_random_bert_matches_transformers_hidden_states_and_pooler(tmp_path):
  torch.manual_seed(0)
  reference = transformers.BertModel(transformers.BertConfig(**SHAPE)).eval()
  reference.save_pretrained(tmp_path)
  model, params = _jaxft_bert(BertConfig(**SHAPE), str(tmp_path))
  tokens, mask, types = _padded_batch(SHAPE["vocab_size"])
  with torch.no_grad():
    out = reference(input_ids=torch.from_numpy(tokens), attention_mask=torch.from_numpy(mask),
                    token_type_ids=torch.from_numpy(types))
  hidden, pooled = model.apply({"params": params}, tokens, mask, types)
  real = mask.astype(bool)  # HF's outputs at padding positions are not meaningful
  np.testing.assert_allclose(np.asarray(hidden)[real], out.last_hidden_state.numpy()[real],
                             atol=1e-4, rtol=0)
  np.testing.assert_allclose(np.asarray(pooled), out.pooler_output.numpy(), atol=1e-4, rtol=0)


def test_all_minilm_sentence_embeddings_match_sentence_transformers():
  path = common.minilm_dir()
  config = hf.read_hf_config(path)
  cfg = BertConfig(**{k: config[k] for k in SHAPE}, layer_norm_eps=config["layer_norm_eps"])
  model, params = _jaxft_bert(cfg, path)
  sentences = ["The cat sits outside.", "A man is playing guitar.",
               "The new movie is awesome, I loved every minute of it!",
               "Stocks fell sharply after the central bank raised interest rates again."]
  # jaxft's tokenizer, loaded from the model directory, against transformers' for it
  from jaxft.tasks.classification import encode_texts

  ours_enc = encode_texts(load_tokenizer(path), sentences, 24, "bert")
  ref = transformers.AutoTokenizer.from_pretrained(path)(sentences, padding="max_length",
                                                         max_length=24, return_tensors="np")
  np.testing.assert_array_equal(ours_enc["inputs"], ref["input_ids"])
  np.testing.assert_array_equal(ours_enc["segment_ids"], ref["attention_mask"])
  enc = {"input_ids": ours_enc["inputs"], "attention_mask": ours_enc["segment_ids"],
         "token_type_ids": ours_enc["token_types"]}
  from sentence_transformers import SentenceTransformer

  theirs = SentenceTransformer(path, device="cpu").encode(sentences, normalize_embeddings=True)

  def embed(hidden, mask):  # the model's pooling (1_Pooling: mean) + L2 normalisation
    m = mask[..., None].astype(np.float64)
    pooled = (np.asarray(hidden, np.float64) * m).sum(1) / np.maximum(m.sum(1), 1e-9)
    return pooled / np.linalg.norm(pooled, axis=-1, keepdims=True)

  hidden, _ = model.apply({"params": params}, enc["input_ids"], enc["attention_mask"],
                          enc["token_type_ids"])
  ours = embed(hidden, enc["attention_mask"])
  np.testing.assert_allclose(ours, theirs, atol=1e-5, rtol=0)
  # and they are sentence embeddings: the two unrelated sentences are far apart
  assert ours[0] @ ours[3] < 0.3
