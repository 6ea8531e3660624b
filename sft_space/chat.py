"""Talk to a model: the base model, or the base with a run's adapter — one copy of the weights for both.

The adapter can be switched off for a reply (`use_adapter=False`), so "base vs fine-tuned" side by side needs
only one model in memory.
"""

from __future__ import annotations

import contextlib
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

from . import card, catalog, models, render
from .errors import UserError
from .runs import RunFolder
from .settings import GenerationSettings


def _generate_kwargs(tokenizer: Any, settings: GenerationSettings) -> dict[str, Any]:
    kwargs: dict[str, Any] = {"max_new_tokens": settings.max_new_tokens, "pad_token_id": tokenizer.pad_token_id}
    if settings.repetition_penalty != 1.0:
        kwargs["repetition_penalty"] = settings.repetition_penalty
    if settings.temperature > 0:
        kwargs.update(do_sample=True, temperature=settings.temperature, top_p=settings.top_p)
    else:
        kwargs.update(do_sample=False, temperature=None, top_p=None, top_k=None)
    return kwargs


def prompt_ids(tokenizer: Any, messages: list[dict[str, Any]], settings: GenerationSettings) -> list[int]:
    """The tokens the model continues to answer `messages`: the system prompt (unless the conversation has one),
    the messages and the generation prompt, as the chat template writes them. A control-token string a message
    holds is text, never the token: a user cannot close their turn and write a system one."""
    if settings.system_prompt and not (messages and messages[0]["role"] == "system"):
        messages = [{"role": "system", "content": settings.system_prompt}, *messages]
    return render.prompt_ids(tokenizer, messages)


def checked_prompt_ids(tokenizer: Any, messages: list[dict[str, Any]], settings: GenerationSettings) -> list[int]:
    """`prompt_ids`, or UserError when they are over `settings.max_prompt_tokens`."""
    ids = prompt_ids(tokenizer, messages, settings)
    check_prompt_length(len(ids), settings)
    return ids


def check_prompt_length(length: int, settings: GenerationSettings) -> None:
    """UserError when a prompt of `length` tokens is over `settings.max_prompt_tokens`: a reply's time and memory
    grow with its prompt, counted in tokens whatever the characters."""
    if length > settings.max_prompt_tokens:
        raise UserError(f"This conversation is {length:,} tokens long, more than the {settings.max_prompt_tokens:,} "
                        "the chat answers; press Clear to start a new one (or shorten the message).")


def _model_inputs(model: Any, prompt: list[int]) -> Any:
    import torch

    ids = torch.tensor([prompt], device=model.device)
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids)}


def _adapter_switch(model: Any, use_adapter: bool) -> contextlib.AbstractContextManager:
    if not use_adapter and hasattr(model, "disable_adapter"):
        return model.disable_adapter()
    return contextlib.nullcontext()


def _stop_when_set(stop_event: threading.Event) -> Any:
    """Stopping criteria that end generation at the next token once `stop_event` is set."""
    import torch
    from transformers import StoppingCriteria, StoppingCriteriaList

    class StopWhenSet(StoppingCriteria):
        def __call__(self, input_ids: Any, scores: Any, **kwargs: Any) -> Any:
            return torch.full((input_ids.shape[0],), stop_event.is_set(), dtype=torch.bool, device=input_ids.device)

    return StoppingCriteriaList([StopWhenSet()])


