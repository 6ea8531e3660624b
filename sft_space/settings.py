"""Settings dataclasses: each field declared once, with its default and help text.

The CLI flags and the app's form are generated from these fields (see `add_arguments`), and saved run
records are written from them, so the three cannot drift apart.
"""

from __future__ import annotations

import argparse
import dataclasses
from dataclasses import dataclass, field
from typing import Any


def setting(default: Any, help: str, **extra: Any) -> Any:
    """A dataclass field with the help text the CLI and the UI show."""
    return field(default=default, metadata={"help": help, **extra})


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
    max_length: int = setting(2048, "Maximum example length in the model's tokens; longer examples are reported.")
    validation_fraction: float = setting(0.1, "Share of valid examples held out for validation loss (0 to turn off).")
    seed: int = setting(42, "Random seed for the train/validation split (and training).")
    skip_invalid_rows: bool = setting(
        False, "Train on the valid rows when some rows have errors (otherwise invalid rows stop training)."
    )


def add_arguments(parser: argparse.ArgumentParser, settings_class: type, names: list[str]) -> None:
    """Add `--field-name` flags for the named fields, with defaults and help from the dataclass."""
    fields = {f.name: f for f in dataclasses.fields(settings_class)}
    for name in names:
        spec = fields[name]
        flag = "--" + name.replace("_", "-")
        kwargs: dict[str, Any] = {"default": spec.default, "help": spec.metadata["help"], "dest": name}
        if spec.type in ("bool", bool):
            kwargs["action"] = argparse.BooleanOptionalAction
        else:
            kwargs["type"] = {"int": int, "float": float}.get(str(spec.type), str)
            kwargs["metavar"] = name.upper()
        if "choices" in spec.metadata:
            kwargs["choices"] = spec.metadata["choices"]
        parser.add_argument(flag, **kwargs)


def from_arguments(settings_class: type, namespace: argparse.Namespace, **overrides: Any) -> Any:
    """Build the settings object from parsed flags (fields without a flag keep their defaults)."""
    names = {f.name for f in dataclasses.fields(settings_class)}
    values = {k: v for k, v in vars(namespace).items() if k in names}
    return settings_class(**{**values, **overrides})
