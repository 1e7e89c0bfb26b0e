"""The C kernels of the training step: their results, their build and the fallback."""

import copy
import logging
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from glo_search import native
from glo_search.config import TrainConfig
from glo_search.data import load_shipped
from glo_search.model import GloGenerator, LatentCodes
from glo_search.step import GloStep, decode
from glo_search.trainer import Trainer
from tests.test_step import LOSSES

if native._compiler() is None:
    pytest.skip("no C compiler here, so the C kernels cannot be built", allow_module_level=True)


def test_kernels_build_with_the_compiler_here():
    # With a compiler present, a failed build is a bug, not a reason to skip.
    assert native.kernels() is not None


@pytest.fixture
def fresh_build(tmp_path, monkeypatch):
    """Make kernels() look again, building into an empty cache folder."""
    monkeypatch.setenv("GLO_SEARCH_CACHE", str(tmp_path))
    native.kernels.cache_clear()
    yield tmp_path
    native.kernels.cache_clear()


def _model(class_dim=5, content_dim=7, images=40, dtype=torch.float32):
    torch.manual_seed(0)
    generator = GloGenerator(class_dim, content_dim).to(dtype).train()
    codes = LatentCodes(images, 10, content_dim, class_dim, torch.Generator().manual_seed(1))
    return generator, codes.to(dtype)


def _assert_near(got: torch.Tensor, want: torch.Tensor, name: str) -> None:
    """float32 against a float64 reference: within 1e-4 of the reference's largest value."""
    scale = want.abs().max().item()
    error = (got.double() - want).abs().max().item()
    assert error <= 1e-4 * scale + 1e-12, f"{name}: error {error:.3g} at scale {scale:.3g}"


@pytest.mark.parametrize("loss", sorted(LOSSES))
@pytest.mark.parametrize("batch", [1, 9, 32, 70])
def test_native_step_matches_autograd_in_float64(loss, batch):
    reference, codes = _model(dtype=torch.float64)
    generator, native_codes = _model()
    step = GloStep(generator, native_codes, loss)
    assert step.kernels is not None
    indices = torch.randperm(40, generator=torch.Generator().manual_seed(batch))[:batch]
    indices = indices.repeat(2)[:batch] if batch > 40 else indices
    labels = torch.randint(0, 10, (batch,), generator=torch.Generator().manual_seed(2))
    images = torch.rand(batch, 1, 28, 28, generator=torch.Generator().manual_seed(3))
    noise = 0.5 * torch.randn(batch, 7, generator=torch.Generator().manual_seed(4))

    content = codes.content[indices]
    output = reference(codes.classes[labels], content + noise.double())
    expected = LOSSES[loss](output, images.double()) + 0.1 * content.pow(2).sum(1).mean()
    expected.backward()
    got = step(indices, labels, images, noise, 0.1)

    _assert_near(got, expected.detach(), "loss")
    want = dict(reference.named_parameters()) | dict(codes.named_parameters())
    have = dict(generator.named_parameters()) | dict(native_codes.named_parameters())
    for name, parameter in want.items():
        if name == "to_14.1.bias":  # feeds batch norm, so its true gradient is zero
            assert have[name].grad.abs().max() < 1e-6
            continue
        _assert_near(have[name].grad, parameter.grad, f"gradient of {name}")
    buffers = dict(generator.named_buffers())
    for name, buffer in reference.named_buffers():
        if buffer.is_floating_point():
            _assert_near(buffers[name], buffer, name)
        else:
            assert buffers[name].item() == buffer.item(), name


