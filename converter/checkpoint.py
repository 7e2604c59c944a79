"""A checkpoint directory opened lazily: config, index, and every tensor's location — no tensor data is read.

Mirrors mergekit's lazy loader: a name → (file, offset) map over all shards; bytes are read only when copied.
"""
from __future__ import annotations

import hashlib
import json
import os
import re
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path

import msgspec

from .errors import UserError
from .safetensors_io import TensorInfo, read_header, regular_file_size

INDEX = "model.safetensors.index.json"
SINGLE = "model.safetensors"
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")
# What a server needs besides weights and config: copied from the base into the output when present.
SIDE_FILES = ("generation_config.json", "tokenizer.json", "tokenizer_config.json", "tokenizer.model",
              "special_tokens_map.json", "added_tokens.json", "vocab.json", "merges.txt", "chat_template.jinja",
              "chat_template.json", "preprocessor_config.json")
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json")  # one of them: the checkpoint has a tokenizer
# A tokenizer's vocabulary under a name of its own class's choosing (Kimi-K2's tiktoken.model, Qwen-1's
# qwen.tiktoken, T5's spiece.model): loaded by the remote tokenizer code that auto_map names, so it travels with it.
VOCAB_SUFFIXES = (".model", ".tiktoken")


def auto_map_modules(*configs: dict) -> list[str]:
    """The remote-code files (`module.py`) that configs' `auto_map` entries name: "module.Class", or a tokenizer's
    [slow, fast] pair of them ("repo--module.Class" lives in another repository). transformers loads them from the
    model's directory under --trust-remote-code, which SGLang's DeepSeek-V3 launch commands pass."""
    names = set()
    for cfg in configs:
        amap = cfg.get("auto_map") if isinstance(cfg, dict) else None
        for ref in (amap.values() if isinstance(amap, dict) else ()):
            for r in (ref if isinstance(ref, list) else [ref]):
                module = r.rsplit(".", 1)[0] if isinstance(r, str) and "--" not in r else ""
                if module.isidentifier():
                    names.add(f"{module}.py")
    return sorted(names)


def loose_json(p: Path) -> dict:
    """A side file's JSON where a problem in it is the server's to meet, not build's (it is copied as it is): {}
    when it is missing, not a regular file (a FIFO: side_files refuses one) or not JSON."""
    try:
        return json.loads(p.read_text()) if p.is_file() else {}
    except (OSError, ValueError):
        return {}


def sglang_path_problem(directory: Path) -> str | None:
    """Why SGLang could not load a model from `directory`, judging by its path alone, or None: its loader (safetensors'
    Rust reader) opens only UTF-8 paths ("Path … is not valid UTF-8"), and a name that is not UTF-8 reaches Python
    as surrogates."""
    try:
        os.path.abspath(directory).encode("utf-8")
    except UnicodeEncodeError:
        return (f"{os.fsencode(directory)!r} is not a UTF-8 path, and SGLang's loader (safetensors) opens no file "
                f"under one ('Path … is not valid UTF-8')")
    return None


def has_tokenizer(directory: Path) -> bool:
    """A tokenizer file SGLang (transformers) can load: one of TOKENIZER_FILES, or a tiktoken or sentencepiece model
    under another name (tiktoken.model, qwen.tiktoken)."""
    return directory.is_dir() and tokenizer_among(p.name for p in directory.iterdir())


def tokenizer_among(names) -> bool:
    """Whether files of these names hold a tokenizer (has_tokenizer's rule, on names)."""
    return any(n in TOKENIZER_FILES or Path(n).suffix in VOCAB_SUFFIXES for n in names)


def file_state(p: Path) -> tuple[int, int] | None:
    """Size and modification time: what tells that a source file changed since it was read; None where there is no
    such file (now)."""
    try:
        st = os.stat(p)
    except (FileNotFoundError, NotADirectoryError):
        return None
    return st.st_size, st.st_mtime_ns


def read_json(path: Path, what: str, strict: bool = False, missing: str | None = None) -> dict:
    """A JSON object file of a model directory (config, index): one error line for each way it can be wrong.
    strict: JSON as its RFC has it, decoded in C (msgspec) — for the safetensors index, whose weight map has 177k
    entries in a DeepSeek-V3-sized source (json.loads takes twice as long); a config may hold NaN or Infinity, which
    Python's json writes and reads and strict JSON refuses. missing: what to say when the file is absent (or a link
    to nothing) — by default a source's fix; a converted directory's reader says its own."""
    try:
        regular_file_size(path)
        data = msgspec.json.decode(path.read_bytes()) if strict else json.loads(path.read_text())
    except FileNotFoundError:
        raise UserError(f"{path}: " + (missing or f"missing {what}; point the recipe at a Hugging Face checkpoint "
                                                  f"directory")) from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, msgspec.DecodeError) as e:
        raise UserError(f"{path}: cannot parse {what} ({e}); fix or re-save the file") from None
    except RecursionError:  # (both decoders recurse per nesting level)
        raise UserError(f"{path}: {what} is nested deeper than any reader follows; fix or re-save the file") from None
    if not isinstance(data, dict):
        raise UserError(f"{path}: {what} is not a JSON object; fix or re-save the file")
    return data


