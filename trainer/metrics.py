"""Prometheus metrics of the trainer (`reasonrec trainer` serves them; `train --once` sets them
for the run it makes)."""

from prometheus_client import CollectorRegistry, Counter, Gauge, ProcessCollector

from server.metrics import UNREADABLE_RECORDS

# A registry of its own: the trainer imports the gateway's modules, whose metrics register on the
# default registry and would be served here too, empty.
REGISTRY = CollectorRegistry()
ProcessCollector(registry=REGISTRY)
# Except this one: the store counts the records it skips, and the trainer reads every record.
REGISTRY.register(UNREADABLE_RECORDS)

RUNS = Counter(
    "reasonrec_trainer_runs_total",
    "Refreshes by outcome: published, rejected (gate), skipped (too little data), failed.",
    ["outcome"],
    registry=REGISTRY,
)
REWARD_MEAN = Gauge(
    "reasonrec_trainer_reward_mean", "Mean GRPO reward of the last refresh.", registry=REGISTRY
)
GATE_NDCG = Gauge(
    "reasonrec_trainer_gate_ndcg",
    "Held-out NDCG@10 at the last gate, by model.",
    ["which"],
    registry=REGISTRY,
)
LAST_SUCCESS = Gauge(
    "reasonrec_trainer_last_success_timestamp",
    "Unix time of the last published refresh.",
    registry=REGISTRY,
)
# Read by the trainer (one process, where every gateway replica would repeat it): a capped Redis
# evicts feedback attribution and event-id markers first and refuses writes once none are left.
REDIS_USED = Gauge(
    "reasonrec_trainer_redis_used_bytes",
    "Memory Redis uses (INFO used_memory), read every poll of the sidecar.",
    registry=REGISTRY,
)
REDIS_MAX = Gauge(
    "reasonrec_trainer_redis_max_bytes",
    "Redis's memory cap (maxmemory); 0: none.",
    registry=REGISTRY,
)
for outcome in ("published", "rejected", "skipped", "failed"):
    RUNS.labels(outcome)
for which in ("active", "candidate"):
    GATE_NDCG.labels(which)
