"""Routing policies, the ingress's Book and the deployment options, without a Ray instance."""

from __future__ import annotations

from collections import Counter

import pytest

from fastserve_cli.serve.cluster.policy import (
    LeastLoaded,
    PrefixAffinity,
    ReplicaLoad,
    RoundRobin,
    all_full,
    make_policy,
    prefix_key,
)


def loads(*requests: int, max_queue: int = 256) -> list[ReplicaLoad]:
    return [ReplicaLoad(f"r{i}", waiting=n, max_queue=max_queue) for i, n in enumerate(requests)]


def test_round_robin_takes_turns_whatever_the_load():
    policy = RoundRobin()
    picks = [policy.choose(loads(0, 50, 3)).replica_id for _ in range(6)]
    assert picks == ["r0", "r1", "r2", "r0", "r1", "r2"]


def test_least_loaded_never_picks_the_heavier_of_its_two_samples():
    policy = LeastLoaded(seed=0)
    picks = Counter(policy.choose(loads(0, 9, 9)).replica_id for _ in range(300))
    assert picks["r0"] > 150  # r0 wins whenever it is sampled (2 of 3 pairs)
    two = Counter(policy.choose(loads(1, 7)).replica_id for _ in range(50))
    assert two == {"r0": 50}


def test_least_loaded_counts_its_own_inflight_between_reports():
    stale = [ReplicaLoad("a", inflight=6), ReplicaLoad("b", waiting=2)]
    assert LeastLoaded(seed=1).choose(stale).replica_id == "b"


def test_score_weighs_pending_prefills_top_mlfq_queues_and_kv_usage():
    assert ReplicaLoad("a", running=4).score() < ReplicaLoad("b", waiting=2).score()  # 2 prefills to come
    assert ReplicaLoad("a", running=3, inflight=5).pending == 2  # routed here since the last report
    assert ReplicaLoad("deep", running=4, top_queue=0).score() < ReplicaLoad("top", running=4, top_queue=3).score()
    assert ReplicaLoad("x", running=2, kv_usage=0.9).score() > ReplicaLoad("y", running=3).score()


def test_full_replicas_are_skipped_and_all_full_means_429():
    mixed = [ReplicaLoad("a", waiting=4, max_queue=4), ReplicaLoad("b", waiting=3, max_queue=4)]
    assert {LeastLoaded(seed=s).choose(mixed).replica_id for s in range(10)} == {"b"}
    assert not all_full(mixed)
    assert all_full([ReplicaLoad("a", waiting=4, max_queue=4), ReplicaLoad("b", inflight=9, running=2, max_queue=4)])


def test_prefix_affinity_sticks_until_the_home_replica_is_overloaded():
    ids = list(range(100))
    key = prefix_key(ids)
    assert key == prefix_key(ids[:32] + [7]) and prefix_key(ids[:10]) is None
    policy = PrefixAffinity(seed=0, slack=4)
    home = policy.choose(loads(0, 0, 0, 0), key)
    assert home.decision == "prefix_hit"
    assert {policy.choose(loads(0, 0, 0, 0), key).replica_id for _ in range(10)} == {home.replica_id}
    busy = loads(0, 0, 0, 0)
    next(r for r in busy if r.replica_id == home.replica_id).waiting = 6
    moved = policy.choose(busy, key)
    assert moved.decision == "prefix_overflow" and moved.replica_id != home.replica_id
    assert policy.choose(loads(0, 0), None).decision == "no_prefix"
    # Rendezvous hashing: keys spread over replicas, and removing one replica only moves its own keys.
    keys = [prefix_key([k] * 32) for k in range(200)]
    four = {k: policy.choose(loads(0, 0, 0, 0), k).replica_id for k in keys}
    assert len(set(four.values())) == 4
    three = {k: policy.choose(loads(0, 0, 0), k).replica_id for k in keys}
    assert all(three[k] == four[k] for k in keys if four[k] != "r3")


def test_unknown_router_name():
    with pytest.raises(ValueError, match="least-loaded"):
        make_policy("random")


def test_book_merges_replica_metrics_under_a_replica_label():
    from prometheus_client.parser import text_string_to_metric_families

    from fastserve_cli.serve.cluster.book import Book
    from fastserve_cli.serve.metrics import Metrics

    pages = {}
    for rid, tokens in (("a", 3), ("b", 5)):
        m = Metrics("tiny")
        m.generation_tokens.inc(tokens)
        m.time_to_first_token.observe(0.01)
        pages[rid] = {"waiting": 1, "running": 2, "metrics": m.render().decode()}
    book = Book("round-robin")
    book.set_replicas(pages.items())
    book.on_routed("q1", "a", "rr")
    families = {f.name: f for f in text_string_to_metric_families(book.render().decode())}
    tokens = {
        s.labels["replica"]: s.value
        for s in families["fastserve:generation_tokens"].samples
        if s.name.endswith("_total")
    }
    assert tokens == {"a": 3.0, "b": 5.0}
    routed = families["fastserve:router_requests"].samples[0]
    assert routed.labels == {"policy": "round-robin", "replica": "a", "decision": "rr"} and routed.value == 1
    assert families["fastserve:cluster_replicas_up"].samples[0].value == 2
    assert [r.inflight for r in book.loads()] == [1, 0]
    book.on_done("q1")
    assert [r.requests for r in book.loads()] == [3, 3]
    book.set_replicas([("b", None)])  # a died: its page and load leave with it
    assert [r["replica"] for r in book.replicas()] == ["b"]


