"""Checked extraction of uploaded archives: .zip, .tar, .tar.gz/.tgz, .tar.bz2, .tar.xz.

An archive uploaded over HTTP is hostile until proven otherwise. What it can do to a naive
``extractall``:

- zip-slip: a member named ``../../home/u/.bashrc`` or ``/etc/cron.d/x`` writes outside the folder;
- tar links: a symlink ``d -> /etc`` followed by a member ``d/passwd`` writes through the link, and a
  hard link can expose or alias a file outside; device and FIFO members make special files;
- decompression bombs: a few hundred KB that inflate to gigabytes (a high compression ratio), a
  zip whose declared sizes lie, or millions of tiny members.

Python helps: ``tarfile``'s ``data`` extraction filter (``filter="data"``, Python 3.12, backported to
3.11.4) refuses absolute names, names outside the destination, links leading outside and special
files; ``zipfile`` strips ``..`` and leading ``/`` when it extracts, caps every read at the member's
declared size and checks its CRC. We still scan the whole member list first, and write files
ourselves, because those guards act one member at a time *while* extracting (a refusal at member 900
leaves 899 written), because they quietly allow or rewrite what an upload never needs (symlinks
inside the tree; ``zipfile`` turns ``../x`` into ``x`` instead of refusing it), and because neither
limits the member count, the total size or the compression ratio. So: every rule below is checked
before anything is written; the extraction then counts the bytes of every member against its
declared size, writes into a hidden staging folder beside ``dest`` and renames it into place only
when all went well. Any refusal leaves ``dest`` as it was (absent, or an empty folder).

Refused: unknown formats; absolute names, ``..`` anywhere in a name, backslashes, control
characters; anything but regular files and folders (symlinks, hard links, devices, FIFOs, sparse
files); encrypted zip members; duplicate names (after normalising ``./`` and ``//``) and a name that
is both a file and a folder; more than ``max_members`` members; declared sizes adding up to more than
``max_total_bytes``; a member (zip) or the whole archive expanding more than ``max_ratio`` times
(judged only once over ``RATIO_FLOOR`` bytes: a small file of spaces is not a bomb); a member whose
data is longer or shorter than declared; a compressed tar stream longer than its members explain.
"""

from __future__ import annotations

import bz2
import copy
import gzip
import lzma
import os
import re
import shutil
import stat
import tarfile
import tempfile
import zipfile
import zlib
from contextlib import closing, contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO, Iterator

from lipfarm.common.errors import InputError

RATIO_FLOOR = 1 << 20  # below this many declared bytes a compression ratio is not judged
_CHUNK = 1 << 20
_TAR_OVERHEAD = 4096  # header, extended header and padding bytes a tar member may add to the stream
_MAGIC = ((b"PK\x03\x04", "zip"), (b"PK\x05\x06", "zip"), (b"\x1f\x8b", "gz"), (b"BZh", "bz2"),
          (b"\xfd7zXZ\x00", "xz"))
_OPENERS = {"tar": open, "gz": gzip.open, "bz2": bz2.open, "xz": lzma.open}
_ZIP_METHODS = {zipfile.ZIP_STORED, zipfile.ZIP_DEFLATED, zipfile.ZIP_BZIP2, zipfile.ZIP_LZMA}
_DAMAGE = (tarfile.TarError, zipfile.BadZipFile, zlib.error, lzma.LZMAError, EOFError, OSError)


class ArchiveError(InputError):
    """An uploaded archive that is refused: unsafe, too big, damaged or of an unknown format."""


@dataclass(frozen=True)
class _Limits:
    max_members: int
    max_total_bytes: int
    max_ratio: float
    archive_bytes: int


@dataclass(frozen=True)
class _Member:
    raw: str  # the name as stored in the archive
    name: str  # normalised relative POSIX path; "" for the archive's root folder ("./")
    is_dir: bool
    size: int  # declared uncompressed size


def extract_checked(archive: str | Path, dest: str | Path, *, max_members: int, max_total_bytes: int,
                    max_ratio: float) -> list[str]:
    """Extract ``archive`` into the folder ``dest`` (absent or empty) after checking every member.

    Returns the normalised names written (files and folders, in archive order). Raises
    ``ArchiveError`` naming the archive, the member and the rule; ``dest`` is then left as it was.
    """
    archive, dest = Path(archive), Path(dest)
    kind = archive_format(archive)
    _check_dest(dest)
    limits = _Limits(max_members, max_total_bytes, max_ratio, archive.stat().st_size)
    members = _scan_zip(archive, limits) if kind == "zip" else _scan_tar(archive, kind, limits)
    _extract(archive, kind, members, limits, dest)
    return [m.name for m in members if m.name]


