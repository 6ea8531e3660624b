"""Command line: a thin skin over the same core the app uses.

    python -m sft_space validate DATA [--model M] [--max-length N] [--json]
    python -m sft_space preview DATA [--model M] [-n N]

Exit status: 0 all rows valid; 1 some rows invalid or the source unusable; 2 bad command-line usage.
Bad data never produces a traceback: problems are printed as the person can act on them.
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

from . import checks, data, models, render
from .errors import UserError
from .settings import DataSettings, add_arguments, from_arguments

MAX_LISTED_PROBLEMS = 50


def _quiet_libraries() -> None:
    import transformers

    transformers.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()


def _data_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("source", metavar="DATA", help=DataSettings.__dataclass_fields__["source"].metadata["help"])
    parser.add_argument("--model", default=None, help=f"Model whose tokenizer and chat template to use: "
                        f"{models.EMBEDDED_MODEL} (the default when installed), a local folder, or a Hub id.")
    add_arguments(parser, DataSettings, ["columns", "hub_config", "hub_split", "max_length"])


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m sft_space", description="SFT Space: check data, fine-tune, chat, publish.")
    commands = parser.add_subparsers(dest="command", required=True)
    validate = commands.add_parser("validate", help="Check a dataset and print its problems and statistics.")
    _data_arguments(validate)
    validate.add_argument("--json", action="store_true", help="Print exactly one JSON object (for scripts).")
    preview = commands.add_parser("preview", help="Show examples as the model sees them, trained tokens marked ⟦like this⟧.")
    _data_arguments(preview)
    preview.add_argument("-n", type=int, default=3, help="How many examples to show (default 3).")
    return parser


def _report(args: argparse.Namespace) -> checks.Report:
    settings = from_arguments(DataSettings, args)
    tokenizer = models.load_tokenizer(args.model or models.default_model())
    return checks.check_data(settings, tokenizer)


def _format_distribution(name: str, values: dict[str, Any]) -> str:
    return f"  {name:<22}" + "".join(f"{values[k]:>8}" for k in ("min", "p10", "median", "p90", "max"))


def print_report(report: checks.Report, out: Any = None) -> None:
    out = out or sys.stdout
    stats = report.stats()
    print(f"{report.source}: {data.FORMAT_NAMES[report.format]}, {report.rows} rows, "
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


def cmd_validate(args: argparse.Namespace) -> int:
    report = _report(args)
    if args.json:
        print(json.dumps(report.to_dict(), ensure_ascii=False))
    else:
        print_report(report)
    return 1 if report.errors else 0


def cmd_preview(args: argparse.Namespace) -> int:
    if args.n < 1:
        raise UserError("-n must be at least 1.")
    settings = from_arguments(DataSettings, args)
    tokenizer = models.load_tokenizer(args.model or models.default_model())
    report = checks.check_data(settings, tokenizer)
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


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    _quiet_libraries()
    try:
        return {"validate": cmd_validate, "preview": cmd_preview}[args.command](args)
    except UserError as err:
        if getattr(args, "json", False):
            print(json.dumps({"format": None, "rows": 0, "valid_rows": 0,
                              "errors": [{"row": None, "code": "unusable_source", "message": str(err)}],
                              "warnings": [], "stats": {}}))
        else:
            print(f"error: {err}", file=sys.stderr)
        return 1
