"""The app in a real browser on a Space with sign-in, the original public Space that people duplicate: a visitor who
has not signed in checks data, is refused Start and offered a Duplicate; on the Train tab's Hugging Face Jobs choice,
a visitor signed in with the `jobs` scope sees the GPU, the cost and Start; one whose sign-in lacks the scope, or who
has not signed in, is told why and how to sign in (again), Start disabled.

Signing in needs the Hub. Here the browser is handed what the Space's sign-in leaves it: the session cookie of
Gradio's own SessionMiddleware, signed with the running app's key, its `oauth_info` holding a profile and a token
with or without `jobs` (Gradio reads the visitor's gr.OAuthProfile and gr.OAuthToken from it, as on a Space).
Whatever the Hub would answer to that sign-in (the real consent screen, a scope granted) is verified only there.

Needs Chromium, as test_browser does: skipped without it, unless SFT_SPACE_REQUIRE_BROWSER=1.
"""

import json
import os
import re
import time
from base64 import b64encode
from pathlib import Path
from typing import NamedTuple

import pytest

from builders import CHROMIUM, free_port

if CHROMIUM is None:
    if os.environ.get("SFT_SPACE_REQUIRE_BROWSER"):
        raise RuntimeError("The browser test needs Chromium: apt-get install chromium")
    pytest.skip("Chromium is not installed (apt-get install chromium)", allow_module_level=True)

from playwright.sync_api import expect  # noqa: E402

# The sign-in's token: it must never reach the page.
PLANTED_OAUTH_TOKEN = "hf_oauth_PlantedVisitorToken0123456789"
# What Spaces set for a Space with `hf_oauth: true`, as Gradio (gradio.utils.get_space, gradio.oauth) and this app
# (access.sign_in_available, SPACE_ID) read it.
SPACE = {"SYSTEM": "spaces", "SPACE_ID": "acme/sft-space", "SPACE_AUTHOR_NAME": "acme", "SPACE_REPO_NAME": "sft-space",
         "SPACE_HOST": "acme-sft-space.hf.space", "OAUTH_CLIENT_ID": "client-id",
         "OAUTH_CLIENT_SECRET": "client-secret", "OAUTH_SCOPES": "openid profile write-repos manage-repos jobs",
         "OPENID_PROVIDER_URL": "https://huggingface.co"}


class SpaceApp(NamedTuple):
    url: str
    secret: str  # the key its session cookies are signed with
    runs_dir: Path


@pytest.fixture(scope="module")
def space_app(tiny_model_dir, tmp_path_factory):
    """The app as a Space with sign-in builds and serves it, in this process. The Space's owner is acme; who may
    train on its hardware is left at the default (the owner), which does not decide who may train on Jobs. The
    operator names it the original Space (SFT_SPACE_ORIGINAL_SPACE), so a visitor who may not train is offered
    their own copy."""
    from starlette.middleware.sessions import SessionMiddleware

    from sft_space import hub_jobs, jobs
    from sft_space.jobs_stand_in import LocalJobsApi
    from sft_space.ui import build_app, launch

    runs_dir = tmp_path_factory.mktemp("space-jobs-runs")
    with pytest.MonkeyPatch.context() as patch:
        for name, value in {**SPACE, "SFT_SPACE_ORIGINAL_SPACE": SPACE["SPACE_ID"], "SFT_SPACE_RUNS": str(runs_dir),
                            "SFT_SPACE_DEFAULT_MODEL": str(tiny_model_dir), "SFT_SPACE_WARM_START": "0"}.items():
            patch.setenv(name, value)
        # On a Space Gradio serves with its hot reloader, a server of the `spaces` package on port 7887: not the app,
        # and one port for every app of the machine. Left out of this one.
        patch.setattr("gradio.http_server.get_space", lambda: None)
        # gradio.oauth reads these once, when it is first imported.
        for name in ("OAUTH_CLIENT_ID", "OAUTH_CLIENT_SECRET", "OAUTH_SCOPES", "OPENID_PROVIDER_URL"):
            patch.setattr(f"gradio.oauth.{name}", SPACE[name])
        # No Hub here: the Jobs API's flavors and prices come from the local stand-in, which SFT_SPACE_JOBS_API=local
        # cannot choose on a Space (there every visitor's job is a real one), so this app is handed it directly.
        patch.setattr(hub_jobs, "jobs_api", lambda settings, runs_dir, token=None:
                      LocalJobsApi(Path(runs_dir) / ".hub-jobs-local"))
        patch.setattr(hub_jobs, "_flavors_seen", None)  # the stand-in's prices, kept for this app only
        app = build_app(jobs.JobManager(), default_model=str(tiny_model_dir))
        port = free_port()
        launch(app, server_name="127.0.0.1", server_port=port, prevent_thread_lock=True, quiet=True)
        try:
            secret = next(m.kwargs["secret_key"] for m in app.server_app.user_middleware if m.cls is SessionMiddleware)
            yield SpaceApp(f"http://127.0.0.1:{port}", secret, runs_dir)
        finally:
            app.close()


