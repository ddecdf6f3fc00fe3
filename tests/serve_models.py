"""Tiny models the server tests serve: a random-init Qwen2 causal LM with a locally trained
ChatML tokenizer (its chat template and EOS ids as a Hub instruct model has them)."""

import os

from tests.chat_tokenizers import write_style


def write_tiny_chat_lm(path, context: int = 256, seed: int = 0) -> str:
  import tokenizers
  import torch
  import transformers

  path = str(path)
  write_style(path, "qwen")
  vocab = tokenizers.Tokenizer.from_file(os.path.join(path, "tokenizer.json")).get_vocab_size()
  config = transformers.Qwen2Config(
      vocab_size=vocab, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=context,
      tie_word_embeddings=True, eos_token_id=None)
  torch.manual_seed(seed)
  model = transformers.Qwen2ForCausalLM(config).eval()
  with torch.no_grad():  # larger weights: logits that differ clearly between tokens
    for p in model.parameters():
      if p.ndim > 1:
        p.mul_(4.0)
  model.save_pretrained(path)
  return path
