"""Training on Hugging Face Jobs, through the local stand-in of the Jobs API (no Hub, no GPU): the plan of a job,
its cost before Start, the errors people read, Stop and cancel, and the token written nowhere.

The stand-in (`jobs_stand_in.LocalJobsApi`) has huggingface_hub's own method names and signatures (checked here against
the installed HfApi) and runs a job's real command as a process, each volume a folder.
"""

import inspect
import json
import os
import re
import signal
import subprocess
import sys
import time
import warnings
from pathlib import Path

import httpx2
import pytest
from builders import distinct_chats
from huggingface_hub import HfApi, JobHardwareInfo
from huggingface_hub.errors import HfHubHTTPError
from huggingface_hub.utils import hf_raise_for_status

from sft_space import cli, hub_jobs, jobs_stand_in, runs
from sft_space.errors import UserError
from sft_space.settings import JobsSettings, run_settings

TOKEN = "hf_PlantedJobsToken0123456789abcdefXYZ"
STATS = {"total_tokens": 600_000, "tokens_per_example": {"max": 512}, "examples": 2000}


@pytest.fixture
def stand_in(tmp_path):
    return jobs_stand_in.LocalJobsApi(tmp_path / "hub")


@pytest.fixture
def flavors(stand_in):
    return hub_jobs.list_flavors(stand_in, TOKEN)


def hub_answer(status, message="refused"):
    """The exception huggingface_hub raises for a Hub response with this status."""
    response = httpx2.Response(status, json={"error": message},
                               request=httpx2.Request("POST", "https://huggingface.co/api/jobs/alice"))
    try:
        hf_raise_for_status(response)
    except HfHubHTTPError as err:
        return err
    raise AssertionError(f"{status} raised nothing")


# ---------------------------------------------------------------------------------------------- the stand-in


@pytest.mark.parametrize("name", jobs_stand_in.STAND_IN_METHODS)
def test_the_stand_in_has_huggingface_hubs_method_names_and_signatures(name):
    """An upstream rename or a changed parameter fails here, not on the Hub."""
    def shape(method):
        return [(p.name, p.kind, p.default) for p in inspect.signature(method).parameters.values()]

    assert shape(getattr(jobs_stand_in.LocalJobsApi, name)) == shape(getattr(HfApi, name))


def test_the_stand_in_is_ignored_on_a_space():
    assert hub_jobs.jobs_settings({"SFT_SPACE_JOBS_API": "local"}).api == "local"
    assert hub_jobs.jobs_settings({"SFT_SPACE_JOBS_API": "local", "SPACE_ID": "alice/sft"}).api == "hub"
    with pytest.raises(UserError, match="SFT_SPACE_JOBS_API"):
        hub_jobs.jobs_settings({"SFT_SPACE_JOBS_API": "cloud"})


def test_cancel_sends_sigterm_then_sigkill_after_the_grace(stand_in, tmp_path):
    """The stand-in ends a cancelled job as container platforms do: a process that saves on SIGTERM ends by itself,
    one that ignores it is killed after the grace."""
    saved = tmp_path / "saved"
    polite = stand_in.run_job(image="x", command=["sh", "-c", f"trap 'touch {saved}; exit 143' TERM; "
                                                               "while :; do sleep 0.1; done"])
    stand_in.cancel_grace_seconds = 0.5
    stubborn = stand_in.run_job(image="x", command=["sh", "-c", "trap '' TERM; while :; do sleep 0.1; done"])
    time.sleep(0.3)
    stand_in.cancel_job(job_id=polite.id)
    stand_in.cancel_job(job_id=stubborn.id)
    assert stand_in.wait_for_job(polite.id, timeout=5).status.stage == "CANCELED"
    assert saved.exists()
    assert stand_in.wait_for_job(stubborn.id, timeout=5).status.stage == "CANCELED"


def test_a_job_maps_its_mount_paths_to_folders_and_streams_its_output(stand_in):
    from huggingface_hub import Volume

    stand_in.create_bucket("local-user/b", exist_ok=True)
    info = stand_in.run_job(image="x", command=["sh", "-c", 'echo one; echo two > "$0/out.txt"; echo three', "/out"],
                            volumes=[Volume(type="bucket", source="local-user/b", mount_path="/out")])
    assert list(stand_in.fetch_job_logs(job_id=info.id, follow=True)) == ["one", "three"]
    assert stand_in.inspect_job(job_id=info.id).status.stage == "COMPLETED"
    assert (stand_in.root / "buckets" / "local-user" / "b" / "out.txt").read_text() == "two\n"


# ---------------------------------------------------------------------------------------------- price and cost


def test_a_flavor_is_read_from_the_hubs_hardware_list():
    info = JobHardwareInfo(name="l4x4", prettyName="4x Nvidia L4", cpu="48 vCPU", ram="186 GB",
                           accelerator={"type": "gpu", "model": "L4", "quantity": "4", "vram": "96 GB",
                                        "manufacturer": "Nvidia"},
                           unitCostMicroUSD=63333, unitCostUSD=0.063333, unitLabel="minute")
    flavor = hub_jobs.flavor_of(info)
    assert (flavor.gpu, flavor.gpus, round(flavor.price_per_hour_usd, 2)) == ("L4", 4, 3.8)
    hardware = flavor.hardware()
    assert hardware.kind == "cuda" and hardware.device_count == 4 and hardware.supports_bf16
    assert 22 < hardware.memory_gib < 23  # 24 GB each, in GiB


def test_the_cost_before_start_is_the_estimate_on_that_gpu_plus_start_up_at_its_price(flavors):
    settings = run_settings("quick")
    jobs = JobsSettings()
    t4, a100 = (hub_jobs.estimate_cost(settings, flavors[name], STATS, jobs) for name in ("t4-small", "a100-large"))
    assert t4.training_seconds > a100.training_seconds > 0  # the A100 is faster
    assert t4.cost_usd == pytest.approx((t4.training_seconds + 360) / 60 * 0.40 / 60)
    # The timeout: start-up plus twice the training (at least the training plus 15 minutes), in whole minutes.
    expected = 360 + max(2 * t4.training_seconds, t4.training_seconds + 900)
    assert expected <= t4.timeout_seconds < expected + 60
    text = t4.describe()
    assert "t4-small" in text and f"${t4.cost_usd:.2f}" in text and f"at most ${t4.most_usd:.2f}" in text
    chosen = hub_jobs.estimate_cost(settings, flavors["t4-small"], STATS, jobs, timeout=hub_jobs.parse_timeout("2h"))
    assert chosen.timeout_seconds == 7200


