"""Where files live: local paths and Cloud Storage (`gs://`) URLs, through one door.

Every path a user gives (workdir, exports, `--init`, eval outputs, weight files, an image
folder) goes through `path()`. A local path comes back as an absolute `pathlib.Path`, exactly
as before; a `gs://bucket/key` URL comes back as an `etils.epath.Path`, the path type Orbax
uses, which reaches Cloud Storage through gcsfs. Both offer the same methods (`/`, `exists`,
`is_dir`, `iterdir`, `glob`, `open`, `read_bytes`, `write_text`, `mkdir`), so code below this
module does not ask which one it holds.

`reachable()` checks a `gs://` path's bucket once per process, in a worker thread under a
deadline (`SIGMAVAE_STORAGE_TIMEOUT_S`, default 60 s), and turns a missing bucket, missing
credentials or an unreachable endpoint into a one-line `StorageError` naming the path. The
standard endpoint variables (`STORAGE_EMULATOR_HOST` for gcsfs and the Google client,
`TENSORSTORE_GCS_HTTP_URL` for tensorstore) point everything at another endpoint; this module
knows nothing of them.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import os
import pathlib
import shutil
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from typing import TypeVar, Union

from etils import epath

from sigmavae_jax.messages import one_line

REMOTE_PREFIX = "gs://"
TIMEOUT_ENV = "SIGMAVAE_STORAGE_TIMEOUT_S"
DEFAULT_TIMEOUT_S = 60.0

Path = Union[pathlib.Path, epath.Path]
T = TypeVar("T")

_checked_buckets: set[str] = set()
_checked_lock = threading.Lock()


class StorageError(OSError):
    """A path that cannot be used: its bucket is missing, the storage endpoint does not answer
    in time, or it refuses the credentials. The message is one line naming the path."""


def is_remote(value: str | os.PathLike) -> bool:
    return str(value).startswith(REMOTE_PREFIX)


def path(value: str | os.PathLike) -> Path:
    """`gs://bucket/key` -> an epath.Path on Cloud Storage; anything else -> an absolute local
    pathlib.Path (`~` expanded, symlinks resolved). Does no I/O on remote paths."""
    text = os.fspath(value)
    if is_remote(text):
        bucket = text[len(REMOTE_PREFIX) :].split("/", 1)[0]
        if not bucket:
            raise StorageError(f"{text}: no bucket name; write gs://BUCKET/path")
        return epath.Path(text)
    return pathlib.Path(text).expanduser().resolve()


def bucket_of(value: str | os.PathLike) -> str:
    return str(value)[len(REMOTE_PREFIX) :].split("/", 1)[0]


def timeout_s() -> float:
    raw = os.environ.get(TIMEOUT_ENV)
    if raw is None:
        return DEFAULT_TIMEOUT_S
    try:
        value = float(raw)
    except ValueError:
        raise StorageError(f"{TIMEOUT_ENV}={raw!r} is not a number of seconds") from None
    if value <= 0:
        raise StorageError(f"{TIMEOUT_ENV}={raw!r} must be positive")
    return value


def within_deadline(fn: Callable[[], T], what: str) -> T:
    """`fn()` in a daemon thread, waited for at most `timeout_s()`; a call that does not return
    in time becomes a StorageError saying so (the thread is left to finish on its own), and any
    other failure of the storage client becomes a one-line StorageError naming `what`."""
    limit = timeout_s()
    result: concurrent.futures.Future = concurrent.futures.Future()

    def run() -> None:
        try:
            result.set_result(fn())
        except BaseException as error:  # noqa: BLE001 (re-raised in the caller's thread)
            result.set_exception(error)

    threading.Thread(target=run, daemon=True, name="sigmavae-storage").start()
    try:
        return result.result(timeout=limit)
    except concurrent.futures.TimeoutError:
        raise StorageError(
            f"{what}: Cloud Storage did not answer within {limit:.0f} s (check the network, the "
            f"bucket name and the credentials; {TIMEOUT_ENV} sets the limit)"
        ) from None
    except (FileNotFoundError, FileExistsError, IsADirectoryError, NotADirectoryError, StorageError):
        raise
    except Exception as error:  # the storage client's own errors (aiohttp, google.auth, ...)
        raise StorageError(f"{what}: {one_line(error)}") from error


def reachable(value: str | os.PathLike) -> Path:
    """`path(value)`, after checking (once per bucket and process) that a remote path's bucket
    exists and answers. Raises StorageError otherwise. Local paths are returned unchecked."""
    resolved = path(value)
    if not is_remote(resolved):
        return resolved
    bucket = bucket_of(resolved)
    with _checked_lock:
        if bucket in _checked_buckets:
            return resolved
    root = epath.Path(REMOTE_PREFIX + bucket)
    if not within_deadline(root.exists, str(resolved)):
        raise StorageError(
            f"{resolved}: the bucket {REMOTE_PREFIX}{bucket} does not exist or is not visible to these "
            f"credentials (create it with `gcloud storage buckets create {REMOTE_PREFIX}{bucket}`)"
        )
    with _checked_lock:
        _checked_buckets.add(bucket)
    return resolved


@contextlib.contextmanager
def local_copy(value: str | os.PathLike) -> Iterator[pathlib.Path]:
    """A local file with the contents of `value`: the file itself when local, a temporary copy
    (removed afterwards) when remote. For readers that need a file name (memory maps, torch)."""
    source = reachable(value)
    if not is_remote(source):
        yield source
        return
    if not source.exists():
        raise FileNotFoundError(f"{source} does not exist")
    with tempfile.TemporaryDirectory(prefix="sigmavae-") as tmp:
        target = pathlib.Path(tmp) / source.name
        with source.open("rb") as src, open(target, "wb") as dst:
            shutil.copyfileobj(src, dst, 16 << 20)
        yield target


def write_bytes_atomically(value: Path, data: bytes) -> None:
    """Writes a whole file so that readers see the old or the new contents, never a part: a
    temporary sibling renamed over it when local; a single upload (atomic by itself) when remote."""
    if is_remote(value):
        value.write_bytes(data)
        return
    value.parent.mkdir(parents=True, exist_ok=True)
    tmp = value.with_name(f".{value.name}.tmp-{os.getpid()}")
    tmp.write_bytes(data)
    os.replace(tmp, value)


class AppendLog:
    """A text file that grows by lines (`metrics.jsonl`). Locally it is opened for appending
    and flushed per line. Cloud Storage objects cannot be appended to, so a remote log keeps
    its text in memory (starting from what the object already holds, for resumed runs) and
    uploads it whole at most every `upload_every_s` seconds and on `close()`."""

    def __init__(self, value: Path, upload_every_s: float = 30.0):
        self.path = value
        self._remote = is_remote(value)
        self._upload_every_s = upload_every_s
        if self._remote:
            self._text = value.read_text() if value.exists() else ""
            self._dirty, self._uploaded_at = False, time.monotonic()
        else:
            value.parent.mkdir(parents=True, exist_ok=True)
            self._file = open(value, "a")

    def write_line(self, line: str) -> None:
        if not self._remote:
            self._file.write(line + "\n")
            self._file.flush()
            return
        self._text += line + "\n"
        self._dirty = True
        if time.monotonic() - self._uploaded_at >= self._upload_every_s:
            self.flush()

    def flush(self) -> None:
        if self._remote and self._dirty:
            self.path.write_text(self._text)
            self._dirty, self._uploaded_at = False, time.monotonic()

    def close(self) -> None:
        if self._remote:
            self.flush()
        else:
            self._file.close()
