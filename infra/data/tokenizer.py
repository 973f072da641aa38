"""One tokenizer interface for the LM task, `generate` and export: byte-level or Hugging Face.

`data.tokenizer` selects it: `""` (default) is our byte-level tokenizer (ids 0-255 are bytes,
then PAD 256, BOS 257, EOS 258); a path to a `tokenizer.json` or to a directory holding one (a
Hugging Face model directory, an imported workdir's `tokenizer/`, or what `python -m infra
tokenizer train` wrote) is a Hugging Face `tokenizers` tokenizer (the Rust library: no
transformers, no torch). Its BOS / EOS / PAD come from `tokenizer_config.json` (`bos_token`,
`eos_token`, `pad_token`; a key present as null means "none") or `special_tokens_map.json`
beside it, else from the `*_token_id`s of `generation_config.json` / `config.json`. A tokenizer
without a BOS token (Qwen) starts documents with nothing.

Special tokens follow the tokenizer's own convention, as `transformers` encodes a text: the
ids its post-processor puts around a text (`prefix_ids`, `suffix_ids`: `<|begin_of_text|>` before
for Llama 3, nothing for Qwen or SmolLM2) start a prompt (`encode_prompt`, once, also when the
prompt already starts with them) and a training document (`encode_document`, which also ends
with EOS to separate packed documents). `encode` itself adds nothing. The byte-level tokenizer
starts with its BOS.

For chat templates (`infra.data.chat`) each tokenizer also names its special tokens as text
(`special_tokens`: `bos_token`, `eos_token`, ... as `tokenizer_config.json` spells them; the
byte-level tokenizer's are `<|pad|>`, `<|bos|>`, `<|eos|>`, the names `tokenizer train` gives
its BPE's), its own `chat_template` (None if it has none) and `encode_with_offsets`, whose
offsets are character spans of the text (a special token's name in the text is that token).
"""

from __future__ import annotations

import functools
import json
import re
import shutil
from pathlib import Path
from typing import Protocol, Sequence

import numpy as np

from infra import paths
from infra.data import text
from infra.errors import ConfigError

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                   "chat_template.jinja")


class Tokenizer(Protocol):
    vocab_size: int  # ids are < vocab_size (the model's vocabulary may be larger: padding)
    bos_id: int | None
    eos_id: int | None
    pad_id: int | None
    longest_token_chars: int  # the most characters of text one token covers
    prefix_ids: tuple[int, ...]  # special tokens the tokenizer puts before a text (BOS)
    suffix_ids: tuple[int, ...]  # ... and after it

    def encode(self, text: str) -> np.ndarray: ...

    def encode_prompt(self, prompt: str | np.ndarray) -> np.ndarray: ...

    def decode(self, ids: Sequence[int] | np.ndarray) -> str: ...

    def token_text(self, token: int) -> str: ...

    def token_bytes(self, token: int) -> bytes: ...

    def encode_document(self, text: str) -> np.ndarray: ...


