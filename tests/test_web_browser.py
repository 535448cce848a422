"""The web demo (`conceptexpress serve`) in a real headless Chromium, driven by Selenium.

The server is the real Gradio app on 127.0.0.1 with the shipped toy model; the browser is Debian's `chromium`
with its `chromium-driver` (nothing downloads a browser). Screenshots of every stage go to a pytest temporary
folder, and are copied to $CONCEPTEXPRESS_SCREENSHOTS when it is set (docs/web_demo.png comes from there).

Needs `pip install -e ".[web-test]"` and `apt-get install chromium chromium-driver`; skipped with the reason
when one is missing, unless CONCEPTEXPRESS_WEB_TESTS=required (as in .ci/run), where that is an error.
The page's settings are typed in as a user would: training steps $CONCEPTEXPRESS_WEB_STEPS (default 4, a few
seconds) and sampling steps $CONCEPTEXPRESS_WEB_SAMPLE_STEPS (default 5). docs/web_demo.png is 07-generated.png
of a run with 500 and 25 (README).
"""

from __future__ import annotations

import importlib.util
import io
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

CHROMIUM, CHROMEDRIVER = "/usr/bin/chromium", "/usr/bin/chromedriver"


def _missing() -> str | None:
    for module in ("gradio", "selenium"):
        if importlib.util.find_spec(module) is None:
            return f'{module} is not installed (pip install -e ".[web-test]")'
    for path, package in ((CHROMIUM, "chromium"), (CHROMEDRIVER, "chromium-driver")):
        if not os.access(path, os.X_OK):
            return f"{path} is missing (apt-get install {package})"
    return None


if (_reason := _missing()) is not None:
    if os.environ.get("CONCEPTEXPRESS_WEB_TESTS") == "required":
        pytest.fail(f"The browser test must run here but cannot: {_reason}", pytrace=False)
    pytest.skip(f"browser test of the web demo skipped: {_reason}", allow_module_level=True)

from diffusers import StableDiffusionPipeline  # noqa: E402
from selenium import webdriver  # noqa: E402
from selenium.webdriver.chrome.service import Service  # noqa: E402
from selenium.webdriver.common.by import By  # noqa: E402
from selenium.webdriver.common.keys import Keys  # noqa: E402

from diffusers_conceptexpress.learning import LearningConfig  # noqa: E402
from diffusers_conceptexpress.toyworld import model_path, render_scene  # noqa: E402
from diffusers_conceptexpress.web import ZIP_NAME, WebDemo  # noqa: E402

STEPS = int(os.environ.get("CONCEPTEXPRESS_WEB_STEPS", "4"))
SAMPLE_STEPS = int(os.environ.get("CONCEPTEXPRESS_WEB_SAMPLE_STEPS", "5"))  # the toy model's own default: 25
WIDTH, HEIGHT = 1280, 2400
SETTINGS = ("#ce-steps", "#ce-sample-steps", "#ce-guidance")


# ------------------------------------------------------------------------------------------- fixtures
def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    """An empty current directory for the server: it must stay empty (everything goes to the temp root)."""
    path = tmp_path_factory.mktemp("cwd")
    mp = pytest.MonkeyPatch()
    mp.chdir(path)
    yield path
    mp.undo()


@pytest.fixture(scope="module")
def server(workdir, tmp_path_factory):
    """The real app on 127.0.0.1 (toy model) and its URL; closed, and its temporary root removed, after."""
    demo = WebDemo(temp_dir=tmp_path_factory.mktemp("server"))  # as `conceptexpress serve` makes it
    url = demo.launch("127.0.0.1", free_port(), block=False)
    yield demo, url
    root = demo.root
    demo.close()
    assert not root.exists()
    assert list(workdir.iterdir()) == []  # nothing written in the current directory, ever


@pytest.fixture(scope="module")
def shots(tmp_path_factory):
    """``shot(driver, name)`` saves a screenshot; all of them are copied to $CONCEPTEXPRESS_SCREENSHOTS."""
    folder = tmp_path_factory.mktemp("screenshots")

    def shot(driver, name: str) -> Path:
        path = folder / f"{name}.png"
        assert driver.save_screenshot(str(path)), name
        return path

    yield shot
    target = os.environ.get("CONCEPTEXPRESS_SCREENSHOTS")
    if target:
        shutil.copytree(folder, target, dirs_exist_ok=True)


