"""What a push says when the Hub cannot be reached or refuses, with the errors huggingface_hub 2.x really raises.

The network errors come from the real HfApi pointed at this machine (a closed port, a server that never answers,
HF_HUB_OFFLINE); the Hub's HTTP answers are the errors the library's own `hf_raise_for_status` makes of a
response with that status, raised by the HfApi stand-in of test_publish. No network, no training: the run is a
run folder with placeholder adapter files, which is all a push reads before and while it talks to the Hub.
"""

import socket
import threading
import time

import httpx2
import pytest
from huggingface_hub import HfApi
from huggingface_hub import constants as hub_constants
from huggingface_hub.errors import HfHubHTTPError, OfflineModeIsEnabled, RepositoryNotFoundError
from huggingface_hub.utils import hf_raise_for_status
from test_publish import PLANTED_TOKEN, FakeHub

from sft_space import cli, publish
from sft_space.errors import UserError
from sft_space.runs import ADAPTER_CONFIG, ADAPTER_WEIGHTS, RunFolder

CLI_WORDS = ("HF_TOKEN", "hf auth login")


@pytest.fixture
def run(tmp_path):
    folder = RunFolder.create(tmp_path / "runs", "sailor")
    folder.write({"status": "finished", "settings": {"model": "someone/base", "source": "chats.jsonl"}})
    folder.adapter_path.mkdir(parents=True)
    (folder.adapter_path / ADAPTER_CONFIG).write_text("{}", encoding="utf-8")
    (folder.adapter_path / ADAPTER_WEIGHTS).write_bytes(b"placeholder weights")
    return folder


def hub_answer(status, method="POST", url="https://huggingface.co/api/repos/create", headers=None):
    """The exception huggingface_hub raises for a Hub response with this status."""
    response = httpx2.Response(status, headers=headers or {}, json={"error": f"token {PLANTED_TOKEN} refused"},
                               request=httpx2.Request(method, url))
    try:
        hf_raise_for_status(response)
    except HfHubHTTPError as err:
        return err
    raise AssertionError(f"{status} raised nothing")


@pytest.fixture
def hub_reachable(monkeypatch):
    """The real HfApi may send requests (conftest sets HF_HUB_OFFLINE): these tests only talk to 127.0.0.1."""
    monkeypatch.setattr(hub_constants, "HF_HUB_OFFLINE", False)


def closed_port():
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def test_the_library_raises_its_own_httpx2_errors(hub_reachable):
    """What the friendly messages must recognise: pushing with no network gave 'ConnectError: [Errno -2] ...'."""
    api = HfApi(endpoint=f"http://127.0.0.1:{closed_port()}", token=PLANTED_TOKEN)
    with pytest.raises(httpx2.ConnectError):
        api.whoami()
    assert isinstance(hub_answer(401), HfHubHTTPError)
    assert isinstance(hub_answer(404, headers={"X-Error-Code": "RepoNotFound"}), RepositoryNotFoundError)


def test_no_network_is_said_at_once_with_the_real_client(run, hub_reachable):
    api = HfApi(endpoint=f"http://127.0.0.1:{closed_port()}", token=PLANTED_TOKEN)
    started = time.monotonic()
    with pytest.raises(UserError, match="Could not reach the Hugging Face Hub to check who you are: this machine "
                                        "seems to be offline") as caught:
        publish.push(run.path, publish.PublishSettings(repo_id="alice/x"), PLANTED_TOKEN, api=api)
    assert time.monotonic() - started < 5
    assert "ConnectError" not in str(caught.value) and PLANTED_TOKEN not in str(caught.value)


def test_a_hub_that_never_answers_is_given_up_on_quickly(hub_reachable):
    # Accepts connections (the kernel does, into the backlog) and never answers: a network that drops packets.
    with socket.create_server(("127.0.0.1", 0)) as silent:
        api = HfApi(endpoint=f"http://127.0.0.1:{silent.getsockname()[1]}", token=PLANTED_TOKEN)
        # Without a deadline of our own the call would wait forever: closing the server after 5 s ends it, so
        # that such a regression fails (with another message) instead of hanging the tests.
        closer = threading.Timer(5, silent.close)
        closer.start()
        started = time.monotonic()
        try:
            with pytest.raises(UserError, match="did not answer in time while trying to check who you are"):
                publish.check_access(api, "alice/x", PLANTED_TOKEN, deadline=0.5)
        finally:
            closer.cancel()
        assert time.monotonic() - started < 3


def test_hf_hub_offline_is_named_without_trying_the_network(run):
    assert hub_constants.is_offline_mode(), "conftest sets HF_HUB_OFFLINE"
    started = time.monotonic()
    with pytest.raises(UserError, match="HF_HUB_OFFLINE .* is set, so nothing is sent to it"):
        publish.push(run.path, publish.PublishSettings(repo_id="alice/x"), PLANTED_TOKEN)  # the real HfApi
    assert time.monotonic() - started < 2


