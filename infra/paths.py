"""One path type for local directories and buckets (`gs://bucket/run`): `etils.epath`, which
Orbax uses too, so a workdir is the same kind of object wherever it lives.

Object stores differ from a disk in three ways this module absorbs:
* no append: `AppendFile` keeps a log's lines in memory and rewrites the whole object when it
  flushes (every `flush_secs`, and when closed); on a disk it appends and flushes each line;
* no local path for libraries that need one (the Rust tokenizer, memory-mapped token files,
  safetensors): `localize` copies a remote file or directory into a cache once;
* no atomic rename: Orbax marks a committed checkpoint with `commit_success.txt` instead
  (`infra.checkpoint.layout`).

Credentials and endpoints come only from the client libraries' own settings (gcsfs and
tensorstore: Application Default Credentials, `STORAGE_EMULATOR_HOST`,
`TENSORSTORE_GCS_HTTP_URL`), so a test emulator and a real bucket are configured the same way.
`gs://` needs `gcsfs` (`pip install 'infra[gcs]'`). `s3://` is refused: the rest of the stack
(event log, metrics, tokenizer and data localisation) is only built and tested on gcsfs.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import pathlib
import stat
import tempfile
import time
from collections.abc import Iterator
from typing import Union

from etils import epath

from infra.errors import UserError

Path = epath.Path
PathLike = Union[str, os.PathLike]
REMOTE_PREFIXES = ("gs://",)
UNANSWERED_S = 30.0  # how long writes to a bucket fail at once after one failed (`write_remote`)
_unanswered: dict[str, float] = {}  # bucket -> when a write to it last failed (monotonic)
CACHE = pathlib.Path(os.environ.get("INFRA_CACHE_DIR", pathlib.Path.home() / ".cache" / "infra"))


def is_remote(path: PathLike) -> bool:
    return str(path).startswith(REMOTE_PREFIXES) or "://" in str(path)


def path(location: PathLike) -> epath.Path:
    """`location` as an epath: `~` expanded for local paths; `gs://` checked for its client."""
    text = os.fspath(location)
    if "://" in text and not text.startswith(REMOTE_PREFIXES):
        scheme = text.split("://", 1)[0]
        raise UserError(f"'{text}': {scheme}:// paths are not supported; use a local path or "
                        f"gs://bucket/path")
    if text.startswith("gs://"):
        _require_gcsfs()
        os.environ.setdefault("EPATH_USE_TF", "false")  # gcsfs, not TensorFlow's gfile
        return epath.Path(text)
    return epath.Path(os.path.expanduser(text))


def check_credentials(location: PathLike) -> None:
    """UserError, before any work, when a bucket is named but no credentials can be found (an
    emulator, `STORAGE_EMULATOR_HOST`, takes any)."""
    if not str(location).startswith("gs://") or os.environ.get("STORAGE_EMULATOR_HOST"):
        return
    import google.auth
    from google.auth.exceptions import DefaultCredentialsError

    try:
        google.auth.default()
    except DefaultCredentialsError as e:
        first = str(e).strip().splitlines()[0][:200]
        raise UserError(f"no Google Cloud credentials for {location} ({first}); run `gcloud auth "
                        f"application-default login` or set GOOGLE_APPLICATION_CREDENTIALS") from None


def read_text(location: PathLike) -> str:
    """The file's text; bytes that are not UTF-8 become U+FFFD (a torn write, an edited file)."""
    return path(location).read_bytes().decode("utf-8", errors="replace")


def _require_gcsfs() -> None:
    try:
        import fsspec
        import gcsfs  # noqa: F401
    except ImportError:
        raise UserError("gs:// paths need the gcsfs package: pip install 'infra[gcs]'") from None
    # gcsfs caches directory listings for the life of a process and answers "does not exist"
    # from a cached parent listing: what other processes write (a trainer's checkpoints, a
    # lease) would stay invisible to a reader that listed the parent once. Set here, before the
    # first gs:// file system is made (epath keeps that one for the process).
    for protocol in ("gs", "gcs"):
        fsspec.config.conf.setdefault(protocol, {})["use_listings_cache"] = False
    for name in ("google.auth", "google.auth._default"):
        logging.getLogger(name).setLevel(logging.ERROR)  # bucket-type probes warn on emulators
    # gcsfs logs a traceback for every request it gives up on, then raises: the error reaches
    # the user once, as the command's one line
    for name in ("gcsfs", "gcsfs.core", "gcsfs.retry"):
        logging.getLogger(name).setLevel(logging.CRITICAL)


def size(location: PathLike) -> int:
    """The size in bytes of a local or remote file (epath's remote `stat()` has no `st_size`)."""
    if not is_remote(location):
        return os.path.getsize(location)
    return path(location).stat().length


def special_file(location: PathLike) -> bool:
    """`location` is a local FIFO, device or socket: reading it blocks or never ends, so a file
    someone handed us (data, a checkpoint, a tokenizer) must be checked before it is opened."""
    if is_remote(location):
        return False
    try:
        mode = os.stat(location).st_mode
    except OSError:
        return False
    return not (stat.S_ISREG(mode) or stat.S_ISDIR(mode))


def localize(location: PathLike) -> pathlib.Path:
    """A local path with the content of `location`: itself when local; for a remote file or
    directory, a copy in `~/.cache/infra/remote/` (refreshed when a file's size changed)."""
    source = path(location)
    if not is_remote(source):
        return pathlib.Path(source)
    key = hashlib.sha256(str(source).encode()).hexdigest()[:16]
    target = CACHE / "remote" / f"{key}-{source.name}"
    remotes = [source] if source.is_file() else files(source) if source.is_dir() else []
    if not remotes:
        raise UserError(f"'{source}' does not exist or is empty")
    for remote in remotes:
        local = target if remote == source else target / remote.relative_to(source)
        if local.exists() and local.stat().st_size == size(remote):
            continue
        local.parent.mkdir(parents=True, exist_ok=True)
        partial = local.with_name(local.name + ".partial")
        partial.write_bytes(remote.read_bytes())
        partial.replace(local)
    return target


