"""Publishing a run: the files, the model card, the Hub checks, the merged export and the demo Space.

The Hub is replaced at its boundary (`FakeHub` stands in for HfApi); everything else is real: a tiny model is
trained once for the session (conftest.py), and the demo Space's own app.py is started and asked a question.
"""

import dataclasses
import json
import logging
import re
import zipfile
from pathlib import Path
from types import SimpleNamespace

import httpx
import pytest
from huggingface_hub import ModelCard
from huggingface_hub.errors import HfHubHTTPError

from sft_space import cli, models, publish
from sft_space.chat import load_chat_model
from sft_space.errors import UserError
from sft_space.runs import RunFolder
from sft_space.settings import GenerationSettings, PublishSettings, RunSettings

PLANTED_TOKEN = "hf_PlantedPublishToken0123456789abcdef"
ADAPTER_FILES = {"README.md", "adapter_config.json", "adapter_model.safetensors", "chat_template.jinja",
                 "loss_curve.png", "metrics.jsonl", "tokenizer.json", "tokenizer_config.json", "training_run.json"}
PROMPT = [{"role": "user", "content": "Question 7: what is 7 times 3?"}]


class FakeHub:
    """HfApi replaced at its boundary: answers like the Hub and keeps every file that would be uploaded."""

    def __init__(self, user="alice", orgs=("crew",), role="write", existing=(), fail=None):
        self.account = {"name": user, "orgs": [{"name": o} for o in orgs],
                        "auth": {"type": "access_token", "accessToken": {"role": role}}}
        self.repos = {key: {} for key in existing}  # (repo type, repo id) -> {path: bytes}
        self.created = []
        self.commits = []
        self.fail = fail or {}

    def _maybe_fail(self, call):
        if call in self.fail:
            raise self.fail[call]

    def whoami(self):
        self._maybe_fail("whoami")
        return self.account

    def repo_exists(self, repo_id, repo_type=None):
        return (repo_type or "model", repo_id) in self.repos

    def model_info(self, repo_id):
        raise httpx.ConnectError("offline")

    def create_repo(self, repo_id, repo_type=None, private=None, exist_ok=False, **extra):
        self._maybe_fail("create_repo")
        key = (repo_type or "model", repo_id)
        if key in self.repos and not exist_ok:
            raise AssertionError("create_repo on an existing repo without exist_ok")
        self.created.append({"repo_id": repo_id, "repo_type": key[0], "private": private, **extra})
        self.repos.setdefault(key, {})

    def upload_folder(self, *, repo_id, folder_path, commit_message, repo_type=None):
        self._maybe_fail("upload_folder")
        folder = Path(folder_path)
        files = {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}
        self.repos[(repo_type or "model", repo_id)].update(files)
        self.commits.append({"repo_id": repo_id, "repo_type": repo_type, "message": commit_message,
                             "files": sorted(files)})

    def files(self, repo_id, repo_type="model"):
        return self.repos[(repo_type, repo_id)]

    def download(self, repo_id, target, repo_type="model"):
        target.mkdir(parents=True)
        for name, content in self.files(repo_id, repo_type).items():
            (target / name).write_bytes(content)
        return target


def as_embedded_run(folder):
    """Make the copy read as trained on the embedded default (whose Hub id and licence are known)."""
    record = folder.read()
    record["base_model"] = record["settings"]["model"] = models.EMBEDDED_MODEL
    folder.write(record)
    return folder


def everything_written(*roots):
    for root in roots:
        for path in Path(root).rglob("*"):
            if path.is_file():
                yield path, path.read_bytes()


