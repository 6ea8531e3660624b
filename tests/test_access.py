"""The trust boundary of a shared Space: identities, what a visitor may name, and their own uploads.

Two visitors, alice and bob, share one app. Every value a page sends is treated as forged until checked.
"""

import os
import stat
import time
from pathlib import Path

import gradio as gr
import pytest

from sft_space import access, runs
from sft_space.errors import UserError
from sft_space.settings import AccessSettings

SAMPLE = Path(__file__).resolve().parent.parent / "sft_space" / "samples" / "captain_byte.jsonl"


@pytest.fixture
def identity(tmp_path):
    return access.Identity.for_runs(tmp_path / "runs")


def test_only_tokens_this_server_signed_name_a_visitor(identity, tmp_path):
    alice = identity.issue("")
    visitor = identity.visitor(alice)
    assert len(visitor) == 32 and alice != visitor
    # Knowing alice's id (it is written in her runs' records) is not enough to act as her.
    for forged in (visitor, f"v1.{visitor}.", f"v1.{visitor}.{'0' * 32}", "", None, "v1..", "v2." + alice[3:],
                   access.Identity(b"another-server-secret-of-enough-length").sign(visitor)):
        with pytest.raises(UserError, match="not one this server issued"):
            identity.visitor(forged)
    # A restarted app keeps recognising its visitors (the secret is kept beside the runs, readable only by us).
    assert access.Identity.for_runs(tmp_path / "runs").visitor(alice) == visitor
    assert stat.S_IMODE(os.stat(tmp_path / "runs" / access.SECRET_FILE).st_mode) == 0o600


def test_a_page_keeps_its_id_and_a_signed_in_visitor_is_their_hugging_face_name(identity):
    anonymous = identity.issue("")
    assert identity.issue(anonymous) == anonymous
    assert identity.issue("forged") != "forged" and identity.visitor(identity.issue("forged")) != identity.visitor(anonymous)
    signed_in = identity.issue(anonymous, username="alice")
    assert identity.visitor(signed_in) == "hf:alice" and identity.issue(signed_in, username="alice") == signed_in
    # Signing out gives a fresh anonymous id, never the signed-in user's (or a previous anonymous one).
    after = identity.issue(signed_in)
    assert identity.visitor(after) not in ("hf:alice", identity.visitor(anonymous))
    assert identity.visitor(identity.issue(after, username="bob")) == "hf:bob"


def test_the_secret_can_come_from_the_environment(monkeypatch, tmp_path):
    monkeypatch.setenv("SFT_SPACE_SECRET", "a" * 40)
    token = access.Identity.for_runs(tmp_path / "one").issue("")
    assert access.Identity.for_runs(tmp_path / "two").visitor(token)
    assert not (tmp_path / "one" / access.SECRET_FILE).exists()


def typed_paths(tmp_path, runs_dir):
    """What a hostile visitor types into the Hub dataset box: the server's files, in every spelling."""
    gradio_uploads = tmp_path / "gradio" / "abc123"
    gradio_uploads.mkdir(parents=True)
    (gradio_uploads / "someone-elses.jsonl").write_text('{"text": "secret"}\n')
    run = runs.RunFolder.create(runs_dir, "bobs-run")
    run.write({"run_id": "bobs-run", "status": "finished", "owner": "bob"})
    return [str(gradio_uploads), str(gradio_uploads / "someone-elses.jsonl"), str(run.record_path),
            str(tmp_path / "no-such-folder"), "/etc/passwd", "~/.bashrc", "../runs", "gradio/abc123",
            "file:///etc/passwd", "hf://datasets/x/y", ""]


