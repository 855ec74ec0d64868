"""Checked extraction of uploaded archives: real malicious archives, built here, are refused."""

from __future__ import annotations

import gzip
import io
import os
import stat
import struct
import tarfile
import warnings
import zipfile

import pytest

from lipfarm.api.archive import ArchiveError, extract_checked
from lipfarm.common.errors import InputError

LIMITS = dict(max_members=50, max_total_bytes=50 << 20, max_ratio=100.0)
BOMB = 200 << 20  # 200 MiB of zeros


@pytest.fixture
def dest(tmp_path):
    (tmp_path / "out").mkdir()
    (tmp_path / "in").mkdir()
    return tmp_path / "out" / "avatar"


def assert_nothing_left(dest):
    """No destination and no hidden staging folder beside it: the parent is as empty as before."""
    assert not dest.exists()
    assert list(dest.parent.iterdir()) == []


def refuse(archive, dest, match, **limits):
    with pytest.raises(ArchiveError, match=match) as caught:
        extract_checked(archive, dest, **{**LIMITS, **limits})
    assert_nothing_left(dest)
    return str(caught.value)


def make_tar(path, entries, mode="w"):
    """``entries``: ``(name, bytes)`` for files, or ready ``TarInfo`` headers (links, devices)."""
    with tarfile.open(path, mode) as tar:
        for entry in entries:
            if isinstance(entry, tarfile.TarInfo):
                tar.addfile(entry)
            else:
                info = tarfile.TarInfo(entry[0])
                info.size = len(entry[1])
                tar.addfile(info, io.BytesIO(entry[1]))
    return path


