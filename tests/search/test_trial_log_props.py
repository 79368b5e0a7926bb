"""Property-based tests of the trial-log helpers: atomic writes, append-only JSONL, interrupted writes."""
from __future__ import annotations

import json
import math
import os
import stat
import warnings

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import search.trial_log as tl
from search.trial_log import (
    append_record,
    atomic_write_bytes,
    atomic_write_text,
    atomic_write_with,
    decode_float,
    encode_float,
    read_log,
    repair_tail,
)

SETTINGS = settings(
    max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow]
)

json_scalars = st.one_of(
    st.none(), st.booleans(), st.integers(-(2**63), 2**63), st.floats(allow_nan=False, allow_infinity=False),
    st.text(max_size=12),
)
json_values = st.recursive(
    json_scalars,
    lambda inner: st.one_of(st.lists(inner, max_size=3), st.dictionaries(st.text(max_size=6), inner, max_size=3)),
    max_leaves=8,
)
records = st.dictionaries(st.text(max_size=8), json_values, max_size=5)


def read_all(path):
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        got = list(read_log(path))
    return got, [str(x.message) for x in w]


def fresh(tmp_path, name):
    """A file path unique to one hypothesis example (function-scoped tmp_path is shared)."""
    p = tmp_path / name
    if p.exists():
        p.unlink()
    return p


# ------------------------------------------------------------------------- floats
@given(st.floats())
def test_encode_float_round_trips_every_float_through_json(v):
    e = encode_float(v)
    back = decode_float(json.loads(json.dumps(e, allow_nan=False)))
    assert (math.isnan(v) and math.isnan(back)) or back == v


@given(st.one_of(st.text().filter(lambda s: s not in ("nan", "inf", "-inf")), st.booleans(), st.lists(st.integers())))
def test_decode_float_refuses_what_is_not_a_number(v):
    with pytest.raises(ValueError, match="not a number"):
        decode_float(v)


@given(st.one_of(st.integers(2**1024, 10**400), st.integers(-(10**400), -(2**1024))))
def test_decode_float_refuses_integers_beyond_the_float_range_with_a_value_error(v):
    """Regression: ``float()`` of such a JSON integer raised ``OverflowError``, not the
    documented ``ValueError``."""
    with pytest.raises(ValueError, match="float range"):
        decode_float(v)


# ------------------------------------------------------------------------- append / read
@SETTINGS
@given(recs=st.lists(records, max_size=6))
def test_appended_records_read_back_in_order(tmp_path, recs):
    path = fresh(tmp_path, "log.jsonl")
    for r in recs:
        append_record(path, r)
    if not recs:
        assert not path.exists()
        return
    got, warned = read_all(path)
    assert [r for _, r in got] == recs and not warned
    assert [n for n, _ in got] == list(range(1, len(recs) + 1))
    raw = path.read_bytes()
    assert raw.count(b"\n") == len(recs) and (not recs or raw.endswith(b"\n"))


@SETTINGS
@given(rec=records, bad=st.sampled_from([math.nan, math.inf, -math.inf]))
def test_a_record_json_cannot_hold_is_refused_and_nothing_written(tmp_path, rec, bad):
    path = fresh(tmp_path, "log.jsonl")
    append_record(path, rec)
    before = path.read_bytes()
    with pytest.raises(ValueError):
        append_record(path, {**rec, "v": bad})
    assert path.read_bytes() == before


@SETTINGS
@given(recs=st.lists(records, min_size=1, max_size=5), data=st.data())
def test_a_log_cut_at_any_byte_keeps_every_complete_record(tmp_path, recs, data):
    """An interrupted write leaves a prefix of the file: every record whose line is complete
    reads back, the cut line (if any) is reported, and after ``repair_tail`` the next record
    lands on a line of its own."""
    path = fresh(tmp_path, "log.jsonl")
    for r in recs:
        append_record(path, r)
    full = path.read_bytes()
    cut = data.draw(st.integers(0, len(full)))
    path.write_bytes(full[:cut])
    ends, pos = [], 0  # end offset of each record's JSON text (newline excluded)
    for line in full.split(b"\n")[:-1]:
        ends.append(pos + len(line))
        pos += len(line) + 1
    complete = [r for r, e in zip(recs, ends) if e <= cut]
    partial = cut not in ends and cut not in [e + 1 for e in ends] and cut != 0
    got, warned = read_all(path)
    assert [r for _, r in got] == complete
    assert len(warned) == int(partial) and all("skipping corrupt log line" in m for m in warned)
    repair_tail(path)
    repair_tail(path)  # idempotent
    assert cut == 0 or path.read_bytes().endswith(b"\n")
    append_record(path, {"after": "cut"})
    got, warned = read_all(path)
    assert [r for _, r in got] == complete + [{"after": "cut"}]
    assert len(warned) == int(partial)


@SETTINGS
@given(before=st.lists(records, max_size=3), failed=records, after=records, data=st.data())
def test_a_failed_append_leaves_no_partial_line_for_the_next_one(tmp_path, before, failed, after, data):
    """An append that fails part-way (disk full after a partial ``write``) while the process
    goes on: the next record must not be glued onto the partial line (losing both)."""
    path = fresh(tmp_path, "log.jsonl")
    for r in before:
        append_record(path, r)
    size = len(json.dumps(failed, separators=(",", ":"))) + 1
    written = data.draw(st.integers(0, size - 1))
    real_write = os.write

    def write_then_fail(fd, view):  # a partial write, then the disk is full
        real_write(fd, bytes(view[:written]))
        raise OSError(28, "No space left on device")

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(tl.os, "write", write_then_fail)
        with pytest.raises(OSError):
            append_record(path, failed)
    append_record(path, after)  # the process goes on (e.g. the trial is told again)
    got, warned = read_all(path)
    assert [r for _, r in got] == before + [after] and not warned


