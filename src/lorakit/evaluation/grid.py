"""X/Y(/Z) image grids from fixed prompts and seeds: every cell names what made it.

    spec = GridSpec(x=Axis("multiplier", [0, 0.5, 1]), y=Axis("lora", ["none", "a.safetensors"]),
                    prompt="a red circle ...", seed=1)
    result = render_grid(Renderer(), spec, "out/grid")   # grid.png, cells/*.png, grid.json

Axes: lora (files; "none" = the base model), multiplier, blocks (LoRA Block Weight presets or vectors, e.g.
OUTS or 26 values), seed, prompt, steps, cfg. A Z axis gives one
grid page per value. Images are generated one at a time from (prompt, seed) so a cell is identical to the
same image generated alone.
"""
from __future__ import annotations

import io
import itertools
import json
import re
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont

from lorakit.formats.atomic import atomic_write
from lorakit.formats.files import load_network_file
from lorakit.models.checkpoint import load_base_model
from lorakit.tools.blocks import lbw_block, parse_weights

AXES = {"lora": str, "multiplier": float, "blocks": str, "seed": int, "prompt": str, "steps": int, "cfg": float}


class GridError(ValueError):
    """A grid request that cannot be rendered; the message names the axis or value."""


@dataclass(frozen=True)
class Cell:
    prompt: str
    seed: int = 0
    lora: str = "none"
    multiplier: float = 1.0
    blocks: str = ""  # LBW preset or vector; "" = every block at the multiplier
    steps: int = 20
    cfg: float = 5.0
    negative: str = ""
    width: int = 64
    height: int = 64


@dataclass
class Axis:
    name: str
    values: list

    def __post_init__(self):
        if self.name not in AXES:
            raise GridError(f"unknown grid axis {self.name!r}; choose from {sorted(AXES)}")
        if not self.values:
            raise GridError(f"grid axis {self.name!r} has no values")
        try:
            self.values = [AXES[self.name](v) for v in self.values]
        except ValueError as e:
            raise GridError(f"grid axis {self.name!r}: {e}") from None

    @staticmethod
    def parse(text: str) -> "Axis":
        """`name=v1,v2,...` (prompts with commas: separate values with `|` instead)."""
        name, eq, values = text.partition("=")
        if not eq:
            raise GridError(f"grid axis {text!r}: expected name=value1,value2")
        items = [v.strip() for v in values.split("|" if "|" in values else ",") if v.strip()]
        if name.strip() == "blocks" and "|" not in values and any(_is_number(v) for v in items):
            items = [values.strip()]  # one block vector (its commas are not value separators)
        return Axis(name.strip(), items)

    def label(self, value) -> str:
        if self.name == "lora":
            return "no LoRA" if value == "none" else Path(value).stem
        return f"{self.name} {value}" if self.name != "prompt" else str(value)


@dataclass
class GridSpec:
    cell: Cell
    x: Axis
    y: Axis | None = None
    z: Axis | None = None

    def cells(self) -> list[tuple[int, int, int, Cell]]:
        axes = [self.z, self.y, self.x]
        ranges = [range(len(a.values)) if a else range(1) for a in axes]
        out = []
        for k, j, i in itertools.product(*ranges):
            cell = self.cell
            for axis, index in zip(axes, (k, j, i)):
                if axis:
                    cell = replace(cell, **{axis.name: axis.values[index]})
            out.append((i, j, k, cell))
        return out