@pytest.fixture
def browser(tmp_path):
    """Headless Debian Chromium through its own chromedriver; downloads go to ``tmp_path / "downloads"``."""
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for arg in (
        "--headless=new",
        "--no-sandbox",
        "--disable-dev-shm-usage",
        f"--window-size={WIDTH},{HEIGHT}",
    ):
        options.add_argument(arg)
    downloads = tmp_path / "downloads"
    downloads.mkdir()
    options.add_experimental_option(
        "prefs", {"download.default_directory": str(downloads), "download.prompt_for_download": False}
    )
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
    driver.downloads = downloads
    yield driver
    driver.quit()


# -------------------------------------------------------------------------------------------- helpers
def steps_of(browser) -> str:
    """The training-steps field's value."""
    return element(browser, "#ce-steps input[type=number]").get_attribute("value")


def wait_for(condition, timeout: float = 60, what: str = "the page", interval: float = 0.1):
    """Poll ``condition()`` until it returns something truthy (returned); fail after ``timeout`` seconds."""
    end = time.monotonic() + timeout
    while True:
        try:
            value = condition()
        except Exception:  # elements re-rendered under our feet: try again
            value = None
        if value:
            return value
        if time.monotonic() > end:
            pytest.fail(f"Timed out after {timeout} s waiting for {what}.")
        time.sleep(interval)


def open_app(driver, url: str) -> None:
    driver.get(url)
    wait_for(lambda: driver.find_element(By.CSS_SELECTOR, "#ce-extract").is_displayed(), what="the app")


def element(driver, css: str):
    return driver.find_element(By.CSS_SELECTOR, css)


def images(driver, css: str) -> list:
    """The loaded <img> elements under ``css``."""
    return [
        img
        for img in driver.find_elements(By.CSS_SELECTOR, f"{css} img")
        if driver.execute_script("return arguments[0].complete && arguments[0].naturalWidth", img)
    ]


def type_into(driver, css: str, text: str, blur: bool = True) -> None:
    box = element(driver, css)
    box.send_keys(Keys.CONTROL, "a")
    box.send_keys(Keys.BACKSPACE)
    box.send_keys(text)
    if blur:
        box.send_keys(Keys.TAB)


def errors(driver) -> list[str]:
    return [e.text for e in driver.find_elements(By.CSS_SELECTOR, ".toast-message-text") if e.text]


def close_errors(driver) -> None:
    for button in driver.find_elements(By.CSS_SELECTOR, ".toast-close"):
        button.click()
    wait_for(lambda: not errors(driver), 10, "the error messages to close")


def upload(driver, path: Path) -> None:
    """Upload ``path`` with the page's file input (the box is emptied after every upload)."""
    box = wait_for(lambda: element(driver, "#ce-upload input[type=file]"), 30, "an empty upload box")
    box.send_keys(str(path))


def status(driver) -> str:
    return element(driver, "#ce-extract-status").text


def extract_and_watch(driver, on_progress=None, timeout: float = 240 + 3 * STEPS) -> list[tuple[int, int]]:
    """Click Extract; return every distinct "done/total steps" the progress bar showed until the result
    (``on_progress()`` is called at each)."""
    element(driver, "#ce-extract").click()
    seen: list[tuple[int, int]] = []

    def finished():
        text = status(driver)
        match = re.search(r"(\d+)/(\d+) steps", text)
        if match and (not seen or seen[-1] != (int(match[1]), int(match[2]))):
            seen.append((int(match[1]), int(match[2])))
            if on_progress is not None:
                on_progress()
        return text.startswith("Learned")

    wait_for(finished, timeout, "the extraction", interval=0.05)
    return seen


def draw_scene(driver, number: int, objects: int) -> None:
    type_into(driver, "#ce-scene-seed input", str(number))
    slider = element(driver, "#ce-scene-objects input[type=number]")
    slider.send_keys(Keys.CONTROL, "a")
    slider.send_keys(str(objects), Keys.TAB)
    element(driver, "#ce-scene").click()
    wait_for(lambda: f"Toy scene {number}:" in element(driver, "#ce-image-caption").text, 30, "the toy scene")


def fetch_image(src: str) -> Image.Image:
    """The image the page shows, as served to the browser."""
    with urllib.request.urlopen(src, timeout=30) as response:
        return Image.open(io.BytesIO(response.read())).convert("RGB")


def session_concepts(demo) -> dict[str, Path]:
    """Every session folder's saved concept folder, by session."""
    root = demo.sessions.root
    return {p.name: p / "concepts" for p in root.iterdir() if (p / "concepts" / "concepts.json").is_file()}


def saved_embeddings(directory: Path) -> torch.Tensor:
    from diffusers_conceptexpress.export import read_concepts

    return read_concepts(directory)[1]


