"""What every request passes before a route sees it (an ASGI middleware): the API key, the
body size limit, the request log line and the request metrics.

- API key: with one configured, every route but the probes (/healthz, /readyz) needs
  `Authorization: Bearer <key>`, compared in constant time (hmac.compare_digest); 401 otherwise.
- Body size: a Content-Length over the limit is refused before the body is read (413); a
  chunked body is counted as it arrives and refused once it passes the limit.
- Logging: path, status, latency and sizes; bodies only with --log_bodies, masked with
  --redact (jaxft/serve/redact.py).
"""

import hmac
import json
import logging
import time

from jaxft.serve import redact
from jaxft.serve.metrics import Metrics

log = logging.getLogger("jaxft.serve")

PROBES = ("/healthz", "/readyz")


def error_body(status: int, message: str, param: str | None = None,
               kind: str = "invalid_request_error") -> bytes:
  """OpenAI's error shape: {"error": {"message", "type", "param", "code"}}."""
  return json.dumps({"error": {"message": message, "type": kind, "param": param,
                               "code": status}}).encode()


class Guard:
  """ASGI middleware around the app."""

  def __init__(self, app, *, metrics: Metrics, api_key: str | None, max_body_bytes: int,
               routes: tuple[str, ...] = (), log_bodies: bool = False,
               redact_bodies: bool = False):
    self.app, self.metrics = app, metrics
    # Metrics are labelled by route, never by the raw path: made-up paths would each add series.
    self.routes = frozenset(routes) | set(PROBES) | {"/metrics"}
    self.api_key = api_key.encode() if api_key else None
    self.max_body_bytes = max_body_bytes
    self.log_bodies, self.redact_bodies = log_bodies, redact_bodies

  async def __call__(self, scope, receive, send):
    if scope["type"] != "http":
      return await self.app(scope, receive, send)
    path, started = scope["path"], time.perf_counter()
    status, body_parts = {"code": 500}, []

    async def send_and_count(message):
      if message["type"] == "http.response.start":
        status["code"] = message["status"]
      await send(message)

    async def refuse(code: int, message: str, headers=()):
      await send_and_count({"type": "http.response.start", "status": code, "headers": [
          (b"content-type", b"application/json"), *headers]})
      await send({"type": "http.response.body", "body": error_body(code, message, kind=(
          "authentication_error" if code == 401 else "invalid_request_error"))})

    try:
      headers = dict(scope.get("headers") or [])
      if self.api_key and path not in PROBES and not self._authorized(headers):
        await refuse(401, "missing or wrong API key: send the header 'Authorization: Bearer "
                     "<key>' with the key the server was started with (--api_key_file)",
                     [(b"www-authenticate", b"Bearer")])
        return
      length = headers.get(b"content-length")
      if length is not None and length.isdigit() and int(length) > self.max_body_bytes:
        await refuse(413, f"the request body has {int(length)} bytes; this server takes at "
                     f"most {self.max_body_bytes} (--max_body_bytes)")
        return
      if path.startswith("/v1/") and headers.get(b"content-type", b"").startswith(
          b"application/x-www-form-urlencoded"):
        # `curl -d '{...}'` labels a JSON body as a form: read it as JSON, as OpenAI's API does.
        scope = {**scope, "headers": [(k, v) for k, v in scope["headers"]
                                      if k != b"content-type"]
                 + [(b"content-type", b"application/json")]}
      # The whole body is read here, counted, then replayed to the app: past the limit it is
      # a 413 in the API's error shape (inside the app, FastAPI would make any error a 400).
      messages, received = [], 0
      while True:
        message = await receive()
        messages.append(message)
        if message["type"] != "http.request":
          break
        body_parts.append(message.get("body", b""))
        received += len(body_parts[-1])
        if received > self.max_body_bytes:
          await refuse(413, f"the request body passed {self.max_body_bytes} bytes "
                       "(--max_body_bytes)")
          return
        if not message.get("more_body", False):
          break

      async def replay():
        return messages.pop(0) if messages else await receive()

      await self.app(scope, replay, send_and_count)
    finally:
      elapsed = time.perf_counter() - started
      endpoint = path if path in self.routes else "other"
      self.metrics.requests.labels(endpoint, str(status["code"])).inc()
      self.metrics.latency.labels(endpoint).observe(elapsed)
      if path not in PROBES:
        log.info("%s %s -> %d in %.3f s", scope.get("method", ""), self._describe(
            path, body_parts), status["code"], elapsed)

  def _authorized(self, headers: dict) -> bool:
    scheme, _, token = headers.get(b"authorization", b"").partition(b" ")
    # compare_digest on bytes of any length: its time does not depend on where they differ.
    return scheme.lower() == b"bearer" and hmac.compare_digest(token.strip(), self.api_key)

  def _describe(self, path: str, parts: list[bytes]) -> str:
    body = None
    if parts:
      try:
        body = json.loads(b"".join(parts))
      except ValueError:
        body = None
    return redact.describe_request(path, body if isinstance(body, dict) else None,
                                   log_bodies=self.log_bodies, redact_bodies=self.redact_bodies)
