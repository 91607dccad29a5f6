"""A loopback HTTP server with images and every hostile case the fetcher must survive.

`ImageServer(host="127.0.0.1", port=0)`: `start()`, `stop()`, `url(path)`, `base_url`,
`hits` (a `collections.Counter` of request paths, without the query) and `reset_hits()`;
also `connections` (TCP connections accepted) and `peak_in_flight` (most requests handled
at once), both cleared by `reset_hits()`. `latency_s` adds a delay before every response
(the benchmark's network latency). HTTP/1.1 with keep-alive; one thread per connection;
client disconnects are ignored.

`ImageServer(..., ssl_context=ctx)` serves the same routes over HTTPS.

Routes (all GET):

- `/img/<W>x<H>.<jpg|png|webp|gif|bmp>` a deterministic image (noise over a gradient),
  seeded from the path or `?seed=N`. `?mode=RGBA|LA|P|PT|L|1|CMYK|I;16` saves in that
  mode (`PT`: palette with a transparent index; CMYK only as jpg, I;16 only as png),
  `?exif_rotate=1` adds EXIF orientation 6 (stored W x H, displayed H x W), `?quality=Q`.
- `/status/<code>` that status; `?retry_after=N` sends `Retry-After: N`,
  `?retry_after_date=N` sends it as an HTTP date N seconds ahead.
- `/flaky/<name>?fail=N&code=503` answers `code` N times per name (with the same
  `retry_after`/`retry_after_date` options), then an image (a 64x48 jpg). Counters are per
  server and cleared by `reset_hits()`.
- `/headers` the request's headers as a JSON object.
- `/html` HTML served as `Content-Type: image/jpeg`; `/svg` an SVG; `/empty` an empty 200.
- `/truncated.jpg` the first half of a JPEG; `/corrupt.png` a PNG with garbage image data;
  `/bomb.png` a tiny PNG that declares 100000 x 100000 pixels.
- `/big?bytes=N` N bytes with a Content-Length; `&announce=0` chunked, no Content-Length.
- `/endless` a chunked body that never ends; `/short` announces 10000 bytes, sends 100, closes.
- `/drip?bytes_per_s=B[&bytes=T]` a T-byte (default 10000) body sent B bytes a second.
- `/drip-headers` a status line, then one header line every 0.2 s, forever.
- `/slow?delay=S` sleeps S seconds, then an image.
- `/redirect?to=<url-encoded>[&code=302]` one redirect; `/redirect/<n>` a chain of n
  redirects ending at an image; `/redirect-loop` redirects to itself.
- `/robots?tag=<url-encoded X-Robots-Tag>` a valid image with that header (repeat `tag` to
  send several header lines).
- `/tiny.png` 4x4, `/wide.png` 1000x10, `/anim.gif` three 64x48 frames (red, green, blue).
"""

from __future__ import annotations

import collections
import io
import json
import random
import ssl
import struct
import threading
import time
import zlib
from email.utils import formatdate
from functools import lru_cache
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Self
from urllib.parse import parse_qs, urlsplit

from PIL import Image

_FORMATS = {"jpg": "JPEG", "png": "PNG", "webp": "WEBP", "gif": "GIF", "bmp": "BMP"}
_CONTENT_TYPES = {
    "JPEG": "image/jpeg",
    "PNG": "image/png",
    "WEBP": "image/webp",
    "GIF": "image/gif",
    "BMP": "image/bmp",
}
_DISCONNECTS = (BrokenPipeError, ConnectionResetError, ConnectionAbortedError, TimeoutError)


# ---------------------------------------------------------------------------- images


def _base_image(width: int, height: int, seed: int) -> Image.Image:
    """Noise over colour gradients: compresses like a photo; the same for the same seed."""
    rng = random.Random(seed)
    across = Image.linear_gradient("L").resize((width, height))
    down = across.transpose(Image.Transpose.ROTATE_90).resize((width, height))
    noise = Image.frombytes("L", (width, height), rng.randbytes(width * height))
    soft = Image.blend(noise, across, 0.5 + rng.random() * 0.3)
    return Image.merge("RGB", (across, down, soft))


def _convert(im: Image.Image, mode: str) -> Image.Image:
    if mode in ("", "RGB"):
        return im
    if mode in ("RGBA", "LA"):
        alpha = Image.linear_gradient("L").resize(im.size)
        out = im.convert(mode[:-1])
        out.putalpha(alpha)
        return out
    if mode in ("P", "PT"):
        out = im.quantize(64)
        if mode == "PT":
            out.info["transparency"] = 0
        return out
    if mode == "I;16":
        # Spread 8-bit values over 16 bits (v * 257), as a real 16-bit scan would be.
        return im.convert("L").convert("I").point(lambda v: v * 257).convert("I;16")
    return im.convert(mode)


