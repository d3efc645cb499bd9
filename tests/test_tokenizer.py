"""The shipped CLIP tokenizer gives CLIP's token ids, offline."""
import importlib.util
from pathlib import Path

import pytest

from lorakit.models.tokenizer import clip_tokenizer, tokenizer_files

PROMPTS = ["a photo of a cat", "A  Red circle on a BLUE background, top left", "(masterpiece:1.2), <lora:foo:0.8>",
           "café naïve résumé", "🐱 emoji and 日本語の文字", "https://example.com/x?y=1", "sks dog, 1girl, solo"]


def open_clip_tokenizer():
    """open_clip's own SimpleTokenizer as an independent oracle, imported by file path: the package's
    __init__ imports torchvision, which breaks beside the CPU torch."""
    spec = importlib.util.find_spec("open_clip")
    if spec is None or not spec.submodule_search_locations:
        pytest.skip("open_clip_torch (installed --no-deps by make) is not available")
    path = Path(list(spec.submodule_search_locations)[0]) / "tokenizer.py"
    module_spec = importlib.util.spec_from_file_location("open_clip_tokenizer_oracle", path)
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    return module.SimpleTokenizer()


def test_known_ids():
    assert clip_tokenizer()("a photo of a cat").input_ids == [49406, 320, 1125, 539, 320, 2368, 49407]
    assert len(clip_tokenizer()) == 49408 and clip_tokenizer().model_max_length == 77


@pytest.mark.parametrize("prompt", PROMPTS)
def test_ids_equal_open_clip(prompt):
    oracle = open_clip_tokenizer()
    expected = [oracle.encoder["<start_of_text>"]] + oracle.encode(prompt) + [oracle.encoder["<end_of_text>"]]
    assert clip_tokenizer()(prompt).input_ids == expected


def test_tokenizer_folder_loads_in_transformers_offline(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    from transformers import CLIPTokenizer

    folder = tokenizer_files(tmp_path / "tokenizer")
    tok = CLIPTokenizer.from_pretrained(str(folder), local_files_only=True)
    ids = tok("a red circle", padding="max_length", max_length=77).input_ids
    assert len(ids) == 77 and ids[:5] == [49406, 320, 736, 7117, 49407] and ids[-1] == 49407
