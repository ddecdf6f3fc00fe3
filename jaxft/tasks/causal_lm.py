"""Causal-LM pretraining: next-token prediction over packed rows of text (GPT-2)."""

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from jaxft import peft
from jaxft.data import pipeline
from jaxft.data.tokenizer import load_tokenizer
from jaxft.models import generation
from jaxft.models.lm_loss import lm_head_cross_entropy
from jaxft.tasks.base import Task


def token_cross_entropy(logits, targets):
  """Per-token -log p(target), softmax in float32. Shifted labels: no [B, T, V] slice copy."""
  logits = logits.astype(jnp.float32)
  logz = jax.nn.logsumexp(logits, axis=-1)
  target_logit = jnp.take_along_axis(logits, targets[..., None], axis=-1)[..., 0]
  return logz - target_logit


class CausalLM(Task):
  """Batches follow the packed-row contract of jaxft/data/pipeline.py."""

  name = "causal_lm"
  generative = True
  distillable = True

  def __init__(self, config: ml_collections.ConfigDict, labels=None):
    super().__init__(config, labels)
    self.loss_chunk = config.get("lm_loss_chunk", 0)
    # The fused loss takes the tied embedding's gradient only where it trains (not under PEFT,
    # unless config.peft.trainable names it).
    self.lm_head_path = self.model_cfg.lm_head_path
    self.embedding_trains = self.peft.trains(self.lm_head_path, self.trainable_head)
    self.logit_softcap = getattr(self.model_cfg, "final_logit_softcapping", 0.0)
    if config.data.tokenizer:
      if load_tokenizer(config.data.tokenizer).eos_id is None:
        raise ValueError(f"config.data.tokenizer={config.data.tokenizer!r} has no end-of-text "
                         "token, which causal-LM packing puts between documents; use a GPT-2 "
                         "style tokenizer (or '' for GPT-2's BPE)")
    context = self.model_cfg.context_length
    if config.seq_len > context:
      field = self.model_cfg.context_field
      raise ValueError(f"config.seq_len={config.seq_len} exceeds config.model.{field}="
                       f"{context}; lower seq_len or raise {field}")

  def head_weights_per_token(self, seq_len: int) -> dict[str, float]:
    # The LM head (the tied token embedding, or its own table) is applied at every token.
    return {self.lm_head_path: self.model_cfg.flops_backbone.width * self.model_cfg.vocab_size}

  def init(self, rng, seq_len: int):
    """Boxed (logically partitioned) variables for a [1, seq_len] dummy batch."""
    tokens = jnp.zeros((1, seq_len), jnp.int32)
    return self.init_model(rng, tokens, jnp.zeros_like(tokens), jnp.ones_like(tokens))

  def _forward(self, variables, batch, rng, deterministic, method="__call__"):
    return self.apply(variables, batch["inputs"], batch["positions"], batch["segment_ids"],
                      rng=rng, deterministic=deterministic, method=method)

  def loss(self, variables, batch, rng, deterministic: bool = False):
    """(sum of masked token losses, aux sums). The step divides by the global token count."""
    mask = batch["loss_mask"].astype(jnp.float32)
    tokens = jnp.sum(mask)
    if self.loss_chunk:  # fused LM head + softmax over sequence chunks (jaxft/models/lm_loss.py)
      hidden = self._forward(variables, batch, rng, deterministic, method="hidden")
      embedding = self.model.apply(variables, method="embedding")
      loss_sum, correct = lm_head_cross_entropy(hidden, embedding, batch["targets"], mask,
                                                chunk=self.loss_chunk,
                                                embedding_grad=self.embedding_trains,
                                                softcap=self.logit_softcap)
      return loss_sum, {"weight": tokens, "tokens": tokens, "correct": correct}
    return self.loss_from_outputs(self._forward(variables, batch, rng, deterministic), batch)

  # Distillation compares whole next-token distributions: [B, T, V] logits of the student and
  # the teacher, never the fused loss's chunks (docs/distillation.md: the memory it costs).
  def outputs(self, variables, batch, rng=None, deterministic: bool = True):
    return self._forward(variables, batch, rng, deterministic)

  def distill_view(self, logits, batch):
    return logits.astype(jnp.float32), batch["loss_mask"].astype(jnp.float32)

  def loss_from_outputs(self, logits, batch):
    mask = batch["loss_mask"].astype(jnp.float32)
    tokens = jnp.sum(mask)
    losses = token_cross_entropy(logits, batch["targets"])
    correct = (jnp.argmax(logits, axis=-1) == batch["targets"]).astype(jnp.float32)
    return jnp.sum(losses * mask), {"weight": tokens, "tokens": tokens,
                                    "correct": jnp.sum(correct * mask)}

  def hf_inputs(self, batch):
    return {"input_ids": batch["inputs"], "labels": batch["inputs"]}  # HF shifts the labels

  def benchmark_batch(self, seed: int = 0) -> dict:
    """Random tokens in the batch contract, one segment per row: the step's time alone, not the
    data pipeline's (the same tokens whatever the data seed)."""
    del seed
    c = self.config
    rng = np.random.default_rng(0)
    b, t = c.batch_size, c.seq_len
    tokens = rng.integers(0, c.model.vocab_size, size=(b, t + 1), dtype=np.int32)
    return {"inputs": tokens[:, :-1], "targets": tokens[:, 1:],
            "loss_mask": np.ones((b, t), np.float32),
            "positions": np.broadcast_to(np.arange(t, dtype=np.int32), (b, t)).copy(),
            "segment_ids": np.ones((b, t), np.int32)}

  # -- data ------------------------------------------------------------------------------------

  def train_iterator(self, seed: int, process_index: int = 0, process_count: int = 1):
    c = self.config
    return pipeline.train_iterator(c.data, seq_len=c.seq_len, global_batch_size=c.batch_size,
                                   seed=seed, process_index=process_index,
                                   process_count=process_count)

  def eval_batches(self, split: str = "validation", process_index: int = 0,
                   process_count: int = 1):
    c = self.config
    return pipeline.eval_batches(c.data, seq_len=c.seq_len, global_batch_size=c.batch_size,
                                 max_batches=c.eval_batches or None,
                                 process_index=process_index, process_count=process_count)

  # -- evaluation ------------------------------------------------------------------------------

  def eval_outputs(self, variables, batch):
    loss_sum, aux = self.loss(variables, batch, None, deterministic=True)
    return {"loss_sum": loss_sum, **aux}

  def summarize(self, outputs, split: str = "validation") -> dict[str, float]:
    sums = jax.tree.map(lambda *x: np.sum(x), *outputs)
    tokens = max(float(sums["tokens"]), 1.0)
    loss = float(sums["loss_sum"]) / tokens
    return {"loss": loss, "perplexity": float(np.exp(loss)),
            "accuracy": float(sums["correct"]) / tokens}

  def finish(self, workdir: str, variables, val: dict, eval_batches) -> None:
    """Validation loss next to the unigram baseline, then sample generations."""
    c = self.config
    unigram = pipeline.unigram_cross_entropy(c.data, eval_batches)
    print(f"final validation loss {val['loss']:.4f} nats/token (perplexity "
          f"{val['perplexity']:.1f}); unigram baseline fitted on the training split: "
          f"{unigram:.4f} nats/token")
    if c.sample.prompts and c.sample.max_new_tokens > 0:
      tok = load_tokenizer(c.data.tokenizer or None)
      prompts = [tok.encode(p) for p in c.sample.prompts]
      outs = generation.generate(peft.bind(self.model, self.peft), variables, prompts,
                               max_new_tokens=c.sample.max_new_tokens,
                               temperature=c.sample.temperature, top_k=c.sample.top_k,
                               seed=c.seed, eos_id=tok.eos_id)
      for prompt, out in zip(c.sample.prompts, outs):
        print(f"--- sample ---\n{prompt}{tok.decode(out)}")
