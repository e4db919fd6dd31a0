"""`http` disk sources: fetched to a temporary file, checked, and only then given their cache name.

A spec's URL is a namespace user's choice, fetched by an agent that runs as root on the node. So: only
http and https; the host is resolved once and the connection goes to the address that was checked (a
second resolution could answer differently); loopback, link-local (cloud metadata services live there),
unspecified and multicast addresses are refused unless the admin allows their network; no redirects;
a size cap and a deadline for the whole download. A partial or unverified file never gets the cache
name. Nothing here imports libvirt.
"""

from __future__ import annotations

import hashlib
import http.client
import ipaddress
import os
import socket
import ssl
import tempfile
import time
import urllib.parse
from collections.abc import Sequence
from pathlib import Path

from libvirt_operator.model import DownloadPolicy
from libvirt_operator.spec import SpecError

CHUNK = 1 << 20
METADATA_ADDRESSES = frozenset(ipaddress.ip_address(a) for a in ("169.254.169.254", "fd00:ec2::254", "100.100.100.200"))
"""Cloud instance-metadata services (AWS, GCP, Azure, OpenStack; AWS over IPv6; Alibaba)."""

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address


def refused_address(address: IPAddress, allowed: Sequence[str]) -> str | None:
    """Why `address` may not be fetched from, or None when it may."""
    if any(address in ipaddress.ip_network(network, strict=False) for network in allowed):
        return None
    if address in METADATA_ADDRESSES:
        return "a cloud metadata address"
    for kind, refused in (("loopback", address.is_loopback), ("link-local", address.is_link_local),
                          ("unspecified", address.is_unspecified), ("multicast", address.is_multicast)):
        if refused:
            return f"a {kind} address"
    mapped = getattr(address, "ipv4_mapped", None)
    return refused_address(mapped, allowed) if mapped is not None else None


def resolve(url: str, policy: DownloadPolicy, field: str) -> tuple[urllib.parse.SplitResult, IPAddress]:
    """The URL's parts and the one address it will be fetched from; SpecError naming `field` if refused."""
    try:
        parts = urllib.parse.urlsplit(url)
        port = parts.port
    except ValueError as error:
        raise SpecError(field, f"{url!r} is not a valid URL: {error}") from error
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise SpecError(field, f"{url!r}: only http:// and https:// URLs with a host are fetched")
    if any(ch.isspace() for ch in url):
        raise SpecError(field, f"{url!r} contains white space; percent-encode it (%20)")
    try:
        infos = socket.getaddrinfo(parts.hostname, port or (443 if parts.scheme == "https" else 80),
                                   type=socket.SOCK_STREAM)
    except (OSError, UnicodeError) as error:  # UnicodeError: a label IDNA cannot encode (over 63 characters, say)
        raise SpecError(field, f"cannot resolve {parts.hostname}: {error}") from error
    addresses = [ipaddress.ip_address(info[4][0].split("%")[0]) for info in infos]
    for address in addresses:
        why = refused_address(address, policy.allowed_networks)
        if why is not None:
            raise SpecError(field, f"{parts.hostname} resolves to {address}, {why}, which the agent does not fetch "
                            "from; the admin can allow its network with --http-allowed-network")
    return parts, addresses[0]


class _PinnedHTTPSConnection(http.client.HTTPSConnection):
    """HTTPS to a fixed address, with the certificate checked for the URL's host name."""

    def __init__(self, address: str, port: int, server_name: str, timeout: float) -> None:
        super().__init__(address, port, timeout=timeout, context=ssl.create_default_context())
        self._server_name = server_name

    def connect(self) -> None:
        sock = socket.create_connection((self.host, self.port), self.timeout)
        self.sock = self._context.wrap_socket(sock, server_hostname=self._server_name)


def _connection(parts: urllib.parse.SplitResult, address: IPAddress, timeout: float) -> http.client.HTTPConnection:
    host = str(address)
    if parts.scheme == "https":
        return _PinnedHTTPSConnection(host, parts.port or 443, parts.hostname or "", timeout)
    return http.client.HTTPConnection(host, parts.port or 80, timeout=timeout)


def download(url: str, sha256: str, directory: Path, policy: DownloadPolicy, field: str) -> Path:
    """Fetches `url` into a new file in `directory` and returns it once its sha256 is `sha256`; SpecError
    naming `field` (the URL's field, or the checksum's) otherwise, leaving no file behind."""
    parts, address = resolve(url, policy, f"{field}.http.url")
    deadline = time.monotonic() + policy.deadline_seconds
    directory.mkdir(parents=True, exist_ok=True)
    handle, name = tempfile.mkstemp(dir=directory, prefix=".download-", suffix=".part")
    target = Path(name)
    try:
        with os.fdopen(handle, "wb") as out:
            digest = _fetch_into(out, parts, address, policy, deadline, f"{field}.http.url", url)
        if digest != sha256:
            raise SpecError(f"{field}.http.sha256", f"{url} has sha256 {digest}, not {sha256}; fix the checksum or the URL")
    except BaseException:
        target.unlink(missing_ok=True)
        raise
    return target


def _fetch_into(out: object, parts: urllib.parse.SplitResult, address: IPAddress, policy: DownloadPolicy,
                deadline: float, field: str, url: str) -> str:
    digest, size = hashlib.sha256(), 0
    connection = _connection(parts, address, timeout=max(1.0, min(60.0, deadline - time.monotonic())))
    try:
        path = urllib.parse.urlunsplit(("", "", parts.path or "/", parts.query, ""))
        connection.request("GET", path, headers={"Host": parts.netloc.rpartition("@")[2], "User-Agent": "libvirt-operator"})
        response = connection.getresponse()
        if response.status != 200:
            where = f" to {response.getheader('Location')}" if 300 <= response.status < 400 else ""
            raise SpecError(field, f"{url} answered {response.status} {response.reason}{where}; give the final URL of "
                            "the image (redirects are not followed)")
        while True:
            remaining = deadline - time.monotonic()
            if connection.sock is not None:
                connection.sock.settimeout(max(0.1, min(60.0, remaining)))
            chunk = response.read1(CHUNK)
            if not chunk:
                break
            size += len(chunk)
            if size > policy.max_bytes:
                raise SpecError(field, f"{url} is larger than {policy.max_bytes} bytes, the agent's --http-max-bytes")
            if time.monotonic() > deadline:
                raise SpecError(field, f"{url} took longer than {policy.deadline_seconds:.0f} s, the agent's "
                                "--http-deadline-seconds")
            digest.update(chunk)
            out.write(chunk)  # type: ignore[attr-defined]
        if response.length:
            raise SpecError(field, f"{url} ended after {size} bytes, {response.length} short of what it announced; "
                            "the server or the network failed: the agent tries again")
    except TimeoutError as error:
        raise SpecError(field, f"{url} took longer than {policy.deadline_seconds:.0f} s, the agent's "
                        "--http-deadline-seconds") from error
    except (OSError, http.client.HTTPException, UnicodeError) as error:  # UnicodeError: a non-ASCII path
        raise SpecError(field, f"cannot download {url}: {type(error).__name__}: {error}") from error
    finally:
        connection.close()
    return digest.hexdigest()
