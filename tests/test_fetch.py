"""The fetch stage against a real loopback server: every hostile case has its exact class."""

from __future__ import annotations

import ipaddress
import json
import threading
import time
import uuid
from urllib.parse import quote

import pytest

from recap.errors import ErrorClass as E
from recap.settings import Settings
from tests.support.http_server import ImageServer
from workers.fetch import (
    AddressGuard,
    Fetcher,
    check_url,
    opt_out_directive,
    parse_retry_after,
)
from workers.load_result import Failed, Fetched

TIMEOUT_S = 1.0
# A deadline may be late by scheduling on a busy 2-core box, never by a whole read.
LATE_MARGIN_S = 0.6


def make_settings(**overrides) -> Settings:
    base = {
        "fetch_timeout_s": 3.0,
        "fetch_connect_timeout_s": 1.0,
        "fetch_retries": 1,
        "fetch_backoff_s": 0.01,
        "fetch_max_redirects": 3,
        "fetch_max_bytes": 300_000,
        "fetch_max_retry_after_s": 5.0,
        "fetch_allow_cidrs": ["127.0.0.1/32"],
    }
    return Settings(**{**base, **overrides})


@pytest.fixture(scope="module")
def fetcher():
    with Fetcher(make_settings()) as f:
        yield f


@pytest.fixture(scope="module")
def quick():
    """Short deadline, no retries: for the timeout cases."""
    with Fetcher(make_settings(fetch_timeout_s=TIMEOUT_S, fetch_retries=0)) as f:
        yield f


@pytest.fixture(scope="module")
def forbidden():
    """A second loopback server that is NOT allow-listed: it must never see a connection."""
    server = ImageServer(host="127.0.0.2").start()
    yield server
    server.stop()


def unique(name: str) -> str:
    return f"{name}-{uuid.uuid4().hex[:8]}"


# ---------------------------------------------------------------------------- success


def test_fetches_an_image(fetcher, image_server):
    outcome = fetcher.fetch(image_server.url("/img/64x48.jpg"))
    assert isinstance(outcome, Fetched)
    assert outcome.data[:2] == b"\xff\xd8"
    assert outcome.attempts == 1


def test_sends_our_user_agent_and_asks_for_no_compression(fetcher, image_server):
    headers = json.loads(fetcher.fetch(image_server.url("/headers")).data)
    assert headers["User-Agent"] == make_settings().user_agent
    assert "recap" in headers["User-Agent"]
    assert headers["Accept-Encoding"] == "identity"
    assert "Cookie" not in headers


def test_follows_a_redirect_chain_within_the_limit(fetcher, image_server):
    image_server.reset_hits()
    outcome = fetcher.fetch(image_server.url("/redirect/3"))
    assert isinstance(outcome, Fetched), outcome
    assert image_server.hits["/img/64x48.jpg"] == 1  # where the chain ends
    assert outcome.data == fetcher.fetch(image_server.url("/img/64x48.jpg")).data


def test_relative_and_absolute_redirects(fetcher, image_server):
    to = quote(image_server.url("/tiny.png"), safe="")
    assert isinstance(fetcher.fetch(image_server.url(f"/redirect?to={to}")), Fetched)
    assert isinstance(fetcher.fetch(image_server.url("/redirect?to=/tiny.png&code=301")), Fetched)


def test_keeps_connections_alive(fetcher, image_server):
    image_server.reset_hits()
    for _ in range(5):
        assert isinstance(fetcher.fetch(image_server.url("/img/32x32.png")), Fetched)
    assert image_server.connections <= 1


# ---------------------------------------------------------------------------- hostile cases


@pytest.mark.parametrize(
    "path, expected",
    [
        ("/status/404", E.HTTP_4XX),
        ("/status/403", E.HTTP_4XX),
        ("/status/500", E.HTTP_5XX),
        ("/status/503", E.HTTP_5XX),
        ("/status/429", E.RATE_LIMITED),
        ("/status/304", E.HTTP_4XX),  # a non-2xx final status, whatever it is
        ("/big?bytes=400000", E.TOO_LARGE),
        ("/big?bytes=400000&announce=0", E.TOO_LARGE),
        ("/endless", E.TOO_LARGE),
        ("/short", E.NETWORK_ERROR),
        ("/redirect/4", E.TOO_MANY_REDIRECTS),
        ("/redirect-loop", E.TOO_MANY_REDIRECTS),
        ("/redirect?to=ftp%3A%2F%2F127.0.0.1%2Fimage.jpg", E.BAD_SCHEME),
        ("/redirect?to=file%3A%2F%2F%2Fetc%2Fpasswd", E.BAD_SCHEME),
    ],
)
def test_hostile_responses(fetcher, image_server, path, expected):
    outcome = fetcher.fetch(image_server.url(path))
    assert isinstance(outcome, Failed), outcome
    assert outcome.failure.error_class is expected, outcome.failure
    assert "\n" not in outcome.failure.message and outcome.failure.message


