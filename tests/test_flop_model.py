"""The adapters' multiply-add model (what the path choice and the train-step benchmark's FLOP share rest on)
against torch's own FLOP counter, with and without gradient checkpointing."""
import pytest
import torch
from torch import nn
from torch.utils.checkpoint import checkpoint
from torch.utils.flop_counter import FlopCounterMode

from lorakit.adapters.functional.layer import LayerSpec
from lorakit.adapters.modules.lora import LoRAModule


def counted_macs(layer: nn.Module, x: torch.Tensor, recompute: bool) -> int:
    """Multiply-adds torch counts for forward + backward through `layer` (checkpointed: forward twice)."""
    x = x.detach().requires_grad_()

    def block(t):  # square saves the layer's output, so a checkpointed block recomputes the whole layer, as
        return layer(t).square()  # the next layer of a U-Net block makes it (a lone frozen layer saves nothing)

    with FlopCounterMode(display=False) as counter:
        y = checkpoint(block, x, use_reentrant=False) if recompute else block(x)
        y.backward(torch.ones_like(y))
    return counter.get_total_flops() // 2


# Linear bypass runs the fused node, whose in-place addmm_ torch's counter does not count
# (the folded node: large activations against the weight, see tests/test_folded.py)
@pytest.mark.parametrize("kind,mode", [("conv3x3", "bypass"), ("conv3x3", "merged"), ("linear", "merged"),
                                       ("conv3x3_folded", "bypass"), ("linear_folded", "bypass")])
def test_training_and_recompute_flops_match_the_counter(kind, mode):
    torch.manual_seed(0)
    if kind.startswith("linear"):
        layer, x = nn.Linear(24, 40), torch.randn(2, 7 if kind == "linear" else 200, 24)
    else:
        layer, x = nn.Conv2d(12, 20, 3, padding=1), torch.randn(2, 12, *((6, 6) if kind == "conv3x3" else (20, 20)))
    layer.requires_grad_(False)
    module = LoRAModule.create(LayerSpec.of(layer), 4, 2, forward_mode=mode)
    with torch.no_grad():
        module.up.normal_()
    frozen = counted_macs(layer, x, recompute=False)
    frozen_again = counted_macs(layer, x, recompute=True) - frozen
    module.attach(layer)
    assert module.folds(x) == kind.endswith("folded")
    with torch.enable_grad():
        plain = counted_macs(layer, x, recompute=False)
        assert plain == module.training_flops(x, mode) and plain > frozen
        again = counted_macs(layer, x, recompute=True) - plain - frozen_again  # what the adapter adds
        assert again == module.recompute_flops(x, mode) > 0
