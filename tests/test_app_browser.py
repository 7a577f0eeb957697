"""The app in a real browser: headless Debian Chromium driven by Selenium (chromium-driver).

One app server for the module, in this process, on 127.0.0.1 and a free port, over the
session's SmolLM2 (loaded once); it is closed when the module ends. The flows of issue 14 run
in order on the same page: 1 edit, 2 undo, 3 bad input, 4 share, 5 two sessions. A screenshot
after flow 1 goes to ``$KEDIT_SCREENSHOT`` (``KEDIT_SCREENSHOT=docs/app.png`` refreshes the
README's; else a temp file). Without Chromium these tests fail (``make browser`` installs it);
they never skip.
"""

from __future__ import annotations

import logging
import os
import re
import tempfile
import shutil
import socket
import time
import urllib.request
from pathlib import Path

import pytest

pytestmark = pytest.mark.real_model
log = logging.getLogger(__name__)

ROOT = Path(__file__).resolve().parents[1]
CHROMIUM = os.environ.get("KEDIT_CHROMIUM", "/usr/bin/chromium")
CHROMEDRIVER = os.environ.get("KEDIT_CHROMEDRIVER", "/usr/bin/chromedriver")
# the README's screenshot is refreshed only when asked (KEDIT_SCREENSHOT=docs/app.png); else a temp file
SCREENSHOT = Path(os.environ.get("KEDIT_SCREENSHOT") or Path(tempfile.gettempdir()) / "kedit-app.png")
EDIT_WAIT = 240  # seconds for a ROME edit and its before/after answers on a loaded CPU

PROMPT, SUBJECT, TARGET = "The Eiffel Tower is located in the city of", "Eiffel Tower", "Rome"
NEIGHBOURS = "The Louvre is located in the city of\nThe capital of France is"
TIMINGS: dict[str, float] = {}
BUSY = re.compile(r"^\s*(processing|queue|[\d.]+\s*s\b)")


def _need_browser():
    missing = [p for p in (CHROMIUM, CHROMEDRIVER) if not Path(p).is_file()]
    if missing:
        pytest.fail(f"the browser tests need Debian's chromium and chromium-driver ({', '.join(missing)} "
                    f"missing): run `make browser` (apt-get install chromium chromium-driver)", pytrace=False)
    try:
        import gradio  # noqa: F401
        import selenium  # noqa: F401
    except ImportError as err:
        pytest.fail(f"the browser tests need gradio and selenium ({err}): pip install -e '.[dev]'", pytrace=False)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def app(smollm2):
    """(url, workbench) of an app served by this process on loopback; closed at module end."""
    _need_browser()
    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
    from kedit.app.core import Workbench
    from kedit.app.ui import build, launch

    model, tok = smollm2
    wb = Workbench(model, tok, "smollm2-135m", checkpoints=ROOT / "checkpoints")
    page = build(wb)
    port = _free_port()
    launch(page, host="127.0.0.1", port=port, block=False)
    try:
        yield f"http://127.0.0.1:{port}/", wb
    finally:
        page.close()
        if wb.stack.edits:  # leave the shared model as it was found
            wb.restore_all()
        log.info("browser flow timings: %s", TIMINGS)


def _driver():
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    opts = webdriver.ChromeOptions()
    opts.binary_location = CHROMIUM
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu",
                "--window-size=1366,1000"):  # a laptop's width
        opts.add_argument(arg)
    return webdriver.Chrome(service=Service(CHROMEDRIVER), options=opts)


