"""Nothing lost: a directory that appears at -o during a build, a concurrent build, --force only on what was there,
and builds killed with SIGKILL at random points (outputs absent or complete, sources unchanged, leftovers of dead
builds cleaned by the next build of the same output)."""
from __future__ import annotations

import errno
import hashlib
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from mpconvert import safetensors_io as sio
from mpconvert.errors import UserError
from mpconvert.plan import make_plan
from mpconvert.recipe import load_recipe
from mpconvert.safety import OutputLock
from mpconvert.writer import write

from helpers import write_recipe

RULES = '- {match: "self_attn.*", layers: 0, source: fp8}'
SOURCES = {"fp8": "ct-fp8-static", "gptq": "gptq"}


def recipe(llama, d: Path) -> Path:
    return write_recipe(d, llama, SOURCES, "gptq", RULES)


def tree_digest(d: Path) -> str:
    h = hashlib.sha256()
    for p in sorted(d.rglob("*")):
        if p.is_file():
            st = p.stat()
            h.update(f"{p.relative_to(d)} {st.st_size} {st.st_mtime_ns}\n".encode())
            h.update(hashlib.sha256(p.read_bytes()).digest())
    return h.hexdigest()


def leftovers(parent: Path) -> list[str]:
    return sorted(p.name for p in parent.iterdir() if ".mpconvert-" in p.name)


def refused(plan, out: Path, force: bool, meanwhile) -> str:
    """Build with `meanwhile` called as the shards are written; the build must refuse: its message."""
    try:
        write(plan, out, 1 << 30, force, meanwhile)
    except UserError as e:
        return str(e)
    raise AssertionError("the build must refuse")


def test_a_directory_appearing_at_the_output_mid_build_is_left_alone(llama, tmp_path):
    plan = make_plan(load_recipe(recipe(llama, tmp_path)))
    out = tmp_path / "out"

    def someone_else(n):  # another program creates the output path while the shards are being written
        if not out.exists():
            out.mkdir()
            (out / "theirs.txt").write_text("not mpconvert's")

    e = refused(plan, out, False, someone_else)
    assert "appeared while this build ran" in e and "left untouched" in e
    assert sorted(os.listdir(out)) == ["theirs.txt"] and leftovers(tmp_path) == []


def test_every_file_is_flushed_before_the_output_appears(llama, tmp_path, monkeypatch):
    """Durability: each file the output holds (shards, index, manifest, config, tokenizer) and the directory itself
    are fsynced before the rename makes them visible; nothing is flushed after it but the parent's entry."""
    plan = make_plan(load_recipe(recipe(llama, tmp_path)))
    out, flushed, real_fsync = tmp_path / "out", [], os.fsync

    def fsync(fd):
        flushed.append((os.readlink(f"/proc/self/fd/{fd}"), out.exists()))
        real_fsync(fd)
    monkeypatch.setattr(os, "fsync", fsync)
    write(plan, out, 200_000)
    early = [Path(p) for p, visible in flushed if not visible]
    tmp_dir = early[-1]  # the directory itself, last, under its temporary name
    assert ".mpconvert-" in tmp_dir.name and all(p.parent == tmp_dir for p in early[:-1])
    assert len(list(out.glob("model-*.safetensors"))) > 1
    assert {p.name for p in early[:-1]} == {p.name for p in out.iterdir()}, "a file was not flushed before the rename"


def test_force_replaces_only_the_directory_that_was_there(llama, tmp_path):
    plan = make_plan(load_recipe(recipe(llama, tmp_path)))
    out = tmp_path / "out"
    write(plan, out, 1 << 30)  # the earlier output that --force may replace

    def swap(n):  # someone replaces the output directory by another one during the build
        if not (out / "new.txt").exists():
            shutil.rmtree(out)
            out.mkdir()
            (out / "new.txt").write_text("someone else's")

    assert "was replaced or removed while this build ran" in refused(plan, out, True, swap)
    assert sorted(os.listdir(out)) == ["new.txt"] and leftovers(tmp_path) == []
    shutil.rmtree(out)
    write(plan, out, 1 << 30)
    before = (out / "mpconvert_manifest.json").stat().st_ino
    write(plan, out, 1 << 30, True)  # unchanged during the build: --force replaces it
    assert (out / "mpconvert_manifest.json").stat().st_ino != before


