"""Settings dataclasses: each field declared once, with its default and help text.

The CLI flags and the app's form are generated from these fields (see `add_arguments`), and saved run
records are written from them, so the three cannot drift apart.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import shlex
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .errors import UserError, flag


def setting(default: Any, help: str, **extra: Any) -> Any:
    """A dataclass field with the help text the CLI and the UI show. `bounds=(low, high)` (inclusive) is enforced
    when the settings are made and given to the app's number boxes, which Gradio then enforces for any client.
    `choices` lists the values allowed; `card=True` shows the field in a published model card's settings table;
    `app_bounds` narrows `bounds` in the shared app's form; `group` places it there; `aliases`, `metavar` and
    `exclusive` shape its command-line flag (see `add_arguments`)."""
    return field(default=default, metadata={"help": help, **extra})


def is_number(value: Any) -> bool:
    """Whether `value` is a number (int or float) and not a bool, which Python counts as an int."""
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def check_bounds(settings: Any) -> None:
    """Refuse a number outside its field's bounds, or a value not among its field's choices: a page or a config
    file may send anything."""
    for spec in dataclasses.fields(settings):
        check_field(spec, getattr(settings, spec.name), f"--{spec.name.replace('_', '-')}")


def check_field(spec: dataclasses.Field, value: Any, named: str) -> None:
    """Refuse `value` for the field `spec` when it is not among its choices or outside its bounds; `named` is how
    the person set it (a flag, an environment variable)."""
    choices = spec.metadata.get("choices")
    if choices is not None and value not in choices:
        raise UserError(f"{spec.name} = {value!r} is not one of {', '.join(map(str, choices))} ({named}).")
    if "bounds" not in spec.metadata:
        return
    low, high = spec.metadata["bounds"]
    if not is_number(value) or not low <= value <= high:
        raise UserError(f"{spec.name} = {value!r} is out of range: use a number from {low:,} to {high:,} ({named}).")


@dataclass
class DataSettings:
    """Where the training data comes from and how it is read, checked and split."""

    source: str = setting("", "A .jsonl, .json, .csv or .parquet file, a dataset folder, or a Hub dataset id (owner/name).")
    columns: str = setting(
        "",
        "Column mapping for unrecognised formats, e.g. 'prompt=question,response=answer[,system=sys]', "
        "'messages=dialog' or 'text=body'. Leave empty to detect the format.",
    )
    hub_config: str = setting("", "Hub dataset configuration (subset) name, if it has several.")
    hub_split: str = setting("train", "Hub dataset or dataset folder split to read.")
    max_length: int = setting(2048, "Maximum example length in the model's tokens; longer examples are reported.",
                              bounds=(16, 1_048_576), card=True)
    max_rows: int = setting(200_000, "Most rows read from a dataset; a larger one is refused, naming this limit "
                                     "(a LoRA learns from hundreds to thousands of good rows).",
                                     bounds=(1, 100_000_000))
    max_file_mb: float = setting(1024.0, "Largest data file read, in MB; a larger one is refused, naming this limit.",
                                 bounds=(0.0001, 1_000_000))
    max_row_kb: int = setting(1024, "Largest row read, in KB (the JSONL line, or the record as compact JSON); a "
                                    "larger row is reported (row_too_large) and skipped unparsed, and the rest of the "
                                    "file is checked. A long reasoning trace is about 100 KB, and 1,024 KB is already "
                                    "hundreds of thousands of tokens, far past any maximum length.",
                                    bounds=(1, 1_048_576))
    max_messages: int = setting(512, "Most messages in one row; a row with more is reported (too_many_messages) "
                                     "before it is rendered. Real conversations, tool-calling traces included, "
                                     "have a few to a few dozen; 512 turns do not fit a 2,048-token example anyway.",
                                     bounds=(2, 1_000_000))
    validation_fraction: float = setting(0.1, "Share of valid examples held out for validation loss (0 to turn off).",
                                         bounds=(0, 0.9), card=True)
    max_validation_examples: int = setting(
        200, "Most examples held out for validation loss; the rest of the validation share is trained on (past a "
             "few hundred the mean loss barely changes, while each evaluation keeps growing).",
        bounds=(1, 1_000_000))
    skip_invalid_rows: bool = setting(
        False, "Train on the valid rows when some rows have errors (otherwise invalid rows stop training)."
    )
    keep_duplicates: bool = setting(
        False, "Train on exact duplicate rows too (by default each repeat of an earlier row is dropped before "
               "training, the first kept, and the report says how many)."
    )

    def __post_init__(self) -> None:
        check_bounds(self)


# Where the run folders are kept unless the operator (SFT_SPACE_RUNS) or the command (--output-dir) says otherwise.
DEFAULT_RUNS_DIR = "runs"
# The preset of a run that names none: the fields' own defaults (PRESETS["balanced"] is empty).
DEFAULT_PRESET = "balanced"
PRESET_NAMES = ("quick", DEFAULT_PRESET, "thorough")
AUTO = "auto"
# With eval_every 0, validation loss gets at most this share of a run's compute: as many evaluations as fit, up
# to MAX_EVALUATIONS (see planning.evaluation_plan). 8%, so that with what that estimate leaves out (it counts
# tokens; each evaluation also has its set-up) evaluation stays within a tenth of the run's time (measured on the
# sample, default flags, 2 CPU cores: 3 evaluations, 13.3 s of 382 s).
EVALUATION_SHARE = 0.08
MAX_EVALUATIONS = 10


# Experiment trackers a run can also log to (off by default; the run folder is always the record).
TRACKERS = ("none", "trackio", "tensorboard")


@dataclass
class RunSettings(DataSettings):
    """Everything that defines a training run. Saved in the run's run.json; a resume reuses it unchanged.

    "auto" fields are decided for the hardware at start (see `hardware.plan_training`) and the decision is
    recorded in the run beside these settings.
    """

    model: str = setting("", "Base model: the embedded default (empty), a local folder, or a Hub id (owner/name).",
                         group="model")
    preset: str = setting(DEFAULT_PRESET, "Starting point for the training settings below; any field set explicitly "
                          "wins.", choices=PRESET_NAMES, group="model", card=True)
    lora_r: int = setting(16, "LoRA rank: the adapter's capacity. 8-16 suits style and format; 32-64 for new knowledge.",
                          group="lora", bounds=(1, 1024), card=True)
    lora_alpha: int = setting(32, "LoRA scaling (alpha); twice the rank is a good default.", group="lora",
                              bounds=(1, 8192), card=True)
    # 0 by default, as in PEFT, LLaMA-Factory and Unsloth: on a CPU dropout takes a fifth of a step (docs/BENCHMARKS.md).
    lora_dropout: float = setting(0.0, "Dropout on the LoRA path: 0 is fastest (dropout copies the input of every "
                                  "adapted layer); 0.05-0.1 can help a small dataset generalise.", group="lora",
                                  bounds=(0, 0.9), card=True)
    target_modules: str = setting("all-linear", "Layers that get adapters: 'all-linear', or names separated by "
                                  "commas (e.g. 'q_proj,v_proj').", group="lora", card=True)
    quantization: str = setting(AUTO, "Load the base model in 4-bit (QLoRA) to save memory: 'auto' uses 4-bit only "
                                "when the model would not fit otherwise (needs a CUDA GPU).",
                                choices=(AUTO, "none", "4bit"), group="hardware")
    # epochs and max_steps are two ways to say how long a run is: a command names one of them at most.
    epochs: float = setting(3.0, "Passes over the training data (ignored when max steps is set).", group="schedule",
                            bounds=(0, 1000), card=True, exclusive="length")
    max_steps: int = setting(0, "Stop after this many optimizer steps (0: use epochs).", group="schedule",
                             bounds=(0, 2_147_483_647), card=True, exclusive="length")
    learning_rate: float = setting(2e-4, "Peak learning rate of the adapter.", group="schedule", bounds=(1e-09, 1),
                                  card=True)
    lr_scheduler: str = setting("cosine", "How the learning rate falls after warm-up.",
                                choices=("cosine", "linear", "constant_with_warmup"), group="schedule", card=True)
    warmup_ratio: float = setting(0.05, "Share of steps spent warming the learning rate up.", group="schedule",
                                  bounds=(0, 0.9), card=True)
    batch_size: int = setting(0, "Examples per device step (0: chosen to fit the hardware).", group="schedule",
                              bounds=(0, 4096))
    gradient_accumulation: int = setting(1, "Steps whose gradients add up before each optimizer update.",
                                         group="schedule", bounds=(1, 4096))
    packing: bool = setting(True, "Pack several examples into each sequence (no padding, each example still "
                            "attends only to itself): faster, same loss. A CPU packs only short examples, "
                            "into short packs.", group="hardware", card=True)
    precision: str = setting(AUTO, "Number format for training: 'auto' picks bf16 on Ampere or newer GPUs and on CPUs "
                             "with bf16 instructions, fp16 on older GPUs (T4), fp32 on other CPUs.",
                             choices=(AUTO, "fp32", "fp16", "bf16"), group="hardware")
    gradient_checkpointing: str = setting(AUTO, "Recompute activations to save memory at ~2x the compute: 'auto' "
                                          "turns it on only when memory requires it.", choices=(AUTO, "on", "off"),
                                          group="hardware")
    shard: str = setting(AUTO, "Shard the model across the GPUs (FSDP), each holding a share of its weights instead "
                         "of a whole copy: 'auto' shards only a model that fits no single GPU but fits shared "
                         "among the processes; 'on' always shards (it needs several GPUs, one process each); "
                         "'off' never does (each GPU then holds the whole model).", choices=(AUTO, "on", "off"),
                         group="hardware")
    save_every: int = setting(0, "Save a resumable checkpoint every this many steps (0: about every 10% of the run).",
                              group="schedule", bounds=(0, 2_147_483_647))
    eval_every: int = setting(0, "Compute validation loss every this many steps (0: as often as fits in "
                                 f"{EVALUATION_SHARE:.0%} of the run's compute, 1 to {MAX_EVALUATIONS} times, the "
                                 "last at the end).",
                              group="schedule", bounds=(0, 2_147_483_647))
    sample_prompts: int = setting(3, "Held-out prompts answered before and after training, saved with the run.",
                                  group="schedule", bounds=(0, 20))
    # A run's setting, not the data's: the same seed also starts the adapter's weights and orders the examples.
    seed: int = setting(42, "Random seed of the run: which examples are held out for validation, the adapter's "
                            "starting weights and the order the examples are trained in.", bounds=(0, 4_294_967_295),
                        card=True)
    report_to: str = setting("none", "Also log the run to an experiment tracker: trackio (Hugging Face's "
                             "local-first tracker: `trackio show` opens it; TRACKIO_SPACE_ID syncs it to a Space) or "
                             "tensorboard (event files in the run's folder). Needs that package installed.",
                             choices=TRACKERS, group="schedule")
    output_dir: str = setting(DEFAULT_RUNS_DIR, "Folder that holds the run folders (default: the runs folder of "
                              "SFT_SPACE_RUNS, else ./runs).", group="model", aliases=("--output",), metavar="DIR")
    trust_remote_code: bool = setting(False, "Run Python code shipped with a Hub model. Only for models you trust: "
                                      "it can do anything your account can.", group="model")


@dataclass
class AccessSettings:
    """What the app's visitors may reach and keep on this machine, and what it keeps ready for them. Set by
    whoever runs the app, never by the page: they are part of OperatorSettings, read from environment variables
    named SFT_SPACE_<FIELD> (e.g. SFT_SPACE_LOCAL_PATHS=1)."""

    local_paths: bool = setting(False, "Let the app's visitors name files and folders on this machine as data or "
                                       "model. For a single-user machine only: it is ignored on a Space, where "
                                       "visitors are strangers.")
    uploads_per_visitor: int = setting(5, "Uploaded data files kept per visitor; beyond it the oldest upload that "
                                          "no unfinished run needs is deleted.", bounds=(1, 10_000))
    upload_mb_per_visitor: float = setting(2048.0, "Megabytes of uploaded data kept per visitor.",
                                           bounds=(1, 10_000_000))
    runs_per_visitor: int = setting(10, "Runs kept per visitor (0: no limit); at the limit, Start asks the visitor "
                                        "to delete one of their runs first.", bounds=(0, 1_000_000))
    warm_start: bool = setting(True, "Keep the next run's training process started ahead, its libraries loaded "
                                     "(about 500 MB of memory while it waits), so a run's first step comes about "
                                     "5 s sooner after Start.")
    who_may_train: str = setting(AUTO, "Who may train and publish from the app: 'owner' (the Space's author, or "
                                       "members of the organisation that owns it, signed in with Hugging Face), "
                                       "'signed-in' (any visitor signed in with Hugging Face) or 'anyone'. 'auto': "
                                       "owner on a Space, anyone elsewhere. Checking data, the preview and chat stay "
                                       "open to every visitor.", choices=(AUTO, "owner", "signed-in", "anyone"))
    original_space: str = setting("", "The id (owner/name) of the public Space that people duplicate: there a "
                                      "visitor who may not train finds the Duplicate button at the top of the page. "
                                      "A duplicate copies this variable but has an id of its own, so there the "
                                      "button stays beside the Train tab's refusal.")
    # Visitor ids cost nothing, so what one client may spend is also bounded per client address (the address
    # Gradio sees, or the one the Space's proxy adds to X-Forwarded-For: see forwarded_hops) and for everyone.
    ids_per_client_hour: int = setting(30, "New anonymous visitor ids one client address may get per hour (a "
                                           "browser keeps its id, so it needs one); beyond it the page is asked to "
                                           "wait.", bounds=(1, 1_000_000))
    uploads_per_client_hour: int = setting(20, "Data files one client address may upload per hour.",
                                           bounds=(1, 1_000_000))
    upload_mb_per_client_hour: float = setting(4096.0, "Megabytes one client address may upload per hour (counted "
                                                      "as they arrive, before Gradio stores them).",
                                               bounds=(1, 10_000_000))
    upload_mb_total: float = setting(20480.0, "Megabytes of uploaded data kept for all visitors together; beyond "
                                              "it the oldest uploads that no unfinished run needs are deleted, and "
                                              "an upload that still does not fit is refused.",
                                     bounds=(1, 100_000_000))
    upload_max_age_hours: float = setting(24.0, "Hours an upload is kept, unless an unfinished run needs it; older "
                                                "ones are swept.", bounds=(0.01, 1_000_000))
    downloads_gb: float = setting(10.0, "Gigabytes (1 GB = 10^9 bytes) kept of the files made for visitors to "
                                        "download (a run's zip or GGUF file), for all visitors together. A file is "
                                        "made once per run and kind, and handed out again while the run's adapter is "
                                        "unchanged; the oldest go first to make room, and one that would not fit is "
                                        "refused before it is made.", bounds=(0.001, 1_000_000))
    queued_runs: int = setting(3, "Runs that may wait for the GPU behind the one training, for all visitors "
                                  "together; beyond it Start is refused until one finishes.", bounds=(0, 1000))
    anonymous_run_minutes: float = setting(60.0, "Longest a run of a visitor who is not signed in may take from "
                                                 "its start (preparing included) before the app stops it, keeping "
                                                 "its checkpoint and adapter; such visitors also get one run at a "
                                                 "time per client address. On a Space only (elsewhere the app is "
                                                 "taken to be your own machine); 0: no limit.",
                                           bounds=(0, 1_000_000))
    queue_size: int = setting(100, "Events (checks, chats, page refreshes) that may wait in the app's queue, for "
                                   "all visitors together; beyond it a new one is refused as 'queue full'.",
                              bounds=(1, 1_000_000))
    queued_events_per_client: int = setting(16, "Events one client address may have waiting or running at once "
                                                "(an open page has up to about six: its load, refresh timers, a "
                                                "check, a chat reply); visitors behind one address (an office, a "
                                                "school) share it.", bounds=(1, 1_000_000))
    max_request_kb: int = setting(1024, "Largest request body the app reads, in KB (uploads have their own limit, "
                                        "SFT_SPACE_MAX_FILE_MB); a larger one is refused before it is read.",
                                  bounds=(16, 10_000_000))
    session_minutes: float = setting(30.0, "Minutes a page's checked-data report is kept in the server's memory "
                                           "after the check that made it (a client that never closes its page "
                                           "keeps nothing longer); Check again to see it after that.",
                                     bounds=(1, 1_000_000))
    session_capacity: int = setting(500, "Pages (sessions) whose state the server keeps at once; beyond it the "
                                         "least recently used one's is dropped.", bounds=(1, 1_000_000))
    forwarded_hops: int = setting(-1, "How many proxies in front of the app add the client's address to "
                                      "X-Forwarded-For: the client address is that many entries from the right "
                                      "(entries further left are the client's to write). -1: 1 on a Space (its "
                                      "proxy), 0 elsewhere (the address the connection comes from, which uvicorn "
                                      "already takes from a proxy on this machine).", bounds=(-1, 16))
    hub_models: str = setting("any", "Hub models visitors may name besides the ones the app offers: 'any', 'none' "
                                     "(the offered models only), or ids separated by commas. Whichever, a Hub "
                                     "model's size is read from its metadata first, and one this machine cannot "
                                     "hold is refused before anything is downloaded.")
    # A visitor's data, and a chat template or tokenizer named by a visitor, are other people's input and code: they
    # run in a worker process under these limits, never unbounded inside the web server (see isolation.py).
    worker_memory_gb: float = setting(4.0, "Memory one worker process may take, in GB, beyond what it starts with: "
                                           "a check of a visitor's data, its first look, or a preview rendered with a "
                                           "template that is not the app's own. Past it the visitor is told the check "
                                           "needed more.", bounds=(0.05, 1024))
    worker_seconds: float = setting(120.0, "Longest a worker process may run, in seconds; then it is stopped and "
                                           "the visitor told.", bounds=(1, 86_400))
    workers: int = setting(2, "Worker processes running at once for all visitors together: their memory limits add "
                              "up, so this bounds what checks can take of the machine.", bounds=(1, 256))
    worker_wait_seconds: float = setting(20.0, "How long a request waits for a worker process when all are busy "
                                               "before it is refused with a message to try again.",
                                         bounds=(0, 3600))

    def __post_init__(self) -> None:
        check_bounds(self)


# The environment variables of OperatorSettings: SFT_SPACE_ and the field's name in capitals.
ENV_PREFIX = "SFT_SPACE_"


def _data_limit(name: str, help: str) -> Any:
    """An OperatorSettings field that caps a DataSettings field for the app: the same default and bounds."""
    spec = DataSettings.__dataclass_fields__[name]
    return setting(spec.default, help, bounds=spec.metadata["bounds"])


@dataclass
class OperatorSettings(AccessSettings):
    """Everything whoever runs the app or the command line sets for this machine, through environment variables
    named SFT_SPACE_<FIELD>: where runs and caches are kept, the preselected model, how many processes train, the
    key of visitor ids, the app's data limits, and (AccessSettings) what the app's visitors may reach and spend.
    `from_environment` is the one place that reads them; a page never sets them."""

    runs: str = setting(DEFAULT_RUNS_DIR, "The runs folder, for the app and the command line (where --output-dir "
                                          "wins); uploads are kept in its .uploads/, one folder per visitor. On a "
                                          "Space with persistent storage the app makes it /data/runs, for itself "
                                          "and the runs it starts, unless it is set.")
    cache: str = setting("", "Where the built-in model's converted checkpoint is kept (empty: ~/.cache/sft_space; "
                             "on a Space with persistent storage the app makes it /data/.cache/sft_space).")
    default_model: str = setting("", "The model the app preselects (empty: the built-in one). The operator's "
                                     "choice, so it may be a local folder.")
    processes: int = setting(0, "Processes `train` runs on this machine, one per GPU (0: one per CUDA GPU, 1 without "
                                "a GPU); the --nproc-per-node flag wins.", bounds=(0, 4096))
    # Not in the repr: settings are shown in logs and tests' failures, the key never.
    secret: str = field(default="", repr=False, metadata={
        "help": "The key that signs visitor ids (empty: a random key kept in the runs folder as .visitor-secret, "
                "so that ids survive a restart, as runs do)."})
    max_rows: int = _data_limit("max_rows", "The most rows the app reads from a dataset (the command line's "
                                            "--max-rows): a larger one is refused, naming the limit (of a Hub "
                                            "dataset only the first rows are read), and a run started from the app "
                                            "keeps it. Visitors cannot change it.")
    max_file_mb: float = _data_limit("max_file_mb", "The largest data file the app reads, in MB (the command line's "
                                                    "--max-file-mb); a larger upload is refused before it is stored. "
                                                    "Visitors cannot change it.")


def environment_variable(name: str, prefix: str = ENV_PREFIX) -> str:
    """The environment variable of the field `name` (of OperatorSettings, by default)."""
    return prefix + name.upper()


def from_environment(environ: Mapping[str, str] | None = None, settings_class: type = OperatorSettings,
                     prefix: str = ENV_PREFIX) -> Any:
    """The operator's settings from the SFT_SPACE_<FIELD> variables of `environ` (by default this process's),
    converted to the fields' types and checked: a value that is not one the field takes is a UserError naming the
    variable. A variable that is unset or blank leaves the field's default. `settings_class` and `prefix`: another
    class of the ENVIRONMENT table, read from its own variables."""
    environ = os.environ if environ is None else environ
    values = {}
    for spec in dataclasses.fields(settings_class):
        variable = environment_variable(spec.name, prefix)
        raw = environ.get(variable)
        if raw is None or not raw.strip():
            continue
        kind = field_type(spec)
        choices = spec.metadata.get("choices")
        if choices is not None:
            raw = raw.strip().lower()
            if raw not in choices:
                raise UserError(f"{variable}={raw!r} is not one of {', '.join(choices)}; set one of them (or remove "
                                "the variable for the default).")
        try:
            value = raw.strip().lower() in ("1", "true", "yes", "on") if kind is bool else kind(raw)
        except ValueError:
            raise UserError(f"{variable}={raw!r} is not a valid {kind.__name__}.") from None
        check_field(spec, value, variable)
        values[spec.name] = value
    return settings_class(**values)


# Every settings class read from environment variables, by the variables' prefix (tests/test_operator_settings.py
# checks that each SFT_SPACE_ name the package uses is one of theirs, or one of INTERNAL_VARIABLES).
ENVIRONMENT: dict[str, type] = {ENV_PREFIX: OperatorSettings}
# Variables the package sets for processes of its own (distributed.py's launcher and the processes it starts):
# messages between them, never settings anyone else sets.
INTERNAL_VARIABLES = ("SFT_SPACE_OUTCOMES", "SFT_SPACE_LAUNCHER_PID")


@dataclass
class GenerationSettings:
    """How replies are sampled."""

    # `app_bounds`: the narrower range the shared app offers (its sliders; Gradio enforces it for any client), so
    # one visitor cannot ask for replies that hold the hardware for minutes; the command line takes the wider one.
    max_new_tokens: int = setting(256, "Longest reply, in tokens.", bounds=(1, 131_072), app_bounds=(1, 1024))
    temperature: float = setting(0.0, "0 answers deterministically (greedy); higher values vary the wording.",
                                 bounds=(0, 5), app_bounds=(0, 1.5))
    top_p: float = setting(0.95, "Nucleus sampling: with a temperature above 0, sample only from the most likely "
                                 "tokens that together make up this probability (1 considers every token).",
                           bounds=(0.05, 1.0))
    system_prompt: str = setting("", "Instructions placed before the conversation (leave empty for none).")
    repetition_penalty: float = setting(1.0, "Above 1, makes the model less likely to repeat what it already wrote "
                                             "(1.1-1.3 ends most loops); 1 leaves it as trained.", bounds=(1.0, 2.0))
    # A base model that has not learned where your data's replies end often writes until the limit: on a CPU that
    # was minutes per comparison, spent on text nobody reads.
    compare_max_new_tokens: int = setting(128, "Longest reply of the base model shown beside the fine-tuned one, in "
                                               "tokens.", bounds=(1, 131_072), app_bounds=(1, 1024))
    compare_repetition_penalty: float = setting(1.15, "Repetition penalty of the base model's reply beside the "
                                                      "fine-tuned one (see repetition penalty): a base model often "
                                                      "repeats itself until the limit.", bounds=(1.0, 2.0))
    max_prompt_tokens: int = setting(4096, "Longest conversation the chat answers, in the model's tokens: the system "
                                           "prompt, every earlier turn and the new message, as the chat template "
                                           "writes them. A longer one is refused (start a new chat).",
                                     bounds=(1, 1_048_576))

    def __post_init__(self) -> None:
        check_bounds(self)

    def for_comparison(self) -> GenerationSettings:
        """The settings of the base model's reply beside the fine-tuned one: no longer than either limit."""
        return dataclasses.replace(self, max_new_tokens=min(self.max_new_tokens, self.compare_max_new_tokens),
                                   repetition_penalty=self.compare_repetition_penalty)


