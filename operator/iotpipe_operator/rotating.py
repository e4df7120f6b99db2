"""CurveZMQ key rotation, the I/O half (decisions in :mod:`rotation`): read the Secret, the
workloads and the middles' admitted keys, act on the step decided, and put the rotation's
record and condition into the status.
"""

from __future__ import annotations

import base64
import logging
import tempfile
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from iotpipe import curve
from iotpipe_operator import builders, rotation
from iotpipe_operator import status as status_mod
from iotpipe_operator.builders import WORKLOAD_KINDS, selector_for, workload_name
from iotpipe_operator.kube import Kube, KubeError, owned_by
from iotpipe_operator.names import Names

__all__ = ["report_rotation", "rotate_curve", "rotated_files"]


def _secret_files(secret: Mapping[str, Any]) -> dict[str, bytes]:
    return {k: base64.b64decode(v) for k, v in (secret.get("data") or {}).items()}


def rotated_files(files: Mapping[str, bytes], change: Callable[[Path], object]
                  ) -> dict[str, bytes]:
    """``files`` after ``change`` (an :mod:`iotpipe.curve` step) ran on a private copy: the
    operator rotates with the same code as ``iotpipe keys``."""
    with tempfile.TemporaryDirectory(prefix="iotpipe-curve-") as tmp:
        directory = Path(tmp)
        for key, value in files.items():
            (directory / key).write_bytes(value)
        change(directory)
        return {path.name: path.read_bytes() for path in directory.iterdir()
                if path.is_file() and not path.name.startswith(".")}


def _rotation_observe(kube: Kube, body: Mapping[str, Any], spec: Mapping[str, Any],
                      direct_metrics: bool, logger: logging.Logger
                      ) -> tuple[rotation.Observation, dict[str, Any] | None]:
    meta = body["metadata"]
    name, namespace = meta["name"], meta["namespace"]
    secret = kube.get("v1", "Secret", namespace, Names(name).curve_secret())
    uid = meta.get("uid")
    workloads: dict[str, dict[str, Any] | None] = {}
    for tier, (api_version, kind) in WORKLOAD_KINDS.items():
        live = kube.get(api_version, kind, namespace, workload_name(name, tier))
        # A foreign object with a child's name is no tier of this pipeline: never rolled out.
        workloads[tier] = live if live is None or uid is None or owned_by(live, uid) else None
    middle: dict[str, rotation.MiddleKeys | None] = {}
    for pod in kube.list("v1", "Pod", namespace, selector_for(name, "middle")):
        if (pod.get("metadata") or {}).get("deletionTimestamp"):
            continue  # terminating: a restarted one takes its place
        try:
            middle[pod["metadata"]["name"]] = rotation.parse_middle(kube.pod_metrics(
                namespace, pod, builders.METRICS_PORT, direct=direct_metrics))
        except KubeError as exc:
            logger.info("rotation: metrics of %s unreadable: %s", pod["metadata"]["name"], exc)
            middle[pod["metadata"]["name"]] = None
    middle_sts = workloads.get("middle") or {}
    return rotation.Observation(
        requested=spec["security"]["curve"].get("rotation"),
        record=(body.get("status") or {}).get("curveRotation") or {},
        secret=None if secret is None else _secret_files(secret),
        middle=middle,
        middle_desired=int((middle_sts.get("spec") or {}).get("replicas", 1)),
        workloads=workloads), secret