@pytest.mark.slow
def test_push_uploads_the_adapter_with_a_card_and_never_the_token(run_copy, monkeypatch, caplog, capsys):
    monkeypatch.setenv("HF_TOKEN", PLANTED_TOKEN)
    caplog.set_level(logging.DEBUG)
    folder = as_embedded_run(run_copy)
    hub = FakeHub()
    steps = []
    settings = publish.PublishSettings(repo_id="alice/sailor-lora", description="Answers like a cheerful sailor.")
    result = publish.push(folder.path, settings, PLANTED_TOKEN, api=hub, on_progress=lambda f, m: steps.append(f))

    assert result.model_url == "https://huggingface.co/alice/sailor-lora" and result.space_url is None
    assert hub.created == [{"repo_id": "alice/sailor-lora", "repo_type": "model", "private": True}]
    files = hub.files("alice/sailor-lora")
    assert set(files) == ADAPTER_FILES
    assert steps == sorted(steps) and steps[-1] == 1.0

    card = ModelCard(files["README.md"].decode())
    assert card.data.base_model == models.HUB_DEFAULT_MODEL
    assert card.data.library_name == "peft" and card.data.pipeline_tag == "text-generation"
    assert {"sft", "lora", "trl"} <= set(card.data.tags)
    assert card.data.license == "apache-2.0"
    assert card.data.datasets is None  # trained on a local file, not a Hub dataset
    body = card.text
    assert "Answers like a cheerful sailor." in body
    record = folder.read()
    # The headline numbers: the smoothed training loss and the validation loss, never one step's raw loss.
    final = record["final_metrics"]
    assert f"{final['loss_smoothed']:.4f}" in body and f"{final['eval_loss']:.4f}" in body
    assert "| `learning_rate` | 0.005 |" in body and "![Training and validation loss by step](loss_curve.png)" in body
    # The settings table shows the fields marked card=True (the plan's choices follow, named in words).
    marked = {spec.name for spec in dataclasses.fields(RunSettings) if spec.metadata.get("card")}
    assert set(re.findall(r"^\| `(\w+)` \|", body, flags=re.MULTILINE)) == marked and len(marked) == 14
    assert "PeftModel.from_pretrained(base, \"alice/sailor-lora\")" in body
    sample = json.loads(folder.samples_path.read_text())[0]
    assert sample["after"][:40] in body and "| prompt | base model | fine-tuned |" in body
    assert files["loss_curve.png"].startswith(b"\x89PNG")
    # The adapter names the base model others can download, not this machine's converted copy.
    assert json.loads(files["adapter_config.json"])["base_model_name_or_path"] == models.HUB_DEFAULT_MODEL
    published = json.loads(files["training_run.json"])
    assert published["settings"]["source"] == "persona.jsonl" and "output_dir" not in published["settings"]
    assert str(Path(record["settings"]["source"]).parent) not in files["training_run.json"].decode()
    assert record["published"][0]["repo_id"] == "alice/sailor-lora"

    seen = capsys.readouterr()
    for path, content in [*files.items(), *everything_written(folder.path),
                          ("log", caplog.text.encode()), ("output", (seen.out + seen.err).encode())]:
        assert PLANTED_TOKEN.encode() not in content, f"the token leaked into {path}"


def test_a_hub_dataset_and_a_merged_push_change_the_card(run_copy):
    folder = run_copy
    record = folder.read()
    record["settings"]["source"] = "crew/sailor-chats"
    folder.write(record)
    hub = FakeHub()
    publish.push(folder.path, publish.PublishSettings(repo_id="crew/sailor", merged=True, private=False),
                 PLANTED_TOKEN, api=hub)
    files = hub.files("crew/sailor")
    assert {"config.json", "model.safetensors", "tokenizer.json", "README.md"} <= set(files)
    assert "adapter_config.json" not in files
    card = ModelCard(files["README.md"].decode())
    assert card.data.datasets == ["crew/sailor-chats"] and card.data.library_name == "transformers"
    assert card.data.base_model is None  # a local folder: no Hub id to name
    assert 'AutoModelForCausalLM.from_pretrained("crew/sailor")' in card.text
    assert hub.created[0]["private"] is False


@pytest.mark.parametrize("hub, settings, token, expected", [
    (FakeHub(), {"repo_id": "alice/x"}, None, "needs a Hugging Face token"),
    (FakeHub(), {"repo_id": "not a repo"}, PLANTED_TOKEN, "not a valid repo id"),
    (FakeHub(role="read"), {"repo_id": "alice/x"}, PLANTED_TOKEN, "can read but not write"),
    (FakeHub(), {"repo_id": "bob/x"}, PLANTED_TOKEN, "cannot create repos under 'bob'"),
    (FakeHub(existing=[("model", "alice/x")]), {"repo_id": "alice/x"}, PLANTED_TOKEN, "already exists"),
    (FakeHub(existing=[("space", "alice/x-demo")]), {"repo_id": "alice/x", "demo_space": True}, PLANTED_TOKEN,
     "The Space alice/x-demo already exists"),
    (FakeHub(fail={"whoami": httpx.ConnectError("Name or service not known")}), {"repo_id": "alice/x"},
     PLANTED_TOKEN, "Could not reach the Hugging Face Hub"),
    (FakeHub(fail={"whoami": HfHubHTTPError(f"401 for token {PLANTED_TOKEN}", response=httpx.Response(
        401, request=httpx.Request("GET", "https://huggingface.co/api/whoami-v2")))}),
     {"repo_id": "alice/x"}, PLANTED_TOKEN, "invalid or expired"),
    (FakeHub(fail={"create_repo": HfHubHTTPError("403", response=httpx.Response(
        403, request=httpx.Request("POST", "https://huggingface.co/api/repos/create")))}),
     {"repo_id": "crew/x"}, PLANTED_TOKEN, "may not write to crew"),
    (FakeHub(fail={"create_repo": HfHubHTTPError("409", response=httpx.Response(
        409, request=httpx.Request("POST", "https://huggingface.co/api/repos/create")))}),
     {"repo_id": "alice/x"}, PLANTED_TOKEN, "already taken"),
])
def test_push_explains_what_stops_it_and_uploads_nothing(trained_run, hub, settings, token, expected):
    with pytest.raises(UserError, match=expected) as caught:
        publish.push(trained_run.path, publish.PublishSettings(**settings), token, api=hub)
    assert hub.commits == []
    assert PLANTED_TOKEN not in str(caught.value)


