"""kohya's noise, timestep and loss options: each function against a float64 closed form written from kohya's
code (library/train_util.py, library/custom_train_functions.py, train_network.py process_batch), and a short
run on the tiny model with them switched on."""
import math

import pytest
import torch
import torch.nn.functional as F

from lorakit.models import noise as nz
from lorakit.models import objectives as obj
from lorakit.training.config import build_config
from lorakit.training.trainer import Trainer, noised_latents, per_sample_loss

from conftest import train_config

D = torch.float64


def gen(seed=0):
    return torch.Generator().manual_seed(seed)


def sd_betas():
    return torch.linspace(0.00085 ** 0.5, 0.012 ** 0.5, 1000, dtype=D) ** 2


def kohya_zero_terminal_snr_betas(betas):
    """fix_noise_scheduler_betas_for_zero_terminal_snr, step by step, in float64."""
    alphas_bar_sqrt = (1 - betas).cumprod(0).sqrt()
    s0, sT = alphas_bar_sqrt[0].clone(), alphas_bar_sqrt[-1].clone()
    alphas_bar_sqrt = (alphas_bar_sqrt - sT) * s0 / (s0 - sT)
    alphas_bar = alphas_bar_sqrt ** 2
    alphas = torch.cat([alphas_bar[0:1], alphas_bar[1:] / alphas_bar[:-1]])
    return 1 - alphas


# ---- schedule and draws --------------------------------------------------------------------------------------
def test_zero_terminal_snr_matches_kohya_and_keeps_snr_falling():
    ac = obj.sd_alphas_cumprod()
    fixed = nz.zero_terminal_snr(ac)
    expected = (1 - kohya_zero_terminal_snr_betas(sd_betas())).cumprod(0)
    torch.testing.assert_close(fixed.double(), expected, rtol=1e-5, atol=1e-9)
    assert fixed.dtype == ac.dtype and fixed[-1] == 0 and fixed[0] == ac[0]
    snr = fixed.double() / (1 - fixed.double())
    assert snr[-1] == 0 and bool((snr[1:] < snr[:-1]).all())
    assert fixed[-2] > 0  # only the last step reaches pure noise


def test_timesteps_respect_min_and_max():
    t = nz.sample_timesteps(20000, 200, 300, gen())
    assert t.dtype == torch.long and int(t.min()) == 200 and int(t.max()) == 299  # [min, max), both ends drawn
    assert torch.equal(t, nz.sample_timesteps(20000, 200, 300, gen()))
    assert torch.equal(nz.sample_timesteps(3, 600, 500, gen()), torch.full((3,), 500))  # kohya: min >= max -> max
    cfg = build_config({"min_timestep": 900, "max_timestep": 950})
    _, _, t = noised_latents(cfg, torch.zeros(4096, 1, 1, 1), obj.sd_alphas_cumprod(), gen())
    assert int(t.min()) >= 900 and int(t.max()) < 950 and int(t.max()) > int(t.min())


def test_offset_noise_random_strength_and_adaptive_scale_closed_form():
    latents = torch.randn(3, 4, 5, 6, generator=gen(1)) + torch.tensor([0.5, -1.0, 0.0, 2.0]).view(1, 4, 1, 1)
    offset, scale = 0.1, -0.2  # negative: kohya clamps the per-channel offset at 0
    got = obj.offset_noise(latents, offset, gen(), adaptive_scale=scale, random_strength=True)
    g = gen()  # kohya's draw order: the noise, the strength u, the per-channel offsets
    base = torch.randn(latents.shape, generator=g).double()
    u = torch.rand(1, generator=g).double()
    shift = torch.randn((3, 4, 1, 1), generator=g).double()
    strength = (offset * u + scale * latents.double().mean(dim=(2, 3), keepdim=True).abs()).clamp(min=0)
    assert (strength == 0).any() and (strength > 0).any()  # the clamp is exercised
    torch.testing.assert_close(got.double(), base + strength * shift, rtol=1e-6, atol=1e-6)
    assert torch.equal(obj.offset_noise(latents, 0.0, gen(), adaptive_scale=0.5), torch.randn(latents.shape,
                                                                                           generator=gen()))


def kohya_pyramid(noise, iterations, discount, g):
    """pyramid_noise_like in float64, its r from the generator (kohya takes it from Python's random)."""
    b, c, h, w = noise.shape
    noise = noise.double()
    for i in range(iterations):
        r = torch.rand((), generator=g).item() * 2 + 2
        hn, wn = max(1, int(h / (r ** i))), max(1, int(w / (r ** i)))
        noise = noise + torch.nn.Upsample(size=(h, w), mode="bilinear")(
            torch.randn(b, c, hn, wn, generator=g).double()) * discount ** i
        if hn == 1 or wn == 1:
            break
    return noise / noise.std()