def archive_format(path: Path) -> str:
    """``"zip"``, ``"tar"``, ``"gz"``, ``"bz2"`` or ``"xz"`` (a compressed tar), by content, not name."""
    try:
        with open(path, "rb") as handle:
            head = handle.read(tarfile.BLOCKSIZE)
    except OSError as exc:
        raise ArchiveError(f"cannot read the archive ({exc.strerror})", path=path) from None
    for magic, kind in _MAGIC:
        if head.startswith(magic):
            return kind
    if len(head) == tarfile.BLOCKSIZE and (_is_tar_header(head) or not head.strip(b"\0")):
        return "tar"
    raise ArchiveError("unknown archive format", path=path,
                       expected="a .zip, .tar, .tar.gz, .tar.bz2 or .tar.xz archive",
                       found=f"first bytes {head[:8]!r}" if head else "an empty file")


def _is_tar_header(block: bytes) -> bool:
    try:
        tarfile.TarInfo.frombuf(block, "utf-8", "surrogateescape")  # validates the checksum
    except tarfile.HeaderError:
        return False
    return True


def _check_dest(dest: Path) -> None:
    if dest.exists() and (not dest.is_dir() or any(dest.iterdir())):
        raise ArchiveError("destination exists and is not an empty folder", path=dest)


@contextmanager
def _damage_as_error(archive: Path, member: _Member | None = None) -> Iterator[None]:
    """Turn the decoders' own errors (bad CRC, truncated stream, bad header) into ``ArchiveError``."""
    try:
        yield
    except ArchiveError:
        raise
    except _DAMAGE as exc:
        raise ArchiveError(f"damaged or truncated archive ({exc})", path=archive,
                           field=None if member is None else f"member {member.raw!r}") from None


# --- names and member types -------------------------------------------------------------------

def _safe_name(archive: Path, raw: str) -> str:
    """``raw`` as a normalised relative path, or ``ArchiveError`` if it could leave the folder."""
    def refuse(problem: str, expected: str) -> ArchiveError:
        return ArchiveError(problem, path=archive, field=f"member {raw!r}", expected=expected)

    if any(ord(c) < 32 or c == "\x7f" for c in raw) or not _is_utf8(raw):
        raise refuse("name has control characters or is not UTF-8", "a printable UTF-8 name")
    if "\\" in raw:
        raise refuse("name has a backslash", "'/' as the only separator")
    if raw.startswith("/") or re.match(r"[A-Za-z]:", raw):
        raise refuse("path is absolute", "a relative path inside the archive")
    parts = [part for part in raw.split("/") if part not in ("", ".")]
    if ".." in parts:
        raise refuse("path escapes the archive", "a relative path inside it")
    if any(len(part.encode()) > 255 for part in parts):
        raise refuse("a name in the path is too long", "at most 255 bytes per name")
    return "/".join(parts)


def _is_utf8(text: str) -> bool:
    try:
        text.encode("utf-8")  # tar names that were not UTF-8 arrive with surrogate escapes
    except UnicodeEncodeError:
        return False
    return True


def _tar_member(archive: Path, info: tarfile.TarInfo) -> _Member:
    name = _safe_name(archive, info.name)
    if info.issym():
        problem = f"is a symbolic link (to {info.linkname!r})"
    elif info.islnk():
        problem = f"is a hard link (to {info.linkname!r})"
    elif info.ischr() or info.isblk():
        problem = "is a device"
    elif info.isfifo():
        problem = "is a FIFO"
    elif info.issparse():
        problem = "is a sparse file"
    elif info.isreg() or info.isdir():
        return _plain_member(archive, info.name, name, info.isdir(), info.size)
    else:
        problem = f"has an unsupported type {info.type!r}"
    raise ArchiveError(problem, path=archive, field=f"member {info.name!r}",
                       expected="regular files and folders only")


