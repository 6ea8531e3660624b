"""The model card of a published run: Hub metadata plus a page that says what the model is and how it was made.

Everything on it comes from the run folder (run.json, events.jsonl, samples.json), so a card can be written
again for any past run, and it never holds anything the run folder does not (no tokens, no local paths).
"""

from __future__ import annotations

import dataclasses
import html
from pathlib import Path
from typing import Any

from . import hub, models
from .runs import RunFolder, asked
from .settings import RunSettings

LOSS_CURVE_FILE = "loss_curve.png"
# The card's settings table: the fields marked card=True, grouped by their form group (what was trained first:
# model, schedule, adapter, then hardware; the data's fields, which have no group, last); the rest are in the
# pushed training_run.json.
CARD_GROUP_ORDER = ("model", "schedule", "lora", "hardware", None)
CARD_SETTINGS = tuple(spec.name for group in CARD_GROUP_ORDER for spec in dataclasses.fields(RunSettings)
                      if spec.metadata.get("card") and spec.metadata.get("group") == group)

CARD_TEMPLATE = """\
---
{{ card_data }}
---

# {{ model_name }}

{{ summary }}

{{ purpose }}

## Use it

```python
{{ usage }}
```
{% if local %}
## Run it locally

`{{ local.file }}` is this model (the adapter merged in) as one GGUF file, {{ local.quant_text }}, with its
tokenizer and chat template: llama.cpp, Ollama and LM Studio chat with it as it is.

```bash
# llama.cpp (downloads the file, then chats)
llama-cli -hf {{ local.repo_id }}:{{ local.tag }}
# Ollama
ollama run hf.co/{{ local.repo_id }}:{{ local.tag }}
# LM Studio
lms get {{ local.repo_id }}
```

A downloaded copy runs the same way: `llama-cli -m {{ local.file }}`, or for Ollama a file `Modelfile` holding
`FROM ./{{ local.file }}`, then `ollama create {{ local.name }} -f Modelfile && ollama run {{ local.name }}`.
{% endif %}
## Training data

| | |
|---|---|
{% for name, value in data_rows %}| {{ name }} | {{ value }} |
{% endfor %}
## Training settings

| setting | value |
|---|---|
{% for name, value in settings_rows %}| `{{ name }}` | {{ value }} |
{% endfor %}
## Results

{{ results }}
{% if has_curve %}
![Training and validation loss by step]({{ curve_file }})
{% endif %}
{% if samples %}
## Before and after

Held-out prompts, answered greedily by the base model and by this model.

| prompt | base model | fine-tuned |
|---|---|---|
{% for sample in samples %}| {{ sample.prompt }} | {{ sample.before }} | {{ sample.after }} |
{% endfor %}{% endif %}
## Framework versions

{% for name, version in versions %}- {{ name }} {{ version }}
{% endfor %}
Made with SFT Space: data checked, rendered and trained with TRL's SFTTrainer and PEFT.
"""


def _hub_id(name: str) -> str | None:
    """`name` when it names a Hub repository, not a file or folder here that happens to look like one."""
    return name if hub.is_hub_name(name) else None


def base_model_of(record: dict[str, Any]) -> str:
    """The base model a run record names, as the run was trained on it (its settings' model, the default
    filled in)."""
    return record.get("base_model") or ""


def hub_base_model(model: str) -> str | None:
    """The base model's Hub id, or None when it is a local folder nobody else has."""
    return models.HUB_DEFAULT_MODEL if model == models.EMBEDDED_MODEL else _hub_id(model)


def hub_dataset(source: str) -> str | None:
    """The dataset's Hub id when the run trained on a Hub dataset, else None."""
    return _hub_id(source)


def public_source_name(source: str) -> str:
    """How the card names the data: a Hub id as is, a local file by its name only (its path is private)."""
    return hub_dataset(source) or Path(source.rstrip("/")).name or "a local dataset"


