"""Processes and their defaults (issue 14, items 13, 14, 16, 17), with real processes:
`recap worker` and `recap flower` launchers killed or stopped, their children gone and
their ports free; worker metrics on loopback; Flower's open pages behind its password;
torch's threads sized from the cores and the engine processes on the host; and the test
suite's own throwaway Redis."""

from __future__ import annotations

import base64
import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest
import sqlalchemy as sa

from recap.settings import Settings
from tests.support.fleet import REPO, Fleet, descendants, fleet_env, wait_until
from tests.support.pg_cluster import free_port

pytestmark = pytest.mark.timeout(240)


@pytest.fixture
def fleet(pg_url, redis_url, tiny_model_dir, tmp_path):
    env = fleet_env(
        pg_url,
        redis_url,
        tiny_model_dir,
        tmp_path / "cache",
        RECAP_CHUNK_SIZE="80",
        RECAP_LEASE_S="600",
        RECAP_BATCH_SIZE="8",
    )
    fleet = Fleet(env=env, log_dir=tmp_path)
    yield fleet
    fleet.stop_all()


def alive(pids: list[int]) -> list[int]:
    """The pids of `pids` still running (a zombie has finished running)."""
    running = []
    for pid in pids:
        try:
            state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
        except OSError:
            continue
        if state != "Z":
            running.append(pid)
    return running


def items(pg_url) -> dict[str, dict]:
    from recap.db import normalise_url

    engine = sa.create_engine(normalise_url(pg_url))
    with engine.connect() as conn:
        rows = conn.execute(sa.text("SELECT key, status, attempts FROM items")).mappings().all()
        chunks = conn.execute(sa.text("SELECT chunk_no, state, attempts FROM chunks")).mappings().all()
    engine.dispose()
    return {"items": {r["key"]: dict(r) for r in rows}, "chunks": {c["chunk_no"]: dict(c) for c in chunks}}


def recap(fleet: Fleet, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "recap.cli", *args],
        env=fleet.env,
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
    )


# -- 13: no orphans ---------------------------------------------------------------------------


def test_a_sigkilled_worker_launcher_takes_its_idle_workers_with_it(fleet, control_app):
    launcher = fleet.start_worker()
    fleet.wait_ready(control_app, 1)
    workers = descendants(launcher.pid)
    assert len(workers) >= 2  # the Celery main process and its pool child

    os.kill(launcher.pid, signal.SIGKILL)  # nothing in the launcher runs again
    launcher.wait(timeout=10)
    wait_until(lambda: not alive(workers), 15, what=f"the workers {alive(workers)} to exit")
    assert not (control_app.control.ping(timeout=1.0) or []), "a worker still answers"


def test_a_sigkilled_launcher_mid_chunk_its_worker_stops_gracefully(
    fleet, control_app, pg_url, image_server, tmp_path
):
    """The kernel's SIGTERM is the graceful stop: the batch in flight is written, the rest of
    the chunk given back at once (no lease to wait out), and another launcher finishes it."""
    urls = [image_server.url(f"/slow?delay=0.1&seed={i}") for i in range(80)]
    path = tmp_path / "urls.txt"
    path.write_text("\n".join(urls) + "\n")
    launcher = fleet.start_worker()
    fleet.wait_ready(control_app, 1)
    workers = descendants(launcher.pid)
    assert recap(fleet, "submit", str(path), "--job", "orphan").returncode == 0
    done = lambda: sum(r["status"] == "done" for r in items(pg_url)["items"].values())  # noqa: E731
    wait_until(lambda: done() >= 8, 120, what="the first batches")

    killed = time.monotonic()
    os.kill(launcher.pid, signal.SIGKILL)
    launcher.wait(timeout=10)
    wait_until(lambda: not alive(workers), 30, what=f"the workers {alive(workers)} to exit")
    assert time.monotonic() - killed < 30
    state = items(pg_url)
    assert 8 <= done() < 80
    assert state["chunks"][0]["state"] in ("pending", "queued"), state["chunks"]
    assert state["chunks"][0]["attempts"] == 0, "a graceful stop is not a failed attempt"

    fleet.start_worker()  # a restarted launcher: alone, and it finishes the chunk
    fleet.wait_ready(control_app, 1)
    wait_until(lambda: done() == 80, 120, what="the restarted launcher to finish the chunk")
    assert all(r["attempts"] == 1 for r in items(pg_url)["items"].values())
    assert len(control_app.control.ping(timeout=1.0) or []) == 1


