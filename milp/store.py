"""Serve (and train) far more users than the runtime has slots: a :class:`UserStore` of saved
users, loaded on demand.

A runtime holds at most ``max_users`` users' adapters at once (its bank slots). Give it a
store (``MilpRuntime(model, max_users=64, store=UserStore(dir))``) and every batch may name
any user saved there: users the batch needs that are not loaded are loaded from the store,
and when no slot is free the least recently used users that the batch does not need are
evicted first. The store is a directory with one subdirectory per user, as written by
:meth:`MilpRuntime.save_user <milp.runtime.MilpRuntime.save_user>`, which is also what
``python -m milp.train`` writes to ``<output>/users/``.

Which users may be evicted: only users the runtime loaded from the store itself. Users added
with ``add_user`` / ``load_user`` / ``load_peft`` stay until removed. A store user trained
since it was loaded (``train_step`` moved its step count) is written back to the store
before it is evicted when the store was opened with ``write_back=True``; otherwise it is
kept, so no training is ever dropped silently. A batch that cannot be placed (more distinct
users than slots, or too few evictable users) is refused before anything is loaded or
evicted; :meth:`MilpRuntime.row_batches <milp.runtime.MilpRuntime.row_batches>` splits any
list of rows into groups that can be placed, which is how
:func:`milp.pipeline.response_losses` and :func:`milp.pipeline.generate_responses` evaluate
any number of store users (a training batch is not split: its step would change).

A loaded user takes rows an evicted one freed (the banks compact in place when the free rows
are fragmented), and a bank's ``max_rank`` is a high-water mark. So once the banks have grown
to their working size and seen their largest user, a swap reallocates none of their tensors
and changes no argument a compiled decode step was traced with: one graph keeps serving
(tested). Give the runtime a ``capacity`` to start at that size.

One store may be written while other processes serve from it (a trainer re-saving users, or
servers with ``write_back``): a save swaps the user's folder for the complete new one in one
atomic rename (:func:`milp.config.atomic_directory`), so a reader always finds the user, and a
load reads all of its files from one save (a folder replaced mid-load is read again). Of two
processes saving one user at once, the last to rename wins, whole. A loaded user is not
reloaded when its save changes: a runtime serves the save it loaded until the user is evicted
(or removed) and loaded again. (Tested with real processes on Linux; on a file system without
``RENAME_EXCHANGE`` the folder is missing for a moment between two renames.)

Example:
    >>> import tempfile, torch
    >>> from milp.inject import tiny_model
    >>> from milp.runtime import MilpRuntime
    >>> from milp.config import MemoryConfig
    >>> d = tempfile.mkdtemp()
    >>> writer = MilpRuntime(tiny_model("llama"), max_users=3)
    >>> for u in ("a", "b", "c"):
    ...     writer.add_user(u, MemoryConfig.uniform(2, 1, 4), init="random", seed=len(u))
    ...     _ = writer.save_user(u, f"{d}/{user_dirname(u)}")
    >>> rt = MilpRuntime(tiny_model("llama"), max_users=2, store=UserStore(d))
    >>> for batch in (["a", "b"], ["c", None], ["a", "c"]):
    ...     _ = rt.forward(torch.ones(2, 3, dtype=torch.long), batch)
    >>> rt.users, rt.cache_info()
    (['c', 'a'], CacheInfo(hits=1, loads=4, evictions=2, write_backs=0))
"""
from __future__ import annotations

import hashlib
import json
import os
import re
import time
from collections.abc import Hashable
from pathlib import Path
from typing import NamedTuple

from .config import _check_bool, _check_path

__all__ = ["CacheInfo", "UserStore", "rename_legacy_folders", "user_dirname"]