@pytest.mark.parametrize("text, seconds", [("5400", 5400), ("90m", 5400), ("2h", 7200), ("1d", 86400)])
def test_a_timeout_is_written_as_people_write_it(text, seconds):
    assert hub_jobs.parse_timeout(text) == seconds


@pytest.mark.parametrize("text", ["soon", "10", "-5m", "nanm"])
def test_a_timeout_that_is_no_time_is_refused(text):
    with pytest.raises(UserError, match="at least a minute"):
        hub_jobs.parse_timeout(text)


def test_the_final_cost_is_the_billed_time_at_the_flavors_price(stand_in, tmp_path):
    info = stand_in.run_job(image="x", command=["sh", "-c", "sleep 1.2"])
    folder = runs.RunFolder.create(tmp_path / "runs", "billed")
    folder.write({"run_id": "billed", "status": "running", "settings": {}, "owner": None,
                  "job": {"id": info.id, "namespace": "local-user", "bucket": "local-user/sft-space-runs",
                          "flavor": "t4-small", "price_per_hour_usd": 0.40}})
    record = hub_jobs.JobRun(stand_in, folder).follow(poll_seconds=0.2)
    job = record["job"]
    assert job["stage"] == "COMPLETED" and 1 <= job["billed_seconds"] <= 10
    assert job["cost_usd"] == pytest.approx(job["billed_seconds"] / 3600 * 0.40, abs=1e-6)
    assert record["cost_usd"] == job["cost_usd"] and record["jobs"] == [job]


# ---------------------------------------------------------------------------------------------- errors


def test_an_unknown_flavor_or_one_without_a_gpu_is_refused_naming_the_gpu_flavors(flavors):
    with pytest.raises(UserError, match="'t4-smal' is not a Hugging Face Jobs hardware flavor") as caught:
        hub_jobs.choose_flavor(flavors, "t4-smal")
    assert "t4-small (T4, $0.40/hour)" in str(caught.value) and "cpu-basic" not in str(caught.value)
    with pytest.raises(UserError, match="cpu-basic has no GPU"):
        hub_jobs.choose_flavor(flavors, "cpu-basic")


@pytest.mark.parametrize("status, words", [
    (402, "payment method"), (403, "lacks the 'jobs' permission"), (401, "invalid or expired"),
    (503, "problem of its own")])
def test_the_hubs_answers_are_said_for_people(status, words):
    message = str(hub_jobs.explain_error(hub_answer(status), "start a job on t4-small", "t4-small"))
    assert words in message and "Traceback" not in message


def test_a_flavor_the_hub_cannot_give_now_is_said_with_what_to_do():
    err = hub_answer(400, "Flavor h200x8 is not available at the moment")
    message = str(hub_jobs.explain_error(err, "start a job on h200x8", "h200x8"))
    assert "refused the hardware h200x8" in message and "choose another flavor" in message


def test_an_unreachable_hub_is_said_as_such():
    err = httpx2.ConnectError("[Errno -2] Name or service not known")
    assert "seems to be offline" in str(hub_jobs.explain_error(err, "start a job"))


def test_a_visitor_must_have_granted_the_jobs_scope():
    hub_jobs.refuse_without_scope("openid profile write-repos jobs")
    for scope in (None, "openid profile write-repos", "jobsx"):
        with pytest.raises(UserError, match="allowing 'jobs'"):
            hub_jobs.refuse_without_scope(scope)


def test_on_a_space_the_visitor_pays_with_their_own_sign_in_and_its_jobs_scope():
    from types import SimpleNamespace

    # Even where the operator allows runs billed to their own token, a Space never uses it.
    space = {"SPACE_ID": "acme/sft-space", "SFT_SPACE_JOBS_OPERATOR_PAYS": "1"}

    def operators_own():
        return "hf_operators_own"

    signed_in = SimpleNamespace(token=TOKEN, scope="openid profile jobs")
    assert hub_jobs.page_token(space, signed_in, operators_own) == TOKEN
    with pytest.raises(UserError, match="Sign in with Hugging Face"):
        hub_jobs.page_token(space, None, operators_own)
    with pytest.raises(UserError, match="did not grant the 'jobs' scope.*sign in with Hugging Face again"):
        hub_jobs.page_token(space, SimpleNamespace(token=TOKEN, scope="openid profile"), operators_own)
    # A token a client puts in its request's body reaches a handler with no scope (Gradio's
    # route_utils.oauth_token_from_body): refused like a sign-in without 'jobs'.
    with pytest.raises(UserError, match="'jobs'"):
        hub_jobs.page_token(space, SimpleNamespace(token=TOKEN, scope=""), operators_own)


def test_off_a_space_the_page_starts_jobs_on_the_operators_token_only_when_the_operator_allows_it():
    """Off a Space anyone who reaches the app may train by default, and no visitor has a sign-in of their own:
    without the operator's SFT_SPACE_JOBS_OPERATOR_PAYS=1 a Jobs run from the page (billed to the operator's
    token) is refused with what the operator sets, and the operator's token is not even read."""
    from types import SimpleNamespace

    read = []

    def operators_own():
        read.append(True)
        return "hf_operators_own"

    # Gradio's sign-in off a Space stands in for the machine's own login: it is not a visitor's account.
    mocked_sign_in = SimpleNamespace(token="mock-oauth-token-for-local-dev", scope="openid profile jobs")
    for environ in ({}, {"SFT_SPACE_JOBS_API": "local"}, {"SFT_SPACE_JOBS_OPERATOR_PAYS": "0"}):
        for oauth in (None, mocked_sign_in):
            with pytest.raises(UserError, match=r"billed to the operator's .*\"operator pays\".*command line"):
                hub_jobs.page_token(environ, oauth, operators_own)
    assert read == []
    allowed = {"SFT_SPACE_JOBS_OPERATOR_PAYS": "1"}
    assert hub_jobs.page_token(allowed, mocked_sign_in, operators_own) == "hf_operators_own"
    with pytest.raises(UserError, match="HF_TOKEN"):
        hub_jobs.page_token(allowed, None, lambda: None)
    assert hub_jobs.page_token({**allowed, "SFT_SPACE_JOBS_API": "local"}, None, lambda: None) is None  # needs none


