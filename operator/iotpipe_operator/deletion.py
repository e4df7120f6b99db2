"""``spec.deletionPolicy``: what deleting an IoTPipeline does to its acknowledged data.

The operator's finalizer holds the IoTPipeline (and so, through owner references, every
child) until the policy is satisfied:

- **Drain** (default). Autoscalers go first (nothing scales ingest up again), then ingest
  steps down to zero through the normal drain, one ordinal at a time
  (:func:`iotpipe_operator.drain.next_replicas`): each removed pod drains its queue on
  SIGTERM, and a drain Job forwards whatever a pod could not. Once no ingest pod, queue PVC
  or drain Job is left, the operator reads every middle pod's
  ``iotpipe_middle_feed_lag_records{group=<storage group>}`` and every storage pod's
  ``iotpipe_storage_in_flight_records`` (through the API server's pod proxy, or directly
  from the pod IP with ``--metrics-access direct``) and releases the finalizer only when
  all are zero: every acknowledged record is then in the sinks. A metrics endpoint that
  cannot be read counts as "not empty" (never guess). The condition ``Deleting`` shows
  each step; switching ``deletionPolicy`` to ``Delete`` on the deleting object gives up.
- **Retain**. Children go; the queue, log and store PVCs stay (the StatefulSets retain
  them). Recreating an IoTPipeline with the same name and namespace reattaches them and
  forwards what they hold.
- **Delete**. Children go at once (PVCs are still retained by the StatefulSets, but
  nothing forwards what they hold).

Everything here is pure: observations in, the next step out.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

from prometheus_client.parser import text_string_to_metric_families

from iotpipe_operator.drain import next_replicas

MIDDLE_LAG = "iotpipe_middle_feed_lag_records"
MIDDLE_TAIL = "iotpipe_middle_log_tail_seq"
STORAGE_IN_FLIGHT = "iotpipe_storage_in_flight_records"


def _samples(text: str) -> list[tuple[str, dict[str, str], float]]:
    return [(sample.name, dict(sample.labels), float(sample.value))
            for family in text_string_to_metric_families(text) for sample in family.samples]


def middle_backlog(text: str, group: str) -> float | None:
    """Records in one middle pod's log not yet acknowledged by ``group``; None when the
    text does not say (a log that never saw the group counts as empty only if nothing was
    ever appended)."""
    try:
        samples = _samples(text)
    except ValueError:
        return None
    for name, labels, value in samples:
        if name == MIDDLE_LAG and labels.get("group") == group:
            return value
    tail = [value for name, _, value in samples if name == MIDDLE_TAIL]
    return 0.0 if tail and tail[0] == 0 else None


def storage_in_flight(text: str) -> float | None:
    """Records delivered to one storage pod and not yet acknowledged (all endpoints)."""
    try:
        values = [value for name, _, value in _samples(text) if name == STORAGE_IN_FLIGHT]
    except ValueError:
        return None
    return sum(values)


@dataclass
class Observation:
    """What the operator saw of a deleting pipeline in one pass."""

    ingest_replicas: int | None  # the live StatefulSet's spec.replicas; None: gone
    ingest_pods: set[int] = field(default_factory=set)
    ingest_pvcs: set[int] = field(default_factory=set)
    drain_jobs: set[int] = field(default_factory=set)
    autoscalers: list[str] = field(default_factory=list)  # HPA/ScaledObject still present
    middle: Mapping[str, float | None] = field(default_factory=dict)  # pod -> backlog
    storage: Mapping[str, float | None] = field(default_factory=dict)  # pod -> in flight


@dataclass(frozen=True)
class Step:
    done: bool
    reason: str
    message: str
    ingest_replicas: int | None = None  # apply this to the ingest StatefulSet; None: leave
    delete_autoscalers: bool = False


def decide(obs: Observation) -> Step:
    """The next step of a Drain deletion."""
    if obs.autoscalers:
        return Step(False, "RemovingAutoscaler",
                    f"removing {', '.join(obs.autoscalers)} so nothing scales ingest up",
                    delete_autoscalers=True)
    live = obs.ingest_replicas
    if live is not None and live > 0:
        wanted = next_replicas(0, live, obs.ingest_pods, obs.ingest_pvcs)
        return Step(False, "DrainingIngest",
                    f"ingest stepping down to 0 through the drain: {live} replica(s), "
                    f"next {wanted}", ingest_replicas=wanted)
    if obs.ingest_pods or obs.ingest_pvcs or obs.drain_jobs:
        parts = []
        if obs.ingest_pods:
            parts.append(f"ingest pods {sorted(obs.ingest_pods)} draining")
        if obs.ingest_pvcs:
            parts.append(f"queues of ordinals {sorted(obs.ingest_pvcs)} not drained yet")
        if obs.drain_jobs:
            parts.append(f"drain Jobs {sorted(obs.drain_jobs)} running")
        return Step(False, "DrainingIngest", "; ".join(parts))
    if not obs.middle:
        return Step(False, "WaitingForMiddle",
                    "no middle pod to read: cannot confirm the middle logs are consumed")
    unknown = sorted(pod for pod, value in {**obs.middle, **obs.storage}.items()
                     if value is None)
    if unknown:
        return Step(False, "WaitingForMetrics",
                    f"could not read the queue depth of {', '.join(unknown)}")
    backlog = sum(v for v in obs.middle.values() if v is not None)
    in_flight = sum(v for v in obs.storage.values() if v is not None)
    if backlog > 0 or in_flight > 0:
        return Step(False, "WaitingForStorage",
                    f"middle logs hold {backlog:.0f} record(s) storage has not acknowledged; "
                    f"{in_flight:.0f} in flight in storage")
    return Step(True, "Drained", "ingest queues, middle logs and the storage feed are empty")