def signed_in_visitor(browser, space_app, username, scope):
    """A page of a visitor whose browser holds the Space's session cookie of a sign-in as `username` that granted
    `scope` (None: not signed in), opened once the server has given it its visitor id."""
    import itsdangerous

    url, secret, _ = space_app
    context = browser.new_context(viewport={"width": 1280, "height": 1000})
    if scope is not None:
        oauth_info = {"access_token": PLANTED_OAUTH_TOKEN, "token_type": "bearer", "scope": scope,
                      "expires_at": int(time.time()) + 3600,
                      "userinfo": {"sub": "1", "name": username.title(), "preferred_username": username,
                                   "profile": f"https://huggingface.co/{username}", "picture": ""}}
        # Starlette's session cookie: the session as base64 JSON, signed with a timestamp.
        value = itsdangerous.TimestampSigner(secret).sign(b64encode(json.dumps({"oauth_info": oauth_info}).encode()))
        context.add_cookies([{"name": "session", "value": value.decode(), "url": url}])
    page = context.new_page()
    page.goto(url)
    page.wait_for_function("localStorage.getItem('sft-space-visitor')", timeout=30_000)
    return page


def choose_jobs(page):
    page.get_by_role("tab", name="Train").click()
    page.locator("#train-where").get_by_label("Hugging Face Jobs").check()
    expect(page.locator("#jobs-flavor")).to_be_visible(timeout=10_000)


@pytest.mark.slow
def test_a_visitor_signed_in_with_the_jobs_scope_sees_the_gpu_the_cost_and_start(space_app, browser):
    page = signed_in_visitor(browser, space_app, "bob", "openid profile jobs")
    page.get_by_label("Use the sample dataset").check()
    page.click("#check-data")
    expect(page.locator("#data-summary")).to_contain_text("All 160 rows are valid", timeout=60_000)
    choose_jobs(page)
    expect(page.locator("#jobs-cost")).to_contain_text("Hugging Face Jobs, t4-small (T4, $0.40/hour): about",
                                                       timeout=15_000)
    expect(page.locator("#jobs-cost")).to_contain_text("at most $")
    expect(page.locator("#start-jobs")).to_be_enabled()
    expect(page.locator("#jobs-unavailable")).to_be_hidden()
    # Bob is not the Space's owner: its own hardware stays refused to him, Jobs (his account) does not.
    expect(page.locator("#train-refusal")).to_contain_text("you are signed in as bob")
    assert PLANTED_OAUTH_TOKEN not in page.content()
    page.context.close()


def told_how_to_sign_in_for_jobs(page, said, button):
    """Jobs chosen, the page says `said` beside the sign-in `button`, and Start on Jobs waits for a sign-in that
    allows Jobs."""
    choose_jobs(page)
    notice = page.locator("#jobs-access")
    expect(notice).to_contain_text(said, timeout=10_000)
    # A message beside the sign-in button, not an output in error.
    expect(notice).not_to_contain_text("Error")
    expect(page.locator("#jobs-unavailable").get_by_role("button", name=button)).to_be_visible()
    expect(page.locator("#start-jobs")).to_be_disabled()


@pytest.mark.slow
def test_a_visitor_whose_sign_in_lacks_the_jobs_scope_is_told_how_to_sign_in_again(space_app, browser):
    page = signed_in_visitor(browser, space_app, "carol", "openid profile write-repos manage-repos")
    told_how_to_sign_in_for_jobs(page, "did not grant the 'jobs' scope", "Logout (carol)")
    expect(page.locator("#jobs-access")).to_contain_text(
        "sign out, then sign in with Hugging Face again, allowing 'jobs'")
    assert PLANTED_OAUTH_TOKEN not in page.content()
    page.context.close()


@pytest.mark.slow
def test_an_anonymous_visitor_of_the_original_space_is_refused_and_offered_a_duplicate(space_app, browser, caplog,
                                                                                        capfd):
    """A visitor who has not signed in checks data freely, is refused Start in one sentence, and finds the
    Duplicate button at the top of the page and beside the refusal; it opens Hugging Face's duplicate dialog.
    Choosing Jobs, they are told how to sign in for it, Start disabled."""
    page = signed_in_visitor(browser, space_app, None, None)
    # No Hub here: the duplicate dialog's page is answered locally, so the address it opens can be read.
    page.context.route("https://huggingface.co/**", lambda route: route.fulfill(body="duplicate dialog"))
    top = page.locator("#duplicate-top")
    expect(top).to_be_visible(timeout=30_000)
    expect(top).to_contain_text("Duplicate this Space")

    # Checking data stays open to every visitor.
    page.get_by_label("Use the sample dataset").check()
    page.click("#check-data")
    expect(page.locator("#data-summary")).to_contain_text("All 160 rows are valid", timeout=60_000)

    page.get_by_role("tab", name="Train").click()
    expect(page.locator("#train-access")).to_contain_text("this Space's owner, acme")
    refusal = "Only acme, who owns this Space (or a member, if that is an organisation), may train or publish here"
    expect(page.locator("#train-refusal")).to_contain_text(refusal)
    expect(page.locator("#duplicate-train")).to_be_visible()
    expect(page.locator("#train-estimate")).to_be_hidden()
    page.click("#start-training")
    expect(page.locator("#train-progress")).to_contain_text(f"Refused · {refusal}", timeout=10_000)
    told_how_to_sign_in_for_jobs(page, "press \"Sign in with Hugging Face\", allowing 'jobs'",
                                 "Sign in with Hugging Face")

    with page.context.expect_page() as dialog:
        top.click()
    assert dialog.value.url == "https://huggingface.co/spaces/acme/sft-space?duplicate=true"
    page.context.close()
    # A refusal is one line in the log, never a traceback of ours (Gradio prints a handler's traceback to stderr).
    assert "refused on_start: Only acme" in caplog.text
    assert not re.search(r'File ".*sft_space', caplog.text + capfd.readouterr().err)
    assert not [p for p in space_app.runs_dir.iterdir() if (p / "run.json").is_file()], "no run was started"
