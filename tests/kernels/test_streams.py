"""kernels._backend.SideStream: the fork and join the split path's schedules use.

On a GPU the overlap tests run it for real (eagerly and under graph capture). Here the CUDA
stream API is replaced by recording fakes, so that a CPU run checks the calls and their order:
the side stream waits for the current one first, the work inside runs under the side stream,
a mark is an event recorded on the side stream, and the join makes the current stream wait
and records it on the tensors made there."""
import pytest
import torch

from kernels import _backend
from kernels._backend import SideStream


class _Stream:
    def __init__(self, name, log):
        self.name, self.log = name, log

    def wait_stream(self, other):
        self.log.append(("wait_stream", self.name, other.name))

    def wait_event(self, event):
        self.log.append(("wait_event", self.name, event.stream))


class _Event:
    def __init__(self, log):
        self.log, self.stream = log, None

    def record(self, stream):
        self.stream = stream.name
        self.log.append(("record", stream.name))


class _Tensor:
    def __init__(self, name, log, numel=1):
        self.name, self.log, self._numel = name, log, numel

    def numel(self):
        return self._numel

    def record_stream(self, stream):
        self.log.append(("record_stream", self.name, stream.name))


@pytest.fixture
def fake_cuda(monkeypatch):
    log = []
    main, side = _Stream("main", log), _Stream("side", log)
    current = [main]

    class _Ctx:
        def __init__(self, stream):
            self.stream = stream

        def __enter__(self):
            self.prev = current[0]
            current[0] = self.stream
            log.append(("enter", self.stream.name))

        def __exit__(self, *exc):
            current[0] = self.prev
            log.append(("exit", self.stream.name))

    monkeypatch.setattr(torch.cuda, "current_stream", lambda device=None: current[0])
    monkeypatch.setattr(torch.cuda, "stream", _Ctx)
    monkeypatch.setattr(torch.cuda, "Event", lambda: _Event(log))
    monkeypatch.setattr(_backend, "_side_stream", lambda index: side)
    return log, current


def test_fork_mark_wait_join_order(fake_cuda):
    log, current = fake_cuda
    side = SideStream(torch.device("cuda", 0))
    assert log == [("wait_stream", "side", "main")]  # the side stream starts after the work queued so far
    with side:
        assert current[0].name == "side"  # work issued here goes to the side stream
        mark = side.mark()
    assert current[0].name == "main"
    side.wait(mark)
    side.join(_Tensor("t", log), None, _Tensor("empty", log, numel=0))
    assert log[1:] == [("enter", "side"), ("record", "side"), ("exit", "side"), ("wait_event", "main", "side"),
                       ("wait_stream", "main", "side"), ("record_stream", "t", "main")]


def test_the_side_stream_is_left_on_an_error(fake_cuda):
    log, current = fake_cuda
    side = SideStream(torch.device("cuda", 0))
    with pytest.raises(ValueError):
        with side:
            raise ValueError("inside")
    assert current[0].name == "main" and log[-1] == ("exit", "side")


def test_cpu_is_program_order():
    side = SideStream(torch.device("cpu"))
    with side:
        mark = side.mark()
    assert mark is None and side.main is None
    side.wait(mark)
    side.join(torch.ones(2))  # nothing to record on a CPU


def test_one_side_stream_per_thread_and_gpu(monkeypatch):
    """A thread capturing a CUDA graph must not find another thread's work on its side stream."""
    import threading

    made = []
    monkeypatch.setattr(torch.cuda, "Stream", lambda device: made.append(device) or object())
    monkeypatch.setattr(_backend, "_SIDE_STREAMS", _backend._SideStreams())
    first, again, gpu1 = _backend._side_stream(0), _backend._side_stream(0), _backend._side_stream(1)
    assert first is again and gpu1 is not first
    other = []
    thread = threading.Thread(target=lambda: other.append(_backend._side_stream(0)))
    thread.start()
    thread.join()
    assert other[0] is not first and made == [0, 1, 0]
