"""Network options of kohya's networks.lora and LyCORIS: presets, use_scalar, unbalanced LoKr factors,
rank_dropout_scale, LoRA+, block LR weights (down/mid/up_lr_weight), and starting from a LoRA file
(network_weights, dim_from_weights)."""
import contextlib
import json
import logging
import math
import re

import pytest
import torch

from lorakit.adapters.functional.layer import LayerSpec
from lorakit.adapters.modules.base import Dropouts
from lorakit.adapters.registry import get_algorithm
from lorakit.formats.files import load_network_file, network_tensors, save_network
from lorakit.formats.safetensors_io import LoraFileError, read_safetensors
from lorakit.inspect_file import inspect_file
from lorakit.models.configs import build_text_encoders, build_unet
from lorakit.surgery.blocks import SD_BLOCKS, kohya_block_lr_weights
from lorakit.surgery.config import NetworkConfig
from lorakit.surgery.network import create_network
from lorakit.surgery.presets import PRESETS
from lorakit.surgery.targets import all_named_layers
from lorakit.training.config import build_config
from lorakit.training.state import Progress, ResumeError, load_state, save_state
from lorakit.training.trainer import Trainer

from conftest import randomize, train_config, unet_inputs

# ---- each preset's module set, written from LyCORIS 4.1.3's tables as name patterns (SD1 kohya names) ----
TRANSFORMER = r"lora_unet_.*_attentions_\d+_(proj_in|proj_out|transformer_blocks_\d+_(attn[12]_to_(q|k|v|out_0)" \
              r"|ff_net_0_proj|ff_net_2))$"
UNET_ATTENTION = r"lora_unet_.*_attn[12]_to_(q|k|v|out_0)$"  # kohya's CrossAttention = diffusers' Attention
RESNET_LINEAR = r"lora_unet_.*_resnets_\d+_(time_emb_proj|conv_shortcut)$"
RESNET_KXK = r"lora_unet_.*_resnets_\d+_conv[12]$"
SAMPLERS = r"lora_unet_.*_(down|up)samplers_0_conv$"
CONV_IN_OUT = r"lora_unet_conv_(in|out)$"
TIME_EMBEDDING = r"lora_unet_time_embedding_linear_[12]$"  # by name, or through 4.1.3's TimestepEmbedding class
TE_ATTENTION = r"lora_te_text_model_encoder_layers_\d+_self_attn_(q|k|v|out)_proj$"
TE_MLP = r"lora_te_text_model_encoder_layers_\d+_mlp_fc[12]$"
EXPECTED = {
    "full": (TRANSFORMER, RESNET_LINEAR, RESNET_KXK, SAMPLERS, CONV_IN_OUT, TIME_EMBEDDING, TE_ATTENTION, TE_MLP),
    "full-lin": (TRANSFORMER, RESNET_LINEAR, TIME_EMBEDDING, TE_ATTENTION, TE_MLP),
    "attn-mlp": (TRANSFORMER, TIME_EMBEDDING, TE_ATTENTION, TE_MLP),
    "attn-only": (UNET_ATTENTION, TE_ATTENTION),
    "unet-only": (TRANSFORMER, RESNET_LINEAR, RESNET_KXK, SAMPLERS, CONV_IN_OUT, TIME_EMBEDDING),
    "unet-transformer-only": (TRANSFORMER, TIME_EMBEDDING),
    "unet-convblock-only": (RESNET_LINEAR, RESNET_KXK, SAMPLERS, CONV_IN_OUT),
}
KXK = (RESNET_KXK, SAMPLERS, CONV_IN_OUT)


def tiny():
    return build_unet("tiny-sd1"), build_text_encoders("tiny-sd1")


