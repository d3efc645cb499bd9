"""kohya's caption keys (train_util.BaseDataset.process_caption) and text encoding (max_token_length chunks,
weighted_captions), against hand-computed expectations and on the tiny model."""
import random

import pytest
import torch

from lorakit.models.tokenizer import clip_tokenizer, tokenizer_files
from lorakit.training import text_encoding as te
from lorakit.training.captions import CaptionClock, process_caption, warmup_steps
from lorakit.training.config import build_config
from lorakit.training.dataset import Subset, from_toml, subset_defaults
from lorakit.training.prepare import prepare_dataset
from lorakit.training.trainer import Trainer

from conftest import train_config

BOS, EOS, A = 49406, 49407, 320  # "a" is one token


def rules(**kw) -> Subset:
    return Subset("unused", **kw)


def untouched_rng(rng: random.Random) -> bool:
    return rng.getstate() == random.Random(5).getstate()


# ---- captions -----------------------------------------------------------------------------------
def test_keep_tokens_separator_fixes_the_head_and_a_second_marker_fixes_the_tail():
    r = rules(shuffle_caption=True, keep_tokens_separator="|||", keep_tokens=5)  # the marker wins over keep_tokens
    caption = "sks, dog ||| red, blue, green, grass ||| best quality, tail"
    outs = {process_caption(caption, r, random.Random(seed)) for seed in range(40)}
    assert len(outs) > 10
    for out in outs:
        tags = out.split(", ")
        assert tags[:2] == ["sks", "dog"] and tags[-2:] == ["best quality", "tail"]
        assert sorted(tags[2:-2]) == ["blue", "grass", "green", "red"]
    assert process_caption(caption, r, random.Random(0)) == process_caption(caption, r, random.Random(0))
    # as kohya: without shuffling, token warmup or tag dropout the caption is used as written, marker included
    rng = random.Random(5)
    assert process_caption(caption, rules(keep_tokens_separator="|||"), rng) == caption and untouched_rng(rng)


def test_keep_tokens_separator_and_join():
    # no marker in the caption: keep_tokens applies; tags are cut at caption_separator and joined with ", "
    r = rules(shuffle_caption=True, keep_tokens=2, caption_separator=";", keep_tokens_separator="|||")
    for seed in range(20):
        tags = process_caption("a b;c; d ;e;f", r, random.Random(seed)).split(", ")
        assert tags[:2] == ["a b", "c"] and sorted(tags[2:]) == ["d", "e", "f"]


def test_prefix_and_suffix_join_with_a_space_before_the_tags_are_cut():
    assert process_caption("a, b", rules(caption_prefix="pre", caption_suffix="post"), random.Random(0)) == \
        "pre a, b post"
    r = rules(caption_prefix="sks,", caption_suffix=", style", shuffle_caption=True, keep_tokens=1)
    for seed in range(10):
        tags = process_caption("x, y", r, random.Random(seed)).split(", ")
        assert tags[0] == "sks" and sorted(tags[1:]) == ["style", "x", "y"]


def test_tag_dropout_rate_0_and_1():
    rng = random.Random(5)
    caption = "a,b ,  c"
    assert process_caption(caption, rules(caption_tag_dropout_rate=0.0), rng) == caption and untouched_rng(rng)
    r1 = rules(caption_tag_dropout_rate=1.0, keep_tokens_separator="|||")
    assert process_caption("sks, dog ||| red, blue ||| tail", r1, random.Random(0)) == "sks, dog, tail"
    assert process_caption("red, blue", rules(caption_tag_dropout_rate=1.0), random.Random(0)) == ""
    # the fixed tags are never dropped, the others at the rate
    r = rules(caption_tag_dropout_rate=0.25, keep_tokens=1)
    kept = [process_caption("k, a, b, c, d", r, random.Random(s)).split(", ") for s in range(1000)]
    assert all(tags[0] == "k" for tags in kept)
    assert 0.72 < sum(len(tags) - 1 for tags in kept) / 4000 < 0.78


