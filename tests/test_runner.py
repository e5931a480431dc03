"""The static-buffer runner (cascade_rt/runner.py, cascade_rt/loops.py) on the CPU, plus its CUDA
graph tests (marked gpu).

On the CPU the programs run eagerly over their static buffers; their images must equal a plain
sampling loop written from the sampling module's docstring (no static buffers, conditioning
recomputed at every step) exactly: same ops in the same order, so max abs error 0. Under CUDA
graphs the replayed images must equal the eager ones, also exactly (same kernels, same inputs).
"""

from __future__ import annotations

import pytest
import torch

from cascade_rt import Cascade
from cascade_rt.loops import draw_loop_noise
from cascade_rt.pipeline import NonFiniteError
from cascade_rt.runner import Program, ProgramCache
from cascade_rt.sampling import DDPMWuerstchen, StabilityGDF, draw_noise

CALL = dict(
    height=256,
    width=256,
    prior_num_inference_steps=3,
    prior_guidance_scale=4.0,
    num_inference_steps=2,
    decoder_guidance_scale=1.5,
)


@pytest.fixture(scope="module")
def pipe() -> Cascade:
    p = Cascade.from_random_weights("tiny", device="cpu", dtype=torch.float32, seed=3)
    p.set_progress_bar_config(disable=True)
    return p


def _plain_loop(model, sampler, x, steps, scale, cond, generator, dtype):
    """The loop of cascade_rt/sampling.py's docstring, as simple as it can be written."""
    plan = sampler.plan(steps, x.device, dtype)
    guided = sampler.guidance_enabled(scale)
    if guided:
        cond = {k: torch.cat([v, u]) for k, (v, u) in cond.items()}
    for i in range(steps):
        r = plan.model_r[i].expand(x.shape[0])
        xm = x.to(dtype)
        if guided:
            both = model(sample=torch.cat([xm, xm]), timestep_ratio=torch.cat([r, r]), **cond)
            eps_c, eps_u = both.chunk(2)
            eps = sampler.guide(eps_c, eps_u, scale)
        else:
            eps = model(sample=xm, timestep_ratio=r, **cond)
        noise = draw_noise(x.shape, generator, x.device, x.dtype)
        x = sampler.step(plan, i, x, eps, noise)
    return x.to(dtype)


def _plain_cascade(pipe: Cascade, prompt: str, seed: int) -> torch.Tensor:
    """Images [1, 3, H, W] from plain loops, no programs."""
    g = torch.Generator().manual_seed(seed)
    tok = pipe.tokenizer([prompt, ""])
    hidden, pooled_all = pipe.text_encoder(tok.input_ids, tok.attention_mask)  # [2, 77, C], [2, P]
    text, u_text = hidden[:1], hidden[1:]
    pooled, u_pooled = pooled_all[:1, None], pooled_all[1:, None]
    clip_img = torch.zeros(1, 1, pipe.prior.config.clip_image_in_channels)
    ps = pipe.prior_sampler
    x = ps.initial_noise(ps.plan(3, "cpu"), (1, 16, 6, 6), g)
    c = _plain_loop(
        pipe.prior,
        ps,
        x,
        3,
        4.0,
        {
            "clip_text": (text, u_text),
            "clip_text_pooled": (pooled, u_pooled),
            "clip_img": (clip_img, clip_img),
        },
        g,
        pipe.dtype,
    )
    ds = pipe.decoder_sampler
    x = ds.initial_noise(ds.plan(2, "cpu"), (1, 4, 64, 64), g)
    b = _plain_loop(
        pipe.decoder,
        ds,
        x,
        2,
        1.5,
        {"clip_text_pooled": (pooled, u_pooled), "effnet": (c, torch.zeros_like(c))},
        g,
        pipe.dtype,
    )
    return pipe.vqgan.decode(b * pipe.vqgan_scale_factor).clamp(0, 1)


@torch.inference_mode()
def test_programs_equal_the_plain_loop(pipe: Cascade) -> None:
    ours = pipe("a red fox", generator=torch.Generator().manual_seed(7), output_type="pt", **CALL)
    ref = _plain_cascade(pipe, "a red fox", 7)
    assert ours.images.shape == ref.shape == (1, 3, 256, 256)
    assert ref.std() > 1e-3  # a real picture, not a constant
    torch.testing.assert_close(ours.images, ref, atol=0, rtol=0)


