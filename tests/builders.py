"""Small builders for test data (imported by tests; no fixtures here)."""

from pathlib import Path

SAMPLE_DATA = Path(__file__).resolve().parent.parent / "sft_space" / "samples" / "captain_byte.jsonl"


def chat(*pairs, system=None):
    """A conversation from (user, assistant) pairs, as an OpenAI-style row."""
    messages = [{"role": "system", "content": system}] if system else []
    for user, assistant in pairs:
        messages += [{"role": "user", "content": user}, {"role": "assistant", "content": assistant}]
    return {"messages": messages}


def distinct_chats(n):
    """n different valid conversations."""
    return [chat((f"What is {i} plus {i}?", f"{i} plus {i} is {2 * i}.")) for i in range(n)]
