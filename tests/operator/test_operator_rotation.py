"""Pure CurveZMQ rotation decisions (:mod:`iotpipe_operator.rotation`), driven through a
simulated cluster: a Secret with real key files, middle pods that see the Secret only once
"kubelet" propagated it, workloads that roll only when the test lets them."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from iotpipe import curve
from iotpipe_operator import rotation
from iotpipe_operator.rotating import rotated_files
from iotpipe_operator.rotation import MiddleKeys, Observation

pytestmark = pytest.mark.unit

KINDS = {"middle": "StatefulSet", "ingest": "StatefulSet", "relay": "Deployment",
         "storage": "StatefulSet"}


def _workload(tier: str, annotation: str | None, rolled: bool) -> dict[str, Any]:
    annotations = {} if annotation is None else {rotation.ANNOTATION: annotation}
    return {"kind": KINDS[tier], "metadata": {"generation": 2},
            "spec": {"replicas": 2, "template": {"metadata": {"annotations": annotations}}},
            "status": {"observedGeneration": 2 if rolled else 1, "replicas": 2,
                       "readyReplicas": 2, "updatedReplicas": 2 if rolled else 1,
                       "currentRevision": "a" if rolled else "b", "updateRevision": "a"}}


class World:
    """What the operator observes; the test moves kubelet and the controllers."""

    def __init__(self, tmp_path: Path) -> None:
        directory = tmp_path / "keys"
        curve.generate_keys(directory)
        self.files = {p.name: p.read_bytes() for p in directory.iterdir()}
        self.original = rotation.public_fingerprints(self.files, "current")
        self.mounted = dict(self.files)  # the Secret as the middle pods see it
        self.running = self.original["middle"]  # the middle's own key, read at start
        self.workloads = {t: _workload(t, None, True) for t in KINDS}
        self.record: dict[str, Any] = {}
        self.actions: list[str] = []
        self.rolls: list[tuple[str, ...]] = []
        self.reasons: list[str] = []

    def middle_keys(self) -> MiddleKeys:
        admitted = {}
        for role, domain in rotation.DOMAIN_OF.items():
            admitted[domain] = frozenset(fp for slot in ("current", "next") if (
                fp := rotation.public_fingerprints(self.mounted, slot).get(role)))
        return MiddleKeys(admitted, self.running,
                          rotation.public_fingerprints(self.mounted, "current")["middle"])

    def observe(self, requested: str | None) -> Observation:
        return Observation(requested, self.record, dict(self.files),
                           {"demo-middle-0": self.middle_keys(),
                            "demo-middle-1": self.middle_keys()}, 2, self.workloads)

    def step(self, requested: str | None) -> rotation.Step:
        """One operator pass that acts: decide, do it, record the status."""
        step = rotation.decide(self.observe(requested))
        self.reasons.append(step.reason)
        if step.action != "none":
            self.actions.append(step.action)
        if step.action == "add_next":
            self.files = rotated_files(self.files, lambda d: curve.add_next(d, step.roles))
        elif step.action == "promote":
            self.files = rotated_files(self.files, curve.promote)
        elif step.action == "retire":
            self.files = rotated_files(self.files, curve.retire)
        elif step.action == "roll":
            self.rolls.append(step.tiers)
            for tier in step.tiers:
                self.workloads[tier] = _workload(tier, step.record["active"], False)
        self.record = step.record
        return step

    def propagate(self) -> None:
        self.mounted = dict(self.files)

    def finish_rollout(self) -> None:
        for tier, workload in self.workloads.items():
            annotation = workload["spec"]["template"]["metadata"]["annotations"].get(
                rotation.ANNOTATION)
            self.workloads[tier] = _workload(tier, annotation, True)
            if tier == "middle" and annotation is not None:
                self.running = rotation.public_fingerprints(self.mounted, "current")["middle"]


def _run(world: World, requested: str, passes: int = 40) -> rotation.Step:
    """Passes until the rotation completes; kubelet and the controllers move only when the
    operator waits for them."""
    for _ in range(passes):
        step = world.step(requested)
        if step.reason == "Completed":
            return step
        if step.reason in ("WaitingForMiddleAdmission", "WaitingForPropagation"):
            world.propagate()
        elif step.reason == "RollingOut" and step.action == "none":
            world.finish_rollout()
    raise AssertionError(f"no completion: {world.reasons}")


def test_a_rotation_runs_every_step_once_in_order(tmp_path: Path) -> None:
    world = World(tmp_path)
    step = _run(world, "r1")
    assert world.actions == ["add_next", "promote", "roll", "roll", "retire"]
    # the clients first, the middle (a new key for every client) after ingest rolled out
    assert world.rolls == [("ingest", "relay", "storage"), ("middle",)]
    assert step.record == {"active": None, "completed": "r1", "keys": {}}
    assert step.status == "False"
    current = rotation.public_fingerprints(world.files, "current")
    assert rotation.public_fingerprints(world.files, "next") == {}
    assert all(current[r] != world.original[r] for r in rotation.ROLES)
    assert world.running == current["middle"]
    (tmp_path / "check").mkdir()
    for name, content in world.files.items():
        (tmp_path / "check" / name).write_bytes(content)
    for role in rotation.ROLES:  # the rotated Secret is one every tier can load
        assert curve.load_keys(tmp_path / "check", role).role == role
    # Done: further passes change nothing.
    assert world.step("r1").reason == "Idle" and world.actions[-1] == "retire"


def test_idle_without_a_request_or_when_it_is_done(tmp_path: Path) -> None:
    world = World(tmp_path)
    for requested, record in [(None, {}), ("r1", {"completed": "r1"})]:
        world.record = record
        step = world.step(requested)
        assert (step.action, step.reason, step.status) == ("none", "Idle", "False")
    assert world.actions == []


def test_no_promotion_before_every_middle_admits_the_next_keys(tmp_path: Path) -> None:
    world = World(tmp_path)
    assert world.step("r1").action == "add_next"
    for _ in range(3):  # kubelet has not propagated: wait, never promote
        step = world.step("r1")
        assert (step.action, step.reason) == ("none", "WaitingForMiddleAdmission")
    world.propagate()
    obs = world.observe("r1")
    one_unreadable = Observation("r1", world.record, obs.secret,
                                 {"demo-middle-0": obs.middle["demo-middle-0"],
                                  "demo-middle-1": None}, 2, obs.workloads)
    assert rotation.decide(one_unreadable).action == "none"
    one_missing = Observation("r1", world.record, obs.secret,
                              {"demo-middle-0": obs.middle["demo-middle-0"]}, 2, obs.workloads)
    step = rotation.decide(one_missing)
    assert step.action == "none" and "1 pod(s) not running" in step.message
    assert world.step("r1").action == "promote"


def test_next_keys_written_but_not_recorded_are_adopted_not_regenerated(
        tmp_path: Path) -> None:
    world = World(tmp_path)
    world.step("r1")
    written = rotation.public_fingerprints(world.files, "next")
    world.record = {}  # the status patch of that pass was lost (operator restart)
    world.propagate()
    step = world.step("r1")
    # adopted, recorded, but not promoted in the pass that adopted them
    assert (step.action, step.record["keys"]) == ("none", written)
    assert world.step("r1").action == "promote"


def test_a_promotion_is_never_repeated_or_undone(tmp_path: Path) -> None:
    world = World(tmp_path)
    world.step("r1")
    world.propagate()
    world.step("r1")
    assert world.step("r1").action == "promote"
    new = rotation.public_fingerprints(world.files, "current")
    # Resumed after a restart with the recorded target: the old keys are "next" now, but
    # the Secret is not swapped back.
    for _ in range(3):
        step = world.step("r1")
        assert step.action != "promote"
    assert rotation.public_fingerprints(world.files, "current") == new
    # Without a recorded target (status lost) it is not swapped back either.
    world.record = {"active": "r1"}
    step = world.step("r1")
    assert step.action == "none" and rotation.public_fingerprints(world.files,
                                                                  "current") == new


def test_roll_waits_for_the_promoted_secret_and_retire_for_the_rollout(
        tmp_path: Path) -> None:
    world = World(tmp_path)
    world.step("r1")
    world.propagate()
    world.step("r1")
    world.step("r1")  # promote
    step = world.step("r1")
    assert (step.action, step.reason) == ("none", "WaitingForPropagation")
    world.propagate()
    step = world.step("r1")
    assert step.action == "roll" and step.tiers == ("ingest", "relay", "storage")
    for _ in range(2):  # the middle waits for ingest's rollout
        step = world.step("r1")
        assert (step.action, step.reason) == ("none", "RollingOut")
        assert "waiting for ingest" in step.message
    world.workloads["ingest"] = _workload("ingest", "r1", True)
    step = world.step("r1")
    assert step.action == "roll" and step.tiers == ("middle",)
    # workloads rolled, but one middle still runs the old key (stale mount): no retire
    for tier in KINDS:
        world.workloads[tier] = _workload(tier, "r1", True)
    step = world.step("r1")
    assert step.action == "none" and "middle pod demo-middle-0" in step.message
    world.finish_rollout()
    assert world.step("r1").action == "retire"


def test_one_rotation_at_a_time(tmp_path: Path) -> None:
    world = World(tmp_path)
    world.step("r1")
    step = world.step("r2")  # requested again while r1 runs
    assert step.record["active"] == "r1" and "'r2' starts after this one" in step.message
    done = _run(world, "r2")
    assert done.record["completed"] == "r1" and world.actions.count("add_next") == 1
    first = rotation.public_fingerprints(world.files, "current")
    world.actions.clear()
    done = _run(world, "r2")
    assert done.record["completed"] == "r2"
    assert world.actions == ["add_next", "promote", "roll", "roll", "retire"]
    assert rotation.public_fingerprints(world.files, "current") != first


def test_a_missing_or_incomplete_secret_changes_nothing(tmp_path: Path) -> None:
    world = World(tmp_path)
    step = rotation.decide(Observation("r1", {}, None))
    assert (step.action, step.reason) == ("none", "WaitingForSecret")
    partial = {k: v for k, v in world.files.items() if not k.startswith("relay.")}
    step = rotation.decide(Observation("r1", {}, partial))
    assert (step.action, step.reason) == ("none", "SecretIncomplete") and "relay" in step.message


def test_parse_middle_and_fingerprints_match_the_tier() -> None:
    public = b"rq:rM>}U?@Lns47E1%kR.o@n%FcmmsL/@{H8]yf7"
    fp = curve.fingerprint(public)
    assert rotation.fingerprint(public) == fp and len(fp) == 16
    text = (f'iotpipe_middle_curve_admitted_key{{socket="router",fingerprint="{fp}"}} 1.0\n'
            f'iotpipe_middle_curve_own_key{{fingerprint="aa"}} 1.0\n'
            f'iotpipe_middle_curve_disk_key{{fingerprint="bb"}} 1.0\n')
    keys = rotation.parse_middle(text)
    assert keys == MiddleKeys({"router": frozenset({fp})}, "aa", "bb")
    assert rotation.parse_middle("iotpipe_middle_log_tail_seq 3\n") is None  # no CURVE
    assert rotation.parse_middle("not { prometheus") is None


@pytest.mark.parametrize(("change", "expected"), [
    ({}, True),
    ({"annotation": "old"}, False),
    ({"observedGeneration": 1}, False),
    ({"readyReplicas": 1}, False),
    ({"replicas": 3}, False),  # an old pod still terminating
    ({"currentRevision": "old"}, False),
])
def test_rolled_out(change: dict[str, Any], expected: bool) -> None:
    workload = _workload("ingest", change.pop("annotation", "r1"), True)
    workload["status"].update(change)
    assert rotation.rolled_out(workload, "r1") is expected
    assert rotation.rolled_out(None, "r1") is False
