"""Skip-join MLFQ on the simulated executor: exact schedules in abstract time units (no model, no clock)."""

from __future__ import annotations

import logging
import math

import pytest

from fastserve_cli.core.errors import UserError
from fastserve_cli.core.stats import percentile
from fastserve_cli.serve.mlfq import OracleSRPT, SkipJoinMLFQ
from fastserve_cli.serve.profile import PrefillProfile, load_cached, measure_profile
from fastserve_cli.serve.scheduler import FCFSScheduler, make_scheduler
from fastserve_cli.serve.simulate import (
    LinearCost,
    SimRequest,
    make_trace,
    mean_service_time,
    sim_records,
    simulate,
    summarize,
)

UNIT = LinearCost(t0=0.0, td=1.0, tp=1.0)  # one unit per decode step, one unit per prompt token
NO_STARVATION = math.inf


def three_jobs() -> list[SimRequest]:
    """The notes' example: J1 prefill 3 units + 2 tokens, J2 prefill 1 + 3 tokens, J3 prefill 1 + 2 tokens."""
    return [SimRequest("J1", 0.0, 3, 2), SimRequest("J2", 0.0, 1, 3), SimRequest("J3", 0.0, 1, 2)]


def mlfq(skip_join: bool = True, starvation_s: float = NO_STARVATION, **kw) -> SkipJoinMLFQ:
    return SkipJoinMLFQ(1.0, UNIT.prefill_s, starvation_s=starvation_s, skip_join=skip_join, **kw)


def jcts(trace: list[SimRequest]) -> dict[str, float]:
    return {r.request_id: r.finish_time - r.arrival_time for r in trace}


@pytest.mark.parametrize(
    ("make", "mean", "individual"),
    [
        (FCFSScheduler, 20 / 3, {"J1": 4, "J2": 7, "J3": 9}),
        (lambda: mlfq(skip_join=False), 23 / 3, {"J1": 6, "J2": 8, "J3": 9}),
        (mlfq, 6.0, {"J1": 9, "J2": 4, "J3": 5}),
        (lambda: OracleSRPT(1.0, UNIT.prefill_s), 16 / 3, {"J1": 9, "J2": 5, "J3": 2}),
    ],
    ids=["fcfs", "naive-mlfq", "skip-join", "srpt"],
)
def test_three_job_example(make, mean, individual):
    trace = three_jobs()
    simulate(make(), trace, max_batch_size=1, cost=UNIT)
    assert jcts(trace) == individual
    assert round(sum(individual.values()) / 3, 2) == round(mean, 2)


def test_skip_join_level_is_first_quantum_covering_the_prefill():
    scheduler = mlfq()
    assert [scheduler.join_level(n) for n in (1, 2, 3, 4, 5, 8, 9)] == [0, 1, 2, 2, 3, 3, 4]
    assert [mlfq(skip_join=False).join_level(n) for n in (1, 9)] == [0, 0]
    trace = three_jobs()
    simulate(scheduler, trace, max_batch_size=1, cost=UNIT)
    assert [h[:3] for h in trace[0].sched_state.history][0] == (0.0, 2, "join")


def test_late_short_request_preempts_long_one_at_next_iteration_boundary():
    long_job, short = SimRequest("long", 0.0, 1, 20), SimRequest("short", 5.5, 1, 2)
    scheduler = mlfq()
    timeline = simulate(scheduler, [long_job, short], max_batch_size=1, cost=UNIT)
    # The iteration in flight at 5.5 finishes; the short request runs from the next boundary, t=6.
    assert short.runs == [6.0, 7.0] and short.finish_time == 8.0
    assert [(it.start, it.request_ids) for it in timeline if it.start in (5.0, 6.0, 8.0)] == [
        (5.0, ["long"]),
        (6.0, ["short"]),
        (8.0, ["long"]),
    ]
    assert (6.0, 2, "preempt") in long_job.sched_state.history  # it was at level 2 (quantum 4)
    assert scheduler.stats.preemptions == 1 and long_job.finish_time == 22.0

    fcfs_long, fcfs_short = SimRequest("long", 0.0, 1, 20), SimRequest("short", 5.5, 1, 2)
    simulate(FCFSScheduler(), [fcfs_long, fcfs_short], max_batch_size=1, cost=UNIT)
    assert fcfs_short.runs[0] == 20.0  # FCFS: head-of-line blocked behind the long job


