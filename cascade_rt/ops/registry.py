"""Backend registry: each op has up to three implementations, tried in a fixed order.

The order is cuda (CUDA C++ from the extension), triton, cpp (the extension's C++ CPU kernels),
torch (the reference: runs anywhere and is the test oracle). `CASCADE_RT_BACKEND=torch` (or
`triton`, `cuda`, `cpp`) forces one backend for every op where it can run; a comma list
(`triton,torch`) sets the order. Where none of the named backends can run an op (no such
backend for it, or not on this device or dtype), torch runs it and the `cascade_rt` logger warns
once per (op, device, setting), naming the op and the backend used: a forced run never changes
backend silently. Naming torch in the list (`cpp,torch`) accepts that fallback without a warning.
Models resolve their implementations once per stage setup with `resolve`, never per call inside
the sampling loop.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

ORDER: tuple[str, ...] = ("cuda", "triton", "cpp", "torch")
ENV_VAR = "CASCADE_RT_BACKEND"
PROFILE_VAR = "CASCADE_RT_PROFILE"  # =1: label op calls for torch.profiler (bench/profile_step.py)


@dataclass(frozen=True)
class Impl:
    """One backend of one op."""

    backend: str
    fn: Callable[..., Any]  # writes into its `out` argument(s)
    supports: Callable[..., bool]  # (device, dtype, **shape facts) -> usable here?


_REGISTRY: dict[str, dict[str, Impl]] = {}
_RESOLVED: dict[tuple, Impl] = {}
_WARNED: set[tuple] = set()  # (op, device type, CASCADE_RT_BACKEND) fallbacks already logged
log = logging.getLogger("cascade_rt")


def register(op: str, impl: Impl) -> None:
    if impl.backend not in ORDER:
        raise ValueError(f"unknown backend {impl.backend!r}; expected one of {ORDER}")
    _REGISTRY.setdefault(op, {})[impl.backend] = impl
    _RESOLVED.clear()


def backends(op: str) -> dict[str, Impl]:
    """All registered implementations of `op`, keyed by backend."""
    if op not in _REGISTRY:
        raise KeyError(f"no op named {op!r}; known ops: {sorted(_REGISTRY)}")
    return dict(_REGISTRY[op])


def ops() -> list[str]:
    """Names of every registered op."""
    return sorted(_REGISTRY)


def live_backends(op: str, device, dtypes=None) -> list[str]:
    """Backends of `op` that can run on `device` for every dtype given (bf16 and fp32 by default),
    in dispatch order. Shape facts are left at their defaults, so this answers 'in principle'."""
    import torch

    dtypes = dtypes or (torch.bfloat16, torch.float32)
    impls = backends(op)
    live = []
    for name in order():
        impl = impls.get(name)
        if impl is None or _interpreter_only(name, device, backend=None):
            continue
        try:
            ok = all(impl.supports(device=device, dtype=dt) for dt in dtypes)
        except TypeError:
            ok = False
        if ok:
            live.append(name)
    return live


def forced() -> tuple[str, ...]:
    """The backends CASCADE_RT_BACKEND names, in its order; empty when it is unset."""
    raw = os.environ.get(ENV_VAR, "").strip()
    if not raw:
        return ()
    names = tuple(n.strip() for n in raw.split(",") if n.strip())
    bad = [n for n in names if n not in ORDER]
    if bad:
        raise ValueError(f"{ENV_VAR}={raw!r} names unknown backend(s) {bad}; choose from {ORDER}")
    return names


def order() -> tuple[str, ...]:
    """Backend preference order, from CASCADE_RT_BACKEND when it is set."""
    names = forced()
    if not names:
        return ORDER
    # The reference stays last so every op can still run (with a warning, see `_resolve`).
    return names if "torch" in names else (*names, "torch")


def selected(op: str, device, dtype) -> tuple[str, str | None]:
    """(backend `resolve` picks for `op` on `device` and `dtype` with default shape facts, and
    why it is not the one CASCADE_RT_BACKEND asked for, or None when it is or none was asked)."""
    impl = _resolve(op, None, {"device": device, "dtype": dtype}, warn=False)
    return impl.backend, _fallback_reason(op, impl.backend, device)


def _fallback_reason(op: str, used: str, device: Any) -> str | None:
    names = forced()
    if not names or used in names:
        return None
    missing = [n for n in names if n not in _REGISTRY[op]]
    present = [n for n in names if n in _REGISTRY[op]]
    why = []
    if missing:
        why.append(f"{op} has no {'/'.join(missing)} backend")
    if present:
        why.append(f"its {'/'.join(present)} backend cannot run it on {device} for these inputs")
    return f"{ENV_VAR}={','.join(names)}: {' and '.join(why)}, so {used} runs {op}"


def resolve(op: str, backend: str | None = None, **facts: Any) -> Impl:
    """First implementation of `op` that supports `facts` (device, dtype, sizes).

    With `backend` given, that one is used or a ValueError says why not. The answer is cached
    per (op, backend, facts, environment), so the sampling loop pays one dict lookup per op call,
    not a walk over the backends' predicates.
    """
    env = tuple(os.environ.get(v, "").strip() for v in (ENV_VAR, "TRITON_INTERPRET", PROFILE_VAR))
    key = (op, backend, env, tuple(sorted(facts.items(), key=lambda kv: kv[0])))
    impl = _RESOLVED.get(key)
    if impl is None:
        impl = _resolve(op, backend, facts, warn=True)
        if env[2] == "1":
            impl = _labelled(op, impl)
        _RESOLVED[key] = impl
    return impl


def _labelled(op: str, impl: Impl) -> Impl:
    """The same backend, its calls named `cascade_rt::<op>[<backend>]` in torch.profiler traces
    (native and Triton launches are otherwise invisible there)."""
    import torch

    label = f"cascade_rt::{op}[{impl.backend}]"

    def fn(*args: Any, **kwargs: Any) -> Any:
        with torch.profiler.record_function(label):
            return impl.fn(*args, **kwargs)

    return Impl(impl.backend, fn, impl.supports)


def _interpreter_only(name: str, device: Any, backend: str | None) -> bool:
    """Triton on CPU tensors is its interpreter (a test tool): never chosen unless asked for,
    by name or through CASCADE_RT_BACKEND."""
    automatic = backend is None and not os.environ.get(ENV_VAR, "").strip()
    return automatic and name == "triton" and device is not None and device.type != "cuda"


def clear_cache() -> None:
    """Forgets resolved backends and logged fallbacks (after the extension or the environment
    changed under us)."""
    _RESOLVED.clear()
    _WARNED.clear()


def _resolve(op: str, backend: str | None, facts: dict[str, Any], warn: bool) -> Impl:
    impls = backends(op)
    names = (backend,) if backend is not None else order()
    for name in names:
        if _interpreter_only(name, facts.get("device"), backend):
            continue
        impl = impls.get(name)
        if impl is not None and impl.supports(**facts):
            if warn and backend is None:
                _warn_fallback(op, name, facts.get("device"))
            return impl
    if backend is not None:
        raise ValueError(f"backend {backend!r} cannot run {op} for {facts}")
    raise ValueError(f"no backend among {names} can run {op} for {facts}")


def _warn_fallback(op: str, used: str, device: Any) -> None:
    key = (op, getattr(device, "type", str(device)), os.environ.get(ENV_VAR, "").strip())
    if key in _WARNED:
        return
    reason = _fallback_reason(op, used, device)
    if reason is not None:
        _WARNED.add(key)
        log.warning("%s", reason)
