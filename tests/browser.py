"""A headless-browser harness for page tests: Debian's chromium driven by playwright, and a live server.

    from tests.browser import chromium_page, live_server, screenshot

    def test_page(tmp_path):
        with live_server(app) as base, chromium_page(tmp_path) as page:
            page.goto(base + "/")
            ...
            screenshot(page, tmp_path / "page.png")

or with the fixtures (import them into the test module, or a conftest):

    from tests.browser import browser_page  # noqa: F401

    def test_page(browser_page): ...

The browser is the system's chromium (/usr/bin/chromium, or $LIPFARM_CHROMIUM), never one that
`playwright install` downloads; a test that needs it is skipped, with the reason, where it or the
playwright package is absent. Each page gets a fresh profile directory under tmp_path, so no state
(local storage, cache) leaks between tests or from the user's own browser.
"""

from __future__ import annotations

import contextlib
import functools
import http.server
import os
import shutil
import socket
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--disable-dev-shm-usage",
]


def chromium_path() -> Path | None:
    """The system chromium: $LIPFARM_CHROMIUM, else /usr/bin/chromium, else `chromium` on PATH."""
    env = os.environ.get("LIPFARM_CHROMIUM")
    candidates = [env] if env else ["/usr/bin/chromium", shutil.which("chromium") or ""]
    for c in candidates:
        if c and os.path.isfile(c) and os.access(c, os.X_OK):
            return Path(c)
    return None


def require_chromium() -> Path:
    """The chromium executable, or skip the calling test saying why."""
    path = chromium_path()
    if path is None:
        where = os.environ.get("LIPFARM_CHROMIUM") or "/usr/bin/chromium"
        pytest.skip(f"chromium not found at {where} (install Debian's `chromium` package, or set LIPFARM_CHROMIUM)")
    try:
        import playwright.sync_api  # noqa: F401
    except ImportError:
        pytest.skip(
            "the python `playwright` package is not installed (pip install playwright; no browser download needed)"
        )
    return path


class PageErrors(list):
    """Console errors and uncaught exceptions of a page, as strings (see `collect_errors`)."""


def collect_errors(page: Any, *, ignore: tuple[str, ...] = ()) -> PageErrors:
    """Start recording the page's console errors and uncaught exceptions; returns the (growing) list.

    `ignore` drops messages that contain any of its substrings (e.g. an optional asset's 404).
    """
    errors = PageErrors()

    def keep(text: str) -> None:
        if not any(s in text for s in ignore):
            errors.append(text)

    page.on("console", lambda msg: keep(f"console.{msg.type}: {msg.text}") if msg.type == "error" else None)
    page.on("pageerror", lambda exc: keep(f"pageerror: {exc}"))
    return errors


@contextlib.contextmanager
def chromium_page(
    tmp_path: Path | str | None = None,
    *,
    viewport: tuple[int, int] = (1280, 800),
    device_scale_factor: float = 1,
    color_scheme: str = "light",
    timeout_ms: float = 15_000,
    extra_args: list[str] | None = None,
) -> Iterator[Any]:
    """A playwright `Page` in a fresh headless chromium; the browser is closed on exit.

    The profile lives in a new directory under `tmp_path` (or a temporary directory removed on exit).
    Default timeouts are `timeout_ms` for actions and waits. Skips the test if chromium is absent.
    """
    exe = require_chromium()
    from playwright.sync_api import sync_playwright

    with contextlib.ExitStack() as stack:
        if tmp_path is None:
            base = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="lipfarm-browser-")))
        else:
            base = Path(tmp_path)
            base.mkdir(parents=True, exist_ok=True)
        profile = Path(tempfile.mkdtemp(prefix="chromium-profile-", dir=base))
        pw = stack.enter_context(sync_playwright())
        context = pw.chromium.launch_persistent_context(
            user_data_dir=str(profile),
            executable_path=str(exe),
            headless=True,
            args=CHROMIUM_ARGS + list(extra_args or []),
            viewport={"width": viewport[0], "height": viewport[1]},
            device_scale_factor=device_scale_factor,
            color_scheme=color_scheme,
            accept_downloads=False,
        )
        stack.callback(context.close)
        context.set_default_timeout(timeout_ms)
        page = context.pages[0] if context.pages else context.new_page()
        yield page


def screenshot(page: Any, path: Path | str, *, full_page: bool = True, selector: str | None = None) -> Path:
    """Save a PNG of the page (or of the first element matching `selector`) to `path`; returns the path.

    Animations are frozen and the caret hidden so that pictures of the same state look the same.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    options = {"path": str(path), "animations": "disabled", "caret": "hide"}
    if selector:
        page.locator(selector).first.screenshot(**options)
    else:
        page.screenshot(full_page=full_page, **options)
    return path


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def live_server(app: Any, *, host: str = "127.0.0.1", port: int | None = None, timeout_s: float = 15) -> Iterator[str]:
    """Serve an ASGI app with uvicorn on a background thread; yields its base URL ("http://host:port")."""
    import uvicorn

    port = port or free_port(host)
    config = uvicorn.Config(app, host=host, port=port, log_level="warning", lifespan="auto")
    server = uvicorn.Server(config)
    server.install_signal_handlers = lambda: None  # not the main thread
    thread = threading.Thread(target=server.run, name=f"live-server-{port}", daemon=True)
    thread.start()
    deadline = time.monotonic() + timeout_s
    while not server.started:
        if not thread.is_alive():
            raise RuntimeError(f"the test server on {host}:{port} failed to start")
        if time.monotonic() > deadline:
            server.should_exit = True
            raise TimeoutError(f"the test server on {host}:{port} did not start within {timeout_s} s")
        time.sleep(0.02)
    try:
        yield f"http://{host}:{port}"
    finally:
        server.should_exit = True
        thread.join(timeout_s)


@pytest.fixture
def browser_page(tmp_path):
    """A fresh headless chromium page for one test (skipped where chromium is absent)."""
    with chromium_page(tmp_path) as page:
        yield page


class _QuietNoStoreHandler(http.server.SimpleHTTPRequestHandler):
    """Static files with ``Cache-Control: no-store``, so the growing playlist is always re-read."""

    def end_headers(self) -> None:
        self.send_header("Cache-Control", "no-store")
        super().end_headers()

    def log_message(self, *args) -> None:
        pass


@contextlib.contextmanager
def serve_folder(folder: Path):
    """Serve ``folder`` over HTTP on a free loopback port, never cached (playlists grow)."""
    handler = functools.partial(_QuietNoStoreHandler, directory=str(folder))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)  # port 0: a free one
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()