def test_deployment_options_map_the_recipe(monkeypatch):
    pytest.importorskip("ray.serve")
    from fastserve_cli.core.errors import UserError
    from fastserve_cli.serve import serve_config
    from fastserve_cli.serve.cluster.deploy import deployment_options, replica_threads

    cfg = serve_config(None, ["serve.replicas=3", "serve.replica_cpus=2", "serve.router=prefix"], {})
    monkeypatch.delenv("OMP_WAIT_POLICY", raising=False)
    monkeypatch.delenv("GOMP_SPINCOUNT", raising=False)
    opts = deployment_options(cfg, "app")
    assert opts["num_replicas"] == 3 and opts["ray_actor_options"] == {"num_cpus": 2.0, "num_gpus": 0.0}
    monkeypatch.setenv("OMP_WAIT_POLICY", "PASSIVE")  # what `fastserve serve` sets: replicas get it too
    env = deployment_options(cfg, "app")["ray_actor_options"]["runtime_env"]
    assert env == {"env_vars": {"OMP_WAIT_POLICY": "PASSIVE"}}
    assert opts["request_router_config"].request_router_kwargs == {"policy": "prefix", "app": "app"}
    assert replica_threads(cfg) == 2
    auto = serve_config(
        None,
        [
            "serve.autoscaling.min_replicas=1",
            "serve.autoscaling.max_replicas=4",
            "serve.autoscaling.target_ongoing_requests=5",
        ],
        {},
    )
    scaling = deployment_options(auto, "app")["autoscaling_config"]
    assert scaling == {"min_replicas": 1, "max_replicas": 4, "initial_replicas": 1, "target_ongoing_requests": 5.0}
    with pytest.raises(UserError, match=r"serve\.replica_stream_interval"):
        serve_config(None, ["serve.replica_stream_interval=0"], {})
    with pytest.raises(UserError, match=r"serve\.ray_transport: .*'grpc' or 'object-ref'"):
        serve_config(None, ["serve.ray_transport=tcp"], {})
    bad = serve_config(None, ["serve.autoscaling.min_replicas=3", "serve.autoscaling.max_replicas=2"], {})
    with pytest.raises(UserError, match="max_replicas"):
        deployment_options(bad, "app")


def test_cluster_simulation_runs_every_request_and_routes_by_policy():
    from fastserve_cli.serve.cluster.sim import fit_cost, simulate_cluster, with_prefixes
    from fastserve_cli.serve.scheduler import make_scheduler
    from fastserve_cli.serve.simulate import LinearCost, make_trace, sim_records, summarize

    cost = fit_cost(0.003, 0.004, 8, (8, 0.002), (256, 0.05))
    assert cost == pytest.approx(LinearCost(t0=0.003 - 1 / 7000, td=1 / 7000, tp=0.048 / 248))

    def run(router: str):
        trace = make_trace(3, 400, 60.0)
        routed = simulate_cluster(trace, router, 4, lambda: make_scheduler("fcfs"), cost, 4, with_prefixes(trace, 3))
        assert all(r.finish_time is not None and r.num_generated == r.max_new_tokens for r in trace)
        return routed, summarize(sim_records(trace))

    rr, rr_summary = run("round-robin")
    assert sorted(rr.values()) == [100, 100, 100, 100]
    ll, ll_summary = run("least-loaded")
    assert sum(ll.values()) == 400 and ll_summary["mean_jct"] < rr_summary["mean_jct"]
    prefix, _ = run("prefix")
    assert sum(prefix.values()) == 400


def test_replica_gathers_queued_outputs_and_honours_the_stream_interval():
    import asyncio

    from fastserve_cli.serve.cluster.replica import next_item
    from fastserve_cli.serve.engine import StepOutput

    def step(token: int, **kw) -> StepOutput:
        return StepOutput(text=chr(96 + token), token_ids=[token], logprobs=[(token, -0.5, [])], **kw)

    async def scenario():
        queue: asyncio.Queue = asyncio.Queue()
        queue.put_nowait(step(1))
        first = await next_item(queue, interval=3, first=True)
        assert first.token_ids == [1]  # the first token goes alone, even with an interval
        for t in (2, 3):
            queue.put_nowait(step(t))
        assert (await next_item(queue, 1, first=False)).token_ids == [2, 3]  # what is queued goes together
        queue.put_nowait(step(4))
        later = asyncio.get_running_loop().call_later(0.05, queue.put_nowait, step(5))
        merged = await next_item(queue, interval=2, first=False)  # waits for the second token
        assert (merged.text, merged.token_ids, [lp[0] for lp in merged.logprobs]) == ("de", [4, 5], [4, 5])
        later.cancel()
        for out in (step(6), step(7, finished=True, finish_reason="stop"), step(9)):
            queue.put_nowait(out)
        last = await next_item(queue, interval=8, first=False)  # a finished output ends the wait
        assert (last.token_ids, last.finished, last.finish_reason, queue.qsize()) == ([6, 7], True, "stop", 1)

    asyncio.run(scenario())


def test_cluster_full_batch_floor_bounds_what_routing_can_gain():
    from fastserve_cli.serve.cluster.sim import full_batch_floor
    from fastserve_cli.serve.simulate import LinearCost, SimRequest

    cost = LinearCost(t0=0.001, td=0.0001, tp=0.00001)
    trace = [SimRequest(f"r{i}", 0.0, 100, 1 + i) for i in range(100)]  # outputs 1..100 tokens
    floor = full_batch_floor(trace, cost, 8)
    assert floor == pytest.approx(cost.prefill_s(100) + 99 * (0.001 + 8 * 0.0001))
