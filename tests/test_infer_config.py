"""Architecture inferred from a single file's tensor shapes: stock and tiny SD1 (also non-stock widths and
inpainting), SD2 and SDXL models come back with their true configs, load through `load_base_model(path)` with
the outputs of the models they were saved from, and a non-stock SD1 file trains a LoRA."""
import pytest
import torch

from lorakit.formats.safetensors_io import write_safetensors
from lorakit.models.checkpoint import CheckpointError, load_base_model, save_single_file
from lorakit.models.configs import (CLIP_L, FAMILIES, OPENCLIP_BIGG, OPENCLIP_H, SD15_UNET, SD_VAE, SDXL_UNET,
                                    SDXL_VAE)
from lorakit.models.infer_config import architecture_metadata, hints_from_metadata, infer_configs, tensor_shapes
from lorakit.models.ldm_layout import to_original_layout
from lorakit.models.tiny import TINY_TEXT, TINY_UNET, TINY_VAE

# Tiny models whose non-shape values follow the family conventions (SD1: 8 heads; SD2/SDXL: 64-channel heads
# narrowed to divide the widths; CLIP: the same; 32 norm groups), so shapes alone must give their configs.
SD1_SMALL = dict(SD15_UNET, block_out_channels=(32, 64, 64, 64), cross_attention_dim=64)
SMALL_VAE = dict(SD_VAE, block_out_channels=(32, 64, 64, 64), layers_per_block=1)
CLIP_64 = dict(CLIP_L, hidden_size=64, intermediate_size=128, num_hidden_layers=3, num_attention_heads=1,
               projection_dim=64)
CONVENTIONAL = {
    "sd1-widths": ("sd1", SD1_SMALL, [CLIP_64], SMALL_VAE),
    "sd1-inpaint": ("sd1", dict(SD1_SMALL, in_channels=9), [CLIP_64], SMALL_VAE),
    "sd2": ("sd2", dict(SD1_SMALL, attention_head_dim=(1, 2, 2, 2), use_linear_projection=True),
            [dict(OPENCLIP_H, hidden_size=64, intermediate_size=128, num_hidden_layers=3, num_attention_heads=1,
                  projection_dim=64)], SMALL_VAE),
    "sdxl": ("sdxl", dict(SDXL_UNET, block_out_channels=(32, 64, 64), transformer_layers_per_block=(1, 2, 3),
                          cross_attention_dim=64 + 96, attention_head_dim=(1, 2, 2), addition_time_embed_dim=8,
                          projection_class_embeddings_input_dim=80 + 6 * 8),
             [dict(CLIP_64, num_hidden_layers=2),
              dict(OPENCLIP_BIGG, hidden_size=96, intermediate_size=192, num_hidden_layers=3, num_attention_heads=3,
                   projection_dim=80)], dict(SDXL_VAE, block_out_channels=(32, 64, 64, 64), layers_per_block=1)),
}
# lorakit's own tiny models do not follow the conventions (4 heads at width 32, 8 norm groups, ...): the file's
# metadata must carry those values
RECORDED = {f"tiny-{f}": (f, *FAMILIES[f"tiny-{f}"], TINY_VAE) for f in ("sd1", "sd2", "sdxl")}
RECORDED["embedded"] = ("sd1", TINY_UNET, [TINY_TEXT], TINY_VAE)
IGNORED = {"transformers_version", "architectures", "_name_or_path", "dtype", "torch_dtype", "_diffusers_version",
           "_class_name", "_use_default_values"}


@pytest.fixture(autouse=True)
def offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("TRANSFORMERS_OFFLINE", "1")


def build(family, unet_cfg, text_cfgs, vae_cfg, device="cpu", seed=0):
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    torch.manual_seed(seed)
    with torch.device(device):
        unet, vae = UNet2DConditionModel(**unet_cfg).eval(), AutoencoderKL(**vae_cfg).eval()
        encoders = [(CLIPTextModelWithProjection if i == 1 else CLIPTextModel)(CLIPTextConfig(**cfg)).eval()
                    for i, cfg in enumerate(text_cfgs)]
    return unet, vae, encoders


def normalized(config) -> dict:
    def norm(value):
        return tuple(norm(v) for v in value) if isinstance(value, (list, tuple)) else value

    return {k: norm(v) for k, v in dict(config).items() if k not in IGNORED}


