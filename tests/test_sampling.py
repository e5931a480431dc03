"""cascade_rt.sampling against diffusers' DDPMWuerstchenScheduler and the official GDF formulas.

Tolerances:
- diffusers recipe: the loop of StableCascade{Prior,Decoder}Pipeline run with diffusers' own
  scheduler and randn_tensor, same generators: within 1e-6 max abs (observed 0: the plan mirrors
  diffusers' op order, so fp32 and bf16 runs are bit-identical), and the generators end in the
  same state.
- stability recipe: a² and model r within 1e-3 of the measured tables of ARCHITECTURE.md §7.1
  (printed to 3-4 digits; observed 5e-5); our fp32 loop within 2e-5 relative (to the result's
  max) of a float64 loop written from the §7.1 formulas (observed <= 1.5e-6: the first step
  amplifies fp32 rounding by 1/a = 100); CFG-rescale within 1e-6 relative (observed 1e-7).
"""

from __future__ import annotations

import math

import pytest
import torch

from cascade_rt.sampling import (
    DDPMWuerstchen,
    SamplingPlan,
    StabilityGDF,
    draw_noise,
    make_sampler,
    update,
)

diffusers = pytest.importorskip("diffusers")
from diffusers.utils.torch_utils import randn_tensor  # noqa: E402

SHAPE = (4, 5, 6)  # [C, H, W] of the test latents


def fake_eps(x: torch.Tensor, r: torch.Tensor) -> torch.Tensor:
    """A deterministic stand-in for the UNet that depends on x and r; rows of the second half of
    a doubled batch are shifted so that cond and uncond differ. Roughly eps-like (~x), so
    samples stay O(1) through the loop."""
    rr = r.view(-1, 1, 1, 1).to(x.dtype)
    eps = x * (0.5 + 0.5 * rr) + 0.1 * torch.tanh(3 * x * (1 - rr))
    half = torch.arange(x.shape[0], device=x.device).view(-1, 1, 1, 1) < x.shape[0] // 2
    return eps + 0.05 * half.to(x.dtype)


def make_generator(kind: str, batch: int, seed: int) -> torch.Generator | list[torch.Generator]:
    if kind == "single":
        return torch.Generator().manual_seed(seed)
    if kind == "list1":
        return [torch.Generator().manual_seed(seed)]
    return [torch.Generator().manual_seed(seed + b) for b in range(batch)]


def generator_states(gen: torch.Generator | list[torch.Generator]) -> list[torch.Tensor]:
    return [g.get_state() for g in (gen if isinstance(gen, list) else [gen])]


# ----------------------------------------------------------------------------- draw_noise


