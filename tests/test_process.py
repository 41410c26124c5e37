"""NoiseProcess against diffusers' own schedulers: schedules, noising, conversions, DDIM / Euler steps, timesteps."""

from __future__ import annotations

import pytest
import torch
from diffusers import DDIMScheduler, DDPMScheduler, FlowMatchEulerDiscreteScheduler

from distill_diffusion.process import CLEAN, NoiseProcess

TOL = {"rtol": 1e-6, "atol": 1e-6}

SCHEDULES = {
    "linear": {"beta_schedule": "linear"},
    "scaled_linear": {"beta_schedule": "scaled_linear", "beta_start": 0.00085, "beta_end": 0.012},  # SD's
    "squaredcos_cap_v2": {"beta_schedule": "squaredcos_cap_v2"},
}
SD = SCHEDULES["scaled_linear"]


def _gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _randn(*shape: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(*shape, generator=_gen(seed), dtype=torch.float64)


def _timesteps(n: int, seed: int = 0) -> torch.Tensor:
    """Random integer timesteps in [0, 999] that always include both ends."""
    t = torch.randint(0, 1000, (n,), generator=_gen(seed))
    t[0], t[1] = 0, 999
    return t


def _sd_process(prediction_type: str = "epsilon") -> tuple[NoiseProcess, DDPMScheduler]:
    scheduler = DDPMScheduler(**SD, prediction_type=prediction_type, clip_sample=False)
    return NoiseProcess.from_scheduler_config(scheduler.config), scheduler


# ------------------------------------------------------------------------------------------------ schedules
@pytest.mark.parametrize("name", SCHEDULES)
def test_alphas_cumprod_match_diffusers(name: str) -> None:
    scheduler = DDPMScheduler(**SCHEDULES[name])
    process = NoiseProcess.from_scheduler_config(scheduler.config)
    assert process.kind == "vp" and process.prediction_type == "epsilon"
    assert process.num_train_timesteps == 1000
    torch.testing.assert_close(process.alphas_cumprod, scheduler.alphas_cumprod.double(), rtol=0, atol=1e-12)
    # alpha^2 + sigma^2 = 1 at every timestep
    alpha, sigma = process.alpha_sigma(torch.arange(1000), torch.zeros(1000, dtype=torch.float64))
    torch.testing.assert_close(alpha**2 + sigma**2, torch.ones(1000, dtype=torch.float64), **TOL)


def test_sd_schedule_does_not_reach_zero_snr() -> None:
    process, _ = _sd_process()
    abar_last = float(process.alphas_cumprod[999])
    assert abar_last == pytest.approx(0.0047, abs=1e-4)
    assert abar_last > 0
    assert float(process.alphas_cumprod[0]) == pytest.approx(1 - 0.00085, abs=1e-7)  # diffusers' betas are fp32
    snr = process.snr(torch.tensor([0, 500, 999]))
    assert bool((snr[:-1] > snr[1:]).all())  # decreasing in t
    assert float(snr[-1]) == pytest.approx(abar_last / (1 - abar_last), rel=1e-6)


@pytest.mark.parametrize("name", SCHEDULES)
def test_add_noise_matches_ddpm_scheduler(name: str) -> None:
    scheduler = DDPMScheduler(**SCHEDULES[name])
    process = NoiseProcess.from_scheduler_config(scheduler.config)
    x0, eps, t = _randn(16, 4, 3, 3, seed=1), _randn(16, 4, 3, 3, seed=2), _timesteps(16)
    ours = process.add_noise(x0, eps, t)
    assert ours.dtype == torch.float64
    torch.testing.assert_close(ours, scheduler.add_noise(x0, eps, t), **TOL)
    # written out: sqrt(alpha_bar) x0 + sqrt(1 - alpha_bar) eps
    abar = scheduler.alphas_cumprod.double()[t].reshape(-1, 1, 1, 1)
    torch.testing.assert_close(ours, abar.sqrt() * x0 + (1 - abar).sqrt() * eps, **TOL)


# ------------------------------------------------------------------------------------------------ conversions
def test_v_prediction_matches_get_velocity() -> None:
    process, scheduler = _sd_process("v_prediction")
    x0, eps, t = _randn(16, 4, 2, 2, seed=3), _randn(16, 4, 2, 2, seed=4), _timesteps(16, seed=5)
    x_t = process.add_noise(x0, eps, t)
    v = process.from_x0(x0, x_t, t, "v_prediction")
    torch.testing.assert_close(v, scheduler.get_velocity(x0, eps, t), **TOL)
    torch.testing.assert_close(process.to_x0(v, x_t, t), x0, **TOL)  # the process's own type is v_prediction
    torch.testing.assert_close(process.from_x0(x0, x_t, t, "epsilon"), eps, **TOL)


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction", "sample"])
def test_round_trip_through_each_prediction_type(prediction_type: str) -> None:
    process, _ = _sd_process()
    x0, eps, t = _randn(32, 5, seed=6), _randn(32, 5, seed=7), _timesteps(32, seed=8)
    x_t = process.add_noise(x0, eps, t)
    pred = process.from_x0(x0, x_t, t, prediction_type)
    torch.testing.assert_close(process.to_x0(pred, x_t, t, prediction_type), x0, **TOL)
    # the native loss of the true x0 is zero, of a perturbed x0 positive and SNR-weighted for epsilon
    assert process.denoising_loss(x0, x0, x_t, t, prediction_type).abs().max() < 1e-20
    loss = process.denoising_loss(x0 + 0.1, x0, x_t, t, prediction_type)
    alpha, sigma = process.alpha_sigma(t, x_t)
    weight = {"epsilon": (alpha / sigma) ** 2, "v_prediction": 1 / sigma**2, "sample": torch.ones_like(alpha)}
    torch.testing.assert_close(loss, 0.01 * weight[prediction_type].flatten(), **TOL)


def test_unknown_prediction_type_in_scheduler_config() -> None:
    config = dict(DDPMScheduler(**SD).config, prediction_type="x_start")
    with pytest.raises(ValueError, match="x_start.*epsilon, v_prediction, sample"):
        NoiseProcess.from_scheduler_config(config)


def test_zero_terminal_snr_needs_a_teacher_that_does_not_predict_epsilon() -> None:
    """diffusers' rescale_betas_zero_snr makes alpha_bar(T-1) exactly 0: an epsilon teacher has no x0 there (a
    division by zero), a v-prediction teacher does (x0 = alpha x_t - sigma v = -v)."""
    config = dict(DDPMScheduler(**SD, rescale_betas_zero_snr=True).config)
    with pytest.raises(ValueError, match="zero-terminal-SNR.*epsilon") as info:
        NoiseProcess.from_scheduler_config(dict(config, prediction_type="epsilon"))
    assert "\n" not in str(info.value)
    process = NoiseProcess.from_scheduler_config(dict(config, prediction_type="v_prediction"))
    x_t, v, t = _randn(3, 4), _randn(3, 4, seed=1), torch.full((3,), 999)
    assert float(process.alphas_cumprod[-1]) == 0.0
    torch.testing.assert_close(process.to_x0(v, x_t, t), -v)


# ------------------------------------------------------------------------------------------------ DDIM
def test_trailing_timesteps_match_ddim_scheduler() -> None:
    process, _ = _sd_process()
    assert process.trailing_timesteps(4) == [999, 749, 499, 249]
    for n in (1, 2, 3, 4, 7, 8, 16, 50):
        ddim = DDIMScheduler(**SD, timestep_spacing="trailing")
        ddim.set_timesteps(n)
        assert process.trailing_timesteps(n) == ddim.timesteps.tolist(), n
    assert process.first_timestep() == 999
    with pytest.raises(ValueError, match="num_steps"):
        process.trailing_timesteps(0)


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
def test_ddim_step_matches_ddim_scheduler(prediction_type: str) -> None:
    process, _ = _sd_process(prediction_type)
    ddim = DDIMScheduler(
        **SD, prediction_type=prediction_type, set_alpha_to_one=False, timestep_spacing="trailing", clip_sample=False
    )
    ddim.set_timesteps(4)
    assert ddim.timesteps.tolist() == [999, 749, 499, 249]
    # diffusers' last step goes to `final_alpha_cumprod`, which is alpha_bar[0] when set_alpha_to_one=False
    targets = [749, 499, 249, 0]
    for i, (t, t_prev) in enumerate(zip(ddim.timesteps.tolist(), targets)):
        x_t, model_output = _randn(3, 4, 2, 2, seed=10 + i), _randn(3, 4, 2, 2, seed=20 + i)
        expected = ddim.step(model_output, t, x_t).prev_sample
        tt, tp = torch.full((3,), t), torch.full((3,), t_prev)
        ours = process.ddim_step(process.to_x0(model_output, x_t, tt), x_t, tt, tp)
        torch.testing.assert_close(ours, expected, **TOL)
    # t_next = CLEAN is the clean end: x0 itself, also per sample beside ordinary timesteps
    x0, x_t = _randn(3, 4), _randn(3, 4, seed=1)
    assert torch.equal(process.ddim_step(x0, x_t, torch.full((3,), 249), torch.full((3,), CLEAN)), x0)
    mixed = process.ddim_step(x0, x_t, torch.full((3,), 249), torch.tensor([CLEAN, 124, CLEAN]))
    assert torch.equal(mixed[[0, 2]], x0[[0, 2]])
    assert torch.equal(mixed[1], process.ddim_step(x0, x_t, torch.full((3,), 249), torch.full((3,), 124))[1])


# ------------------------------------------------------------------------------------------------ flow matching
@pytest.mark.parametrize("shift", [1.0, 3.0])
def test_flow_matching_add_noise_and_velocity(shift: float) -> None:
    scheduler = FlowMatchEulerDiscreteScheduler(shift=shift)
    process = NoiseProcess.from_scheduler(scheduler)
    assert (process.kind, process.prediction_type, process.first_timestep()) == ("flow", "flow", 1000.0)
    timestep = scheduler.timesteps[[0, 1, 250, 500, 998, 999]]  # timestep = sigma * 1000, as diffusers uses
    x0, eps = _randn(6, 4, 2, 2, seed=30), _randn(6, 4, 2, 2, seed=31)
    x_t = process.add_noise(x0, eps, timestep)
    torch.testing.assert_close(x_t, scheduler.scale_noise(x0, timestep, eps), **TOL)
    sigma = scheduler.sigmas[[0, 1, 250, 500, 998, 999]].double().reshape(-1, 1, 1, 1)
    u = _randn(6, 4, 2, 2, seed=32)
    torch.testing.assert_close(process.to_x0(u, x_t, timestep), x_t - sigma * u, **TOL)
    # the true velocity eps - x0 gives back x0 exactly
    torch.testing.assert_close(process.to_x0(eps - x0, x_t, timestep), x0, **TOL)
    torch.testing.assert_close(process.from_x0(x0, x_t, timestep, "flow"), eps - x0, **TOL)


@pytest.mark.parametrize("shift", [1.0, 3.0])
@pytest.mark.parametrize("index", [0, 1, 3])
def test_flow_euler_step_equals_ddim_step(shift: float, index: int) -> None:
    scheduler = FlowMatchEulerDiscreteScheduler(shift=shift)
    process = NoiseProcess.from_scheduler(scheduler)
    scheduler.set_timesteps(4)
    scheduler.set_begin_index(index)
    t = scheduler.timesteps[index]
    t_next = scheduler.sigmas[index + 1] * 1000  # the last step ends at sigma 0: the clean end
    x_t, u = _randn(2, 4, 2, 2, seed=40 + index), _randn(2, 4, 2, 2, seed=50 + index)
    expected = scheduler.step(u, t, x_t).prev_sample
    tt, tn = t.expand(2), t_next.expand(2)
    ours = process.ddim_step(process.to_x0(u, x_t, tt), x_t, tt, tn)
    torch.testing.assert_close(ours, expected, **TOL)


# ------------------------------------------------------------------------------------------------ timesteps
def test_sample_timesteps_vp_inclusive_integer_range() -> None:
    process, _ = _sd_process()
    t = process.sample_timesteps(20000, 0.02, 0.98, _gen(0))
    assert t.dtype == torch.int64
    assert int(t.min()) == 20 and int(t.max()) == 980
    assert len(t.unique()) == 961  # every integer in [20, 980]
    assert torch.equal(t, process.sample_timesteps(20000, 0.02, 0.98, _gen(0)))
    assert not torch.equal(t, process.sample_timesteps(20000, 0.02, 0.98, _gen(1)))
    full = process.sample_timesteps(20000, 0.0, 1.0, _gen(2))
    assert int(full.min()) == 0 and int(full.max()) == 999  # never T itself
    with pytest.raises(ValueError, match="0 <= lo <= hi <= 1"):
        process.sample_timesteps(4, 0.5, 0.2, _gen(0))


def test_sample_timesteps_flow_float_range() -> None:
    process = NoiseProcess.from_scheduler(FlowMatchEulerDiscreteScheduler())
    t = process.sample_timesteps(20000, 0.02, 0.98, _gen(0))
    assert t.is_floating_point()
    assert float(t.min()) >= 20 and float(t.max()) <= 980
    assert float(t.min()) < 21 and float(t.max()) > 979
    assert abs(float(t.mean()) - 500) < 5
    assert torch.equal(t, process.sample_timesteps(20000, 0.02, 0.98, _gen(0)))


@pytest.mark.parametrize(
    ("timesteps", "message"),
    [
        ([], "non-empty"),
        ([499, 999], "strictly descending"),
        ([999, 999], "strictly descending"),
        ([1000, 499], "out of range"),
        ([999, -1], "out of range"),
        ([999, 499.5], "integers"),
    ],
)
def test_check_timesteps_rejects(timesteps: list[float], message: str) -> None:
    process, _ = _sd_process()
    with pytest.raises(ValueError, match=message) as info:
        process.check_timesteps(timesteps)
    assert "\n" not in str(info.value)


def test_check_timesteps_accepts() -> None:
    process, _ = _sd_process()
    process.check_timesteps([999])
    process.check_timesteps([999, 749, 499, 249])
    process.check_timesteps(process.trailing_timesteps(50))
    flow = NoiseProcess.from_scheduler(FlowMatchEulerDiscreteScheduler())
    flow.check_timesteps([1000.0, 500.5, 0.25])  # floats are fine for flow
    with pytest.raises(ValueError, match="out of range"):
        flow.check_timesteps([1000.5])