def test_updating_an_existing_repo_is_a_new_commit(run_copy):
    hub = FakeHub(existing=[("model", "alice/x")])
    publish.push(run_copy.path, publish.PublishSettings(repo_id="alice/x", update_existing=True), PLANTED_TOKEN,
                 api=hub)
    assert len(hub.commits) == 1 and hub.created[0]["repo_id"] == "alice/x"
    assert set(hub.files("alice/x")) == ADAPTER_FILES


def test_merged_export_gives_the_same_greedy_answer_as_base_plus_adapter(trained_run, tmp_path):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from sft_space.chat import generate_reply

    chat_model = load_chat_model(trained_run.path)
    greedy = GenerationSettings(max_new_tokens=24)
    tuned = chat_model.reply(PROMPT, greedy)
    assert tuned != chat_model.reply(PROMPT, greedy, use_adapter=False), "the adapter must matter for this test"

    assert cli.main(["export", str(trained_run.path), "--merged", str(tmp_path / "merged")]) == 0
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged")
    tokenizer = AutoTokenizer.from_pretrained(tmp_path / "merged")
    assert merged.dtype == torch.float32  # the tiny base model's own dtype
    assert not any("lora" in name for name, _ in merged.named_parameters())
    assert generate_reply(merged, tokenizer, PROMPT, greedy) == tuned

    assert cli.main(["export", str(trained_run.path), "--merged", str(tmp_path / "half"), "--merged-dtype",
                     "bfloat16"]) == 0
    assert AutoModelForCausalLM.from_pretrained(tmp_path / "half").dtype == torch.bfloat16


def test_zip_download_holds_the_published_files(trained_run, tmp_path):
    assert cli.main(["export", str(trained_run.path), "--zip", str(tmp_path / "adapter.zip")]) == 0
    with zipfile.ZipFile(tmp_path / "adapter.zip") as archive:
        assert set(archive.namelist()) == ADAPTER_FILES


def test_cli_push_takes_the_token_from_the_environment(run_copy, monkeypatch, capsys):
    hub = FakeHub()
    made_with = []

    def fake_api(token):
        made_with.append(token)
        return hub

    monkeypatch.setenv("HF_TOKEN", PLANTED_TOKEN)
    monkeypatch.setattr("huggingface_hub.HfApi", fake_api)
    run_dir = str(run_copy.path)
    assert cli.main(["push", run_dir, "--repo", "alice/cli-lora", "--public"]) == 0
    assert made_with == [PLANTED_TOKEN] and hub.created[0]["private"] is False
    out = capsys.readouterr()
    assert "https://huggingface.co/alice/cli-lora" in out.out and PLANTED_TOKEN not in out.out + out.err
    monkeypatch.delenv("HF_TOKEN")
    monkeypatch.setattr("huggingface_hub.get_token", lambda: None)
    assert cli.main(["push", run_dir, "--repo", "alice/cli-lora"]) == 1
    assert "needs a Hugging Face token" in capsys.readouterr().err