def test_off_a_space_the_train_tab_says_jobs_is_off_until_the_operator_allows_it(monkeypatch, tmp_path,
                                                                                 tiny_model_dir):
    """Choosing Jobs says why it is unavailable and what the operator sets, as a message with Start disabled; Start
    called as the endpoint it is (any client can) is refused the same, and starts nothing. Once the operator allows
    it, the same choice offers Start."""
    from test_train_tab import CODE_WORDS

    from sft_space import jobs as local_jobs
    from sft_space.ui import build_app, train_tab

    monkeypatch.setenv("SFT_SPACE_RUNS", str(tmp_path / "runs"))
    monkeypatch.setenv("SFT_SPACE_JOBS_API", "local")
    monkeypatch.delenv("SFT_SPACE_JOBS_OPERATOR_PAYS", raising=False)
    app = build_app(local_jobs.JobManager(), default_model=str(tiny_model_dir))
    handlers = {f.fn.__name__: f.fn for f in app.fns.values() if f.fn is not None}
    token = handlers["on_load"]("")
    group, _, notice_row, notice, start, resume, *local = handlers["on_where"](None, None, train_tab.ON_JOBS)
    assert group["visible"] and notice_row["visible"] and not start["interactive"] and not resume["interactive"]
    assert notice.startswith("**Not available** · Hugging Face Jobs is off in this app")
    # In the page's words: the setting by its name, the variable left to the README's section.
    assert "the Jobs setting \"operator pays\"" in notice.replace("\\", "") and not CODE_WORDS.search(notice)
    form = (None, None, False, str(tiny_model_dir), "quick", "t4-small",
            *(spec.default for spec in train_tab.advanced_fields()))
    with pytest.warns(UserWarning, match="operator pays"):
        status = handlers["on_start_jobs"](None, None, token, *form)
    assert "**Refused** · Hugging Face Jobs is off in this app" in status
    assert not (tmp_path / "runs" / ".jobs-launch").exists()
    # Back on this machine's own run, nothing of Jobs is said.
    assert not handlers["on_where"](None, None, train_tab.THIS_SPACE)[2]["visible"]

    monkeypatch.setenv("SFT_SPACE_JOBS_OPERATOR_PAYS", "1")
    _, _, notice_row, notice, start, resume, *_ = handlers["on_where"](None, None, train_tab.ON_JOBS)
    assert not notice_row["visible"] and notice == "" and start["interactive"] and resume["interactive"]


def test_out_of_memory_suggests_the_next_flavor_up(flavors):
    assert hub_jobs.next_flavor_up(flavors, "t4-small").name == "l4x1"
    assert hub_jobs.next_flavor_up(flavors, "a100-large").name == "rtx-pro-6000"  # 96 GB, cheaper than an H200
    assert "next flavor up, l4x1" in hub_jobs.out_of_memory_message("t4-small", flavors)


def test_a_job_that_ends_before_its_run_says_why(stand_in, tmp_path):
    for command, status, words in ((["sh", "-c", "exit 3"], "failed", "exit code: 3"),
                                   (["sh", "-c", "kill -9 $$"], "failed", "ran out of memory on t4-small")):
        info = stand_in.run_job(image="x", command=command)
        folder = runs.RunFolder.create(tmp_path / "runs", f"r{info.id}")
        folder.write({"run_id": folder.run_id, "status": "running", "settings": {}, "owner": None,
                      "job": {"id": info.id, "namespace": "local-user", "bucket": "local-user/sft-space-runs",
                              "flavor": "t4-small", "price_per_hour_usd": 0.4}})
        record = hub_jobs.JobRun(stand_in, folder).follow(poll_seconds=0.1)
        assert record["status"] == status and words in record["error"], record["error"]


def test_a_402_when_the_job_starts_refuses_the_run_and_writes_no_run(tmp_path, tiny_model_dir, write_jsonl):
    class NoPaymentMethod(jobs_stand_in.LocalJobsApi):
        def run_job(self, **kwargs):
            raise hub_answer(402, "Payment required")

    settings = run_settings("quick", source=str(write_jsonl(distinct_chats(12))), model=str(tiny_model_dir))
    with pytest.raises(UserError, match="payment method"):
        hub_jobs.start_run(NoPaymentMethod(tmp_path / "hub"), TOKEN, settings, "t4-small", tmp_path / "runs",
                           JobsSettings())
    assert not (tmp_path / "runs").exists()


def test_a_run_that_ran_out_of_gpu_memory_in_its_job_names_the_next_flavor_up(stand_in, tmp_path):
    """The job's `train` caught the out-of-memory error and recorded it in the bucket: the run's error says which
    flavor has more memory per GPU, as for a job the system killed."""
    from huggingface_hub import Volume

    record = json.dumps({"run_id": "oom", "status": "failed", "error": "CUDA out of memory. Tried to allocate 2 GiB"})
    info = stand_in.run_job(image="x", command=["sh", "-c", f"mkdir -p \"$0/oom\" && echo '{record}' > "
                                                            "\"$0/oom/run.json\"; exit 1", "/runs"],
                            volumes=[Volume(type="bucket", source="local-user/sft-space-runs", mount_path="/runs")])
    folder = job_folder(tmp_path, "oom", info.id)
    ended = hub_jobs.JobRun(stand_in, folder).follow(poll_seconds=0.1)
    assert ended["status"] == "failed" and "ran out of memory on t4-small" in ended["error"]
    assert "next flavor up, l4x1" in ended["error"] and "CUDA" not in ended["error"]


def test_a_run_its_job_refused_before_it_began_says_the_jobs_own_reason(stand_in, tmp_path):
    """A job whose `train` ended before its run folder existed (its data or settings refused there) leaves no
    record in the bucket: the reason comes from its log's failed event."""
    failed = json.dumps({"event": "failed", "time": 1.0, "reason": "The model needs more memory than the GPU has."})
    info = stand_in.run_job(image="x", command=["sh", "-c", f"echo 'Installing…'; echo '@sft-space-event {failed}'; "
                                                            "exit 1"])
    ended = hub_jobs.JobRun(stand_in, job_folder(tmp_path, "refused", info.id)).follow(poll_seconds=0.1)
    assert (ended["status"], ended["error"]) == ("failed", "The model needs more memory than the GPU has.")


