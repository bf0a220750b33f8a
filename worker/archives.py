"""Safe unpacking of a data set archive (tar, tar.gz/bz2/xz, zip) into a folder the caller owns.

Every member is checked before anything is written, and the archive is refused, with one reason per bad member,
when it holds: an absolute path or a ``..`` component (path traversal), a symlink or hardlink, a device, FIFO or
other special file, more members than allowed, more uncompressed bytes than allowed, or an uncompressed size out
of proportion to the archive's (a decompression bomb). While unpacking, the bytes really written are counted
again (a zip header can lie about sizes) and every target path is checked to lie inside the destination.

No torch, no database: plain files in, plain files out.
"""

from __future__ import annotations

import shutil
import stat
import tarfile
import zipfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import IO

CHUNK = 1024 * 1024
#: Below this many unpacked bytes the ratio check does not apply: a small archive cannot be a bomb, and tiny
#: text files compress far better than the data sets' images do.
RATIO_FLOOR = 1024 * 1024
MAX_REASONS = 20


class ArchiveRefused(Exception):
    """The archive is unsafe or unreadable; ``reasons`` says why (each naming the member)."""

    def __init__(self, reasons: list[str]) -> None:
        super().__init__("; ".join(reasons))
        self.reasons = reasons


@dataclass(frozen=True)
class Limits:
    max_members: int
    max_unpacked_bytes: int
    max_ratio: float


@dataclass(frozen=True)
class Member:
    """One regular file or folder to unpack: its checked relative name and its declared size."""

    name: str
    size: int
    is_dir: bool
    handle: tarfile.TarInfo | zipfile.ZipInfo


def safe_name(raw: str) -> str | None:
    """The member's name as a relative POSIX path, or None when it is absolute or climbs out (``..``)."""
    name = raw.replace("\\", "/")
    if name.startswith("/") or (len(name) > 1 and name[1] == ":"):
        return None
    parts = [p for p in PurePosixPath(name).parts if p not in ("", ".")]
    if not parts or ".." in parts:
        return None
    return "/".join(parts)


def _tar_members(archive: tarfile.TarFile) -> Iterator[tuple[str, tarfile.TarInfo, str | None]]:
    """(name, info, why it is refused or None) for each tar member."""
    for info in archive:
        if info.issym():
            yield info.name, info, f"symlink (to {info.linkname!r}); archives may hold only files and folders"
        elif info.islnk():
            yield info.name, info, f"hardlink (to {info.linkname!r}); archives may hold only files and folders"
        elif not (info.isfile() or info.isdir()):
            yield info.name, info, "a device, FIFO or other special file; archives may hold only files and folders"
        else:
            yield info.name, info, None


def _zip_members(archive: zipfile.ZipFile) -> Iterator[tuple[str, zipfile.ZipInfo, str | None]]:
    for info in archive.infolist():
        kind = stat.S_IFMT(info.external_attr >> 16)  # 0: no Unix type recorded (a plain file or folder)
        if kind == stat.S_IFLNK:
            yield info.filename, info, "symlink; archives may hold only files and folders"
        elif kind not in (0, stat.S_IFREG, stat.S_IFDIR):
            yield info.filename, info, "a device, FIFO or other special file; archives may hold only files and folders"
        else:
            yield info.filename, info, None


def check_members(entries: Iterator[tuple[str, tarfile.TarInfo | zipfile.ZipInfo, str | None]],
                  archive_size: int, limits: Limits) -> list[Member]:
    """Every member checked; raises ``ArchiveRefused`` with all the reasons (up to ``MAX_REASONS``)."""
    reasons: list[str] = []
    members: list[Member] = []
    seen: set[str] = set()
    total = 0
    for count, (raw, info, why) in enumerate(entries, start=1):
        if count > limits.max_members:
            reasons.append(f"more than {limits.max_members} members; split the data set or raise "
                           "HIPP_DATASET_MAX_MEMBERS")
            break
        name = safe_name(raw)
        if name is None:
            reasons.append(f"{raw!r}: absolute path or '..' (path traversal); use paths relative to the archive root")
            continue
        if why is not None:
            reasons.append(f"{name}: {why}")
            continue
        is_dir = info.isdir() if isinstance(info, tarfile.TarInfo) else info.is_dir()
        size = 0 if is_dir else (info.size if isinstance(info, tarfile.TarInfo) else info.file_size)
        if not is_dir and name in seen:
            reasons.append(f"{name}: appears more than once in the archive")
            continue
        seen.add(name)
        total += size
        members.append(Member(name, size, is_dir, info))
        if len(reasons) >= MAX_REASONS:
            break
    if not reasons:
        reasons += size_reasons(total, archive_size, limits)
    if reasons:
        raise ArchiveRefused(reasons[:MAX_REASONS])
    return members