class Page:
    """One browser session on the app."""

    def __init__(self, url: str):
        from selenium.webdriver.common.by import By

        self.By = By
        self.driver = _driver()
        self.driver.get(url)
        self.wait_for(lambda: self.driver.find_elements(By.ID, "apply"), 60, "the page to load")
        self.refreshed_state()  # the state line as of now, whatever the page was built with

    def close(self) -> None:
        self.driver.quit()

    def wait_for(self, cond, timeout: float, what: str):
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            got = cond()
            if got:
                return got
            time.sleep(0.2)
        raise AssertionError(f"timed out after {timeout} s waiting for {what}; status: {self.text('status')!r}")

    def el(self, elem_id: str):
        return self.driver.find_element(self.By.ID, elem_id)

    def text(self, elem_id: str) -> str:
        try:
            return self.el(elem_id).text
        except Exception:  # noqa: BLE001 - not rendered yet
            return ""

    def type(self, elem_id: str, text: str) -> None:
        from selenium.webdriver.common.keys import Keys

        box = self.el(elem_id).find_element(self.By.CSS_SELECTOR, "textarea, input")
        box.send_keys(Keys.CONTROL, "a")  # keystrokes, so that the page sees the change
        box.send_keys(Keys.DELETE)
        if text:
            box.send_keys(text)  # "\n" is Enter: a new line in a multi-line box
        assert box.get_attribute("value") == text, (elem_id, box.get_attribute("value"))

    def click(self, elem_id: str) -> None:
        self.driver.execute_script("arguments[0].scrollIntoView({block: 'center'});", self.el(elem_id))
        self.el(elem_id).click()

    def state(self) -> tuple[int, str]:
        """(edits applied, fingerprint) from the state line, once no step is pending on it."""
        pattern = r"edits applied: (\d+)\s*·\s*fingerprint\s*(\w+)"
        m = self.wait_for(lambda: "processing" not in (t := self.text("state")) and re.search(pattern, t), 60,
                          "the state line")
        return int(m.group(1)), m.group(2)

    def refreshed_state(self, timeout: float = EDIT_WAIT) -> tuple[int, str]:
        """Click Refresh; wait for the new state line (it carries the time it was read)."""
        old = self.text("state")
        self.click("refresh")
        self.wait_for(lambda: "fingerprint" in self.text("state") and self.text("state") != old, timeout,
                      "a refreshed state line")
        return self.state()

    def status_after(self, click: str, expect: str, timeout: float = 60) -> str:
        """Click ``click``; wait for a new status line containing ``expect``."""
        old = self.text("status")
        self.click(click)

        def done():
            s = self.text("status")
            if BUSY.match(s):  # gradio's timer over the old message: the step is running
                return False
            if s != old and "Refused" in s and "Refused" not in expect:
                raise AssertionError(f"the page refused the step: {s}")
            return s != old and expect in s and s

        return self.wait_for(done, timeout, f"a new status with {expect!r}")

    def rows(self, elem_id: str) -> list[str]:
        return [r.text for r in self.el(elem_id).find_elements(self.By.CSS_SELECTOR, "tbody tr")]

    def chat(self, prompt: str) -> str:
        self.type("chat-in", prompt)
        before = self.el("chat-out").find_element(self.By.CSS_SELECTOR, "textarea").get_attribute("value")
        self.click("chat-btn")
        box = self.el("chat-out").find_element(self.By.CSS_SELECTOR, "textarea")
        return self.wait_for(lambda: box.get_attribute("value") != before and box.get_attribute("value"), 60,
                             "a chat answer")


@pytest.fixture(scope="module")
def page(app):
    p = Page(app[0])
    yield p
    p.close()


@pytest.fixture(scope="module")
def shared(tmp_path_factory):
    """Files handed from one flow to the next."""
    return {"dir": tmp_path_factory.mktemp("app-downloads")}


def test_flow1_apply_rome_edit(page, app, shared):
    wb = app[1]
    assert page.el("editor").find_element(page.By.CSS_SELECTOR, "input").get_attribute("value") == "rome"
    shared["base"] = page.state()
    assert shared["base"][0] == 0
    page.type("prompt", PROMPT)
    page.type("subject", SUBJECT)
    page.type("target", TARGET)
    page.type("paraphrases", "The Eiffel Tower is in")
    page.type("neighbours", NEIGHBOURS)
    t0 = time.perf_counter()
    status = page.status_after("apply", "edit applied", EDIT_WAIT)
    TIMINGS["click to edited page (s)"] = time.perf_counter() - t0
    TIMINGS["edit computed (s)"] = wb.history[0].seconds
    assert "rome" in status
    rows = page.rows("compare")
    edit_row = next(r for r in rows if r.startswith("edit"))
    assert "Rome" in edit_row.split(PROMPT, 1)[1] and "changed" in edit_row
    neighbours = [r for r in rows if r.startswith("neighbour")]
    assert len(neighbours) == 2 and all(" same " in r for r in neighbours), neighbours
    history = page.rows("history")
    assert len(history) == 1 and "rome" in history[0] and "Rome" in history[0]
    assert page.state()[0] == 1
    SCREENSHOT.parent.mkdir(exist_ok=True)
    page.driver.execute_script("window.scrollTo(0, 0);")
    page.driver.save_screenshot(str(SCREENSHOT))
    shared["edited"] = page.state()
    shared["edit file"] = _download(page, shared, "eiffel-rome.safetensors")  # shared in flow 4
    assert page.state() == shared["edited"]  # saving leaves the edit applied


def test_flow2_undo(page, shared):
    status = page.status_after("undo", "Undid")
    assert "bit-exactly" in status
    header = page.el("compare").find_element(page.By.CSS_SELECTOR, "thead").text
    assert "after" not in header and "answer now" in header  # the edited column is gone
    edit_row = next(r for r in page.rows("compare") if r.startswith("edit"))
    assert "Paris" in edit_row
    assert page.rows("history") == [] and page.state() == shared["base"]


@pytest.mark.parametrize("subject, target, message", [
    ("Louvre", TARGET, "does not occur in prompt"),
    (SUBJECT, "", "target_new"),
])
def test_flow3_bad_input_is_shown_and_the_model_unchanged(page, subject, target, message):
    before = page.state()  # whatever the flows before left (runs alone too)
    page.type("prompt", PROMPT)
    page.type("subject", subject)
    page.type("target", target)
    status = page.status_after("apply", "Refused")
    assert message in status and "unchanged" in status
    assert page.state() == before


