"""The GUI's API layer (no gradio): field specs from the schema, conv visibility, the estimate against a real
network, settings <-> TOML through load_config, root folders, and the background run manager."""
import json
import os
import re
import time

import pytest
import torch

from lorakit.formats.files import save_network
from lorakit.gui.estimate import base_architecture, estimate
from lorakit.gui.fields import (CONV_FIELDS, NOT_IN_FORM, conv_fields_apply, default_values, form_fields,
                                preset_values)
from lorakit.gui.paths import PathNotAllowed, Roots
from lorakit.gui.runs import RunManager
from lorakit.gui.settings import config_from_form, load_settings, save_settings, to_toml
from lorakit.models.checkpoint import load_base_model
from lorakit.models.styles import write_style_dataset
from lorakit.surgery.network import create_network
from lorakit.training.config import FIELDS, ConfigError, default_of, load_config

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def tiny_arch():
    return base_architecture("")


@pytest.fixture(scope="module")
def tiny_base():
    return load_base_model(None)


def style_values(tmp_path, **changes):
    values = default_values()
    values.update(preset_values("style")[0])
    values.update(train_data_dir=str(write_style_dataset(tmp_path / "data", count=2, repeats=1)), resolution=64,
                  output_dir=str(tmp_path / "out"), output_name="gui")
    values.update(changes)
    return values


def test_every_field_comes_from_the_schema_with_its_help_range_and_choices():
    specs = {s.name: s for s in form_fields()}
    assert set(specs) == set(FIELDS) - set(NOT_IN_FORM)
    for name, spec in specs.items():
        meta = FIELDS[name].metadata
        assert spec.help == meta["help"] and (spec.lo, spec.hi) == (meta["lo"], meta["hi"])
        assert [value for _, value in spec.choices] == list(meta["choices"] or [])
        assert spec.default == default_of(name)
    assert specs["network_dim"].label == "Network Rank (Dimension)" and specs["network_dim"].kind == "int"
    assert specs["conv_alpha"].label == "Convolution Alpha" and specs["conv_alpha"].optional
    assert dict(specs["algo"].choices) == {"LoRA": "lora", "LoCon": "locon", "LoHa": "loha", "LoKr": "lokr"}
    assert specs["block_dims"].kind == "list" and specs["sample_prompts"].kind == "prompts"
    assert specs["network_dim"].group == "Network" and specs["noise_offset"].group == "Advanced"


def test_conv_fields_apply_only_where_conv_layers_are_adapted(tiny_arch):
    assert tiny_arch.conv_layers == 50  # SD1.5 topology: 22 resnets x 2 3x3 convs + 3 down- and 3 upsamplers
    for algo in ("locon", "loha", "lokr"):
        assert conv_fields_apply(algo, tiny_arch.conv_layers)
        assert not conv_fields_apply(algo, tiny_arch.conv_layers, trains_unet=False)  # text encoder only
        assert not conv_fields_apply(algo, 0)  # a model without kxk convs
    assert not conv_fields_apply("lora", tiny_arch.conv_layers)  # LoRA = attention/linear only, as in kohya_ss


def test_hidden_conv_values_are_neither_written_nor_trained(tmp_path, tiny_arch):
    values = style_values(tmp_path, algo="lora", conv_block_dims="4, " * 24 + "4")
    assert values["conv_dim"] == 32  # the style preset's value, still in the form while hidden
    path = save_settings(values, tmp_path / "attn.toml", tiny_arch.conv_layers)
    text = path.read_text()
    assert not any(f"{name} =" in text for name in CONV_FIELDS)
    config = load_config(path)
    assert config.conv_dim == 0 and config.conv_alpha is None and config.conv_block_dims is None
    assert estimate(config, tiny_arch).blocks and all(r["conv"] == 0 for r in estimate(config, tiny_arch).blocks)


def test_preset_fills_fields_and_says_why():
    values, why = preset_values("style")
    assert values == {"network_dim": 8, "network_alpha": 8.0, "conv_dim": 32, "conv_alpha": 16.0, "algo": "locon"}
    assert "texture" in why
    values, _ = preset_values("character")
    assert values["algo"] == "lora" and values["conv_dim"] == 0 and values["conv_alpha"] is None