def test_an_unreachable_hub_refuses_the_run_before_anything_is_started_or_written(tmp_path):
    class Offline(jobs_stand_in.LocalJobsApi):
        def list_jobs_hardware(self, token=None):
            raise httpx2.ConnectError("[Errno -3] Temporary failure in name resolution")

    with pytest.raises(UserError, match="seems to be offline"):
        hub_jobs.start_run(Offline(tmp_path / "hub"), TOKEN, run_settings("quick", source="x.jsonl"), "t4-small",
                           tmp_path / "runs", JobsSettings())
    assert not (tmp_path / "runs").exists() and not (tmp_path / "hub").exists()


def test_when_one_machines_job_cannot_start_the_jobs_started_are_cancelled_and_the_flavor_is_named(
        tmp_path, tiny_model_dir, write_jsonl):
    """A run on several machines bills for none when one of its jobs is refused (here its flavor, unavailable)."""
    class SecondRefused(jobs_stand_in.LocalJobsApi):
        def run_job(self, **kwargs):
            if kwargs["labels"].get("sft-space-node") == "1":
                raise hub_answer(400, "Flavor h200x8 is not available at the moment")
            started.append(super().run_job(**{**kwargs, "command": ["sh", "-c", "while :; do sleep 0.1; done"]}))
            return started[-1]

    started = []
    api = SecondRefused(tmp_path / "hub")
    settings = run_settings("quick", source=str(write_jsonl(distinct_chats(12))), model=str(tiny_model_dir))
    with pytest.raises(UserError, match="refused the hardware h200x8.*choose another flavor"):
        hub_jobs.start_run(api, TOKEN, settings, "h200x8", tmp_path / "runs", JobsSettings(), nodes=2)
    assert len(started) == 1 and api.wait_for_job(started[0].id, timeout=5).status.stage == "CANCELED"
    assert not (tmp_path / "runs").exists()


# ---------------------------------------------------------------------------------------------- the plan


def test_the_plan_ships_the_checked_examples_the_package_and_the_model_and_the_token_only_as_a_secret(
        stand_in, tmp_path, tiny_model_dir):
    from sft_space.formats import Example

    settings = run_settings("quick", source="/home/alice/raw private file.csv", columns="prompt=q,response=a",
                            model=str(tiny_model_dir))
    examples = [Example(row=3, format="openai", messages=[{"role": "user", "content": "Hi"},
                                                          {"role": "assistant", "content": "Ahoy"}])]
    plan = hub_jobs.plan_job(stand_in, TOKEN, settings, examples, "run-1", "t4-small", 3600, JobsSettings())
    assert plan.secrets == {"HF_TOKEN": TOKEN}
    assert TOKEN not in json.dumps([plan.command, plan.env, plan.to_record(), plan.labels]) + repr(plan)
    mounts = {v.mount_path: v for v in plan.volumes}
    assert mounts["/runs"].source == "local-user/sft-space-runs" and mounts["/runs"].read_only is False
    assert {"/code", "/data", "/model"} <= set(mounts) and mounts["/data"].read_only
    data = stand_in.root / "buckets" / mounts["/data"].source / mounts["/data"].path
    assert [json.loads(line) for line in (data / "examples.jsonl").read_text().splitlines()] == [
        {"messages": examples[0].messages}]
    shipped = json.loads((data / "settings.json").read_text())
    assert shipped["columns"] == "" and not {"source", "model", "output_dir"} & set(shipped)
    assert plan.command[5:10] == ["/data/examples.jsonl", "--config", "/data/settings.json", "--model", "/model"]
    code = stand_in.root / "buckets" / mounts["/code"].source / mounts["/code"].path
    assert (code / "requirements.txt").is_file() and (code / "sft_space" / "hub_jobs.py").is_file()
    assert not list(code.rglob("__pycache__"))
    assert plan.command[-6:] == ["--output-dir", "/runs", "--run-name", "run-1", "--stop-file",
                                 "/runs/run-1/stop-requested"]


# ---------------------------------------------------------------------------------------------- stop and resume


def job_folder(tmp_path, run_id, job_id, flavor="t4-small"):
    """A run folder whose run.json names a job of the stand-in's, as start_run writes it."""
    folder = runs.RunFolder.create(tmp_path / "runs", run_id)
    folder.write({"run_id": run_id, "status": "running", "settings": {}, "owner": None,
                  "job": {"id": job_id, "namespace": "local-user", "bucket": "local-user/sft-space-runs",
                          "flavor": flavor, "price_per_hour_usd": 0.4}})
    return folder


def test_a_job_that_does_not_stop_when_asked_is_cancelled_after_the_grace_and_a_second_stop_cancels_at_once(
        stand_in, tmp_path):
    """Stop asks first (the stop request in the run's bucket folder) and cancels the job only when it is still
    running after the grace; a second Stop cancels at once. The run is then stopped, from its last checkpoint."""
    for second_stop, grace in ((False, 1.0), (True, 600.0)):
        info = stand_in.run_job(image="x", command=["sh", "-c", "while :; do sleep 0.1; done"])
        folder = job_folder(tmp_path, f"deaf-{second_stop}", info.id)
        run = hub_jobs.JobRun(stand_in, folder)
        assert run.request_stop() is False
        request = stand_in.root / "buckets" / "local-user" / "sft-space-runs" / folder.run_id / hub_jobs.STOP_FILE
        assert request.is_file() and "stop_requested_at" in folder.read()["job"]
        assert stand_in.inspect_job(job_id=info.id).status.stage == "RUNNING"  # asked, not cancelled
        if second_stop:
            assert run.request_stop() is True
        started = time.monotonic()
        record = run.follow(settings=JobsSettings(stop_grace_seconds=grace), poll_seconds=0.1)
        waited = time.monotonic() - started
        assert record["job"]["stage"] == "CANCELED" and record["status"] == "stopped", record
        assert "resume it from its last checkpoint" in record["error"]
        assert waited < 5 if second_stop else 1.0 <= waited < 10, waited


