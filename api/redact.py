"""What a client must not read in an answer: the farm's storage URL and its server paths.

Errors raised deep down say where things are for the operator ("no object 'x' in
file:///srv/lipfarm/storage", "cannot read /tmp/lipfarm-upload-abc/part-1"); a client of the API gets
the same sentence with the storage named "the farm's storage" and a server path cut to its file
name. ``Redactor.text`` is applied to every error body and to a job's ``reason``.
"""

from __future__ import annotations

import re
import tempfile
from pathlib import Path

from lipfarm.common.config import Settings

STORAGE_WORDS = "the farm's storage"
# an absolute path under one of the roots: up to the next character that cannot be part of one
_PATH_TAIL = r"(?:/[^\s'\"`,;:()\[\]{}<>]*)*"


class Redactor:
    """Rewrites text for clients of one farm (see the module docstring)."""

    def __init__(self, settings: Settings) -> None:
        self.storage_urls = _storage_spellings(settings.storage_url)
        roots = {str(Path(root)) for root in (tempfile.gettempdir(), settings.home, settings.work_dir,
                                              settings.cache_dir, settings.avatars_dir) if str(root) not in ("", "/")}
        alternatives = "|".join(re.escape(root) for root in sorted(roots, key=len, reverse=True))
        self._paths = re.compile(f"(?:file://)?(?:{alternatives}){_PATH_TAIL}") if alternatives else None

    def text(self, text: str, *, storage_urls: tuple[str, ...] = ()) -> str:
        """``text`` with storage URLs (the farm's, and ``storage_urls``: a job's own) and server paths hidden."""
        if not text:
            return text
        for url in sorted({*self.storage_urls, *(s for u in storage_urls for s in _storage_spellings(u))},
                          key=len, reverse=True):
            text = text.replace(url, STORAGE_WORDS)
        if self._paths is not None:
            text = self._paths.sub(lambda match: _file_name(match.group(0)), text)
        return text


def _storage_spellings(url: str) -> tuple[str, ...]:
    """The ways an error may name a storage: as configured, and as the storage itself spells it."""
    if not url:
        return ()
    if url.startswith("s3://"):
        return (url.rstrip("/"),)
    local = url[len("file://"):] if url.startswith("file://") else url
    root = str(Path(local).expanduser().resolve())
    return tuple({url, f"file://{root}", root, local})


def _file_name(path: str) -> str:
    name = path.rstrip("/").rsplit("/", 1)[-1]
    return name if name and not name.startswith("lipfarm-") else "(a server path)"
