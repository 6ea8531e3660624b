"""Command line: a thin skin over the same core the app uses.

    python -m sft_space validate DATA [--model M] [--max-length N] [--keep-duplicates] [--json]
    python -m sft_space preview DATA [--model M] [-n N]
    python -m sft_space train DATA [--preset P] [--epochs E | --max-steps S] [...] [--config FILE]
    python -m sft_space train --resume RUN_DIR
    python -m sft_space chat RUN_DIR [--prompt TEXT] [--compare]
    python -m sft_space push RUN_DIR --repo OWNER/NAME [--private | --public] [--merged] [--gguf [--quant Q]]
                                     [--demo-space]
    python -m sft_space export RUN_DIR (--merged OUT_DIR | --adapter OUT_DIR | --zip FILE | --gguf FILE [--quant Q])
    python -m sft_space bench [--shape NAME] [--steps N] [--json]
    python -m sft_space doctor [--quick] [--json] [--out DIR]

Exit status: 0 all rows valid (validate) or the run finished (train); 1 some rows invalid, the source unusable,
or the run failed or was refused; 2 bad command-line usage; 130 the run was stopped (Ctrl+C or SIGTERM).
Bad data never produces a traceback: problems are printed as the person can act on them.

`train` says what the run does as events (events.py): one line each on stdout, marked with events.PREFIX, for a
supervising process or a Hugging Face Job's log, and the same events rendered for people on stderr, one flushed
line each. The first Ctrl+C or SIGTERM stops the run at the end of the current step, saving a checkpoint and the
adapter, and a second Ctrl+C aborts at once.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shlex
import signal
import sys
import threading
import time
from typing import Any, Iterator

from . import checks, data, events, formats, models, render
from .distributed import EXIT_STOPPED
from .errors import UserError
from .settings import (DEFAULT_PRESET, BenchSettings, DataSettings, DoctorSettings, GenerationSettings, PublishSettings,
                       RunSettings, add_arguments, explicit_arguments, field_help, from_arguments, from_environment,
                       run_settings, settings_from_file, train_command)

MAX_LISTED_PROBLEMS = 50
STOPPING_MESSAGE = "Stopping: saving a checkpoint and the adapter…"


def _quiet_libraries() -> None:
    import transformers

    transformers.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()


def _data_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("source", metavar="DATA", help=field_help(DataSettings, "source"))
    parser.add_argument("--model", default=None, help=f"Model whose tokenizer and chat template to use: "
                        f"{models.EMBEDDED_MODEL} (the default when installed), a local folder, or a Hub id.")
    add_arguments(parser, DataSettings, ["columns", "hub_config", "hub_split", "max_length", "max_rows", "max_file_mb",
                                         "max_row_kb", "max_messages"])


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m sft_space", description="SFT Space: check data, fine-tune, chat, publish.")
    commands = parser.add_subparsers(dest="command", required=True)
    validate = commands.add_parser("validate", help="Check a dataset and print its problems and statistics.")
    _data_arguments(validate)
    add_arguments(validate, DataSettings, ["keep_duplicates"])
    validate.add_argument("--json", action="store_true", help="Print exactly one JSON object (for scripts).")
    preview = commands.add_parser("preview", help="Show examples as the model sees them, trained tokens marked ⟦like this⟧.")
    _data_arguments(preview)
    preview.add_argument("-n", type=int, default=3, help="How many examples to show (default 3).")
    _train_parser(commands)
    _chat_parser(commands)
    _publish_parsers(commands)
    _bench_parser(commands)
    _doctor_parser(commands)
    return parser


def _train_parser(commands: Any) -> None:
    train = commands.add_parser("train", help="Fine-tune a LoRA adapter on a dataset.",
                                description="Fine-tune a LoRA adapter. Settings come from the preset, then --config, "
                                            "then the flags given here.")
    # Absent, not None, when not given: the data named in --config then stands.
    train.add_argument("source", metavar="DATA", nargs="?", default=argparse.SUPPRESS,
                       help=field_help(RunSettings, "source"))
    train.add_argument("--config", metavar="FILE", help="JSON file of settings (field names as keys), or a run.json.")
    train.add_argument("--resume", metavar="RUN_DIR", help="Continue a stopped or interrupted run from its last "
                       "checkpoint, with its own settings.")
    train.add_argument("--run-name", help="Name of the run folder (default: date, time and data file name).")
    # The app's supervisor names the visitor a new run belongs to; not for people.
    train.add_argument("--owner", help=argparse.SUPPRESS)
    _launch_arguments(train)
    _jobs_arguments(train)
    # Every other setting is a flag made from its field (the data is the positional DATA above).
    add_arguments(train, RunSettings, [name for name in RunSettings.__dataclass_fields__ if name != "source"],
                  explicit_only=True)


def _launch_arguments(train: argparse.ArgumentParser) -> None:
    """torchrun's flags: the processes of a run, started through torch's launcher (see `distributed.launch`)."""
    launch = train.add_argument_group("several processes (torchrun's flags)")
    launch.add_argument("--nproc-per-node", type=int, default=0, metavar="N",
                        help="Train with N processes on this machine, one per GPU (default: every CUDA GPU; 1 without "
                             "GPUs; SFT_SPACE_PROCESSES sets another default).")
    launch.add_argument("--nnodes", type=int, default=1, metavar="M",
                        help="Machines training this run together; start the same command on each (default 1).")
    launch.add_argument("--node-rank", type=int, default=None, metavar="R",
                        help="This machine's number, 0 to M-1: the machines then meet at node 0's --rdzv-endpoint, "
                             "which it hosts (without it, they meet in torch's c10d rendezvous and are numbered as "
                             "they join).")
    launch.add_argument("--rdzv-endpoint", default="", metavar="HOST:PORT",
                        help="Where the machines meet: an address and free port of the first machine that every "
                             "machine reaches.")


def _jobs_arguments(train: argparse.ArgumentParser) -> None:
    """Training on Hugging Face Jobs (see `hub_jobs`)."""
    train.add_argument("--jobs", metavar="FLAVOR", help="Train on Hugging Face Jobs, on this hardware flavor (e.g. "
                       "t4-small, l4x1, a100-large), billed by the second to the account of HF_TOKEN (or 'hf auth "
                       "login'): the cost is said before the job starts. With --resume, the flavor of the new job.")
    train.add_argument("--jobs-timeout", metavar="TIME", help="With --jobs: the longest the job may run (seconds, or "
                       "e.g. 90m, 2h); default: the estimated length with a margin.")
    train.add_argument("--jobs-nodes", type=int, default=1, metavar="N", help="With --jobs: train on N machines of "
                       "that flavor, one job each in one network group, all billed (default 1). A resume keeps the "
                       "run's number of machines.")
    # Inside a job: the stop request that Stop writes into the run's bucket folder.
    train.add_argument("--stop-file", help=argparse.SUPPRESS)
    # The app hands a visitor's token to their Jobs run on stdin: never a command line, an environment or a file
    # (on a Space, HF_TOKEN is the owner's).
    train.add_argument("--token-on-stdin", action="store_true", help=argparse.SUPPRESS)
    # A program follows this run through its stdout (the app's supervisor, a Job's log): its event lines are printed
    # even where stdout is a terminal (a container's log may be one).
    train.add_argument("--events", action="store_true", help=argparse.SUPPRESS)


def _chat_parser(commands: Any) -> None:
    chat = commands.add_parser("chat", help="Talk to a trained run (or compare it with its base model).")
    chat.add_argument("run_dir", metavar="RUN_DIR", help="A run folder, e.g. runs/20261125-101500-captain_byte.")
    chat.add_argument("--prompt", help="Answer this one message and exit (otherwise: an interactive loop).")
    chat.add_argument("--compare", action="store_true", help="Also answer with the base model (adapter off).")
    add_arguments(chat, GenerationSettings)


def _publish_parsers(commands: Any) -> None:
    push = commands.add_parser(
        "push", help="Publish a run to the Hugging Face Hub with a model card (and, optionally, a demo Space).",
        description="Publish a run to the Hub. The token comes from HF_TOKEN or a saved 'hf auth login'; there is "
                    "no --token flag, because a flag's value stays in your shell history.")
    push.add_argument("run_dir", metavar="RUN_DIR", help="A finished (or stopped) run folder.")
    push.add_argument("--repo", dest="repo_id", required=True, metavar="OWNER/NAME",
                      help=field_help(PublishSettings, "repo_id"))
    visibility = push.add_mutually_exclusive_group()
    visibility.add_argument("--private", dest="private", action="store_true", default=True,
                            help=field_help(PublishSettings, "private") + " (the default)")
    visibility.add_argument("--public", dest="private", action="store_false", help="Make new repos public.")
    add_arguments(push, PublishSettings, ["update_existing", "merged", "merged_dtype", "demo_space", "description"])
    push.add_argument("--gguf", action="store_true", help=field_help(PublishSettings, "gguf"))
    _quant_argument(push)
    export = commands.add_parser("export", help="Write a run's adapter, or the merged model, to a folder, a zip or "
                                                "a GGUF file.")
    export.add_argument("run_dir", metavar="RUN_DIR", help="A finished (or stopped) run folder.")
    target = export.add_mutually_exclusive_group(required=True)
    target.add_argument("--merged", metavar="OUT_DIR", help="The base model with the adapter merged in (safetensors, "
                        "in the base model's dtype): loads with transformers alone.")
    target.add_argument("--adapter", metavar="OUT_DIR", help="The adapter with its model card, settings and metrics.")
    target.add_argument("--zip", metavar="FILE", help="The same as --adapter, as one zip file.")
    target.add_argument("--gguf", metavar="FILE", help="The merged model as one GGUF file (weights as --quant says), "
                        "with its tokenizer and chat template: runs in llama.cpp, Ollama and LM Studio.")
    add_arguments(export, PublishSettings, ["merged_dtype"])
    _quant_argument(export)


def _quant_argument(parser: argparse.ArgumentParser) -> None:
    spec = PublishSettings.__dataclass_fields__["gguf_quant"]
    parser.add_argument("--quant", dest="gguf_quant", choices=spec.metadata["choices"], default=spec.default,
                        help=spec.metadata["help"] + f" With --gguf; default {spec.default}.")


def _doctor_parser(commands: Any) -> None:
    doctor = commands.add_parser("doctor", help="Check that this machine trains: short real trainings of each plan "
                                                "it supports, with speed and memory measured.",
                                 description="Print the machine (GPUs, versions, precisions, attention), then train "
                                             "a few steps of each plan this hardware supports and report each as a "
                                             "row: tokens/s, peak memory measured against the estimate, the loss "
                                             "before and after, passed, failed or skipped with the reason. Exit "
                                             "status 1 when a row failed.")
    add_arguments(doctor, DoctorSettings)
    doctor.add_argument("--json", action="store_true", help="Print exactly one JSON object: the machine and the rows.")


def _bench_parser(commands: Any) -> None:
    bench = commands.add_parser("bench", help="Measure our default training path against TRL's defaults.",
                                description="Train the default path and a plain TRL SFTTrainer (TRL's defaults) on "
                                            "the same synthetic data and model shape; print tokens/s, peak memory, "
                                            "MFU and the speed-up.")
    add_arguments(bench, BenchSettings)
    bench.add_argument("--json", action="store_true", help="Print exactly one JSON object (for scripts).")


def _report(args: argparse.Namespace, on_progress: Any = None) -> checks.Report:
    """The report alone: the examples themselves are not kept (memory stays that of the counts)."""
    settings = from_arguments(DataSettings, args)
    data.check_source_exists(settings.source)
    tokenizer = models.load_tokenizer(args.model or models.default_model())
    return checks.check_data(settings, tokenizer, on_progress, keep_examples=0)


# Below this many rows a check takes about a second: no progress line.
PROGRESS_FROM_ROWS = 2000
# Off a terminal (a log file, a CI job) the line is written anew at most this often, not redrawn.
PLAIN_PROGRESS_SECONDS = 5.0


class ProgressLine:
    """The check's progress on stderr (stdout holds the report, or --json's one object): redrawn in place (\\r) on
    a terminal; elsewhere a plain line now and then and the last one. Called as `on_progress(done, total or
    None)`, as `checks.check_data` calls it."""

    def __init__(self) -> None:
        self.shown = 0  # characters of the line now on the terminal
        self.last_plain = float("-inf")  # when a plain line was last written

    def __call__(self, done: int, total: int | None) -> None:
        if total is not None and total < PROGRESS_FROM_ROWS:
            return
        text = (f"Reading: {done:,} rows" if total is None
                else f"Checking: {done:,} of {total:,} rows ({done / max(total, 1):.0%})")
        stream, now = sys.stderr, time.monotonic()
        if stream.isatty():
            stream.write("\r" + text.ljust(self.shown))
            self.shown = len(text)
        elif done == total or now - self.last_plain >= PLAIN_PROGRESS_SECONDS:
            stream.write(text + "\n")
            self.last_plain = now
        stream.flush()

    def close(self) -> None:
        """End a redrawn line, so that what follows starts on a line of its own."""
        if self.shown:
            sys.stderr.write("\n")
            sys.stderr.flush()
            self.shown = 0


def _format_distribution(name: str, values: dict[str, Any]) -> str:
    return f"  {name:<22}" + "".join(f"{values[k]:>8}" for k in ("min", "p10", "median", "p90", "max"))


def print_report(report: checks.Report, out: Any = None) -> None:
    out = out or sys.stdout
    stats = report.stats()
    print(f"{report.source}: {formats.FORMAT_NAMES[report.format]}, {report.rows} rows, "
          f"{report.valid_rows} valid, {report.invalid_rows} with errors", file=out)
    if report.errors:
        counts = ", ".join(f"{code} ×{n}" for code, n in sorted(report.error_counts().items()))
        print(f"\nErrors ({counts}):", file=out)
        for problem in report.errors[:MAX_LISTED_PROBLEMS]:
            print(f"  [{problem.code}] {problem.message}", file=out)
        if len(report.errors) > MAX_LISTED_PROBLEMS:
            print(f"  … and {len(report.errors) - MAX_LISTED_PROBLEMS} more (use --json for all).", file=out)
    if report.warnings:
        print(f"\nWarnings ({len(report.warnings)}):", file=out)
        for problem in report.warnings[:MAX_LISTED_PROBLEMS]:
            print(f"  [{problem.code}] {problem.message}", file=out)
    print(f"\nStatistics over {stats['examples']} valid examples:", file=out)
    print(f"  {'':<22}" + "".join(f"{k:>8}" for k in ("min", "p10", "median", "p90", "max")), file=out)
    print(_format_distribution("turns per example", stats["turns_per_example"]), file=out)
    print(_format_distribution("tokens per example", stats["tokens_per_example"]), file=out)
    print(_format_distribution("trained tokens", stats["trained_tokens_per_example"]), file=out)
    print(f"  total trained tokens: {stats['total_trained_tokens']} of {stats['total_tokens']}; "
          f"rows over the maximum length ({report.max_length}): {stats['rows_over_max_length']}", file=out)
    repeats = report.problem_counts().get("duplicate", 0)
    if report.duplicates_dropped:
        print(f"  exact duplicates: {report.duplicates_dropped} repeat(s) dropped before training, the first of "
              "each kept (--keep-duplicates keeps them)", file=out)
    elif repeats:
        print(f"  exact duplicates: {repeats} repeat(s) kept for training (--keep-duplicates)", file=out)


def cmd_validate(args: argparse.Namespace) -> int:
    progress = ProgressLine()
    try:
        report = _report(args, progress)
    finally:
        progress.close()
    if args.json:
        print(json.dumps(report.to_dict(), ensure_ascii=False))
    else:
        print_report(report)
    return 1 if report.errors else 0


def cmd_preview(args: argparse.Namespace) -> int:
    if args.n < 1:
        raise UserError("-n must be at least 1.")
    settings = from_arguments(DataSettings, args)
    data.check_source_exists(settings.source)
    tokenizer = models.load_tokenizer(args.model or models.default_model())
    report = checks.check_data(settings, tokenizer, keep_examples=args.n)
    colour = sys.stdout.isatty()
    shown = report.valid_examples[: args.n]
    for number, example in enumerate(shown, start=1):
        rendered = render.render_example(tokenizer, example)
        print(f"── example {number} of {report.valid_rows} (row {example.row}) · {rendered.n_tokens} tokens, "
              f"{rendered.n_trained} trained {render.TRAINED_OPEN}marked{render.TRAINED_CLOSE} ──")
        print(render.to_marked_text(rendered, colour=colour))
    if report.errors:
        print(f"({report.invalid_rows} invalid rows not shown; run 'python -m sft_space validate {args.source}' for details)",
              file=sys.stderr)
    if not shown:
        raise UserError(f"{report.source}: no valid example to show.")
    return 0


def train_settings(args: argparse.Namespace) -> RunSettings:
    """Preset, then --config, then explicit flags: the later wins. The runs folder, when none of them names it,
    is the operator's (SFT_SPACE_RUNS), as in the app."""
    values = settings_from_file(args.config) if args.config else {}
    values.update(explicit_arguments(RunSettings, args))
    values.setdefault("output_dir", from_environment().runs)
    if not values.get("source"):
        raise UserError("Name the data to train on (a file, folder or Hub dataset id), or --resume a run.")
    preset = values.pop("preset", None) or DEFAULT_PRESET
    return run_settings(preset, **values)