# ---------------------------------------------------------------------------------------------- tests
def test_the_whole_flow_in_a_browser(server, browser, shots, tmp_path):
    demo, url = server
    scene = render_scene(12)  # `conceptexpress demo`'s scene: a pink cross and an orange circle
    scene_file, text_file, small_file = tmp_path / "scene.png", tmp_path / "notes.txt", tmp_path / "tiny.png"
    scene.image.save(scene_file)
    text_file.write_text("this is not an image\n")
    Image.new("RGB", (32, 32), "red").save(small_file)
    open_app(browser, url)
    shots(browser, "01-page")

    # a toy scene, uploaded
    upload(browser, scene_file)
    wait_for(lambda: images(browser, "#ce-image"), 30, "the uploaded image")
    caption = element(browser, "#ce-image-caption").text
    assert "scene.png" in caption and "64 x 64 pixels" in caption
    shots(browser, "02-image")
    shown = element(browser, "#ce-image img").get_attribute("src")

    # bad uploads: the package's own message in the page; the session keeps its image, the app goes on
    upload(browser, text_file)
    caption = wait_for(
        lambda: "Not used" in (t := element(browser, "#ce-image-caption").text) and t, 30, "an error"
    )
    assert "Not used: notes.txt. 'notes.txt' is not a readable image file" in caption
    assert str(tmp_path) not in caption and str(demo.root) not in caption  # no server paths shown
    shots(browser, "03-error-not-an-image")
    upload(browser, small_file)
    wait_for(lambda: "tiny.png" in element(browser, "#ce-image-caption").text, 30, "the second error")
    caption = element(browser, "#ce-image-caption").text
    assert "Image is too small: 32x32" in caption and caption.endswith("The image above is kept.")
    assert element(browser, "#ce-image img").get_attribute("src") == shown  # still the scene
    assert not errors(browser)

    # localize: the overlay and one mask per concept with its score, as the package finds them
    expected = demo.engine.localize(scene.image)
    element(browser, "#ce-localize").click()
    wait_for(lambda: images(browser, "#ce-overlay"), 60, "the overlay")
    k = expected.num_concepts
    wait_for(lambda: len(images(browser, "#ce-masks")) == k, 30, f"{k} masks")
    captions = element(browser, "#ce-masks").text
    for i, score in enumerate(expected.eot_scores.tolist(), start=1):
        assert f"<ce>_{i} · {score:.2f}" in captions
    shots(browser, "04-localized")

    # extract with a few steps: the progress bar moves, then one card per concept
    defaults = {css: element(browser, f"{css} input[type=number]").get_attribute("value") for css in SETTINGS}
    assert defaults == {"#ce-steps": "500", "#ce-sample-steps": "25", "#ce-guidance": "5"}  # the toy model's
    # a schedule brings its own step count (turbo: 150), the default schedule the page's default
    for schedule, count in (("turbo", "150"), ("fast", "500")):
        browser.find_element(By.XPATH, f"//*[@id='ce-schedule']//label[contains(., '{schedule}')]").click()
        wait_for(lambda count=count: steps_of(browser) == count, 30, f"{count} steps for {schedule}")
    type_into(browser, "#ce-steps input[type=number]", str(STEPS))
    type_into(browser, "#ce-sample-steps input[type=number]", str(SAMPLE_STEPS))
    taken: list[Path] = []
    progress = extract_and_watch(browser, lambda: taken or taken.append(shots(browser, "05-progress")))
    assert len(progress) >= 2, progress  # at least two different positions of the bar were shown
    assert all(total == STEPS for _, total in progress)
    assert [done for done, _ in progress] == sorted({done for done, _ in progress})  # it only moves forward
    assert status(browser).startswith(f"Learned {k} concept(s)") and f"({STEPS} steps, fast)" in status(
        browser
    )
    cards = wait_for(lambda: browser.find_elements(By.CSS_SELECTOR, ".ce-card"), 30, "the concept cards")
    assert len(cards) == k
    for i, card in enumerate(cards, start=1):  # its token, its mask and a sample, in the concepts' order
        assert f"<ce>_{i}" in card.text and len(card.find_elements(By.CSS_SELECTOR, "img")) == 2
    wait_for(lambda: len(images(browser, ".ce-card")) == 2 * k, 30, "the cards' images")
    browser.execute_script("arguments[0].scrollIntoView()", cards[0])
    shots(browser, "06-cards")

    # the prompt box knows the tokens: it proposes them, inserts them, and refuses unknown ones
    prompt_css = "#ce-prompt textarea"
    joint = " and ".join(f"<ce>_{i}" for i in range(1, k + 1))
    assert element(browser, prompt_css).get_attribute("value") == f"a photo of {joint}"
    assert "<ce>_1" in element(browser, "#ce-prompt").text  # the list of tokens under the label
    type_into(browser, prompt_css, f"a photo of <ce>_{k + 1}", blur=False)
    element(browser, "#ce-generate").click()
    message = wait_for(lambda: errors(browser), 30, "the unknown-token error")
    assert f"Unknown token(s) <ce>_{k + 1}" in message[0]
    close_errors(browser)
    type_into(browser, prompt_css, "a photo of", blur=False)
    browser.find_elements(By.CSS_SELECTOR, ".ce-insert")[0].click()
    wait_for(
        lambda: element(browser, prompt_css).get_attribute("value") == "a photo of <ce>_1", 10, "the token"
    )
    element(browser, "#ce-generate").click()
    generated = wait_for(lambda: images(browser, "#ce-generated"), 60, "the generated image")
    shown = fetch_image(generated[0].get_attribute("src"))
    assert shown.size == (256, 256)  # 64 px, shown x4
    shots(browser, "07-generated")

    # the zip: downloaded by the browser, loaded by a stock pipeline with one stock call
    element(browser, "#ce-download").click()
    archive = browser.downloads / ZIP_NAME
    wait_for(
        lambda: archive.is_file() and not list(browser.downloads.glob("*.crdownload")), 30, "the download"
    )
    with zipfile.ZipFile(archive) as z:
        z.extractall(tmp_path / "unzipped")
    concepts = tmp_path / "unzipped" / "concepts"
    sd = StableDiffusionPipeline.from_pretrained(model_path())
    sd.set_progress_bar_config(disable=True)
    sd.load_textual_inversion(str(concepts / "concepts.safetensors"))
    assert {f"<ce>_{i}" for i in range(1, k + 1)} <= set(sd.tokenizer.get_vocab())
    out = sd("a photo of <ce>_1", num_inference_steps=2, output_type="np").images
    assert np.isfinite(out).all()
    # ... and it holds what the package learns from this image with these settings; the page's generation
    # is what the package generates with them
    direct = demo.engine.extract(scene.image, steps=STEPS, schedule="fast", seed=0)
    assert torch.equal(saved_embeddings(concepts), direct.embeddings)
    expected = demo.engine.generate(direct, "a photo of <ce>_1", steps=SAMPLE_STEPS, guidance=5.0, seed=0)
    assert np.array_equal(np.asarray(shown), np.asarray(demo.engine.display(expected)))

    # every file of the session is in its own folder under the app's temporary root
    (session,) = session_concepts(demo)
    folder = demo.sessions.root / session
    assert sorted(p.name for p in folder.iterdir()) == sorted([ZIP_NAME, "concepts"])
    assert (folder / ZIP_NAME).read_bytes() == archive.read_bytes()
    assert len(demo.engine.pipe.tokenizer) == len(sd.tokenizer) - (k + 1)  # the shared model got no tokens


