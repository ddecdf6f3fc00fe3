"""Bottleneck adapters (Houlsby et al. 2019) after the attention and MLP output projections.

The output h of each targeted layer becomes h + W_up act(W_down h + b_down) + b_up, inside the
residual branch, before the skip connection (and before BERT's post-LayerNorm). W_up and b_up
start at zero, so the adapted model starts as the base model exactly.
"""

import jax
from flax import linen as nn

from jaxft.peft.base import Method, logical_names, module_path, peft_variable


class Adapter(Method):
  name = "adapter"
  default_targets = r"attn/out$|mlp/(proj|down)$"  # GPT-2 / BERT proj; the decoders' down
  default_lr = 1e-3

  def intercept(self, f, args, kwargs, context, *, deterministic: bool):
    y = f(*args, **kwargs)
    if not self.targets_call(context, (nn.Dense, nn.DenseGeneral)):
      return y
    module = context.module
    path = module_path(module)
    features = module.features
    if not isinstance(features, int) and len(features) != 1:
      raise ValueError(f"config.peft.targets={self.targets.pattern!r} matches {path}, whose "
                       f"output is {tuple(features)}-shaped; adapters go after layers with a "
                       "flat output (the attention and MLP output projections)")
    d = features if isinstance(features, int) else features[0]
    m = int(self.cfg.adapter_size)
    if m < 1:
      raise ValueError(f"config.peft.adapter_size={m} must be >= 1")
    embed = logical_names(module, "bias", 1)
    down = peft_variable(module, "adapter_down", nn.initializers.normal(0.01), (d, m),
                         (*embed, None))
    down_b = peft_variable(module, "adapter_down_bias", nn.initializers.zeros, (m,), (None,))
    up = peft_variable(module, "adapter_up", nn.initializers.zeros, (m, d), (None, *embed))
    up_b = peft_variable(module, "adapter_up_bias", nn.initializers.zeros, (d,), embed)
    h = jax.nn.gelu(y @ down.astype(y.dtype) + down_b.astype(y.dtype))
    return y + h @ up.astype(y.dtype) + up_b.astype(y.dtype)

  def describe(self) -> str:
    return f"adapter size={self.cfg.adapter_size} after {self.targets.pattern!r}"