@pytest.mark.parametrize("at", [1, 3, 6])
def test_ctrl_c_while_copying_says_so_and_leaves_nothing(llama, cli, tmp_path, monkeypatch, at):
    """Ctrl-C (KeyboardInterrupt, raised where Python delivers it: in the copy loop) while hashing threads hold
    read-back jobs and a shard is being flushed: exit 130 with one line, no output, no temporary directory, and a
    rebuild works."""
    monkeypatch.setattr(sio, "KERNEL_COPY_MIN", 256)  # the tiny model's tensors through the kernel copy and threads
    monkeypatch.setattr(sio.Hasher, "OVERLAP", 0)
    calls, real = [], sio._copy_one

    def interrupted(*args):
        calls.append(1)
        if len(calls) == at:
            raise KeyboardInterrupt
        return real(*args)
    monkeypatch.setattr(sio, "_copy_one", interrupted)
    r, out = recipe(llama, tmp_path), tmp_path / "out"
    res = cli("build", r, "-o", out, "--shard-size", "300KB")
    assert res.exit_code == 130 and "interrupted; nothing was written" in res.output, res.output
    assert "Traceback" not in res.output and not out.exists() and leftovers(tmp_path) == []
    monkeypatch.setattr(sio, "_copy_one", real)
    assert cli("build", r, "-o", out).exit_code == 0


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGHUP], ids=["SIGTERM", "SIGHUP"])
def test_sigterm_while_copying_says_so_and_leaves_nothing(signum, llama, cli, tmp_path, monkeypatch):
    """SIGTERM (a CI time-out, `timeout`, a container stopping) or SIGHUP (the terminal closed) ended Python at once:
    the temporary directory and the lock stayed until the next build. main() now takes them as Ctrl-C: one line,
    exit 128 + the signal, nothing left."""
    from mpconvert.cli.main import on_signal

    monkeypatch.setattr(sio, "KERNEL_COPY_MIN", 256)
    calls, real = [], sio._copy_one

    def terminated(*args):
        calls.append(1)
        if len(calls) == 3:
            signal.raise_signal(signum)  # a real signal, to the handler main() installs
        return real(*args)
    monkeypatch.setattr(sio, "_copy_one", terminated)
    old = signal.signal(signum, on_signal)
    try:
        r, out = recipe(llama, tmp_path), tmp_path / "out"
        res = cli("build", r, "-o", out, "--shard-size", "300KB")
    finally:
        signal.signal(signum, old)
    name = signal.Signals(signum).name
    assert res.exit_code == 128 + signum and f"terminated ({name}); nothing was written" in res.output, res.output
    assert "Traceback" not in res.output and not out.exists() and leftovers(tmp_path) == []


def test_the_command_takes_sigterm_and_leaves_an_ignored_sighup_ignored(tmp_path):
    """The installed command (main() installs the handlers): blocked reading a recipe that is a FIFO, SIGHUP under
    nohup (ignored when it started) changes nothing, SIGTERM ends it with one line and exit 143."""
    fifo = tmp_path / "recipe.yaml"
    os.mkfifo(fifo)
    command = [str(Path(sys.executable).parent / "mpconvert"), "build", str(fifo), "-o", str(tmp_path / "o")]
    p = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                         preexec_fn=lambda: signal.signal(signal.SIGHUP, signal.SIG_IGN))
    wchan, deadline = Path(f"/proc/{p.pid}/wchan"), time.monotonic() + 60
    while wchan.read_text() != "wait_for_partner" and time.monotonic() < deadline:  # blocked opening the FIFO
        time.sleep(0.1)
    p.send_signal(signal.SIGHUP)
    time.sleep(0.5)
    assert p.poll() is None
    p.send_signal(signal.SIGTERM)
    _, stderr = p.communicate(timeout=30)
    assert p.returncode == 143 and stderr.strip() == "terminated (SIGTERM); nothing was written", stderr


