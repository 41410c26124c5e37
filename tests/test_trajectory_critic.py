"""Issue 27's pieces, each pinned so a wrong sign, weight or range fails:

- the step-aware critic: on every network it supports (tiny SD 1.5, SDXL, SD3, Flux, the mixture MLP) it starts as
  exactly the network it was copied from, reads the step once its embedding is non-zero, leaves a LoRA critic's
  shared teacher untouched, and the score family hands it the step of each sample;
- ``step_times: own``: each step's noise levels lie in its own interval [t_{k+1}, t_k] (through a flow shift too);
  ``above``: in [t_{k+1}, t_max]; ``step_draw: sample``: each row rolled out to its own step, every update seeing
  every step;
- decoupled guidance: at one shared noise level the two terms add up to DMD2's gradient exactly; the guidance
  term's sign and its (w - 1) weight are checked against the teacher's own guided estimate;
- the trajectory regression (``ode_weight``): its gradient, against the guided teacher's DDIM from each row's own
  input written out by hand, on the rows of its steps only.
"""

from __future__ import annotations

import pytest
import torch
from conftest import make_config

from distill_diffusion import step_aware
from distill_diffusion.denoiser import Cond
from distill_diffusion.errors import ConfigError
from distill_diffusion.trainer import Trainer

FOUR = [999, 749, 499, 249]


def mixture_trainer(method: str = "dmd2", timesteps: list[int] = FOUR, **args: object) -> Trainer:
    return Trainer(make_config(method, args={"critic_updates": 1, **args}, model={"timesteps": timesteps}))


@pytest.mark.parametrize("kind", ["sd15", "sdxl", "sd3", "flux", "sana", "sd15-lora"])
def test_a_step_aware_critic_starts_as_its_network_and_reads_the_step(kind: str, tiny_dirs: dict[str, str]) -> None:
    base = kind.removesuffix("-lora")
    vp = base in ("sd15", "sdxl")
    model = {"timesteps": FOUR if vp else [1000, 750, 500, 250]}
    if kind.endswith("lora"):
        model["critic_lora_rank"] = 4
    cfg = make_config("dmd2", tiny_dirs[base], args={"critic_steps": "conditioned"}, model=model,
                      data={"prompts": ["a red car"]})
    trainer = Trainer(cfg)
    models = trainer.models
    critic = models.critic
    assert isinstance(critic.step_embed, step_aware.StepEmbedding) and critic.step_embed.table.num_embeddings == 4
    assert "step_embed.table.weight" in dict(critic.named_parameters())
    cond = models.text.encode(["a red car", "a blue bird"])
    x = torch.randn(2, *models.sample_shape, generator=torch.Generator().manual_seed(0))
    t = torch.tensor([800.0, 300.0])
    stepped = [step_aware.with_student_step(cond, k, 2) for k in (0, 3)]
    with torch.no_grad():
        plain = critic(x, t, cond)
        for c in stepped:  # zero rows: exactly the critic without the step
            torch.testing.assert_close(critic(x, t, c), plain, atol=1e-6, rtol=1e-6)
        torch.nn.init.normal_(critic.step_embed.table.weight, 0, 0.5, generator=torch.Generator().manual_seed(1))
        a, b = (critic(x, t, c) for c in stepped)
        teacher = models.teacher.x0(x, t, stepped[1])  # the teacher ignores the step, shared network or not
        torch.testing.assert_close(critic(x, t, cond), plain, atol=1e-6, rtol=1e-6)
    assert (a - b).abs().max() > 1e-3
    assert (teacher - models.teacher.x0(x, t, cond)).abs().max() == 0


def test_the_score_family_gives_the_critic_the_step_of_each_sample(monkeypatch: pytest.MonkeyPatch) -> None:
    """The critic's loss and the student's loss both read the step that made the sample (checked on what the critic
    network is called with), for every step the rollout draws."""
    trainer = mixture_trainer(critic_steps="conditioned")
    method, critic = trainer.method, trainer.models.critic
    seen: list[tuple[int, int]] = []
    forward = type(critic).forward

    def spy(self, x_t, t, cond):  # noqa: ANN001, ANN202
        if self is critic:
            seen.append((int(cond.student_step.unique().item()), int(t.min()), int(t.max())))
        return forward(self, x_t, t, cond)

    monkeypatch.setattr(type(critic), "forward", spy)
    drawn: list[int] = []
    sample_step = type(method).sample_step

    def record(self, batch, generator, grad):  # noqa: ANN001, ANN202
        x, k = sample_step(self, batch, generator, grad)
        drawn.append(k)
        return x, k

    monkeypatch.setattr(type(method), "sample_step", record)
    gen = torch.Generator().manual_seed(0)
    for step in range(16):
        batch = trainer.data.sample(64, gen)
        method.loss(method.phase(step), batch, gen, step)
    assert [s for s, _, _ in seen] == drawn and len(set(drawn)) > 1


