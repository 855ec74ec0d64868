"""No requests into the farm's own network: every URL the farm posts to is checked here, then used pinned.

A webhook URL is the submitter's, but the POST leaves from inside the farm: left alone it reaches
Redis on loopback, the cloud's metadata service, or any private address, and its answer (status,
error) tells the submitter what lives there. So:

- ``check_url`` resolves the URL's host once and refuses it when **any** address is not public:
  loopback, private (RFC 1918, ULA), link-local (169.254/16, the metadata address among them),
  CGNAT (100.64/10), multicast, unspecified, reserved or documentation ranges, and IPv6 forms that
  carry an IPv4 address (mapped ``::ffff:a.b.c.d``, NAT64, 6to4, Teredo) by the address they carry.
  Numeric hosts are read the way the C resolver reads them (``inet_aton``): ``2130706433``,
  ``0x7f000001``, ``0177.0.0.1`` and ``127.1`` are all 127.0.0.1, and are refused as such.
- The answer is a ``Target`` holding the address that was checked; ``post`` connects to that very
  address (the Host header and TLS's SNI and certificate check keep the URL's name), so a second DNS
  answer cannot swap in a private address (DNS rebinding). Redirects are not followed.
- ``fetch`` downloads from a checked ``Target`` the same way (inputs by URL: ``audio_url``), a 3xx being
  an answer like any other, its size bounded while it streams and its time bounded in all.
- ``LIPFARM_OUTBOUND_ALLOW`` (off by default) lists CIDRs and host names that may be reached anyway,
  for farms that post to receivers inside their own network.
"""

from __future__ import annotations

import http.client
import ipaddress
import socket
import ssl
import time
from dataclasses import dataclass
from urllib.parse import urlsplit

from lipfarm.common.errors import InputError

ALLOW_ENV = "LIPFARM_OUTBOUND_ALLOW"
_CGNAT = ipaddress.ip_network("100.64.0.0/10")
_NAT64 = ipaddress.ip_network("64:ff9b::/96")
_METADATA = {ipaddress.ip_address("169.254.169.254"), ipaddress.ip_address("fd00:ec2::254"),
             ipaddress.ip_address("100.100.100.200")}  # AWS, GCP, Azure; AWS IPv6; Alibaba

Address = ipaddress.IPv4Address | ipaddress.IPv6Address


@dataclass(frozen=True)
class AllowList:
    """What ``LIPFARM_OUTBOUND_ALLOW`` lets through: networks, and host names (lower case)."""

    networks: tuple = ()
    hosts: frozenset = frozenset()

    @classmethod
    def parse(cls, text: str) -> "AllowList":
        """``"10.0.0.0/8, hooks.internal"`` -> the allow-list; ``InputError`` naming the setting if malformed."""
        networks, hosts = [], set()
        for item in (part.strip() for part in (text or "").split(",")):
            if not item:
                continue
            if any(c.isspace() for c in item) or "/" in item and not _is_network(item):
                raise InputError("not a CIDR or a host name", field=ALLOW_ENV,
                                 expected="comma-separated CIDRs (10.0.0.0/8, ::1/128) or host names",
                                 found=repr(item[:100]))
            if _is_network(item):
                networks.append(ipaddress.ip_network(item, strict=False))
            else:
                hosts.add(item.lower().rstrip("."))
        return cls(tuple(networks), frozenset(hosts))

    def allows_host(self, host: str) -> bool:
        return host.lower().rstrip(".") in self.hosts

    def allows(self, address: Address) -> bool:
        return any(address.version == net.version and address in net for net in self.networks)


def _is_network(text: str) -> bool:
    try:
        ipaddress.ip_network(text, strict=False)
        return True
    except ValueError:
        return False


@dataclass(frozen=True)
class Target:
    """A checked URL: where to connect (``address``), and what to call the host while doing it."""

    url: str
    scheme: str
    host: str  # as the URL names it: the Host header and TLS's server name
    port: int
    path: str  # path and query, as sent in the request line
    address: str  # the address that was checked: the connection goes here and nowhere else


def blocked_reason(address: Address) -> str | None:
    """Why the farm must not connect to ``address`` (None if it is a public address)."""
    if isinstance(address, ipaddress.IPv6Address):
        carried = _carried_ipv4(address)
        if carried is not None:
            reason = blocked_reason(carried)
            return f"{reason} (inside {address})" if reason else None
    if address in _METADATA:
        return "a cloud metadata address"
    for test, words in ((address.is_loopback, "loopback"), (address.is_unspecified, "unspecified"),
                        (address.is_link_local, "link-local"), (address.is_multicast, "multicast"),
                        (address.version == 4 and address in _CGNAT, "carrier-grade NAT (100.64.0.0/10)"),
                        (address.is_reserved, "reserved"), (address.is_private, "private"),
                        (not address.is_global, "not public")):
        if test:
            return f"a {words} address"
    return None


def _carried_ipv4(address: ipaddress.IPv6Address) -> ipaddress.IPv4Address | None:
    """The IPv4 address an IPv6 one stands for: mapped, NAT64, 6to4 or Teredo (the client's)."""
    if address.ipv4_mapped is not None:
        return address.ipv4_mapped
    if address in _NAT64:
        return ipaddress.IPv4Address(int(address) & 0xFFFFFFFF)
    if address.sixtofour is not None:
        return address.sixtofour
    if address.teredo is not None:
        return address.teredo[1]
    return None