def _zip_member(archive: Path, info: zipfile.ZipInfo) -> _Member:
    name = _safe_name(archive, info.filename)
    mode = info.external_attr >> 16  # Unix mode, where the archiver recorded one
    problem = None
    if stat.S_ISLNK(mode):
        problem = "is a symbolic link"
    elif stat.S_IFMT(mode) and not (stat.S_ISREG(mode) or stat.S_ISDIR(mode)):
        problem = "is a device, FIFO or socket"
    elif info.flag_bits & 0x1:
        problem = "is encrypted"
    elif info.compress_type not in _ZIP_METHODS:
        problem = f"uses an unsupported compression method ({info.compress_type})"
    if problem:
        raise ArchiveError(problem, path=archive, field=f"member {info.filename!r}",
                           expected="plain or deflated regular files and folders only")
    return _plain_member(archive, info.filename, name, info.is_dir(), info.file_size)


def _plain_member(archive: Path, raw: str, name: str, is_dir: bool, size: int) -> _Member:
    if not name and not is_dir:
        raise ArchiveError("a file without a name", path=archive, field=f"member {raw!r}")
    return _Member(raw, name, is_dir, size)


# --- the scan: every rule, before anything is written -----------------------------------------

class _Tally:
    """The members seen so far, checked one at a time as the scan meets them."""

    def __init__(self, archive: Path, limits: _Limits) -> None:
        self.archive, self.limits = archive, limits
        self.members: list[_Member] = []
        self.total = 0
        self.files: set[str] = set()
        self.dirs: set[str] = set()  # named folders and the parents of every member
        self.named_dirs: set[str] = set()

    def add(self, member: _Member, compressed: int | None = None) -> None:
        self.members.append(member)
        if len(self.members) > self.limits.max_members:
            self.refuse_count(f"more than {self.limits.max_members}")
        self._check_name(member)
        self.total += member.size
        self._check_sizes(member, compressed)

    def refuse_count(self, found: object) -> None:
        raise ArchiveError("has more members than allowed", path=self.archive,
                           expected=f"at most {self.limits.max_members}", found=found)

    def _check_name(self, member: _Member) -> None:
        name, parents = member.name, _parents(member.name)
        if not name:
            return  # the archive's own root folder ("./")
        if name in self.files or name in self.named_dirs:
            self._refuse(member, "appears twice in the archive", "each name once")
        if (not member.is_dir and name in self.dirs) or any(p in self.files for p in parents):
            self._refuse(member, "is both a file and a folder", "each name either a file or a folder")
        (self.named_dirs if member.is_dir else self.files).add(name)
        self.dirs.update(parents + [name] if member.is_dir else parents)

    def _check_sizes(self, member: _Member, compressed: int | None) -> None:
        limits = self.limits
        if self.total > limits.max_total_bytes:
            self._refuse(member, "members declare more bytes in total than allowed",
                         f"at most {limits.max_total_bytes} bytes", f"{self.total} bytes up to this member")
        if compressed is not None and member.size > RATIO_FLOOR and member.size > limits.max_ratio * compressed:
            self._refuse(member, "expands more than a decompression-bomb limit allows",
                         f"a ratio of at most {limits.max_ratio:g}",
                         f"{member.size} bytes from {compressed} ({member.size / max(compressed, 1):.0f}x)")
        if self.total > RATIO_FLOOR and self.total > limits.max_ratio * limits.archive_bytes:
            raise ArchiveError(
                "the archive expands more than a decompression-bomb limit allows", path=self.archive,
                expected=f"a ratio of at most {limits.max_ratio:g}",
                found=f"{self.total} bytes declared in a {limits.archive_bytes}-byte archive "
                      f"({self.total / limits.archive_bytes:.0f}x)")

    def _refuse(self, member: _Member, problem: str, expected: str, found: str | None = None):
        raise ArchiveError(problem, path=self.archive, field=f"member {member.raw!r}",
                           expected=expected, found=found)


def _parents(name: str) -> list[str]:
    parts = name.split("/")
    return ["/".join(parts[:i]) for i in range(1, len(parts))]


def _scan_zip(archive: Path, limits: _Limits) -> list[_Member]:
    with _damage_as_error(archive), zipfile.ZipFile(archive) as zf:
        infos = zf.infolist()  # the central directory: names and sizes without inflating anything
    tally = _Tally(archive, limits)
    if len(infos) > limits.max_members:
        tally.refuse_count(len(infos))
    for info in infos:
        tally.add(_zip_member(archive, info), compressed=info.compress_size)
    return tally.members


def _scan_tar(archive: Path, kind: str, limits: _Limits) -> list[_Member]:
    """Headers one by one; a member's data is skipped (inflated) only after its header passed."""
    tally = _Tally(archive, limits)
    with _open_tar(archive, kind, limits) as tar, _damage_as_error(archive):
        for info in tar:
            tally.add(_tar_member(archive, info))
    return tally.members