@pytest.mark.parametrize("call, error, expected", [
    ("whoami", httpx2.ConnectError("[Errno -2] Name or service not known"), "this machine seems to be offline"),
    ("whoami", OfflineModeIsEnabled("offline mode is enabled"), "HF_HUB_OFFLINE"),
    ("whoami", httpx2.ConnectTimeout("timed out"), "did not answer in time"),
    ("upload_folder", httpx2.ReadTimeout("The read operation timed out"), "did not answer in time"),
    ("upload_folder", httpx2.RemoteProtocolError("Server disconnected"), "this machine seems to be offline"),
    ("whoami", hub_answer(401, "GET", "https://huggingface.co/api/whoami-v2"), "invalid or expired"),
    ("create_repo", hub_answer(403), "may not write to alice"),
    ("create_repo", hub_answer(404, headers={"X-Error-Code": "RepoNotFound"}), "404 .* check that 'alice'"),
    ("create_repo", hub_answer(409), "The name alice/x is already taken"),
    ("upload_folder", hub_answer(429), "limiting how often"),
    ("create_repo", hub_answer(500), r"a problem of its own \(500\).*Try again in a few minutes"),
    ("upload_folder", hub_answer(503), r"a problem of its own \(503\)"),
    ("create_repo", hub_answer(400), r"The Hub refused to upload to alice/x \(400\)"),
])
def test_every_hub_failure_gets_a_message_and_uploads_nothing(run, call, error, expected):
    hub = FakeHub(fail={call: error})
    with pytest.raises(UserError, match=expected) as caught:
        publish.push(run.path, publish.PublishSettings(repo_id="alice/x"), PLANTED_TOKEN, api=hub)
    message = str(caught.value)
    assert hub.commits == [] and PLANTED_TOKEN not in message
    assert not message.startswith("Could not check who you are") and type(error).__name__ not in message


def test_an_error_is_recognised_by_its_cause():
    """A library that wraps the network error in its own still gets the network message."""
    try:
        try:
            raise httpx2.ConnectError("[Errno -2] Name or service not known")
        except httpx2.ConnectError as inner:
            raise RuntimeError("upload failed") from inner
    except RuntimeError as wrapped:
        assert "seems to be offline" in str(publish.explain_hub_error(wrapped, "upload to alice/x", "alice/x", ""))
    assert "Could not upload to alice/x: ValueError: odd" in str(
        publish.explain_hub_error(ValueError("odd"), "upload to alice/x", "alice/x", ""))


def test_the_command_line_speaks_of_hf_token_and_the_app_of_pasting(run, monkeypatch, capsys):
    no_token = publish.PublishSettings(repo_id="alice/x")
    with pytest.raises(UserError) as cli_refusal:
        publish.push(run.path, no_token, None)
    assert all(word in str(cli_refusal.value) for word in CLI_WORDS) and "paste a token" not in str(cli_refusal.value)
    with pytest.raises(UserError, match="Paste a token with write access") as app_refusal:
        publish.push(run.path, no_token, None, in_app=True)
    assert "Sign in" not in str(app_refusal.value)
    monkeypatch.setenv("SPACE_ID", "owner/sft-space")
    with pytest.raises(UserError, match='Press "Sign in with Hugging Face", or paste a token'):
        publish.push(run.path, no_token, None, in_app=True)
    monkeypatch.delenv("SPACE_ID")

    expired = FakeHub(fail={"whoami": hub_answer(401, "GET", "https://huggingface.co/api/whoami-v2")})
    with pytest.raises(UserError, match="invalid or expired. Set HF_TOKEN"):
        publish.push(run.path, no_token, PLANTED_TOKEN, api=expired)
    with pytest.raises(UserError, match="can read but not write to alice. Set HF_TOKEN"):
        publish.push(run.path, no_token, PLANTED_TOKEN, api=FakeHub(role="read"))

    # The command line itself, with no HF_TOKEN and no saved login.
    monkeypatch.delenv("HF_TOKEN", raising=False)
    monkeypatch.setattr("huggingface_hub.get_token", lambda: None)
    assert cli.main(["push", str(run.path), "--repo", "alice/x"]) == 1
    err = capsys.readouterr().err
    assert "needs a Hugging Face token" in err and all(word in err for word in CLI_WORDS) and "paste a" not in err


def test_a_bad_repo_name_is_said_before_a_missing_token(run, monkeypatch, capsys):
    with pytest.raises(UserError, match="'not a repo' is not a valid repo id"):
        publish.push(run.path, publish.PublishSettings(repo_id="not a repo"), None)
    monkeypatch.delenv("HF_TOKEN", raising=False)
    monkeypatch.setattr("huggingface_hub.get_token", lambda: None)
    assert cli.main(["push", str(run.path), "--repo", "not/a/repo"]) == 1
    assert "not a valid repo id" in capsys.readouterr().err


def test_the_publish_tab_asks_to_sign_in_or_paste(run, monkeypatch):
    import gradio as gr

    from sft_space.ui import publish_tab

    monkeypatch.setenv("SPACE_ID", "owner/sft-space")
    values = dict(private=True, update_existing=False, merged=False, merged_dtype="auto", demo_space=False,
                  description="")
    run.update(owner="visitor-1")  # started in the app by this visitor's browser
    with pytest.raises(gr.Error, match="Sign in with Hugging Face") as caught:
        publish_tab.publish_run(str(run.path.parent), run.run_id, "visitor-1", "alice/x", "", None, values,
                                api=FakeHub())
    assert "HF_TOKEN" not in caught.value.message