@pytest.mark.parametrize("preset", sorted(EXPECTED))
def test_preset_selects_exactly_lycoris_table_modules(preset):
    unet, tes = tiny()
    net = create_network(unet, tes, NetworkConfig(lycoris_preset=preset, network_dim=4, network_alpha=2),
                         apply=False)
    universe = set(all_named_layers(unet, tes))
    for pattern in EXPECTED[preset]:
        assert any(re.match(pattern, n) for n in universe), pattern  # each pattern names real layers
    assert set(net.adapters) == {n for n in universe if any(re.match(p, n) for p in EXPECTED[preset])}
    # LyCORIS's conv default: conv_dim unset = network_dim, conv_alpha unset = network_alpha
    assert {(a.rank, float(a.alpha)) for a in net.adapters.values()} == {(4, 2.0)}


def test_preset_conv_dim_and_plain_networks_lora_unchanged():
    unet, tes = tiny()
    net = create_network(unet, tes, NetworkConfig(lycoris_preset="full", network_dim=4, conv_dim=8, conv_alpha=3),
                         apply=False)
    for name, adapter in net.adapters.items():
        kxk = any(re.match(p, name) for p in KXK)
        assert (adapter.rank, float(adapter.alpha)) == ((8, 3.0) if kxk else (4, 1.0)), name
    plain = create_network(unet, tes, NetworkConfig(conv_dim=4), apply=False)  # kohya C3Lier, no preset
    kohya = (TRANSFORMER, RESNET_LINEAR, RESNET_KXK, SAMPLERS, TE_ATTENTION, TE_MLP)
    assert set(plain.adapters) == {n for n in all_named_layers(unet, tes) if any(re.match(p, n) for p in kohya)}


@pytest.fixture(scope="module")
def sdxl_meta():
    return build_unet("sdxl", "meta"), build_text_encoders("sdxl", "meta")


def test_sdxl_presets_select_what_they_select_on_kohyas_sdxl_unet(sdxl_meta):
    """kohya's SDXL U-Net has SGM paths and Sequential time embeddings: conv_in/conv_out/time_embedding names
    and the TimestepEmbedding class find nothing there, so `full` is kohya's C3Lier set."""
    unet, tes = sdxl_meta
    full = create_network(unet, tes, NetworkConfig(lycoris_preset="full", conv_dim=8), apply=False)
    c3lier = create_network(unet, tes, NetworkConfig(conv_dim=8), apply=False)
    assert set(full.adapters) == set(c3lier.adapters)
    attn = create_network(unet, tes, NetworkConfig(lycoris_preset="attn-only"), apply=False)
    assert attn.counts() == {"te1": 48, "te2": 128, "unet": 560}  # 140 attention layers x (q, k, v, out)
    assert all(re.search(r"_attn[12]_to_(q|k|v|out_0)$|_self_attn_(q|k|v|out)_proj$", n) for n in attn.adapters)


def test_lycoris_kohya_without_preset_means_full():
    assert build_config({"network_module": "lycoris.kohya"}).network_config().lycoris_preset == "full"
    assert build_config({"network_module": "networks.lora"}).network_config().lycoris_preset is None
    cfg = build_config({"network_module": "lycoris.kohya", "network_args": ["preset=attn-mlp", "conv_dim=4"]})
    assert cfg.network_config().lycoris_preset == "attn-mlp"
    assert any("conv_dim has no effect with preset attn-mlp" in n for n in cfg.notes)
    cfg = build_config({"network_module": "lycoris.kohya", "conv_alpha": 2})  # full trains convs at network_dim
    assert not any("conv_alpha" in n for n in cfg.notes)
    assert cfg.network_config().network_args()["conv_dim"] == "4"


# ---- LyCORIS itself as the oracle ------------------------------------------------------------------------------
lycoris_kohya = pytest.importorskip("lycoris.kohya")
logging.getLogger("LyCORIS").setLevel(logging.ERROR)
PRESET_ATTRS = ("ENABLE_CONV", "UNET_TARGET_REPLACE_MODULE", "UNET_TARGET_REPLACE_NAME",
                "TEXT_ENCODER_TARGET_REPLACE_MODULE", "TEXT_ENCODER_TARGET_REPLACE_NAME", "MODULE_ALGO_MAP",
                "NAME_ALGO_MAP", "USE_FNMATCH", "TARGET_EXCLUDE_NAME")