def _rotation_act(kube: Kube, body: Mapping[str, Any], step: rotation.Step,
                  secret: Mapping[str, Any] | None, logger: logging.Logger) -> None:
    meta = body["metadata"]
    name, namespace = meta["name"], meta["namespace"]
    if step.action == "roll":
        for tier in step.tiers:
            api_version, kind = WORKLOAD_KINDS[tier]
            live = kube.get(api_version, kind, namespace, workload_name(name, tier))
            uid = meta.get("uid")
            if live is None or (uid is not None and not owned_by(live, uid)):
                continue  # not there yet, or foreign (reported by the apply): never touched
            # A merge patch, like kubectl rollout restart: the operator's apply does not own
            # the annotation, so later reconciles keep it.
            kube.patch(api_version, kind, namespace, workload_name(name, tier),
                       {"spec": {"template": {"metadata": {"annotations": {
                           rotation.ANNOTATION: step.record["active"]}}}}})
        logger.info("rotation %s: rolling %s", step.record["active"], ", ".join(step.tiers))
        return
    assert secret is not None
    files = _secret_files(secret)
    if step.action == "add_next":
        new = rotated_files(files, lambda d: curve.add_next(d, step.roles))
    elif step.action == "promote":
        new = rotated_files(files, curve.promote)
    elif step.action == "retire":
        new = rotated_files(files, curve.retire)
    else:
        return
    data: dict[str, str | None] = {k: base64.b64encode(v).decode() for k, v in new.items()
                                   if files.get(k) != v}
    data.update({k: None for k in files if k not in new})  # merge patch: null deletes
    # resourceVersion: the patch fails (409) if the Secret changed since it was read, so a
    # decision is never applied to keys it did not see.
    kube.patch("v1", "Secret", namespace, secret["metadata"]["name"],
               {"metadata": {"resourceVersion": secret["metadata"].get("resourceVersion")},
                "data": data})
    logger.info("rotation %s: %s (%s)", step.record["active"], step.action,
                ", ".join(sorted(data)))


def rotate_curve(kube: Kube, body: Mapping[str, Any], spec: Mapping[str, Any],
                 direct_metrics: bool, logger: logging.Logger) -> rotation.Step:
    """Drive the rotation as far as it goes without waiting: act, observe again, until a
    step has to wait (bounded: a rotation has four acting steps)."""
    record = (body.get("status") or {}).get("curveRotation") or {}
    if not spec["security"]["curve"]["enabled"]:
        return rotation.Step("none", dict(record), "False", "CurveDisabled",
                             "security.curve.enabled is false: no keys to rotate")
    step = rotation.decide(rotation.Observation(
        requested=spec["security"]["curve"].get("rotation"), record=record, secret={}))
    if step.reason == "Idle":
        return step  # nothing requested: no Secret read, no metrics scraped
    for _ in range(5):
        observation, secret = _rotation_observe(kube, body, spec, direct_metrics, logger)
        step = rotation.decide(observation)
        if step.action == "none":
            break
        _rotation_act(kube, body, step, secret, logger)
    return step



def report_rotation(new_status: dict[str, Any], transitions: list[status_mod.Transition],
                    previous: Mapping[str, Any], step: rotation.Step | None,
                    generation: int | None) -> None:
    """The rotation's record and condition into the status (the previous ones when this
    pass did not get to the rotation: conditions are one list, replaced as a whole)."""
    old_conditions = list(previous.get("conditions") or [])
    if step is None:
        old = next((c for c in old_conditions if c.get("type") == rotation.CONDITION), None)
        if old is not None:
            new_status["conditions"].append(old)
        if previous.get("curveRotation") is not None:
            new_status["curveRotation"] = previous["curveRotation"]
        return
    condition, changed = status_mod.condition(old_conditions, rotation.CONDITION,
                                               step.status, step.reason, step.message,
                                               generation)
    new_status["conditions"].append(condition)
    record: dict[str, Any] = dict(step.record)
    # The status is merge-patched: a role no longer in the record is removed by a null.
    old_keys = (previous.get("curveRotation") or {}).get("keys") or {}
    record["keys"] = {**{role: None for role in old_keys}, **(step.record.get("keys") or {})}
    new_status["curveRotation"] = record
    if changed:
        transitions.append(status_mod.Transition(rotation.CONDITION, step.status,
                                                 step.reason, step.message))

