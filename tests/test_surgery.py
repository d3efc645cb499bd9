"""Targeting, kohya names, the block table and block-wise ranks."""
import pytest
import torch

from lorakit.models.configs import build_text_encoders, build_unet
from lorakit.surgery.blocks import SD_BLOCKS, SDXL_BLOCKS, UNetLayout, block_of_kohya_name, to_ldm_path
from lorakit.surgery.config import NetworkConfig
from lorakit.surgery.network import create_network
from lorakit.surgery.targets import NoTargetError

from conftest import randomize, unet_inputs


@pytest.fixture(scope="module")
def meta_models():
    return {fam: (build_unet(fam, "meta"), build_text_encoders(fam, "meta")) for fam in ("sd1", "sdxl")}


@pytest.mark.parametrize("family,conv_dim,expected", [
    ("sd1", 0, {"te": 72, "unet": 192}), ("sd1", 8, {"te": 72, "unet": 278}),
    ("sdxl", 0, {"te1": 72, "te2": 192, "unet": 722}), ("sdxl", 8, {"te1": 72, "te2": 192, "unet": 788}),
])
def test_full_size_module_counts_match_kohya(meta_models, family, conv_dim, expected):
    unet, tes = meta_models[family]
    net = create_network(unet, tes, NetworkConfig(network_dim=8, conv_dim=conv_dim), apply=False)
    assert net.counts() == expected


def test_sd15_shapes_and_names_match_kohya_examples(meta_models):
    unet, tes = meta_models["sd1"]
    net = create_network(unet, tes, NetworkConfig(network_dim=16, conv_dim=8), apply=False)
    shapes = {n: (tuple(a.down.shape), tuple(a.up.shape)) for n, a in net.adapters.items()}
    assert shapes["lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn2_to_k"] == ((16, 768), (320, 16))
    assert shapes["lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_ff_net_0_proj"] == ((16, 320), (2560, 16))
    assert shapes["lora_unet_down_blocks_0_attentions_0_proj_in"] == ((16, 320, 1, 1), (320, 16, 1, 1))
    assert shapes["lora_unet_down_blocks_0_resnets_0_conv1"] == ((8, 320, 3, 3), (320, 8, 1, 1))
    assert shapes["lora_unet_down_blocks_0_resnets_0_time_emb_proj"] == ((16, 1280), (320, 16))
    assert shapes["lora_unet_down_blocks_1_resnets_0_conv_shortcut"] == ((16, 320, 1, 1), (640, 16, 1, 1))
    assert shapes["lora_unet_up_blocks_0_upsamplers_0_conv"] == ((8, 1280, 3, 3), (1280, 8, 1, 1))
    assert shapes["lora_te_text_model_encoder_layers_11_mlp_fc2"] == ((16, 3072), (768, 16))
    assert not any("conv_in" in n or "conv_out" in n or "time_embedding" in n for n in shapes)


def test_sdxl_uses_sgm_names_like_kohya(meta_models):
    unet, tes = meta_models["sdxl"]
    net = create_network(unet, tes, NetworkConfig(network_dim=16, conv_dim=8), apply=False)
    for name in ["lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q", "lora_unet_input_blocks_1_0_in_layers_2",
                 "lora_unet_input_blocks_1_0_out_layers_3", "lora_unet_input_blocks_1_0_emb_layers_1",
                 "lora_unet_input_blocks_4_0_skip_connection", "lora_unet_input_blocks_3_0_op",
                 "lora_unet_output_blocks_2_2_conv", "lora_unet_output_blocks_5_2_conv",
                 "lora_unet_middle_block_1_proj_out", "lora_unet_middle_block_0_in_layers_2",
                 "lora_te1_text_model_encoder_layers_0_self_attn_q_proj",
                 "lora_te2_text_model_encoder_layers_31_mlp_fc2"]:
        assert name in net.adapters, name
    assert tuple(net.adapters["lora_unet_input_blocks_4_1_transformer_blocks_0_attn2_to_k"].down.shape) == (16, 2048)