def test_the_hub_dataset_box_takes_hub_ids_never_server_paths(tmp_path, monkeypatch):
    runs_dir = tmp_path / "runs"
    settings = AccessSettings()
    monkeypatch.chdir(tmp_path)
    messages = set()
    for typed in typed_paths(tmp_path, runs_dir) + ["runs/bobs-run", "runs/nobodys-run"]:
        with pytest.raises(UserError, match="is not a Hub dataset id") as refused:
            access.data_source("hub", typed, "alice", runs_dir, settings, SAMPLE)
        messages.add(str(refused.value).replace(repr(typed), "X"))
    # One message for every refusal: whether a path exists cannot be told from it.
    assert len(messages) == 1
    assert access.data_source("hub", " HuggingFaceH4/no_robots ", "alice", runs_dir, settings, SAMPLE) == \
        "HuggingFaceH4/no_robots"
    assert access.data_source("sample", "/etc/passwd", "alice", runs_dir, settings, SAMPLE) == str(SAMPLE)


def test_local_paths_are_the_operators_choice_and_never_on_a_space(tmp_path, monkeypatch):
    monkeypatch.setenv("SFT_SPACE_LOCAL_PATHS", "1")
    local = access.access_settings()
    assert local.local_paths
    assert access.data_source("hub", str(SAMPLE), "alice", tmp_path, local, SAMPLE) == str(SAMPLE)
    assert access.model_name("/models/mine", set(), local) == "/models/mine"
    monkeypatch.setenv("SPACE_ID", "alice/sft-space")
    assert not access.access_settings().local_paths
    monkeypatch.setenv("SFT_SPACE_RUNS_PER_VISITOR", "many")
    with pytest.raises(UserError, match="SFT_SPACE_RUNS_PER_VISITOR"):
        access.access_settings()


