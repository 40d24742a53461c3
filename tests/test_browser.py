"""The page `selfextend-gguf serve` serves at / (selfextend_gguf/web/index.html), in a real browser:
Debian's chromium, headless, driven by selenium through Debian's chromedriver (/usr/bin/chromedriver,
so Selenium Manager downloads nothing). Install them with `apt-get install -y chromium chromium-driver`.

- The README's pass-key document (12k tokens) on the embedded SmolLM2, trained on 8k: the page shows
  G and W and the document, answers the pass key, and a second question reuses the prompt cache;
  Escape stops a long answer while it streams, and the page answers again.
- The tiny random model: the API key prompt, a plain chat without --doc, a file added in the browser,
  a question past the slot's context (the server's 400 message, then a question that works), and a
  question after the server has stopped (a banner that says so).
"""
import subprocess
import sys
import time
import zipfile
from pathlib import Path

import pytest
from selenium import webdriver
from selenium.common.exceptions import TimeoutException
from selenium.webdriver.chrome.options import Options
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.common.by import By
from selenium.webdriver.common.keys import Keys
from selenium.webdriver.support.ui import WebDriverWait

from test_server import API_KEY, GROUP, N_CTX, WINDOW, ServerProcess, words

ROOT = Path(__file__).resolve().parents[1]
CHROMEDRIVER = Path("/usr/bin/chromedriver")
CHROMIUM = Path("/usr/bin/chromium")
SCREENSHOT = ROOT / "build" / "browser.png"   # docs/browser.png is a copy of one
PASS_KEY = "71432"
# questions SmolLM2-135M-Instruct answers with the key through its chat template (" The pass key is 71432.");
# it answers "What is the pass key?" with "The pass key is the pass key. ..." (the README's --raw prompt is a
# completion, not a chat question)
PASS_KEY_QUESTIONS = ("What number is the pass key?", "What is the pass key? Answer with the number only.")
READING_TIMEOUT = 420   # seconds for the embedded model to read the 12k-token document on 2 busy cores
ANSWER_TIMEOUT = 120


@pytest.fixture(scope="module")
def browser():
    if not (CHROMEDRIVER.is_file() and CHROMIUM.is_file()):
        pytest.fail("the browser tests need Debian's chromium and chromedriver: "
                    "apt-get install -y chromium chromium-driver")
    options = Options()
    options.binary_location = str(CHROMIUM)
    for argument in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--window-size=1200,900"):
        options.add_argument(argument)
    driver = webdriver.Chrome(service=Service(executable_path=str(CHROMEDRIVER)), options=options)
    yield driver
    driver.quit()


class Page:
    """The page in the browser, and what a person does with it."""

    def __init__(self, driver, url: str):
        self.driver = driver
        driver.get(f"{url}/")

    def find(self, element_id: str):
        return self.driver.find_element(By.ID, element_id)

    def wait(self, condition, timeout=ANSWER_TIMEOUT, message=""):
        try:
            return WebDriverWait(self.driver, timeout, poll_frequency=0.2).until(lambda _: condition())
        except TimeoutException:
            pytest.fail(f"{message} (waited {timeout} s); the page says: {self.find('error').text!r}, "
                        f"{self.driver.find_element(By.TAG_NAME, 'body').text[-1500:]!r}")

    def wait_ready(self):
        self.wait(lambda: self.driver.find_element(By.TAG_NAME, "body").get_attribute("data-ready") == "true",
                  message="the page did not load the settings")

    def error(self) -> str:
        """The error banner's text, '' when it is hidden."""
        banner = self.find("error")
        return banner.text if banner.is_displayed() else ""

    def ask(self, question: str, timeout=ANSWER_TIMEOUT):
        """Type the question, press Enter; the answer's element once its stream has ended."""
        before = len(self.driver.find_elements(By.CSS_SELECTOR, ".message.assistant"))
        self.find("question").send_keys(question, Keys.ENTER)
        self.wait(lambda: len(self.driver.find_elements(By.CSS_SELECTOR, ".message.assistant")) > before,
                  message="the question was not sent")
        answer = self.driver.find_elements(By.CSS_SELECTOR, ".message.assistant")[-1]
        self.wait(lambda: answer.get_attribute("data-state") != "streaming", timeout, "the answer did not end")
        return answer

    def set_number(self, element_id: str, value):
        field = self.find(element_id)
        field.clear()
        field.send_keys(str(value))


