"""Publish a run: its adapter (or the merged model) as a folder, a zip, or a Hub repo with a model card, plus
an optional demo Space where anyone with access can chat with it.

Every way out goes through one staged folder (`stage`), so the zip, the exported folder and the Hub repo hold
the same files, and a pickle file (which could run code when loaded) is never among them. The Hub token is only
ever handed to `HfApi`: it is never written to a file, a run record, a card, a log line or an error message.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import shutil
import tempfile
import threading
import time
import zipfile
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Any, Callable, Iterator

from . import card, gguf_export, hub, models, runs, threads
from .access import running_on_space
from .errors import UserError
from .runs import RunFolder
from .settings import PublishSettings

log = logging.getLogger(__name__)

RUN_RECORD_FILE = "training_run.json"
# The published run's curve: a step or evaluation event a line (events.py).
METRICS_FILE = "metrics.jsonl"
DEMO_TEMPLATE_DIR = Path(__file__).resolve().parent / "demo_space"
# peft writes a placeholder README into the adapter folder; ours replaces it.
NOT_PUBLISHED = {"README.md"}
TOKENS_PAGE = "https://huggingface.co/settings/tokens"
# The first call to the Hub (who the token belongs to), before anything is made or uploaded: huggingface_hub waits
# without a time limit, and a network that drops packets would hold the push for minutes before the system gives
# up. A healthy Hub answers in well under a second. The uploads themselves have no such limit: a large one may
# rightly take many minutes.
HUB_ANSWER_SECONDS = 10.0

Progress = Callable[[float, str], None]


@dataclass
class PublishResult:
    model_url: str
    space_url: str | None = None
    notes: list[str] = field(default_factory=list)


def _progress(on_progress: Progress | None, fraction: float, message: str) -> None:
    log.info(message)
    if on_progress is not None:
        on_progress(fraction, message)


# One merge at a time in this process, for every visitor of the app: a merge holds the whole model in float32
# until its files are written, and two at once may not fit a Space's memory. Pushes of an adapter alone never wait.
# Re-entrant: a push that merges holds it while its GGUF export (which merges too) runs inside it.
_ONE_MERGE = threading.RLock()
WAITING_FOR_MERGE = "Waiting for another merge to finish (one at a time: each holds a whole model in memory)…"


@contextlib.contextmanager
def one_merge_at_a_time(on_progress: Progress | None = None) -> Iterator[None]:
    """Hold the process's one merge lane, saying so first when another merge has it."""
    if not _ONE_MERGE.acquire(blocking=False):
        _progress(on_progress, 0.0, WAITING_FOR_MERGE)
        _ONE_MERGE.acquire()
    try:
        yield
    finally:
        _ONE_MERGE.release()


def open_publishable(run_dir: str | Path) -> RunFolder:
    folder = RunFolder.open(run_dir)
    folder.require_adapter("publish")
    return folder


def public_record(folder: RunFolder) -> dict[str, Any]:
    """What the published training_run.json says about the run: its record without local paths."""
    record = folder.read()
    settings = dict(record.get("settings", {}))
    settings.pop("output_dir", None)
    settings["source"] = card.public_source_name(settings.get("source", ""))
    model = card.base_model_of(record)
    settings["model"] = card.hub_base_model(model) or Path(model).name
    data = {k: v for k, v in (record.get("data") or {}).items() if k != "source"}
    return {"run_id": folder.run_id, "status": record.get("status"), "created_at": record.get("created_at"),
            "base_model": settings["model"], "settings": settings, "data": data, "plan": record.get("plan"),
            "final_metrics": record.get("final_metrics"), "versions": record.get("versions"),
            "hardware": (record.get("hardware") or {}).get("description")}


