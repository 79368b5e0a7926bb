"""One user store, written and read by several processes at once: a trainer re-saving users
(``save_user``, ``write_back``) while servers load them through a ``UserStore``.

Real processes (a spawned worker and this one), with the race windows made deterministic: a
writer pauses at each rename that publishes a user folder (``os.replace``, and the atomic
exchange of ``milp.config`` where the file system has one) while the other process loads or
saves the same user, or a reader pauses between the files of one load while the other process
re-saves the user. Each save draws other adapters and another ``MemoryConfig``, so a load that
mixed two saves is caught (or crashes on the shapes).

Was: a re-save moved the old folder aside before renaming the new one in, so a reader found no
folder ("unknown user", ``store.users()`` without it); a reader that had read ``user.json`` and
``memory_config.json`` of one save then read ``adapters.safetensors`` of the next (a shape
error, or silently mixed adapters); two writers of one user failed with "Directory not empty"
and left the old folder behind as ``.NAME.old-XXXX``."""
from __future__ import annotations

import io
import multiprocessing as mp
import os
import queue
import time
from collections.abc import Callable
from pathlib import Path

import pytest
import torch

import milp.config
from milp.config import MemoryConfig
from milp.inject import tiny_model
from milp.runtime import ADAPTERS_FILE, MilpRuntime
from milp.store import UserStore, user_dirname

CTX = mp.get_context("spawn")
TIMEOUT = 120  # seconds a step may take before the test fails (2 busy cores; a step takes < 1 s)
#: each save takes the config of its seed: consecutive saves differ in shapes, not only values
CONFIGS = [MemoryConfig((True, True), (1, 1), (4, 4)), MemoryConfig((True, False), (2, 0), (8, 8))]
USER = "u/1"  # a hashed directory name


# ----------------------------------------------------------------- what both processes run
_WRITER: MilpRuntime | None = None


def save(root: str | Path, user: str, seed: int) -> bytes:
    """Save ``user`` (adapters drawn from ``seed``, config ``CONFIGS[seed % 2]``) into the store
    at ``root``; returns what was saved (:func:`record`)."""
    global _WRITER
    if _WRITER is None:
        _WRITER = MilpRuntime(tiny_model("llama"), max_users=1)
    _WRITER.add_user(user, CONFIGS[seed % 2], init="random", seed=seed)
    try:
        _WRITER.save_user(user, Path(root) / user_dirname(user))
        return record(_WRITER, user)
    finally:
        _WRITER.remove_user(user)


def record(rt: MilpRuntime, user: str) -> bytes:
    """``user``'s config and adapters as loaded in ``rt`` (bytes: they cross processes)."""
    buf = io.BytesIO()
    torch.save({"config": rt.config(user).to_dict(), "adapters": rt.adapter_state(user)}, buf)
    return buf.getvalue()


def load(root: Path, user: str) -> bytes:
    """What a new server with the store at ``root`` serves as ``user``: the user is known
    (``check_user``), and a batch naming it loads it."""
    rt = MilpRuntime(tiny_model("llama"), max_users=1, store=UserStore(root))
    rt.check_user(user)
    with torch.no_grad():
        rt.forward(torch.ones(1, 3, dtype=torch.long), [user])
    return record(rt, user)


def which(got: bytes, saves: dict[int, bytes]) -> int | None:
    """The seed of the save ``got`` equals whole (config and every tensor), else ``None``."""
    g = torch.load(io.BytesIO(got), weights_only=True)
    for seed, raw in saves.items():
        s = torch.load(io.BytesIO(raw), weights_only=True)
        if g["config"] == s["config"] and g["adapters"].keys() == s["adapters"].keys() and all(
                torch.equal(g["adapters"][k], s["adapters"][k]) for k in g["adapters"]):
            return seed
    return None


def pausing_renames(folder: Path, pause: Callable[[], None], *, before: bool = False) -> Callable[[], None]:
    """Make every rename that publishes ``folder`` call ``pause``: after each ``os.replace`` from or
    to it and each atomic exchange with it; with ``before``, once, just before the first
    ``os.replace`` onto it. Returns the undo."""
    real_replace = os.replace
    real_swap = getattr(milp.config, "_swap_directories", None)  # the exchange (absent before it was added)
    fired = []

    def replace(src, dst):
        onto = Path(dst) == folder
        if before and onto and not fired:
            fired.append(1)
            pause()
        real_replace(src, dst)
        if not before and (onto or Path(src) == folder):
            pause()

    def swap(a, b):
        swapped = real_swap(a, b)
        if swapped and not before and Path(b) == folder:
            pause()
        return swapped

    os.replace = replace
    if real_swap is not None:
        milp.config._swap_directories = swap

    def undo() -> None:
        os.replace = real_replace
        if real_swap is not None:
            milp.config._swap_directories = real_swap

    return undo


def _serve(inbox, outbox, paused, resume) -> None:
    """The worker: runs ``("save", root, user, seed, pause)`` commands until ``None``; ``pause``
    ``"after"`` stops at each rename of the user folder until the test sets ``resume``."""
    torch.set_num_threads(1)

    def stop() -> None:
        paused.set()
        if not resume.wait(TIMEOUT):
            raise TimeoutError("the test never resumed the writer")
        resume.clear()

    while (cmd := inbox.get()) is not None:
        _, root, user, seed, pause = cmd
        undo = pausing_renames(Path(root) / user_dirname(user), stop) if pause == "after" else (lambda: None)
        try:
            outbox.put(("ok", save(root, user, seed)))
        except BaseException as exc:  # reported to the test, which fails on it
            outbox.put(("error", f"{type(exc).__name__}: {exc}"))
        finally:
            undo()


