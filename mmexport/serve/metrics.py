"""The server's Prometheus metrics (prometheus_client, one registry per server)."""
from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client import CONTENT_TYPE_LATEST  # noqa: F401  (re-exported for the app)

_LATENCY = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)


class Metrics:
    def __init__(self, model: str):
        self.registry = r = CollectorRegistry()
        self.requests = Counter("mmexport_requests", "Chat requests by outcome (stop, length, cancelled, error, rejected)",
                                ["status"], registry=r)
        self.queue_depth = Gauge("mmexport_queue_depth", "Requests waiting for a slot", registry=r)
        self.running = Gauge("mmexport_running_requests", "Requests holding a slot (decoding)", registry=r)
        self.slots = Gauge("mmexport_slots", "Slots (rows of the KV cache) the engine decodes together", registry=r)
        self.ttft = Histogram("mmexport_time_to_first_token_seconds", "From arrival to the first generated token",
                              buckets=_LATENCY, registry=r)
        self.tpot = Histogram("mmexport_time_per_output_token_seconds", "Between consecutive tokens of a request",
                              buckets=_LATENCY, registry=r)
        self.tokens = Counter("mmexport_generated_tokens", "Tokens generated", registry=r)
        self.prompt_tokens = Counter("mmexport_prompt_tokens", "Prompt tokens prefilled", registry=r)
        self.batch_rows = Histogram("mmexport_decode_batch_rows", "Requests served by one decoder step",
                                    buckets=(1, 2, 3, 4, 6, 8, 12, 16, 32), registry=r)
        self.info = Gauge("mmexport_model_info", "The served model", ["model"], registry=r)
        self.info.labels(model=model).set(1)

    def render(self) -> bytes:
        return generate_latest(self.registry)
