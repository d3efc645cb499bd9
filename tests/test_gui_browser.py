"""The web GUI in a real headless Chromium (Debian's `chromium`, which `make test` installs) at 1280x800: the
run panel (estimate, Start) is on the first screen and stays there while the settings scroll; choose the style
preset, see the conv fields and the estimate, train on the tiny model, see progress and a sample, save the
TOML and check it is what `lorakit train` would run; then a grid against the base (Evaluate) and `inspect`
on the trained file (Tools). Screenshots go to tests/artifacts/gui/."""
import os
import re
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from lorakit.models.styles import write_style_dataset
from lorakit.training.config import build_config, load_config

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
ARTIFACTS = Path(__file__).resolve().parent / "artifacts" / "gui"
PROMPT = "a red circle, sepia --s 2 --d 1"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def gui(tmp_path):
    """`lorakit gui` as a user starts it, in its own process, rooted at tmp_path."""
    port = free_port()
    env = dict(os.environ, OMP_NUM_THREADS="1", GRADIO_ANALYTICS_ENABLED="False")
    log = open(tmp_path / "gui.log", "w")
    server = subprocess.Popen([sys.executable, "-m", "lorakit.cli", "gui", "--port", str(port), "--root",
                               str(tmp_path)], cwd=tmp_path, env=env, stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}/"
    try:
        for _ in range(240):
            try:
                urllib.request.urlopen(url, timeout=1)
                break
            except OSError:
                assert server.poll() is None, (tmp_path / "gui.log").read_text()
                time.sleep(0.5)
        yield url
    finally:
        server.terminate()
        server.wait(30)
        log.close()


def box(page, elem_id: str):
    return page.locator(f"#{elem_id}").locator("input, textarea").first


def fill(page, name: str, value) -> None:
    field = box(page, f"field-{name}")
    field.fill(str(value))
    field.press("Tab")  # gradio sends the change on blur


def choose(page, elem_id: str, option: str) -> None:
    page.locator(f"#{elem_id} input").first.click()
    page.get_by_role("option", name=option, exact=True).click()


def in_view(page, selector: str) -> bool:
    """The element lies wholly inside the 1280x800 viewport as it is scrolled now."""
    b = page.locator(selector).bounding_box()
    return b is not None and b["y"] >= 0 and b["y"] + b["height"] <= 800 and 0 <= b["x"] and b["x"] + b["width"] <= 1280


