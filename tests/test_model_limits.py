"""A Hub model a visitor names is one the operator allows, and its size is read from the Hub's metadata and
judged against this machine before anything of it is downloaded (for training and checks at the edge, for chat
where the chat model loads). The Hub is a stand-in here, at its boundary: `HfApi.model_info`."""

import inspect

import gradio as gr
import httpx2
import pytest
from huggingface_hub import HfApi
from huggingface_hub.errors import RepositoryNotFoundError
from huggingface_hub.hf_api import ModelInfo

from sft_space import access, catalog, hub
from sft_space.chat import ChatModelCache
from sft_space.errors import UserError
from sft_space.hardware import Hardware
from sft_space.settings import AccessSettings
from sft_space.ui import data_tab
from sft_space.ui.common import Gate

CPU_16GB = Hardware("cpu", "CPU", 16.0, None, 2)
L4 = Hardware("cuda", "NVIDIA L4", 22.0, (8, 9))
# Parameter counts as the Hub gives them (safetensors.total).
LLAMA_70B = ("meta-llama/Llama-3.1-70B-Instruct", 70_553_706_496)
KIMI_1T = ("moonshotai/Kimi-K2-Instruct", 1_026_408_232_448)
SMOLLM_135M = ("HuggingFaceTB/SmolLM2-135M-Instruct", 134_515_008)
QWEN_14B = ("Qwen/Qwen2.5-14B-Instruct", 14_770_033_664)


class StandInHub:
    """What the Hub's model API answers for a few models, recording what it was asked; nothing else of the Hub
    (a download) may be asked."""

    def __init__(self, monkeypatch, models=(LLAMA_70B, KIMI_1T, SMOLLM_135M, QWEN_14B), without_safetensors=()):
        hub.forget()
        self.asked = []
        self.models = dict(models)
        self.without_safetensors = set(without_safetensors)
        monkeypatch.setattr(HfApi, "model_info", self.model_info)
        for name in ("hf_hub_download", "snapshot_download"):
            monkeypatch.setattr(f"huggingface_hub.{name}", self.download)

    def model_info(self, repo_id, *, revision=None, timeout=None, securityStatus=None, files_metadata=False,
                   expand=None, token=None):
        self.asked.append(repo_id)
        assert timeout and timeout <= 10, "a page waits for the answer: it must give up quickly"
        if repo_id == "someone/slow":
            raise httpx2.ReadTimeout("The read operation timed out")
        if repo_id in self.without_safetensors:
            return ModelInfo(id=repo_id, siblings=[{"rfilename": "pytorch_model.bin", "size": 10**9}])
        if repo_id not in self.models:
            url = f"https://huggingface.co/api/models/{repo_id}"
            raise RepositoryNotFoundError(f"404 Client Error: Repository Not Found for url: {url}",
                                          response=httpx2.Response(404, request=httpx2.Request("GET", url)))
        total = self.models[repo_id]
        return ModelInfo(id=repo_id, safetensors={"parameters": {"BF16": total}, "total": total},
                         siblings=[{"rfilename": "model.safetensors", "size": 2 * total}])

    def download(self, *args, **kwargs):
        raise AssertionError("nothing may be downloaded before the size is judged")


def test_the_stand_in_takes_what_the_real_model_info_takes():
    def shape(function):
        return [(p.name, p.kind, p.default) for p in inspect.signature(function).parameters.values()]

    assert shape(StandInHub.model_info) == shape(HfApi.model_info)


def test_a_70b_model_is_refused_with_its_size_and_what_fits_before_any_download(monkeypatch, hub_online):
    stand_in = StandInHub(monkeypatch)
    with pytest.raises(UserError) as refusal:
        access.model_name(LLAMA_70B[0], set(), AccessSettings(), hardware=CPU_16GB)
    message = str(refusal.value)
    assert "meta-llama/Llama-3.1-70B-Instruct has 70.6B parameters" in message
    assert "CPU, 2 cores, 16 GiB memory" in message and "up to about 2.9B parameters" in message
    assert "such as HuggingFaceTB/SmolLM2-1.7B-Instruct" in message
    assert stand_in.asked == [LLAMA_70B[0]]
    # A small one passes, and a size is asked once however many events name it.
    for _ in range(3):
        assert access.model_name(SMOLLM_135M[0], set(), AccessSettings(), hardware=CPU_16GB) == SMOLLM_135M[0]
    assert stand_in.asked == [LLAMA_70B[0], SMOLLM_135M[0]]


def test_fit_depends_on_the_use_a_gpu_trains_in_4_bit_but_chats_in_16(monkeypatch, hub_online):
    StandInHub(monkeypatch)
    catalog.check_hub_model_fits(QWEN_14B[0], catalog.TRAIN, L4)
    with pytest.raises(UserError, match=r"to chat with it needs about 33 GiB.*L4.*can chat with models of up to "
                                        r"about 8.1B parameters"):
        catalog.check_hub_model_fits(QWEN_14B[0], catalog.CHAT, L4)