class Renderer:
    """The base pipeline plus at most one attached LoRA file, swapped as cells ask."""

    def __init__(self, base_model: str | None = None, pipeline=None):
        self.pipe = pipeline if pipeline is not None else load_base_model(base_model).pipeline
        self.pipe.set_progress_bar_config(disable=True)
        self.loaded: tuple[str, object] | None = None

    def use(self, lora: str, multiplier: float, blocks: str = "") -> None:
        if self.loaded and self.loaded[0] != lora:
            self.loaded[1].restore()
            self.loaded = None
        if lora != "none" and self.loaded is None:
            encoders = [self.pipe.text_encoder] + ([self.pipe.text_encoder_2]
                                                   if getattr(self.pipe, "text_encoder_2", None) else [])
            network, _ = load_network_file(lora, self.pipe.unet, encoders)
            self.loaded = (lora, network)
        if self.loaded:
            network = self.loaded[1]
            weights = parse_weights(blocks, network.family) if blocks else {}
            for name, adapter in network.adapters.items():
                block = lbw_block(name, network.family)
                adapter.multiplier = multiplier * (weights.get(block, 0.0) if weights and block else 1.0)

    @torch.no_grad()
    def image(self, cell: Cell) -> np.ndarray:
        self.use(cell.lora, cell.multiplier, cell.blocks)
        out = self.pipe(cell.prompt, negative_prompt=cell.negative or None, num_inference_steps=cell.steps,
                        guidance_scale=cell.cfg, width=cell.width, height=cell.height, output_type="np",
                        generator=torch.Generator().manual_seed(cell.seed)).images[0]
        return (out * 255).round().astype(np.uint8)

    def close(self) -> None:
        if self.loaded:
            self.loaded[1].restore()
            self.loaded = None


def _is_number(text: str) -> bool:
    try:
        float(text)
        return True
    except ValueError:
        return False