def _stage_adapter(folder: RunFolder, target: Path) -> None:
    for path in sorted(folder.adapter_path.iterdir()):
        if path.is_file() and path.name not in NOT_PUBLISHED and path.suffix.lower() not in runs.PICKLE_SUFFIXES:
            shutil.copy2(path, target / path.name)
    config_path = target / "adapter_config.json"
    config = json.loads(config_path.read_text(encoding="utf-8"))
    record = folder.read()
    # Training saw the embedded model's local copy; the adapter must name the base model others can download.
    hub_id = card.hub_base_model(card.base_model_of(record))
    if hub_id:
        config["base_model_name_or_path"] = hub_id
    config_path.write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")


def _base_model(folder: RunFolder) -> tuple[str, bool]:
    """The base model the run trained on, and whether it needs its own code (trust_remote_code)."""
    record = folder.read()
    return card.base_model_of(record), bool((record.get("settings") or {}).get("trust_remote_code"))


def merged_model(folder: RunFolder) -> tuple[Any, Any]:
    """(model, tokenizer): the base model with the run's adapter merged in, in float32.

    Merged in float32 so that the caller rounds once, to the published dtype or the GGUF quantization: merging
    in bf16 rounds the small LoRA update twice, enough to change greedy answers."""
    import torch
    from peft import PeftModel

    folder.require_adapter("merge")
    base, trust_remote_code = _base_model(folder)
    model = models.load_causal_lm(base, dtype=torch.float32, trust_remote_code=trust_remote_code)
    model = PeftModel.from_pretrained(model, folder.adapter_path).merge_and_unload()
    return model, models.load_tokenizer(str(folder.adapter_path), trust_remote_code)


def merge_adapter(folder: RunFolder, target: Path, dtype: str = "auto", merged: tuple[Any, Any] | None = None) -> None:
    """Write the base model with the run's adapter merged in, as safetensors, in `dtype` ("auto": the base
    model's own). `merged`: `merged_model`'s answer when the caller has it already; it is converted in place."""
    import torch

    folder.require_adapter("merge")
    if dtype == "auto":
        base, trust_remote_code = _base_model(folder)
        dtype = getattr(models.load_config(base, trust_remote_code), "dtype", None) or torch.float32
    stored_dtype = getattr(torch, dtype) if isinstance(dtype, str) else dtype
    model, tokenizer = merged or merged_model(folder)
    model.to(stored_dtype).save_pretrained(target)
    tokenizer.save_pretrained(target)


def check_gguf_exportable(folder: RunFolder) -> None:
    """Refuse, before any merging or uploading, a run whose base model the GGUF export does not support."""
    base, trust_remote_code = _base_model(folder)
    gguf_export.check_supported(models.load_config(base, trust_remote_code))


def _embedded_pre_tokenizer_name(base: str) -> str | None:
    """The embedded default came from a GGUF file that names its pre-tokenizer (smollm: digits one by one);
    its converted tokenizer no longer says so, so the original file's word is kept."""
    if base != models.EMBEDDED_MODEL or models.embedded_gguf() is None:
        return None
    from gguf import GGUFReader

    field = GGUFReader(models.embedded_gguf()).get_field("tokenizer.ggml.pre")
    return field.contents() if field is not None else None


def export_gguf(run_dir: str | Path, path: str | Path, quant: str = "q8_0", name: str = "",
                on_progress: Progress | None = None, licence: str | None = None,
                merged: tuple[Any, Any] | None = None) -> Path:
    """The run's model (adapter merged in) as one GGUF file for llama.cpp, Ollama and LM Studio
    (`export --gguf FILE` on the command line). `merged`: `merged_model`'s answer when the caller has it already."""
    folder = open_publishable(run_dir)
    gguf_export.quant_type(quant)
    check_gguf_exportable(folder)
    base = card.base_model_of(folder.read())
    hub_id = card.hub_base_model(base)
    with one_merge_at_a_time(on_progress):
        if merged is None:
            _progress(on_progress, 0.0, "Merging the adapter into the base model (float32)…")
        model, tokenizer = merged or merged_model(folder)
        return gguf_export.write_gguf(
            model, tokenizer, path, quant, name=name or folder.run_id, base_model=hub_id,
            description=f"Fine-tuned with SFT Space from {hub_id or 'a local base model'}",
            pre_tokenizer=_embedded_pre_tokenizer_name(base), licence=licence or card.base_model_licence(hub_id),
            on_progress=lambda fraction, message: _progress(on_progress, 0.2 + 0.8 * fraction, message))


