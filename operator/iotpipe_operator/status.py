"""Pure status computation: live workloads + problems in, the IoTPipeline status out.

Conditions follow the Kubernetes convention (type, status, reason, message,
lastTransitionTime, observedGeneration); ``lastTransitionTime`` only moves when a
condition's status changes, and every change is returned as a :class:`Transition` so the
handler can post one Kubernetes event per transition (not per reconcile).
"""

from __future__ import annotations

import datetime
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from iotpipe_operator.builders import TIERS, Problem, selector_for


@dataclass(frozen=True)
class Transition:
    condition: str
    status: str
    reason: str
    message: str


def _now() -> str:
    return datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def tier_status(workload: Mapping[str, Any] | None) -> dict[str, Any]:
    """Counts of one tier from its StatefulSet/Deployment (None: not created yet)."""
    if workload is None:
        return {"desired": 0, "replicas": 0, "readyReplicas": 0, "updatedReplicas": 0,
                "exists": False}
    spec = workload.get("spec") or {}
    status = workload.get("status") or {}
    desired = int(spec.get("replicas", 1))  # the API server defaults an unset replicas to 1
    generation = (workload.get("metadata") or {}).get("generation")
    observed = status.get("observedGeneration")
    return {
        "desired": desired,
        "replicas": int(status.get("replicas") or 0),
        "readyReplicas": int(status.get("readyReplicas") or 0),
        "updatedReplicas": int(status.get("updatedReplicas") or 0),
        "exists": True,
        "rolledOut": generation is None or observed is None or observed >= generation,
    }


def condition(previous: list[dict[str, Any]], kind: str, status: str, reason: str,
               message: str, generation: int | None) -> tuple[dict[str, Any], bool]:
    """Condition ``kind`` as it is now, and whether its status changed from ``previous``."""
    old = next((c for c in previous if c.get("type") == kind), None)
    changed = old is None or old.get("status") != status
    since = _now() if changed or not old.get("lastTransitionTime") else old["lastTransitionTime"]
    return ({"type": kind, "status": status, "reason": reason, "message": message,
             "lastTransitionTime": since, "observedGeneration": generation}, changed)


def compute(name: str, generation: int | None, paused: bool,
            workloads: Mapping[str, Mapping[str, Any] | None], problems: list[Problem],
            drains: Mapping[str, list[int]], previous: Mapping[str, Any] | None,
            scaling: str | None = None) -> tuple[dict[str, Any], list[Transition]]:
    """The new status and the condition transitions since ``previous``."""
    tiers = {tier: tier_status(workloads.get(tier)) for tier in TIERS}
    missing = [t for t, s in tiers.items() if not s["exists"]]
    unready = [t for t, s in tiers.items()
               if s["exists"] and (s["readyReplicas"] < s["desired"] or not s["rolledOut"]
                                   or s["updatedReplicas"] < s["desired"])]
    draining = bool(drains.get("draining") or drains.get("waitingForPod"))

    if problems:
        degraded = ("True", problems[0].reason, "; ".join(p.message for p in problems))
    else:
        degraded = ("False", "AsExpected", "no problems")
    if missing:
        progressing = ("True", "Creating", f"creating {', '.join(missing)}")
    elif scaling:  # before unready: a step-down leaves pods unready on purpose
        progressing = ("True", "ScalingDown", scaling)
    elif unready:
        progressing = ("True", "RollingOut",
                       ", ".join(f"{t} {tiers[t]['readyReplicas']}/{tiers[t]['desired']} ready"
                                 for t in unready))
    elif draining:
        progressing = ("True", "Draining", f"draining ingest queues {drains}")
    else:
        progressing = ("False", "Stable", "all tiers rolled out")
    ready_ok = not missing and not unready and not problems
    ready = ("True", "AllTiersReady", "every tier is ready") if ready_ok else (
        "False", degraded[1] if problems else progressing[1],
        degraded[2] if problems else progressing[2])
    if paused:
        progressing = ("False", "Paused", "spec.paused is true: nothing is changed")

    prev_conditions = list((previous or {}).get("conditions") or [])
    conditions, transitions = [], []
    for kind, (status, reason, message) in (("Ready", ready), ("Progressing", progressing),
                                            ("Degraded", degraded)):
        entry, changed = condition(prev_conditions, kind, status, reason, message, generation)
        conditions.append(entry)
        if changed:
            transitions.append(Transition(kind, status, reason, message))

    if paused:
        phase = "Paused"
    elif problems:
        phase = "Degraded"
    elif missing and len(missing) == len(TIERS):
        phase = "Pending"
    elif ready_ok and not draining and not scaling:
        phase = "Running"
    else:
        phase = "Progressing"

    selector = ",".join(f"{k}={v}" for k, v in selector_for(name, "ingest").items())
    # Every key always present: the status is merge-patched, so an absent key would keep
    # its stale value.
    drain_summary = {key: list(drains.get(key) or []) for key in ("draining", "waitingForPod",
                                                                 "failed")}
    status: dict[str, Any] = {"phase": phase, "observedGeneration": generation,
                              "conditions": conditions, "drains": drain_summary}
    for tier, counts in tiers.items():
        entry = {k: counts[k] for k in ("desired", "replicas", "readyReplicas",
                                        "updatedReplicas")}
        entry["summary"] = f"{counts['readyReplicas']}/{counts['desired']}"
        status[tier] = entry
    status["ingest"]["selector"] = selector  # for the scale subresource
    return status, transitions
