"""The server's Prometheus metrics (GET /metrics), in a registry of its own per app so that
several servers in one process (tests) never share counters.

Request counts and latencies come from the request guard (every route), time to first token and
generated tokens from the generation routes; the gauges (queue depth, batch occupancy, tokens
per second) are read from the engines when /metrics is scraped, so they are never stale.
"""

import time

import prometheus_client as prom

# Latencies of one CPU token (ms) up to long generations (minutes).
_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300)


class Metrics:

  def __init__(self):
    self.registry = prom.CollectorRegistry()
    r = self.registry
    self.requests = prom.Counter("jaxft_requests", "HTTP requests by route and status",
                                 ["endpoint", "status"], registry=r)
    self.latency = prom.Histogram("jaxft_request_latency_seconds",
                                  "Request latency (a stream: until its last byte)",
                                  ["endpoint"], buckets=_BUCKETS, registry=r)
    self.ttft = prom.Histogram("jaxft_time_to_first_token_seconds",
                               "Time from a generation request's arrival to its first token",
                               ["endpoint"], buckets=_BUCKETS, registry=r)
    self.generated = prom.Counter("jaxft_generated_tokens", "Tokens generated", registry=r)
    self.prompt_tokens = prom.Counter("jaxft_prompt_tokens", "Prompt tokens prefilled",
                                      registry=r)
    self.queue_depth = prom.Gauge("jaxft_queue_depth",
                                  "Requests (generation) and items (encoders) waiting",
                                  registry=r)
    self.occupancy = prom.Gauge("jaxft_batch_occupancy",
                                "Busy KV-cache slots / slots (generation); real rows / rows of "
                                "the last encoder batch", ["engine"], registry=r)
    self.tokens_per_second = prom.Gauge("jaxft_generated_tokens_per_second",
                                        "Tokens generated per second since the last scrape",
                                        registry=r)
    self.ready = prom.Gauge("jaxft_ready", "1 when loaded and compiled, 0 otherwise",
                            registry=r)
    self._last = (time.monotonic(), 0)

  def refresh(self, generation_stats: dict | None, encoder_stats: dict | None) -> None:
    """Gauges from the engines' current state (called on each scrape)."""
    depth = 0
    if generation_stats:
      depth += generation_stats["queue_depth"]
      self.occupancy.labels("generation").set(generation_stats["occupancy"])
      now, tokens = time.monotonic(), generation_stats["tokens_generated"]
      then, before = self._last
      if now > then:
        self.tokens_per_second.set((tokens - before) / (now - then))
      self._last = (now, tokens)
    if encoder_stats:
      depth += encoder_stats.get("queue_depth", 0)
      self.occupancy.labels("encoder").set(encoder_stats.get("occupancy", 0.0))
    self.queue_depth.set(depth)

  def exposition(self) -> tuple[bytes, str]:
    return prom.generate_latest(self.registry), prom.CONTENT_TYPE_LATEST