def stage(run_dir: str | Path, target: str | Path, settings: PublishSettings | None = None,
          on_progress: Progress | None = None, licence: str | None = None) -> list[Path]:
    """Write everything a published run consists of into `target` (which must not exist or be empty).

    Adapter (or merged model) weights, tokenizer and chat template, training_run.json, metrics.jsonl, the loss
    curve and README.md, the model card. Returns the files written, relative to `target`.
    """
    settings = settings or PublishSettings()
    folder = open_publishable(run_dir)
    target = Path(target)
    if target.exists() and any(target.iterdir()):
        raise UserError(f"{target} already exists and is not empty; choose a new folder.")
    target.mkdir(parents=True, exist_ok=True)
    gguf_file = None
    if settings.merged or settings.gguf:
        with one_merge_at_a_time(on_progress):
            gguf_file = _stage_merged(folder, target, settings, on_progress, licence)
    if not settings.merged:
        _stage_adapter(folder, target)
    _progress(on_progress, 0.95, "Writing the model card…")
    (target / RUN_RECORD_FILE).write_text(json.dumps(public_record(folder), indent=2, ensure_ascii=False) + "\n",
                                          encoding="utf-8")
    if metrics := folder.read_metrics():
        # The curve (its steps and evaluations), not the whole events.jsonl, whose events name the server's folders.
        (target / METRICS_FILE).write_text("".join(json.dumps(point) + "\n" for point in metrics), encoding="utf-8")
    has_curve = card.write_loss_curve(folder, target / card.LOSS_CURVE_FILE)
    model_card = card.model_card(folder, settings.repo_id or folder.run_id, merged=settings.merged,
                                 description=settings.description, has_curve=has_curve, licence=licence,
                                 gguf_file=gguf_file)
    model_card.save(target / "README.md")
    return sorted(p.relative_to(target) for p in target.rglob("*") if p.is_file())


def _stage_merged(folder: RunFolder, target: Path, settings: PublishSettings, on_progress: Progress | None,
                  licence: str | None) -> str | None:
    """The merged weights and/or the GGUF file of `stage`, from one merge; returns the GGUF file's name, if any."""
    _progress(on_progress, 0.1, "Merging the adapter into the base model…")
    # Once for both (each merge loads the whole model in float32).
    merged = merged_model(folder)
    gguf_file = None
    if settings.gguf:
        # Before the merged weights are saved: saving converts them in place to the published dtype, and the GGUF
        # file is quantized from float32, rounding once.
        gguf_file = gguf_export.file_name((settings.repo_id or folder.run_id).split("/")[-1], settings.gguf_quant)
        export_gguf(folder.path, target / gguf_file, settings.gguf_quant, name=settings.repo_id or folder.run_id,
                    licence=licence, merged=merged,
                    on_progress=lambda fraction, message: _progress(on_progress, 0.3 + 0.5 * fraction, message))
    if settings.merged:
        _progress(on_progress, 0.85, "Saving the merged model…")
        merge_adapter(folder, target, settings.merged_dtype, merged=merged)
    return gguf_file


def export_folder(run_dir: str | Path, out_dir: str | Path, settings: PublishSettings | None = None) -> Path:
    """The publishable files in a folder of your own (`export --merged OUT_DIR` on the command line)."""
    stage(run_dir, out_dir, settings)
    return Path(out_dir)


def export_zip(run_dir: str | Path, zip_path: str | Path) -> Path:
    """The adapter with its card, settings and metrics, as one zip file to download."""
    zip_path = Path(zip_path)
    with tempfile.TemporaryDirectory(prefix="sft-space-zip-") as staging:
        files = stage(run_dir, staging)
        zip_path.parent.mkdir(parents=True, exist_ok=True)
        with zipfile.ZipFile(zip_path, "w", compression=zipfile.ZIP_DEFLATED) as archive:
            for name in files:
                archive.write(Path(staging) / name, arcname=str(name))
    return zip_path


