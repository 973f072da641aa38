"""The server's Prometheus metrics (`GET /metrics`): TTFT, inter-token and end-to-end latency
histograms, prompt and generated token counters, finished and refused requests by reason, and
gauges of the queue, busy slots and tokens/s read from the scheduler when scraped."""

from __future__ import annotations

import collections
import threading
import time

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from infra.serve.scheduler import Metrics, Request, Scheduler


class PrometheusMetrics(Metrics):
    """The scheduler's metric hooks, recorded in a registry of their own; `bind(scheduler)`
    adds the gauges that read the scheduler's state."""

    def __init__(self):
        self.registry = r = CollectorRegistry()
        latency = (.001, .0025, .005, .01, .025, .05, .1, .25, .5, 1, 2.5, 5, 10, 30, 60)
        self.h_ttft = Histogram("infra_serve_time_to_first_token_seconds",
                                "From arrival to the first token", buckets=latency, registry=r)
        self.h_itl = Histogram("infra_serve_inter_token_latency_seconds",
                               "Between two tokens of one request", buckets=latency, registry=r)
        self.h_e2e = Histogram("infra_serve_e2e_request_latency_seconds",
                               "From arrival to the last token", buckets=latency, registry=r)
        self.c_prompt = Counter("infra_serve_prompt_tokens", "Prompt tokens", registry=r)
        self.c_generated = Counter("infra_serve_generation_tokens", "Generated tokens", registry=r)
        self.c_requests = Counter("infra_serve_requests", "Finished requests", ["finish_reason"],
                                  registry=r)
        self.c_rejected = Counter("infra_serve_rejected_requests", "Refused requests",
                                  ["reason"], registry=r)
        self._times: collections.deque[float] = collections.deque(maxlen=200_000)
        self._lock = threading.Lock()

    def bind(self, scheduler: Scheduler) -> "PrometheusMetrics":
        """Gauges of `scheduler`'s queue and slots, read at each scrape."""
        r = self.registry
        Gauge("infra_serve_queue_length", "Requests waiting for a slot",
              registry=r).set_function(lambda: len(scheduler.queue))
        Gauge("infra_serve_busy_slots", "Slots decoding a request",
              registry=r).set_function(lambda: scheduler.busy)
        Gauge("infra_serve_slots", "Decode slots", registry=r).set_function(
            lambda: len(scheduler.slots))
        Gauge("infra_serve_tokens_per_second", "Tokens produced per second over the last 5 s",
              registry=r).set_function(self.tokens_per_second)
        return self

    def tokens_per_second(self, window: float = 5.0) -> float:
        now = time.perf_counter()
        with self._lock:
            while self._times and self._times[0] < now - window:
                self._times.popleft()
            return len(self._times) / window

    def ttft(self, seconds: float) -> None:
        self.h_ttft.observe(seconds)
        self._token()

    def inter_token(self, seconds: float) -> None:
        self.h_itl.observe(seconds)
        self._token()

    def _token(self) -> None:
        with self._lock:
            self._times.append(time.perf_counter())

    def finished(self, request: Request) -> None:
        self.c_requests.labels(request.finished.reason).inc()
        self.c_prompt.inc(len(request.ids))
        self.c_generated.inc(len(request.token_ids))
        if request.last_token_at is not None:
            self.h_e2e.observe(request.last_token_at - request.arrived)