class StandInJobRun:
    """What cmd_train_on_jobs uses of a JobRun, recording the calls; its follow presses Ctrl+C twice."""

    def __init__(self, folder):
        self.folder, self.calls, self.listeners = folder, [], []

    def request_stop(self):
        self.calls.append("request_stop")
        return False

    def cancel(self):
        self.calls.append("cancel")

    def follow(self, on_event, settings, on_output=None):
        self.listeners.append(on_event)
        if len(self.listeners) == 1:
            os.kill(os.getpid(), signal.SIGINT)  # the first Ctrl+C: the run is asked to stop
            deadline = time.monotonic() + 10
            while "request_stop" not in self.calls and time.monotonic() < deadline:
                time.sleep(0.01)
            assert self.calls == ["request_stop"]
            os.kill(os.getpid(), signal.SIGINT)  # the second: interrupts this follow
            time.sleep(10)
            raise AssertionError("the second Ctrl+C did not interrupt following the job")
        return {"status": "stopped", "error": "The job was cancelled before the run could save.",
                "job": {"id": "local-1", "flavor": "t4-small", "billed_seconds": 60, "cost_usd": 0.0067}}


def test_ctrl_c_on_train_jobs_asks_the_job_to_save_and_a_second_ctrl_c_cancels_it(tmp_path, monkeypatch, capfd):
    """The command line's signals reach the job: the first Ctrl+C is JobRun.request_stop (the run saves, and the
    job is cancelled after the grace), the second cancels at once; the run is then followed to its end (its
    record), without relaying its events again."""
    run = StandInJobRun(runs.RunFolder.create(tmp_path, "on-jobs"))
    monkeypatch.setattr(cli, "_start_on_jobs", lambda args, say: (run, JobsSettings()))
    # What this process did with Ctrl+C before (a test worker may ignore it: its controller takes Ctrl+C).
    before = signal.getsignal(signal.SIGINT)
    assert cli.main(["train", str(tmp_path / "data.jsonl"), "--jobs", "t4-small"]) == cli.EXIT_STOPPED
    assert run.calls == ["request_stop", "cancel"] and run.listeners[1] is None
    out, err = capfd.readouterr()
    assert "Cancelling the job" in err and f"python -m sft_space train --resume {run.folder.path}" in err
    assert "Run stopped" in out and "job local-1 on t4-small: 1m 00s billed, $0.01" in out
    assert signal.getsignal(signal.SIGINT) is before  # the handlers are given back


FAKE_TRAIN = """import json, os, signal, sys, time
calls = os.environ["FAKE_TRAIN_CALLS"]
def note(**what):
    with open(calls, "a") as handle:
        handle.write(json.dumps(what) + "\\n")
note(argv=sys.argv[1:], token=sys.stdin.readline().strip(), pid=os.getpid())
stops = []
def on_sigint(number, frame):
    stops.append(number)
    note(signal="SIGINT")
    if len(stops) == 2:
        sys.exit(130)
signal.signal(signal.SIGINT, on_sigint)
while True:
    time.sleep(0.05)
"""


def test_the_train_tabs_stop_and_resume_on_jobs_reach_the_command_lines_run(monkeypatch, tmp_path, tiny_model_dir,
                                                                          write_jsonl, embedded_tokenizer):
    """The Train tab's Jobs run is `train --jobs` in a child: Stop is its Ctrl+C (the run saves), a second Stop its
    second (the job is cancelled), and Resume on Jobs, once it has ended, is `train --resume RUN --jobs FLAVOR` with
    the visitor's token on its stdin. A stand-in of `train` records what it is started with and the signals."""
    from sft_space import checks, jobs as local_jobs
    from sft_space.settings import DataSettings
    from sft_space.ui import build_app, train_tab

    fake = tmp_path / "fake-python"
    fake.write_text(f"#!{sys.executable}\n{FAKE_TRAIN}")
    fake.chmod(0o755)
    calls = tmp_path / "calls.jsonl"
    monkeypatch.setenv("FAKE_TRAIN_CALLS", str(calls))
    monkeypatch.setenv("SFT_SPACE_RUNS", str(tmp_path / "runs"))
    monkeypatch.setenv("SFT_SPACE_JOBS_API", "local")
    monkeypatch.setenv("SFT_SPACE_JOBS_OPERATOR_PAYS", "1")  # off a Space, the page's runs are billed to them
    monkeypatch.setenv("HF_TOKEN", TOKEN)  # the operator's own, on their machine
    app = build_app(local_jobs.JobManager(), default_model=str(tiny_model_dir))
    handlers = {f.fn.__name__: f.fn for f in app.fns.values() if f.fn is not None}
    token = handlers["on_load"]("")
    data_settings = DataSettings(source=str(write_jsonl(distinct_chats(12))))
    report = checks.check_data(data_settings, embedded_tokenizer)
    form = (str(tiny_model_dir), "quick", "t4-small", *(spec.default for spec in train_tab.advanced_fields()))

    def recorded(count):
        deadline = time.monotonic() + 20
        while len(lines := calls.read_text().splitlines() if calls.is_file() else []) < count:
            assert time.monotonic() < deadline, lines
            time.sleep(0.05)
        return [json.loads(line) for line in lines]

    monkeypatch.setattr(sys, "executable", str(fake))
    status = handlers["on_start_jobs"](None, None, token, report, data_settings, False, *form)
    assert "Refused" not in status, status
    started = recorded(1)[0]
    assert started["argv"][:3] == ["-m", "sft_space", "train"] and started["token"] == TOKEN
    assert started["argv"][started["argv"].index("--jobs") + 1] == "t4-small", started["argv"]
    with pytest.warns(UserWarning, match="Nothing to resume"):
        handlers["on_resume_jobs"](None, None, token, "l4x1")  # not while it runs
    handlers["on_stop_jobs"](token)
    assert recorded(2)[1] == {"signal": "SIGINT"}
    handlers["on_stop_jobs"](token)
    assert recorded(3)[2] == {"signal": "SIGINT"}
    # The child ends on its second Ctrl+C, as train --jobs does once its job is cancelled; then Resume starts anew.
    deadline = time.monotonic() + 10
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        while "Nothing to resume" in (status := handlers["on_resume_jobs"](None, None, token, "l4x1")):
            assert time.monotonic() < deadline, status
            time.sleep(0.1)
    resumed = recorded(4)[3]
    run_id = started["argv"][started["argv"].index("--run-name") + 1]
    assert resumed["argv"][3:] == ["--resume", str(tmp_path / "runs" / run_id), "--jobs", "l4x1",
                                   "--token-on-stdin", "--events"]
    assert resumed["token"] == TOKEN
    os.kill(resumed["pid"], signal.SIGKILL)


# ---------------------------------------------------------------------------------------------- several machines


