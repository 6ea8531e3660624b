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

    manager = jobs.JobManager(gated, max_queued=2)
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
