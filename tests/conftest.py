"""Shared fixtures: no network, a private model cache, and tiny real models built in the session."""

import os

# Set before any Hugging Face library is imported: the tests must never reach the network.
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["HF_DATASETS_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# The tests' models are tiny (width 64): torch's thread pool costs more than it gives on them, and on a busy
# 2-core machine its waiting threads made one training test take 48 s instead of 5. Subprocesses inherit this.
os.environ.setdefault("OMP_NUM_THREADS", "1")

import json

import pytest

from sft_space import models


@pytest.fixture(scope="session", autouse=True)
def private_model_cache(tmp_path_factory):
    """Tests convert the embedded model into their own cache, never the developer's."""
    cache = tmp_path_factory.mktemp("sft-cache")
    os.environ["SFT_SPACE_CACHE"] = str(cache)
    return cache


@pytest.fixture(scope="session")
def embedded_tokenizer():
    """The embedded default's real tokenizer and ChatML template, read from its GGUF file."""
    return models.load_tokenizer(models.EMBEDDED_MODEL)


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory, embedded_tokenizer):
    """A tiny random Llama (2 layers, width 64) with the embedded default's real tokenizer, saved to a folder."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=len(embedded_tokenizer),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=4096,
        tie_word_embeddings=True,
        # Wide enough initial embeddings that a LoRA adapter can make confident predictions (with the usual
        # 0.02 the logits of a width-64 model cannot stray far from uniform, whatever is learned).
        initializer_range=0.15,
        bos_token_id=embedded_tokenizer.bos_token_id,
        eos_token_id=embedded_tokenizer.eos_token_id,
        pad_token_id=embedded_tokenizer.pad_token_id,
    )
    folder = tmp_path_factory.mktemp("tiny-llama")
    LlamaForCausalLM(config).save_pretrained(folder)
    embedded_tokenizer.save_pretrained(folder)
    return folder


@pytest.fixture
def write_jsonl(tmp_path):
    """Write rows (dicts, or raw strings written as they are) to a .jsonl file and return its path."""

    def write(rows, name="data.jsonl"):
        path = tmp_path / name
        lines = [row if isinstance(row, str) else json.dumps(row, ensure_ascii=False) for row in rows]
        path.write_text("\n".join(lines) + "\n", encoding="utf-8")
        return path

    return write



@pytest.fixture
def hub_online(monkeypatch):
    """The Hub answers (a stand-in stands for what it serves): code that asks `hub.reachable` first goes on."""
    from sft_space import hub

    monkeypatch.setattr(hub, "reachable", lambda timeout=None: True)
