"""Memory modes (cascade_rt/memory): every mode computes exactly what resident weights compute.

The tiny random-weight cascade runs in each mode on the CPU (the streaming slots with 1, 2 and
3 slots; the tiny decoder repeats its up levels [2, 2, 2, 1], so units are copied in more than
once per forward, and a 3-block level repeated with 2 slots hits the same-slot bubble). Outputs
must be bit-identical to the resident models: the same weights and ops in the same order, only
the addresses differ, so any tolerance would hide a wrong weight. The file-backed CPU sequential
path re-reads tiny checkpoints written with `write_component`; a subprocess measures that it
keeps only the largest stage in RAM. GPU tests (marked `gpu`) check the copy stream, CUDA-graph
capture and device peak memory.
"""

from __future__ import annotations

import copy
import json
import subprocess
import sys
import textwrap
from contextlib import nullcontext
from pathlib import Path

import pytest
import torch

from cascade_rt.memory import (
    ACTIVATION_ALLOWANCE,
    MemoryPlanner,
    StageWeights,
    choose_mode,
)
from cascade_rt.memory.streaming import START, make_plan
from cascade_rt.models.stage_a import StageA
from cascade_rt.models.text_encoder import CLIPTextConfig, CLIPTextEncoder
from cascade_rt.models.unet import StableCascadeUNet, UNetConfig
from cascade_rt.random_weights import (
    TINY_DECODER_CONFIG,
    TINY_PRIOR_CONFIG,
    build_random_models,
    tiny_text_encoder_config,
)
from cascade_rt.weights import locate, write_component

STAGES = ("text_encoder", "prior", "decoder", "vqgan")
HAS_CUDA = torch.cuda.is_available()
GIB = 1 << 30