_USER_FILE = "user.json"  # milp.runtime.USER_FILE (not imported: runtime imports this module)
# what a hashed name ends with: a safe string that ends so is hashed too, or the string
# "a_b-3ec69c85" would share the directory of "a/b"
_HASH_SUFFIX = re.compile(r"-[0-9a-f]{8}\Z")
# the temporary folders of milp.config.atomic_directory (left behind by a crashed writer)
_TEMP_DIR = re.compile(r"\A\..+\.(tmp|old)-[A-Za-z0-9_]+\Z")
# names Windows keeps for devices, with any extension ("con.json" too): no folder can have them
_WINDOWS_DEVICES = frozenset({"CON", "PRN", "AUX", "NUL", *(f"{p}{i}" for p in ("COM", "LPT") for i in range(10))})
# how long after a change a folder's time is trusted to move with the next change (coarse file
# systems: FAT 2 s, ext3 1 s; others ns)
_STAMP_SLACK_S = 2.0


def user_dirname(user: str | int) -> str:
    """A file-system-safe, collision-free directory name for a user id, also where the file
    system ignores case (macOS, Windows).

    A string of lower-case letters, digits, ``.``, ``_`` and ``-`` is its own name; any other
    string (one with an upper-case letter, the empty one, ``"."``, ``".."``, one that ends with a
    dot, which Windows drops, one that Windows keeps for a device such as ``con`` or ``nul.txt``,
    one that already ends like a hashed name), and every id that is not a string, gets a hash
    suffix of the exact id. So ``"Alice"`` and ``"alice"`` get names that differ in more than
    case, the int ``7`` and the string ``"7"`` (two users of a runtime) never share a directory,
    and no id's directory is the store itself. (Before 2026-12-06 upper-case letters, trailing
    dots and device names were kept without a suffix: :func:`rename_legacy_folders` renames such
    folders of an older store.)

    Example:
        >>> user_dirname("meddia-d2-0001"), user_dirname("a/b"), user_dirname(7)
        ('meddia-d2-0001', 'a_b-3ec69c85', '7-11b89f5c')
        >>> user_dirname(""), user_dirname("a_b-3ec69c85")
        ('_-da39a3ee', 'a_b-3ec69c85-d64fa8bc')
        >>> user_dirname("alice"), user_dirname("Alice")
        ('alice', 'Alice-35318264')
    """
    return _dirname(user, portable=True)


def _dirname(user: str | int, *, portable: bool) -> str:
    """:func:`user_dirname`; ``portable=False`` gives the names of stores written before
    2026-12-06, which kept upper-case letters, a trailing dot and Windows' device names (``con``,
    ``nul``, ``com1``, ...) without a hash suffix."""
    text = str(user)
    safe = re.sub(r"[^A-Za-z0-9._-]", "_", text)[:80] or "_"
    if isinstance(user, str):
        plain = safe == text and safe not in (".", "..") and not _HASH_SUFFIX.search(safe)
        if plain and not (portable and (safe != safe.lower() or safe.endswith(".")
                                        or safe.split(".")[0].upper() in _WINDOWS_DEVICES)):
            return safe
        digest = text
    else:
        digest = f"{type(user).__name__}:{text}"
    return f"{safe}-{hashlib.sha1(digest.encode()).hexdigest()[:8]}"