def base_model_licence(base_model: str | None) -> str | None:
    """The base model's licence where we know it without asking the Hub (the curated list)."""
    from .catalog import CATALOG

    for entry in CATALOG:
        if base_model in (entry.model_id, hub_base_model(entry.model_id)):
            return entry.licence
    return None


def _cell(text: Any, limit: int = 300) -> str:
    """Text made safe for one Markdown table cell."""
    text = " ".join(str(text if text is not None else "—").split())
    if len(text) > limit:
        text = text[: limit - 1] + "…"
    return html.escape(text, quote=False).replace("|", "\\|")


def _loss(value: Any) -> str:
    return f"{value:.4f}" if isinstance(value, (int, float)) else "—"


def write_loss_curve(folder: RunFolder, path: Path) -> bool:
    """Draw the run's train and validation loss to a PNG; False when the run logged no loss."""
    from matplotlib.figure import Figure

    entries = folder.read_metrics()
    train = [(e["step"], e["loss"]) for e in entries if "loss" in e]
    validation = [(e["step"], e["eval_loss"]) for e in entries if "eval_loss" in e]
    if not train and not validation:
        return False
    # Figure, not pyplot: no global state, so the app can draw from several threads.
    figure = Figure(figsize=(6.4, 3.2), dpi=100)
    axes = figure.add_subplot()
    for points, label, colour in ((train, "train", "#4f46e5"), (validation, "validation", "#f97316")):
        if points:
            axes.plot(*zip(*points), label=label, color=colour, marker="o" if len(points) < 30 else None)
    axes.set_xlabel("step")
    axes.set_ylabel("loss")
    axes.grid(alpha=0.3)
    axes.legend()
    figure.tight_layout()
    figure.savefig(path, format="png")
    return True


def usage_snippet(repo_id: str, base_model: str | None, merged: bool) -> str:
    messages = 'messages = [{"role": "user", "content": "Hello! Who are you?"}]'
    generate = (
        f"{messages}\n"
        "inputs = tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_tensors=\"pt\", "
        "return_dict=True)\n"
        "output = model.generate(**inputs, max_new_tokens=128)\n"
        "print(tokenizer.decode(output[0, inputs[\"input_ids\"].shape[1]:], skip_special_tokens=True))"
    )
    if merged:
        return ("from transformers import AutoModelForCausalLM, AutoTokenizer\n\n"
                f'tokenizer = AutoTokenizer.from_pretrained("{repo_id}")\n'
                f'model = AutoModelForCausalLM.from_pretrained("{repo_id}")\n' + generate)
    base = base_model or "PATH/TO/THE/BASE/MODEL"
    return ("from peft import PeftModel\n"
            "from transformers import AutoModelForCausalLM, AutoTokenizer\n\n"
            f'tokenizer = AutoTokenizer.from_pretrained("{repo_id}")\n'
            f'base = AutoModelForCausalLM.from_pretrained("{base}")\n'
            f'model = PeftModel.from_pretrained(base, "{repo_id}")\n' + generate)


GGUF_QUANT_TEXT = {"f16": "16-bit weights (f16)", "q8_0": "8-bit weights (q8_0)",
                   "q4_0": "4-bit weights (q4_0; the embedding and output layer at 8 bits)"}


def local_apps(repo_id: str, gguf_file: str) -> dict[str, str]:
    """What the card's "Run it locally" section names: the file, its quantization tag as the Hub's local apps
    take it (Ollama's and llama.cpp's `:Q8_0`), and the repo."""
    quant = gguf_file.rsplit("-", 1)[-1].removesuffix(".gguf")
    return {"file": gguf_file, "tag": quant, "quant_text": GGUF_QUANT_TEXT.get(quant.lower(), quant),
            "repo_id": repo_id, "name": repo_id.split("/")[-1].lower()}


