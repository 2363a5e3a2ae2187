"""What the server counts, for `/metrics` in Prometheus' text format, and its access log.

Counters: requests by endpoint and status, prompt and generated tokens, requests per steering;
gauges: requests running and waiting; a histogram of request latency (seconds, whole request
including a stream). Updated from the event loop and the engine thread, under one lock.
"""

from __future__ import annotations

import threading
from collections import Counter

#: Upper bounds of the latency histogram's buckets, in seconds.
BUCKETS = (0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)


class Metrics:
    """The server's counters, gauges and latency histogram."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.requests: Counter[tuple[str, int]] = Counter()
        self.steerings: Counter[str] = Counter()
        self.tokens: Counter[str] = Counter()
        self.buckets = [0] * len(BUCKETS)
        self.latency_sum = 0.0
        self.latency_count = 0

    def request(self, endpoint: str, status: int, seconds: float) -> None:
        with self.lock:
            self.requests[endpoint, status] += 1
            self.latency_sum += seconds
            self.latency_count += 1
            for i, bound in enumerate(BUCKETS):
                if seconds <= bound:
                    self.buckets[i] += 1

    def generation(self, prompt: int, completion: int, steerings: list[str]) -> None:
        with self.lock:
            self.tokens["prompt"] += prompt
            self.tokens["completion"] += completion
            self.steerings.update(steerings)

    def render(self, running: int, waiting: int) -> str:
        """The Prometheus text exposition of everything counted, with the queue's state."""
        lines = [
            "# HELP actsteer_requests_total HTTP requests by endpoint and status.",
            "# TYPE actsteer_requests_total counter",
        ]
        with self.lock:
            for (endpoint, status), count in sorted(self.requests.items()):
                lines.append(
                    f'actsteer_requests_total{{endpoint="{endpoint}",status="{status}"}} {count}'
                )
            lines += [
                "# HELP actsteer_tokens_total Tokens read (prompt) and generated (completion).",
                "# TYPE actsteer_tokens_total counter",
                *(f'actsteer_tokens_total{{kind="{k}"}} {self.tokens[k]}'
                  for k in ("prompt", "completion")),
                "# HELP actsteer_steering_requests_total Requests that used each steering.",
                "# TYPE actsteer_steering_requests_total counter",
                *(f'actsteer_steering_requests_total{{steering="{name}"}} {count}'
                  for name, count in sorted(self.steerings.items())),
                "# HELP actsteer_requests_running Requests decoding now.",
                "# TYPE actsteer_requests_running gauge",
                f"actsteer_requests_running {running}",
                "# HELP actsteer_requests_waiting Requests queued for a place in the batch.",
                "# TYPE actsteer_requests_waiting gauge",
                f"actsteer_requests_waiting {waiting}",
                "# HELP actsteer_request_seconds Request latency, streams to their end.",
                "# TYPE actsteer_request_seconds histogram",
            ]  # fmt: skip
            for bound, count in zip(BUCKETS, self.buckets, strict=True):  # cumulative already
                lines.append(f'actsteer_request_seconds_bucket{{le="{bound:g}"}} {count}')
            lines += [
                f'actsteer_request_seconds_bucket{{le="+Inf"}} {self.latency_count}',
                f"actsteer_request_seconds_sum {self.latency_sum:.6f}",
                f"actsteer_request_seconds_count {self.latency_count}",
            ]
        return "\n".join(lines) + "\n"