def test_bodies_that_are_not_images_are_still_fetched(fetcher, image_server):
    # Deciding "not an image" is the prepare stage's job (its class comes later).
    assert isinstance(fetcher.fetch(image_server.url("/html")), Fetched)
    assert fetcher.fetch(image_server.url("/empty")).data == b""


def test_announced_oversize_fails_before_the_body(fetcher, image_server):
    start = time.monotonic()
    outcome = fetcher.fetch(image_server.url("/big?bytes=50000000"))
    assert outcome.failure.error_class is E.TOO_LARGE
    assert "announced" in outcome.failure.message
    assert time.monotonic() - start < 1.0


def test_refused_port_is_a_connect_error(image_server):
    with Fetcher(make_settings(fetch_retries=0)) as f:
        outcome = f.fetch("http://127.0.0.1:9/")  # discard port: nothing listens
    assert outcome.failure.error_class is E.CONNECT_ERROR


@pytest.mark.parametrize(
    "url, expected",
    [
        ("", E.INVALID_URL),
        ("   ", E.INVALID_URL),
        ("not a url", E.INVALID_URL),
        ("/relative/image.jpg", E.INVALID_URL),
        ("//127.0.0.1/image.jpg", E.INVALID_URL),
        ("http://", E.INVALID_URL),
        ("http://[::1", E.INVALID_URL),
        ("http://127.0.0.1:99999/", E.INVALID_URL),
        ("http://127.0.0.1/a\r\nX-Injected: 1", E.INVALID_URL),
        ("ftp://127.0.0.1/image.jpg", E.BAD_SCHEME),
        ("file:///etc/passwd", E.BAD_SCHEME),
        ("javascript:alert(1)", E.BAD_SCHEME),
        ("data:image/png;base64,iVBORw0KGgo=", E.BAD_SCHEME),
        ("gopher://127.0.0.1:70/", E.BAD_SCHEME),
    ],
)
def test_bad_urls_fail_without_a_request(fetcher, url, expected):
    outcome = fetcher.fetch(url)
    assert outcome.failure.error_class is expected, outcome.failure
    assert outcome.attempts == 0


def test_never_raises_for_garbage_input(fetcher):
    for junk in (None, 42, b"http://127.0.0.1/", "http://\x00/"):
        assert fetcher.fetch(junk).failure.error_class is E.INVALID_URL  # type: ignore[arg-type]


# ---------------------------------------------------------------------------- SSRF


def forbidden_urls(forbidden: ImageServer, image_server: ImageServer) -> list[str]:
    port = forbidden.port
    direct = forbidden.url("/img/64x48.jpg")
    return [
        direct,
        f"http://2130706434:{port}/img/64x48.jpg",  # 127.0.0.2 as one integer
        f"http://0x7f000002:{port}/img/64x48.jpg",  # ... in hex
        f"http://127.2:{port}/img/64x48.jpg",  # ... shortened
        f"http://0177.0.0.02:{port}/img/64x48.jpg",  # ... in octal
        f"http://[::ffff:127.0.0.2]:{port}/img/64x48.jpg",  # IPv4-mapped IPv6
        image_server.url(f"/redirect?to={quote(direct, safe='')}"),
        image_server.url(f"/redirect?to={quote(f'http://2130706434:{port}/x', safe='')}"),
        image_server.url(f"/redirect?to={quote(f'http://[::1]:{port}/x', safe='')}"),
    ]


def test_ssrf_guard_sends_nothing_to_a_forbidden_address(fetcher, image_server, forbidden):
    forbidden.reset_hits()
    for url in forbidden_urls(forbidden, image_server):
        outcome = fetcher.fetch(url)
        assert isinstance(outcome, Failed), url
        assert outcome.failure.error_class is E.BLOCKED_ADDRESS, (url, outcome.failure)
        assert outcome.attempts == 1  # not retried
    assert forbidden.hits == {}
    assert forbidden.connections == 0  # not even a TCP handshake


@pytest.mark.parametrize("host", ["0.0.0.0", "[::1]", "[::]", "0"])
def test_unspecified_and_v6_loopback_are_blocked(fetcher, host):
    assert fetcher.fetch(f"http://{host}:9/").failure.error_class is E.BLOCKED_ADDRESS