@pytest.mark.parametrize("iterations", [1, 3, 20])
def test_pyramid_noise_closed_form(iterations):
    noise = torch.randn(2, 4, 16, 12, generator=gen(3))
    got = nz.pyramid_noise(noise.clone(), iterations, 0.3, gen(5))
    expected = kohya_pyramid(noise, iterations, 0.3, gen(5))
    torch.testing.assert_close(got.double(), expected, rtol=1e-5, atol=1e-5)
    assert got.std().item() == pytest.approx(1.0, abs=1e-5)
    if iterations == 20:  # stops at the first 1-pixel level: later draws never happen
        g_short, g_long = gen(5), gen(5)
        nz.pyramid_noise(noise.clone(), 20, 0.3, g_short), nz.pyramid_noise(noise.clone(), 40, 0.3, g_long)
        assert torch.equal(g_short.get_state(), g_long.get_state())


def test_input_perturbation_noises_the_input_only():
    noise = torch.randn(4, 4, 8, 8, generator=gen(2))
    fixed = nz.perturbed_noise(noise, 0.1, False, gen())
    torch.testing.assert_close(fixed, noise + 0.1 * torch.randn(noise.shape, generator=gen()))
    g = gen()
    u = torch.rand(1, generator=g).double()
    expected = noise.double() + 0.1 * u * torch.randn(noise.shape, generator=g).double()
    torch.testing.assert_close(nz.perturbed_noise(noise, 0.1, True, gen()).double(), expected, rtol=1e-6,
                               atol=1e-7)
    # in a training step: same draws before it, so ε (the target) is untouched and only x_t moves
    latents, ac = torch.randn(4, 4, 8, 8, generator=gen(4)), obj.sd_alphas_cumprod()
    eps, x_plain, t = noised_latents(build_config({}), latents, ac, gen(9))
    eps_ip, x_ip, t_ip = noised_latents(build_config({"ip_noise_gamma": 0.1}), latents, ac, gen(9))
    assert torch.equal(eps, eps_ip) and torch.equal(t, t_ip) and not torch.equal(x_plain, x_ip)
    a = ac[t].double().view(-1, 1, 1, 1)
    xi = (x_ip.double() - x_plain.double()) / (1 - a).sqrt() / 0.1  # x_t = √ᾱx₀ + √(1-ᾱ)(ε + γξ)
    assert xi.std().item() == pytest.approx(1.0, abs=0.05)


# ---- per-element loss and Huber schedule ---------------------------------------------------------------------
def test_elementwise_losses_closed_form():
    pred, tgt = torch.randn(3, 4, 5, 5, generator=gen(1)), torch.randn(3, 4, 5, 5, generator=gen(2))
    c = torch.tensor([0.05, 0.1, 2.0])
    d, cc = (pred - tgt).double(), c.double().view(-1, 1, 1, 1)
    closed = {"l2": d ** 2, "l1": d.abs(), "huber": 2 * cc * ((d ** 2 + cc ** 2).sqrt() - cc),
              "smooth_l1": 2 * ((d ** 2 + cc ** 2).sqrt() - cc)}
    for loss_type, expected in closed.items():
        got = obj.elementwise_loss(pred, tgt, loss_type, c if loss_type in ("huber", "smooth_l1") else None)
        torch.testing.assert_close(got.double(), expected, rtol=1e-5, atol=1e-7, msg=loss_type)
    small = torch.full((1, 1, 1, 4), 1e-3)  # |d| << c: huber ≈ d² (= l2), smooth_l1 ≈ d²/c
    one = torch.tensor([0.5])
    assert obj.elementwise_loss(small, 0 * small, "huber", one)[0, 0, 0, 0].item() == pytest.approx(1e-6, rel=1e-5)
    assert obj.elementwise_loss(small, 0 * small, "smooth_l1", one)[0, 0, 0, 0].item() == pytest.approx(2e-6, rel=1e-5)
    large = torch.full((1, 1, 1, 1), 1e3)  # |d| >> c: huber ≈ 2c|d| - 2c²
    assert obj.elementwise_loss(large, 0 * large, "huber", one).item() == pytest.approx(2 * 0.5 * 1e3 - 0.5, rel=1e-6)
    with pytest.raises(ValueError, match="huber_c"):
        obj.elementwise_loss(pred, tgt, "huber")


