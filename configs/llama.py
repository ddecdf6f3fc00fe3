"""Llama-style decoder (Llama 3.x, Mistral, Qwen 2.5, Gemma 2) causal-LM training.

    python -m jaxft.train --config configs/llama.py[:VARIANT] --workdir runs/llama \
        [--config.init_from=HF_DIR] [--config.FIELD=VALUE ...]

Variants: default (CPU demo: a small Llama pretrained on the embedded Shakespeare, minutes on
2 cores), tiny (tests), cpu-bench (the shape benchmarked against transformers' LlamaForCausalLM
on CPU: 4 layers, d 256, 4 heads / 2 KV heads, SwiGLU 688, vocab 32000), and the published
shapes of llama3.2-1b, llama3.2-3b, llama3.1-8b, llama3.1-70b, qwen2.5-0.5b, qwen2.5-7b,
mistral-7b and gemma2-2b (random init: bring weights with --config.init_from=HF_DIR, whose
config.json then sets every config.model field, and a corpus with --config.data.files).
"""

import ml_collections

from configs import common

_LLAMA3 = dict(model_type="llama", vocab_size=128256, rms_norm_eps=1e-5, rope_theta=500000.0,
               rope_type="llama3", rope_low_freq_factor=1.0, rope_high_freq_factor=4.0,
               rope_original_max_positions=8192, max_position_embeddings=131072)
# Published config.json values of each model (the fields that differ from model()'s defaults).
SHAPES = {
    "llama3.2-1b": dict(_LLAMA3, hidden_size=2048, intermediate_size=8192, num_hidden_layers=16,
                        num_attention_heads=32, num_key_value_heads=8, head_dim=64,
                        rope_factor=32.0, tie_word_embeddings=True),
    "llama3.2-3b": dict(_LLAMA3, hidden_size=3072, intermediate_size=8192, num_hidden_layers=28,
                        num_attention_heads=24, num_key_value_heads=8, head_dim=128,
                        rope_factor=32.0, tie_word_embeddings=True),
    "llama3.1-8b": dict(_LLAMA3, hidden_size=4096, intermediate_size=14336,
                        num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=8,
                        rope_factor=8.0),
    "llama3.1-70b": dict(_LLAMA3, hidden_size=8192, intermediate_size=28672,
                         num_hidden_layers=80, num_attention_heads=64, num_key_value_heads=8,
                         rope_factor=8.0),
    "qwen2.5-0.5b": dict(model_type="qwen2", vocab_size=151936, hidden_size=896,
                         intermediate_size=4864, num_hidden_layers=24, num_attention_heads=14,
                         num_key_value_heads=2, rope_theta=1000000.0, attention_bias=True,
                         max_position_embeddings=32768, tie_word_embeddings=True),
    "qwen2.5-7b": dict(model_type="qwen2", vocab_size=152064, hidden_size=3584,
                       intermediate_size=18944, num_hidden_layers=28, num_attention_heads=28,
                       num_key_value_heads=4, rope_theta=1000000.0, attention_bias=True,
                       max_position_embeddings=32768),
    "mistral-7b": dict(model_type="mistral", vocab_size=32000, hidden_size=4096,
                       intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
                       num_key_value_heads=8, rms_norm_eps=1e-5, sliding_window=4096,
                       max_position_embeddings=32768),
    "gemma2-2b": dict(model_type="gemma2", vocab_size=256000, hidden_size=2304,
                      intermediate_size=9216, num_hidden_layers=26, num_attention_heads=8,
                      num_key_value_heads=4, head_dim=256, hidden_act="gelu_pytorch_tanh",
                      norm_plus_one=True, embed_scale=True, post_norms=True,
                      query_pre_attn_scalar=256.0, attn_logit_softcapping=50.0,
                      final_logit_softcapping=30.0, sliding_window=4096,
                      layer_types=tuple("sliding_attention" if i % 2 == 0 else "full_attention"
                                        for i in range(26)),
                      max_position_embeddings=8192, tie_word_embeddings=True),
}
VARIANTS = ("default", "tiny", "cpu-bench", *SHAPES)