def test_kernels_same_bits_any_thread_count():
    lib = native.kernels()
    generator = torch.Generator().manual_seed(0)
    batch = 7
    grad = torch.randn(batch, 14, 14, 16, generator=generator)
    maps = torch.randn(batch, 14, 14, 16, generator=generator)
    maps5 = torch.randn(batch, 5, 5, 16, generator=generator)
    kernel = torch.randn(16, 576, generator=generator)
    kernel28 = torch.randn(16, 36, generator=generator)
    targets = torch.rand(batch, 28, 28, generator=generator)
    weight, bias = torch.rand(2, 16, generator=generator)
    pooled = torch.rand(batch, 12, 12, 32, generator=generator)
    winograd_filter = torch.randn(16, 32, 64, generator=generator)
    bias64 = torch.randn(64, generator=generator)

    def run():
        out = {
            "maps": torch.empty(batch, 14, 14, 16),
            "normalized": torch.empty(batch, 14, 14, 16),
            "kernel_grad": torch.empty(16, 576),
            "maps5_grad": torch.empty_like(maps5),
            "bias_grad": torch.empty(16),
            "loss_grad": torch.empty(batch, 28, 28),
            "kernel28_grad": torch.empty(16, 36),
            "bias28_grad": torch.empty(1),
            "maps_grad": torch.empty_like(maps),
            "sums": torch.empty(2, dtype=torch.float64),
            "active": torch.empty_like(maps),
            "stats": torch.zeros(4, 16),
            "grad_maps": torch.empty_like(maps),
            "norm_grads": torch.empty(2, 16),
            "second_layer": torch.empty(batch, 64, 5, 5),
        }
        lib.stage_backward(
            grad, maps5, kernel, out["kernel_grad"], out["maps5_grad"], out["bias_grad"],
            batch, 5, 5, 0,
        )  # fmt: skip
        lib.stage_forward(maps5, kernel, bias, out["maps"], None, None, batch, 5, 5, 0)
        lib.stage_forward(maps5, kernel, bias, out["normalized"], weight, bias, batch, 5, 5, 0)
        lib.stage_loss(
            maps, kernel28, bias, targets, out["loss_grad"], out["sums"], batch, 14, 14, 2,
            0.5, 1.0, targets.numel(),
        )  # fmt: skip
        lib.stage_loss_backward(
            out["loss_grad"], maps, kernel28, out["kernel28_grad"], out["maps_grad"],
            out["bias28_grad"], batch, 14, 14, 2,
        )  # fmt: skip
        mean, invstd, running_mean, running_var = out["stats"]
        lib.norm_relu_forward(
            maps, weight, bias, running_mean, running_var, out["active"], mean, invstd,
            batch, 196, 16, 0.1, 1e-5,
        )  # fmt: skip
        lib.norm_relu_backward(
            grad, out["active"], maps, mean, invstd, weight, out["grad_maps"],
            *out["norm_grads"], batch, 196, 16,
        )  # fmt: skip
        lib.winograd_conv_pool_relu(
            pooled, winograd_filter, bias64, out["second_layer"], batch, 12, 12
        )
        return out

    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one_thread = run()
        torch.set_num_threads(2)
        two_threads = run()
    finally:
        torch.set_num_threads(threads)
    for name in one_thread:
        assert torch.equal(one_thread[name], two_threads[name]), name


def test_build_lands_in_the_cache_and_is_reused(fresh_build, caplog):
    caplog.set_level(logging.INFO, logger="glo_search.native")
    assert native.kernels() is not None
    builds = list((fresh_build / "native").glob("step_kernels-*.so"))
    assert len(builds) == 1
    assert "compiling" in caplog.text
    built_at = builds[0].stat().st_mtime_ns

    native.kernels.cache_clear()
    caplog.clear()
    assert native.kernels() is not None
    assert "compiling" not in caplog.text
    assert builds[0].stat().st_mtime_ns == built_at
    files = sorted(path.name for path in (fresh_build / "native").iterdir())
    assert files == sorted([builds[0].name, builds[0].with_suffix(".sha256").name])
    assert builds[0].stat().st_mode & 0o777 == 0o755  # other users of the cache can load it


def _replace(path: Path, content: bytes) -> None:
    """Write a new file in place of path: this process keeps the old one mapped, and
    truncating a mapped library in place would crash it."""
    temporary = path.with_name("replacement")
    temporary.write_bytes(content)
    os.replace(temporary, path)


def test_truncated_library_is_rebuilt(fresh_build, caplog):
    caplog.set_level(logging.INFO, logger="glo_search.native")
    assert native.kernels() is not None
    (library,) = (fresh_build / "native").glob("*.so")
    _replace(library, library.read_bytes()[:20000])  # loading this would raise SIGBUS
    native.kernels.cache_clear()
    caplog.clear()

    assert native.kernels() is not None
    assert "compiling" in caplog.text


def _kernels_in_new_process(cache: Path) -> subprocess.CompletedProcess:
    """Call kernels() in a new Python process, which has no library loaded yet."""
    code = "from glo_search import native; print(native.kernels() is not None)"
    environment = {**os.environ, "GLO_SEARCH_CACHE": str(cache)}
    return subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, env=environment
    )


def test_truncated_library_new_process_rebuilds(fresh_build):
    assert native.kernels() is not None
    (library,) = (fresh_build / "native").glob("*.so")
    _replace(library, library.read_bytes()[:20000])

    result = _kernels_in_new_process(fresh_build)
    assert result.returncode == 0, result.stderr  # not killed by SIGBUS
    assert result.stdout.strip() == "True"


