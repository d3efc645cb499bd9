"""The design brief's claims about conv layers, as measured rows on the embedded tiny model.

    .venv/bin/python benchmarks/conv_vs_attention.py [--epochs 6] [--out bench-conv]

Same data (the sepia style, 8 images x 5 repeats), same seed, same steps and LR for every row; only the
named setting changes. Columns: sepia = the style's own detector on samples of style prompts (share of
pixels on the sepia colour line; training images 1.0); fidelity = feature distance to the training images (lower is
closer); drift = RMS change on prompts unrelated to the data (lower leaves them alone); file size measured
next to the formula Σ rank·(in·kh·kw + out)·2 bytes (fp16) + 4 bytes per alpha.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.modules.setdefault("torchvision", None)

from lorakit.evaluation import metrics  # noqa: E402
from lorakit.evaluation.grid import Cell, Renderer  # noqa: E402
from lorakit.formats.safetensors_io import read_header  # noqa: E402
from lorakit.models import styles  # noqa: E402
from lorakit.training.config import build_config  # noqa: E402
from lorakit.training.trainer import Trainer  # noqa: E402

# 26-value LoRA Block Weight vectors: BASE, IN00..IN11, M00, OUT00..OUT11
SHALLOW = [1] + [1] * 6 + [0] * 6 + [0] + [0] * 6 + [1] * 6
DEEP = [1] + [0] * 6 + [1] * 6 + [1] + [1] * 6 + [0] * 6
BLOCK_ROWS = {"all blocks": "", "shallow only (IN00-IN05, OUT06-OUT11)": ",".join(map(str, SHALLOW)),
              "deep only (IN06-IN11, M00, OUT00-OUT05)": ",".join(map(str, DEEP))}


def train(data: Path, out: Path, epochs: int, **settings) -> Path:
    values = dict(train_data_dir=str(data), resolution=64, train_batch_size=4, max_train_epochs=epochs,
                  network_dim=8, network_alpha=8.0, learning_rate=3e-3, network_train_unet_only=True, seed=0,
                  output_dir=str(out), output_name="lora", **settings)
    return Trainer(build_config(values)).run().files[-1]


def formula_bytes(path: Path) -> int:
    header, _, _ = read_header(path)
    total = 0
    for key, entry in header.items():
        if key.endswith("lora_down.weight"):
            up = header[key.replace("lora_down", "lora_up")]["shape"]
            rank, fan_in = entry["shape"][0], int(np.prod(entry["shape"][1:]))
            total += rank * (fan_in + up[0]) * 2 + 4
    return total


def measure(renderer: Renderer, lora: str, prompts, unrelated, seeds, base_unrelated, data, blocks="") -> dict:
    style = [renderer.image(Cell(p, seed=s, lora=lora, steps=12, blocks=blocks)) for p in prompts for s in seeds]
    other = [renderer.image(Cell(p, seed=s, lora=lora, steps=12, blocks=blocks)) for p in unrelated for s in seeds]
    return {"sepia": float(np.mean([styles.sepia_score(i) for i in style])),
            "fidelity": metrics.fidelity(style, data), "drift": metrics.drift(other, base_unrelated)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=6)
    parser.add_argument("--out", default="bench-conv")
    args = parser.parse_args()
    torch.set_num_threads(2)
    out, start = Path(args.out), time.time()
    data_dir = styles.write_style_dataset(out / "data", count=8, repeats=5, seed=0, style="sepia")
    from lorakit.evaluation.runs import training_images

    data = training_images(data_dir, 64)
    prompts, unrelated, seeds = styles.style_prompts(3), styles.unrelated_prompts(3), [0, 1]
    rows = [("attention only", {"conv_dim": 0})]
    rows += [(f"conv_dim {d}, conv_alpha {d // 2}", {"conv_dim": d, "conv_alpha": d / 2}) for d in (4, 16, 64)]
    rows += [(f"conv_dim 16, conv_alpha {a:g}", {"conv_dim": 16, "conv_alpha": a}) for a in (1.0, 16.0)]
    renderer = Renderer()
    base_unrelated = [renderer.image(Cell(p, seed=s, steps=12)) for p in unrelated for s in seeds]
    base = measure(renderer, "none", prompts, unrelated, seeds, base_unrelated, data)
    print(f"\n| setting | sepia | fidelity | drift | file bytes | formula bytes |\n|---|---|---|---|---|---|")
    print(f"| base model (no LoRA) | {base['sepia']:.3f} | {base['fidelity']:.3f} | 0 | | |")
    files = {}
    for label, settings in rows:
        path = train(data_dir, out / label.replace(" ", "_").replace(",", ""), args.epochs, **settings)
        files[label] = path
        m = measure(renderer, str(path), prompts, unrelated, seeds, base_unrelated, data)
        print(f"| {label} | {m['sepia']:.3f} | {m['fidelity']:.3f} | {m['drift']:.3f} | "
              f"{path.stat().st_size:,} | {formula_bytes(path):,} |", flush=True)
    print("\n| conv_dim 16, conv_alpha 8: blocks applied | sepia | fidelity | drift |\n|---|---|---|---|")
    path = str(files["conv_dim 16, conv_alpha 8"])
    for label, blocks in BLOCK_ROWS.items():
        m = measure(renderer, path, prompts, unrelated, seeds, base_unrelated, data, blocks)
        print(f"| {label} | {m['sepia']:.3f} | {m['fidelity']:.3f} | {m['drift']:.3f} |", flush=True)
    print(f"\n{args.epochs} epochs x 10 steps per row, batch 4, LR 3e-3, network_dim 8/alpha 8; "
          f"{(time.time() - start) / 60:.1f} min in all")


if __name__ == "__main__":
    main()
