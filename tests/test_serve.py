"""The generation server in-process (httpx's ASGI transport): OpenAI-compatible responses equal
to jaxft.generate's tokens (greedy and seeded sampling), streaming, stop strings, n, usage,
continuous batching without recompilation, every refusal by status and field, the API key and
the metrics."""

import asyncio
import json

import httpx
import jax
import numpy as np
import pytest

from jaxft.inference import generating
from jaxft.models import generation
from jaxft.serve.app import Settings, create_app
from tests.serve_models import write_tiny_chat_lm

KEY = "k" * 32


@pytest.fixture(scope="module")
def lm_dir(tmp_path_factory):
  return write_tiny_chat_lm(tmp_path_factory.mktemp("chat_lm"), context=128)


@pytest.fixture(scope="module")
def served(lm_dir):
  app = create_app(Settings(workdir=lm_dir, slots=4, max_queue=16, max_tokens_limit=64, max_n=4,
                            max_body_bytes=4096), load_in_background=False)
  yield app
  app.state.server.stop()


def call(app, method, path, body=None, headers=None):
  async def go():
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://t") as client:
      return await client.request(method, path, json=body, headers=headers)
  return asyncio.run(go())


def reference(app, prompt_ids, **sampling):
  run = app.state.server.run
  tok = run.tokenizer()
  out = generation.generate(run.model, run.variables, [prompt_ids], eos_id=tok.eos_ids,
                            **sampling)[0]
  return out, tok.decode(out)


def test_completion_equals_generate_greedy_and_seeded(served):
  tok = served.state.server.run.tokenizer()
  prompt = "To be, or not to be"
  ids = tok.encode(prompt)
  r = call(served, "POST", "/v1/completions", {"prompt": prompt, "max_tokens": 12,
                                               "temperature": 0})
  assert r.status_code == 200, r.text
  out, text = reference(served, ids, max_new_tokens=12, temperature=0.0)
  body = r.json()
  assert body["object"] == "text_completion" and body["choices"][0]["text"] == text
  assert body["usage"] == {"prompt_tokens": len(ids), "completion_tokens": len(out),
                           "total_tokens": len(ids) + len(out)}
  assert body["choices"][0]["finish_reason"] == ("length" if len(out) == 12 else "stop")
  settings = dict(temperature=0.9, top_k=40, top_p=0.9, seed=7)
  r = call(served, "POST", "/v1/completions", {"prompt": prompt, "max_tokens": 12, **settings})
  out7, text7 = reference(served, ids, max_new_tokens=12, **settings)
  assert r.json()["choices"][0]["text"] == text7
  _, text8 = reference(served, ids, max_new_tokens=12, **{**settings, "seed": 8})
  assert text7 != text8  # the seed matters, so the equality above is not a coincidence


def test_chat_stream_equals_the_whole_answer_and_chat_answers(served):
  messages = [{"role": "system", "content": "Be brief."},
              {"role": "user", "content": "Whether 'tis nobler in the mind"}]
  whole = call(served, "POST", "/v1/chat/completions",
               {"messages": messages, "max_tokens": 10, "temperature": 0})
  assert whole.status_code == 200, whole.text
  content = whole.json()["choices"][0]["message"]["content"]
  run = served.state.server.run
  assert content == generating.chat_answers(run, [messages], max_new_tokens=10,
                                            temperature=0.0)[0]
  r = call(served, "POST", "/v1/chat/completions",
           {"messages": messages, "max_tokens": 10, "temperature": 0, "stream": True,
            "stream_options": {"include_usage": True}})
  assert r.headers["content-type"].startswith("text/event-stream")
  lines = [line[6:] for line in r.text.split("\n\n") if line.startswith("data: ")]
  assert lines[-1] == "[DONE]"
  chunks = [json.loads(line) for line in lines[:-1]]
  deltas = [c["choices"][0] for c in chunks if c["choices"]]
  assert deltas[0]["delta"]["role"] == "assistant"
  assert "".join(d["delta"].get("content", "") for d in deltas) == content
  assert deltas[-1]["finish_reason"] == whole.json()["choices"][0]["finish_reason"]
  assert chunks[-1]["usage"] == whole.json()["usage"]


