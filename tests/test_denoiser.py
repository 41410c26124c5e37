"""Denoiser, cfg_x0 and Cond: the exact mixture teacher against Tweedie's formula, tiny SD UNets against
diffusers' own prompt encoding and prediction types."""

from __future__ import annotations

import math
from functools import cache

import pytest
import torch
from diffusers import DDPMScheduler, DiffusionPipeline
from torch import Tensor
from torch.distributions import Categorical, Independent, MixtureSameFamily, Normal

from distill_diffusion.denoiser import Cond, Denoiser, cfg_x0
from distill_diffusion.gmm import GaussianMixture, MixtureDenoiserNet
from distill_diffusion.process import NoiseProcess
from distill_diffusion.text import TextConditioner
from distill_diffusion.tiny import tiny_pipeline

TIMESTEPS = [0, 1, 250, 500, 999]
PROMPTS = ["a handwritten digit seven", "a photo of a red car"]


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


# ------------------------------------------------------------------------------------------------ mixture teacher
def _sd_scheduler() -> DDPMScheduler:
    return DDPMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012, clip_sample=False)


def _mixture(dim: int) -> GaussianMixture:
    if dim == 2:
        return GaussianMixture.ring(classes=8, radius=4.0, std=0.3, dim=2)
    means = 3 * torch.randn(5, dim, generator=_gen(7))  # off the ring, every coordinate used
    return GaussianMixture(means, std=0.5)


def _mixture_teacher(mixture: GaussianMixture) -> Denoiser:
    """As `models._build_mixture` builds it: SD's schedule, the exact net predicting x0."""
    process = NoiseProcess.from_scheduler_config(dict(_sd_scheduler().config, prediction_type="sample"))
    return Denoiser(MixtureDenoiserNet(mixture, process), process, prediction_type="sample")


def _alpha_sigma(t: Tensor) -> tuple[Tensor, Tensor]:
    """alpha, sigma of diffusers' own SD schedule, (B, 1), float64."""
    abar = _sd_scheduler().alphas_cumprod.double()[t].reshape(-1, 1)
    return abar.sqrt(), (1 - abar).sqrt()


def _noisy_points(mixture: GaussianMixture, t: Tensor, seed: int) -> Tensor:
    """x_t drawn from the noised mixture, plus a far-out point in the last row."""
    labels = torch.randint(0, mixture.classes, (len(t),), generator=_gen(seed))
    x0 = mixture.sample(labels, _gen(seed + 1)).double()
    alpha, sigma = _alpha_sigma(t)
    x_t = alpha * x0 + sigma * torch.randn(x0.shape, generator=_gen(seed + 2), dtype=torch.float64)
    x_t[-1] = 6.0
    return x_t


def _tweedie_x0(mixture: GaussianMixture, x_t: Tensor, t: Tensor) -> Tensor:
    """(x_t + sigma^2 grad log p_t(x_t)) / alpha with p_t the noised mixture density, by autograd."""
    alpha, sigma = _alpha_sigma(t)
    mu = mixture.means.double()
    scale = (alpha**2 * mixture.std**2 + sigma**2).sqrt()  # (B, 1)
    components = Independent(Normal(alpha[:, None, :] * mu[None], scale[:, None, :].expand(-1, *mu.shape)), 1)
    p_t = MixtureSameFamily(Categorical(logits=torch.zeros(len(t), mixture.classes, dtype=torch.float64)), components)
    x = x_t.clone().requires_grad_(True)
    (score,) = torch.autograd.grad(p_t.log_prob(x).sum(), x)
    # the same log-density by hand, with logsumexp
    sq = ((x_t[:, None, :] - alpha[:, None, :] * mu[None]) ** 2).sum(-1)
    d = mixture.dim
    by_hand = (-sq / (2 * scale**2) - d * torch.log(scale * math.sqrt(2 * math.pi))).logsumexp(-1)
    torch.testing.assert_close(p_t.log_prob(x_t), by_hand - math.log(mixture.classes), rtol=1e-10, atol=1e-10)
    return (x_t + sigma**2 * score) / alpha


def _gaussian_posterior_mean(mixture: GaussianMixture, labels: Tensor, x_t: Tensor, t: Tensor) -> Tensor:
    """E[x0 | x_t] for prior N(mu_k, s^2 I) and likelihood x_t | x0 ~ N(alpha x0, sigma^2 I): precision-weighted."""
    alpha, sigma = _alpha_sigma(t)
    mu = mixture.means.double()[labels]
    precision = 1 / mixture.std**2 + alpha**2 / sigma**2
    return (mu / mixture.std**2 + alpha * x_t / sigma**2) / precision


