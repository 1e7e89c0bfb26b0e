"""Hand-written training step of the ``glo`` generator with a pixel loss.

At a batch of 32 on a CPU, a training step is small enough that the cost of running it
op by op through autograd (graph nodes, saved tensors, the optimizer's Python loop) is
larger than its arithmetic. :class:`GloStep` computes the forward pass, the loss and every
gradient explicitly, with the generator's own parameters and the fused upsample +
transposed-convolution form of :mod:`glo_search.kernels`, and leaves the gradients in
each parameter's ``.grad`` for the optimizer. Its gradients, loss and batch-norm running
statistics equal autograd's on the module path to float rounding (tests/test_step.py).

It covers the ``glo`` generator and the losses ``l1``, ``l2`` and ``l1+l2``; the trainer
uses autograd for every other combination.

The step and :func:`decode` run the convolution stages, batch norm and the loss as the
C kernels of :mod:`glo_search.native`, on float32 tensors in CPU memory. Each stage is
one pass per image that sums its products into the output while they are in cache.
PyTorch would write them to memory and read them back in a run of small tensor
operations. The linear layers stay PyTorch's. Without the kernels (no C compiler,
``GLO_SEARCH_NATIVE=0``, float64) the same computation runs in PyTorch operations.
"""

from __future__ import annotations

import math
from collections.abc import Iterator

import torch
import torch.nn.functional as F

from glo_search import native
from glo_search.kernels import KERNEL, TAPS, _fold_matrix_on
from glo_search.losses import recon_error
from glo_search.model import ACTIVATION_CHANNELS, GloGenerator, LatentCodes

# d(loss)/d(output - target) per pixel, times the pixel count: (sign weight, linear weight).
# l1 = mean |d|: sign(d); l2 = mean d^2: 2 d; l1+l2 = half of each: 0.5 sign(d) + d.
LOSS_GRADIENT = {"l1": (1.0, 0.0), "l2": (0.0, 2.0), "l1+l2": (0.5, 1.0)}
FC_LAYERS = (0, 2, 4)  # indices of the Linear layers in GloGenerator.fc


def supported(generator: torch.nn.Module, loss: str) -> bool:
    """Return whether :class:`GloStep` can train this generator with this loss."""
    return type(generator) is GloGenerator and loss in LOSS_GRADIENT


