"""The store on SQLite and PostgreSQL: idempotent registration and writes, leases, counters."""

from __future__ import annotations

import json
import os

import pytest

from recap.errors import RecapError
from recap.generation import GenerationSettings
from recap.records import InputItem, ItemResult
from recap.states import ChunkState, ClaimRefusal, ItemStatus
from recap.store import ItemCounts


def _job(store, name="j", chunk_size=4):
    return store.ensure_job(
        name, "tiny", "describe", GenerationSettings.from_json({"max_new_tokens": 8}), chunk_size
    )


def _items(n, prefix="k"):
    return [InputItem(f"{prefix}{i:04d}", f"http://127.0.0.1/{prefix}{i}.jpg") for i in range(n)]


def test_register_dedups_by_key_and_cuts_chunks(store):
    job = _job(store)
    items = _items(10)
    stats = store.register_items(job, [items[:6], items[4:] + items[:2]])
    assert (stats.new, stats.duplicates) == (10, 4)  # 14 read
    status = store.job_status(job)
    assert status.items == ItemCounts(total=10, pending=10, done=0, failed=0)
    assert status.chunks.pending == 3  # 4 + 4 + 2

    again = store.register_items(job, [items])
    assert again.new == 0
    assert store.job_status(job).items.total == 10

    more = store.register_items(job, [items + _items(3, prefix="new")])
    assert more.new == 3
    assert store.job_status(job).chunks.pending == 4


def test_limit_takes_the_first_items(store):
    job = _job(store)
    stats = store.register_items(job, [_items(5), _items(5, "b")], limit=7)
    assert stats.new == 7


def test_a_job_owns_its_model(store):
    _job(store)
    with pytest.raises(RecapError, match="already exists with model"):
        store.ensure_job("j", "other-model", "describe", GenerationSettings.from_json({}), 4)


def test_done_item_is_never_overwritten_and_counters_follow_transitions(store):
    job = _job(store)
    store.register_items(job, [_items(4)])
    assert store.claim_chunk(job.id, 0, "w1", 60, 3).claimed
    store.write_results(
        job.id,
        0,
        [
            ItemResult("k0000", "done", caption="a cat"),
            ItemResult("k0001", "failed", error_class="timeout", error="slow"),
        ],
    )
    # A late duplicate delivery writes the same items again, differently.
    changed = store.write_results(
        job.id,
        0,
        [
            ItemResult("k0000", "failed", error_class="http_5xx", error="late"),
            ItemResult("k0001", "done", caption="a dog"),
        ],
    )
    assert changed == 1  # only the failed item moved
    status = store.job_status(job)
    assert status.items == ItemCounts(total=4, pending=2, done=2, failed=0)
    assert status.errors == {}
    captions = {}
    for batch in store.iter_items(job, ["done"]):
        captions.update(zip(batch.key, batch.caption, strict=True))
    assert captions == {"k0000": "a cat", "k0001": "a dog"}


def test_leases_exclude_other_workers_until_they_expire(store):
    job = _job(store)
    store.register_items(job, [_items(4)])
    assert store.claim_chunk(job.id, 0, "w1", 60, 3).claimed
    assert store.claim_chunk(job.id, 0, "w2", 60, 3).reason == "leased"
    assert store.renew_lease(job.id, 0, "w1", 0.01)
    import time

    time.sleep(0.05)
    assert store.claim_chunk(job.id, 0, "w2", 60, 3).claimed
    assert not store.renew_lease(job.id, 0, "w1", 60)  # w1 lost it


def test_attempts_limit_fails_a_poison_chunk(store):
    job = _job(store)
    store.register_items(job, [_items(4)])
    for _ in range(2):
        assert store.claim_chunk(job.id, 0, "w", 60, 2).claimed
        store.release_chunk(job.id, 0, "w", error="RuntimeError: boom")
    claim = store.claim_chunk(job.id, 0, "w", 60, 2)
    assert claim.reason == "exhausted"
    assert store.job_status(job).chunks.failed == 1


