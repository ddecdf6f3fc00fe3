"""The server's FastAPI app: the model loaded and compiled on a background thread (so /healthz
answers at once and /readyz turns ready only when every shape is compiled), the routes the
loaded run can serve, and draining.

    /healthz   200 while the process runs (liveness)
    /readyz    200 once loaded and compiled; 503 while loading, after a failed load and while
               draining (a load balancer stops sending new requests)
    /metrics   Prometheus text (jaxft/serve/metrics.py)
    /v1/...    OpenAI-compatible generation (causal LMs) and the encoder routes (classifiers,
               taggers, QA, embeddings); a route the run does not serve is a 404 naming those
               it does
"""

import asyncio
import dataclasses
import logging
import os
import threading
import time

import jax
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from starlette.exceptions import HTTPException as StarletteHTTPException

from jaxft import quant, tasks
from jaxft.inference import ensemble
from jaxft.run import loader
from jaxft.serve import embeddings, encoder_routes, encoders, openai_routes
from jaxft.serve.engine import GenerationEngine
from jaxft.serve.generator import Generator
from jaxft.serve.guard import Guard
from jaxft.serve.metrics import Metrics
from jaxft.serve.openai_routes import error

log = logging.getLogger("jaxft.serve")

GENERATION_ROUTES = ("/v1/completions", "/v1/chat/completions")
ENCODER_ROUTES = {"classify": "/v1/classify", "tag": "/v1/tag", "answer": "/v1/answer",
                  "embeddings": "/v1/embeddings"}


@dataclasses.dataclass
class Settings:
  """What `python -m jaxft.serve` is told (its flags carry the same names)."""
  workdir: str  # several, comma-separated: their ensemble (jaxft/inference/ensemble.py)
  ensemble: str = "mean"  # how several workdirs combine: mean | vote
  step: int | None = None
  quantize: str = ""  # "int8" / "int4": quantise the weights at load (jaxft/quant)
  seq_len: int = 0  # encoder rows of a Hugging Face directory (0: the task's default)
  model_name: str = ""  # default: the directory's name
  slots: int = 8  # KV-cache slots decoded together
  max_len: int = 0  # tokens per request (prompt + new); 0: the model's context
  max_queue: int = 64  # generation requests waiting for a slot (more: 429)
  max_tokens_limit: int = 1024
  max_n: int = 8  # choices x prompts per generation request
  request_timeout: float = 120.0
  max_body_bytes: int = 1 << 20
  max_items: int = 64  # inputs per encoder request
  encoder_max_batch: int = 32
  encoder_max_wait_ms: float = 5.0
  encoder_max_queue: int = 256  # encoder items waiting (more: 429)
  api_key: str | None = None
  log_bodies: bool = False
  redact: bool = False


class Server:
  """The loaded model and its engines, shared by the routes (app.state.server)."""

  def __init__(self, settings: Settings, metrics: Metrics):
    self.settings, self.metrics = settings, metrics
    self.paths = ensemble.split_paths(settings.workdir)
    self.model_name = settings.model_name or "+".join(
        os.path.basename(os.path.normpath(p)) for p in self.paths)  # an ensemble: a+b+c
    self.started = int(time.time())
    self.run = None
    self.generator: Generator | None = None
    self.encoders: encoders.EncoderService | None = None
    self.ready = False
    self.draining = False
    self.load_error: str | None = None

  # -- loading (background thread) -------------------------------------------------------------

  def load(self) -> None:
    try:
      self._load()
      self.ready = True
      self.metrics.ready.set(1)
      log.info("ready: %s serves %s", self.model_name, ", ".join(self.routes()))
    except Exception as e:  # the process stays up so /readyz can say why
      self.load_error = f"{type(e).__name__}: {e}"
      log.exception("could not load %s", self.settings.workdir)

  def _load(self) -> None:
    s = self.settings
    if len(self.paths) > 1:  # an ensemble of encoder runs: the task endpoint only
      if s.step is not None or s.quantize:
        raise ValueError("--step and --quantize apply to one run; serve an ensemble of the "
                         "runs' best checkpoints without them")
      self.run = ensemble.open_ensemble(self.paths, s.ensemble)
      self._start_encoders(self.run)
      return
    if embeddings.is_headless_bert(s.workdir):  # e.g. all-MiniLM-L6-v2: embeddings only
      self._start_encoders(s.workdir)
      return
    self.run = loader.open_run(s.workdir, step=s.step, seq_len=s.seq_len or None)
    if s.quantize:
      self.run = quantized(self.run, s.quantize)
    if self.run.task.generative:
      tok = self.run.tokenizer()
      context = self.run.task.model.cfg.context_length
      max_len = min(s.max_len or context, context)
      engine = GenerationEngine(self.run.model, self.run.variables, eos_ids=tok.eos_ids,
                                max_len=max_len, slots=s.slots, max_queue=s.max_queue)
      engine.warmup()
      engine.start()
      self.generator = Generator(engine, tok, timeout=s.request_timeout)
    else:
      self._start_encoders(self.run)

  def _start_encoders(self, run_or_path) -> None:
    s = self.settings
    service = encoders.make_encoder_service(
        run_or_path, max_batch=s.encoder_max_batch, max_wait_ms=s.encoder_max_wait_ms,
        max_queue=s.encoder_max_queue, seq_len=s.seq_len or None)
    service.warmup()
    service.start()
    self.encoders = service

  def stop(self) -> None:
    if self.generator is not None:
      self.generator.engine.stop()
    if self.encoders is not None:
      self.encoders.stop(drain=True)

  # -- what the routes ask ---------------------------------------------------------------------

  def routes(self) -> list[str]:
    if self.generator is not None:
      return [*GENERATION_ROUTES, "/v1/models"]
    if self.encoders is not None:
      return [ENCODER_ROUTES[e] for e in self.encoders.endpoints]
    return []

  def refuse(self, endpoint: str) -> JSONResponse | None:
    """Why a request for `endpoint` ("generation" or an encoder endpoint) cannot run now."""
    if self.draining:
      return error(503, "the server is shutting down; retry on another replica")
    if not self.ready:
      why = f"loading failed: {self.load_error}" if self.load_error else "still loading"
      return error(503, f"the model is not ready ({why}); watch GET /readyz")
    serves = (self.generator is not None if endpoint == "generation" else
              self.encoders is not None and endpoint in self.encoders.endpoints)
    if not serves:
      return error(404, f"{self.model_name} does not serve this route; it serves "
                   f"{', '.join(self.routes())}")
    return None

  def stats(self) -> tuple[dict | None, dict | None]:
    gen = self.generator.engine.stats() if self.generator else None
    enc = None
    if self.encoders is not None:
      raw = self.encoders.stats()
      enc = {"queue_depth": raw.get("queue_depth", 0), "occupancy": raw.get("last_occupancy", 0)}
    return gen, enc


