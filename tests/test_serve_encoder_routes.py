"""The encoder routes over HTTP (in-process): /v1/classify answers what jaxft.predict writes,
/v1/embeddings has OpenAI's shape with unit vectors, and bad requests name their field."""

import asyncio

import httpx
import numpy as np
import pytest

from jaxft.inference import prediction
from jaxft.serve.app import Settings, create_app
from tests.test_serve_encoders import TOPICS, _save_head, _texts


@pytest.fixture(scope="module")
def served(tmp_path_factory):
  path = _save_head(tmp_path_factory.mktemp("cls"), "BertForSequenceClassification", TOPICS)
  app = create_app(Settings(workdir=path, seq_len=64, encoder_max_batch=4, max_items=6,
                            encoder_max_wait_ms=20.0), load_in_background=False)
  yield app
  app.state.server.stop()


def post_all(app, path, bodies):
  async def go():
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://t") as client:
      return await asyncio.gather(*(client.post(path, json=b) for b in bodies))
  return asyncio.run(go())


def test_classify_equals_predict_across_concurrent_requests(served):
  texts = _texts(10, seed=3)
  chunks = [texts[:1], texts[1:4], texts[4:6], texts[6:]]
  responses = post_all(served, "/v1/classify", [{"texts": c} for c in chunks])
  assert [r.status_code for r in responses] == [200] * 4, responses[0].text
  got = [row for r in responses for row in r.json()["results"]]
  run = served.state.server.run
  want = prediction.predict(run.task, run.variables, [{"text": t} for t in texts])
  assert [g["label"] for g in got] == [w["label"] for w in want]
  for g, w in zip(got, want):
    assert set(g["probabilities"]) == set(TOPICS)
    np.testing.assert_allclose([g["probabilities"][t] for t in TOPICS],
                               [w["probabilities"][t] for t in TOPICS], atol=1e-5)
  pairs = post_all(served, "/v1/classify", [{"inputs": [{"text": t} for t in texts[:2]]}])
  assert pairs[0].json()["results"] == got[:2]


def test_embeddings_have_openai_shape(served):
  (r,) = post_all(served, "/v1/embeddings", [{"input": ["a match", "shares fell"]}])
  assert r.status_code == 200, r.text
  body = r.json()
  assert body["object"] == "list" and [d["index"] for d in body["data"]] == [0, 1]
  vectors = np.array([d["embedding"] for d in body["data"]])
  assert vectors.shape == (2, 32)  # tests.helpers.TINY_BERT's hidden size
  np.testing.assert_allclose(np.linalg.norm(vectors, axis=1), 1.0, atol=1e-5)
  assert not np.allclose(vectors[0], vectors[1])
  (single,) = post_all(served, "/v1/embeddings", [{"input": "a match"}])
  np.testing.assert_allclose(single.json()["data"][0]["embedding"], vectors[0], atol=1e-6)


@pytest.mark.parametrize("path, body, status, param", [
    ("/v1/classify", {"texts": []}, 400, "texts"),
    ("/v1/classify", {"texts": [""]}, 400, "texts"),
    ("/v1/classify", {"texts": ["a"] * 7}, 400, "texts"),
    ("/v1/classify", {"texts": ["a"], "inputs": [{"text": "b"}]}, 400, "body"),
    ("/v1/classify", {"inputs": [{"txt": "b"}]}, 400, "inputs"),
    ("/v1/classify", {"texts": "a"}, 400, "texts"),
    ("/v1/embeddings", {"input": "a", "encoding_format": "base64"}, 400, "encoding_format"),
    ("/v1/answer", {"question": "q", "context": "c"}, 404, None),
    ("/v1/completions", {"prompt": "hi"}, 404, None),
])
def test_bad_requests_name_the_field(served, path, body, status, param):
  (r,) = post_all(served, path, [body])
  assert r.status_code == status, r.text
  error = r.json()["error"]
  assert error["param"] == param
  if status == 404:
    assert "/v1/classify" in error["message"]