@pytest.mark.parametrize("call", ["copy_file_range", "pwrite"])
def test_a_disk_filling_up_mid_build_says_so_and_leaves_nothing(llama, cli, tmp_path, monkeypatch, call):
    """ENOSPC from the kernel copy or from a write, after the free-space check passed (another program filled the
    disk meanwhile; the errno is the kernel's, raised here — seen for real on a full loop-mounted ext4): one line,
    exit 2, no output, no temporary directory. A full disk is not a refusal to copy: no fallback that retries."""
    if call == "copy_file_range":
        monkeypatch.setattr(sio, "KERNEL_COPY_MIN", 256)  # the tiny model's tensors through the kernel copy
    calls, real = [], getattr(sio.os, call)

    def full(*args):
        calls.append(1)
        if len(calls) >= 3:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real(*args)
    monkeypatch.setattr(sio.os, call, full)
    res = cli("build", recipe(llama, tmp_path), "-o", tmp_path / "out", "--shard-size", "300KB")
    assert res.exit_code == 2 and "disk full while writing; nothing was written" in res.output, res.output
    assert len(calls) >= 3 and not (tmp_path / "out").exists() and leftovers(tmp_path) == []


def test_a_second_build_of_the_same_output_is_refused_while_one_runs(llama, cli, tmp_path):
    r = recipe(llama, tmp_path)
    out = tmp_path / "out"
    with OutputLock(out):  # held as a running build holds it
        res = cli("build", r, "-o", out)
        assert res.exit_code == 2 and "another mpconvert build (pid" in res.output
        assert "is writing this output now" in " ".join(res.output.split())
    assert not out.exists()
    assert cli("build", r, "-o", out).exit_code == 0
    res = cli("build", r, "-o", out)  # the second of two builds: refused, the first one's output kept
    assert res.exit_code == 2 and "already exists" in res.output


# A builder that imports mpconvert once and forks one child per build, so that a build starts at once and a kill can
# be timed against the build itself rather than against Python's and torch's start-up. It reads argument lists (JSON
# lines), prints each child's pid, then its exit status once it ends. The parent never runs torch (no OpenMP state to fork).
FORKING_BUILDER = """
import json, os, sys
import torch, mpconvert.plan, mpconvert.writer, mpconvert.verify  # loaded once; no torch op runs here
from mpconvert.cli.main import main
for line in sys.stdin:
    pid = os.fork()
    if pid == 0:
        sys.argv = ["mpconvert"] + json.loads(line)
        os.dup2(os.open(os.devnull, os.O_WRONLY), 1); os.dup2(os.open(os.devnull, os.O_WRONLY), 2)
        try:
            main()
            code = 0
        except SystemExit as e:
            code = e.code if isinstance(e.code, int) else 1
        os._exit(code)
    print(pid, flush=True)
    _, status = os.waitpid(pid, 0)
    print(status, flush=True)
"""


class Builder:
    def __init__(self):
        self.p = subprocess.Popen([sys.executable, "-c", FORKING_BUILDER], stdin=subprocess.PIPE,
                                  stdout=subprocess.PIPE, text=True)

    def start(self, *args) -> int:
        import json

        self.p.stdin.write(json.dumps([str(a) for a in args]) + "\n")
        self.p.stdin.flush()
        return int(self.p.stdout.readline())

    def status(self) -> int:
        return int(self.p.stdout.readline())

    def run(self, *args) -> tuple[int, float]:
        t0 = time.perf_counter()
        self.start(*args)
        status = self.status()
        return status, time.perf_counter() - t0

    def close(self):
        self.p.stdin.close()
        self.p.wait()


