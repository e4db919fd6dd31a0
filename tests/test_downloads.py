"""http disk sources: refused addresses are refused before any connection, and a download that fails in
any way leaves no file that could pass for the base (a real HTTP server on loopback)."""

from __future__ import annotations

import hashlib
import http.server
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from libvirt_operator import downloads
from libvirt_operator.model import DownloadPolicy
from libvirt_operator.spec import SpecError

pytestmark = pytest.mark.unit

BODY = b"IMAGE" * 50_000
SHA = hashlib.sha256(BODY).hexdigest()
LOOPBACK_ALLOWED = DownloadPolicy(max_bytes=1 << 30, deadline_seconds=30, allowed_networks=("127.0.0.0/8",))
DEFAULTS = DownloadPolicy(max_bytes=1 << 30, deadline_seconds=30)


class Handler(http.server.BaseHTTPRequestHandler):
    def log_message(self, *_: object) -> None:
        pass

    def do_GET(self) -> None:  # noqa: N802 - http.server's name
        if self.path == "/short":
            self.send_response(200)
            self.send_header("Content-Length", str(len(BODY) * 2))
            self.end_headers()
            self.wfile.write(BODY)
            return
        if self.path == "/slow":
            self.send_response(200)
            self.send_header("Content-Length", str(len(BODY)))
            self.end_headers()
            for _ in range(40):
                self.wfile.write(b"x")
                self.wfile.flush()
                time.sleep(0.1)
            return
        if self.path == "/moved":
            self.send_response(302)
            self.send_header("Location", "http://169.254.169.254/latest/meta-data/")
            self.end_headers()
            return
        self.send_response(200)
        self.send_header("Content-Length", str(len(BODY)))
        self.end_headers()
        self.wfile.write(BODY)


@pytest.fixture(scope="module")
def server() -> Iterator[str]:
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}"
    httpd.shutdown()


def fetch(url: str, directory: Path, policy: DownloadPolicy = LOOPBACK_ALLOWED, sha256: str = SHA) -> Path:
    return downloads.download(url, sha256, directory, policy, "spec.disks[2]")


def test_a_good_download_is_checked_and_handed_over(server: str, tmp_path: Path) -> None:
    path = fetch(f"{server}/image", tmp_path)
    assert path.read_bytes() == BODY and path.parent == tmp_path


@pytest.mark.parametrize(("path", "policy", "field", "said"), [
    ("/short", LOOPBACK_ALLOWED, "http.url", "short of what it announced"),
    ("/image", DownloadPolicy(max_bytes=1000, deadline_seconds=30, allowed_networks=("127.0.0.0/8",)), "http.url",
     "--http-max-bytes"),
    ("/slow", DownloadPolicy(max_bytes=1 << 30, deadline_seconds=1, allowed_networks=("127.0.0.0/8",)), "http.url",
     "--http-deadline-seconds"),
    ("/moved", LOOPBACK_ALLOWED, "http.url", "redirects are not followed"),
    ("/image?wrong-sum", LOOPBACK_ALLOWED, "http.sha256", "fix the checksum"),
], ids=["cut short", "over the size cap", "over the deadline", "redirect", "wrong checksum"])
def test_a_failed_download_names_the_field_and_leaves_no_file(server: str, tmp_path: Path, path: str,
                                                             policy: DownloadPolicy, field: str, said: str) -> None:
    sha = "0" * 64 if "wrong-sum" in path else SHA
    with pytest.raises(SpecError) as error:
        fetch(f"{server}{path}", tmp_path, policy, sha)
    assert error.value.field == f"spec.disks[2].{field}" and said in error.value.message, error.value.message
    assert list(tmp_path.iterdir()) == []


REFUSED = [
    "http://169.254.169.254/latest/meta-data/", "http://[fd00:ec2::254]/", "http://[fe80::1]/x", "http://127.0.0.1:9/x",
    "http://localhost/x", "http://0.0.0.0/x", "http://[::1]/x", "http://[::ffff:127.0.0.1]/x", "http://224.0.0.1/x",
    "http://100.100.100.200/x",
]


@pytest.mark.parametrize("url", REFUSED)
def test_loopback_link_local_and_metadata_addresses_are_refused_before_any_connection(
        url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """No traffic is sent to these addresses: connecting at all fails the test (a mock, because a real
    connection to a metadata address is what must never happen here)."""
    def no_connection(*args: object, **kwargs: object) -> None:
        raise AssertionError(f"a connection was attempted: {args}")
    monkeypatch.setattr(socket, "create_connection", no_connection)
    monkeypatch.setattr(socket.socket, "connect", no_connection)
    with pytest.raises(SpecError) as error:
        fetch(url, tmp_path, DEFAULTS)
    assert error.value.field == "spec.disks[2].http.url" and "--http-allowed-network" in error.value.message
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize(("url", "said"), [
    ("ftp://images.example/x", "only http:// and https://"), ("file:///etc/shadow", "only http:// and https://"),
    ("http://images.example/a b.qcow2", "white space"), ("http://[::1/x", "not a valid URL"),
    ("http://" + "a" * 64 + ".example/x", "cannot resolve"),
])
def test_other_schemes_and_malformed_urls_are_refused(url: str, said: str, tmp_path: Path) -> None:
    with pytest.raises(SpecError) as error:
        fetch(url, tmp_path, DEFAULTS)
    assert said in error.value.message


def test_an_allowed_network_may_be_fetched_from(server: str, tmp_path: Path) -> None:
    with pytest.raises(SpecError):
        fetch(f"{server}/image", tmp_path, DEFAULTS)
    assert fetch(f"{server}/image", tmp_path, LOOPBACK_ALLOWED).read_bytes() == BODY


def test_a_path_that_is_not_ascii_is_refused_naming_the_field(server: str, tmp_path: Path) -> None:
    with pytest.raises(SpecError) as error:
        fetch(f"{server}/ïmage", tmp_path)
    assert error.value.field == "spec.disks[2].http.url" and "cannot download" in error.value.message
    assert list(tmp_path.iterdir()) == []
