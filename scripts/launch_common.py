"""What the cluster launchers share (standard library only, so they run without the project
installed)."""

from __future__ import annotations


def split_overrides(argv: list[str]) -> tuple[list[str], list[str]]:
    """Separate `--config.k=v` / `--config.k v` overrides (passed to infra) from the launcher's
    own flags; overrides come back as `--config.k=v`. ValueError for an override without value."""
    rest, overrides = [], []
    i = 0
    while i < len(argv):
        arg = argv[i]
        if arg.startswith("--config."):
            if "=" in arg:
                overrides.append(arg)
            elif i + 1 < len(argv):
                overrides.append(f"{arg}={argv[i + 1]}")
                i += 1
            else:
                raise ValueError(f"override {arg} has no value; write {arg}=VALUE")
        else:
            rest.append(arg)
        i += 1
    return rest, overrides