# The GGUF weights offered: the ones gguf's Python code writes (llama.cpp's k-quants need its compiled tools).
GGUF_QUANTS = ("f16", "q8_0", "q4_0")


@dataclass
class PublishSettings:
    """Where and how a run is published."""

    repo_id: str = setting("", "Hub repo to create or update, as owner/name (your user name or an organisation "
                               "you can write to).")
    private: bool = setting(True, "Make new repos private: only you (and your organisation) can see them.")
    update_existing: bool = setting(False, "If the repo already exists, push this run to it as a new commit "
                                           "(otherwise an existing repo is left alone and nothing is pushed).")
    merged: bool = setting(False, "Publish the adapter merged into the base model's weights: a full model that "
                                  "loads with transformers alone (larger upload).")
    merged_dtype: str = setting("auto", "Weights dtype of a merged model: auto keeps the base model's own (bf16 for "
                                        "most, half the size of float32); float32 reproduces a model trained in "
                                        "float32 (on CPU) exactly.", choices=("auto", "float32", "bfloat16", "float16"))
    demo_space: bool = setting(False, "Also create a small Gradio Space, OWNER/NAME-demo, where anyone who can see "
                                      "the model can chat with it.")
    gguf: bool = setting(False, "Also upload the model (adapter merged in) as a GGUF file, which llama.cpp, "
                                "Ollama and LM Studio run on a laptop; the card says how.")
    gguf_quant: str = setting("q8_0", "Weights of the GGUF file: f16 (exact up to rounding, largest), q8_0 (8-bit, "
                                      "half the size, close to f16) or q4_0 (4-bit, smallest, least exact).",
                              choices=GGUF_QUANTS)
    description: str = setting("", "One or two sentences on what the model is for, at the top of its model card.")