def numeric_host(host: str) -> Address | None:
    """``host`` as an address if it is one in any spelling the resolver accepts, else None."""
    try:
        return ipaddress.ip_address(host.split("%", 1)[0])
    except ValueError:
        pass
    try:  # decimal, hex, octal and short forms: 2130706433, 0x7f000001, 0177.0.0.1, 127.1
        return ipaddress.IPv4Address(socket.inet_aton(host))
    except (OSError, ValueError):
        return None


def _resolve(host: str, port: int, field: str) -> list[Address]:
    literal = numeric_host(host)
    if literal is not None:
        return [literal]
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except (OSError, UnicodeError):
        raise InputError("the URL's host does not resolve", field=field, found=host) from None
    addresses = []
    for info in infos:
        address = ipaddress.ip_address(info[4][0].split("%", 1)[0])
        if address not in addresses:
            addresses.append(address)
    if not addresses:
        raise InputError("the URL's host does not resolve", field=field, found=host)
    return addresses


def _split(url: str, field: str) -> tuple[str, str, int, str]:
    try:
        parts = urlsplit(url)
        host, port = parts.hostname, parts.port
    except ValueError:
        parts, host, port = None, None, None
    if (parts is None or parts.scheme not in ("http", "https") or not host or parts.username is not None
            or any(c.isspace() or not c.isprintable() for c in url)):
        raise InputError("not an http(s) URL with a host (and no user:password@)", field=field,
                         expected="http://host/... or https://host/...", found=repr(url[:200]))
    path = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
    return parts.scheme, host, port or (443 if parts.scheme == "https" else 80), path


def check_url(url: str, allow: AllowList | str = "", *, field: str = "webhook_url") -> Target:
    """``url`` checked and pinned (see the module docstring); ``InputError`` naming ``field`` if refused."""
    allow = allow if isinstance(allow, AllowList) else AllowList.parse(allow)
    scheme, host, port, path = _split(url, field)
    addresses = _resolve(host, port, field)
    if not allow.allows_host(host):
        for address in addresses:
            reason = blocked_reason(address)
            if reason and not allow.allows(address):
                raise InputError(f"the URL's host is {reason}: the farm does not send requests into its own "
                                 f"network (an operator may allow it with {ALLOW_ENV})", field=field, found=host)
    return Target(url, scheme, host, port, path, str(addresses[0]))


def inside(target: Target) -> bool:
    """Whether ``target`` was let through only by the allow-list (its address is not public)."""
    return blocked_reason(ipaddress.ip_address(target.address.split("%", 1)[0])) is not None


class TooLarge(InputError):
    """What ``fetch`` raises when the answer is larger than it may be (declared, or once streamed)."""


def fetch(target: Target, dest, *, max_bytes: int, timeout_s: float, total_s: float,
          field: str) -> tuple[int, str]:
    """GET ``target`` (pinned to its checked address) into the file ``dest``: (HTTP status, content type).
    Only a 200's body is written; ``TooLarge`` past ``max_bytes`` (declared or counted while it streams),
    ``TimeoutError`` past ``total_s`` in all; ``OSError`` / ``http.client.HTTPException`` without an answer."""
    connection = _connection(target, timeout_s)
    deadline = time.monotonic() + total_s
    try:
        connection.request("GET", target.path, headers={"User-Agent": "lipfarm", "Accept": "audio/*, video/*, */*"})
        response = connection.getresponse()
        kind = (response.getheader("Content-Type") or "").split(";")[0].strip().lower()
        if response.status != 200:
            return response.status, kind
        declared = response.getheader("Content-Length") or ""
        if declared.isdigit() and int(declared) > max_bytes:
            raise TooLarge("the answer is larger than an audio upload may be", field=field,
                           expected=f"at most {max_bytes} bytes", found=f"{declared} bytes declared")
        _stream(response, dest, max_bytes=max_bytes, deadline=deadline, field=field)
        return response.status, kind
    finally:
        connection.close()


def _stream(response, dest, *, max_bytes: int, deadline: float, field: str) -> None:
    total = 0
    with open(dest, "wb") as out:
        while chunk := response.read(64 * 1024):
            total += len(chunk)
            if total > max_bytes:
                raise TooLarge("the answer is larger than an audio upload may be", field=field,
                               expected=f"at most {max_bytes} bytes", found=f"more than {max_bytes} bytes")
            if time.monotonic() > deadline:
                raise TimeoutError("the download took too long")
            out.write(chunk)


def _connection(target: Target, timeout_s: float) -> http.client.HTTPConnection:
    """A connection to ``target``'s checked address, naming its host (Host header, SNI, certificate)."""
    if target.scheme == "https":
        connection = http.client.HTTPSConnection(target.host, target.port, timeout=timeout_s,
                                                 context=ssl.create_default_context())
    else:
        connection = http.client.HTTPConnection(target.host, target.port, timeout=timeout_s)
    pinned = (target.address, target.port)
    # http.client connects through this attribute: the socket goes to the checked address, while the
    # Host header, SNI and the certificate check still use the URL's host name
    connection._create_connection = lambda _where, *args, **kwargs: socket.create_connection(pinned, *args, **kwargs)
    return connection


def post(target: Target, body: bytes, headers: dict[str, str], *, timeout_s: float) -> int:
    """POST ``body`` to the checked address of ``target``; the answer's HTTP status (redirects are
    answers like any other: not followed). Raises ``OSError`` / ``http.client.HTTPException``
    when there is no answer."""
    connection = _connection(target, timeout_s)
    try:
        connection.request("POST", target.path, body=body, headers=headers)
        response = connection.getresponse()
        response.read(64 * 1024)
        return response.status
    finally:
        connection.close()
