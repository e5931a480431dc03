"""Backend registry: a backend forced through CASCADE_RT_BACKEND that cannot run an op falls back
to torch with one logged warning naming the op and the backend used (never silently), and
`cascade-rt info` says which backend each op runs on."""

from __future__ import annotations

import logging

import pytest
import torch

from cascade_rt import cli
from cascade_rt.ops import attention, registry
from cascade_rt.ops.registry import ENV_VAR, Impl

CPU = torch.device("cpu")


@pytest.fixture(autouse=True)
def _fresh_registry_state():
    registry.clear_cache()
    yield
    registry.clear_cache()


@pytest.fixture
def fake_op(monkeypatch: pytest.MonkeyPatch) -> str:
    """An op with a cpp backend that never supports its inputs, plus the torch reference."""

    def never(**_: object) -> bool:
        return False

    impls = {
        "cpp": Impl("cpp", lambda **_: None, never),
        "torch": Impl("torch", lambda **_: None, lambda **_: True),
    }
    monkeypatch.setitem(registry._REGISTRY, "fake_op", impls)
    return "fake_op"


def _fallback_records(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == "cascade_rt"]


def test_forced_backend_missing_for_op_warns_once(monkeypatch, caplog) -> None:
    """attention has no cpp backend: CASCADE_RT_BACKEND=cpp runs torch and says so, once."""
    monkeypatch.setenv(ENV_VAR, "cpp")
    q = torch.randn(1, 3, 2, 8)  # [B, N, H, D]
    with caplog.at_level(logging.WARNING, logger="cascade_rt"):
        out = attention(q, q, q)
        attention(q, q, q)
        assert registry.resolve("attention", device=CPU, dtype=torch.bfloat16).backend == "torch"
    expected = torch.softmax(q.transpose(1, 2) @ q.permute(0, 2, 3, 1) / 8**0.5, -1) @ q.transpose(
        1, 2
    )  # [B, H, N, D]
    torch.testing.assert_close(out, expected.transpose(1, 2), rtol=1e-5, atol=1e-6)
    messages = _fallback_records(caplog)
    assert len(messages) == 1, messages
    assert "attention has no cpp backend" in messages[0]
    assert "torch runs attention" in messages[0] and f"{ENV_VAR}=cpp" in messages[0]


def test_forced_backend_present_but_unsupported_warns(monkeypatch, caplog, fake_op) -> None:
    monkeypatch.setenv(ENV_VAR, "cpp")
    with caplog.at_level(logging.WARNING, logger="cascade_rt"):
        assert registry.resolve(fake_op, device=CPU, dtype=torch.float32).backend == "torch"
    (message,) = _fallback_records(caplog)
    assert "its cpp backend cannot run it on cpu" in message and "torch runs fake_op" in message


@pytest.mark.parametrize("setting", ["", "cpp,torch", "torch"])
def test_no_warning_when_torch_is_accepted(monkeypatch, caplog, fake_op, setting) -> None:
    """Unset (automatic choice), or torch named in the list: running torch is what was asked."""
    monkeypatch.setenv(ENV_VAR, setting)
    with caplog.at_level(logging.WARNING, logger="cascade_rt"):
        assert registry.resolve(fake_op, device=CPU, dtype=torch.float32).backend == "torch"
        assert registry.selected(fake_op, CPU, torch.float32) == ("torch", None)
    assert _fallback_records(caplog) == []


def test_explicit_backend_argument_still_raises(fake_op) -> None:
    with pytest.raises(ValueError, match="backend 'cpp' cannot run fake_op"):
        registry.resolve(fake_op, "cpp", device=CPU, dtype=torch.float32)


def test_unknown_forced_backend_is_an_error(monkeypatch) -> None:
    monkeypatch.setenv(ENV_VAR, "cpp,metal")
    with pytest.raises(ValueError, match=r"unknown backend\(s\) \['metal'\]"):
        registry.resolve("attention", device=CPU, dtype=torch.float32)


def test_selected_names_backend_and_reason(monkeypatch) -> None:
    monkeypatch.setenv(ENV_VAR, "cpp")
    used, reason = registry.selected("attention", CPU, torch.float32)
    assert used == "torch"
    assert reason == f"{ENV_VAR}=cpp: attention has no cpp backend, so torch runs attention"


def test_info_prints_backend_per_op_and_fallback(monkeypatch, capsys) -> None:
    monkeypatch.setenv(ENV_VAR, "cpp")
    assert cli.main(["info"]) == 0
    out = capsys.readouterr().out
    assert f"{ENV_VAR}=cpp" in out
    lines = out.splitlines()
    (row,) = [ln for ln in lines if ln.split()[:2] == ["attention", "cpu"]]
    assert "runs torch" in row
    note = lines[lines.index(row) + 1]
    assert "note:" in note and "attention has no cpp backend" in note
    for op in registry.ops():
        assert any(ln.split()[:2] == [op, "cpu"] and " runs " in ln for ln in lines), op
