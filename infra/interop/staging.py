"""The staging directory in which `hf import` and `hf export` assemble their output before one
rename puts it in place, so that a crash or a refusal never leaves half a model at the target.

`<target>.importing` (or `.exporting`) holds a marker file, `.infra-staging`, that its writer
locks (`flock`, as a training run locks its workdir) for as long as it writes:

* a second import into the same target finds the marker locked and stops, naming the holder;
* a directory left by an interrupted writer (the marker is there, unlocked) is removed;
* a directory without the marker is someone else's: refused, never deleted.

Only process 0 of a multi-process command writes; the others pass `main=False`.
"""

from __future__ import annotations

import shutil
from pathlib import Path

from infra.errors import UserError, output_error
from infra.workdir import FileLock

MARKER = ".infra-staging"


class Staging:
    """`with Staging(target, ".importing", flag="--workdir", command="hf import") as staging:`
    write into `staging.path`, then `staging.commit()` renames it to `target` (an absent or empty directory). On an
    exception the staging directory is removed and the target left as it was. Write failures
    (full disk, read-only target) become the one-line `output_error` naming `flag`."""

    def __init__(self, target: Path, suffix: str, *, flag: str, command: str, main: bool = True):
        self.target, self.flag, self.command, self.main = Path(target), flag, command, main
        self.path = self.target.with_name(self.target.name + suffix)
        self._lock: FileLock | None = None

    def __enter__(self) -> "Staging":
        if not self.main:
            return self
        if self.path.exists() or self.path.is_symlink():
            self._take_over()
        try:
            self.path.mkdir(parents=True)
        except FileExistsError:  # another writer made it since we looked
            self._take_over()
            self.path.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise output_error(self.path, e, self.flag) from None
        self._lock = FileLock(self.path / MARKER, self._busy)
        return self

    def _busy(self, holder: str) -> UserError:
        return UserError(f"{self.target} is being written by another `{self.command}` ({holder}); "
                         f"wait for it to finish or choose another {self.flag}")

    def _take_over(self) -> None:
        """Remove a staging directory an interrupted writer left; refuse anyone else's."""
        if not self.path.is_dir() or self.path.is_symlink() or not (self.path / MARKER).is_file():
            raise UserError(f"{self.path} exists and was not made by `{self.command}`; move it "
                            f"away or choose another {self.flag}")
        stale = FileLock(self.path / MARKER, self._busy)  # UserError while its writer lives
        try:
            shutil.rmtree(self.path)
        except OSError as e:
            raise output_error(self.path, e, self.flag) from None
        finally:
            stale.release()

    def commit(self) -> None:
        """Put the staged directory in place of `target` (process 0; the others do nothing)."""
        if not self.main:
            return
        try:
            (self.path / MARKER).unlink()
            if self.target.is_dir() and not any(self.target.iterdir()):
                self.target.rmdir()
            self.path.rename(self.target)
        except OSError as e:
            if self.target.exists():
                raise UserError(f"{self.target} appeared while `{self.command}` ran (another "
                                f"command wrote it); nothing was changed there: choose another "
                                f"{self.flag}") from None
            raise output_error(self.target, e, self.flag) from None
        self._release()

    def _release(self) -> None:
        if self._lock is not None:
            self._lock.release()
            self._lock = None

    def __exit__(self, kind, error, tb) -> None:
        if not self.main:
            return
        if kind is not None and self.path.exists():
            shutil.rmtree(self.path, ignore_errors=True)
        self._release()