@pytest.mark.skipif(
    not Path("/lib/x86_64-linux-gnu/libm.so.6").exists(), reason="needs Debian's x86-64 libm"
)
def test_library_without_the_functions_falls_back(fresh_build):
    assert native.kernels() is not None
    (library,) = (fresh_build / "native").glob("*.so")
    _replace(library, Path("/lib/x86_64-linux-gnu/libm.so.6").read_bytes())
    library.with_suffix(".sha256").write_text(native._sha256(library))

    result = _kernels_in_new_process(fresh_build)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "False"
    assert "could not load the C kernels" in result.stderr
    assert "delete it to rebuild" in result.stderr


@pytest.mark.parametrize(
    ("value", "message"),
    [('gcc "', "invalid CC value"), ("true", "no output file was written")],
)
def test_bad_compiler_values_fall_back(fresh_build, monkeypatch, caplog, value, message):
    monkeypatch.setenv("CC", value)
    assert native.kernels() is None
    assert message in caplog.text
    assert not list((fresh_build / "native").glob("*.so"))


def test_failed_build_is_not_retried(fresh_build, monkeypatch, caplog):
    monkeypatch.setenv("CC", "false")
    assert native.kernels() is None
    native.kernels.cache_clear()
    caplog.clear()

    assert native.kernels() is None
    assert "failed before" in caplog.text
    (failure,) = (fresh_build / "native").glob("*.failed")
    assert f"delete {failure} to try again" in caplog.text


def test_compiler_timeout_stops_its_children(fresh_build, monkeypatch, caplog):
    script = fresh_build / "slow-cc"
    marker = fresh_build / "child.pid"
    script.write_text(f"#!/bin/sh\nsleep 30 &\necho $! > {marker}\nwait\n")
    script.chmod(0o755)
    monkeypatch.setenv("CC", str(script))
    monkeypatch.setattr(native, "BUILD_TIMEOUT_S", 1)

    assert native.kernels() is None
    assert "took over 1 s" in caplog.text
    child = int(marker.read_text())
    time.sleep(0.2)
    assert (
        not Path(f"/proc/{child}").exists()
        or "Z" in Path(f"/proc/{child}/stat").read_text().split()[2]
    )


def test_stale_private_builds_are_removed(fresh_build):
    folder = fresh_build / "native"
    folder.mkdir()
    stale, recent = folder / "building-old.so", folder / "building-new.so"
    stale.write_bytes(b"")
    recent.write_bytes(b"")
    old = time.time() - native.STALE_BUILD_S - 10
    os.utime(stale, (old, old))

    assert native.kernels() is not None
    assert not stale.exists()
    assert recent.exists()  # perhaps another process's build in progress


@pytest.mark.parametrize("value", ["0", "false", "OFF", "no"])
def test_switch_values_turn_the_kernels_off(fresh_build, monkeypatch, value):
    monkeypatch.setenv(native.ENV_SWITCH, value)
    assert native.kernels() is None


def test_native_step_takes_images_of_other_dtypes():
    generator, codes = _model()
    step = GloStep(generator, codes, "l1+l2")
    indices, labels = torch.arange(8), torch.arange(8) % 10
    images = torch.rand(8, 1, 28, 28, generator=torch.Generator().manual_seed(0))
    losses = []
    for dtype in (torch.float32, torch.float64, torch.float16):
        losses.append(step(indices, labels, images.to(dtype), None, 0.0).item())
    assert losses[1] == pytest.approx(losses[0], rel=1e-6)
    assert losses[2] == pytest.approx(losses[0], rel=1e-3)
    with pytest.raises(ValueError, match="do not match a batch of 8"):
        step(indices, labels, images[:4], None, 0.0)


def test_failed_build_falls_back_with_warning(fresh_build, monkeypatch, caplog):
    monkeypatch.setenv("CC", "false")  # a compiler that always fails
    assert native.kernels() is None
    assert "could not build the C kernels" in caplog.text
    assert "run in PyTorch operations instead" in caplog.text
    assert not list((fresh_build / "native").glob("*.so"))

    generator, codes = _model()
    assert GloStep(generator, codes, "l1+l2").kernels is None


def test_missing_compiler_falls_back_with_a_warning(fresh_build, monkeypatch, caplog):
    monkeypatch.setenv("CC", "")
    monkeypatch.setenv("PATH", str(fresh_build))  # no cc or gcc here
    assert native.kernels() is None
    assert "no C compiler found" in caplog.text