class ByteTokenizer:
    """UTF-8 bytes as ids 0-255; PAD 256, BOS 257, EOS 258 (`infra.data.text`)."""

    vocab_size = text.VOCAB_SIZE
    bos_id, eos_id, pad_id = text.BOS_ID, text.EOS_ID, text.PAD_ID
    spec = ""
    special_tokens = {"bos_token": "<|bos|>", "eos_token": "<|eos|>", "pad_token": "<|pad|>"}
    chat_template = None  # none of its own: infra.data.chat.BUILTIN_TEMPLATE
    _SPECIAL_IDS = {"<|bos|>": text.BOS_ID, "<|eos|>": text.EOS_ID, "<|pad|>": text.PAD_ID}
    _SPECIAL_RE = re.compile("|".join(map(re.escape, _SPECIAL_IDS)))
    longest_token_chars = max(map(len, _SPECIAL_IDS))  # the most characters one token covers

    def encode_with_offsets(self, texts: list[str]) -> list[tuple[np.ndarray, np.ndarray]]:
        """(ids, (n, 2) character offsets) of each text: one id per UTF-8 byte, spanning its
        character; `<|bos|>`, `<|eos|>`, `<|pad|>` in the text are those tokens."""
        out = []
        for s in texts:
            ids, offsets, pos = [], [], 0
            for m in [*self._SPECIAL_RE.finditer(s), None]:
                end = m.start() if m else len(s)
                if end > pos:
                    chunk = s[pos:end]
                    points = np.frombuffer(chunk.encode("utf-32-le"), np.uint32)
                    widths = 1 + (points >= 0x80) + (points >= 0x800) + (points >= 0x10000)
                    starts = pos + np.repeat(np.arange(len(chunk)), widths)
                    ids.append(text.encode(chunk))
                    offsets.append(np.stack([starts, starts + 1], axis=1))
                if m:
                    ids.append(np.array([self._SPECIAL_IDS[m.group()]], np.int32))
                    offsets.append(np.array([[m.start(), m.end()]]))
                    pos = m.end()
            out.append((np.concatenate(ids).astype(np.int32) if ids else np.zeros(0, np.int32),
                        np.concatenate(offsets) if offsets else np.zeros((0, 2), np.int64)))
        return out

    def encode(self, s: str) -> np.ndarray:
        return text.encode(s)

    def decode(self, ids) -> str:
        return text.decode(ids)

    def token_bytes(self, token: int) -> bytes:
        """The bytes one token stands for (a special token: its name)."""
        names = {i: name for name, i in self._SPECIAL_IDS.items()}
        return names[int(token)].encode() if int(token) in names else bytes([int(token)])

    def token_text(self, token: int) -> str:
        """One token as text (what `logprobs` lists): see `bytes_as_text`."""
        return bytes_as_text(self.token_bytes(token))

    @property
    def prefix_ids(self) -> tuple[int, ...]:
        return (self.bos_id,)

    suffix_ids: tuple[int, ...] = ()

    def encode_prompt(self, prompt: str | np.ndarray) -> np.ndarray:
        return with_specials(self, prompt)

    def encode_document(self, s: str) -> np.ndarray:
        return np.concatenate([[self.bos_id], self.encode(s), [self.eos_id]]).astype(np.int32)


def _token_name(value) -> str | None:
    if isinstance(value, dict):
        value = value.get("content")
    return value if isinstance(value, str) and value else None


def _read_json(path: Path) -> dict:
    if not path.is_file():  # absent, or a FIFO or device that would block the read
        return {}
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


