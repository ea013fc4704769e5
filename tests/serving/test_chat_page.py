"""The chat page at / in a real headless Chromium (Playwright driving Debian's chromium):
a question's answer streams in and equals the model's greedy answer, a second round is
asked with the first as history, a failed request leaves the history alone, and Stop
ends a reply and frees its slot. A screenshot is kept (GLM_JAX_ARTIFACTS, else the test's
temporary folder)."""

import os
import pathlib
import shutil
import pytest

from glm_jax.data.chat import chat_prompt
from serving.test_server import alone, idle_health

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
if not CHROMIUM and os.environ.get("CI"):
    raise RuntimeError("CI runs the chat page in Debian's chromium: `apt-get install chromium` (.ci/run does)")
sync_api = pytest.importorskip("playwright.sync_api")
pytestmark = pytest.mark.skipif(not CHROMIUM, reason="no chromium on this machine (apt-get install chromium)")

# As a root user in a closed network, Chromium needs these to start and stay quiet.
ARGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
        "--disable-component-update", "--disable-sync"]


@pytest.fixture
def page(served):
    with sync_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, headless=True, args=ARGS)
        try:
            tab = browser.new_page()
            tab.goto(served[0] + "/")
            yield tab
        finally:
            browser.close()


def ask(page, question: str) -> tuple[str, int]:
    """Type a question, send it, and wait for its answer: (the answer, how many different
    texts the answer showed while it streamed)."""
    page.evaluate("""() => {
        window.seen = new Set();
        new MutationObserver(() => {
            const answers = document.querySelectorAll('#log .assistant');
            if (answers.length) window.seen.add(answers[answers.length - 1].textContent);
        }).observe(document.getElementById('log'), {childList: true, subtree: true, characterData: true});
    }""")
    page.fill("#question", question)
    page.click("#send")
    last = page.locator("#log .assistant").last
    page.wait_for_function("() => { const a = document.querySelectorAll('#log .assistant'); "
                           "return a.length && a[a.length - 1].dataset.done === 'true'; }", timeout=60_000)
    return last.text_content(), page.evaluate("() => window.seen.size")


def screenshot(page, tmp_path) -> pathlib.Path:
    folder = pathlib.Path(os.environ.get("GLM_JAX_ARTIFACTS", tmp_path))
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "chat_page.png"
    page.screenshot(path=str(path), full_page=True)
    return path


def test_two_rounds_stream_and_keep_the_history(served, page, tmp_path):
    url, model, text, engine = served
    page.fill("#temperature", "0")

    def expected(history, question):
        """The greedy answer, with the budget the test model's 64 tokens leave (at most 12)."""
        ids = text.prompt_ids(chat_prompt(history, question))
        n = min(12, engine.length - len(ids))
        page.fill("#max_tokens", str(n))
        return text.decode(alone(model, ids, n)[0])

    want = expected([], "hello")
    first, shown = ask(page, "hello")
    assert first == want
    assert shown >= 2, "the answer appeared at once, not streamed"  # chunks of 4 tokens: several updates

    want = expected([("hello", first)], "the fox")
    second, _ = ask(page, "the fox")
    assert second == want
    assert page.locator("#log .user").all_text_contents() == ["You: hello", "You: the fox"]
    assert screenshot(page, tmp_path).stat().st_size > 0

    # The third round's prompt is longer than the 64-token test model takes: the page shows
    # the server's refusal, and the next question is still sent with the two rounds before it.
    bodies = []
    page.on("request", lambda r: bodies.append(r.post_data_json) if r.url.endswith("/v1/chat/completions") else None)
    refused, _ = ask(page, "again")
    assert refused.startswith("error: the prompt is") and page.locator("#log .error").count() == 1
    ask(page, "once more")
    history = [{"role": "user", "content": "hello"}, {"role": "assistant", "content": first},
               {"role": "user", "content": "the fox"}, {"role": "assistant", "content": second}]
    assert [b["messages"] for b in bodies] == [history + [{"role": "user", "content": q}] for q in ("again", "once more")]
    assert bodies[0]["temperature"] == 0 and bodies[0]["stream"] is True

    page.click("#clear")
    assert page.locator("#log .user").count() == 0
    want = expected([], "hello")
    assert ask(page, "hello")[0] == want == first  # no history after Clear


def test_stop_ends_the_reply_and_frees_the_slot(served, page):
    url, model, text, engine = served
    page.fill("#temperature", "0.9")  # sampled: no early stop token is likely before the budget
    page.evaluate("""() => {  // after its first bytes the stream stalls, as a slow answer would
        const real = window.fetch;
        window.fetch = async (url, init) => {
            const r = await real(url, init);
            const reader = r.body.getReader();
            let sent = false;
            const body = new ReadableStream({
                start(c) {
                    init.signal.addEventListener("abort", () => {
                        reader.cancel();
                        c.error(new DOMException("The user aborted a request.", "AbortError"));
                    });
                },
                async pull(c) {
                    if (sent) return new Promise(() => {});
                    sent = true;
                    const {value, done} = await reader.read();
                    if (done) c.close(); else c.enqueue(value);
                }});
            return new Response(body, {status: r.status, headers: r.headers});
        };
    }""")
    page.fill("#question", "hello")
    page.click("#send")
    page.wait_for_selector("#stop:not([disabled])")
    page.click("#stop")
    page.wait_for_function("() => document.querySelector('#log .assistant').dataset.done === 'true'")
    assert page.is_enabled("#send") and not page.is_enabled("#stop")
    health = idle_health(url)
    assert health["active_slots"] == 0 and health["queued"] == 0
