"""Limits that hold when identities cost nothing: what one client (one address) can make the shared app spend.

Any HTTP client can mint visitor ids, upload, queue events and start runs; these tests play that client.
"""

import gradio as gr
import pytest
from hypothesis import HealthCheck, given, settings, strategies as st

from sft_space import access
from sft_space.errors import UserError
from sft_space.ui.common import Gate

JSON_VALUES = st.recursive(st.none() | st.booleans() | st.integers() | st.floats() | st.text(),
                           lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(), inner, max_size=4),
                           max_leaves=10)
# What a page could send shaped like a token: our own shape with any characters in its parts.
TOKEN_SHAPED = st.builds(lambda a, b: f"v1.{a}.{b}", st.text(), st.text())


@pytest.fixture(scope="module")
def identity(tmp_path_factory):
    return access.Identity.for_runs(tmp_path_factory.mktemp("runs"))


@settings(max_examples=300, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(token=JSON_VALUES | TOKEN_SHAPED)
def test_a_token_of_any_type_or_alphabet_gets_the_same_refusal(identity, token):
    """Non-ASCII text made hmac.compare_digest raise TypeError, an int/list/dict an AttributeError: a traceback
    instead of the refusal. Every value a page can send gets the one message; `issue` answers with a new id."""
    with pytest.raises(UserError) as refused:
        identity.visitor(token)
    assert str(refused.value) == access.SESSION_UNKNOWN
    fresh = identity.issue(token)
    assert identity.visitor(fresh) and fresh != token


@settings(max_examples=100, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(token=JSON_VALUES | TOKEN_SHAPED)
def test_the_gate_refuses_any_token_with_a_message(identity, token):
    gate = Gate("runs-never-made", identity)
    expected = "still loading" if token in (None, "") else "not one this server issued"
    with pytest.raises(gr.Error, match=expected):
        gate.visitor(token)
    assert gate.known_visitor(token) is None


def test_the_tokens_that_raised_before_are_refused(identity):
    alice = identity.issue(None)
    for token in (alice[:-1] + "é", alice[:-1] + "\ud800", "v1.\ud800.abc", 0, 7, [alice], {"t": alice}, True,
                  "v1." + "a" * 100_000 + ".x"):
        with pytest.raises(UserError, match="not one this server issued"):
            identity.visitor(token)


# ------------------------------------------------------------------------------------------------ runs


@pytest.fixture
def gated(tmp_path):
    from test_jobs import GatedRunner

    return GatedRunner(tmp_path / "runs")


def test_anonymous_runs_get_one_place_per_address_and_the_queue_a_cap_for_all(gated):
    """Four fresh ids from one address filled the run slot and the whole queue: an address gets one place for
    all its anonymous ids; signed-in visitors (whose ids are accounts) and other addresses still queue, up to
    the cap for everyone."""
    from test_jobs import wait_until

    from sft_space import jobs
    from sft_space.settings import RunSettings

    manager = jobs.JobManager(gated, max_queued=2, one_anonymous_job_per_client=True)
    first = manager.submit(RunSettings(source="a.jsonl"), owner="0a1b", client="203.0.113.7")
    assert wait_until(lambda: first.state == jobs.JobState.RUNNING)
    with pytest.raises(UserError, match="from your address is already training or waiting"):
        manager.submit(RunSettings(source="b.jsonl"), owner="2c3d", client="203.0.113.7")
    signed_in = manager.submit(RunSettings(source="c.jsonl"), owner="hf:alice", client="203.0.113.7")
    elsewhere = manager.submit(RunSettings(source="d.jsonl"), owner="4e5f", client="198.51.100.1")
    assert signed_in.state == elsewhere.state == jobs.JobState.QUEUED
    with pytest.raises(UserError, match="runs are already waiting"):
        manager.submit(RunSettings(source="e.jsonl"), owner="6a7b", client="192.0.2.9")
    for job in (first, signed_in, elsewhere):
        manager.stop(job.job_id, job.owner)
    assert wait_until(lambda: all(job.done for job in (first, signed_in, elsewhere)))
    # Its run over, the address has its place again.
    again = manager.submit(RunSettings(source="b.jsonl"), owner="2c3d", client="203.0.113.7")
    manager.stop(again.job_id, again.owner)
    assert wait_until(lambda: again.done)


def test_an_anonymous_run_is_stopped_at_its_time_limit_and_a_signed_in_one_is_not(gated):
    """100,000-step runs of anonymous ids held the GPU for everyone: the manager stops such a run when its time
    is up, as Stop would (its checkpoint and adapter kept), and says why."""
    from test_jobs import wait_until

    from sft_space import jobs, runs
    from sft_space.settings import RunSettings

    manager = jobs.JobManager(gated, anonymous_run_seconds=0.3)
    signed_in = manager.submit(RunSettings(source="a.jsonl"), owner="hf:alice", client="203.0.113.7")
    assert wait_until(lambda: signed_in.state == jobs.JobState.RUNNING)
    anonymous = manager.submit(RunSettings(source="b.jsonl"), owner="0a1b", client="198.51.100.1")
    gated.finish(signed_in)
    assert wait_until(lambda: signed_in.state == jobs.JobState.FINISHED), "a signed-in run has no time limit"
    assert wait_until(lambda: anonymous.done)
    assert anonymous.state == jobs.JobState.STOPPED and not signed_in.out_of_time
    assert "longest a run of a visitor who is not signed in" in anonymous.message
    assert runs.RunFolder(anonymous.run_dir).read()["status"] == runs.STOPPED


# ------------------------------------------------------------------------------------------------ uploads


def upload(tmp_path, name, size):
    """A file as Gradio's upload folder holds it, `size` bytes of JSONL."""
    import os

    folder = tmp_path / "gradio-uploads" / os.urandom(4).hex()
    folder.mkdir(parents=True)
    path = folder / name
    path.write_text(('{"text": "%s"}\n' % ("x" * 1000)) * (size // 1015))
    return path


def test_uploads_of_all_visitors_are_capped_oldest_first_and_a_run_keeps_its_own(tmp_path):
    """One client kept 6.25 GiB of uploads in a minute under fresh ids, never pruned: all visitors' uploads
    together are capped; the oldest go first, unless an unfinished run needs them, and then a new one is refused."""
    import time

    from sft_space import runs
    from sft_space.settings import AccessSettings

    runs_dir = tmp_path / "runs"
    settings = AccessSettings(upload_mb_total=1.0)
    kept = {}
    for i, visitor in enumerate(("alice", "bob", "carol")):
        kept[visitor] = access.keep_upload(runs_dir, visitor, upload(tmp_path, f"{visitor}.jsonl", 300_000), settings)
        old = time.time() - 100 + i
        access.os.utime(kept[visitor], (old, old))
    # 3 × 300 kB < 1 MB; a fourth is over it, so the oldest (alice's) makes room.
    dave = access.keep_upload(runs_dir, "dave", upload(tmp_path, "dave.jsonl", 300_000), settings)
    assert not kept["alice"].exists() and kept["bob"].exists() and dave.exists()
    for visitor in ("bob", "carol"):
        folder = runs.RunFolder.create(runs_dir, f"{visitor}-run")
        folder.write({"run_id": f"{visitor}-run", "status": "stopped", "owner": visitor,
                      "settings": {"source": str(kept[visitor])}})
    folder = runs.RunFolder.create(runs_dir, "dave-run")
    folder.write({"run_id": "dave-run", "status": "running", "owner": "dave", "settings": {"source": str(dave)}})
    refused = upload(tmp_path, "eve.jsonl", 300_000)
    with pytest.raises(UserError, match="keeps 1 MB of uploads for all its visitors, and that is full"):
        access.keep_upload(runs_dir, "eve", refused, settings)
    assert not refused.exists() and kept["bob"].exists() and kept["carol"].exists() and dave.exists()


def test_uploads_past_their_age_are_swept_unless_a_run_needs_them(tmp_path):
    import time

    from sft_space import runs
    from sft_space.settings import AccessSettings

    runs_dir = tmp_path / "runs"
    settings = AccessSettings(upload_max_age_hours=1.0)
    old, needed, new = (access.keep_upload(runs_dir, visitor, upload(tmp_path, "d.jsonl", 2_000), settings)
                        for visitor in ("alice", "bob", "carol"))
    two_hours_ago = time.time() - 7200
    for path in (old, needed):
        access.os.utime(path, (two_hours_ago, two_hours_ago))
    folder = runs.RunFolder.create(runs_dir, "bobs-run")
    folder.write({"run_id": "bobs-run", "status": "failed", "owner": "bob", "settings": {"source": str(needed)}})
    assert access.sweep_uploads(runs_dir, settings) == 1
    assert not old.exists() and not old.parent.exists() and needed.exists() and new.exists()


# ------------------------------------------------------------------------------- the app, by client address


def test_a_rate_limit_says_when_to_come_back_and_forgets_idle_clients(monkeypatch):
    now = [0.0]
    limit = access.RateLimit(3, "uploads", window=3600, clock=lambda: now[0])
    for _ in range(3):
        limit.take("203.0.113.5")
    with pytest.raises(UserError, match=r"Too many uploads from your address \(3 in the last 60 minutes.*try "
                                        r"again in 60 minutes"):
        limit.take("203.0.113.5")
    limit.take("198.51.100.9")
    now[0] = 3000.0
    with pytest.raises(UserError, match="try again in 10 minutes"):
        limit.take("203.0.113.5")
    now[0] = 3601.0
    limit.take("203.0.113.5")
    # Addresses are cheap: the ones whose window has passed are forgotten when there are too many.
    monkeypatch.setattr(access, "MAX_CLIENTS_REMEMBERED", 2)
    now[0] = 8000.0
    limit.take("192.0.2.1")
    assert set(limit._spent) == {"192.0.2.1"}




def test_the_client_address_is_the_one_our_proxies_saw():
    assert access.client_address("10.0.0.2", ["1.1.1.1, 203.0.113.5"], 1) == "203.0.113.5"
    assert access.client_address("10.0.0.2", ["1.1.1.1", "203.0.113.5, 10.0.0.9"], 2) == "203.0.113.5"
    assert access.client_address("127.0.0.1", ["1.1.1.1"], 0) == "127.0.0.1", "no proxy: the header is the client's"
    assert access.client_address("10.0.0.2", [], 1) == "10.0.0.2"
    # An IPv6 client holds a /64 at least: it counts as one, whichever address of it it sends from.
    assert access.client_address(None, ["2001:db8:1:2:aaaa::1"], 1) == access.client_address(
        None, ["2001:db8:1:2:bbbb::7"], 1) == "2001:db8:1:2::/64"
    assert access.client_address(None, ["::ffff:203.0.113.5"], 1) == "203.0.113.5"


def from_address(address, forged="10.6.6.6"):
    """Run a handler as Gradio does for a request from `address` behind one proxy: the proxy appends the address
    it saw to the X-Forwarded-For the client sent (`forged`, which the client may set to anything)."""
    import contextlib

    from gradio.context import LocalContext

    @contextlib.contextmanager
    def context():
        request = gr.Request(headers={"x-forwarded-for": f"{forged}, {address}"}, client={"host": "10.0.0.2"})
        token = LocalContext.request.set(request)
        try:
            yield
        finally:
            LocalContext.request.reset(token)
    return context()


@pytest.fixture
def limited_app(monkeypatch, tmp_path, tiny_model_dir):
    """The app behind one proxy, with small per-client limits."""
    from sft_space import jobs
    from sft_space.ui import build_app

    for name, value in (("RUNS", str(tmp_path / "runs")), ("FORWARDED_HOPS", "1"), ("IDS_PER_CLIENT_HOUR", "2"),
                        ("UPLOADS_PER_CLIENT_HOUR", "2")):
        monkeypatch.setenv(f"SFT_SPACE_{name}", value)
    app = build_app(jobs.JobManager(), default_model=str(tiny_model_dir))
    return app, {f.fn.__name__: f.fn for f in app.fns.values() if f.fn is not None}


def test_one_address_gets_a_few_new_ids_an_hour_whatever_it_forges(limited_app):
    """200 `identify` calls gave 200 ids in 4 s. A page keeps its id, so it needs one: an address gets a few an
    hour; what the client writes in X-Forwarded-For does not make it another client; other addresses go on."""
    app, handlers = limited_app
    identify = handlers["on_load"]
    minted = []
    for forged in ("1.1.1.1", "2.2.2.2"):
        with from_address("203.0.113.5", forged):
            minted.append(identify(""))
    assert all(token.startswith("v1.") for token in minted)
    with from_address("203.0.113.5", "3.3.3.3"), pytest.warns(UserWarning, match="Too many new visitor ids"):
        refused = identify("")
    assert isinstance(refused, type(gr.skip()))
    with from_address("203.0.113.5"):
        assert identify(minted[0]) == minted[0], "a page that keeps its id costs nothing"
    with from_address("198.51.100.9"):
        assert identify("").startswith("v1.")


def test_one_address_may_upload_a_few_files_an_hour_and_a_refused_one_is_deleted(limited_app, tmp_path):
    """The upload event minted an id per upload and kept every file: uploads count per address, and a refused
    file leaves Gradio's upload folder at once."""
    app, handlers = limited_app
    upload_handler = next(f.fn for f in app.fns.values()
                          if any(event == "upload" for _, event in f.targets) and f.fn is not None)
    gate_files = [upload(tmp_path, f"d{i}.jsonl", 2_000) for i in range(3)]
    with from_address("203.0.113.5"):
        for path in gate_files[:2]:
            upload_handler(str(path), "")
        with pytest.warns(UserWarning, match="Too many uploads from your address"):
            upload_handler(str(gate_files[2]), "")
    assert not any(path.exists() for path in gate_files[:2]), "kept: moved into the visitors' folders"
    assert not gate_files[2].exists(), "refused: deleted"
    assert len(list((tmp_path / "runs" / access.UPLOADS_DIR).glob("*/*/*"))) == 2
    with from_address("198.51.100.9"):
        other = upload(tmp_path, "other.jsonl", 2_000)
        upload_handler(str(other), "")
    assert len(list((tmp_path / "runs" / access.UPLOADS_DIR).glob("*/*/*"))) == 3


def test_the_report_a_page_keeps_expires_and_gradio_keeps_fewer_sessions(limited_app, monkeypatch):
    """Each session kept its last report in gr.State for as long as the process lived (raw clients never close
    their page): the report has a time to live, and the app keeps fewer sessions than Gradio's 10,000."""
    from sft_space import models
    from sft_space.settings import AccessSettings
    from sft_space.ui import launch

    # launch also starts the built-in model's conversion, which this test has no use for.
    monkeypatch.setattr(models, "prepare_embedded_model_in_background", lambda: None)

    app, _ = limited_app
    lives = [block.time_to_live for block in app.blocks.values() if isinstance(block, gr.State)]
    assert AccessSettings.session_minutes * 60 in lives
    captured = {}

    class StandIn:
        def queue(self, **kwargs):
            captured.update(kwargs)
            return self

        def launch(self, **kwargs):
            captured.update(kwargs)

    launch(StandIn())
    assert captured["state_session_capacity"] == AccessSettings.session_capacity < 10_000
    assert captured["max_size"] == AccessSettings.queue_size


# ---------------------------------------------------------------------- Gradio's server, as raw clients see it


@pytest.fixture
def served(monkeypatch, tmp_path):
    """A small Blocks app served by `ui.launch` (Gradio's real FastAPI app and queue, with our limits in front)
    behind one proxy: an event that waits until the test releases it, and small limits."""
    import threading

    import httpx
    from builders import free_port

    from sft_space import models
    from sft_space.ui import launch

    for name, value in (("FORWARDED_HOPS", "1"), ("MAX_REQUEST_KB", "64"), ("QUEUED_EVENTS_PER_CLIENT", "2"),
                        ("UPLOAD_MB_PER_CLIENT_HOUR", "1")):
        monkeypatch.setenv(f"SFT_SPACE_{name}", value)
    monkeypatch.setattr(models, "prepare_embedded_model_in_background", lambda: None, raising=False)
    from sft_space.settings import AccessSettings

    release = threading.Event()
    gate = Gate("runs-never-made", access.Identity(b"s" * 32), AccessSettings(forwarded_hops=1))
    with gr.Blocks() as blocks:
        box = gr.Textbox()
        gr.Button().click(lambda text: release.wait(30) and text, box, box, api_name="wait", concurrency_limit=1)
        gr.Button().click(gate.client, None, box, api_name="address")
    port = free_port()
    launch(blocks, server_name="127.0.0.1", server_port=port, prevent_thread_lock=True, quiet=True)
    with httpx.Client(base_url=f"http://127.0.0.1:{port}/gradio_api", timeout=30) as client:
        yield client, release
    release.set()
    blocks.close()


def behind_proxy(address):
    return {"x-forwarded-for": f"10.6.6.6, {address}"}


def test_a_request_body_over_the_cap_is_refused_before_it_is_read(served):
    """A 287 MiB POST to the queue was accepted: a body over max_request_kb is refused (413) from its declared
    length, or once that much has arrived when it declares none, with a message; small requests go through."""
    client, release = served
    release.set()
    big = b'{"data": ["' + b"x" * 200_000 + b'"], "fn_index": 0, "session_hash": "s"}'
    refused = client.post("/queue/join", content=big, headers={"content-type": "application/json"})
    assert refused.status_code == 413 and "larger than the 64 KB this app reads" in refused.json()["detail"]

    def chunked():
        yield b'{"data": ["'
        for _ in range(1000):  # 10 MB, never all read
            yield b"x" * 10_000
        yield b'"]}'
    refused = client.post("/queue/join", content=chunked(), headers={"content-type": "application/json"})
    assert refused.status_code == 413 and "64 KB" in refused.json()["detail"]
    assert client.post("/call/wait", json={"data": ["hello"]}).status_code == 200


def test_one_address_may_have_a_few_events_waiting_or_running(served):
    """12 chats from one client pushed a victim's reply from 9.6 s to 828 s: an address may have a few events
    waiting or running at once (counted from Gradio's own queue), and other addresses go on. (The queue's own
    size: test_the_report_a_page_keeps_expires_and_gradio_keeps_fewer_sessions.)"""
    client, release = served
    waiting = [client.post("/call/wait", json={"data": [str(i)]}, headers=behind_proxy("203.0.113.5"))
               for i in range(2)]
    assert all(answer.status_code == 200 for answer in waiting)
    refused = client.post("/call/wait", json={"data": ["3"]}, headers=behind_proxy("203.0.113.5"))
    assert refused.status_code == 429 and "2 requests waiting or running" in refused.json()["detail"]
    other = client.post("/call/wait", json={"data": ["4"]}, headers=behind_proxy("198.51.100.9"))
    assert other.status_code == 200
    release.set()
    for answer in waiting:
        assert "complete" in client.get(f"/call/wait/{answer.json()['event_id']}").text
    assert client.post("/call/wait", json={"data": ["5"]}, headers=behind_proxy("203.0.113.5")).status_code == 200
    # A handler sees the client as the limits count it (Gate.client), from the request Gradio is answering.
    asked = client.post("/call/address", json={"data": []}, headers=behind_proxy("203.0.113.5")).json()
    assert '"203.0.113.5"' in client.get(f"/call/address/{asked['event_id']}").text


def test_what_one_address_uploads_to_gradios_route_is_counted_as_it_arrives(served):
    """Files posted to Gradio's upload route sat in its folder for an hour, as many as a client posted: the bytes
    one address uploads are counted per hour, before Gradio stores them."""
    client, _ = served
    part = ("data.jsonl", b"x" * 600_000, "application/octet-stream")
    assert client.post("/upload", files={"files": part}, headers=behind_proxy("203.0.113.5")).status_code == 200
    refused = client.post("/upload", files={"files": part}, headers=behind_proxy("203.0.113.5"))
    assert refused.status_code == 429 and "your address may still upload this hour" in refused.json()["detail"]
    assert client.post("/upload", files={"files": part}, headers=behind_proxy("198.51.100.9")).status_code == 200
