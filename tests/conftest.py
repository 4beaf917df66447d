"""Shared fixtures: a locally trained tokenizer and tiny random model directories.

Everything is seeded, so a failing test fails the same way on every run.
"""

import os

import torch

if not torch.cuda.is_available():
    # Triton's CPU interpreter, for the Triton kernels' tests (test_lora_kernels.py, test_fused.py).
    # Read when a kernel is defined, so set before anything imports Triton (transformers,
    # bitsandbytes and peft all do).
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

from rawqlora.tiny import tiny_model, train_tokenizer  # noqa: E402

ARCHS = ["llama", "mistral", "qwen2", "mixtral"]

TOKENIZER_TEXTS = [
    "The quick brown fox jumps over the lazy dog.",
    "What is the capital of France? The capital of France is Paris.",
    "Write a haiku about autumn leaves falling on a quiet river.",
    "def add(a, b):\n    return a + b\n",
    "Instruction: translate to French. Input: good morning. Output: bonjour.",
] * 8


@pytest.fixture(scope="session")
def tokenizer():
    return train_tokenizer(TOKENIZER_TEXTS, vocab_size=320)


@pytest.fixture(scope="session")
def make_model_dir(tmp_path_factory, tokenizer):
    """`make_model_dir(arch, seed=0, dtype=torch.float32, **config)` -> a saved HF model directory.

    The directory holds config.json, model.safetensors and the tokenizer, as a hub download
    would. Directories are cached per argument set for the whole session: treat them as
    read-only.
    """
    cache = {}

    def make(arch, seed=0, dtype=torch.float32, **config_overrides):
        key = (arch, seed, dtype, tuple(sorted(config_overrides.items())))
        if key not in cache:
            path = tmp_path_factory.mktemp(f"{arch}-model")
            model = tiny_model(arch, len(tokenizer), seed=seed, dtype=dtype, **config_overrides)
            model.save_pretrained(path)
            tokenizer.save_pretrained(path)
            cache[key] = path
        return cache[key]

    return make