def test_kill_9_at_random_points_loses_nothing(llama, cli, tmp_path):
    """100 builds (half of them --force over an earlier output), each killed with SIGKILL at a random point of its
    run. After each: the output is absent or complete (verify passes). After the next build of the same output no
    leftovers remain; the sources are unchanged."""
    r = recipe(llama, tmp_path)
    sources = {k: tree_digest(llama[k]) for k in ("base", *SOURCES.values())}
    rng = random.Random(7)
    out = tmp_path / "out"
    b = Builder()
    try:
        times = []
        for _ in range(4):  # a whole build, warm: kills land anywhere in 0 … 1.2× its median
            status, secs = b.run("build", r, "-o", out)
            assert status == 0
            times.append(secs)
            shutil.rmtree(out)
        full = sorted(times)[2]
        print("build times in the forking builder:", [round(t, 3) for t in times])
        outcomes = {"absent": 0, "complete": 0, "finished": 0}
        left = set()
        for i in range(100):
            force = i % 2 == 1
            if force and not out.exists():  # (an earlier kill may have left a swap for this build to restore)
                assert b.run("build", r, "-o", out, "--force")[0] == 0
            if not force and out.exists():
                shutil.rmtree(out)
            pid = b.start("build", r, "-o", out, *(["--force"] if force else []))
            time.sleep(rng.uniform(0, 1.2) * full)
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            outcomes["finished"] += b.status() == 0
            left.update(leftovers(tmp_path))
            if out.exists():
                res = cli("verify", out, "--fast", "--json")
                assert res.exit_code == 0, f"kill {i}: a half-written output is in place: {res.output}"
                outcomes["complete"] += 1
            else:
                outcomes["absent"] += 1
        print("kill -9 outcomes:", outcomes, "leftovers seen:", sorted({x.rsplit("-", 1)[0] for x in left}))
        res = cli("build", r, "-o", out, "--force")
        assert res.exit_code == 0, res.output
        assert leftovers(tmp_path) == [], "the next build of the output removes the dead builds' leftovers"
    finally:
        b.close()
    assert {k: tree_digest(llama[k]) for k in sources} == sources
    assert outcomes["finished"] < 90 and any("tmp" in x for x in left), "kills must land inside builds' writes"


def test_a_force_swap_cut_short_is_restored(llama, cli, tmp_path):
    """A --force build that died between moving the old output aside and renaming the new one in: the next build
    of that output puts the old one back (nothing else had taken its place) and says so."""
    r = recipe(llama, tmp_path)
    out = tmp_path / "out"
    assert cli("build", r, "-o", out).exit_code == 0
    before = tree_digest(out)
    out.rename(tmp_path / ".out.mpconvert-old-999999")  # what the dead build left
    (tmp_path / ".out.mpconvert-tmp-999999").mkdir()
    res = cli("build", r, "-o", out)
    assert res.exit_code == 2 and "already exists" in res.output  # the old output is back: not overwritten
    assert "restored" in res.output and "removed .out.mpconvert-tmp-999999" in res.output
    assert tree_digest(out) == before and leftovers(tmp_path) == []


def test_a_source_changed_mid_build_writes_nothing(llama, tmp_path):
    """A source shard rewritten while the build copies from it (its mtime moves): the build fails, nothing is left."""
    src = tmp_path / "gptq"
    shutil.copytree(llama["gptq"], src)
    r = write_recipe(tmp_path, {**llama, "g": src}, {"g": "g"}, "g")
    plan = make_plan(load_recipe(r))
    [shard] = src.glob("*.safetensors")

    def touched(n):
        st = shard.stat()
        os.utime(shard, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))

    e = refused(plan, tmp_path / "out", False, touched)
    assert "a source file changed while building; nothing was written" in e
    assert not (tmp_path / "out").exists() and leftovers(tmp_path) == []


@pytest.mark.parametrize("when", ["after planning", "mid-copy"])
def test_a_source_moved_away_writes_nothing(when, llama, tmp_path):
    """A source directory moved (or removed) under a build: after planning read it, the first read of it names the
    file that went away; during the copy (its shard already open) the check after the copy sees it gone. Either way
    one line, nothing written, nothing left — not an internal error, not a "write failed" naming the output."""
    src = tmp_path / "gptq"
    shutil.copytree(llama["gptq"], src)
    plan = make_plan(load_recipe(write_recipe(tmp_path, {**llama, "g": src}, {"g": "g"}, "g")))
    [shard] = src.glob("*.safetensors")

    def move(n=0):
        if src.exists():
            src.rename(tmp_path / "moved")
    if when == "after planning":
        move()
    e = refused(plan, tmp_path / "out", False, move)
    if when == "after planning":
        assert e == (f"{shard}: No such file or directory — moved, replaced or removed while mpconvert was using it, "
                     f"or the disk failed; nothing was written — run again once it is stable")
    else:
        assert f"a source file changed while building; nothing was written — {shard} is not as build read it (gone" in e
    assert not (tmp_path / "out").exists() and leftovers(tmp_path) == []


