"""transformers config.json <-> `config.model` of the decoder family (jaxft/models/llama.py):
Llama, Mistral, Qwen 2, Qwen 3, Gemma, Gemma 2, Gemma 3 (text).

save_pretrained leaves out fields equal to their defaults, so a field a config.json lacks takes
the default of its transformers class (DEFAULTS, checked against transformers 5.25). Rotary
settings are read from `rope_parameters` (transformers 5) or `rope_theta` + `rope_scaling`
(the config.json files of the published checkpoints); scaling types other than linear and
llama3 change the math jaxft implements and are refused, as are layer features it lacks.
"""

from jaxft.models.llama import FULL, SLIDING, LlamaConfig

# model_type -> transformers' class defaults for the fields that shape the model.
_COMMON = {"num_key_value_heads": None, "head_dim": None, "rms_norm_eps": 1e-6,
           "hidden_act": "silu", "rope_theta": 10_000.0, "tie_word_embeddings": False,
           "attention_bias": False, "attention_dropout": 0.0, "initializer_range": 0.02,
           "sliding_window": None}
_QWEN = {**_COMMON, "vocab_size": 151936, "hidden_size": 4096, "intermediate_size": 22016,
         "num_hidden_layers": 32, "num_attention_heads": 32, "num_key_value_heads": 32,
         "max_position_embeddings": 32768, "use_sliding_window": False,
         "sliding_window": 4096, "max_window_layers": 28}
_GEMMA = {**_COMMON, "vocab_size": 256000, "hidden_size": 3072, "intermediate_size": 24576,
          "num_hidden_layers": 28, "num_attention_heads": 16, "num_key_value_heads": 16,
          "head_dim": 256, "hidden_act": "gelu_pytorch_tanh", "max_position_embeddings": 8192,
          "tie_word_embeddings": True}
DEFAULTS = {
    "llama": {**_COMMON, "vocab_size": 32000, "hidden_size": 4096, "intermediate_size": 11008,
              "num_hidden_layers": 32, "num_attention_heads": 32,
              "max_position_embeddings": 2048, "mlp_bias": False},
    "mistral": {**_COMMON, "vocab_size": 32000, "hidden_size": 4096, "intermediate_size": 14336,
                "num_hidden_layers": 32, "num_attention_heads": 32, "num_key_value_heads": 8,
                "max_position_embeddings": 131072, "sliding_window": 4096},
    "qwen2": _QWEN,
    "qwen3": {**_QWEN, "head_dim": 128},
    "gemma": _GEMMA,
    "gemma2": {**_GEMMA, "hidden_size": 2304, "intermediate_size": 9216,
               "num_hidden_layers": 26, "num_attention_heads": 8, "num_key_value_heads": 4,
               "query_pre_attn_scalar": 256, "sliding_window": 4096,
               "final_logit_softcapping": 30.0, "attn_logit_softcapping": 50.0},
    "gemma3_text": {**_GEMMA, "vocab_size": 262208, "hidden_size": 2304,
                    "intermediate_size": 9216, "num_hidden_layers": 26,
                    "num_attention_heads": 8, "num_key_value_heads": 4,
                    "max_position_embeddings": 131072, "query_pre_attn_scalar": 256,
                    "sliding_window": 4096, "final_logit_softcapping": None,
                    "attn_logit_softcapping": None, "rope_theta": 1_000_000.0,
                    "rope_local_base_freq": 10_000.0, "sliding_window_pattern": 6},
}
_GEMMAS = ("gemma", "gemma2", "gemma3_text")


def _unsupported(field: str, value, why: str) -> ValueError:
  return ValueError(f"unsupported architecture: config.json has {field}={value!r}; {why}")


def _rope(params: dict | None, theta: float, field: str) -> dict:
  """One rotary setting (transformers' rope_parameters entry, or rope_scaling) -> fields."""
  params = dict(params or {})
  kind = params.get("rope_type", params.get("type", "default"))
  out = {"rope_theta": float(params.get("rope_theta", theta)), "rope_type": kind}
  if kind == "linear":
    out["rope_factor"] = float(params["factor"])
  elif kind == "llama3":
    out.update(rope_factor=float(params["factor"]),
               rope_low_freq_factor=float(params["low_freq_factor"]),
               rope_high_freq_factor=float(params["high_freq_factor"]),
               rope_original_max_positions=int(params["original_max_position_embeddings"]))
  elif kind != "default":
    raise _unsupported(field, params, "jaxft implements rope types default, linear and llama3 "
                       "(dynamic NTK, YaRN and LongRoPE are not)")
  if float(params.get("partial_rotary_factor", 1.0)) != 1.0:
    raise _unsupported(field, params, "jaxft rotates every dimension of a head")
  return out


