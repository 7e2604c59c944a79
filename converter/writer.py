"""Execution: stream the planned tensors into size-capped shards in a temp dir, then index, config, manifest; rename.

Memory stays bounded by a few buffers — two copy chunks (16 MiB: one written while the other is hashed), a 1 MiB
read buffer per hashing thread (large verbatim tensors are copied file to file in the kernel and hashed as read
back) — or one tensor for the rare exact rewrite (GPTQ v2→v1 qzeros).
Nothing appears at the output path until every file is written and fsynced; the output is claimed, put in place and
cleaned up after as safety.py describes.
"""
from __future__ import annotations

import errno
import hashlib
import json
import os
import re
import shutil
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Callable

from .checkpoint import INDEX, SIDE_FILES, auto_map_modules, file_state, loose_json, sglang_path_problem
from .errors import UserError, file_failed
from .layout import with_mtp_layers
from .manifest import MANIFEST, WRITTEN_KEYS, Manifest, build_manifest, config_json
from .plan import Plan, TensorPlan
from .safety import OutputLock, fsync_path, fsync_tree
from .safetensors_io import (PT_METADATA, Hasher, PendingTensor, forget_open_files, load_array, numpy_dtype,
                             tensor_to_bytes, torch_dtype, write_file)


def split_shards(tensors: list[TensorPlan], cap: int) -> list[list[TensorPlan]]:
    shards: list[list[TensorPlan]] = [[]]
    size = 0
    for t in tensors:
        if shards[-1] and size + t.nbytes > cap:
            shards.append([])
            size = 0
        shards[-1].append(t)
        size += t.nbytes
    return shards


def _copy_order(shard: list[TensorPlan]) -> list[TensorPlan]:
    """A shard's tensors in the order they are written: verbatim copies as they lie in their sources (by the
    recipe's source label, shard file name and offset — where the sources live does not change the output), so that
    neighbours are read and written together; then made or rewritten ones, in plan order."""
    copies = sorted((t for t in shard if t.made is None and t.rewrite is None),
                    key=lambda t: (t.source, t.src.file.name, t.src.start))
    return copies + [t for t in shard if t.made is not None or t.rewrite is not None]


def _pending(t: TensorPlan) -> PendingTensor:
    if t.made is None and t.rewrite is None:
        return PendingTensor(t.name, t.dtype, t.shape, t.nbytes, src=t.src)
    # a repacked tensor (torch), or an exact rewrite of one (numpy)
    make, dtype = (t.made, torch_dtype(t.dtype)) if t.made else (lambda: t.rewrite(load_array(t.src)),
                                                                  numpy_dtype(t.dtype))

    def rewritten():
        new = make()
        if tuple(new.shape) != t.shape or new.dtype != dtype:
            raise AssertionError(f"{t.name} was made {new.dtype}{list(new.shape)}, planned {t.dtype}{list(t.shape)}")
        yield tensor_to_bytes(new)

    return PendingTensor(t.name, t.dtype, t.shape, t.nbytes, rewritten)


def shard_names(count: int) -> list[str]:
    return [f"model-{i + 1:05d}-of-{count:05d}.safetensors" for i in range(count)]


_SHARD_NAME = re.compile(r"model-\d{5,}-of-\d{5,}\.safetensors")


def index_json(total_size: int, shard_of: dict[str, str]) -> str:
    """The safetensors index, exactly as json.dumps({"metadata": {"total_size": …}, "weight_map": …}, indent=2,
    sort_keys=True) + "\n" writes it, by json's C encoder: with indent, json falls back to its pure-Python encoder,
    0.3 s for the 171k entries of a DeepSeek-V3-sized job. The map goes through the C encoder with the indented
    line break as its item separator, and the braces are put on their own lines around it."""
    weight_map = json.dumps(dict(sorted(shard_of.items())), separators=(",\n    ", ": "))
    weight_map = "{\n    " + weight_map[1:-1] + "\n  }" if shard_of else "{}"
    return f'{{\n  "metadata": {{\n    "total_size": {int(total_size)}\n  }},\n  "weight_map": {weight_map}\n}}\n'


def _written_by_build(name: str, modules: list[str]) -> bool:
    """modules: the remote-code files the output's own config.json and tokenizer_config.json name (build copies
    them with the side files)."""
    return name in (MANIFEST, INDEX, "config.json", *SIDE_FILES, *modules) or _SHARD_NAME.fullmatch(name) is not None


def _not_replaceable(out: Path) -> str | None:
    """Why --force may not replace the directory `out`, or None: it may replace only an empty directory or an
    earlier output of build (its manifest and nothing build does not write), so that a mistyped -o (~, ., a
    project directory) never costs anyone their files."""
    with os.scandir(out) as it:
        entries = list(it)
    if entries and not any(e.name == MANIFEST for e in entries):
        return f"it holds no {MANIFEST}"
    modules = auto_map_modules(*(loose_json(out / name) for name in ("config.json", "tokenizer_config.json")))
    foreign = sorted(e.name for e in entries
                     if not (e.is_file(follow_symlinks=False) and _written_by_build(e.name, modules)))
    if foreign:
        return f"it holds {', '.join(foreign[:3])}{' …' if len(foreign) > 3 else ''}, which build does not write"
    return None


