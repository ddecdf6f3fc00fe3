"""`python -m jaxft.serve` as a real process on loopback: concurrent clients (zero failures,
every response valid and equal to the same request made alone), a client that leaves frees its
KV-cache slot, SIGTERM drains the request in flight and exits 0, the API key, and the refusal to
bind a public address without one.

One server process serves the whole module (its start-up compiles every program, ~20 s on a
small CPU); the drain test is last because it ends that process.
"""

import concurrent.futures
import json
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time

import httpx
import pytest

from tests.serve_models import write_tiny_chat_lm

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
KEY = "k" * 32
AUTH = {"Authorization": f"Bearer {KEY}"}
CONTEXT = 1024  # long enough that a long request decodes for ~1 s on CPU
SLOTS = 4
DRAIN_SECONDS = 20
READY_TIMEOUT = 120.0
OCCUPANCY = 'jaxft_batch_occupancy{engine="generation"}'
RATE = "jaxft_generated_tokens_per_second"
REQUESTS = "jaxft_requests_total"
# A greedy request that runs to max_tokens (the long_reference fixture checks it does): the
# disconnect and drain tests need a generation that would otherwise keep going.
LONG = {"prompt": "To be, or not to be", "max_tokens": 1000, "temperature": 0}


def free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


class Served:
  """A `python -m jaxft.serve` process, its port and its log (stdout and stderr)."""

  def __init__(self, workdir: str, log_path: str, *flags: str):
    self.port, self.log_path = free_port(), log_path
    self.url = f"http://127.0.0.1:{self.port}"
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "PYTHONUNBUFFERED": "1"}
    with open(log_path, "wb") as log:  # a file, not a pipe: a full pipe would block the server
      self.proc = subprocess.Popen(
          [sys.executable, "-m", "jaxft.serve", "--workdir", workdir, "--port", str(self.port),
           *flags], cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)

  def log(self) -> str:
    with open(self.log_path, encoding="utf-8", errors="replace") as f:
      return f.read()

  def wait_ready(self) -> None:
    deadline = time.monotonic() + READY_TIMEOUT
    while time.monotonic() < deadline:
      if self.proc.poll() is not None:
        pytest.fail(f"the server exited with {self.proc.returncode}:\n{self.log()}")
      try:
        if httpx.get(f"{self.url}/readyz", timeout=5).status_code == 200:
          return
      except httpx.TransportError:
        pass  # not listening yet
      time.sleep(0.25)
    self.stop()
    pytest.fail(f"not ready within {READY_TIMEOUT:g} s:\n{self.log()}")

  def stop(self) -> None:
    if self.proc.poll() is None:
      self.proc.kill()
      self.proc.wait(30)


@pytest.fixture(scope="module")
def server(tmp_path_factory):
  root = tmp_path_factory.mktemp("serve_process")
  lm = write_tiny_chat_lm(root / "lm", context=CONTEXT)
  key_file = root / "api_key"
  key_file.write_text(KEY + "\n")
  served = Served(lm, str(root / "server.log"), "--api_key_file", str(key_file),
                  "--slots", str(SLOTS), "--max_len", str(CONTEXT), "--max_tokens_limit",
                  str(CONTEXT), "--max_queue", "64", "--drain_seconds", str(DRAIN_SECONDS))
  served.wait_ready()
  yield served
  served.stop()


def client(served, **kw) -> httpx.Client:
  return httpx.Client(base_url=served.url, headers=AUTH, timeout=60, **kw)


def metrics(http: httpx.Client) -> dict[str, float]:
  r = http.get("/metrics")
  assert r.status_code == 200, r.text
  return {line.rsplit(" ", 1)[0]: float(line.rsplit(" ", 1)[1])
          for line in r.text.splitlines() if line and not line.startswith("#")}


def settled(http: httpx.Client) -> dict[str, float]:
  """/metrics once no slot is busy and the request counts hold still: a response reaches its
  client a moment before the engine frees its slot and the request guard counts it."""
  deadline, previous = time.monotonic() + 5, None
  while True:
    sample = metrics(http)
    counted = sum(v for k, v in sample.items() if k.startswith(REQUESTS + '{endpoint="/v1/'))
    idle = sample[OCCUPANCY] == 0 and sample["jaxft_queue_depth"] == 0
    if (idle and counted == previous) or time.monotonic() > deadline:
      return sample
    previous = counted
    time.sleep(0.05)


