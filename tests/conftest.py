"""Shared fixtures: no network, a private model cache, and tiny real models built in the session."""

import gc
import os
import sys

# Set before any Hugging Face library is imported: the tests must never reach the network.
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["HF_DATASETS_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# The tests' models are tiny (width 64): torch's thread pool costs more than it gives on them, and on a busy
# 2-core machine its waiting threads made one training test take 48 s instead of 5. Subprocesses inherit this.
os.environ.setdefault("OMP_NUM_THREADS", "1")
# Bytecode caches on, even where the environment turns them off (PYTHONDONTWRITEBYTECODE): the suite starts dozens
# of Python processes of this package (command lines, runs, jobs, app servers), each of which would otherwise compile
# it from source again, and pytest keeps its rewritten test modules in the same caches. Workers and subprocesses
# inherit this.
os.environ.pop("PYTHONDONTWRITEBYTECODE", None)
sys.dont_write_bytecode = False

import json
from pathlib import Path

import pytest

from sft_space import models, startup

# As a command-line process does (sft_space/startup.py): the collector in larger batches while the test modules
# import torch, transformers and Gradio, and what they loaded frozen once collected (pytest_collection_finish), so
# that the tests' collections do not walk it again.
gc.set_threshold(*startup.COLLECTOR_THRESHOLDS)


@pytest.fixture(scope="session", autouse=True)
def private_model_cache(tmp_path_factory):
    """Tests convert the embedded model into their own cache, never the developer's."""
    cache = tmp_path_factory.mktemp("sft-cache")
    os.environ["SFT_SPACE_CACHE"] = str(cache)
    return cache


@pytest.fixture(scope="session", autouse=True)
def gguf_files_read_as_plain_arrays():
    """gguf's reader (which transformers reads GGUF files with) maps a file as a numpy memmap and parses the
    metadata as hundreds of thousands of small views of it; memmap's Python-level view hooks made that 70-80% of a
    tiny model's read (10 s of CPU instead of 2, for the 49,152-token vocabulary). The same mapping, seen as a
    plain array, reads the same bytes at C speed: the parse and its results are unchanged."""
    import types

    import numpy
    from gguf import gguf_reader

    plain = types.ModuleType("numpy")
    plain.__dict__.update(vars(numpy))
    plain.memmap = lambda *args, **kwargs: numpy.asarray(numpy.memmap(*args, **kwargs))
    real, gguf_reader.np = gguf_reader.np, plain
    yield
    gguf_reader.np = real


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


@pytest.fixture(scope="session")
def app_url(tiny_model_dir, tmp_path_factory):
    """One app (`python app.py`, on the tiny model) for all the browser tests of a session: (url, runs folder).
    Each test is its own visitor (a browser context of its own), so they share it as strangers share a Space;
    started once, it saves every test after the first the app's start-up. No warm start: a process started ahead
    for the next run would cost a few seconds of CPU that no test uses (its own tests are in test_child)."""
    import sys

    from builders import PLANTED_APP_TOKEN, running_server

    runs_dir = tmp_path_factory.mktemp("app-runs")
    env = {"SFT_SPACE_RUNS": str(runs_dir), "SFT_SPACE_DEFAULT_MODEL": str(tiny_model_dir),
           "HF_TOKEN": PLANTED_APP_TOKEN, "HF_HOME": str(runs_dir / "hf-home"), "SFT_SPACE_WARM_START": "0"}
    root = Path(__file__).resolve().parent.parent
    with running_server([sys.executable, "app.py"], root, env, runs_dir / "app.log") as url:
        yield url, runs_dir


@pytest.fixture(scope="session")
def chromium():
    """Chromium, started once for all the browser tests of a session (see `browser`)."""
    from playwright.sync_api import sync_playwright

    from builders import CHROMIUM, CHROMIUM_ARGS

    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        yield browser
        browser.close()


@pytest.fixture
def browser(chromium, request, tmp_path):
    """Chromium for one browser test, which opens a context of its own for each visitor. What a failed test leaves
    open is kept as a screenshot of each page in its tmp_path (said in its report); then every context it left open
    is closed."""
    failures_before = request.session.testsfailed
    yield chromium
    failed = request.session.testsfailed > failures_before
    for number, context in enumerate(chromium.contexts):
        for index, page in enumerate(context.pages if failed else []):
            path = tmp_path / f"page-{number}-{index}.png"
            page.screenshot(path=str(path), full_page=True)
            print(f"A page the test left open: {path}")
        context.close()


@pytest.fixture(scope="session")
def trained_run(tiny_model_dir, tmp_path_factory):
    """One real run on the tiny model, trained until its adapter changes the greedy answer (the publishing and GGUF
    tests read it; a test that changes a run takes a copy, test_publish's run_copy)."""
    from builders import persona_chats
    from sft_space.settings import run_settings
    from sft_space.train import TrainRequest, train

    root = tmp_path_factory.mktemp("publish")
    source = root / "persona.jsonl"
    source.write_text("\n".join(json.dumps(r) for r in persona_chats(24)) + "\n", encoding="utf-8")
    settings = run_settings("quick", source=str(source), model=str(tiny_model_dir), output_dir=str(root / "runs"),
                            max_steps=24, learning_rate=5e-3, warmup_ratio=0.0, lr_scheduler="constant_with_warmup",
                            sample_prompts=1, validation_fraction=0.1, seed=0, packing=False, batch_size=4)
    return train(TrainRequest(settings, run_id="persona"))


@pytest.fixture
def run_copy(trained_run, tmp_path):
    """A private copy of the trained run, free to change."""
    import shutil

    from sft_space.runs import RunFolder

    return RunFolder(Path(shutil.copytree(trained_run.path, tmp_path / "runs" / trained_run.run_id)))


def pytest_collection_finish(session):
    gc.freeze()


SLOW_TEST_COST = 30


def pytest_collection_modifyitems(config, items):
    """On several workers, each starts with its share of the slow tests (shared by their cost) and ends with quick
    ones.

    pytest-xdist's worksteal (pytest.ini) hands each worker one contiguous part of the collection, and a worker that
    runs out takes the end of another's part. Left in file order, the slow tests bunch in a few parts, and one
    worker could still be in a minute-long test while the other has nothing left to take: the suite lasts as long
    as that tail. Dealt out first in every part, they run side by side, and what is left to take at the end is
    quick. Each module's slow tests stay together (their module fixtures are made once), and so do the tests, slow
    or quick, that share a costly session fixture (one app server for the browser tests, one trained run): on two
    workers each would make it."""
    workers = getattr(config, "workerinput", {}).get("workercount", 0)
    shared_fixtures = ("app_url", "trained_run")
    dealt = [item for item in items
             if item.get_closest_marker("slow") or any(name in item.fixturenames for name in shared_fixtures)]
    if workers < 2 or not dealt:
        return
    dealt_ids = {id(item) for item in dealt}
    quick = [item for item in items if id(item) not in dealt_ids]
    groups = {}
    for item in dealt:
        shared = [name for name in shared_fixtures if name in item.fixturenames]
        groups.setdefault(shared[0] if shared else item.nodeid.split("::")[0], []).append(item)

    def cost(tests):  # in quick tests' time: a slow test takes some thirty times as long (median CPU, this suite)
        return sum(SLOW_TEST_COST if item.get_closest_marker("slow") else 1 for item in tests)

    shares = [[] for _ in range(workers)]
    for tests in sorted(groups.values(), key=cost, reverse=True):
        min(shares, key=cost).extend(tests)
    # The parts worksteal sends, of equal numbers of tests: each worker's share, then quick tests up to its number.
    ordered, left = [], len(items)
    for number, share in enumerate(shares):
        size = left // (workers - number)
        filler = max(0, size - len(share))
        ordered += share + quick[:filler]
        quick = quick[filler:]
        left -= size
    items[:] = ordered + quick
