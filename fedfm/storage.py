"""The one way bytes move: read and write files by path or fsspec URI.

Writes are atomic: a reader sees the old object or the new one, never a half-written file. On local
disks that is write-to-temp, fsync, then link/rename in the same directory; object stores (s3, gs,
minio) publish an object only once its upload completes.
"""

from __future__ import annotations

import hashlib
import os
import tempfile
from collections.abc import Callable, MutableMapping
from pathlib import Path
from typing import BinaryIO

import fsspec

from fedfm.errors import StorageError
from fedfm.trust.grants import granted_options

# What a streamed copy holds in memory at a time.
COPY_CHUNK_BYTES = 8 << 20


def _is_local(uri: str) -> bool:
    return "://" not in uri or uri.startswith("file://")


def is_remote(uri: str) -> bool:
    """Storage reached over the network with credentials (s3, gs, ...), not a path."""
    return not _is_local(uri)


def _local_path(uri: str) -> Path:
    return Path(uri.removeprefix("file://"))


def _filesystem(uri: str):
    """(filesystem, path) for a remote ``uri``: with the tenant's credential to the federation's storage where
    the URI is in it (:mod:`fedfm.trust.grants`), else with the process's own settings."""
    options = granted_options(uri)
    if options is None:
        return fsspec.core.url_to_fs(uri)
    protocol = uri.split("://", 1)[0]
    fs = fsspec.filesystem(protocol, **options)
    return fs, fs._strip_protocol(uri)


def _at(uri: str, verb: str, local, remote):
    """``local(path)`` for a local file, ``remote(fs, path)`` through fsspec; errors become StorageError."""
    try:
        if _is_local(uri):
            return local(_local_path(uri))
        fs, path = _filesystem(uri)
        return remote(fs, path)
    except FileNotFoundError:
        raise StorageError(f"{uri} does not exist") from None
    except (OSError, ValueError, ImportError) as exc:
        raise StorageError(f"cannot {verb} {uri}: {exc}") from None
    except Exception as exc:  # fsspec implementations raise what they like for a URI they cannot use
        if _is_local(uri):
            raise
        raise StorageError(f"cannot {verb} {uri}: {_reason(exc)}") from None


def _reason(exc: BaseException) -> str:
    """An exception from an fsspec implementation, for a message: its type says more than its text."""
    return f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__


def read_bytes(uri: str | os.PathLike) -> bytes:
    return _at(os.fspath(uri), "read", Path.read_bytes, lambda fs, path: fs.cat_file(path))


def private_copy(uri: str | os.PathLike, limit: int | None = None, *,
                 file_sha256: bool = False) -> tuple[BinaryIO, str | None]:
    """A copy of ``uri`` in an unnamed temporary file of this process's (no path leads to it, so no one else
    can replace or change it once it is made), and with ``file_sha256`` the sha256 of its bytes; streamed in
    chunks, so memory holds one chunk whatever the file's size (the copy goes to the temporary directory,
    which should be disk: on a memory-backed one it costs memory again). More than ``limit`` bytes (the file
    grew since its size was checked) is a StorageError. The copy is deleted when the returned file is closed."""
    uri = os.fspath(uri)
    copy = tempfile.TemporaryFile(prefix="fedfm-copy-")
    digest, copied = hashlib.sha256() if file_sha256 else None, 0
    try:
        with _at(uri, "read", lambda path: path.open("rb"), lambda fs, path: fs.open(path, "rb")) as source:
            while chunk := source.read(COPY_CHUNK_BYTES):
                copied += len(chunk)
                if limit is not None and copied > limit:
                    raise StorageError(f"{uri} holds more than the {limit} bytes it may")
                if digest is not None:
                    digest.update(chunk)
                copy.write(chunk)
        copy.flush()
    except StorageError:
        copy.close()
        raise
    except OSError as exc:
        copy.close()
        raise StorageError(f"cannot read {uri}: {exc}") from None
    except Exception as exc:  # fsspec implementations raise what they like while reading
        copy.close()
        if _is_local(uri):
            raise
        raise StorageError(f"cannot read {uri}: {_reason(exc)}") from None
    return copy, None if digest is None else digest.hexdigest()


