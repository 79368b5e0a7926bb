"""``python -m milp.add_users``: write new users' histories into a ``milp.train`` run's memory.

A deployment meets users the run never saw. MiLP gives a new user memory the way the run gave
its test users theirs: memory injection alone, with the run's memory configuration (the one its
search picked, or its ``--modules``/``--rank``/``--layers``), model, dtype, steps and seed; the
shared instruction adapter is the run's and is not trained again. Each new user's adapters go to
the run's ``users/`` folder, where ``python -m milp.answer`` (and any runtime with a
:class:`~milp.store.UserStore` on that folder) serves them at once. A user's adapters are those
the run would have given it had it been in the run's data (to rounding: the users trained
together share batches, whose shapes move the last bits).

    python -m milp.add_users runs/milp --data new_users.jsonl
    python -m milp.answer runs/milp --user NEW_ID "What should I do about my cough?"

``--data`` takes the formats of ``milp.train`` (the record schema ``{"user_id", "profile",
"history", "query", "response"}``, or ``--data-format amazonqa/reddit/lamp``); only the users'
histories are used. Users the run already holds are refused by name (delete their folder under
``users/`` to inject them again), and so is a user an earlier call added from another history.
Every user is saved atomically, so a stopped command run again (with the same data) continues
where it stopped; a call naming other users trains none an earlier call saved. The new users'
memory-injection losses are kept in ``RUN/added/memory_losses.json``. One call at a time per
run: a second one is refused while the first runs. Under ``torchrun`` the new users are shared
out among the processes, as in ``milp.train``.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

__all__ = ["add_users", "build_parser", "main"]

PROG = "milp.add_users"


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=f"python -m {PROG}",
                                description="Inject the memory of new users into a milp.train run.",
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog="\n\n".join(__doc__.split("\n\n")[1:]))
    p.add_argument("run", metavar="RUN", help="output directory of a `python -m milp.train` run")
    p.add_argument("--data", required=True, metavar="PATH", help="dataset file holding the new users' histories")
    p.add_argument("--data-format", default="auto", choices=["auto", "jsonl", "meddia", "amazonqa", "reddit", "lamp"],
                   help="format of --data (auto: jsonl, the record schema)")
    p.add_argument("--on-error", default="raise", choices=["raise", "skip"],
                   help="malformed data lines: stop with file:line, or skip them with a warning")
    p.add_argument("--user", dest="users", action="append", default=None, metavar="ID",
                   help="inject only this user of --data (repeat for several; default: every user of the file)")
    p.add_argument("--device", default="auto", help="auto (cuda when available), cpu, cuda, cuda:N")
    p.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bars")
    return p


def _fail(msg: str) -> SystemExit:
    return SystemExit(f"{PROG}: {msg}")


def _searched_config(run: Path, settings: dict[str, Any]) -> Any:
    """The memory configuration the run's search picked (``None`` for a run without a search:
    its flags name the configuration); refused while the search has not picked one."""
    from .config import MemoryConfig
    from .train import _read_json

    if not settings.get("search"):
        return None
    selected = run / "search" / "selected.json"
    if not selected.is_file():
        raise _fail(f"{str(run)!r} runs a configuration search that has not picked a configuration yet "
                    f"(no search/selected.json): finish the run first (its own python -m milp.train command)")
    try:
        return MemoryConfig.from_dict(_read_json(selected)["memory_config"])
    except (ValueError, KeyError, TypeError) as e:
        raise _fail(f"{selected} is damaged ({e})") from None


def add_users(run: str | Path, data: str | Path, *, data_format: str = "auto", users: Sequence[str] | None = None,
              device: str = "auto", on_error: str = "raise", progress: bool = True) -> dict[str, list[float]]:
    """Inject the memory of the users of ``data`` (or of ``users`` among them) into the run in
    ``run``; returns each new user's memory-injection losses (per epoch), those of users
    injected by an earlier, stopped call included.

    Raises ``SystemExit`` (a message naming the problem, before anything is written) for a
    folder without a ``milp.train`` run, a search run that has not picked its configuration, a
    ``users`` id missing from ``data``, a user the run already holds (one an earlier call added
    from another history included), or a damaged ``RUN/added/claimed.json`` or
    ``memory_losses.json``.

    Example:
        >>> add_users("runs/milp", "new_users.jsonl")  # doctest: +SKIP
        {'alice': [2.31, 2.02, 1.84, 1.71, 1.62, 1.57]}
    """
    run = Path(run)
    if not str(run).strip():
        raise _fail(f"RUN: expected the output directory of a milp.train run, got {str(run)!r}")
    if not (run / "run.json").is_file():
        raise _fail(f"{str(run)!r} is not a milp.train output directory (no run.json)")
    if users is not None and (isinstance(users, (str, bytes)) or not all(isinstance(u, str) and u.strip()
                                                                       for u in users)):
        raise _fail(f"users: expected a list of non-empty user ids, got {users!r}")
    # the lock before the run's state is read: a call reading users/, claimed.json and call.json
    # while another finished, then locking, worked from what the other had not yet written
    from .train import _env_int

    try:
        rank = _env_int("RANK", 0)
    except ValueError as e:
        raise _fail(str(e)) from None
    lock = _lock_run(run) if rank == 0 else None
    try:
        return _add_users(run, data, data_format=data_format, users=users, device=device, on_error=on_error,
                          progress=progress)
    finally:
        if lock is not None:
            os.close(lock)  # releases the lock


def _add_users(run: Path, data: str | Path, *, data_format: str, users: Sequence[str] | None, device: str,
               on_error: str, progress: bool) -> dict[str, list[float]]:
    """:func:`add_users` once the run's folder is checked and locked."""
    from .answer import _run_settings
    from .data import group_by_user
    from .store import UserStore, rename_legacy_folders
    from .train import (
        Dist,
        _atomic_json,
        _default_config,
        _inject_users,
        _load_model,
        _merge_losses,
        _read_json,
        _resolve_device,
        _State,
        load_records,
    )

    settings, ran_dtype = _run_settings(run, PROG)
    searched = _searched_config(run, settings)
    try:
        records = load_records(str(data), data_format, on_error=on_error, progress=progress)
    except (OSError, ValueError) as e:
        raise _fail(str(e)) from None
    by_user = group_by_user(records)
    if users is not None:
        missing = [u for u in dict.fromkeys(users) if u not in by_user]
        if missing:
            raise _fail(f"--user {missing[0]!r} has no record in {str(data)!r} (it holds {len(by_user)} users, "
                        f"e.g. {sorted(by_user)[:5]})")
        by_user = {u: by_user[u] for u in dict.fromkeys(users)}
    users_dir = run / "users"
    # one read of the folder: `u in store` re-reads all of it on each miss, i.e. once per new user
    saved = set(UserStore(users_dir).users()) if users_dir.is_dir() else set()
    log_dir = run / "added"
    _check_losses(log_dir)  # a damaged file used to fail only once every user was trained and saved
    # a user an earlier call named (stopped, or done) is that call's work, resumed here, not a user the run
    # held; unless that call gave it another memory: its saved adapters are not this data's
    claimed = _claimed(log_dir)
    memory = {u: _memory_digest(recs[0]) for u, recs in by_user.items()}
    held = [u for u in by_user if u in saved and (u not in claimed or claimed[u] not in (None, memory[u]))]
    if held:
        other = [u for u in held if u in claimed]
        raise _fail(f"the run already holds {len(held)} of these users, e.g. {held[:5]}"
                    + (f" ({len(other)} added by an earlier milp.add_users call from another history, e.g. "
                       f"{other[:5]})" if other else "")
                    + f": delete their folders under {users_dir} to inject them again")
    # this call's groups: a stopped call run again (the same users as the last call) trains its
    # groups as they were, for the adapters of a call never stopped; any other call leaves out the
    # users earlier calls saved (a call of --user X, then one of X, Y, Z trained X again with Y)
    last = _last_call(log_dir, sorted(by_user))
    todo = last if last is not None else [u for u in sorted(by_user) if u not in saved]
    dev = _resolve_device(device, PROG)
    args = argparse.Namespace(**{**settings, "progress": progress})
    if ran_dtype is not None:  # the dtype the run ran in: --dtype auto follows the device, which may differ here
        args.dtype = ran_dtype
    dist = Dist.from_env(dev)
    st = _State(args=args, out=log_dir, dist=dist, device=dev, prog=PROG)
    try:
        _load_model(st)
        config = searched if searched is not None else _default_config(st)
        if dist.main:
            rename_legacy_folders(users_dir)  # an older version's case-sensitive names: _inject_users finds these
            log_dir.mkdir(parents=True, exist_ok=True)
            _claim(log_dir, memory)
            _atomic_json(log_dir / "call.json", {"users": sorted(by_user), "todo": todo})
        dist.barrier()
        picked = [by_user[u][0] for u in todo]
        st.log(f"{len(picked)} users of {data} into {users_dir}"
               + (f" ({len(by_user) - len(todo)} saved by an earlier call)" if len(todo) < len(by_user) else "")
               + f" ({config.num_parameters(st.runtime.state.target_shapes()):,} parameters a user)")
        _inject_users(st, picked, config, users_dir, desc="memory injection")
        _merge_losses(st)
        losses = _read_json(log_dir / "memory_losses.json")
        return {u: losses.get(u, []) for u in sorted(by_user)}
    finally:
        dist.close()


