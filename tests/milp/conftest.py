"""Shared fixtures for milp tests: tiny offline tokenizers and tiny random-init model configs.

Nothing here downloads: the tokenizers are byte-level BPEs trained in-process on a few
sentences, and the models are random-init from configs small enough for CPU tests.
"""
from __future__ import annotations

import os

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

@pytest.fixture(autouse=True)
def _simulated_cuda_has_bf16(monkeypatch):
    """Tests that pass ``torch.device("cuda")`` on a machine without one (settings checks,
    resumption rules) stand for a GPU that computes in bf16 (compute capability 8.0+), whose
    ``--dtype auto`` is bfloat16; a test of another GPU patches ``milp.train._native_bf16``
    itself. Where CUDA exists the real capability is read."""
    import torch

    if not torch.cuda.is_available():
        import milp.train

        monkeypatch.setattr(milp.train, "_native_bf16", lambda device: True)


_CORPUS = [
    "I have had a headache for three days. What should I do?",
    "Drink water, rest, and see a doctor if the pain gets worse.",
    "My knee hurts when I run. Is it serious?",
    "Patient: I take ibuprofen. Doctor: That is fine for short-term pain.",
    "Question: Answer: Profile: the quick brown fox jumps over the lazy dog 0123456789 ?!.,'",
]
CHAT_TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}</s>\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)


def _train_tokenizer(chat_template: str | None, add_bos: bool):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    specials = ["<pad>", "<s>", "</s>", "<|system|>", "<|user|>", "<|assistant|>"]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=specials,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(_CORPUS * 4, trainer)
    if add_bos:
        tok.post_processor = processors.TemplateProcessing(
            single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", tok.token_to_id("<s>"))])
    hf = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>",
                                 additional_special_tokens=specials[3:])
    if chat_template:
        hf.chat_template = chat_template
    return hf


@pytest.fixture(scope="session")
def tiny_tokenizer():
    """Byte-level BPE (vocab ≈ 400) that prepends ``<s>``; no chat template."""
    return _train_tokenizer(None, add_bos=True)


@pytest.fixture(scope="session")
def tiny_chat_tokenizer():
    """Like ``tiny_tokenizer`` without automatic BOS, with a small chat template."""
    return _train_tokenizer(CHAT_TEMPLATE, add_bos=False)


def make_tiny_config(arch: str = "llama", vocab_size: int = 400):
    """A tiny random-init config of ``arch`` ('llama', 'gpt2' or 'roberta')."""
    from transformers import GPT2Config, LlamaConfig, RobertaConfig

    if arch == "llama":
        return LlamaConfig(vocab_size=vocab_size, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                           num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                           bos_token_id=1, eos_token_id=2, pad_token_id=0)
    if arch == "gpt2":
        return GPT2Config(vocab_size=vocab_size, n_embd=32, n_layer=2, n_head=4, n_positions=128,
                          bos_token_id=1, eos_token_id=2)
    if arch == "roberta":
        return RobertaConfig(vocab_size=vocab_size, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                             num_attention_heads=4, max_position_embeddings=130, is_decoder=True,
                             bos_token_id=1, eos_token_id=2, pad_token_id=0)
    raise ValueError(f"arch must be 'llama', 'gpt2' or 'roberta', got {arch!r}")


@pytest.fixture(scope="session")
def tiny_config():
    """``tiny_config(arch="llama", vocab_size=400)`` → a tiny random-init HF config."""
    return make_tiny_config


@pytest.fixture
def tiny_checkpoint(tmp_path, tiny_chat_tokenizer):
    """A saved tiny random-init LlamaForCausalLM + tokenizer directory (a local HF checkpoint)."""
    import torch
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(make_tiny_config("llama", len(tiny_chat_tokenizer)))
    path = tmp_path / "tiny-llama"
    model.save_pretrained(path)
    tiny_chat_tokenizer.save_pretrained(path)
    return path


#: the flags of :func:`answer_run`: a small run with 2 slots (fewer than its users)
ANSWER_RUN_FLAGS = ["--users", "7", "--memory-steps", "2", "--instruct-steps", "2", "--max-new-tokens", "3",
                    "--max-length", "96", "--no-progress", "--slots", "2"]


@pytest.fixture(scope="session")
def answer_run(tiny_chat_tokenizer, tmp_path_factory):
    """A finished ``python -m milp.train`` run (:data:`ANSWER_RUN_FLAGS`) on a tiny local
    checkpoint, once per session, for the tests of ``milp.answer`` (read only)."""
    import torch
    from transformers import AutoModelForCausalLM

    import milp.train as train

    base = tmp_path_factory.mktemp("answer-run")
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(make_tiny_config("llama", len(tiny_chat_tokenizer)))
    model.save_pretrained(base / "ckpt")
    tiny_chat_tokenizer.save_pretrained(base / "ckpt")
    assert train.main(["--model", str(base / "ckpt"), "--output", str(base / "run"), *ANSWER_RUN_FLAGS]) == 0
    return base / "run"