def test_the_data_tabs_check_refuses_a_model_no_machine_of_ours_holds(monkeypatch, hub_online, tmp_path):
    StandInHub(monkeypatch)
    gate = Gate(str(tmp_path / "runs"), access.Identity.for_runs(tmp_path / "runs"))
    with pytest.raises(gr.Error, match="moonshotai/Kimi-K2-Instruct has 1026.4B parameters"):
        data_tab.check_source(gate, "alice", None, "", True, KIMI_1T[0], "", "", "train", 2048)


def test_chat_refuses_a_model_too_large_before_loading_it(monkeypatch, hub_online):
    StandInHub(monkeypatch)
    with pytest.raises(UserError, match="moonshotai/Kimi-K2-Instruct has 1026.4B parameters: to chat with it"):
        ChatModelCache().get(None, KIMI_1T[0])


def test_unknown_unsized_or_unanswered_models_are_refused_with_what_to_do(monkeypatch, hub_online):
    StandInHub(monkeypatch, without_safetensors=["someone/pickled"])
    with pytest.raises(UserError, match="was not found on the Hugging Face Hub; check the spelling"):
        access.model_name("someone/missing", set(), AccessSettings(), hardware=CPU_16GB)
    with pytest.raises(UserError, match="has no safetensors weights on the Hub"):
        access.model_name("someone/pickled", set(), AccessSettings(), hardware=CPU_16GB)
    with pytest.raises(UserError, match=r"Could not read the size of 'someone/slow' from the Hugging Face Hub \(The "
                                        r"read operation timed out\); try again in a moment"):
        access.model_name("someone/slow", set(), AccessSettings(), hardware=CPU_16GB)


def test_the_operator_chooses_which_hub_models_visitors_may_name(monkeypatch, hub_online):
    stand_in = StandInHub(monkeypatch)
    offered = {"HuggingFaceTB/SmolLM2-360M-Instruct"}
    monkeypatch.setenv("SFT_SPACE_HUB_MODELS", "none")
    settings = access.access_settings()
    assert access.model_name("HuggingFaceTB/SmolLM2-360M-Instruct", offered, settings) in offered
    with pytest.raises(UserError, match="the models it offers only; pick one from the list"):
        access.model_name(SMOLLM_135M[0], offered, settings)
    monkeypatch.setenv("SFT_SPACE_HUB_MODELS", f"{SMOLLM_135M[0].lower()}, Qwen/Qwen2.5-0.5B-Instruct")
    settings = access.access_settings()
    assert access.model_name(SMOLLM_135M[0], offered, settings, hardware=CPU_16GB) == SMOLLM_135M[0]
    with pytest.raises(UserError, match="nor the Hub models it allows"):
        access.model_name(LLAMA_70B[0], offered, settings)
    assert LLAMA_70B[0] not in stand_in.asked  # refused before the Hub is asked


def test_offline_a_hub_model_is_not_sized_and_loads_as_before(monkeypatch):
    stand_in = StandInHub(monkeypatch)
    monkeypatch.setattr(hub, "reachable", lambda timeout=None: False)
    assert access.model_name(LLAMA_70B[0], set(), AccessSettings(), hardware=CPU_16GB) == LLAMA_70B[0]
    assert stand_in.asked == []


@pytest.mark.slow
def test_the_train_tabs_estimate_lays_out_a_visitors_model_config_in_a_worker(tmp_path, tiny_model_dir):
    """A config claiming two million layers would hold the web server for minutes laid out on the meta device: the
    estimate reads it in a worker under the operator's limits, and the page says why there is no estimate."""
    import json
    import time

    from sft_space import checks, isolation, models
    from sft_space.settings import run_settings
    from sft_space.ui import train_tab

    folder = tmp_path / "layers"
    folder.mkdir()
    config = json.loads((tiny_model_dir / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, "num_hidden_layers": 2_000_000}))
    limits = isolation.Limits(memory_gb=0.5, seconds=3, at_once=2, wait_seconds=1)
    report = checks.Report("data.jsonl", "openai", 10, 2048, token_counts=[(2, 80, 40)] * 10)
    settings = run_settings("quick", model=str(folder))
    started = time.monotonic()
    text = train_tab.estimate_markdown(CPU_16GB, settings, report, limits)
    assert time.monotonic() - started < 12
    assert "No estimate of the run's length: Reading this model's size from its config" in text
    assert isolation.running.count == 0
    # The offered models are read from the catalogue, with no worker.
    offered = run_settings("quick", model=models.EMBEDDED_MODEL)
    assert "This run: about" in train_tab.estimate_markdown(CPU_16GB, offered, report, limits)
    # The cost of the same run on Hugging Face Jobs reads it the same way.
    from sft_space import hub_jobs

    with pytest.raises(UserError, match="Reading this model's size from its config"):
        hub_jobs.cost_line(tmp_path / "runs", None, settings, "t4-small", report.stats(),
                           {"SFT_SPACE_JOBS_API": "local"}, limits)
    assert isolation.running.count == 0