# The bench's model shapes (bench.py finds each one's numbers in catalog.py), and the embedded model's real weights.
BENCH_SHAPES = ("tiny", "smollm2-135m", "llama-3.2-1b", "qwen2.5-7b", "embedded")


@dataclass
class BenchSettings:
    """What to benchmark."""

    shape: str = setting("tiny", "Model shape, with random weights (tiny suits a CPU), or 'embedded' for the "
                                 "embedded default model's real weights.", choices=BENCH_SHAPES)
    steps: int = setting(10, "Optimizer steps measured per path, after the warm-up steps.", bounds=(1, 100_000))
    warmup_steps: int = setting(2, "Steps run first and not measured (allocation, kernel selection).",
                                bounds=(0, 10_000))
    max_length: int = setting(1024, "Maximum sequence length, the same for both paths.", bounds=(16, 1_048_576))
    seed: int = setting(0, "Seed for the synthetic data and the random weights.", bounds=(0, 4_294_967_295))

    def __post_init__(self) -> None:
        check_bounds(self)


@dataclass
class DoctorSettings:
    """What the doctor checks: short real trainings of each plan this machine supports."""

    quick: bool = setting(False, "Only the quick pass: the model below in each plan this machine supports. Without "
                                 "it, model shapes with random weights follow, up to the largest the memory "
                                 "estimate says fits, and the benchmark against TRL's defaults on a GPU.")
    model: str = setting("", "Model of the quick pass: the built-in SmolLM2-135M (empty), a local folder or a Hub id.",
                         metavar="MODEL")
    steps: int = setting(0, "Optimizer steps per training (0: 10 on a GPU, 3 on a CPU).", bounds=(0, 10_000))
    max_length: int = setting(0, "Tokens per training sequence (0: 1,024 on a GPU, the length the memory estimate "
                                 "was calibrated at; 128 on a CPU).", bounds=(0, 131_072))
    out: str = setting("", "Folder to write doctor.json and doctor.md (the table, to paste into an issue or "
                           "docs/BENCHMARKS.md) into; nothing is written when empty.", metavar="DIR")

    def __post_init__(self) -> None:
        check_bounds(self)
        if 0 < self.max_length < 32:
            raise UserError(f"max_length = {self.max_length} is too short for a conversation: use 32 or more, or 0 "
                            "(--max-length).")


