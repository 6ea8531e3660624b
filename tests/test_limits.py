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