class GloStep:
    """Forward, loss and backward of one batch of the ``glo`` generator, by hand."""

    def __init__(
        self, generator: GloGenerator, codes: LatentCodes, loss: str, use_native: bool = True
    ) -> None:
        self.generator = generator
        self.codes = codes
        self.sign_weight, self.linear_weight = LOSS_GRADIENT[loss]
        self.linears = [generator.fc[i] for i in FC_LAYERS]
        self.conv14, self.norm = generator.to_14[1], generator.to_14[2]
        self.conv28 = generator.to_28[1]
        # The C kernels (glo_search/native) take float32 tensors in CPU memory.
        tensors = [*generator.parameters(), *generator.buffers(), *codes.parameters()]
        floats = all(t.dtype in (torch.float32, torch.int64) for t in tensors)
        on_cpu = all(t.device.type == "cpu" for t in tensors)
        fits = floats and on_cpu and ACTIVATION_CHANNELS == native.MAP_CHANNELS
        self.kernels = native.kernels() if use_native and fits else None
        self.allocate_gradients()

    def allocate_gradients(self) -> None:
        """Give each parameter without one a zero ``.grad``, which the step writes into.

        ``optimizer.zero_grad(set_to_none=True)`` removes them; the trainer calls this at
        the start of each epoch.
        """
        for parameter in [*self.generator.parameters(), *self.codes.parameters()]:
            if parameter.grad is None:
                parameter.grad = torch.zeros_like(parameter)

    @torch.no_grad()
    def __call__(
        self,
        indices: torch.Tensor,
        labels: torch.Tensor,
        images: torch.Tensor,
        noise: torch.Tensor | None,
        content_decay: float,
    ) -> torch.Tensor:
        """Set every parameter's ``.grad`` for one batch and return the batch's objective.

        ``indices`` (B,) are the images' rows in the content table, ``labels`` (B,) their
        classes, ``images`` (B, 1, 28, 28) the targets and ``noise`` (B, content_dim) the
        noise added to the content codes, or None.
        """
        content = self.codes.content.index_select(0, indices)  # (B, content_dim)
        class_code = self.codes.classes.index_select(0, labels)  # (B, class_dim)
        noisy = content if noise is None else content + noise
        if self.kernels is not None:
            loss, grad = self._native_pass(class_code, noisy, images)
        else:
            saved = self._forward(class_code, noisy)
            output = saved.pop("output")  # (B, 28, 28)
            diff = (output - images.reshape(output.shape)).view(-1)
            loss, grad = self._pixel_loss(diff)
            grad = torch.ops.aten.sigmoid_backward(grad, output.view(-1))
            grad = self._backward(grad.view(*output.shape, 1), **saved)  # (B, code sizes)

        class_dim = class_code.shape[1]
        self.codes.classes.grad.zero_().index_add_(0, labels, grad[:, :class_dim])
        content_grad = grad[:, class_dim:]
        if content_decay > 0:
            loss += content_decay * content.square().sum(dim=1).mean()
            content_grad = content_grad.add(content, alpha=2 * content_decay / len(content))
        self.codes.content.grad.zero_().index_add_(0, indices, content_grad)
        return loss

    def _native_pass(
        self, class_code: torch.Tensor, content_code: torch.Tensor, images: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Forward, loss and backward with the C kernels for the convolution stages.

        Return the pixel loss and the gradient of the generator's input, as
        :meth:`_forward`, :meth:`_pixel_loss` and :meth:`_backward` do together.
        """
        lib = self.kernels
        batch = len(class_code)
        channels = ACTIVATION_CHANNELS
        conv14, norm, conv28 = self.conv14, self.norm, self.conv28
        hidden = [torch.cat([class_code, content_code], dim=1)]
        for linear in self.linears:
            hidden.append(torch.addmm(linear.bias, hidden[-1], linear.weight.t()).relu_())
        maps5 = hidden[-1].view(batch, channels, 5, 5).permute(0, 2, 3, 1).contiguous()

        kernel14 = _folded(conv14.weight)  # (in, [q1 q2 r1 r2 out])
        maps14 = maps5.new_empty(batch, 14, 14, channels)
        lib.stage_forward(maps5, kernel14, conv14.bias, maps14, None, None, batch, 5, 5, 0)
        active = torch.empty_like(maps14)
        mean, invstd = maps5.new_empty(2, channels)
        lib.norm_relu_forward(
            *(maps14, norm.weight, norm.bias, norm.running_mean, norm.running_var),
            *(active, mean, invstd),
            *(batch, 14 * 14, channels),
            norm.momentum,
            norm.eps,
        )
        norm.num_batches_tracked.add_(1)

        kernel28 = _folded(conv28.weight)  # (in, [q1 q2 r1 r2])
        grad28 = maps5.new_empty(batch, 28, 28)  # d(loss)/d(logits)
        sums = torch.empty(2, dtype=torch.float64)
        pixels = grad28.numel()
        if images.numel() != pixels:
            raise ValueError(
                f"images of shape {tuple(images.shape)} do not match a batch of {batch} "
                "28x28 images"
            )
        targets = images.to(torch.float32).contiguous()  # what the kernel reads
        lib.stage_loss(
            *(active, kernel28, conv28.bias, targets, grad28, sums),
            *(batch, 14, 14, 2),
            self.sign_weight,
            self.linear_weight,
            pixels,
        )
        abs_sum, square_sum = sums.tolist()
        loss = (self.sign_weight * abs_sum + self.linear_weight / 2 * square_sum) / pixels

        kernel28_grad, grad_active = torch.empty_like(kernel28), torch.empty_like(active)
        lib.stage_loss_backward(
            *(grad28, active, kernel28, kernel28_grad, grad_active, conv28.bias.grad),
            *(batch, 14, 14, 2),
        )
        _set_weight_grad(conv28, kernel28_grad)
        grad_maps14 = torch.empty_like(maps14)
        lib.norm_relu_backward(
            *(grad_active, active, maps14, mean, invstd, norm.weight),
            *(grad_maps14, norm.weight.grad, norm.bias.grad),
            *(batch, 14 * 14, channels),
        )
        kernel14_grad, grad = torch.empty_like(kernel14), torch.empty_like(maps5)
        lib.stage_backward(
            *(grad_maps14, maps5, kernel14, kernel14_grad, grad, conv14.bias.grad),
            *(batch, 5, 5, 0),
        )
        _set_weight_grad(conv14, kernel14_grad)
        grad = grad.permute(0, 3, 1, 2).reshape(batch, -1)  # (B, 400)
        return torch.tensor(loss), self._linear_backward(grad, hidden)

    def _forward(self, class_code: torch.Tensor, content_code: torch.Tensor) -> dict:
        """Run the generator in training mode; return its output and what backward needs."""
        batch = len(class_code)
        hidden = [torch.cat([class_code, content_code], dim=1)]
        for linear in self.linears:
            hidden.append(torch.addmm(linear.bias, hidden[-1], linear.weight.t()).relu_())
        # (B, 400) as (B, 16, 5, 5), made channels-last (B, 5, 5, 16).
        maps5 = hidden[-1].view(batch, ACTIVATION_CHANNELS, 5, 5).permute(0, 2, 3, 1)
        maps5 = maps5.contiguous()

        kernel14 = _folded(self.conv14.weight)
        maps14 = _stage_forward(maps5, kernel14, self.conv14.bias, 0)  # (B, 14, 14, 16)
        norm = self.norm
        normalized, mean, invstd = torch.native_batch_norm(
            maps14.permute(0, 3, 1, 2),
            norm.weight,
            norm.bias,
            norm.running_mean,
            norm.running_var,
            True,
            norm.momentum,
            norm.eps,
        )
        norm.num_batches_tracked.add_(1)
        active = normalized.relu_().permute(0, 2, 3, 1).contiguous()  # (B, 14, 14, 16)

        kernel28 = _folded(self.conv28.weight)
        logits = _stage_forward_t(active, kernel28, self.conv28.bias, 2)  # (B, 28, 28, 1)
        return {
            "output": logits.view(batch, 28, 28).sigmoid(),
            "hidden": hidden,
            "maps5": maps5,
            "kernel14": kernel14,
            "maps14": maps14,
            "batch_stats": (mean, invstd),
            "active": active,
            "kernel28": kernel28,
        }

    def _backward(
        self,
        grad: torch.Tensor,
        hidden: list[torch.Tensor],
        maps5: torch.Tensor,
        kernel14: torch.Tensor,
        maps14: torch.Tensor,
        batch_stats: tuple[torch.Tensor, torch.Tensor],
        active: torch.Tensor,
        kernel28: torch.Tensor,
    ) -> torch.Tensor:
        """Set the generator's gradients from the logits' gradient (B, 28, 28, 1); return
        the gradient of the generator's input (B, class_dim + content_dim)."""
        norm = self.norm
        grad = _stage_backward_t(grad, active, kernel28, self.conv28, 2)  # (B, 14, 14, 16)
        grad = torch.ops.aten.threshold_backward(grad, active, 0)
        grad, weight_grad, bias_grad = torch.ops.aten.native_batch_norm_backward(
            grad.permute(0, 3, 1, 2),
            maps14.permute(0, 3, 1, 2),
            norm.weight,
            norm.running_mean,
            norm.running_var,
            *batch_stats,
            True,
            norm.eps,
            [True, True, True],
        )
        norm.weight.grad.copy_(weight_grad)
        norm.bias.grad.copy_(bias_grad)
        grad = grad.permute(0, 2, 3, 1).contiguous()
        grad = _stage_backward(grad, maps5, kernel14, self.conv14, 0)  # (B, 5, 5, 16)
        grad = grad.permute(0, 3, 1, 2).reshape(len(grad), -1)  # (B, 400)
        return self._linear_backward(grad, hidden)

    def _linear_backward(self, grad: torch.Tensor, hidden: list[torch.Tensor]) -> torch.Tensor:
        """Set the linear layers' gradients from their output's gradient (B, 400); return
        the gradient of the generator's input."""
        layers = reversed(list(zip(self.linears, hidden[:-1], hidden[1:], strict=True)))
        for linear, inputs, outputs in layers:
            grad = torch.ops.aten.threshold_backward(grad, outputs, 0)
            torch.mm(grad.t(), inputs, out=linear.weight.grad)
            torch.sum(grad, dim=0, out=linear.bias.grad)
            grad = grad @ linear.weight
        return grad

    def _pixel_loss(self, diff: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Return the loss of the flat differences output - target, and its gradient."""
        pixels = diff.numel()
        signs = diff.sign()
        # Sums as dot products: sum |d| = d . sign(d), sum d^2 = d . d.
        loss = self.sign_weight * torch.dot(diff, signs)
        loss += self.linear_weight / 2 * torch.dot(diff, diff)
        loss /= pixels
        if self.linear_weight:
            grad = torch.add(diff, signs, alpha=self.sign_weight / self.linear_weight)
            return loss, grad.mul_(self.linear_weight / pixels)
        return loss, signs.mul_(self.sign_weight / pixels)


@torch.no_grad()
def decode(
    generator: GloGenerator,
    class_code: torch.Tensor,
    content_code: torch.Tensor,
    chunk: int | None = None,
) -> torch.Tensor:
    """Decode codes with the ``glo`` generator in evaluation mode (batch-norm running
    statistics), by the stages of :class:`GloStep`. Equals ``generator(...)`` to float
    rounding.

    The linear layers take every code at once. The convolution stages then run on
    ``chunk`` images at a time (all at once by default), whose maps stay in cache.
    """
    if len(class_code) == 0:
        return class_code.new_empty(0, 1, 28, 28)
    return _DecodeStages(generator, class_code, content_code).decode(chunk)


@torch.no_grad()
def reconstruction_error(
    generator: GloGenerator,
    class_code: torch.Tensor,
    content_code: torch.Tensor,
    targets: torch.Tensor,
    chunk: int | None = None,
) -> float:
    """Return the pixel error of :func:`glo_search.losses.recon_error` between the decoded
    codes and targets (B, 1, 28, 28), without keeping the decoded images.

    The C kernels sum each chunk's absolute and squared differences as they make its
    images. Against decoding first, this took 51 ms instead of 66 ms for 2,000
    reconstructions and 1,350 other images on one core of a 2-core Intel Xeon VM.
    """
    if targets.shape != (len(class_code), 1, 28, 28):
        raise ValueError(
            f"targets must be ({len(class_code)}, 1, 28, 28), one image per code; "
            f"got {tuple(targets.shape)}"
        )
    stages = _DecodeStages(generator, class_code, content_code)
    fits = targets.dtype == torch.float32 and targets.device.type == "cpu"
    if stages.lib is None or stages.batch == 0 or not fits:
        return recon_error(stages.decode(chunk), targets).item()
    if stages.nonfinite.any():
        return math.nan
    scratch = stages.maps5.new_empty(min(chunk or stages.batch, stages.batch), 1, 28, 28)
    sums = torch.empty(2, dtype=torch.float64)
    total = torch.zeros(2, dtype=torch.float64)
    for start, stop in stages.chunks(chunk):
        stages.run(start, stop, scratch[: stop - start], targets[start:stop], sums)
        total += sums
    pixels = targets.numel()
    return (0.5 * total[0] / pixels + 0.5 * total[1] / pixels).item()


class _DecodeStages:
    """The ``glo`` generator's linear layers applied to every code, and its convolution
    stages ready to run on a range of them."""

    def __init__(
        self, generator: GloGenerator, class_code: torch.Tensor, content_code: torch.Tensor
    ) -> None:
        self.batch = len(class_code)
        channels = ACTIVATION_CHANNELS
        hidden = generator.fc(torch.cat([class_code, content_code], dim=1))
        self.maps5 = hidden.view(self.batch, channels, 5, 5).permute(0, 2, 3, 1).contiguous()
        self.conv14, self.norm = generator.to_14[1], generator.to_14[2]
        self.conv28 = generator.to_28[1]
        self.kernel14, self.kernel28 = _folded(self.conv14.weight), _folded(self.conv28.weight)
        maps5 = self.maps5
        fits = (
            maps5.dtype == torch.float32 and not maps5.is_cuda and channels == native.MAP_CHANNELS
        )
        self.lib = native.kernels() if fits else None
        if self.lib is not None:
            norm = self.norm
            self.gain = norm.weight * (norm.running_var + norm.eps).rsqrt()
            self.shift = norm.bias - norm.running_mean * self.gain
            self.active: torch.Tensor | None = None
            # The kernels' sigmoid clamps its input from below, which turns NaN into a
            # finite value, so codes that are not finite would decode to finite images.
            # A row's sum is not finite when one of its values is not, or when it
            # overflows for the maps of a diverged model. Summing took 0.1 ms for 2,000
            # rows, where isfinite on every value took 2 ms.
            rows = self.maps5.sum(dim=(1, 2, 3))
            self.nonfinite = ~torch.isfinite(rows)  # (batch,)

    def decode(self, chunk: int | None) -> torch.Tensor:
        """Return every code's image, (batch, 1, 28, 28), decoded chunk images at a time.
        Codes that are not finite give NaN images, as the generator module does."""
        images = self.maps5.new_empty(self.batch, 1, 28, 28)
        for start, stop in self.chunks(chunk):
            self.run(start, stop, images[start:stop])
        if self.lib is not None and self.nonfinite.any():
            images[self.nonfinite] = math.nan
        return images

    def chunks(self, chunk: int | None) -> Iterator[tuple[int, int]]:
        step = chunk or max(self.batch, 1)
        for start in range(0, self.batch, step):
            yield start, min(start + step, self.batch)

    def run(
        self,
        start: int,
        stop: int,
        out: torch.Tensor,
        targets: torch.Tensor | None = None,
        sums: torch.Tensor | None = None,
    ) -> None:
        """Decode codes start to stop into out (stop - start, 1, 28, 28). With targets,
        the C kernel writes into out the loss gradient of zero weights instead, and into
        sums (2 doubles) the sums of |output - target| and (output - target)^2."""
        part = self.maps5[start:stop]
        if self.lib is None:
            out.copy_(
                _decode_stages(
                    part, self.kernel14, self.kernel28, self.conv14, self.norm, self.conv28
                )
            )
            return
        size = len(part)
        if self.active is None or len(self.active) < size:
            self.active = part.new_empty(size, 14, 14, ACTIVATION_CHANNELS)
        active = self.active[:size]
        self.lib.stage_forward(
            part, self.kernel14, self.conv14.bias, active, self.gain, self.shift, size, 5, 5, 0
        )
        targets = None if targets is None else targets.contiguous()
        self.lib.stage_loss(
            active, self.kernel28, self.conv28.bias, targets, out, sums, size, 14, 14, 2, 0, 0, 1
        )


def _decode_stages(
    maps5: torch.Tensor,
    kernel14: torch.Tensor,
    kernel28: torch.Tensor,
    conv14: torch.nn.ConvTranspose2d,
    norm: torch.nn.BatchNorm2d,
    conv28: torch.nn.ConvTranspose2d,
) -> torch.Tensor:
    """Run decode's convolution stages in PyTorch operations: (B, 5, 5, 16) -> images."""
    maps14 = _stage_forward(maps5, kernel14, conv14.bias, 0)
    normalized = F.batch_norm(
        maps14.permute(0, 3, 1, 2),
        norm.running_mean,
        norm.running_var,
        norm.weight,
        norm.bias,
        False,
        0.0,
        norm.eps,
    )
    active = normalized.relu_().permute(0, 2, 3, 1).contiguous()
    logits = _stage_forward_t(active, kernel28, conv28.bias, 2)
    return logits.permute(0, 3, 1, 2).sigmoid()  # (B, 1, 28, 28)


def _folded(weight: torch.Tensor) -> torch.Tensor:
    """Fold an (in, out, 5, 5) transposed-convolution weight into (in, [q1 q2 r1 r2 out]) taps."""
    in_channels, out_channels = weight.shape[:2]
    fold = _fold_matrix_on(weight.device, weight.dtype)
    kernel = weight.reshape(in_channels * out_channels, KERNEL * KERNEL) @ fold
    kernel = kernel.view(in_channels, out_channels, TAPS * TAPS * 4).transpose(1, 2)
    return kernel.reshape(in_channels, -1)


def _stage_forward(
    x: torch.Tensor, kernel: torch.Tensor, bias: torch.Tensor, padding: int
) -> torch.Tensor:
    """Upsample channels-last x (B, H, W, in) x2 and apply a transposed 5x5 convolution.

    One matrix product per tap, each added into its shifted window at once: the nine
    products stay in cache, where one product for all taps would not.
    """
    batch, height, width, in_channels = x.shape
    out_channels = bias.shape[0]
    inputs = x.view(-1, in_channels)
    kernel = kernel.view(in_channels, TAPS * TAPS, 4 * out_channels)
    phases = bias.repeat(4).expand(batch, height + 2, width + 2, 4 * out_channels).clone()
    for q1 in range(TAPS):
        for q2 in range(TAPS):
            taps = inputs @ kernel[:, q1 * TAPS + q2]  # (B*H*W, [r1 r2 out])
            phases[:, q1 : q1 + height, q2 : q2 + width] += taps.view(batch, height, width, -1)
    return _interleave(phases.view(batch, height + 2, width + 2, 2, 2, out_channels), padding)


def _interleave(phases: torch.Tensor, padding: int) -> torch.Tensor:
    """Interleave (B, H', W', 2, 2, out) phases into a (B, 2H' - 2p, 2W' - 2p, out) map.

    Row 2m + r is phase row m of parity r (likewise for columns), less ``padding`` rows
    and columns on each side.
    """
    batch, height, width, _, _, out_channels = phases.shape
    if padding % 2:
        raise ValueError(f"padding must be even, got {padding}")
    crop = padding // 2
    phases = phases[:, crop : height - crop, crop : width - crop]
    out = phases.permute(0, 1, 3, 2, 4, 5)
    return out.reshape(batch, 2 * (height - 2 * crop), 2 * (width - 2 * crop), out_channels)


def _stage_backward(
    grad: torch.Tensor,
    x: torch.Tensor,
    kernel: torch.Tensor,
    conv: torch.nn.ConvTranspose2d,
    padding: int,
) -> torch.Tensor:
    """Set the stage's weight and bias gradients; return the gradient of its input x."""
    batch, height, width, in_channels = x.shape
    out_channels = conv.weight.shape[1]
    if padding:
        grad = F.pad(grad, (0, 0, padding, padding, padding, padding))
    # Output row 2m + r is phase row m of parity r: (B, H+2, 2, W+2, 2, out) -> phases.
    grad = grad.view(batch, height + 2, 2, width + 2, 2, out_channels)
    phases = grad.permute(0, 1, 3, 2, 4, 5).reshape(batch, height + 2, width + 2, -1)
    torch.sum(phases.view(-1, 4, out_channels), dim=(0, 1), out=conv.bias.grad)
    s0, s1, s2, s3 = phases.stride()
    taps = phases.as_strided(
        (batch, height, width, TAPS, TAPS, phases.shape[3]), (s0, s1, s2, s1, s2, s3)
    ).reshape(batch * height * width, -1)
    _set_weight_grad(conv, x.view(-1, in_channels).t() @ taps)
    return (taps @ kernel.t()).view(batch, height, width, in_channels)


def _set_weight_grad(conv: torch.nn.ConvTranspose2d, kernel_grad: torch.Tensor) -> None:
    """Write the gradient of the taps (in, [q1 q2 r1 r2 out]) to the 5x5 weight's ``.grad``.

    The taps are the weight times the 0/1 fold matrix, so their gradient maps back
    through its transpose.
    """
    in_channels, out_channels = conv.weight.shape[:2]
    kernel_grad = kernel_grad.reshape(in_channels, -1, out_channels).transpose(1, 2)
    fold = _fold_matrix_on(kernel_grad.device, kernel_grad.dtype)
    weight_grad = kernel_grad.reshape(in_channels * out_channels, -1) @ fold.t()
    conv.weight.grad.copy_(weight_grad.view_as(conv.weight))


def _stage_forward_t(
    x: torch.Tensor, kernel: torch.Tensor, bias: torch.Tensor, padding: int
) -> torch.Tensor:
    """Run :func:`_stage_forward` with image positions as the inner dimension of the taps.

    Faster when the output has few channels: each shifted addition then runs over rows of
    an image rather than over a handful of channels.
    """
    batch, height, width, in_channels = x.shape
    out_channels = bias.shape[0]
    # ([q1 q2 r1 r2 out], in) @ (in, B*H*W): one product yields every tap.
    taps = kernel.t() @ x.view(-1, in_channels).t()
    taps = taps.view(TAPS, TAPS, 4 * out_channels, batch, height, width)
    phases = bias.repeat(4).view(-1, 1, 1, 1).expand(-1, batch, height + 2, width + 2)
    phases = phases.contiguous()  # ([r1 r2 out], B, H + 2, W + 2)
    for q1 in range(TAPS):
        for q2 in range(TAPS):
            phases[:, :, q1 : q1 + height, q2 : q2 + width] += taps[q1, q2]
    phases = phases.view(2, 2, out_channels, batch, height + 2, width + 2)
    return _interleave(phases.permute(3, 4, 5, 0, 1, 2), padding)


def _stage_backward_t(
    grad: torch.Tensor,
    x: torch.Tensor,
    kernel: torch.Tensor,
    conv: torch.nn.ConvTranspose2d,
    padding: int,
) -> torch.Tensor:
    """Run :func:`_stage_backward` for :func:`_stage_forward_t`."""
    batch, height, width, in_channels = x.shape
    out_channels = conv.weight.shape[1]
    if padding:
        grad = F.pad(grad, (0, 0, padding, padding, padding, padding))
    grad = grad.view(batch, height + 2, 2, width + 2, 2, out_channels)
    phases = grad.permute(2, 4, 5, 0, 1, 3).contiguous()  # (2, 2, out, B, H+2, W+2)
    torch.sum(phases.view(4, out_channels, -1), dim=(0, 2), out=conv.bias.grad)
    phases = phases.view(4 * out_channels, batch, height + 2, width + 2)
    s0, s1, s2, s3 = phases.stride()
    taps = phases.as_strided(
        (TAPS, TAPS, 4 * out_channels, batch, height, width), (s2, s3, s0, s1, s2, s3)
    ).reshape(-1, batch * height * width)  # ([q r out], B*H*W)
    _set_weight_grad(conv, (taps @ x.view(-1, in_channels)).t())
    return (taps.t() @ kernel.t()).view(batch, height, width, in_channels)


class FusedAdamSteps:
    """Steps of a fused ``torch.optim.Adam`` for one epoch, without its per-step Python work.

    ``Adam.step`` regroups every parameter and its state on each call, which at a batch
    of 32 costs up to half as much as the update itself. The first call here runs
    ``Adam.step``, which also creates missing state. Later calls pass the same lists
    straight to the fused kernel that ``Adam.step`` calls, so the updates are identical.
    Make a new one after the optimizer's state is replaced (``load_state_dict``); the
    trainer makes one per epoch. Every ``.grad`` must stay the same tensor between calls,
    as :class:`GloStep` keeps it.
    """

    def __init__(self, optimizer: torch.optim.Adam) -> None:
        self.optimizer = optimizer
        self.groups: list[tuple[dict, list[list[torch.Tensor]]]] | None = None
        self.steps: list[torch.Tensor] = []
        # Adam.step reads these flags per parameter group, and a loaded state dict brings
        # its own groups, so every group must take the fused path.
        self.enabled = all(
            group.get("fused")
            and not group.get("amsgrad")
            and not group.get("maximize")
            and not group.get("differentiable")
            and not group.get("decoupled_weight_decay", False)
            for group in optimizer.param_groups
        )

    def __call__(self) -> None:
        if self.groups is None:
            self.optimizer.step()
            if self.enabled:
                self.groups = self._lists()
            return
        torch._foreach_add_(self.steps, 1)
        for group, (params, grads, exp_avgs, exp_avg_sqs, steps) in self.groups:
            beta1, beta2 = group["betas"]
            torch._fused_adam_(
                params,
                grads,
                exp_avgs,
                exp_avg_sqs,
                [],
                steps,
                amsgrad=False,
                lr=group["lr"],
                beta1=beta1,
                beta2=beta2,
                weight_decay=group["weight_decay"],
                eps=group["eps"],
                maximize=False,
            )

    def _lists(self) -> list[tuple[dict, list[list[torch.Tensor]]]]:
        groups = []
        for group in self.optimizer.param_groups:
            params = [p for p in group["params"] if p.grad is not None]
            states = [self.optimizer.state[p] for p in params]
            lists = [
                params,
                [p.grad for p in params],
                [s["exp_avg"] for s in states],
                [s["exp_avg_sq"] for s in states],
                [s["step"] for s in states],
            ]
            self.steps.extend(lists[-1])
            groups.append((group, lists))
        return groups
