"""``milp_cudagraphs``: torch's cudagraphs backend with the weights read in place.

CUDA graph trees need a GPU; on this CPU the backend runs with torch's device checks stubbed and
the graph trees' entry point (``cudagraphify_impl``) replaced by a recorder that runs the traced
graph as it is: what matters here is which inputs the backend tells the graph trees to read in
place (every parameter, buffer and static-address tensor) and that the step still gives each
row its tokens alone."""
from __future__ import annotations

import pytest
import torch
from test_decode import alone, drive, prompts, runtime  # tests/milp is on sys.path

import milp.cudagraphs as mcg
from milp.decode import ContinuousBatch

mcg.register()  # as ContinuousBatch does (the installed package's entry point does it too)


@pytest.fixture
def recorded(monkeypatch):
    """The graph trees' entry point recorded (``(inputs, static indices)`` per graph), the traced
    graph run as it is; torch's CPU and device checks of the cudagraphs backend stubbed."""
    import torch._dynamo.backends.cudagraphs as stock
    import torch._inductor.cudagraph_trees as trees

    calls: list[list] = []  # [the real inputs of the graph's first run, its static indices]

    def record(model, inputs, static_input_idxs, *args, **kwargs):
        call = [None, list(static_input_idxs)]
        calls.append(call)

        def run(args):
            if call[0] is None:
                call[0] = list(args)  # a boxed call clears its list
            return model(args)

        return run

    monkeypatch.setattr(stock, "check_for_skip", lambda *a, **k: None)
    monkeypatch.setattr(stock, "get_device_index", lambda gm: 0)
    monkeypatch.setattr(trees, "cudagraphify_impl", record)
    return calls


def test_a_compiled_step_reads_every_weight_and_static_buffer_in_place(recorded):
    """The decode step compiled with ``milp_cudagraphs``: every parameter (the model's and the
    adapter banks'), buffer and static-address tensor (the batch's token ids, the cache's columns)
    is a static input of the recorded graph; the inputs copied per replay are none of them, and
    the few there are hold less than 1% of the bytes. Rows get their tokens alone."""
    rt = runtime()
    rt.model.generation_config.eos_token_id = None
    batch = ContinuousBatch(rt.model, runtime=rt, max_rows=3, max_length=48, compile={"backend": mcg.BACKEND})
    ps = prompts(3, seed=2)
    joins = {0: [(0, ps[0], 5, "a"), (1, ps[1], 3, None)], 2: [(2, ps[2], 4, 7)]}
    got, _ = drive(batch, joins)
    for key, prompt, limit, user in [j for js in joins.values() for j in js]:
        assert got[key] == alone(rt, prompt, user, limit), key
    assert len(recorded) == 1  # one shape: one graph
    inputs, static = recorded[0]
    tensors = {i: x for i, x in enumerate(inputs) if isinstance(x, torch.Tensor)}
    in_place = {tensors[i].data_ptr() for i in static if i in tensors}
    # every weight (the adapter banks' too) and the batch's ids and columns are inputs read in place
    assert {x.data_ptr() for x in [*rt.model.parameters(), batch._ids, batch._slots.columns]} <= in_place
    copied = [x for i, x in tensors.items() if i not in static]
    assert not {x.data_ptr() for x in copied} & {x.data_ptr() for x in rt.model.buffers()}
    nbytes = sum(x.numel() * x.element_size() for x in tensors.values())
    assert sum(x.numel() * x.element_size() for x in copied) < 0.01 * nbytes


def test_static_inputs_are_parameters_and_what_dynamo_marked():
    w = torch.nn.Parameter(torch.zeros(2))
    marked, plain = torch.zeros(2), torch.zeros(2)
    torch._dynamo.mark_static_address(marked)
    assert mcg.static_inputs([plain, w, 3, marked, plain]) == [1, 3]


def test_a_graph_torch_will_not_capture_is_named_in_a_warning():
    """On this CPU (nothing stubbed) the stock backend skips CUDA graphs ("cpu device"): the
    step runs as traced, and a RuntimeWarning says why (torch only logs it, off by default)."""
    f = torch.compile(lambda x: x * 2, backend=mcg.BACKEND)
    why = r"milp_cudagraphs: torch will not capture a graph in CUDA graphs \(.*cpu device.*\); it runs without"
    with pytest.warns(RuntimeWarning, match=why):
        assert f(torch.ones(3)).tolist() == [2.0, 2.0, 2.0]



def test_the_backend_is_found_by_name_and_importing_milp_loads_no_dynamo(tmp_path):
    """The installed package declares ``milp_cudagraphs`` as a dynamo backend entry point:
    ``torch.compile(backend="milp_cudagraphs")`` finds it in a process that never imported milp;
    and ``import milp`` itself does not load dynamo (a second and a half of every command's start)."""
    import subprocess
    import sys

    code = ("import sys, warnings, torch\n"
            "warnings.simplefilter('ignore')\n"
            "assert torch.compile(lambda x: x + 1, backend='milp_cudagraphs')(torch.ones(2)).tolist() == [2.0, 2.0]\n"
            "assert sys.modules['milp.cudagraphs']\n")
    subprocess.run([sys.executable, "-c", code], cwd=tmp_path, check=True, timeout=300)
    code = "import sys, milp\nassert 'torch._dynamo' not in sys.modules, 'import milp loaded torch._dynamo'\n"
    subprocess.run([sys.executable, "-c", code], cwd=tmp_path, check=True, timeout=300)