@lru_cache(maxsize=256)
def render_image(
    width: int, height: int, fmt: str, seed: int, mode: str = "", exif_rotate: bool = False, quality: int = 85
) -> bytes:
    """Encoded bytes of a deterministic test image."""
    im = _convert(_base_image(width, height, seed), mode)
    out = io.BytesIO()
    kwargs: dict = {}
    if fmt in ("JPEG", "WEBP"):
        kwargs["quality"] = quality
    if exif_rotate:
        exif = Image.Exif()
        exif[0x0112] = 6  # orientation: rotate 90 degrees clockwise to display
        kwargs["exif"] = exif.tobytes()
    im.save(out, fmt, **kwargs)
    return out.getvalue()


@lru_cache(maxsize=1)
def _anim_gif() -> bytes:
    frames = [Image.new("RGB", (64, 48), c) for c in ((255, 0, 0), (0, 255, 0), (0, 0, 255))]
    out = io.BytesIO()
    frames[0].save(out, "GIF", save_all=True, append_images=frames[1:], duration=100, loop=0)
    return out.getvalue()


def _png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


@lru_cache(maxsize=1)
def _bomb_png() -> bytes:
    """A valid PNG header declaring 100000 x 100000 1-bit pixels, with a few bytes of data."""
    ihdr = struct.pack(">IIBBBBB", 100_000, 100_000, 1, 0, 0, 0, 0)
    idat = zlib.compress(b"\x00" * 1000)
    return (
        b"\x89PNG\r\n\x1a\n"
        + _png_chunk(b"IHDR", ihdr)
        + _png_chunk(b"IDAT", idat)
        + _png_chunk(b"IEND", b"")
    )


@lru_cache(maxsize=1)
def _corrupt_png() -> bytes:
    """Valid signature and header; the image data is garbage (with a correct CRC)."""
    ihdr = struct.pack(">IIBBBBB", 64, 48, 8, 2, 0, 0, 0)
    garbage = bytes(random.Random(7).randrange(256) for _ in range(500))
    return (
        b"\x89PNG\r\n\x1a\n"
        + _png_chunk(b"IHDR", ihdr)
        + _png_chunk(b"IDAT", garbage)
        + _png_chunk(b"IEND", b"")
    )


_HTML = b"<!doctype html><html><head><title>Not an image</title></head><body>hi</body></html>"
_SVG = (
    b'<?xml version="1.0"?><svg xmlns="http://www.w3.org/2000/svg" width="64" height="64">'
    b'<rect width="64" height="64" fill="red"/></svg>'
)


# ---------------------------------------------------------------------------- server


