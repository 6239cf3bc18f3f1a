"""contract.precision: what fp32, tf32 and bf16 set, and (on a GPU) that fp32 really is full fp32 there."""
import pytest
import torch

from contract.precision import TF32, apply_precision, precision_record
from contract.spec import PRECISIONS, settings_problems


@pytest.fixture
def tf32_switches(monkeypatch):
    """Whatever a test sets, the process's switches are put back afterwards."""
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", torch.backends.cudnn.allow_tf32)
    monkeypatch.setattr(torch.backends.cuda.matmul, "allow_tf32", torch.backends.cuda.matmul.allow_tf32)


def test_every_precision_sets_both_switches(tf32_switches):
    assert set(TF32) == set(PRECISIONS) == {"fp32", "tf32", "bf16"}
    for precision, want in (("tf32", True), ("fp32", False), ("tf32", True), ("bf16", False)):
        apply_precision(precision)
        assert precision_record() == {"tf32_conv": want, "tf32_matmul": want}
        assert torch.backends.cudnn.allow_tf32 is want and torch.backends.cuda.matmul.allow_tf32 is want
    assert settings_problems({"precision": "tf32"}) == []
    assert settings_problems({"precision": "fp16"}) == ["precision 'fp16' is not one of ('fp32', 'tf32', 'bf16')"]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_fp32_is_full_fp32_on_cuda_and_tf32_is_not(tf32_switches):
    """Against float64: a convolution and a matmul with 1152- and 4096-long sums are within 1e-5 (relative, norm-wise)
    in fp32, and off by more than 1e-4 with TF32 (a 10-bit mantissa in the products) on a GPU that has it."""
    g = torch.Generator().manual_seed(0)
    x, w = torch.randn(8, 128, 16, 16, generator=g), torch.randn(64, 128, 3, 3, generator=g)
    a, b = torch.randn(256, 4096, generator=g), torch.randn(4096, 256, generator=g)
    conv_ref = torch.nn.functional.conv2d(x.double(), w.double(), padding=1)
    mm_ref = a.double() @ b.double()
    errors = {}
    for precision in ("fp32", "tf32"):
        apply_precision(precision)
        conv = torch.nn.functional.conv2d(x.to("cuda"), w.to("cuda"), padding=1).cpu().double()
        mm = (a.to("cuda") @ b.to("cuda")).cpu().double()
        # norm-wise: TF32 rounds each factor to 11 bits, about 7e-4 relative over such sums; fp32, about 1e-7
        errors[precision] = [float((got - ref).norm() / ref.norm()) for got, ref in ((conv, conv_ref), (mm, mm_ref))]
    print(f"max relative error against float64 (conv, matmul): fp32 {errors['fp32']}, tf32 {errors['tf32']}")
    assert max(errors["fp32"]) < 1e-5
    if torch.cuda.get_device_capability()[0] >= 8:  # Ampere and later have TF32
        assert min(errors["tf32"]) > 1e-4
