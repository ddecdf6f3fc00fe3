"""Serving throughput and latency: continuous batching against one-request-at-a-time serving of
the same model, at several numbers of concurrent clients, in one run.

    python -m jaxft.bench.serve --workdir runs/gpt2 [--slots 16] [--concurrency 1,4,16,64] \\
        [--max_tokens 32] [--route completions|chat]

Each mode is a real `python -m jaxft.serve` process on 127.0.0.1 (--slots N, then --slots 1:
the same engine decoding one request at a time); the clients run here, each sending greedy
streamed requests back to back (prompts: lines of the embedded Shakespeare corpus, or
--prompts_file), so both modes generate the same tokens. Per level: requests/s, generated
tokens/s, latency p50/p99 (request to last byte) and time to first token p50/p99. The last line
is one JSON object.
"""

import asyncio
import json
import lzma
import os
import signal
import socket
import subprocess
import sys
import time

import httpx
import numpy as np
from absl import app, flags

CORPUS = os.path.join(os.path.dirname(os.path.dirname(__file__)), "data", "corpus",
                      "shakespeare_validation.jsonl.xz")


def _define_flags() -> None:
  flags.DEFINE_string("workdir", None, "the run to serve (a causal LM)", required=True)
  flags.DEFINE_integer("slots", 16, "KV-cache slots of the continuous-batching server")
  flags.DEFINE_list("concurrency", ["1", "4", "16", "64"], "concurrent clients, per level")
  flags.DEFINE_integer("requests", 0, "requests per level (0: max(16, 2 x clients))")
  flags.DEFINE_integer("max_tokens", 32, "tokens per request")
  flags.DEFINE_enum("route", "completions", ["completions", "chat"], "the route clients call")
  flags.DEFINE_string("prompts_file", None, "one prompt per line (default: corpus lines)")
  flags.DEFINE_integer("max_len", 0, "the servers' --max_len (0: the model's context)")
  flags.DEFINE_bool("skip_one_at_a_time", False, "only run the continuous-batching server")


def corpus_prompts(n: int = 256) -> list[str]:
  with lzma.open(CORPUS, "rt", encoding="utf-8") as f:
    text = "\n".join(json.loads(line)["text"] for line in f)
  lines = [line.strip() for line in text.splitlines() if len(line.strip()) > 20]
  return lines[:n]


def free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def start_server(workdir: str, slots: int, max_len: int, timeout: float = 600.0):
  """(process, base URL) of a `python -m jaxft.serve` that has turned ready."""
  port = free_port()
  cmd = [sys.executable, "-m", "jaxft.serve", f"--workdir={workdir}", f"--port={port}",
         f"--slots={slots}", f"--max_queue={max(256, slots)}", f"--max_len={max_len}"]
  process = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
  base = f"http://127.0.0.1:{port}"
  deadline = time.monotonic() + timeout
  while time.monotonic() < deadline:
    if process.poll() is not None:
      raise RuntimeError(f"the server exited ({process.returncode}): {process.stderr.read()}")
    try:
      if httpx.get(f"{base}/readyz", timeout=2).status_code == 200:
        return process, base
    except httpx.HTTPError:
      pass
    time.sleep(0.5)
  process.kill()
  raise TimeoutError(f"the server was not ready within {timeout:g} s")


def stop_server(process) -> None:
  process.send_signal(signal.SIGTERM)
  try:
    process.wait(60)
  except subprocess.TimeoutExpired:
    process.kill()


async def _one(client, route: str, prompt: str, max_tokens: int) -> tuple[float, float, int]:
  """(latency, time to first token, tokens) of one streamed greedy request."""
  body = {"max_tokens": max_tokens, "temperature": 0, "stream": True,
          "stream_options": {"include_usage": True}}
  if route == "chat":
    path, body["messages"] = "/v1/chat/completions", [{"role": "user", "content": prompt}]
  else:
    path, body["prompt"] = "/v1/completions", prompt
  started = time.perf_counter()
  first, tokens = None, 0
  async with client.stream("POST", path, json=body) as r:
    if r.status_code != 200:
      raise RuntimeError(f"{path} answered {r.status_code}: {await r.aread()}")
    async for line in r.aiter_lines():
      if not line.startswith("data: ") or line == "data: [DONE]":
        continue
      chunk = json.loads(line[6:])
      if first is None and chunk.get("choices"):
        first = time.perf_counter() - started
      if chunk.get("usage"):
        tokens = chunk["usage"]["completion_tokens"]
  return time.perf_counter() - started, first or 0.0, tokens