def test_two_sessions_extract_at_once(server, browser, shots):
    """Two tabs (two sessions) extract at the same time: the second is queued, and each gets its own,
    correct concepts and files; a closed tab's folder is removed."""
    demo, url = server
    # scene number, objects, training steps, schedule; a's job is long enough for b to find it running
    settings = {"a": (3, 2, 12, "fast"), "b": (7, 1, 3, "faithful")}
    tabs, sessions = {}, {}
    for name, (number, objects, steps, schedule) in settings.items():
        if tabs:
            browser.switch_to.new_window("tab")
        open_app(browser, url)
        tabs[name] = browser.current_window_handle
        draw_scene(browser, number, objects)
        browser.find_element(By.XPATH, f"//*[@id='ce-schedule']//label[contains(., '{schedule}')]").click()
        count = str(LearningConfig(schedule=schedule).num_train_steps)  # the schedule's count arrives first
        wait_for(lambda count=count: steps_of(browser) == count, 30, f"{count} steps for {schedule}")
        type_into(browser, "#ce-steps input[type=number]", str(steps))
        type_into(browser, "#ce-sample-steps input[type=number]", str(SAMPLE_STEPS))
    browser.switch_to.window(tabs["a"])
    element(browser, "#ce-extract").click()
    wait_for(lambda: "steps" in status(browser) or "Finding" in status(browser), 60, "tab a's job to start")
    browser.switch_to.window(tabs["b"])
    element(browser, "#ce-extract").click()
    # b waits in the queue while a's job runs on the shared model
    wait_for(lambda: "queue" in status(browser).lower(), 30, "tab b to be queued")
    shots(browser, "08-second-session-queued")
    wait_for(lambda: status(browser).startswith("Learned"), 300, "tab b's extraction")
    browser.switch_to.window(tabs["a"])
    wait_for(lambda: status(browser).startswith("Learned"), 60, "tab a's extraction")

    # each session: its own folder, holding what the package learns from ITS image with ITS settings
    folders = session_concepts(demo)
    for name, (number, objects, steps, schedule) in settings.items():
        image = render_scene(number, num_objects=objects).image
        (mine,) = [
            d
            for d in folders.values()
            if np.array_equal(np.asarray(Image.open(d / "source.png")), np.asarray(image))
        ]
        direct = demo.engine.extract(image, steps=steps, schedule=schedule, seed=0)
        assert torch.equal(saved_embeddings(mine), direct.embeddings), name
        browser.switch_to.window(tabs[name])
        assert status(browser).startswith(f"Learned {direct.num_concepts} concept(s)")
        assert f"({steps} steps, {schedule})" in status(browser)
        cards = wait_for(lambda: browser.find_elements(By.CSS_SELECTOR, ".ce-card"), 30, "the cards")
        assert len(cards) == direct.num_concepts
        shots(browser, f"09-session-{name}")
        sessions[name] = mine.parent.name
    assert sessions["a"] != sessions["b"]

    # closing a tab ends its session: its folder goes, the other's stays
    browser.switch_to.window(tabs["b"])
    browser.close()
    browser.switch_to.window(tabs["a"])
    wait_for(lambda: sessions["b"] not in demo.sessions.sessions(), 30, "the closed session's folder to go")
    assert sessions["a"] in demo.sessions.sessions()


