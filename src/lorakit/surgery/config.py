"""NetworkConfig: the typed description of what to adapt and with which rank/alpha.

Names follow kohya (network_dim, network_alpha, conv_dim, conv_alpha, block_dims, ...). Validation that
needs only the config happens here; checks that need the model (block-list lengths) happen when the
network is built, before any parameter is allocated.
"""
from __future__ import annotations

from dataclasses import dataclass, field

from lorakit.adapters.modules.base import FORWARD_MODES, Dropouts
from lorakit.adapters.registry import get_algorithm


@dataclass
class NetworkConfig:
    algo: str = field(default="lora", metadata={"help": "lora (= locon), loha or lokr"})
    network_dim: int = field(default=4, metadata={"help": "rank of Linear and 1x1-conv adapters (attention, MLP)"})
    network_alpha: float = field(default=1.0, metadata={"help": "strength: scale = network_alpha / network_dim"})
    conv_dim: int = field(default=0, metadata={"help": "rank of kxk-conv adapters (LoCon); 0 = none, plain LoRA"})
    conv_alpha: float | None = field(default=None, metadata={"help": "conv strength: conv_alpha / conv_dim; "
                                                                     "unset = 1.0 as in kohya"})
    block_dims: list[int] | None = field(default=None, metadata={"help": "per-block network_dim (25 SD1/2, 23 SDXL)"})
    block_alphas: list[float] | None = field(default=None, metadata={"help": "per-block network_alpha"})
    conv_block_dims: list[int] | None = field(default=None, metadata={"help": "per-block conv_dim"})
    conv_block_alphas: list[float] | None = field(default=None, metadata={"help": "per-block conv_alpha"})
    block_lr_weights: list[float] | None = field(default=None, metadata={
        "help": "per-block learning-rate multipliers; 0 leaves the block without adapters"})
    dropout: float = field(default=0.0, metadata={"help": "dropout on rank activations (LoRA/LoCon)"})
    rank_dropout: float = field(default=0.0, metadata={"help": "per-sample rank mask probability"})
    module_dropout: float = field(default=0.0, metadata={"help": "probability of skipping a module for a step"})
    train_unet: bool = field(default=True, metadata={"help": "adapt the U-Net"})
    train_text_encoder: bool = field(default=True, metadata={"help": "adapt the text encoder(s)"})
    forward_mode: str = field(default="auto", metadata={"help": "auto (cheaper exact path per layer), bypass, merged"})
    use_tucker: bool = field(default=False, metadata={"help": "Tucker core for kxk convs (lora_mid / hada_t / lokr_t2)"})
    factor: int = field(default=-1, metadata={"help": "LoKr: cap on the small Kronecker factor (-1 balanced)"})
    decompose_both: bool = field(default=False, metadata={"help": "LoKr: factorise W1 too"})
    full_matrix: bool = field(default=False, metadata={"help": "LoKr: full W2 (scale 1, alpha ignored)"})

    def __post_init__(self):
        algo = get_algorithm(self.algo)  # raises with the list of algorithms
        self.algo = algo.name
        if self.network_dim < 0 or self.conv_dim < 0:
            raise ValueError("network_dim and conv_dim must be >= 0")
        if self.forward_mode not in FORWARD_MODES:
            raise ValueError(f"forward_mode must be one of {FORWARD_MODES}, got {self.forward_mode!r}")
        self.dropouts()  # range checks
        if self.dropout > 0 and algo.name != "lora":
            raise ValueError(f"dropout is for LoRA/LoCon rank activations; {algo.name} takes rank_dropout/module_dropout")
        if self.conv_block_alphas is not None and not self.conv_block_dims and not self.conv_dim:
            raise ValueError("conv_block_alphas given but no conv layers are adapted (set conv_dim or conv_block_dims)")
        if self.conv_alpha is not None and not self.conv_dim and not self.conv_block_dims:
            raise ValueError("conv_alpha given but conv_dim is 0: set conv_dim > 0 to train conv layers (LoCon)")
        if algo.name != "lokr" and (self.factor != -1 or self.decompose_both or self.full_matrix):
            raise ValueError("factor / decompose_both / full_matrix apply to algo 'lokr' only")
        for name in ("block_dims", "conv_block_dims"):
            values = getattr(self, name)
            if values is not None and any(int(v) < 0 for v in values):
                raise ValueError(f"{name} must be >= 0")

    def dropouts(self) -> Dropouts:
        return Dropouts(self.dropout, self.rank_dropout, self.module_dropout)

    @property
    def with_conv(self) -> bool:
        return bool(self.conv_dim) or bool(self.conv_block_dims and any(self.conv_block_dims))

    def algo_options(self):
        algo = get_algorithm(self.algo)
        wanted = {n: getattr(self, n) for n in algo.option_names()}
        return algo.options(**wanted)

    def check_block_lengths(self, num_blocks: int, family: str) -> None:
        for name in ("block_dims", "block_alphas", "conv_block_dims", "conv_block_alphas", "block_lr_weights"):
            values = getattr(self, name)
            if values is not None and len(values) != num_blocks:
                raise ValueError(f"{name} has {len(values)} values; a {family} U-Net has {num_blocks} blocks")

    def rank_for(self, block_index: int | None, kxk_conv: bool) -> tuple[int, float | None]:
        """(dim, alpha) for a U-Net layer; block_index None for layers outside the block table."""
        if kxk_conv:
            dims, alphas, dim, alpha = self.conv_block_dims, self.conv_block_alphas, self.conv_dim, self.conv_alpha
            alpha = 1.0 if alpha is None else alpha
            if dims is None and self.block_dims is not None and self.conv_dim:
                dims = [self.conv_dim] * len(self.block_dims)
        else:
            dims, alphas, dim, alpha = self.block_dims, self.block_alphas, self.network_dim, self.network_alpha
        if block_index is not None:
            if self.block_lr_weights is not None and self.block_lr_weights[block_index] == 0:
                return 0, None
            if dims is not None:
                dim = int(dims[block_index])
            if alphas is not None:
                alpha = float(alphas[block_index])
        return int(dim), alpha

    def network_args(self) -> dict[str, str | None]:
        """kohya-style ss_network_args: raw string values, as readers expect."""
        args: dict[str, str | None] = {"algo": self.algo}
        if self.with_conv:
            args["conv_dim"] = str(self.conv_dim)
            args["conv_alpha"] = str(1.0 if self.conv_alpha is None else self.conv_alpha)
        for name in ("block_dims", "block_alphas", "conv_block_dims", "conv_block_alphas", "block_lr_weights"):
            if getattr(self, name) is not None:
                args[name] = ",".join(str(v) for v in getattr(self, name))
        for name in ("rank_dropout", "module_dropout"):
            if getattr(self, name):
                args[name] = str(getattr(self, name))
        if self.algo == "lokr":
            args["factor"] = str(self.factor)
            if self.decompose_both:
                args["decompose_both"] = "True"
            if self.full_matrix:
                args["full_matrix"] = "True"
        if self.use_tucker:
            args["use_tucker"] = "True"
        args["dropout"] = str(self.dropout) if self.dropout else None
        return args