@pytest.mark.slow
def test_the_demo_space_chats_with_the_pushed_adapter(trained_run, run_copy, tmp_path, monkeypatch):
    import runpy

    from gradio_client import Client

    hub = FakeHub()
    result = publish.push(run_copy.path, publish.PublishSettings(repo_id="alice/sailor", demo_space=True),
                          PLANTED_TOKEN, api=hub)
    assert result.space_url == "https://huggingface.co/spaces/alice/sailor-demo"
    assert any("HF_TOKEN" in note for note in result.notes)  # a private model needs a read token in the Space
    space = hub.files("alice/sailor-demo", "space")
    assert set(space) == {"app.py", "requirements.txt", "README.md"}
    assert {"repo_id": "alice/sailor-demo", "repo_type": "space", "private": True, "space_sdk": "gradio"} in hub.created
    card = ModelCard(space["README.md"].decode())  # the same YAML front matter format
    assert card.data.sdk == "gradio" and card.data.app_file == "app.py" and card.data.models == ["alice/sailor"]
    assert b'"alice/sailor"' in space["app.py"] and b"peft==" in space["requirements.txt"]

    model_dir = hub.download("alice/sailor", tmp_path / "model")
    space_dir = hub.download("alice/sailor-demo", tmp_path / "space", "space")
    expected = load_chat_model(trained_run.path).reply(PROMPT, GenerationSettings(max_new_tokens=16))
    # The Space's app.py as the Space runs it, served by this process (its libraries are loaded here already).
    monkeypatch.setenv("MODEL_REPO", str(model_dir))
    space = runpy.run_path(str(space_dir / "app.py"), run_name="demo_space")
    _, url, _ = space["demo"].launch(prevent_thread_lock=True, server_name="127.0.0.1", quiet=True)
    try:
        answer = Client(url, verbose=False).predict(PROMPT[0]["content"], "", 0.0, 16, api_name="/chat")
    finally:
        space["demo"].close()
    assert answer.strip() == expected


def test_publishing_a_run_without_an_adapter_says_why(tmp_path):
    folder = RunFolder.create(tmp_path, "early")
    folder.write({"status": "running", "settings": {}})
    with pytest.raises(UserError, match="no adapter to publish"):
        publish.push(folder.path, publish.PublishSettings(repo_id="alice/x"), PLANTED_TOKEN, api=FakeHub())


def test_hub_licence_is_read_from_the_base_models_card():
    api = SimpleNamespace(model_info=lambda repo_id: SimpleNamespace(card_data={"license": "mit"}))
    assert publish.hub_licence(api, "someone/model") == "mit"
    assert publish.hub_licence(FakeHub(), "someone/model") is None


def test_the_publish_tab_pushes_with_a_pasted_token_and_links_the_result(run_copy, monkeypatch):
    import gradio as gr

    from sft_space.ui import publish_tab

    hub = FakeHub()
    values = dict(private=True, update_existing=False, merged=False, merged_dtype="auto", demo_space=True,
                  description="")
    runs_dir = str(run_copy.path.parent)
    run_copy.update(owner="visitor-1")  # started in the app by this visitor's browser
    shown = publish_tab.publish_run(runs_dir, str(run_copy.path), "visitor-1", " alice/from-the-app ", PLANTED_TOKEN,
                                    None, values, api=hub)
    assert "[alice/from-the-app](https://huggingface.co/alice/from-the-app)" in shown
    assert "https://huggingface.co/spaces/alice/from-the-app-demo" in shown and PLANTED_TOKEN not in shown
    # On a Space, the Space owner's own token is never used for a visitor's push.
    monkeypatch.setenv("SPACE_ID", "owner/sft-space")
    monkeypatch.setenv("HF_TOKEN", PLANTED_TOKEN)
    with pytest.raises(gr.Error, match="needs a Hugging Face token"):
        publish_tab.publish_run(runs_dir, str(run_copy.path), "visitor-1", "alice/other", "", None, values,
                                api=FakeHub())
    assert publish.resolve_token("", "oauth-token-of-the-visitor") == "oauth-token-of-the-visitor"
    monkeypatch.delenv("SPACE_ID")
    assert publish.resolve_token("", None) == PLANTED_TOKEN  # on your own machine HF_TOKEN is yours


def test_the_publish_tab_zips_only_the_visitors_own_runs(run_copy, tmp_path):
    import gradio as gr

    from sft_space.ui import publish_tab

    runs_dir, downloads = str(run_copy.path.parent), publish.Downloads(tmp_path / "downloads", 10**9)
    with pytest.raises(gr.Error, match="no run"):  # started from the command line: the operator's
        publish_tab.zip_run(runs_dir, run_copy.run_id, "alice", downloads)
    run_copy.update(owner="alice")  # started in the app by alice's browser
    with zipfile.ZipFile(publish_tab.zip_run(runs_dir, run_copy.run_id, "alice", downloads)["value"]) as archive:
        assert "adapter_model.safetensors" in archive.namelist()
    with pytest.raises(gr.Error, match="no run"):
        publish_tab.zip_run(runs_dir, run_copy.run_id, "mallory", downloads)
    with pytest.raises(gr.Error, match="no run"):
        publish_tab.publish_run(runs_dir, str(run_copy.path), "mallory", "mallory/stolen", PLANTED_TOKEN, None,
                                {}, api=FakeHub())
    assert publish_tab.zip_run(runs_dir, str(run_copy.path), "alice", downloads)["value"].endswith(".zip")


