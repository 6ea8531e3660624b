"""Work that strangers choose runs in a worker process with a memory limit and a deadline: a check of a visitor's
data, and the chat template of a tokenizer a visitor names. Its failure is a message for that visitor, and the app
(and the next check) goes on. Limits are set low here so that nothing big is ever allocated."""

import copy
import os
import resource
import signal
import threading
import time

import pytest
from builders import chat

from sft_space import access, checks, isolation
from sft_space.errors import UserError
from sft_space.settings import AccessSettings
from sft_space.ui import data_tab
from sft_space.ui.common import Gate

TASK = isolation.Task("This test's work", "ask for less.")
QUICK = isolation.Limits(memory_gb=0.5, seconds=3, at_once=2, wait_seconds=0.5)
# Two nested loops of 100,000: the sandbox allows each range, together they never end.
ENDLESS_TEMPLATE = ("{% for i in range(100000) %}{% for j in range(100000) %}{% endfor %}{% endfor %}"
                    "{% for m in messages %}{{ m['content'] }}{% endfor %}")
# A gigabyte string from one expression.
GREEDY_TEMPLATE = "{{ 'x' * 1000000000 }}{% for m in messages %}{{ m['content'] }}{% endfor %}"


def peak_rss_mb(pid="self"):
    """The peak resident memory of a process (VmHWM), in MB."""
    with open(f"/proc/{pid}/status") as status:
        return next(int(line.split()[1]) for line in status if line.startswith("VmHWM")) / 1024


def test_a_worker_gives_back_what_it_made_item_by_item_with_its_progress():
    assert isolation.run_in_worker(lambda: {"answer": 42, "pid": os.getpid()}, TASK, QUICK)["pid"] != os.getpid()
    progress = []

    def work(report_progress):
        for i in range(3):
            report_progress(i, 3)
            yield i

    assert list(isolation.stream_in_worker(work, TASK, QUICK, on_progress=lambda *v: progress.append(v))) == [0, 1, 2]
    assert progress == [(0, 3), (1, 3), (2, 3)]


def test_a_worker_gives_way_to_the_app_for_the_cpu():
    def niceness():
        return os.getpriority(os.PRIO_PROCESS, 0)

    assert isolation.run_in_worker(niceness, TASK, QUICK) == min(niceness() + isolation.WORKER_NICENESS, 19)


def test_a_worker_past_its_deadline_is_stopped_with_a_message():
    started = time.monotonic()
    with pytest.raises(UserError, match=r"took longer than 1 s, the most one may take .*; ask for less"):
        isolation.run_in_worker(lambda: time.sleep(60), TASK, isolation.Limits(0.5, 1, 2, 0.5))
    assert time.monotonic() - started < 5
    assert isolation.running.count == 0


def test_a_worker_past_its_memory_limit_is_stopped_with_a_message_and_the_app_keeps_its_memory():
    before = peak_rss_mb()
    with pytest.raises(UserError, match=r"needed more than 0.5 GB of memory.*; ask for less"):
        isolation.run_in_worker(lambda: bytearray(2 * 1024**3), TASK, QUICK)
    assert peak_rss_mb() - before < 100


def test_a_worker_that_crashes_or_fails_is_a_message_never_a_traceback():
    with pytest.raises(UserError, match="crashed, most likely for want of memory"):
        isolation.run_in_worker(lambda: os.kill(os.getpid(), signal.SIGKILL), TASK, QUICK)  # as the OOM killer
    with pytest.raises(UserError, match="ZeroDivisionError: division by zero"):
        isolation.run_in_worker(lambda: 1 / 0, TASK, QUICK)
    with pytest.raises(UserError, match="^a refusal, as it was$"):
        isolation.run_in_worker(lambda: (_ for _ in ()).throw(UserError("a refusal, as it was")), TASK, QUICK)


def test_workers_at_once_are_capped_for_the_whole_app_and_a_request_beyond_waits_then_is_refused():
    busy = []

    def occupy():
        busy.append(isolation.run_in_worker(lambda: time.sleep(1.5) or "done", TASK, QUICK))

    threads = [threading.Thread(target=occupy) for _ in range(QUICK.at_once)]
    for thread in threads:
        thread.start()
    deadline = time.monotonic() + 5
    while isolation.running.count < QUICK.at_once and time.monotonic() < deadline:
        time.sleep(0.02)
    with pytest.raises(UserError, match="already running 2 checks or previews"):
        isolation.run_in_worker(lambda: "third", TASK, QUICK)
    for thread in threads:
        thread.join()
    assert busy == ["done", "done"]
    # Once one is free, a waiting request goes ahead.
    assert isolation.run_in_worker(lambda: "third", TASK, QUICK) == "third"


def test_leaving_a_stream_early_stops_its_worker():
    pids = []

    def endless(progress):
        while True:
            yield os.getpid()

    stream = isolation.stream_in_worker(endless, TASK, QUICK)
    pids.append(next(stream))
    stream.close()
    assert isolation.running.count == 0
    with pytest.raises(ProcessLookupError):
        os.kill(pids[0], 0)


def test_a_worker_nobody_reads_any_more_ends_at_its_deadline_and_frees_its_place():
    def endless(progress):
        while True:
            yield "x" * 100_000  # soon fills the pipe, and waits there for a reader that never comes

    one_at_once = isolation.Limits(memory_gb=0.5, seconds=1, at_once=1, wait_seconds=5)
    left = isolation.stream_in_worker(endless, TASK, one_at_once)
    next(left)  # kept, never closed: as a page that went away mid-check may leave it
    started = time.monotonic()
    assert isolation.run_in_worker(lambda: "next", TASK, one_at_once) == "next"
    assert time.monotonic() - started < 4
    left.close()


# ------------------------------------------------------------------------------------- the Data tab's check