@pytest.fixture(scope="module")
def reference(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """The tiny cascade in fp32 on the CPU, resident: the oracle (never handed to a planner)."""
    return build_random_models(
        "tiny", tmp_path_factory.mktemp("tok"), device=torch.device("cpu"), dtype=torch.float32
    )


def _copies(reference: dict) -> dict[str, StageWeights]:
    return {name: StageWeights.from_module(copy.deepcopy(reference[name])) for name in STAGES}


def _inputs(reference: dict, seed: int, device: str = "cpu") -> dict[str, dict]:
    g = torch.Generator().manual_seed(seed)

    def randn(*shape: int) -> torch.Tensor:
        return torch.randn(shape, generator=g).to(device)

    tokens = reference["tokenizer"](["a photo of a cat", "noise"])
    prior = {
        "sample": randn(2, 16, 6, 7),
        "timestep_ratio": torch.rand(2, generator=g).to(device),
        "clip_text_pooled": randn(2, 1, 64),
        "clip_text": randn(2, 5, 64),
        "clip_img": randn(2, 1, 32),
    }
    decoder = {  # odd latent: every up level resizes its skip
        "sample": randn(2, 4, 26, 22),
        "timestep_ratio": torch.rand(2, generator=g).to(device),
        "clip_text_pooled": randn(2, 1, 64),
        "effnet": randn(2, 16, 5, 6),
    }
    text = {
        "input_ids": tokens.input_ids.to(device),
        "attention_mask": tokens.attention_mask.to(device),
    }
    return {"text": text, "prior": prior, "decoder": decoder, "latents": {"x": randn(1, 4, 6, 5)}}


@torch.no_grad()
def _run(models, inputs: dict) -> dict[str, torch.Tensor]:
    """Every stage, the prior twice around the decoder (the aliasing check) and once more with
    `prepare` + `conditions`, as a runner would. `models(name)` is a context manager."""
    out = {}
    with models("text_encoder") as te:
        out["hidden"], out["pooled"] = te(**inputs["text"])
    p = inputs["prior"]
    with models("prior") as prior:
        out["prior"] = prior(**p)
    with models("decoder") as decoder:
        out["decoder"] = decoder(**inputs["decoder"])
    with models("prior") as prior:
        out["prior_again"] = prior(**p)
        cond = prior.prepare((6, 7), p["clip_text_pooled"], p["clip_text"], p["clip_img"])
        out["prior_prepared"] = prior(p["sample"], p["timestep_ratio"], conditions=cond)
    with models("vqgan") as vqgan:
        out["image"] = vqgan.decode(inputs["latents"]["x"])
    return out


def _resident(reference: dict):
    return lambda name: nullcontext(reference[name])


def _assert_identical(got: dict, want: dict) -> None:
    for key, ref in want.items():
        assert torch.equal(got[key], ref), (key, (got[key] - ref).abs().max().item())


MODE_CASES = [
    ("resident", 2),
    ("sequential", 2),
    ("streaming", 1),
    ("streaming", 2),
    ("streaming", 3),
]


@pytest.mark.parametrize(("mode", "n_slots"), MODE_CASES)
def test_modes_match_resident(reference, mode: str, n_slots: int) -> None:
    inputs = _inputs(reference, seed=1)
    want = _run(_resident(reference), inputs)
    planner = MemoryPlanner(mode, "cpu", _copies(reference), n_slots=n_slots)
    _assert_identical(_run(planner.use, inputs), want)
    report = planner.report()
    assert report["mode"] == mode and report["stream_misses"] == 0
    placements = {s["placement"] for s in report["stages"].values()}
    # Stage A stays resident in every mode: 20M parameters, and it has no blocks to stream
    assert report["stages"]["vqgan"]["placement"] == "resident"
    assert placements == {
        "resident",
        {"sequential": "swapped", "streaming": "streamed"}.get(mode, "resident"),
    }
    if mode == "streaming":
        # only the non-block parameters stay; Stage A has no blocks and stays whole
        stages = report["stages"]
        assert stages["prior"]["resident_bytes"] < stages["prior"]["bytes"] / 4
        assert stages["vqgan"]["resident_bytes"] == stages["vqgan"]["bytes"]
        assert (
            report["copied_bytes"]
            > sum(s["bytes"] for s in stages.values()) - stages["vqgan"]["bytes"]
        )


def test_streaming_off_schedule_copies_on_demand(reference) -> None:
    """A block run by hand (no forward around it) is copied in on demand: right weights, one
    miss; a forward afterwards is back on schedule."""
    planner = MemoryPlanner("streaming", "cpu", _copies(reference), n_slots=2)
    prior = planner.modules["prior"]
    x = torch.randn(2, 128, 3, 4).contiguous(memory_format=torch.channels_last)
    with torch.no_grad():
        for level, j in ((1, 3), (0, 0), (1, 3)):  # ResBlocks of two levels, one twice
            got = prior.down_blocks[level][j](x)
            assert torch.equal(got, reference["prior"].down_blocks[level][j](x))
    assert planner.report()["stream_misses"] == 3
    inputs = _inputs(reference, seed=2)
    with torch.no_grad():
        assert torch.equal(prior(**inputs["prior"]), reference["prior"](**inputs["prior"]))
    assert planner.report()["stream_misses"] == 3


def test_make_plan_double_buffers_and_repeats() -> None:
    # Two slots, units 0..3 once: the first two copies at the start, then each copy goes out
    # as soon as its slot's previous reader has run, one position ahead of its use.
    plan = make_plan([0, 1, 2, 3], 2)
    assert plan.loads == {START: (0, 1), 1: (2,), 2: (3,)}
    assert plan.waits == {0, 1, 2, 3}
    # A 3-block level repeated with 2 slots: unit 0 follows unit 2 in the same slot, so its
    # copy can only go out on entering it (a bubble); unit 1 is still in its slot.
    plan = make_plan([0, 1, 2, 0, 1, 2], 2)
    assert plan.loads == {START: (0, 1), 1: (2,), 3: (3,), 4: (5,)}
    assert plan.waits == {0, 1, 2, 3, 5}
    # Three slots hold the whole level: the repeat copies nothing.
    plan = make_plan([0, 1, 2, 0, 1, 2], 3)
    assert plan.loads == {START: (0, 1, 2)} and plan.waits == {0, 1, 2}
    # A one-block level repeated is one position (hooks cannot tell the runs apart).
    assert make_plan([4, 4, 5], 2).seq == (4, 5)


# ---------------------------------------------------------------- file-backed stages
def _write_checkpoints(reference: dict, root: Path) -> dict[str, Path]:
    configs = {
        "prior": TINY_PRIOR_CONFIG,
        "decoder": TINY_DECODER_CONFIG,
        "text_encoder": tiny_text_encoder_config(reference["tokenizer"].vocab_size),
        "vqgan": reference["vqgan"].config.to_dict(),
    }
    for name in STAGES:
        write_component(reference[name].state_dict(), name, root / name, config=configs[name])
    return {name: root / name for name in STAGES}


def _meta_stages(reference: dict, folders: dict[str, Path]) -> dict[str, StageWeights]:
    classes = {
        "prior": StableCascadeUNet,
        "decoder": StableCascadeUNet,
        "text_encoder": CLIPTextEncoder,
        "vqgan": StageA,
    }
    stages = {}
    for name in STAGES:
        with torch.device("meta"):
            module = classes[name](reference[name].config)
        source = locate(folders[name], name)
        stages[name] = StageWeights(module, source=source, dtype=torch.float32)
    return stages


@pytest.mark.parametrize("mode", ["resident", "sequential", "streaming"])
def test_file_backed_stages(reference, tmp_path: Path, mode: str) -> None:
    folders = _write_checkpoints(reference, tmp_path)
    inputs = _inputs(reference, seed=3)
    planner = MemoryPlanner(mode, "cpu", _meta_stages(reference, folders))
    _assert_identical(_run(planner.use, inputs), _run(_resident(reference), inputs))


def test_sequential_rereads_only_on_stage_change(reference, tmp_path: Path) -> None:
    folders = _write_checkpoints(reference, tmp_path)
    planner = MemoryPlanner("sequential", "cpu", _meta_stages(reference, folders))
    sizes = planner.stage_bytes
    prior, decoder = planner.modules["prior"], planner.modules["decoder"]
    # The swapped stages alias one region: the prior's first weight and the decoder's share it.
    first = {name: next(planner.modules[name].parameters()) for name in ("prior", "decoder")}
    assert first["prior"].data_ptr() == first["decoder"].data_ptr()
    steps = [("prior", sizes["prior"]), ("prior", 0), ("decoder", sizes["decoder"])]
    steps += [("prior", sizes["prior"]), ("vqgan", 0)]  # Stage A stays resident
    for name, copied in steps:
        before = planner.report()["copied_bytes"]
        with planner.use(name):
            pass
        assert planner.report()["copied_bytes"] - before == copied, name
    ref = reference["prior"].state_dict()
    assert all(torch.equal(t, ref[k]) for k, t in prior.state_dict().items())
    with planner.use("decoder") as entered:
        assert entered is decoder
        # the prior's views now hold decoder bytes: the planner, not luck, keeps them apart
        assert not torch.equal(first["prior"], next(reference["prior"].parameters()))
        with pytest.raises(RuntimeError, match="share one device region"), planner.use("prior"):
            pass


_RSS_SCRIPT = textwrap.dedent(
    """
    import json, sys, torch
    from cascade_rt.memory import MemoryPlanner, StageWeights
    from cascade_rt.models.text_encoder import CLIPTextConfig, CLIPTextEncoder
    from cascade_rt.models.unet import StableCascadeUNet, UNetConfig
    from cascade_rt.weights import locate

    mode, root = sys.argv[1], sys.argv[2]
    stages = {}
    for name in ("text_encoder", "prior", "decoder"):
        source = locate(f"{root}/{name}", name)
        with torch.device("meta"):
            if name == "text_encoder":
                module = CLIPTextEncoder(CLIPTextConfig.from_dict(source.config))
            else:
                module = StableCascadeUNet(UNetConfig.from_dict(source.config))
        stages[name] = StageWeights(module, source=source, dtype=torch.float32)

    def vmhwm():
        line = next(l for l in open("/proc/self/status") if l.startswith("VmHWM:"))
        return int(line.split()[1]) * 1024

    base = vmhwm()
    planner = MemoryPlanner(mode, "cpu", stages)
    for name in stages:
        with planner.use(name):
            pass
    print(json.dumps({"base": base, "vmhwm": vmhwm(), **planner.report()}))
    """
)
# Wider, deeper tiny configs: ~190 MB prior, ~100 MB decoder, ~50 MB text encoder in fp32.
_BIG_PRIOR = {
    **TINY_PRIOR_CONFIG,
    "conditioning_dim": 512,
    "block_out_channels": [512, 512],
    "num_attention_heads": [8, 8],
    "down_num_layers_per_block": [2, 3],
    "up_num_layers_per_block": [3, 2],
}
_BIG_DECODER = {
    **TINY_DECODER_CONFIG,
    "block_out_channels": [64, 128, 512, 512],
    "num_attention_heads": [0, 0, 8, 8],
    "down_num_layers_per_block": [1, 1, 2, 2],
    "up_num_layers_per_block": [2, 2, 1, 1],
}


@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="reads VmHWM from /proc")
def test_sequential_cpu_peak_rss(tmp_path: Path) -> None:
    """Sequential loading keeps only the largest stage in RAM: its peak RSS grows by about that
    stage's bytes, resident's by all of them, so it saves about every other stage's bytes."""
    te_config = {**tiny_text_encoder_config(49), "hidden_size": 512, "intermediate_size": 2048}
    te_config |= {"projection_dim": 512, "num_hidden_layers": 4, "num_attention_heads": 8}
    builders = {
        "prior": (lambda: StableCascadeUNet(UNetConfig.from_dict(_BIG_PRIOR)), _BIG_PRIOR),
        "decoder": (lambda: StableCascadeUNet(UNetConfig.from_dict(_BIG_DECODER)), _BIG_DECODER),
        "text_encoder": (lambda: CLIPTextEncoder(CLIPTextConfig.from_dict(te_config)), te_config),
    }
    sizes = {}
    for name, (build, config) in builders.items():
        with torch.device("meta"):
            shapes = build().state_dict()
        # Values do not matter here, only bytes: zeros are cheap to make.
        tensors = {k: torch.zeros(t.shape) for k, t in shapes.items()}
        write_component(tensors, name, tmp_path / name, config=config)
        sizes[name] = sum(t.numel() * 4 for t in tensors.values())
    del tensors
    grown = {}
    for mode in ("resident", "sequential"):
        run = subprocess.run(
            [sys.executable, "-c", _RSS_SCRIPT, mode, str(tmp_path)],
            capture_output=True,
            text=True,
            check=True,
            env={"OMP_NUM_THREADS": "1", "PATH": "/usr/bin:/bin"},
        )
        report = json.loads(run.stdout.strip().splitlines()[-1])
        assert report["mode"] == mode
        assert abs(report["peak_bytes"] - report["vmhwm"]) < 4 << 20  # read a moment apart
        grown[mode] = report["vmhwm"] - report["base"]  # peak RSS the weights added
    total, largest = sum(sizes.values()), max(sizes.values())
    print(f"stage bytes {sizes}; peak RSS growth {grown}")
    assert grown["resident"] > 0.95 * total
    assert grown["sequential"] < 1.1 * largest + (16 << 20)  # + the refill's pread buffers
    assert grown["resident"] - grown["sequential"] > 0.8 * (total - largest)