def sse_payloads(lines) -> list[str]:
  return [line[len("data: "):] for line in lines if line.startswith("data: ")]


# -- validating responses as OpenAI shapes them --------------------------------------------------

def expect_usage(usage: dict, choices: list[dict], max_tokens: int) -> None:
  assert usage["total_tokens"] == usage["prompt_tokens"] + usage["completion_tokens"], usage
  assert usage["prompt_tokens"] > 0
  done = usage["completion_tokens"]
  assert done <= max_tokens * len(choices), (usage, max_tokens)
  if all(c["finish_reason"] == "length" for c in choices):
    assert done == max_tokens * len(choices), usage
  else:  # a choice that stopped (EOS) made fewer than max_tokens
    assert done < max_tokens * len(choices), usage


def whole(kind: str, body: dict, n: int) -> dict:
  """A JSON response reduced to what a repeat of the request must reproduce."""
  assert body["object"] == ("chat.completion" if kind == "chat" else "text_completion")
  assert body["id"].startswith("chatcmpl-" if kind == "chat" else "cmpl-")
  choices = body["choices"]
  assert [c["index"] for c in choices] == list(range(n))
  out = []
  for c in choices:
    assert c["finish_reason"] in ("stop", "length"), c
    if kind == "chat":
      assert c["message"]["role"] == "assistant"
      text = c["message"]["content"]
    else:
      text = c["text"]
    assert isinstance(text, str)
    out.append((text, c["finish_reason"]))
  return {"choices": out, "usage": body["usage"]}


def streamed(kind: str, payloads: list[str], n: int, with_usage: bool) -> dict:
  """A server-sent event stream reduced as `whole` reduces a JSON response."""
  assert payloads and payloads[-1] == "[DONE]", payloads[-3:]
  chunks = [json.loads(p) for p in payloads[:-1]]
  assert len({c["id"] for c in chunks}) == 1
  assert {c["object"] for c in chunks} == {"chat.completion.chunk" if kind == "chat" else
                                           "text_completion"}
  usage = None
  if with_usage:  # the last chunk: usage and no choices
    usage = chunks.pop()["usage"]
    assert chunks and all(c["choices"] for c in chunks)
  texts, finish, seen = [""] * n, [None] * n, set()
  for c in chunks:
    assert "usage" not in c or c["usage"] is None, c
    (choice,) = c["choices"]
    i = choice["index"]
    assert finish[i] is None, "a chunk after the choice's finish_reason"
    if kind == "chat":
      assert (choice["delta"].get("role") == "assistant") == (i not in seen), choice
      texts[i] += choice["delta"].get("content", "")
    else:
      texts[i] += choice["text"]
    seen.add(i)
    finish[i] = choice["finish_reason"]
  assert all(f in ("stop", "length") for f in finish), finish
  return {"choices": list(zip(texts, finish)), "usage": usage}


MESSAGES = [[{"role": "user", "content": "Whether 'tis nobler in the mind to suffer"}],
            [{"role": "system", "content": "Be brief."},
             {"role": "user", "content": "The slings and arrows of outrageous fortune?"}]]
# (route, body): seeded bodies must give the same answer under load as alone; the unseeded one
# is checked for shape only.
SPECS = [
    ("text", {"prompt": "To be, or not to be", "max_tokens": 24, "temperature": 0}),
    ("text", {"prompt": "To be, or not to be", "max_tokens": 24, "temperature": 0,
              "stream": True, "stream_options": {"include_usage": True}}),
    ("chat", {"messages": MESSAGES[0], "max_tokens": 16, "temperature": 0.7, "seed": 11}),
    ("chat", {"messages": MESSAGES[0], "max_tokens": 16, "temperature": 0.7, "seed": 11,
              "stream": True, "stream_options": {"include_usage": True}}),
    ("text", {"prompt": "Whether 'tis nobler", "max_tokens": 40, "temperature": 1.0,
              "top_p": 0.9, "seed": 5, "n": 2}),
    ("text", {"prompt": "the slings and arrows", "max_tokens": 8, "temperature": 1.0,
              "top_k": 20, "seed": 2, "stream": True}),
    ("chat", {"messages": MESSAGES[1], "max_tokens": 32, "temperature": 0}),
    ("chat", {"messages": MESSAGES[1], "max_tokens": 48, "temperature": 1.3, "stream": True,
              "stream_options": {"include_usage": True}}),
]
ROUTES = {"text": "/v1/completions", "chat": "/v1/chat/completions"}


