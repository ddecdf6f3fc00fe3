"""Serves a trained model over HTTP.

    python -m jaxft.serve --workdir runs/sft [--port 8000]           # 127.0.0.1 by default
    curl -s localhost:8000/v1/chat/completions \
        -d '{"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 32, "stream": true}'
    python -m jaxft.serve --workdir runs/bbc     ->  POST /v1/classify {"texts": ["..."]}
    python -m jaxft.serve --workdir runs/bbc,runs/bbc_seed1,runs/bbc_seed2   # an ensemble

--workdir: a jaxft run (its best, else latest checkpoint), a quantised run (jaxft.quantize) or
a Hugging Face directory (a *ForCausalLM, a task class, or a BertModel such as
all-MiniLM-L6-v2 for embeddings). The server binds 127.0.0.1 unless --host says otherwise; any
other address needs --api_key_file (clients send `Authorization: Bearer <key>`) or an explicit
--insecure. SIGTERM drains: /readyz turns 503, no new connection is accepted, requests in flight
finish within --drain_seconds, and the process exits 0. Guide: docs/serving.md.
"""

import dataclasses
import ipaddress
import logging
import os
import signal
import sys

import uvicorn
from absl import app, flags

from jaxft.serve.app import Settings, create_app

FIELDS = [f.name for f in dataclasses.fields(Settings)]


def _define_flags() -> None:
  flags.DEFINE_string("workdir", None, "the run or Hugging Face directory to serve; several "
                      "comma-separated encoder runs: their ensemble", required=True)
  flags.DEFINE_enum("ensemble", "mean", ["mean", "vote"], "several --workdir: average the "
                    "members' probabilities, or majority vote (docs/ensembles.md)")
  flags.DEFINE_integer("step", None, "checkpoint step (default: the best, else the latest)")
  flags.DEFINE_enum("quantize", "", ["", "int8", "int4"], "quantise the weights at load "
                    "(weight-only; or serve a run python -m jaxft.quantize wrote)")
  flags.DEFINE_integer("seq_len", 0, "encoders from a Hugging Face directory: tokens per row "
                       "(0: the task's default; a jaxft run keeps its own)")
  flags.DEFINE_string("model_name", "", "the model id clients name (default: the directory's)")
  flags.DEFINE_string("host", "127.0.0.1", "address to bind; non-loopback needs --api_key_file "
                      "or --insecure")
  flags.DEFINE_integer("port", 8000, "port to listen on")
  flags.DEFINE_string("api_key_file", None, "file holding the API key clients must send as "
                      "'Authorization: Bearer <key>'")
  flags.DEFINE_bool("insecure", False, "allow a non-loopback --host without an API key")
  flags.DEFINE_integer("slots", 8, "generation requests decoded together (KV-cache slots)")
  flags.DEFINE_integer("max_len", 0, "tokens per generation request, prompt + new (0: the "
                       "model's context)")
  flags.DEFINE_integer("max_queue", 64, "generation requests waiting for a slot; more get 429")
  flags.DEFINE_integer("max_tokens_limit", 1024, "the largest max_tokens a request may ask")
  flags.DEFINE_integer("max_n", 8, "the most sequences (n x prompts) one request may ask")
  flags.DEFINE_float("request_timeout", 120.0, "seconds a request may run (504 past it)")
  flags.DEFINE_integer("max_body_bytes", 1 << 20, "largest request body (413 past it)")
  flags.DEFINE_integer("max_items", 64, "inputs per encoder request")
  flags.DEFINE_integer("encoder_max_batch", 32, "encoder rows per device batch")
  flags.DEFINE_float("encoder_max_wait_ms", 5.0, "how long an encoder batch waits to fill")
  flags.DEFINE_integer("encoder_max_queue", 256, "encoder inputs waiting; more get 429")
  flags.DEFINE_float("drain_seconds", 30.0, "on SIGTERM, how long requests in flight may "
                     "take to finish")
  flags.DEFINE_bool("log_bodies", False, "log request bodies (default: path, sizes, fields)")
  flags.DEFINE_bool("redact", False, "mask e-mail addresses, phone and card numbers in "
                    "logged bodies")


def read_api_key(path: str) -> str:
  if not os.path.isfile(path):
    raise app.UsageError(f"--api_key_file={path} is not a file")
  with open(path, encoding="utf-8") as f:
    key = f.read().strip()
  if len(key) < 16:
    raise app.UsageError(f"--api_key_file={path} holds a key of {len(key)} characters; use at "
                         "least 16 (e.g. `openssl rand -hex 32 > key`)")
  return key


def is_loopback(host: str) -> bool:
  if host == "localhost":
    return True
  try:
    return ipaddress.ip_address(host).is_loopback
  except ValueError:
    return False  # a host name: may resolve anywhere


def check_bind(host: str, api_key: str | None, insecure: bool) -> None:
  """A server reachable from other machines needs a key, unless the user says otherwise."""
  if not is_loopback(host) and not api_key and not insecure:
    raise app.UsageError(
        f"--host={host} accepts connections from other machines: give --api_key_file (clients "
        "send 'Authorization: Bearer <key>') or, on a network you trust, --insecure")


class DrainingServer(uvicorn.Server):
  """uvicorn, with /readyz turning 503 the moment SIGTERM (or Ctrl-C) arrives."""

  def __init__(self, config, state):
    super().__init__(config)
    self.state = state

  def handle_exit(self, sig, frame):
    self.state.draining = True
    super().handle_exit(sig, frame)


def main(argv):
  del argv
  f = flags.FLAGS
  api_key = read_api_key(f.api_key_file) if f.api_key_file else None
  check_bind(f.host, api_key, f.insecure)
  for path in f.workdir.split(","):
    if path.strip() and not os.path.isdir(path.strip()):
      raise app.UsageError(f"--workdir={path.strip()} is not a directory")
  settings = Settings(**{name: getattr(f, name) for name in FIELDS if name != "api_key"},
                      api_key=api_key)
  logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
  application = create_app(settings)
  config = uvicorn.Config(application, host=f.host, port=f.port, log_level="info",
                          timeout_graceful_shutdown=f.drain_seconds, access_log=False)
  # Once drained, uvicorn re-raises the signal under the handler it found at start; Python's
  # default would end the process as killed by SIGTERM (-15, shown as 143) after a clean drain.
  signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
  DrainingServer(config, application.state.server).run()


if __name__ == "__main__":
  _define_flags()
  app.run(main)
