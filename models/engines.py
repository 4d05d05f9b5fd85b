"""Inference engines: how a backend runs its network, and the parity gate that admits one.

An engine changes only how the network's convolutions are computed; the
sliding window, its Gaussian weighting, the resampling and the
post-processing stay those of the model's own tool (nnU-Net's predictor,
MONAI's ``sliding_window_inference``).

* ``fp32``: PyTorch float32, as the tools run on a CPU (the reference).
* ``bf16``: the network under ``torch.autocast("cpu", dtype=torch.bfloat16)``
  with ``channels_last_3d`` weights and inputs (oneDNN's bfloat16 kernels; on a
  GPU the CUDA autocast in bfloat16); outputs are returned as float32.
* ``auto``: the fastest engine that passed the parity gate on this device kind
  (``ENGINE_PREFERENCE``, from the measurements in docs/models.md), else fp32.

An engine other than fp32 is used only where the gate passed on this device
kind (:mod:`segnode.models.engine_gate`): labels agree with fp32 on the
committed tiny models (Dice >= ``DICE_MIN`` per label) and a real-size
network's argmax agrees on >= ``AGREEMENT_MIN`` of the voxels.  Asked for an
engine that has not passed, a backend logs a warning and runs fp32.
"""

from __future__ import annotations

import logging
import platform
import re
from enum import StrEnum
from pathlib import Path

from segnode.errors import ConfigError

logger = logging.getLogger(__name__)

#: the gate's thresholds
DICE_MIN = 0.999
AGREEMENT_MIN = 0.999


class Engine(StrEnum):
    AUTO = "auto"
    FP32 = "fp32"
    BF16 = "bf16"


#: engines ``auto`` tries, fastest first (measured, docs/models.md); fp32 is the fall back
ENGINE_PREFERENCE: tuple[Engine, ...] = (Engine.BF16,)


def parse_engine(value: str | Engine) -> Engine:
    """``value`` as an :class:`Engine` (a clear :class:`ConfigError` if unknown)."""
    try:
        return Engine(value)
    except ValueError:
        raise ConfigError(f"unknown engine {value!r}; one of {', '.join(e.value for e in Engine)}") from None


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text(encoding="utf-8").splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def device_kind(device: str) -> str:
    """A name for the kind of device the gate's figures hold for (CPU model and ISA, or GPU name)."""
    import torch

    if device.startswith("cuda"):
        index = int(device.split(":")[1]) if ":" in device else 0
        raw = f"cuda-{torch.cuda.get_device_name(index)}"
    else:
        raw = f"cpu-{_cpu_model()}-{torch.backends.cpu.get_cpu_capability()}"
    return re.sub(r"[^A-Za-z0-9.+-]+", "_", raw).strip("_").lower()
