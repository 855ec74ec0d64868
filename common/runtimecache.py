"""The runtime cache: what making a session (or checking a model) costs, kept on disk across processes.

See ``common.runtime``'s docstring for what it holds and how entries are checked. It lives in a
module of its own so that ``common.models`` (which keeps its model checks here) and
``common.runtime`` can both use it without importing each other.
"""

from __future__ import annotations

import functools
import hashlib
import json
import logging
import os
import platform
import tempfile
import time
from pathlib import Path

log = logging.getLogger(__name__)

CACHE_DIR_ENV = "LIPFARM_RUNTIME_CACHE_DIR"
CACHE_FORMAT = 1
CACHE_MAX_ENTRIES = 64  # per backend folder
_STALE_TEMP_S = 24 * 3600  # a hidden temporary this old was left by a writer that died


def default_cache_dir() -> Path | None:
    """The runtime cache folder when the caller names none (``common.runtime``'s docstring), or None for no cache."""
    raw = os.environ.get(CACHE_DIR_ENV, "").strip()
    if raw:
        return None if raw.lower() in ("off", "none", "0") else Path(raw).expanduser()
    try:
        from lipfarm.common.config import load_settings

        return load_settings().cache_dir / "runtime"
    except Exception as exc:  # a malformed setting elsewhere must not stop a render: run uncached
        log.warning("runtime cache off: cannot read the settings (%s)", exc)
        return None


@functools.cache
def machine_fingerprint() -> dict[str, str]:
    """What a cached optimised graph or compiled model depends on in this machine: the CPU's
    architecture, model and instruction-set flags (their hash; the list is long)."""
    model = flags = ""
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as handle:
            for line in handle:
                name, _, value = line.partition(":")
                name = name.strip()
                if name == "model name" and not model:
                    model = value.strip()
                elif name in ("flags", "Features") and not flags:
                    flags = " ".join(sorted(value.split()))
                if model and flags:
                    break
    except OSError:
        pass
    return {"arch": platform.machine(), "cpu": model or platform.processor(),
            "cpu_flags": hashlib.sha256(flags.encode()).hexdigest()[:16]}


class RuntimeCache:
    """Entries under ``root/<kind>/``: ``<key>.json`` (the record) and, for most, a payload file
    ``<key><suffix>`` beside it. ``key`` is a hash of the entry's key parts (a JSON-able dict), which
    the record repeats in full and which must match on reading. See the module docstring."""

    def __init__(self, root: str | Path) -> None:
        self.root = Path(root)

    @staticmethod
    def key(parts: dict) -> str:
        return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()[:40]

    def paths(self, kind: str, parts: dict, suffix: str = "") -> tuple[Path, Path]:
        """The record's path and the payload's."""
        name = self.key(parts)
        return self.root / kind / f"{name}.json", self.root / kind / f"{name}{suffix}"

    def load(self, kind: str, parts: dict, *, suffix: str | None = None,
             read: bool = False) -> tuple[dict, Path | bytes | None] | None:
        """The record and payload of an intact entry (the payload's path, or its bytes with ``read``),
        or None: no entry, or a bad one, which is removed."""
        record_path, payload_path = self.paths(kind, parts, suffix or "")
        try:
            record = json.loads(record_path.read_bytes())
        except FileNotFoundError:
            return None
        except (OSError, ValueError) as exc:
            return self._bad(kind, parts, suffix, f"unreadable record ({exc})")
        if not isinstance(record, dict) or record.get("format") != CACHE_FORMAT or record.get("key") != parts:
            return self._bad(kind, parts, suffix, "stale or foreign record")
        if record.pop("record_sha256", None) != _record_digest(record):
            return self._bad(kind, parts, suffix, "record does not match its hash")
        payload: Path | bytes | None = None
        if suffix is not None:
            try:
                if read:
                    payload = payload_path.read_bytes()
                    digest = hashlib.sha256(payload).hexdigest()
                else:
                    with open(payload_path, "rb") as handle:
                        digest = hashlib.file_digest(handle, "sha256").hexdigest()
                    payload = payload_path
            except OSError as exc:
                return self._bad(kind, parts, suffix, f"unreadable payload ({exc})")
            if digest != record.get("payload_sha256"):
                return self._bad(kind, parts, suffix, "payload does not match its hash")
        try:
            os.utime(record_path)  # least recently used goes first
        except OSError:
            pass
        return record, payload

    def store(self, kind: str, parts: dict, record: dict, *, payload: Path | bytes | None = None,
              suffix: str = "") -> bool:
        """Write an entry (a payload file given by path is moved in). Never raises: a cache that
        cannot be written only costs the next process the build."""
        from lipfarm.common.fileio import write_bytes_atomically

        record_path, payload_path = self.paths(kind, parts, suffix)
        try:
            record = {"format": CACHE_FORMAT, "key": parts, **record}
            if isinstance(payload, bytes):
                write_bytes_atomically(payload_path, payload)
                record["payload_sha256"] = hashlib.sha256(payload).hexdigest()
            elif payload is not None:
                with open(payload, "rb") as handle:
                    record["payload_sha256"] = hashlib.file_digest(handle, "sha256").hexdigest()
                os.replace(payload, payload_path)
            record["record_sha256"] = _record_digest(record)
            write_bytes_atomically(record_path, json.dumps(record, indent=1, sort_keys=True).encode())
        except OSError as exc:
            log.warning("runtime cache: cannot write %s (%s)", record_path, exc)
            return False
        self._prune(record_path.parent)
        return True

    def drop(self, kind: str, parts: dict, suffix: str | None = None) -> None:
        for path in self.paths(kind, parts, suffix or ""):
            try:
                path.unlink(missing_ok=True)
            except OSError:
                pass

    def scratch(self, kind: str, suffix: str) -> Path:
        """A new empty hidden file in ``kind``'s folder, for a payload written by a library."""
        folder = self.root / kind
        folder.mkdir(parents=True, exist_ok=True)
        handle, name = tempfile.mkstemp(prefix=".build-", suffix=suffix, dir=folder)
        os.close(handle)
        return Path(name)

    def _bad(self, kind: str, parts: dict, suffix: str | None, why: str) -> None:
        log.warning("runtime cache: %s entry %s: %s; rebuilding it", kind, self.key(parts), why)
        self.drop(kind, parts, suffix)
        return None

    def _prune(self, folder: Path) -> None:
        try:
            records = sorted(folder.glob("*.json"), key=lambda p: p.stat().st_mtime)
            for record in records[:max(0, len(records) - CACHE_MAX_ENTRIES)]:
                for path in folder.glob(f"{record.stem}*"):
                    path.unlink(missing_ok=True)
            now = time.time()
            for temp in folder.glob(".*"):
                if now - temp.stat().st_mtime > _STALE_TEMP_S:
                    temp.unlink(missing_ok=True)
        except OSError:  # another process pruning at the same time
            pass


def _record_digest(record: dict) -> str:
    return hashlib.sha256(json.dumps(record, sort_keys=True).encode()).hexdigest()