def test_caption_dropout_every_n_epochs_and_rate():
    r = rules(caption_dropout_every_n_epochs=3)
    dropped = [e for e in range(1, 10) if process_caption("a cat", r, random.Random(0), CaptionClock(epoch=e)) == ""]
    assert dropped == [3, 6, 9]
    rng = random.Random(5)
    process_caption("a cat", r, rng, CaptionClock(epoch=1))
    assert untouched_rng(rng)  # rate 0 draws nothing
    r = rules(caption_dropout_rate=0.25)
    assert 900 < sum(process_caption("a b", r, random.Random(s)) == "" for s in range(4000)) < 1100


@pytest.mark.parametrize("num_tags,minimum,steps,counts", [
    (10, 2, 8, [2, 3, 4, 5, 6, 7, 8, 9, 10, 10]),  # floor(s*8/8)+2, all tags from step 8
    (7, 1, 4, [1, 2, 4, 5, 7, 7]),  # floor(s*6/4)+1: 1, 2.5->2, 4, 5.5->5
])
def test_token_warmup_counts(num_tags, minimum, steps, counts):
    tags = [f"t{i}" for i in range(num_tags)]
    r = rules(keep_tokens=1, token_warmup_min=minimum, token_warmup_step=steps)
    for step, count in enumerate(counts):
        out = process_caption(", ".join(["k"] + tags), r, random.Random(0), CaptionClock(step=step))
        assert out.split(", ") == ["k"] + tags[:count]  # no shuffling: the first tags, in order


def test_token_warmup_step_below_1_is_a_fraction_of_the_run():
    assert warmup_steps(0.5, 16) == 8 and warmup_steps(0.3, 10) == 3 and warmup_steps(12, 16) == 12
    r = rules(token_warmup_min=2, token_warmup_step=0.5)
    caption = ", ".join(f"t{i}" for i in range(10))
    assert process_caption(caption, r, random.Random(0), CaptionClock(step=3, max_steps=16)) == "t0, t1, t2, t3, t4"
    assert process_caption(caption, r, random.Random(0), CaptionClock(step=8, max_steps=16)) == caption


def test_config_values_reach_folder_subsets_and_are_the_last_toml_fallback(images, tmp_path):
    config = build_config(dict(train_data_dir=str(images), shuffle_caption=True, keep_tokens_separator="|||",
                               caption_prefix="pre", caption_tag_dropout_rate=0.1, token_warmup_step=0.5,
                               caption_dropout_every_n_epochs=2, caption_separator=";"))
    specs, _ = prepare_dataset(config)
    (subset,) = specs[0].subsets
    assert (subset.shuffle_caption, subset.keep_tokens_separator, subset.caption_prefix,
            subset.caption_tag_dropout_rate, subset.token_warmup_step, subset.caption_dropout_every_n_epochs,
            subset.caption_separator) == (True, "|||", "pre", 0.1, 0.5, 2, ";")
    toml = tmp_path / "ds.toml"
    toml.write_text(f'[general]\ncaption_prefix = "general"\ncaption_suffix = "gsuf"\n'
                    f'[[datasets]]\ncaption_suffix = "dsuf"\n'
                    f'[[datasets.subsets]]\nimage_dir = "{images}"\ntoken_warmup_min = 3\n'
                    f'[[datasets.subsets]]\nimage_dir = "{images}"\ncaption_prefix = "own"\n')
    a, b = from_toml(toml, subset_defaults(config))[0].subsets
    assert (a.caption_prefix, a.caption_suffix, a.token_warmup_min, a.shuffle_caption) == ("general", "dsuf", 3, True)
    assert (b.caption_prefix, b.token_warmup_min, b.caption_tag_dropout_rate) == ("own", 1, 0.1)