@pytest.mark.parametrize("algo,extra", [("lora", {}), ("locon", {}), ("loha", {}), ("lokr", {}),
                                        ("locon", {"block_dims": "0, " * 6 + "8, " * 18 + "8"})])
def test_estimate_equals_the_network_actually_built_and_saved(tmp_path, tiny_arch, tiny_base, algo, extra):
    values = style_values(tmp_path, algo=algo, save_precision="fp16", **extra)
    config = config_from_form(values, tiny_arch.conv_layers)
    guess = estimate(config, tiny_arch)
    network = create_network(tiny_base.pipeline.unet, tiny_base.text_encoders, config.network_config())
    try:
        path = save_network(network, tmp_path / "real.safetensors", dtype=torch.float16, title=config.output_name)
        assert guess.parameters == network.trainable_parameters()
        assert guess.modules == network.counts()
        assert guess.file_bytes == os.path.getsize(path)  # exact: same tensors, same header layout
        per_block = {}
        for name, adapter in network.adapters.items():
            block = network.info[name].block or network.info[name].component.upper()
            kind = "attention" if adapter.spec.kind in ("linear", "conv1x1") else "conv"
            per_block.setdefault(block, {"attention": 0, "conv": 0})[kind] += 1
        assert {r["block"]: {"attention": r["attention"], "conv": r["conv"]} for r in guess.blocks} == per_block
    finally:
        network.restore()
    if algo == "lora":
        assert all(r["conv"] == 0 for r in guess.blocks)
    if "block_dims" in extra:  # IN00-IN05 dropped from attention; their convs keep conv_dim
        assert all(r["attention"] == 0 for r in guess.blocks if r["block"] < "IN06" and r["block"].startswith("IN"))


def test_saved_toml_is_what_the_cli_loads(tmp_path, tiny_arch):
    values = style_values(tmp_path, learning_rate=3e-4, max_train_epochs=2.0, sample_every_n_epochs=1,
                          sample_prompts='a red "circle", sepia --s 2\nä blue square\\ --s 2',
                          block_lr_weights="1," * 24 + "0.5", output_name='we"ird \\ name ✓')
    path = save_settings(values, tmp_path / "run.toml", tiny_arch.conv_layers, preset="style")
    from_cli = load_config(path)
    assert from_cli == config_from_form(values, tiny_arch.conv_layers, tmp_path / "run-prompts.txt")
    assert from_cli.conv_dim == 32 and from_cli.algo == "locon" and from_cli.max_train_epochs == 2
    assert (tmp_path / "run-prompts.txt").read_text().startswith('a red "circle"')
    assert "preset = " not in path.read_text() and "preset 'style'" in path.read_text()  # a comment, not a key
    reloaded = load_settings(path)
    assert reloaded["sample_prompts"].strip() == values["sample_prompts"].strip()
    assert config_from_form(reloaded, tiny_arch.conv_layers, tmp_path / "run-prompts.txt") == from_cli


def test_invalid_values_name_the_field_and_write_nothing(tmp_path, tiny_arch):
    values = style_values(tmp_path, network_dim=0)
    with pytest.raises(ConfigError, match=r"network_dim = 0 is outside \[1, 1000000\]"):
        save_settings(values, tmp_path / "bad.toml", tiny_arch.conv_layers)
    assert not (tmp_path / "bad.toml").exists()
    assert to_toml({"a": [1, 2.5], "b": True, "c": "x\ny"}) == 'a = [1, 2.5]\nb = true\nc = "x\\ny"\n'