def rename_legacy_folders(root: str | os.PathLike[str], suffix: str = "") -> list[tuple[str, str]]:
    """Rename what an older version saved in ``root`` under a user's case-sensitive name
    (``Alice/``, see :func:`user_dirname`) to the user's current name (``Alice-35318264/``).

    With ``suffix=""`` the entries are user folders, named by the id in their ``user.json``;
    with a file suffix (``".json"``) they are JSON files of rows whose ``"user_id"`` names one
    user. An entry is renamed only when its name is exactly the user's old name, no entry has
    the new name yet and its content names that very user. (On a case-insensitive file system,
    of two ids differing only in case the older version saved one, under its own name: that one
    is renamed, and the other has no save and is trained again.) Anything else stays as it is.
    Returns the ``(old, new)`` names renamed; idempotent, so a stopped migration runs again.
    Callers hold their run's lock.

    Example:
        >>> import tempfile, pathlib, json
        >>> root = pathlib.Path(tempfile.mkdtemp()); (root / "Bob").mkdir()
        >>> _ = (root / "Bob" / "user.json").write_text(json.dumps({"user": "Bob"}))
        >>> rename_legacy_folders(root), sorted(p.name for p in root.iterdir())
        ([('Bob', 'Bob-da6645f6')], ['Bob-da6645f6'])
    """
    _check_path("root", root)
    if not isinstance(suffix, str):
        raise TypeError(f"suffix must be a str, got {type(suffix).__name__}")
    root = Path(root)
    if not root.is_dir():
        return []
    renamed = []
    for p in sorted(root.iterdir()):
        if suffix:
            if not (p.is_file() and p.name.endswith(suffix)):
                continue
            user: str | int | None = _rows_user(p)
        else:
            # a temporary folder of a crashed save is never the legacy name of the user it holds
            # (``.<name>.tmp-<x>`` for ``<name>``), so the name test below skips it; an id shaped like
            # one (``".A.tmp-x1"``) was saved under that very name and is renamed
            user = _saved_id(p) if p.is_dir() else None
        if user is None:
            continue
        old, new = _dirname(user, portable=False) + suffix, user_dirname(user) + suffix
        target = root / new
        if p.name != old or old == new or os.path.lexists(target):  # a dangling link is an entry too
            continue
        os.replace(p, target)
        renamed.append((old, new))
    if renamed:
        from search.trial_log import fsync_dir  # stdlib only

        fsync_dir(root)
    return renamed


def _rows_user(path: Path) -> str | None:
    """The one ``"user_id"`` of the JSON list of rows in ``path`` (``None`` when unreadable or
    not exactly one user's)."""
    try:
        rows = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    ids = {r.get("user_id") for r in rows if isinstance(r, dict)} if isinstance(rows, list) else set()
    user = ids.pop() if len(ids) == 1 else None
    return user if isinstance(user, str) and len(rows) else None


class CacheInfo(NamedTuple):
    """What a runtime's store did so far: users found loaded (``hits``, counted once per
    batch), ``loads`` from the store, ``evictions``, and evictions that first saved a trained
    user back (``write_backs``)."""

    hits: int
    loads: int
    evictions: int
    write_backs: int


def _holds(path: Path, user: Hashable) -> bool:
    """Whether ``path``'s ``user.json`` names ``user`` (``7`` and ``"7"`` are two)."""
    saved = _saved_id(path)
    return saved == user and type(saved) is type(user)


