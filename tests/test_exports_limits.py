"""What one visitor can spend on downloads: each file is made once per run and kind and handed out again, a visitor
makes one at a time, the folder is capped in bytes, and the downloads ask the same permission as a push.

The files are real zips of small run folders the tests write (the GGUF file of a trained run is in test_gguf);
`export_zip` is wrapped, never replaced, to count how often it runs.
"""

import os
import threading
import time
import warnings
import zipfile

import pytest

from sft_space import publish
from sft_space.errors import UserError
from sft_space.runs import ADAPTER_CONFIG, ADAPTER_WEIGHTS, RunFolder
from sft_space.ui import publish_tab


def make_run(runs_dir, run_id, owner="alice", weights=b"placeholder weights"):
    folder = RunFolder.create(runs_dir, run_id)
    folder.write({"status": "finished", "owner": owner, "settings": {"model": "someone/base", "source": "a.jsonl"}})
    folder.adapter_path.mkdir()
    (folder.adapter_path / ADAPTER_CONFIG).write_text("{}", encoding="utf-8")
    (folder.adapter_path / ADAPTER_WEIGHTS).write_bytes(weights)
    return folder


@pytest.fixture
def zips_made(monkeypatch):
    """The run folders `export_zip` was called for, in order; it still does all its work."""
    made, real = [], publish.export_zip

    def counted(run_dir, path):
        made.append(RunFolder(run_dir).run_id)
        return real(run_dir, path)

    monkeypatch.setattr(publish, "export_zip", counted)
    return made


def handed_out_long_ago(path):
    """As if the file had last been handed out an hour ago (evictable: no page is fetching it now)."""
    an_hour_ago = time.time() - 3600
    os.utime(path, (an_hour_ago, an_hour_ago))


def test_a_zip_is_made_once_and_again_only_when_the_runs_files_change(tmp_path, zips_made):
    run = make_run(tmp_path / "runs", "sailor")
    downloads = publish.Downloads(tmp_path / "downloads", 10**9)
    first = downloads.zip(run, "alice")
    assert downloads.zip(run, "alice") == first and zips_made == ["sailor"]
    with zipfile.ZipFile(first) as archive:
        assert archive.read(ADAPTER_WEIGHTS) == b"placeholder weights"
    # Resumed and stopped again: a new adapter is a new file.
    (run.adapter_path / ADAPTER_WEIGHTS).write_bytes(b"weights after resuming")
    again = downloads.zip(run, "alice")
    assert zips_made == ["sailor", "sailor"] and again.name == first.name == "sailor-adapter.zip"
    with zipfile.ZipFile(again) as archive:
        assert archive.read(ADAPTER_WEIGHTS) == b"weights after resuming"
    assert not list((tmp_path / "downloads").rglob("*.partial"))


def test_a_visitor_makes_one_download_at_a_time(tmp_path, monkeypatch):
    runs_dir = tmp_path / "runs"
    for run_id, owner in (("first", "alice"), ("second", "alice"), ("bobs", "bob")):
        make_run(runs_dir, run_id, owner)
    downloads = publish.Downloads(tmp_path / "downloads", 10**9)
    started, release, real = threading.Event(), threading.Event(), publish.export_zip

    def held(run_dir, path):
        if RunFolder(run_dir).run_id == "first":
            started.set()
            assert release.wait(30)
        return real(run_dir, path)

    monkeypatch.setattr(publish, "export_zip", held)
    made = {}
    making = threading.Thread(target=lambda: made.update(first=downloads.zip(RunFolder(runs_dir / "first"), "alice")))
    making.start()
    try:
        assert started.wait(30)
        with pytest.raises(UserError, match="already making the zip of run first; wait for it to finish"):
            downloads.zip(RunFolder(runs_dir / "second"), "alice")
        assert downloads.zip(RunFolder(runs_dir / "bobs"), "bob").is_file()  # another visitor is not held up
    finally:
        release.set()
        making.join(30)
    assert made["first"].is_file()
    assert downloads.zip(RunFolder(runs_dir / "second"), "alice").is_file()  # once the first is made


def test_a_download_that_fails_leaves_nothing_behind_and_the_visitor_may_ask_again(tmp_path, monkeypatch):
    run = make_run(tmp_path / "runs", "sailor")
    downloads = publish.Downloads(tmp_path / "downloads", 10**9)

    def cut_short(run_dir, path):  # a disk that fills halfway through the file
        path.write_bytes(b"PK half a zip")
        raise UserError("No space left on the device.")

    with monkeypatch.context() as patched:
        patched.setattr(publish, "export_zip", cut_short)
        with pytest.raises(UserError, match="No space left"):
            downloads.zip(run, "alice")
    assert not list((tmp_path / "downloads").rglob("*"))
    with zipfile.ZipFile(downloads.zip(run, "alice")) as archive:
        assert ADAPTER_WEIGHTS in archive.namelist()


