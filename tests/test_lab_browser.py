"""editlab lab in a real browser: start the server on a free loopback port, drive the Prompt-to-Prompt tab with
headless Chromium (Debian's package, through Selenium and Debian's chromedriver; nothing is downloaded), and check
that the images the page shows are the bytes the shown command line writes.

Screenshots go to the test's own folder and, if set, to $EDITLAB_SCREENSHOTS. Without Chromium the test is
skipped, unless EDITLAB_REQUIRE_BROWSER=1 (CI sets it: there the browser must be present).
"""

import os
import shlex
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

CHROMIUM, CHROMEDRIVER = Path("/usr/bin/chromium"), Path("/usr/bin/chromedriver")
SOURCE, EDIT = "a red circle on a blue background", "a red square on a blue background"
STEPS = 6


def browser_or_skip():
    missing = [str(path) for path in (CHROMIUM, CHROMEDRIVER) if not path.is_file()]
    try:
        import selenium  # noqa: F401
        import gradio  # noqa: F401
    except ImportError as err:
        missing.append(f"the Python package {err.name}")
    if missing:
        reason = f"the browser test needs {', '.join(missing)} (apt-get install chromium chromium-driver; " \
                 "pip install -e \".[test]\")"
        if os.environ.get("EDITLAB_REQUIRE_BROWSER") == "1":
            pytest.fail(reason + "; EDITLAB_REQUIRE_BROWSER=1 asks for it")
        pytest.skip(reason)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture
def server(tmp_path):
    """``editlab lab`` in a subprocess; yields its URL."""
    browser_or_skip()
    port = free_port()
    log = (tmp_path / "server.log").open("w")
    process = subprocess.Popen([sys.executable, "-m", "editing.cli", "lab", "--port", str(port), "--threads", "1",
                                "--folder", str(tmp_path / "runs")], stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}/"
    deadline = time.monotonic() + 180
    while True:
        try:
            with urllib.request.urlopen(url, timeout=5):
                break
        except OSError:
            if process.poll() is not None or time.monotonic() > deadline:
                process.kill()
                pytest.fail(f"editlab lab did not start: {(tmp_path / 'server.log').read_text()[-2000:]}")
            time.sleep(0.5)
    yield url
    process.terminate()
    try:
        process.wait(timeout=20)
    except subprocess.TimeoutExpired:
        process.kill()
    log.close()


@pytest.fixture
def browser():
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = str(CHROMIUM)
    for flag in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu",
                 "--window-size=1280,1200"):
        options.add_argument(flag)
    driver = webdriver.Chrome(service=Service(executable_path=str(CHROMEDRIVER)), options=options)  # no download
    yield driver
    driver.quit()


def screenshot(driver, folder: Path, name: str) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    driver.save_screenshot(str(folder / name))
    extra = os.environ.get("EDITLAB_SCREENSHOTS")
    if extra:
        Path(extra).mkdir(parents=True, exist_ok=True)
        shutil.copyfile(folder / name, Path(extra) / name)


def wait_for(condition, timeout: float, what: str):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(0.25)
    pytest.fail(f"timed out after {timeout:.0f} s waiting for {what}")


def image_src(driver, elem_id: str) -> str | None:
    from selenium.webdriver.common.by import By

    found = driver.find_elements(By.CSS_SELECTOR, f"#{elem_id} img")
    return found[0].get_attribute("src") if found and found[0].get_attribute("src") else None


def set_text(driver, elem_id: str, text: str) -> None:
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys

    box = driver.find_element(By.CSS_SELECTOR, f"#{elem_id} textarea, #{elem_id} input")
    box.send_keys(Keys.CONTROL, "a")
    box.send_keys(Keys.DELETE)
    box.send_keys(str(text))
    box.send_keys(Keys.TAB)  # Gradio takes the value on blur


