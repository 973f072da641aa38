"""Errors that end a run with one line on stderr and a documented exit code (no traceback).

| exit | meaning |
|---|---|
| 0 | finished |
| 2 | bad input (`UserError`): config, data, workdir, incompatible checkpoint |
| 3 | the workdir cannot be written or a checkpoint read back (`CheckpointError`): disk full, corruption |
| 4 | non-finite loss, gradients or update (`NumericalError`); the last checkpoint is finite |
| 5 | another process of a multi-process run failed or stopped answering (`PeerError`) |
| 75 | preempted (SIGTERM): a checkpoint was written; run the same command to resume |
| 130 | interrupted (Ctrl-C) |

An error that a config value can fix names it as a config key (`key="train.steps"`,
`value="<positive>"`): the library's message says `set train.steps=<positive>`, which is what a
notebook user changes; only the CLI spells it as the flag `--config.train.steps=<positive>`
(`cli_message`). A command without a config (`tokenizer train`, `tokenize`) names its own option
as the key (`key="--files"`), spelled as it is everywhere.
"""

from __future__ import annotations

import errno

EXIT_PREEMPTED = 75


class UserError(Exception):
    """Bad input from the user: printed as one line, exit code 2, no traceback.

    `key`, `value`: the config key and value that fix it (shown as `{verb} key=value{note}`
    after the message).
    """

    exit_code = 2

    def __init__(self, message: str, *, key: str | None = None, value: object = None,
                 verb: str = "set", note: str = ""):
        super().__init__(message)
        self.message, self.key, self.value, self.verb, self.note = message, key, value, verb, note

    def _with_fix(self, flag: str | None) -> str:
        if flag is None:
            return self.message
        return f"{self.message}; {self.verb} {flag}={self.value}{self.note}"

    def __str__(self) -> str:
        return self._with_fix(self.key)

    def cli_message(self) -> str:
        """The message with the fix spelled as a command-line override (a key that is already
        an option, `--files`, as it is)."""
        if self.key is None or self.key.startswith("-"):
            return self._with_fix(self.key)
        return self._with_fix(f"--config.{self.key}")


class ConfigError(UserError):
    """A config key, value or type is wrong."""


class DataError(UserError):
    """Data files are missing, empty or unreadable."""


class CheckpointError(UserError):
    """A checkpoint cannot be written (disk full) or read back intact (corruption)."""

    exit_code = 3


class NumericalError(UserError):
    """The loss or the gradients became NaN/Inf."""

    exit_code = 4


class PeerError(UserError):
    """Another process of a multi-process run died or stopped answering."""

    exit_code = 5


class Preempted(BaseException):
    """SIGTERM was received; a checkpoint was written. Not an error: exit 75, rerun to resume.

    A `BaseException`, like `KeyboardInterrupt`: raised from the CLI's SIGTERM handler wherever
    the main thread is during start-up, it must not be swallowed (or turned into another error)
    by code that handles `Exception`."""

    exit_code = EXIT_PREEMPTED


def check_positive_ints(section: str, **values) -> None:
    """ConfigError naming the first of `values` (config keys under `section`) that is not a
    positive integer, and how to set it."""
    for key, value in values.items():
        if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
            raise ConfigError(f"{section}.{key} must be a positive integer, got {value!r}",
                              key=f"{section}.{key}", value="<positive integer>")


# What to do about a failed write, by OS error number; tensorstore reports the same failures as
# text, matched by `_WRITE_MESSAGES`. `{flag}` is the option that names the target.
_WRITE_FIXES = {
    errno.ENOSPC: "free disk space or use another {flag}",
    errno.EDQUOT: "free space in your disk quota or use another {flag}",
    errno.EMFILE: "raise the open-file limit (ulimit -n) or close other programs",
    errno.ENFILE: "raise the system's open-file limit or close other programs",
    errno.EACCES: "make it writable or use another {flag}",
    errno.EPERM: "make it writable or use another {flag}",
    errno.EROFS: "use a {flag} on a writable filesystem",
    errno.EFBIG: "raise the file-size limit (ulimit -f) or use another {flag}",
    errno.ENOTDIR: "use another {flag}: a file stands where a directory must be",
    errno.EISDIR: "use another {flag}: a directory stands where a file must be",
}
_WRITE_MESSAGES = {"No space left": errno.ENOSPC, "quota exceeded": errno.EDQUOT,
                   "Too many open files": errno.EMFILE, "Permission denied": errno.EACCES,
                   "Read-only file system": errno.EROFS, "File too large": errno.EFBIG,
                   "Not a directory": errno.ENOTDIR, "Is a directory": errno.EISDIR}
# Out of room: the same command succeeds once space is freed (exit 3, as a full workdir).
_FULL = (errno.ENOSPC, errno.EDQUOT, errno.EFBIG)


def _write_errno(e: BaseException | None) -> int | None:
    """The OS error number of a failed write, from `e`'s chain (or its message)."""
    seen = set()
    while e is not None and id(e) not in seen:
        if isinstance(e, OSError) and e.errno in _WRITE_FIXES:
            return e.errno
        for text, number in _WRITE_MESSAGES.items():
            if text.lower() in str(e).lower():
                return number
        seen.add(id(e))
        e = e.__cause__ or e.__context__
    return None


def write_fix(e: BaseException | None, flag: str = "--workdir") -> str:
    """How to fix a failed write, from the OS error in `e`'s chain (or its message)."""
    number = _write_errno(e)
    if number is None:
        return f"check the filesystem or use another {flag}"
    return _WRITE_FIXES[number].format(flag=flag)


def output_error(target: object, e: BaseException, flag: str, note: str = "") -> UserError:
    """The one-line error of a command whose output `target` (named by option `flag`, e.g.
    `--out`) cannot be written: exit 3 (`CheckpointError`) when the disk or quota is full,
    exit 2 when the target itself cannot be written (read-only, no permission, not a
    directory). `note` ends the line (what was kept, how to resume)."""
    why = getattr(e, "strerror", None) or (str(e).strip().splitlines() or [type(e).__name__])[-1]
    why = why if len(why) < 240 else why[:120] + " ... " + why[-100:]
    cls = CheckpointError if _write_errno(e) in _FULL else UserError
    return cls(f"cannot write {target}: {why}; {write_fix(e, flag)}{note}")