def test_the_downloads_folder_is_capped_the_oldest_going_first(tmp_path, zips_made):
    runs_dir = tmp_path / "runs"
    # Random bytes do not compress: each zip holds about 1 MB, and is estimated at 2 MB before it is made.
    runs = [make_run(runs_dir, f"run-{n}", weights=os.urandom(10**6)) for n in range(3)]
    downloads = publish.Downloads(tmp_path / "downloads", 3_500_000)
    first, second = downloads.zip(runs[0], "alice"), downloads.zip(runs[1], "alice")
    # Both were handed out just now (the page may still be fetching them): neither is evicted for a third.
    with pytest.raises(UserError, match=r"room for downloads \(3.5 MB\) is taken by files handed out in the last "
                                        r"minute or being made now; ask for the zip of run run-2 again in a minute"):
        downloads.zip(runs[2], "alice")
    handed_out_long_ago(second)
    handed_out_long_ago(first)
    os.utime(second)  # handed out again since: the first is the older
    # Left half-made by a process that died, and one another process is writing now.
    abandoned, in_progress = (tmp_path / "downloads" / "gone" / ".x.gguf.1.partial",
                              tmp_path / "downloads" / "other" / ".y.gguf.2.partial")
    for partial in (abandoned, in_progress):
        partial.parent.mkdir()
        partial.write_bytes(b"GGUF")
    handed_out_long_ago(abandoned)
    third = downloads.zip(runs[2], "alice")
    assert not first.exists() and second.is_file() and third.is_file()
    assert not abandoned.exists() and in_progress.exists()
    assert downloads.used_bytes() <= 3_500_000 and zips_made == ["run-0", "run-1", "run-2"]
    assert not first.parent.exists(), "an evicted file's folder goes with it"


def test_a_download_that_cannot_fit_is_refused_before_any_work(tmp_path, zips_made):
    run = make_run(tmp_path / "runs", "huge", weights=os.urandom(2 * 10**6))
    downloads = publish.Downloads(tmp_path / "downloads", 2_500_000)
    with pytest.raises(UserError, match=r"The zip of run huge would take about 3.0 MB, more than the 2.5 MB this "
                                        r"app keeps for downloads\. Publish the run to the Hub instead\."):
        downloads.zip(run, "alice")
    assert zips_made == [] and not list((tmp_path / "downloads").rglob("*"))


def test_sizes_are_said_in_megabytes_of_a_million_bytes_as_the_readme_counts_them(tmp_path):
    """The README gives the embedded default's GGUF files as 271 / 145 / 92 MB; the page says the same."""
    assert [publish.size_text(n) for n in (271_389_312, 145_281_492, 92_179_764)] == ["271 MB", "145 MB", "92 MB"]
    assert [publish.size_text(n) for n in (5_192_320, 840_000, 12, 2_900_000_000)] == [
        "5.2 MB", "840 KB", "1 KB", "2.9 GB"]
    make_run(tmp_path / "runs", "sailor", weights=os.urandom(1_500_000))
    offered = publish_tab.zip_run(str(tmp_path / "runs"), "sailor", "alice",
                                  publish.Downloads(tmp_path / "downloads", 10**9))
    size = os.path.getsize(offered["value"])
    assert 1_500_000 < size < 1_550_000  # 1.43 in units of 2**20 bytes
    assert offered["label"] == f"Save sailor-adapter.zip ({size / 10**6:.1f} MB)" and offered["visible"]


def told(handler, *args):
    """What a page is told by a handler: the warnings it shows and the text of its outputs."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        answer = handler(*args)
    return " ".join(str(warning.message) for warning in caught) + " " + str(answer)


def test_on_a_space_a_visitor_who_may_not_train_may_not_download(monkeypatch, tmp_path, tiny_model_dir):
    """The zip and the GGUF file ask what Publish asks: on a Space, a visitor who may not train does not take a
    run's files away either, whatever the page sends."""
    from test_ui import _profile, _space_app

    app, handlers = _space_app(monkeypatch, tmp_path, tiny_model_dir)
    token = handlers["on_load"]("", None)
    for name, args in (("on_zip", (None, "alices", token)), ("on_gguf", (None, "alices", token, "q8_0"))):
        refusal = told(handlers[name], *args)
        assert "Only acme, who owns this Space" in refusal and "Save" not in refusal
        # The owner goes on to the next check: the run must be theirs.
        assert "There is no run alices of yours" in told(handlers[name], _profile("acme"), *args[1:])
