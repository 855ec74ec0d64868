"""No requests into the farm's network (``common.netguard``): the table of refused URLs, the
allow-list, and a pinned POST to a real receiver on loopback.

The table is the one docs/bad-inputs.md shows: every spelling of a loopback, private, link-local,
CGNAT, multicast, unspecified, reserved or metadata address is refused naming the field, and
nothing is connected to (the receiver on loopback counts what reaches it).
"""

from __future__ import annotations

import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from lipfarm.common import netguard
from lipfarm.common.errors import InputError
from lipfarm.job import webhooks
from lipfarm.scheduler.submit import check_webhook_url

REFUSED = [  # (URL, what the address is)
    ("http://127.0.0.1/", "loopback"),
    ("http://127.0.0.1:6379/", "loopback"),
    ("http://2130706433/", "loopback"),  # decimal
    ("http://0x7f000001/", "loopback"),  # hex
    ("http://0177.0.0.1/", "loopback"),  # octal
    ("http://0x7f.0.0.1/", "loopback"),  # hex byte
    ("http://127.1/", "loopback"),  # short form
    ("http://0/", "unspecified"),
    ("http://0.0.0.0:8000/", "unspecified"),
    ("http://[::1]/", "loopback"),
    ("http://[::]/", "unspecified"),
    ("http://[::ffff:127.0.0.1]/", "loopback"),  # IPv4-mapped IPv6
    ("http://[::ffff:7f00:1]/", "loopback"),
    ("http://[::ffff:169.254.169.254]/", "metadata"),
    ("http://[64:ff9b::a9fe:a9fe]/", "metadata"),  # NAT64 of 169.254.169.254
    ("http://[2002:7f00:1::]/", "loopback"),  # 6to4 of 127.0.0.1
    ("http://localhost/", "loopback"),
    ("http://LOCALHOST:8080/", "loopback"),
    ("http://169.254.169.254/latest/meta-data/", "metadata"),
    ("http://2852039166/latest/meta-data/", "metadata"),  # 169.254.169.254, decimal
    ("http://[fd00:ec2::254]/", "metadata"),
    ("http://100.100.100.200/", "metadata"),
    ("http://169.254.1.1/", "link-local"),
    ("http://[fe80::1]/", "link-local"),
    ("http://10.0.0.1/", "private"),
    ("http://012.0.0.1/", "private"),  # octal 10.0.0.1
    ("http://172.16.5.4/", "private"),
    ("http://192.168.1.1/", "private"),
    ("http://[fc00::1]/", "private"),
    ("http://100.64.0.1/", "carrier-grade NAT"),
    ("http://100.127.255.254/", "carrier-grade NAT"),
    ("http://224.0.0.1/", "multicast"),
    ("http://[ff02::1]/", "multicast"),
    ("http://240.0.0.1/", "reserved"),
    ("http://255.255.255.255/", "reserved"),
    ("http://192.0.2.1/", "private"),  # documentation (TEST-NET-1)
]
MALFORMED = ["ftp://example.com/x", "https:///nohost", "http://user:pw@example.com/", "http://exa mple.com/",
             "javascript:alert(1)", "http://[::1/", "http://example.com:99999/", "file:///etc/passwd"]
PUBLIC = ["http://93.184.215.14/hook", "https://8.8.8.8:8443/x?y=1", "http://[2606:4700:4700::1111]/",
          "http://0x5db8d70e/"]  # 93.184.215.14, hex


@pytest.mark.parametrize("url,kind", REFUSED)
def test_addresses_inside_a_network_are_refused_in_every_spelling(url, kind):
    with pytest.raises(InputError) as caught:
        netguard.check_url(url)
    assert caught.value.field == "webhook_url" and kind in str(caught.value)
    with pytest.raises(InputError):  # what submissions call (the CLI's and the API's)
        check_webhook_url(url)


@pytest.mark.parametrize("url", MALFORMED)
def test_what_is_not_an_http_url_is_refused(url):
    with pytest.raises(InputError) as caught:
        netguard.check_url(url)
    assert caught.value.field == "webhook_url"


@pytest.mark.parametrize("url", PUBLIC)
def test_public_addresses_pass_pinned_to_the_address_checked(url):
    target = netguard.check_url(url)
    assert netguard.blocked_reason(netguard.numeric_host(target.address)) is None


def test_the_allow_list_lets_through_only_what_it_names():
    assert netguard.check_url("http://10.1.2.3:8080/x", "10.0.0.0/8").address == "10.1.2.3"
    assert netguard.check_url("http://0x0a010203/", " 10.0.0.0/8 ,").address == "10.1.2.3"
    assert netguard.check_url("http://[::1]/", "::1/128").address == "::1"
    assert netguard.check_url("http://localhost/", "localhost").address in ("127.0.0.1", "::1")
    for url, allow in [("http://10.1.2.3/", "192.168.0.0/16"), ("http://127.0.0.1/", "10.0.0.0/8"),
                       ("http://169.254.169.254/", "hooks.internal"), ("http://[::ffff:10.0.0.1]/", "::1/128")]:
        with pytest.raises(InputError, match="LIPFARM_OUTBOUND_ALLOW"):
            netguard.check_url(url, allow)
    for bad in ["10.0.0.0/33", "10.0.0.0/8 hooks", "not/a/cidr"]:
        with pytest.raises(InputError) as caught:
            netguard.AllowList.parse(bad)
        assert caught.value.field == "LIPFARM_OUTBOUND_ALLOW"


# ---------------------------------------------------------------------------------------------
# A real POST, to the address that was checked

@pytest.fixture
def receiver():
    seen: list[dict] = []

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self):
            body = self.rfile.read(int(self.headers["Content-Length"]))
            seen.append({"host": self.headers["Host"], "path": self.path, "body": body})
            status = 302 if self.path.startswith("/redirect") else 204
            self.send_response(status)
            if status == 302:
                self.send_header("Location", "http://127.0.0.1:6379/")
            self.send_header("Content-Length", "0")
            self.end_headers()

        def log_message(self, *args):
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield server.server_address[1], seen
    finally:
        server.shutdown()
        server.server_close()


def test_the_post_goes_to_the_checked_address_with_the_urls_host_name(receiver):
    port, seen = receiver
    # a name no resolver knows, pinned to the receiver: the connection never asks DNS again
    target = netguard.Target(f"http://hooks.example.invalid:{port}/h?x=1", "http", "hooks.example.invalid", port,
                             "/h?x=1", "127.0.0.1")
    assert netguard.post(target, b"{}", {"Content-Type": "application/json"}, timeout_s=5) == 204
    assert seen == [{"host": f"hooks.example.invalid:{port}", "path": "/h?x=1", "body": b"{}"}]


def test_redirects_are_answers_not_followed(receiver):
    port, seen = receiver
    url = f"http://127.0.0.1:{port}/redirect"
    assert webhooks.post(url, (b"{}", {}), timeout_s=5, allow="127.0.0.1/32") == (302, "HTTP 302")
    assert len(seen) == 1


def test_delivery_checks_the_url_again_and_sends_nothing_when_refused(receiver):
    port, seen = receiver
    url = f"http://127.0.0.1:{port}/hook"
    status, error = webhooks.post(url, (b"{}", {}), timeout_s=5)  # no allow-list: loopback is refused
    assert status == webhooks.REFUSED and error.startswith("refused") and seen == []
    assert webhooks.post(url, (b"{}", {}), timeout_s=5, allow="127.0.0.0/8") == (204, "")
    assert len(seen) == 1