# ---- downloads from the app ----------------------------------------------------------------------------------

DOWNLOADS_DIR = "sft-space-downloads"
# A file handed to a page this recently is never evicted for another: Gradio copies it into its own cache just
# after the handler returns it, and the page fetches it from there.
HANDED_OUT_SECONDS = 60.0
# A half-made file not written to for this long was left by a process that died (this one's are reserved).
ABANDONED_SECONDS = 3600.0
# What a zip holds besides the run's files: the model card and the loss curve.
ZIP_EXTRAS_BYTES = 1_000_000


def size_text(size: int) -> str:
    """A file's size as people and the README count it: 1 MB = 1,000,000 bytes ("271 MB", "5.2 MB", "840 KB")."""
    if size >= 10**9:
        return f"{size / 10**9:,.1f} GB"
    if size >= 10 * 10**6:
        return f"{size / 10**6:,.0f} MB"
    if size >= 10**6:
        return f"{size / 10**6:.1f} MB"
    return f"{max(1, round(size / 1000))} KB"


def _sentence(text: str) -> str:
    return text[:1].upper() + text[1:]


def _fingerprint(*parts: Any) -> str:
    return hashlib.sha256(json.dumps(parts, default=str).encode()).hexdigest()[:24]


def _files_state(paths: list[Path]) -> list[tuple[str, int, int]]:
    """(name, size, modification time) of each file that exists: what says a file made from them is still theirs."""
    state = []
    for path in paths:
        try:
            info = path.stat()
        except OSError:
            continue
        state.append((path.name, info.st_size, info.st_mtime_ns))
    return state


