"""What a spec's precision means for torch's float32 arithmetic on CUDA (TF32 or full fp32): set by both entry points
before training, and read back into result.json.

| precision | autocast    | float32 convolutions and matmuls on CUDA                                            |
|-----------|-------------|-------------------------------------------------------------------------------------|
| fp32      | none        | full fp32: TF32 off (cuDNN would otherwise use TF32 for convolutions by default)    |
| tf32      | none        | TF32 (10-bit mantissa products, fp32 sums) for convolutions and matmuls             |
| bf16      | bf16        | the convolutions and matmuls in bf16; what autocast leaves in float32, full fp32    |

The switches are CUDA's; a CPU computes in full fp32 whatever they say. result.json records them as the run left
them (tf32_conv, tf32_matmul).
"""
from __future__ import annotations

TF32 = {"fp32": False, "tf32": True, "bf16": False}  # precision -> TF32 allowed for float32 convolutions, matmuls


def apply_precision(precision: str) -> None:
    """Set cuDNN's and cuBLAS's TF32 switches for `precision` (process-wide: one run per process)."""
    import torch

    allow = TF32[precision]
    torch.backends.cudnn.allow_tf32 = allow
    torch.backends.cuda.matmul.allow_tf32 = allow


def precision_record() -> dict[str, bool]:
    """cuDNN's and cuBLAS's TF32 switches as they are now (tf32_conv, tf32_matmul): read back at the end of a run, so
    that a change made by anything during it shows."""
    import torch

    return {"tf32_conv": bool(torch.backends.cudnn.allow_tf32),
            "tf32_matmul": bool(torch.backends.cuda.matmul.allow_tf32)}
