"""The app end to end in a real browser: Data → Train → (reload) → Chat, on the sample dataset and a tiny model.

Needs Chromium (Debian: `apt-get install chromium`). Skipped without it, unless SFT_SPACE_REQUIRE_BROWSER=1
(as in CI), where a missing browser is a failure.
"""

import json
import os
import re
import time

import pytest

from builders import CHROMIUM, SAMPLE_DATA
from builders import PLANTED_APP_TOKEN as PLANTED_TOKEN

# More steps than any test waits for: the run cannot end before its owner stops it, however fast the machine, so
# the second visitor always acts while it is under way.
STEPS = 100_000
# The chat's replies, in tokens: every token streamed redraws the page; a few show that each model answers.
REPLY_TOKENS = 8

if CHROMIUM is None:
    if os.environ.get("SFT_SPACE_REQUIRE_BROWSER"):
        raise RuntimeError("The browser test needs Chromium: apt-get install chromium")
    pytest.skip("Chromium is not installed (apt-get install chromium)", allow_module_level=True)

from playwright.sync_api import expect  # noqa: E402

# The app (conftest's app_url, with the planted HF_TOKEN) and Chromium (conftest's browser) are shared by the
# browser tests; each test is a visitor of its own, and finds in the runs folder only what it made itself. (The app
# on a Space, with sign-in, is test_browser_jobs'.)


def run_folders(runs_dir):
    return {p for p in runs_dir.iterdir() if (p / "run.json").is_file()}


def kept_uploads(runs_dir):
    """The data files the app has kept (moved into a visitor's folder), of every visitor."""
    return set((runs_dir / ".uploads").rglob("*.jsonl"))


def open_as_visitor(page, url):
    """Open the app and wait until the server has given this browser its signed visitor id (as a person would
    before acting: the page's load event hands it out)."""
    page.goto(url)
    page.wait_for_function("localStorage.getItem('sft-space-visitor')", timeout=30_000)


def visitor_of(page, runs_dir):
    """The visitor id the server gave this page (the browser keeps it encrypted): read from the request the page
    sends when the Publish tab opens, checked with the server's own key."""
    from sft_space import access
    from sft_space.errors import UserError

    identity = access.Identity.for_runs(runs_dir)

    def visitor(value):
        try:
            return identity.visitor(value) if isinstance(value, str) else None
        except UserError:
            return None

    def sends_the_token(request):
        return "/queue/join" in request.url and any(
            visitor(value) for value in (request.post_data_json or {}).get("data") or [])

    with page.expect_request(sends_the_token, timeout=15_000) as sent:
        page.get_by_role("tab", name="Publish").click()
    return next(visitor(value) for value in sent.value.post_data_json["data"] if visitor(value))


