"""What the terminal shows: user text (job names, models, paths, CSV headers, messages quoting
them) printed exactly as typed, never read as rich markup or emoji codes; `recap --version`;
`status --watch` ends by itself; the status table shows long job names whole at 80 columns."""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
import time

import pytest

import recap
from recap.generation import GenerationSettings
from tests.support.fleet import REPO

pytestmark = pytest.mark.timeout(240)

CRASHING = "[/]"  # rich: "closing tag '[/]' ... has nothing to close"
STYLED = "[bold red]x[/bold red] :smile:"  # rich: a bold red x and an emoji


def recap_cli(*args: str, env: dict | None = None, cwd=None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "recap.cli", *args],
        capture_output=True,
        text=True,
        timeout=180,
        env={**os.environ, "PYTHONPATH": str(REPO), **(env or {})},
        cwd=cwd or REPO,
    )


def one_error_line(result: subprocess.CompletedProcess) -> str:
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and "Traceback" not in result.stderr, result.stderr
    return lines[0]


def make_job(url: str, name: str, items: int = 2, chunk_size: int = 2):
    from recap.records import InputItem
    from recap.store import Store

    store = Store(url)
    job = store.ensure_job(name, "tiny", "describe", GenerationSettings.from_json({}), chunk_size)
    store.register_items(job, [[InputItem(f"k{i}", f"http://127.0.0.1/{i}") for i in range(items)]])
    return store, job


def finish_all(store, job) -> None:
    from recap.records import ItemResult
    from recap.states import ChunkState

    for chunk_no in store.chunk_states(job.id, [ChunkState.PENDING, ChunkState.QUEUED, ChunkState.RUNNING]):
        store.claim_chunk(job.id, chunk_no, "w", 60, 3)
        items = store.pending_items(job.id, chunk_no)
        store.write_results(job.id, chunk_no, [ItemResult(item.key, "done", caption="c") for item in items])
        store.finish_chunk(job.id, chunk_no, "w")


# -- item 8: rich markup in user text ------------------------------------------------------


def test_the_consoles_print_markup_and_emoji_codes_as_they_are():
    from recap.cli.console import PlainConsole, say

    buffer = io.StringIO()
    console = PlainConsole(file=buffer, force_terminal=True, width=80)
    console.print(f"job {CRASHING} {STYLED}")
    say(CRASHING, to=console, label="error:", style="red")
    with console.status(f"loading {CRASHING}…") as spinner:  # rich's spinner reads markup itself
        spinner.update(f"reading {STYLED}")
    text = buffer.getvalue()
    assert f"job {CRASHING} {STYLED}" in text and f"error:\x1b[0m {CRASHING}" in text


@pytest.mark.parametrize("name", [CRASHING, STYLED])
def test_job_names_are_shown_as_typed_by_status_json_and_drop(sqlite_url, name):
    make_job(sqlite_url, name)
    env = {"RECAP_DATABASE_URL": sqlite_url, "COLUMNS": "200", "FORCE_COLOR": "1"}  # styles would show

    table = recap_cli("status", env=env)
    assert table.returncode == 0, table.stderr
    assert f"│ {name} " in table.stdout and f"{name}: model tiny" in table.stdout

    as_json = recap_cli("status", "--job", name, "--json", env={"RECAP_DATABASE_URL": sqlite_url})
    assert as_json.returncode == 0, as_json.stderr
    assert json.loads(as_json.stdout)["job"] == name

    unconfirmed = recap_cli("drop", "--job", name, env=env)
    assert unconfirmed.returncode == 2
    assert f"this deletes job {name!r}" in one_error_line(unconfirmed)
    dropped = recap_cli("drop", "--job", name, "--yes", env=env)
    assert dropped.returncode == 0, dropped.stderr
    assert dropped.stdout == f"dropped job {name}\n"


def test_an_error_quoting_a_job_name_is_one_literal_line(sqlite_url):
    for name in (CRASHING, STYLED):
        result = recap_cli("status", "--job", f"missing {name}", env={"RECAP_DATABASE_URL": sqlite_url})
        assert result.returncode == 2
        assert one_error_line(result).startswith(f"error: no job named 'missing {name}'")


def test_input_paths_and_csv_headers_with_markup_are_quoted_as_they_are(tmp_path):
    env = {"RECAP_DATABASE_URL": f"sqlite:///{tmp_path}/recap.db"}
    missing = recap_cli("run", f"nothing{CRASHING}here.txt", "--out", "o.parquet", env=env, cwd=tmp_path)
    assert missing.returncode == 2
    assert f"nothing{CRASHING}here.txt" in one_error_line(missing)

    (tmp_path / "in[").mkdir()
    csv = tmp_path / f"in{CRASHING}put.csv"  # a folder "in[" holding "]put.csv"
    csv.write_text(f"link,{STYLED}\nhttp://127.0.0.1/a.jpg,hi\n")
    headless = recap_cli("run", str(csv), "--out", "o.parquet", env=env, cwd=tmp_path)
    assert headless.returncode == 2
    line = one_error_line(headless)
    assert f"in{CRASHING}put.csv" in line and STYLED in line