def assert_configs_equal(inferred, unet, vae, encoders):
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig

    with torch.device("meta"):  # build from the inferred dicts so defaults fill in the same way on both sides
        assert normalized(UNet2DConditionModel(**inferred.unet).config) == normalized(unet.config)
        assert normalized(AutoencoderKL(**inferred.vae).config) == normalized(vae.config)
    assert len(inferred.text) == len(encoders)
    for cfg, encoder in zip(inferred.text, encoders):
        assert normalized(CLIPTextConfig(**cfg).to_dict()) == normalized(encoder.config.to_dict())


@pytest.mark.parametrize("family", ["sd1", "sd2", "sdxl"])
def test_full_size_stock_architectures_from_shapes_alone(family):
    """The real SD1.5 / SD2 / SDXL shapes (meta device: nothing allocated) give back the stock configs."""
    unet_cfg, text_cfgs = FAMILIES[family]
    parts = build(family, unet_cfg, text_cfgs, SDXL_VAE if family == "sdxl" else SD_VAE, device="meta")
    shapes = tensor_shapes(to_original_layout(family, *parts[:2], parts[2]))
    inferred = infer_configs(shapes, family)
    assert_configs_equal(inferred, *parts)
    assert "unet.attention_head_dim" in " ".join(inferred.fallbacks) and not inferred.from_metadata
    if family == "sd2":  # real SD2 files keep OpenCLIP's 24th layer, which SD2 never uses: diffusers drops it
        extra = {k.replace("resblocks.22.", "resblocks.23."): v for k, v in shapes.items() if "resblocks.22." in k}
        assert infer_configs({**shapes, **extra}, family).text[0]["num_hidden_layers"] == 23


@pytest.mark.parametrize("case", sorted(CONVENTIONAL))
def test_tiny_architectures_from_shapes_alone(case):
    family, *configs = CONVENTIONAL[case]
    unet, vae, encoders = build(family, *configs, device="meta")
    inferred = infer_configs(tensor_shapes(to_original_layout(family, unet, vae, encoders)), family)
    assert_configs_equal(inferred, unet, vae, encoders)
    assert inferred.unet["in_channels"] == (9 if case == "sd1-inpaint" else 4)
    note = inferred.note()
    assert "\n" not in note and f"widths {unet.config.block_out_channels}" in note and "conventions used" in note


@pytest.mark.parametrize("case", sorted(RECORDED))
def test_lorakit_files_record_what_shapes_cannot_show(case):
    family, unet_cfg, text_cfgs, vae_cfg = RECORDED[case]
    unet, vae, encoders = build(family, unet_cfg, text_cfgs, vae_cfg, device="meta")
    shapes = tensor_shapes(to_original_layout(family, unet, vae, encoders))
    guessed = infer_configs(shapes, family)  # shapes right, heads / groups by convention, and that is said
    assert guessed.unet["block_out_channels"] == unet.config.block_out_channels
    assert guessed.text[0]["num_attention_heads"] != encoders[0].config.num_attention_heads
    assert "text_encoder.num_attention_heads=" in guessed.note()
    metadata = architecture_metadata(unet.config, vae.config, [e.config.to_dict() for e in encoders])
    inferred = infer_configs(shapes, family, hints_from_metadata(metadata))
    assert_configs_equal(inferred, unet, vae, encoders)
    assert "unet.attention_head_dim" in inferred.from_metadata and not inferred.fallbacks
    assert "from the file's lorakit metadata" in inferred.note()


def test_shapes_that_diffusers_cannot_express_are_refused():
    family, *configs = CONVENTIONAL["sd1-widths"]
    shapes = tensor_shapes(to_original_layout(family, *build(family, *configs, device="meta")))
    lopsided = {k: v for k, v in shapes.items() if not k.startswith("model.diffusion_model.output_blocks.3.1.")}
    with pytest.raises(ValueError, match="do not mirror"):
        infer_configs(lopsided, family)
    assert hints_from_metadata({"lorakit_architecture": "{not json"}) == {}
    # metadata that does not fit the shapes (edited, or another tool's) is ignored: the conventions apply
    misfit = {"unet": {"attention_head_dim": 7, "norm_num_groups": "x"},
              "text_encoder": {"num_attention_heads": 5, "hidden_act": 3}}
    inferred = infer_configs(shapes, family, misfit)
    assert (inferred.unet["attention_head_dim"], inferred.unet["norm_num_groups"]) == (8, 32)
    assert (inferred.text[0]["num_attention_heads"], inferred.text[0]["hidden_act"]) == (1, "quick_gelu")
    assert not inferred.from_metadata


