"""Backend entry: options, config validation, the default state, no-attention models, the entry point."""

from __future__ import annotations

import logging
import subprocess
import sys
import textwrap

import pytest
import torch
from torch import nn

import omni_compile
from omni_compile import OmniConfig, OmniState
from omni_compile.backend import resolve_options


pytestmark = pytest.mark.usefixtures("fresh_dynamo")  # tests/conftest.py


class MLP(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Linear(8, 16)
        self.b = nn.Linear(16, 8)

    def forward(self, x):
        return self.b(torch.relu(self.a(x)))


def test_unknown_option_raises_before_compiling():
    with pytest.raises(ValueError, match=r"unknown option\(s\) \['bogus'\]; valid options are: policy, block_cache, block_q"):
        resolve_options({"bogus": 1})
    model = MLP()
    compiled = torch.compile(model, backend="flashomni", options={"bogus": 1, "use_inductor": False})
    with pytest.raises(torch._dynamo.exc.BackendCompilerFailed) as info:
        compiled(torch.randn(2, 8))
    assert isinstance(info.value.inner_exception, ValueError)
    assert "valid options are" in str(info.value)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"policy": "magic"}, r"OmniConfig.policy must be one of"),
        ({"block_q": 100}, r"OmniConfig.block_q must be a power of two from 16 to 256"),
        ({"block_kv": 8}, r"OmniConfig.block_kv must be a power of two from 16 to 256"),
        ({"use_inductor": "yes"}, r"OmniConfig.use_inductor must be True or False"),
        ({"gemm_o": 1}, r"OmniConfig.gemm_o must be True or False"),
    ],
)
def test_config_validation(kwargs, match):
    with pytest.raises(ValueError, match=match):
        OmniConfig(**kwargs)


def test_state_option_and_conflicts():
    st = OmniState(OmniConfig(use_inductor=False))
    assert resolve_options({"state": st}) is st
    with pytest.raises(ValueError, match="together with 'state'"):
        resolve_options({"state": st, "block_q": 64})
    with pytest.raises(TypeError, match="must be an OmniState"):
        resolve_options({"state": "nope"})
    fresh = resolve_options({"block_q": 64})
    assert isinstance(fresh, OmniState) and fresh.config.block_q == 64


def test_no_attention_model_is_a_noop(caplog):
    model = MLP()
    x = torch.randn(2, 8)
    with caplog.at_level(logging.INFO, logger="omni_compile"):
        out = torch.compile(model, backend="flashomni", options={"use_inductor": False})(x)
    st = omni_compile.last_state()
    assert st.sites == [] and st.compiles[0]["sites"] == 0
    assert any("no attention sites; graph left unchanged" in r.getMessage() for r in caplog.records)
    torch.testing.assert_close(out, model(x))


def test_summary_log_line(caplog):
    sys.path.insert(0, __file__.rsplit("/", 1)[0])
    import _tiny_models as T

    model, make_inputs = T.build("wan")
    with caplog.at_level(logging.INFO, logger="omni_compile"), torch.no_grad():
        torch.compile(model, backend="flashomni", options={"use_inductor": False, "block_q": 16})(**make_inputs(0))
    lines = [r.getMessage() for r in caplog.records if r.levelno == logging.INFO and r.getMessage().startswith("flashomni:")]
    # Wan normalises q over all heads of a token (RMSNorm across heads): GEMM-Q holds where every head reuses
    # and the default block caching (ResidualChange) splits the graph at its 2 blocks
    assert lines == ["flashomni: 4 attention sites, 4 rewritten (2 self, 2 cross); GEMM-Q 4, GEMM-O 4",
                     "flashomni: 2 blocks (2 cacheable), 4 regions"]
    assert omni_compile.last_state().summary() == lines[0][len("flashomni: "):]


def test_config_switches_disable_rewrites():
    sys.path.insert(0, __file__.rsplit("/", 1)[0])
    import _tiny_models as T

    model, make_inputs = T.build("dit")
    st = OmniState(OmniConfig(use_inductor=False, block_q=16, gemm_q=False, gemm_o=False))
    with torch.no_grad():
        out = torch.compile(model, backend="flashomni", options={"state": st})(**make_inputs(0))[0]
        ref = model(**make_inputs(0))[0]
    assert [(s.rewritten, s.gemm_q, s.gemm_o) for s in st.sites] == [(True, False, False)] * 2
    assert "OmniConfig.gemm_q=False" in st.sites[0].gemm_q_reason
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-4)
    torch._dynamo.reset()
    st = OmniState(OmniConfig(use_inductor=False, attention=False))
    with torch.no_grad():
        torch.compile(model, backend="flashomni", options={"state": st})(**make_inputs(0))
    assert [s.rewritten for s in st.sites] == [False, False]
    assert "OmniConfig.attention=False" in st.sites[0].reason


def test_entry_point_without_importing_omni_compile():
    """`backend="flashomni"` resolves through the torch_dynamo_backends entry point in a fresh process,
    and a model with no attention compiles through Inductor exactly as before."""
    code = textwrap.dedent(
        """
        import sys, torch
        from torch import nn
        assert "omni_compile" not in sys.modules
        m = nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 4))
        x = torch.randn(3, 8)
        out = torch.compile(m, backend="flashomni")(x)
        torch.testing.assert_close(out, m(x))
        import omni_compile
        st = omni_compile.last_state()
        assert st is not None and st.sites == [] and st.config.use_inductor
        print("OK")
        """
    )
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    assert "OK" in res.stdout