# The block table: (diffusers path, SD1 LDM path, SD1 block) checked against kohya's indices
SD1_TABLE = [
    ("conv_in", "input_blocks.0.0", "IN00"),
    ("down_blocks.0.resnets.0.conv1", "input_blocks.1.0.in_layers.2", "IN01"),
    ("down_blocks.0.attentions.1.proj_in", "input_blocks.2.1.proj_in", "IN02"),
    ("down_blocks.0.downsamplers.0.conv", "input_blocks.3.0.op", "IN03"),
    ("down_blocks.1.resnets.0.conv_shortcut", "input_blocks.4.0.skip_connection", "IN04"),
    ("down_blocks.2.downsamplers.0.conv", "input_blocks.9.0.op", "IN09"),
    ("down_blocks.3.resnets.1.time_emb_proj", "input_blocks.11.0.emb_layers.1", "IN11"),
    ("mid_block.resnets.0.conv2", "middle_block.0.out_layers.3", "M00"),
    ("mid_block.attentions.0.proj_out", "middle_block.1.proj_out", "M00"),
    ("mid_block.resnets.1.conv1", "middle_block.2.in_layers.2", "M00"),
    ("up_blocks.0.resnets.0.conv1", "output_blocks.0.0.in_layers.2", "OUT00"),
    ("up_blocks.0.upsamplers.0.conv", "output_blocks.2.1.conv", "OUT02"),
    ("up_blocks.1.attentions.2.proj_in", "output_blocks.5.1.proj_in", "OUT05"),
    ("up_blocks.1.upsamplers.0.conv", "output_blocks.5.2.conv", "OUT05"),
    ("up_blocks.3.resnets.2.conv2", "output_blocks.11.0.out_layers.3", "OUT11"),
]


@pytest.mark.parametrize("path,ldm,block", SD1_TABLE)
def test_sd1_block_table(path, ldm, block):
    layout = UNetLayout("sd1", 2, (False, True, True, True))
    assert to_ldm_path(path, layout) == ldm
    assert block_of_kohya_name(path.replace(".", "_") + "_", "sd1") == block


@pytest.mark.parametrize("sgm_name,block", [
    ("input_blocks_1_0_in_layers_2", "IN01"), ("input_blocks_8_1_proj_in", "IN08"),
    ("middle_block_0_in_layers_2", "M00"), ("middle_block_1_proj_out", "M01"), ("middle_block_2_skip", "M02"),
    ("output_blocks_0_0_in_layers_2", "OUT00"), ("output_blocks_8_0_out_layers_3", "OUT08"),
    ("time_embed_0", "EMB"), ("out_2", "FINAL")])
def test_sdxl_block_table(sgm_name, block):
    assert block_of_kohya_name(sgm_name, "sdxl") == block
    assert SDXL_BLOCKS.index(block) == {"EMB": 0, "FINAL": 22}.get(block, SDXL_BLOCKS.index(block))
    assert len(SDXL_BLOCKS) == 23 and len(SD_BLOCKS) == 25


def test_plain_lora_has_no_conv_adapters(tiny_sd1):
    unet, tes = tiny_sd1
    net = create_network(unet, tes, NetworkConfig(network_dim=4))
    assert not any(a.spec.is_conv and a.spec.kernel != (1, 1) for a in net.adapters.values())
    assert not any("resnets" in n or "samplers" in n for n in net.adapters)


def test_block_dims_give_exactly_the_expected_modules(tiny_sd1):
    unet, tes = tiny_sd1
    dims = [0] * 25
    dims[SD_BLOCKS.index("IN01")] = 4
    dims[SD_BLOCKS.index("OUT05")] = 2
    conv = [0] * 25
    conv[SD_BLOCKS.index("IN03")] = 8
    net = create_network(unet, tes, NetworkConfig(network_dim=4, block_dims=dims, conv_block_dims=conv,
                                                  train_text_encoder=False))
    blocks = {net.info[n].block for n in net.adapters}
    assert blocks == {"IN01", "OUT05", "IN03"}
    assert all(net.adapters[n].rank == 2 for n in net.adapters if net.info[n].block == "OUT05")
    assert [n for n in net.adapters if net.info[n].block == "IN03"] == ["lora_unet_down_blocks_0_downsamplers_0_conv"]
    assert net.adapters["lora_unet_down_blocks_0_downsamplers_0_conv"].rank == 8


