"""What you see is what you train, in a real browser: one visitor's walk through the Data tab with the usual
mistakes (the sample left picked, a file in an unknown shape, a wrong file type, a check refused after a good one,
a reload), and what the Train and Publish tabs say meanwhile.

Needs Chromium, as tests/test_browser.py does (skipped without it).
"""

import json
import time

import pytest

from test_browser import open_as_visitor  # (skips without Chromium)
from playwright.sync_api import expect  # noqa: E402

# Nothing listens there: a request to it is only the browser obeying text from the data.
TRACKER = "http://127.0.0.1:9/track.png"
IMAGE_COLUMN = f"![t]({TRACKER})"
IMAGE_ROLE = "![r](http://127.0.0.1:9/role.png)"


def dialog_rows():
    """Five conversations under a key no format reads ("dialog"), with a column named like a Markdown image; the
    fourth ends with the user and the fifth has a role named like one (errors the check names, in its problem
    rows)."""
    rows = [{"dialog": [{"role": "user", "content": f"Question {n}?"},
                        {"role": "assistant", "content": f"Answer {n}."}], IMAGE_COLUMN: "x"} for n in range(3)]
    rows.append({"dialog": [{"role": "user", "content": "A question left without a reply"}], IMAGE_COLUMN: "x"})
    rows.append({"dialog": [{"role": IMAGE_ROLE, "content": "Hi"}, {"role": "assistant", "content": "Ahoy."}],
                 IMAGE_COLUMN: "x"})
    return rows


def kept_uploads(runs_dir, name):
    return list((runs_dir / ".uploads").rglob(name))


def upload(page, runs_dir, path):
    """Upload `path` and wait until the server has kept it (the handle Check reads), as a person waits for the
    file to show."""
    before = set(kept_uploads(runs_dir, path.name))
    page.set_input_files("#data-upload input[type=file]", str(path))
    deadline = time.monotonic() + 30
    while not set(kept_uploads(runs_dir, path.name)) - before:
        assert time.monotonic() < deadline, "the upload was never kept"
        time.sleep(0.1)
    expect(page.locator("#upload-note")).to_contain_text(path.name, timeout=15_000)