@pytest.mark.slow
def test_data_train_reload_and_chat(app_url, browser):
    url, runs_dir = app_url
    context = browser.new_context(viewport={"width": 1280, "height": 1000})
    page = context.new_page()
    open_as_visitor(page, url)
    uploads_before, runs_before = kept_uploads(runs_dir), run_folders(runs_dir)

    # Data: the sample dataset, uploaded as a user's JSONL, is checked and previewed with trained tokens highlighted.
    page.set_input_files("#data-upload input[type=file]", str(SAMPLE_DATA))
    # Gradio shows the name's stem and suffix in separate elements, sometimes read with a space between them.
    expect(page.locator("#data-upload")).to_contain_text(re.compile(r"captain_byte\s*\.jsonl"), timeout=15_000)
    # The page shows the file before the server has kept it (moved it into this visitor's folder, the handle Check
    # reads); a Check pressed in between is refused ("Upload a file … first"; seen once in CI). Wait for the kept copy.
    deadline = time.monotonic() + 30
    while not kept_uploads(runs_dir) - uploads_before:
        assert time.monotonic() < deadline, "the upload was never kept"
        time.sleep(0.1)
    page.click("#check-data")
    expect(page.locator("#data-summary")).to_contain_text("All 160 rows are valid", timeout=60_000)
    expect(page.locator("#chatml-preview mark.sft-trained").first).to_be_visible()

    # A second visitor (another browser profile, so another visitor id) comes along; once the first visitor's run is
    # under way, they cannot stop it, and their own Start waits in the queue instead of disturbing it. (What needs no
    # run is done first: the run trains no longer than the test needs it.)
    stranger_context = browser.new_context(viewport={"width": 1280, "height": 1000})
    stranger = stranger_context.new_page()
    open_as_visitor(stranger, url)
    # The first visitor's upload sits on this server: typed as a "Hub dataset", its path is not read.
    uploads = sorted(kept_uploads(runs_dir) - uploads_before)
    assert len(uploads) == 1 and not any(PLANTED_TOKEN in str(p) for p in uploads)
    stranger.get_by_label("Hub dataset id").fill(str(uploads[0]))
    stranger.click("#check-data")
    expect(stranger.get_by_text("is not a Hub dataset id").first).to_be_visible(timeout=30_000)
    # A refusal is a message: no output is left with a red "Error" badge, as if the page had crashed.
    expect(stranger.locator("#data-summary")).not_to_contain_text("rows")
    expect(stranger.locator("#data-summary")).not_to_contain_text("Error")
    expect(stranger.locator("#chatml-preview")).not_to_contain_text("Error")
    stranger.get_by_label("Hub dataset id").fill("")
    stranger.get_by_label("Use the sample dataset").check()
    stranger.click("#check-data")
    expect(stranger.locator("#data-summary")).to_contain_text("All 160 rows are valid", timeout=60_000)

    # Train: a run of the quick preset and the Advanced settings; the loss plot draws from the first steps while
    # it runs.
    page.get_by_role("tab", name="Train").click()
    page.get_by_label("quick").check()
    page.get_by_text("Advanced").click()
    max_steps = page.get_by_label("Max steps")
    # Typed key by key, as a person does: a programmatic fill() of Gradio's number box is sometimes not taken
    # up (measured: 5 of 16 fills lost, 0 of 16 typed values), and the run then trains for whole epochs.
    max_steps.click()
    max_steps.press("Control+a")
    max_steps.press_sequentially(str(STEPS))
    max_steps.press("Tab")
    page.click("#start-training")
    expect(page.locator("#train-progress")).to_contain_text("step ", timeout=120_000)
    # The legend of drawn lines, by their names (not only its title, clipped by the plot's box).
    expect(page.locator("#loss-plot")).to_contain_text("train (smoothed)", timeout=10_000)

    # Meanwhile the second visitor's Train tab shows no run (not the first visitor's); their Stop and Start.
    stranger.get_by_role("tab", name="Train").click()
    expect(stranger.locator("#train-progress")).to_contain_text("No run yet")
    stranger.click("#stop-training")
    # A refusal is said in the status line (and a toast), once, as a refusal.
    expect(stranger.locator("#train-progress")).to_contain_text("Refused · You have no run to stop.", timeout=10_000)
    stranger.click("#start-training")
    expect(stranger.locator("#train-progress")).to_contain_text("position 1 in the queue", timeout=10_000)
    stranger.click("#stop-training")
    expect(stranger.locator("#train-progress")).to_contain_text("Removed from the queue", timeout=10_000)

    # The stranger's Stop and Start left the run alone: it is still training, and only its owner stops it.
    started = sorted(run_folders(runs_dir) - runs_before)
    assert len(started) == 1
    assert json.loads((started[0] / "run.json").read_text())["status"] == "running", \
        "the second visitor stopped or disturbed the run"
    expect(page.locator("#train-progress")).to_contain_text("Running", timeout=10_000)
    page.click("#stop-training")
    expect(page.locator("#train-progress")).to_contain_text("Stopped", timeout=120_000)
    record = json.loads((started[0] / "run.json").read_text())
    assert record["status"] == "stopped" and record["settings"]["max_steps"] == STEPS
    assert 0 < record["final_metrics"]["step"] < STEPS
    assert (started[0] / "adapter" / "adapter_model.safetensors").is_file(), "a stop keeps the adapter"

    # The other visitor does not see this visitor's run on the Runs tab.
    stranger.get_by_role("tab", name="Runs").click()
    stranger.get_by_role("button", name="↻ Refresh").click()
    # An absence cannot be waited for; the refresh's answer can: the line saying this visitor has no runs.
    expect(stranger.locator("#runs-summary")).to_contain_text("No runs of yours", timeout=10_000)
    expect(stranger.locator("#runs-table")).not_to_contain_text(started[0].name)
    # Nor can they chat with its adapter by naming its folder as the model.
    stranger.locator("#model-picker input").fill(str(started[0] / "adapter"))
    stranger.locator("#model-picker input").press("Enter")
    stranger.get_by_role("tab", name="Data").click()
    stranger.click("#check-data")
    expect(stranger.get_by_text("is not a Hub model id").first).to_be_visible(timeout=30_000)
    assert PLANTED_TOKEN not in stranger.content()
    # Done with: an open page keeps asking the app for its Train tab's status every second.
    stranger_context.close()

    # A reload re-attaches to this visitor's run (the browser keeps the visitor id), and the form shows that run's
    # preset and settings, not the defaults.
    page.reload()
    page.get_by_role("tab", name="Train").click()
    expect(page.locator("#train-progress")).to_contain_text(started[0].name, timeout=15_000)
    expect(page.get_by_label("quick")).to_be_checked(timeout=10_000)
    page.get_by_text("Advanced").click()
    expect(page.get_by_label("Max steps")).to_have_value(str(STEPS), timeout=10_000)

    # Chat: the fine-tuned model and the base answer the same message side by side.
    page.get_by_role("tab", name="Chat").click()
    page.get_by_role("button", name="↻ Runs").click()
    page.locator("#chat-run input").click()
    page.get_by_role("option", name=started[0].name, exact=False).first.click()
    page.get_by_text("Generation", exact=True).click()
    for slider in ("Max new tokens", "Base model's max new tokens"):
        tokens = page.get_by_label(f"number input for {slider}", exact=True)
        tokens.click()
        tokens.press("Control+a")
        tokens.press_sequentially(str(REPLY_TOKENS))
        tokens.press("Tab")
        expect(tokens).to_have_value(str(REPLY_TOKENS))
    page.locator("#chat-message textarea").fill("Ahoy! What is the capital of France?")
    page.click("#chat-send")
    expect(page.locator("#chat-tuned .bot, #chat-tuned [data-testid='bot']").first).to_be_visible(timeout=60_000)
    expect(page.locator("#chat-base .bot, #chat-base [data-testid='bot']").first).to_be_visible(timeout=60_000)

    # Runs: the run is listed with its curve. Opening the tab refreshes it (once: a second refresh in flight could
    # redraw the run picker below while it is open); its summary line is written by that refresh.
    page.get_by_role("tab", name="Runs").click()
    expect(page.locator("#runs-summary")).to_contain_text("1 run, newest first", timeout=15_000)
    expect(page.locator("#runs-table")).to_contain_text(started[0].name)

    # Publish, opened from the Runs tab: the adapter downloads as a zip; a push (with the planted HF_TOKEN, and
    # no Hub here) says what went wrong.
    page.locator("#runs-run input").click()
    page.get_by_role("option", name=started[0].name).click()
    page.click("#open-in-publish")
    expect(page.locator("#publish-run input")).to_have_value(re.compile(started[0].name), timeout=10_000)
    page.click("#publish-zip")
    expect(page.locator("#publish-file")).to_contain_text(re.compile(rf"{started[0].name}-adapter\s*\.zip"),
                                                          timeout=60_000)
    page.locator("#publish-repo textarea, #publish-repo input").first.fill("alice/captain-byte")
    page.click("#publish-push")
    # Said in the tab's outcome line, where it stays (and in a toast, which fades).
    expect(page.locator("#publish-outcome")).to_contain_text("Could not reach the Hugging Face Hub", timeout=30_000)
    assert PLANTED_TOKEN not in page.content()
    assert PLANTED_TOKEN not in (runs_dir / "app.log").read_text()
    for path in runs_dir.rglob("*"):
        if path.is_file():
            assert PLANTED_TOKEN.encode() not in path.read_bytes(), path
    context.close()