_NUMBERED = re.compile(r"(.*)-(\d+)-of-(\d+)\.safetensors")


def _check_numbering(names: list[str], where: Path) -> None:
    """Shards named as save_pretrained numbers them (model-00002-of-00005.safetensors) must all be there when no
    index lists them: a missing one takes whole layers and parts of others with it."""
    series: dict[tuple[str, str], set[int]] = {}
    for name in names:
        m = _NUMBERED.fullmatch(name)
        if m:
            series.setdefault((m[1], m[3]), set()).add(int(m[2]))
    for (stem, total), held in sorted(series.items()):
        first = 0 if 0 in held else 1  # save_pretrained counts from 1; some tools from 0
        expected = range(first, first + int(total))
        if len(held) == len(expected) and min(held) == first and max(held) == expected[-1]:
            continue
        stray = sorted(i for i in held if i not in expected)  # (a range's `in` is arithmetic: "of-99999999999")
        number = stray[0] if stray else next(i for i in expected if i not in held)
        shard = f"{stem}-{number:0{len(total)}d}-of-{total}.safetensors"
        raise UserError(f"{where}: shard {shard} is {'numbered past the total' if stray else 'missing'} (no {INDEX} "
                        f"lists the shards, and they are numbered of {int(total)}); re-download the checkpoint")


def is_weight_map(weight_map) -> bool:
    """An index's weight_map as safetensors writes it: tensor name → shard file name (one C pass over the values:
    a DeepSeek-V3-sized index has 177k)."""
    return isinstance(weight_map, dict) and set(map(type, weight_map.values())) <= {str}