def test_a_visitor_names_offered_models_and_hub_ids_never_local_folders(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    run = runs.RunFolder.create(tmp_path / "runs", "bobs-run")
    (run.adapter_path).mkdir()
    (run.adapter_path / "config.json").write_text("{}")
    offered = {"embedded:SmolLM2-135M-Instruct", "/srv/operator-default"}
    settings = AccessSettings()
    assert access.model_name("/srv/operator-default", offered, settings) == "/srv/operator-default"
    assert access.model_name("Qwen/Qwen2.5-0.5B-Instruct", offered, settings) == "Qwen/Qwen2.5-0.5B-Instruct"
    for typed in (str(run.adapter_path), "runs/bobs-run/adapter", "runs/bobs-run", str(tmp_path), "/", ""):
        with pytest.raises(UserError, match="is not a Hub model id"):
            access.model_name(typed, offered, settings)


def upload(tmp_path, name="data.jsonl", content='{"text": "hello"}\n'):
    """A file as Gradio's upload folder holds it (shared by every visitor)."""
    folder = tmp_path / "gradio-uploads" / os.urandom(4).hex()
    folder.mkdir(parents=True)
    path = folder / name
    path.write_text(content)
    return path


def test_an_upload_moves_into_the_visitors_own_folder_and_only_they_can_use_it(tmp_path):
    runs_dir = tmp_path / "runs"
    settings = AccessSettings()
    uploaded = upload(tmp_path, "my data.jsonl")
    handle = access.keep_upload(runs_dir, "alice", uploaded, settings)
    # Gone from the shared upload folder; kept under a name that says nothing about who uploaded it.
    assert not uploaded.exists() and handle.read_text() == '{"text": "hello"}\n'
    assert handle.name == "my-data.jsonl" and "alice" not in str(handle)
    assert access.data_source("upload", str(handle), "alice", runs_dir, settings, SAMPLE) == str(handle.resolve())
    for visitor, value in (("bob", str(handle)), ("alice", str(handle.parent / ".." / ".." / "x")),
                           ("alice", str(runs_dir / access.SECRET_FILE)), ("alice", None)):
        with pytest.raises(UserError, match="upload the file again"):
            access.data_source("upload", value, visitor, runs_dir, settings, SAMPLE)


def test_uploads_beyond_the_visitors_quota_are_deleted_oldest_first_unless_a_run_needs_them(tmp_path):
    runs_dir = tmp_path / "runs"
    settings = AccessSettings(uploads_per_visitor=2, upload_mb_per_visitor=1.0)
    handles = []
    recently = time.time() - 100  # ordered by age, and all younger than upload_max_age_hours
    for i in range(3):
        handles.append(access.keep_upload(runs_dir, "alice", upload(tmp_path, f"d{i}.jsonl"), settings))
        os.utime(handles[-1], (recently + i, recently + i))
    assert [h.exists() for h in handles] == [False, True, True]
    # An unfinished run may resume from its upload: that one stays, beyond the quota.
    run = runs.RunFolder.create(runs_dir, "alices-run")
    run.write({"run_id": "alices-run", "status": "stopped", "owner": "alice", "settings": {"source": str(handles[1])}})
    newest = access.keep_upload(runs_dir, "alice", upload(tmp_path, "d3.jsonl"), settings)
    assert handles[1].exists() and newest.exists() and not handles[2].exists()
    # Bob's uploads are his own: alice's quota never touches them.
    bobs = access.keep_upload(runs_dir, "bob", upload(tmp_path, "b.jsonl"), settings)
    access.keep_upload(runs_dir, "alice", upload(tmp_path, "d4.jsonl"), settings)
    assert bobs.exists()
    with pytest.raises(UserError, match="over the 1 MB"):
        access.keep_upload(runs_dir, "alice", upload(tmp_path, "big.jsonl", "x" * (2 * 2**20)), settings)


def test_the_gate_turns_a_forged_token_into_a_message(tmp_path):
    from sft_space.ui.common import Gate

    gate = Gate(str(tmp_path), access.Identity.for_runs(tmp_path))
    token = gate.identity.issue("")
    assert gate.visitor(token) == gate.identity.visitor(token)
    with pytest.raises(gr.Error, match="reload the page"):
        gate.visitor(gate.identity.visitor(token))
    assert gate.known_visitor("forged") is None
    with pytest.raises(gr.Error, match="still loading"):
        gate.visitor("")
    # A page's first upload may come before its load event gave it an id: it gets a new one, owning nothing.
    visitor, new_token = gate.visitor_or_new("")
    assert gate.visitor(new_token) == visitor != gate.visitor(token)
    assert gate.visitor_or_new(token) == (gate.visitor(token), token)
    with pytest.raises(gr.Error, match="reload the page"):
        gate.visitor_or_new("forged")
    with pytest.raises(gr.Error, match="not a Hub model id"):
        gate.model(str(tmp_path))


# ------------------------------------------------------------------------------------------ who may train

SPACE = {"SYSTEM": "spaces", "SPACE_ID": "acme/sft-space", "SPACE_AUTHOR_NAME": "acme", "OAUTH_CLIENT_ID": "client"}


def hf_profile(username, orgs=()):
    """The profile as Gradio hands it to a handler: gr.OAuthProfile built from the OpenID userinfo in its session
    (an org is listed by its handle, preferred_username, and its display name, name)."""
    return gr.OAuthProfile({"sub": "1", "name": username.title(), "preferred_username": username,
                            "profile": f"https://huggingface.co/{username}", "picture": "",
                            "orgs": [{"sub": "2", "name": f"The {org} team", "preferred_username": org,
                                      "picture": "", "roleInOrg": "read"} for org in orgs]})


VISITORS = {
    "anonymous": None,
    "signed-in stranger": hf_profile("mallory", orgs=["other-org"]),
    "owner": hf_profile("acme"),
    "org member": hf_profile("alice", orgs=["other-org", "acme"]),
}


@pytest.mark.parametrize("level, allowed", [
    ("owner", {"owner", "org member"}),
    ("signed-in", {"signed-in stranger", "owner", "org member"}),
    ("anyone", set(VISITORS)),
    # On a Space, "auto" is the owner.
    ("auto", {"owner", "org member"}),
])
def test_each_access_level_lets_in_exactly_its_visitors(level, allowed):
    for who, profile in VISITORS.items():
        decision = access.training_access(level, SPACE, profile)
        assert decision.allowed == (who in allowed), (level, who)
        assert decision.level == ("owner" if level == "auto" else level)
        # A refusal is one sentence that says what to do.
        assert bool(decision.reason) == (not decision.allowed)
        if not decision.allowed:
            assert decision.reason.count(". ") == 0 and decision.reason.endswith(".")
            assert "duplicate the Space" in decision.reason


def test_the_refusal_says_why_and_what_to_do():
    anonymous = access.training_access("owner", SPACE, None).reason
    assert anonymous == ("Only acme, who owns this Space (or a member, if that is an organisation), may train or "
                         "publish here: sign in with Hugging Face if that is you, or duplicate the Space to train "
                         "on a GPU of your own.")
    stranger = access.training_access("owner", SPACE, VISITORS["signed-in stranger"]).reason
    assert "you are signed in as mallory" in stranger and "duplicate the Space" in stranger
    assert "Only visitors signed in with Hugging Face" in access.training_access("signed-in", SPACE, None).reason


def test_only_the_owners_handle_counts_never_a_display_name():
    """Anyone can name an organisation of theirs "acme" (its display name); only its handle is the owner's."""
    impostor = hf_profile("mallory", orgs=["mallorys-org"])
    impostor["name"] = "acme"
    impostor["orgs"][0]["name"] = "acme"
    assert not access.training_access("owner", SPACE, impostor).allowed
    # A Space without SPACE_AUTHOR_NAME: its owner is the first part of SPACE_ID.
    assert access.training_access("owner", {**SPACE, "SPACE_AUTHOR_NAME": ""}, hf_profile("acme")).allowed


def test_without_sign_in_nobody_can_be_recognised_so_only_anyone_trains():
    for environ in ({k: v for k, v in SPACE.items() if k != "OAUTH_CLIENT_ID"}, {}):
        for level in ("owner", "signed-in"):
            decision = access.training_access(level, environ, hf_profile("acme"))
            assert not decision.allowed and "no sign-in with Hugging Face" in decision.reason
            # In the page's words: how to turn sign-in on is the operator's business (the README says).
            assert "hf_oauth" not in decision.reason and "SFT_SPACE_" not in decision.reason
        assert access.training_access("anyone", environ, None).allowed
    # Off a Space, "auto" is anyone: the machine is the user's own.
    assert access.training_access("auto", {}, None) == access.TrainingAccess("anyone", True)


def test_the_level_is_read_from_the_environment_and_shown(monkeypatch):
    monkeypatch.delenv("SPACE_ID", raising=False)
    assert access.access_settings().who_may_train == "auto"
    monkeypatch.setenv("SFT_SPACE_WHO_MAY_TRAIN", " Signed-In ")
    assert access.access_settings().who_may_train == "signed-in"
    monkeypatch.setenv("SFT_SPACE_WHO_MAY_TRAIN", "friends")
    with pytest.raises(UserError, match="SFT_SPACE_WHO_MAY_TRAIN='friends' is not one of auto, owner, signed-in"):
        access.access_settings()
    assert access.describe_who_may_train("auto", SPACE) == (
        "Who may train and publish here: **this Space's owner, acme (or its members, if that is an organisation), "
        "signed in** (the default on a Space; the app's operator can change it).")
    assert "**anyone who opens this app** (as the app's operator set it)" in access.describe_who_may_train(
        "anyone", SPACE)


def test_the_original_space_is_the_one_named_not_a_duplicate_that_copied_the_variable():
    settings = AccessSettings(original_space="acme/sft-space")
    assert access.is_original_space(settings, SPACE)
    assert not access.is_original_space(settings, {**SPACE, "SPACE_ID": "bob/sft-space"})
    assert not access.is_original_space(AccessSettings(), SPACE)
