"""Text in, text out over the generation engine: prompts encoded with the run's tokenizer (chat
messages through its chat template), tokens decoded as they come, stop strings, the request
deadline and the client leaving.

Streamed text never splits a character (a token ending inside a multi-byte character waits for
the next) and never shows the start of a stop string that may still complete: the held-back tail
is at most the longest stop string minus one character.
"""

import asyncio
import collections
import dataclasses
import secrets
import threading
import time
import weakref
from collections.abc import AsyncIterator

from jaxft.serve.engine import GenerationEngine, Request, SamplingParams


class Deadline(Exception):
  """The request ran past its timeout (its slot is freed)."""


@dataclasses.dataclass
class Choice:
  index: int
  text: str = ""
  finish_reason: str | None = None
  tokens: int = 0


@dataclasses.dataclass
class Event:
  """A piece of one choice's text; `finish_reason` set on the choice's last event."""
  index: int
  text: str
  finish_reason: str | None = None
  first: bool = False  # the choice's first token (time to first token)
  tokens: int = 0  # on the last event: the tokens the choice generated


class _Decoder:
  """One choice's token ids -> the text safe to show so far."""

  def __init__(self, tokenizer, stops: list[str]):
    self.tok, self.stops = tokenizer, list(stops or ())
    self.ids: list[int] = []
    self.shown = ""
    self.hold = max((len(s) for s in self.stops), default=1) - 1

  def add(self, token: int | None) -> tuple[str, bool]:
    """(new text to show, whether a stop string ended the choice). None flushes at the end."""
    if token is not None:
      self.ids.append(token)
    text = self.tok.decode(self.ids)
    hits = [at for stop in self.stops
            if (at := text.find(stop, max(len(self.shown) - len(stop) + 1, 0))) >= 0]
    if hits:  # the stop string that starts first ends the text
      at = min(hits)
      new, self.shown = text[len(self.shown):at], text[:at]
      return new, True
    if token is not None:  # keep back a broken character and a stop string's possible start
      end = len(text) - (1 if text.endswith("\ufffd") else 0)
      end = max(min(end, len(text) - self.hold), len(self.shown))
    else:
      end = len(text)
    new, self.shown = text[len(self.shown):end], text[:end]
    return new, False


class _Mailbox:
  """Hands the engine thread's events to one event loop, waking the loop once per batch of
  events rather than once per token (a wake-up is a system call and a loop iteration; with 16
  streams they cost more than the decode step)."""

  def __init__(self, loop: asyncio.AbstractEventLoop):
    self.loop = loop
    self.pending: collections.deque = collections.deque()
    self.lock = threading.Lock()
    self.scheduled = False

  def post(self, queue: asyncio.Queue, item) -> None:
    """From any thread; raises RuntimeError once the loop is closed."""
    with self.lock:
      self.pending.append((queue, item))
      if self.scheduled:
        return
      self.scheduled = True
    try:
      self.loop.call_soon_threadsafe(self._deliver)
    except RuntimeError:
      with self.lock:
        self.scheduled = False
      raise

  def _deliver(self) -> None:
    with self.lock:
      items, self.scheduled = list(self.pending), False
      self.pending.clear()
    for queue, item in items:
      queue.put_nowait(item)


class Generator:
  """The engine and tokenizer of a served causal LM."""

  def __init__(self, engine: GenerationEngine, tokenizer, *, timeout: float):
    self.engine, self.tok, self.timeout = engine, tokenizer, timeout
    self._mailboxes: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()

  def params(self, body, max_tokens: int) -> list[SamplingParams]:
    """One SamplingParams per choice: choice i draws with seed + i (a random seed if none)."""
    seed = body.seed if body.seed is not None else secrets.randbelow(2**31)
    return [SamplingParams(max_tokens=max_tokens, temperature=body.temperature, top_k=body.top_k,
                           top_p=body.top_p, seed=(seed + i) % 2**32) for i in range(body.n)]

  async def events(self, prompt: list[int], params: list[SamplingParams], stops: list[str],
                   is_disconnected=None) -> AsyncIterator[Event]:
    """The choices' text as it is generated, interleaved; raises Deadline past the timeout.
    Leaving the iteration early (the client went away) cancels every choice's request."""
    loop = asyncio.get_running_loop()
    mailbox = self._mailboxes.get(loop) or self._mailboxes.setdefault(loop, _Mailbox(loop))
    queue: asyncio.Queue = asyncio.Queue()
    requests = []
    for index, p in enumerate(params):
      def emit(kind, value, index=index):
        try:
          mailbox.post(queue, (index, kind, value))
        except RuntimeError:  # the event loop is gone: nobody waits for these tokens
          requests[index].cancel()
      requests.append(Request(prompt, p, emit))
    try:
      for request in requests:
        self.engine.submit(request)  # QueueFull / ValueError reach the route
      decoders = [_Decoder(self.tok, stops) for _ in params]
      open_choices, seen = set(range(len(params))), set()
      deadline = time.monotonic() + self.timeout
      checked = time.monotonic()
      while open_choices:
        now = time.monotonic()
        if now >= deadline:
          raise Deadline(f"the request took longer than its {self.timeout:g} s limit "
                         "(--request_timeout)")
        if is_disconnected is not None and now - checked > 0.25:
          checked = now
          if await is_disconnected():
            return
        try:  # no timer when an event is already there (most tokens, under load)
          index, kind, value = (queue.get_nowait() if not queue.empty() else
                                await asyncio.wait_for(queue.get(), min(deadline - now, 0.25)))
        except TimeoutError:
          continue
        if index not in open_choices:
          continue
        if kind == "token":
          new, stopped = decoders[index].add(value)
          first = index not in seen
          seen.add(index)
          if stopped:
            requests[index].cancel()
            open_choices.discard(index)
            yield Event(index, new, "stop", first, len(decoders[index].ids))
          elif new or first:
            yield Event(index, new, None, first)
        else:  # done: "stop" (EOS), "length", or "cancelled"/"error" (the engine stopped)
          new, _ = decoders[index].add(None)
          open_choices.discard(index)
          reason = value if value in ("stop", "length") else "error"
          yield Event(index, new, reason, False, len(decoders[index].ids))
    finally:
      for request in requests:
        request.cancel()

  async def complete(self, prompt: list[int], params: list[SamplingParams], stops: list[str],
                     is_disconnected=None, on_first=None) -> list[Choice]:
    """Every choice's whole text (non-streaming responses); `on_first()` is called at the first
    generated token."""
    choices = [Choice(i) for i in range(len(params))]
    async for event in self.events(prompt, params, stops, is_disconnected):
      if event.first and on_first is not None:
        on_first()
      c = choices[event.index]
      c.text += event.text
      if event.finish_reason:
        c.finish_reason, c.tokens = event.finish_reason, event.tokens
    return choices
