"""Local paths and any pyarrow filesystem URI (s3://, gs://, hdfs://, file://) behind one API."""

from __future__ import annotations

import posixpath
from pathlib import Path

import pyarrow.fs as pafs

from subq.errors import DataError


def resolve(location: str | Path) -> tuple[pafs.FileSystem, str]:
    """Return (filesystem, path) for a local path or a URI."""
    location = str(location)
    if "://" in location:
        try:
            return pafs.FileSystem.from_uri(location)
        except Exception as e:  # pyarrow raises several types for bad URIs
            raise DataError(f"cannot open filesystem for URI: {e}", source=location) from e
    return pafs.LocalFileSystem(), str(Path(location).expanduser().resolve())


def join(location: str, *parts: str) -> str:
    """Join path parts onto a local path or a URI, keeping the scheme."""
    if "://" in str(location):
        return posixpath.join(str(location), *parts)
    return str(Path(location).joinpath(*parts))


def exists(location: str) -> bool:
    fs, path = resolve(location)
    return fs.get_file_info(path).type != pafs.FileType.NotFound


def read_bytes(location: str) -> bytes:
    fs, path = resolve(location)
    info = fs.get_file_info(path)
    if info.type == pafs.FileType.NotFound:
        raise DataError("file not found", source=str(location))
    if info.type == pafs.FileType.Directory:
        raise DataError("is a directory, expected a file", source=str(location))
    try:
        with fs.open_input_stream(path) as f:
            return f.read()
    except OSError as e:
        raise DataError(f"cannot read: {e}", source=str(location)) from e


def write_bytes_atomic(location: str, data: bytes) -> None:
    """Write a whole file; on local disk via a temp file + rename so readers never see half a file."""
    fs, path = resolve(location)
    parent = posixpath.dirname(path) if "://" in str(location) else str(Path(path).parent)
    fs.create_dir(parent, recursive=True)
    if isinstance(fs, pafs.LocalFileSystem):
        tmp = path + ".tmp"
        with fs.open_output_stream(tmp) as f:
            f.write(data)
        fs.move(tmp, path)
    else:  # object stores write objects atomically
        with fs.open_output_stream(path) as f:
            f.write(data)


def makedirs(location: str) -> None:
    fs, path = resolve(location)
    fs.create_dir(path, recursive=True)


def list_files(location: str, suffix: str = "") -> list[str]:
    """Files directly under a directory (sorted), as paths usable with `resolve`'s filesystem."""
    fs, path = resolve(location)
    if fs.get_file_info(path).type != pafs.FileType.Directory:
        return []
    infos = fs.get_file_info(pafs.FileSelector(path, recursive=False))
    return sorted(i.path for i in infos if i.type == pafs.FileType.File and i.path.endswith(suffix))