def exists(uri: str | os.PathLike) -> bool:
    return bool(_at(os.fspath(uri), "check", Path.exists, lambda fs, path: fs.exists(path)))


def size(uri: str | os.PathLike) -> int:
    """Bytes stored at ``uri`` (what moving it over the network costs)."""
    return int(_at(os.fspath(uri), "stat", lambda path: path.stat().st_size, lambda fs, path: fs.size(path)))


def write_bytes(uri: str | os.PathLike, data: bytes, *, overwrite: bool = False) -> None:
    """Write ``data`` to ``uri`` atomically. Without ``overwrite``, an existing object is an error."""
    write_file(uri, lambda path: Path(path).write_bytes(data), overwrite=overwrite)


def write_file(uri: str | os.PathLike, write: Callable[[str], object], *, overwrite: bool = False) -> None:
    """Publish at ``uri``, atomically, the file that ``write(path)`` writes at a local temporary path: a writer
    that streams (such as safetensors' ``save_file``) never holds the whole file in memory. Without
    ``overwrite``, an existing object is an error."""
    uri = os.fspath(uri)
    if _is_local(uri):
        _write_local(_local_path(uri), write, overwrite)
        return
    try:
        fs, path = _filesystem(uri)
        if not overwrite and fs.exists(path):
            raise StorageError(f"{uri} already exists; refusing to overwrite it")
        with tempfile.TemporaryDirectory(prefix="fedfm-upload-") as directory:
            local = os.path.join(directory, "file")
            write(local)
            fs.put_file(local, path)
    except StorageError:
        raise
    except (OSError, ValueError, ImportError) as exc:
        raise StorageError(f"cannot write {uri}: {exc}") from None
    except Exception as exc:  # fsspec implementations raise what they like for a URI they cannot use
        raise StorageError(f"cannot write {uri}: {_reason(exc)}") from None


def _write_local(path: Path, write: Callable[[str], object], overwrite: bool) -> None:
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    except OSError as exc:
        raise StorageError(f"cannot write {path}: {exc.strerror or exc}") from None
    tmp = Path(tmp_name)
    try:
        os.close(fd)
        write(tmp_name)
        with open(tmp, "rb") as written:
            os.fsync(written.fileno())
        if overwrite:
            os.replace(tmp, path)
        else:
            # link() fails if the target exists, so a concurrent writer cannot be clobbered either.
            os.link(tmp, path)
        _fsync_dir(path.parent)
    except FileExistsError:
        raise StorageError(f"{path} already exists; refusing to overwrite it") from None
    except OSError as exc:
        raise StorageError(f"cannot write {path}: {exc.strerror or exc}") from None
    finally:
        tmp.unlink(missing_ok=True)


def _fsync_dir(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


# Directories of files whose names and contents become environment variables of this process (and of the
# processes it starts), later directories winning; a variable already set keeps its value. A tenant's storage
# credentials (its Secrets) reach a multi-node fine-tune's Pods this way, as mounted Secret volumes, because a
# Kubeflow Trainer TrainJob cannot give them envFrom: the precedence of a Job's envFrom under its env.
CREDENTIAL_DIRS_ENV = "FEDFM_CREDENTIAL_DIRS"


def credentials_from_files(environ: MutableMapping[str, str] = os.environ) -> None:
    found: dict[str, str] = {}
    for directory in filter(None, environ.get(CREDENTIAL_DIRS_ENV, "").split(":")):
        for path in sorted(Path(directory).iterdir()):
            # a mounted Secret shows each key as a file (a link into its hidden ..data folder): keys only
            if path.name.isidentifier() and path.is_file():
                found[path.name] = path.read_text()
    for name, value in found.items():
        environ.setdefault(name, value)
    if environ is os.environ and any(name.startswith("FSSPEC_") for name in found):
        # fsspec reads its FSSPEC_* settings (an S3 endpoint, say) when it is imported, which was before this
        import fsspec.config

        fsspec.config.set_conf_env(fsspec.config.conf)