@contextlib.contextmanager
def restored_lycoris_globals():
    """LyCORIS presets are class globals: put them back after each use."""
    cls = lycoris_kohya.LycorisNetworkKohya
    saved = {k: getattr(cls, k) for k in PRESET_ATTRS}
    try:
        yield
    finally:
        for k, v in saved.items():
            setattr(cls, k, v)


def te_root(text_encoder):
    root = torch.nn.Module()
    root.text_model = text_encoder  # transformers 5 dropped `text_model.` from paths; LyCORIS names by path
    return root


def lycoris_preset_file(tmp_path, name):
    """LyCORIS's own table for `name`, for a diffusers U-Net: CrossAttention is diffusers' Attention, and
    TimestepEmbedding is left to the time_embedding names where a preset has both (4.1.3 otherwise stops on a
    duplicated lora_unet_time_embedding_linear_1; the same two layers either way)."""
    from lycoris.config import PRESET
    p = PRESET[name]
    names = list(p["unet_target_name"])
    classes = [{"CrossAttention": "Attention"}.get(c, c) for c in p["unet_target_module"]
               if not (c == "TimestepEmbedding" and names)]
    path = tmp_path / f"{name}.toml"
    path.write_text(f"enable_conv = {str(p['enable_conv']).lower()}\nunet_target_module = {json.dumps(classes)}\n"
                    f"unet_target_name = {json.dumps(names)}\n"
                    f"text_encoder_target_module = {json.dumps(p['text_encoder_target_module'])}\n"
                    f"text_encoder_target_name = {json.dumps(p['text_encoder_target_name'])}\n")
    return str(path)


def test_our_tables_are_lycoris_4_1_3s():
    from lycoris.config import PRESET
    for name, ours in PRESETS.items():
        theirs = PRESET[name]
        assert ours.enable_conv == theirs["enable_conv"]
        assert list(ours.unet_classes) == theirs["unet_target_module"]
        assert list(ours.unet_names) == theirs["unet_target_name"]
        assert [c for c in ours.te_classes if c != "CLIPFlashAttention2"] == theirs["text_encoder_target_module"]


@pytest.mark.parametrize("preset", sorted(EXPECTED))
@pytest.mark.parametrize("conv", [{}, {"conv_dim": 8, "conv_alpha": 3}])
def test_lycoris_builds_the_same_modules_ranks_and_alphas(tmp_path, preset, conv):
    unet, (te,) = tiny()
    ours = create_network(unet, [te], NetworkConfig(lycoris_preset=preset, network_dim=4, network_alpha=2, **conv),
                          apply=False)
    with restored_lycoris_globals():
        theirs = lycoris_kohya.create_network(1.0, 4, 2.0, None, te_root(te), unet, algo="locon",
                                              preset=lycoris_preset_file(tmp_path, preset),
                                              **{k: str(v) for k, v in conv.items()})
    got = {m.lora_name: (m.lora_down.weight.shape[0], float(m.alpha))
           for m in theirs.unet_loras + theirs.text_encoder_loras}
    assert got == {n: (a.rank, float(a.alpha)) for n, a in ours.adapters.items()}


