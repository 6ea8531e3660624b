"""Does the quick preset teach the sample's style? A measured check against the real embedded model.

    python tests/style_check.py [--preset quick] [--output-dir /tmp/style-check] [--json]

Trains the sample dataset (Captain Byte: every reply opens "Arr, matey!" and ends "Fair winds! ⚓") with the
preset and default flags, exactly as a user would from the README (`python -m sft_space train ...`), then answers
every held-out prompt of that run (the validation split the run itself made, never trained on) with the adapter
and without it (the base model), and counts the answers that carry the style. It passes when most answers after
training carry the style and the offline first-run budget holds: the run plus one chat answer within 3 minutes
on 2 CPU cores. Not part of the test suite (it takes minutes and needs the embedded model); anyone can rerun it.
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

SAMPLE = ROOT / "sft_space" / "samples" / "captain_byte.jsonl"
# The sample's replies all open "Arr, matey!" and close "Fair winds! ⚓": an answer carries the style when it
# has at least two of these marks (one alone turns up by chance: "Paris, la France! ⚓" is not the style).
STYLE_MARKS = (re.compile(r"\barr\b", re.I), re.compile(r"\bmatey\b", re.I), re.compile(r"fair winds", re.I),
               re.compile("⚓"))
BUDGET_SECONDS = 180
MOST = 0.5


def carries_style(answer: str) -> bool:
    return sum(bool(mark.search(answer or "")) for mark in STYLE_MARKS) >= 2


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="quick")
    parser.add_argument("--output-dir", default="/tmp/style-check")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()

    runs_dir = Path(args.output_dir)
    shutil.rmtree(runs_dir, ignore_errors=True)
    started = time.monotonic()
    subprocess.run([sys.executable, "-m", "sft_space", "train", str(SAMPLE), "--preset", args.preset,
                    "--output-dir", str(runs_dir), "--run-name", "style"], cwd=ROOT, check=True)
    trained = time.monotonic() - started

    from sft_space.quiet import quiet_known_messages

    quiet_known_messages()
    from sft_space import models
    from sft_space.chat import load_chat_model
    from sft_space.settings import GenerationSettings
    from sft_space.runs import RunFolder
    from sft_space.settings import RunSettings
    from sft_space.train import SAMPLE_MAX_NEW_TOKENS
    from sft_space.training_data import prepare_data

    folder = RunFolder.open(runs_dir / "style")
    record = folder.read()
    settings = RunSettings(**record["settings"])
    chat_started = time.monotonic()
    chat = load_chat_model(folder.path)
    generation = GenerationSettings(max_new_tokens=SAMPLE_MAX_NEW_TOKENS)
    prepared = prepare_data(settings, models.load_tokenizer(settings.model))
    prompts = [[m for m in e.messages if m["role"] != "assistant"][:1] for e in prepared.validation]
    first = chat.reply(prompts[0], generation)
    first_answer_seconds = time.monotonic() - chat_started
    after = [first] + [chat.reply(p, generation) for p in prompts[1:]]
    before = [chat.reply(p, generation, use_adapter=False) for p in prompts]

    result = {
        "preset": args.preset,
        "steps": (record.get("final_metrics") or {}).get("step"),
        "held_out_prompts": len(prompts),
        "styled_after": sum(map(carries_style, after)),
        "styled_before": sum(map(carries_style, before)),
        "train_seconds": round(trained, 1),
        "train_plus_one_answer_seconds": round(trained + first_answer_seconds, 1),
        "examples": [{"prompt": p[0]["content"], "before": b, "after": a}
                     for p, b, a in list(zip(prompts, before, after))[:3]],
    }
    passed = (result["styled_after"] > MOST * len(prompts)
              and result["train_plus_one_answer_seconds"] <= BUDGET_SECONDS)
    result["passed"] = passed
    if args.json:
        print(json.dumps(result, ensure_ascii=False, indent=1))
    else:
        print(f"{args.preset}: {result['steps']} steps; held-out answers in the style: {result['styled_after']} of "
              f"{len(prompts)} after training, {result['styled_before']} before; run + one answer "
              f"{result['train_plus_one_answer_seconds']} s (budget {BUDGET_SECONDS} s) → "
              f"{'PASS' if passed else 'FAIL'}")
        for example in result["examples"]:
            print(f"- {example['prompt']}\n    before: {example['before'][:120]}\n    after:  {example['after'][:120]}")
    return 0 if passed else 1


if __name__ == "__main__":
    sys.exit(main())
