"""Streaming: blocks flow through a few fixed device slots while the stage runs.

Units: every block of a Stage B/C UNet (`down_blocks.i.j`, `up_blocks.i.j`) and every text
encoder layer is one unit; everything else of the stage (embeddings, mappers, transitions,
repeat mappers, clf, Stage A whole) stays resident. Unit k of a stage lives in slot k mod
n_slots, forever: its parameters are permanent views into that slot (all stages share the
slots), so a CUDA graph captured over a forward sees fixed addresses and replays the copies.

Schedule by execution order. A pass (one forward, or one `prepare`) runs a known sequence of
units: the blocks in the order `StableCascadeUNet._down`/`_up` visit them, each level's blocks
again on every repeat (repeat mappers > 1 re-run them, so a unit may be copied in several times
per pass), preceded by the attention blocks in `prepare`'s order when the forward computes its
conditions itself. `make_plan` simulates the slots over that sequence: the copy for position q
is issued as soon as the previous user of its slot has run (entering the position after it),
so with n slots up to n - 1 copies run ahead of compute. A position whose slot was used by the
position just before it (a level of k blocks with k = 1 mod n repeated) waits for its copy: a
bubble, never a wrong weight.

Triggers are forward pre-hooks. The stage root's starts a forward pass; the pooled-text mapper's
starts a `prepare` pass when no forward is running (it is the first module `prepare` calls);
every module inside a unit marks "unit k runs now". Hooks sit on every submodule because the
fused paths call `ResBlock.branch`, `TimestepBlock.modulation` and `AttnBlock.cond_kv`
directly, and each of those calls a submodule before it touches a weight. Entering a unit the
plan does not expect (a caller running blocks itself) switches the rest of the pass to copy on
demand: still correct, counted in `misses`.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from functools import partial

import torch
from torch import nn

from cascade_rt.memory.copier import Copier
from cascade_rt.memory.weights import StagePlan, assign, carve, pack
from cascade_rt.models.text_encoder import CLIPTextEncoder
from cascade_rt.models.unet import StableCascadeUNet
from cascade_rt.models.unet_blocks import AttnBlock
from cascade_rt.weights.arena import ALIGNMENT

START = -1  # plan position of a pass's start


def stream_units(module: nn.Module) -> list[tuple[str, nn.Module]]:
    """(state-dict prefix, module) of each streamed unit, in module order; [] = all resident."""
    if isinstance(module, StableCascadeUNet):
        return [
            (f"{path}.{i}.{j}", block)
            for path, levels in (
                ("down_blocks", module.down_blocks),
                ("up_blocks", module.up_blocks),
            )
            for i, level in enumerate(levels)
            for j, block in enumerate(level)
        ]
    if isinstance(module, CLIPTextEncoder):
        layers = module.text_model.encoder.layers
        return [(f"text_model.encoder.layers.{k}", layer) for k, layer in enumerate(layers)]
    return []


def unit_sequences(module: nn.Module, units: list[tuple[str, nn.Module]]) -> dict[str, list[int]]:
    """Unit order of each pass kind: "forward", "forward+prepare", "prepare"."""
    index = {id(m): k for k, (_, m) in enumerate(units)}
    if not isinstance(module, StableCascadeUNet):
        seq = list(range(len(units)))
        return {"forward": seq, "forward+prepare": seq, "prepare": []}
    seq: list[int] = []
    for levels, repeats in (
        (module.down_blocks, module.down_repeat_mappers),
        (module.up_blocks, module.up_repeat_mappers),
    ):
        for level, mappers in zip(levels, repeats, strict=True):
            for _ in range(len(mappers) + 1):
                seq += [index[id(block)] for block in level]
    # prepare's order: every AttnBlock in module order (StableCascadeUNet._attn_blocks).
    attn = [k for k, (_, m) in enumerate(units) if isinstance(m, AttnBlock)]
    return {"forward": seq, "forward+prepare": attn + seq, "prepare": attn}


@dataclass(frozen=True)
class Plan:
    seq: tuple[int, ...]  # unit index at each position
    loads: dict[
        int, tuple[int, ...]
    ]  # entering position p (START: pass start) -> positions to copy
    waits: frozenset[int]  # positions whose unit was copied in this pass: compute waits for it


def make_plan(seq: list[int], n_slots: int) -> Plan:
    """Simulates the slots over `seq`, starting with every slot's content unknown.

    A unit run twice in a row (a one-block level repeated) is one position: its hooks cannot
    tell the runs apart, and nothing needs copying between them.
    """
    seq = [u for i, u in enumerate(seq) if i == 0 or seq[i - 1] != u]
    holder: dict[int, int] = {}  # slot -> unit
    last_use: dict[int, int] = {}  # slot -> last position that read it
    loads: dict[int, list[int]] = {}
    waits = set()
    for q, unit in enumerate(seq):
        slot = unit % n_slots
        if holder.get(slot) != unit:
            # Free once the previous reader ran: the copy goes out on entering the next position.
            at = last_use[slot] + 1 if slot in last_use else START
            loads.setdefault(at, []).append(q)
            waits.add(q)
            holder[slot] = unit
        last_use[slot] = q
    return Plan(tuple(seq), {p: tuple(qs) for p, qs in loads.items()}, frozenset(waits))


@dataclass(frozen=True, eq=False)
class _Stage:
    plans: dict[str, Plan]
    unit_bytes: list[int]
    host_offsets: list[int]
    host: torch.Tensor  # [sum of units] uint8, pinned on CUDA
    resident_bytes: int


@dataclass
class _Pass:
    stage: str
    plan: Plan
    pos: int = START
    on_plan: bool = True


@dataclass
class _Slots:
    buffers: list[torch.Tensor]  # n_slots x [slot_size] uint8 on the device
    holder: list[tuple[str, int, int] | None]  # (stage, unit, pass id) of the last copy issued
    ready: list[torch.cuda.Event | None]  # that copy's completion (None on the CPU)


class Streamer:
    """Owns the slots, each stage's resident arena and host copy of its units, and the hooks."""

    def __init__(
        self, plans: Mapping[str, StagePlan], device: torch.device, n_slots: int, copier: Copier
    ) -> None:
        self.device, self.n_slots, self.copier = device, n_slots, copier
        self.misses = 0
        self._stages: dict[str, _Stage] = {}
        self._pass: _Pass | None = None
        self._pass_id = 0
        self._current: tuple[str, int] | None = None
        self._in_forward: str | None = None
        layouts = {}
        for name, sp in plans.items():
            units = stream_units(sp.module)
            names = [[k for k in sp.specs if k.startswith(prefix + ".")] for prefix, _ in units]
            layouts[name] = (units, [pack(sp.specs, ns) for ns in names])
        self.slot_size = max((n for _, ls in layouts.values() for _, n in ls), default=0)
        buffers = [
            torch.empty(self.slot_size, dtype=torch.uint8, device=device) for _ in range(n_slots)
        ]
        self._slots = _Slots(buffers, [None] * n_slots, [None] * n_slots)
        for name, sp in plans.items():
            self._stages[name] = self._place(name, sp, *layouts[name])

    def _place(
        self,
        name: str,
        sp: StagePlan,
        units: list[tuple[str, nn.Module]],
        layouts: list[tuple[dict[str, int], int]],
    ) -> _Stage:
        """Allocates the stage's resident arena and host copy, fills them, points the module at
        its resident and slot views, and hooks it."""
        streamed = {k for offsets, _ in layouts for k in offsets}
        resident_names = [k for k in sp.specs if k not in streamed]
        res_offsets, res_bytes = pack(sp.specs, resident_names)
        resident = torch.empty(res_bytes, dtype=torch.uint8, device=self.device)
        host_offsets, end = [], 0
        for _, n in layouts:  # the host copy packs the units back to back, each laid out as
            host_offsets.append(end)  # in its slot, so one unit is one contiguous copy
            end += -(-n // ALIGNMENT) * ALIGNMENT
        pinned = self.device.type == "cuda"
        host = torch.empty(end, dtype=torch.uint8, pin_memory=pinned)
        # The loader fills views of one device: the resident part goes through host memory.
        staged = resident if not pinned else torch.empty(res_bytes, dtype=torch.uint8)
        fill_views = carve(staged, sp.specs, res_offsets)
        module_views = carve(resident, sp.specs, res_offsets)
        for k, (offsets, _) in enumerate(layouts):
            fill_views |= carve(host, sp.specs, offsets, base=host_offsets[k])
            module_views |= carve(self._slots.buffers[k % self.n_slots], sp.specs, offsets)
        sp.fill(fill_views)
        if staged is not resident:
            resident.copy_(staged)
        assign(sp.module, module_views)
        for k, (_, unit) in enumerate(units):
            for m in unit.modules():
                m.register_forward_pre_hook(partial(self._on_unit, name, k))
        if units:
            sp.module.register_forward_pre_hook(partial(self._on_forward, name), with_kwargs=True)
            sp.module.register_forward_hook(partial(self._on_forward_end, name), always_call=True)
        if isinstance(sp.module, StableCascadeUNet):
            pooled = getattr(sp.module, sp.module.config.pooled_mapper_name)
            pooled.register_forward_pre_hook(partial(self._on_prepare, name))
        seqs = unit_sequences(sp.module, units)
        plans = {kind: make_plan(seq, self.n_slots) for kind, seq in seqs.items()}
        return _Stage(plans, [n for _, n in layouts], host_offsets, host, res_bytes)

    # ---------------------------------------------------------------- hooks
    def _on_forward(self, name: str, module: nn.Module, args, kwargs) -> None:
        with_prepare = isinstance(module, StableCascadeUNet) and kwargs.get("conditions") is None
        self._begin(name, "forward+prepare" if with_prepare else "forward")
        self._in_forward = name

    def _on_forward_end(self, name: str, module: nn.Module, args, output) -> None:
        self.copier.join()
        self._pass, self._in_forward, self._current = None, None, None
        self._pass_id += 1  # what the slots hold is trusted within one pass only

    def _on_prepare(self, name: str, module: nn.Module, args) -> None:
        if self._in_forward != name:
            self._begin(name, "prepare")

    def _on_unit(self, name: str, k: int, module: nn.Module, args) -> None:
        if (name, k) != self._current:
            self._enter(name, k)

    # ---------------------------------------------------------------- scheduling
    def _begin(self, name: str, kind: str) -> None:
        self._pass_id += 1
        plan = self._stages[name].plans[kind]
        self._pass, self._current = _Pass(name, plan), None
        self._issue(name, plan, START)

    def _issue(self, name: str, plan: Plan, pos: int) -> None:
        if targets := plan.loads.get(pos):
            self.copier.after_compute()
            for q in targets:
                self._load(name, plan.seq[q])

    def _load(self, name: str, k: int) -> None:
        st, slot = self._stages[name], k % self.n_slots
        n, off = st.unit_bytes[k], st.host_offsets[k]
        dst = self._slots.buffers[slot][:n]
        self._slots.ready[slot] = self.copier.copy(dst, st.host[off : off + n])
        self._slots.holder[slot] = (name, k, self._pass_id)

    def _enter(self, name: str, k: int) -> None:
        self._current = (name, k)
        slot, p = k % self.n_slots, self._pass
        if p is not None and p.on_plan and p.stage == name:
            nxt = p.pos + 1
            if nxt < len(p.plan.seq) and p.plan.seq[nxt] == k:
                p.pos = nxt
                self._issue(name, p.plan, nxt)
                if nxt in p.plan.waits:
                    self.copier.wait(self._slots.ready[slot])
                return
        if p is not None:
            p.on_plan = False
        if self._slots.holder[slot] != (name, k, self._pass_id):
            self.misses += 1
            self.copier.after_compute()
            self._load(name, k)
        self.copier.wait(self._slots.ready[slot])

    # ---------------------------------------------------------------- sizes
    def streams(self, name: str) -> bool:
        """Whether the stage has streamed units (Stage A has none: it stays whole)."""
        return bool(self._stages[name].unit_bytes)

    def resident_bytes(self, name: str) -> int:
        return self._stages[name].resident_bytes

    def host_bytes(self) -> int:
        return sum(st.host.numel() for st in self._stages.values())

    def device_bytes(self) -> int:
        return self.slot_size * self.n_slots + sum(
            st.resident_bytes for st in self._stages.values()
        )