def test_block_lr_weight_zero_drops_block_and_sets_group_lrs(tiny_sd1):
    unet, tes = tiny_sd1
    weights = [1.0] * 25
    weights[SD_BLOCKS.index("M00")] = 0.0
    weights[SD_BLOCKS.index("OUT03")] = 0.5
    net = create_network(unet, tes, NetworkConfig(network_dim=4, block_lr_weights=weights))
    assert "M00" not in {i.block for i in net.info.values()}
    groups = {g["name"]: g["lr"] for g in net.param_groups(unet_lr=1e-3, text_encoder_lr=1e-4)}
    assert groups["unet_OUT03"] == pytest.approx(5e-4) and groups["unet_IN01"] == pytest.approx(1e-3)
    assert groups["text_encoder"] == pytest.approx(1e-4)


def test_block_list_of_wrong_length_is_an_error(tiny_sd1):
    unet, tes = tiny_sd1
    with pytest.raises(ValueError, match="block_dims has 12 values; a sd1 U-Net has 25 blocks"):
        create_network(unet, tes, NetworkConfig(block_dims=[4] * 12))


def test_no_target_error_names_what_was_searched():
    model = torch.nn.Sequential(torch.nn.Linear(4, 4))
    with pytest.raises(NoTargetError, match="Transformer2DModel"):
        create_network(None, [model], NetworkConfig())


def test_restore_gives_base_output_and_text_encoder_names_keep_text_model(tiny_sd1):
    unet, tes = tiny_sd1
    x, t, ctx, _ = unet_inputs(unet)
    with torch.no_grad():
        base = unet(x, t, ctx).sample
    net = create_network(unet, tes, NetworkConfig(network_dim=4, conv_dim=4))
    with torch.no_grad():
        assert torch.equal(unet(x, t, ctx).sample, base)  # step 0: up = 0
        randomize(net)
        assert not torch.allclose(unet(x, t, ctx).sample, base)
    net.restore()
    with torch.no_grad():
        assert torch.equal(unet(x, t, ctx).sample, base)
    assert all(n.startswith("lora_te_text_model_encoder_layers_") for n in net.adapters if n.startswith("lora_te"))


def test_multiplier_scales_delta_and_network_merge_matches_bypass(tiny_sd1):
    unet, tes = tiny_sd1
    x, t, ctx, _ = unet_inputs(unet)
    net = create_network(unet, tes, NetworkConfig(network_dim=4, conv_dim=4, forward_mode="bypass"), seed=0)
    randomize(net, std=0.05)
    with torch.no_grad():
        net.set_multiplier(0.5)
        bypass = unet(x, t, ctx).sample
        net.merge()
        merged = unet(x, t, ctx).sample
        net.unmerge()
    torch.testing.assert_close(merged, bypass, atol=2e-5, rtol=1e-4)


def test_sdxl_tiny_end_to_end_forward_and_counts():
    unet, tes = build_unet("tiny-sdxl"), build_text_encoders("tiny-sdxl")
    net = create_network(unet, tes, NetworkConfig(network_dim=4, conv_dim=4))
    x, t, ctx, extra = unet_inputs(unet)
    with torch.no_grad():
        base = unet(x, t, ctx, **extra).sample
        randomize(net)
        assert not torch.allclose(unet(x, t, ctx, **extra).sample, base)
    assert set(net.counts()) == {"unet", "te1", "te2"}
    assert all(n.startswith(("lora_unet_input_blocks", "lora_unet_middle_block", "lora_unet_output_blocks",
                             "lora_te1_", "lora_te2_")) for n in net.adapters)
