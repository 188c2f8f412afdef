"""The server's figures in Prometheus' text format (`GET /metrics`): requests, tokens, queue
depth, time to first token and decode speed. A few counters and histograms need no library."""
from __future__ import annotations

import threading
from bisect import bisect_left
from collections import Counter
from typing import Callable

TTFT_BUCKETS_S = (0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)
DECODE_BUCKETS_TPS = (1, 2, 5, 10, 20, 50, 100, 200)


class Histogram:
    def __init__(self, buckets: tuple[float, ...]):
        self.buckets = buckets
        self.counts = [0] * (len(buckets) + 1)  # the last one is +Inf
        self.total = 0.0

    def observe(self, value: float) -> None:
        self.counts[bisect_left(self.buckets, value)] += 1
        self.total += value

    def lines(self, name: str) -> list[str]:
        out, running = [], 0
        for bound, count in zip([*map(str, self.buckets), "+Inf"], self.counts):
            running += count
            out.append(f'{name}_bucket{{le="{bound}"}} {running}')
        return out + [f"{name}_sum {self.total}", f"{name}_count {running}"]


class Metrics:
    """What the API has served since it started; `queue_depth` is read when scraped."""

    def __init__(self, queue_depth: Callable[[], int] = lambda: 0):
        self._lock = threading.Lock()
        self.requests: Counter[tuple[str, int]] = Counter()   # (route, status) -> count
        self.prompt_tokens = 0
        self.cached_tokens = 0
        self.completion_tokens = 0
        self.ttft = Histogram(TTFT_BUCKETS_S)
        self.decode = Histogram(DECODE_BUCKETS_TPS)
        self.queue_depth = queue_depth

    def request(self, route: str, status: int) -> None:
        with self._lock:
            self.requests[(route, status)] += 1

    def generation(self, prompt_tokens: int, cached_tokens: int, completion_tokens: int, ttft_s: float,
                   decode_tokens_per_s: float) -> None:
        with self._lock:
            self.prompt_tokens += prompt_tokens
            self.cached_tokens += cached_tokens
            self.completion_tokens += completion_tokens
            self.ttft.observe(ttft_s)
            if decode_tokens_per_s > 0:
                self.decode.observe(decode_tokens_per_s)

    def text(self) -> str:
        with self._lock:
            lines = ["# HELP phi4mm_requests_total HTTP requests by route and status.",
                     "# TYPE phi4mm_requests_total counter"]
            lines += [f'phi4mm_requests_total{{route="{route}",status="{status}"}} {n}'
                      for (route, status), n in sorted(self.requests.items())]
            for name, value, what in (("prompt_tokens", self.prompt_tokens, "Prompt tokens of all requests."),
                                      ("cached_tokens", self.cached_tokens, "Prompt tokens reused from the KV cache."),
                                      ("completion_tokens", self.completion_tokens, "Generated tokens.")):
                lines += [f"# HELP phi4mm_{name}_total {what}", f"# TYPE phi4mm_{name}_total counter",
                          f"phi4mm_{name}_total {value}"]
            lines += ["# HELP phi4mm_queue_depth Requests waiting for the model.", "# TYPE phi4mm_queue_depth gauge",
                      f"phi4mm_queue_depth {self.queue_depth()}"]
            lines += ["# HELP phi4mm_ttft_seconds Time to first token.", "# TYPE phi4mm_ttft_seconds histogram"]
            lines += self.ttft.lines("phi4mm_ttft_seconds")
            lines += ["# HELP phi4mm_decode_tokens_per_second Decode speed of each generation.",
                      "# TYPE phi4mm_decode_tokens_per_second histogram"]
            lines += self.decode.lines("phi4mm_decode_tokens_per_second")
        return "\n".join(lines) + "\n"
