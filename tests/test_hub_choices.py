"""The Data tab offers a Hub dataset's configs and splits: asked of the Hub (a stand-in here, at its boundary:
`HfApi.dataset_info` and the `datasets` listing functions), with a message and usable boxes when it does not
answer, and never for a path on this machine."""

import time
import types

import httpx2
import pytest
from huggingface_hub import HfApi
from huggingface_hub.errors import RepositoryNotFoundError

from sft_space.ui import data_tab

CONFIGS = {"chat": ["train", "test"], "pretraining": ["train_sft", "test_sft"]}


class StandInHub:
    """What the Hub would answer for one public dataset, recording what it was asked."""

    def __init__(self, monkeypatch, gated=False, configs=CONFIGS, listing_fails=None):
        self.asked = []
        self.gated = gated
        self.configs = configs
        self.listing_fails = listing_fails
        monkeypatch.setattr(HfApi, "dataset_info", self.dataset_info)
        monkeypatch.setattr("datasets.get_dataset_config_names", self.config_names)
        monkeypatch.setattr("datasets.get_dataset_split_names", self.split_names)

    def dataset_info(self, repo_id, **options):  # set on the class unbound: HfApi's self is not passed
        self.asked.append(("info", repo_id))
        assert options.get("timeout") and options["timeout"] <= 10, "the first request must give up quickly"
        return types.SimpleNamespace(id=repo_id, gated=self.gated)

    def config_names(self, path, **options):
        self.asked.append(("configs", path))
        if self.listing_fails:
            raise self.listing_fails
        return list(self.configs)

    def split_names(self, path, config_name=None, **options):
        self.asked.append(("splits", path, config_name))
        return list(self.configs[config_name])


def test_the_hubs_configs_and_splits_are_offered_as_choices(monkeypatch):
    hub = StandInHub(monkeypatch)
    config, split, note = data_tab.hub_choices(" someone/chats ", "", "train")
    assert config["choices"] == ["chat", "pretraining"] and config["value"] == "chat"
    assert split["choices"] == ["train", "test"] and split["value"] == "train"
    assert "someone/chats" in note and "pretraining" in note and "⚠️" not in note
    # Another config picked: its own splits, the split moved to one it has.
    config, split, note = data_tab.hub_choices("someone/chats", "pretraining", "train")
    assert config["value"] == "pretraining"
    assert split["choices"] == ["train_sft", "test_sft"] and split["value"] == "train_sft"
    assert ("splits", "someone/chats", "pretraining") in hub.asked
    # A split the visitor already chose, that the config has, stays chosen.
    _, split, _ = data_tab.hub_choices("someone/chats", "pretraining", "test_sft")
    assert split["value"] == "test_sft"


def test_offline_the_hub_is_not_waited_for_and_the_boxes_stay_usable(monkeypatch):
    """The tests run with HF_HUB_OFFLINE=1 (conftest): the real first request refuses at once, and `datasets`
    (which would retry for about 25 s) is never asked."""
    asked = []
    monkeypatch.setattr("datasets.get_dataset_config_names", lambda *args, **kwargs: asked.append(args))
    monkeypatch.setattr("datasets.get_dataset_split_names", lambda *args, **kwargs: asked.append(args))
    started = time.monotonic()
    config, split, note = data_tab.hub_choices("someone/chats", "my-config", "validation")
    assert time.monotonic() - started < 5 and asked == []
    assert note.startswith("⚠️") and "did not answer" in note and "Type the config and split yourself" in note
    # The values typed stay (no "value" in the update), stale choices go.
    assert "value" not in config and "value" not in split
    assert config["choices"] == [] and split["choices"] == []


def not_found(*args, **kwargs):
    request = httpx2.Request("GET", "https://huggingface.co/api/datasets/someone/nothing")
    raise RepositoryNotFoundError("404 Client Error: Repository Not Found", response=httpx2.Response(404, request=request))


def no_network(*args, **kwargs):
    raise httpx2.ConnectError("[Errno -2] Name or service not known")


@pytest.mark.parametrize("answer, says", [(not_found, "has no dataset 'someone/nothing'"),
                                          (no_network, "did not answer")])
def test_an_unknown_dataset_or_no_network_is_a_message(monkeypatch, answer, says):
    hub = StandInHub(monkeypatch)
    monkeypatch.setattr(HfApi, "dataset_info", answer)
    config, split, note = data_tab.hub_choices("someone/nothing", "", "train")
    assert note.startswith("⚠️") and says in note
    assert "value" not in config and "value" not in split
    assert hub.asked == []


def test_a_gated_dataset_says_how_to_get_in(monkeypatch):
    from datasets.exceptions import DatasetNotFoundError

    StandInHub(monkeypatch, gated="manual", listing_fails=DatasetNotFoundError("someone/locked is a gated dataset"))
    _, _, note = data_tab.hub_choices("someone/locked", "", "train")
    assert "gated" in note and "accept its terms" in note and "huggingface.co/datasets/someone/locked" in note


@pytest.mark.parametrize("value", ["runs/secret-run", "./runs", "../etc/passwd", "/etc/passwd", "runs"])
def test_a_path_is_refused_before_anything_is_listed(monkeypatch, tmp_path, value):
    """Shaped like owner/name or not, a path on this machine never reaches `datasets`, which would list a local
    folder of that name before asking the Hub."""
    (tmp_path / "runs" / "secret-run").mkdir(parents=True)
    monkeypatch.chdir(tmp_path)
    hub = StandInHub(monkeypatch)
    config, split, note = data_tab.hub_choices(value, "", "train")
    assert hub.asked == []
    assert note.startswith("⚠️") and "is not a Hub dataset id" in note
    assert config == {"__type__": "update"} and split == {"__type__": "update"}
    # With local access on, the box also takes paths: nothing is listed for one, and nothing is said.
    assert data_tab.hub_choices(value, "", "train", local_paths=True)[2] == ""
    assert hub.asked == []


def test_the_lookup_is_a_page_event_and_no_api(monkeypatch, tmp_path, tiny_model_dir):
    from sft_space import jobs
    from sft_space.ui import PUBLIC_API, build_app

    monkeypatch.setenv("SFT_SPACE_RUNS", str(tmp_path))
    app = build_app(jobs.JobManager(), default_model=str(tiny_model_dir))
    [lookup] = [f for f in app.fns.values() if f.api_name == "hub_choices"]
    assert lookup.api_visibility == "private" and "hub_choices" not in PUBLIC_API
    assert {getattr(block, "elem_id", None) for block in lookup.outputs} == {"hub-config", "hub-split", "hub-note"}
    hub = StandInHub(monkeypatch)
    config, split, note = lookup.fn("someone/chats", "", "train")
    assert config["choices"] == ["chat", "pretraining"] and hub.asked
