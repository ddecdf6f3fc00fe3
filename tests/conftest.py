"""Test-wide setup: 8 fake CPU devices (before any JAX op) and parsed absl flags (grain)."""

import os
import sys

import jax

jax.config.update("jax_num_cpu_devices", 8)

from absl import flags  # noqa: E402

flags.FLAGS.mark_as_parsed()

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:  # so that `configs` imports as a package, like under python -m
  sys.path.insert(0, ROOT)


import pytest  # noqa: E402


@pytest.fixture(scope="session")
def tiny_bert(tmp_path_factory):
  """A random-init BertModel directory with the real all-MiniLM-L6-v2 tokenizer files."""
  from tests.helpers import save_tiny_bert

  return save_tiny_bert(tmp_path_factory.mktemp("tiny_bert"))
