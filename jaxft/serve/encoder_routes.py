"""Routes of the encoder models: /v1/classify, /v1/tag, /v1/answer (jaxft.predict's outputs
for the same inputs) and OpenAI's /v1/embeddings, over the dynamic micro-batcher."""

import math
from typing import Any

from fastapi import APIRouter, Request
from pydantic import BaseModel, ConfigDict, Field, model_validator

from jaxft.serve import batching
from jaxft.serve.openai_routes import error, wrong_model

router = APIRouter()
_STRICT = ConfigDict(extra="forbid")


class ItemsRequest(BaseModel):
  """{"texts": [...]} for single texts, or {"inputs": [{...}, ...]} with every field the task
  reads (text + text_pair for pair classification)."""
  model_config = _STRICT
  model: str | None = None
  texts: list[str] | None = None
  inputs: list[dict[str, Any]] | None = None

  @model_validator(mode="after")
  def _one_form(self):
    if (self.texts is None) == (self.inputs is None):
      raise ValueError('give exactly one of "texts" (a list of strings) or "inputs" (a list of '
                       "objects)")
    return self

  def items(self) -> list[dict]:
    return [{"text": t} for t in self.texts] if self.texts is not None else self.inputs


class AnswerRequest(BaseModel):
  model_config = _STRICT
  model: str | None = None
  question: str | None = None
  context: str | None = None
  inputs: list[dict[str, Any]] | None = None

  @model_validator(mode="after")
  def _one_form(self):
    single = self.question is not None or self.context is not None
    if single == (self.inputs is not None):
      raise ValueError('give "question" and "context", or "inputs": a list of {"question", '
                       '"context"} objects')
    return self

  def items(self) -> list[dict]:
    if self.inputs is not None:
      return self.inputs
    return [{"question": self.question or "", "context": self.context or ""}]


class EmbeddingsRequest(BaseModel):
  model_config = _STRICT
  model: str | None = None
  input: str | list[str] = Field(description="a text or a list of texts")
  encoding_format: str = "float"
  user: str | None = None


async def _run(request: Request, endpoint: str, items: list[dict], field: str):
  """The endpoint's results for `items`, or an error response."""
  server = request.app.state.server
  refusal = server.refuse(endpoint)
  if refusal is not None:
    return None, refusal
  limit = server.settings.max_items
  if len(items) > limit:
    return None, error(400, f"{len(items)} inputs in one request; this server takes at most "
                       f"{limit} (--max_items): split the request", field)
  try:
    return await server.encoders.submit(endpoint, items), None
  except batching.QueueFull as e:
    return None, error(429, str(e))
  except batching.Stopped as e:
    return None, error(503, str(e))
  except ValueError as e:
    return None, error(400, str(e), field)


async def _predict(request: Request, endpoint: str, body):
  server = request.app.state.server
  if (refusal := wrong_model(server, body)) is not None:
    return refusal
  field = "inputs" if getattr(body, "inputs", None) is not None else (
      "texts" if endpoint != "answer" else "question")
  results, refusal = await _run(request, endpoint, body.items(), field)
  if refusal is not None:
    return refusal
  return {"model": server.model_name, "results": [_finite(r) for r in results]}


def _finite(result: dict) -> dict:
  """JSON has no infinities: a QA score of -inf (no valid span, as jaxft.predict reports it)
  becomes null."""
  return {k: None if isinstance(v, float) and not math.isfinite(v) else v
          for k, v in result.items()}


@router.post("/v1/classify")
async def classify(request: Request, body: ItemsRequest):
  return await _predict(request, "classify", body)


@router.post("/v1/tag")
async def tag(request: Request, body: ItemsRequest):
  return await _predict(request, "tag", body)


@router.post("/v1/answer")
async def answer(request: Request, body: AnswerRequest):
  return await _predict(request, "answer", body)


@router.post("/v1/embeddings")
async def embed(request: Request, body: EmbeddingsRequest):
  server = request.app.state.server
  if (refusal := wrong_model(server, body)) is not None:
    return refusal
  if body.encoding_format != "float":
    return error(400, f"encoding_format={body.encoding_format!r}: this server returns "
                 "'float' embeddings only", "encoding_format")
  texts = [body.input] if isinstance(body.input, str) else body.input
  results, refusal = await _run(request, "embeddings", [{"text": t} for t in texts], "input")
  if refusal is not None:
    return refusal
  tokens = sum(r.get("tokens", 0) for r in results)
  return {"object": "list", "model": server.model_name,
          "data": [{"object": "embedding", "index": i, "embedding": r["embedding"]}
                   for i, r in enumerate(results)],
          "usage": {"prompt_tokens": tokens, "total_tokens": tokens}}