def progress_line(point: dict[str, Any], headline: events.Headline) -> str:
    """One line per step or evaluation: a bar, then where the run is (`events.progress_text`)."""
    done = point["step"] / point["max_steps"] if point["max_steps"] else 0
    bar = "█" * round(done * 20) + "·" * (20 - round(done * 20))
    return f"{bar} {events.progress_text(point, headline)}"


class Rendering:
    """The run's events as lines for people on stderr: what its status events say, a progress line per step or
    evaluation (its headline over the steps seen), and the speed note after the first steps. The terminal event is
    the summary `cmd_train` prints, or the refusal `main` prints."""

    def __init__(self, say: Any, speed: Any):
        self.say = say
        self.speed = speed
        self.points: list[dict[str, Any]] = []
        self.end: dict[str, Any] | None = None

    def __call__(self, event: dict[str, Any]) -> None:
        kind = event["event"]
        if kind in ("step", "evaluation"):
            self.points.append(event)
            self.say(progress_line(event, events.headline_of(self.points)))
            if kind == "step":
                self.speed(event)
        elif kind in events.TERMINAL:
            self.end = event
        elif (text := events.said(event)) is not None:
            self.say(text)


@contextlib.contextmanager
def stop_on_signals() -> Iterator[threading.Event]:
    """An event the first Ctrl+C (SIGINT) or SIGTERM sets, so that the run stops at the end of its current step;
    a second one raises KeyboardInterrupt at once. The previous handlers come back after the block."""
    stop = threading.Event()

    def request_stop(signum: int, frame: Any) -> None:
        if stop.is_set():
            raise KeyboardInterrupt
        stop.set()
        # os.write, not print: a handler that prints while the interrupted code prints fails (reentrant call).
        os.write(sys.stderr.fileno(), f"\n{STOPPING_MESSAGE}\n".encode())

    previous = {number: signal.signal(number, request_stop) for number in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield stop
    finally:
        for number, handler in previous.items():
            signal.signal(number, handler)


def events_for_a_program(args: argparse.Namespace) -> bool:
    """Whether `train` prints its event lines on stdout: for a program reading it (`--events`, which the app's
    supervisor and a Job's script pass; or a pipe or a file), not on a person's terminal, where the same events are
    the lines on stderr."""
    return args.events or not sys.stdout.isatty()


def _status_line(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def _after_stop(folder: Any) -> None:
    """How to go on with a stopped run: the exact command, with its real folder."""
    if folder is not None and folder.last_checkpoint() is not None:
        _status_line(f"Continue with: python -m sft_space train --resume {shlex.quote(str(folder.path))}")


class SpeedReport:
    """Says once, after the run's first steps, how long it takes at the speed it trains at, and warns when this
    machine trains much slower than its usual figure for the model (`estimate.live_estimate`)."""

    def __init__(self, say: Any, folder_of: Any):
        self.say = say
        self.folder_of = folder_of  # the run folder once it exists, else None
        self.entries: list[dict[str, Any]] = []
        self.said = False

    def __call__(self, entry: dict[str, Any]) -> None:
        from . import estimate
        from .hardware import detect_hardware

        self.entries.append(entry)
        folder = self.folder_of()
        if self.said or folder is None or estimate.live_estimate(self.entries, None) is None:
            return
        self.said = True
        live = estimate.live_estimate(self.entries, estimate.usual_throughput(detect_hardware(), folder.read()))
        if live.left_seconds <= 0:
            return  # measured at its last step: nothing left to say it of
        # Indented, under the progress lines: a note on them, not a status (the app's page shows its own).
        self.say(f"  {estimate.describe_live(live)}")
        if warning := estimate.slower_warning(live):
            self.say(f"  Warning: {warning}")


def _prepare_model(name: str, say: Any) -> None:
    """The embedded model's one-time conversion, said with its stages (nothing when it is done already)."""
    if models.needs_preparation(name):
        models.convert_embedded_model(say)


def cmd_train(args: argparse.Namespace) -> int:
    """Train (or resume) a run: 0 finished, 130 stopped, 1 failed or refused (UserError, see `main`)."""
    from . import distributed, hub_jobs, runs
    from .train import TrainingStopped, train
    from .training_data import InvalidRows

    if args.jobs or (args.resume and hub_jobs.is_job_run(runs.RunFolder.open(args.resume))):
        _quiet_libraries()
        return cmd_train_on_jobs(args)
    launch = distributed.Launch(distributed.processes_wanted(args.nproc_per_node), args.nnodes, args.node_rank,
                                args.rdzv_endpoint)
    if launch.needed and not distributed.started_by_a_launcher():
        return distributed.launch(["-m", "sft_space", *args.arguments], launch)
    _quiet_libraries()
    # With several processes the main one speaks for all.
    main = distributed.is_main()
    say = _status_line if main else (lambda message: None)
    started: list[runs.RunFolder] = []
    rendering = Rendering(say, SpeedReport(say, lambda: started[0] if started else None))
    log = events.EventLog(echo=main and events_for_a_program(args), listeners=[rendering] if main else [])
    try:
        request = _train_request(args, main)
        request.stop_event = getattr(args, "stop_event", None) or request.stop_event
        if args.stop_file:
            hub_jobs.watch_stop_file(args.stop_file, request.stop_event)
        request.on_folder = started.append
        request.events = log
        train(request)
    except InvalidRows as err:
        if args.owner:  # a run the app started: its page has its own words for the choice
            raise
        raise UserError(f"{err.problem} {checks.invalid_rows_advice(err.valid_rows, checks.SKIP_ON_COMMAND_LINE)}"
                        ) from None
    except TrainingStopped as err:
        _status_line(str(err))
        return EXIT_STOPPED
    except KeyboardInterrupt:
        _status_line("Interrupted.")
        _after_stop(started[0] if started else None)
        return EXIT_STOPPED
    except UserError as err:
        # Refused before the run began (its settings, the folder to resume): the stream still ends, saying why.
        log.emit(events.Failed(reason=str(err)))
        raise
    if not main:
        return EXIT_STOPPED if request.stop_event.is_set() else 0
    return print_outcome(rendering.end)


def _train_request(args: argparse.Namespace, main: bool) -> Any:
    """The request of a new run (its settings from the preset, --config and flags) or of a resume."""
    from . import runs
    from .train import TrainRequest

    if args.resume:
        folder = runs.RunFolder.open(args.resume)
        if args.run_name not in (None, folder.run_id):
            raise UserError(f"--run-name names a new run; the resumed run keeps its folder ({folder.run_id}).")
        return TrainRequest(RunSettings(), resume=args.resume)
    settings = train_settings(args)
    if main:
        print(train_command(settings), flush=True)
    return TrainRequest(settings, run_id=args.run_name, owner=args.owner)


def print_outcome(end: dict[str, Any]) -> int:
    """The summary of a run that ended in its folder (its terminal event): where it is, its headline, its time and
    speed, its adapter and what to run next. The exit status: 0 finished, EXIT_STOPPED stopped."""
    from . import runs

    folder = runs.RunFolder(end["run_dir"])
    print(f"Run {end['event']}: {folder.path}")
    if end["event"] == "stopped":
        print(f"  {end['reason']}")
    final = end.get("final_metrics") or {}
    if final.get("step") is not None:
        headline = events.Headline(final.get("loss_smoothed"), final.get("eval_loss")).text() or "no loss logged"
        timing = f"{final.get('train_runtime_seconds')} s"
        if final.get("evaluation_seconds"):
            timing += f" (evaluation {final['evaluation_seconds']} s)"
        print(f"  {headline}, {timing}, {final.get('tokens_per_second')} tokens/s")
    if folder.has_adapter:
        print(f"  adapter: {folder.adapter_path}")
        print(f"  chat with it: python -m sft_space chat {shlex.quote(str(folder.path))} --compare")
    if end["event"] == "stopped":
        _after_stop(folder)
        return EXIT_STOPPED
    return 0


def cmd_train_on_jobs(args: argparse.Namespace) -> int:
    """Train (or resume, or follow again) a run in a Hugging Face Job: its cost first, then the job's events as they
    come in its log, on stdout as a run here says them and rendered for people on stderr, and its record at the
    end. The first Ctrl+C asks the run to save and stop; a second cancels the job."""
    from . import hub_jobs, runs

    rendering = Rendering(_status_line, lambda event: None)
    log = events.EventLog(echo=events_for_a_program(args), listeners=[rendering])
    try:
        run, jobs = _start_on_jobs(args, lambda message: log.emit(events.Status(message)))
    except UserError as err:
        log.emit(events.Failed(reason=str(err)))
        raise

    def stop_when_asked() -> None:
        args.stop_event.wait()
        run.request_stop()

    def relay(event: dict[str, Any]) -> None:
        if log.echo:
            print(events.PREFIX + json.dumps(event, ensure_ascii=False), flush=True)
        rendering(event)

    threading.Thread(target=stop_when_asked, name="stop-job", daemon=True).start()
    listener: Any = relay
    while True:
        try:
            record = run.follow(listener, jobs, on_output=_status_line)
            break
        except KeyboardInterrupt:
            _status_line("Cancelling the job…")
            run.cancel()
            listener = None
    print(f"Run {record['status']}: {run.folder.path}")
    print(f"  {hub_jobs.describe_job(record['job'])}")
    if record.get("error"):
        print(f"  {record['error']}")
    if run.folder.has_adapter:
        print(f"  adapter: {run.folder.adapter_path}")
        print(f"  chat with it: python -m sft_space chat {shlex.quote(str(run.folder.path))} --compare")
    if record["status"] == runs.FINISHED:
        return 0
    if record["status"] == runs.STOPPED:
        _status_line(f"Continue with: python -m sft_space train --resume {shlex.quote(str(run.folder.path))}")
        return EXIT_STOPPED
    return 1


def _start_on_jobs(args: argparse.Namespace, say: Any) -> tuple[Any, Any]:
    """The run's job, started (or, for a resume, followed again or started anew), and the Jobs settings."""
    from . import hub_jobs, publish, runs

    jobs = hub_jobs.jobs_settings()
    timeout = hub_jobs.parse_timeout(args.jobs_timeout)
    token = (sys.stdin.readline().strip() or None) if args.token_on_stdin else publish.resolve_token()
    if jobs.api == "hub" and not token:
        from .access import running_on_space

        if running_on_space():  # a run the app resumes from its Runs tab: the owner's HF_TOKEN is never used
            raise UserError("A run on Hugging Face Jobs is resumed with your own sign-in: use the Train tab's "
                            "Hugging Face Jobs, Resume on Jobs.")
        raise UserError("Training on Hugging Face Jobs is billed to your account: set HF_TOKEN to a token that may "
                        "start Jobs, or run 'hf auth login'.")
    if args.resume:
        folder = runs.RunFolder.open(args.resume)
        api = hub_jobs.jobs_api(jobs, folder.path.parent, token)
        return hub_jobs.resume_run(api, token, folder, jobs, args.jobs, timeout, on_status=say), jobs
    settings = train_settings(args)
    nodes = f" --jobs-nodes {args.jobs_nodes}" if args.jobs_nodes != 1 else ""
    _status_line(f"{train_command(settings)} --jobs {shlex.quote(args.jobs)}{nodes}")
    api = hub_jobs.jobs_api(jobs, settings.output_dir, token)
    return hub_jobs.start_run(api, token, settings, args.jobs, settings.output_dir, jobs, args.run_name, args.owner,
                              timeout, on_status=say, nodes=hub_jobs.check_nodes(args.jobs_nodes)), jobs


def cmd_chat(args: argparse.Namespace) -> int:
    from .chat import load_chat_model

    from . import card, runs

    settings = from_arguments(GenerationSettings, args)
    _prepare_model(card.base_model_of(runs.RunFolder.open(args.run_dir).read()) or "", _status_line)
    print("Loading the model…", file=sys.stderr)
    chat_model = load_chat_model(args.run_dir)

    def answer(history: list[dict[str, str]]) -> str:
        reply = chat_model.reply(history, settings)
        if args.compare:
            base = chat_model.reply(history, settings, use_adapter=False)
            print(f"base:       {base}\nfine-tuned: {reply}")
        else:
            print(reply)
        return reply

    if args.prompt is not None:
        answer([{"role": "user", "content": args.prompt}])
        return 0
    history: list[dict[str, str]] = []
    print("Type a message (an empty line or Ctrl+D ends the chat).", file=sys.stderr)
    while True:
        try:
            message = input("> ").strip()
        except (EOFError, KeyboardInterrupt):
            break
        if not message:
            break
        history.append({"role": "user", "content": message})
        history.append({"role": "assistant", "content": answer(history)})
    return 0


def _print_progress(fraction: float, message: str) -> None:
    print(f"[{fraction:4.0%}] {message}", file=sys.stderr)


def cmd_push(args: argparse.Namespace) -> int:
    from . import publish

    settings = from_arguments(PublishSettings, args)
    result = publish.push(args.run_dir, settings, publish.resolve_token(), on_progress=_print_progress)
    print(f"Model: {result.model_url}")
    if result.space_url:
        print(f"Chat demo: {result.space_url}")
    for note in result.notes:
        print(f"Note: {note}")
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    from . import publish

    if args.zip:
        print(f"Wrote {publish.export_zip(args.run_dir, args.zip)}")
    elif args.gguf:
        path = publish.export_gguf(args.run_dir, args.gguf, args.gguf_quant, on_progress=_print_progress)
        print(f"Wrote {path} ({path.stat().st_size / 1e6:.0f} MB)")
        print(f"  chat with it: llama-cli -m {shlex.quote(str(path))}")
    else:
        settings = PublishSettings(merged=args.merged is not None, merged_dtype=args.merged_dtype)
        print(f"Wrote {publish.export_folder(args.run_dir, args.merged or args.adapter, settings)}")
    return 0


def cmd_doctor(args: argparse.Namespace) -> int:
    from . import doctor

    settings = from_arguments(DoctorSettings, args)
    result = doctor.run_doctor(settings, on_status=_status_line)
    if settings.out:
        for path in doctor.write_results(result, settings.out):
            _status_line(f"Wrote {path}")
    print(json.dumps(result) if args.json else doctor.format_report(result))
    return 1 if doctor.failed(result) else 0


def cmd_bench(args: argparse.Namespace) -> int:
    from .bench import format_report, run_bench

    result = run_bench(from_arguments(BenchSettings, args))
    print(json.dumps(result) if args.json else format_report(result))
    return 0


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    # What a run on several processes starts each of them with.
    args.arguments = list(sys.argv[1:] if argv is None else argv)
    with contextlib.ExitStack() as stack:
        # Before the libraries load (seconds): a Ctrl+C from the start stops the run cleanly.
        args.stop_event = stack.enter_context(stop_on_signals()) if args.command == "train" else None
        code = _run_command(args)
    if args.command == "train":
        from . import distributed
        from .train import stages_left_running

        code = distributed.exit_status(code)

        if stages_left_running():
            # A stop left a stage (loading a model) running in native code, which aborts the interpreter's exit
            # ("terminate called without an active exception", status -6). The run's record is written and its
            # lock released: leave at once, with the status the stop deserves.
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(code)
    return code


def _run_command(args: argparse.Namespace) -> int:
    try:
        if args.command != "train":  # train quiets them once it knows it loads them (a launcher of processes does not)
            _quiet_libraries()
        commands = {"validate": cmd_validate, "preview": cmd_preview, "train": cmd_train, "chat": cmd_chat,
                    "push": cmd_push, "export": cmd_export, "bench": cmd_bench,
                    "doctor": cmd_doctor}
        return commands[args.command](args)
    except KeyboardInterrupt:
        if args.command != "train":
            raise
        _status_line("Interrupted.")
        return EXIT_STOPPED
    except UserError as err:
        if getattr(args, "json", False):
            print(json.dumps(json_refusal(args, str(err))))
        else:
            print(f"error: {err}", file=sys.stderr)
        return 1


def json_refusal(args: argparse.Namespace, message: str) -> dict[str, Any]:
    """The one JSON object --json prints when a command is refused: each command's own shape, so that a script
    reads a refusal where it reads a result (validate's report; the bench's settings)."""
    if args.command == "bench":
        return {"error": message, "settings": explicit_arguments(BenchSettings, args)}
    if args.command == "doctor":
        return {"error": message, "machine": None, "rows": []}
    return checks.Report.unusable(getattr(args, "source", ""), message).to_dict()