def make_zip(path, entries):
    """``entries``: ``(name or ZipInfo, bytes)``, deflated."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # zipfile warns on the duplicate names we write on purpose
        with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as zf:
            for name, data in entries:
                zf.writestr(name, data)
    return path


def tar_special(name, kind, linkname=""):
    info = tarfile.TarInfo(name)
    info.type, info.linkname = kind, linkname
    return info


def tree(root):
    return {p.relative_to(root).as_posix(): (None if p.is_dir() else p.read_bytes())
            for p in root.rglob("*")}


# --- a fine archive ----------------------------------------------------------------------------

@pytest.mark.parametrize("kind", ["tar", "tar.gz", "tar.bz2", "tar.xz", "zip"])
def test_nested_folders_extract_exactly(tmp_path, dest, kind):
    source = tmp_path / "src"
    files = {"avatar.json": b'{"name": "a"}', "frames/000000.jpg": os.urandom(3000),
             "frames/000001.jpg": os.urandom(2000), "deep/er/still/x.lms": b"1 2\n" * 110}
    for name, data in files.items():
        (source / name).parent.mkdir(parents=True, exist_ok=True)
        (source / name).write_bytes(data)
    (source / "empty").mkdir()
    upload = tmp_path / "in" / "upload.bin"  # the format is found from the content, not the name
    if kind == "zip":
        with zipfile.ZipFile(upload, "w", zipfile.ZIP_DEFLATED) as zf:
            for path in sorted(source.rglob("*")):
                zf.write(path, path.relative_to(source).as_posix())
    else:
        mode = {"tar": "w", "tar.gz": "w:gz", "tar.bz2": "w:bz2", "tar.xz": "w:xz"}[kind]
        with tarfile.open(upload, mode) as tar:
            tar.add(source, arcname=".")  # as `tar -C src .` makes it: "./", "./frames/..."
    names = extract_checked(upload, dest, **LIMITS)
    expected = tree(source)
    assert tree(dest) == expected
    assert sorted(names) == sorted(expected)
    assert sorted(p.name for p in dest.parent.iterdir()) == ["avatar"]  # no staging left beside it


def test_into_an_existing_empty_folder_and_not_a_full_one(tmp_path, dest):
    upload = make_tar(tmp_path / "in" / "up.tar", [("a.txt", b"a")])
    dest.mkdir()
    assert extract_checked(upload, dest, **LIMITS) == ["a.txt"]
    with pytest.raises(ArchiveError, match="avatar: destination exists and is not an empty folder"):
        extract_checked(upload, dest, **LIMITS)
    assert tree(dest) == {"a.txt": b"a"}


# --- names that leave the folder ---------------------------------------------------------------

def test_traversal_message_names_archive_member_and_rule(tmp_path, dest):
    upload = make_tar(tmp_path / "in" / "upload.tar", [("fine.txt", b"ok"), ("../etc/passwd", b"root::0:0")])
    message = refuse(upload, dest, "path escapes")
    assert message.endswith("upload.tar: member '../etc/passwd': path escapes the archive "
                            "(expected a relative path inside it)")
    assert isinstance(ArchiveError("x"), InputError)
    assert not (tmp_path / "out" / "etc").exists() and not (tmp_path / "etc").exists()


@pytest.mark.parametrize("fmt", ["tar", "zip"])
@pytest.mark.parametrize("name, match", [
    ("../x", "path escapes the archive"),
    ("a/../../x", "path escapes the archive"),
    ("a/../b", "path escapes the archive"),  # inside, but `..` is never needed
    ("/abs/x", "path is absolute"),
    ("C:/x", "path is absolute"),
    ("..\\x", "name has a backslash"),
    ("a\nb", "control characters"),
])
def test_names_leaving_the_folder_are_refused(tmp_path, dest, fmt, name, match):
    entries = [("ok.txt", b"ok"), (name, b"evil")]
    upload = tmp_path / "in" / f"up.{fmt}"
    make_tar(upload, entries) if fmt == "tar" else make_zip(upload, entries)
    message = refuse(upload, dest, match)
    assert f"member {name!r}" in message


# --- links and special files -------------------------------------------------------------------

@pytest.mark.parametrize("member, match", [
    (tar_special("link", tarfile.SYMTYPE, "/etc/passwd"), r"member 'link': is a symbolic link \(to '/etc/passwd'\)"),
    (tar_special("hard", tarfile.LNKTYPE, "ok.txt"), r"member 'hard': is a hard link \(to 'ok.txt'\)"),
    (tar_special("tty", tarfile.CHRTYPE), "member 'tty': is a device"),
    (tar_special("disk", tarfile.BLKTYPE), "member 'disk': is a device"),
    (tar_special("pipe", tarfile.FIFOTYPE), "member 'pipe': is a FIFO"),
])
def test_tar_links_and_special_members_are_refused(tmp_path, dest, member, match):
    upload = make_tar(tmp_path / "in" / "up.tar", [("ok.txt", b"ok"), member])
    refuse(upload, dest, match + r".*\(expected regular files and folders only\)")


def test_tar_symlink_then_write_through_it_is_refused_at_the_link(tmp_path, dest):
    upload = make_tar(tmp_path / "in" / "up.tar.gz", [tar_special("d", tarfile.SYMTYPE, str(tmp_path)),
                                                      ("d/planted.txt", b"x")], mode="w:gz")
    refuse(upload, dest, "member 'd': is a symbolic link")
    assert not (tmp_path / "planted.txt").exists()


@pytest.mark.parametrize("mode, match", [(stat.S_IFLNK | 0o777, "is a symbolic link"),
                                         (stat.S_IFCHR | 0o600, "is a device, FIFO or socket")])
def test_zip_symlink_and_device_members_are_refused(tmp_path, dest, mode, match):
    info = zipfile.ZipInfo("link")
    info.create_system, info.external_attr = 3, mode << 16
    upload = make_zip(tmp_path / "in" / "up.zip", [("ok.txt", b"ok"), (info, b"/etc/passwd")])
    refuse(upload, dest, f"member 'link': {match}")


# --- duplicates and counts ---------------------------------------------------------------------

@pytest.mark.parametrize("fmt", ["tar", "zip"])
@pytest.mark.parametrize("names, match", [
    (["a.txt", "a.txt"], "member 'a.txt': appears twice"),
    (["a.txt", "./a.txt"], r"member './a.txt': appears twice"),
    (["dir/a", "dir//a"], "member 'dir//a': appears twice"),
    (["a", "a/b"], "member 'a/b': is both a file and a folder"),
    (["a/b", "a"], "member 'a': is both a file and a folder"),
])
def test_duplicate_and_clashing_names_are_refused(tmp_path, dest, fmt, names, match):
    entries = [(name, name.encode()) for name in names]
    upload = tmp_path / "in" / f"up.{fmt}"
    make_tar(upload, entries) if fmt == "tar" else make_zip(upload, entries)
    refuse(upload, dest, match)


@pytest.mark.parametrize("fmt", ["tar.gz", "zip"])
def test_too_many_members(tmp_path, dest, fmt):
    entries = [(f"f{i}.txt", b"x") for i in range(6)]
    upload = tmp_path / "in" / f"up.{fmt}"
    make_tar(upload, entries, mode="w:gz") if fmt == "tar.gz" else make_zip(upload, entries)
    refuse(upload, dest, r"has more members than allowed \(expected at most 5, found (6|more than 5)\)",
           max_members=5)
    assert extract_checked(upload, dest, **{**LIMITS, "max_members": 6})  # the limit is exact


# --- decompression bombs -----------------------------------------------------------------------

def tar_gz_bomb(path, size=BOMB, header=None):
    """A real .tar.gz of one ``size``-byte member of zeros, about ``size / 1000`` bytes on disk.

    Built without compressing ``size`` bytes: a gzip file may be several gzip members end to end,
    so one compressed MiB of zeros is repeated. ``tar xzf`` would really write ``size`` bytes.
    ``header`` replaces the member's header (its size must be ``size``).
    """
    info = header or tarfile.TarInfo("zeros.bin")
    info.size = size
    mib = gzip.compress(bytes(1 << 20), compresslevel=9)
    with open(path, "wb") as out:
        out.write(gzip.compress(info.tobuf(tarfile.GNU_FORMAT)))
        for _ in range(size >> 20):
            out.write(mib)
        out.write(gzip.compress(bytes(tarfile.RECORDSIZE)))  # the end-of-archive blocks
    return path


@pytest.fixture(scope="module")
def zip_bomb(tmp_path_factory):
    """A real .zip of one 200 MiB member of zeros, deflated to about 200 KB."""
    path = tmp_path_factory.mktemp("bomb") / "bomb.zip"
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED, compresslevel=9) as zf:
        with zf.open("zeros.bin", "w") as out:
            chunk = bytes(1 << 20)
            for _ in range(BOMB >> 20):
                out.write(chunk)
    return path


def test_tar_gz_bomb_is_refused_by_its_ratio_before_inflating(tmp_path, dest):
    upload = tar_gz_bomb(tmp_path / "in" / "bomb.tgz")
    assert os.path.getsize(upload) < BOMB / 500
    with tarfile.open(upload) as tar:  # it is what it claims: a 200 MiB member
        assert tar.next().size == BOMB
    refuse(upload, dest, r"bomb.tgz: the archive expands more than a decompression-bomb limit allows "
                         r"\(expected a ratio of at most 100, found 209715200 bytes declared in a \d+-byte",
           max_total_bytes=1 << 40)


def test_tar_gz_bomb_is_refused_by_its_declared_size(tmp_path, dest):
    upload = tar_gz_bomb(tmp_path / "in" / "bomb.tgz")
    refuse(upload, dest, r"member 'zeros.bin': members declare more bytes in total than allowed "
                         r"\(expected at most 104857600 bytes, found 209715200 bytes",
           max_total_bytes=100 << 20, max_ratio=1e9)


def test_zip_bomb_is_refused_by_its_member_ratio(zip_bomb, dest):
    assert os.path.getsize(zip_bomb) < BOMB / 500
    refuse(zip_bomb, dest, r"member 'zeros.bin': expands more than a decompression-bomb limit allows "
                           r"\(expected a ratio of at most 100, found 209715200 bytes from \d+",
           max_total_bytes=1 << 40)


def test_zip_bomb_is_refused_by_its_declared_size(zip_bomb, dest):
    refuse(zip_bomb, dest, "member 'zeros.bin': members declare more bytes in total than allowed",
           max_total_bytes=100 << 20, max_ratio=1e9)


def test_small_archives_are_not_judged_by_ratio(tmp_path, dest):
    upload = make_zip(tmp_path / "in" / "up.zip", [("spaces.txt", b" " * 100_000)])  # ~1000x, 100 KB
    assert extract_checked(upload, dest, **LIMITS) == ["spaces.txt"]


def patch_declared_size(path, member, size):
    """Rewrite ``member``'s uncompressed size in its local header and its central directory entry."""
    data = bytearray(path.read_bytes())
    with zipfile.ZipFile(path) as zf:
        local = zf.getinfo(member).header_offset
    assert data[local:local + 4] == b"PK\x03\x04"
    struct.pack_into("<I", data, local + 22, size)
    central = data.find(b"PK\x01\x02")
    while central >= 0:
        name_len = struct.unpack_from("<H", data, central + 28)[0]
        if data[central + 46:central + 46 + name_len] == member.encode():
            struct.pack_into("<I", data, central + 24, size)
        central = data.find(b"PK\x01\x02", central + 46)
    path.write_bytes(bytes(data))