def test_trainers_with_and_without_kernels_learn_alike(small_dataset):
    config = TrainConfig(epochs=2, num_images=len(small_dataset), batch_size=16)
    with_kernels = Trainer(config, small_dataset, device="cpu")
    without = Trainer(config, small_dataset, device="cpu")
    without.step.kernels = None
    assert with_kernels.step.kernels is not None
    for _ in range(2):
        fast, plain = with_kernels.train_epoch(), without.train_epoch()
        assert fast == pytest.approx(plain, rel=1e-4)
    # Adam divides each update by the gradient's running size, so an element whose
    # gradient is near zero moves by up to the learning rate either way on rounding alone:
    # compare each tensor as a whole. Changing the thread count moves them about 5e-4.
    others = dict(without.generator.named_parameters())
    for name, parameter in with_kernels.generator.named_parameters():
        if name == "to_14.1.bias":  # its gradient is rounding noise, which Adam scales up
            continue
        change = (parameter - others[name]).norm() / others[name].norm()
        assert change < 1e-2, f"{name} differs by {change:.2g} of its norm"


def test_odd_pad_raises_value_error():
    maps5 = torch.zeros(1, 5, 5, 16)
    with pytest.raises(ValueError, match="invalid odd pad"):
        native.kernels().stage_forward(
            maps5, torch.zeros(16, 576), torch.zeros(16), torch.empty(1, 12, 12, 16),
            None, None, 1, 5, 5, 1,
        )  # fmt: skip


STEP_ON_A_SMALL_STACK = """
import resource, torch
from glo_search.model import GloGenerator, LatentCodes
from glo_search.step import GloStep
torch.set_num_threads(2)
batch = 3000
generator = GloGenerator(5, 7).train()
codes = LatentCodes(batch, 10, 7, 5, torch.Generator().manual_seed(1))
step = GloStep(generator, codes, "l1+l2")
assert step.kernels is not None
resource.setrlimit(resource.RLIMIT_STACK, (512 * 1024, resource.RLIM_INFINITY))
labels = torch.randint(0, 10, (batch,))
loss = step(torch.arange(batch), labels, torch.rand(batch, 1, 28, 28), None, 0.0)
print(float(loss))
"""


def test_large_batch_fits_a_small_stack():
    # Sums per image grow with the batch: on the stack, a batch of 3,000 needed 768 KiB
    # in norm_relu_backward alone. OMP_STACKSIZE gives the OpenMP threads the same limit.
    environment = {**os.environ, "OMP_STACKSIZE": "512K"}
    result = subprocess.run(
        [sys.executable, "-c", STEP_ON_A_SMALL_STACK],
        capture_output=True, text=True, env=environment,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-2000:]
    assert float(result.stdout) > 0


def test_float64_and_unsupported_models_keep_the_pytorch_step():
    generator, codes = _model(dtype=torch.float64)
    assert GloStep(generator, codes, "l1").kernels is None
    generator, codes = _model()
    assert GloStep(copy.deepcopy(generator), codes, "l1", use_native=False).kernels is None


def test_native_decode_matches_the_generator_in_float64():
    reference, codes = _model(dtype=torch.float64)
    reference.to_14[2].running_mean.uniform_(-1, 1)
    reference.to_14[2].running_var.uniform_(0.5, 2)
    reference.eval()
    generator = copy.deepcopy(reference).float()
    class_code, content_code = codes.classes[codes.classes.new_zeros(40).long()], codes.content
    expected = reference(class_code, content_code)
    got = decode(generator, class_code.float(), content_code.float())
    assert got.shape == expected.shape == (40, 1, 28, 28)
    _assert_near(got, expected, "decoded images")


def test_classifier_predictions_equal_the_module_path():
    from glo_search import classifier

    model = classifier.build(classifier.load_state())
    images, _ = load_shipped()
    images = torch.cat([images[:600], torch.rand(200, 1, 28, 28)])
    with torch.inference_mode():
        expected = model(images.contiguous(memory_format=torch.channels_last)).argmax(1)
        first_layer = model.features[2](model.features[1](model.features[0](images[:50])))
    assert classifier._native_forward(model, images) is not None
    assert torch.equal(classifier.predict(model, images), expected)
    pooled = torch.empty(50, 13, 13, 32)
    weight = model.features[0].weight.reshape(32, 9).t().contiguous()
    native.kernels().conv_pool_relu(
        images[:50].contiguous(), weight, model.features[0].bias, pooled, 50, 28, 28, 13, 13
    )
    _assert_near(pooled.permute(0, 3, 1, 2), first_layer.double(), "first layer")

    second = model.features[3]
    with torch.inference_mode():
        second_layer = model.features[5](model.features[4](second(first_layer)))
    exact = _second_layer_in_float64(pooled.permute(0, 3, 1, 2), second.weight, second.bias)
    maps = torch.empty(50, 64, 5, 5)
    native.kernels().winograd_conv_pool_relu(
        pooled[:, :12, :12].contiguous(), classifier._winograd_filter(second.weight),
        second.bias, maps, 50, 12, 12,
    )  # fmt: skip
    _assert_near(maps, second_layer.double(), "second layer")
    _assert_winograd_near(maps, exact, "second layer")