def wait_for_log(server: ServerProcess, text: str, timeout: float) -> None:
    """Until serve's output (the whole log file) holds `text`."""
    deadline = time.monotonic() + timeout
    while text not in server.log_path.read_text():
        if not server.alive():
            pytest.fail(f"serve exited with {server.process.returncode}:\n{server.log()}")
        if time.monotonic() > deadline:
            pytest.fail(f"serve did not print {text!r} within {timeout} s:\n{server.log()}")
        time.sleep(0.5)


# ----------------------------------------------------------------------------- the 12k-token document

def test_the_page_answers_the_pass_key_of_a_long_document_and_reuses_the_cache(browser, tmp_path):
    from selfextend_gguf.models import default_model_path

    document = tmp_path / "long.txt"
    subprocess.run([sys.executable, str(ROOT / "examples" / "make_long_document.py"), str(document)],
                   check=True, capture_output=True)
    server = ServerProcess(["--model", default_model_path(), "--doc", document], tmp_path / "serve.log")
    try:
        started = time.monotonic()
        wait_for_log(server, "serve: ready", READING_TIMEOUT)
        print(f"\nserve --doc long.txt: the document read in {time.monotonic() - started:.1f} s")
        props = server.get("/props").json()
        assert props["grp_attn_n"] > 1, props  # 12k tokens and room to answer on a model trained on 8k

        page = Page(browser, server.url)
        page.wait_ready()
        assert page.find("grp-attn-n").text == str(props["grp_attn_n"])
        assert page.find("grp-attn-w").text == f"{props['grp_attn_w']:,}"
        assert page.find("n-ctx").text == f"{props['default_generation_settings']['n_ctx']:,}"
        assert "long.txt (text," in page.find("documents").text

        timings = []
        for question in PASS_KEY_QUESTIONS:
            asked = time.monotonic()
            answer = page.ask(question)
            timings.append((question, time.monotonic() - asked, int(answer.get_attribute("data-prompt-n"))))
            assert answer.get_attribute("data-state") == "done", page.error()
            assert PASS_KEY in answer.text, answer.text
            assert page.error() == ""
        for question, seconds, prompt_n in timings:
            print(f"question {question!r}: {seconds:.1f} s in the browser, prompt_n {prompt_n}")
        # the document (12k tokens) comes from the slot's cache: each question evaluates only itself
        assert all(prompt_n < 200 for _, _, prompt_n in timings), timings

        SCREENSHOT.parent.mkdir(exist_ok=True)
        assert browser.save_screenshot(str(SCREENSHOT))
        assert SCREENSHOT.stat().st_size > 10_000
        assert browser.find_element(By.ID, "error").is_displayed() is False

        # Escape stops a long answer while it streams: the words so far stay, no more arrive, the page takes
        # the next question
        page.set_number("max-tokens", 400)
        before = len(browser.find_elements(By.CSS_SELECTOR, ".message.assistant"))
        page.find("question").send_keys("Tell me a long story about the pass key.", Keys.ENTER)
        page.wait(lambda: len(browser.find_elements(By.CSS_SELECTOR, ".message.assistant")) > before,
                  message="the question was not sent")
        story = browser.find_elements(By.CSS_SELECTOR, ".message.assistant")[-1]
        page.wait(lambda: len(story.text) > 0, message="no words of the answer arrived")
        assert story.get_attribute("data-state") == "streaming", "the answer ended before Escape"
        page.find("question").send_keys(Keys.ESCAPE)
        page.wait(lambda: story.get_attribute("data-state") == "stopped", message="Escape did not stop the answer")
        stopped_text = story.text
        time.sleep(1.5)
        assert story.text == stopped_text and stopped_text
        assert page.find("send").is_enabled() and page.error() == ""
        page.set_number("max-tokens", 16)
        again = page.ask(PASS_KEY_QUESTIONS[0])
        assert again.get_attribute("data-state") == "done" and PASS_KEY in again.text, again.text
    finally:
        server.stop()
    assert not server.alive()


# ----------------------------------------------------------------------------- the tiny model