def _raise_unless_missing(e: OSError) -> None:
    if not isinstance(e, FileNotFoundError):
        raise e


def _walk(root: PathLike) -> tuple[list[Path], list[Path]]:
    """(directories, files) below `root` (epath's own recursive glob refuses buckets). A
    listing that fails raises: epath's default omits it, and an unreachable bucket would look
    empty (to a caller that then deletes what looks empty)."""
    root = path(root)
    scheme = str(root).split("://", 1)[0] + "://" if is_remote(root) else ""
    dirs_out, files_out = [], []
    for directory, dirs, names in root.walk(on_error=_raise_unless_missing):
        directory = str(directory)
        directory = path(directory if "://" in directory or not scheme else scheme + directory)
        dirs_out += [directory / d for d in dirs]
        files_out += [directory / f for f in names]
    return sorted(dirs_out), sorted(files_out)


def tree(root: PathLike) -> list[Path]:
    """Every directory and file below `root`."""
    dirs, names = _walk(root)
    return sorted(dirs + names)


def files(root: PathLike) -> list[Path]:
    """Every file below `root`."""
    return _walk(root)[1]


def move_tree(src: Path, dst: Path) -> None:
    """Rename a directory; in a bucket (no directories, no rename) copy each object, then delete
    the originals."""
    if not is_remote(src):
        src.rename(dst)
        return
    for f in files(src):
        f.copy(dst / f.relative_to(src))
    src.rmtree()


def upload_tree(local: PathLike, remote: Path) -> None:
    """Copy a local directory's files to `remote` (e.g. a profiler trace next to a bucket run)."""
    local = pathlib.Path(local)
    for f in [p for p in local.rglob("*") if p.is_file()]:
        target = remote / str(f.relative_to(local))
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(f.read_bytes())


def _bucket(location: PathLike) -> str:
    return str(location).split("://", 1)[1].split("/", 1)[0]


def answering(location: PathLike) -> bool:
    """False while a write to `location`'s bucket failed less than `UNANSWERED_S` ago (local
    paths always answer): a run ending on an outage skips what it would only tidy up there."""
    if not is_remote(location):
        return True
    failed = _unanswered.get(_bucket(location))
    return failed is None or time.monotonic() - failed >= UNANSWERED_S


def write_remote(target: Path, data: bytes) -> None:
    """Write an object; whatever the client raises (it has its own exception types) becomes an
    OSError, which callers turn into one line. A bucket whose last write failed (after its
    client's own retries, about half a minute) fails the next writes at once for
    `UNANSWERED_S`: a run that stops on an outage does not spend that again on each of its
    closing writes (metrics, event log, lease)."""
    bucket = _bucket(target)
    if not answering(target):
        raise OSError(f"gs://{bucket} did not answer a write "
                      f"{time.monotonic() - _unanswered[bucket]:.0f} s ago")
    try:
        target.write_bytes(data)
    except Exception as e:  # noqa: BLE001 - gcsfs / aiohttp / google-auth errors
        _unanswered[bucket] = time.monotonic()
        if isinstance(e, OSError):
            raise
        first = str(e).strip().splitlines()[0][:200] if str(e).strip() else ""
        raise OSError(f"{type(e).__name__}: {first}") from e
    _unanswered.pop(bucket, None)


@contextlib.contextmanager
def staged(target: PathLike) -> Iterator[pathlib.Path]:
    """A local directory standing for `target`: `target` itself on a disk; for a bucket, a
    temporary directory whose files are uploaded to `target` once the block succeeds (for
    writers that need local files: safetensors, a one-off import)."""
    if not is_remote(target):
        yield pathlib.Path(path(target))
        return
    with tempfile.TemporaryDirectory(prefix="infra-staged-") as local:
        staging = pathlib.Path(local) / path(target).name
        yield staging
        if staging.exists():
            upload_tree(staging, path(target))


class AppendFile:
    """Lines appended to a file: appended and flushed each time on a disk; kept in memory and
    written whole (objects cannot be appended to) every `flush_secs` and on `close` in a bucket.
    Raises OSError where the write fails (the caller turns it into one line)."""

    def __init__(self, location: PathLike, flush_secs: float = 10.0):
        self.path = path(location)
        self.remote = is_remote(self.path)
        self.flush_secs = flush_secs
        self._flushed = time.monotonic()
        if self.remote:
            self._lines = self.path.read_text().splitlines(keepends=True) if self.path.exists() else []
            self._dirty = False
        else:
            self._file = open(self.path, "a")

    @property
    def name(self) -> str:
        return str(self.path)

    def write(self, line: str, *, flush: bool = False) -> None:
        """Append `line` (with its newline); `flush`: make it durable now."""
        if not self.remote:
            self._file.write(line)
            self._file.flush()
            return
        self._lines.append(line)
        self._dirty = True
        if flush or time.monotonic() - self._flushed >= self.flush_secs:
            self.flush()

    def flush(self) -> None:
        if not self.remote:
            self._file.flush()
        elif self._dirty:
            write_remote(self.path, "".join(self._lines).encode())
            self._dirty = False
        self._flushed = time.monotonic()

    def close(self) -> None:
        try:
            self.flush()
        finally:
            if not self.remote:
                self._file.close()