def test_odd_spellings_of_an_allowed_address_mean_that_address(fetcher, image_server):
    # 2130706433 == 0x7f000001 == 127.1 == 127.0.0.1, which the tests allow-list.
    for host in ("2130706433", "0x7f000001", "127.1"):
        assert isinstance(fetcher.fetch(f"http://{host}:{image_server.port}/tiny.png"), Fetched), host


def test_the_allow_list_is_what_lets_an_address_through(forbidden):
    forbidden.reset_hits()
    with Fetcher(make_settings(fetch_allow_cidrs=["127.0.0.2/32"])) as f:
        assert isinstance(f.fetch(forbidden.url("/tiny.png")), Fetched)
    assert forbidden.hits["/tiny.png"] == 1
    forbidden.reset_hits()


@pytest.mark.parametrize(
    "address",
    [
        "10.1.2.3",
        "172.16.0.1",
        "192.168.1.1",
        "127.0.0.1",
        "169.254.169.254",
        "100.64.0.1",
        "0.0.0.0",
        "224.0.0.1",
        "239.255.255.250",
        "240.0.0.1",
        "255.255.255.255",
        "192.0.2.1",
        "::1",
        "::",
        "fe80::1",
        "fc00::1",
        "ff02::1",
        "::ffff:8.8.8.8",
        "::ffff:10.0.0.1",
        "2002:a00:1::",
        "64:ff9b::a00:1",
    ],
)
def test_address_policy_blocks(address):
    guard = AddressGuard([])
    try:
        assert guard.why_blocked(ipaddress.ip_address(address))
    finally:
        guard.close()


@pytest.mark.parametrize("address", ["8.8.8.8", "1.1.1.1", "2606:4700:4700::1111"])
def test_address_policy_allows_public_addresses(address):
    guard = AddressGuard([])
    try:
        assert guard.why_blocked(ipaddress.ip_address(address)) is None
    finally:
        guard.close()


def test_allow_cidrs_open_a_private_range():
    guard = AddressGuard(["10.0.0.0/8"])
    try:
        assert guard.why_blocked(ipaddress.ip_address("10.9.8.7")) is None
        assert guard.why_blocked(ipaddress.ip_address("192.168.0.1"))
    finally:
        guard.close()


# ---------------------------------------------------------------------------- deadlines


@pytest.mark.parametrize(
    "path",
    [
        "/drip?bytes_per_s=4000&bytes=200000",  # a steady trickle: no single read ever times out
        "/drip-headers",
        "/slow?delay=5",
    ],
)
def test_whole_request_deadline(quick, image_server, path):
    start = time.monotonic()
    outcome = quick.fetch(image_server.url(path))
    elapsed = time.monotonic() - start
    assert outcome.failure.error_class is E.TIMEOUT, outcome.failure
    assert TIMEOUT_S - 0.05 <= elapsed <= TIMEOUT_S + LATE_MARGIN_S, elapsed
    assert outcome.attempts == 1


def test_each_retry_gets_its_own_deadline(image_server):
    with Fetcher(make_settings(fetch_timeout_s=0.5, fetch_retries=1)) as f:
        start = time.monotonic()
        outcome = f.fetch(image_server.url("/drip?bytes_per_s=4000&bytes=200000"))
    assert outcome.failure.error_class is E.TIMEOUT
    assert outcome.attempts == 2
    assert 0.95 <= time.monotonic() - start <= 1.0 + 2 * LATE_MARGIN_S


def test_a_timed_out_connection_is_not_reused(quick, image_server):
    assert quick.fetch(image_server.url("/slow?delay=3")).failure.error_class is E.TIMEOUT
    assert isinstance(quick.fetch(image_server.url("/tiny.png")), Fetched)


# ---------------------------------------------------------------------------- retries


@pytest.mark.parametrize(
    "code, fail, retries, expected_class, attempts",
    [
        (503, 2, 2, None, 3),  # retried, then served
        (500, 9, 2, E.HTTP_5XX, 3),  # gives up after the allowed retries
        (404, 9, 3, E.HTTP_4XX, 1),  # a 4xx is never retried
    ],
)
def test_retries_only_what_is_transient(image_server, code, fail, retries, expected_class, attempts):
    name = unique(f"flaky{code}")
    with Fetcher(make_settings(fetch_retries=retries)) as f:
        outcome = f.fetch(image_server.url(f"/flaky/{name}?fail={fail}&code={code}"))
    if expected_class is None:
        assert isinstance(outcome, Fetched), outcome
    else:
        assert outcome.failure.error_class is expected_class
    assert outcome.attempts == attempts
    assert image_server.hits[f"/flaky/{name}"] == attempts