class Downloads:
    """The files the app makes for its visitors to download (a run's zip, its GGUF file), kept in one folder
    capped at `max_bytes` for all visitors together.

    Each file is made once per run and kind (the zip, or the GGUF file in one quantization) and handed out again
    while the run's files are unchanged; a visitor makes one file at a time; the files handed out longest ago go
    first to make room, and a file that would not fit even so is refused before any work starts."""

    def __init__(self, root: str | Path, max_bytes: int):
        self.root = Path(root)
        self.max_bytes = int(max_bytes)
        self._lock = threading.Lock()
        self._making: dict[str, str] = {}  # visitor -> what they are making
        self._reserved: dict[Path, int] = {}  # folder of a file being made -> the bytes set aside for it

    @classmethod
    def in_temporary_folder(cls, max_bytes: int) -> Downloads:
        return cls(Path(tempfile.gettempdir()) / DOWNLOADS_DIR, max_bytes)

    def gguf(self, folder: RunFolder, quant: str, visitor: str, on_progress: Progress | None = None) -> Path:
        """The run's GGUF file in `quant` (`export_gguf`), made or handed out again."""
        folder.require_adapter("export")
        gguf_export.quant_type(quant)
        check_gguf_exportable(folder)
        base, trust_remote_code = _base_model(folder)
        estimate = gguf_export.estimated_size(models.load_config(base, trust_remote_code), quant)
        adapter = sorted(folder.adapter_path.iterdir())
        key = _fingerprint(str(folder.path.resolve()), "gguf", quant, _files_state(adapter))
        return self._provide(key, gguf_export.file_name(folder.run_id, quant), estimate, visitor,
                             f"the GGUF file of run {folder.run_id} ({quant})",
                             lambda path: export_gguf(folder.path, path, quant, on_progress=on_progress),
                             "Choose a smaller quantization (q4_0 is the smallest), or download the adapter (.zip) "
                             "and merge it on your own machine.")

    def zip(self, folder: RunFolder, visitor: str) -> Path:
        """The run's adapter with its card, settings and metrics as one zip (`export_zip`), made or handed out
        again."""
        folder.require_adapter("export")
        sources = sorted(folder.adapter_path.iterdir()) + [folder.record_path, folder.events_path,
                                                             folder.samples_path]
        state = _files_state(sources)
        key = _fingerprint(str(folder.path.resolve()), "zip", state)
        return self._provide(key, f"{folder.run_id}-adapter.zip", sum(size for _, size, _ in state) + ZIP_EXTRAS_BYTES,
                             visitor, f"the zip of run {folder.run_id}", lambda path: export_zip(folder.path, path),
                             "Publish the run to the Hub instead.")

    def used_bytes(self) -> int:
        return sum(size for _, size, _ in self._kept())

    def _kept(self) -> list[tuple[Path, int, float]]:
        """(file, size, when it was last handed out) of every finished file here, longest ago first. A file left
        half-made by a process that died (not written to for an hour) goes."""
        kept = []
        for path in self.root.glob("*/*"):
            try:
                info = path.stat()
            except OSError:
                continue
            if not path.is_file():
                continue
            if not path.name.startswith("."):
                kept.append((path, info.st_size, info.st_mtime))
            elif path.parent not in self._reserved and time.time() - info.st_mtime > ABANDONED_SECONDS:
                path.unlink(missing_ok=True)
        return sorted(kept, key=lambda item: item[2])

    def _provide(self, key: str, name: str, estimate: int, visitor: str, what: str, make: Callable[[Path], Path],
                 too_large: str) -> Path:
        """The file `name` kept under `key`, handed out again, or made by `make(path)` once there is room for the
        `estimate`d bytes; `what` names it in refusals, `too_large` says what to do when it can never fit."""
        place = self.root / key
        target = place / name
        with self._lock:
            if place in self._reserved:
                raise UserError(f"{_sentence(what)} is being made right now; ask again in a moment.")
            if target.is_file():
                os.utime(target)  # handed out again: the last to be evicted
                return target
            if visitor in self._making:
                raise UserError(f"You are already making {self._making[visitor]}; wait for it to finish (a visitor "
                                "makes one download at a time), then ask again.")
            self._make_room(estimate, what, too_large)
            self._making[visitor] = what
            self._reserved[place] = estimate
        staging = place / f".{name}.{os.getpid()}.partial"
        try:
            place.mkdir(parents=True, exist_ok=True)
            make(staging)
            os.replace(staging, target)
            return target
        finally:
            with self._lock:
                del self._making[visitor]
                del self._reserved[place]
                staging.unlink(missing_ok=True)
                with contextlib.suppress(OSError):
                    place.rmdir()  # only when nothing was made

    def _make_room(self, needed: int, what: str, too_large: str) -> None:
        """Evict the files handed out longest ago until `needed` more bytes fit; refuse when they cannot."""
        limit = size_text(self.max_bytes)
        if needed > self.max_bytes:
            raise UserError(f"{_sentence(what)} would take about {size_text(needed)}, more than the "
                            f"{limit} this app keeps for downloads. {too_large}")
        kept = self._kept()
        used = sum(size for _, size, _ in kept) + sum(self._reserved.values())
        recent = time.time() - HANDED_OUT_SECONDS
        for path, size, handed_out in kept:
            if used + needed <= self.max_bytes:
                return
            if handed_out >= recent or path.parent in self._reserved:
                continue
            path.unlink(missing_ok=True)
            with contextlib.suppress(OSError):
                path.parent.rmdir()
            log.info("evicted %s (%s) from the downloads folder to make room", path.name, size_text(size))
            used -= size
        if used + needed > self.max_bytes:
            raise UserError(f"The app's room for downloads ({limit}) is taken by files handed out in the last "
                            f"minute or being made now; ask for {what} again in a minute.")


# ---- the Hub -------------------------------------------------------------------------------------------------


def validate_repo_id(repo_id: str) -> str:
    repo_id = (repo_id or "").strip()
    if not hub.is_repo_id(repo_id):
        raise UserError(f"{repo_id!r} is not a valid repo id: write it as owner/name with letters, digits, '-', "
                        "'_' and '.', e.g. alice/captain-byte-lora.")
    return repo_id


