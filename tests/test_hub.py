"""Reaching the Hub fails fast: one request without retries decides, before a download that would retry for a
minute (a visitor waited 48 s for an unreachable model, 24 s for a dataset)."""

import time

import pytest

from sft_space import data, hub, models
from sft_space.errors import DataSourceError


@pytest.fixture(autouse=True)
def fresh_answer():
    hub.forget()
    yield
    hub.forget()


class Session:
    def __init__(self, error=None):
        self.error, self.calls = error, 0

    def head(self, url, timeout=None):
        self.calls += 1
        if self.error:
            raise self.error
        return object()


def test_the_answer_is_one_request_remembered_for_a_while(monkeypatch):
    from huggingface_hub import constants, utils

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    down = Session(ConnectionError("Name or service not known"))
    monkeypatch.setattr(utils, "get_session", lambda: down)
    assert hub.reachable() is False and hub.reachable() is False
    assert down.calls == 1
    hub.forget()
    up = Session()
    monkeypatch.setattr(utils, "get_session", lambda: up)
    assert hub.reachable() is True and up.calls == 1


def test_offline_mode_is_known_without_asking(monkeypatch):
    from huggingface_hub import constants, utils

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    asked = Session()
    monkeypatch.setattr(utils, "get_session", lambda: asked)
    assert hub.reachable() is False and asked.calls == 0


def test_an_unreachable_hub_refuses_a_dataset_at_once_without_asking_datasets(monkeypatch):
    import datasets

    monkeypatch.setattr(hub, "reachable", lambda timeout=None: False)
    monkeypatch.setattr(datasets, "load_dataset", lambda *a, **k: pytest.fail("datasets was asked"))
    started = time.monotonic()
    with pytest.raises(DataSourceError, match="Could not reach the Hugging Face Hub to load the dataset 'someone/x'"):
        data.load_data("someone/x")
    assert time.monotonic() - started < 2


def test_an_unreachable_hub_loads_models_from_the_cache_only(monkeypatch, tiny_model_dir):
    """A Hub id goes to from_pretrained with local_files_only (a cached model still loads; anything else fails at
    once); a local folder never asks the Hub."""
    from transformers import AutoTokenizer

    calls = []
    real = AutoTokenizer.from_pretrained

    def recording(location, *args, **kwargs):
        calls.append((str(location), kwargs.get("local_files_only", False)))
        return real(tiny_model_dir)

    monkeypatch.setattr(AutoTokenizer, "from_pretrained", recording)
    monkeypatch.setattr(hub, "reachable", lambda timeout=None: False)
    models.load_tokenizer("someone/cached-model")
    assert calls == [("someone/cached-model", True)]
    monkeypatch.setattr(hub, "reachable", lambda timeout=None: pytest.fail("a local folder asked the Hub"))
    models.load_tokenizer(str(tiny_model_dir))
    assert calls[-1] == (str(tiny_model_dir), False)


def test_one_rule_for_hub_ids_everywhere_by_huggingface_hubs_own_validator():
    """Models, datasets and the repos we push to are all owner/name ids checked by one function (hub.is_repo_id)."""
    from sft_space import access, data, hub, models, publish
    from sft_space.errors import UserError

    for good in ("HuggingFaceTB/SmolLM2-135M-Instruct", "alice/captain_byte.v2"):
        assert hub.is_repo_id(good)
    for bad in ("", "name-only", "a/b/c", "a--b/c", "a/..b", "alice/model.git", "alice/ spaced", "../etc", "a/" + "x" * 97):
        assert not hub.is_repo_id(bad), bad
        assert not data.is_hub_dataset(bad)
        with pytest.raises(UserError):
            publish.validate_repo_id(bad)
    assert models.resolve_model("alice/captain_byte.v2") == "alice/captain_byte.v2"
    with pytest.raises(Exception, match="neither a folder here nor a Hub model id"):
        models.resolve_model("alice/model.git")
    assert access.model_name("alice/captain_byte.v2", set(), access.AccessSettings()) == "alice/captain_byte.v2"


def test_one_rule_for_a_hub_id_rather_than_a_path_here(monkeypatch, tmp_path):
    """Whether a name is a Hub repository or a file or folder here is decided once (hub.is_hub_name): the data
    reader, the model card, the visitor's names and the model-size check agree, also about a path shaped like an
    id whose first folder exists (runs/<id>), which is never taken for an id."""
    from sft_space import access, card, catalog

    monkeypatch.chdir(tmp_path)
    (tmp_path / "runs").mkdir()
    asked = []
    monkeypatch.setattr(hub, "model_size", lambda model_id, timeout=None: asked.append(model_id))
    monkeypatch.setattr(hub, "reachable", lambda timeout=None: True)
    for local in ("runs/gone", "runs/x.y"):
        assert not hub.is_hub_name(local)
        assert not data.is_hub_dataset(local)
        assert card.hub_dataset(local) is None and card.hub_base_model(local) is None
        with pytest.raises(Exception, match="is not a Hub dataset id"):
            access.hub_id(local, "dataset")
        catalog.check_hub_model_fits(local)
    assert asked == []
    name = "HuggingFaceH4/no_robots"
    assert hub.is_hub_name(name) and data.is_hub_dataset(name) and card.hub_dataset(name) == name
    assert access.hub_id(name, "dataset") == name


def test_one_rule_says_whether_a_failed_call_reached_the_hub():
    """The data reader's "could not reach the Hub" and publishing's explanations read an error by the same rule,
    whichever client raised it, along the chain of errors it was raised from."""
    import socket

    import httpx
    import httpx2
    from huggingface_hub.errors import OfflineModeIsEnabled

    class Answered(Exception):
        response = type("Response", (), {"status_code": 404})()

    wrapped = RuntimeError("loading the dataset failed")
    wrapped.__cause__ = httpx2.ConnectError("[Errno -2] Name or service not known")
    for err, kind in [(httpx2.ConnectError("refused"), "network"), (httpx.ConnectError("refused"), "network"),
                      (socket.gaierror(-2, "Name or service not known"), "network"), (wrapped, "network"),
                      (httpx2.ReadTimeout("timed out"), "timeout"), (TimeoutError(), "timeout"),
                      (OfflineModeIsEnabled("offline mode is enabled"), "offline")]:
        assert hub.failure_kind(err) == (kind, None) and hub.unreachable(err), err
    assert hub.failure_kind(Answered()) == ("http", 404) and not hub.unreachable(Answered())
    assert hub.failure_kind(ValueError("bad")) == ("other", None) and not hub.unreachable(ValueError("bad"))
