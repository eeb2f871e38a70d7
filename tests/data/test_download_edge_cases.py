"""download_url's edge cases against a scripted loopback server: stale .part (416), retried status codes, a chunked body cut short, sha256 mismatch."""

from __future__ import annotations

import hashlib
import http.server
import os
import threading

import pytest

from tl_lightning.data import download
from tl_lightning.data.download import download_url
from tl_lightning.errors import DataError

PAYLOAD = os.urandom(50_000)
SHA256 = hashlib.sha256(PAYLOAD).hexdigest()


class _Scripted(http.server.BaseHTTPRequestHandler):
    """Answers each GET with the next scripted reply: an int status, "chunked", "chunked-cut" or "ok"."""

    protocol_version = "HTTP/1.1"

    def do_GET(self):  # noqa: N802 -- http.server's naming
        server = self.server
        server.seen.append(self.headers.get("Range"))
        reply = server.script.pop(0) if server.script else "ok"
        rng = self.headers.get("Range")
        start = int(rng.split("=")[1].split("-")[0]) if rng else 0
        if isinstance(reply, int):
            self.send_response(reply)
            self.send_header("Content-Length", "0")
            self.end_headers()
            return
        body = PAYLOAD[start:]
        self.send_response(206 if start else 200)
        if start:
            self.send_header("Content-Range", f"bytes {start}-{len(PAYLOAD) - 1}/{len(PAYLOAD)}")
        if reply.startswith("chunked"):
            self.send_header("Transfer-Encoding", "chunked")
            self.end_headers()
            half = body[: len(body) // 2] if reply == "chunked-cut" else body
            for i in range(0, len(half), 8192):
                piece = half[i : i + 8192]
                self.wfile.write(f"{len(piece):x}\r\n".encode() + piece + b"\r\n")
            if reply == "chunked-cut":  # hang up without the terminating 0-size chunk
                self.wfile.flush()
                self.close_connection = True
                return
            self.wfile.write(b"0\r\n\r\n")
            return
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        pass


@pytest.fixture
def server():
    srv = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Scripted)
    srv.daemon_threads = True
    srv.script, srv.seen = [], []
    thread = threading.Thread(target=srv.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    srv.url = f"http://127.0.0.1:{srv.server_address[1]}/blob.bin"
    yield srv
    srv.shutdown()
    srv.server_close()


@pytest.fixture
def sleeps(monkeypatch):
    """The back-off delays download_url asked for (not slept: the tests stay fast)."""
    delays: list[float] = []
    monkeypatch.setattr(download.time, "sleep", delays.append)
    return delays


def test_stale_part_longer_than_the_file_gets_416_and_a_fresh_download(server, tmp_path, sleeps):
    (tmp_path / "blob.bin.part").write_bytes(
        b"x" * (len(PAYLOAD) + 10)
    )  # from an older, bigger file
    server.script = [416]
    path = download_url(server.url, tmp_path / "blob.bin", SHA256, "sha256", progress=False)
    assert path.read_bytes() == PAYLOAD
    assert server.seen == [f"bytes={len(PAYLOAD) + 10}-", None]  # asked to resume, then from 0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["blob.bin"]
    assert sleeps == []  # a 416 is not a failed attempt


@pytest.mark.parametrize("status", [500, 503, 408, 429])
def test_server_errors_timeouts_and_rate_limits_are_retried_with_backoff(
    server, tmp_path, sleeps, status
):
    server.script = [status, status]
    path = download_url(
        server.url, tmp_path / "blob.bin", SHA256, "sha256", retries=3, progress=False
    )
    assert path.read_bytes() == PAYLOAD
    assert len(server.seen) == 3
    assert sleeps == [0.5, 1.0]  # exponential back-off: 0.5 s, then 1 s


@pytest.mark.parametrize("status", [403, 404, 410])
def test_client_errors_are_not_retried(server, tmp_path, sleeps, status):
    server.script = [status]
    with pytest.raises(DataError, match=f"HTTP {status}"):
        download_url(server.url, tmp_path / "blob.bin", retries=3, progress=False)
    assert len(server.seen) == 1 and sleeps == []
    assert list(tmp_path.iterdir()) == []


def test_retries_exhausted_on_5xx_leave_nothing(server, tmp_path, sleeps):
    server.script = [502, 502]
    with pytest.raises(DataError, match="after 2 attempts.*502"):
        download_url(server.url, tmp_path / "blob.bin", retries=2, progress=False)
    assert list(tmp_path.iterdir()) == []


def test_chunked_transfer_cut_short_is_resumed_from_what_arrived(server, tmp_path, sleeps):
    server.script = ["chunked-cut", "chunked"]
    path = download_url(server.url, tmp_path / "blob.bin", SHA256, "sha256", progress=False)
    assert path.read_bytes() == PAYLOAD
    # the second request resumes at the last byte the cut transfer delivered
    assert server.seen[0] is None and server.seen[1] == f"bytes={len(PAYLOAD) // 2}-"
    assert len(sleeps) == 1


def test_chunked_transfer_cut_short_every_time_is_an_error(server, tmp_path, sleeps):
    server.script = ["chunked-cut"] * 5
    with pytest.raises(DataError, match="after 2 attempts"):
        download_url(server.url, tmp_path / "blob.bin", None, retries=2, progress=False)
    assert list(tmp_path.iterdir()) == []


def test_sha256_mismatch_names_both_digests_and_deletes_the_download(server, tmp_path, sleeps):
    wrong = hashlib.sha256(b"another file").hexdigest()
    with pytest.raises(DataError, match=f"sha256 .* is {SHA256}, expected {wrong}"):
        download_url(server.url, tmp_path / "blob.bin", wrong, "sha256", progress=False)
    assert list(tmp_path.iterdir()) == []
    assert len(server.seen) == 1  # a wrong checksum is not a transfer failure: no retry