def resolve_token(typed: str | None = None, signed_in: str | None = None) -> str | None:
    """The token to push with: one pasted for this push, else the visitor's sign-in, else (only on your own
    machine) HF_TOKEN or the saved login.

    On a Space the Space's own HF_TOKEN secret is never used: it belongs to the Space's owner, and any visitor
    could otherwise publish into the owner's account.
    """
    if typed and typed.strip():
        return typed.strip()
    if signed_in:
        return signed_in
    if running_on_space():
        return None
    from huggingface_hub import get_token

    return get_token()


def token_help(in_app: bool) -> str:
    """Where a write token comes from, for the place the person is in: the app (a Space signs them in) or the
    command line (which reads HF_TOKEN or the saved login, and has nowhere to paste)."""
    if not in_app:
        return (f"Set HF_TOKEN to a token with write access from {TOKENS_PAGE}, or run 'hf auth login' and "
                "paste it there.")
    if running_on_space():
        return f"Press \"Sign in with Hugging Face\", or paste a token with write access from {TOKENS_PAGE}."
    return (f"Paste a token with write access from {TOKENS_PAGE} (or start the app with HF_TOKEN set, or after "
            "'hf auth login').")


def _scrub(text: str, token: str) -> str:
    return text.replace(token, "hf_***") if token else text


def explain_hub_error(err: BaseException, action: str, repo_id: str, token: str, in_app: bool = False) -> UserError:
    """One sentence a person can act on, for whatever the Hub (or the network) answered."""
    kind, status = hub.failure_kind(err)
    namespace = repo_id.split("/")[0]
    if kind == "offline":
        message = (f"Could not reach the Hugging Face Hub to {action}: HF_HUB_OFFLINE (or TRANSFORMERS_OFFLINE) is "
                   "set, so nothing is sent to it. Unset it and try again.")
    elif kind == "timeout":
        message = (f"The Hugging Face Hub did not answer in time while trying to {action}: the network is slow or "
                   "down. Check the connection and try again.")
    elif kind == "network":
        message = (f"Could not reach the Hugging Face Hub to {action}: this machine seems to be offline (the name "
                   "huggingface.co does not resolve, or the connection is refused). Check the network connection "
                   "and try again.")
    elif status == 401:
        message = (f"The Hub did not accept the token while trying to {action}: it is invalid or expired. "
                   f"{token_help(in_app)}")
    elif status == 403:
        message = (f"Your token may not write to {namespace} (while trying to {action}): use a token with write "
                   "access to that user or organisation.")
    elif status == 404:
        message = (f"The Hub answered 404 (not found) while trying to {action}: check that {namespace!r} is "
                   "spelled as your user name or an organisation you belong to.")
    elif status == 409:
        message = (f"The name {repo_id} is already taken on the Hub; choose another name, or allow updating the "
                   "existing repo.")
    elif status == 429:
        message = (f"The Hub is limiting how often this token may call it (while trying to {action}): wait a "
                   "minute and try again.")
    elif status is not None and status >= 500:
        message = (f"The Hugging Face Hub had a problem of its own ({status}) while trying to {action}; nothing is "
                   "wrong on your side. Try again in a few minutes (https://status.huggingface.co).")
    elif status is not None:
        message = f"The Hub refused to {action} ({status}): {err}"
    else:
        message = f"Could not {action}: {type(err).__name__}: {err}"
    return UserError(_scrub(message, token))


def _write_access(account: dict[str, Any], namespace: str) -> bool | None:
    """Whether the token can write to `namespace`: True, False, or None when the Hub does not say."""
    auth = account.get("auth") or {}
    access = auth.get("accessToken") or {}
    role = access.get("role")
    if role == "read":
        return False
    if role == "write":
        return True
    if role == "fineGrained":
        scopes = (access.get("fineGrained") or {}).get("scoped") or []
        for scope in scopes:
            if (scope.get("entity") or {}).get("name") == namespace:
                return "repo.write" in scope.get("permissions", [])
        return False
    return None  # OAuth tokens: their scopes were granted at sign-in; the push itself will tell


