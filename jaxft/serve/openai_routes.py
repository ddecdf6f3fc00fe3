"""OpenAI-compatible routes: /v1/models, /v1/completions, /v1/chat/completions (JSON or
server-sent events), with OpenAI's response shapes and usage counts."""

import asyncio
import json
import time
import uuid

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, StreamingResponse

from jaxft.inference import generating
from jaxft.serve.batching import QueueFull
from jaxft.serve.generator import Deadline
from jaxft.serve.guard import error_body
from jaxft.serve.schemas import ChatRequest, CompletionRequest

router = APIRouter()


def error(status: int, message: str, param: str | None = None) -> JSONResponse:
  return JSONResponse(json.loads(error_body(status, message, param)), status_code=status)


def wrong_model(server, body) -> JSONResponse | None:
  """A 404 when the request names a model this server does not hold (None: it does or names
  none)."""
  if body.model not in (None, server.model_name):
    return error(404, f"model {body.model!r} is not served here; this server holds "
                 f"{server.model_name!r} (GET /v1/models)", "model")
  return None


def _sse(payload) -> bytes:
  return f"data: {json.dumps(payload, ensure_ascii=False)}\n\n".encode()


@router.get("/v1/models")
async def models(request: Request):
  server = request.app.state.server
  return {"object": "list", "data": [{"id": server.model_name, "object": "model",
                                      "created": server.started, "owned_by": "jaxft"}]}


def _checks(server, body, prompts: list[list[int]], default_max: int, field: str):
  """(the max_tokens to use, None) or (None, an error response) for a generation request."""
  if (refusal := server.refuse("generation")) is not None:
    return None, refusal
  if (refusal := wrong_model(server, body)) is not None:
    return None, refusal
  limits = server.settings
  max_tokens = body.max_tokens or default_max
  if max_tokens > limits.max_tokens_limit:
    return None, error(400, f"max_tokens={max_tokens} is over this server's limit of "
                       f"{limits.max_tokens_limit} (--max_tokens_limit)", "max_tokens")
  if body.n * len(prompts) > limits.max_n:
    return None, error(400, f"n={body.n} choices x {len(prompts)} prompts is over this "
                       f"server's limit of {limits.max_n} sequences per request (--max_n)", "n")
  if body.stream and len(prompts) > 1:  # OpenAI streams several too; clients rarely do
    return None, error(400, "stream=true takes one prompt; send a list of prompts without "
                       "stream", "prompt")
  for ids in prompts:
    problem = server.generator.engine.check(len(ids), max_tokens)
    if problem:
      return None, error(400, problem, field)
  return max_tokens, None