def check_output(out: Path, force: bool, plan: Plan | None = None) -> None:
    why = sglang_path_problem(out)
    if why:
        raise UserError(f"-o {why}; choose a UTF-8 name")
    if (out.exists() or out.is_symlink()) and not force:
        raise UserError(f"{out} already exists; choose another -o or pass --force to replace it")
    if out.is_symlink():
        raise UserError(f"{out} is a symbolic link; --force replaces only a directory — pass the directory itself or "
                        f"choose another -o")
    if out.exists() and not out.is_dir():
        raise UserError(f"{out} is a file, not a converted directory; --force replaces only a directory — remove it "
                        f"yourself or choose another -o")
    if out.exists():
        try:
            why = _not_replaceable(out)
        except OSError as e:
            raise UserError(f"{out}: cannot list it ({e.strerror}); --force replaces only an earlier output") from None
        if why:
            raise UserError(f"{out} is not an earlier output of mpconvert build ({why}); --force replaces only "
                            f"those — remove it yourself or choose another -o")
    if plan is not None:
        for label, src in plan.sources.items():
            p = src.ckpt.path
            if out.resolve() == p or p in out.resolve().parents or out.resolve() in p.parents:
                raise UserError(f"output {out} overlaps source {label!r} ({p}); write somewhere else — sources are "
                                f"never modified")


def _changed_source(plan: Plan) -> Path | None:
    """The first source shard that differs from when its header was read (Checkpoint.file_states), or None:
    planning's checks and the copy both assumed that file."""
    return next((src.ckpt.path / name for src in plan.sources.values()
                 for name, state in src.ckpt.file_states.items() if file_state(src.ckpt.path / name) != state), None)


def write(plan: Plan, out: Path, shard_size: int, force: bool = False,
          on_bytes: Callable[[int], None] = lambda n: None, lock: OutputLock | None = None) -> Manifest:
    """Write the converted directory; returns the manifest. `lock`: the output's lock when the caller took it before
    planning (the CLI does); else it is taken here. Nothing is lost: see safety.py. The plan's sources forget what
    writing does not need (Plan.forget_unplanned); the plan can be written again."""
    if lock is None:
        with OutputLock(Path(os.path.abspath(out))) as lock:
            return write(plan, out, shard_size, force, on_bytes, lock)
    out = lock.out
    forget_open_files()  # read the sources as they are now (_changed_source below watches them)
    check_output(out, force, plan)
    plan.forget_unplanned()  # bounds the peak: the plan, then the manifest
    free = shutil.disk_usage(out.parent).free
    need = plan.total_bytes + (1 << 20)
    if free < need:
        raise UserError(f"{out.parent}: {need / 1e9:.2f} GB needed, {free / 1e9:.2f} GB free; free space or "
                        f"write elsewhere")
    tmp = lock.aside("tmp")
    try:
        tmp.mkdir()
        manifest = _write_into(plan, tmp, shard_size, on_bytes)
        changed = _changed_source(plan)
        if changed is not None:
            raise UserError(f"a source file changed while building; nothing was written — {changed} is not as build "
                            f"read it (gone, or its size or modification time); rebuild when sources are stable")
        fsync_tree(tmp)
        lock.put_in_place(tmp)
        return manifest
    except OSError as e:
        shutil.rmtree(tmp, ignore_errors=True)
        if e.filename is not None and not Path(os.path.abspath(e.filename)).is_relative_to(tmp):  # a source, read
            raise file_failed(e, "nothing was written — ") from None
        if e.errno == errno.ENOSPC:
            raise UserError(f"{out.parent}: disk full while writing; nothing was written — free space and "
                            f"rebuild") from None
        raise UserError(f"{out.parent}: write failed ({e.strerror}); nothing was written") from None
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _write_into(plan: Plan, tmp: Path, shard_size: int, on_bytes) -> Manifest:
    shards = split_shards(plan.tensors, shard_size)
    names = shard_names(len(shards))
    digests: dict[str, str] = {}
    shard_of: dict[str, str] = {}
    with Hasher() as hasher, ThreadPoolExecutor(1, thread_name_prefix="mpconvert-flush") as flusher:
        flushed = []
        for name, shard in zip(names, shards):
            write_file(tmp / name, [_pending(t) for t in _copy_order(shard)], PT_METADATA, on_bytes, hasher, digests)
            shard_of.update({t.name: name for t in shard})
            # each shard flushed as soon as written, on a thread: the disk works while the last tensors are hashed
            # and the next shards copied (fsync_tree later finds them clean)
            flushed.append(flusher.submit(fsync_path, tmp / name))
        hasher.wait()
        for f in flushed:
            f.result()
    (tmp / INDEX).write_text(index_json(plan.total_bytes, shard_of))
    files = {}
    for f, path in plan.side_files.items():
        shutil.copyfile(path, tmp / f)
        files[f] = hashlib.sha256((tmp / f).read_bytes()).hexdigest()
    config = {k: v for k, v in plan.base.ckpt.config.items() if k not in WRITTEN_KEYS}
    n = plan.info.num_layers  # (every MTP layer holds linears, which know their layer)
    config = with_mtp_layers(config, len({m.role.layer for m in plan.modules if (m.role.layer or 0) >= n}))
    manifest = build_manifest(plan, shard_of, digests, config, files)
    raw = manifest.dumps()
    (tmp / MANIFEST).write_bytes(raw)
    (tmp / "config.json").write_text(json.dumps(config_json(manifest, raw), indent=2, sort_keys=True) + "\n")
    return manifest
