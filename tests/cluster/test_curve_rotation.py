"""The operator rotates the pipeline's CurveZMQ keys while devices send: every tier ends on
new keys, the old ones are retired, and every acknowledged message is stored exactly once."""

from __future__ import annotations

import base64
import time

from support.cluster import LocalCluster, scenario
from support.cluster.scenario import NAME

from iotpipe_operator.rotation import ROLES, public_fingerprints

pytestmark = scenario.marks(timeout=240)

SECRETS = "v1/secrets"


def _keys(cluster: LocalCluster, slot: str) -> dict[str, str]:
    secret = cluster.api.get(SECRETS, f"{NAME}-curve") or {}
    files = {k: base64.b64decode(v) for k, v in (secret.get("data") or {}).items()}
    return public_fingerprints(files, slot)


async def test_rotation_under_load_stores_every_ack_once(cluster: LocalCluster) -> None:
    await scenario.start_pipeline(cluster, scenario.pipeline_manifest(replicas=2))
    original = _keys(cluster, "current")
    assert set(original) == set(ROLES)
    async with scenario.devices(cluster) as running:
        fleet = running.fleet
        await cluster.wait(lambda: fleet.total_acked() >= 300, 30, "acks before the rotation")
        started, acked_before = time.monotonic(), fleet.total_acked()
        await cluster.patch_pipeline(NAME, {"security": {"curve": {"rotation": "r1"}}})
        await cluster.wait(lambda: (cluster.pipeline(NAME).get("status") or {})
                           .get("curveRotation", {}).get("completed") == "r1", 150,
                           "the rotation completes")
        # shown with -rP: how long the rotation took, and that devices were acked meanwhile
        print(f"rotation: {time.monotonic() - started:.1f} s, "
              f"{fleet.total_acked() - acked_before} acks during it")
        current = _keys(cluster, "current")
        assert all(current[r] != original[r] for r in ROLES), (original, current)
        assert _keys(cluster, "next") == {}
        # Every tier works on the new keys alone: acks keep coming after the retire.
        after = fleet.total_acked()
        await cluster.wait(lambda: fleet.total_acked() >= after + 300, 60,
                           "devices carry on with the new keys")
        await running.finish()
    condition = cluster.condition(NAME, "CurveKeysRotating")
    assert condition is not None and condition["reason"] in ("Completed", "Idle")
    await scenario.assert_every_ack_stored_once(cluster, fleet)
