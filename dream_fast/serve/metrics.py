"""Prometheus text exposition (format 0.0.4) for `dream-fast serve`, without a client library:
counters, gauges and histograms with labels, safe to update from the event loop and the model thread."""

from __future__ import annotations

import math
import threading
import time
from collections import deque

LATENCY_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64)


def _labels(names: tuple[str, ...], values: tuple[str, ...], extra: str = "") -> str:
    parts = [f'{n}="{_escape(v)}"' for n, v in zip(names, values)]
    if extra:
        parts.append(extra)
    return "{" + ",".join(parts) + "}" if parts else ""


def _escape(v: str) -> str:
    return str(v).replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def _num(x: float) -> str:
    if math.isinf(x):
        return "+Inf" if x > 0 else "-Inf"
    return repr(float(x)) if not float(x).is_integer() else str(int(x))


class _Metric:
    kind = ""

    def __init__(self, name: str, help_text: str, labels: tuple[str, ...] = ()):
        self.name, self.help, self.label_names = name, help_text, labels
        self._lock = threading.Lock()

    def _key(self, labels: dict[str, str]) -> tuple[str, ...]:
        if set(labels) != set(self.label_names):
            raise ValueError(f"{self.name} takes labels {self.label_names}, got {sorted(labels)}")
        return tuple(str(labels[n]) for n in self.label_names)

    def header(self) -> list[str]:
        return [f"# HELP {self.name} {self.help}", f"# TYPE {self.name} {self.kind}"]


class Counter(_Metric):
    kind = "counter"

    def __init__(self, name, help_text, labels=()):
        super().__init__(name, help_text, labels)
        self._values: dict[tuple[str, ...], float] = {} if labels else {(): 0.0}

    def inc(self, amount: float = 1.0, **labels: str) -> None:
        k = self._key(labels)
        with self._lock:
            self._values[k] = self._values.get(k, 0.0) + amount

    def value(self, **labels: str) -> float:
        return self._values.get(self._key(labels), 0.0)

    def render(self) -> list[str]:
        with self._lock:
            items = sorted(self._values.items())
        return self.header() + [f"{self.name}{_labels(self.label_names, k)} {_num(v)}" for k, v in items]


class Gauge(Counter):
    kind = "gauge"

    def set(self, value: float, **labels: str) -> None:
        k = self._key(labels)
        with self._lock:
            self._values[k] = float(value)


class Histogram(_Metric):
    kind = "histogram"

    def __init__(self, name, help_text, buckets, labels=()):
        super().__init__(name, help_text, labels)
        self.buckets = tuple(sorted(buckets))
        self._data: dict[tuple[str, ...], list] = {}  # key -> [bucket counts..., sum, count]

    def observe(self, value: float, **labels: str) -> None:
        k = self._key(labels)
        with self._lock:
            d = self._data.setdefault(k, [0] * len(self.buckets) + [0.0, 0])
            for i, b in enumerate(self.buckets):
                if value <= b:
                    d[i] += 1
            d[-2] += value
            d[-1] += 1

    def count(self, **labels: str) -> int:
        d = self._data.get(self._key(labels))
        return 0 if d is None else d[-1]

    def render(self) -> list[str]:
        out = self.header()
        with self._lock:
            items = sorted((k, list(v)) for k, v in self._data.items())
        for k, d in items:
            for b, c in zip(self.buckets, d):
                le = 'le="' + _num(b) + '"'
                out.append(f"{self.name}_bucket{_labels(self.label_names, k, le)} {c}")
            inf = 'le="+Inf"'
            out.append(f"{self.name}_bucket{_labels(self.label_names, k, inf)} {d[-1]}")
            out.append(f"{self.name}_sum{_labels(self.label_names, k)} {_num(d[-2])}")
            out.append(f"{self.name}_count{_labels(self.label_names, k)} {d[-1]}")
        return out


class RateWindow:
    """Events per second over the last `window_s` seconds (images/s for the gauge)."""

    def __init__(self, window_s: float = 60.0):
        self.window_s = window_s
        self._events: deque[tuple[float, int]] = deque()
        self._lock = threading.Lock()

    def add(self, n: int, now: float | None = None) -> None:
        with self._lock:
            self._events.append((time.monotonic() if now is None else now, n))

    def rate(self, now: float | None = None) -> float:
        now = time.monotonic() if now is None else now
        with self._lock:
            while self._events and self._events[0][0] < now - self.window_s:
                self._events.popleft()
            total = sum(n for _, n in self._events)
        return total / self.window_s


class ServeMetrics:
    """Every metric the server exports (names prefixed dream_)."""

    def __init__(self):
        self.requests = Counter("dream_requests_total", "HTTP requests by route and status code", ("route", "status"))
        self.latency = Histogram(
            "dream_request_latency_seconds", "HTTP request latency by route", LATENCY_BUCKETS, ("route",)
        )
        self.queue_wait = Histogram(
            "dream_queue_wait_seconds", "time a job waited before its batch ran", LATENCY_BUCKETS
        )
        self.batch_prompts = Histogram(
            "dream_batch_size", "prompts (or embedding items) per model call", BATCH_BUCKETS, ("kind",)
        )
        self.batch_seconds = Histogram("dream_batch_seconds", "model time per batch", LATENCY_BUCKETS, ("kind",))
        self.images = Counter("dream_images_generated_total", "images generated and returned to a client")
        self.dropped = Counter(
            "dream_jobs_dropped_total", "queued jobs dropped before their batch ran, by reason", ("reason",)
        )
        self.rejected = Counter("dream_rejected_total", "requests refused with 503 because the queue was full")
        self.queue_depth = Gauge("dream_queue_depth", "jobs waiting for a batch")
        self.queue_items = Gauge("dream_queue_prompts", "prompts (or embedding items) waiting for a batch")
        self.in_flight = Gauge("dream_jobs_in_flight", "jobs submitted and not yet answered (queued or running)")
        self.ready = Gauge("dream_ready", "1 once the model is loaded and warmed")
        self.image_rate = RateWindow(60.0)

    def render(self) -> str:
        rate = Gauge("dream_images_per_second", "images generated per second over the last 60 s")
        rate.set(self.image_rate.rate())
        lines: list[str] = []
        for m in (self.requests, self.latency, self.queue_wait, self.batch_prompts, self.batch_seconds, self.images,
                  rate, self.dropped, self.rejected, self.queue_depth, self.queue_items, self.in_flight, self.ready):
            lines += m.render()
        return "\n".join(lines) + "\n"