@pytest.mark.parametrize("command", [
    ["chat", "{run}", "--prompt", "hi"],
    ["export", "{run}", "--merged", "{tmp}/merged"],
    ["export", "{run}", "--adapter", "{tmp}/adapter"],
    ["export", "{run}", "--zip", "{tmp}/out.zip"],
    ["push", "{run}", "--repo", "alice/x"],
])
def test_an_adapter_without_its_weights_is_refused_before_any_work(run_copy, tmp_path, capsys, monkeypatch, command):
    monkeypatch.setenv("HF_TOKEN", PLANTED_TOKEN)
    (run_copy.adapter_path / "adapter_model.safetensors").unlink()
    assert not run_copy.has_adapter
    argv = [part.format(run=run_copy.path, tmp=tmp_path) for part in command]
    assert cli.main(argv) == 1  # a traceback would escape main
    err = capsys.readouterr().err
    assert f"error: Run persona's adapter is incomplete: {run_copy.adapter_path / 'adapter_model.safetensors'} " \
           "is missing" in err
    assert f"from {run_copy.last_checkpoint()}" in err, "it says where a copy of the adapter is"
    assert not any((tmp_path / name).exists() for name in ("merged", "adapter", "out.zip"))


def test_the_adapter_is_checked_by_every_reader(run_copy, tmp_path):
    (run_copy.adapter_path / "adapter_model.safetensors").unlink()
    for attempt in (lambda: publish.export_zip(run_copy.path, tmp_path / "out.zip"),
                    lambda: publish.merge_adapter(run_copy, tmp_path / "merged"),
                    lambda: load_chat_model(run_copy.path)):
        with pytest.raises(UserError, match="adapter is incomplete"):
            attempt()
    assert not (tmp_path / "out.zip").exists() and not (tmp_path / "merged").exists()


def test_pickle_files_are_never_shipped_and_pickle_only_adapters_are_refused(run_copy, tmp_path, capsys):
    for name in ("adapter_model.bin", "optimizer.pt", "extra.pkl"):
        (run_copy.adapter_path / name).write_bytes(b"a pickle could run code here")
    with zipfile.ZipFile(publish.export_zip(run_copy.path, tmp_path / "out.zip")) as archive:
        assert set(archive.namelist()) == ADAPTER_FILES
    hub = FakeHub()
    publish.push(run_copy.path, publish.PublishSettings(repo_id="alice/clean"), PLANTED_TOKEN, api=hub)
    assert set(hub.files("alice/clean")) == ADAPTER_FILES

    (run_copy.adapter_path / "adapter_model.safetensors").unlink()
    with pytest.raises(UserError, match=r"only pickle weights \(adapter_model.bin, extra.pkl, optimizer.pt\)"):
        publish.export_zip(run_copy.path, tmp_path / "pickled.zip")
    assert cli.main(["chat", str(run_copy.path), "--prompt", "hi"]) == 1
    assert "unpickling can run arbitrary code" in capsys.readouterr().err


def test_merges_wait_for_each_other_and_an_adapter_alone_never_waits(run_copy, tmp_path):
    """A merge (merged weights, GGUF) holds the whole model in float32: one at a time in the app's process, for
    every visitor, saying so while it waits. Staging an adapter alone takes no turn."""
    import threading

    held, release = threading.Event(), threading.Event()

    def another_visitors_merge():
        with publish.one_merge_at_a_time():
            held.set()
            release.wait(60)

    other = threading.Thread(target=another_visitors_merge)
    other.start()
    held.wait(10)
    try:
        publish.stage(run_copy.path, tmp_path / "adapter")  # returns while the other merge holds the lane
        assert (tmp_path / "adapter" / "adapter_model.safetensors").is_file()
        said, merging = [], threading.Thread(target=publish.stage, args=(
            run_copy.path, tmp_path / "merged", PublishSettings(merged=True), lambda _, message: said.append(message)))
        merging.start()
        merging.join(3)
        assert merging.is_alive() and said == [publish.WAITING_FOR_MERGE]
        assert not (tmp_path / "merged" / "model.safetensors").exists()
    finally:
        release.set()
    merging.join(120)
    other.join(10)
    assert (tmp_path / "merged" / "model.safetensors").is_file()
