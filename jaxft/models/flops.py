"""Model FLOPs of one trained token, counted the way MaxText and the PaLM paper count them.

    matmuls     2 FLOPs per weight per token forward, 4 backward (the activation and the weight
                gradient): 6·N, N the weights of every matmul the token goes through — the
                blocks, the LM head (a tied embedding counts here, as a matmul), a head's share
                (a pooler or classifier applied once per example counts once per example)
    attention   forward QKᵀ and AV are 2·T·W each per layer and token (W = query heads × head
                dim), ×3 with the backward: 12·L·T·W; halved under causal masking (half the
                scores are never needed), the convention MaxText uses
    not counted embedding gathers, norms, softmax, activations, dropout, the optimizer

With PEFT the frozen weights' gradients are never taken: frozen matmuls (the base, and a head
the method does not train, such as a tied LM head) count 4·N, trained ones (a task's own
classifier) 6·N; adapter matmuls (rank r) and base weights `config.peft.trainable` unfreezes
are left out of the split. T is the row length the step
computes (packed or padded rows cost their full length), so padding is compute that yields no
model FLOPs: tokens/s × FLOPs/token is useful work only.
"""

import dataclasses


@dataclasses.dataclass(frozen=True)
class Backbone:
  """What a family's FLOPs depend on (each family module builds one from its config)."""

  layers: int
  width: int  # d_model: a head's input
  attention_width: int  # query heads × head dim
  layer_matmul_weights: int  # weights of one block's matmuls (q, k, v, out, MLP)
  causal: bool


def training_flops_per_token(backbone: Backbone, seq_len: int, trained_head: float,
                             frozen_head: float = 0.0, *, frozen_base: bool = False) -> float:
  """FLOPs of one token of a training step (forward + backward), see the module doc.

  `trained_head` / `frozen_head`: the head's matmul weights a token pays for (the LM head's
  d·V for every token; a classifier's weights once per example over the row length), split
  by whether their gradient is taken."""
  base = backbone.layers * backbone.layer_matmul_weights
  matmuls = ((4.0 if frozen_base else 6.0) * base + 6.0 * trained_head + 4.0 * frozen_head)
  attention = 12.0 * backbone.layers * seq_len * backbone.attention_width
  return matmuls + (attention / 2 if backbone.causal else attention)
