"""Batching policy and shared-memory slots, as units (the service tests cover them end to end)."""

from __future__ import annotations

import numpy as np
import pytest

from service.api.imaging import label_bytes
from service.errors import ServiceError
from service.worker.scheduler import BatchScheduler, Job
from service.worker.shm import SlotMaps, SlotPool


def job(i, model="m", shape=(4, 4), arrival=0.0, deadline=None, incoming=0, priority=1):
    return Job(i, model, f"slot{i}", shape[0], shape[1], deadline, arrival, incoming=incoming, priority=priority)


def test_full_batch_runs_at_once_and_is_capped():
    s = BatchScheduler(max_batch=3, max_delay=1.0, default_budget=0.1)
    for i in range(5):
        s.add(job(i))
    batch, _ = s.next_batch(now=0.0)
    assert [j.id for j in batch] == [0, 1, 2]
    batch, wait = s.next_batch(now=0.0)
    assert batch is None and wait == pytest.approx(1.0)  # two left: wait for more, up to max_delay
    batch, _ = s.next_batch(now=1.0)
    assert [j.id for j in batch] == [3, 4]


def test_only_same_model_and_shape_share_a_batch():
    s = BatchScheduler(max_batch=8, max_delay=0.0, default_budget=0.1)
    s.add(job(1, "a", (4, 4)))
    s.add(job(2, "a", (8, 8)))
    s.add(job(3, "b", (4, 4)))
    s.add(job(4, "a", (4, 4)))
    seen = []
    while len(s):
        batch, _ = s.next_batch(now=0.0)
        assert len({j.key for j in batch}) == 1
        seen.append(sorted(j.id for j in batch))
    assert sorted(seen) == [[1, 4], [2], [3]]


def test_earliest_deadline_first():
    s = BatchScheduler(max_batch=1, max_delay=0.0, default_budget=10.0)
    s.add(job(1, arrival=0.0))  # urgency 10.0 (arrival + budget)
    s.add(job(2, shape=(8, 8), arrival=0.5, deadline=2.0))
    s.add(job(3, shape=(2, 2), arrival=0.6, deadline=1.0))
    order = [s.next_batch(now=0.7)[0][0].id for _ in range(3)]
    assert order == [3, 2, 1]


def test_priority_comes_before_urgency():
    """A priority-1 request runs before priority-2 requests that arrived earlier or whose deadline
    is nearer; within a priority, earliest deadline first."""
    s = BatchScheduler(max_batch=1, max_delay=0.0, default_budget=10.0)
    s.add(job(1, arrival=0.0, deadline=1.0, priority=2))
    s.add(job(2, shape=(8, 8), arrival=0.1, priority=2))  # urgency 10.1
    s.add(job(3, shape=(2, 2), arrival=0.2, priority=1))  # urgency 10.2
    s.add(job(4, shape=(6, 6), arrival=0.3, deadline=5.0, priority=1))
    order = [s.next_batch(now=0.4)[0][0].id for _ in range(4)]
    assert order == [4, 3, 1, 2]


def test_shared_priority_batches_let_lower_priorities_fill_the_room_left():
    s = BatchScheduler(max_batch=3, max_delay=0.0, default_budget=10.0, priority_batches="shared")
    for i in range(3):
        s.add(job(i, arrival=0.1 * i, priority=2))
    s.add(job(9, arrival=1.0, priority=1))
    batch, _ = s.next_batch(now=1.0)
    assert [j.id for j in batch] == [9, 0, 1]
    assert [j.id for j in s.next_batch(now=1.0)[0]] == [2]


def test_separate_priority_batches_never_mix_priorities():
    s = BatchScheduler(max_batch=3, max_delay=0.0, default_budget=10.0, priority_batches="separate")
    for i in range(3):
        s.add(job(i, arrival=0.1 * i, priority=2))
    s.add(job(9, arrival=1.0, priority=1))
    assert [j.id for j in s.next_batch(now=1.0)[0]] == [9]  # alone: the priority-2 requests wait
    assert [j.id for j in s.next_batch(now=1.0)[0]] == [0, 1, 2]
    with pytest.raises(ValueError, match="separate, shared"):
        BatchScheduler(max_batch=3, max_delay=0.0, default_budget=1.0, priority_batches="mixed")


def test_a_due_group_of_lower_priority_runs_while_a_higher_one_waits_to_fill():
    """Priority orders what is due; it does not make the worker idle."""
    s = BatchScheduler(max_batch=4, max_delay=1.0, default_budget=10.0)
    s.add(job(1, shape=(4, 4), arrival=0.0, priority=2))
    s.add(job(2, shape=(8, 8), arrival=0.9, priority=1))
    batch, _ = s.next_batch(now=1.0)  # the first is due (waited max_delay), the second is not
    assert [j.id for j in batch] == [1]


def test_deadline_cuts_the_batching_delay():
    s = BatchScheduler(max_batch=8, max_delay=0.5, default_budget=10.0)
    s.add(job(1, arrival=0.0, deadline=0.3))
    batch, wait = s.next_batch(now=0.0)
    assert batch is not None  # waiting max_delay would miss the deadline