# ---------------------------------------------------------------- auto and errors
# The big cascade in fp32 (about 23 GB of weights).
SIZES = {
    "text_encoder": int(2.8 * GIB),
    "prior": int(14.4 * GIB),
    "decoder": int(6.0 * GIB),
    "vqgan": int(0.08 * GIB),
}


@pytest.mark.parametrize(
    ("device", "free_gib", "mode"),
    [
        ("cuda", 40, "resident"),
        ("cuda", 24, "sequential"),  # 14.4 + 0.08 + 4 GiB of activations fit, 27.3 do not
        ("cuda", 12, "streaming"),
        ("cpu", 22, "sequential"),  # a 24 GB machine: only the running stage in RAM
        ("cpu", 12, "sequential"),  # nothing fits; streaming would not save host memory
        ("cpu", 64, "resident"),
    ],
)
def test_choose_mode_auto(device: str, free_gib: int, mode: str) -> None:
    free = free_gib * GIB
    got, why = choose_mode("auto", torch.device(device), SIZES, free=free)
    assert got == mode, why
    assert f"{free_gib:.2f} GiB free" in why
    # the boundary: resident needs all weights plus the activation allowance
    total = sum(SIZES.values()) + ACTIVATION_ALLOWANCE
    assert choose_mode("auto", torch.device(device), SIZES, free=total)[0] == "resident"
    assert choose_mode("auto", torch.device(device), SIZES, free=total - 1)[0] != "resident"