def _rope_fields(hf: dict, d: dict, model_type: str) -> dict:
  theta = float(hf.get("rope_theta", d["rope_theta"]))
  params = hf.get("rope_parameters")
  if model_type != "gemma3_text":
    return _rope(params if params is not None else hf.get("rope_scaling"), theta,
                 "rope_parameters" if params is not None else "rope_scaling")
  # Gemma 3: global layers with the scaled rope, sliding ones with their own unscaled base.
  local_theta = float(hf.get("rope_local_base_freq", d["rope_local_base_freq"]))
  if params is not None and "full_attention" in params:
    out = _rope(params["full_attention"], theta, "rope_parameters.full_attention")
    local = _rope(params.get("sliding_attention"), local_theta,
                  "rope_parameters.sliding_attention")
    if local["rope_type"] != "default":
      raise _unsupported("rope_parameters.sliding_attention", params["sliding_attention"],
                         "jaxft scales the rotary embedding of Gemma 3's global layers only")
    local_theta = local["rope_theta"]
  else:
    out = _rope(params if params is not None else hf.get("rope_scaling"), theta, "rope_scaling")
  return {**out, "rope_local_theta": local_theta}


def _layer_types(hf: dict, d: dict, model_type: str, layers: int, window) -> tuple:
  if hf.get("layer_types"):
    return tuple(hf["layer_types"])
  if model_type in ("qwen2", "qwen3"):
    start = int(hf.get("max_window_layers", d["max_window_layers"]))
    return tuple(SLIDING if window and i >= start else FULL for i in range(layers))
  if model_type == "gemma2":
    return tuple(SLIDING if (i + 1) % 2 else FULL for i in range(layers))
  if model_type == "gemma3_text":
    pattern = int(hf.get("sliding_window_pattern", d["sliding_window_pattern"]))
    return tuple(SLIDING if (i + 1) % pattern else FULL for i in range(layers))
  return ()  # Llama: no window; Mistral: every layer slides


def decoder_overrides(hf: dict) -> dict:
  """config.json of a decoder model_type in DEFAULTS -> `config.model` fields."""
  model_type = hf["model_type"]
  d = DEFAULTS[model_type]
  get = lambda k: hf[k] if hf.get(k) is not None else d.get(k)  # noqa: E731
  heads = int(get("num_attention_heads"))
  layers = int(get("num_hidden_layers"))
  act = hf.get("hidden_activation") or get("hidden_act")
  if model_type in _GEMMAS and act == "gelu":  # transformers reads Gemma's legacy "gelu" so
    act = "gelu_pytorch_tanh"
  if act not in ("silu", "gelu_pytorch_tanh", "gelu_new", "gelu"):
    raise _unsupported("hidden_act", act, "jaxft's decoder uses silu or gelu_pytorch_tanh")
  if hf.get("use_bidirectional_attention"):
    raise _unsupported("use_bidirectional_attention", True, "jaxft's decoder is causal")
  window = get("sliding_window")
  if model_type in ("qwen2", "qwen3") and not hf.get("use_sliding_window", False):
    window = None
  bias = bool(get("attention_bias"))
  out = {
      "family": "llama", "model_type": model_type,
      "vocab_size": int(get("vocab_size")), "hidden_size": int(get("hidden_size")),
      "intermediate_size": int(get("intermediate_size")), "num_hidden_layers": layers,
      "num_attention_heads": heads,
      "num_key_value_heads": int(get("num_key_value_heads") or heads),
      "head_dim": int(get("head_dim") or 0),
      "max_position_embeddings": int(get("max_position_embeddings")),
      "rms_norm_eps": float(get("rms_norm_eps")), "hidden_act": act,
      "attention_bias": bias or model_type == "qwen2",  # Qwen 2: q/k/v biases always
      "attention_out_bias": bias and model_type != "qwen2",
      "mlp_bias": bool(hf.get("mlp_bias", False)),
      "qk_norm": model_type in ("qwen3", "gemma3_text"),
      "norm_plus_one": model_type in _GEMMAS, "embed_scale": model_type in _GEMMAS,
      "post_norms": model_type in ("gemma2", "gemma3_text"),
      "query_pre_attn_scalar": float(get("query_pre_attn_scalar") or 0.0),
      "attn_logit_softcapping": float(get("attn_logit_softcapping") or 0.0),
      "final_logit_softcapping": float(get("final_logit_softcapping") or 0.0),
      "sliding_window": int(window or 0),
      "layer_types": _layer_types(hf, d, model_type, layers, window) if window else (),
      "attention_dropout": float(get("attention_dropout") or 0.0),
      "tie_word_embeddings": bool(get("tie_word_embeddings")),
      "initializer_range": float(get("initializer_range")),
      **_rope_fields(hf, d, model_type),
  }
  if "rope_local_theta" not in out:
    out["rope_local_theta"] = 0.0
  return out


