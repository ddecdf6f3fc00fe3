"""Test-wide setup: 8 fake CPU devices (before any JAX op) and parsed absl flags (grain)."""

import atexit
import os
import shutil
import sys
import tempfile

# One XLA compilation cache for the whole session, this process and the CLIs it starts (they
# inherit the environment): many tests compile the same tiny programs (measured: 13% off the
# fine-tuning, packing and PEFT files). Fresh per session, so nothing carries across runs.
_XLA_CACHE = tempfile.mkdtemp(prefix="jaxft-tests-xla-cache-")
atexit.register(shutil.rmtree, _XLA_CACHE, ignore_errors=True)
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", _XLA_CACHE)
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES", "0")

import jax  # noqa: E402

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
