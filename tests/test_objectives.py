import pytest
import torch
from diffusers import DDPMScheduler

from lorakit.models import objectives as obj


@pytest.fixture
def scheduler():
    return DDPMScheduler(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear")


def test_noising_and_v_target_match_diffusers(scheduler):
    g = torch.Generator().manual_seed(0)
    x, noise = torch.randn(4, 4, 8, 8, generator=g), torch.randn(4, 4, 8, 8, generator=g)
    t = torch.tensor([0, 10, 500, 999])
    ac = obj.sd_alphas_cumprod()
    torch.testing.assert_close(ac, scheduler.alphas_cumprod, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(obj.add_noise(x, noise, ac, t), scheduler.add_noise(x, noise, t))
    torch.testing.assert_close(obj.target(x, noise, ac, t, True), scheduler.get_velocity(x, noise, t))
    assert obj.target(x, noise, ac, t, False) is noise


def test_min_snr_weights_closed_form():
    ac = obj.sd_alphas_cumprod()
    t = torch.arange(0, 1000, 7)
    snr = ac[t].double() / (1 - ac[t].double())
    eps = obj.min_snr_weight(ac, t, 5.0, False).double()
    v = obj.min_snr_weight(ac, t, 5.0, True).double()
    torch.testing.assert_close(eps, torch.minimum(snr, torch.tensor(5.0, dtype=torch.float64)) / snr, rtol=1e-5, atol=0)
    torch.testing.assert_close(v, torch.minimum(snr, torch.tensor(5.0, dtype=torch.float64)) / (snr + 1), rtol=1e-5, atol=0)
    assert eps[-1] == pytest.approx(1.0) and eps[0] < 0.01  # low noise steps are damped, high noise kept


def test_noise_offset_is_constant_per_channel():
    latents = torch.zeros(512, 4, 8, 8)
    plain = obj.offset_noise(latents, 0.0, torch.Generator().manual_seed(0))
    shifted = obj.offset_noise(latents, 0.5, torch.Generator().manual_seed(0))
    channel_means = shifted.mean(dim=(2, 3))
    assert channel_means.std() > 3 * plain.mean(dim=(2, 3)).std()  # the offset moves whole channels
    assert obj.weighted_mse(torch.ones(2, 3), torch.zeros(2, 3), torch.tensor([1.0, 0.0])) == pytest.approx(0.5)


def test_lion_matches_its_definition_and_schedules_warm_up():
    from lorakit.training.optim import Lion, make_optimizer, make_scheduler

    p = torch.nn.Parameter(torch.tensor([1.0, -2.0]))
    opt = Lion([p], lr=0.1, betas=(0.9, 0.99), weight_decay=0.0)
    p.grad = torch.tensor([0.5, -0.1])
    opt.step()  # m = 0: update = sign(0.1·g) = sign(g)
    torch.testing.assert_close(p.detach(), torch.tensor([0.9, -1.9]))
    q = torch.nn.Parameter(torch.zeros(1))
    adam = make_optimizer("AdamW", [{"params": [q]}], 1e-3, torch.device("cpu"))
    sched = make_scheduler("constant", adam, warmup_steps=10, total_steps=100)
    assert adam.param_groups[0]["lr"] == 0.0
    for _ in range(10):
        adam.step()
        sched.step()
    assert adam.param_groups[0]["lr"] == pytest.approx(1e-3)
    with pytest.raises(ValueError, match="CUDA"):
        make_optimizer("AdamW8bit", [{"params": [q]}], 1e-3, torch.device("cpu"))