@pytest.mark.parametrize("recipe", ["diffusers", "stability"])
@pytest.mark.parametrize("gen", ["one", "list", "none"])
def test_noise_is_drawn_in_eager_order(recipe: str, gen: str) -> None:
    sampler = DDPMWuerstchen() if recipe == "diffusers" else StabilityGDF(shift=2.0)
    plan = sampler.plan(4, "cpu")
    shape = (2, 3, 5, 7)

    def make():
        if gen == "one":
            return torch.Generator().manual_seed(11)
        if gen == "list":
            return [torch.Generator().manual_seed(11), torch.Generator().manual_seed(12)]
        torch.manual_seed(11)
        return None

    g = make()
    x, noise = draw_loop_noise(sampler, plan, shape, g)
    after = torch.randn(3, generator=g[0] if isinstance(g, list) else g)
    g = make()
    x_ref = sampler.initial_noise(plan, shape, g)
    steps = [draw_noise(shape, g, "cpu", plan.latent_dtype) for _ in range(4)]
    after_ref = torch.randn(3, generator=g[0] if isinstance(g, list) else g)
    assert noise.shape == (4, *shape)
    torch.testing.assert_close(x, x_ref, atol=0, rtol=0)
    torch.testing.assert_close(noise, torch.stack(steps), atol=0, rtol=0)
    torch.testing.assert_close(after, after_ref, atol=0, rtol=0)  # generators end alike


def test_given_latents_replace_the_initial_draw() -> None:
    sampler = DDPMWuerstchen()
    plan = sampler.plan(2, "cpu")
    latents = torch.randn(1, 2, 3, 3)
    x, noise = draw_loop_noise(
        sampler, plan, (1, 2, 3, 3), torch.Generator().manual_seed(0), latents
    )
    g = torch.Generator().manual_seed(0)
    torch.testing.assert_close(x, latents, atol=0, rtol=0)
    torch.testing.assert_close(noise[0], torch.randn(1, 2, 3, 3, generator=g), atol=0, rtol=0)


@torch.inference_mode()
def test_cache_keys_and_refills() -> None:
    pipe = Cascade.from_random_weights("tiny", device="cpu", dtype=torch.float32, seed=3)
    pipe.set_progress_bar_config(disable=True)
    call = dict(CALL, output_type="latent")
    first = pipe("a", generator=torch.Generator().manual_seed(1), **call).images
    info = pipe.graph_cache_info()
    assert (info.entries, info.misses, info.hits) == (3, 3, 0)  # text, C loop, B loop
    # New values only (seed, scales on the same side of 1, prompt text): no new program.
    other = pipe(
        "b",
        generator=torch.Generator().manual_seed(2),
        **dict(call, prior_guidance_scale=6.0, decoder_guidance_scale=3.0),
    ).images
    assert pipe.graph_cache_info().misses == 3
    assert not torch.equal(first, other)
    again = pipe("a", generator=torch.Generator().manual_seed(1), **call).images
    torch.testing.assert_close(again, first, atol=0, rtol=0)  # refilled, not stale
    # Shapes or control flow: each is a new program.
    changes = [
        dict(prior_num_inference_steps=2),  # C loop
        dict(height=384),  # C loop, B loop
        dict(decoder_guidance_scale=0.0),  # B loop unguided
        dict(num_images_per_prompt=2),  # C loop, B loop (text is per prompt, unchanged)
    ]
    misses = [1, 2, 1, 2]
    for change, extra in zip(changes, misses, strict=True):
        before = pipe.graph_cache_info().misses
        pipe("a", **dict(call, **change))
        assert pipe.graph_cache_info().misses - before == extra, change
    info = pipe.graph_cache_info()
    assert info.nbytes > 0 and info.evictions == 0


@torch.inference_mode()
def test_cache_is_a_bounded_lru() -> None:
    pipe = Cascade.from_random_weights(
        "tiny", device="cpu", dtype=torch.float32, seed=3, graph_cache_size=3
    )
    pipe.set_progress_bar_config(disable=True)
    call = dict(CALL, output_type="latent")
    pipe("a", **call)
    pipe("a", **dict(call, prior_num_inference_steps=2, num_inference_steps=1))
    info = pipe.graph_cache_info()
    assert info.entries == 3 and info.evictions == 2  # two new loops pushed the old ones out
    assert ("text_encoder", (1 + 1, 77)) in info.keys  # used most recently but one: kept


def test_unknown_memory_mode_fails_before_building() -> None:
    with pytest.raises(ValueError, match="unknown memory mode 'vram'; choose one of auto"):
        Cascade.from_random_weights("big", device="cpu", memory="vram")


def test_cache_rejects_bad_settings() -> None:
    with pytest.raises(ValueError, match="graphs=True needs a CUDA device"):
        ProgramCache(torch.device("cpu"), graphs=True)
    with pytest.raises(ValueError, match="capacity must be a positive int"):
        ProgramCache(torch.device("cpu"), capacity=0)