PRESETS: dict[str, dict[str, Any]] = {
    # A first look in minutes: one pass, a small adapter, a brisk learning rate.
    "quick": {"epochs": 1.0, "lora_r": 8, "lora_alpha": 16, "learning_rate": 3e-4},
    # The fields' own defaults: a preset that repeated them could drift from them.
    "balanced": {},
    # More passes and capacity, a gentler rate: for datasets of a few thousand examples.
    "thorough": {"epochs": 5.0, "lora_r": 32, "lora_alpha": 64, "learning_rate": 1e-4},
}


def run_settings(preset: str = DEFAULT_PRESET, **values: Any) -> RunSettings:
    """RunSettings from a preset, with `values` (explicit choices) taking precedence."""
    if preset not in PRESETS:
        raise UserError(f"Unknown preset {preset!r}; choose one of {', '.join(PRESET_NAMES)}.")
    known = {f.name for f in dataclasses.fields(RunSettings)}
    unknown = sorted(set(values) - known)
    if unknown:
        raise UserError(f"Unknown setting(s): {', '.join(unknown)}. Known settings: {', '.join(sorted(known))}.")
    return RunSettings(**{**PRESETS[preset], **values, "preset": preset})


def settings_from_file(path: str | Path) -> dict[str, Any]:
    """Settings values from a JSON file: a flat object of field names, or a run.json (its "settings")."""
    try:
        values = json.loads(Path(path).read_text(encoding="utf-8"))
    except OSError as err:
        raise UserError(f"Could not read the settings file {path}: {err.strerror}.") from None
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise UserError(f"{path} is not valid JSON ({err}); write the settings as one JSON object.") from None
    if isinstance(values, dict) and isinstance(values.get("settings"), dict):
        values = values["settings"]
    if not isinstance(values, dict):
        raise UserError(f"{path} must hold one JSON object of settings, e.g. {{\"epochs\": 2}}.")
    return values


