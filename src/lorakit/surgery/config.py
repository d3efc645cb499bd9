"""NetworkConfig: the typed description of what to adapt and with which rank/alpha.

Names follow kohya (network_dim, network_alpha, conv_dim, conv_alpha, block_dims, ...). Validation that
needs only the config happens here; checks that need the model (block-list lengths) happen when the
network is built, before any parameter is allocated.
"""
from __future__ import annotations

from dataclasses import dataclass

from lorakit.adapters.modules.base import FORWARD_MODES, Dropouts
from lorakit.adapters.registry import get_algorithm
from lorakit.options import opt
from lorakit.surgery.blocks import kohya_block_lr_weights, lr_weight_preset
from lorakit.surgery.presets import PRESETS, Preset

LYCORIS_PRESETS = tuple(PRESETS)
NETWORK_ALGOS = ("lora", "locon", "loha", "lokr")


@dataclass
class NetworkConfig:
    """What to adapt, with which rank and alpha. Field names are the TOML keys (kohya's); `arg` names the
    key inside `network_args` where kohya/LyCORIS spell it differently."""
    algo: str = opt("lora", "lora (= locon), loha or lokr", choices=NETWORK_ALGOS)
    network_dim: int = opt(4, "rank of Linear and 1x1-conv adapters (attention, MLP); kohya's default 4. LoKr: a "
                              "dim at least half the layer's factor size means full matrices, as in LyCORIS",
                           lo=1, hi=1_000_000)
    network_alpha: float = opt(1.0, "strength: scale = network_alpha / network_dim; 0 = network_dim (scale 1)",
                               lo=0.0, hi=1e6)
    conv_dim: int = opt(0, "rank of kxk-conv adapters (LoCon); 0 = none, plain LoRA", lo=0, hi=1_000_000)
    conv_alpha: float | None = opt(None, "conv strength: conv_alpha / conv_dim; unset = 1.0 as in kohya",
                                   lo=0.0, hi=1e6)
    block_dims: list[int] | None = opt(None, "per-block network_dim (25 SD1/2, 23 SDXL)", lo=0, hi=4096)
    block_alphas: list[float] | None = opt(None, "per-block network_alpha", lo=0.0, hi=1e6)
    conv_block_dims: list[int] | None = opt(None, "per-block conv_dim", lo=0, hi=4096)
    conv_block_alphas: list[float] | None = opt(None, "per-block conv_alpha", lo=0.0, hi=1e6)
    block_lr_weights: list[float] | None = opt(None, "per-block learning-rate multipliers; 0 leaves the block "
                                                     "without adapters", lo=0.0, hi=1e6)
    # kohya also takes a named curve here; values <= block_lr_zero_threshold become 0 (any float is valid)
    down_lr_weight: list[float] | str | None = opt(
        None, "kohya: LR multipliers of the input blocks (12 SD1/2: IN00-IN11, 9 SDXL), or sine, cosine, linear, "
              "reverse_linear, zeros (+offset, e.g. cosine+.25); short lists are padded with 1")
    mid_lr_weight: list[float] | None = opt(None, "kohya: LR multiplier of the middle block (SDXL: 3 values)")
    up_lr_weight: list[float] | str | None = opt(
        None, "kohya: LR multipliers of the output blocks (12 SD1/2: OUT00-OUT11, 9 SDXL), or a named curve "
              "as down_lr_weight")
    block_lr_zero_threshold: float = opt(0.0, "kohya: a block whose LR multiplier is at or below this gets no "
                                              "adapters", lo=0.0, hi=1e6)
    dropout: float = opt(0.0, "dropout on rank activations (LoRA/LoCon); kohya's network_dropout", lo=0.0, hi=0.99)
    rank_dropout: float = opt(0.0, "per-sample rank mask probability", lo=0.0, hi=0.99)
    module_dropout: float = opt(0.0, "probability of skipping a module for a step", lo=0.0, hi=0.99)
    rank_dropout_scale: bool = opt(False, "LyCORIS: rescale the rank_dropout keep-mask by 1/its mean (default: "
                                          "kohya's 1/(1-rank_dropout))")
    lycoris_preset: str | None = opt(None, "LyCORIS targeting preset (network_args `preset`); lycoris.kohya "
                                           "without one uses full", choices=LYCORIS_PRESETS, arg="preset")
    use_tucker: bool = opt(False, "Tucker core for kxk convs (lora_mid / hada_t / lokr_t2); LyCORIS use_cp too")
    use_scalar: bool = opt(False, "LyCORIS: a trained scalar multiplies the adapter (starts at 0, every factor "
                                  "random); files hold it folded in")
    factor: int = opt(-1, "LoKr: cap on the small Kronecker factor (-1 balanced)", lo=-1, hi=4096)
    decompose_both: bool = opt(False, "LoKr: factorise W1 too")
    full_matrix: bool = opt(False, "LoKr: full W2 (scale 1, alpha ignored)")
    unbalanced_factorization: bool = opt(False, "LoKr: swap the two factors (the larger one in W1)")
    train_norm: bool = opt(False, "LyCORIS: also train the weight and bias of the GroupNorm/LayerNorm layers inside "
                                  "the targeted modules (w_norm/b_norm in files, zero at step 0)")
    dora_wd: bool = opt(False, "DoRA (LyCORIS dora_wd; old name weight_decompose): W' = m·(W+ΔW)/‖W+ΔW‖ with a "
                               "trained magnitude m, on LoRA/LoCon, LoHa and LoKr")
    wd_on_output: bool = opt(False, "DoRA norm per output row (LyCORIS >= 3.2's default). Off: per input column, "
                                    "the layout A1111, ComfyUI and Forge all compute exactly")
    dora_detach_norm: bool = opt(False, "DoRA: ‖W+ΔW‖ is a constant in backward, as in the DoRA paper (sec. 4.3), "
                                        "PEFT and OneTrainer; less compute on large layers. Off: "
                                        "LyCORIS's full gradient. Files are the same either way")
    loraplus_lr_ratio: float | None = opt(None, "LoRA+: LoRA/LoCon up matrices train at this multiple of the LR",
                                          lo=0.0, hi=1e6)
    loraplus_unet_lr_ratio: float | None = opt(None, "LoRA+ ratio for the U-Net only", lo=0.0, hi=1e6)
    loraplus_text_encoder_lr_ratio: float | None = opt(None, "LoRA+ ratio for the text encoder(s) only", lo=0.0,
                                                       hi=1e6)
    train_unet: bool = opt(True, "adapt the U-Net (TOML: network_train_text_encoder_only)")
    train_text_encoder: bool = opt(True, "adapt the text encoder(s) (TOML: network_train_unet_only)")
    forward_mode: str = opt("auto", "auto (cheaper exact path per layer), bypass, merged", choices=FORWARD_MODES)

    def __post_init__(self):
        problems = self.problems()
        if problems:
            raise ValueError("; ".join(problems))

    def problems(self) -> list[str]:
        """Every cross-field problem at once (each one line, naming the keys and the fix)."""
        out = []
        try:
            algo = get_algorithm(self.algo).name
        except ValueError as e:
            return [str(e)]
        if self.algo.lower() not in NETWORK_ALGOS:  # registered for files only: train_norm adds norm deltas
            return [f"algo {self.algo!r}: choose one of {list(NETWORK_ALGOS)} (norm deltas come with train_norm)"]
        for name in ("dropout", "rank_dropout", "module_dropout"):
            if not 0.0 <= getattr(self, name) < 1.0:
                out.append(f"{name} must be in [0, 1), got {getattr(self, name)}")
        if self.dropout > 0 and algo != "lora":
            out.append(f"network_dropout is for LoRA/LoCon rank activations; {algo} takes rank_dropout/"
                       "module_dropout")
        if self.conv_block_alphas is not None and not self.conv_block_dims and not self.conv_dim:
            out.append("conv_block_alphas given but no conv layers are adapted (set conv_dim or conv_block_dims)")
        if algo != "lokr" and (self.factor != -1 or self.decompose_both or self.full_matrix
                               or self.unbalanced_factorization):
            out.append("factor / decompose_both / full_matrix / unbalanced_factorization apply to algo 'lokr' only")
        if not self.train_unet and not self.train_text_encoder:
            out.append("network_train_unet_only and network_train_text_encoder_only are both set: nothing would "
                       "train; keep one of them")
        for name in ("block_dims", "conv_block_dims"):
            values = getattr(self, name)
            if values is not None and any(int(v) < 0 for v in values):
                out.append(f"{name} must be >= 0")
        out.extend(self._lr_weight_problems())
        if self.dora_wd and self.dropout > 0:
            out.append("network_dropout acts on LoRA rank activations, which DoRA's forward (one weight W') does not "
                       "form (LyCORIS ignores it); use rank_dropout/module_dropout with dora_wd")
        return out

    def _lr_weight_problems(self) -> list[str]:
        out = []
        for name in ("down_lr_weight", "up_lr_weight"):
            value = getattr(self, name)
            if isinstance(value, str):
                try:
                    lr_weight_preset(value, 12)
                except ValueError as e:
                    out.append(f"{name} = {value!r}: {e}")
        given = [n for n in ("down_lr_weight", "mid_lr_weight", "up_lr_weight") if getattr(self, n) is not None]
        if given and self.block_lr_weights is not None:
            out.append(f"block_lr_weights and {', '.join(given)} both set per-block learning rates; keep one")
        return out

    def notes(self) -> list[str]:
        """Settings that are valid but have no effect, said once."""
        out = []
        preset = self.preset
        if preset is not None and not preset.enable_conv and (self.conv_dim or self.conv_block_dims):
            out.append(f"conv_dim has no effect with preset {preset.name}: LyCORIS adapts no kxk conv in it")
        elif self.conv_alpha is not None and not self.with_conv:
            out.append(f"conv_alpha = {self.conv_alpha:g} has no effect at conv_dim 0 (no conv layer is adapted)")
        if self.with_conv and not self.train_unet:
            out.append("conv_dim has no effect: only the text encoder trains, and it has no conv layers")
        if self.block_lr_zero_threshold and all(getattr(self, n) is None for n in
                                                ("down_lr_weight", "mid_lr_weight", "up_lr_weight")):
            out.append("block_lr_zero_threshold has no effect without down_lr_weight / mid_lr_weight / up_lr_weight")
        if self.train_norm and (self.dropout or self.rank_dropout):
            out.append("dropout / rank_dropout do not act on train_norm's norm deltas (they have no rank); "
                       "module_dropout does")
        for name, what in (("wd_on_output", "the DoRA norm's axis"), ("dora_detach_norm", "the DoRA norm's gradient")):
            if getattr(self, name) and not self.dora_wd:
                out.append(f"{name} has no effect without dora_wd (it sets {what})")
        plus = [n for n in ("loraplus_lr_ratio", "loraplus_unet_lr_ratio", "loraplus_text_encoder_lr_ratio")
                if getattr(self, n) is not None]
        if plus and get_algorithm(self.algo).name != "lora":
            out.append(f"{plus[0]} has no effect on {self.algo}: LoRA+ (kohya and LyCORIS) speeds up lora_up only")
        return out

    def dropouts(self) -> Dropouts:
        return Dropouts(self.dropout, self.rank_dropout, self.module_dropout, self.rank_dropout_scale)

    @property
    def preset(self) -> Preset | None:
        return PRESETS[self.lycoris_preset] if self.lycoris_preset else None

    @property
    def with_conv(self) -> bool:
        """Whether kxk convs get adapters (LyCORIS presets decide it themselves)."""
        if self.preset is not None:
            return self.preset.enable_conv
        return bool(self.conv_dim) or bool(self.conv_block_dims and any(self.conv_block_dims))

    def conv_rank(self) -> tuple[int, float | None]:
        """(dim, alpha) of kxk convs outside block lists. kohya: conv_alpha unset = 1.0. LyCORIS presets: conv_dim
        unset (0) = network_dim and conv_alpha unset = network_alpha, so `full` with no conv_dim trains convs
        (its conv-free twin is `full-lin`, which selects exactly the same layers minus the kxk convs)."""
        if self.preset is None:
            return self.conv_dim, 1.0 if self.conv_alpha is None else self.conv_alpha
        if not self.preset.enable_conv:
            return 0, None
        return self.conv_dim or self.network_dim, self.conv_alpha or self.network_alpha

    def lr_weights(self, family: str) -> list[float] | None:
        """Per-block LR multipliers: block_lr_weights, or kohya's down/mid/up_lr_weight; None for neither."""
        if self.block_lr_weights is not None:
            return list(self.block_lr_weights)
        return kohya_block_lr_weights(self.down_lr_weight, self.mid_lr_weight, self.up_lr_weight,
                                      self.block_lr_zero_threshold, family)

    def loraplus_ratio(self, component: str) -> float | None:
        """kohya's choice: the side's own ratio if set and non-zero, else loraplus_lr_ratio."""
        own = self.loraplus_unet_lr_ratio if component == "unet" else self.loraplus_text_encoder_lr_ratio
        return own or self.loraplus_lr_ratio

    def algo_options(self):
        algo = get_algorithm(self.algo)
        wanted = {n: getattr(self, n) for n in algo.option_names()}
        return algo.options(**wanted)

    def check_block_lengths(self, num_blocks: int, family: str) -> None:
        for name in ("block_dims", "block_alphas", "conv_block_dims", "conv_block_alphas", "block_lr_weights"):
            values = getattr(self, name)
            if values is not None and len(values) != num_blocks:
                raise ValueError(f"{name} has {len(values)} values; a {family} U-Net has {num_blocks} blocks")

    def rank_for(self, block_index: int | None, kxk_conv: bool, family: str = "sd1") -> tuple[int, float | None]:
        """(dim, alpha) for a U-Net layer; block_index None for layers outside the block table."""
        if kxk_conv:
            dims, alphas = self.conv_block_dims, self.conv_block_alphas
            dim, alpha = self.conv_rank()
            if dims is None and self.block_dims is not None and dim:
                dims = [dim] * len(self.block_dims)
        else:
            dims, alphas, dim, alpha = self.block_dims, self.block_alphas, self.network_dim, self.network_alpha
        if block_index is not None:
            lr_weights = self.lr_weights(family)
            if lr_weights is not None and lr_weights[block_index] == 0:
                return 0, None  # kohya: a block without learning rate gets no adapters
            if dims is not None:
                dim = int(dims[block_index])
            if alphas is not None:
                alpha = float(alphas[block_index])
        return int(dim), alpha

    def network_args(self) -> dict[str, str | None]:
        """kohya-style ss_network_args: raw string values, as readers expect."""
        args: dict[str, str | None] = {"algo": get_algorithm(self.algo).name}
        if self.lycoris_preset:
            args["preset"] = self.lycoris_preset
        if self.with_conv:
            dim, alpha = self.conv_rank()  # what was trained (a preset's unset conv_dim is network_dim)
            args["conv_dim"], args["conv_alpha"] = str(dim), str(alpha)
        for name in ("block_dims", "block_alphas", "conv_block_dims", "conv_block_alphas", "block_lr_weights",
                     "down_lr_weight", "mid_lr_weight", "up_lr_weight"):
            value = getattr(self, name)
            if value is not None:
                args[name] = value if isinstance(value, str) else ",".join(str(v) for v in value)
        if any(getattr(self, n) is not None for n in ("down_lr_weight", "mid_lr_weight", "up_lr_weight")):
            args["block_lr_zero_threshold"] = str(self.block_lr_zero_threshold)
        for name in ("rank_dropout", "module_dropout"):
            if getattr(self, name):
                args[name] = str(getattr(self, name))
        for name in ("loraplus_lr_ratio", "loraplus_unet_lr_ratio", "loraplus_text_encoder_lr_ratio"):
            if getattr(self, name) is not None:
                args[name] = str(getattr(self, name))
        if self.algo == "lokr":
            args["factor"] = str(self.factor)
        for name in ("decompose_both", "full_matrix", "unbalanced_factorization", "use_tucker", "use_scalar",
                     "rank_dropout_scale", "train_norm"):
            if getattr(self, name):
                args[name] = "True"
        if self.dora_wd:  # wd_on_output always written: LyCORIS reads a missing one as True (output axis)
            args["dora_wd"], args["wd_on_output"] = "True", str(self.wd_on_output)
            if self.dora_detach_norm:
                args["dora_detach_norm"] = "True"
        args["dropout"] = str(self.dropout) if self.dropout else None
        return args