@pytest.mark.parametrize("kind", ["sdxl", "sd3", "flux"])
def test_a_step_per_row_trains_on_every_text_conditioned_network(kind: str, tiny_dirs: dict[str, str]) -> None:
    """``step_draw: sample`` on the GPU TDM configs' networks: every row's conditioning (prompt embeddings, pooled
    embeddings, SDXL's time ids) follows it through the per-row rollout, and one student and one critic update run."""
    grid = FOUR if kind == "sdxl" else [1000, 750, 500, 250]
    cfg = make_config("tdm", tiny_dirs[kind], args={"step_draw": "sample", "critic_updates": 1, "teacher_cfg": 2.0},
                      model={"timesteps": grid}, data={"prompts": ["a red car", "a blue bird"]})
    trainer = Trainer(cfg)
    gen = torch.Generator().manual_seed(0)
    batch = trainer.data.sample(4, gen)
    for step in (0, 1):
        loss, _ = trainer.method.loss(trainer.method.phase(step), batch, gen, step)
        assert loss.isfinite()
    assert torch.equal(trainer.method.draw_step(batch, gen), torch.arange(4))


def test_a_step_per_row_rolls_each_row_out_to_its_own_step() -> None:
    """`Student.rollout` with a (B,) step tensor: every row at one step k is exactly the one-step-for-all rollout; in
    a mixed batch a step-0 row stays pure noise, every row carries its own step's timestep, and a step-j row is its
    step-(j-1) input's x0 re-noised, with the draws of the rows still rolling out."""
    trainer = mixture_trainer()
    student, process = trainer.models.student, trainer.models.process
    batch = trainer.data.sample(8, torch.Generator().manual_seed(1))
    for k in range(4):
        want = student.rollout(batch.noise, batch.cond, k, torch.Generator().manual_seed(2))
        got = student.rollout(batch.noise, batch.cond, torch.full((8,), k), torch.Generator().manual_seed(2))
        torch.testing.assert_close(got[0], want[0], rtol=0, atol=0)
        assert torch.equal(got[1], want[1])
    ks = torch.tensor([0, 0, 1, 1, 2, 2, 3, 3])
    x, t = student.rollout(batch.noise, batch.cond, ks, torch.Generator().manual_seed(2))
    assert torch.equal(t, torch.tensor(FOUR)[ks])
    torch.testing.assert_close(x[:2], batch.noise[:2], rtol=0, atol=0)
    gen = torch.Generator().manual_seed(2)  # replay: step 0 moves rows 2..7, step 1 rows 4..7, step 2 rows 6, 7
    eps = torch.randn((6, 2), generator=gen)
    with torch.no_grad():
        x0 = student(batch.noise[2:], torch.full((6,), FOUR[0]), batch.cond[2:])
    step1 = process.add_noise(x0, eps, torch.full((6,), FOUR[1]))
    torch.testing.assert_close(x[2:4], step1[:2])
    eps = torch.randn((4, 2), generator=gen)
    with torch.no_grad():
        x0 = student(step1[2:], torch.full((4,), FOUR[1]), batch.cond[4:])
    torch.testing.assert_close(x[4:6], process.add_noise(x0, eps, torch.full((4,), FOUR[2]))[:2])