@pytest.mark.parametrize("dim", [2, 5])
def test_mixture_teacher_unconditional_is_tweedie(dim: int) -> None:
    mixture = _mixture(dim)
    teacher = _mixture_teacher(mixture)
    t = torch.tensor(TIMESTEPS * 4)
    x_t = _noisy_points(mixture, t, seed=dim)
    expected = _tweedie_x0(mixture, x_t, t)
    # labels None and labels -1 both mean "no class"
    for cond in (Cond(), Cond(labels=torch.full((len(t),), -1))):
        x0 = teacher(x_t.float(), t, cond)
        assert x0.shape == x_t.shape and x0.dtype == torch.float32
        torch.testing.assert_close(x0.double(), expected, rtol=1e-5, atol=1e-5)
    # one timestep for the whole batch, as an int
    for step in (0, 500, 999):
        tt = torch.full((6,), step)
        x_t = _noisy_points(mixture, tt, seed=10 + step)
        torch.testing.assert_close(teacher(x_t.float(), step, Cond()).double(), _tweedie_x0(mixture, x_t, tt),
                                   rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("dim", [2, 5])
def test_mixture_teacher_class_conditional_is_gaussian_posterior(dim: int) -> None:
    mixture = _mixture(dim)
    teacher = _mixture_teacher(mixture)
    t = torch.tensor(TIMESTEPS * 4)
    x_t = _noisy_points(mixture, t, seed=20 + dim)
    labels = torch.arange(len(t)) % mixture.classes
    expected = _gaussian_posterior_mean(mixture, labels, x_t, t)
    torch.testing.assert_close(teacher(x_t.float(), t, Cond(labels=labels)).double(), expected, rtol=1e-5, atol=1e-5)
    # a batch mixing classes and -1 takes each row's own branch
    mixed = torch.where(torch.arange(len(t)) % 3 == 0, torch.full_like(labels, -1), labels)
    out = teacher(x_t.float(), t, Cond(labels=mixed)).double()
    uncond = _tweedie_x0(mixture, x_t, t)
    torch.testing.assert_close(out, torch.where((mixed < 0)[:, None], uncond, expected), rtol=1e-5, atol=1e-5)


def test_guided_x0_mixture() -> None:
    mixture = _mixture(2)
    teacher = _mixture_teacher(mixture)
    t = torch.tensor(TIMESTEPS * 2)
    x_t = _noisy_points(mixture, t, seed=30).float()
    labels = torch.arange(len(t)) % mixture.classes
    cond = Cond(labels=labels, uncond=Cond(labels=torch.full_like(labels, -1)))
    x0_c = teacher(x_t, t, Cond(labels=labels))
    x0_u = teacher(x_t, t, Cond())
    assert (x0_c - x0_u).abs().max() > 0.1  # the two branches differ, so the check below means something
    for w in (0.0, 1.75, 4.0):
        torch.testing.assert_close(cfg_x0(teacher, x_t, t, cond, w), x0_u + w * (x0_c - x0_u), rtol=1e-5,
                                   atol=1e-5)
    assert torch.equal(cfg_x0(teacher, x_t, t, cond, 1.0), teacher(x_t, t, cond))
    assert torch.equal(cfg_x0(teacher, x_t, t, Cond(labels=labels), 1.0), x0_c)  # w = 1 needs no uncond
    with pytest.raises(ValueError, match="uncond"):
        cfg_x0(teacher, x_t, t, Cond(labels=labels), 2.0)


# ------------------------------------------------------------------------------------------------ tiny SD UNets
@cache
def _pipe(kind: str) -> DiffusionPipeline:
    return tiny_pipeline(kind)


def _conditioner(pipe: DiffusionPipeline) -> TextConditioner:
    """As `models._build_diffusers` builds it."""
    if type(pipe).__name__ == "StableDiffusionXLPipeline":
        size = pipe.unet.config.sample_size * 2 ** (len(pipe.vae.config.block_out_channels) - 1)
        return TextConditioner([pipe.tokenizer, pipe.tokenizer_2], [pipe.text_encoder, pipe.text_encoder_2],
                               sdxl=True, force_zeros_for_empty_prompt=pipe.config.force_zeros_for_empty_prompt,
                               image_size=(size, size))
    return TextConditioner([pipe.tokenizer], [pipe.text_encoder])


def _unet_out(pipe: DiffusionPipeline, x_t: Tensor, t: Tensor, cond: Cond) -> Tensor:
    added = None if cond.pooled is None else {"text_embeds": cond.pooled, "time_ids": cond.time_ids}
    with torch.no_grad():
        return pipe.unet(x_t, t, encoder_hidden_states=cond.embeds, added_cond_kwargs=added).sample


def _x0_by_hand(pipe: DiffusionPipeline, out: Tensor, x_t: Tensor, t: Tensor) -> Tensor:
    abar = pipe.scheduler.alphas_cumprod.double()[t].reshape(-1, 1, 1, 1)
    alpha, sigma = abar.sqrt(), (1 - abar).sqrt()
    out, x_t = out.double(), x_t.double()
    if pipe.scheduler.config.prediction_type == "v_prediction":
        return alpha * x_t - sigma * out
    return (x_t - sigma * out) / alpha


def _latents(pipe: DiffusionPipeline, n: int, seed: int) -> Tensor:
    c, s = pipe.unet.config.in_channels, pipe.unet.config.sample_size
    return torch.randn(n, c, s, s, generator=_gen(seed))


@pytest.mark.parametrize(("kind", "prediction_type"), [("sd15", "epsilon"), ("sd21", "v_prediction"),
                                                       ("sdxl", "epsilon")])
def test_unet_denoiser_matches_diffusers(kind: str, prediction_type: str) -> None:
    pipe = _pipe(kind)
    process = NoiseProcess.from_scheduler(pipe.scheduler)
    assert (process.kind, process.prediction_type) == ("vp", prediction_type)
    denoiser = Denoiser(pipe.unet, process)
    cond = _conditioner(pipe).encode(PROMPTS * 2)
    t = torch.tensor([999, 500, 1, 0])
    x_t = _latents(pipe, 4, seed=1)
    with torch.no_grad():
        x0 = denoiser(x_t, t, cond)
        raw = denoiser.raw(x_t, t, cond)
    out = _unet_out(pipe, x_t, t, cond)
    torch.testing.assert_close(raw, out, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(x0.double(), _x0_by_hand(pipe, out, x_t, t), rtol=1e-5, atol=1e-5)
    # a scalar timestep is broadcast over the batch
    with torch.no_grad():
        x0_500 = denoiser(x_t, 500, cond)
    torch.testing.assert_close(x0_500.double(), _x0_by_hand(pipe, _unet_out(pipe, x_t, torch.full((4,), 500), cond),
                                                            x_t, torch.full((4,), 500)), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("kind", ["sd15", "sd21", "sdxl"])
def test_guided_x0_equals_guidance_of_native_prediction(kind: str) -> None:
    """CFG in x0 space equals CFG on epsilon / v, as the diffusers pipelines apply it."""
    pipe = _pipe(kind)
    denoiser = Denoiser(pipe.unet, NoiseProcess.from_scheduler(pipe.scheduler))
    cond = _conditioner(pipe).encode(PROMPTS)
    t = torch.tensor([749, 249])
    x_t = _latents(pipe, 2, seed=2)
    w = 5.0
    out_c = _unet_out(pipe, x_t, t, cond)
    out_u = _unet_out(pipe, x_t, t, cond.uncond)
    expected = _x0_by_hand(pipe, out_u + w * (out_c - out_u), x_t, t)
    with torch.no_grad():
        guided = cfg_x0(denoiser, x_t, t, cond, w)
        plain = denoiser(x_t, t, cond)
        unguided = cfg_x0(denoiser, x_t, t, cond, 1.0)
    torch.testing.assert_close(guided.double(), expected, rtol=1e-4, atol=1e-4)
    assert torch.equal(unguided, plain)
    assert (guided - plain).abs().max() > 1e-2


@pytest.mark.parametrize("kind", ["sd15", "sd21"])
def test_text_conditioner_matches_sd_encode_prompt(kind: str) -> None:
    pipe = _pipe(kind)
    cond = _conditioner(pipe).encode(PROMPTS)
    embeds, negative = pipe.encode_prompt(PROMPTS, torch.device("cpu"), 1, True, negative_prompt=None)
    assert cond.pooled is None and cond.time_ids is None
    torch.testing.assert_close(cond.embeds, embeds, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(cond.uncond.embeds, negative, rtol=1e-6, atol=1e-6)
    assert not torch.allclose(cond.embeds[0], cond.embeds[1])


def test_text_conditioner_matches_sdxl_encode_prompt() -> None:
    pipe = _pipe("sdxl")
    cond = _conditioner(pipe).encode(PROMPTS)
    embeds, negative, pooled, negative_pooled = pipe.encode_prompt(
        PROMPTS, device=torch.device("cpu"), num_images_per_prompt=1, do_classifier_free_guidance=True,
        negative_prompt=None,
    )
    assert pipe.config.force_zeros_for_empty_prompt
    torch.testing.assert_close(cond.embeds, embeds, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(cond.pooled, pooled, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(cond.uncond.embeds, negative, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(cond.uncond.pooled, negative_pooled, rtol=1e-6, atol=1e-6)
    assert not negative.any() and not negative_pooled.any()
    # the pipeline's default size: default_sample_size * vae_scale_factor, no crop
    size = pipe.default_sample_size * pipe.vae_scale_factor
    time_ids = pipe._get_add_time_ids((size, size), (0, 0), (size, size), dtype=embeds.dtype,
                                      text_encoder_projection_dim=pipe.text_encoder_2.config.projection_dim)
    assert time_ids.tolist() == [[16, 16, 0, 0, 16, 16]]
    torch.testing.assert_close(cond.time_ids, time_ids.repeat(len(PROMPTS), 1), rtol=0, atol=0)
    torch.testing.assert_close(cond.uncond.time_ids, cond.time_ids, rtol=0, atol=0)


# ------------------------------------------------------------------------------------------------ Cond
def _cond(n: int = 4) -> Cond:
    """Every field set, the unconditional branch holding the negated values so rows can be told apart."""
    embeds = torch.arange(n * 3 * 2, dtype=torch.float32).reshape(n, 3, 2)
    pooled = torch.arange(n * 5, dtype=torch.float32).reshape(n, 5) + 100
    time_ids = torch.arange(n, dtype=torch.float32)[:, None].expand(n, 6).clone()
    labels = torch.arange(n)
    uncond = Cond(embeds=-embeds, pooled=-pooled, time_ids=-time_ids, labels=-1 - labels)
    return Cond(embeds=embeds, pooled=pooled, time_ids=time_ids, labels=labels, uncond=uncond)


def _aligned(cond: Cond, rows: list[int]) -> None:
    """Both branches hold the original rows `rows`, in this order."""
    full = _cond()
    idx = torch.tensor(rows)
    for branch, ref in ((cond, full), (cond.uncond, full.uncond)):
        for name in ("embeds", "pooled", "time_ids", "labels"):
            assert torch.equal(getattr(branch, name).to(getattr(ref, name).dtype), getattr(ref, name)[idx]), name


def test_cond_indexing_keeps_uncond_aligned() -> None:
    cond = _cond()
    assert cond.batch_size == 4
    _aligned(cond[1:3], [1, 2])
    _aligned(cond[torch.tensor([3, 0])], [3, 0])
    _aligned(cond[torch.tensor([False, True, False, True])], [1, 3])
    assert cond[2:3].batch_size == 1 and cond[2:3].uncond.batch_size == 1


def test_cond_cat_and_repeat_keep_uncond_aligned() -> None:
    cond = _cond()
    _aligned(Cond.cat([cond[2:], cond[:1], cond[1:2]]), [2, 3, 0, 1])
    _aligned(cond.repeat(3), [0, 0, 0, 1, 1, 1, 2, 2, 2, 3, 3, 3])
    _aligned(cond[1:3].repeat(2), [1, 1, 2, 2])
    labels_only = Cond(labels=torch.tensor([4, 5]))
    assert Cond.cat([labels_only, labels_only]).labels.tolist() == [4, 5, 4, 5]
    assert Cond.cat([labels_only, labels_only]).uncond is None and labels_only.repeat(2).embeds is None


def test_cond_to_casts_floats_only_in_both_branches() -> None:
    moved = _cond().to("cpu", torch.float64)
    for branch in (moved, moved.uncond):
        assert branch.embeds.dtype == branch.pooled.dtype == branch.time_ids.dtype == torch.float64
        assert branch.labels.dtype == torch.int64
    _aligned(moved, [0, 1, 2, 3])
    assert _cond().to("cpu").embeds.dtype == torch.float32


def test_class_conditional_unet2dmodel_through_labels() -> None:
    """UNet2DModel (pixel, class-conditional) sees cond.labels as class_labels; v-prediction converts to x0."""
    from diffusers import UNet2DModel

    with torch.random.fork_rng():
        torch.manual_seed(0)
        unet = UNet2DModel(sample_size=8, in_channels=3, out_channels=3, block_out_channels=(32, 64),
                           layers_per_block=1, down_block_types=("DownBlock2D", "AttnDownBlock2D"),
                           up_block_types=("AttnUpBlock2D", "UpBlock2D"), num_class_embeds=10).eval()
    process = NoiseProcess.from_scheduler_config(dict(_sd_scheduler().config, prediction_type="v_prediction"))
    denoiser = Denoiser(unet, process)
    x_t, t, labels = torch.randn(3, 3, 8, 8, generator=_gen(3)), torch.tensor([999, 400, 3]), torch.tensor([1, 7, 7])
    with torch.no_grad():
        x0 = denoiser(x_t, t, Cond(labels=labels))
        v = unet(x_t, t, class_labels=labels).sample
        other = denoiser(x_t, t, Cond(labels=torch.tensor([2, 2, 2])))
    abar = process.alphas_cumprod[t].float().reshape(-1, 1, 1, 1)
    torch.testing.assert_close(x0, abar.sqrt() * x_t - (1 - abar).sqrt() * v, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(x0, other)  # the labels reach the network
