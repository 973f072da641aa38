"""A real supervised data set with no download: "write the docstring of this function", from
the Python standard library on this machine.

Every function or method with a docstring and a body in the standard library's *packages*
(`json/`, `email/`, `asyncio/`, ...; not their tests) is one example: the prompt is its source
(signature, decorators excluded, and body) with the docstring removed, followed by a request
line; the completion is the docstring (`inspect.cleandoc`-ed). Only packages are used: the
`lm.py` pretraining corpus is the top-level modules, so a pretrained model has never seen these
functions. Examples are held out by module (modules in the order of a hash of their dotted name,
until they hold `val_fraction` of the examples), so no function of a held-out module is trained
on; identical examples are kept once. Functions longer than
`MAX_CODE_CHARS` or with docstrings longer than `MAX_DOC_CHARS` are left out.

`build(directory)` writes `train.jsonl` and `val.jsonl` once (atomically; a later call reads
them) as `{"prompt", "completion"}` lines or, with `fmt="chat"`, as `{"messages": [user,
assistant]}`; the SFT task reads them like any JSONL.
"""

from __future__ import annotations

import ast
import hashlib
import json
import os
import sysconfig
import textwrap
from pathlib import Path

VERSION = 3  # bump when the examples change: caches are keyed by it
MAX_CODE_CHARS = 2000
MAX_DOC_CHARS = 800
REQUEST = "# Write the docstring of {name}.\n"
CHAT_REQUEST = "Write the docstring of this function.\n\n```python\n{code}\n```"
SKIP_PARTS = {"test", "tests", "idle_test", "site-packages", "dist-packages", "__pycache__"}


def package_files(root: str | None = None) -> list[tuple[str, str]]:
    """(dotted module name, path) of every package module of the standard library."""
    root = Path(root or sysconfig.get_paths()["stdlib"])
    out = []
    for path in sorted(root.glob("*/**/*.py")):
        rel = path.relative_to(root)
        if SKIP_PARTS & set(rel.parts):
            continue
        module = ".".join(rel.with_suffix("").parts).removesuffix(".__init__")
        out.append((module, str(path)))
    return out


def _strip_docstring(source_lines: list[str], node) -> str:
    """The function's source (from `def`) without its docstring, dedented."""
    doc = node.body[0]
    first, last = node.lineno - 1, node.end_lineno
    keep = [line for i, line in enumerate(source_lines[first:last], first)
            if not (doc.lineno - 1 <= i < doc.end_lineno)]
    return textwrap.dedent("".join(keep)).rstrip() + "\n"


def functions(module: str, path: str) -> list[dict]:
    """{"module", "name", "code", "docstring"} of each documented function of one file."""
    try:
        source = Path(path).read_text(encoding="utf-8")
        tree = ast.parse(source)
    except (OSError, UnicodeDecodeError, SyntaxError, ValueError):
        return []
    lines = source.splitlines(keepends=True)
    out = []
    for node in ast.walk(tree):
        if not isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) or len(node.body) < 2:
            continue
        doc = ast.get_docstring(node, clean=True)
        if not doc or len(doc) > MAX_DOC_CHARS:
            continue
        first = node.body[0]
        if first.lineno == node.lineno:  # docstring on the def line: cannot cut it cleanly
            continue
        code = _strip_docstring(lines, node)
        if len(code) > MAX_CODE_CHARS:
            continue
        out.append({"module": module, "name": node.name, "code": code, "docstring": doc})
    return out


def held_out_modules(counts: dict[str, int], fraction: float) -> set[str]:
    """Modules whose functions are held out: modules in the order of a hash of their dotted
    name, each taken while the held-out functions stay within `fraction` of all."""
    key = lambda m: hashlib.sha256(f"docstrings:{m}".encode()).digest()  # noqa: E731
    target, chosen, held = fraction * sum(counts.values()), set(), 0
    for module in sorted(counts, key=key):
        if held + counts[module] <= target:
            chosen.add(module)
            held += counts[module]
    return chosen


def example(f: dict, fmt: str) -> dict:
    if fmt == "chat":
        return {"messages": [
            {"role": "user", "content": CHAT_REQUEST.format(code=f["code"].rstrip())},
            {"role": "assistant", "content": f["docstring"]}]}
    return {"prompt": f["code"] + "\n" + REQUEST.format(name=f["name"]),
            "completion": f["docstring"]}


def build(directory: str | Path, *, val_fraction: float = 0.1, fmt: str = "completion",
          root: str | None = None) -> tuple[Path, Path]:
    """(train.jsonl, val.jsonl) in `directory`, written once (atomically) from the stdlib."""
    directory = Path(directory)
    train_path, val_path = directory / "train.jsonl", directory / "val.jsonl"
    if train_path.is_file() and val_path.is_file():
        return train_path, val_path
    seen: set[str] = set()
    lines: dict[str, list[str]] = {}
    for module, path in package_files(root):
        for f in functions(module, path):
            line = json.dumps(example(f, fmt), ensure_ascii=False)
            if line not in seen:
                seen.add(line)
                lines.setdefault(module, []).append(line)
    held = held_out_modules({m: len(v) for m, v in lines.items()}, val_fraction)
    splits = {"train": [x for m, v in lines.items() if m not in held for x in v],
              "val": [x for m, v in lines.items() if m in held for x in v]}
    directory.mkdir(parents=True, exist_ok=True)
    for split, out in (("train", train_path), ("val", val_path)):
        tmp = out.with_name(f".{out.name}.{os.getpid()}.tmp")
        tmp.write_text("".join(line + "\n" for line in splits[split]), encoding="utf-8")
        os.replace(tmp, out)  # concurrent builders write the same bytes
    return train_path, val_path


def default_directory(cache_dir: str, val_fraction: float, fmt: str) -> Path:
    """Where `build` caches the data set: `cache_dir` ("" = $INFRA_CACHE_DIR or
    ~/.cache/infra), keyed by Python version, `VERSION`, split and format."""
    import sys

    base = Path(cache_dir or os.environ.get("INFRA_CACHE_DIR") or Path.home() / ".cache" / "infra")
    key = f"py{sys.version_info[0]}.{sys.version_info[1]}-v{VERSION}-{fmt}-val{val_fraction:g}"
    return base.expanduser() / "stdlib_docstrings" / key
