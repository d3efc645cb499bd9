"""The Gradio page: a thin face on lorakit.gui's API. Components are made from FieldSpecs (labels, help,
ranges and choices from TrainConfig's schema); every handler calls the API and shows its result or error."""
from __future__ import annotations

import gradio as gr

from lorakit.gui.actions import dataset_report
from lorakit.gui.estimate import base_architecture, estimate
from lorakit.gui.fields import (ADVANCED, BLOCK_PRESETS, CONV_FIELDS, CUSTOM_PRESET, GROUPS, FieldSpec,
                                block_preset_values, default_values, form_fields,
                                preset_choices, preset_values)
from lorakit.gui.paths import Roots
from lorakit.gui.runs import RunManager
from lorakit.gui.settings import config_from_form, conv_applies, load_settings, save_settings
from lorakit.gui.view_tools import evaluate_tab, shown, tools_tab

EMBEDDED = "(embedded tiny model)"
ESTIMATE_HEADERS = ["block", "attention", "conv", "parameters"]


def component(spec: FieldSpec, value, roots: Roots):
    common = dict(label=spec.label, info=spec.help, elem_id=f"field-{spec.name}")
    if spec.name == "pretrained_model_name_or_path":
        models = [(EMBEDDED, "")] + [(m, m) for m in roots.find_models()]
        return gr.Dropdown(choices=models, value=value or "", allow_custom_value=True, **common)
    if spec.kind == "bool":
        return gr.Checkbox(value=bool(value), **common)
    if spec.kind == "choice":
        return gr.Dropdown(choices=list(spec.choices), value=value, **common)
    if spec.kind in ("int", "float") and spec.optional:
        # gradio's Number cannot be empty (it sends 0), and empty means "unset" here: a text box, checked by
        # the schema's own range when the value is used
        bounds = f" [{spec.lo if spec.lo is not None else ''}, {spec.hi if spec.hi is not None else ''}]"
        return gr.Textbox(value="" if value is None else str(value), placeholder=f"empty = unset; range{bounds}",
                          **common)
    if spec.kind in ("int", "float"):
        return gr.Number(value=value, minimum=spec.lo, maximum=spec.hi, precision=0 if spec.kind == "int" else None,
                         **common)
    if spec.kind == "prompts":
        return gr.Textbox(value=value or "", lines=3, placeholder="one prompt per line; --n --w --h --d --l --s",
                          **common)
    placeholder = "comma-separated, one value per U-Net block" if spec.kind == "list" else None
    if spec.name == "resolution":
        placeholder = "one side (512) or W,H (512,768)"
    if isinstance(value, list):  # list defaults (resolution) as the comma text the form reads back
        value = ", ".join(str(v) for v in value)
    return gr.Textbox(value="" if value is None else value, placeholder=placeholder, **common)


