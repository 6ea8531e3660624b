"""Quiet logs and where runs are kept: the known harmless library messages are dropped (and nothing else), a
refusal in the app is one log line, and on a Space with persistent storage runs and caches go there.

The library messages are the real ones, from the real libraries: bitsandbytes' in a fresh interpreter (it logs its
message once, while it is imported), transformers' in this one; the persistent storage is a temporary folder
standing in for /data.
"""

import json
import logging
import os
import subprocess
import sys
import textwrap
import warnings
from pathlib import Path

import gradio as gr
import pytest

from sft_space import quiet, storage
from sft_space.errors import UserError
from sft_space.ui.common import refusals_as_messages

ROOT = Path(__file__).resolve().parent.parent
KERNELS_MESSAGE = "Failed to load CPU gemm_4bit_forward from kernels-community"
CHECKPOINTING_MESSAGE = "`is_gradient_checkpointing` is deprecated"

# With the filters installed, imports bitsandbytes (which logs the kernels message on a CPU with AVX512-BF16 and no
# `kernels` package); a probe on the same logger, ahead of the filters, hears what the library said. Then says two
# unrelated things through the same logger and the same module's warnings, which must still show.
LIBRARY_NOISE = textwrap.dedent("""
    import json, logging, sys, warnings
    warnings.simplefilter("default")  # every warning shown once, as `python -W default` would
    said = []
    class Probe(logging.Filter):
        def filter(self, record):
            said.append(record.getMessage())
            return True
    logging.getLogger("bitsandbytes.backends.cpu.ops").addFilter(Probe())
    from sft_space.quiet import quiet_known_messages
    quiet_known_messages()
    quiet_known_messages()  # twice changes nothing
    import bitsandbytes
    from bitsandbytes.backends.cpu.ops import has_avx512bf16
    logging.getLogger("bitsandbytes.backends.cpu.ops").warning(
        "Failed to load CPU gemm_4bit_forward from kernels-community: %s. Please ...", "kernels 0.9 is too old")
    logging.getLogger("bitsandbytes.backends.cpu.ops").warning("an unrelated bitsandbytes warning")
    warnings.warn_explicit("an unrelated transformers warning", FutureWarning, "modeling_utils.py", 1,
                           module="transformers.modeling_utils")
    print(json.dumps({"avx512bf16": bool(has_avx512bf16()), "said": said}))
""")


