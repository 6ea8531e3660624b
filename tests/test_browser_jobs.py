"""The Train tab's Hugging Face Jobs choice in a real browser, on a Space with sign-in: a visitor signed in with the
`jobs` scope sees the GPU, the cost and Start; one whose sign-in lacks the scope, or who has not signed in, is told
why and how to sign in (again), Start disabled.

Signing in needs the Hub. Here the browser is handed what the Space's sign-in leaves it: the session cookie of
Gradio's own SessionMiddleware, signed with the running app's key, its `oauth_info` holding a profile and a token
with or without `jobs` (Gradio reads the visitor's gr.OAuthProfile and gr.OAuthToken from it, as on a Space).
Whatever the Hub would answer to that sign-in (the real consent screen, a scope granted) is verified only there.

Needs Chromium, as test_browser does: skipped without it, unless SFT_SPACE_REQUIRE_BROWSER=1.
"""

import json
import os
import time
from base64 import b64encode
from pathlib import Path

import pytest

from builders import CHROMIUM, free_port

if CHROMIUM is None:
    if os.environ.get("SFT_SPACE_REQUIRE_BROWSER"):
        raise RuntimeError("The browser test needs Chromium: apt-get install chromium")
    pytest.skip("Chromium is not installed (apt-get install chromium)", allow_module_level=True)

from playwright.sync_api import expect  # noqa: E402

# The sign-in's token: it must never reach the page.
PLANTED_OAUTH_TOKEN = "hf_oauth_PlantedVisitorToken0123456789"
SCREENSHOT = Path("/tmp/jobs_signin.png")
# What Spaces set for a Space with `hf_oauth: true`, as Gradio (gradio.utils.get_space, gradio.oauth) and this app
# (access.sign_in_available, SPACE_ID) read it.
SPACE = {"SYSTEM": "spaces", "SPACE_ID": "acme/sft-space", "SPACE_AUTHOR_NAME": "acme", "SPACE_REPO_NAME": "sft-space",
         "SPACE_HOST": "acme-sft-space.hf.space", "OAUTH_CLIENT_ID": "client-id",
         "OAUTH_CLIENT_SECRET": "client-secret", "OAUTH_SCOPES": "openid profile write-repos manage-repos jobs",
         "OPENID_PROVIDER_URL": "https://huggingface.co"}


@pytest.fixture(scope="module")
def space_app(tiny_model_dir, tmp_path_factory):
    """The app as a Space with sign-in builds and serves it, in this process: (url, the key its session cookies
    are signed with). The Space's owner is acme; who may train on its hardware is left at the default (the owner),
    which does not decide who may train on Jobs."""
    from starlette.middleware.sessions import SessionMiddleware

    from sft_space import hub_jobs, jobs
    from sft_space.jobs_stand_in import LocalJobsApi
    from sft_space.ui import build_app, launch

    runs_dir = tmp_path_factory.mktemp("space-jobs-runs")
    with pytest.MonkeyPatch.context() as patch:
        for name, value in {**SPACE, "SFT_SPACE_RUNS": str(runs_dir), "SFT_SPACE_DEFAULT_MODEL": str(tiny_model_dir),
                            "SFT_SPACE_WARM_START": "0"}.items():
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
            yield f"http://127.0.0.1:{port}", secret
        finally:
            app.close()


def signed_in_visitor(browser, space_app, username, scope):
    """A page of a visitor whose browser holds the Space's session cookie of a sign-in as `username` that granted
    `scope` (None: not signed in), opened once the server has given it its visitor id."""
    import itsdangerous

    url, secret = space_app
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
    page.screenshot(path=str(SCREENSHOT), full_page=True)
    assert PLANTED_OAUTH_TOKEN not in page.content()
    page.context.close()


@pytest.mark.slow
@pytest.mark.parametrize("scope, said, button", [
    ("openid profile write-repos manage-repos", "did not grant the 'jobs' scope", "Logout (carol)"),
    (None, "press \"Sign in with Hugging Face\", allowing 'jobs'", "Sign in with Hugging Face")])
def test_a_visitor_whose_sign_in_lacks_the_jobs_scope_or_who_is_signed_out_is_told_how_to_sign_in(
        space_app, browser, scope, said, button):
    page = signed_in_visitor(browser, space_app, "carol", scope)
    choose_jobs(page)
    notice = page.locator("#jobs-access")
    expect(notice).to_contain_text(said, timeout=10_000)
    if scope is not None:
        expect(notice).to_contain_text("sign out, then sign in with Hugging Face again, allowing 'jobs'")
    # A message beside the sign-in button, not an output in error: Start waits for a sign-in that allows Jobs.
    expect(notice).not_to_contain_text("Error")
    expect(page.locator("#jobs-unavailable").get_by_role("button", name=button)).to_be_visible()
    expect(page.locator("#start-jobs")).to_be_disabled()
    assert PLANTED_OAUTH_TOKEN not in page.content()
    page.context.close()