def test_partial_append_regression(tmp_path):
    """Regression: ``append_record`` left the bytes of a failed partial write in the log, so the
    next record was glued onto them and both were lost on reading."""
    path = tmp_path / "log.jsonl"
    real_write = os.write
    calls = {"n": 0}

    def half(fd, view):
        calls["n"] += 1
        if calls["n"] == 1:
            return real_write(fd, bytes(view[: len(view) // 2]))
        raise OSError(28, "No space left on device")

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(tl.os, "write", half)
        with pytest.raises(OSError, match="No space"):
            append_record(path, {"trial_id": 0})
    append_record(path, {"trial_id": 1})
    assert path.read_bytes() == b'{"trial_id":1}\n'


@SETTINGS
@given(
    good=st.lists(records.filter(bool), min_size=1, max_size=4),
    junk=st.lists(st.one_of(st.binary(max_size=30).filter(lambda b: b"\n" not in b),
                            st.sampled_from([b"[1, 2]", b'"str"', b"null", b"{", b"\xff\xfe", b"[" * 5000,
                                             b"{\"a\":" * 5000])),
                  min_size=1, max_size=4),
    data=st.data(),
)
def test_corrupt_lines_are_skipped_with_a_warning_never_raising(tmp_path, good, junk, data):
    path = fresh(tmp_path, "log.jsonl")
    lines = [json.dumps(r).encode() for r in good]
    for j in junk:
        lines.insert(data.draw(st.integers(0, len(lines))), j)
    path.write_bytes(b"\n".join(lines) + b"\n")
    got, warned = read_all(path)
    objs = []
    for raw in lines:  # what a strict reader keeps: lines that are JSON objects
        try:
            v = json.loads(raw.decode("utf-8"))
        except (UnicodeDecodeError, ValueError, RecursionError):
            continue
        if isinstance(v, dict):
            objs.append(v)
    assert [r for _, r in got] == objs
    bad = sum(1 for raw in lines if raw.strip()) - len(objs)
    assert len(warned) == bad
    # torn="skip": the lines that are not JSON go silently, a JSON non-object still warns;
    # strict=True: a JSON non-object is refused by file and line, whatever comes before it
    non_objects = []
    for i, raw in enumerate(lines, start=1):
        try:
            v = json.loads(raw.decode("utf-8"))
        except (UnicodeDecodeError, ValueError, RecursionError):
            continue
        if not isinstance(v, dict):
            non_objects.append((i, type(v).__name__))
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        got_quiet = list(read_log(path, torn="skip"))
    assert got_quiet == got and len(w) == len(non_objects)
    assert all("not a JSON object" in str(x.message) for x in w)
    if non_objects:
        line, kind = non_objects[0]
        want = rf"log.jsonl:{line} is damaged: expected a JSON object, got a JSON {kind}"
        with pytest.raises(ValueError, match=want):
            list(read_log(path, torn="skip", strict=True))
    else:
        assert list(read_log(path, torn="skip", strict=True)) == got


@pytest.mark.parametrize("torn", ["ignore", "", None, True])
def test_read_log_refuses_an_unknown_torn_policy_by_name(tmp_path, torn):
    path = tmp_path / "log.jsonl"
    path.write_text('{"a": 1}\n')
    with pytest.raises(ValueError, match="torn must be 'warn' or 'skip'"):
        list(read_log(path, torn=torn))


def test_deeply_nested_line_is_skipped_not_raised(tmp_path):
    """Regression: a corrupt line nested deeper than Python's recursion limit raised
    ``RecursionError`` out of ``read_log`` instead of being skipped with a warning."""
    path = tmp_path / "log.jsonl"
    path.write_bytes(b'{"a":1}\n' + b"[" * 100_000 + b"\n" + b'{"b":2}\n')
    with pytest.warns(UserWarning, match=r"log.jsonl:2: skipping corrupt"):
        got = list(read_log(path))
    assert got == [(1, {"a": 1}), (3, {"b": 2})]


# ------------------------------------------------------------------------- atomic writes
@SETTINGS
@given(a=st.binary(max_size=200), b=st.binary(max_size=200), mode=st.sampled_from([0o600, 0o640, 0o644, 0o664]))
def test_atomic_write_replaces_whole_file_and_keeps_its_mode(tmp_path, a, b, mode):
    path = fresh(tmp_path / "sub", "f.bin")
    atomic_write_bytes(path, a)
    assert path.read_bytes() == a and stat.S_IMODE(os.stat(path).st_mode) == 0o644
    os.chmod(path, mode)
    atomic_write_bytes(path, b)
    assert path.read_bytes() == b and stat.S_IMODE(os.stat(path).st_mode) == mode
    assert os.listdir(path.parent) == ["f.bin"]  # no temp file left behind


@SETTINGS
@given(old=st.text(max_size=50), new=st.text(max_size=50), where=st.sampled_from(["write", "fsync", "replace"]))
def test_interrupted_atomic_write_leaves_the_old_file(tmp_path, old, new, where):
    path = fresh(tmp_path, "f.txt")
    atomic_write_text(path, old)

    class Boom(Exception):
        pass

    def boom(*a, **k):
        raise Boom

    with pytest.MonkeyPatch.context() as mp:
        if where == "fsync":
            mp.setattr(tl.os, "fsync", boom)
        elif where == "replace":
            mp.setattr(tl.os, "replace", boom)
        with pytest.raises(Boom):
            if where == "write":
                atomic_write_with(path, boom)
            else:
                atomic_write_text(path, new)
    assert path.read_bytes() == old.encode("utf-8")
    assert os.listdir(tmp_path) == ["f.txt"]