class HFTokenizer:
    """A Hugging Face `tokenizers` tokenizer (`tokenizer.json`) with its special tokens."""

    def __init__(self, path: str | Path, option: str = "data.tokenizer"):
        """`option`: what names the tokenizer in errors (the config key, or a command's flag)."""
        from tokenizers import Tokenizer as RustTokenizer

        path = Path(path).expanduser()
        file = path / "tokenizer.json" if path.is_dir() else path
        if not file.is_file():
            raise ConfigError(f"{option} {str(path)!r} has no tokenizer.json; pass a "
                              "tokenizer.json or a Hugging Face model directory (\"\" = bytes)",
                              key=option, value="<dir with tokenizer.json>")
        try:
            self._tok = RustTokenizer.from_file(str(file))
        except Exception as e:  # noqa: BLE001 - the Rust library raises plain Exceptions
            raise ConfigError(f"cannot load tokenizer {file}: {str(e).splitlines()[0][:200]}",
                              key=option, value="<dir with tokenizer.json>") from None
        self.spec = str(path)
        self.file, self.directory = file, file.parent
        self.vocab_size = self._tok.get_vocab_size(with_added_tokens=True)
        cfg = _read_json(self.directory / "tokenizer_config.json")
        special = _read_json(self.directory / "special_tokens_map.json")
        model_ids = _read_json(self.directory / "generation_config.json") or _read_json(
            self.directory / "config.json")

        def special_id(kind: str) -> int | None:
            for source in (cfg, special):
                if f"{kind}_token" in source:
                    name = _token_name(source[f"{kind}_token"])
                    return self._tok.token_to_id(name) if name else None
            value = model_ids.get(f"{kind}_token_id")
            if isinstance(value, list):
                value = value[0] if value else None
            return value if isinstance(value, int) else None

        self.bos_id = special_id("bos")
        self.eos_id = special_id("eos")
        self.pad_id = special_id("pad")
        self.special_tokens = {}
        for kind in ("bos", "eos", "pad", "unk"):
            for source in (cfg, special):
                if f"{kind}_token" in source:
                    name = _token_name(source[f"{kind}_token"])
                    if name:
                        self.special_tokens[f"{kind}_token"] = name
                    break
        self.chat_template = _chat_template(self.directory, cfg)

    @functools.cached_property
    def longest_token_chars(self) -> int:
        """The most characters one token covers (its vocabulary string: one character per
        byte, or the special token's name), so a text of n characters has at least
        n / longest_token_chars tokens, short of a normalizer that drops characters."""
        return max(map(len, self._tok.get_vocab(with_added_tokens=True)), default=1)

    def encode_with_offsets(self, texts: list[str]) -> list[tuple[np.ndarray, np.ndarray]]:
        """(ids, (n, 2) character offsets) of each text (special tokens in it recognised)."""
        return [(np.asarray(e.ids, np.int32), np.asarray(e.offsets, np.int64).reshape(-1, 2))
                for e in self._tok.encode_batch(texts, add_special_tokens=False)]

    def encode(self, s: str) -> np.ndarray:
        """Ids of `s` (through `encode_batch`, which releases the GIL: a server thread that
        tokenizes a long prompt does not stop the others)."""
        return self.encode_batch([s])[0]

    def encode_batch(self, texts: list[str]) -> list[np.ndarray]:
        """Many texts at once (the Rust library encodes them on all cores)."""
        return [np.asarray(e.ids, dtype=np.int32)
                for e in self._tok.encode_batch(texts, add_special_tokens=False)]

    def decode(self, ids) -> str:
        return self._tok.decode([int(i) for i in np.asarray(ids).reshape(-1)],
                                skip_special_tokens=True)

    @functools.cached_property
    def _byte_level(self) -> bool:
        """Whether the decoder maps each character of a piece to a byte (GPT-2's byte level)."""
        decoder = json.loads(self._tok.to_str()).get("decoder") or {}
        parts = decoder.get("decoders") or [decoder]
        return any(isinstance(d, dict) and d.get("type") == "ByteLevel" for d in parts)

    def token_bytes(self, token: int) -> bytes:
        """The bytes one token stands for: a byte-level piece's bytes, a byte-fallback piece
        (`<0xE2>`)'s byte, else its decoded text (special tokens by name)."""
        piece = self._tok.id_to_token(int(token)) or ""
        if self._byte_level and piece and all(c in UNICODE_TO_BYTE for c in piece):
            return bytes(UNICODE_TO_BYTE[c] for c in piece)
        if (m := BYTE_FALLBACK.fullmatch(piece)) is not None:
            return bytes([int(m.group(1), 16)])
        return self._tok.decode([int(token)], skip_special_tokens=False).encode()

    def token_text(self, token: int) -> str:
        """One token as text (what `logprobs` lists): see `bytes_as_text`."""
        text = self._tok.decode([int(token)], skip_special_tokens=False)
        return text if REPLACEMENT not in text else bytes_as_text(self.token_bytes(token))

    @functools.cached_property
    def _added(self) -> tuple[tuple[int, ...], tuple[int, ...]]:
        """(prefix, suffix): the special tokens the post-processor puts around a text."""
        enc = self._tok.encode("a", add_special_tokens=True)
        mask, ids = enc.special_tokens_mask, enc.ids
        start, end = 0, len(ids)
        while start < end and mask[start]:
            start += 1
        while end > start and mask[end - 1]:
            end -= 1
        return tuple(ids[:start]), tuple(ids[end:])

    @property
    def prefix_ids(self) -> tuple[int, ...]:
        return self._added[0]

    @property
    def suffix_ids(self) -> tuple[int, ...]:
        return self._added[1]

    def encode_prompt(self, prompt: str | np.ndarray) -> np.ndarray:
        """A prompt as the tokenizer encodes a text (`transformers`' `tokenizer(text)`), its
        special prefix added once."""
        return with_specials(self, prompt)

    def encode_document(self, s: str) -> np.ndarray:
        """The tokenizer's prefix + ids + suffix, then EOS (unless the suffix ends with it)."""
        return self.encode_document_ids(self.encode(s))

    def encode_document_ids(self, ids: np.ndarray) -> np.ndarray:
        end = list(self.suffix_ids)
        if self.eos_id is not None and end[-1:] != [self.eos_id]:
            end.append(self.eos_id)
        return np.concatenate([self.prefix_ids, ids, end]).astype(np.int32)