class Worker:
    """A spawned process that saves users on request."""

    def __init__(self) -> None:
        self.inbox, self.outbox = CTX.Queue(), CTX.Queue()
        self.paused, self.resume = CTX.Event(), CTX.Event()
        self.proc = CTX.Process(target=_serve, args=(self.inbox, self.outbox, self.paused, self.resume), daemon=True)
        self.proc.start()

    def save(self, root: Path, user: str, seed: int, *, at_pause: Callable[[], None] | None = None
             ) -> tuple[str, bytes | str]:
        """``save(root, user, seed)`` in the worker: ``("ok", record)`` or ``("error", message)``.
        With ``at_pause``, the worker stops at each rename of the folder and ``at_pause`` runs
        here meanwhile."""
        self.inbox.put(("save", str(root), user, seed, None if at_pause is None else "after"))
        deadline = time.monotonic() + TIMEOUT
        while True:
            if self.paused.is_set():
                self.paused.clear()
                at_pause()  # type: ignore[misc]
                self.resume.set()
            try:
                return self.outbox.get(timeout=0.02)
            except queue.Empty:
                assert self.proc.is_alive() and time.monotonic() < deadline, "the worker died or hung"


@pytest.fixture(scope="module")
def worker():
    w = Worker()
    yield w
    w.inbox.put(None)
    w.proc.join(30)
    if w.proc.is_alive():
        w.proc.kill()


@pytest.fixture
def root(tmp_path):
    """An empty store; skips where the file system cannot swap folders atomically (the fixed
    code then falls back to moving the old folder aside, whose window these tests show)."""
    swap = getattr(milp.config, "_swap_directories", None)
    if swap is not None:
        a, b = tmp_path / "a", tmp_path / "b"
        a.mkdir(), b.mkdir()
        try:
            if swap(a, b) is None:
                pytest.skip("no RENAME_EXCHANGE on this file system")
        finally:
            a.rmdir(), b.rmdir()
    (tmp_path / "users").mkdir()
    return tmp_path / "users"


def debris(root: Path) -> list[str]:
    return sorted(p.name for p in root.iterdir() if p.name != user_dirname(USER))


def test_a_reader_finds_one_whole_save_at_every_step_of_a_resave(worker, root):
    """While the worker re-saves the user, paused at each rename: the store lists it, a server
    knows it and loads exactly the old or the new save. A server that loaded the old save keeps
    serving it (stale) until it is evicted and loaded again (documented: milp.store)."""
    saves = {0: save(root, USER, 0)}
    server = MilpRuntime(tiny_model("llama"), max_users=1, store=UserStore(root))
    with torch.no_grad():
        server.forward(torch.ones(1, 3, dtype=torch.long), [USER])
    loads, failures = [], []

    def check() -> None:  # failures are reported below, once the worker was resumed
        listed = [UserStore(root).users(), server.store.users()]
        if listed != [[USER], [USER]]:
            failures.append(f"the store lists {listed}")
        try:
            loads.append(load(root, USER))
        except Exception as exc:  # noqa: BLE001
            failures.append(f"{type(exc).__name__}: {exc}")

    status, saves[1] = worker.save(root, USER, 1, at_pause=check)
    assert status == "ok", saves[1]
    assert failures == [] and loads, failures
    assert [which(got, saves) in (0, 1) for got in loads] == [True] * len(loads)
    assert which(load(root, USER), saves) == 1
    assert which(record(server, USER), saves) == 0  # stale: loaded before the re-save
    server.remove_user(USER)
    with torch.no_grad():
        server.forward(torch.ones(1, 3, dtype=torch.long), [USER])
    assert which(record(server, USER), saves) == 1
    assert debris(root) == []


def test_a_reader_never_mixes_the_files_of_two_saves(worker, root, monkeypatch):
    """A server that has read ``user.json`` and ``memory_config.json`` of one save when the
    worker re-saves the user (other shapes) loads one whole save, not the new adapters into the
    old config."""
    saves = {0: save(root, USER, 0)}
    armed = [True]

    def resave_first(path) -> None:
        if armed and isinstance(path, (str, os.PathLike)) and os.fspath(path).endswith(ADAPTERS_FILE):
            armed.clear()
            status, saves[1] = worker.save(root, USER, 1)
            assert status == "ok", saves[1]

    real_io_open, real_os_open = io.open, os.open

    def io_open(file, *args, **kwargs):
        resave_first(file)
        return real_io_open(file, *args, **kwargs)

    def os_open(path, *args, **kwargs):
        resave_first(path)
        return real_os_open(path, *args, **kwargs)

    monkeypatch.setattr(io, "open", io_open)
    monkeypatch.setattr(os, "open", os_open)
    got = load(root, USER)
    monkeypatch.undo()
    assert not armed and 1 in saves  # the re-save ran mid-load
    assert which(got, saves) in (0, 1)
    assert debris(root) == []


@pytest.mark.parametrize("first", [False, True], ids=["resave", "first-save"])
def test_two_writers_of_one_user_leave_one_whole_save(worker, root, first):
    """This process saves the user while the worker saves it too, from inside this save's
    publish (after the rename of a re-save, or just before the rename of a first save): both
    succeed, the folder holds the one published last, whole, and no temp folder is left."""
    saves = {}
    if not first:
        saves[0] = save(root, USER, 0)
    other = []
    undo = pausing_renames(root / user_dirname(USER), lambda: other.append(worker.save(root, USER, 2)),
                           before=first)
    try:
        saves[1] = save(root, USER, 1)
    finally:
        undo()
    assert [status for status, _ in other] == ["ok"], other
    saves[2] = other[0][1]
    assert which(load(root, USER), saves) == (1 if first else 2)
    assert debris(root) == []