def test_never_preempts_inside_a_prefill():
    long_prefill, short = SimRequest("long", 0.0, 8, 3), SimRequest("short", 2.0, 1, 1)
    timeline = simulate(mlfq(), [long_prefill, short], max_batch_size=1, cost=UNIT)
    assert (timeline[0].start, timeline[0].end, timeline[0].request_ids) == (0.0, 8.0, ["long"])
    assert short.runs == [8.0]
    assert long_prefill.sched_state is not None and long_prefill.runs == [0.0, 9.0, 10.0]


def short_stream(start: float, end: float, every: float) -> list[SimRequest]:
    n = int((end - start) / every)
    return [SimRequest(f"s{i}", start + i * every, 1, 2) for i in range(n)]


def largest_gap(req: SimRequest) -> float:
    return max(b - a for a, b in zip(req.runs, req.runs[1:]))


def test_starvation_promotion_bounds_the_wait_of_a_long_request():
    """Short requests arriving back to back keep the top queues busy; only promotion lets the long one run."""

    def run(starvation_s: float) -> tuple[SimRequest, SkipJoinMLFQ]:
        long_job = SimRequest("long", 0.0, 1, 60)
        scheduler = mlfq(starvation_s=starvation_s)
        simulate(scheduler, [long_job, *short_stream(10.0, 210.0, 2.0)], max_batch_size=1, cost=UNIT)
        return long_job, scheduler

    starved, _ = run(NO_STARVATION)
    assert largest_gap(starved) >= 190  # waits for the whole stream
    promoted, scheduler = run(10.0)
    assert largest_gap(promoted) <= 10.0 + 2.0  # threshold + the iteration in flight + its own
    assert scheduler.stats.promotions >= 10
    assert sum(1 for _, level, why in promoted.sched_state.history if why == "promote" and level == 0) >= 10
    # It keeps making progress during the stream instead of waiting it out (same finish: the server is busy).
    assert sum(1 for t in promoted.runs if 10 < t < 210) >= 10 > sum(1 for t in starved.runs if 10 < t < 210)


def test_started_but_unfinished_requests_are_capped():
    def max_started(scheduler) -> int:
        trace = [SimRequest(f"r{i}", 0.0, 1, 30) for i in range(5)]
        simulate(scheduler, trace, max_batch_size=1, cost=UNIT)
        events = sorted([(r.runs[0], 1) for r in trace] + [(r.finish_time, -1) for r in trace])
        level = peak = 0
        for _, delta in events:
            level += delta
            peak = max(peak, level)
        return peak

    assert max_started(mlfq(max_started=2)) == 2
    assert max_started(mlfq()) == 4  # default cap 4 x batch size
    assert max_started(mlfq(max_started=10)) == 5  # MLFQ round-robins down the levels: everyone starts


def test_batch_in_strict_priority_order_under_token_budget():
    scheduler = mlfq()
    reqs = [SimRequest("a", 0.0, 1, 5), SimRequest("b", 0.0, 6, 5), SimRequest("c", 0.0, 1, 5)]
    for req in reqs:
        scheduler.add(req, 0.0)
    # a and c join level 0, b (prefill 6 > 4) joins level 3: order a, c, b.
    assert [r.request_id for r in scheduler.schedule(0.0, 8, 100)] == ["a", "c", "b"]
    assert [r.request_id for r in scheduler.schedule(0.0, 2, 100)] == ["a", "c"]
    # Budget 7: a (1) + c (1) fit, b (6) does not fit the remaining 5 and nothing behind it may jump it.
    assert [r.request_id for r in scheduler.schedule(0.0, 8, 7)] == ["a", "c"]
    # A lone prefill longer than the whole budget still runs, alone.
    lone = mlfq()
    lone.add(SimRequest("big", 0.0, 50, 2), 0.0)
    assert [r.request_id for r in lone.schedule(0.0, 8, 16)] == ["big"]