def test_a_directory_moved_away_while_verify_reads_it(llama, cli, tmp_path, monkeypatch):
    """The converted directory moved (rebuilt, cleaned up) after verify read its headers, while its child hashes the
    tensors: one line naming the file, exit 2 — not an internal error from the child."""
    import mpconvert.verify as verify_module

    out = tmp_path / "out"
    assert cli("build", recipe(llama, tmp_path), "-o", out).exit_code == 0
    read_shards = verify_module._shards

    def then_moved(directory, rep):
        got = read_shards(directory, rep)
        out.rename(tmp_path / "moved")
        return got
    monkeypatch.setattr(verify_module, "_shards", then_moved)
    r = cli("verify", out)
    assert r.exit_code == 2 and "Traceback" not in r.output and "internal error" not in r.output, r.output
    assert f"{out}/model-00001-of-00001.safetensors: No such file or directory — moved, replaced or removed" in \
        " ".join(r.output.split())


@pytest.mark.parametrize("change", ["mtime", "appended"])
def test_a_source_changed_while_planning_writes_nothing(change, llama, tmp_path):
    """A source shard changed after build read and checked it but before the copy began (planning's checks of a
    DeepSeek-V3-sized job take seconds): the build fails as for a change mid-copy — the writer compares against the
    file as its header was read, not as it is when writing starts (a byte appended then was built over unseen)."""
    src = tmp_path / "gptq"
    shutil.copytree(llama["gptq"], src)
    plan = make_plan(load_recipe(write_recipe(tmp_path, {**llama, "g": src}, {"g": "g"}, "g")))
    [shard] = src.glob("*.safetensors")
    if change == "mtime":
        st = shard.stat()
        os.utime(shard, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    else:
        with open(shard, "ab") as f:
            f.write(b"x")
    e = refused(plan, tmp_path / "out", False, lambda n: None)
    assert "a source file changed while building; nothing was written" in e
    assert not (tmp_path / "out").exists() and leftovers(tmp_path) == []


ENTRY_POINT = """
import atexit, sys
atexit.register(lambda: print("atexit handler ran", flush=True))
from mpconvert.cli.main import main
sys.argv = ["mpconvert"] + sys.argv[1:]
main()
"""


def test_entry_point_exit_delivers_all_output_and_codes(moe, cli, tmp_path):
    """The CLI's own entry point ends without tearing the interpreter down object by object (cli.main._exit_now):
    its output arrives whole, atexit handlers still run, and the exit code is the command's
    — 0 built, 1 a verify finding, 2 bad input — each without a traceback."""
    def run(*args):
        return subprocess.run([sys.executable, "-c", ENTRY_POINT, *map(str, args)], capture_output=True, text=True)

    r = write_recipe(tmp_path, moe, {"gptq": "gptq"}, "gptq")
    out = tmp_path / "out"
    p = run("build", r, "-o", out)
    assert p.returncode == 0 and "built" in p.stdout and "atexit handler ran" in p.stdout, p.stderr
    p = run("inspect", out, "--json")  # less than Python's pipe buffer: all of it waits for the exit's flush
    assert p.returncode == 0 and len(p.stdout) < 8192, len(p.stdout)
    in_process = cli("inspect", out, "--json")
    assert in_process.exit_code == 0 and p.stdout == in_process.stdout + "atexit handler ran\n"
    shard = next(out.glob("*.safetensors"))
    data = bytearray(shard.read_bytes())
    data[-1] ^= 1
    shard.write_bytes(bytes(data))
    p = run("verify", out)
    assert p.returncode == 1 and "sha256 differs" in p.stdout and "atexit handler ran" in p.stdout
    p = run("build", r, "-o", out)
    assert p.returncode == 2 and "already exists" in p.stderr and "Traceback" not in p.stderr