async def _respond(request: Request, body, prompts, max_tokens, kind: str):
  server = request.app.state.server
  gen = server.generator
  rid = f"{'chatcmpl' if kind == 'chat' else 'cmpl'}-{uuid.uuid4().hex}"
  created, model = int(time.time()), server.model_name
  obj = "chat.completion" if kind == "chat" else "text_completion"
  started = time.perf_counter()
  endpoint = request.url.path
  per_prompt = [gen.params(body, max_tokens) for _ in prompts]
  prompt_tokens = sum(len(p) for p in prompts)

  def usage(completion: int) -> dict:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion,
            "total_tokens": prompt_tokens + completion}

  first_token = []  # the time to the request's first token, observed once

  def on_first():
    if not first_token:
      first_token.append(time.perf_counter() - started)
      server.metrics.ttft.labels(endpoint).observe(first_token[0])

  if not body.stream:
    try:  # the prompts of a list run together; one failing cancels the others
      async with asyncio.TaskGroup() as group:
        tasks = [group.create_task(gen.complete(ids, params, body.stop,
                                                request.is_disconnected, on_first))
                 for ids, params in zip(prompts, per_prompt)]
    except ExceptionGroup as failed:
      cause = failed.exceptions[0]
      if isinstance(cause, QueueFull):
        return error(429, str(cause))
      if isinstance(cause, Deadline):
        return error(504, str(cause))
      raise
    results = [t.result() for t in tasks]
    choices, completion = [], 0
    for p, prompt_choices in enumerate(results):
      for c in prompt_choices:
        completion += c.tokens
        index = p * body.n + c.index
        choices.append({"index": index, "message": {"role": "assistant", "content": c.text},
                        "finish_reason": c.finish_reason} if kind == "chat" else
                       {"index": index, "text": c.text, "logprobs": None,
                        "finish_reason": c.finish_reason})
    server.metrics.prompt_tokens.inc(prompt_tokens * body.n)
    server.metrics.generated.inc(completion)
    return {"id": rid, "object": obj, "created": created, "model": model, "choices": choices,
            "usage": usage(completion)}

  events = gen.events(prompts[0], per_prompt[0], body.stop, request.is_disconnected)
  try:  # the queue check happens at the first event: a full queue is still a 429
    first_event = await anext(events)
  except QueueFull as e:
    return error(429, str(e))
  except Deadline as e:
    return error(504, str(e))
  except StopAsyncIteration:
    first_event = None
  server.metrics.prompt_tokens.inc(prompt_tokens * body.n)
  chunk_obj = "chat.completion.chunk" if kind == "chat" else "text_completion"

  def chunk(index, text, finish, role=False):
    if kind == "chat":
      delta = {"role": "assistant", "content": text} if role else {"content": text}
      if finish and not text and not role:
        delta = {}
      choice = {"index": index, "delta": delta, "finish_reason": finish}
    else:
      choice = {"index": index, "text": text, "logprobs": None, "finish_reason": finish}
    return _sse({"id": rid, "object": chunk_obj, "created": created, "model": model,
                 "choices": [choice]})

  async def stream():
    completion, started_choices = 0, set()
    pending = [first_event] if first_event is not None else []
    try:
      while True:
        event = pending.pop() if pending else await anext(events)
        if event.first:
          on_first()
        role = kind == "chat" and event.index not in started_choices
        started_choices.add(event.index)
        if event.finish_reason:
          completion += event.tokens
        yield chunk(event.index, event.text, event.finish_reason, role)
    except StopAsyncIteration:
      pass
    except Deadline as e:
      yield _sse(json.loads(error_body(504, str(e))))
    finally:
      await events.aclose()  # the client left or the stream ended: free the slots
      server.metrics.generated.inc(completion)
    if body.stream_options and body.stream_options.include_usage:
      yield _sse({"id": rid, "object": chunk_obj, "created": created, "model": model,
                  "choices": [], "usage": usage(completion)})
    yield b"data: [DONE]\n\n"

  return StreamingResponse(stream(), media_type="text/event-stream",
                           headers={"Cache-Control": "no-cache"})


@router.post("/v1/completions")
async def completions(request: Request, body: CompletionRequest):
  server = request.app.state.server
  if server.generator is None:
    return server.refuse("generation")
  tok = server.generator.tok
  prompts = [tok.encode(p) or [tok.eos_id] for p in body.prompt]  # as jaxft.generate
  max_tokens, refusal = _checks(server, body, prompts, 16, "prompt")
  if refusal is not None:
    return refusal
  return await _respond(request, body, prompts, max_tokens, "text")


@router.post("/v1/chat/completions")
async def chat_completions(request: Request, body: ChatRequest):
  server = request.app.state.server
  if server.generator is None:
    return server.refuse("generation")
  messages = [m.model_dump(exclude_none=True, exclude={"name"}) for m in body.messages]
  try:  # the schema checked roles and contents; a template may still refuse the conversation
    prompt = generating.chat_prompt(server.run, server.generator.tok, messages)
  except ValueError as e:  # a template that refuses the conversation (e.g. roles out of order)
    return error(400, f"messages: {e}", "messages")
  if body.max_completion_tokens and not body.max_tokens:
    body.max_tokens = body.max_completion_tokens
  default = max(min(server.generator.engine.max_len - len(prompt),
                    server.settings.max_tokens_limit), 1)
  max_tokens, refusal = _checks(server, body, [prompt], default, "messages")
  if refusal is not None:
    return refusal
  return await _respond(request, body, [prompt], max_tokens, "chat")