def test_stop_strings_and_n_choices(served):
  tok = served.state.server.run.tokenizer()
  prompt = "Whether 'tis nobler"
  _, text = reference(served, tok.encode(prompt), max_new_tokens=20, temperature=0.0)
  stop = text[len(text) // 2:len(text) // 2 + 2]
  assert stop.strip() and len(text) > 6
  r = call(served, "POST", "/v1/completions", {"prompt": prompt, "max_tokens": 20,
                                               "temperature": 0, "stop": [stop]})
  choice = r.json()["choices"][0]
  assert choice["text"] == text[:text.index(stop)] and choice["finish_reason"] == "stop"
  r = call(served, "POST", "/v1/completions", {"prompt": prompt, "max_tokens": 6, "n": 3,
                                               "temperature": 1.0, "seed": 3})
  choices = r.json()["choices"]
  assert [c["index"] for c in choices] == [0, 1, 2]
  ids = tok.encode(prompt)
  for i, c in enumerate(choices):  # choice i samples with seed + i
    assert c["text"] == reference(served, ids, max_new_tokens=6, temperature=1.0, seed=3 + i)[1]


def test_a_burst_of_varied_requests_batches_without_compiling(served):
  engine = served.state.server.generator.engine
  compiles = []
  jax.monitoring.register_event_duration_secs_listener(
      lambda name, *_, **__: compiles.append(name) if "backend_compile" in name else None)
  programs = engine.compiled_programs()
  steps = engine.steps_run
  tok = served.state.server.run.tokenizer()
  rng = np.random.default_rng(0)
  words = "to be or not that is the question whether tis nobler in mind".split()
  prompts = [" ".join(rng.choice(words, size=int(rng.integers(1, 40)))) for _ in range(12)]
  max_tokens = [int(rng.integers(1, 30)) for _ in prompts]

  async def burst():
    transport = httpx.ASGITransport(app=served)
    async with httpx.AsyncClient(transport=transport, base_url="http://t") as client:
      return await asyncio.gather(*[client.post("/v1/completions", json={
          "prompt": p, "max_tokens": m, "temperature": 0, "stream": i % 2 == 0})
          for i, (p, m) in enumerate(zip(prompts, max_tokens))])

  responses = asyncio.run(burst())
  assert [r.status_code for r in responses] == [200] * len(prompts)
  assert not compiles and engine.compiled_programs() == programs
  # Continuous batching: fewer decode steps than tokens generated one request at a time.
  generated = [len(reference(served, tok.encode(p), max_new_tokens=m, temperature=0.0)[0])
               for p, m in zip(prompts, max_tokens)]
  assert engine.steps_run - steps < sum(generated) - len(generated)
  for r, p, m in zip(responses[1::2], prompts[1::2], max_tokens[1::2]):
    assert r.json()["choices"][0]["text"] == reference(
        served, tok.encode(p), max_new_tokens=m, temperature=0.0)[1]


@pytest.mark.parametrize("body, status, param", [
    ({"prompt": "hi", "max_tokens": 0}, 400, "max_tokens"),
    ({"prompt": "hi", "temperature": 3}, 400, "temperature"),
    ({"prompt": "hi", "top_p": 0}, 400, "top_p"),
    ({"prompt": "hi", "logprobs": 2}, 400, "logprobs"),
    ({"max_tokens": 4}, 400, "prompt"),
    ({"prompt": "hi", "max_tokens": 65}, 400, "max_tokens"),
    ({"prompt": "hi", "n": 5}, 400, "n"),
    ({"prompt": "hi " * 140, "max_tokens": 4}, 400, "prompt"),
    ({"prompt": "hi", "model": "gpt-4"}, 404, "model"),
    ({"prompt": "hi", "stop": ["a", "b", "c", "d", "e"]}, 400, "stop"),
])
def test_bad_requests_name_the_field(served, body, status, param):
  r = call(served, "POST", "/v1/completions", body)
  assert r.status_code == status, r.text
  assert r.json()["error"]["param"] == param and r.json()["error"]["message"]


def test_limits_queue_timeout_body_and_routes(served):
  server = served.state.server
  r = call(served, "POST", "/v1/chat/completions", {"messages": []})
  assert r.status_code == 400 and r.json()["error"]["param"] == "messages"
  r = call(served, "POST", "/v1/chat/completions",
           {"messages": [{"role": "robot", "content": "x"}]})
  assert r.status_code == 400 and "messages.0.role" in r.json()["error"]["param"]
  r = call(served, "POST", "/v1/completions", {"prompt": "x" * 5000})
  assert r.status_code == 413 and "--max_body_bytes" in r.json()["error"]["message"]
  r = call(served, "POST", "/v1/classify", {"texts": ["a"]})
  assert r.status_code == 404 and "/v1/completions" in r.json()["error"]["message"]
  engine = server.generator.engine
  engine.max_queue = 0  # a full queue
  try:
    r = call(served, "POST", "/v1/completions", {"prompt": "hi", "max_tokens": 4})
    assert r.status_code == 429 and "--max_queue" in r.json()["error"]["message"]
  finally:
    engine.max_queue = 16
  server.generator.timeout = 0.0
  try:
    r = call(served, "POST", "/v1/completions", {"prompt": "hi", "max_tokens": 4})
    assert r.status_code == 504 and "--request_timeout" in r.json()["error"]["message"]
  finally:
    server.generator.timeout = 120.0
  assert engine.stats()["active_slots"] == 0  # the timed-out request left its slot
  r = call(served, "GET", "/v1/models")
  assert r.json()["data"][0]["id"] == server.model_name


def test_metrics_count_requests_and_first_tokens(served):
  call(served, "POST", "/v1/completions", {"prompt": "hi", "max_tokens": 3})
  call(served, "POST", "/v1/completions", {"prompt": "hi", "max_tokens": 0})
  text = call(served, "GET", "/metrics").text
  samples = {line.rsplit(" ", 1)[0]: float(line.rsplit(" ", 1)[1])
             for line in text.splitlines() if line and not line.startswith("#")}
  assert samples['jaxft_requests_total{endpoint="/v1/completions",status="200"}'] >= 1
  assert samples['jaxft_requests_total{endpoint="/v1/completions",status="400"}'] >= 1
  assert samples['jaxft_time_to_first_token_seconds_count{endpoint="/v1/completions"}'] >= 1
  assert samples["jaxft_generated_tokens_total"] >= 1
  assert samples["jaxft_queue_depth"] == 0 and samples["jaxft_ready"] == 1
  assert 'jaxft_batch_occupancy{engine="generation"}' in samples


def test_api_key_and_readiness(lm_dir):
  app = create_app(Settings(workdir=lm_dir, slots=1, api_key=KEY), load_in_background=True)
  # Not loaded yet (the load thread starts with the app's lifespan): probes answer, no key.
  assert call(app, "GET", "/healthz").status_code == 200
  r = call(app, "GET", "/readyz")
  assert r.status_code == 503 and r.json()["status"] == "loading"
  assert call(app, "GET", "/v1/models").status_code == 401
  wrong = call(app, "GET", "/v1/models", headers={"Authorization": "Bearer " + "x" * 32})
  assert wrong.status_code == 401 and wrong.headers["www-authenticate"] == "Bearer"
  r = call(app, "POST", "/v1/completions", {"prompt": "hi"},
           headers={"Authorization": f"Bearer {KEY}"})
  assert r.status_code == 503 and "not ready" in r.json()["error"]["message"]
  app.state.server.load()
  try:
    r = call(app, "POST", "/v1/completions", {"prompt": "hi", "max_tokens": 2},
             headers={"Authorization": f"Bearer {KEY}"})
    assert r.status_code == 200
    assert call(app, "GET", "/readyz").json()["status"] == "ready"
    app.state.server.draining = True
    assert call(app, "GET", "/readyz").status_code == 503
  finally:
    app.state.server.stop()


def test_a_json_body_curl_labels_as_a_form_is_read_as_json(served):
  async def go():
    transport = httpx.ASGITransport(app=served)
    async with httpx.AsyncClient(transport=transport, base_url="http://t") as client:
      return await client.post("/v1/completions", content=b'{"prompt": "hi", "max_tokens": 2}',
                               headers={"content-type": "application/x-www-form-urlencoded"})
  r = asyncio.run(go())
  assert r.status_code == 200, r.text
  assert r.json()["object"] == "text_completion"


def test_int8_weights_at_load_serve_what_generate_draws_from_them(lm_dir):
  from jaxft import quant

  app = create_app(Settings(workdir=lm_dir, slots=2, quantize="int8"), load_in_background=False)
  try:
    run = app.state.server.run
    assert run.config.quantization.bits == 8
    float_bytes = sum(x.nbytes for x in jax.tree.leaves(
        quant.dequantize_tree(run.variables)))
    assert quant.weight_bytes(run.variables) < 0.3 * float_bytes
    tok = run.tokenizer()
    ids = tok.encode("Whether 'tis nobler")
    r = call(app, "POST", "/v1/completions", {"prompt": "Whether 'tis nobler", "max_tokens": 8,
                                              "temperature": 0})
    out = generation.generate(run.model, run.variables, [ids], max_new_tokens=8,
                              temperature=0.0, eos_id=tok.eos_ids)[0]
    assert r.json()["choices"][0]["text"] == tok.decode(out)
  finally:
    app.state.server.stop()


def test_chunked_bodies_unknown_paths_and_prompt_lists(served):
  async def go():
    async def chunks():
      for _ in range(5):
        yield b" " * 1000  # no Content-Length: the guard counts what arrives
    transport = httpx.ASGITransport(app=served)
    async with httpx.AsyncClient(transport=transport, base_url="http://t") as client:
      big = await client.post("/v1/completions", content=chunks(),
                              headers={"content-type": "application/json"})
      lost = await client.get("/v1/nowhere-1")
      huge_k = await client.post("/v1/completions", json={"prompt": "hi", "top_k": 2**40})
      both = await client.post("/v1/completions", json={
          "prompt": ["To be", "or not"], "max_tokens": 5, "temperature": 0})
      metrics = await client.get("/metrics")
      return big, lost, huge_k, both, metrics
  big, lost, huge_k, both, metrics = asyncio.run(go())
  assert big.status_code == 413 and "--max_body_bytes" in big.json()["error"]["message"]
  assert lost.status_code == 404 and lost.json()["error"]["code"] == 404
  assert huge_k.status_code == 400 and huge_k.json()["error"]["param"] == "top_k"
  tok = served.state.server.run.tokenizer()
  texts = [c["text"] for c in both.json()["choices"]]
  assert texts == [reference(served, tok.encode(p), max_new_tokens=5, temperature=0.0)[1]
                   for p in ("To be", "or not")]
  assert "nowhere" not in metrics.text  # made-up paths share the "other" label


def test_the_earliest_stop_string_ends_the_text(served):
  tok = served.state.server.run.tokenizer()
  prompt = "Whether 'tis nobler"
  _, text = reference(served, tok.encode(prompt), max_new_tokens=20, temperature=0.0)
  # Two stop strings whose first occurrences differ, neither at the start; the later one first.
  firsts = {text[k:k + 2]: k for k in range(len(text) - 1) if text.index(text[k:k + 2]) == k}
  candidates = sorted((k, w) for w, k in firsts.items() if k > 0)
  early, late = candidates[0][1], candidates[-1][1]
  assert 0 < text.index(early) < text.index(late)
  r = call(served, "POST", "/v1/completions", {"prompt": prompt, "max_tokens": 20,
                                               "temperature": 0, "stop": [late, early]})
  assert r.json()["choices"][0]["text"] == text[:text.index(early)]
