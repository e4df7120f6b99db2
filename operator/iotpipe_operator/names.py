"""Every child name of a pipeline, built and parsed in one place.

The builders, the drain logic, the deletion logic and the status all take names from
:class:`Names`, so a name that is built one way is never parsed another way.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

QUEUE_CLAIM = "queue"  # the volumeClaimTemplate's name in every tier's StatefulSet


@dataclass(frozen=True)
class Names:
    pipeline: str

    def workload(self, tier: str) -> str:
        return f"{self.pipeline}-{tier}"

    def config(self, tier: str) -> str:
        return f"{self.pipeline}-{tier}-config"

    def endpoints(self) -> str:
        return f"{self.pipeline}-endpoints"

    def curve_secret(self) -> str:
        """The CurveZMQ keys (created once by the operator, never overwritten)."""
        return f"{self.pipeline}-curve"

    def deny_list(self) -> str:
        """The deny list ConfigMap (created empty once; users edit it)."""
        return f"{self.pipeline}-deny-list"

    def pod(self, tier: str, ordinal: int) -> str:
        return f"{self.workload(tier)}-{ordinal}"

    def pvc(self, tier: str, ordinal: int) -> str:
        """The PVC the StatefulSet controller creates from the volumeClaimTemplate."""
        return f"{QUEUE_CLAIM}-{self.pod(tier, ordinal)}"

    def drain_job(self, ordinal: int) -> str:
        return f"{self.pipeline}-ingest-drain-{ordinal}"

    def _ordinal(self, pattern: str, name: str) -> int | None:
        match = re.fullmatch(pattern, name)
        return int(match.group(1)) if match else None

    def pod_ordinal(self, tier: str, name: str) -> int | None:
        return self._ordinal(rf"{re.escape(self.workload(tier))}-(\d+)", name)

    def pvc_ordinal(self, tier: str, name: str) -> int | None:
        return self._ordinal(rf"{QUEUE_CLAIM}-{re.escape(self.workload(tier))}-(\d+)", name)

    def drain_job_ordinal(self, name: str) -> int | None:
        return self._ordinal(rf"{re.escape(self.pipeline)}-ingest-drain-(\d+)", name)