def field_help(settings_class: type, name: str) -> str:
    return settings_class.__dataclass_fields__[name].metadata["help"]


def field_type(spec: dataclasses.Field) -> type:
    """The Python type of a settings field (annotations are strings here, from `from __future__ import annotations`)."""
    return {"int": int, "float": float, "bool": bool}.get(str(spec.type), str)


def add_arguments(parser: argparse.ArgumentParser, settings_class: type, names: list[str] | None = None,
                  explicit_only: bool = False) -> None:
    """Add `--field-name` flags for the named fields (all of them by default), with help (and defaults) from the
    dataclass. A field's metadata may add `aliases` (other spellings of the flag) and `metavar`; fields that share
    an `exclusive` name are flags of which a command takes at most one.

    With `explicit_only`, a flag the user leaves out sets nothing, so presets and config files can fill it.
    """
    fields = {f.name: f for f in dataclasses.fields(settings_class)}
    exclusive: dict[str, Any] = {}
    for name in names if names is not None else list(fields):
        spec = fields[name]
        group = spec.metadata.get("exclusive")
        if group is not None and group not in exclusive:
            exclusive[group] = parser.add_mutually_exclusive_group()
        target = parser if group is None else exclusive[group]
        default = argparse.SUPPRESS if explicit_only else spec.default
        kwargs: dict[str, Any] = {"default": default, "help": spec.metadata["help"].replace("%", "%%"), "dest": name}
        if field_type(spec) is bool:
            kwargs["action"] = argparse.BooleanOptionalAction
        else:
            kwargs["type"] = field_type(spec)
            if "choices" in spec.metadata:
                kwargs["choices"] = spec.metadata["choices"]
            else:
                kwargs["metavar"] = spec.metadata.get("metavar", name.upper())
        target.add_argument(flag(name), *spec.metadata.get("aliases", ()), **kwargs)