@pytest.mark.parametrize("method", ["dmd2", "sid", "vsd"])
def test_step_draw_sample_gives_every_update_every_step_each_in_its_interval(
        method: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """``step_draw: sample``: every critic call of every update (the critic's loss and the student's) sees all four
    steps in equal shares, each row read at its own step and noised inside that step's own interval."""
    trainer = mixture_trainer(method, critic_steps="conditioned", step_times="own", step_draw="sample")
    method_, critic = trainer.method, trainer.models.critic
    ends = [*FOUR, 0]
    calls: list[tuple[torch.Tensor, torch.Tensor]] = []
    forward = type(critic).forward

    def spy(self, x_t, t, cond):  # noqa: ANN001, ANN202
        if self is critic and cond.student_step is not None:
            calls.append((cond.student_step.clone(), t.clone()))
        return forward(self, x_t, t, cond)

    monkeypatch.setattr(type(critic), "forward", spy)
    gen = torch.Generator().manual_seed(0)
    for step in range(4):
        method_.loss(method_.phase(step), trainer.data.sample(64, gen), gen, step)
    assert len(calls) >= 4
    for steps, t in calls:
        assert torch.equal(steps.bincount(minlength=4), torch.full((4,), len(t) // 4))
        lo = torch.tensor(ends[1:])[steps].clamp_min(0)
        hi = torch.tensor(ends[:4])[steps]
        assert bool(((t >= lo) & (t <= hi)).all()), (steps, t)


@pytest.mark.parametrize("times", ["own", "above", "own_last_full"])
@pytest.mark.parametrize(("kind", "shift"), [("vp", 1.0), ("flow", 1.0), ("flow", 3.0)])
def test_own_step_times_stay_inside_each_steps_interval(kind: str, shift: float, times: str) -> None:
    """own: [t_{k+1}, t_k]; above: [t_{k+1}, t_max]; own_last_full: own, the last step over the whole range; each
    within the loss's own range."""
    timesteps = FOUR if kind == "vp" else [1000, 750, 500, 250]
    trainer = Trainer(make_config("dmd2", args={"step_times": times, "t_shift": shift},
                                  model={"timesteps": timesteps, "gmm_process": kind}))
    method, gen = trainer.method, torch.Generator().manual_seed(0)
    x = torch.zeros(4000, 2)
    ends = [*timesteps, 0]

    def shifted(u: float) -> float:  # the loss ranges are fractions before the flow shift, as without step_times
        return 1000 * shift * u / (1 + (shift - 1) * u)

    for k in range(4):
        for critic in (False, True):
            _, t, _ = method.noised_at(x, k, gen, critic=critic)
            lo = max(ends[k + 1], shifted(0.0 if critic else 0.02))
            hi = shifted(1.0 if critic else 0.98)
            hi = hi if times == "above" or (times == "own_last_full" and k == 3) else min(ends[k], hi)
            assert t.min() >= lo - 1e-3 and t.max() <= hi + 1e-3, (k, critic, t.min(), t.max())
            assert t.min() < lo + 0.05 * (hi - lo) and t.max() > hi - 0.05 * (hi - lo)  # and fill it
    full = Trainer(make_config("dmd2", model={"timesteps": timesteps, "gmm_process": kind}))
    _, t, _ = full.method.noised_at(x, 3, gen)
    assert t.max() > 900  # step_times full: every step over the whole range (DMD2)


def test_decoupled_guidance_at_one_noise_level_is_dmd2(monkeypatch: pytest.MonkeyPatch) -> None:
    """Both terms at the same (x_t, t): the decoupled gradient equals DMD2's with the guided teacher, to 1e-10. The
    guidance term alone is -(w - 1)(x0_c - x0_u) / norm (its sign and weight), checked against the teacher."""
    from distill_diffusion.methods import dmd2 as dmd2_module

    grads = {}
    for times in ("shared", "decoupled"):
        trainer = mixture_trainer(timesteps=[999], teacher_cfg=2.5, cfg_times=times, critic_updates=1)
        method = trainer.method
        with torch.no_grad():  # a critic away from the teacher
            weight = trainer.models.critic.net.out.weight
            torch.nn.init.normal_(weight, 0, 0.3, generator=torch.Generator().manual_seed(2))
        gen = torch.Generator().manual_seed(0)
        batch = trainer.data.sample(32, gen)
        x_t = torch.randn(32, 2, generator=torch.Generator().manual_seed(3))
        t = torch.full((32,), 600)
        fixed = (x_t, t, x_t)
        monkeypatch.setattr(type(method), "noised_at", lambda self, x, k, g, critic=False, fixed=fixed: fixed)
        monkeypatch.setattr(dmd2_module, "noised_groups", lambda *a, fixed=fixed: fixed)
        x = trainer.models.student(batch.noise, torch.full((32,), 999), batch.cond).detach().requires_grad_(True)
        monkeypatch.setattr(type(method), "score_sample", lambda self, b, g, grad, x=x: (x, b.cond, 0))
        loss, _ = method.student_loss(batch, gen)
        (grads[times],) = torch.autograd.grad(loss, x)
        if times == "decoupled":
            term = method.guidance_term(x.detach(), 0, batch, gen)
            c, u = batch.cond, Cond(labels=torch.full((32,), -1))
            x0_c, x0_u = (trainer.models.teacher.x0(x_t, t, cond).double() for cond in (c, u))
            guided = trainer.models.teacher.x0(x_t, t, c, 2.5).double()
            norm = (x.detach().double() - guided).abs().mean(1, keepdim=True)
            torch.testing.assert_close(term, -(2.5 - 1) * (x0_c - x0_u) / norm, atol=1e-5, rtol=1e-5)
        monkeypatch.undo()
    torch.testing.assert_close(grads["decoupled"], grads["shared"], atol=1e-7, rtol=1e-6)


def test_decoupled_guidance_is_never_noisier_than_each_rows_step(monkeypatch: pytest.MonkeyPatch) -> None:
    """The guidance term's own level tau ~ U[t_min, t_k] for each row's step k (one k for the batch, or one per row
    with ``step_draw: sample``), filling that range."""
    trainer = mixture_trainer(cfg_times="decoupled", teacher_cfg=2.0)
    method, teacher = trainer.method, trainer.models.teacher
    seen: list[torch.Tensor] = []
    x0 = type(teacher).x0

    def spy(self, x_t, t, cond, cfg_scale=1.0):  # noqa: ANN001, ANN202
        seen.append(t.clone())
        return x0(self, x_t, t, cond, cfg_scale)

    monkeypatch.setattr(type(teacher), "x0", spy)
    gen = torch.Generator().manual_seed(0)
    batch = trainer.data.sample(4000, gen)
    ks = torch.arange(4000) * 4 // 4000
    for k in (ks, 3):
        seen.clear()
        method.guidance_term(batch.noise, k, batch, gen)
        t = seen[0][:4000]  # the unconditional half; the conditional half repeats it
        tops = torch.tensor(FOUR)[ks] if isinstance(k, torch.Tensor) else torch.full((4000,), FOUR[k])
        assert bool(((t >= 20) & (t <= tops)).all())
        for top in tops.unique():
            rows = t[tops == top]
            assert rows.min() < 20 + 0.05 * (top - 20) and rows.max() > top - 0.05 * (top - 20)


@pytest.mark.parametrize("bad", [
    {"critic_steps": "per_step"},
    {"step_times": "mine"},
    {"cfg_times": "apart"},
    {"step_draw": "row"},
    {"ode_weight": -1.0},
    {"ode_steps": 0},
    {"f_divergence": "tv"},
    {"f_divergence": "js"},  # no GAN head to estimate r
    {"f_ratio_clip": [2.0, 20.0], "f_divergence": "js", "gan_critic_weight": 1e-2},
])
def test_bad_trajectory_settings_are_refused_in_one_line(bad: dict) -> None:
    with pytest.raises(ConfigError) as e:
        make_config("dmd2", args=bad)
    assert "\n" not in str(e.value)


def test_step_settings_a_student_cannot_use_are_refused() -> None:
    with pytest.raises(ConfigError, match="backward_simulation"):
        mixture_trainer(critic_steps="conditioned", backward_simulation=False)
    with pytest.raises(ConfigError, match="decoupled"):
        make_config("sid", args={"cfg_times": "decoupled"})
    with pytest.raises(ConfigError, match="no timesteps"):  # the last step's interval lies below t_min
        mixture_trainer(timesteps=[999, 10], step_times="own", t_min=0.05)
    with pytest.raises(ConfigError, match="ode_weight"):  # SiD's loss has no scale a mean squared distance matches
        make_config("sid", args={"ode_weight": 1.0})
    for bad in ({"ode_from_step": 4}, {"backward_simulation": False}):  # no step of the student takes the term
        with pytest.raises(ConfigError, match="ode_from_step"):
            mixture_trainer(ode_weight=1.0, **bad)


def test_multistep_outputs_are_each_steps_prediction_of_the_sampler() -> None:
    """`Student.step_outputs` (`sampling.multistep_outputs`; bench/digits_steps.py, the mixture's per-step metrics):
    step k's entry is the student's x0 at the input its rollout gives step k with the same draws, and the last is its
    sample."""
    models = mixture_trainer().models
    student = models.student
    torch.nn.init.normal_(next(student.parameters()), 0, 0.3, generator=torch.Generator().manual_seed(3))
    cond = Cond(labels=models.mixture.balanced_labels(8))
    noise = torch.randn(8, models.mixture.dim, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        out = student.step_outputs(noise, cond, torch.Generator().manual_seed(2))
        assert len(out) == 4
        for k in range(4):
            x, t = student.rollout(noise, cond, k, torch.Generator().manual_seed(2))
            torch.testing.assert_close(out[k], student(x, t, cond))
        torch.testing.assert_close(out[-1], student.sample(noise, cond, torch.Generator().manual_seed(2)))
    assert (out[0] - out[1]).abs().max() > 1e-3  # the steps differ: not one prediction repeated


def hand_ode(teacher, x: torch.Tensor, t0: int, cond: Cond, w: float, n: int) -> torch.Tensor:  # noqa: ANN001
    """The guided teacher's DDIM from (x, t0) to the clean end in n uniform steps, written out."""
    from distill_diffusion.process import NoiseProcess

    process: NoiseProcess = teacher.denoiser.process
    grid = [round(t0 * (1 - j / n)) for j in range(n)] + [0]
    for a, b in zip(grid[:-1], grid[1:]):
        t = torch.full((len(x),), a)
        x0 = teacher.x0(x, t, cond, w)
        if b == 0:
            return x0
        alpha, sigma = process.alpha_sigma(t, x)
        alpha_b, sigma_b = process.alpha_sigma(torch.full((len(x),), b), x)
        x = alpha_b * x0 + sigma_b * (x - alpha * x0) / sigma
    raise AssertionError("unreachable")


@pytest.mark.parametrize("method", ["dmd2", "vsd"])
def test_the_trajectory_term_pulls_late_steps_toward_the_teachers_ode_from_their_input(method: str) -> None:
    """``ode_weight``: the student gradient gains w_ode (x - ODE(x_in)) / mean|x - ODE(x_in)| / numel on the rows of
    step k >= ode_from_step, ODE the guided teacher's DDIM from each row's own rollout input in ode_steps steps, and
    nothing on the earlier rows; the rest of the student's loss is unchanged (the same draws)."""
    grads, inputs = {}, {}
    for weight in (0.0, 0.7):
        trainer = mixture_trainer(method, teacher_cfg=2.0, step_draw="sample", ode_weight=weight, ode_steps=3,
                                  ode_from_step=2)
        with torch.no_grad():  # a student away from the teacher, the same in both runs
            torch.nn.init.normal_(trainer.models.student.denoiser.net.out.weight, 0, 0.3,
                                  generator=torch.Generator().manual_seed(2))
        gen = torch.Generator().manual_seed(0)
        batch = trainer.data.sample(16, gen)
        method_ = trainer.method
        x_seen = []
        forward = type(trainer.models.student).forward

        def keep(self, x_t, t, cond, forward=forward, x_seen=x_seen):  # noqa: ANN001, ANN202
            out = forward(self, x_t, t, cond)
            if torch.is_grad_enabled() and out.requires_grad:
                out.retain_grad()
                x_seen.append(out)
            return out

        type(trainer.models.student).forward = keep
        try:
            loss, logs = method_.student_loss(batch, gen)
        finally:
            type(trainer.models.student).forward = forward
        (x,) = x_seen
        loss.backward()
        grads[weight] = x.grad.clone()
        inputs[weight] = (x.detach(), *method_.student_input, batch, trainer.models.teacher)
    x, x_in, t_in, batch, teacher = inputs[0.7]
    torch.testing.assert_close(inputs[0.0][1], x_in, rtol=0, atol=0)  # the same rollout
    ks = torch.arange(16) * 4 // 16
    assert torch.equal(t_in, torch.tensor(FOUR)[ks])
    want = torch.zeros_like(x)
    for k in (2, 3):
        rows = ks == k
        target = hand_ode(teacher, x_in[rows], FOUR[k], batch.cond[rows], 2.0, 3)
        diff = x[rows] - target
        want[rows] = 0.7 * diff / diff.abs().mean(1, keepdim=True) / x.numel()
    torch.testing.assert_close(grads[0.7] - grads[0.0], want, atol=1e-6, rtol=1e-4)
    assert want[ks >= 2].abs().min() > 0