def test_program_fill_names_bad_inputs() -> None:
    prog = Program("p", {"a": torch.zeros(2, 3)}, lambda i: {"b": i["a"] * 2}, graph=False)
    with pytest.raises(ValueError, match=r"input 'a' expected shape \(2, 3\), got \(3, 2\)"):
        prog.run({"a": torch.zeros(3, 2)})
    with pytest.raises(ValueError, match=r"missing inputs \['a'\], unknown \['c'\]"):
        prog.run({"c": torch.zeros(2, 3)})
    torch.testing.assert_close(prog.run({"a": torch.ones(2, 3)})["b"], torch.full((2, 3), 2.0))


@torch.inference_mode()
def test_warmup_builds_every_program(pipe: Cascade) -> None:
    fresh = Cascade.from_random_weights("tiny", device="cpu", dtype=torch.float32, seed=3)
    fresh.set_progress_bar_config(disable=True)
    fresh.warmup(prompt_count=2, batch=2, **CALL)
    built = fresh.graph_cache_info().misses
    assert built == 4  # text, C loop, B loop, Stage A
    fresh(["x", "y"], num_images_per_prompt=2, **CALL)
    assert fresh.graph_cache_info().misses == built


@torch.inference_mode()
def test_non_finite_stage_is_named() -> None:
    pipe = Cascade.from_random_weights("tiny", device="cpu", dtype=torch.float32, seed=3)
    pipe.set_progress_bar_config(disable=True)
    pipe.prior.clf[1].bias.data[0] = float("nan")
    with pytest.raises(NonFiniteError, match=r"Stage C produced a non-finite latent"):
        pipe("a", **CALL)


def _cuda_pipe(graphs: bool, dtype: torch.dtype) -> Cascade:
    p = Cascade.from_random_weights("tiny", device="cuda", dtype=dtype, seed=3, graphs=graphs)
    p.set_progress_bar_config(disable=True)
    return p


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@torch.inference_mode()
def test_graph_replay_equals_eager(dtype: torch.dtype) -> None:
    eager, graphed = _cuda_pipe(False, dtype), _cuda_pipe(True, dtype)
    for seed, scale in ((1, 4.0), (2, 6.0), (1, 4.0)):
        call = dict(CALL, prior_guidance_scale=scale, output_type="pt")
        a = eager("a fox", generator=torch.Generator().manual_seed(seed), **call).images
        b = graphed("a fox", generator=torch.Generator().manual_seed(seed), **call).images
        torch.testing.assert_close(b, a, atol=0, rtol=0)
    assert graphed.graph_cache_info().misses == 4  # seeds and scales never recapture


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@torch.inference_mode()
def test_replay_allocates_nothing() -> None:
    pipe = _cuda_pipe(True, torch.bfloat16)
    pipe.warmup(**CALL)
    loop = next(p for k, p in pipe.programs._programs.items() if getattr(k, "stage", "") == "prior")
    values = {k: v.clone() for k, v in loop.inputs.items()}
    torch.cuda.synchronize()
    before = torch.cuda.memory_stats()
    loop.run(values)
    torch.cuda.synchronize()
    after = torch.cuda.memory_stats()
    for counter in ("allocation.all.allocated", "segment.all.allocated", "num_alloc_retries"):
        assert after.get(counter, 0) == before.get(counter, 0), counter


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@torch.inference_mode()
def test_programs_share_one_pool() -> None:
    """With one pool, each later capture reuses what earlier ones freed, so the pool grows to
    about the largest program's activations, not their sum (allocator rounding allowed for)."""
    pipe = _cuda_pipe(True, torch.bfloat16)
    pipe.warmup(**dict(CALL, height=512, width=512))
    programs = list(pipe.programs._programs.values())
    assert len({id(p.pool) for p in programs}) == 1 and programs[0].pool is pipe.programs.pool
    growth = [p.capture_bytes for p in programs]
    assert sum(growth) <= 1.25 * max(growth) + (16 << 20), growth


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("memory", ["sequential", "streaming"])
@torch.inference_mode()
def test_graphs_in_every_memory_mode(memory: str) -> None:
    """Captured with swapped or streamed weights, replays give the resident eager image, also
    after the other stages have refilled the shared region or slots."""
    eager = _cuda_pipe(False, torch.bfloat16)
    graphed = Cascade.from_random_weights(
        "tiny", device="cuda", dtype=torch.bfloat16, seed=3, graphs=True, memory=memory
    )
    graphed.set_progress_bar_config(disable=True)
    for seed in (1, 2, 1):
        call = dict(CALL, output_type="pt")
        a = eager("a fox", generator=torch.Generator().manual_seed(seed), **call).images
        b = graphed("a fox", generator=torch.Generator().manual_seed(seed), **call).images
        torch.testing.assert_close(b, a, atol=0, rtol=0)
    assert graphed.memory_report()["mode"] == memory
