import random

import pytest

from lorakit.training.captions import SamplePrompt, parse_prompt_line, process_caption, read_prompt_file
from lorakit.training.dataset import Subset


def test_shuffle_keeps_the_first_tokens_and_the_tag_set():
    rng = random.Random(0)
    caption = "sks dog, red collar, grass, sunny, outdoors"
    outs = {process_caption(caption, Subset("x", shuffle_caption=True, keep_tokens=1), rng) for _ in range(30)}
    assert len(outs) > 5
    for out in outs:
        tags = out.split(", ")
        assert tags[0] == "sks dog" and sorted(tags) == sorted(caption.split(", "))


def test_caption_dropout_rate():
    rng = random.Random(0)
    dropped = sum(process_caption("a b", Subset("x", caption_dropout_rate=0.25), rng) == "" for _ in range(4000))
    assert 900 < dropped < 1100


def test_kohya_prompt_syntax():
    p = parse_prompt_line("masterpiece, 1girl --n low quality, blurry --W 512 --h 768 --d 1 --l 7.5 --s 28")
    assert p == SamplePrompt("masterpiece, 1girl", "low quality, blurry", 512, 768, 1, 28, 7.5)
    assert parse_prompt_line("# comment") is None and parse_prompt_line("   ") is None
    assert parse_prompt_line("x --s 5000").steps == 1000
    with pytest.raises(ValueError, match="--q is not supported"):
        parse_prompt_line("x --q 3")
    with pytest.raises(ValueError, match="needs a whole number"):
        parse_prompt_line("x --w wide")
    prompts = read_prompt_file("a red circle --d 3\n\n# skip\nblue square --n red", SamplePrompt("", width=64, height=64))
    assert [(p.prompt, p.seed, p.width) for p in prompts] == [("a red circle", 3, 64), ("blue square", None, 64)]