def test_style_preset_estimate_training_and_toml_in_chromium(gui, tmp_path):
    assert CHROMIUM, "Debian's chromium is not installed: run `make test` (it installs it as root) or `apt-get install -y chromium`"
    from playwright.sync_api import expect, sync_playwright

    expect.set_options(timeout=30_000)  # each change is a server round trip; CI runs on 2 busy cores
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    data = write_style_dataset(tmp_path / "data", count=2, repeats=1)
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
        page = browser.new_page(viewport={"width": 1280, "height": 800})
        page.goto(gui)
        estimate = page.locator("#estimate")
        expect(estimate).to_contain_text("trainable parameters", timeout=60_000)
        assert in_view(page, "#start") and in_view(page, "#estimate")  # the run panel, without scrolling
        expect(page.locator("#resume")).to_be_disabled()  # no unfinished state for these settings
        page.screenshot(path=str(ARTIFACTS / "0-first-screen-1280x800.png"))
        expect(page.locator("#field-conv_dim")).to_be_hidden()  # plain LoRA: no conv fields
        expect(estimate).to_contain_text("Conv fields hidden")

        choose(page, "preset", "style")
        expect(page.locator("#preset-why")).to_contain_text("conv layers carry texture")
        expect(page.locator("#field-conv_dim")).to_be_visible()
        expect(box(page, "field-conv_dim")).to_have_value("32")
        expect(box(page, "field-conv_alpha")).to_have_value(re.compile(r"^16(\.0)?$"))
        expect(estimate).to_contain_text("unet: 277")  # 192 attention/linear + 36 + conv modules (tiny SD1.5)
        print(f"estimate shown: {estimate.inner_text()}")
        page.screenshot(path=str(ARTIFACTS / "1-style-preset-conv-fields-estimate.png"), full_page=True)

        settings = dict(train_data_dir=data, resolution=64, train_batch_size=1, max_train_epochs=2,
                        sample_every_n_epochs=1, sample_prompts=PROMPT, output_dir=tmp_path / "out",
                        output_name="gui")
        for name, value in settings.items():
            fill(page, name, value)
        expect(box(page, "dataset-report")).to_have_value(re.compile("2 usable"), timeout=30_000)
        box(page, "field-output_name").scroll_into_view_if_needed()
        assert page.evaluate("window.scrollY") > 400 and in_view(page, "#start")  # sticky while editing below
        page.screenshot(path=str(ARTIFACTS / "1b-editing-with-sticky-run-panel.png"))
        box(page, "settings-path").fill(str(tmp_path / "run.toml"))
        page.locator("#save-toml").click()
        expect(page.locator("#settings-message")).to_contain_text("Saved", timeout=30_000)

        page.locator("#start").click()
        expect(page.locator("#run-message")).to_contain_text("Started", timeout=30_000)
        expect(page.locator("#run-status")).to_contain_text(re.compile(r"running: step [1-9]|finished"),
                                                            timeout=120_000)
        page.screenshot(path=str(ARTIFACTS / "2-training-progress.png"), full_page=True)
        expect(page.locator("#run-status")).to_contain_text("finished: step 4/4", timeout=120_000)
        expect(page.locator("#samples img").first).to_be_visible(timeout=30_000)
        expect(page.locator("#resume")).to_be_disabled()  # finished: nothing to resume
        page.screenshot(path=str(ARTIFACTS / "3-finished-with-samples.png"), full_page=True)
        evaluate_and_inspect(page, tmp_path / "out" / "gui.safetensors")
        browser.close()
    print(f"screenshots: {ARTIFACTS}")

    saved = load_config(tmp_path / "run.toml")  # what `lorakit train run.toml` runs
    expected = build_config({  # the style preset's values plus what was typed, straight through the schema
        "algo": "locon", "network_dim": 8, "network_alpha": 8.0, "conv_dim": 32, "conv_alpha": 16.0,
        "train_data_dir": str(data), "resolution": 64, "train_batch_size": 1, "max_train_epochs": 2,
        "sample_every_n_epochs": 1, "sample_prompts": str(tmp_path / "run-prompts.txt"),
        "output_dir": str(tmp_path / "out"), "output_name": "gui"})
    assert saved == expected
    assert (tmp_path / "run-prompts.txt").read_text().strip() == PROMPT
    ran = load_config(tmp_path / "out" / "gui.toml")  # the file the Start button ran
    assert ran == build_config({**expected.settings(), "sample_prompts": str(tmp_path / "out" / "gui-prompts.txt")})
    assert sorted(p.name for p in (tmp_path / "out" / "sample").glob("*.png")) == [
        "gui_e000001_00_1.png", "gui_e000002_00_1.png"]


def evaluate_and_inspect(page, trained) -> None:
    """Evaluate: the trained file against the base in a grid; Tools: `inspect` on it."""
    from playwright.sync_api import expect

    page.get_by_role("tab", name="Evaluate").click()
    box(page, "grid-loras").fill(str(trained))
    box(page, "grid-steps").fill("2")
    page.locator("#grid-render").click()
    expect(page.locator("#grid-message")).to_contain_text("Wrote", timeout=120_000)
    expect(page.locator("#grid-image img")).to_be_visible(timeout=30_000)
    page.screenshot(path=str(ARTIFACTS / "4-evaluate-grid-against-base.png"), full_page=True)
    page.get_by_role("tab", name="Tools").click()
    box(page, "inspect-file").fill(str(trained))
    page.locator("#inspect-go").click()
    report = box(page, "inspect-report")
    expect(report).to_have_value(re.compile(r"file\s+\S*gui\.safetensors"), timeout=60_000)
    expect(report).to_have_value(re.compile(r"modules\s+\d+"))
    page.screenshot(path=str(ARTIFACTS / "5-tools-inspect.png"), full_page=True)