def generate_reply(model: Any, tokenizer: Any, messages: list[dict[str, Any]],
                   settings: GenerationSettings | None = None, use_adapter: bool = True,
                   stop_event: threading.Event | None = None, prompt: list[int] | None = None) -> str:
    """The model's whole reply to `messages` (OpenAI-style), as text; setting `stop_event` ends it at the next
    token (the reply so far is returned). `prompt`: the messages' prompt ids, when they were rendered already."""
    import torch

    settings = settings or GenerationSettings()
    inputs = _model_inputs(model, prompt if prompt is not None else prompt_ids(tokenizer, messages, settings))
    kwargs = _generate_kwargs(tokenizer, settings)
    if stop_event is not None:
        kwargs["stopping_criteria"] = _stop_when_set(stop_event)
    with torch.inference_mode(), _adapter_switch(model, use_adapter):
        output = model.generate(**inputs, **kwargs)
    return tokenizer.decode(output[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True).strip()


def stream_reply(model: Any, tokenizer: Any, messages: list[dict[str, Any]],
                 settings: GenerationSettings | None = None, use_adapter: bool = True,
                 prompt: list[int] | None = None) -> Iterator[str]:
    """Yield the reply so far, growing as tokens arrive (for the app's streaming chat); `prompt` as in
    `generate_reply`."""
    import torch
    from transformers import TextIteratorStreamer

    settings = settings or GenerationSettings()
    inputs = _model_inputs(model, prompt if prompt is not None else prompt_ids(tokenizer, messages, settings))
    streamer = TextIteratorStreamer(tokenizer, skip_prompt=True, skip_special_tokens=True)
    errors: list[BaseException] = []

    def run() -> None:
        try:
            with torch.inference_mode(), _adapter_switch(model, use_adapter):
                model.generate(**inputs, **_generate_kwargs(tokenizer, settings), streamer=streamer)
        except BaseException as err:  # handed to the consumer below
            errors.append(err)
            streamer.end()

    worker = threading.Thread(target=run, daemon=True)
    worker.start()
    reply = ""
    for piece in streamer:
        reply += piece
        yield reply.strip()
    worker.join()
    if errors:
        raise errors[0]


@dataclass
class ChatModel:
    """A base model with, optionally, a run's adapter on top."""

    model: Any
    tokenizer: Any
    base_model: str
    run: RunFolder | None = None

    @property
    def has_adapter(self) -> bool:
        return self.run is not None

    def reply(self, messages: list[dict[str, Any]], settings: GenerationSettings | None = None,
              use_adapter: bool = True) -> str:
        settings, prompt = self._prepared(messages, settings, use_adapter, None)
        return generate_reply(self.model, self.tokenizer, messages, settings, use_adapter and self.has_adapter,
                              prompt=prompt)

    def stream(self, messages: list[dict[str, Any]], settings: GenerationSettings | None = None,
               use_adapter: bool = True, prompt: list[int] | None = None) -> Iterator[str]:
        """The reply so far, growing; `prompt`: the messages' prompt ids when they were rendered already (the app
        renders a chat template it does not ship in a worker process, never in the web server)."""
        settings, prompt = self._prepared(messages, settings, use_adapter, prompt)
        return stream_reply(self.model, self.tokenizer, messages, settings, use_adapter and self.has_adapter,
                            prompt=prompt)

    def _prepared(self, messages: list[dict[str, Any]], settings: GenerationSettings | None, use_adapter: bool,
                  prompt: list[int] | None) -> tuple[GenerationSettings, list[int]]:
        """The settings of one reply and its prompt, checked to be within their bound: the base model's reply
        beside the fine-tuned one takes the comparison's (`GenerationSettings.for_comparison`)."""
        settings = settings or GenerationSettings()
        if prompt is None:
            prompt = prompt_ids(self.tokenizer, messages, settings)
        check_prompt_length(len(prompt), settings)
        return (settings.for_comparison() if self.has_adapter and not use_adapter else settings), prompt


def _inference_dtype() -> Any:
    import torch

    if torch.cuda.is_available():
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.float32


@dataclass(frozen=True)
class _ChatSource:
    """What a chat loads: the run (or None), its base model, where its tokenizer is, and whether to trust code."""

    run: RunFolder | None
    base_model: str
    tokenizer: str
    trust_remote_code: bool


def _chat_source(run_dir: str | Path | None, base_model: str | None, check_size: bool) -> _ChatSource:
    """The run's adapter on its base model, or `base_model` alone; with `check_size`, a Hub model too large to chat
    with on this machine is refused from its metadata before anything of it is downloaded."""
    run = None
    trust_remote_code = False
    if run_dir is not None:
        run = RunFolder.open(run_dir)
        run.require_adapter("chat with")
        record = run.read()
        base_model = card.base_model_of(record)
        if not base_model:
            raise UserError(f"run.json of run {run.run_id} does not name its base model ('base_model' or the "
                            "settings' 'model'), so its adapter cannot be loaded.")
        trust_remote_code = bool((record.get("settings") or {}).get("trust_remote_code"))
    base_model = base_model or models.default_model()
    if check_size:
        catalog.check_hub_model_fits(base_model, catalog.CHAT)
    return _ChatSource(run, base_model, str(run.adapter_path) if run else base_model, trust_remote_code)


def load_chat_tokenizer(run_dir: str | Path | None = None, base_model: str | None = None,
                        check_size: bool = False) -> Any:
    """The tokenizer `load_chat_model` gives the same run or base model, without the weights."""
    source = _chat_source(run_dir, base_model, check_size)
    return models.load_tokenizer(source.tokenizer, source.trust_remote_code)


def load_chat_model(run_dir: str | Path | None = None, base_model: str | None = None,
                    check_size: bool = False) -> ChatModel:
    """The base model of a run with its adapter, or a bare base model when no run is given. With `check_size`, a
    Hub model too large to chat with on this machine is refused from its metadata before it is downloaded."""
    import torch

    source = _chat_source(run_dir, base_model, check_size)
    run, base_model, trust_remote_code = source.run, source.base_model, source.trust_remote_code
    tokenizer = models.load_tokenizer(source.tokenizer, trust_remote_code)
    device_map = {"": 0} if torch.cuda.is_available() else None
    model = models.load_causal_lm(base_model, dtype=_inference_dtype(), device_map=device_map,
                                  trust_remote_code=trust_remote_code)
    if run is not None:
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, run.adapter_path)
    model.eval()
    return ChatModel(model, tokenizer, base_model, run)