def quantized(run: loader.Run, scheme: str) -> loader.Run:
  """`run` with its weights quantised in memory ("int8" / "int4"), as python -m
  jaxft.quantize would write them."""
  if scheme not in ("int8", "int4"):
    raise ValueError(f"--quantize={scheme!r}: give int8 or int4")
  if quant.is_quantized(run.path):
    raise ValueError(f"{run.path} is quantised already; drop --quantize")
  before = quant.weight_bytes(run.variables)
  config, variables = quant.quantize_run(run, int(scheme[3:]))
  task = tasks.make_task(config, labels=run.task.labels)
  quant.attach(task)
  variables = jax.device_put(variables, jax.local_devices()[0])
  log.info("weights quantised to %s: %.1f MiB -> %.1f MiB", scheme, before / 2**20,
           quant.weight_bytes(variables) / 2**20)
  return loader.Run(run.path, config, task, variables)


def create_app(settings: Settings, *, load_in_background: bool = True) -> FastAPI:
  """The app; the model loads on a thread started with the app (or before returning, with
  load_in_background=False: tests)."""
  metrics = Metrics()
  server = Server(settings, metrics)
  if not load_in_background:
    server.load()

  async def lifespan(app):
    if load_in_background:
      threading.Thread(target=server.load, name="jaxft-load", daemon=True).start()
    yield
    await asyncio.to_thread(server.stop)  # drains the encoder queue: off the event loop

  app = FastAPI(title="jaxft", lifespan=lifespan)
  app.state.server = server

  @app.exception_handler(RequestValidationError)
  async def bad_request(request: Request, exc: RequestValidationError):
    first = exc.errors()[0]
    where = [str(p) for p in first.get("loc", ()) if p != "body"]
    field = ".".join(where) or "body"
    return error(400, f"{field}: {first.get('msg', 'invalid')}" + (
        f" (got {first['input']!r:.80})" if "input" in first and where else ""), field)

  @app.exception_handler(StarletteHTTPException)
  async def http_error(request: Request, exc: StarletteHTTPException):
    """Unknown paths (404) and methods (405) in the API's error shape too."""
    return error(exc.status_code, f"{request.method} {request.url.path}: {exc.detail}")

  @app.get("/healthz")
  async def healthz():
    return {"status": "ok"}

  @app.get("/readyz")
  async def readyz():
    if server.ready and not server.draining:
      return {"status": "ready", "model": server.model_name, "routes": server.routes()}
    state = ("draining" if server.draining else "failed" if server.load_error else "loading")
    return JSONResponse({"status": state, "error": server.load_error}, status_code=503)

  @app.get("/metrics")
  async def prometheus():
    metrics.refresh(*server.stats())
    body, content_type = metrics.exposition()
    return Response(body, media_type=content_type)

  app.include_router(openai_routes.router)
  app.include_router(encoder_routes.router)
  app.add_middleware(Guard, metrics=metrics, api_key=settings.api_key,
                     max_body_bytes=settings.max_body_bytes,
                     routes=(*GENERATION_ROUTES, "/v1/models", *ENCODER_ROUTES.values()),
                     log_bodies=settings.log_bodies, redact_bodies=settings.redact)
  return app