def test_huber_threshold_schedules_closed_form():
    ac, t, c = obj.sd_alphas_cumprod(), torch.tensor([0, 1, 250, 500, 999]), 0.1
    a = ac[t].double()
    torch.testing.assert_close(obj.huber_threshold("constant", c, t, ac, scale=2.0).double(),
                               torch.full((5,), 0.2, dtype=D))
    alpha = -math.log(c) / 1000  # kohya: exp(-alpha·t)·huber_scale
    torch.testing.assert_close(obj.huber_threshold("exponential", c, t, ac, scale=1.5).double(),
                               torch.exp(-alpha * t.double()) * 1.5, rtol=1e-6, atol=0)
    sigmas = ((1 - a) / a) ** 0.5
    torch.testing.assert_close(obj.huber_threshold("snr", c, t, ac).double(), (1 - c) / (1 + sigmas) ** 2 + c,
                               rtol=1e-5, atol=0)
    zero = obj.huber_threshold("snr", c, torch.tensor([999]), nz.zero_terminal_snr(ac))
    assert zero.item() == pytest.approx(c, abs=1e-7)  # ᾱ_T = 0: σ = ∞ in kohya's form, c here, no 1/0


# ---- masks, SNR weights and the order of process_batch ---------------------------------------------------------
def test_mask_multiplies_and_area_downsamples():
    loss = torch.rand(2, 4, 8, 8, generator=gen(1))
    latent_mask = (torch.rand(2, 1, 8, 8, generator=gen(2)) > 0.5).float()
    torch.testing.assert_close(obj.masked(loss, latent_mask), loss * latent_mask)
    pixel_mask = torch.rand(2, 1, 64, 64, generator=gen(3))  # kohya's alpha masks come at pixel size
    expected = loss.double() * F.avg_pool2d(pixel_mask.double(), 8)
    torch.testing.assert_close(obj.masked(loss, pixel_mask).double(), expected, rtol=1e-5, atol=1e-7)


def test_snr_weights_closed_form_and_finite_at_zero_terminal_snr():
    ac, t = obj.sd_alphas_cumprod(), torch.arange(0, 1000, 9)
    snr = torch.minimum(ac[t].double() / (1 - ac[t].double()), torch.tensor(1000.0, dtype=D))  # kohya caps at 1000
    assert snr[0] == 1000  # SD's t = 0 has SNR ≈ 1175: the cap matters
    torch.testing.assert_close(obj.v_pred_scale(ac, t).double(), snr / (snr + 1), rtol=1e-5, atol=0)
    torch.testing.assert_close(obj.debiased_weight(ac, t, False).double(), 1 / snr.sqrt(), rtol=1e-5, atol=0)
    torch.testing.assert_close(obj.debiased_weight(ac, t, True).double(), 1 / (snr + 1), rtol=1e-5, atol=0)
    loss = torch.rand(len(t), generator=gen(), dtype=D)
    torch.testing.assert_close(obj.add_v_pred_like_loss(loss, ac, t, 0.3), loss + loss / (snr / (snr + 1)) * 0.3,
                               rtol=1e-5, atol=0)
    zt, last = nz.zero_terminal_snr(ac), torch.tensor([999])
    for w in (obj.min_snr_weight(zt, last, 5.0, False), obj.min_snr_weight(zt, last, 5.0, True),
              obj.v_pred_scale(zt, last), obj.debiased_weight(zt, last, False), obj.debiased_weight(zt, last, True),
              obj.add_v_pred_like_loss(torch.ones(1), zt, last, 0.3)):
        assert torch.isfinite(w).all()
    assert obj.min_snr_weight(zt, last, 5.0, False).item() == 1.0  # min(SNR, γ)/SNR → 1 as SNR → 0


def test_l2_default_equals_weighted_mse_exactly():
    pred, tgt = torch.randn(4, 4, 8, 8, generator=gen(1)), torch.randn(4, 4, 8, 8, generator=gen(2))
    ac, t, w = obj.sd_alphas_cumprod(), torch.tensor([3, 100, 500, 990]), torch.tensor([1.0, 0.5, 2.0, 1.0])
    plain = per_sample_loss(build_config({}), pred, tgt, t, ac, ac, False)
    assert torch.equal(plain.mean(), obj.weighted_mse(pred, tgt))
    assert torch.equal(per_sample_loss(build_config({}), pred, tgt, t, ac, ac, False, weights=w).mean(),
                       obj.weighted_mse(pred, tgt, w))
    snr_cfg = build_config({"min_snr_gamma": 5.0})
    for v in (False, True):
        assert torch.equal(per_sample_loss(snr_cfg, pred, tgt, t, ac, ac, v).mean(),
                           obj.weighted_mse(pred, tgt, obj.min_snr_weight(ac, t, 5.0, v)))