def test_submit_and_status_of_a_fleet_job_named_with_markup(pg_url, redis_url, tmp_path):
    urls = tmp_path / "two.txt"
    urls.write_text("http://127.0.0.1:9/a.jpg\nhttp://127.0.0.1:9/b.jpg\n")
    env = {"RECAP_DATABASE_URL": pg_url, "RECAP_BROKER_URL": redis_url, "COLUMNS": "200"}
    submitted = recap_cli("submit", str(urls), "--job", CRASHING, env=env)
    assert submitted.returncode == 0, submitted.stderr
    assert f"job {CRASHING}: 2 items" in submitted.stdout
    status = recap_cli("status", env=env)
    assert status.returncode == 0, status.stderr
    assert f"│ {CRASHING} " in status.stdout


def test_run_prints_its_summary_with_the_names_as_typed(tmp_path, image_server, tiny_model_dir):
    # A model folder whose path holds "[/]": the loading spinner shows it.
    (tmp_path / "models[").mkdir()
    model = tmp_path / f"models{CRASHING}tiny"
    model.symlink_to(tiny_model_dir, target_is_directory=True)
    urls = tmp_path / "urls.txt"
    urls.write_text(f"{image_server.url('/img/64x48.jpg')}\n{image_server.url('/status/404')}\n")
    out = tmp_path / "out.parquet"
    result = recap_cli(
        "run",
        str(urls),
        "--out",
        str(out),
        "--job",
        STYLED,
        "--model",
        str(model),
        env={
            "RECAP_DATABASE_URL": f"sqlite:///{tmp_path}/recap.db",
            "RECAP_FETCH_RETRIES": "0",
            "RECAP_MAX_NEW_TOKENS": "4",
            "COLUMNS": "300",
        },
    )
    assert result.returncode == 0, result.stderr  # one item done: not a run that failed whole
    assert "Traceback" not in result.stderr, result.stderr
    assert "1 done, 1 failed, 0 pending · failures: http_4xx 1" in result.stdout
    assert f"(job {STYLED})" in result.stdout


# -- item 18: the newcomer's terminal ------------------------------------------------------


def test_version():
    result = recap_cli("--version")
    assert result.returncode == 0, result.stderr
    assert result.stdout == f"recap {recap.__version__}\n"


def test_the_status_table_shows_a_long_job_name_whole_at_80_columns(sqlite_url):
    name = "laion-2b-en/part-00000-to-00127/llava-llama-3-8b/prompt-detailed-" + "x" * 60
    make_job(sqlite_url, name, items=4000)
    result = recap_cli("status", env={"RECAP_DATABASE_URL": sqlite_url, "COLUMNS": "80"})
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert all(len(line) <= 80 for line in lines) and "…" not in result.stdout, result.stdout
    rows = [line.split("│") for line in lines if line.startswith("│")]
    assert "".join(row[1].strip() for row in rows) == name  # folded over lines, nothing cut
    assert rows[0][2:5] == [" 0    ", " 0      ", " 4,000   "]


def test_status_watch_ends_by_itself_once_every_job_shown_is_finished(sqlite_url):
    store, job = make_job(sqlite_url, "watched", items=4)
    env = {**os.environ, "PYTHONPATH": str(REPO), "RECAP_DATABASE_URL": sqlite_url}
    argv = [sys.executable, "-m", "recap.cli", "status", "--watch", "--interval", "0.2"]
    watcher = subprocess.Popen(
        argv, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    try:
        time.sleep(3)
        assert watcher.poll() is None, watcher.communicate()  # chunks still waiting: it watches on
        finish_all(store, job)
        stdout, stderr = watcher.communicate(timeout=30)
    finally:
        watcher.kill()
    assert watcher.returncode == 0, stderr
    assert stdout.rstrip().endswith("job watched is finished: nothing pending, queued or running")

    again = recap_cli("status", "--watch", env={"RECAP_DATABASE_URL": sqlite_url})
    assert again.returncode == 0 and again.stdout.rstrip().endswith("nothing pending, queued or running")


def test_status_watch_refuses_an_interval_it_cannot_sleep(sqlite_url):
    for interval in ("nan", "-1", "0", "inf"):
        result = recap_cli(
            "status", "--watch", "--interval", interval, env={"RECAP_DATABASE_URL": sqlite_url}
        )
        assert result.returncode == 2
        assert "--interval" in one_error_line(result)


def test_status_without_jobs_says_which_database_it_looked_at(sqlite_url):
    result = recap_cli("status", env={"RECAP_DATABASE_URL": sqlite_url})
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith(f"no jobs in {sqlite_url}")