def test_never_retries_content_errors(image_server):
    image_server.reset_hits()
    with Fetcher(make_settings(fetch_retries=3)) as f:
        assert f.fetch(image_server.url("/big?bytes=400000")).attempts == 1
        assert f.fetch(image_server.url("/robots?tag=noai")).attempts == 1
    assert image_server.hits["/big"] == 1


def test_honours_retry_after_seconds(image_server):
    name = unique("slowdown")
    with Fetcher(make_settings(fetch_retries=1)) as f:
        start = time.monotonic()
        outcome = f.fetch(image_server.url(f"/flaky/{name}?fail=1&code=429&retry_after=1"))
    assert isinstance(outcome, Fetched), outcome
    assert outcome.attempts == 2
    assert time.monotonic() - start >= 0.95


def test_honours_retry_after_as_http_date(image_server):
    name = unique("date")
    with Fetcher(make_settings(fetch_retries=1)) as f:
        outcome = f.fetch(image_server.url(f"/flaky/{name}?fail=1&code=503&retry_after_date=1"))
    assert isinstance(outcome, Fetched), outcome
    assert outcome.attempts == 2


def test_too_long_retry_after_fails_now_as_retryable(image_server):
    name = unique("later")
    with Fetcher(make_settings(fetch_retries=2, fetch_max_retry_after_s=5)) as f:
        start = time.monotonic()
        outcome = f.fetch(image_server.url(f"/flaky/{name}?fail=9&code=429&retry_after=120"))
    assert outcome.failure.error_class is E.RATE_LIMITED
    assert outcome.failure.retryable
    assert "120" in outcome.failure.message
    assert outcome.attempts == 1
    assert time.monotonic() - start < 1.0


def test_retries_a_broken_body(image_server):
    image_server.reset_hits()
    with Fetcher(make_settings(fetch_retries=2)) as f:
        outcome = f.fetch(image_server.url("/short"))
    assert outcome.failure.error_class is E.NETWORK_ERROR
    assert outcome.attempts == 3


# ---------------------------------------------------------------------------- opt-out


@pytest.mark.parametrize(
    "tags, opted_out",
    [
        (["noai"], True),
        (["noimageai"], True),
        (["NoIndex"], True),
        (["noimageindex"], True),
        (["none"], True),
        (["noml"], True),
        (["nofollow, noai"], True),
        (["recap: noai"], True),
        (["recap: noimageindex, nofollow"], True),
        (["otherbot: noindex, recap: noai"], True),
        (["otherbot: noai", "noimageai"], True),  # the second header line is unscoped
        (["otherbot: noai"], False),
        (["otherbot: noai, noimageai"], False),  # both scoped to otherbot
        (["max-image-preview: none"], False),  # "none" is that directive's value
        (["unavailable_after: 25 Jun 2010 15:00:00 PST"], False),
        (["nofollow, noarchive"], False),
        ([], False),
    ],
)
def test_x_robots_tag(fetcher, image_server, tags, opted_out):
    query = "&".join(f"tag={quote(t, safe='')}" for t in tags)
    outcome = fetcher.fetch(image_server.url(f"/robots?{query}"))
    if opted_out:
        assert outcome.failure.error_class is E.OPTED_OUT, outcome.failure
    else:
        assert isinstance(outcome, Fetched), outcome


def test_opt_out_parser_directly():
    assert opt_out_directive(["Recap: NoAI"]) == "recap: noai"
    assert opt_out_directive(["googlebot: noindex"]) is None
    assert opt_out_directive(["noindex"]) == "noindex"


# ---------------------------------------------------------------------------- limits, lifecycle


def test_per_host_cap(image_server):
    image_server.reset_hits()
    with Fetcher(make_settings(fetch_per_host=2)) as f:
        threads = [
            threading.Thread(target=f.fetch, args=(image_server.url("/slow?delay=0.3"),)) for _ in range(6)
        ]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    assert image_server.hits["/slow"] == 6
    assert image_server.peak_in_flight <= 2