def check_access(api: Any, repo_id: str, token: str, in_app: bool = False,
                 deadline: float = HUB_ANSWER_SECONDS) -> None:
    """Refuse early, with the reason, when the token cannot create or update `repo_id`; the first call to the
    Hub, so the one that says quickly (within `deadline` seconds) when the Hub cannot be reached."""
    try:
        account = threads.wait_for(api.whoami, "hub-call", seconds=deadline)
    except Exception as err:
        raise explain_hub_error(err, "check who you are", repo_id, token, in_app) from None
    user = account.get("name", "")
    namespaces = [user] + [org.get("name") for org in account.get("orgs") or []]
    namespace = repo_id.split("/")[0]
    if namespace not in namespaces:
        raise UserError(f"You are signed in as {user}, who cannot create repos under {namespace!r}; use "
                        f"{user}/{repo_id.split('/')[1]}" + (f" or one of your organisations ({', '.join(namespaces[1:])})"
                                                             if len(namespaces) > 1 else "") + ".")
    if _write_access(account, namespace) is False:
        raise UserError(f"Your token can read but not write to {namespace}. {token_help(in_app)}")


def _check_free(api: Any, repo_id: str, repo_type: str, update_existing: bool, token: str, in_app: bool) -> None:
    """Refuse when the repo exists and the user did not ask to update it."""
    try:
        exists = api.repo_exists(repo_id, repo_type=repo_type)
    except Exception as err:
        raise explain_hub_error(err, f"look up {repo_id}", repo_id, token, in_app) from None
    if exists and not update_existing:
        kind = "Space" if repo_type == "space" else "model repo"
        raise UserError(f"The {kind} {repo_id} already exists. Choose another name, or allow updating it to push "
                        "this run as a new commit.")


def _upload(api: Any, repo_id: str, repo_type: str, staging: Path, private: bool, message: str, token: str,
            in_app: bool, **create: Any) -> None:
    try:
        api.create_repo(repo_id, repo_type=repo_type, private=private, exist_ok=True, **create)
        api.upload_folder(repo_id=repo_id, folder_path=staging, commit_message=message, repo_type=repo_type)
    except Exception as err:
        raise explain_hub_error(err, f"upload to {repo_id}", repo_id, token, in_app) from None


def hub_licence(api: Any, base_model: str | None) -> str | None:
    """The base model's licence from its Hub card, or None (unknown, unreachable, or no base on the Hub)."""
    if not base_model:
        return None
    try:
        card_data = api.model_info(base_model).card_data
    except Exception:  # the licence is a nicety: a card without one beats no push
        return None
    return card_data.get("license") if card_data is not None else None


def demo_space_id(repo_id: str) -> str:
    owner, name = repo_id.split("/")
    return f"{owner}/{name[:90]}-demo"


def stage_demo_space(target: Path, repo_id: str, private_model: bool) -> None:
    """A small Gradio Space that chats with the published model: app.py, requirements.txt, README.md."""
    target.mkdir(parents=True, exist_ok=True)
    title = f"Chat with {repo_id.split('/')[1]}"
    app = (DEMO_TEMPLATE_DIR / "app.py").read_text(encoding="utf-8")
    app = app.replace('"{{MODEL_REPO}}"', json.dumps(repo_id)).replace('"{{TITLE}}"', json.dumps(title))
    (target / "app.py").write_text(app, encoding="utf-8")
    pins = [f"{name}=={metadata.version(name)}" for name in ("transformers", "accelerate", "peft")]
    (target / "requirements.txt").write_text("torch\n" + "\n".join(pins) + "\n", encoding="utf-8")
    from huggingface_hub import SpaceCard, SpaceCardData

    data = SpaceCardData(title=title[:60], emoji="💬", colorFrom="indigo", colorTo="yellow", sdk="gradio",
                         sdk_version=metadata.version("gradio"), app_file="app.py", models=[repo_id],
                         short_description=f"Chat with {repo_id}"[:60], tags=["sft-space", "chat"])
    body = (f"# {title}\n\nA chat demo for [{repo_id}](https://huggingface.co/{repo_id}), fine-tuned with SFT Space.\n")
    if private_model:
        body += ("\nThe model repo is private: add a secret named `HF_TOKEN` holding a read token (Settings → "
                 "Variables and secrets) so this Space can load it.\n")
    SpaceCard(f"---\n{data.to_yaml()}\n---\n\n{body}").save(target / "README.md")