class ImageServer:
    """The loopback image server of the tests and the benchmark (see the module docstring)."""

    def __init__(self, host: str = "127.0.0.1", port: int = 0, ssl_context=None):
        self.host = host
        self.port = port
        self.ssl_context = ssl_context  # an ssl.SSLContext: serve HTTPS instead
        self.latency_s = 0.0
        self.hits: collections.Counter[str] = collections.Counter()
        self.connections = 0
        self.peak_in_flight = 0
        self._in_flight = 0
        self._lock = threading.Lock()
        self._flaky: collections.Counter[str] = collections.Counter()
        self._httpd: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None

    @property
    def base_url(self) -> str:
        scheme = "https" if self.ssl_context is not None else "http"
        return f"{scheme}://{self.host}:{self.port}"

    def url(self, path: str) -> str:
        return self.base_url + (path if path.startswith("/") else "/" + path)

    def start(self) -> Self:
        httpd = _Server((self.host, self.port), _Handler)
        httpd.owner = self
        if self.ssl_context is not None:
            # Handshake in the connection's thread, so a bad client cannot stall accept().
            httpd.socket = self.ssl_context.wrap_socket(
                httpd.socket, server_side=True, do_handshake_on_connect=False
            )
        self._httpd = httpd
        self.port = httpd.server_address[1]
        self._thread = threading.Thread(
            target=httpd.serve_forever,
            kwargs={"poll_interval": 0.1},
            name=f"image-server-{self.host}",
            daemon=True,
        )
        self._thread.start()
        return self

    def stop(self) -> None:
        if self._httpd is not None:
            self._httpd.shutdown()
            self._httpd.server_close()
            self._httpd = None

    def reset_hits(self) -> None:
        with self._lock:
            self.hits.clear()
            self._flaky.clear()
            self.connections = 0
            self.peak_in_flight = 0

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    # called by the handler threads
    def _record(self, path: str) -> None:
        with self._lock:
            self.hits[path] += 1

    def _connected(self) -> None:
        with self._lock:
            self.connections += 1

    def _enter(self, delta: int) -> None:
        with self._lock:
            self._in_flight += delta
            self.peak_in_flight = max(self.peak_in_flight, self._in_flight)

    def _flaky_count(self, name: str) -> int:
        with self._lock:
            self._flaky[name] += 1
            return self._flaky[name]


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True
    request_queue_size = 256
    owner: ImageServer

    def verify_request(self, request, client_address) -> bool:
        self.owner._connected()
        return True

    def handle_error(self, request, client_address) -> None:
        # A client that hangs up mid-response is normal here (the fetcher cuts bodies off).
        pass


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server_version = "recap-test-images/1"
    timeout = 30  # a client that stops reading cannot pin a thread forever
    server: _Server

    def log_message(self, format, *args) -> None:
        pass

    def setup(self) -> None:
        if isinstance(self.request, ssl.SSLSocket):
            self.request.settimeout(self.timeout)
            self.request.do_handshake()  # a failed handshake ends here, quietly
        super().setup()

    def do_GET(self) -> None:
        parts = urlsplit(self.path)
        self.query = {k: v for k, v in parse_qs(parts.query).items()}
        owner = self.server.owner
        owner._record(parts.path)
        owner._enter(+1)
        try:
            if owner.latency_s:
                time.sleep(owner.latency_s)
            self._route(parts.path)
        except _DISCONNECTS:
            self.close_connection = True
        finally:
            owner._enter(-1)

    def q(self, name: str, default: str = "") -> str:
        values = self.query.get(name)
        return values[0] if values else default

    # ------------------------------------------------------------------ routing

    def _route(self, path: str) -> None:
        exact = {
            "/html": lambda: self._send(200, _HTML, "image/jpeg"),
            "/svg": lambda: self._send(200, _SVG, "image/svg+xml"),
            "/empty": lambda: self._send(200, b"", "image/jpeg"),
            "/truncated.jpg": self._truncated,
            "/corrupt.png": lambda: self._send(200, _corrupt_png(), "image/png"),
            "/bomb.png": lambda: self._send(200, _bomb_png(), "image/png"),
            "/big": self._big,
            "/endless": self._endless,
            "/short": self._short,
            "/drip": self._drip,
            "/drip-headers": self._drip_headers,
            "/slow": self._slow,
            "/redirect": self._redirect_to,
            "/redirect-loop": lambda: self._redirect("/redirect-loop", 302),
            "/robots": self._robots,
            "/headers": lambda: self._send(
                200, json.dumps(dict(self.headers.items())).encode(), "application/json"
            ),
            "/tiny.png": lambda: self._image(4, 4, "PNG", seed=1),
            "/wide.png": lambda: self._image(1000, 10, "PNG", seed=2),
            "/anim.gif": lambda: self._send(200, _anim_gif(), "image/gif"),
        }
        if path in exact:
            return exact[path]()
        head, _, rest = path.lstrip("/").partition("/")
        prefixed = {
            "img": self._img,
            "status": self._status,
            "flaky": self._flaky,
            "redirect": self._redirect_chain,
        }
        if head in prefixed and rest:
            return prefixed[head](rest)
        self._send(404, b"not found", "text/plain")

    # ------------------------------------------------------------------ helpers

    def _send(
        self,
        code: int,
        body: bytes,
        ctype: str,
        headers: dict | None = None,
        extra: list[tuple[str, str]] | None = None,
    ) -> None:
        if code in (204, 304) or code < 200:  # statuses that never carry a body
            body = b""
        self.send_response(code)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(body)))
        for name, value in (headers or {}).items():
            self.send_header(name, value)
        for name, value in extra or []:
            self.send_header(name, value)
        self.end_headers()
        self.wfile.write(body)

    def _image(
        self,
        width: int,
        height: int,
        fmt: str,
        seed: int,
        mode: str = "",
        exif_rotate: bool = False,
        quality: int = 85,
        **headers,
    ) -> None:
        data = render_image(width, height, fmt, seed, mode, exif_rotate, quality)
        self._send(200, data, _CONTENT_TYPES[fmt], headers=headers)

    def _redirect(self, location: str, code: int) -> None:
        self._send(code, b"", "text/plain", {"Location": location})

    # ------------------------------------------------------------------ routes

    def _img(self, name: str) -> None:
        size, _, ext = name.partition(".")
        w, _, h = size.partition("x")
        fmt = _FORMATS.get(ext.lower())
        if fmt is None or not (w.isdigit() and h.isdigit()):
            return self._send(404, b"bad image name", "text/plain")
        seed = int(self.q("seed", str(zlib.crc32(name.encode()))))
        mode = self.q("mode")
        try:
            self._image(
                int(w), int(h), fmt, seed, mode, self.q("exif_rotate") == "1", int(self.q("quality", "85"))
            )
        except (OSError, ValueError, KeyError) as exc:  # e.g. CMYK as PNG
            self._send(400, f"cannot make that image: {exc}".encode(), "text/plain")

    def _retry_after(self) -> dict:
        if self.q("retry_after"):
            return {"Retry-After": self.q("retry_after")}
        if self.q("retry_after_date"):
            ahead = time.time() + float(self.q("retry_after_date"))
            return {"Retry-After": formatdate(ahead, usegmt=True)}
        return {}

    def _status(self, code: str) -> None:
        self._send(int(code), f"status {code}".encode(), "text/plain", self._retry_after())

    def _flaky(self, name: str) -> None:
        if self.server.owner._flaky_count(name) <= int(self.q("fail", "1")):
            return self._send(int(self.q("code", "503")), b"try again", "text/plain", self._retry_after())
        self._image(64, 48, "JPEG", seed=3)

    def _truncated(self) -> None:
        data = render_image(200, 150, "JPEG", 4)
        self._send(200, data[: len(data) // 2], "image/jpeg")

    def _big(self) -> None:
        total = int(self.q("bytes", "1000000"))
        if self.q("announce", "1") != "0":
            return self._send(200, b"\0" * total, "image/jpeg")
        self.send_response(200)
        self.send_header("Content-Type", "image/jpeg")
        self.send_header("Transfer-Encoding", "chunked")
        self.end_headers()
        block = b"\0" * 65536
        sent = 0
        while sent < total:
            piece = block[: min(len(block), total - sent)]
            self._chunk(piece)
            sent += len(piece)
        self._chunk(b"")

    def _chunk(self, data: bytes) -> None:
        self.wfile.write(b"%x\r\n%s\r\n" % (len(data), data))

    def _endless(self) -> None:
        self.send_response(200)
        self.send_header("Content-Type", "image/jpeg")
        self.send_header("Transfer-Encoding", "chunked")
        self.end_headers()
        block = b"\xff" * 65536
        deadline = time.monotonic() + 120  # a safety net for a client that never hangs up
        while time.monotonic() < deadline:
            self._chunk(block)
        self.close_connection = True

    def _short(self) -> None:
        self.send_response(200)
        self.send_header("Content-Type", "image/jpeg")
        self.send_header("Content-Length", "10000")
        self.end_headers()
        self.wfile.write(b"\xff" * 100)
        self.wfile.flush()
        self.close_connection = True

    def _drip(self) -> None:
        rate = max(1, int(self.q("bytes_per_s", "100")))
        total = int(self.q("bytes", "10000"))
        self.send_response(200)
        self.send_header("Content-Type", "image/jpeg")
        self.send_header("Content-Length", str(total))
        self.end_headers()
        step = max(1, rate // 10)
        for _ in range(0, total, step):
            self.wfile.write(b"\xff" * step)
            self.wfile.flush()
            time.sleep(step / rate)
        self.close_connection = True

    def _drip_headers(self) -> None:
        self.wfile.write(b"HTTP/1.1 200 OK\r\n")
        deadline = time.monotonic() + 60
        n = 0
        while time.monotonic() < deadline:
            n += 1
            self.wfile.write(b"X-Drip-%d: %d\r\n" % (n, n))
            self.wfile.flush()
            time.sleep(0.2)
        self.close_connection = True

    def _slow(self) -> None:
        time.sleep(float(self.q("delay", "1")))
        self._image(64, 48, "JPEG", seed=5)

    def _redirect_to(self) -> None:
        self._redirect(self.q("to", "/tiny.png"), int(self.q("code", "302")))

    def _redirect_chain(self, n: str) -> None:
        if not n.isdigit():
            return self._send(404, b"bad chain", "text/plain")
        left = int(n)
        self._redirect(f"/redirect/{left - 1}" if left > 1 else "/img/64x48.jpg", 302)

    def _robots(self) -> None:
        tags = [("X-Robots-Tag", t) for t in self.query.get("tag", [])]
        data = render_image(64, 48, "JPEG", 6)
        self._send(200, data, "image/jpeg", extra=tags)