def test_preset_file_with_conv_in_and_time_embedding_inspects_and_loads(tmp_path):
    unet, (te,) = tiny()
    x, t, ctx, _ = unet_inputs(unet)
    net = create_network(unet, [te], NetworkConfig(algo="loha", lycoris_preset="full", network_dim=2), seed=0)
    randomize(net, std=0.05)
    with torch.no_grad():
        ours = unet(x, t, ctx).sample
    path = save_network(net, tmp_path / "full.safetensors", dtype=torch.float32)
    net.restore()
    report = {m["name"]: m for m in inspect_file(path)["modules"]}
    assert report["lora_unet_conv_in"]["kind"] == "conv3x3" and report["lora_unet_conv_in"]["block"] == "IN00"
    assert report["lora_unet_conv_out"]["kind"] == "conv3x3"
    assert report["lora_unet_time_embedding_linear_1"]["kind"] == "linear/1x1"
    loaded, info = load_network_file(path, unet, [te])
    assert info.loaded == len(net.adapters) and loaded.info["lora_unet_conv_in"].block == "IN00"
    with torch.no_grad():
        torch.testing.assert_close(unet(x, t, ctx).sample, ours, atol=1e-6, rtol=1e-6)
    loaded.restore()
    with restored_lycoris_globals():  # 4.1.3's default preset stops on time_embedding (see lycoris_preset_file)
        classes = [c for c in lycoris_kohya.LycorisNetworkKohya.UNET_TARGET_REPLACE_MODULE if c != "TimestepEmbedding"]
        lycoris_kohya.LycorisNetworkKohya.apply_preset({"unet_target_module": classes})
        theirs, _ = lycoris_kohya.create_network_from_weights(1.0, str(path), None, te_root(te), unet)
        theirs.apply_to(te_root(te), unet, True, True)
    with torch.no_grad():
        torch.testing.assert_close(unet(x, t, ctx).sample, ours, atol=1e-5, rtol=1e-5)
    theirs.restore()