def test_paths_outside_the_roots_are_refused(tmp_path, tiny_arch):
    inside, outside = tmp_path / "root", tmp_path / "elsewhere"
    inside.mkdir(), outside.mkdir()
    roots = Roots.of([inside])
    assert roots.check("sub/x.toml") == inside / "sub" / "x.toml"  # relative = under the first root
    for bad in (outside / "x.toml", inside / ".." / "elsewhere" / "x.toml", "/etc/passwd"):
        with pytest.raises(PathNotAllowed, match="outside the allowed folders"):
            roots.check(bad)
    (inside / "link").symlink_to(outside)
    with pytest.raises(PathNotAllowed):
        roots.check(inside / "link" / "x.toml")
    values = style_values(inside, output_dir=str(outside / "out"))
    with pytest.raises(PathNotAllowed, match="Output folder"):
        save_settings(values, inside / "run.toml", tiny_arch.conv_layers, roots)
    assert not (inside / "run.toml").exists()
    with pytest.raises(PathNotAllowed):
        RunManager(roots).start(values, tiny_arch.conv_layers)


def wait_for(condition, timeout=120.0, every=0.2):
    end = time.time() + timeout
    while time.time() < end:
        if condition():
            return True
        time.sleep(every)
    return False


def test_resume_applies_only_to_a_state_its_run_did_not_finish(tmp_path):
    manager = RunManager(Roots.of([tmp_path]))
    out = tmp_path / "out"
    (out / "gui-state").mkdir(parents=True)
    history = out / "gui-history.json"
    assert not manager.can_resume(str(out), "gui")  # no state.pt
    (out / "gui-state" / "state.pt").write_bytes(b"saved")
    assert manager.can_resume(str(out), "gui")  # a state and no history (killed before the first flush)
    history.write_text(json.dumps({"total_steps": 8, "steps": [{"step": 5, "loss": 0.1}]}))
    assert manager.can_resume(str(out), "gui")  # stopped at step 5 of 8
    history.write_text(json.dumps({"total_steps": 8, "steps": [{"step": 8, "loss": 0.1}]}))
    assert not manager.can_resume(str(out), "gui")  # the resumed run finished; the old state is stale
    assert not manager.can_resume("/elsewhere", "gui") and not manager.can_resume(str(out), "other")
    with pytest.raises(RuntimeError, match="nothing to resume"):
        manager.start(style_values(tmp_path, output_dir=str(out)), 0, resume=True)


def test_run_manager_starts_stops_and_resumes_a_real_training(tmp_path, tiny_arch):
    values = style_values(tmp_path, max_train_steps=400, train_batch_size=1, network_dim=4, network_alpha=2.0,
                          conv_dim=4, conv_alpha=2.0, sample_prompts="a red circle, sepia --s 2 --d 1")
    manager = RunManager(Roots.of([tmp_path]))
    os.environ["OMP_NUM_THREADS"] = "1"
    files = manager.start(values, tiny_arch.conv_layers)
    assert load_config(files.toml) == config_from_form(values, tiny_arch.conv_layers, files.toml.with_name(
        "gui-prompts.txt"))
    with pytest.raises(RuntimeError, match="already going"):
        manager.start(values, tiny_arch.conv_layers)
    assert wait_for(lambda: manager.status().step > 0 or not manager.running()), manager.status().log_tail
    assert manager.status().state == "running" and manager.status().total == 400
    assert manager.stop() == 130, manager.status().log_tail
    stopped = manager.status()
    assert stopped.state == "interrupted" and stopped.can_resume and "--resume" in stopped.log_tail
    done = json.loads(files.history.read_text())["steps"][-1]["step"]
    assert done < 400 and (files.state_dir / "state.pt").is_file()

    values["max_train_steps"] = done + 2  # resume checks the network's shape settings, not the length
    manager.start(values, tiny_arch.conv_layers, resume=True)
    assert manager.wait(180) == 0, manager.status().log_tail
    final = manager.status()
    assert final.state == "finished" and final.step == done + 2
    assert not final.can_resume and not manager.can_resume(values["output_dir"], "gui")  # finished: Resume off
    assert [s for s, _ in final.losses] == list(range(1, done + 3))  # the history continues, no gap, no repeat
    assert final.samples and re.fullmatch(r"gui_e\d{6}_00_1\.png", final.samples[-1].name)  # the final sample
    assert (files.output_dir / "gui.safetensors").is_file()


