"""Ray Serve's request-router extension point running our policies (policy.py).

Why this hook: Ray Serve calls `choose_replicas` inside the `DeploymentHandle` (here: in the ingress
process) for every request, with the live replica set and each replica's `routing_stats` - what
`EngineReplica.record_routing_stats` reported at the last poll by the Serve controller. So replica choice
reads fresh-enough load without a round trip per request, and Ray Serve keeps doing what it does well:
tracking replicas as they die and restart, back-off, cancellation. We return the policy's pick as the
only rank.

Ray pickles this module by value into the handle, so it keeps no state of its own at module level: the
Book it shares with the ingress lives in book.py.
"""

from __future__ import annotations

from typing import Any, List, Optional

from ray.serve.request_router import PendingRequest, ReplicaID, ReplicaResult, RequestRouter, RunningReplica

from fastserve_cli.serve.cluster.book import book_for
from fastserve_cli.serve.cluster.policy import make_policy


class FastServeRouter(RequestRouter):
    def initialize_state(
        self, policy: str = "least-loaded", app: str = "fastserve", seed: int | None = None, **kwargs: Any
    ) -> None:
        self.policy = make_policy(policy, seed)
        self.book = book_for(app, policy)
        self._decisions: dict[str, str] = {}

    def update_replicas(self, replicas: List[RunningReplica]) -> None:
        super().update_replicas(replicas)
        self.book.set_replicas((r.replica_id.unique_id, r.routing_stats) for r in replicas)

    def on_replica_actor_died(self, replica_id: ReplicaID) -> None:
        super().on_replica_actor_died(replica_id)
        self.book.set_replicas((r.replica_id.unique_id, r.routing_stats) for r in self.curr_replicas.values())

    async def choose_replicas(
        self, candidate_replicas: List[RunningReplica], pending_request: Optional[PendingRequest] = None
    ) -> List[List[RunningReplica]]:
        if not candidate_replicas:
            return []
        by_id = {r.replica_id.unique_id: r for r in candidate_replicas}
        payload = _payload(pending_request)
        choice = self.policy.choose(self.book.loads(by_id), payload.get("prefix"))
        if "rid" in payload:
            self._decisions[payload["rid"]] = (choice.replica_id, choice.decision)
        # Only the pick: if Ray finds it unavailable (its queue-length probe timed out, or it is at
        # max_ongoing_requests) Ray backs off and asks again, and the policy decides again with fresh data.
        return [[by_id[choice.replica_id]]]

    def on_request_routed(self, pending_request: PendingRequest, replica_id: ReplicaID, result: ReplicaResult) -> None:
        rid = _payload(pending_request).get("rid")
        if rid is not None:
            chosen, decision = self._decisions.pop(rid, (None, "fallback"))
            replica = replica_id.unique_id
            self.book.on_routed(rid, replica, decision if replica == chosen else "fallback")


def _payload(pending_request: Optional[PendingRequest]) -> dict[str, Any]:
    if pending_request is None or not pending_request.args or not isinstance(pending_request.args[0], dict):
        return {}
    return pending_request.args[0]
