"""CurveZMQ key rotation driven by ``spec.security.curve.rotation``: the pure decisions.

When the field holds a value that differs from ``status.curveRotation.completed``, the
operator rotates every role's key pair in the Secret ``<name>-curve``, one step per
observation, each step decided only from what it observes (the Secret, the middle pods'
metrics, the workloads) and the status as last recorded, so a pass repeated or resumed
after an operator restart does the same thing again or nothing:

1. ``add_next``: a next key pair for every role that has none. The new public keys'
   fingerprints are recorded (``status.curveRotation.keys``): they are the rotation's
   target. Next keys found in the Secret (a pass that patched it but could not record the
   status) are adopted as the target instead of being generated again.
2. wait until every middle pod admits the target client keys on its socket
   (``iotpipe_middle_curve_admitted_key``): kubelet propagated the Secret and the middle
   re-read it.
3. ``promote``: swap current and next in the Secret (decided only while next == target
   and that target is recorded in the status: a swap is never repeated or undone). Then
   wait until every middle pod sees its promoted own key on disk
   (``iotpipe_middle_curve_disk_key``), so restarted pods mount the promoted Secret.
   ``roll``: a pod-template annotation (:data:`ANNOTATION`) on ingest, relay and storage;
   once ingest rolled out, on the middle. Stopping ingest pods thus drain their queues to
   middles that still run the old key; new client pods cannot reach the middle until it
   rolled (ingest keeps what it acknowledged in its durable queue, storage leases are
   redelivered, relays miss the live events of that window).
4. wait until every workload rolled out with the annotation and every middle pod runs
   the target key (``iotpipe_middle_curve_own_key``); ``retire`` deletes the next (old)
   keys. The rotation is complete when the Secret's current keys are the target and no next
   key remains.

One rotation at a time: ``status.curveRotation.active`` names the running one; a value
requested meanwhile starts after it completes (the latest requested value wins).
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from prometheus_client.parser import text_string_to_metric_families

ROLES = ("middle", "ingest", "relay", "storage")
# The middle socket (ZAP domain) admitting each client role: as iotpipe.curve.ADMITTED.
DOMAIN_OF = {"ingest": "router", "relay": "pub", "storage": "feed"}
WORKLOAD_TIERS = ("middle", "ingest", "relay", "storage")
CLIENT_TIERS = ("ingest", "relay", "storage")
ANNOTATION = "iotpipe.dev/curve-keys"
CONDITION = "CurveKeysRotating"
_PUBLIC = re.compile(rb'public-key\s*=\s*"([^"]{40})"')


def fingerprint(public: bytes) -> str:
    """As :func:`iotpipe.curve.fingerprint` (the middle's metrics label)."""
    return hashlib.sha256(public.strip()).hexdigest()[:16]


def public_fingerprints(files: Mapping[str, bytes], slot: str) -> dict[str, str]:
    """Role -> fingerprint of its ``slot`` (current | next) public key in the Secret's files;
    roles without a readable file are left out."""
    suffix = ".key" if slot == "current" else ".next.key"
    found = {}
    for role in ROLES:
        match = _PUBLIC.search(files.get(f"{role}{suffix}", b""))
        if match:
            found[role] = fingerprint(match.group(1))
    return found


@dataclass(frozen=True)
class MiddleKeys:
    """What one middle pod's metrics say about its keys."""

    admitted: Mapping[str, frozenset[str]]  # socket -> admitted client key fingerprints
    own: str | None  # the key it runs with
    disk: str | None  # its own key in the mounted Secret now


def parse_middle(text: str) -> MiddleKeys | None:
    """The key metrics of a middle pod; None when the text has none (no CURVE, old image)."""
    admitted: dict[str, set[str]] = {}
    own = disk = None
    try:
        for family in text_string_to_metric_families(text):
            for sample in family.samples:
                if sample.value != 1:
                    continue
                if sample.name == "iotpipe_middle_curve_admitted_key":
                    admitted.setdefault(sample.labels.get("socket", ""), set()).add(
                        sample.labels.get("fingerprint", ""))
                elif sample.name == "iotpipe_middle_curve_own_key":
                    own = sample.labels.get("fingerprint")
                elif sample.name == "iotpipe_middle_curve_disk_key":
                    disk = sample.labels.get("fingerprint")
    except ValueError:
        return None
    if own is None:
        return None
    return MiddleKeys({d: frozenset(k) for d, k in admitted.items()}, own, disk)


def rolled_out(workload: Mapping[str, Any] | None, rotation: str) -> bool:
    """Whether every pod of a StatefulSet/Deployment runs the template annotated with
    ``rotation`` and is ready."""
    if workload is None:
        return False
    meta = workload.get("metadata") or {}
    spec = workload.get("spec") or {}
    status = workload.get("status") or {}
    annotations = ((spec.get("template") or {}).get("metadata") or {}).get("annotations") or {}
    if annotations.get(ANNOTATION) != rotation:
        return False
    generation, observed = meta.get("generation"), status.get("observedGeneration")
    if generation is None or observed is None or observed < generation:
        return False
    desired = int(spec.get("replicas", 1))
    if int(status.get("updatedReplicas") or 0) < desired \
            or int(status.get("readyReplicas") or 0) < desired:
        return False
    if int(status.get("replicas") or 0) > int(status.get("updatedReplicas") or 0):
        return False  # old pods still running (or terminating)
    # A StatefulSet is rolled out once its current revision is the update revision.
    return not (workload.get("kind") == "StatefulSet" and status.get("updateRevision")
                and status.get("currentRevision") != status.get("updateRevision"))


def annotated(workload: Mapping[str, Any] | None, rotation: str) -> bool:
    template = ((workload or {}).get("spec") or {}).get("template") or {}
    return ((template.get("metadata") or {}).get("annotations") or {}).get(
        ANNOTATION) == rotation


@dataclass(frozen=True)
class Observation:
    requested: str | None  # spec.security.curve.rotation
    record: Mapping[str, Any]  # status.curveRotation ({} when never set)
    secret: Mapping[str, bytes] | None  # the Secret's files; None: no Secret
    middle: Mapping[str, MiddleKeys | None] = field(default_factory=dict)  # pod -> keys
    middle_desired: int = 0  # the middle StatefulSet's replicas
    workloads: Mapping[str, Mapping[str, Any] | None] = field(default_factory=dict)


@dataclass(frozen=True)
class Step:
    action: str  # none | add_next | promote | roll | retire
    record: dict[str, Any]  # the new status.curveRotation
    status: str  # of the condition CurveKeysRotating
    reason: str
    message: str
    roles: tuple[str, ...] = ()  # add_next: the roles that need a next key pair
    tiers: tuple[str, ...] = ()  # roll: the workloads to annotate


def _middle_lagging(obs: Observation, ok: Any) -> list[str]:
    """Middle pods whose keys do not satisfy ``ok`` yet (unreadable ones included), and a
    placeholder when fewer pods than replicas answer."""
    lagging = sorted(pod for pod, keys in obs.middle.items() if keys is None or not ok(keys))
    if len(obs.middle) < max(obs.middle_desired, 1):
        lagging.append(f"{max(obs.middle_desired, 1) - len(obs.middle)} pod(s) not running")
    return lagging


def _keys(record: Mapping[str, Any]) -> dict[str, str]:
    # A merge-patched status may hold nulls for roles it dropped.
    return {role: fp for role, fp in (record.get("keys") or {}).items() if fp}


def decide(obs: Observation) -> Step:
    """The next rotation step (pure; see the module docstring)."""
    record = {"active": obs.record.get("active"), "completed": obs.record.get("completed"),
              "keys": _keys(obs.record)}
    active = record["active"]
    if not active:
        if obs.requested is None or obs.requested == record["completed"]:
            done = record["completed"]
            return Step("none", record, "False", "Idle",
                        f"rotation {done!r} complete" if done else "no rotation requested")
        active = record["active"] = obs.requested
        record["keys"] = {}
    queued = (f"; rotation {obs.requested!r} starts after this one"
              if obs.requested not in (None, active) else "")
    if obs.secret is None:
        return Step("none", record, "True", "WaitingForSecret",
                    f"rotation {active!r}: the CurveZMQ Secret does not exist yet{queued}")
    current = public_fingerprints(obs.secret, "current")
    nxt = public_fingerprints(obs.secret, "next")
    missing = [r for r in ROLES if r not in current]
    if missing:
        return Step("none", record, "True", "SecretIncomplete",
                    f"rotation {active!r}: the Secret lacks a current key of "
                    f"{', '.join(missing)}; nothing is changed until it holds one per role")
    targets: dict[str, str] = record["keys"]
    promoted = bool(targets) and all(current[r] == targets.get(r) for r in ROLES)
    if not promoted and (not targets or any(nxt.get(r) != targets.get(r) for r in ROLES)):
        # Not promoted and the next keys are not (all) the target: adopt complete next keys
        # (a pass that patched the Secret but could not record it, or an edited Secret),
        # else write the missing ones. Safe: nothing is promoted before admission.
        if all(r in nxt for r in ROLES):
            targets = record["keys"] = dict(nxt)
        else:
            record["keys"] = {}
            roles = tuple(r for r in ROLES if r not in nxt)
            return Step("add_next", record, "True", "AddingNextKeys",
                        f"rotation {active!r}: writing next key pairs ({', '.join(roles)})"
                        f"{queued}", roles=roles)
    if not promoted:
        lagging = _middle_lagging(obs, lambda k: all(
            targets[role] in k.admitted.get(domain, frozenset())
            for role, domain in DOMAIN_OF.items()))
        if lagging:
            return Step("none", record, "True", "WaitingForMiddleAdmission",
                        f"rotation {active!r}: waiting until every middle pod admits the next "
                        f"keys (not yet: {', '.join(lagging)}){queued}")
        if _keys(obs.record) != targets:
            # Promote only towards a target already in the status: a swap whose status was
            # lost would otherwise adopt the old keys (now "next") and swap them back.
            return Step("none", record, "True", "WaitingForMiddleAdmission",
                        f"rotation {active!r}: next keys admitted; recording them before "
                        f"promoting{queued}")
        return Step("promote", record, "True", "Promoting",
                    f"rotation {active!r}: promoting the next keys{queued}")
    if nxt:
        clients = tuple(t for t in CLIENT_TIERS if not annotated(obs.workloads.get(t), active))
        if clients:
            lagging = _middle_lagging(obs, lambda k: k.disk == targets["middle"]
                                      or k.own == targets["middle"])
            if lagging:
                return Step("none", record, "True", "WaitingForPropagation",
                            f"rotation {active!r}: waiting until the promoted Secret reaches "
                            f"every middle pod (not yet: {', '.join(lagging)}){queued}")
            return Step("roll", record, "True", "RollingOut",
                        f"rotation {active!r}: restarting {', '.join(clients)} with the new "
                        f"keys{queued}", tiers=clients)
        if not annotated(obs.workloads.get("middle"), active):
            # The middle changes its key only once ingest rolled out: a stopping ingest pod
            # forwards its queue to a middle that still runs the old key.
            if not rolled_out(obs.workloads.get("ingest"), active):
                return Step("none", record, "True", "RollingOut",
                            f"rotation {active!r}: waiting for ingest to roll out before "
                            f"the middle{queued}")
            return Step("roll", record, "True", "RollingOut",
                        f"rotation {active!r}: restarting middle with its new key{queued}",
                        tiers=("middle",))
        unrolled = [t for t in WORKLOAD_TIERS if not rolled_out(obs.workloads.get(t), active)]
        lagging = _middle_lagging(obs, lambda k: k.own == targets["middle"])
        if unrolled or lagging:
            waiting = unrolled + [f"middle pod {p}" for p in lagging]
            return Step("none", record, "True", "RollingOut",
                        f"rotation {active!r}: waiting for the rollout with the new keys "
                        f"(not yet: {', '.join(waiting)}){queued}")
        return Step("retire", record, "True", "Retiring",
                    f"rotation {active!r}: every pod runs the new keys; retiring the old "
                    f"ones{queued}")
    record = {"active": None, "completed": active, "keys": {}}
    return Step("none", record, "False", "Completed",
                f"rotation {active!r} complete: every tier runs its new key{queued}")