def test_choose_mode_explicit_and_unknown() -> None:
    assert choose_mode("streaming", torch.device("cpu"), SIZES) == (
        "streaming",
        "streaming was requested",
    )
    with pytest.raises(ValueError, match="auto, resident, sequential, streaming"):
        choose_mode("offload", torch.device("cpu"), SIZES)


def test_planner_auto_says_why(reference) -> None:
    planner = MemoryPlanner("auto", "cpu", _copies(reference))
    report = planner.report()
    assert report["mode"] in ("resident", "sequential") and report["why"].startswith("auto:")


def test_errors_name_the_problem(reference) -> None:
    stages = _copies(reference)
    with pytest.raises(ValueError, match=r"unknown memory mode 'fast'.*resident"):
        MemoryPlanner("fast", "cpu", stages)
    with pytest.raises(ValueError, match=r"unknown stage names \['unet'\].*prior"):
        MemoryPlanner("resident", "cpu", {"unet": stages["prior"]})
    with pytest.raises(ValueError, match="n_slots"):
        MemoryPlanner("streaming", "cpu", stages, n_slots=0)
    with pytest.raises(ValueError, match="exactly one of source"):
        StageWeights(reference["prior"])
    partial = dict(reference["prior"].state_dict())
    partial.pop("clf.1.weight")
    with pytest.raises(ValueError, match=r"'prior'.*1 missing keys \[clf.1.weight\]"):
        MemoryPlanner(
            "resident", "cpu", {"prior": StageWeights(reference["prior"], state_dict=partial)}
        )
    planner = MemoryPlanner("resident", "cpu", {"vqgan": stages["vqgan"]})
    missing = pytest.raises(KeyError, match="'prior' is not planned; planned stages: vqgan")
    with missing, planner.use("prior"):
        pass