def test_finish_marks_done_only_when_every_item_is(store):
    job = _job(store)
    store.register_items(job, [_items(2)])
    store.claim_chunk(job.id, 0, "w", 60, 3)
    store.write_results(job.id, 0, [ItemResult("k0000", "done", caption="x")])
    assert store.finish_chunk(job.id, 0, "w") == "pending"
    store.claim_chunk(job.id, 0, "w", 60, 3)
    store.write_results(job.id, 0, [ItemResult("k0001", "failed", error_class="not_image", error="html")])
    assert store.finish_chunk(job.id, 0, "w") == "done"
    assert store.claim_chunk(job.id, 0, "w", 60, 3).reason == "done"


def test_retry_puts_failed_items_of_a_class_back(store):
    job = _job(store)
    store.register_items(job, [_items(4)])
    store.claim_chunk(job.id, 0, "w", 60, 3)
    store.write_results(
        job.id,
        0,
        [
            ItemResult("k0000", "failed", error_class="timeout", error="t"),
            ItemResult("k0001", "failed", error_class="not_image", error="n"),
            ItemResult("k0002", "done", caption="c"),
            ItemResult("k0003", "done", caption="d"),
        ],
    )
    store.finish_chunk(job.id, 0, "w")
    count, chunks = store.retry_failed(job, ["timeout"])
    assert (count, chunks) == (1, [0])
    status = store.job_status(job)
    assert status.items == ItemCounts(total=4, pending=1, done=2, failed=1)
    assert status.errors == {"not_image": 1}
    assert status.chunks.pending == 1
    assert [i.key for i in store.pending_items(job.id, 0)] == ["k0000"]


def test_status_has_rate_and_eta_once_work_started(store):
    job = _job(store)
    store.register_items(job, [_items(8)])
    assert store.job_status(job).rate_per_s is None
    store.claim_chunk(job.id, 0, "w", 60, 3)
    store.write_results(job.id, 0, [ItemResult(f"k000{i}", "done", caption="c") for i in range(4)])
    status = store.job_status(job)
    assert status.rate_per_s > 0 and status.eta_s is not None and status.eta_s >= 0


def test_each_job_has_its_own_partition_and_drops_whole(pg_url):
    import sqlalchemy as sa

    from recap.store import Store

    store = Store(pg_url)
    keep, gone = _job(store, "keep"), _job(store, "gone")
    store.register_items(keep, [_items(5)])
    store.register_items(gone, [_items(7)])
    with store.engine.connect() as conn:
        partitions = set(
            conn.execute(
                sa.text(
                    "SELECT inhrelid::regclass::text FROM pg_inherits WHERE inhparent = 'items'::regclass"
                )
            ).scalars()
        )
        assert partitions == {f"items_p{keep.id}", f"items_p{gone.id}"}
        assert conn.execute(sa.text(f"SELECT count(*) FROM items_p{gone.id}")).scalar() == 7

    store.drop_job(gone)
    with store.engine.connect() as conn:
        assert conn.execute(sa.text("SELECT to_regclass(:t)"), {"t": f"items_p{gone.id}"}).scalar() is None
        assert conn.execute(sa.text("SELECT count(*) FROM items")).scalar() == 5
        assert (
            conn.execute(sa.text("SELECT count(*) FROM chunks WHERE job_id = :j"), {"j": gone.id}).scalar()
            == 0
        )
    assert [j.name for j in store.list_jobs()] == ["keep"]


def test_copy_registration_numbers_chunks_like_the_generic_path(pg_url):
    """Batches of odd sizes across chunk boundaries, duplicates inside and across batches."""
    from recap.store import Store

    store = Store(pg_url)
    job = _job(store, "copy", chunk_size=3)
    items = _items(11)
    stats = store.register_items(job, [items[:4], items[2:9], items[8:] + items[:1]])
    assert stats.new == 11
    with store.engine.connect() as conn:
        import sqlalchemy as sa

        per_chunk = dict(
            conn.execute(
                sa.text("SELECT chunk_no, count(*) FROM items WHERE job_id = :j GROUP BY chunk_no"),
                {"j": job.id},
            ).all()
        )
    assert per_chunk == {0: 3, 1: 3, 2: 3, 3: 2}
    assert store.job_status(job).chunks.pending == 4