def test_per_sample_loss_follows_process_batch_order():
    """loss → mask → mean over C×H×W → loss weights → min-SNR → v scaling → v_pred_like → debiased."""
    pred, tgt = torch.randn(3, 4, 8, 8, generator=gen(1)), torch.randn(3, 4, 8, 8, generator=gen(2))
    mask, w = torch.rand(3, 1, 8, 8, generator=gen(3)), torch.tensor([1.0, 0.25, 3.0])
    ac, t, gamma = obj.sd_alphas_cumprod(), torch.tensor([0, 400, 999]), 5.0
    zt = nz.zero_terminal_snr(ac)  # noising schedule (Huber threshold) differs from the SNR-weight schedule
    cfg = build_config({"loss_type": "huber", "huber_schedule": "snr", "huber_c": 0.2, "min_snr_gamma": gamma,
                        "scale_v_pred_loss_like_noise_pred": True, "v_parameterization": True,
                        "debiased_estimation_loss": True})
    cfg.v_pred_like_loss = 0.5  # the config refuses it beside v_parameterization; set here to check every step's place
    got = per_sample_loss(cfg, pred, tgt, t, zt, ac, True, weights=w, masks=mask)
    a = zt[t].double()
    c = ((1 - 0.2) / (1 + ((1 - a) / a) ** 0.5) ** 2 + 0.2).view(-1, 1, 1, 1)
    d = (pred - tgt).double()
    loss = (2 * c * ((d ** 2 + c ** 2).sqrt() - c) * mask.double()).mean(dim=(1, 2, 3)) * w.double()
    snr = ac[t].double() / (1 - ac[t].double())
    loss = loss * torch.minimum(snr, torch.tensor(gamma, dtype=D)) / (snr + 1)  # min-SNR, v-prediction
    capped = torch.minimum(snr, torch.tensor(1000.0, dtype=D))
    scale = capped / (capped + 1)
    loss = loss * scale
    loss = loss + loss / scale * 0.5
    loss = loss / (capped + 1)  # debiased, v-prediction
    torch.testing.assert_close(got.double(), loss, rtol=2e-5, atol=0)


# ---- a short run on the tiny model -----------------------------------------------------------------------------
def test_training_with_kohya_noise_and_loss_options_is_finite_and_deterministic(tiny_folder, images, tmp_path):
    settings = dict(max_train_steps=3, loss_type="huber", huber_schedule="snr", multires_noise_iterations=6,
                    multires_noise_discount=0.3, ip_noise_gamma=0.1, ip_noise_gamma_random_strength=True,
                    zero_terminal_snr=True, noise_offset=0.05, adaptive_noise_scale=0.01, min_timestep=100,
                    max_timestep=1000, debiased_estimation_loss=True)
    first = Trainer(train_config(tiny_folder, images, tmp_path / "a", **settings)).run()
    second = Trainer(train_config(tiny_folder, images, tmp_path / "b", **settings)).run()
    assert first.steps == 3 and len(first.losses) == 3
    assert all(math.isfinite(x) and x > 0 for x in first.losses)
    assert first.losses == second.losses  # bit-identical: every draw comes from the micro-batch generator
    plain = Trainer(train_config(tiny_folder, images, tmp_path / "c", max_train_steps=3)).run()
    assert plain.losses != first.losses  # the options reach the loss


def test_trainer_loss_takes_weights_and_masks(tiny_folder, images, tmp_path):
    trainer = Trainer(train_config(tiny_folder, images, tmp_path, loss_type="l1"))
    latents = torch.randn(2, 4, 8, 8, generator=gen(1))
    captions = ["a red circle", "a red square"]
    with torch.no_grad():
        base = trainer.loss(latents, captions, gen(7))
        weighted = trainer.loss(latents, captions, gen(7), weights=torch.tensor([2.0, 2.0]))
        zeroed = trainer.loss(latents, captions, gen(7), masks=torch.zeros(2, 1, 8, 8))
        ones = trainer.loss(latents, captions, gen(7), masks=torch.ones(2, 1, 8, 8))
    torch.testing.assert_close(weighted, 2 * base)
    assert zeroed.item() == 0 and torch.equal(ones, base)