def test_expired_jobs_are_returned_not_batched():
    s = BatchScheduler(max_batch=4, max_delay=0.0, default_budget=0.1)
    s.add(job(1, deadline=1.0))
    s.add(job(2, deadline=5.0))
    assert [j.id for j in s.expire(now=2.0)] == [1]
    batch, _ = s.next_batch(now=2.0)
    assert [j.id for j in batch] == [2]


def test_cancel_removes_a_queued_job():
    s = BatchScheduler(max_batch=4, max_delay=0.0, default_budget=0.1)
    s.add(job(1))
    s.add(job(2))
    assert s.cancel(1).id == 1 and s.cancel(1) is None
    batch, _ = s.next_batch(now=0.0)
    assert [j.id for j in batch] == [2] and len(s) == 0


def test_idle_scheduler_waits_for_work():
    assert BatchScheduler(4, 0.01, 0.1).next_batch(now=0.0) == (None, None)


def test_adaptive_waits_only_while_requests_are_on_their_way():
    s = BatchScheduler(max_batch=4, max_delay=1.0, default_budget=10.0, policy="adaptive")
    s.add(job(1, arrival=0.0, incoming=2))  # two more were being decoded when it was sent
    batch, wait = s.next_batch(now=0.0)
    assert batch is None and wait == pytest.approx(1.0)  # they may join: wait, up to max_delay
    s.add(job(2, arrival=0.1, incoming=1))
    assert s.next_batch(now=0.1)[0] is None
    s.add(job(3, arrival=0.2, incoming=0))  # the last one known: nothing else can join now
    batch, _ = s.next_batch(now=0.2)
    assert [j.id for j in batch] == [1, 2, 3]
    s.add(job(4, arrival=0.3))  # a lone request with nothing on its way runs at once
    batch, _ = s.next_batch(now=0.3)
    assert [j.id for j in batch] == [4]
    s.add(job(5, arrival=0.4, incoming=7))  # one whose company never comes waits max_delay, no longer
    assert s.next_batch(now=1.39)[0] is None
    assert [j.id for j in s.next_batch(now=1.4)[0]] == [5]


def test_wait_ignores_what_is_on_its_way():
    s = BatchScheduler(max_batch=4, max_delay=1.0, default_budget=10.0, policy="wait")
    s.add(job(1, arrival=0.0, incoming=0))
    batch, wait = s.next_batch(now=0.0)
    assert batch is None and wait == pytest.approx(1.0)


def test_slot_pool_reuses_by_size_and_respects_budget():
    forgotten = []
    pool = SlotPool(budget_bytes=4 << 20, on_forget=forgotten.append)
    try:
        a = pool.acquire(1 << 20)
        pool.release(a)
        assert pool.acquire(1 << 20) is a  # same size: reused
        b = pool.acquire(2 << 20)
        with pytest.raises(ServiceError) as err:
            pool.acquire(2 << 20)  # 1 + 2 + 2 MiB > 4 MiB with nothing idle to drop
        assert err.value.code == "queue_full"
        pool.release(b)
        c = pool.acquire(3 << 20)  # b (idle) is unlinked to make room; workers are told
        assert forgotten == [b.name] and pool.bytes_mapped <= 4 << 20 and pool.in_use == 2
        pool.release(a)
        pool.release(c)
        assert pool.in_use == 0
    finally:
        pool.close()


def test_worker_maps_see_front_end_writes():
    pool = SlotPool(budget_bytes=1 << 20)
    try:
        slot = pool.acquire(2 * 3 * 3)
        image = np.arange(18, dtype=np.uint8).reshape(2, 3, 3)
        slot.write_image(image)
        maps = SlotMaps()
        view = maps.view(slot.name, 18)
        np.testing.assert_array_equal(view.reshape(2, 3, 3), image)
        view[:6] = 7  # the worker writes labels over the pixels
        labels = slot.read_labels(2, 3)
        np.testing.assert_array_equal(labels, np.full((2, 3), 7, np.uint8))
        view[:6] = 9  # the slot is reused at once: what was read out does not change
        assert labels.max() == 7 and not labels.flags.writeable
        # a raw response sends the bytes object under the labels, not a further copy
        assert label_bytes(labels) is label_bytes(labels) and label_bytes(labels) == bytes([7] * 6)
        assert label_bytes(labels[:, ::2]) == bytes([7] * 4)  # a strided view is copied, correctly
        del view
        maps.forget(slot.name)
    finally:
        pool.close()


def test_batching_flag_takes_the_three_policies_and_refuses_others():
    from service.config import ConfigError, load_settings

    for policy in ("wait", "adaptive", "greedy"):
        assert load_settings(["--batching", policy]).batching == policy
    with pytest.raises(ConfigError, match="bad --batching 'eager': use adaptive, greedy, wait"):
        load_settings(["--batching", "eager"])
    with pytest.raises(ValueError, match="unknown batching policy"):
        BatchScheduler(4, 0.005, 0.1, policy="eager")
