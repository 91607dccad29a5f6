"""Export: the contract's columns and types, shards, status and flag filters, JSONL."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta

import pyarrow.dataset as ds
import pyarrow.parquet as pq

from producer.export import EXPORT_SCHEMA, export_job
from recap.generation import GenerationSettings
from recap.records import InputItem, ItemResult
from recap.store import Store


def _job_with_results(sqlite_url):
    store = Store(sqlite_url)
    job = store.ensure_job(
        "exp", "tiny", "describe {org_caption}", GenerationSettings.from_json({"max_new_tokens": 8}), 10
    )
    store.register_items(
        job, [[InputItem(f"k{i}", f"http://127.0.0.1/{i}.jpg", org_caption="a b c") for i in range(5)]]
    )
    store.claim_chunk(job.id, 0, "w", 60, 3)
    provenance = store.provenance_id({"engine": "transformers", "dtype": "bfloat16", "gpu": "NVIDIA H100"})
    store.write_results(
        job.id,
        0,
        [
            ItemResult("k0", "done", caption="one two three", sha256="ab" * 32, width=10, height=20),
            ItemResult("k1", "done", caption="loop loop loop", flags=["repetition"]),
            ItemResult("k2", "done", caption="x y"),
            ItemResult("k3", "failed", error_class="timeout", error="no answer in 20s"),
        ],
        model_revision="rev1",
        provenance_id=provenance,
    )
    return store, job


def test_parquet_shards_have_the_exact_schema_and_filters_apply(sqlite_url, tmp_path):
    store, job = _job_with_results(sqlite_url)
    stats = export_job(store, job, str(tmp_path / "out"), rows_per_shard=1, exclude_flags=["repetition"])
    assert (stats.rows, stats.files) == (2, 2)
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == [
        "part-00000.parquet",
        "part-00001.parquet",
    ]
    table = ds.dataset(tmp_path / "out", format="parquet").to_table()
    assert table.schema.equals(EXPORT_SCHEMA)
    row = next(r for r in table.to_pylist() if r["key"] == "k0")
    assert (row["re_caption"], row["re_length"], row["org_length"]) == ("one two three", 3, 3)
    assert (row["model"], row["model_revision"], row["job"], row["prompt"]) == (
        "tiny",
        "rev1",
        "exp",
        "describe {org_caption}",
    )
    assert json.loads(row["generation"]) == {"max_new_tokens": 8}
    assert row["updated_at"].tzinfo is not None
    assert json.loads(row["provenance"]) == {
        "engine": "transformers",
        "dtype": "bfloat16",
        "gpu": "NVIDIA H100",
    }


def test_status_all_jsonl_and_since(sqlite_url, tmp_path):
    store, job = _job_with_results(sqlite_url)
    export_job(store, job, str(tmp_path / "all.jsonl"), fmt="jsonl", status="all")
    rows = [json.loads(line) for line in (tmp_path / "all.jsonl").read_text().splitlines()]
    assert {r["status"] for r in rows} == {"done", "failed", "pending"} and len(rows) == 5
    assert {r["status"] for r in rows if r["provenance"]} == {"done"}  # how a caption was made
    assert export_job(store, job, str(tmp_path / "f.parquet"), status="failed").rows == 1
    future = datetime.now(UTC) + timedelta(hours=1)
    assert export_job(store, job, str(tmp_path / "none.parquet"), since=future).rows == 0
    assert pq.read_table(tmp_path / "none.parquet").schema.equals(EXPORT_SCHEMA)


def test_the_format_follows_the_path_and_a_mismatch_is_refused(sqlite_url, tmp_path):
    import pytest

    from recap.errors import RecapError

    store, job = _job_with_results(sqlite_url)
    export_job(store, job, str(tmp_path / "one.jsonl"))  # no format given: from the name
    assert (tmp_path / "one.jsonl").is_file()
    assert len((tmp_path / "one.jsonl").read_text().splitlines()) == 3
    with pytest.raises(RecapError, match="make them agree"):
        export_job(store, job, str(tmp_path / "two.parquet"), fmt="jsonl")
    assert not (tmp_path / "two.parquet").exists()