def _saved_id(path: Path) -> str | int | None:
    """The user id recorded in ``path/user.json`` (``None`` when unreadable)."""
    try:
        info = json.loads((path / _USER_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    user = info.get("user") if isinstance(info, dict) else None
    return user if isinstance(user, (str, int)) and not isinstance(user, bool) else None


class UserStore:
    """A directory of saved users, indexed by user id (the id in each ``user.json``).

    Args:
        root: the directory (``<output>/users`` of ``python -m milp.train``, or any directory
            of :meth:`~milp.runtime.MilpRuntime.save_user` outputs).
        write_back: save a user trained since it was loaded back here before evicting it
            (atomically, optimizer state included); without it such users are not evicted.

    Example:
        >>> import tempfile
        >>> UserStore(tempfile.mkdtemp()).users()
        []
    """

    def __init__(self, root: str | os.PathLike[str], *, write_back: bool = False) -> None:
        _check_path("root", root)
        root = Path(root)
        if not root.is_dir():
            raise FileNotFoundError(f"user store {str(root)!r} is not a directory")
        _check_bool("write_back", write_back)
        self.root = root
        self.write_back = write_back
        self._index: dict[Hashable, Path] | None = None
        self._stamp: tuple[int, int, int] | None = None  # the folder as of the index (None: not to be trusted)
        self._pending: list[Path] = []  # folders with no readable user.json yet (a copy in progress)

    def __repr__(self) -> str:
        return f"UserStore({str(self.root)!r}, write_back={self.write_back})"

    def refresh(self) -> None:
        """Re-read the directory (users saved into it by another process since)."""
        now = time.time()  # before the stat: a listing slower than the slack must not make its stamp trusted
        stamp = self._folder_stamp()  # before the listing: an entry renamed in meanwhile changes it
        index: dict[Hashable, Path] = {}
        pending = []
        for p in sorted(self.root.iterdir()):
            if not p.is_dir():
                continue
            if (user := _saved_id(p)) is None:
                if not _TEMP_DIR.match(p.name):
                    pending.append(p)
                continue
            if _TEMP_DIR.match(p.name) and p.name != user_dirname(user):
                continue  # a save that never completed (its writer crashed), not a saved user
            index.setdefault(user, p)
        self._index, self._pending = index, pending
        # a folder changed within the file system's timestamp resolution of the listing may change
        # again without its time moving: such a stamp proves nothing
        self._stamp = stamp if stamp is not None and now - stamp[0] / 1e9 > _STAMP_SLACK_S else None

    def _folder_stamp(self) -> tuple[int, int, int] | None:
        try:
            st = self.root.stat()
        except OSError:
            return None
        return st.st_mtime_ns, st.st_ino, st.st_dev

    def _unchanged(self) -> bool:
        """Whether the folder is as it was when the index was read (its stamp trusted and the same)."""
        return self._stamp is not None and self._folder_stamp() == self._stamp

    def _reread_on_miss(self) -> None:
        """A miss re-reads the folder only where it changed since the index (every save, copy and
        deletion of a user renames, adds or removes an entry of it, which moves its time) or a
        folder without a ``user.json`` was listed (being copied in): a client asking again and
        again for users the store lacks costs one ``stat``, not a read of every ``user.json``."""
        if not self._unchanged():
            self.refresh()
            return
        pending = []
        for p in self._pending:
            if (user := _saved_id(p)) is not None:
                self._index.setdefault(user, p)  # type: ignore[union-attr]
            elif p.is_dir():
                pending.append(p)
        self._pending = pending

    def path(self, user: Hashable) -> Path | None:
        """The directory holding ``user`` (``None`` when the store has no such user). Tries
        :func:`user_dirname` first, then the index of every subdirectory's ``user.json``
        (read once, and again where the folder changed since: on a miss, and on a find through
        the index, as another folder of the user may now sort first). Of two folders of one user
        the store serves the one under its own name, else the first in name order, as a fresh
        store would. Only str and int ids
        are saved: ``True`` or ``1.0`` is no user here, even where ``1`` is."""
        if isinstance(user, bool) or not isinstance(user, (str, int)):
            return None
        direct = self.root / user_dirname(user)
        if _holds(direct, user):
            return direct
        fresh = self._index is None
        if fresh:
            self.refresh()
        p = self._index.get(user)  # type: ignore[union-attr]
        if p is not None and _holds(p, user):
            if fresh or self._unchanged():
                return p
            # the folder changed since the index: a copy of the user under a name that sorts first
            # may have come, which a fresh store would serve (one stat per lookup through the index;
            # most users are found under their own name above)
            self.refresh()
        elif p is not None:
            # the folder the index named changed hands (renamed, deleted and saved again, its
            # user.json removed): the index is wrong, whatever the folder's stamp says
            self.refresh()
        elif not fresh:
            self._reread_on_miss()
        else:
            return None  # the index was read just now
        p = self._index.get(user)  # type: ignore[union-attr]
        return p if p is not None and _holds(p, user) else None

    def __contains__(self, user: object) -> bool:
        return self.path(user) is not None

    def users(self) -> list[Hashable]:
        """Every user id in the store (re-reads the directory)."""
        self.refresh()
        return list(self._index or ())

    def save_path(self, user: Hashable) -> Path:
        """Where ``user`` is (or will be) saved: its current directory, else :func:`user_dirname`
        (refused where that folder holds another user: the save would replace that user)."""
        if isinstance(user, bool) or not isinstance(user, (str, int)):
            raise TypeError(f"user must be a str or int id (the ids a store saves), got {user!r}")
        found = self.path(user)
        if found is not None:
            return found
        own = self.root / user_dirname(user)
        other = _saved_id(own)
        if other is not None:
            raise ValueError(f"user {user!r} would be saved in {str(own)!r}, which holds user {other!r}: "
                             f"move that folder (a store finds a user by its user.json, under any name)")
        return own