def _byte_to_unicode() -> dict[str, int]:
    """GPT-2's byte-level alphabet: printable bytes stand for themselves, the others are
    shifted past 255 in order."""
    kept = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1),
            *range(ord("®"), ord("ÿ") + 1)]
    chars, extra = {}, 0
    for b in range(256):
        if b in kept:
            chars[chr(b)] = b
        else:
            chars[chr(256 + extra)] = b
            extra += 1
    return chars


UNICODE_TO_BYTE = _byte_to_unicode()
BYTE_FALLBACK = re.compile(r"<0x([0-9A-Fa-f]{2})>")
REPLACEMENT = "\ufffd"


def bytes_as_text(data: bytes) -> str:
    """A token's bytes as text: the text itself when they are whole UTF-8 characters, else
    `bytes:\\xe2\\x80` (OpenAI's form), so tokens holding different parts of a character stay
    apart instead of all reading as U+FFFD."""
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        return "bytes:" + "".join(f"\\x{b:02x}" for b in data)


def with_specials(tok, prompt: str | np.ndarray) -> np.ndarray:
    """`prompt` (a text, or its ids) with the tokenizer's `prefix_ids` before it (unless it
    already starts with them) and `suffix_ids` after it (unless it already ends with them)."""
    ids = tok.encode(prompt) if isinstance(prompt, str) else np.asarray(prompt, np.int64)
    prefix, suffix = list(tok.prefix_ids), list(tok.suffix_ids)
    if prefix and list(ids[:len(prefix)]) == prefix:
        prefix = []
    if suffix and list(ids[len(ids) - len(suffix):]) == suffix:
        suffix = []
    return np.concatenate([prefix, ids, suffix]).astype(np.int32)


def _chat_template(directory: Path, cfg: dict) -> str | None:
    """The tokenizer's Jinja chat template: `chat_template.jinja` beside it, else
    `tokenizer_config.json`'s `chat_template` (a string, or a list of named templates: the
    one named "default")."""
    jinja = directory / "chat_template.jinja"
    if jinja.is_file():
        try:
            return jinja.read_text()
        except (OSError, UnicodeDecodeError):
            return None
    value = cfg.get("chat_template")
    if isinstance(value, list):
        named = {t.get("name"): t.get("template") for t in value if isinstance(t, dict)}
        value = named.get("default")
    return value if isinstance(value, str) and value else None


@functools.lru_cache(maxsize=8)
def load_tokenizer(spec: str, option: str = "data.tokenizer") -> ByteTokenizer | HFTokenizer:
    """`data.tokenizer`: "" (or "bytes") = byte-level; else a tokenizer.json or a directory.
    `option` names it in errors (`--tokenizer` for `tokenize`)."""
    if not spec or spec == "bytes":
        return ByteTokenizer()

    return HFTokenizer(paths.localize(spec) if paths.is_remote(spec) else spec, option)


def copy_tokenizer_files(src: str | Path, dst: Path) -> list[str]:
    """Copy the tokenizer files of `src` (a tokenizer.json or its directory) into `dst`."""
    src = Path(src)
    directory = src if src.is_dir() else src.parent
    copied = []
    dst.mkdir(parents=True, exist_ok=True)
    for name in TOKENIZER_FILES:
        path = src if (not src.is_dir() and name == "tokenizer.json") else directory / name
        if path.is_file():
            shutil.copyfile(path, dst / name)
            copied.append(name)
    return copied