def test_several_machines_are_jobs_in_one_network_group_that_meet_at_the_first_ones_alias_and_stop_and_bill_together(
        tmp_path, tiny_model_dir, write_jsonl):
    """--jobs-nodes 3: three run_job calls, the same `train` with torch's launcher flags (--nnodes 3, each its
    --node-rank) in one network group, the first claiming the alias the others meet it at; the cost before Start
    is three machines', a second Stop cancels every job, and the billed cost is the three jobs' time."""
    class Recording(jobs_stand_in.LocalJobsApi):
        def run_job(self, **kwargs):
            calls.append(kwargs)  # the real command would train: a job that runs until cancelled stands for it
            return super().run_job(**{**kwargs, "command": ["sh", "-c", "while :; do sleep 0.1; done"]})

    calls = []
    api, jobs = Recording(tmp_path / "hub"), JobsSettings()
    settings = run_settings("quick", source=str(write_jsonl(distinct_chats(12))), model=str(tiny_model_dir))
    said = []
    run = hub_jobs.start_run(api, TOKEN, settings, "l4x4", tmp_path / "runs", jobs, run_id="Three_Machines",
                             on_status=said.append, nodes=3)
    assert len(calls) == 3
    group = calls[0]["network_group"]
    assert re.fullmatch(r"[a-z0-9-]{1,46}", group) and group.startswith("sft-space-three-machines-")
    assert [call["network_group"] for call in calls] == [group] * 3
    assert [call["network_aliases"] for call in calls] == [["rendezvous"], None, None]
    for rank, call in enumerate(calls):
        assert call["command"][-4:] == ["--nnodes", "3", "--node-rank", str(rank)]
        assert call["command"][:-4] == calls[0]["command"][:-4]
        assert call["env"]["JOB_RENDEZVOUS"] == "rendezvous:29500" and call["secrets"] == {"HF_TOKEN": TOKEN}
        assert (call["flavor"], call["timeout"]) == ("l4x4", calls[0]["timeout"])
        assert call["labels"]["sft-space-node"] == str(rank)
    assert len({call["name"] for call in calls}) == 3
    job = run.job
    assert job["nodes"] == 3 and len(job["node_jobs"]) == 3 and job["node_jobs"][0] == job["id"]
    assert "3 machines, one job each, of l4x4" in "".join(said) and "with 2 more machines" in said[-1]
    assert "(the first of 3 machines, one job each)" in hub_jobs.describe_job(job)
    l4x4 = hub_jobs.list_flavors(api, None)["l4x4"]
    alone, three = (hub_jobs.estimate_cost(run_settings("quick"), l4x4, STATS, jobs, nodes=n) for n in (1, 3))
    assert three.training_seconds == pytest.approx(alone.training_seconds / 3, rel=0.01)  # 12 GPUs, not 4
    assert three.cost_usd == pytest.approx(three.seconds / 60 * l4x4.price_per_minute_usd * 3)
    assert three.most_usd == pytest.approx(three.timeout_seconds / 60 * l4x4.price_per_minute_usd * 3)
    assert run.request_stop() is False and run.request_stop() is True  # the second cancels every machine's job
    stages = [api.wait_for_job(job_id, timeout=5).status.stage for job_id in job["node_jobs"]]
    assert stages == ["CANCELED"] * 3
    record = run.follow(settings=jobs, poll_seconds=0.1)
    assert record["status"] == "stopped"
    each = [hub_jobs.billed_seconds(api.inspect_job(job_id=job_id)) for job_id in job["node_jobs"]]
    assert record["job"]["billed_seconds"] == round(sum(each))
    assert record["job"]["cost_usd"] == pytest.approx(sum(each) / 3600 * 3.80, abs=1e-3)


def test_the_jobs_script_gives_train_the_rendezvous_at_the_first_jobs_alias_in_its_network(tmp_path):
    """In each job, the script adds --rdzv-endpoint ${HF_NETWORK_GROUP_PREFIX}<alias>:<port> (only the job's network
    knows the prefix) to `train`'s arguments, which the command line takes as torch's launcher flags."""
    fake_python = tmp_path / "bin" / "python"
    fake_python.parent.mkdir()
    fake_python.write_text('#!/bin/sh\n[ "$1" = "-c" ] && exit 0\nprintf "%s\\n" "$@"\n')
    fake_python.chmod(0o755)
    plan = hub_jobs.JobPlan("r", "local-user", "image", hub_jobs.job_command(["--resume", "/runs/r"]), {}, "l4x4",
                            3600, [], {})
    second = hub_jobs.node_plans(plan, 2)[1]
    environment = {"PATH": f"{fake_python.parent}:{os.environ['PATH']}", "HF_NETWORK_GROUP_PREFIX": "grp-7.",
                   **second.env}
    command = [tmp_path if part == "/code" else part for part in second.command]
    printed = subprocess.run(command, env=environment, capture_output=True, text=True, check=True).stdout.split("\n")
    arguments = printed[printed.index("train") + 1:-1]
    assert arguments == ["--resume", "/runs/r", "--nnodes", "2", "--node-rank", "1", "--rdzv-endpoint",
                         "grp-7.rendezvous:29500", "--events"]
    parsed = cli.build_parser().parse_args(["train", *arguments])
    assert (parsed.nnodes, parsed.node_rank, parsed.rdzv_endpoint) == (2, 1, "grp-7.rendezvous:29500")
    assert hub_jobs.node_plans(plan, 1) == [plan]
    with pytest.raises(UserError, match="1 to 16 machines"):
        hub_jobs.node_plans(plan, 0)


# ---------------------------------------------------------------------------------------------- whole runs


def files_holding(root, secret):
    return [str(p) for p in Path(root).rglob("*") if p.is_file() and secret.encode() in p.read_bytes()]