def test_gui_binds_loopback_and_refuses_an_open_network_port_without_a_login(capsys, monkeypatch):
    from lorakit.cli import build_parser, main
    from lorakit.gui.server import UnsafeServerError, check_exposure, parse_auth

    args = build_parser().parse_args(["gui"])
    assert args.host == "127.0.0.1" and args.root is None
    monkeypatch.delenv("LORAKIT_GUI_AUTH", raising=False)
    assert main(["gui", "--host", "0.0.0.0"]) == 2  # refused before any server starts
    assert "--auth" in capsys.readouterr().err
    for host in ("127.0.0.1", "localhost", "::1", "127.0.0.2"):
        check_exposure(host, None, False)
    check_exposure("0.0.0.0", ("u", "p"), False)
    check_exposure("192.0.2.1", None, allow_unauthenticated_remote=True)
    with pytest.raises(UnsafeServerError):
        check_exposure("my-host.example", None, False)
    assert parse_auth("user:pa:ss") == ("user", "pa:ss") and parse_auth(None) is None
    with pytest.raises(UnsafeServerError, match="user:password"):
        parse_auth("nopassword")


def test_tools_and_dataset_check_call_the_cli_functions_inside_the_roots(tmp_path, tiny_arch, tiny_base):
    from lorakit.gui import actions
    from lorakit.gui.fields import block_preset_values

    roots = Roots.of([tmp_path])
    values = style_values(tmp_path, save_precision="fp16",
                          **block_preset_values("output blocks only", tiny_arch.block_names, 8, 32))
    config = config_from_form(values, tiny_arch.conv_layers)
    assert estimate(config, tiny_arch).blocks[0]["block"] == "OUT00"  # input and middle blocks got dim 0
    network = create_network(tiny_base.pipeline.unet, tiny_base.text_encoders, config.network_config())
    try:
        lora = save_network(network, tmp_path / "style.safetensors", dtype=torch.float16)
    finally:
        network.restore()
    assert "2 usable" in actions.dataset_report(roots, values["train_data_dir"], ".txt", 64)
    native = actions.dataset_report(roots, values["train_data_dir"], ".txt", "")  # empty box: the model's size
    assert "buckets     64x64" in native and "512" not in native
    assert "conv3x3 rank 32" in actions.inspect_report(roots, str(lora), modules=True)
    message = actions.block_weights(roots, str(lora), str(tmp_path / "outs.safetensors"), "OUTS")
    assert "removed" in message and (tmp_path / "outs.safetensors").is_file()
    with pytest.raises(PathNotAllowed):
        actions.block_weights(roots, str(lora), "/tmp/elsewhere.safetensors", "OUTS")
    with pytest.raises(PathNotAllowed):
        actions.inspect_report(roots, "/etc/hostname")


def test_dora_toggle_sits_beside_the_algorithm_and_a_start_with_it_trains_dora(tmp_path, tiny_arch):
    from lorakit.formats.safetensors_io import read_safetensors

    specs = form_fields()
    names = [s.name for s in specs]
    dora = specs[names.index("dora_wd")]
    assert (dora.label, dora.kind, dora.group, dora.default) == ("DoRA", "bool", "Network", False)
    assert names.index("dora_wd") == names.index("algo") + 1  # beside LoRA/LoCon/LoHa/LoKr
    values = style_values(tmp_path, max_train_steps=2, train_batch_size=1, network_dim=4, network_alpha=2.0,
                          dora_wd=True)
    manager = RunManager(Roots.of([tmp_path]))
    os.environ["OMP_NUM_THREADS"] = "1"
    files = manager.start(values, tiny_arch.conv_layers)
    assert load_config(files.toml).dora_wd is True
    assert manager.wait(300) == 0, manager.status().log_tail
    tensors, meta = read_safetensors(files.output_dir / "gui.safetensors")
    modules = {k.split(".")[0] for k in tensors}
    assert modules and {k.split(".")[0] for k in tensors if k.endswith(".dora_scale")} == modules
    assert json.loads(meta["ss_network_args"])["dora_wd"] == "True"