def ask(http: httpx.Client, kind: str, body: dict) -> dict:
  """One request, validated; its reduced answer."""
  if not body.get("stream"):
    r = http.post(ROUTES[kind], json=body)
    assert r.status_code == 200, r.text
    out = whole(kind, r.json(), body.get("n", 1))
    expect_usage(out["usage"], r.json()["choices"], body["max_tokens"])
    return out
  with http.stream("POST", ROUTES[kind], json=body) as r:
    assert r.status_code == 200, r.read()
    assert r.headers["content-type"].startswith("text/event-stream")
    with_usage = bool(body.get("stream_options", {}).get("include_usage"))
    out = streamed(kind, sse_payloads(r.iter_lines()), body.get("n", 1), with_usage)
  if with_usage:
    expect_usage(out["usage"], [{"finish_reason": f} for _, f in out["choices"]],
                 body["max_tokens"])
  return out


def without_stream(body: dict) -> str:
  return json.dumps({k: v for k, v in body.items() if k not in ("stream", "stream_options")},
                    sort_keys=True)


# -- the tests ------------------------------------------------------------------------------------

def test_api_key_is_required_except_for_probes(server):
  with httpx.Client(base_url=server.url, timeout=30) as anonymous:
    assert anonymous.get("/readyz").status_code == 200
    assert anonymous.get("/healthz").status_code == 200
    for path in ("/v1/models", "/metrics"):
      r = anonymous.get(path)
      assert r.status_code == 401 and r.headers["www-authenticate"] == "Bearer", path
    r = anonymous.post("/v1/completions", json={"prompt": "hi", "max_tokens": 2},
                       headers={"Authorization": "Bearer " + "x" * 32})
    assert r.status_code == 401 and "--api_key_file" in r.json()["error"]["message"]
  with client(server) as http:
    assert http.get("/v1/models").json()["data"][0]["id"] == "lm"
    assert http.post("/v1/completions", json={"prompt": "hi", "max_tokens": 2}).status_code == 200


def test_concurrent_clients_all_succeed_with_the_answers_they_get_alone(server):
  clients, per_client = 16, 3
  with client(server) as http:  # each seeded request alone, one at a time
    bodies = {without_stream(b): (kind, json.loads(without_stream(b))) for kind, b in SPECS
              if "seed" in b or b["temperature"] == 0}
    alone = {key: ask(http, *spec) for key, spec in bodies.items()}
    before = settled(http)
  start = threading.Barrier(clients)

  def one_client(i: int) -> list[tuple[int, dict]]:
    with client(server) as http:
      start.wait()
      return [(s, ask(http, *SPECS[s])) for s in
              ((i + j * 3) % len(SPECS) for j in range(per_client))]

  with concurrent.futures.ThreadPoolExecutor(clients) as pool:
    futures = [pool.submit(one_client, i) for i in range(clients)]
    results = [f.result(timeout=120) for f in futures]  # any failure raises here
  checked = 0
  for s, out in (pair for result in results for pair in result):
    _, body = SPECS[s]
    key = without_stream(body)
    if key in alone:
      expected = alone[key]
      assert out["choices"] == expected["choices"], (s, out, expected)
      if out["usage"] is not None:
        assert out["usage"] == expected["usage"], (s, out, expected)
      checked += 1
  assert checked >= clients * per_client * 3 // 4
  sent = {"text": 0, "chat": 0}
  for result in results:
    for s, _ in result:
      sent[SPECS[s][0]] += 1
  with client(server) as http:
    after = settled(http)
  counts = {k: after[k] - before.get(k, 0.0) for k in after
            if k.startswith(REQUESTS + '{endpoint="/v1/')}
  ok = REQUESTS + '{endpoint="/v1/%s",status="200"}'
  assert counts[ok % "completions"] == sent["text"]
  assert counts[ok % "chat/completions"] == sent["chat"]
  assert not [k for k, v in counts.items() if v and 'status="200"' not in k], counts
  assert after[OCCUPANCY] == 0 and after["jaxft_queue_depth"] == 0


@pytest.fixture(scope="module")
def long_reference(server):
  """LONG made alone: it runs to max_tokens (no EOS), so a slot that stayed busy would decode
  all of it."""
  with client(server) as http:
    out = ask(http, "text", LONG)
  assert out["choices"][0][1] == "length", out
  return out


