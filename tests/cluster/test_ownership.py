"""Server-side apply while devices send: a Service the pipeline does not own is refused
(not adopted), and a field removed from the spec is removed from the live object."""

from __future__ import annotations

from support.cluster import LocalCluster, scenario
from support.cluster.cluster import SERVICES
from support.cluster.scenario import NAME

pytestmark = scenario.marks()

RELAY = f"{NAME}-relay"


async def test_foreign_service_is_refused_with_a_condition(cluster: LocalCluster) -> None:
    foreign = {"apiVersion": "v1", "kind": "Service",
               "metadata": {"name": RELAY, "labels": {"team": "someone-else"}},
               "spec": {"selector": {"app": "their-app"},
                        "ports": [{"name": "http", "port": 80, "targetPort": 8000}]}}
    await cluster.api.create(SERVICES, foreign)
    await scenario.start_pipeline(cluster, scenario.pipeline_manifest(replicas=2))
    async with scenario.devices(cluster) as running:
        fleet = running.fleet
        degraded = await cluster.wait(
            lambda: (c := cluster.condition(NAME, "Degraded")) and c["status"] == "True"
            and c["reason"] == "ForeignObject" and c, 30, "a ForeignObject condition")
        assert RELAY in degraded["message"], degraded
        # The rest of the pipeline runs: devices are acknowledged and stored.
        await cluster.wait(lambda: fleet.total_acked() >= 300, 30, "acks")
        await running.finish()
    live = cluster.api.get(SERVICES, RELAY) or {}
    assert not live["metadata"].get("ownerReferences"), "a foreign object is never adopted"
    assert live["spec"]["selector"] == {"app": "their-app"}
    assert live["metadata"]["labels"] == {"team": "someone-else"}
    await scenario.assert_every_ack_stored_once(cluster, fleet)


async def test_field_removed_from_the_spec_leaves_the_live_object(
        cluster: LocalCluster) -> None:
    ingest_service = {"annotations": {"example.com/lb": "internal",
                                      "example.com/keep": "yes"}}
    await scenario.start_pipeline(
        cluster, scenario.pipeline_manifest(replicas=2, service=ingest_service))

    def annotations() -> dict[str, str]:
        return dict(((cluster.api.get(SERVICES, f"{NAME}-ingest") or {}).get("metadata")
                     or {}).get("annotations") or {})

    assert annotations().get("example.com/lb") == "internal"
    async with scenario.devices(cluster) as running:
        fleet = running.fleet
        await cluster.wait(lambda: fleet.total_acked() >= 200, 30, "acks before the change")
        await cluster.patch_pipeline(NAME, {"ingest": {"service": {"annotations": {
            "example.com/lb": None}}}})
        await cluster.wait(lambda: "example.com/lb" not in annotations(), 30,
                           "the removed annotation gone from the live Service")
        assert annotations().get("example.com/keep") == "yes"
        after = fleet.total_acked()
        await cluster.wait(lambda: fleet.total_acked() >= after + 200, 30, "devices carry on")
        await running.finish()
    await scenario.assert_every_ack_stored_once(cluster, fleet)
    assert fleet.errors == {}, fleet.errors