@pytest.mark.slow
def test_train_on_jobs_from_the_command_line_stopped_by_ctrl_c_and_resumed_in_a_new_job_to_its_end(
        write_jsonl, tiny_model_dir, tmp_path, monkeypatch, capfd):
    """The issue's done-when, through the stand-in: `SFT_SPACE_JOBS_API=local train DATA --jobs t4-small`, with its
    cost said first; Ctrl+C asks the job's run to save (a stop request in its bucket folder), and it stops with its
    adapter and a checkpoint in the bucket; `train --resume` goes on in a new job from that checkpoint, which an app
    that restarted (another API object) follows again instead of starting another; the run finishes with both
    jobs and their cost in run.json, the adapter in the run folder, and no file written holds the token."""
    import threading

    monkeypatch.setenv("SFT_SPACE_JOBS_API", "local")
    monkeypatch.setenv("SFT_SPACE_JOBS_STOP_GRACE_SECONDS", "600")
    monkeypatch.setenv("HF_TOKEN", TOKEN)
    runs_dir, data = tmp_path / "runs", write_jsonl(distinct_chats(24))
    hub = runs_dir / ".hub-jobs-local"
    bucket_events = hub / "buckets" / "local-user" / "sft-space-runs" / "on-jobs" / "events.jsonl"

    def ctrl_c_at_the_first_step():
        deadline = time.monotonic() + 240
        while '"event": "step"' not in (bucket_events.read_text() if bucket_events.is_file() else ""):
            if time.monotonic() > deadline:
                return  # the main thread's run then trains to its end, and the test fails there
            time.sleep(0.2)
        os.kill(os.getpid(), signal.SIGINT)

    threading.Thread(target=ctrl_c_at_the_first_step, daemon=True).start()
    # Enough steps that the job still trains when it sees the stop request, which it looks for every 2 s
    # (hub_jobs.watch_stop_file): at about 0.03 s a step on a quiet core, 200 last three times that. Each step is
    # trained once, before the stop or in the resume, so more would only cost CPU time.
    code = cli.main(["train", str(data), "--jobs", "t4-small", "--model", str(tiny_model_dir), "--output",
                     str(runs_dir), "--preset", "quick", "--max-steps", "200", "--lora-r", "4", "--sample-prompts",
                     "0", "--save-every", "1000", "--run-name", "on-jobs"])
    out, err = capfd.readouterr()
    assert code == cli.EXIT_STOPPED, err
    assert "Hugging Face Jobs, t4-small (T4, $0.40/hour): about" in err
    assert re.search(r"step \d+ of 200", err)  # the job's events, rendered as a run here renders them
    folder = runs.RunFolder.open(runs_dir / "on-jobs")
    stopped = folder.read()
    assert stopped["status"] == "stopped", stopped.get("error")
    first = stopped["job"]
    assert first["id"].startswith("local-") and "stop_requested_at" in first and first["stage"] != "CANCELED"
    assert (folder.adapter_path / "adapter_model.safetensors").is_file()
    stopped_at = stopped["final_metrics"]["step"]
    assert 0 < stopped_at < 200 and list(bucket_events.parent.glob("checkpoint-*"))
    assert f"train --resume {folder.path}" in err

    followed_again = {}

    def restarted_app_follows_the_new_job():
        deadline = time.monotonic() + 120
        while folder.read()["job"]["id"] == first["id"] and time.monotonic() < deadline:
            time.sleep(0.1)
        again = hub_jobs.resume_run(jobs_stand_in.LocalJobsApi(hub), TOKEN, folder, JobsSettings())
        followed_again["id"] = again.job["id"]

    follower = threading.Thread(target=restarted_app_follows_the_new_job, daemon=True)
    follower.start()
    code = cli.main(["train", "--resume", str(folder.path), "--jobs", "l4x1"])
    out, err = capfd.readouterr()
    assert code == 0, err
    follower.join(10)
    record = folder.read()
    second = record["job"]
    assert second["id"] != first["id"] and second["flavor"] == "l4x1" and followed_again["id"] == second["id"]
    assert [job["id"] for job in record["jobs"]] == [first["id"], second["id"]]  # no third job
    assert record["status"] == "finished" and record["final_metrics"]["step"] == 200, record.get("error")
    assert second["cost_usd"] is not None and second["estimated_cost_usd"] > 0
    assert record["cost_usd"] == pytest.approx(sum(job["cost_usd"] for job in record["jobs"]), abs=1e-6)
    assert (folder.adapter_path / "adapter_model.safetensors").is_file()
    # The model and the data as this machine names them (the job's record names its mounts): chat and publish work.
    assert record["settings"]["model"] == str(tiny_model_dir) and record["data"]["source"] == data.name
    assert not list(folder.path.glob("checkpoint-*")), "checkpoints stay in the bucket"
    assert f"Run finished: {folder.path}" in out and f"job {second['id']} on l4x1" in out
    assert files_holding(tmp_path, TOKEN) == [] and TOKEN not in out + err


def test_after_an_app_restart_a_visitor_finds_their_jobs_run_and_no_one_elses(tmp_path):
    for run_id, owner, job in (("old", "visitor-1", {"id": "j1", "flavor": "t4-small"}),
                               ("new", "visitor-1", {"id": "j2", "flavor": "l4x1"}),
                               ("here", "visitor-1", None), ("theirs", "visitor-2", {"id": "j3", "flavor": "h200"})):
        folder = runs.RunFolder.create(tmp_path, run_id)
        folder.write({"run_id": run_id, "status": "running", "settings": {}, "owner": owner,
                      "created_at": f"2026-12-03T10:00:0{len(run_id)}+0000", **({"job": job} if job else {})})
    launcher = hub_jobs.JobsLauncher(tmp_path)
    found = launcher.latest("visitor-1")
    assert (found.run_id, found.flavor, found.done) == ("new", "l4x1", True)
    assert "Resume on Jobs follows it again" in found.status
    assert launcher.latest("visitor-3") is None
    with pytest.raises(UserError, match="no Jobs run to stop"):
        launcher.stop("visitor-1")


@pytest.mark.slow
def test_on_a_space_any_visitor_signed_in_with_the_jobs_scope_may_start_on_jobs_and_no_one_else(
        monkeypatch, tmp_path, tiny_model_dir):
    """The Space's owner decides who trains on the Space's hardware, not on Jobs: a visitor who is not the owner
    gets past the Jobs gate once their sign-in allowed 'jobs' (and is then asked for checked data); signed out, or
    without the scope, they are told why and how to sign in."""
    from types import SimpleNamespace

    from test_ui import _profile, _space_app

    from sft_space.ui import train_tab

    app, handlers = _space_app(monkeypatch, tmp_path, tiny_model_dir)
    token = handlers["on_load"]("", None)
    form = (None, None, False, str(tiny_model_dir), "quick", "t4-small",
            *(spec.default for spec in train_tab.advanced_fields()))
    stranger = _profile("bob")
    for oauth, said in ((None, "Sign in with Hugging Face"), (SimpleNamespace(token=TOKEN, scope="openid profile"),
                                                              "allowing 'jobs'")):
        with pytest.warns(UserWarning):
            status = handlers["on_start_jobs"](stranger, oauth, token, *form)
        assert said in status and TOKEN not in status
    with pytest.warns(UserWarning, match="Check your data"):
        status = handlers["on_start_jobs"](stranger, SimpleNamespace(token=TOKEN, scope="openid jobs"), token, *form)
    assert "Only acme" not in status