def set_slider(driver, elem_id: str, value: int) -> None:
    """Move a slider by its range handle with the keyboard, as a user does (Gradio 5 and 6 both follow it)."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys

    handle = driver.find_element(By.CSS_SELECTOR, f"#{elem_id} input[type=range]")
    handle.send_keys(Keys.HOME)
    for _ in range(value):
        handle.send_keys(Keys.ARROW_RIGHT)


def fetch(url: str) -> bytes:
    with urllib.request.urlopen(url, timeout=30) as response:
        return response.read()


def test_p2p_tab_in_chromium_shows_the_cli_bytes(server, browser, tmp_path):
    from selenium.webdriver.common.by import By

    shots = tmp_path / "screenshots"
    browser.get(server)
    tab = wait_for(lambda: [b for b in browser.find_elements(By.CSS_SELECTOR, "button[role='tab']")
                            if b.text.strip() == "Prompt-to-Prompt"], 60, "the Prompt-to-Prompt tab")
    tab[0].click()
    wait_for(lambda: browser.find_element(By.ID, "p2p-prompt").is_displayed(), 30, "the P2P tab's prompt box")
    set_text(browser, "p2p-prompt", SOURCE)
    set_text(browser, "p2p-edit", EDIT)
    set_text(browser, "p2p-steps", STEPS)
    run = [b for b in browser.find_elements(By.TAG_NAME, "button") if b.text.strip() == "Run" and b.is_displayed()]
    assert len(run) == 1
    run[0].click()
    ids = ["p2p-source", "p2p-edited", "p2p-source-maps", "p2p-edited-maps"]
    sources = wait_for(lambda: all(image_src(browser, i) for i in ids) and [image_src(browser, i) for i in ids],
                       300, "the source, the edit and the attention maps")
    command_line = wait_for(lambda: browser.find_element(By.CSS_SELECTOR, ".editlab-command .cm-content").text,
                            30, "the command line").strip()
    browser.execute_script("window.scrollTo(0, 0)")
    screenshot(browser, shots, "lab-p2p.png")

    # the command line, run by the CLI in an empty folder, writes the bytes the page shows
    argv = shlex.split(command_line)
    assert argv[:2] == ["editlab", "p2p"] and f"--steps {STEPS}" in command_line and "--maps-per-step" in command_line
    assert argv[argv.index("--prompt") + 1] == SOURCE and argv[argv.index("--edit") + 1] == EDIT
    cli = tmp_path / "cli"
    cli.mkdir()
    done = subprocess.run([sys.executable, "-m", "editing.cli", *argv[1:]], cwd=cli, capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr
    names = ["source.png", "edited.png", "attention-source.png", "attention-edited.png"]
    for src, name in zip(sources, names):
        assert fetch(src) == (cli / "p2p" / name).read_bytes(), name

    # the step slider shows the maps of one denoising step: the files --maps-per-step wrote
    set_slider(browser, "p2p-step", 3)
    expected = [(cli / "p2p" / name).read_bytes()
                for name in ("attention-source-step-002.png", "attention-edited-step-002.png")]

    def maps_of_step_3():  # the slider passes 1 and 2 on its way: wait for the images of step 3 itself
        shown = [image_src(browser, i) for i in ids[2:]]  # None while an image is being replaced
        return all(shown) and [fetch(src) for src in shown] == expected

    wait_for(maps_of_step_3, 60, "the maps of step 3, equal to the CLI's files")
    screenshot(browser, shots, "lab-p2p-step-3.png")
    assert (shots / "lab-p2p.png").stat().st_size > 10_000

    # Stop ends a long run; the page keeps working
    set_text(browser, "p2p-steps", 100)
    run[0].click()
    wait_for(lambda: "sampling" in browser.find_element(By.TAG_NAME, "body").text, 120,
             "the progress bar of the sampling loop")  # Gradio follows the command's tqdm bar
    stop = [b for b in browser.find_elements(By.TAG_NAME, "button") if b.text.strip() == "Stop" and b.is_displayed()]
    stop[0].click()
    def message():
        boxes = browser.find_elements(By.CSS_SELECTOR, ".editlab-message textarea")
        return [box.get_attribute("value") for box in boxes if box.is_displayed()]

    # the Stop button's "stopped", or the run's own "editlab p2p: stopped" when it returns before Gradio cancels it
    wait_for(lambda: message() in (["stopped"], ["editlab p2p: stopped"]), 60, "the message that the run stopped")
    screenshot(browser, shots, "lab-p2p-stopped.png")