def explicit_arguments(settings_class: type, namespace: argparse.Namespace) -> dict[str, Any]:
    """The settings values in parsed flags (with `explicit_only`, just the ones the user gave)."""
    names = {f.name for f in dataclasses.fields(settings_class)}
    return {k: v for k, v in vars(namespace).items() if k in names}


def from_arguments(settings_class: type, namespace: argparse.Namespace, **overrides: Any) -> Any:
    """Build the settings object from parsed flags (fields without a flag keep their defaults)."""
    return settings_class(**{**explicit_arguments(settings_class, namespace), **overrides})


def to_command_line(settings: Any, base: Any = None) -> list[str]:
    """Flags that reproduce `settings`: those that differ from `base` (by default, the preset's values)."""
    if base is None:
        base = run_settings(settings.preset) if isinstance(settings, RunSettings) else type(settings)()
    flags = []
    for spec in dataclasses.fields(settings):
        value = getattr(settings, spec.name)
        if spec.name in ("source", "preset") or value == getattr(base, spec.name):
            continue
        if isinstance(value, bool):
            flags.append(flag(spec.name) if value else flag(spec.name, "--no-"))
        else:
            flags += [flag(spec.name), str(value)]
    return flags


def train_command(settings: RunSettings, source: str | None = None) -> str:
    """The shell command that starts the same run: printed by the CLI, shown by the app. `source`: the data as
    the reader should name it, when that is not the path this machine read (an upload)."""
    return shlex.join(["python", "-m", "sft_space", "train", source or settings.source, "--preset", settings.preset,
                       *to_command_line(settings)])