@pytest.mark.slow  # a fresh interpreter importing bitsandbytes (and torch), ~5 s of CPU
def test_the_known_library_messages_are_dropped_and_nothing_else():
    done = subprocess.run([sys.executable, "-c", LIBRARY_NOISE], cwd=ROOT, capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr
    heard, shown = json.loads(done.stdout.strip().splitlines()[-1]), done.stderr
    if heard["avx512bf16"]:  # where bitsandbytes says it at all
        assert any(m.startswith(f"{KERNELS_MESSAGE}: No module named 'kernels'") for m in heard["said"])
    assert "No module named 'kernels'" not in shown
    # The same message with another cause, and everything else the same logger and module say, still show.
    for unrelated in (f"{KERNELS_MESSAGE}: kernels 0.9 is too old", "an unrelated bitsandbytes warning",
                      "an unrelated transformers warning"):
        assert unrelated in shown

    # transformers' deprecation warning, said by a real model (in this process: transformers warns each time).
    from transformers import LlamaConfig, LlamaForCausalLM

    model = LlamaForCausalLM(LlamaConfig(vocab_size=32, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                         num_attention_heads=2, num_key_value_heads=2))
    for installed in (False, True):
        with warnings.catch_warnings(record=True) as caught:
            warnings.resetwarnings()
            warnings.simplefilter("always")
            if installed:
                quiet.quiet_known_messages()
            model.is_gradient_checkpointing
        warned = any(str(w.message).startswith(CHECKPOINTING_MESSAGE) for w in caught)
        assert warned == (not installed), "said without the filters, dropped with them"


def test_the_filters_match_only_their_message(caplog):
    quiet.quiet_known_messages()
    logger = logging.getLogger(quiet.HARMLESS_RECORDS[0].logger)
    with caplog.at_level(logging.WARNING, logger=logger.name):
        logger.warning(KERNELS_MESSAGE + ": %s. Please make sure ...", ModuleNotFoundError("No module named 'kernels'"))
        logger.warning(KERNELS_MESSAGE + ": %s. Please make sure ...", RuntimeError("CUDA kernel mismatch"))
        logger.warning("something else: No module named 'kernels'")
    shown = [r.getMessage() for r in caplog.records]
    assert not any("No module named 'kernels'. Please" in m for m in shown)
    assert any("CUDA kernel mismatch" in m for m in shown) and "something else: No module named 'kernels'" in shown

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        quiet.quiet_known_messages()
        for message in (CHECKPOINTING_MESSAGE + " and will be removed in v6.", "`other_property` is deprecated"):
            warnings.warn_explicit(message, FutureWarning, "modeling_utils.py", 1, module="transformers.modeling_utils")
        warnings.warn_explicit(CHECKPOINTING_MESSAGE, FutureWarning, "ours.py", 1, module="sft_space.train")
    assert [(str(w.message), w.filename) for w in caught] == [
        ("`other_property` is deprecated", "modeling_utils.py"), (CHECKPOINTING_MESSAGE, "ours.py")]
    assert sum(isinstance(f, quiet.DropHarmless) for f in logger.filters) == 1, "installed once however often called"


def test_both_entry_points_install_the_filters_before_the_libraries_load():
    """`python -m sft_space` (the command line, and every run the app starts) and app.py."""
    probe = textwrap.dedent("""
        import logging, runpy, sys
        try:
            if sys.argv[1] == "cli":
                sys.argv = ["sft_space", "--help"]
                runpy.run_module("sft_space", run_name="__main__")
            else:
                import app
                assert "huggingface_hub" not in sys.modules and "bitsandbytes" not in sys.modules
                app.prepare()
        except SystemExit:
            pass
        print(len(logging.getLogger("bitsandbytes.backends.cpu.ops").filters))
    """)
    for entry in ("cli", "app"):
        done = subprocess.run([sys.executable, "-c", probe, entry], cwd=ROOT, capture_output=True, text=True,
                              timeout=120)
        assert done.returncode == 0, done.stderr
        assert done.stdout.strip().splitlines()[-1] == "1", entry


def test_a_refusal_is_one_log_line_not_a_traceback(caplog, capsys):
    def on_start(name):
        raise gr.Error(f"Run {name} already exists;\nchoose another name.")

    def on_stream(name):
        yield "first"
        raise UserError(f"No run {name} of yours here.")

    with caplog.at_level(logging.INFO), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # gr.Warning outside a request is a Python warning
        assert refusals_as_messages(on_start, 2)("q14") == (gr.skip(), gr.skip())
        assert list(refusals_as_messages(on_stream, 1)("q15"))[0] == "first"
    refusals = [r for r in caplog.records if r.name == "sft_space.ui.common"]
    assert [r.getMessage() for r in refusals] == ["refused on_start: Run q14 already exists; choose another name.",
                                                  "refused on_stream: No run q15 of yours here."]
    assert all(r.exc_info is None and r.levelno == logging.WARNING for r in refusals)
    assert "Traceback" not in caplog.text + capsys.readouterr().err


@pytest.fixture
def on_a_space(monkeypatch):
    monkeypatch.setenv("SPACE_ID", "owner/sft-space")


def test_on_a_space_with_persistent_storage_runs_and_caches_go_there(tmp_path, on_a_space):
    data = tmp_path / "data"
    data.mkdir()
    environ = {}
    assert storage.use_persistent_storage(environ, data) == data
    assert environ == {"SFT_SPACE_RUNS": str(data / "runs"), "HF_HOME": str(data / ".huggingface"),
                       "SFT_SPACE_CACHE": str(data / ".cache" / "sft_space")}
    assert storage.runs_note(environ["SFT_SPACE_RUNS"], data) == ""
    # The operator's own choice wins, and a runs folder they put off the persistent storage is warned about.
    environ = {"SFT_SPACE_RUNS": "runs"}
    storage.use_persistent_storage(environ, data)
    assert environ["SFT_SPACE_RUNS"] == "runs" and environ["HF_HOME"] == str(data / ".huggingface")
    assert "vanish" in storage.runs_note("runs", data)


def test_without_persistent_storage_the_train_tab_says_runs_vanish(tmp_path, on_a_space, monkeypatch):
    absent = tmp_path / "data"
    environ = {}
    assert storage.use_persistent_storage(environ, absent) is None and environ == {}
    note = storage.runs_note("runs", absent)
    assert "wiped when the Space restarts" in note and "Publish" in note

    # Off a Space nothing moves and nothing is said, even where a /data folder happens to exist.
    monkeypatch.delenv("SPACE_ID")
    absent.mkdir()
    assert storage.use_persistent_storage(environ, absent) is None and environ == {}
    assert storage.runs_note("runs", absent) == ""


def test_the_train_tab_shows_the_note_on_a_space_without_storage(tmp_path, on_a_space, monkeypatch):
    from sft_space import jobs
    from sft_space.ui import build_app

    monkeypatch.setattr(storage, "PERSISTENT_MOUNT", tmp_path / "no-data")
    monkeypatch.setenv("SFT_SPACE_RUNS", str(tmp_path / "runs"))
    app = build_app(jobs.JobManager(), default_model="someone/model")
    notes = [b for b in app.blocks.values() if getattr(b, "elem_id", None) == "train-storage-note"]
    assert len(notes) == 1 and notes[0].value == storage.EPHEMERAL_RUNS_NOTE


@pytest.mark.slow
def test_app_prepare_sets_hf_home_before_huggingface_hub_reads_it(tmp_path):
    data = tmp_path / "data"
    data.mkdir()
    probe = textwrap.dedent(f"""
        import json, os, sys
        from pathlib import Path
        import app
        from sft_space import storage
        storage.PERSISTENT_MOUNT = Path({str(data)!r})
        app.prepare()
        from huggingface_hub import constants
        from sft_space.settings import from_environment
        print(json.dumps({{"hf_home": constants.HF_HOME, "runs": from_environment().runs}}))
    """)
    env = {k: v for k, v in os.environ.items() if k not in ("HF_HOME", "SFT_SPACE_RUNS", "SFT_SPACE_CACHE")}
    env["SPACE_ID"] = "owner/sft-space"
    done = subprocess.run([sys.executable, "-c", probe], cwd=ROOT, capture_output=True, text=True, env=env,
                          timeout=120)
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout.strip().splitlines()[-1]) == {"hf_home": str(data / ".huggingface"),
                                                                "runs": str(data / "runs")}