class TrainTab:
    """The Training tab: the form, the estimate, settings files and the background run."""

    def __init__(self, roots: Roots, runs: RunManager):
        self.roots, self.runs = roots, runs
        self.specs = form_fields()
        self.names = [s.name for s in self.specs]
        self.fields: dict[str, gr.components.Component] = {}

    # ---- API calls (values arrive in form order) --------------------------------------------------
    def values(self, args) -> dict:
        return dict(zip(self.names, args))

    def architecture(self, values: dict):
        model = values.get("pretrained_model_name_or_path") or ""
        return base_architecture(str(self.roots.existing(model, "base model")) if model else "")

    def refresh(self, *args):
        """Estimate, conv-field visibility and the reason, after any change."""
        values = self.values(args)
        try:
            arch = self.architecture(values)
            keep = conv_applies(values, arch.conv_layers)
            result = estimate(config_from_form(values, arch.conv_layers), arch)
            rows = [[r[h] for h in ESTIMATE_HEADERS] for r in result.blocks]
            note = "" if keep else self.conv_note(values, arch.conv_layers)
            text = f"**Estimate:** {result.summary()}" + (f"\n\n{note}" if note else "")
        except (ValueError, RuntimeError, OSError) as e:
            keep, rows, text = conv_applies(values, 1), [], f"**Estimate unavailable:** {e}"
        return [text, rows] + [gr.update(visible=keep) for _ in CONV_FIELDS]

    @staticmethod
    def conv_note(values: dict, conv_layers: int) -> str:
        if not conv_layers:
            return "Conv fields hidden: this model has no kxk conv layers."
        if values.get("network_train_text_encoder_only"):
            return "Conv fields hidden: only the text encoder is trained."
        return ("Conv fields hidden: LoRA adapts attention/linear layers only; choose LoCon, LoHa or LoKr to "
                "train the 3x3 convs (texture, colour).")

    def apply_preset(self, preset: str):
        values, why = preset_values(preset)
        return [f"*{why}*"] + [gr.update(value=values[n]) if n in values else gr.update() for n in self.names]

    def fill_block_dims(self, preset: str, *args):
        values = self.values(args)
        arch = self.architecture(values)
        conv = int(values.get("conv_dim") or 0) if conv_applies(values, arch.conv_layers) else 0
        filled = block_preset_values(preset, arch.block_names, int(values.get("network_dim") or 1), conv)
        return [gr.update(value=filled.get(n)) if n in filled else gr.update() for n in self.names]

    def save(self, path: str, preset: str, *args):
        values = self.values(args)
        saved = save_settings(values, path, self.architecture(values).conv_layers, self.roots, preset)
        return f"Saved {saved}: run it with `lorakit train {saved}`"

    def load(self, path: str):
        values = load_settings(path, self.roots)
        return [f"Loaded {path}", CUSTOM_PRESET] + [gr.update(value=values[n]) for n in self.names]

    def start(self, preset: str, *args, resume: bool = False):
        values = self.values(args)
        files = self.runs.start(values, self.architecture(values).conv_layers, resume=resume, preset=preset)
        return f"{'Resumed' if resume else 'Started'}: `lorakit train {files.toml}`"

    def poll(self, output_dir: str, output_name: str):
        """Progress of the run; Resume is enabled only while the form's run has a state it did not finish."""
        status = self.runs.status()
        points = {"step": [s for s, _ in status.losses], "loss": [v for _, v in status.losses]}
        import pandas as pd  # gradio's plots take a DataFrame

        resumable = self.runs.can_resume(output_dir, output_name)
        return (f"**{status.line()}**", pd.DataFrame(points), [str(p) for p in status.samples], status.log_tail,
                gr.update(interactive=resumable))

    # ---- layout ---------------------------------------------------------------------------------
    def build(self) -> None:
        """Settings on the left; on the right, sticky, what they produce: the estimate, the run controls,
        progress, loss and samples (visible while any field is being edited)."""
        with gr.Row(equal_height=False):
            with gr.Column(scale=3, elem_id="settings-column"):
                preset, report, block_preset, fill = self.build_settings()
                inputs = [self.fields[n] for n in self.names]
                self.build_files(preset, inputs)
            with gr.Column(scale=2, min_width=400, elem_id="run-panel", elem_classes=["run-panel"]):
                estimate_md = gr.Markdown(elem_id="estimate")
                with gr.Accordion("Modules per block", open=False):
                    table = gr.Dataframe(headers=ESTIMATE_HEADERS, interactive=False)
                self.build_run(preset, inputs)
        conv_outputs = [self.fields[n] for n in CONV_FIELDS]
        gr.on([c.change for c in inputs], self.refresh, inputs, [estimate_md, table] + conv_outputs,
              trigger_mode="always_last")
        preset.change(self.apply_preset, [preset], [self.why] + inputs)
        fill.click(self.fill_block_dims, [block_preset] + inputs, inputs)
        dataset = self.fields["train_data_dir"]
        dataset.change(shown(lambda d, c, r, m: dataset_report(self.roots, d, c, r, m) if d else ""),
                       [dataset, self.fields["caption_extension"], self.fields["resolution"],
                        self.fields["pretrained_model_name_or_path"]], [report])
        self.page_load = (self.refresh, inputs, [estimate_md, table] + conv_outputs)

    def build_settings(self):
        defaults = default_values()
        with gr.Row():
            preset = gr.Dropdown(choices=preset_choices(), value=CUSTOM_PRESET, label="Preset", elem_id="preset",
                                 info="starting values from the design brief; every field stays editable")
            self.why = gr.Markdown(elem_id="preset-why")
        for group in list(GROUPS) + [ADVANCED]:
            with gr.Accordion(group, open=group != ADVANCED):
                for spec in (s for s in self.specs if s.group == group):
                    self.fields[spec.name] = component(spec, defaults[spec.name], self.roots)
                if group == "Model and data":
                    report = gr.Textbox(label="Dataset check", lines=4, interactive=False, elem_id="dataset-report")
                if group == "Block dims":
                    with gr.Row():
                        block_preset = gr.Dropdown(choices=list(BLOCK_PRESETS), value="uniform",
                                                   label="Block dims preset")
                        fill = gr.Button("Fill block dims from preset")
        return preset, report, block_preset, fill

    def build_files(self, preset, inputs) -> None:
        with gr.Row():
            path = gr.Textbox(value=str(self.roots.folders[0] / "lorakit-train.toml"), label="Settings file (TOML)",
                              elem_id="settings-path", scale=3)
            save, load = gr.Button("Save TOML", elem_id="save-toml"), gr.Button("Load TOML", elem_id="load-toml")
        message = gr.Markdown(elem_id="settings-message")
        save.click(shown(self.save), [path, preset] + inputs, [message])
        load.click(self.guarded_load, [path], [message, preset] + inputs)

    def build_run(self, preset, inputs) -> None:
        with gr.Row():
            start = gr.Button("Start training", variant="primary", elem_id="start")
            resume = gr.Button("Resume", elem_id="resume", interactive=False)
            stop = gr.Button("Stop", elem_id="stop")
        run_message = gr.Markdown(elem_id="run-message")
        status = gr.Markdown(elem_id="run-status")
        plot = gr.LinePlot(x="step", y="loss", label="Loss", elem_id="loss-plot", height=220)
        gallery = gr.Gallery(label="Samples", columns=6, height=160, elem_id="samples")
        log = gr.Textbox(label="Log", lines=4, interactive=False, elem_id="run-log")
        start.click(shown(self.start), [preset] + inputs, [run_message])
        resume.click(shown(lambda p, *a: self.start(p, *a, resume=True)), [preset] + inputs, [run_message])
        stop.click(shown(lambda: f"Stopped (exit code {self.runs.stop()}); Resume continues from the saved state"),
                   [], [run_message])
        target = [self.fields["output_dir"], self.fields["output_name"]]
        gr.Timer(1.0).tick(self.poll, target, [status, plot, gallery, log, resume])

    def guarded_load(self, path: str):
        try:
            return self.load(path)
        except (ValueError, OSError) as e:
            return [f"**Error:** {e}", gr.update()] + [gr.update() for _ in self.names]


# the run panel stays in view while the settings column scrolls (gradio: launch(css=...)); gradio's container
# clips with overflow:hidden, which makes it the sticky element's scroller: clip does not
CSS = """.run-panel{position:sticky;top:0;align-self:flex-start;max-height:100vh;overflow-y:auto}
.gradio-container{overflow:clip !important}"""


def build_app(roots: Roots) -> gr.Blocks:
    runs = RunManager(roots)
    with gr.Blocks(title="lorakit", analytics_enabled=False) as app:
        gr.Markdown("# lorakit\nLoRA / LoCon / LoHa / LoKr for Stable Diffusion: the same settings and code as "
                    "`lorakit train`; paths are limited to: " + ", ".join(f"`{r}`" for r in roots.folders))
        with gr.Tab("Training"):
            train = TrainTab(roots, runs)
            train.build()
        with gr.Tab("Evaluate"):
            evaluate_tab(roots, train)
        with gr.Tab("Tools"):
            tools_tab(roots)
        app.load(*train.page_load)
    app.runs = runs  # the server stops a run still going when it shuts down
    return app