def test_a_chunk_finished_during_registration_is_reopened_when_items_join_it(store):
    import time

    job = _job(store, chunk_size=4)
    items = _items(8)

    def batches():
        yield items[:6]  # chunk 0 full, chunk 1 holds 2
        for _ in range(100):  # the first batch is written on a thread: wait for it
            if store.chunk_states(job.id, ["pending"]) == [0, 1]:
                break
            time.sleep(0.02)
        assert store.claim_chunk(job.id, 1, "w", 60, 3).claimed
        store.write_results(job.id, 1, [ItemResult(i.key, "done", caption="c") for i in items[4:6]])
        assert store.finish_chunk(job.id, 1, "w") == "done"
        yield items[6:]  # joins chunk 1

    store.register_items(job, batches())
    assert sorted(store.chunk_states(job.id, ["pending"])) == [0, 1]
    assert [i.key for i in store.pending_items(job.id, 1)] == ["k0006", "k0007"]


def test_only_the_lease_owner_finishes_a_chunk(store):
    import time

    job = _job(store)
    store.register_items(job, [_items(4)])
    assert store.claim_chunk(job.id, 0, "a", 0.01, 3).claimed
    time.sleep(0.05)
    assert store.claim_chunk(job.id, 0, "b", 60, 3).claimed  # a's lease ran out
    assert store.finish_chunk(job.id, 0, "a") == "running"  # a stale worker changes nothing
    assert store.renew_lease(job.id, 0, "b", 60)


def test_retry_reopens_a_chunk_that_gave_up(store):
    job = _job(store)
    store.register_items(job, [_items(4)])
    for _ in range(2):
        store.claim_chunk(job.id, 0, "w", 60, 2)
        store.release_chunk(job.id, 0, "w", error="boom")
    assert store.claim_chunk(job.id, 0, "w", 60, 2).reason == "exhausted"
    count, chunks = store.retry_failed(job, ["timeout"])
    assert (count, chunks) == (0, [0])
    assert store.claim_chunk(job.id, 0, "w", 60, 2).claimed


def test_provenance_rows_are_shared_per_setup_and_recorded_on_done_items(store):
    h100 = {"engine": "transformers", "engine_version": "5.24.0", "dtype": "bfloat16", "gpu": "NVIDIA H100"}
    first = store.provenance_id(h100)
    assert store.provenance_id(dict(reversed(list(h100.items())))) == first  # key order is not identity
    other = store.provenance_id({**h100, "dtype": "float16"})
    assert other != first
    job = _job(store)
    store.register_items(job, [_items(3)])
    store.claim_chunk(job.id, 0, "w1", 60, 3)
    store.write_results(
        job.id,
        0,
        [
            ItemResult("k0000", "done", caption="a cat"),
            ItemResult("k0001", "failed", error_class="timeout", error="slow"),
        ],
        provenance_id=first,
    )
    store.write_results(job.id, 0, [ItemResult("k0001", "done", caption="a dog")], provenance_id=other)
    ids = {}
    for batch in store.iter_items(job, ["pending", "done", "failed"]):
        ids.update(zip(batch.key, batch.provenance_id, strict=True))
    assert ids == {"k0000": first, "k0001": other, "k0002": None}
    assert store.provenances([first, other, first]) == {first: h100, other: {**h100, "dtype": "float16"}}