def tokenizer_folder(tmp_path, embedded_tokenizer, template, name):
    """A local model folder holding the embedded tokenizer with `template` as its chat template."""
    tokenizer = copy.deepcopy(embedded_tokenizer)
    tokenizer.chat_template = template
    folder = tmp_path / name
    tokenizer.save_pretrained(folder)
    return str(folder)


def gate_with_deadline(runs_dir, tiny_model_dir, seconds):
    """The app's gate with local access on (a visitor may name a folder as the model), and low worker limits."""
    settings = AccessSettings(local_paths=True, worker_memory_gb=0.5, worker_seconds=seconds, worker_wait_seconds=1)
    return Gate(str(runs_dir), access.Identity.for_runs(runs_dir), settings, offered_models={str(tiny_model_dir)})


@pytest.fixture
def local_gate(tmp_path, tiny_model_dir):
    return gate_with_deadline(tmp_path / "runs", tiny_model_dir, 3)


@pytest.fixture
def impatient_gate(tmp_path, tiny_model_dir):
    """The same app with the shortest deadline, for work that never ends (the time it waits is spent in vain)."""
    return gate_with_deadline(tmp_path / "runs", tiny_model_dir, 1)


def check(gate, model, data_file):
    return data_tab.check_source(gate, "visitor", None, str(data_file), False, model, "", "", "train", 2048)


@pytest.fixture
def data_file(write_jsonl):
    return write_jsonl([chat((f"Question {i}?", f"Answer {i}.")) for i in range(12)])


def test_a_template_that_never_ends_is_stopped_at_the_deadline_and_the_next_check_works(
        tmp_path, embedded_tokenizer, tiny_model_dir, local_gate, impatient_gate, data_file):
    import gradio as gr

    endless = tokenizer_folder(tmp_path, embedded_tokenizer, ENDLESS_TEMPLATE, "endless")
    started = time.monotonic()
    with pytest.raises(gr.Error, match="This check took longer than 1 s"):
        check(impatient_gate, endless, data_file)
    assert time.monotonic() - started < 12
    report = check(local_gate, str(tiny_model_dir), data_file)[0]
    assert isinstance(report, checks.Report) and report.valid_rows == 12
    assert "Example 1 of 12" in data_tab.preview_html(report, str(tiny_model_dir), 1, local_gate)
    # The preview renders a template the app does not offer in a worker too.
    with pytest.raises(UserError, match="This preview took longer than 1 s"):
        data_tab.preview_html(report, endless, 1, impatient_gate)


def test_a_template_that_takes_a_gigabyte_is_stopped_at_the_memory_limit_and_the_app_keeps_its_memory(
        tmp_path, embedded_tokenizer, local_gate, data_file):
    import gradio as gr

    greedy = tokenizer_folder(tmp_path, embedded_tokenizer, GREEDY_TEMPLATE, "greedy")
    before = peak_rss_mb()
    with pytest.raises(gr.Error, match="This check needed more than 0.5 GB of memory"):
        check(local_gate, greedy, data_file)
    assert peak_rss_mb() - before < 200
    # No worker came near the gigabyte either (a forked worker's peak counts the app's pages it shares).
    assert resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024 < before + 700


def test_a_hub_datasets_first_look_still_comes_first_through_the_worker(tmp_path, tiny_model_dir, monkeypatch,
                                                                        hub_online):
    import datasets

    gate = Gate(str(tmp_path / "runs"), access.Identity.for_runs(tmp_path / "runs"),
                offered_models={str(tiny_model_dir)})

    monkeypatch.setattr(datasets, "load_dataset", lambda *a, **k: (
        chat((f"Question {i}?", f"Answer {i}.")) for i in range(checks.FIRST_LOOK_ROWS + 500)))
    shown = []
    stages = data_tab.check_source_in_stages(gate, "alice", None, "someone/large", False, str(tiny_model_dir),
                                             "", "", "train", 2048, progress=lambda *a, **k: shown.append(a))
    first = next(stages)[0]
    assert first.first_look and first.rows == checks.FIRST_LOOK_ROWS
    assert [outputs[0].rows for outputs in stages] == [checks.FIRST_LOOK_ROWS + 500]
    assert shown  # the worker's progress reached the page's progress bar


# ------------------------------------------------------------------------------------------------- the chat


def test_a_chat_template_the_app_does_not_ship_is_read_in_a_worker_first(tmp_path, embedded_tokenizer,
                                                                          tiny_model_dir, local_gate, impatient_gate):
    """The chat counts a conversation's tokens with the model's template before it answers; a template the app does
    not ship runs there in a worker first, so one that never ends is refused at the deadline, not run in the app."""
    from sft_space import models
    from sft_space.settings import GenerationSettings
    from sft_space.ui import chat_tab

    endless = tokenizer_folder(tmp_path, embedded_tokenizer, ENDLESS_TEMPLATE, "endless")
    assert not chat_tab.ships_template(local_gate, None, endless)
    assert chat_tab.ships_template(local_gate, None, str(tiny_model_dir))
    settings = GenerationSettings()
    started = time.monotonic()
    with pytest.raises(UserError, match="Reading this conversation with the model's chat template took longer"):
        chat_tab.conversation_prompts_bounded(impatient_gate, lambda: models.load_tokenizer(endless), False, "Hi", [],
                                             [], settings)
    assert time.monotonic() - started < 12
    # A shipped template is read in the app, as before; a template that answers passes in a worker too.
    chat_tab.conversation_prompts_bounded(local_gate, lambda: embedded_tokenizer, True, "Hi", [], [], settings)
    chat_tab.conversation_prompts_bounded(local_gate, lambda: embedded_tokenizer, False, "Hi", [], [], settings)
    assert isolation.running.count == 0