# ---------------------------------------------------------------- CUDA
@pytest.mark.parametrize(("mode", "n_slots"), MODE_CASES[1:])
@pytest.mark.gpu
@pytest.mark.skipif(not HAS_CUDA, reason="needs CUDA")
def test_cuda_modes_match_resident(reference, mode: str, n_slots: int) -> None:
    """Same kernels on the same 256-byte-aligned weights: bit-identical to resident on CUDA."""
    inputs = _inputs(reference, seed=4, device="cuda")
    want = _run(MemoryPlanner("resident", "cuda", _copies(reference)).use, inputs)
    planner = MemoryPlanner(mode, "cuda", _copies(reference), n_slots=n_slots)
    _assert_identical(_run(planner.use, inputs), want)
    report = planner.report()
    assert report["stream_misses"] == 0 and report["copy_ms"] > 0


@pytest.mark.gpu
@pytest.mark.skipif(not HAS_CUDA, reason="needs CUDA")
@pytest.mark.parametrize("prepared", [False, True])
def test_cuda_streaming_graph_replay(reference, prepared: bool) -> None:
    """A captured forward holds its copies: replayed after the decoder filled the shared slots
    with its own blocks, it still equals the eager forward."""
    planner = MemoryPlanner("streaming", "cuda", _copies(reference), n_slots=2)
    inputs = _inputs(reference, seed=5, device="cuda")
    p, prior, decoder = inputs["prior"], planner.modules["prior"], planner.modules["decoder"]
    with torch.no_grad():
        cond = prior.prepare((6, 7), p["clip_text_pooled"], p["clip_text"], p["clip_img"])
        kwargs = {"conditions": cond} if prepared else p
        args = (p["sample"], p["timestep_ratio"]) if prepared else ()
        eager = prior(*args, **kwargs).clone()
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            prior(*args, **kwargs)
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            static = prior(*args, **kwargs)
        decoder(**inputs["decoder"])
        graph.replay()
        torch.cuda.synchronize()
    assert torch.equal(static, eager)


@pytest.mark.gpu
@pytest.mark.skipif(not HAS_CUDA, reason="needs CUDA")
def test_cuda_streaming_peak_below_weights(reference) -> None:
    """The wider prior (~73 MiB in bf16) runs with its blocks streamed: the planner places a
    quarter of its bytes on the device at most, and the device peak over a forward (weights,
    activations, cuBLAS workspace) stays below its weight bytes."""
    with torch.device("meta"):
        module = StableCascadeUNet(UNetConfig.from_dict(_BIG_PRIOR))
    tensors = {
        k: torch.randn(t.shape).mul_(0.02).to(torch.bfloat16)
        for k, t in module.state_dict().items()
    }
    weight_bytes = sum(t.numel() * 2 for t in tensors.values())
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    planner = MemoryPlanner(
        "streaming", "cuda", {"prior": StageWeights(module, state_dict=tensors)}, n_slots=2
    )
    del tensors
    inputs = _inputs(reference, seed=6, device="cuda")["prior"]  # the model casts them to bf16
    with torch.no_grad(), planner.use("prior") as prior:
        prior(**inputs)
    torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated() - base
    placed = planner.report()["weights_device_bytes"]  # 2 slots of ~6 MiB + ~1.5 MiB resident
    print(f"weights {weight_bytes / 2**20:.0f} MiB, placed {placed / 2**20:.1f} MiB, peak ", end="")
    print(f"{peak / 2**20:.0f} MiB (with cuBLAS workspace and activations)")
    assert placed < weight_bytes / 4
    assert peak < weight_bytes