def test_priority_order_follows_estimated_next_scheduled_time():
    scheduler = mlfq(starvation_s=10.0)
    a, b, c = SimRequest("a", 0.0, 1, 50), SimRequest("b", 0.0, 4, 50), SimRequest("c", 5.0, 2, 50)
    scheduler.add(a, 0.0)
    scheduler.add(b, 0.0)  # level 2
    scheduler.add(c, 5.0)  # level 1
    assert [r.request_id for r in scheduler.requests()] == ["a", "c", "b"]
    scheduler.schedule(6.0, 1, 100)
    # a runs next; c is one quantum behind a; b waits for a and c to sink (5 units), promotion is 4 away.
    assert scheduler.enst(6.0) == {id(a): 0.0, id(c): 1.0, id(b): 4.0}
    assert [r.request_id for r in scheduler.priority_order()] == ["a", "c", "b"]
    scheduler.schedule(9.5, 1, 100)  # b is 0.5 from promotion: it will run before c, so reload it first
    assert [r.request_id for r in scheduler.priority_order()] == ["a", "b", "c"]


def test_enst_matches_its_definition_on_a_random_state():
    import random

    rng = random.Random(3)
    scheduler = mlfq(starvation_s=50.0)
    reqs = [SimRequest(f"r{i}", 0.0, rng.randint(1, 40), 100) for i in range(30)]
    for i, req in enumerate(reqs):
        scheduler.add(req, float(i))
        req.sched_state.service_s = rng.random() * scheduler.quantum(req.sched_state.level)
    scheduler.schedule(40.0, 4, 10_000)
    ordered, enst = scheduler.requests(), scheduler.enst(40.0)
    for index, req in enumerate(ordered[4:], start=4):
        level = req.sched_state.level
        ahead = sum(
            scheduler.quantum(o.sched_state.level)
            - o.sched_state.service_s
            + sum(scheduler.quantum(x) for x in range(o.sched_state.level + 1, level))
            for o in ordered[:index]
        )
        t_promote = 50.0 - (40.0 - req.sched_state.last_run)
        assert enst[id(req)] == pytest.approx(min(ahead / 4, t_promote) if level else ahead / 4)


def test_level_history_in_debug_log(caplog):
    caplog.set_level(logging.DEBUG, logger="fastserve.serve.mlfq")
    simulate(mlfq(), three_jobs(), max_batch_size=1, cost=UNIT)
    line = next(rec.getMessage() for rec in caplog.records if "J1" in rec.getMessage())
    assert "join:L2@0.000" in line and "preempt" in line and "J1 done" in line


def test_registered_and_built_from_a_profile(tmp_path):
    profile = measure_profile(
        prefill=lambda n: sum(range(n * 200)),
        decode=lambda b: sum(range(b * 200)),
        max_len=256,
        batch_size=4,
        key={"model": "m"},
        repeats=2,
    )
    assert profile.lengths == [1, 8, 32, 64, 128, 256] and profile.prefill_times == sorted(profile.prefill_times)
    path = tmp_path / "serve_profile.json"
    profile.save(path)
    assert load_cached(path, {"model": "m", "batch_size": 4}) is not None
    assert load_cached(path, {"model": "other", "batch_size": 4}) is None
    scheduler = make_scheduler(
        "skip-join-mlfq", profile_path=path, starvation_s=3.0, base_quantum_s=None, max_batch_size=4, token_budget=2048
    )
    assert scheduler.base_quantum_s == profile.decode_s
    assert scheduler.join_level(1) == 0 and scheduler.join_level(256) >= scheduler.join_level(8)
    reloaded = PrefillProfile.load(path)
    assert reloaded.prefill_s(200) == pytest.approx(profile.prefill_s(200))
    override = make_scheduler("skip-join-mlfq", profile_path=path, base_quantum_s=0.5)
    assert override.base_quantum_s == 0.5
    with pytest.raises(UserError, match="serve.base_quantum_s"):
        make_scheduler("skip-join-mlfq", profile_path=tmp_path / "missing.json", base_quantum_s=None)