class _BoundedReader:
    """The inflated tar stream, refused past ``limit`` bytes: headers and padding cannot hide a bomb."""

    def __init__(self, raw: BinaryIO, limit: int, archive: Path) -> None:
        self.raw, self.limit, self.archive, self.seen = raw, limit, archive, 0

    def read(self, size: int = -1) -> bytes:
        data = self.raw.read(self.limit + 1 - self.seen if size is None or size < 0 else size)
        self.seen += len(data)
        if self.seen > self.limit:
            raise ArchiveError("inflates to more data than its members declare", path=self.archive,
                               expected=f"at most {self.limit} bytes")
        return data


@contextmanager
def _open_tar(archive: Path, kind: str, limits: _Limits) -> Iterator[tarfile.TarFile]:
    """The tar read as a stream (``r|``) through our own decompressor, so every byte is counted."""
    limit = limits.max_total_bytes + (limits.max_members + 1) * _TAR_OVERHEAD + tarfile.RECORDSIZE
    with _OPENERS[kind](archive, "rb") as raw:
        with _damage_as_error(archive):
            tar = tarfile.open(fileobj=_BoundedReader(raw, limit, archive), mode="r|")
        with tar:
            yield tar


# --- the extraction: counted, staged, renamed into place --------------------------------------

def _extract(archive: Path, kind: str, members: list[_Member], limits: _Limits, dest: Path) -> None:
    dest.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{dest.name}.extract-", dir=dest.parent))
    try:
        entries = _zip_entries(archive, members) if kind == "zip" else _tar_entries(archive, kind, members, limits)
        with closing(entries):
            for member, stream in entries:
                _write_member(archive, member, stream, staging)
        os.replace(staging, dest)  # onto an absent or empty folder
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise


def _zip_entries(archive: Path, members: list[_Member]) -> Iterator[tuple[_Member, BinaryIO | None]]:
    with _damage_as_error(archive):
        zf = zipfile.ZipFile(archive)
    with zf:
        infos = zf.infolist()
        for i, member in enumerate(members):
            info = infos[i] if i < len(infos) else None
            _same_member(archive, member, None if info is None else info.filename)
            if member.is_dir:
                yield member, None
                continue
            # zipfile stops reading at the declared size (then checks the CRC); a read limit one
            # chunk beyond it lets our count see, and name, a member that inflates past it.
            probe = copy.copy(info)
            probe.file_size = info.file_size + _CHUNK + 1
            with _damage_as_error(archive, member):
                stream = zf.open(probe)
            with stream:
                yield member, stream


def _tar_entries(archive: Path, kind: str, members: list[_Member],
                 limits: _Limits) -> Iterator[tuple[_Member, BinaryIO | None]]:
    with _open_tar(archive, kind, limits) as tar:
        infos = iter(tar)
        for member in members:
            with _damage_as_error(archive, member):
                info = next(infos, None)
            _same_member(archive, member, None if info is None else info.name)
            yield member, None if member.is_dir else tar.extractfile(info)


def _same_member(archive: Path, member: _Member, found: str | None) -> None:
    if found != member.raw:  # the file was replaced between the scan and the extraction
        raise ArchiveError("archive changed while it was being extracted", path=archive,
                           field=f"member {member.raw!r}", found=found)


def _write_member(archive: Path, member: _Member, stream: BinaryIO | None, staging: Path) -> None:
    target = staging / member.name
    if member.is_dir:
        target.mkdir(parents=True, exist_ok=True)
        return
    target.parent.mkdir(parents=True, exist_ok=True)
    with open(target, "xb") as out:
        _copy_counted(archive, member, stream, out)


def _copy_counted(archive: Path, member: _Member, stream: BinaryIO, out: BinaryIO) -> None:
    """Copy a member's data, refusing it as soon as it runs past its declared size."""
    written = 0
    while True:
        with _damage_as_error(archive, member):
            chunk = stream.read(_CHUNK)
        if not chunk:
            break
        written += len(chunk)
        if written > member.size:
            raise ArchiveError("inflates to more than its declared size", path=archive,
                               field=f"member {member.raw!r}", expected=f"{member.size} bytes",
                               found=f"more than {member.size}")
        out.write(chunk)
    if written < member.size:
        raise ArchiveError("ends before its declared size", path=archive, field=f"member {member.raw!r}",
                           expected=f"{member.size} bytes", found=f"{written}")