# Python with uv, the version the Space runs: the job installs the pinned requirements (torch's CUDA wheels need no
# CUDA in the image, only the host's driver).
DEFAULT_JOB_IMAGE = "ghcr.io/astral-sh/uv:python3.11-bookworm"


@dataclass
class JobsSettings:
    """Training on Hugging Face Jobs (`train --jobs FLAVOR`, or the Train tab's choice): what a job runs in, what its
    start costs, and how long it may run. Set by whoever runs the app or the command line, through environment
    variables named after the fields (SFT_SPACE_JOBS_API=local, SFT_SPACE_JOBS_IMAGE, …)."""

    api: str = setting("hub", "Which Jobs API to call: 'hub' (Hugging Face's), or 'local', a stand-in that runs each "
                              "job as a process of this machine with each volume a local folder (for tests and "
                              "demos; ignored on a Space).", choices=("hub", "local"))
    image: str = setting(DEFAULT_JOB_IMAGE, "The container image a job runs in; it needs Python 3.11 (and uv or "
                                            "pip): the job installs requirements.txt unless the image has torch, "
                                            "transformers, trl, peft, accelerate and datasets already.")
    startup_minutes: float = setting(6.0, "Minutes a job is expected to take before its first step: scheduling, "
                                          "installing the requirements (torch's CUDA wheels are about 3 GB) and "
                                          "loading the model. Added to the estimate of the run's length and cost.",
                                     bounds=(0, 600))
    timeout_margin: float = setting(2.0, "A job's timeout is its start-up plus this many times the run's estimated "
                                         "training time (at least the estimate plus timeout_extra_minutes): a run "
                                         "that goes wrong cannot bill for hours.", bounds=(1, 100))
    timeout_extra_minutes: float = setting(15.0, "The least a job's timeout leaves beyond the estimate, in minutes "
                                                 "(short runs' estimates are the least exact).", bounds=(0, 10_000))
    stop_grace_seconds: float = setting(120.0, "After Stop asks a job's run to save and stop, how long to wait "
                                               "before cancelling the job (a second Stop cancels at once).",
                                        bounds=(0, 86_400))
    local_folder: str = setting("", "Where the local stand-in keeps its buckets and jobs (empty: .hub-jobs-local in "
                                    "the runs folder).")
    operator_pays: bool = setting(False, "Off a Space: let the app's page start Jobs runs billed to this machine's "
                                         "own Hugging Face token (HF_TOKEN or the saved login), for whoever may train "
                                         "here (who_may_train: anyone, unless set). Off by default, since anyone who "
                                         "reaches the app could otherwise rent GPUs on your account; off a Space a "
                                         "visitor has no sign-in of their own to pay with. Ignored on a Space, where "
                                         "each visitor pays with their own sign-in; the command line never needs it.")

    def __post_init__(self) -> None:
        check_bounds(self)


JOBS_ENV_PREFIX = ENV_PREFIX + "JOBS_"
ENVIRONMENT[JOBS_ENV_PREFIX] = JobsSettings