def test_the_serve_command(tmp_path):
    """`conceptexpress serve` serves the app on 127.0.0.1 and, stopped with Ctrl-C, removes what it wrote."""
    port = free_port()
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "TMPDIR": str(tmp_path / "tmp")}
    (tmp_path / "tmp").mkdir()
    (tmp_path / "cwd").mkdir()
    command = [sys.executable, "-m", "diffusers_conceptexpress.cli", "serve", "--port", str(port)]
    process = subprocess.Popen(
        command,
        cwd=tmp_path / "cwd",
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        # Ctrl-C as in a terminal, even where this suite runs as a background job (whose shell ignores SIGINT)
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )
    try:
        lines = []
        while not any("Temporary files under" in line for line in lines):
            line = process.stdout.readline()
            assert line or process.poll() is None, "".join(lines)
            lines.append(line)
        assert (
            f"ConceptExpress web demo on http://127.0.0.1:{port}/ (model: the shipped toy model)"
            in "".join(lines)
        )
        root = Path(re.search(r"Temporary files under (\S+) ", "".join(lines))[1])
        assert root.parent == tmp_path / "tmp" and root.is_dir()
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/config", timeout=30) as response:
            assert response.status == 200 and '"title":"ConceptExpress"' in response.read().decode().replace(
                " ", ""
            )
        process.send_signal(signal.SIGINT)
        assert process.wait(timeout=60) == 0
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
    assert not root.exists()
    assert list((tmp_path / "tmp").iterdir()) == [] and list((tmp_path / "cwd").iterdir()) == []


def test_the_space_app_is_the_same_app(monkeypatch, tmp_path, components_factory):
    """app.py (a Hugging Face Space) builds the same app: the toy model by default, CONCEPTEXPRESS_MODEL's
    model when set."""
    import runpy

    from diffusers_conceptexpress import ConceptExpressPipeline

    app = Path(__file__).resolve().parents[1] / "app.py"
    demo = runpy.run_path(str(app), run_name="space")["demo"]
    try:
        assert isinstance(demo, WebDemo) and demo.blocks.title == "ConceptExpress"
        assert demo.toy and (demo.engine.inference_steps, demo.engine.guidance) == (25, 5.0)
    finally:
        demo.close()
    ConceptExpressPipeline(**components_factory("sd2")).save_pretrained(tmp_path / "model")
    monkeypatch.setenv("CONCEPTEXPRESS_MODEL", str(tmp_path / "model"))
    demo = runpy.run_path(str(app), run_name="space")["demo"]
    try:
        assert not demo.toy and (demo.engine.inference_steps, demo.engine.guidance) == (50, 7.5)
        assert demo.engine.pipe.text_encoder.config.hidden_size == 32  # the tiny model (the toy one: 64)
    finally:
        demo.close()
    assert not demo.root.exists()