def _second_layer_in_float64(maps, weight, bias):
    """Compute the classifier's second layer (convolution, 2x2 max-pool, ReLU) in float64."""
    conv = F.conv2d(maps.double(), weight.double(), bias.double())
    return F.relu(F.max_pool2d(conv, 2))


def _assert_winograd_near(got, want, name):
    # Measured on the Zen 1 VM, relative to the largest value: 2.7e-7 on the test's 50
    # shipped digits (3.8e-7 on all 10,000) and 1.0-1.5e-7 on the random maps below, where
    # PyTorch 2.14's float32 convolution was 0.8-1.2e-6 off.
    scale = want.abs().max().item()
    error = (got.double() - want).abs().max().item()
    assert error <= 2e-6 * scale, f"{name}: error {error:.3g} at scale {scale:.3g}"


@pytest.mark.parametrize("height, width", [(12, 12), (10, 10), (11, 16)])
def test_winograd_kernel_matches_float64_convolution(height, width):
    # 25, 16 and 28 tiles: the kernel works in groups of 5, so the last two end in a
    # group of 1 and of 3 tiles.
    from glo_search import classifier

    generator = torch.Generator().manual_seed(3)
    maps = torch.rand(6, 32, height, width, generator=generator)
    weight = torch.randn(64, 32, 3, 3, generator=generator) / 17
    bias = torch.randn(64, generator=generator)
    out = torch.full((6, 64, (height - 2) // 2, (width - 2) // 2), float("nan"))
    native.kernels().winograd_conv_pool_relu(
        maps.permute(0, 2, 3, 1).contiguous(), classifier._winograd_filter(weight), bias,
        out, 6, height, width,
    )  # fmt: skip
    _assert_winograd_near(out, _second_layer_in_float64(maps, weight, bias), "random maps")


def _targets_avx512() -> bool:
    """Return whether the kernels' build here (-march=native) compiles their AVX-512 paths."""
    command = [*native._compiler().split(), "-march=native", "-dM", "-E", "-x", "c", "-"]
    result = subprocess.run(command, input="", capture_output=True, text=True, check=False)
    return "__AVX512F__" in result.stdout


def test_avx512_build_gives_same_bits(fresh_build, monkeypatch):
    # Where the compiler targets AVX-512, the classifier's kernels take 16 floats per
    # vector instead of 8. Each sum adds the same products in the same order, so a build
    # without AVX-512 must give the same bits.
    if not _targets_avx512():
        pytest.skip("the compiler here does not target AVX-512, so both builds are one")
    from glo_search import classifier

    wide = native.kernels()
    monkeypatch.setattr(native, "FLAGS", [*native.FLAGS, "-mno-avx512f"])
    native.kernels.cache_clear()
    narrow = native.kernels()
    assert wide is not None
    assert narrow is not None
    assert narrow is not wide

    generator = torch.Generator().manual_seed(5)
    images = torch.rand(9, 28, 28, generator=generator)
    images[0] = 0.0  # an all-background digit: every sum is the bias
    first_weight = torch.randn(9, 32, generator=generator) / 3
    first_bias = torch.randn(32, generator=generator) / 3
    second = torch.randn(64, 32, 3, 3, generator=generator) / 17
    second_bias = torch.randn(64, generator=generator)
    results = []
    for lib in (wide, narrow):
        pooled = torch.full((9, 12, 12, 32), float("nan"))
        lib.conv_pool_relu(images, first_weight, first_bias, pooled, 9, 28, 28, 12, 12)
        maps = torch.full((9, 64, 5, 5), float("nan"))
        lib.winograd_conv_pool_relu(
            pooled, classifier._winograd_filter(second), second_bias, maps, 9, 12, 12
        )
        results.append((pooled, maps))
    (wide_pooled, wide_maps), (narrow_pooled, narrow_maps) = results
    assert torch.equal(wide_pooled, narrow_pooled)
    assert torch.equal(wide_maps, narrow_maps)
    assert (wide_maps > 0).any()  # the ReLU kept some values
    assert (wide_maps == 0).any()  # and cut others