def tiny_server(model, tmp_path, *args) -> ServerProcess:
    """The tiny fixture (trained context 64) with test_server's slot: 208 tokens, G=4, W=16."""
    return ServerProcess(["--model", model, "--ctx", N_CTX, "--grp-attn-n", GROUP, "--grp-attn-w", WINDOW, *args],
                         tmp_path / "serve.log")


def test_the_page_asks_for_the_api_key_and_chats_without_documents(browser, tiny_f32_gguf, tmp_path):
    server = tiny_server(tiny_f32_gguf, tmp_path, "--api-key", API_KEY)
    try:
        page = Page(browser, server.url)
        page.wait(lambda: page.find("key-form").is_displayed(), message="no API key prompt")
        assert "API key" in page.error()
        page.find("api-key").send_keys("wrong", Keys.ENTER)
        time.sleep(1)
        assert page.find("key-form").is_displayed() and page.find("model").text == "…"

        page.find("api-key").send_keys(API_KEY, Keys.ENTER)
        page.wait_ready()
        assert not page.find("key-form").is_displayed() and page.error() == ""
        assert (page.find("grp-attn-n").text, page.find("grp-attn-w").text) == (str(GROUP), str(WINDOW))
        assert page.find("model").text == Path(tiny_f32_gguf).name
        assert "No documents" in page.find("documents").text
        assert browser.execute_script("return sessionStorage.getItem('selfextend-gguf-api-key')") == API_KEY

        page.set_number("max-tokens", 8)
        page.find("question").send_keys("stone", Keys.SHIFT, Keys.ENTER, Keys.SHIFT, "river")  # a new line, not sent
        assert page.find("question").get_attribute("value") == "stone\nriver"
        assert not browser.find_elements(By.CSS_SELECTOR, ".message")
        answer = page.ask(" lamp")
        assert answer.get_attribute("data-state") == "done", page.error()
        assert 1 <= int(answer.get_attribute("data-predicted-n")) <= 8
    finally:
        server.stop()


def test_a_question_past_the_context_or_with_the_server_gone_shows_what_went_wrong(
        browser, tiny_f32_gguf, tmp_path):
    notes = tmp_path / "notes.md"
    notes.write_text(words(40, "Notes"))
    server = tiny_server(tiny_f32_gguf, tmp_path, "--doc", notes)
    try:
        wait_for_log(server, "serve: ready", ANSWER_TIMEOUT)
        page = Page(browser, server.url)
        page.wait_ready()
        assert "notes.md (markdown," in page.find("documents").text
        page.set_number("max-tokens", 8)

        too_long = tmp_path / "too_long.txt"  # added in the browser: about 400 tokens, past the 208-token slot
        too_long.write_text(words(400, "Oscar"))
        page.find("attach").send_keys(str(too_long))
        page.wait(lambda: page.find("attachments").text == "too_long.txt", message="the file was not added")
        failed = page.ask("What do the notes say?")
        assert failed.get_attribute("data-state") == "failed"
        assert f"({N_CTX} tokens)" in page.error(), page.error()  # llama-server's 400 message
        assert page.find("send").is_enabled()

        answer = page.ask("stone river")
        assert answer.get_attribute("data-state") == "done", page.error()
        assert page.error() == ""
        assert int(answer.get_attribute("data-prompt-n")) < 40  # the notes came from the slot's cache

        server.stop()
        gone = page.ask("stone lamp")
        assert gone.get_attribute("data-state") == "failed"
        assert "does not answer: is selfextend-gguf serve still running?" in page.error(), page.error()
        assert page.find("send").is_enabled()
    finally:
        server.stop()
    assert not server.alive()


# ----------------------------------------------------------------------------- the package

def test_the_wheel_contains_the_page(tmp_path):
    """The page is package data: a wheel built from this checkout (without CMake) holds it."""
    done = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", "-w", str(tmp_path / "wheel"),
                           "-C", "wheel.cmake=false", "-C", f"build-dir={tmp_path / 'build'}", str(ROOT)],
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    (wheel,) = (tmp_path / "wheel").glob("selfextend_gguf-*.whl")
    with zipfile.ZipFile(wheel) as archive:
        page = archive.read("selfextend_gguf/web/index.html").decode()
    assert page == (ROOT / "selfextend_gguf" / "web" / "index.html").read_text()