def test_a_client_that_disconnects_frees_its_slot(server, long_reference):
  """Tokens the engine generated, from the gauge of tokens per second between scrapes: had the
  slot not been freed it would decode all LONG["max_tokens"]."""
  with client(server) as http:
    scrape, generated = settled(http), 0.0
    assert scrape[OCCUPANCY] == 0
    last = time.monotonic()

    def tokens_since_last_scrape() -> dict:
      nonlocal last, generated
      sample = metrics(http)
      now = time.monotonic()
      generated += sample[RATE] * (now - last)
      last = now
      return sample

    with client(server) as streaming:
      with streaming.stream("POST", "/v1/completions", json={**LONG, "stream": True}) as r:
        assert r.status_code == 200
        lines = r.iter_lines()
        first = [line for line in (next(lines) for _ in range(4)) if line.startswith("data: ")]
        assert first and first[-1] != "data: [DONE]"
        assert tokens_since_last_scrape()[OCCUPANCY] == 1 / SLOTS  # decoding now
      # Leaving `with` closed the response before its end, and closing the client its socket.
    closed = time.monotonic()
    while (sample := tokens_since_last_scrape())[OCCUPANCY] != 0:
      assert time.monotonic() - closed < 10, "the slot stayed busy after the client left"
      time.sleep(0.05)
    freed_after = time.monotonic() - closed
    time.sleep(0.3)
    assert tokens_since_last_scrape()[RATE] == 0  # nothing decodes any more
    assert generated < LONG["max_tokens"] / 2, (generated, freed_after)
    assert sample[OCCUPANCY] == 0 and sample["jaxft_queue_depth"] == 0
    # The freed slot serves the next request.
    assert http.post("/v1/completions", json={"prompt": "hi", "max_tokens": 3}).status_code == 200


def test_refuses_a_public_address_without_an_api_key(tmp_path):
  """Refused before anything loads (the workdir given, an empty directory, is not even read)."""
  started = time.monotonic()
  r = subprocess.run([sys.executable, "-m", "jaxft.serve", "--workdir", str(tmp_path),
                      "--host", "0.0.0.0", "--port", str(free_port())], cwd=ROOT,
                     env={**os.environ, "JAX_PLATFORMS": "cpu"}, capture_output=True, text=True,
                     timeout=90)
  assert r.returncode != 0
  assert "--api_key_file" in r.stderr and "--host=0.0.0.0" in r.stderr, r.stderr
  assert "ready:" not in r.stderr and time.monotonic() - started < 60


def test_sigterm_drains_the_request_in_flight_and_exits_0(server, long_reference):
  """Last: it ends the module's server."""
  body = {**LONG, "stream": True, "stream_options": {"include_usage": True}}
  with client(server) as http, http.stream("POST", "/v1/completions", json=body) as r:
    assert r.status_code == 200
    lines = r.iter_lines()
    before = [next(lines) for _ in range(2)]
    server.proc.send_signal(signal.SIGTERM)
    signalled = time.monotonic()
    time.sleep(0.3)  # the handler runs on the server's next loop tick
    try:  # a new connection is refused (the socket is closed) or told to go away
      refused = httpx.get(f"{server.url}/readyz", timeout=10).status_code == 503
    except httpx.TransportError:
      refused = True
    assert refused
    after = list(lines)
  payloads = sse_payloads(before + after)
  assert len(sse_payloads(after)) > 2, "the stream ended before SIGTERM: nothing was in flight"
  out = streamed("text", payloads, 1, with_usage=True)
  assert out == long_reference  # all 1000 tokens, as the request alone
  try:
    code = server.proc.wait(DRAIN_SECONDS + 10)
  except subprocess.TimeoutExpired:
    pytest.fail(f"still running {DRAIN_SECONDS + 10} s after SIGTERM:\n{server.log()}")
  assert time.monotonic() - signalled < DRAIN_SECONDS
  log = server.log()
  assert code == 0, log
  assert "Waiting for connections to close" in log and "Application shutdown complete" in log
  # The stream's log line (written when its last byte went) comes after shutdown began.
  shutdown = log.index("Shutting down")
  assert log.index("stream:bool", shutdown) > shutdown
  alarming = re.compile(r"Traceback|ERROR|Exception|exception|Cancel|failed|"
                        r"\b[EF]\d{4} ")  # absl's error and fatal lines start E1207 / F1207
  assert not alarming.search(log), log