def push(run_dir: str | Path, settings: PublishSettings, token: str | None, api: Any = None,
         on_progress: Progress | None = None, in_app: bool = False) -> PublishResult:
    """Push a run to the Hub as `settings` say; refuses before uploading anything when it cannot succeed.

    `in_app`: the messages speak of signing in and pasting a token (the app) or of HF_TOKEN and 'hf auth
    login' (the command line).
    """
    folder = open_publishable(run_dir)
    repo_id = validate_repo_id(settings.repo_id)  # a typo is said first: fixing the token would not fix it
    if not token:
        raise UserError(f"Publishing needs a Hugging Face token. {token_help(in_app)}")
    if api is None:
        from huggingface_hub import HfApi

        api = HfApi(token=token)
    _progress(on_progress, 0.02, "Checking your Hugging Face account…")
    check_access(api, repo_id, token, in_app)
    _check_free(api, repo_id, "model", settings.update_existing, token, in_app)
    space_id = demo_space_id(repo_id) if settings.demo_space else None
    if space_id:
        _check_free(api, space_id, "space", settings.update_existing, token, in_app)
    if settings.gguf:
        gguf_export.quant_type(settings.gguf_quant)
        check_gguf_exportable(folder)
    result = PublishResult(model_url=f"https://huggingface.co/{repo_id}")
    base_model = card.hub_base_model(card.base_model_of(folder.read()))
    licence = card.base_model_licence(base_model) or hub_licence(api, base_model)
    with tempfile.TemporaryDirectory(prefix="sft-space-push-") as staging:
        model_files = Path(staging) / "model"
        stage(folder.path, model_files, settings,
              lambda fraction, message: _progress(on_progress, 0.05 + 0.4 * fraction, message), licence)
        _progress(on_progress, 0.5, f"Uploading to {repo_id}…")
        what = "merged model" if settings.merged else "LoRA adapter"
        if settings.gguf:
            what += f" and GGUF ({settings.gguf_quant})"
        _upload(api, repo_id, "model", model_files, settings.private, f"Upload {what} from SFT Space run {folder.run_id}",
                token, in_app)
        if space_id:
            _progress(on_progress, 0.85, f"Creating the demo Space {space_id}…")
            space_files = Path(staging) / "space"
            stage_demo_space(space_files, repo_id, settings.private)
            _upload(api, space_id, "space", space_files, settings.private, "Chat demo from SFT Space", token,
                    in_app, space_sdk="gradio")
            result.space_url = f"https://huggingface.co/spaces/{space_id}"
            if settings.private:
                result.notes.append("The model is private: add a read token as the secret HF_TOKEN in the demo "
                                    "Space's settings so it can load the model.")
    if not settings.merged and base_model is None:
        result.notes.append("The base model is a local folder, so others need a copy of it to use this adapter "
                            "(publish with 'merged' to share a model that stands alone).")
    published = folder.read().get("published", [])
    published.append({"repo_id": repo_id, "merged": settings.merged, "private": settings.private,
                      "gguf": settings.gguf_quant if settings.gguf else None, "space_id": space_id,
                      "at": runs.timestamp()})
    folder.update(published=published)
    _progress(on_progress, 1.0, f"Published: {result.model_url}")
    return result