def start_flower(fleet: Fleet, port: int) -> subprocess.Popen:
    log = open(fleet.log_dir / "flower.log", "wb")  # noqa: SIM115  (Flower writes it while alive)
    flower = subprocess.Popen(
        [sys.executable, "-m", "recap.cli", "flower", "--port", str(port)],
        env={**fleet.env, "RECAP_FLOWER_USER": "ops", "RECAP_FLOWER_PASSWORD": "flower-secret-2"},
        cwd=REPO,
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    fleet.procs.append(flower)
    flower.log_path = fleet.log_dir / "flower.log"  # type: ignore[attr-defined]
    wait_until(lambda: get(port, "/healthcheck", None)[0] is not None, 60, what="Flower to listen")
    return flower


def get(port: int, page: str, auth: str | None) -> tuple[int | None, str]:
    request = urllib.request.Request(f"http://127.0.0.1:{port}{page}")
    if auth:
        request.add_header("Authorization", "Basic " + base64.b64encode(auth.encode()).decode())
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            return response.status, response.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, ""
    except OSError:
        return None, ""


def port_is_free(port: int) -> bool:
    """A server could listen on it now (as a restarted Flower would, with SO_REUSEADDR:
    connections of the dead one may linger in TIME_WAIT)."""
    import socket

    with socket.socket() as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return False
        return True


@pytest.mark.parametrize("stop", [signal.SIGTERM, signal.SIGINT, signal.SIGKILL])
def test_stopping_recap_flower_stops_the_flower_server_and_frees_its_port(fleet, stop):
    port = free_port()
    flower = start_flower(fleet, port)
    server = descendants(flower.pid)
    assert server and not port_is_free(port)
    os.kill(flower.pid, stop)  # the launcher only, not its group
    code = flower.wait(timeout=30)
    if stop != signal.SIGKILL:
        assert code == 0, "Flower stopped as asked"
    wait_until(lambda: not alive(server), 15, what=f"the Flower server {alive(server)} to exit")
    wait_until(lambda: port_is_free(port), 10, what=f"port {port} to be free")


# -- 16: security defaults --------------------------------------------------------------------


def test_flower_metrics_and_healthcheck_need_the_password(fleet, control_app):
    port = free_port()
    fleet.start_worker()
    nodes = fleet.wait_ready(control_app, 1)
    start_flower(fleet, port)
    for page in ("/metrics", "/healthcheck", "/api/workers"):
        assert get(port, page, None)[0] == 401, page
        assert get(port, page, "ops:wrong")[0] == 401, page
        assert get(port, page, "ops:flower-secret-2")[0] == 200, page
    _, body = wait_until(
        lambda: (lambda r: r if nodes[0] in r[1] else None)(get(port, "/metrics", "ops:flower-secret-2")),
        60,
        what="Flower's metrics to name the worker",
    )
    assert "flower_" in body
    assert "flower-secret-2" not in fleet.logs()


def listening_addresses(port: int) -> set[str]:
    """The local addresses a TCP socket listens on at `port`, from /proc/net/tcp{,6}."""
    found = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        for line in Path(table).read_text().splitlines()[1:]:
            local, _remote, state = line.split()[1:4]
            address, hex_port = local.split(":")
            if state == "0A" and int(hex_port, 16) == port:  # 0A: LISTEN
                found.add(address)
    return found


LOOPBACK = "0100007F"  # 127.0.0.1 as /proc/net/tcp writes it
ANY = "00000000"


def test_worker_metrics_listen_on_loopback_unless_configured(fleet, control_app):
    port = free_port()
    fleet.start_worker(extra_env={"RECAP_METRICS_PORT": str(port)})
    fleet.wait_ready(control_app, 1)
    wait_until(lambda: listening_addresses(port), 30, what="the metrics to listen")
    assert listening_addresses(port) == {LOOPBACK}
    body = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read().decode()
    assert "recap_items_total" in body


@pytest.mark.parametrize(("address", "expected"), [(None, LOOPBACK), ("0.0.0.0", ANY)])
def test_metrics_address_decides_where_metrics_listen(address, expected):
    port = free_port()
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    code = (
        "import sys, time; from workers.metrics import serve; "
        "serve(int(sys.argv[1]), *sys.argv[2:]); time.sleep(60)"
    )
    server = subprocess.Popen(
        [sys.executable, "-c", code, str(port), *([address] if address else [])], env=env
    )
    try:
        wait_until(lambda: listening_addresses(port), 30, what="the metrics to listen")
        assert listening_addresses(port) == {expected}
    finally:
        server.kill()
        server.wait()


def test_metrics_address_defaults_to_loopback():
    assert Settings().metrics_address == "127.0.0.1"


# -- 14: torch threads from the cores and the engine processes on the host ----------------------


@pytest.fixture
def no_inherited_omp(monkeypatch):
    """As if this process had been started without OMP_NUM_THREADS (the suite sets it)."""
    import workers.threads

    monkeypatch.setattr(workers.threads, "INHERITED_OMP_THREADS", None)


def test_torch_threads_share_the_cores_among_engine_processes(no_inherited_omp):
    from workers.threads import torch_threads

    settings = Settings()
    assert torch_threads(settings, 1, cores=16).threads == 16
    assert torch_threads(settings, 2, cores=16).threads == 8
    assert torch_threads(settings, 3, cores=16).threads == 5
    assert torch_threads(settings, 2, cores=2).threads == 1
    assert torch_threads(settings, 40, cores=16).threads == 1  # never zero
    assert torch_threads(Settings(torch_threads=3), 40, cores=16).threads == 3  # RECAP_TORCH_THREADS
    assert torch_threads(Settings(torch_threads=3), 40, cores=16).reason == "RECAP_TORCH_THREADS"


def test_an_inherited_omp_num_threads_is_kept(monkeypatch):
    import workers.threads

    monkeypatch.setattr(workers.threads, "INHERITED_OMP_THREADS", "3")
    assert workers.threads.torch_threads(Settings(), 1, cores=16).threads == 3
    assert workers.threads.torch_threads(Settings(torch_threads=5), 1, cores=16).threads == 5


def fake_program(folder: Path, name: str, body: str = "import time; time.sleep(120)") -> Path:
    """A script named like a recap program, so its command line reads as one."""
    folder.mkdir(exist_ok=True)
    path = folder / name
    path.write_text(body + "\n")
    return path


@pytest.fixture
def engine_like_processes(tmp_path):
    """Two `recap run` and one recap Celery worker node (a main process and its pool child,
    one command line), plus processes that are no engine: real processes, sleeping."""
    recap_script = fake_program(tmp_path / "bin", "recap")
    celery_script = fake_program(
        tmp_path / "bin", "celery", "import os, time\nif os.fork() == 0: time.sleep(120)\ntime.sleep(120)"
    )
    argvs = [
        [sys.executable, str(recap_script), "run", "a.txt", "--out", "a.parquet"],
        [sys.executable, str(recap_script), "run", "a.txt", "--out", "a.parquet"],  # the same, twice
        [sys.executable, str(celery_script), "-A", "workers.celery_app", "worker", "-n", "recap-cpu-1@h"],
        [sys.executable, str(recap_script), "status"],
        [sys.executable, str(recap_script), "worker", "--gpus", "none"],  # a launcher runs no engine
    ]
    procs = [subprocess.Popen(argv, start_new_session=True) for argv in argvs]
    time.sleep(1)  # the fork of the fake Celery worker
    yield procs
    for proc in procs:
        Fleet.kill(proc)


def command_lines(pids: list[int]) -> list[tuple[int, list[str]]]:
    return [
        (pid, Path(f"/proc/{pid}/cmdline").read_bytes().rstrip(b"\0").decode().split("\0")) for pid in pids
    ]


def test_engine_processes_are_told_apart_by_their_command_lines(engine_like_processes):
    from workers.threads import engine_keys, engine_processes_on_host

    ours = [p.pid for p in engine_like_processes]
    ours += [child for pid in ours for child in descendants(pid)]
    assert len(ours) == 6
    # Two runs (each its own, even with the same command), one worker node (main process and
    # pool child: one), no `recap status`, no launcher.
    keys = engine_keys(command_lines(ours))
    assert sorted(key.split(":")[0] for key in keys) == ["node", "pid", "pid"], keys
    assert engine_processes_on_host() >= len(keys) + 1  # the host's: ours, this process, others'


def test_a_cpu_worker_sizes_its_threads_from_the_engines_beside_it(
    fleet, control_app, engine_like_processes, no_inherited_omp
):
    import re

    from workers.threads import available_cores

    fleet.env = {k: v for k, v in fleet.env.items() if k not in ("OMP_NUM_THREADS", "MKL_NUM_THREADS")}
    launcher = fleet.start_worker()
    fleet.wait_ready(control_app, 1)
    chosen = re.compile(r"torch threads: (\d+) \((\d+) cores / (\d+) engine processes\)")
    found = wait_until(lambda: chosen.search(fleet.logs()), 30, what="the worker's thread count")
    threads, cores, processes = map(int, found.groups())
    assert cores == available_cores()
    assert processes >= 4  # the worker, the two runs and the fake worker (and whatever else runs here)
    assert threads == max(1, cores // processes)
    Fleet.kill(launcher)

    fleet.start_worker(extra_env={"RECAP_TORCH_THREADS": "3"})
    fleet.wait_ready(control_app, 1)
    wait_until(lambda: "torch threads: 3 (RECAP_TORCH_THREADS)" in fleet.logs(), 30, what="the override")


def test_apply_sets_torch_threads_once_torch_is_loaded(no_inherited_omp):
    import torch

    from workers.threads import apply_torch_threads

    before = torch.get_num_threads()
    try:
        choice = apply_torch_threads(Settings(torch_threads=2))
        assert choice.threads == 2 and torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(before)


# -- 17: the suite's own Redis ----------------------------------------------------------------


def test_tests_use_a_throwaway_redis_of_their_own(redis_server, redis_url):
    import redis

    client = redis.Redis.from_url(redis_url)
    try:
        assert client.info("server")["process_id"] == redis_server.proc.pid
        assert client.config_get("save")["save"] == ""
        assert client.config_get("appendonly")["appendonly"] == "no"
        assert Path(client.config_get("dir")["dir"]) == redis_server.dir
    finally:
        client.close()
    assert redis_server.port != 6379


def test_the_throwaway_redis_dies_with_the_test_session(tmp_path):
    """Even a SIGKILLed test run leaves no Redis server behind."""
    code = (
        "import time; from tests.support.redis_server import start_throwaway_redis; "
        "s = start_throwaway_redis(); print(s.proc.pid, flush=True); time.sleep(120)"
    )
    session = subprocess.Popen(
        [sys.executable, "-c", code],
        cwd=REPO,
        env={**os.environ, "PYTHONPATH": str(REPO)},
        stdout=subprocess.PIPE,
        text=True,
    )
    server = int(session.stdout.readline())
    assert alive([server])
    session.kill()
    session.wait()
    wait_until(lambda: not alive([server]), 10, what="the session's Redis to exit")


def test_compose_opens_worker_metrics_to_its_network_only():
    """In a container loopback is the container itself: compose sets what a Prometheus on
    its network needs, and publishes no worker port to the host."""
    import yaml

    worker = yaml.safe_load((REPO / "docker" / "compose.yaml").read_text())["services"]["worker"]
    assert worker["environment"]["RECAP_METRICS_ADDRESS"] == "${RECAP_METRICS_ADDRESS:-0.0.0.0}"
    assert "ports" not in worker
