"""Inference over trained runs: batch prediction (prediction.py) and few/zero-shot label scoring
with a causal LM (prompt_scoring.py). Runs are opened by jaxft/run/loader.py."""
