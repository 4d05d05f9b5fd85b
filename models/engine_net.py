"""A network run by an engine: the module the tools' own sliding windows call.

:class:`EngineNetwork` wraps a loaded ``torch.nn.Module``; its ``forward``
takes and returns what the wrapped network does (float32 in, float32 out), so
nnU-Net's predictor (through its public ``manual_initialization``) and MONAI's
``sliding_window_inference`` use it unchanged.  ``state_dict`` and
``load_state_dict`` are the wrapped network's, so nnU-Net's per-fold weight
loading works as before (``load_state_dict`` copies into the existing
parameters, which keeps their channels-last layout).
"""

from __future__ import annotations

from collections.abc import Mapping
from contextlib import AbstractContextManager, nullcontext
from typing import Any

import torch

from segnode.models.engines import Engine


def _autocast(engine: Engine, device_type: str) -> AbstractContextManager[object]:
    if engine is Engine.BF16:
        return torch.autocast(device_type, dtype=torch.bfloat16)
    return nullcontext()


class EngineNetwork(torch.nn.Module):
    """``network`` computed by ``engine`` (``fp32`` leaves it as it is)."""

    def __init__(self, network: torch.nn.Module, engine: Engine) -> None:
        super().__init__()
        if engine is Engine.AUTO:
            raise ValueError("resolve 'auto' to an engine before wrapping a network")
        self.network = network
        self.engine = engine
        self.channels_last = engine is Engine.BF16
        if self.channels_last:
            self.network.to(memory_format=torch.channels_last_3d)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.channels_last and x.ndim == 5:
            x = x.contiguous(memory_format=torch.channels_last_3d)
        with _autocast(self.engine, x.device.type):
            out = self.network(x)
        if not isinstance(out, torch.Tensor):
            raise TypeError(f"the network returns {type(out).__name__}, not one tensor")
        return out.float().contiguous()

    def state_dict(self, *args: Any, **kwargs: Any) -> Any:  # noqa: ANN401 - torch's own signature
        return self.network.state_dict(*args, **kwargs)

    def load_state_dict(self, state_dict: Mapping[str, Any], strict: bool = True, assign: bool = False) -> Any:  # noqa: ANN401
        return self.network.load_state_dict(state_dict, strict=strict, assign=assign)


def wrap(network: torch.nn.Module, engine: Engine) -> torch.nn.Module:
    """``network`` as ``engine`` computes it (the network itself for fp32)."""
    return network if engine is Engine.FP32 else EngineNetwork(network, engine).eval()
