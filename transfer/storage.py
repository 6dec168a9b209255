"""One way to reach a path or URI (local, NFS, s3://, gs://): pyarrow.fs, with the standard credential chains."""

from __future__ import annotations

import functools
import glob as globlib
import os
import posixpath
import re
import tempfile
import urllib.parse
from collections.abc import Iterator
from contextlib import contextmanager
from fnmatch import fnmatchcase

import pyarrow.fs as pafs
import smart_open


def is_uri(location: str) -> bool:
    return "://" in location


def is_local(location: str) -> bool:
    """A path or file:// URI on this machine's own file system."""
    return not is_uri(location) or location.startswith("file://")


def absolute(location: str) -> str:
    """A URI as it is; a local path made absolute, so Ray workers on this node read the same place."""
    return location if is_uri(location) else os.path.abspath(os.path.expanduser(location))


def resolve(location: str) -> tuple[pafs.FileSystem, str]:
    """The filesystem and the path inside it for a local path or URI; one filesystem per bucket and process."""
    if is_local(location):
        return pafs.LocalFileSystem(), absolute(location.removeprefix("file://"))
    parts = urllib.parse.urlsplit(location)
    bucket = parts.hostname or ""
    return _filesystem(parts.scheme, parts.netloc, parts.query), bucket + parts.path


@functools.lru_cache(maxsize=32)
def _filesystem(scheme: str, netloc: str, query: str) -> pafs.FileSystem:
    # Made once: creating an S3 filesystem resolves the bucket's region with a request.
    return pafs.FileSystem.from_uri(f"{scheme}://{netloc}/" + (f"?{query}" if query else ""))[0]


def redact(location: str) -> str:
    """A location with any credentials in it (scheme://user:secret@host/...) hidden, for messages and files."""
    return re.sub(r"^([a-zA-Z][\w+.-]*://)[^/@]*@", r"\1***@", location)


def check_credentials(location: str) -> None:
    """Raises PermissionError when an s3:// location has no credentials in the standard chain.

    Without them S3 clients fall back to anonymous requests, whose errors do not say what is missing.
    """
    if location.startswith("s3://"):
        import boto3

        if boto3.Session().get_credentials() is None:
            raise PermissionError(
                "no AWS credentials found (AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY, a profile in ~/.aws, or an "
                "instance or pod role)"
            )


def read_object(location: str) -> bytes:
    """One whole object or file, through smart-open (the standard credential chains; AWS_ENDPOINT_URL)."""
    params = {"client": _s3_client()} if location.startswith("s3://") else {}
    with smart_open.open(location, "rb", compression="disable", transport_params=params) as f:
        return f.read()


@functools.lru_cache(maxsize=1)
def _s3_client():
    """One boto3 client per process (they are thread-safe): a new one per object costs more than the read."""
    import boto3

    return boto3.client("s3")


def join(location: str, *parts: str) -> str:
    return "/".join([location.rstrip("/"), *parts])


def beside(file: str, path: str) -> str:
    """Where a path written inside `file` (a manifest, a Parquet image column) points: a URI or an absolute path
    as it is, a relative path relative to the file's folder, so the data can move with the files that name it."""
    return path if is_uri(path) or path.startswith("/") else posixpath.join(posixpath.dirname(file), path)


def exists(location: str) -> bool:
    fs, path = resolve(location)
    return fs.get_file_info(path).type != pafs.FileType.NotFound


def read_bytes(location: str) -> bytes:
    fs, path = resolve(location)
    with fs.open_input_stream(path) as f:
        return f.read()


def read_text(location: str) -> str:
    return read_bytes(location).decode()


def write_bytes(location: str, data: bytes) -> None:
    fs, path = resolve(location)
    fs.create_dir(os.path.dirname(path), recursive=True)
    with fs.open_output_stream(path) as f:
        f.write(data)


def write_text(location: str, text: str) -> None:
    write_bytes(location, text.encode())


def write_text_whole(location: str, text: str) -> None:
    """Writes a file that is seen whole or not at all: written beside, then moved into place (a rename, or an
    object store's copy). For a marker such as an export's manifest, which must not exist half-written when the
    job is stopped (SIGTERM) between creating the file and filling it."""
    fs, path = resolve(location)
    fs.create_dir(os.path.dirname(path), recursive=True)
    with fs.open_output_stream(f"{path}.partial") as f:
        f.write(text.encode())
    fs.move(f"{path}.partial", path)


def delete(location: str) -> None:
    """Deletes a file or a folder; nothing to delete is fine."""
    fs, path = resolve(location)
    info = fs.get_file_info(path)
    if info.type == pafs.FileType.Directory:
        fs.delete_dir(path)
    elif info.type == pafs.FileType.File:
        fs.delete_file(path)


def upload_dir(local_dir: str, location: str) -> None:
    fs, path = resolve(location)
    fs.create_dir(path, recursive=True)
    pafs.copy_files(local_dir, path, source_filesystem=pafs.LocalFileSystem(), destination_filesystem=fs)


@contextmanager
def local_copy(location: str) -> Iterator[str]:
    """A local path holding `location` (a file or folder): the path itself when local, else a temporary copy."""
    if not is_uri(location):
        yield absolute(location)
        return
    fs, path = resolve(location)
    with tempfile.TemporaryDirectory(prefix="transfer-") as tmp:
        target = os.path.join(tmp, os.path.basename(path.rstrip("/")) or "data")
        if fs.get_file_info(path).type == pafs.FileType.Directory:
            os.makedirs(target)
        pafs.copy_files(path, target, source_filesystem=fs, destination_filesystem=pafs.LocalFileSystem())
        yield target


def list_files(location: str, suffixes: tuple[str, ...]) -> list[str]:
    """The files a location names, as locations: a file, the matching files below a folder, or a glob's matches.

    Sorted, so every process that lists the same location sees the same order.
    """
    fs, path = resolve(location)
    scheme = location.split("://", 1)[0] + "://" if is_uri(location) else ""
    if globlib.has_magic(path):
        base = path[: min(path.find(c) for c in "*?[" if c in path)].rsplit("/", 1)[0]
        infos = fs.get_file_info(pafs.FileSelector(base, recursive=True, allow_not_found=True))
        paths = [i.path for i in infos if i.type == pafs.FileType.File and fnmatchcase(i.path, path)]
    else:
        info = fs.get_file_info(path)
        if info.type == pafs.FileType.File:
            paths = [path]
        elif info.type == pafs.FileType.Directory:
            infos = fs.get_file_info(pafs.FileSelector(path, recursive=True))
            paths = [
                i.path
                for i in infos
                if i.type == pafs.FileType.File
                and i.path.lower().endswith(suffixes)
                and not os.path.basename(i.path).startswith((".", "_"))
            ]
        else:
            bucket = path.split("/", 1)[0]
            if scheme and fs.get_file_info(bucket).type == pafs.FileType.NotFound:
                raise FileNotFoundError(f"bucket {bucket!r} does not exist")
            paths = []
    return sorted(scheme + p for p in paths)