# ---- use_scalar, unbalanced factorization, rank_dropout_scale ---------------------------------------------------
@pytest.mark.parametrize("algo", ["lora", "loha", "lokr"])
def test_use_scalar_starts_at_base_trains_and_folds_into_files(tmp_path, algo):
    unet, (te,) = tiny()
    x, t, ctx, _ = unet_inputs(unet)
    # 16x16 latents: at 8x8 the mid block's self-attention sees one token, whose softmax passes no gradient to
    # to_q/to_k: exactly 0 on some CPUs (AMD EPYC), rounding noise on others, so their scalars might not move
    x = torch.randn(1, 4, 16, 16, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        base = unet(x, t, ctx).sample
    net = create_network(unet, [te], NetworkConfig(algo=algo, use_scalar=True, network_dim=4, conv_dim=4), seed=0)
    adapters = list(net.adapters.values())
    zero_without = {"lora": ("up",), "loha": ("w2a",), "lokr": ("w2", "w2b")}[algo]  # the usual zero factor
    assert all(float(a.scalar.detach()) == 0.0 for a in adapters)
    assert all(getattr(a, k).abs().sum() > 0 for a in adapters for k in zero_without if k in a.param_names)
    with torch.no_grad():
        assert torch.equal(unet(x, t, ctx).sample, base)  # step 0 = base model, exactly
    opt = torch.optim.SGD(net.param_groups(default_lr=0.5), lr=0.5)
    for _ in range(2):
        opt.zero_grad()
        (unet(x, t, ctx).sample - 1.0).pow(2).mean().backward()
        opt.step()
    unet_adapters = [a for n, a in net.adapters.items() if n.startswith("lora_unet_")]  # the TE is not run here
    assert all(float(a.scalar.detach()) != 0.0 for a in unet_adapters)
    with torch.no_grad():
        trained = unet(x, t, ctx).sample
    assert not torch.allclose(trained, base)
    path = save_network(net, tmp_path / "s.safetensors", dtype=torch.float32)
    tensors, _ = read_safetensors(path)
    assert not any("scalar" in k for k in tensors)
    net.restore()
    load_network_file(path, unet, [te])
    with torch.no_grad():
        torch.testing.assert_close(unet(x, t, ctx).sample, trained, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("layer", [torch.nn.Linear(32, 96), torch.nn.Conv2d(32, 96, 3, padding=1)])
def test_unbalanced_factorization_matches_lycoris_lokr(layer):
    from lycoris.modules.lokr import LokrModule

    spec = LayerSpec.of(layer)
    opts = get_algorithm("lokr").options(factor=-1, unbalanced_factorization=True)
    ours = get_algorithm("lokr").module.create(spec, 2, 1.0, opts, generator=torch.Generator().manual_seed(0))
    theirs = LokrModule("m", layer, 1.0, 2, 1.0, unbalanced_factorization=True)
    theirs_params = {k: v for k, v in theirs.state_dict().items() if k != "alpha"}
    names = get_algorithm("lokr").file_keys
    assert {names[k]: tuple(v.shape) for k, v in ours.weights().items()} == \
        {k: tuple(v.shape) for k, v in theirs_params.items()}
    assert tuple(ours.w1.shape)[0] == 12  # 96 = 8 x 12: the larger output factor in W1
    with torch.no_grad():
        for k, v in ours.weights().items():
            getattr(ours, k).copy_(torch.randn(v.shape))
        theirs.load_state_dict({names[k]: v for k, v in ours.weights().items()} | {"alpha": theirs.alpha},
                               strict=False)
        x = torch.randn(2, 32, 6, 6) if spec.is_conv else torch.randn(2, 32)
        theirs.apply_to()
        expected = layer(x)
        theirs.restore()
        ours.attach(layer)
        torch.testing.assert_close(layer(x), expected, atol=1e-4, rtol=1e-4)  # fp32, sums of ~300 terms
        ours.detach()


def test_rank_dropout_scale_divides_the_mask_by_its_mean():
    spec = LayerSpec.of(torch.nn.Linear(16, 64))
    adapter = get_algorithm("loha").module.create(spec, 2, 1.0, dropouts=Dropouts(rank_dropout=0.5,
                                                                                  rank_dropout_scale=True))
    randomize(torch.nn.ModuleList([adapter]))
    adapter.train()
    torch.manual_seed(3)
    got = adapter.training_delta_weight().detach().double()
    torch.manual_seed(3)
    keep = (torch.rand(64) >= 0.5).double()
    expected = adapter.delta_weight().detach().double() * (keep / keep.mean())[:, None]
    assert 0 < keep.mean() < 1 and keep.mean() != 0.5  # the two rescales differ for this draw
    torch.testing.assert_close(got, expected, rtol=1e-6, atol=1e-7)
    assert Dropouts(rank_dropout=0.25).rescaled(keep).max() == 1 / 0.75  # default: kohya's 1/(1-p)


# ---- LoRA+ and block learning rates ---------------------------------------------------------------------------------
def test_loraplus_puts_up_matrices_in_groups_at_ratio_times_lr():
    unet, tes = tiny()
    cfg = NetworkConfig(network_dim=4, loraplus_lr_ratio=16.0, loraplus_text_encoder_lr_ratio=4.0)
    net = create_network(unet, tes, cfg)
    groups = {g["name"]: g for g in net.param_groups(unet_lr=1e-3, text_encoder_lr=3e-4)}
    assert set(groups) == {"unet", "unet_plus", "text_encoder", "text_encoder_plus"}
    assert (groups["unet"]["lr"], groups["unet_plus"]["lr"]) == (1e-3, 1e-3 * 16.0)
    assert (groups["text_encoder"]["lr"], groups["text_encoder_plus"]["lr"]) == (3e-4, 3e-4 * 4.0)
    for side in ("unet", "text_encoder"):
        adapters = [a for n, a in net.adapters.items() if (net.info[n].component == "unet") == (side == "unet")]
        assert {id(p) for p in groups[f"{side}_plus"]["params"]} == {id(a.up) for a in adapters}
        assert {id(p) for p in groups[side]["params"]} == {id(a.down) for a in adapters}
    zero = create_network(unet, tes, NetworkConfig(loraplus_unet_lr_ratio=0.0, loraplus_lr_ratio=2.0),
                          apply=False).param_groups(unet_lr=1e-3)
    assert {g["name"]: g["lr"] for g in zero}["unet_plus"] == 2e-3  # kohya: a 0 side ratio falls back
    loha = create_network(unet, tes, NetworkConfig(algo="loha", loraplus_lr_ratio=16.0), apply=False)
    assert {g["name"] for g in loha.param_groups()} == {"unet", "text_encoder"}  # no lora_up: as kohya/LyCORIS


def kohya_curve(name, n=12):
    """kohya's get_block_lr_weight curves, written out."""
    ramp = [i / (n - 1) for i in range(n)]
    return {"sine": [math.sin(math.pi * r / 2) for r in ramp], "linear": ramp}[name]


def test_down_mid_up_lr_weights_give_kohyas_block_numbers():
    sine = kohya_curve("sine")
    assert kohya_block_lr_weights("sine", None, None, 0.0, "sd1") == sine + [1.0] + [1.0] * 12
    assert kohya_block_lr_weights(None, None, "cosine+.25", 0.0, "sd1")[13:] == [v + 0.25 for v in sine[::-1]]
    assert kohya_block_lr_weights("reverse_linear", None, "zeros", 0.0, "sd1") == \
        kohya_curve("linear")[::-1] + [1.0] + [0.0] * 12
    # lists are padded with 1 (or cut); a side given drops values <= threshold to 0; SDXL: 1 + 9 + 3 + 9 + 1
    got = kohya_block_lr_weights([0.2, 0.5, 0.9], [0.3], "linear", 0.4, "sd1")
    assert got == [0.0, 0.5, 0.9] + [1.0] * 9 + [0.0] + [v if v > 0.4 else 0.0 for v in kohya_curve("linear")]
    sdxl = kohya_block_lr_weights(None, [0.5, 0.0, 2.0], [1.0] * 12, 0.0, "sdxl")
    assert sdxl == [1.0] * 10 + [0.5, 0.0, 2.0] + [1.0] * 10 and len(sdxl) == 23
    assert kohya_block_lr_weights(None, None, None, 0.5, "sd1") is None


def test_block_lr_weights_drop_blocks_and_scale_group_lrs():
    cfg = build_config({"network_dim": 4, "network_args": [
        "down_lr_weight=1,1,0.5", "mid_lr_weight=0.2", "up_lr_weight=sine", "block_lr_zero_threshold=0.3"]})
    unet, tes = tiny()
    net = create_network(unet, tes, cfg.network_config())
    weights = dict(zip(SD_BLOCKS, kohya_block_lr_weights([1, 1, 0.5], [0.2], "sine", 0.3, "sd1")))
    blocks = {i.block for i in net.info.values() if i.component == "unet"}
    dropped = {b for b, w in weights.items() if w == 0}
    assert dropped == {"M00", "OUT00", "OUT01", "OUT02"}  # mid 0.2 and sin(π/2 · i/11) <= 0.3 for i <= 2
    assert {"IN01", "IN02", "OUT03", "OUT11"} <= blocks and not blocks & dropped
    groups = {g["name"]: g["lr"] for g in net.param_groups(unet_lr=1e-3)}
    assert (groups["unet_IN01"], groups["unet_IN02"]) == (1e-3, 1e-3 * 0.5)
    assert groups["unet_OUT03"] == 1e-3 * math.sin(math.pi * (3 / 11) / 2)
    args = cfg.network.network_args()
    assert (args["down_lr_weight"], args["up_lr_weight"], args["block_lr_zero_threshold"]) == \
        ("1.0,1.0,0.5", "sine", "0.3")


def test_every_option_is_recorded_and_resume_refuses_a_change(tmp_path):
    cfg = NetworkConfig(algo="lokr", lycoris_preset="attn-mlp", use_scalar=True, unbalanced_factorization=True,
                        rank_dropout_scale=True, loraplus_lr_ratio=8.0, loraplus_unet_lr_ratio=4.0,
                        down_lr_weight="cosine", mid_lr_weight=[0.5])
    args = cfg.network_args()
    assert {k: args[k] for k in ("preset", "use_scalar", "unbalanced_factorization", "rank_dropout_scale",
                                 "loraplus_lr_ratio", "loraplus_unet_lr_ratio", "down_lr_weight",
                                 "mid_lr_weight")} == {
        "preset": "attn-mlp", "use_scalar": "True", "unbalanced_factorization": "True",
        "rank_dropout_scale": "True", "loraplus_lr_ratio": "8.0", "loraplus_unet_lr_ratio": "4.0",
        "down_lr_weight": "cosine", "mid_lr_weight": "0.5"}
    net = torch.nn.Linear(2, 2)
    opt = torch.optim.SGD(net.parameters(), lr=0.1)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)
    base = build_config({}).settings()
    save_state(tmp_path, net, opt, sched, Progress(), base)
    for key, value in [("lycoris_preset", "full"), ("use_scalar", True), ("unbalanced_factorization", True),
                       ("loraplus_lr_ratio", 2.0), ("down_lr_weight", "sine"), ("dim_from_weights", True),
                       ("network_module", "lycoris.kohya"), ("use_tucker", True)]:
        with pytest.raises(ResumeError, match=key):
            load_state(tmp_path, net, opt, sched, base | {key: value})


# ---- starting weights ---------------------------------------------------------------------------------------------
def test_network_weights_start_from_the_files_exact_weights(tiny_folder, images, tmp_path):
    first = Trainer(train_config(tiny_folder, images, tmp_path / "a", max_train_steps=2, learning_rate=1e-2,
                                 save_precision="float", network_alpha=3)).run().files[-1]
    start, _ = read_safetensors(first)
    cfg = train_config(tiny_folder, images, tmp_path / "b", max_train_steps=1, save_precision="float",
                       network_weights=str(first))
    trainer = Trainer(cfg)
    now = network_tensors(trainer.network)
    assert now.keys() == start.keys() and all(torch.equal(now[k], start[k]) for k in start)  # alpha 3 too
    after, _ = read_safetensors(trainer.run().files[-1])
    moved = [k for k in start if not torch.equal(after[k], start[k])]
    assert moved and all(k.endswith(".weight") for k in moved)
    with pytest.raises(LoraFileError, match="dim_from_weights"):
        Trainer(train_config(tiny_folder, images, tmp_path / "c", network_dim=8, network_weights=str(first)))


def test_dim_from_weights_takes_mixed_ranks_from_the_file(tiny_folder, images, tmp_path):
    from lorakit.models.checkpoint import load_base_model

    pipe = load_base_model(str(tiny_folder)).pipeline
    unet, tes = pipe.unet, [pipe.text_encoder]
    dims = [0] * 25
    dims[SD_BLOCKS.index("IN01")], dims[SD_BLOCKS.index("OUT09")] = 2, 6
    source = create_network(unet, tes, NetworkConfig(block_dims=dims, conv_block_dims=[3] * 25, network_dim=5,
                                                     block_alphas=[1.5] * 25), seed=1)
    randomize(source, std=0.02)
    path = save_network(source, tmp_path / "mixed.safetensors", dtype=torch.float32)
    start, _ = read_safetensors(path)
    cfg = train_config(tiny_folder, images, tmp_path, network_dim=8, max_train_steps=1, network_weights=str(path),
                       dim_from_weights=True, save_precision="float")
    trainer = Trainer(cfg)
    ranks = {n: a.rank for n, a in trainer.network.adapters.items()}
    assert ranks == {n: a.rank for n, a in source.adapters.items()} and set(ranks.values()) == {2, 3, 5, 6}
    now = network_tensors(trainer.network)
    assert all(torch.equal(now[k], start[k]) for k in start)
    after, _ = read_safetensors(trainer.run().files[-1])
    assert after.keys() == start.keys() and any(not torch.equal(after[k], start[k]) for k in start)