async def run_level(base: str, clients: int, prompts: list[str], requests: int, route: str,
                    max_tokens: int) -> dict:
  """`clients` concurrent clients sending `requests` requests in all, back to back."""
  queue = list(range(requests))
  results = []

  async def client_loop(client):
    while queue:
      i = queue.pop()
      results.append(await _one(client, route, prompts[i % len(prompts)], max_tokens))

  limits = httpx.Limits(max_connections=clients + 4)
  async with httpx.AsyncClient(base_url=base, timeout=600, limits=limits) as client:
    started = time.perf_counter()
    await asyncio.gather(*(client_loop(client) for _ in range(clients)))
    wall = time.perf_counter() - started
  latency = np.array([r[0] for r in results])
  ttft = np.array([r[1] for r in results])
  tokens = sum(r[2] for r in results)
  return {"clients": clients, "requests": len(results), "wall_s": round(wall, 3),
          "requests_per_s": round(len(results) / wall, 3),
          "tokens_per_s": round(tokens / wall, 1), "tokens": tokens,
          "latency_p50_s": round(float(np.percentile(latency, 50)), 3),
          "latency_p99_s": round(float(np.percentile(latency, 99)), 3),
          "ttft_p50_s": round(float(np.percentile(ttft, 50)), 3),
          "ttft_p99_s": round(float(np.percentile(ttft, 99)), 3)}


def bench(workdir: str, modes: dict[str, int], levels: list[int], prompts: list[str],
          requests: int, route: str, max_tokens: int, max_len: int) -> dict:
  out = {}
  for mode, slots in modes.items():
    process, base = start_server(workdir, slots, max_len)
    try:
      asyncio.run(run_level(base, 1, prompts, 2, route, max_tokens))  # warm the connection
      out[mode] = [asyncio.run(run_level(base, c, prompts, requests or max(16, 2 * c), route,
                                         max_tokens)) for c in levels]
    finally:
      stop_server(process)
    for row in out[mode]:
      print(f"{mode:>15} clients {row['clients']:>3}: {row['requests_per_s']:7.2f} req/s "
            f"{row['tokens_per_s']:8.1f} tok/s  latency p50 {row['latency_p50_s']:.3f} s "
            f"p99 {row['latency_p99_s']:.3f} s  first token p50 {row['ttft_p50_s']:.3f} s",
            flush=True)
  return out


def main(argv):
  del argv
  f = flags.FLAGS
  if f.prompts_file:
    with open(f.prompts_file, encoding="utf-8") as fh:
      prompts = [line.strip() for line in fh if line.strip()]
  else:
    prompts = corpus_prompts()
  levels = [int(c) for c in f.concurrency]
  modes = {"continuous": f.slots}
  if not f.skip_one_at_a_time:
    modes["one-at-a-time"] = 1
  out = bench(f.workdir, modes, levels, prompts, f.requests, f.route, f.max_tokens, f.max_len)
  if "one-at-a-time" in out:
    ratios = {row["clients"]: round(row["tokens_per_s"] / base["tokens_per_s"], 2)
              for row, base in zip(out["continuous"], out["one-at-a-time"])}
    print("continuous / one-at-a-time tokens/s: " + ", ".join(
        f"{c} clients {r}x" for c, r in ratios.items()))
    out["ratio_tokens_per_s"] = ratios
  print(json.dumps({"workdir": f.workdir, "slots": f.slots, "max_tokens": f.max_tokens,
                    "route": f.route, **out}))


if __name__ == "__main__":
  _define_flags()
  app.run(main)