# ---- text encoding ------------------------------------------------------------------------------
def test_parse_weights_as_kohya_documents_it():
    assert te.parse_weights("normal text") == [("normal text", 1.0)]
    assert te.parse_weights("an (important) word") == [("an ", 1.0), ("important", 1.1), (" word", 1.0)]
    assert te.parse_weights("(unbalanced") == [("unbalanced", 1.1)]
    assert te.parse_weights(r"\(literal\]") == [("(literal]", 1.0)]
    assert te.parse_weights("(unnecessary)(parens)") == [("unnecessaryparens", 1.1)]
    got = te.parse_weights("a (((house:1.3)) [on] a (hill:0.5), sun, (((sky))).")
    want = [("a ", 1.0), ("house", 1.3 * 1.1 * 1.1), (" ", 1.1), ("on", 1.0), (" a ", 1.1), ("hill", 0.55),
            (", sun, ", 1.1), ("sky", 1.1 ** 4), (".", 1.1)]
    assert [t for t, _ in got] == [t for t, _ in want]
    assert [w for _, w in got] == pytest.approx([w for _, w in want], rel=1e-12)


def v2_tokenizer():
    """SD2 / SDXL-second-encoder convention: padding with "!" (id 0), not EOS."""
    from transformers import CLIPTokenizer

    tok = CLIPTokenizer.from_pretrained(str(tokenizer_files()), pad_token="!", local_files_only=True)
    assert tok.pad_token_id == 0
    return tok


@pytest.mark.parametrize("v2", [False, True])
def test_chunks_wrap_75_tokens_in_bos_and_eos_and_the_first_chunk_is_the_77_token_encoding(v2):
    tok = v2_tokenizer() if v2 else clip_tokenizer()
    pad = 0 if v2 else EOS
    long = " ".join(["a"] * 80)  # 80 tokens
    ids, _ = te.tokenize(tok, ["a a a", long], 150, weighted=False)
    assert ids.shape == (2, 2, 77)
    plain = tok(["a a a", long], padding="max_length", max_length=77, truncation=True, return_tensors="pt").input_ids
    assert torch.equal(ids[:, 0], plain)  # short and truncated: chunk 0 is exactly the 77-token sequence
    assert ids[0, 1].tolist() == [BOS, EOS] + [pad] * 75  # an empty chunk reads BOS EOS (then padding)
    assert ids[1, 0].tolist() == [BOS] + [A] * 75 + [EOS]  # a cut chunk ends with EOS (v2: kohya's fix)
    assert ids[1, 1].tolist() == [BOS] + [A] * 5 + [EOS] + [pad] * 70
    ids225, _ = te.tokenize(tok, [long], 225, weighted=False)
    assert ids225.shape == (1, 3, 77) and ids225[0, 2].tolist() == [BOS, EOS] + [pad] * 75


def test_merge_chunks_keeps_bos_the_bodies_and_the_final_token():
    hidden = torch.arange(2 * 3 * 77, dtype=torch.float64).reshape(6, 77, 1)  # B=2, n=3
    merged = te.merge_chunks(hidden, 3)
    assert merged.shape == (2, 227, 1)
    rows = hidden.reshape(2, 3, 77)
    for b in range(2):
        want = [rows[b, 0, 0]] + [rows[b, k, 1 + j] for k in range(3) for j in range(75)] + [rows[b, 2, 76]]
        assert merged[b, :, 0].tolist() == [float(v) for v in want]
    assert torch.equal(te.merge_chunks(hidden[:2], 1), hidden[:2])  # one chunk: unchanged


def todays_context(encoder, tok, captions, clip_skip):
    """The 77-token encoding lorakit used before max_token_length existed."""
    ids = tok(captions, padding="max_length", max_length=77, truncation=True, return_tensors="pt").input_ids
    if clip_skip <= 1:
        return encoder(ids).last_hidden_state
    final_norm = getattr(encoder, "final_layer_norm", None) or encoder.text_model.final_layer_norm
    return final_norm(encoder(ids, output_hidden_states=True).hidden_states[-clip_skip])


CAPTIONS = ["a red circle on a blue background", "sks, " + ", ".join(f"tag{i}" for i in range(40))]


