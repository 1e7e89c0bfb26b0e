"""The fused upsample + transposed-convolution kernels against PyTorch's own modules."""

import pytest
import torch
import torch.nn.functional as F

from glo_search.kernels import ShiftSum, upsample_conv_transpose
from glo_search.model import ACTIVATION_CHANNELS, GloGenerator


def _reference(x, weight, bias, padding):
    upsampled = F.interpolate(x, scale_factor=2)  # nearest, as nn.Upsample
    return F.conv_transpose2d(upsampled, weight, bias, padding=padding)


@pytest.mark.parametrize(
    ("channels_in", "channels_out", "size", "padding"),
    [(16, 16, 5, 0), (16, 1, 14, 2), (3, 2, 4, 1), (2, 3, 1, 0)],
)
def test_fused_stage_matches_conv_transpose(channels_in, channels_out, size, padding):
    generator = torch.Generator().manual_seed(0)
    options = {"dtype": torch.float64, "generator": generator}
    x = torch.randn(5, channels_in, size, size, **options).requires_grad_()
    weight = torch.randn(channels_in, channels_out, 5, 5, **options).requires_grad_()
    bias = torch.randn(channels_out, **options).requires_grad_()
    expected = _reference(x, weight, bias, padding)
    # The kernel takes and returns channels-last (B, H, W, C) tensors.
    fused = upsample_conv_transpose(x.permute(0, 2, 3, 1), weight, bias, padding)
    fused = fused.permute(0, 3, 1, 2)
    assert fused.shape == expected.shape
    torch.testing.assert_close(fused, expected)
    upstream = torch.randn(expected.shape, **options)
    expected_grads = torch.autograd.grad(expected, (x, weight, bias), upstream)
    fused_grads = torch.autograd.grad(fused, (x, weight, bias), upstream)
    for name, got, want in zip(
        ("input", "weight", "bias"), fused_grads, expected_grads, strict=True
    ):
        torch.testing.assert_close(got, want, msg=f"gradient of {name} differs")


def test_shift_sum_gradient():
    taps = torch.randn(2, 3, 4, 3, 3, 5, dtype=torch.float64, requires_grad=True)
    bias = torch.randn(5, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(ShiftSum.apply, (taps, bias))


def test_fused_stage_rejects_other_kernel_sizes():
    with pytest.raises(ValueError, match=r"weight must be \(in, out, 5, 5\), got \(4, 4, 3, 3\)"):
        upsample_conv_transpose(torch.zeros(1, 5, 5, 4), torch.zeros(4, 4, 3, 3), None, 0)


@pytest.mark.parametrize("mode", ["train", "eval"])
def test_glo_generator_matches_module_path(mode):
    torch.manual_seed(0)
    generator = GloGenerator(5, 25).double()
    getattr(generator, mode)()
    class_code = torch.randn(9, 5, dtype=torch.float64)
    content_code = torch.randn(9, 25, dtype=torch.float64)
    hidden = generator.fc(torch.cat([class_code, content_code], dim=1))
    maps = generator.to_14(hidden.view(-1, ACTIVATION_CHANNELS, 5, 5))
    torch.testing.assert_close(generator.activations(class_code, content_code), maps)
    torch.testing.assert_close(generator(class_code, content_code), generator.to_28(maps))
