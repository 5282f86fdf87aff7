"""The scheduler as plain Python: budgets, chunking, preemption, stops."""

from __future__ import annotations

import pytest

from shardline.engine.kv_cache import KVCacheManager
from shardline.engine.request import Request, RequestStatus
from shardline.engine.scheduler import Scheduler, SchedulerConfig


def make_scheduler(num_blocks=16, block_size=4, **budgets) -> Scheduler:
    return Scheduler(SchedulerConfig(**budgets), KVCacheManager(num_blocks, block_size))


def req(rid: str, n_prompt: int, max_tokens: int = 4, first: int = 0, **kw) -> Request:
    return Request(rid, list(range(first, first + n_prompt)), max_tokens=max_tokens, **kw)


def step(s: Scheduler, token: int = 7):
    out = s.schedule()
    s.update_from_output(out, [token if x.sample else None for x in out.scheduled])
    return out


def test_decodes_first_then_new_prefills():
    s = make_scheduler()
    s.add_request(req("a", 5))
    out = step(s)
    assert [(x.request.request_id, x.num_new_tokens, x.sample) for x in out.scheduled] == [("a", 5, True)]
    s.add_request(req("b", 3))
    out = step(s)
    assert [(x.request.request_id, x.start_pos, x.num_new_tokens) for x in out.scheduled] == [("a", 5, 1), ("b", 0, 3)]


def test_token_budget_chunks_prefill():
    s = make_scheduler(max_num_batched_tokens=4, max_model_len=64)
    s.add_request(req("a", 10))
    chunks = []
    while True:
        out = step(s)
        x = out.scheduled[0]
        chunks.append((x.start_pos, x.num_new_tokens, x.sample))
        if x.sample:
            break
    assert chunks == [(0, 4, False), (4, 4, False), (8, 2, True)]
    assert s.requests["a"].output_token_ids == [7]


def test_max_num_seqs_caps_the_batch():
    s = make_scheduler(max_num_seqs=2)
    for i in range(3):
        s.add_request(req(f"r{i}", 2))
    out = step(s)
    assert [x.request.request_id for x in out.scheduled] == ["r0", "r1"]
    assert [r.request_id for r in s.waiting] == ["r2"]


def test_preempts_newest_when_blocks_run_out():
    s = make_scheduler(num_blocks=4, block_size=2, max_model_len=64)
    s.add_request(req("old", 4, max_tokens=10))
    s.add_request(req("new", 4, max_tokens=10, first=100))
    step(s)  # both prefilled: 2 blocks each, pool now empty
    assert s.kv.pool.num_free_blocks == 0
    out = step(s)  # "old" needs a third block: "new" is preempted
    assert out.preempted_ids == ["new"]
    assert [x.request.request_id for x in out.scheduled] == ["old"]
    new = s.waiting[0]
    assert new.request_id == "new" and new.status == RequestStatus.PREEMPTED and new.num_computed_tokens == 0
    assert new.output_token_ids == [7]  # kept: recomputed, not resampled


def test_lone_request_that_outgrows_the_pool_finishes_with_length():
    s = make_scheduler(num_blocks=2, block_size=2, max_model_len=64)
    s.add_request(req("a", 3, max_tokens=50))
    for _ in range(5):
        step(s)
    assert not s.has_unfinished()
    [done] = s.take_finished()
    assert done.status == RequestStatus.FINISHED_LENGTH
    assert done.num_tokens == 5  # filled both blocks: 4 slots, the 5th token had no room
    assert s.kv.pool.num_free_blocks == 2


def test_check_fits_refuses_what_can_never_run():
    s = make_scheduler(num_blocks=4, block_size=4, max_model_len=32)
    assert s.check_fits(10) is None
    assert "context" in s.check_fits(32)
    assert "whole cache" in s.check_fits(16)


def test_stop_token_respects_min_tokens_and_max_tokens():
    s = make_scheduler()
    s.add_request(req("a", 2, max_tokens=5, stop_token_ids=frozenset({7}), min_tokens=2))
    step(s)  # first token is 7 but min_tokens=2
    assert s.requests["a"].num_output_tokens == 1
    step(s)
    assert "a" not in s.requests
    [done] = s.take_finished()
    assert done.status == RequestStatus.FINISHED_STOPPED and done.stop_reason == 7
    s.add_request(req("b", 2, max_tokens=3))
    for _ in range(3):
        step(s)
    [done] = s.take_finished()
    assert done.status == RequestStatus.FINISHED_LENGTH and done.num_output_tokens == 3


def test_abort_frees_blocks_wherever_the_request_is():
    s = make_scheduler(num_blocks=8, block_size=4, max_num_seqs=1)
    s.add_request(req("running", 6))
    s.add_request(req("waiting", 6))
    step(s)
    assert s.kv.pool.num_free_blocks == 6
    s.finish_requests(["running", "waiting"], RequestStatus.FINISHED_ABORTED)
    assert s.kv.pool.num_free_blocks == 8
    assert not s.has_unfinished()
    assert {r.request_id for r in s.take_finished()} == {"running", "waiting"}


def test_prefix_hit_is_reported_once():
    s = make_scheduler(num_blocks=16, block_size=4)
    s.add_request(req("a", 9, max_tokens=1))
    step(s)
    s.add_request(req("b", 9, max_tokens=1))
    out = s.schedule()
    x = out.scheduled[0]
    assert (x.start_pos, x.num_new_tokens) == (8, 1)
    assert s.requests["b"].num_cached_tokens == 8


def test_without_chunked_prefill_budget_must_cover_context():
    with pytest.raises(ValueError):
        SchedulerConfig(max_num_batched_tokens=16, max_model_len=64, enable_chunked_prefill=False)
