"""The sweep report as a user sees it: built from two real LoRA files on the embedded model and constructed
evaluations (one run with a validation loss, one from before it existed), then opened in headless Chromium.
The verdict table and the variant grid share the first screen; the screenshot goes to tests/artifacts/report/."""
import json
import shutil
from pathlib import Path

from lorakit.evaluation.grid import Renderer
from lorakit.evaluation.runs import EvalPlan, RunEvaluation
from lorakit.evaluation.sweep import Variant
from lorakit.evaluation.sweep_report import write_sweep_report

from conftest import randomize

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
ARTIFACTS = Path(__file__).resolve().parent / "artifacts" / "report"
FINDINGS = "Both variants learned the colour grade.\n\nThe conv variant drifts more on unrelated prompts."


def lora_file(pipe, path: Path, conv_dim: int, seed: int) -> str:
    from lorakit.formats.files import save_network
    from lorakit.surgery.config import NetworkConfig
    from lorakit.surgery.network import create_network

    net = create_network(pipe.unet, [pipe.text_encoder], NetworkConfig(network_dim=4, conv_dim=conv_dim,
                                                                       conv_alpha=4 if conv_dim else None))
    randomize(net, std=0.2, seed=seed)
    saved = save_network(net, path)
    net.restore()
    return str(saved)


def evaluation(folder: Path, name: str, file: str, kind: str, validation: list | None) -> RunEvaluation:
    folder.mkdir(parents=True, exist_ok=True)
    history = {"steps": [{"step": s, "epoch": 1 + (s > 10), "loss": 0.2 / s} for s in range(1, 21)], "norms": [],
               "samples": []}
    if validation is not None:
        history["validation"] = validation
    (folder / f"{name}-history.json").write_text(json.dumps(history))
    numbers = {"saturation": 0.4, "artefacts": 0.01, "diversity": 0.3, "fidelity": 0.5, "drift": 0.05}
    verdicts = {2: [{"kind": kind, "line": f"{name}: fidelity 0.500 < 0.700", "evidence": {}}]}
    return RunEvaluation(name, 0, {2: numbers}, {**numbers, "fidelity": 0.9}, {"saturation": 0.4, "artefacts": 0.01},
                         verdicts, 2, "closest to the data without overfitting", {2: file}, str(folder))


def build(tmp_path) -> tuple[Path, list[RunEvaluation]]:
    renderer = Renderer()  # the embedded tiny model: it draws the shapes the prompts name
    names = ["conv_dim-0_network_dim-4_attention_only", "conv_dim-8_conv_alpha-4_network_dim-4"]
    files = [lora_file(renderer.pipe, tmp_path / f"{n}.safetensors", conv, seed)
             for seed, (n, conv) in enumerate(zip(names, [0, 8]))]
    validation = [{"step": s, "epoch": s // 10, "loss": 0.05 + 0.001 * s, "kind": "split", "images": 2,
                   "timesteps": [100, 500, 900]} for s in (10, 20)]
    evaluations = [evaluation(tmp_path / names[0], names[0], files[0], "good", validation),
                   evaluation(tmp_path / names[1], names[1], files[1], "underfit", None)]
    plan = EvalPlan(prompts=["a red circle on a blue background, center"], unrelated=["a green square"], seeds=[0],
                    steps=2)
    page = write_sweep_report(tmp_path, [Variant(n, {}) for n in names], evaluations, plan, renderer,
                              findings=FINDINGS)
    return page, evaluations


def test_report_opens_with_verdicts_beside_the_grid_and_plots_validation_in_chromium(tmp_path):
    assert CHROMIUM, "Debian's chromium is not installed: run `make test` (it installs it as root) or `apt-get install -y chromium`"
    from playwright.sync_api import sync_playwright

    page_path, _ = build(tmp_path)
    text = page_path.read_text()
    assert text.count("validation (held-out images)") == 1  # the run that recorded one, and only it
    assert text.count("No validation loss was recorded") == 1
    assert text.index("<table class=\"verdicts\"") < text.index("What the comparison found") < text.index(
        "variants grid")
    assert "<p>The conv variant drifts more on unrelated prompts.</p>" in text
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
        page = browser.new_page(viewport={"width": 1600, "height": 900})
        page.goto(page_path.as_uri())
        table = page.locator("table.verdicts").bounding_box()
        grid = page.locator("img[alt='variants grid']").bounding_box()
        natural = page.eval_on_selector("img[alt='variants grid']", "i => [i.naturalWidth, i.clientWidth]")
        page.screenshot(path=str(ARTIFACTS / "report-first-screen.png"))
        page.screenshot(path=str(ARTIFACTS / "report-full.png"), full_page=True)
        browser.close()
    assert grid["x"] >= table["x"] + table["width"]  # side by side, grid on the right
    assert table["y"] < 300 and grid["y"] < 300 and grid["y"] + grid["height"] <= 900  # both on the first screen
    assert natural[1] == natural[0]  # shown at its own size: cells are not shrunk below what they were drawn at