def _download(page, shared, name: str) -> Path:
    page.status_after("download", "saved")
    link = page.wait_for(lambda: page.el("download-file").find_elements(page.By.CSS_SELECTOR, "a[href]"), 30,
                         "the download link")[0]
    path = shared["dir"] / name
    with urllib.request.urlopen(link.get_attribute("href"), timeout=30) as r:  # the page's own link
        path.write_bytes(r.read())
    return path


def _upload(page, path: Path, expect: str) -> str:
    old = page.text("status")
    page.el("upload").find_element(page.By.CSS_SELECTOR, "input[type=file]").send_keys(str(path))
    return page.wait_for(lambda: not BUSY.match(s := page.text("status")) and s != old and expect in s and s, 60,
                         f"a new status with {expect!r}")


def test_flow4_download_restore_upload(page, app, shared, tiny, tmp_path):
    """The edit downloaded in flow 1 (and undone in flow 2): upload it, restore all, upload it again."""
    wb = app[1]
    path = shared["edit file"]
    assert path.stat().st_size > 0
    _upload(page, path, "uploaded edit")
    assert page.state() == shared["edited"] and "Rome" in page.chat(PROMPT)
    status = page.status_after("restore", "Restored all")
    assert "bit-exactly the unedited one" in status and page.state() == shared["base"]
    assert "Paris" in page.chat(PROMPT)
    _upload(page, path, "uploaded edit")
    assert page.state() == shared["edited"]
    assert "Rome" in page.chat(PROMPT)
    edited = shared["edited"]
    # an edit made for another base model is refused with kedit's message
    from kedit.app.core import Workbench

    other = Workbench(*tiny("llama"), "tiny-llama", max_new_tokens=2)
    other.apply("ft-m", "layers: [0]\nnum_steps: 2\n", other.request("The capital of France is", "France", "Rome"))
    foreign = other.download("last", tmp_path)
    status = _upload(page, foreign, "Refused")
    assert "computed on" in status and page.state() == edited
    assert len(wb.history) == 1


def test_flow5_two_sessions_never_see_a_half_applied_edit(page, app):
    """Session A applies a ROME edit; session B reads the state and chats meanwhile. Every
    state B sees is the one before A's edit or the one after it."""
    url, wb = app
    before = page.state()
    other = Page(url)
    try:
        assert other.state() == before
        page.type("prompt", "The Colosseum is located in the city of")
        page.type("subject", "Colosseum")
        page.type("target", "London")
        page.type("neighbours", "")
        page.type("paraphrases", "")
        page.click("apply")
        seen = []
        t_end = time.monotonic() + EDIT_WAIT
        while "edit applied" not in page.text("status") and time.monotonic() < t_end:
            seen.append(other.refreshed_state())
        page.wait_for(lambda: "edit applied" in page.text("status"), EDIT_WAIT, "session A's edit")
        after = page.state()
        seen.append(other.refreshed_state())
        assert after[0] == before[0] + 1
        assert set(seen) <= {before, after} and seen[-1] == after, seen
        # B's chat talks to the model as it now stands: both edits
        assert "London" in other.chat("The Colosseum is located in the city of")
        status = other.status_after("restore", "Restored all")
        assert "bit-exactly the unedited one" in status
        assert page.refreshed_state()[0] == 0 and wb.history == []
    finally:
        other.close()


def test_the_page_shows_the_model_loading_then_the_model(tiny):
    """`python -m kedit.app` serves the page before the model is loaded: the state line shows
    how far loading got (the one-time dequantizing included), then the loaded model."""
    _need_browser()
    import threading

    from kedit.app.core import ModelLoader
    from kedit.app.ui import build, launch

    release = threading.Event()

    def slow_load(name):
        logging.getLogger("kedit.models.loading").info("dequantizing %s from x.gguf (once; cached in y)", name)
        release.wait(120)
        return tiny("llama")

    loader = ModelLoader("tiny-llama", load=slow_load)
    page = build(loader)
    port = _free_port()
    launch(page, host="127.0.0.1", port=port, block=False)
    loader.start()
    browser = None
    try:
        browser = Page.__new__(Page)  # not Page(): its start waits for a loaded model
        from selenium.webdriver.common.by import By

        browser.By, browser.driver = By, _driver()
        browser.driver.get(f"http://127.0.0.1:{port}/")
        loading = browser.wait_for(lambda: "dequantizing tiny-llama" in (t := browser.text("state")) and t, 60,
                                   "the loading progress in the state line")
        assert "not loaded yet" in loading
        release.set()
        n, _ = browser.wait_for(lambda: "fingerprint" in browser.text("state") and browser.state(), 60,
                                "the loaded model in the state line")
        assert n == 0 and "tiny-llama" in browser.text("state")
        # the editor's tuned config is filled in once the model is there
        browser.driver.find_element(By.XPATH, "//button[contains(., 'Hyperparameters')]").click()
        hparams = browser.wait_for(lambda: "layers" in (t := browser.text("hparams")) and t, 30,
                                   "the editor's hyperparameters")
        assert "v_lr" in hparams, hparams
    finally:
        release.set()
        if browser is not None:
            browser.close()
        page.close()
