"""Model families: backbones return hidden states, heads own logits and losses."""