@pytest.mark.parametrize("actual, declared, match", [
    (1 << 20, 1000, r"inflates to more than its declared size \(expected 1000 bytes, found more than 1000\)"),
    (1000, 2000, r"ends before its declared size \(expected 2000 bytes, found 1000\)"),
])
def test_zip_member_whose_declared_size_lies(tmp_path, dest, actual, declared, match):
    upload = make_zip(tmp_path / "in" / "liar.zip", [("first.txt", b"written before the lie"),
                                                     ("zeros.bin", bytes(actual))])
    patch_declared_size(upload, "zeros.bin", declared)
    with zipfile.ZipFile(upload) as zf:
        assert zf.getinfo("zeros.bin").file_size == declared  # the lie is in the directory
    refuse(upload, dest, "liar.zip: member 'zeros.bin': " + match)  # first.txt was written, then removed


# --- not an archive, or a damaged one ----------------------------------------------------------

def test_unknown_format(tmp_path, dest):
    upload = tmp_path / "in" / "upload.zip"
    upload.write_bytes(b"just some text, not an archive\n" * 40)
    refuse(upload, dest, r"upload.zip: unknown archive format \(expected a .zip, .tar, .tar.gz, "
                         r".tar.bz2 or .tar.xz archive, found first bytes b'just som'\)")
    upload.write_bytes(b"")
    refuse(upload, dest, r"unknown archive format .*found an empty file")


def test_damaged_archives_are_input_errors(tmp_path, dest):
    not_tar = tmp_path / "in" / "text.gz"
    not_tar.write_bytes(gzip.compress(b"hello, not a tar\n" * 100))
    refuse(not_tar, dest, "text.gz: damaged or truncated archive")
    whole = make_tar(tmp_path / "in" / "up.tgz", [("a.bin", os.urandom(100_000))], mode="w:gz")
    cut = tmp_path / "in" / "cut.tgz"
    cut.write_bytes(whole.read_bytes()[:50_000])
    refuse(cut, dest, "cut.tgz: .*damaged or truncated archive")


def test_oversized_tar_header_is_refused_by_the_stream_budget(tmp_path, dest):
    """A 200 MiB pax header declares no member size, yet tarfile would read it all into memory."""
    header = tarfile.TarInfo("././@PaxHeader")
    header.type, header.size = tarfile.XHDTYPE, BOMB
    upload = tar_gz_bomb(tmp_path / "in" / "pax.tgz", header=header)
    refuse(upload, dest, r"pax.tgz: inflates to more data than its members declare \(expected at most \d+ bytes\)",
           max_total_bytes=1 << 20, max_ratio=1e9)