@dataclass
class Checkpoint:
    """One checkpoint directory: `tensors` maps every tensor name to where its bytes are."""

    path: Path
    label: str  # how messages name it: "base" or the recipe's source name
    tensors: dict[str, TensorInfo] = field(default_factory=dict)
    file_fingerprints: dict[str, str] = field(default_factory=dict)  # file name → sha256(header) + size
    # file name → file_state when its header was read: what every later read of it (value checks, the writer's
    # copy) assumes; the writer compares against it, so a change during planning is caught as one during writing
    file_states: dict[str, tuple[int, int] | None] = field(default_factory=dict)

    @classmethod
    def open(cls, path: Path, label: str) -> "Checkpoint":
        path = Path(path)
        try:
            is_dir = path.is_dir()
        except OSError as e:  # a name too long for the file system: pathlib raises it, a traceback for the user
            shown = str(path) if len(str(path)) <= 120 else f"{str(path)[:100]}…"
            raise UserError(f"{label}: {shown}: {e.strerror}; fix the path in the recipe") from None
        if not is_dir:
            raise UserError(f"{label}: {path} is not a directory; fix the path in the recipe")
        ck = cls(path.resolve(), label)
        weight_map = ck._weight_map()  # read once, not kept: 177k entries of a DeepSeek-V3-sized source are 40 MB
        shard_of: dict[str, str] = {}
        for name in ck._shard_names(weight_map):
            # before the read, so that a change after it is seen later (a missing file or broken link: read_header
            # says what is wrong, in the words it uses for every source file)
            ck.file_states[name] = file_state(ck.path / name)
            infos, raw = read_header(ck.path / name)
            size = (ck.path / name).stat().st_size
            digest = hashlib.sha256(raw)  # (the header and then the size: no copy of a 40 MB header to join them)
            digest.update(str(size).encode())
            ck.file_fingerprints[name] = digest.hexdigest()
            if not ck.tensors.keys().isdisjoint(infos):
                t = next(t for t in infos if t in ck.tensors)
                raise UserError(f"{label}: tensor {t!r} appears in both {shard_of[t]} and {name}; the checkpoint is "
                                f"inconsistent")
            ck.tensors.update(infos)
            shard_of.update(dict.fromkeys(infos, name))
        if weight_map is not None:
            ck._check_index(weight_map, shard_of)
        return ck

    def _json(self, name: str, what: str, strict: bool = False) -> dict:
        """One of the directory's JSON files, read only where check_inside allows (its content may reach the
        output: config.json does)."""
        self.check_inside(self.path / name)
        return read_json(self.path / name, what, strict)

    def _weight_map(self) -> dict[str, str] | None:
        """The index's tensor → shard map (None without an index), checked for its types."""
        index = self.path / INDEX
        if not index.exists() and not index.is_symlink():
            return None
        weight_map = self._json(INDEX, "safetensors index", strict=True).get("weight_map")
        if not is_weight_map(weight_map):
            raise UserError(f"{index}: weight_map must map tensor names to shard file names; re-save the checkpoint")
        return weight_map

    def _shard_names(self, weight_map: dict[str, str] | None) -> list[str]:
        index, single = self.path / INDEX, self.path / SINGLE
        if weight_map is not None:
            files = sorted(set(weight_map.values()))
            if not files:
                raise UserError(f"{index}: weight_map is empty; re-save the checkpoint")
            for f in files:
                if not f.endswith(".safetensors") or "/" in f or "\\" in f or f in (".", ".."):
                    raise UserError(f"{index}: shard path {f!r} escapes the checkpoint directory or is not "
                                    f".safetensors; refusing to read it")
                if not (self.path / f).exists():
                    raise UserError(f"{index}: shard {f} is listed but missing; re-download the checkpoint")
            names = files
        elif single.exists():
            names = [SINGLE]
        else:
            names = sorted(p.name for p in self.path.glob("*.safetensors"))
            _check_numbering(names, self.path)
        if names:
            for name in names:
                self.check_inside(self.path / name)
            return names
        pickles = sorted(p.name for p in self.path.iterdir() if p.suffix in PICKLE_SUFFIXES)
        if pickles:
            raise UserError(f"{self.label}: {self.path} holds only pickle weights ({pickles[0]}); mpconvert never "
                            f"unpickles — re-save it as safetensors (save_pretrained(..., safe_serialization=True))")
        raise UserError(f"{self.label}: {self.path} has no .safetensors weights; point the recipe at a checkpoint dir")

    def check_inside(self, p: Path) -> None:
        """A file of the checkpoint must stay in it. A symlink is followed only where it stays inside the directory,
        or — the Hugging Face cache layout, `<repo>/snapshots/<rev>/FILE -> ../../blobs/<sha>` — inside its
        repository's blobs/."""
        real = p.resolve()
        if real.parent == self.path or self.path in real.parents:
            return
        if self.path.parent.name == "snapshots" and (self.path.parent.parent / "blobs") in real.parents:
            return
        raise UserError(f"{self.label}: {p} is a link to {real}, outside the checkpoint directory (and outside a "
                        f"Hugging Face cache repository's blobs/); refusing to follow it — copy the file in instead")

    def _check_index(self, weight_map: dict[str, str], shard_of: dict[str, str]) -> None:
        if weight_map.items() <= shard_of.items():
            return
        t, f = next((t, f) for t, f in weight_map.items() if shard_of.get(t) != f)
        raise UserError(f"{self.path / INDEX}: lists tensor {t!r} in {f}, which does not hold it; the index is stale "
                        f"— re-save the checkpoint")

    @cached_property
    def config(self) -> dict:
        return self._json("config.json", "config.json")

    @cached_property
    def quantize_config(self) -> dict | None:
        """The quantization config: config.json's `quantization_config`, else quantize_config.json (auto-gptq)."""
        qc = self.config.get("quantization_config")
        if qc is None and os.path.lexists(self.path / "quantize_config.json"):
            qc = self._json("quantize_config.json", "quantize_config.json")
        return qc

    @cached_property
    def side_files(self) -> tuple[str, ...]:
        """The SIDE_FILES this checkpoint has, the remote-code files its config.json and tokenizer_config.json name
        (auto_map_modules; without them SGLang under --trust-remote-code could not read the output's config), and
        the vocabularies such code reads under names of its own (VOCAB_SUFFIXES: a Kimi-K2 output without its
        tiktoken.model had a tokenizer that could not load), each a regular file inside it. A FIFO, a device, a
        directory or a link out of the directory under one of those names is refused, not skipped: the output would
        lack it."""
        present = []
        vocabularies = sorted(p.name for p in self.path.iterdir()
                              if p.suffix in VOCAB_SUFFIXES and p.name not in SIDE_FILES and not p.is_dir())
        for name in (*SIDE_FILES, *auto_map_modules(self.config, loose_json(self.path / "tokenizer_config.json")),
                     *vocabularies):
            p = self.path / name
            if os.path.lexists(p):
                self.check_inside(p)
                try:
                    regular_file_size(p)
                except FileNotFoundError:
                    raise UserError(f"{self.label}: {p} is a broken link; restore the file or remove the link") \
                        from None
                present.append(name)
        return tuple(present)

    def fingerprint(self) -> str:
        """Identity of the checkpoint's weights: hash of every shard's header and size (cheap, catches edits)."""
        h = hashlib.sha256()
        for name in sorted(self.file_fingerprints):
            h.update(f"{name}:{self.file_fingerprints[name]}\n".encode())
        return h.hexdigest()