def test_parallel_fetches_are_independent(fetcher, image_server):
    paths = ["/img/40x30.jpg", "/status/404", "/big?bytes=400000", "/tiny.png", "/html"] * 6
    results: dict[int, object] = {}

    def run(i: int, path: str) -> None:
        results[i] = fetcher.fetch(image_server.url(path))

    threads = [threading.Thread(target=run, args=(i, p)) for i, p in enumerate(paths)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for i, path in enumerate(paths):
        outcome = results[i]
        if path in ("/status/404", "/big?bytes=400000"):
            assert isinstance(outcome, Failed)
        else:
            assert isinstance(outcome, Fetched), (path, outcome)


def test_close_is_idempotent_and_fetch_after_close_does_not_raise(image_server):
    f = Fetcher(make_settings())
    assert isinstance(f.fetch(image_server.url("/tiny.png")), Fetched)
    f.close()
    f.close()
    assert isinstance(f.fetch(image_server.url("/tiny.png")), Failed)


def test_retry_after_parsing():
    assert parse_retry_after("3") == 3.0
    assert parse_retry_after("Wed, 21 Oct 2015 07:28:00 GMT") == 0.0  # in the past
    assert parse_retry_after("soon") is None
    assert parse_retry_after(None) is None


def test_check_url_gives_the_host():
    assert check_url("https://Example.COM:8443/a.jpg") == (None, "example.com")


# ---------------------------------------------------------------------------- HTTPS


@pytest.fixture(scope="module")
def tls_server(tmp_path_factory):
    """An HTTPS server on 127.0.0.1 whose self-signed certificate names only `localhost`."""
    import shutil
    import ssl
    import subprocess

    if shutil.which("openssl") is None:
        pytest.skip("openssl is needed to make a test certificate")
    folder = tmp_path_factory.mktemp("tls")
    cert, key = folder / "cert.pem", folder / "key.pem"
    subprocess.run(
        [
            "openssl",
            "req",
            "-x509",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-days",
            "2",
            "-subj",
            "/CN=localhost",
            "-addext",
            "subjectAltName=DNS:localhost",
            "-keyout",
            str(key),
            "-out",
            str(cert),
        ],
        check=True,
        capture_output=True,
    )
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(cert, key)
    names: list[str | None] = []
    context.sni_callback = lambda sock, name, ctx: names.append(name)
    server = ImageServer(host="127.0.0.1", ssl_context=context).start()
    server.sni_names = names
    server.cert = cert
    yield server
    server.stop()


def test_https_verifies_the_certificate(tls_server):
    tls_server.sni_names.clear()
    with Fetcher(make_settings(fetch_retries=0)) as f:
        outcome = f.fetch(f"https://localhost:{tls_server.port}/tiny.png")
    assert outcome.failure.error_class is E.CONNECT_ERROR, outcome.failure
    assert "certificate" in outcome.failure.message.lower()
    assert tls_server.sni_names == ["localhost"]  # SNI carries the name, not the address


def test_https_checks_the_name_while_connecting_to_the_checked_address(tls_server):
    with Fetcher(make_settings(fetch_retries=0)) as f:
        # Trust our test CA (no setting for this: production uses the system's roots).
        f._verify = str(tls_server.cert)
        assert isinstance(f.fetch(f"https://localhost:{tls_server.port}/tiny.png"), Fetched)
        # The certificate names localhost, not 127.0.0.1: verification is by host name.
        wrong_name = f.fetch(f"https://127.0.0.1:{tls_server.port}/tiny.png")
    assert wrong_name.failure.error_class is E.CONNECT_ERROR


def test_https_to_a_forbidden_address_is_refused_first(fetcher, forbidden):
    forbidden.reset_hits()
    outcome = fetcher.fetch(f"https://127.0.0.2:{forbidden.port}/tiny.png")
    assert outcome.failure.error_class is E.BLOCKED_ADDRESS
    assert forbidden.connections == 0


def test_deadline_also_cuts_a_reused_connection(quick, image_server):
    image_server.reset_hits()
    assert isinstance(quick.fetch(image_server.url("/tiny.png")), Fetched)
    start = time.monotonic()
    outcome = quick.fetch(image_server.url("/drip?bytes_per_s=4000&bytes=200000"))
    assert outcome.failure.error_class is E.TIMEOUT
    assert time.monotonic() - start <= TIMEOUT_S + LATE_MARGIN_S
    assert image_server.connections <= 1  # the drip came over the kept-alive connection


def test_a_bad_redirect_target_outranks_the_redirect_limit(image_server):
    """The precedence of docs/ARCHITECTURE.md ("Error classes"): bad_scheme before
    too_many_redirects, on any hop."""
    from urllib.parse import quote

    inner = "/redirect?to=" + quote("ftp://127.0.0.1/image.jpg", safe="")
    with Fetcher(make_settings(fetch_max_redirects=1, fetch_retries=0)) as f:
        outcome = f.fetch(image_server.url("/redirect?to=" + quote(inner, safe="")))
    assert outcome.failure.error_class is E.BAD_SCHEME, outcome.failure
