"""Small builders for test data (imported by tests; no fixtures here)."""

import contextlib
import os
import shutil
import socket
import subprocess
import time
import urllib.request
from pathlib import Path

SAMPLE_DATA = Path(__file__).resolve().parent.parent / "sft_space" / "samples" / "captain_byte.jsonl"
# The browser tests' Chromium (Debian: `apt-get install chromium`), None where it is not installed.
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
                 "--disable-sync"]
# The token the browser tests' app is given (never the developer's): it must show up nowhere, not in the page, not
# in the server's log, not in a file it writes.
PLANTED_APP_TOKEN = "hf_PlantedBrowserToken0123456789abcdef"


def gpu(name, memory_gib, capability):
    """A GPU as hardware.detect_hardware describes one (the plan and the estimate are tested on GPUs not here)."""
    from sft_space.hardware import Hardware

    return Hardware("cuda", name, memory_gib, capability)


T4, A10G, H100 = gpu("Tesla T4", 15.0, (7, 5)), gpu("NVIDIA A10G", 22.0, (8, 6)), gpu("NVIDIA H100", 79.0, (9, 0))


def chat(*pairs, system=None):
    """A conversation from (user, assistant) pairs, as an OpenAI-style row."""
    messages = [{"role": "system", "content": system}] if system else []
    for user, assistant in pairs:
        messages += [{"role": "user", "content": user}, {"role": "assistant", "content": assistant}]
    return {"messages": messages}


def distinct_chats(n):
    """n different valid conversations."""
    return [chat((f"What is {i} plus {i}?", f"{i} plus {i} is {2 * i}.")) for i in range(n)]


def persona_chats(n):
    """Conversations with one unmistakable style: a tiny model can learn the fixed opening quickly."""
    rows = [chat((f"Question {i}: what is {i} times 3?", f"Ahoy! {i} times 3 is {3 * i}. Ahoy!")) for i in range(n)]
    rows[0] = chat(("Hello there.", "Ahoy! Hello to you. Ahoy!"), ("How are you?", "Ahoy! Shipshape. Ahoy!"),
                   system="You are a sailor.")
    return rows


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def running_server(args, cwd, env, log_path, timeout=120):
    """Start a Gradio app as its own process on a free loopback port; yield its URL once it answers."""
    port = free_port()
    env = {**os.environ, **env, "GRADIO_SERVER_NAME": "127.0.0.1", "GRADIO_SERVER_PORT": str(port),
           "GRADIO_ANALYTICS_ENABLED": "False"}
    with open(log_path, "w") as log:
        process = subprocess.Popen(args, cwd=cwd, env=env, stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.time() + timeout
        while True:
            try:
                urllib.request.urlopen(url, timeout=2)
                break
            except OSError:
                if process.poll() is not None or time.time() > deadline:
                    raise RuntimeError(f"{args} did not start:\n{Path(log_path).read_text()}") from None
                time.sleep(0.5)
        yield url
    finally:
        process.terminate()
        process.wait(timeout=30)


def step_event(step, loss, max_steps=10, **fields):
    """A logged step of a run's curve (events.Step), the fields a test does not name filled in."""
    from sft_space import events

    fields = {"epoch": 0.0, "loss_smoothed": loss, "elapsed_seconds": float(step), **fields}
    return events.Step(step=step, max_steps=max_steps, loss=loss, **fields)


def evaluation_event(step, eval_loss, max_steps=10, **fields):
    """A validation loss of a run's curve (events.Evaluation), the fields a test does not name filled in."""
    from sft_space import events

    fields = {"epoch": 0.0, "eval_seconds": 0.5, "elapsed_seconds": float(step), **fields}
    return events.Evaluation(step=step, max_steps=max_steps, eval_loss=eval_loss, **fields)


def write_events(folder, *said):
    """Append events to a run folder's events.jsonl, as its training process does."""
    from sft_space import events

    for event in said:
        events.append(folder.path, event)