def png_bytes(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


BREAKS = re.compile(r"[^ _,/-]+[ _,/-]*|[ _,/-]+")  # a piece ends after a space, _ , / or -
LINE = 18  # px per label line at the 14 px font
GAP = 4  # px between cells, so neighbours read as separate images


def wrap(text: str, font, width: int) -> list[str]:
    """Lines no wider than `width` px holding every character of `text` (spaces at a break dropped): break
    after a space, `_`, `,`, `/` or `-`, and inside a piece only when the piece alone is wider. Never cut."""
    lines, line = [], ""
    for piece in BREAKS.findall(text):
        if font.getlength((line + piece).rstrip()) <= width:
            line += piece
            continue
        if line.strip():
            lines.append(line.rstrip())
        line = ""
        for char in piece:
            if line and font.getlength(line + char) > width:
                lines.append(line)
                line = ""
            line += char.lstrip() if not line else char
    if line.strip() or not lines:
        lines.append(line.rstrip())
    return lines


@dataclass(frozen=True)
class Layout:
    """Where everything goes on a sheet: cell (i, j)'s top-left corner is `origin(i, j)`."""
    scale: int  # whole-number nearest-neighbour enlargement of every image
    cell: tuple[int, int]  # (width, height) of one enlarged image
    left: int  # width of the row-label column (plus margins)
    top: int  # height of the title and column-label band
    row_height: int  # the cell height, or more where a row label needs more lines
    size: tuple[int, int]  # the sheet
    title: list[str]
    x_lines: list[list[str]]
    y_lines: list[list[str]]

    def origin(self, i: int, j: int) -> tuple[int, int]:
        return self.left + i * (self.cell[0] + GAP), self.top + j * (self.row_height + GAP)


def layout(image_size: tuple[int, int], columns: int, x_labels: list[str], y_labels: list[str] | None,
           title: str = "", min_cell: int = 192, font=None) -> Layout:
    """image_size: (height, width) of each image. Small images are enlarged by a whole factor to at least
    `min_cell` px; labels wrap to their cell's width, row labels to a column no wider than a cell."""
    font = font or label_font()
    h, w = image_size
    scale = max(1, -(-min_cell // max(h, w)))
    cw, ch = w * scale, h * scale
    x_lines = [wrap(label, font, cw - 8) for label in x_labels]
    y_lines = []
    if y_labels:
        column = min(max(int(font.getlength(s)) for s in y_labels), cw)
        y_lines = [wrap(label, font, column) for label in y_labels]
    left = column + 16 if y_labels else 8
    row_height = max([ch] + [len(lines) * LINE for lines in y_lines])
    rows = max(len(y_lines), 1)
    width = left + columns * (cw + GAP) + 4
    title_lines = wrap(title, font, width - 16) if title else []
    top = 8 + LINE * len(title_lines) + (6 if title_lines else 0) + LINE * max(len(x) for x in x_lines) + 4
    return Layout(scale, (cw, ch), left, top, row_height, (width, top + rows * (row_height + GAP) + 4),
                  title_lines, x_lines, y_lines)


def label_font():
    return ImageFont.load_default(size=14)


def compose(images: list[list[np.ndarray]], x_labels: list[str], y_labels: list[str] | None,
            title: str = "", min_cell: int = 192) -> Image.Image:
    """Rows of equally sized images -> one labelled sheet; small images are enlarged by whole factors so
    pixels stay sharp and a cell is large enough to judge; every label is shown whole (wrapped)."""
    font = label_font()
    plan = layout(images[0][0].shape[:2], len(images[0]), x_labels, y_labels, title, min_cell, font)
    sheet = Image.new("RGB", plan.size, "white")
    draw = ImageDraw.Draw(sheet)
    for n, line in enumerate(plan.title):
        draw.text((8, 6 + n * LINE), line, fill="black", font=font)
    label_top = plan.top - 4 - LINE * max(len(x) for x in plan.x_lines)
    for i, lines in enumerate(plan.x_lines):
        for n, line in enumerate(lines):
            draw.text((plan.origin(i, 0)[0] + 4, label_top + n * LINE), line, fill="black", font=font)
    for j, row in enumerate(images):
        y = plan.origin(0, j)[1]
        for n, line in enumerate(plan.y_lines[j] if plan.y_lines else []):
            draw.text((8, y + n * LINE), line, fill="black", font=font)
        for i, image in enumerate(row):
            tile = Image.fromarray(image).resize(plan.cell, Image.NEAREST)
            sheet.paste(tile, plan.origin(i, j))
    return sheet


def check_output_folder(out_dir: str | Path) -> Path:
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise ValueError(f"{out}: the grid's output folder is a file; give a folder (it is created if missing)")
    return out


def render_grid(renderer: Renderer, spec: GridSpec, out_dir: str | Path, progress=None) -> dict:
    """Render every cell, write grid.png (grid_z{k}.png per Z value), cells/*.png and grid.json."""
    out = check_output_folder(out_dir)
    cells, pages = [], []
    z_count = len(spec.z.values) if spec.z else 1
    rows = len(spec.y.values) if spec.y else 1
    sheets = [[[None] * len(spec.x.values) for _ in range(rows)] for _ in range(z_count)]
    for i, j, k, cell in spec.cells():
        image = renderer.image(cell)
        sheets[k][j][i] = image
        name = f"cells/z{k}_y{j}_x{i}.png"
        atomic_write(out / name, png_bytes(Image.fromarray(image)))
        cells.append({"x": i, "y": j, "z": k, "file": name, **cell.__dict__})
        if progress:
            progress(1)
    renderer.close()
    for k, sheet in enumerate(sheets):
        title = page_title(spec, k)
        page = compose(sheet, [spec.x.label(v) for v in spec.x.values],
                       [spec.y.label(v) for v in spec.y.values] if spec.y else None, title)
        name = "grid.png" if z_count == 1 else f"grid_z{k}.png"
        atomic_write(out / name, png_bytes(page))
        pages.append(name)
    meta = {"axes": {a: {"name": getattr(spec, a).name, "values": getattr(spec, a).values}
                     for a in ("x", "y", "z") if getattr(spec, a)},
            "defaults": spec.cell.__dict__, "pages": pages, "cells": cells}
    atomic_write(out / "grid.json", json.dumps(meta, indent=1))
    return meta


def page_title(spec: GridSpec, k: int) -> str:
    """The Z value, else the prompt every cell shares; none when the prompt is an axis (a title would
    repeat the first row's label)."""
    if spec.z:
        return spec.z.label(spec.z.values[k])
    return "" if "prompt" in (spec.x.name, spec.y.name if spec.y else "") else spec.cell.prompt


def with_baseline(axis: Axis) -> Axis:
    """A LoRA axis gets a no-LoRA row first, unless it has one."""
    if axis.name == "lora" and "none" not in axis.values:
        return Axis("lora", ["none", *axis.values])
    return axis
