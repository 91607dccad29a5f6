"""The CLI root and the producer side never import torch; user errors are one line, exit 2."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from recap.generation import GenerationSettings
from tests.support.fleet import REPO


def test_cli_and_producer_do_not_import_torch_or_transformers():
    code = (
        "import sys, recap.cli, producer.readers, recap.dispatch, recap.queue, producer.export, "
        "producer.jobs, workers.celery_app, workers.daemon\n"
        "from typer.testing import CliRunner\n"
        "CliRunner().invoke(recap.cli.app, ['--help'])\n"
        "heavy = sorted(m for m in ('torch', 'transformers') if m in sys.modules)\n"
        "assert not heavy, heavy\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stderr


def run_cli(*args, env=None, cwd=None):
    import os

    return subprocess.run(
        [sys.executable, "-m", "recap.cli", *args],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, **(env or {})},
        cwd=cwd or REPO,
    )


def test_status_without_a_database_says_what_to_do(tmp_path):
    result = run_cli("status", env={"RECAP_DATABASE_URL": f"sqlite:///{tmp_path}/none.db"})
    assert result.returncode == 2
    assert "recap db upgrade" in result.stderr
    assert not (tmp_path / "none.db").exists()


def test_bad_setting_is_one_line(tmp_path):
    result = run_cli("status", env={"RECAP_CHUNK_SIZE": "zero"})
    assert result.returncode == 2
    assert "invalid settings" in result.stderr and "Traceback" not in result.stderr


def test_db_upgrade_masks_the_password(pg_url):
    url = pg_url.replace("postgres@", "postgres:s3cret-pw@")
    result = run_cli("db", "upgrade", env={"RECAP_DATABASE_URL": url})
    assert result.returncode == 0, result.stderr
    assert "s3cret-pw" not in result.stdout + result.stderr
    assert "***" in result.stdout


def test_status_shows_counts_failures_and_expiring_leases(sqlite_url):
    from recap.records import InputItem, ItemResult
    from recap.store import Store

    store = Store(sqlite_url)
    job = store.ensure_job("watched", "tiny", "describe", GenerationSettings.from_json({}), 2)
    store.register_items(job, [[InputItem(f"k{i}", f"http://127.0.0.1/{i}") for i in range(4)]])
    store.claim_chunk(job.id, 0, "w", 60, 3)
    store.write_results(
        job.id,
        0,
        [ItemResult("k0", "done", caption="c"), ItemResult("k1", "failed", error_class="timeout", error="t")],
    )
    store.finish_chunk(job.id, 0, "w")
    store.claim_chunk(job.id, 1, "recap-gpu0-1@host:7", 30, 3)
    result = run_cli("status", env={"RECAP_DATABASE_URL": sqlite_url, "COLUMNS": "120"})
    assert result.returncode == 0, result.stderr
    assert "watched" in result.stdout and "failures: timeout 1" in result.stdout
    assert "lease expiring" in result.stdout and "recap-gpu0-1@host:7" in result.stdout
    as_json = run_cli("status", "--job", "watched", "--json", env={"RECAP_DATABASE_URL": sqlite_url})
    import json

    payload = json.loads(as_json.stdout)
    assert payload["items"] == {"total": 4, "pending": 2, "done": 1, "failed": 1, "cancelled": 0}
    assert payload["chunks"] == {"pending": 0, "queued": 0, "running": 1, "done": 1, "failed": 0}
    assert set(payload) == {"job", "model", "items", "errors", "chunks", "rate_per_s", "eta_s", "state",
                            "priority", "engine_seconds", "gpu_hours", "images_per_gpu_hour", "wall_s",
                            "cost_so_far", "cost_to_finish"}  # fmt: skip


def test_an_unreachable_database_is_one_line_and_exit_1():
    result = run_cli("status", env={"RECAP_DATABASE_URL": "postgresql://postgres:pw-77@127.0.0.1:9/x"})
    assert result.returncode == 1
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and "cannot reach the database" in lines[0], result.stderr
    assert "pw-77" not in result.stderr


def test_unknown_export_flags_are_refused(sqlite_url):
    result = run_cli(
        "export",
        "--job",
        "x",
        "--out",
        "/tmp/never.parquet",
        "--exclude-flags",
        "truncated,bogus",
        env={"RECAP_DATABASE_URL": sqlite_url},
    )
    assert result.returncode == 2 and "bogus" in result.stderr


def test_an_older_schema_is_refused_until_upgraded_and_keeps_its_jobs(pg_url):
    """A database made by an earlier recap: commands say to upgrade; the upgrade keeps the
    jobs, and adds the new column to the existing job partitions too."""
    from sqlalchemy import text

    from alembic import command
    from recap.db import alembic_config, get_engine
    from recap.records import InputItem
    from recap.store import Store

    store = Store(pg_url)
    job = store.ensure_job("older", "tiny", "describe", GenerationSettings.from_json({}), 2)
    store.register_items(job, [[InputItem(f"k{i}", f"http://127.0.0.1/{i}") for i in range(4)]])
    command.downgrade(alembic_config(pg_url), "0001")
    env = {"RECAP_DATABASE_URL": pg_url}

    for args in (("status", "--job", "older"), ("retry", "--job", "older", "--errors", "timeout")):
        refused = run_cli(*args, env=env)
        assert refused.returncode == 2, refused.stderr
        assert "revision 0001" in refused.stderr and "recap db upgrade" in refused.stderr

    assert run_cli("db", "upgrade", env=env).returncode == 0
    status = run_cli("status", "--job", "older", "--json", env=env)
    assert status.returncode == 0, status.stderr
    assert json.loads(status.stdout)["items"]["pending"] == 4
    with get_engine(pg_url).connect() as conn:
        columns = (
            conn.execute(
                text("SELECT column_name FROM information_schema.columns WHERE table_name = :t"),
                {"t": f"items_p{job.id}"},
            )
            .scalars()
            .all()
        )
    assert "provenance_id" in columns


def test_a_worker_on_an_older_schema_claims_nothing(pg_url, redis_url, tmp_path):
    """The check comes before the claim (and before the model loads): no chunk is burnt."""
    from sqlalchemy import text

    from alembic import command
    from recap.db import alembic_config, get_engine
    from recap.errors import RecapError
    from recap.records import InputItem
    from recap.settings import Settings
    from recap.store import ChunkRef, Store
    from workers.runtime import WorkerRuntime

    store = Store(pg_url)
    job = store.ensure_job("older", "tiny", "describe", GenerationSettings.from_json({}), 2)
    store.register_items(job, [[InputItem(f"k{i}", f"http://127.0.0.1/{i}") for i in range(2)]])
    command.downgrade(alembic_config(pg_url), "0001")
    runtime = WorkerRuntime(
        Settings(
            database_url=pg_url, broker_url=redis_url, model="tiny", cache_dir=tmp_path, feed_interval_s=3600
        )
    )
    try:
        with pytest.raises(RecapError, match="recap db upgrade"):
            runtime.handle_chunk(ChunkRef(job.id, 0))
    finally:
        runtime.close()
    assert runtime._pipeline is None  # the model was not loaded
    with get_engine(pg_url).connect() as conn:
        chunk = conn.execute(
            text("SELECT state, attempts, lease_owner FROM chunks WHERE job_id = :j AND chunk_no = 0"),
            {"j": job.id},
        ).one()
    assert chunk.state in ("pending", "queued") and (chunk.attempts, chunk.lease_owner) == (0, None)


def test_a_schema_newer_than_this_recap_says_so(pg_url):
    from sqlalchemy import text

    from recap.db import get_engine

    with get_engine(pg_url).begin() as conn:
        conn.execute(text("UPDATE alembic_version SET version_num = '0099'"))
    result = run_cli("status", env={"RECAP_DATABASE_URL": pg_url})
    assert result.returncode == 2
    assert "revision 0099, newer than this recap knows" in result.stderr


def test_worker_metrics_ports_follow_the_gpu_number():
    """One launcher per GPU (the systemd template) must not hand every worker the base port."""
    from recap.settings import Settings
    from workers.daemon import worker_specs

    settings = Settings(metrics_port=9400)
    assert [s.metrics_port for s in worker_specs(["2", "3"], settings)] == [9402, 9403]
    assert [s.metrics_port for s in worker_specs(["3"], settings)] == [9403]
    assert [s.metrics_port for s in worker_specs([None], settings)] == [9400]
    assert [s.metrics_port for s in worker_specs(["0"], Settings(metrics_port=0))] == [0]


def test_a_missing_config_file_is_an_error_not_the_defaults(tmp_path):
    result = run_cli(
        "status",
        env={
            "RECAP_CONFIG": str(tmp_path / "nope.toml"),
            "RECAP_DATABASE_URL": f"sqlite:///{tmp_path}/none.db",
        },
    )
    assert result.returncode == 2
    assert (
        "RECAP_CONFIG" in result.stderr
        and "no such file" in result.stderr
        and "Traceback" not in result.stderr
    )


def test_rows_left_out_of_an_input_are_said_with_their_reason(tmp_path, image_server):
    # The one item read is captioned: a run whose every item failed exits 1 (issue 14).
    urls = tmp_path / "urls.jsonl"
    good = image_server.url("/img/64x48.jpg?seed=1")
    urls.write_text(f'{{"url": ""}}\n{{"url": "{good}"}}\nnot json\n')
    result = run_cli(
        "run",
        str(urls),
        "--model",
        "tiny",
        "--out",
        str(tmp_path / "o.parquet"),
        "--limit",
        "1",
        env={
            "RECAP_DATABASE_URL": f"sqlite:///{tmp_path}/r.db",
            "RECAP_CACHE_DIR": str(tmp_path / "c"),
            "RECAP_FETCH_RETRIES": "0",
            "RECAP_FETCH_ALLOW_CIDRS": "127.0.0.1/32",
        },
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert "skipped rows:" in result.stderr and "no_url 1" in result.stderr, result.stderr


def test_a_worker_never_captions_a_job_of_another_model(pg_url, redis_url, tmp_path):
    """Queues are named by model slug, which two models can share: the job decides."""
    from sqlalchemy import text

    from recap.db import get_engine
    from recap.records import InputItem
    from recap.settings import Settings
    from recap.store import ChunkRef, Store
    from workers.runtime import WorkerRuntime

    store = Store(pg_url)
    job = store.ensure_job("other", "org/model", "describe", GenerationSettings.from_json({}), 2)
    store.register_items(job, [[InputItem("k0", "http://127.0.0.1/0")]])
    runtime = WorkerRuntime(
        Settings(
            database_url=pg_url,
            broker_url=redis_url,
            model="org--model",
            cache_dir=tmp_path,
            feed_interval_s=3600,
        )
    )
    try:
        assert runtime.handle_chunk(ChunkRef(job.id, 0)).startswith("skipped")
    finally:
        runtime.close()
    assert runtime._pipeline is None
    with get_engine(pg_url).connect() as conn:
        attempts, owner = conn.execute(
            text("SELECT attempts, lease_owner FROM chunks WHERE job_id = :j"), {"j": job.id}
        ).one()
    assert (attempts, owner) == (0, None)


@pytest.mark.parametrize(
    ("args", "env", "says"),
    [
        (["--model", "[/]"], {}, "neither a model folder"),
        (["--model", "./no-such-model"], {}, "no such folder"),
        (["--model", "tiny-clip"], {}, "a CLIP scorer, not a captioner"),
        (["--model", "tiny-mllama", "--engine", "vllm"], {}, "RECAP_ENGINE=vllm but"),
        (["--model", "tiny", "--engine", "bogus"], {}, "--engine takes auto, vllm or transformers"),
    ],
)
def test_run_refuses_a_model_or_engine_it_cannot_have_before_writing(tmp_path, args, env, says):
    urls = tmp_path / "urls.txt"
    urls.write_text("http://127.0.0.1:9/a.jpg\n")
    db = tmp_path / "r.db"
    result = run_cli(
        "run", str(urls), "--out", str(tmp_path / "o.parquet"), *args,
        env={"RECAP_DATABASE_URL": f"sqlite:///{db}", "RECAP_CACHE_DIR": str(tmp_path / "c"), **env},
    )  # fmt: skip
    assert result.returncode == 2, result.stderr
    assert says in result.stderr and "Traceback" not in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1, result.stderr
    assert not db.exists()


def test_worker_refuses_an_engine_it_cannot_have_before_starting(pg_url, tmp_path):
    result = run_cli(
        "worker", "--gpus", "none",
        env={"RECAP_DATABASE_URL": pg_url, "RECAP_MODEL": "tiny-mllama", "RECAP_ENGINE": "vllm"},
    )  # fmt: skip
    assert result.returncode == 2, result.stderr
    assert "RECAP_ENGINE=vllm but" in result.stderr and "starting" not in result.stderr


def test_recap_help_imports_no_heavy_package():
    """What ARCHITECTURE.md keeps off a light command's path (the CLI imports workers/)."""
    code = (
        "import sys, recap.cli\n"
        "from typer.testing import CliRunner\n"
        "CliRunner().invoke(recap.cli.app, ['--help'])\n"
        "heavy = ('torch', 'transformers', 'vllm', 'pyarrow', 'fsspec')\n"
        "heavy = sorted(m for m in heavy if m in sys.modules)\n"
        "assert not heavy, heavy\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stderr


@pytest.mark.parametrize(
    ("args", "says"),
    [
        (["run", "u.txt", "--out", "o.parquet", "--limit", "0"], "--limit"),
        (["bogus"], "No such command"),
        (["run"], "Missing argument"),
    ],
)
def test_usage_errors_are_one_line_and_exit_2(args, says):
    result = run_cli(*args)
    assert result.returncode == 2
    assert says in result.stderr and len(result.stderr.strip().splitlines()) == 1, result.stderr