def probe(unet, vae, encoders):
    """U-Net, VAE round trip and text-encoder outputs on fixed inputs."""
    g = torch.Generator().manual_seed(0)
    cfg = unet.config
    x, t = torch.randn(1, cfg.in_channels, 8, 8, generator=g), torch.tensor([10])
    ctx = torch.randn(1, 5, cfg.cross_attention_dim, generator=g)
    extra = {}
    if cfg.get("addition_embed_type") == "text_time":
        pooled = cfg.projection_class_embeddings_input_dim - 6 * cfg.addition_time_embed_dim
        extra = {"added_cond_kwargs": {"text_embeds": torch.randn(1, pooled, generator=g),
                                        "time_ids": torch.randn(1, 6, generator=g)}}
    image = torch.randn(1, 3, 64, 64, generator=g)
    ids = torch.randint(0, 1000, (1, 7), generator=g)
    with torch.no_grad():
        return ([unet(x, t, ctx, **extra).sample, vae.decode(vae.encode(image).latent_dist.mean).sample]
                + [encoder(ids)[0] for encoder in encoders])


@pytest.mark.parametrize("case", ["sd1-widths", "sd1-inpaint", "sd2", "sdxl", "tiny-sd2", "embedded"])
def test_single_file_loads_with_its_own_architecture(tmp_path, case):
    """No config_dir: the architecture comes from the file. Conventional models are written without lorakit's
    metadata (as another tool would write them); lorakit's own tiny models through save_single_file."""
    family, *configs = CONVENTIONAL.get(case) or RECORDED[case]
    unet, vae, encoders = build(family, *configs)
    path = tmp_path / "model.safetensors"
    if case in CONVENTIONAL:
        state = to_original_layout(family, unet, vae, encoders)
        write_safetensors(path, {k: v.contiguous() for k, v in state.items()}, {})
    else:
        save_single_file(path, family, unet, vae, encoders)
    base = load_base_model(path)
    assert base.family == family and base.notes[-1].startswith("architecture from tensor shapes")
    loaded = base.pipeline
    pairs = [(loaded.unet.config, unet.config), (loaded.vae.config, vae.config)]
    pairs += [(theirs.config.to_dict(), ours.config.to_dict()) for theirs, ours in zip(base.text_encoders, encoders)]
    assert len(base.text_encoders) == len(encoders) and all(normalized(a) == normalized(b) for a, b in pairs)
    # equal weights, equal architecture: outputs agree to float32 noise (CPU kernels may differ by layout)
    for theirs, ours in zip(probe(loaded.unet, loaded.vae, base.text_encoders), probe(unet, vae, encoders)):
        torch.testing.assert_close(theirs, ours, atol=1e-5, rtol=1e-5)


def test_unexpressible_file_fails_naming_the_way_out(tmp_path):
    family, *configs = CONVENTIONAL["sd1-widths"]
    state = to_original_layout(family, *build(family, *configs))
    state = {k: v.contiguous() for k, v in state.items() if ".middle_block.1." not in k}
    write_safetensors(tmp_path / "m.safetensors", state, {})
    with pytest.raises(CheckpointError, match="config_dir"):
        load_base_model(tmp_path / "m.safetensors")


def test_lora_trains_on_a_non_stock_single_file(tmp_path):
    from lorakit.formats.files import load_network_file
    from lorakit.models.styles import write_style_dataset
    from lorakit.training.config import build_config
    from lorakit.training.trainer import train

    family, *configs = CONVENTIONAL["sd1-widths"]
    unet, vae, encoders = build(family, *configs)
    path = tmp_path / "base.safetensors"
    state = to_original_layout(family, unet, vae, encoders)
    write_safetensors(path, {k: v.contiguous() for k, v in state.items()}, {})
    data = write_style_dataset(tmp_path / "data", count=2, repeats=1)
    config = build_config(dict(pretrained_model_name_or_path=str(path), train_data_dir=str(data), resolution=64,
                               train_batch_size=1, max_train_steps=2, network_dim=4, network_alpha=2,
                               learning_rate=1e-3, output_dir=str(tmp_path / "out"), output_name="small", seed=1))
    result = train(config)
    assert result.steps == 2 and len(result.losses) == 2 and all(torch.isfinite(torch.tensor(result.losses)))
    base = load_base_model(path)
    network, report = load_network_file(result.files[-1], base.pipeline.unet, base.text_encoders)
    assert report.loaded > 0 and not report.unmatched
    assert any(m.up.abs().sum() > 0 for m in network.adapters.values())  # up starts at zero: training moved it