def size_reasons(total: int, archive_size: int, limits: Limits) -> list[str]:
    if total > limits.max_unpacked_bytes:
        return [f"unpacks to {total} bytes, more than the {limits.max_unpacked_bytes} allowed "
                "(HIPP_DATASET_MAX_UNPACKED_BYTES)"]
    ratio = total / max(archive_size, 1)
    if total > RATIO_FLOOR and ratio > limits.max_ratio:
        return [f"unpacks to {total} bytes from {archive_size} ({ratio:.0f}x, more than {limits.max_ratio:g}x): "
                "refused as a decompression bomb"]
    return []


@contextmanager
def open_archive(path: Path) -> Iterator[tarfile.TarFile | zipfile.ZipFile]:
    if zipfile.is_zipfile(path):
        with zipfile.ZipFile(path) as z:
            yield z
        return
    if not tarfile.is_tarfile(path):
        raise ArchiveRefused(["not a tar or zip archive; pack the data set with tar (optionally gzip) or zip"])
    with tarfile.open(path, "r:*") as archive:
        yield archive


def unpack(path: Path, dest: Path, limits: Limits) -> list[str]:
    """Unpack ``path`` into ``dest`` (created, must be empty) after checking every member; returns the
    relative names of the files written. Raises ``ArchiveRefused``; on refusal ``dest`` is left empty."""
    dest.mkdir(parents=True, exist_ok=True)
    root = dest.resolve()
    try:
        with open_archive(path) as archive:
            entries = _zip_members(archive) if isinstance(archive, zipfile.ZipFile) else _tar_members(archive)
            members = check_members(entries, path.stat().st_size, limits)
            return _write_members(archive, members, root, limits)
    except ArchiveRefused:
        _empty(root)
        raise
    except (tarfile.TarError, zipfile.BadZipFile, OSError, EOFError, ValueError) as exc:
        _empty(root)
        raise ArchiveRefused([f"the archive is damaged or truncated ({exc}); pack it again"]) from None


def _write_members(archive: tarfile.TarFile | zipfile.ZipFile, members: list[Member], root: Path,
                   limits: Limits) -> list[str]:
    written: list[str] = []
    budget = limits.max_unpacked_bytes
    for m in members:
        target = (root / m.name).resolve()
        if root not in target.parents:  # a folder member turned into a way out: cannot happen, checked anyway
            raise ArchiveRefused([f"{m.name}: resolves outside the data set's folder"])
        if m.is_dir:
            target.mkdir(parents=True, exist_ok=True)
            continue
        target.parent.mkdir(parents=True, exist_ok=True)
        with _member_stream(archive, m) as src, open(target, "xb") as out:
            budget = _copy_capped(src, out, budget, m, limits)
        written.append(m.name)
    return written


@contextmanager
def _member_stream(archive: tarfile.TarFile | zipfile.ZipFile, m: Member) -> Iterator[IO[bytes]]:
    if isinstance(archive, zipfile.ZipFile):
        assert isinstance(m.handle, zipfile.ZipInfo)
        with archive.open(m.handle) as f:
            yield f
        return
    assert isinstance(m.handle, tarfile.TarInfo)
    stream = archive.extractfile(m.handle)
    if stream is None:
        raise ArchiveRefused([f"{m.name}: cannot be read as a file"])
    with stream:
        yield stream


def _copy_capped(src: IO[bytes], out: IO[bytes], budget: int, m: Member, limits: Limits) -> int:
    """Copy, counting the bytes really read against what is left of the unpacked-size budget."""
    while chunk := src.read(CHUNK):
        budget -= len(chunk)
        if budget < 0:
            raise ArchiveRefused([f"{m.name}: unpacks to more than the {limits.max_unpacked_bytes} bytes allowed "
                                  "(its header understated its size)"])
        out.write(chunk)
    return budget


def _empty(root: Path) -> None:
    for child in root.iterdir():
        if child.is_dir() and not child.is_symlink():
            shutil.rmtree(child, ignore_errors=True)
        else:
            child.unlink(missing_ok=True)
