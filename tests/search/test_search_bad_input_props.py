"""Bad input to the public API of ``search`` gets a ``TypeError``/``ValueError`` naming the
argument, and a refused call changes nothing (pending trials, the trial log)."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from search import (
    AcquisitionSettings,
    BoxSpace,
    LoRAConfig,
    NUTSSettings,
    Objective,
    Search,
    default_objectives,
    ffn_target_shapes,
    hypervolume,
    hypervolume_trace,
    infer_ref_point,
    paper_space,
    pareto_mask,
)

OBJS = [Objective("a"), Objective("b")]
BOX = BoxSpace([(0, 1)] * 2)


@pytest.mark.parametrize("kw", [dict(nuts=0), dict(nuts=""), dict(acquisition=0), dict(acquisition=[])])
def test_search_refuses_falsy_settings(kw):
    """Was: ``nuts or NUTSSettings()``: a falsy ``0``, ``""`` or ``[]`` silently became the
    default settings (the paper's 512/256 NUTS run) instead of being refused."""
    with pytest.raises(TypeError, match=next(iter(kw))):
        Search(BOX, OBJS, **kw)


def test_search_names_a_log_path_of_a_wrong_type():
    """Was: ``TypeError: expected str, bytes or os.PathLike object, not int`` (no argument named)."""
    with pytest.raises(TypeError, match="log_path must be a str or os.PathLike"):
        Search(BOX, OBJS, log_path=123)


def test_a_refused_round_leaves_its_trials_pending_and_the_log_alone(tmp_path):
    """Was: ``run`` scored the round's trials one by one into the pending ``Trial`` objects:
    a bad second result left the first one pending with ``status="ok"`` and its values set."""
    log = tmp_path / "trials.jsonl"
    s = Search(BOX, OBJS, q=2, n_init=4, log_path=log)
    text = log.read_text()
    with pytest.raises(TypeError, match=r"values\['a'\] must be a real number"):
        s.run(lambda cs: [{"a": 1.0, "b": 1.0}, {"a": "bad", "b": 1.0}], 2, progress=False)
    assert [(t.status, t.values, t.metrics) for t in s.pending] == [("pending", {}, {})] * 2
    assert s.n_finished == 0 and log.read_text() == text
    trials = s.pending
    s.run(lambda cs: [{"a": 1.0, "b": 2.0, "m": 3}] * len(cs), 2, progress=False)
    assert [(t.status, t.values, t.metrics) for t in trials] == [("ok", {"a": 1.0, "b": 2.0}, {"m": 3.0})] * 2
    assert s.trials == trials  # the very objects ask() gave


@pytest.mark.parametrize("values, match", [
    ({"a": 10**400, "b": 1.0}, r"values\['a'\] must be a number in the float range"),
    ({"a": 1.0, "b": 1.0, "n": -(10**400)}, r"values\['n'\] \(an extra metric\) must be a number in the float"),
    ([1.0, 10**400], r"values\['b'\] must be a number in the float range"),
])
def test_tell_names_an_int_beyond_the_float_range(values, match):
    """Was: ``OverflowError: int too large to convert to float`` (no argument named)."""
    s = Search(BOX, OBJS, q=1, n_init=2)
    (t,) = s.ask()
    with pytest.raises(ValueError, match=match):
        s.tell(t, values)
    assert t.status == "pending" and s.pending == [t]
    assert s.tell(t, {"a": 10**300, "b": 1}).values == {"a": 1e300, "b": 1.0}  # a big int in range is fine


def _told() -> Search:
    s = Search(BOX, OBJS, q=2, n_init=2)
    for t, v in zip(s.ask(), [(0.0, 1.0), (1.0, 0.0)]):
        s.tell(t, v)
    return s


def test_search_hypervolume_takes_a_ref_point_mapping_like_the_constructor():
    """Was: ``Search(ref_point={...})`` took a mapping but ``hypervolume({...})`` and
    ``hypervolume_trace({...})`` turned it into its keys: ``ValueError: too many dimensions
    'str'`` from torch; ``hypervolume(5)``: ``'int' object is not iterable``."""
    s = _told()
    assert s.hypervolume({"a": 2.0, "b": 2.0}) == s.hypervolume([2.0, 2.0]) == 3.0
    assert s.hypervolume_trace({"b": 2.0, "a": 2.0}) == s.hypervolume_trace([2.0, 2.0])
    partial = s.hypervolume({"a": 2.0})  # the rest inferred, as in the constructor
    assert partial == s.hypervolume([2.0, s.reference_point()[1]])
    with pytest.raises(TypeError, match="ref_point must be a sequence or a mapping"):
        s.hypervolume(5)
    with pytest.raises(ValueError, match="ref_point has unknown objective name"):
        s.hypervolume_trace({"c": 1.0})
    with pytest.raises(ValueError, match=r"ref_point\['b'\] must be a finite number"):
        Search(BOX, OBJS).hypervolume([1.0, math.nan])  # named before the empty search answers 0


_DIRS = ["minimize", "minimize"]


@pytest.mark.parametrize("call, exc, match", [
    (lambda: hypervolume("abc", [1, 1], _DIRS), TypeError, "Y must be a 2-D array of numbers"),
    (lambda: hypervolume([[1, 2], [3]], [1, 1], _DIRS), ValueError, "Y must be a 2-D array of numbers"),
    (lambda: pareto_mask(None, _DIRS), TypeError, "Y must be a 2-D array of numbers"),
    (lambda: pareto_mask([[1.0, {}]], _DIRS), TypeError, "Y must be a 2-D array of numbers"),
    (lambda: hypervolume([[1, 2]], [3, 3], None), TypeError, "directions must be a sequence"),
    (lambda: infer_ref_point([[1, 2]], 5), TypeError, "directions must be a sequence"),
    (lambda: pareto_mask([[1, 2]], {"minimize"}), TypeError, "directions must be a sequence"),
    (lambda: hypervolume([[1, 2]], None, _DIRS), TypeError, "ref_point must be 2 numbers"),
    (lambda: hypervolume_trace([[1, 2]], "ab", _DIRS), TypeError, "ref_point must be 2 numbers"),
    (lambda: hypervolume([[1, 2]], [[1], [2, 3]], _DIRS), ValueError, "ref_point must be 2 numbers"),
])
def test_pareto_functions_name_a_bad_argument(call, exc, match):
    """Was: torch's conversion errors (``new(): invalid data type 'str'``, ``expected sequence
    of length 2 at dim 1``, ``must be real number, not NoneType``) and ``object of type
    'NoneType' has no len()``, none naming the argument; a ``set`` of directions was taken
    as a sequence."""
    with pytest.raises(exc, match=match):
        call()


def test_pareto_functions_take_good_boundary_values():
    assert pareto_mask([], _DIRS) == [] and hypervolume([], [1, 1], _DIRS) == 0.0
    assert pareto_mask(np.array([[1.0, 2.0]]), ("minimize", "maximize")) == [True]
    assert hypervolume(torch.tensor([[0.0, 0.0]]), np.array([1.0, 1.0]), _DIRS) == 1.0


def test_settings_and_propose_take_numpy_ints():
    """Was: ``NUTSSettings(np.int64(16), ...)`` and ``AcquisitionSettings(mc_samples=np.int64(16))``
    were refused (``must be an int, got int64``) where ``Search(q=np.int64(2))`` and every
    other count of the package take numpy ints."""
    nuts = NUTSSettings(np.int64(16), np.int32(16), np.int64(4), np.int64(3))
    assert nuts == NUTSSettings(16, 16, 4, 3) and all(type(v) is int for v in vars(nuts).values())
    acq = AcquisitionSettings(mc_samples=np.int64(8), num_restarts=np.uint8(2))
    assert acq == AcquisitionSettings(mc_samples=8, num_restarts=2) and type(acq.mc_samples) is int
    with pytest.raises(TypeError, match="mc_samples must be an int"):
        AcquisitionSettings(mc_samples=np.float64(8.0))
    with pytest.raises(ValueError, match="thinning must be >= 1"):
        NUTSSettings(16, 16, np.int64(0))


_SPACE = paper_space(2, target_shapes=ffn_target_shapes(2, 4, 8))


@pytest.mark.parametrize("method", ["parameter_count_tensor", "parameter_count_relaxed", "effective_tensor"])
def test_space_tensor_methods_name_a_0d_x(method):
    """Was: ``IndexError: tuple index out of range`` from ``X.shape[-1]``."""
    with pytest.raises(ValueError, match="X must have last dimension 4, got shape"):
        getattr(_SPACE, method)(torch.tensor(0.5, dtype=torch.float64))
    assert getattr(_SPACE, method)(torch.zeros(4, dtype=torch.float64)).shape[-1:] in ((), (4,))


@pytest.mark.parametrize("space", [None, BOX])
def test_default_objectives_needs_a_search_space(space):
    """Was: ``AttributeError: 'BoxSpace' object has no attribute 'parameter_count_objective'``."""
    with pytest.raises(TypeError, match="space must be a SearchSpace"):
        default_objectives(space)


@pytest.mark.parametrize("data, exc, match", [
    ([0.5], TypeError, "data must be a mapping with key 'x'"),
    ({"y": [0.5]}, ValueError, "data must be a mapping with key 'x'"),
    ({"x": [0.5, 0.5, 0.5]}, ValueError, r"data\['x'\] must have length 2"),
    ({"x": [0.5, "a"]}, TypeError, r"data\['x'\]\[1\] must be a real number"),
    ({"x": [math.nan, 0.5]}, ValueError, r"data\['x'\]\[0\] must be finite"),
    ({"x": 0.5}, TypeError, r"data\['x'\] must be a sequence"),
])
def test_box_space_config_from_dict_checks_the_point(data, exc, match):
    """Was: any length and NaN accepted (a config of another space's dimension), ``float('a')``'s
    ``could not convert string to float`` and ``'float' object is not iterable`` unnamed."""
    with pytest.raises(exc, match=match):
        BOX.config_from_dict(data)
    assert BOX.config_from_dict({"x": [np.float32(0.5), 1]}) == (0.5, 1.0)


def test_lora_config_from_json_names_bytes_that_are_not_utf8():
    """Was: ``UnicodeDecodeError: 'utf-8' codec can't decode byte 0xff`` (no argument named)."""
    with pytest.raises(ValueError, match="text is not valid JSON"):
        LoRAConfig.from_json(b"\xff")
    assert LoRAConfig.from_json(b'{"layer_mask":[1],"modules":[1],"ranks":[8]}').ranks == (8,)