def test_the_apps_jobs_run_is_the_command_line_in_a_child_that_gets_the_token_on_stdin(tmp_path, monkeypatch):
    """The launcher's child is `train --jobs`: its refusal comes back as its events say it, and the visitor's token
    is neither on its command line nor in its environment (on a Space, HF_TOKEN there is the owner's)."""
    monkeypatch.setenv("SFT_SPACE_JOBS_API", "local")
    monkeypatch.setenv("HF_TOKEN", "hf_TheOperatorsOwnToken")
    launcher = hub_jobs.JobsLauncher(tmp_path / "runs")
    settings = run_settings("quick", source=str(tmp_path / "data.jsonl"), output_dir=str(tmp_path / "runs"))
    run = launcher.start("visitor-1", TOKEN, "t4-smal", settings)
    assert run.process.wait(120) == 1
    deadline = time.monotonic() + 10
    while "is not a Hugging Face Jobs hardware flavor" not in run.status and time.monotonic() < deadline:
        time.sleep(0.1)
    assert "'t4-smal' is not a Hugging Face Jobs hardware flavor" in run.status
    assert TOKEN not in " ".join(run.process.args) and "--token-on-stdin" in run.process.args
    assert launcher.latest("visitor-1") is run and run.done
    assert files_holding(tmp_path, TOKEN) == []


def test_the_runs_table_and_details_show_a_jobs_runs_flavor_and_billed_cost_and_compare_takes_it(tmp_path):
    """A Jobs run's row says where it trained and what it cost (billed, all its jobs; expected while its first runs),
    its details list each job, and comparing it with a run of this machine works."""
    from sft_space.ui import runs_tab

    first = {"id": "local-1", "flavor": "t4-small", "billed_seconds": 300, "cost_usd": 0.033333,
             "estimated_cost_usd": 0.05}
    second = {"id": "local-2", "flavor": "l4x1", "billed_seconds": 600, "cost_usd": 0.133333}
    for run_id, extra in (("here", {}), ("resumed", {"job": second, "jobs": [first, second], "cost_usd": 0.166666}),
                          ("starting", {"job": {"id": "local-3", "flavor": "h200", "estimated_cost_usd": 1.5},
                                        "jobs": []})):
        folder = runs.RunFolder.create(tmp_path, run_id)
        folder.write({"run_id": run_id, "status": "finished", "owner": "alice", "settings": {"preset": "quick"},
                      "created_at": "2026-12-03T10:00:00+0000", "final_metrics": {"step": 3, "loss": 2.0}, **extra})
    table = runs_tab.runs_table(str(tmp_path), "alice").set_index("run")
    assert table.loc["here", "status"] == "finished"
    assert table.loc["resumed", "status"] == "finished on l4x1, $0.17"
    assert table.loc["starting", "status"] == "finished on h200, about $1.50"
    details, _ = runs_tab.run_details(str(tmp_path), "resumed", "alice")
    assert "Trained on Hugging Face Jobs: $0.17 billed in all" in details
    assert "job local-1 on t4-small: 5m 00s billed, $0.03" in details and "job local-2 on l4x1" in details
    note, *_, settings = runs_tab.compare_view(str(tmp_path), ["here", "resumed", "starting"], False, "alice")
    assert "rows differ" in note and {"here", "resumed", "starting"} <= set(settings.data.columns)


def test_the_stand_in_offers_every_gpu_the_train_tab_offers(flavors):
    from sft_space.ui import train_tab

    assert set(train_tab.JOBS_FLAVORS) == {flavor.name for flavor in hub_jobs.gpu_flavors(flavors)}
    assert flavors["h200x8"].gpus == 8 and 131 < flavors["h200x8"].gpu_memory_gib < 132  # 141 GB each


@pytest.mark.slow
def test_the_train_tab_runs_a_jobs_run_through_the_stand_in_with_its_cost_status_and_curve(
        monkeypatch, tmp_path, tiny_model_dir, write_jsonl, embedded_tokenizer):
    """The app on this machine (the operator's): Hugging Face Jobs chosen, the cost beside Start, Start on Jobs,
    then the status and the loss curve of the run as the stand-in's job trains it, to its end and its cost."""
    from sft_space import checks, jobs as local_jobs
    from sft_space.settings import DataSettings
    from sft_space.ui import build_app, train_tab

    monkeypatch.setenv("SFT_SPACE_RUNS", str(tmp_path / "runs"))
    monkeypatch.setenv("SFT_SPACE_JOBS_API", "local")
    monkeypatch.setenv("SFT_SPACE_JOBS_OPERATOR_PAYS", "1")
    app = build_app(local_jobs.JobManager(), default_model=str(tiny_model_dir))
    handlers = {f.fn.__name__: f.fn for f in app.fns.values() if f.fn is not None}
    token = handlers["on_load"]("")
    data_settings = DataSettings(source=str(write_jsonl(distinct_chats(12))))
    report = checks.check_data(data_settings, embedded_tokenizer)
    values = {spec.name: spec.default for spec in train_tab.advanced_fields()}
    values.update(max_steps=3, lora_r=4, sample_prompts=0)
    form = (report, data_settings, str(tiny_model_dir), "quick", "t4-small", *values.values())
    cost = handlers["on_jobs_cost"](None, train_tab.ON_JOBS, *form)
    assert cost.startswith("Hugging Face Jobs, t4-small (T4, $0.40/hour): about") and "at most $" in cost
    status = handlers["on_start_jobs"](None, None, token, report, data_settings, False, *form[2:])
    assert "Refused" not in status, status
    deadline = time.monotonic() + 240
    while "**Ended**" not in (status := handlers["refresh_jobs"](token, train_tab.ON_JOBS)[0]):
        assert time.monotonic() < deadline, status
        time.sleep(1)
    assert "step 3 of 3" in status and "billed" in status, status
    curve = handlers["refresh_jobs"](token, train_tab.ON_JOBS)[1]["value"]
    assert set(curve["split"]) >= {train_tab.RAW}
    record = runs.list_runs(tmp_path / "runs")[0][1]
    assert record["status"] == "finished" and record["job"]["cost_usd"] is not None