def test_heavy_tailed_load_skip_join_beats_fcfs_and_approaches_srpt():
    """A queueing study in simulation: B=8, Poisson arrivals at 90% of capacity, 85%/15% short/long outputs."""
    cost = LinearCost(t0=20.0, td=2.0, tp=0.2)  # the notes' calibration form, in ms
    base = make_trace(seed=1, num_requests=400, rate=1.0)
    rate = 0.9 / mean_service_time(base, cost, 8)

    def run(make) -> dict[str, float]:
        trace = make_trace(seed=1, num_requests=400, rate=rate)
        simulate(make(), trace, max_batch_size=8, token_budget=2048, cost=cost)
        return summarize(sim_records(trace))

    quantum = cost.t0 + 8 * cost.td
    fcfs = run(FCFSScheduler)
    sj = run(lambda: SkipJoinMLFQ(quantum, cost.prefill_s, starvation_s=3000.0))
    srpt = run(lambda: OracleSRPT(quantum, cost.prefill_s))
    assert fcfs["mean_per_token_latency"] / sj["mean_per_token_latency"] >= 1.5
    assert fcfs["mean_jct"] > sj["mean_jct"] > srpt["mean_jct"]
    assert srpt["mean_per_token_latency"] <= sj["mean_per_token_latency"]


def test_last_level_runs_first_come_first_served():
    """Two 4-token jobs, batch 1: without a last level they alternate down the levels (processor sharing);
    in the last level the one that got there first keeps the front and runs to completion."""

    def run(num_levels):
        trace = [SimRequest("A", 0.0, 1, 4), SimRequest("B", 0.0, 1, 4)]
        scheduler = mlfq(num_levels=num_levels)
        simulate(scheduler, trace, max_batch_size=1, cost=UNIT)
        return jcts(trace), scheduler

    assert run(None)[0] == {"A": 7, "B": 8}
    finished, scheduler = run(2)
    assert finished == {"A": 5, "B": 8}
    assert scheduler.stats.demotions == 2 and len(scheduler.queues) == 2
    assert mlfq(num_levels=3).join_level(9) == 2  # skip-join never goes past the last level either
    with pytest.raises(UserError, match="mlfq_levels"):
        mlfq(num_levels=1)


def test_last_level_is_not_promoted_for_starvation():
    """A long job waits behind a stream of one-token jobs: in the last level it keeps its arrival-order place
    (no promotion, it resumes after the stream); one level above the last, it is promoted after
    `starvation_s` and runs in the middle of the stream."""

    def run(num_levels):
        trace = [SimRequest("A", 0.0, 1, 6)] + [SimRequest(f"S{i}", float(i), 1, 1) for i in range(1, 11)]
        scheduler = mlfq(starvation_s=4.0, num_levels=num_levels)
        simulate(scheduler, trace, max_batch_size=1, cost=UNIT)
        during_stream = [t for t in trace[0].runs if 1 <= t < 11]
        return during_stream, scheduler.stats.promotions

    assert run(2) == ([], 0)
    during_stream, promotions = run(3)
    assert promotions >= 1 and during_stream


def test_last_level_lowers_mean_and_tail_jct_under_heavy_tailed_load():
    """Without a last level, long requests share the machine by attained service and all finish late."""
    cost = LinearCost(t0=20.0, td=2.0, tp=0.2)
    base = make_trace(seed=1, num_requests=400, rate=1.0)
    rate = 0.9 / mean_service_time(base, cost, 8)

    def run(num_levels) -> dict[str, float]:
        trace = make_trace(seed=1, num_requests=400, rate=rate)
        scheduler = SkipJoinMLFQ(cost.t0 + 8 * cost.td, cost.prefill_s, starvation_s=3000.0, num_levels=num_levels)
        simulate(scheduler, trace, max_batch_size=8, token_budget=2048, cost=cost)
        return summarize(sim_records(trace))

    endless, bounded = run(None), run(8)
    assert bounded["mean_jct"] < 0.98 * endless["mean_jct"]
    assert bounded["p99_jct"] < endless["p99_jct"]
    assert bounded["mean_per_token_latency"] <= 1.02 * endless["mean_per_token_latency"]


def test_summary_metrics():
    stats = summarize([(0.0, 1.0, 4.0, 4), (1.0, 2.0, 3.0, 1)])
    assert stats["mean_jct"] == 3.0 and stats["mean_per_token_latency"] == 1.5 and stats["mean_ttft"] == 1.0
    assert stats["throughput_tokens"] == 5 / 4
    assert percentile([1, 2, 3, 4], 50) == 2.5