@pytest.mark.parametrize("clip_skip", [1, 2])
def test_sd_context_lengths_and_the_75_token_case(tiny_sd1, clip_skip):
    (encoder,) = tiny_sd1[1]
    tok = clip_tokenizer()
    with torch.no_grad():
        today = todays_context(encoder, tok, CAPTIONS, clip_skip)
        for length in (None, 75):
            assert torch.equal(te.encode_text(encoder, tok, CAPTIONS, clip_skip, length), today)
        for length in (150, 225):
            context = te.encode_text(encoder, tok, CAPTIONS, clip_skip, length)
            assert context.shape == (2, length + 2, today.shape[-1])
            # chunk 0 is the 77-token sequence and CLIP attends causally: its BOS and body match exactly
            torch.testing.assert_close(context[:, :76], today[:, :76], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("length", [None, 150])
def test_weighted_captions(tiny_sd1, length):
    (encoder,) = tiny_sd1[1]
    tok = clip_tokenizer()
    with torch.no_grad():
        for clip_skip in (1, 2):
            plain = te.encode_text(encoder, tok, CAPTIONS, clip_skip, length)
            assert torch.equal(te.encode_text(encoder, tok, CAPTIONS, clip_skip, length, weighted=True), plain)
        plain = te.encode_text(encoder, tok, ["a red circle"], 1, length)
        weighted = te.encode_text(encoder, tok, ["a (red:1.5) circle"], 1, length, weighted=True)
        # tokens: BOS a red circle EOS ...; only "red" (position 2) is scaled, and no mean is restored
        torch.testing.assert_close(weighted[:, 2], 1.5 * plain[:, 2], rtol=1e-6, atol=0)
        others = [p for p in range(plain.shape[1]) if p != 2]
        assert torch.equal(weighted[:, others], plain[:, others])


def test_sdxl_context_pooled_and_the_75_token_case():
    from lorakit.models.configs import build_text_encoders

    encoders = build_text_encoders("tiny-sdxl")
    toks = [clip_tokenizer(), clip_tokenizer()]
    with torch.no_grad():
        outs = [e(tok(CAPTIONS, padding="max_length", max_length=77, truncation=True,
                      return_tensors="pt").input_ids, output_hidden_states=True) for e, tok in zip(encoders, toks)]
        today = torch.cat([o.hidden_states[-2] for o in outs], dim=-1)
        context, extra = te.encode_text_sdxl(encoders, toks, CAPTIONS, (64, 64))
        assert torch.equal(context, today)
        torch.testing.assert_close(extra["text_embeds"], outs[1].text_embeds, rtol=1e-6, atol=1e-7)
        long_context, long_extra = te.encode_text_sdxl(encoders, toks, CAPTIONS, (64, 64), 225, weighted=True)
        assert long_context.shape == (2, 227, 32 + 48)
        torch.testing.assert_close(long_context[:, :76], today[:, :76], rtol=1e-5, atol=1e-6)
        # the pooled output comes from the first chunk, the 77-token sequence
        torch.testing.assert_close(long_extra["text_embeds"], outs[1].text_embeds, rtol=1e-5, atol=1e-6)
        assert long_extra["time_ids"].tolist() == [[64, 64, 0, 0, 64, 64]] * 2


# ---- a run --------------------------------------------------------------------------------------
def test_training_with_kohya_caption_keys_and_150_tokens(tiny_folder, images, tmp_path):
    for txt in (images / "3_red shape").glob("*.txt"):
        txt.write_text("sks ||| " + txt.read_text().replace(" on a ", ", on a ").replace(" in ", ", in "))
    config = train_config(tiny_folder, images, tmp_path, max_train_steps=2, shuffle_caption=True,
                          keep_tokens_separator="|||", caption_tag_dropout_rate=0.3, max_token_length=150,
                          text_encoder_lr=0)  # frozen text encoder: contexts are cached, so they can be read
    trainer = Trainer(config)
    result = trainer.run()
    assert result.steps == 2 and len(result.losses) == 2 and all(torch.isfinite(torch.tensor(result.losses)))
    assert trainer._text_cache
    for (caption, _), (hidden, _) in trainer._text_cache.items():
        assert caption.startswith("sks") and "|||" not in caption
        assert hidden.shape == (152, trainer.text_encoder.config.hidden_size)