def model_card(folder: RunFolder, repo_id: str, merged: bool = False, description: str = "",
               has_curve: bool = False, licence: str | None = None, gguf_file: str | None = None) -> Any:
    """The ModelCard (metadata + body) for pushing `folder`'s adapter, or the merged model, as `repo_id`;
    `gguf_file`: the name of the GGUF file pushed beside it, if any."""
    from huggingface_hub import ModelCard, ModelCardData

    record = folder.read()
    settings = record.get("settings", {})
    data = record.get("data", {})
    stats = data.get("stats", {})
    final = record.get("final_metrics", {}) or {}
    base_model = hub_base_model(base_model_of(record))
    dataset = hub_dataset(settings.get("source", ""))
    tags = ["sft", "lora", "trl", "sft-space"] + (["merged"] if merged else ["peft"]) + (["gguf"] if gguf_file else [])
    card_data = ModelCardData(
        base_model=base_model, library_name="transformers" if merged else "peft", pipeline_tag="text-generation",
        tags=tags, datasets=[dataset] if dataset else None, license=licence or base_model_licence(base_model),
    )
    kind = "a full model (LoRA adapter merged into the base weights)" if merged else "a LoRA adapter"
    base_text = f"[{base_model}](https://huggingface.co/{base_model})" if base_model else "a local base model"
    source = public_source_name(settings.get("source", ""))
    source_text = f"[{source}](https://huggingface.co/datasets/{source})" if dataset else f"`{source}`"
    summary = (f"This is {kind} for {base_text}, fine-tuned with supervised fine-tuning on "
               f"{data.get('train_examples', '?')} conversations from {source_text}.")
    purpose = description.strip() or (
        "It was trained to answer the way the assistant answers in that data: only the assistant's turns were "
        "trained on (the prompts were masked), so it learned the replies, not the questions.")
    tokens = stats.get("tokens_per_example", {})
    data_rows = [
        ("source", source_text), ("format", data.get("format", "—")),
        ("training examples", data.get("train_examples", "—")),
        ("validation examples", data.get("validation_examples", "—")),
        ("invalid rows skipped", data.get("invalid_rows_skipped", 0)),
        ("tokens per example (median / p90 / max)",
         f"{tokens.get('median', '—')} / {tokens.get('p90', '—')} / {tokens.get('max', '—')}"),
        ("trained tokens (assistant turns) / all tokens",
         f"{stats.get('total_trained_tokens', '—')} / {stats.get('total_tokens', '—')}"),
    ]
    plan = record.get("plan", {})
    settings_rows = [(name, _cell(settings.get(name))) for name in CARD_SETTINGS if name in settings]
    settings_rows += [("precision (chosen)", _cell(plan.get("precision"))),
                      ("batch size (chosen)", _cell(plan.get("batch_size"))),
                      ("sequence length (chosen)", _cell(plan.get("sequence_length")))]
    hardware = (record.get("hardware") or {}).get("description", "—")
    headline = folder.headline(record)
    results = (f"Training loss **{_loss(headline.train_loss)}** (smoothed over the last steps), validation loss "
               f"**{_loss(headline.validation_loss)}** "
               f"after {final.get('step', '—')} steps ({final.get('epoch', 0) or 0:.2f} epochs, "
               f"{final.get('train_runtime_seconds', '—')} s on {hardware}). Run status: {record.get('status')}.")
    samples = [{"prompt": _cell(asked(sample)), "before": _cell(sample.get("before")),
                "after": _cell(sample.get("after"))} for sample in folder.samples() if sample.get("after") is not None]
    versions = sorted((record.get("versions") or {}).items())
    return ModelCard.from_template(
        card_data, template_str=CARD_TEMPLATE, model_name=repo_id.split("/")[-1], summary=summary, purpose=purpose,
        usage=usage_snippet(repo_id, base_model, merged), local=local_apps(repo_id, gguf_file) if gguf_file else None,
        data_rows=data_rows, settings_rows=settings_rows,
        results=results, has_curve=has_curve, curve_file=LOSS_CURVE_FILE, samples=samples, versions=versions,
    )
