"""The run's device settings for this process (precision, current GPU, cuDNN), autocast, and its GPU generator on
resume."""
from __future__ import annotations

import torch

from contract.precision import apply_precision
from contract.spec import RunSpec


def restore_cuda_rng(saved, device: torch.device) -> None:
    """Put back the global generator of the run's GPU from a checkpoint's rng["cuda"]: one state (the run's own
    GPU), or a list of every visible GPU's (checkpoints of earlier versions: the entry at the run's GPU index, none
    if the list is shorter), so that a checkpoint resumes with any number of GPUs visible. Nothing in a step draws
    from this generator (the augmentation has its own, in the samplers); it is kept for completeness."""
    if device.type != "cuda" or saved is None:
        return
    if isinstance(saved, (list, tuple)):
        if device.index >= len(saved):
            return
        saved = saved[device.index]
    torch.cuda.set_rng_state(saved, device)


def use_device(spec: RunSpec, device: torch.device) -> None:
    """This process's settings for the run's device: TF32 or full fp32 as the spec's precision says; on CUDA, the
    current device (an indexed one: set_device refuses a bare "cuda") and cuDNN's autotuning."""
    apply_precision(spec.precision)
    if device.type == "cuda":
        torch.cuda.set_device(device)  # events, pinned memory and the default stream belong to this run's GPU
        torch.backends.cudnn.benchmark = True  # fixed input shapes: let cuDNN pick the fastest conv algorithms


def autocast(spec: RunSpec, device: torch.device):
    """bf16 autocast for spec.precision "bf16", else a no-op context."""
    return torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=spec.precision == "bf16")