@pytest.mark.slow
def test_what_the_data_tab_shows_is_what_start_trains(app_url, browser, tiny_model_dir, tmp_path):
    """On the browser tests' shared app (conftest's app_url), as a visitor of its own."""
    url, runs_dir = app_url
    context = browser.new_context(viewport={"width": 1280, "height": 1000})
    page = context.new_page()
    fetched = []
    page.on("request", lambda request: fetched.append(request.url) if "127.0.0.1:9" in request.url else None)
    open_as_visitor(page, url)

    # Before any check the tables show their own headers (not "1 2 3"), and the page says what to do.
    for table, header in (("#problem-counts", "meaning"), ("#problem-rows", "what to do"),
                          ("#data-statistics", "median")):
        expect(page.locator(table)).to_contain_text(header)
    expect(page.locator("#data-summary")).to_contain_text("then press Check data")

    # The sample, checked.
    page.get_by_label("Use the sample dataset").check()
    page.click("#check-data")
    expect(page.locator("#data-summary")).to_contain_text("All 160 rows are valid", timeout=60_000)

    # A file of the visitor's own, uploaded with the sample still picked: the upload picks "Your file", and
    # the sample's report goes at once.
    own = tmp_path / "dialog.jsonl"
    own.write_text("\n".join(json.dumps(row) for row in dialog_rows()) + "\n")
    upload(page, runs_dir, own)
    expect(page.get_by_label("Your file")).to_be_checked()
    expect(page.locator("#data-summary")).to_contain_text("dialog.jsonl is chosen")
    expect(page.locator("#data-summary")).not_to_contain_text("160")
    page.get_by_role("tab", name="Train").click()
    expect(page.locator("#train-estimate")).to_contain_text("No checked data")
    page.get_by_role("tab", name="Data").click()

    # Its shape is unknown: the refusal stays in the summary, in the page's words, the column named as text.
    page.click("#check-data")
    summary = page.locator("#data-summary")
    expect(summary).to_contain_text("Refused", timeout=60_000)
    expect(summary).to_contain_text("“Column mapping”")
    expect(summary).to_contain_text(IMAGE_COLUMN)
    expect(summary).not_to_contain_text("--columns")

    # Mapped, it is checked: the ignored column is named as text, the problem row says what to do.
    page.get_by_text("Column mapping").first.click()
    page.get_by_label("Column mapping").fill("messages=dialog")
    page.click("#check-data")
    expect(summary).to_contain_text("2 of 5 rows have errors", timeout=60_000)
    expect(summary).to_contain_text(f"column '{IMAGE_COLUMN}' is not read")
    expect(summary).to_contain_text("“Column mapping”")
    expect(page.locator("#problem-rows")).to_contain_text("row 4")
    expect(page.locator("#problem-rows")).to_contain_text(IMAGE_ROLE)
    page.get_by_label("Skip invalid rows").check()
    time.sleep(0.5)  # the tick is kept by its own small event
    # The problem rows' last column ends inside the table: nothing is cut at its right edge.
    overflow = page.evaluate("""() => {
        const table = document.querySelector('#problem-rows');
        const cells = [...table.querySelectorAll('th')];
        const right = table.getBoundingClientRect().right;
        return cells.map(cell => cell.getBoundingClientRect().right - right).filter(over => over > 1);
    }""")
    assert not overflow, overflow
    page.get_by_role("tab", name="Train").click()
    expect(page.locator("#train-estimate")).to_contain_text("This run: about", timeout=15_000)

    # A check refused after a good one (a model the page may not name): the report goes, and the Train tab
    # says there is no checked data; Start is refused.
    picker = page.locator("#model-picker input")
    picker.fill("/etc")
    picker.press("Enter")
    page.get_by_role("tab", name="Data").click()
    page.click("#check-data")
    expect(summary).to_contain_text("Refused", timeout=30_000)
    expect(summary).to_contain_text("is not a Hub model id")
    expect(summary).not_to_contain_text("rows have errors")
    expect(page.locator("#chatml-preview")).to_contain_text("No valid example")
    picker.fill(str(tiny_model_dir))
    picker.press("Enter")
    page.get_by_role("tab", name="Train").click()
    expect(page.locator("#train-estimate")).to_contain_text("No checked data", timeout=15_000)
    page.click("#start-training")
    expect(page.locator("#train-progress")).to_contain_text("Refused · Check your data", timeout=15_000)

    # Checked again; then the page is reloaded: the file (kept by the server), the mapping, Skip invalid rows
    # and the report come back, and the Train tab has its estimate again.
    page.get_by_role("tab", name="Data").click()
    page.click("#check-data")
    expect(summary).to_contain_text("2 of 5 rows have errors", timeout=60_000)
    # The Train tab's refusal was about the data: checked again, it is gone, not left above what comes next.
    page.get_by_role("tab", name="Train").click()
    expect(page.locator("#train-progress")).not_to_contain_text("Refused", timeout=15_000)
    page.get_by_role("tab", name="Data").click()
    page.reload()
    expect(page.locator("#data-summary")).to_contain_text("2 of 5 rows have errors", timeout=60_000)
    expect(page.get_by_label("Your file")).to_be_checked()
    expect(page.locator("#upload-note")).to_contain_text("dialog.jsonl")
    expect(page.get_by_label("Skip invalid rows")).to_be_checked()
    page.get_by_text("Column mapping").first.click()
    expect(page.get_by_label("Column mapping")).to_have_value("messages=dialog")
    expect(page.locator("#chatml-preview mark.sft-trained").first).to_be_visible()
    page.get_by_role("tab", name="Train").click()
    expect(page.locator("#train-estimate")).to_contain_text("This run: about", timeout=15_000)
    page.get_by_role("tab", name="Data").click()

    # A wrong file type (refused by Gradio in the page, with a red "Error" on the box), then the sample
    # picked: the box is clear again, and the summary says the file is set aside; then the file again.
    wrong = tmp_path / "notes.txt"
    wrong.write_text("not data")
    page.set_input_files("#data-upload input[type=file]", str(wrong))
    expect(page.locator("#data-upload")).to_contain_text("Error", timeout=10_000)
    page.get_by_label("Use the sample dataset").check()
    expect(page.locator("#data-upload")).not_to_contain_text("Error", timeout=10_000)
    expect(summary).to_contain_text("The sample dataset is chosen (your file dialog.jsonl is set aside")
    expect(page.locator("#chatml-preview")).to_contain_text("No valid example")
    upload(page, runs_dir, own)
    expect(page.get_by_label("Your file")).to_be_checked()
    expect(summary).to_contain_text("Your file dialog.jsonl is chosen")

    # Publish: a refusal stays said beside the buttons after its toast.
    page.get_by_role("tab", name="Publish").click()
    page.click("#publish-zip")
    expect(page.locator("#publish-outcome")).to_contain_text("Refused · Pick a run first", timeout=15_000)

    assert not fetched, f"the browser fetched what the data named: {fetched}"
    context.close()
