"""Local paths and any pyarrow filesystem URI (s3://, gs://, hdfs://, file://) behind one API."""

from __future__ import annotations

import contextlib
import os
import posixpath
from pathlib import Path
from typing import Optional

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


def absolute(location: Optional[str]) -> Optional[str]:
    """A local path made absolute (against this process's working directory); a URI or None as given. What a
    driver hands to Ray workers: on a joined cluster they do not run in the driver's working directory."""
    if not location or "://" in str(location):
        return location
    return os.path.abspath(os.path.expanduser(str(location)))


def join(location: str, *parts: str) -> str:
    """Join path parts onto a local path or a URI, keeping the scheme."""
    if "://" in str(location):
        return posixpath.join(str(location), *parts)
    return str(Path(location).joinpath(*parts))


def exists(location: str) -> bool:
    fs, path = resolve(location)
    return fs.get_file_info(path).type != pafs.FileType.NotFound


def read_bytes(location: str, limit: int | None = None) -> bytes:
    """The file's bytes (its first LIMIT bytes when given)."""
    fs, path = resolve(location)
    info = fs.get_file_info(path)
    if info.type == pafs.FileType.NotFound:
        raise DataError("file not found", source=str(location))
    if info.type == pafs.FileType.Directory:
        raise DataError("is a directory, expected a file", source=str(location))
    try:
        with fs.open_input_stream(path) as f:
            return f.read() if limit is None else f.read(limit)
    except OSError as e:
        raise DataError(f"cannot read: {e}", source=str(location)) from e


TEMP_PREFIX = "_tmp-"  # pyarrow's dataset discovery and `list_files` skip names starting with "_" or "."


FAULT_PAUSE_ENV = "SUBQ_FAULT_PAUSE_IN_WRITE"


def _write_all(fd: int, view: memoryview) -> None:
    import os

    while view:
        view = view[os.write(fd, view):]


