"""Datasets in kohya's conventions, and every kind of bad input found before training."""
import pytest
from PIL import Image

from lorakit.cli import main
from lorakit.training import dataset as ds
from lorakit.training.config import ConfigError


def png(path, size=(64, 48), mode="RGB", color=None, **save):
    color = color if color is not None else ((200, 30, 30) if mode == "RGB" else 128)
    Image.new(mode, size, color).save(path, **save)
    return path


@pytest.fixture
def messy(tmp_path, monkeypatch):
    root = tmp_path / "train"
    good, other = root / "10_sks dog", root / "not-a-repeat-folder"
    good.mkdir(parents=True)
    other.mkdir()
    png(good / "a.png")
    (good / "a.txt").write_text("sks dog, red collar, grass")
    png(good / "b.png", size=(48, 64))  # no caption: class tokens
    (good / "empty.png").write_bytes(b"")
    (good / "text.png").write_text("this is not an image")
    data = (good / "a.png").read_bytes()
    (good / "cut.png").write_bytes(data[: len(data) // 2])
    Image.new("CMYK", (64, 64), (0, 255, 255, 0)).save(good / "cmyk.jpg")
    png(good / "la.png", mode="LA", color=(128, 100))
    png(good / "p.png", mode="P", color=3)
    png(good / "deep.png", mode="I;16", color=30000)
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90: stored 64x32, upright 32x64
    Image.new("RGB", (64, 32), (0, 0, 200)).save(good / "rot.jpg", exif=exif)
    (good / "rot.txt").write_bytes("caf\xe9, na\xefve".encode("cp1252"))
    monkeypatch.setattr(ds, "MAX_PIXELS", 150 * 150)
    png(good / "bomb.png", size=(200, 200))
    return root


def test_scan_reports_every_problem_with_its_path_and_action(messy):
    specs, notes = ds.from_folder(messy, resolution=64)
    report = ds.scan(specs)
    problems = "\n".join(report.problems)
    assert "empty.png: empty (0-byte) file; skipped" in problems
    assert "text.png: not an image" in problems
    assert "cut.png: corrupt or truncated image" in problems
    assert "bomb.png:" in problems and "decompression-bomb" in problems
    assert "rot.txt: caption is not UTF-8; read as Windows-1252" in problems
    notes_text = "\n".join(report.notes + notes)
    assert "not-a-repeat-folder: ignored" in notes_text
    for name, what in [("cmyk.jpg", "mode CMYK"), ("la.png", "mode LA"), ("p.png", "mode P"), ("deep.png", "mode I;16"),
                       ("rot.jpg", "EXIF orientation")]:
        assert f"{name}: {what}" in notes_text
    usable = {i.path.name: i for i in report.items}
    assert set(usable) == {"a.png", "b.png", "cmyk.jpg", "la.png", "p.png", "deep.png", "rot.jpg"}
    assert usable["b.png"].caption == "sks dog" and usable["rot.jpg"].caption == "café, naïve"
    assert usable["rot.jpg"].size == (32, 64)
    assert report.num_train_images == 10 * 7
    assert report.tag_frequency["10_sks dog"]["red collar"] == 1
    for item in report.items:  # every usable image loads upright as RGB
        assert ds.load_rgb(item.path).mode == "RGB"
    assert ds.load_rgb(messy / "10_sks dog" / "rot.jpg").size == (32, 64)


def test_dataset_toml_levels_and_unknown_keys(tmp_path):
    (tmp_path / "imgs").mkdir()
    png(tmp_path / "imgs" / "x.png", size=(96, 64))
    path = tmp_path / "data.toml"
    path.write_text(f'''
[general]
caption_extension = ".caption"
shuffle_caption = true
keep_tokens = 1
[[datasets]]
resolution = 128
batch_size = 2
enable_bucket = true
min_bucket_reso = 32
max_bucket_reso = 256
bucket_reso_steps = 32
  [[datasets.subsets]]
  image_dir = "{tmp_path / 'imgs'}"
  num_repeats = 3
  class_tokens = "shape"
''')
    (spec,) = ds.from_toml(path)
    sub = spec.subsets[0]
    assert (sub.caption_extension, sub.shuffle_caption, sub.keep_tokens, sub.num_repeats) == (".caption", True, 1, 3)
    assert spec.batch_size == 2 and spec.resolution == (128, 128)
    report = ds.scan([spec])
    assert report.items[0].bucket == (160, 96)  # the bucket whose aspect is nearest 96:64
    path.write_text(path.read_text().replace("num_repeats", "num_repeat"))
    with pytest.raises(ConfigError, match="unknown key 'num_repeat'; did you mean 'num_repeats'"):
        ds.from_toml(path)


def test_buckets_respect_area_and_steps():
    spec = ds.DatasetSpec([], (512, 512), enable_bucket=True)
    buckets = ds.make_buckets(spec)
    assert (512, 512) in buckets and all(w * h <= 512 * 512 and w % 64 == 0 and h % 64 == 0 for w, h in buckets)
    assert ds.nearest_bucket((1000, 500), buckets)[0] > ds.nearest_bucket((1000, 500), buckets)[1]


def test_check_dataset_cli(messy, capsys):
    assert main(["check-dataset", str(messy), "--resolution", "64"]) == 0
    out = capsys.readouterr().out
    assert "7 usable, 70 per epoch" in out and "PROBLEM" in out and "empty.png" in out
    assert main(["check-dataset", str(messy / "nope")]) == 2


def test_check_dataset_defaults_to_the_models_native_size(messy, capsys):
    """Unset --resolution buckets at the base model's native size, as train does: the embedded model's 64."""
    assert main(["check-dataset", str(messy)]) == 0
    buckets = next(line for line in capsys.readouterr().out.splitlines() if line.startswith("buckets"))
    assert "64x64" in buckets and "512" not in buckets