class ChatModelCache:
    """The one chat model the app keeps in memory, shared by every visitor: asking for another run (or another
    base model) replaces it, so a shared server never holds two sets of weights. Safe to call from many threads:
    one load at a time, and a visitor asking for the model being loaded waits for it instead of loading it again."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._key: tuple[str, str] | None = None
        self._model: ChatModel | None = None
        self._tokenizer_lock = threading.Lock()
        self._tokenizer_key: tuple[str, str] | None = None
        self._tokenizer: Any = None

    @staticmethod
    def _key_of(run_dir: str | Path | None, base_model: str | None) -> tuple[str, str]:
        return ("run", str(run_dir)) if run_dir else ("base", base_model or "")

    def tokenizer(self, run_dir: str | Path | None, base_model: str | None = None) -> Any:
        """The tokenizer of the model `get` gives, without loading the weights when they are not in memory: the
        chat counts a conversation's tokens before any model loads (or a GPU is attached). The last one is kept."""
        key = self._key_of(run_dir, base_model)
        model = self._model
        if model is not None and self._key == key:
            return model.tokenizer
        with self._tokenizer_lock:
            if self._tokenizer_key != key:
                self._tokenizer_key, self._tokenizer = None, None
                self._tokenizer = load_chat_tokenizer(run_dir, None if run_dir else base_model, check_size=True)
                self._tokenizer_key = key
            return self._tokenizer

    def get(self, run_dir: str | Path | None, base_model: str | None = None) -> ChatModel:
        """The run's adapter on its base model, or `base_model` alone when no run is given."""
        key = self._key_of(run_dir, base_model)
        with self._lock:
            if self._key != key:
                # Let go of the old weights before loading the new: both at once may not fit.
                self._key, self._model = None, None
                self._model = load_chat_model(run_dir, None if run_dir else base_model, check_size=True)
                self._key = key
            return self._model


# One model in memory for the whole app, whichever visitor asked last.
chat_models = ChatModelCache()