def test_status_json_is_the_documented_shape(store):
    job = _job(store)
    store.register_items(job, [_items(6)])
    store.claim_chunk(job.id, 0, "w", 60, 3)
    store.write_results(job.id, 0, [ItemResult("k0000", "failed", error_class="timeout", error="t")])
    payload = store.job_status(job).to_json()
    assert list(payload) == [
        "job", "model", "items", "errors", "chunks", "rate_per_s", "eta_s",
        "state", "priority", "engine_seconds", "gpu_hours", "images_per_gpu_hour", "wall_s",
        "cost_so_far", "cost_to_finish",
    ]  # fmt: skip
    assert list(payload["items"].items()) == [
        ("total", 6), ("pending", 5), ("done", 0), ("failed", 1), ("cancelled", 0),
    ]  # fmt: skip
    assert list(payload["chunks"].items()) == [
        ("pending", 1),
        ("queued", 0),
        ("running", 1),
        ("done", 0),
        ("failed", 0),
    ]
    assert (payload["job"], payload["model"], payload["errors"]) == ("j", "tiny", {"timeout": 1})
    assert json.loads(json.dumps(payload)) == payload  # plain JSON values, no enum members


def test_stored_words_are_the_enum_values(store):
    import sqlalchemy as sa

    job = _job(store)
    store.register_items(job, [_items(2)])
    lease = store.claim_chunk(job.id, 0, "w", 60, 3)
    store.write_results(job.id, 0, [ItemResult("k0000", ItemStatus.DONE, caption="c")])
    with store.engine.connect() as conn:
        assert conn.execute(sa.text("SELECT state FROM chunks")).scalar() == "running"
        statuses = conn.execute(sa.text("SELECT key, status FROM items ORDER BY key")).all()
    assert [tuple(r) for r in statuses] == [("k0000", "done"), ("k0001", "pending")]
    assert lease.finish() is ChunkState.PENDING
    assert store.claim_chunk(job.id, 9, "w", 60, 3).reason is ClaimRefusal.MISSING


def test_a_kept_lease_is_renewed_and_noticed_lost_when_taken(store):
    import time

    job = _job(store)
    store.register_items(job, [_items(4)])
    kept = store.claim_chunk(job.id, 0, "w1", 0.6, 3)
    kept.keep()
    time.sleep(1.0)  # beyond the lease: only the renewals keep it
    assert store.claim_chunk(job.id, 0, "w2", 60, 3).reason == "leased"
    assert kept.release(count_attempt=False) is ChunkState.PENDING
    assert [lease.owner for lease in store.leases(job.id)] == []

    stale = store.claim_chunk(job.id, 0, "w1", 0.3, 3)
    time.sleep(0.4)  # w1 stalls past its lease and w2 takes the chunk
    taker = store.claim_chunk(job.id, 0, "w2", 60, 3)
    assert taker.claimed
    stale.keep()
    assert stale.lost.wait(5), "the keeper should notice the chunk is no longer ours"
    assert stale.release(error="late") is ChunkState.RUNNING  # changes nothing
    (lease,) = store.leases(job.id)
    assert (lease.chunk_no, lease.owner) == (0, "w2") and 59 < lease.expires_in_s <= 60
    assert taker.finish() is ChunkState.PENDING


def test_recap_run_takes_over_only_the_chunks_of_a_killed_run_on_this_host(store):
    import socket
    import subprocess
    import sys

    from recap.worker_names import LocalOwner

    job = _job(store)
    store.register_items(job, [_items(8)])
    gone = subprocess.run(
        [sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True
    )
    killed = LocalOwner(int(gone.stdout), socket.gethostname())
    alive = LocalOwner(os.getppid(), socket.gethostname())
    assert store.claim_chunk(job.id, 0, str(killed), 60, 3).claimed
    assert store.claim_chunk(job.id, 1, str(alive), 60, 3).claimed
    me = str(LocalOwner.this_process())
    assert store.claim_chunk(job.id, 0, me, 60, 3, force=True).claimed
    assert store.claim_chunk(job.id, 1, me, 60, 3, force=True).reason is ClaimRefusal.LEASED