@pytest.mark.parametrize("kind", ["single", "list", "list1"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_draw_noise_matches_randn_tensor(kind: str, dtype: torch.dtype) -> None:
    shape = (3, *SHAPE)
    g_ref, g_ours = make_generator(kind, 3, 7), make_generator(kind, 3, 7)
    ref = randn_tensor(shape, generator=g_ref, device=torch.device("cpu"), dtype=dtype)
    ours = draw_noise(shape, g_ours, "cpu", dtype)
    assert ours.dtype == dtype and torch.equal(ours, ref)
    for a, b in zip(generator_states(g_ref), generator_states(g_ours), strict=True):
        assert torch.equal(a, b)


def test_draw_noise_global_rng_and_long_list() -> None:
    shape = (2, *SHAPE)
    torch.manual_seed(3)
    ref = randn_tensor(shape, device=torch.device("cpu"), dtype=torch.float32)
    torch.manual_seed(3)
    assert torch.equal(draw_noise(shape, None, "cpu", torch.float32), ref)
    # A list longer than the batch: diffusers uses its first entries and leaves the rest alone.
    g_ref, g_ours = make_generator("list", 4, 1), make_generator("list", 4, 1)
    ref = randn_tensor(shape, generator=g_ref, device=torch.device("cpu"), dtype=torch.float32)
    assert torch.equal(draw_noise(shape, g_ours, "cpu", torch.float32), ref)
    for a, b in zip(generator_states(g_ref), generator_states(g_ours), strict=True):
        assert torch.equal(a, b)


def test_draw_noise_cpu_generator_for_another_device() -> None:
    """A CPU generator for a non-CPU device draws on the CPU; `meta` stands in for CUDA here."""
    shape = (2, *SHAPE)
    g_ref, g_ours = torch.Generator().manual_seed(5), torch.Generator().manual_seed(5)
    ref = randn_tensor(shape, generator=g_ref, device=torch.device("meta"), dtype=torch.float32)
    ours = draw_noise(shape, g_ours, "meta", torch.float32)
    assert ours.device.type == "meta" and ours.shape == ref.shape
    assert torch.equal(g_ours.get_state(), g_ref.get_state())
    assert not torch.equal(g_ours.get_state(), torch.Generator().manual_seed(5).get_state())


def test_draw_noise_too_few_generators() -> None:
    with pytest.raises(ValueError, match="2 generators for a batch of 3"):
        draw_noise((3, *SHAPE), make_generator("list", 2, 0), "cpu", torch.float32)


# ----------------------------------------------------------------------------- diffusers recipe


def diffusers_loop(
    scheduler, steps: int, batch: int, dtype: torch.dtype, guidance: float, generator
) -> torch.Tensor:
    """StableCascadePriorPipeline's loop (prepare_latents, t.expand(B).to(dtype), lerp, step)."""
    scheduler.set_timesteps(steps, device=torch.device("cpu"))
    shape = (batch, *SHAPE)
    x = randn_tensor(shape, generator=generator, device=torch.device("cpu"), dtype=dtype)
    x = x * scheduler.init_noise_sigma
    for t in scheduler.timesteps[:-1]:
        r = t.expand(batch).to(dtype)
        if guidance > 1:
            eps_c, eps_u = fake_eps(torch.cat([x, x]), torch.cat([r, r])).chunk(2)
            eps = torch.lerp(eps_u, eps_c, guidance)
        else:
            eps = fake_eps(x, r)
        x = scheduler.step(model_output=eps, timestep=r, sample=x, generator=generator).prev_sample
    return x


def our_loop(sampler, steps: int, batch: int, dtype: torch.dtype, guidance: float, generator):
    plan = sampler.plan(steps, "cpu", dtype)
    x = sampler.initial_noise(plan, (batch, *SHAPE), generator)
    for i in range(plan.num_steps):
        r = plan.model_r[i].expand(batch)
        if sampler.guidance_enabled(guidance):
            eps_c, eps_u = fake_eps(torch.cat([x, x]), torch.cat([r, r])).chunk(2)
            eps = sampler.guide(eps_c, eps_u, guidance)
        else:
            eps = fake_eps(x, r)
        noise = draw_noise(x.shape, generator, plan.device, plan.latent_dtype)
        x = sampler.step(plan, i, x, eps, noise)
    return x


@pytest.mark.parametrize("steps", [1, 2, 10, 20])
@pytest.mark.parametrize("batch", [1, 3])
@pytest.mark.parametrize("kind", ["single", "list"])
@pytest.mark.parametrize("guidance", [0.0, 4.0])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_diffusers_parity(
    steps: int, batch: int, kind: str, guidance: float, dtype: torch.dtype
) -> None:
    g_ref, g_ours = make_generator(kind, batch, 11), make_generator(kind, batch, 11)
    ref = diffusers_loop(diffusers.DDPMWuerstchenScheduler(), steps, batch, dtype, guidance, g_ref)
    ours = our_loop(make_sampler("diffusers", "prior"), steps, batch, dtype, guidance, g_ours)
    assert ours.dtype == ref.dtype == dtype
    assert (ours.float() - ref.float()).abs().max().item() <= 1e-6
    for a, b in zip(generator_states(g_ref), generator_states(g_ours), strict=True):
        assert torch.equal(a, b)


@pytest.mark.parametrize("scaler", [0.5, 2.0])
def test_diffusers_parity_scaler_config(scaler: float) -> None:
    config = {"_class_name": "DDPMWuerstchenScheduler", "s": 0.01, "scaler": scaler}
    g_ref, g_ours = make_generator("single", 2, 0), make_generator("single", 2, 0)
    ref_sched = diffusers.DDPMWuerstchenScheduler.from_config(config)
    ref = diffusers_loop(ref_sched, 12, 2, torch.bfloat16, 0.0, g_ref)
    sampler = make_sampler("diffusers", "decoder", config)
    assert sampler == DDPMWuerstchen(s=0.01, scaler=scaler)
    ours = our_loop(sampler, 12, 2, torch.bfloat16, 0.0, g_ours)
    assert (ours.float() - ref.float()).abs().max().item() <= 1e-6


def test_diffusers_plan_model_r() -> None:
    """The model gets t as the pipelines pass it: t.to(model dtype)."""
    plan = DDPMWuerstchen().plan(20, "cpu", torch.bfloat16)
    t = torch.linspace(1.0, 0.0, 21)[:-1]
    assert torch.equal(plan.model_r, t.to(torch.bfloat16).float())
    assert plan.model_r[1].item() == 0.94921875  # 0.95 rounded to bf16
    assert torch.equal(DDPMWuerstchen().plan(20, "cpu").model_r, t)
    assert plan.coefs[-1, 3].item() == 0.0 and (plan.coefs[:-1, 3] > 0).all()  # no final noise


def test_diffusers_config_and_guidance_rules() -> None:
    sampler = DDPMWuerstchen.from_config({"_diffusers_version": "0.27.0", "s": 0.008})
    assert sampler == DDPMWuerstchen()
    with pytest.raises(ValueError, match="unknown"):
        DDPMWuerstchen.from_config({"s": 0.008, "num_train_timesteps": 1000})
    with pytest.raises(ValueError, match="DDPMWuerstchenScheduler config"):
        DDPMWuerstchen.from_config({"_class_name": "DDPMScheduler"})
    # Both pipelines: do_classifier_free_guidance = guidance_scale > 1.
    assert [sampler.guidance_enabled(g) for g in (0.0, 1.0, 1.001, 4.0)] == [
        False,
        False,
        True,
        True,
    ]
    e_c, e_u = torch.randn(2, *SHAPE), torch.randn(2, *SHAPE)
    assert torch.equal(sampler.guide(e_c, e_u, 4.0), torch.lerp(e_u, e_c, 4.0))


# ----------------------------------------------------------------------------- stability recipe

# ARCHITECTURE.md §7.1 (measured with the official gdf code): a² at t_0..t_N, model r at t_0..t_N-1.
C_A2 = [1e-4, .00152, .00613, .01398, .0253, .0404, .0599, .0843, .1145, .1513, .1961, .2501,
        .3147, .3911, .4800, .5806, .6893, .7987, .8970, .9688, .9996]  # fmt: skip
C_R = [.9936, .975, .9497, .924, .8975, .8701, .8413, .811, .7785, .7436, .7056, .664, .6179,
       .5665, .5089, .4441, .3715, .2906, .2018, .1063]  # fmt: skip
B_A2 = [1e-4, .0241, .0941, .2031, .3408, .4938, .6475, .7869, .8987, .9721, .9999]  # fmt: skip
B_R = [.9936, .9, .8, .7, .6, .5, .4, .3, .2, .1]  # fmt: skip

S = 0.008


def ref_logsnr(t: float, shift: float) -> float:
    """§7.1 in float64: cosine schedule, shift, clamp to the shift-1 limits."""
    min_var = math.cos(S / (1 + S) * math.pi / 2) ** 2

    def unshifted(t: float) -> float:
        v = min(max(math.cos((t + S) / (1 + S) * math.pi / 2) ** 2 / min_var, 1e-4), 0.9999)
        return math.log(v / (1 - v))

    return min(max(unshifted(t) + 2 * math.log(1 / shift), unshifted(1.0)), unshifted(0.0))


def ref_ab(t: float, shift: float) -> tuple[float, float]:
    a2 = 1 / (1 + math.exp(-ref_logsnr(t, shift)))
    return math.sqrt(a2), math.sqrt(1 - a2)


def ref_guide(e_c: torch.Tensor, e_u: torch.Tensor, cfg: float, rho: float) -> torch.Tensor:
    e = e_u + cfg * (e_c - e_u)
    return rho * e * (e_c.std() / (e.std() + 1e-9)) + (1 - rho) * e


@pytest.mark.parametrize(
    ("stage", "steps", "a2_table", "r_table"),
    [("prior", 20, C_A2, C_R), ("decoder", 10, B_A2, B_R)],
)
def test_stability_schedule_tables(stage: str, steps: int, a2_table, r_table) -> None:
    sampler = make_sampler("stability", stage)
    plan = sampler.plan(steps, "cpu")
    a2 = [ref_ab(t, sampler.shift)[0] ** 2 for t in torch.linspace(1, 0, steps + 1).tolist()]
    assert max(abs(x - y) for x, y in zip(a2, a2_table, strict=True)) <= 1e-3
    assert (plan.model_r.double() - torch.tensor(r_table).double()).abs().max().item() <= 1e-3
    # The coefficients encode the same a: the last row is x0 = (x - b eps) / a at t_{N-1}.
    a, b = ref_ab(1 / steps, sampler.shift)
    assert plan.coefs[-1].tolist() == pytest.approx([1 / a, b, 1.0, 0.0], rel=1e-6)


def test_stability_defaults() -> None:
    assert make_sampler("stability", "prior") == StabilityGDF(shift=2.0, cfg_rho=0.7)
    assert make_sampler("stability", "decoder") == StabilityGDF(shift=1.0, cfg_rho=0.7)
    assert [StabilityGDF().guidance_enabled(g) for g in (0.0, 1.0, 1.1, 4.0)] == [
        True,
        False,
        True,
        True,
    ]
    with pytest.raises(ValueError, match="recipe"):
        make_sampler("ddim", "prior")
    with pytest.raises(ValueError, match="stage"):
        make_sampler("stability", "stage_c")


@pytest.mark.parametrize("rho", [0.0, 0.7])
def test_stability_cfg_rescale(rho: float) -> None:
    g = torch.Generator().manual_seed(0)
    e_c, e_u = torch.randn(2, *SHAPE, generator=g), torch.randn(2, *SHAPE, generator=g) * 0.5
    ours = StabilityGDF(cfg_rho=rho).guide(e_c.bfloat16(), e_u.bfloat16(), 4.0)
    ref = ref_guide(e_c.bfloat16().double(), e_u.bfloat16().double(), 4.0, rho)
    assert ours.dtype == torch.float32
    assert (ours.double() - ref).abs().max().item() <= 1e-6 * ref.abs().max().item()


@pytest.mark.parametrize(("shift", "steps", "cfg"), [(2.0, 20, 4.0), (1.0, 10, 1.1), (2.0, 3, 4.0)])
def test_stability_loop_against_float64(shift: float, steps: int, cfg: float) -> None:
    """Our fp32 loop against §7.1 in float64 with the same noise; the result is the last x0."""
    batch = 2
    g = torch.Generator().manual_seed(1)
    noises = [torch.randn(batch, *SHAPE, generator=g) for _ in range(steps + 1)]

    ts = torch.linspace(1, 0, steps + 1, dtype=torch.float64).tolist()
    x = noises[0].double()
    for i in range(steps):
        (a, b), (a_n, b_n) = ref_ab(ts[i], shift), ref_ab(ts[i + 1], shift)
        var = 1 / (1 + math.exp(-ref_logsnr(ts[i], shift)))
        min_var = math.cos(S / (1 + S) * math.pi / 2) ** 2
        r = math.acos(math.sqrt(var * min_var)) / (math.pi / 2) * (1 + S) - S
        e_c, e_u = fake_eps(torch.cat([x, x]), torch.full((2 * batch,), r).double()).chunk(2)
        e = ref_guide(e_c, e_u, cfg, 0.7)
        x0 = (x - b * e) / a
        sigma = math.sqrt(b_n**2 / b**2) * math.sqrt(1 - a**2 / a_n**2)
        x = a_n * x0 + math.sqrt(b_n**2 - sigma**2) * e + sigma * noises[i + 1].double()
    ref = x0

    sampler = StabilityGDF(shift=shift)
    plan = sampler.plan(steps, "cpu", torch.bfloat16)
    assert plan.latent_dtype == torch.float32
    x = noises[0]
    for i in range(steps):
        r = plan.model_r[i].expand(batch)
        e_c, e_u = fake_eps(torch.cat([x, x]), torch.cat([r, r])).chunk(2)
        x = sampler.step(plan, i, x, sampler.guide(e_c, e_u, cfg), noises[i + 1])
    assert x.dtype == torch.float32
    assert (x.double() - ref).abs().max().item() <= 2e-5 * ref.abs().max().item()


def test_stability_initial_noise_draws_on_cpu_without_generator() -> None:
    """The official code draws torch.randn(shape) on the CPU and moves it; `meta` stands in for
    CUDA. With a generator, draw_noise's rules apply."""
    sampler = StabilityGDF()
    plan = sampler.plan(2, "meta")
    torch.manual_seed(0)
    x = sampler.initial_noise(plan, (1, *SHAPE), None)
    after = torch.get_rng_state()
    torch.manual_seed(0)
    torch.randn(1, *SHAPE)
    assert x.device.type == "meta" and x.dtype == torch.float32
    assert torch.equal(after, torch.get_rng_state())
    cpu_plan = sampler.plan(2, "cpu", torch.bfloat16)
    x = sampler.initial_noise(cpu_plan, (2, *SHAPE), torch.Generator().manual_seed(4))
    assert torch.equal(x, torch.randn(2, *SHAPE, generator=torch.Generator().manual_seed(4)))


# ----------------------------------------------------------------------------- both recipes


@pytest.mark.parametrize("sampler", [DDPMWuerstchen(), StabilityGDF(shift=2.0)], ids=str)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_plan_tensors_and_no_host_sync(sampler, dtype: torch.dtype) -> None:
    """Plan tensors are fp32 on the requested device. Guide and step run on `meta` tensors,
    which have no data: any .item(), host copy or branch on a tensor value would raise."""
    plan = sampler.plan(5, "meta", dtype)
    assert isinstance(plan, SamplingPlan) and plan.num_steps == 5
    assert plan.model_r.shape == (5,) and plan.coefs.shape == (5, 4)
    for t in (plan.model_r, plan.coefs):
        assert t.device.type == "meta" and t.dtype == torch.float32
    x = torch.empty(2, *SHAPE, device="meta", dtype=plan.latent_dtype)
    e = torch.empty(2, *SHAPE, device="meta", dtype=dtype)
    eps = sampler.guide(e, e, 4.0)
    for i in range(plan.num_steps):
        x = sampler.step(plan, i, x, eps, torch.empty_like(x))
    assert x.device.type == "meta" and x.dtype == plan.latent_dtype


def test_plan_rejects_bad_step_counts() -> None:
    for sampler in (DDPMWuerstchen(), StabilityGDF()):
        for n in (0, -1, 2.0, True):
            with pytest.raises(ValueError, match="num_steps"):
                sampler.plan(n, "cpu")


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("sampler", [DDPMWuerstchen(), StabilityGDF(shift=2.0)], ids=str)
def test_cuda_step_no_sync_and_graph_replay(sampler) -> None:
    """Guide + step raise no sync under CUDA's sync debug mode, and one captured update replays
    every step (its coefficient row copied in) with the eager result."""
    dev = torch.device("cuda")
    plan = sampler.plan(4, dev, torch.bfloat16)
    g = torch.Generator(dev).manual_seed(0)
    x = torch.randn(2, *SHAPE, device=dev, generator=g).to(plan.latent_dtype)
    e_c, e_u = torch.randn(2, 2, *SHAPE, device=dev, generator=g).bfloat16()
    noise = torch.randn(2, *SHAPE, device=dev, generator=g).to(plan.latent_dtype)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        eps = sampler.guide(e_c, e_u, 4.0)
        eager = [sampler.step(plan, i, x, eps, noise) for i in range(plan.num_steps)]
    finally:
        torch.cuda.set_sync_debug_mode("default")

    row = plan.coefs[0].clone()
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        update(row, x, eps, noise)  # warm-up outside the capture
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = update(row, x, eps, noise)
    for i in range(plan.num_steps):
        row.copy_(plan.coefs[i])
        graph.replay()
        assert torch.equal(out, eager[i])
