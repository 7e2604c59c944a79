"""Never lose data: how build claims its output path, puts a finished output in place, and cleans up after a build
that died.

- One exclusive lock per output path (`.OUT.mpconvert-lock` beside it, flock: the kernel drops it when the holder
  dies, even by kill -9) for the whole build; a second build of the same output is refused while one runs.
- The output is written into `.OUT.mpconvert-tmp-PID` beside it and renamed into place with RENAME_NOREPLACE: a path
  that appeared meanwhile (another program's directory, even an empty one) is never replaced. With --force, only
  an earlier output of build (or an empty directory: writer.check_output), and only the exact directory that
  existed when the build started (same device, inode and change time), is swapped out: it is renamed to
  `.OUT.mpconvert-old-PID` first, the new one renamed in, then the old one renamed to `.OUT.mpconvert-trash-PID`
  and deleted (so that a half-deleted directory never carries the name of one that may be restored).
- Small single files (plan's recipes, reports, plot) are written to a temporary file beside them and renamed in
  (write_file_atomic); an existing file is replaced only with --force.
- Whoever next takes the lock of an output finds the leftovers of dead builds of it (the lock proves their builders
  are gone): temporary and trash directories are deleted; an old output whose swap was cut short is put back where
  it was if nothing took its place. `recover()` says what it did.
"""
from __future__ import annotations

import ctypes
import errno
import fcntl
import hashlib
import os
import shutil
import socket
from pathlib import Path

from .errors import UserError


def identity(p: Path) -> tuple[int, int, int] | None:
    """Which file is at p: device, inode and change time (an inode number is reused at once after a delete, so a
    directory replaced by another can show the same one; the change time tells them apart, and also moves when
    anything is added to or removed from the directory — then --force does not replace it either)."""
    try:
        st = os.lstat(p)
    except FileNotFoundError:
        return None
    return st.st_dev, st.st_ino, st.st_ctime_ns