def _fault_pause_in_write(path: str, fd: int, view: memoryview) -> None:
    """Fault injection for crash tests: with SUBQ_FAULT_PAUSE_IN_WRITE=<text> in the environment, a write whose file
    name contains <text> stops half-way (half its bytes in the temp file) until the process is killed."""
    import os

    text = os.environ.get(FAULT_PAUSE_ENV)
    if text and text in Path(path).name:
        import time

        _write_all(fd, view[:len(view) // 2])
        while True:
            time.sleep(60)


FAULT_SLOW_ENV = "SUBQ_FAULT_SLOW_WRITE"


def _fault_slow_write(path: str) -> None:
    """Fault injection for race tests: SUBQ_FAULT_SLOW_WRITE=<text>:<seconds> makes a write whose file name
    contains <text> take that long before it lands (slow network storage)."""
    import os

    spec = os.environ.get(FAULT_SLOW_ENV)
    if spec and ":" in spec:
        text, _, secs = spec.rpartition(":")
        if text and text in Path(path).name:
            import time

            time.sleep(float(secs))


def write_bytes_atomic(location: str, data: bytes) -> None:
    """Write a whole file so readers never see half of it. On local disk: a temp file named `_tmp-<unique>-<name>`
    beside it (unique per writer; skipped by every reader), fsync, rename, fsync of the directory. A kill between
    the steps leaves only a temp that readers skip and `sweep_temps` removes. Object stores write atomically."""
    import os
    import uuid

    fs, path = resolve(location)
    parent = posixpath.dirname(path) if "://" in str(location) else str(Path(path).parent)
    fs.create_dir(parent, recursive=True)
    if isinstance(fs, pafs.LocalFileSystem):
        tmp = str(Path(parent) / f"{TEMP_PREFIX}{uuid.uuid4().hex[:12]}-{Path(path).name}")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        try:
            _fault_pause_in_write(path, fd, memoryview(data))
            _write_all(fd, memoryview(data))
            os.fsync(fd)
        finally:
            os.close(fd)
        _fault_slow_write(path)
        os.replace(tmp, path)
        try:
            dfd = os.open(parent, os.O_RDONLY)
            try:
                os.fsync(dfd)
            finally:
                os.close(dfd)
        except OSError:  # some filesystems cannot fsync a directory
            pass
    else:  # object stores write objects atomically
        with fs.open_output_stream(path) as f:
            f.write(data)


class NoAtomicCreate(DataError):
    """The store offers no atomic create-if-absent (a conditional put) through pyarrow."""


def create_exclusive(location: str, data: bytes) -> bool:
    """Create the file with these bytes only if it does not exist, atomically: True when this call created it,
    False when it existed. Readers never see it half-written. Local disk: the bytes go to a unique temp (fsynced),
    then `link(temp, path)`, which fails if the path exists (O_EXCL semantics; on filesystems without hard links,
    `open(O_CREAT | O_EXCL)`). Object stores: pyarrow has no conditional put, so NoAtomicCreate is raised."""
    import errno
    import os
    import uuid

    fs, path = resolve(location)
    if not isinstance(fs, pafs.LocalFileSystem):
        raise NoAtomicCreate("this store offers no atomic create-if-absent (conditional put) through pyarrow",
                             source=str(location))
    parent = str(Path(path).parent)
    os.makedirs(parent, exist_ok=True)
    tmp = str(Path(parent) / f"{TEMP_PREFIX}{uuid.uuid4().hex[:12]}-{Path(path).name}")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
    try:
        _write_all(fd, memoryview(data))
        os.fsync(fd)
    finally:
        os.close(fd)
    try:
        _fault_slow_write(path)
        try:
            os.link(tmp, path)
        except FileExistsError:
            return False
        except OSError as e:
            if e.errno not in (errno.EPERM, errno.EOPNOTSUPP, errno.ENOTSUP, errno.EXDEV):
                raise
            try:  # no hard links here: exclusive open (a reader may see it empty for a moment)
                fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
            except FileExistsError:
                return False
            try:
                _write_all(fd, memoryview(data))
                os.fsync(fd)
            finally:
                os.close(fd)
        return True
    finally:
        try:
            os.unlink(tmp)
        except OSError:
            pass


def delete(location: str) -> bool:
    """Delete a file; False when it was not there."""
    fs, path = resolve(location)
    try:
        fs.delete_file(path)
        return True
    except (FileNotFoundError, OSError):
        return False


@contextlib.contextmanager
def open_atomic(location: str):
    """A binary stream for a whole file written piece by piece (large exports), with `write_bytes_atomic`'s
    guarantees: readers see the old file or the complete new one, never a part of it."""
    import os
    import uuid

    fs, path = resolve(location)
    parent = posixpath.dirname(path) if "://" in str(location) else str(Path(path).parent)
    fs.create_dir(parent, recursive=True)
    if not isinstance(fs, pafs.LocalFileSystem):
        with fs.open_output_stream(path) as f:  # object stores publish the object on close
            yield f
        return
    tmp = str(Path(parent) / f"{TEMP_PREFIX}{uuid.uuid4().hex[:12]}-{Path(path).name}")
    f = open(tmp, "xb")
    try:
        yield f
        f.flush()
        os.fsync(f.fileno())
        f.close()
        os.replace(tmp, path)
    except BaseException:
        f.close()
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise


def is_temp(name: str) -> bool:
    """A writer's temp (ours, or the `.tmp` suffix of older versions): never a finished file."""
    base = posixpath.basename(name)
    return base.startswith(TEMP_PREFIX) or base.endswith(".tmp")


def sweep_temps(location: str, recursive: bool = True) -> int:
    """Delete temps left by killed writers under a directory; returns how many. Call it only while holding the
    output's lease (a live writer's temp would otherwise go)."""
    fs, path = resolve(location)
    if fs.get_file_info(path).type != pafs.FileType.Directory:
        return 0
    n = 0
    for i in fs.get_file_info(pafs.FileSelector(path, recursive=recursive)):
        if i.type == pafs.FileType.File and is_temp(i.base_name):
            try:
                fs.delete_file(i.path)
                n += 1
            except OSError:
                pass
    return n


def makedirs(location: str) -> None:
    fs, path = resolve(location)
    fs.create_dir(path, recursive=True)


def list_files(location: str, suffix: str = "") -> list[str]:
    """Finished files directly under a directory (sorted; temps and `_`/`.` names skipped), as paths usable with
    `resolve`'s filesystem."""
    fs, path = resolve(location)
    if fs.get_file_info(path).type != pafs.FileType.Directory:
        return []
    infos = fs.get_file_info(pafs.FileSelector(path, recursive=False))
    return sorted(i.path for i in infos if i.type == pafs.FileType.File and i.path.endswith(suffix)
                  and not i.base_name.startswith(("_", ".")) and not is_temp(i.base_name))