@pytest.mark.slow
def test_two_runs_compared_side_by_side(app_url, browser):
    """Runs tab: a visitor picks two of their runs and sees both loss curves on one plot (one colour and legend
    entry each) and their settings side by side; another visitor's run is not offered. (That a page cannot name
    another visitor's run is tested in test_ui.)"""
    from test_compare import make_run

    url, runs_dir = app_url
    context = browser.new_context(viewport={"width": 1280, "height": 1000})
    page = context.new_page()
    open_as_visitor(page, url)
    visitor = visitor_of(page, runs_dir)
    make_run(runs_dir, "compare-quick", owner=visitor, lora_r=8)
    make_run(runs_dir, "compare-rank16", owner=visitor, lora_r=16, losses=(3.2, 2.4, 1.9), eval_losses=(2.9, 2.2))
    make_run(runs_dir, "compare-someone-elses", owner="someone-else")

    page.get_by_role("tab", name="Runs").click()
    # Opening the tab refreshes its lists; a dropdown opened before that answer is redrawn under the pointer (seen
    # once in CI: the option moved out of view). The summary line is written by the same answer.
    expect(page.locator("#runs-summary")).to_contain_text("newest first", timeout=15_000)
    picker = page.locator("#runs-compare input")
    for name in ("compare-quick", "compare-rank16"):
        picker.click()
        expect(page.get_by_role("option", name="compare-someone-elses")).to_have_count(0)
        page.get_by_role("option", name=name, exact=True).click()
    page.keyboard.press("Escape")
    for plot in ("#compare-train", "#compare-validation"):
        expect(page.locator(plot)).to_contain_text("compare-quick", timeout=15_000)  # the legend, one per run
        expect(page.locator(plot)).to_contain_text("compare-rank16")
    expect(page.locator("#compare-train [aria-roledescription='line mark']")).to_have_count(2)
    expect(page.locator("#compare-settings")).to_contain_text("lora_r")
    expect(page.locator("#compare-settings")).not_to_contain_text("learning_rate")  # the same in both
    context.close()