def _rope_dict(cfg: LlamaConfig) -> dict:
  out = {"rope_type": cfg.rope_type, "rope_theta": cfg.rope_theta}
  if cfg.rope_type == "linear":
    out["factor"] = cfg.rope_factor
  elif cfg.rope_type == "llama3":
    out.update(factor=cfg.rope_factor, low_freq_factor=cfg.rope_low_freq_factor,
               high_freq_factor=cfg.rope_high_freq_factor,
               original_max_position_embeddings=cfg.rope_original_max_positions)
  return out


def decoder_config_dict(cfg: LlamaConfig, architecture: str, labels_dict: dict,
                        special: dict) -> dict:
  """A config.json that transformers reads as exactly this model (its class of cfg.model_type).

  `special`: bos/eos/pad token ids (eos may be a list)."""
  mt = cfg.model_type
  out = {
      "architectures": [architecture], "model_type": mt, "vocab_size": cfg.vocab_size,
      "hidden_size": cfg.hidden_size, "intermediate_size": cfg.intermediate_size,
      "num_hidden_layers": cfg.num_hidden_layers,
      "num_attention_heads": cfg.num_attention_heads, "num_key_value_heads": cfg.kv_heads,
      "head_dim": cfg.dim_per_head, "max_position_embeddings": cfg.max_position_embeddings,
      "rms_norm_eps": cfg.rms_norm_eps, "hidden_act": cfg.hidden_act,
      "tie_word_embeddings": cfg.tie_word_embeddings,
      "attention_dropout": cfg.attention_dropout, "initializer_range": cfg.initializer_range,
      "dtype": "float32", "use_cache": True, **special, **labels_dict,
  }
  if mt in _GEMMAS:
    out["hidden_activation"] = cfg.hidden_act
  if mt == "gemma3_text":
    out["rope_parameters"] = {"full_attention": _rope_dict(cfg),
                              "sliding_attention": {"rope_type": "default",
                                                    "rope_theta": cfg.rope_local_theta}}
  else:
    out["rope_parameters"] = _rope_dict(cfg)
  if mt in ("llama", "qwen3", "gemma", "gemma2", "gemma3_text"):
    out["attention_bias"] = cfg.attention_bias
  if mt == "llama":
    out["mlp_bias"] = cfg.mlp_bias
  if mt in ("gemma2", "gemma3_text"):
    scalar = cfg.query_pre_attn_scalar or cfg.dim_per_head  # transformers types it int
    out.update(query_pre_attn_scalar=int(scalar) if float(scalar).is_integer() else scalar,
               attn_logit_softcapping=cfg.attn_logit_softcapping or None,
               final_logit_softcapping=cfg.final_logit_softcapping or None)
  if mt in ("mistral", "qwen2", "qwen3", "gemma2", "gemma3_text"):
    out["sliding_window"] = cfg.sliding_window or None
    if mt in ("qwen2", "qwen3"):
      out.update(use_sliding_window=bool(cfg.sliding_window), max_window_layers=0)
    if cfg.sliding_window and mt != "mistral":
      out["layer_types"] = [SLIDING if s else FULL for s in cfg.sliding_layers]
  return out


def check_exportable(cfg: LlamaConfig) -> None:
  """Refuses a combination of features the transformers class of cfg.model_type cannot hold."""
  mt = cfg.model_type
  gemma = mt in _GEMMAS
  wrong = {
      "norm_plus_one": cfg.norm_plus_one != gemma, "embed_scale": cfg.embed_scale != gemma,
      "post_norms": cfg.post_norms != (mt in ("gemma2", "gemma3_text")),
      "qk_norm": cfg.qk_norm != (mt in ("qwen3", "gemma3_text")),
      "attention_out_bias": cfg.attention_out_bias != (cfg.attention_bias and mt != "qwen2"),
      "attention_bias": mt == "qwen2" and not cfg.attention_bias,
      "mlp_bias": cfg.mlp_bias and mt != "llama",
      "sliding_window": bool(cfg.sliding_window) and mt in ("llama", "gemma"),
      "softcapping": bool(cfg.attn_logit_softcapping or cfg.final_logit_softcapping)
      and mt not in ("gemma2", "gemma3_text"),
      "rope_local_theta": bool(cfg.rope_local_theta) != (mt == "gemma3_text"),
  }
  bad = [k for k, v in wrong.items() if v]
  if bad:
    raise ValueError(f"config.model.model_type={mt!r} (transformers' class for export) cannot "
                     f"hold this model's {', '.join(bad)}; set config.model.model_type to the "
                     "family these features belong to (llama, mistral, qwen2, qwen3, gemma, "
                     "gemma2, gemma3_text)")