def _lock_run(run: Path) -> int | None:
    """An exclusive lock on the run's folder for this call (a file descriptor; closing it
    releases the lock), refused by name while another ``milp.add_users`` call holds it: two
    calls at once both rewrite ``RUN/added/claimed.json`` and the losses, and one's claims or
    losses could be lost. ``flock`` on the folder itself writes no file; ``None`` where the
    platform has no ``fcntl`` (Windows: no lock)."""
    try:
        import fcntl
    except ImportError:
        return None
    fd = os.open(run, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        raise _fail(f"another milp.add_users call is adding users to {str(run)!r}; run this one when it has "
                    f"ended") from None
    return fd


def _memory_digest(record: Any) -> str:
    """A digest of what memory injection writes of ``record``'s user: its profile and history."""
    text = json.dumps([record.profile, list(record.history)], ensure_ascii=True)
    return hashlib.sha1(text.encode("ascii")).hexdigest()


def _read_checked(path: Path, ok: Any, expected: str, then: str) -> Any:
    """``path``'s JSON where ``ok(obj)`` holds; otherwise refused by name (``SystemExit``: what
    was found, the ``expected`` content, and what deleting the file costs, ``then``)."""
    from .train import _read_json

    try:
        obj = _read_json(path)
    except (OSError, ValueError) as e:
        obj = e
    if not isinstance(obj, Exception) and ok(obj):
        return obj
    why = f"{type(obj).__name__}: {obj}" if isinstance(obj, Exception) else f"got a JSON {type(obj).__name__}"
    raise _fail(f"{path} is damaged ({why:.200}): expected {expected}; delete it to go on ({then})")


def _claimed(log_dir: Path) -> dict[str, str | None]:
    """The users earlier calls claimed, each with the digest of the memory it was given
    (``None``: claimed by a call that kept no digest, a list of ids); refused by name when the
    file is damaged (it used to stop the call with a JSONDecodeError, or read a string as its
    characters)."""
    path = log_dir / "claimed.json"
    if not path.is_file():
        return {}
    obj = _read_checked(
        path, lambda o: (isinstance(o, list) and all(isinstance(u, str) for u in o))
        or (isinstance(o, dict) and all(isinstance(v, str) or v is None for v in o.values())),
        "a JSON object of the user ids earlier calls claimed",
        "users a stopped call saved are then refused as the run's: delete their folders under users/ too")
    return dict.fromkeys(obj) if isinstance(obj, list) else obj


def _check_losses(log_dir: Path) -> None:
    """Refuse by name, before anything is trained, a damaged ``memory_losses.json`` (or a part
    file of a stopped call) that :func:`milp.train._merge_losses` could not merge into."""
    from .train import _loss_parts

    then = "the losses it recorded are lost, the users' adapters are not"
    path = log_dir / "memory_losses.json"
    if path.is_file():
        _read_checked(path, lambda o: isinstance(o, dict) and all(isinstance(v, list) for v in o.values()),
                      "a JSON object of each user's losses", then)
    try:
        _loss_parts(log_dir)
    except (OSError, ValueError) as e:
        raise _fail(f"{e}; delete the file to go on ({then})") from None


def _last_call(log_dir: Path, users: list[str]) -> list[str] | None:
    """The users the last call trained (``todo`` of ``added/call.json``), where that call named
    ``users``: this call is that one run again. ``None`` otherwise, or where the file is missing
    or unreadable: this call then leaves out the users already saved, which is always safe."""
    from .train import _read_json

    try:
        last = _read_json(log_dir / "call.json")
        named, todo = last["users"], last["todo"]
    except (OSError, ValueError, KeyError, TypeError):
        return None
    if named != users or not isinstance(todo, list) or not set(todo) <= set(users):
        return None
    return todo


def _claim(log_dir: Path, memory: dict[str, str]) -> None:
    """Record the users of ``memory`` (each with its memory's digest) as this command's before
    any of them is saved, so that a stopped call run again resumes them instead of refusing
    them as users the run already held."""
    from .train import _atomic_json

    _atomic_json(log_dir / "claimed.json", dict(sorted({**_claimed(log_dir), **memory}.items())))


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    for u in args.users or ():
        if not u.strip():
            raise _fail(f"--user: expected a user id, got {u!r}")
    try:
        losses = add_users(args.run, args.data, data_format=args.data_format, users=args.users, device=args.device,
                           on_error=args.on_error, progress=args.progress)
    except (OSError, ValueError) as e:  # a model that is gone or unreadable, a folder that cannot be written
        print(f"{PROG}: error: {e}", file=sys.stderr)
        return 2
    first = [v[0] for v in losses.values() if v]
    last = [v[-1] for v in losses.values() if v]
    mean = (lambda xs: sum(xs) / len(xs)) if first else None
    print(f"{PROG}: {len(losses)} users in {Path(args.run) / 'users'}"
          + (f"; memory-injection loss (mean over users): {mean(first):.3f} -> {mean(last):.3f}" if mean else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