def model() -> ml_collections.ConfigDict:
  """config.model of the decoder family: every field of jaxft/models/llama.py LlamaConfig (a
  Hugging Face directory in config.init_from overwrites them from its config.json)."""
  m = ml_collections.ConfigDict()
  m.family = "llama"
  m.model_type = "llama"  # transformers model_type: llama | mistral | qwen2 | qwen3 | gemma* ...
  m.vocab_size = 32000
  m.hidden_size = 4096
  m.intermediate_size = 11008  # the gated MLP's width
  m.num_hidden_layers = 32
  m.num_attention_heads = 32
  m.num_key_value_heads = 0  # 0 = num_attention_heads; fewer = grouped-query attention
  m.head_dim = 0  # 0 = hidden_size // num_attention_heads
  m.max_position_embeddings = 2048  # context length (rotary: no table, a limit)
  m.rms_norm_eps = 1e-6
  m.hidden_act = "silu"  # silu (Llama, Qwen, Mistral) | gelu_pytorch_tanh (Gemma)
  m.rope_theta = 10000.0
  m.rope_type = "default"  # default | linear | llama3
  m.rope_factor = 1.0
  m.rope_low_freq_factor = 1.0
  m.rope_high_freq_factor = 4.0
  m.rope_original_max_positions = 8192
  m.rope_local_theta = 0.0  # Gemma 3: sliding layers' own rotary base; 0 = the global one
  m.attention_bias = False  # q/k/v biases (Qwen 2)
  m.attention_out_bias = False
  m.mlp_bias = False
  m.qk_norm = False  # Qwen 3, Gemma 3
  m.norm_plus_one = False  # Gemma: RMSNorm scale (1 + w)
  m.embed_scale = False  # Gemma: embeddings x sqrt(hidden_size)
  m.post_norms = False  # Gemma 2/3
  m.query_pre_attn_scalar = 0.0  # Gemma: attention scale 1/sqrt(this); 0 = head_dim
  m.attn_logit_softcapping = 0.0
  m.final_logit_softcapping = 0.0
  m.sliding_window = 0  # 0 = global attention everywhere
  m.layer_types = ()  # per layer sliding_attention | full_attention; () = all slide if window
  m.attention_dropout = 0.0
  m.tie_word_embeddings = False
  m.initializer_range = 0.02
  m.dtype = "float32"  # compute dtype: float32 | bfloat16 (params stay float32)
  m.remat = "none"  # none | full | dots | dots_all (jaxft/models/layers.py)
  m.scan_layers = False
  m.attention_impl = "xla"  # xla | cudnn (GPU, bf16) | splash (TPU)
  return m


def base_config() -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.task = "causal_lm"
  c.seed = 0
  c.init_from = ""  # a local HF decoder directory (config.json + safetensors + tokenizer)
  c.init_layers = ""  # "0,5": a shallower model from init_from's layers 0 and 5 ("" = all)
  c.model = model()

  c.data = ml_collections.ConfigDict()
  c.data.files = ""  # glob(s) of .txt / .jsonl training files; "" = embedded Shakespeare
  c.data.validation_files = ""
  c.data.text_field = "text"
  c.data.encoding = "utf-8"
  c.data.encoding_errors = "strict"
  c.data.validation_fraction = 0.05
  c.data.chunk_chars = 8000
  c.data.tokenizer = ""  # "" = GPT-2's BPE (offline); init_from's tokenizer when it has one
  c.data.data_dir = ""
  c.data.shuffle_seed = 0

  c.seq_len = 2048
  c.batch_size = 256
  c.lm_loss_chunk = 32  # fused LM head + softmax over chunks (0 = plain full logits)
  c.grad_accum_steps = 1
  c.num_steps = 100_000

  c.optim = common.optimizer(lr=3e-4, warmup_steps=2000)
  c.mesh = common.mesh()
  c.axis_rules = common.AXIS_RULES
  c.early_stopping = common.early_stopping()
  c.peft = common.peft()
  c.distill = common.distill()  # --config.distill.teacher=RUN: a smaller LM from a larger one

  c.log_every = 10
  c.eval_every = 500
  c.eval_batches = 50
  c.checkpoint_every = 1000
  c.keep_checkpoints = 3

  c.sample = ml_collections.ConfigDict()
  c.sample.prompts = ("ROMEO:", "First Citizen:")
  c.sample.max_new_tokens = 60
  c.sample.temperature = 0.8
  c.sample.top_k = 40
  return c


def get_config(variant: str = "default") -> ml_collections.ConfigDict:
  variant = variant or "default"
  if variant not in VARIANTS:
    raise ValueError(f"unknown variant {variant!r} of configs/llama.py; choose one of "
                     f"{', '.join(VARIANTS)} (e.g. --config configs/llama.py:tiny)")
  c = base_config()
  c.variant = variant
  if variant in SHAPES:
    c.model.update(SHAPES[variant])
    # What fits a slice (docs/llm-compile.md: Llama 3.1 8B at 32 x 8192 on a v5p-8, remat
    # full); raise grad_accum_steps for larger batches. splash attention on TPU.
    c.model.update(dtype="bfloat16", scan_layers=True, remat="full")
    c.seq_len = 4096 if variant == "gemma2-2b" else 8192
    c.batch_size = 32
    c.mesh.update(data=1, fsdp=-1)
  elif variant == "default":
    # CPU demo: a small Llama (GQA 4/2, SwiGLU) on Shakespeare with GPT-2's BPE.
    c.model.update(vocab_size=50257, hidden_size=128, intermediate_size=344,
                   num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2,
                   max_position_embeddings=256, tie_word_embeddings=True)
    c.seq_len = 128
    c.batch_size = 16
    c.num_steps = 300
    c.optim.update(lr=2e-3, warmup_steps=30, weight_decay=0.1)
    c.eval_every = 100
    c.eval_batches = 20
    c.checkpoint_every = 100
  elif variant == "tiny":
    c.model.update(vocab_size=50257, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                   tie_word_embeddings=True)
    c.seq_len = 32
    c.batch_size = 8
    c.num_steps = 6
    c.optim.update(lr=1e-3, warmup_steps=2)
    c.log_every = 1
    c.eval_every = 3
    c.eval_batches = 2
    c.checkpoint_every = 3
    c.sample.max_new_tokens = 8
  elif variant == "cpu-bench":
    c.model.update(vocab_size=32000, hidden_size=256, intermediate_size=688,
                   num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2,
                   max_position_embeddings=2048)
    c.seq_len = 256
    c.batch_size = 8
    c.num_steps = 100
    c.optim.update(warmup_steps=10)
  return c