def fsync_path(d: Path) -> None:
    """Flush a file or a directory (through a read-only descriptor, which fsync accepts for both)."""
    fd = os.open(d, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_tree(d: Path) -> None:
    """Every file in `d`, then `d` itself: what a rename then makes visible is on disk — the shards and the small
    files (manifest, index, config, tokenizer) alike. The writer has already flushed each shard on a thread as it
    was written (a flush in the writer's own path left the disk idle during writing and the writer idle during
    flushing); here they are clean, and the small files and the directory are flushed."""
    for p in sorted(d.iterdir()):
        if p.is_file():
            fsync_path(p)
    fsync_path(d)


def write_file_atomic(path: Path, write, force: bool) -> None:
    """A small output file (plan's recipe, report, plot): `write(tmp)` fills a temporary file beside `path`, which is
    flushed and renamed into place — over an existing file only with `force`, never half-written. An existing
    directory or symlink at `path` is refused."""
    if path.is_symlink() or path.is_dir():
        raise UserError(f"{path} is a {'symbolic link' if path.is_symlink() else 'directory'}; give a file name")
    tmp = path.with_name(f".{_short(path.name)}.mpconvert-tmp-{os.getpid()}")
    try:
        write(tmp)
        fsync_path(tmp)
        if force:
            os.replace(tmp, path)
        else:
            rename_noreplace(tmp, path)
    except FileExistsError:
        raise UserError(f"{path} appeared while mpconvert ran (not by it); left untouched — pass --force to replace "
                        f"it") from None
    except OSError as e:
        raise UserError(f"{path}: cannot write ({e.strerror}); check the path and free space") from None
    finally:
        if os.path.lexists(tmp):
            os.unlink(tmp)
    fsync_path(path.parent)


def _short(name: str) -> str:
    """The output's name as its side files carry it: long names are cut and made unique by a hash, so that the
    side files stay within the 255-byte name limit for any name the output itself may have."""
    raw = os.fsencode(name)  # (a name that is not UTF-8 holds surrogates: str.encode refuses them)
    if len(raw) <= 150:
        return name
    return raw[:100].decode(errors="ignore") + "~" + hashlib.sha256(raw).hexdigest()[:12]


_libc = None


def rename_noreplace(src: Path, dst: Path) -> None:
    """rename(2) that fails with FileExistsError instead of replacing dst (Linux renameat2 RENAME_NOREPLACE)."""
    global _libc
    if _libc is None:
        _libc = ctypes.CDLL(None, use_errno=True)
    fn = getattr(_libc, "renameat2", None)
    if fn is not None:
        if fn(-100, os.fsencode(src), -100, os.fsencode(dst), 1) == 0:  # AT_FDCWD, RENAME_NOREPLACE
            return
        err = ctypes.get_errno()
        if err not in (errno.EINVAL, errno.ENOSYS):  # EINVAL/ENOSYS: the filesystem lacks it; fall back below
            raise OSError(err, os.strerror(err), str(dst))
    if os.path.lexists(dst):  # fallback: other mpconvert builds are kept out by the lock; the window is tiny
        raise FileExistsError(errno.EEXIST, os.strerror(errno.EEXIST), str(dst))
    os.rename(src, dst)


class OutputLock:
    """The exclusive claim of one build on one output path (a context manager)."""

    def __init__(self, out: Path):
        self.out = out
        self.stem = f".{_short(out.name)}.mpconvert"
        self.path = out.parent / f"{self.stem}-lock"
        self.fd: int | None = None

    def __enter__(self) -> "OutputLock":
        self.created = [p for p in (self.out.parent, *self.out.parent.parents) if not p.exists()]
        try:
            self.out.parent.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            file = next((p for p in (self.out.parent, *self.out.parent.parents) if p.exists() and not p.is_dir()), None)
            why = f"{file} is a file, not a directory" if file is not None else e.strerror
            raise UserError(f"{self.out.parent}: cannot create the output's parent directory ({why}); choose another "
                            f"-o") from None
        while True:
            try:
                fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            except OSError as e:
                raise UserError(f"{self.out.parent}: cannot write there ({e.strerror}); choose another -o or fix "
                                f"its permissions") from None
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = os.read(fd, 200).decode(errors="replace").strip() or "unknown"
                os.close(fd)
                raise UserError(f"{self.out}: another mpconvert build ({holder}) is writing this output now; wait "
                                f"for it to finish or choose another -o") from None
            # the holder before us unlinks the lock file as it lets go: locking a file no longer at the path
            # would not exclude the next build, so check that ours is still the one there
            if _same_file(fd, self.path):
                break
            os.close(fd)
        os.ftruncate(fd, 0)
        os.write(fd, f"pid {os.getpid()} on {socket.gethostname()}".encode())
        self.fd = fd
        self.recovered = self.recover()
        self.existing = identity(self.out)  # the only thing --force may replace
        return self

    def __exit__(self, exc_type, *exc) -> None:
        try:
            os.unlink(self.path)
        except FileNotFoundError:
            pass
        os.close(self.fd)
        self.fd = None
        if exc_type is not None:  # a failed build leaves no trace: not even the parent directories it made for -o
            for d in self.created:  # deepest first
                try:
                    d.rmdir()
                except OSError:
                    break

    def aside(self, kind: str) -> Path:
        """This build's temporary ("tmp"), swapped-out ("old") or being-deleted ("trash") directory beside the
        output."""
        return self.out.parent / f"{self.stem}-{kind}-{os.getpid()}"

    def leftovers(self, kind: str) -> list[Path]:
        prefix = f"{self.stem}-{kind}-"
        return sorted(p for p in self.out.parent.iterdir() if p.name.startswith(prefix) and p.name[len(prefix):]
                      .isdigit())

    def recover(self) -> list[str]:
        """Clean up after dead builds of this output (we hold its lock, so every leftover is a dead build's)."""
        said = []
        for old in self.leftovers("old"):
            if identity(self.out) is None:
                os.rename(old, self.out)
                said.append(f"restored {self.out} from {old.name}: a --force build of it died while swapping it")
            else:
                shutil.rmtree(old, ignore_errors=True)
                said.append(f"removed {old.name}: the replaced output of a --force build that died before deleting "
                            f"it")
        for tmp in self.leftovers("tmp"):
            shutil.rmtree(tmp, ignore_errors=True)
            said.append(f"removed {tmp.name}: the unfinished output of a build that died")
        for trash in self.leftovers("trash"):
            shutil.rmtree(trash, ignore_errors=True)
            said.append(f"removed {trash.name}: the replaced output a --force build was deleting when it died")
        return said

    def put_in_place(self, new: Path) -> None:
        """Rename the finished `new` to the output. Only the directory that was there when the lock was taken may
        be replaced (the caller checked --force)."""
        existing, now = self.existing, identity(self.out)
        if now != existing:
            what = "appeared" if existing is None else "was replaced or removed"
            raise UserError(f"{self.out} {what} while this build ran (not by mpconvert); it was left untouched and "
                            f"nothing was written — check who writes there, then rebuild")
        if existing is None:
            try:
                rename_noreplace(new, self.out)
            except FileExistsError:
                raise UserError(f"{self.out} appeared while this build ran (not by mpconvert); it was left "
                                f"untouched and nothing was written — check who writes there, then rebuild") from None
        else:
            old = self.aside("old")
            os.rename(self.out, old)
            try:
                rename_noreplace(new, self.out)
            except FileExistsError:
                raise UserError(f"{self.out} appeared while this build swapped it; the previous output is kept at "
                                f"{old} and nothing else was touched") from None
            trash = self.aside("trash")  # renamed first: a kill during the delete must leave nothing restorable
            os.rename(old, trash)
            shutil.rmtree(trash, ignore_errors=True)
        fsync_path(self.out.parent)


def _same_file(fd: int, path: Path) -> bool:
    st = os.fstat(fd)
    return (identity(path) or ())[:2] == (st.st_dev, st.st_ino)
