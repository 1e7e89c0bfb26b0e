"""Trainer speed figures, each a ratio of two things measured side by side in one run.

    python benchmarks/speed.py arithmetic   # images/s against the FLOP/s of a matrix product
    python benchmarks/speed.py plain        # against a plain DataLoader loop; same learning
    python benchmarks/speed.py pair         # the same, two trainings at once, one thread each
    python benchmarks/speed.py metrics      # time in evaluate() against time in train_epoch()
    python benchmarks/speed.py classifier   # the reference classifier by chunk size and dtype
    python benchmarks/speed.py kernels      # fused upsample + transposed conv against PyTorch's
    python benchmarks/speed.py memory       # peak memory of one trial's process

Every command takes --threads (torch threads; default: torch's default, one per core) and
--rounds. Timed cases alternate round by round, and medians are reported, so a change in
the machine's load hits every case alike.
"""

from __future__ import annotations

import argparse
import copy
import json
import subprocess
import sys
import time
import warnings

import torch
import torch.nn.functional as F
from common import (
    ROOT,
    PlainLoop,
    interleaved,
    machine,
    median,
    reference_forward,
    set_threads,
    timed,
    use_cpu_clock,
)
from torch.utils.flop_counter import FlopCounterMode

from glo_search import classifier as digit_classifier
from glo_search import metrics as m
from glo_search import native
from glo_search.config import TrainConfig
from glo_search.data import load_dataset
from glo_search.kernels import upsample_conv_transpose
from glo_search.trainer import Trainer
from tests.plain_metrics import plain_style_attributes  # as first written: float64

METRIC_NAMES = tuple(m.METRICS)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("figure", choices=sorted(FIGURES))
    parser.add_argument("--threads", type=int, default=None, help="torch threads")
    parser.add_argument("--rounds", type=int, default=5, help="timed rounds (default: 5)")
    parser.add_argument(
        "--epochs",
        type=int,
        default=10,
        help="epochs per run for 'plain' learning and per round for 'pair' (default: 10)",
    )
    parser.add_argument(
        "--cpu-time",
        action="store_true",
        help="time by this process's CPU seconds (with --threads 1), for a machine that "
        "other jobs share",
    )
    parser.add_argument("--json", action="store_true", help="also print the figures as JSON")
    args = parser.parse_args()
    set_threads(args.threads)
    if args.cpu_time:
        use_cpu_clock()
    clock = "this process's CPU time" if args.cpu_time else "wall-clock time"
    print(f"machine: {machine()}; timed by {clock}")
    figures = FIGURES[args.figure](args)
    if args.json:
        print(json.dumps(figures))
    return 0


def _default_trainer(classifier: bool = False) -> Trainer:
    config = TrainConfig()
    state = digit_classifier.load_state() if classifier else None
    return Trainer(config, load_dataset(config), state, device="cpu")


# --- arithmetic -------------------------------------------------------------------------


def training_flops(trainer: Trainer, forward) -> float:
    """Count the FLOPs of one training image: forward and backward of one batch, divided.

    Counted by torch.utils.flop_counter (matrix products and convolutions; element-wise
    operations such as batch norm and the loss are not counted).
    """
    batch = torch.arange(trainer.config.batch_size)
    with FlopCounterMode(display=False) as counter:
        content = trainer.codes.content[batch]
        class_code = trainer.codes.classes[trainer.labels[batch]]
        output = forward(class_code, content)
        trainer.loss_fn(output, trainer.images[batch]).backward()
    trainer.optimizer.zero_grad(set_to_none=True)
    return counter.get_total_flops() / len(batch)


def step_flops(trainer: Trainer) -> float:
    """Count the FLOPs that the trainer's hand-written step runs for one training image.

    The C kernels take the convolution stages' products themselves, out of the counter's
    sight, so the count runs the step's PyTorch form, which takes the same products.
    """
    batch = torch.arange(trainer.config.batch_size)
    trainer.step.allocate_gradients()
    kernels, trainer.step.kernels = trainer.step.kernels, None
    try:
        with FlopCounterMode(display=False) as counter:
            trainer.step(batch, trainer.labels[batch], trainer.images[batch], None, 0.0)
    finally:
        trainer.step.kernels = kernels
    return counter.get_total_flops() / len(batch)


def matmul_rate(size: int = 2048) -> float:
    """Return the FLOP/s of one float32 (size x size) matrix product."""
    a = torch.randn(size, size)
    b = torch.randn(size, size)
    a @ b  # warm-up
    return 2 * size**3 / timed(lambda: a @ b)


def arithmetic(args) -> dict:
    trainer = _default_trainer()
    model_flops = training_flops(trainer, lambda c, z: reference_forward(trainer.generator, c, z))
    executed_flops = step_flops(trainer)
    trainer.train_epoch()  # warm-up
    rates: list[float] = []
    times = interleaved(
        {"epoch": trainer.train_epoch, "matmul": lambda: rates.append(matmul_rate())},
        args.rounds,
    )
    epoch, rate = median(times["epoch"]), median(rates)
    images_per_s = len(trainer.labels) / epoch
    floor = rate / model_flops
    print(
        f"model FLOPs per training image (forward + backward, upsampling and ConvTranspose2d "
        f"as defined): {model_flops / 1e6:.2f} M; executed by the trainer's step: "
        f"{executed_flops / 1e6:.2f} M"
    )
    print(f"matrix product (2048 x 2048, float32): {rate / 1e9:.1f} GFLOP/s")
    print(
        f"trainer: {epoch:.3f} s per epoch of {len(trainer.labels)} images = "
        f"{images_per_s:.0f} images/s; the arithmetic limit is {floor:.0f} images/s"
    )
    print(
        f"fraction of the limit: {images_per_s / floor:.3f} "
        f"(by executed FLOPs: {images_per_s * executed_flops / rate:.3f})"
    )
    return {
        "model_mflops_per_image": model_flops / 1e6,
        "executed_mflops_per_image": executed_flops / 1e6,
        "matmul_gflops": rate / 1e9,
        "images_per_s": images_per_s,
        "fraction_of_limit": images_per_s / floor,
    }


# --- plain ------------------------------------------------------------------------------


def plain(args) -> dict:
    config = TrainConfig()
    dataset = load_dataset(config)
    trainer = Trainer(config, dataset, device="cpu")
    # The same trainer with autograd in place of the hand-written step, and with the
    # hand-written step in PyTorch operations only (no C kernels), to show each part.
    autograd = Trainer(config, dataset, device="cpu")
    autograd.step = None
    torch_step = Trainer(config, dataset, device="cpu")
    torch_step.step.kernels = None
    loop = PlainLoop(config, dataset)
    cases = {
        "plain": loop.train_epoch,
        "autograd": autograd.train_epoch,
        "torch_step": torch_step.train_epoch,
        "trainer": trainer.train_epoch,
    }
    for run in cases.values():
        run()  # warm-up
    times = {name: median(values) for name, values in interleaved(cases, args.rounds).items()}
    plain_s, trainer_s = times["plain"], times["trainer"]
    print(
        f"seconds per epoch (median of {args.rounds}): plain loop {plain_s:.3f}, trainer "
        f"{trainer_s:.3f}, speedup {plain_s / trainer_s:.2f}x; the trainer with autograd "
        f"in place of its hand-written step {times['autograd']:.3f} "
        f"({plain_s / times['autograd']:.2f}x), with the hand-written step in PyTorch "
        f"operations only {times['torch_step']:.3f} ({plain_s / times['torch_step']:.2f}x)"
    )
    if trainer.step is None or trainer.step.kernels is None:
        print("note: the C kernels were not available, so 'trainer' ran without them")
    quality = learning_comparison(args.epochs)
    return {
        "plain_s": plain_s,
        "autograd_s": times["autograd"],
        "torch_step_s": times["torch_step"],
        "trainer_s": trainer_s,
        "speedup": plain_s / trainer_s,
        **quality,
    }


def _pair_worker(connection, cpu_time: bool) -> None:
    """Hold a plain loop and a trainer; train the one each message names, for n epochs."""
    torch.set_num_threads(1)
    clock = time.process_time if cpu_time else time.perf_counter
    config = TrainConfig()
    dataset = load_dataset(config)
    runs = {"plain": PlainLoop(config, dataset).train_epoch}
    runs["trainer"] = Trainer(config, dataset, device="cpu").train_epoch
    for run in runs.values():
        run()  # warm-up
    connection.send("ready")
    while (message := connection.recv()) is not None:
        name, epochs = message
        started = clock()
        for _ in range(epochs):
            runs[name]()
        connection.send((clock() - started) / epochs)


def pair(args) -> dict:
    """Two processes on two cores, one torch thread each, as a sweep runs two trials.

    Each round both processes train the plain loop for --epochs epochs at the same time,
    then both train the trainer. The figure is images per second of the two together.
    With --cpu-time each process times itself by its own CPU seconds.
    """
    import multiprocessing

    context = multiprocessing.get_context("spawn")
    connections, workers = [], []
    for _ in range(2):
        parent_end, child_end = context.Pipe()
        worker = context.Process(target=_pair_worker, args=(child_end, args.cpu_time))
        worker.start()
        connections.append(parent_end)
        workers.append(worker)
    for connection in connections:
        connection.recv()
    images = TrainConfig().num_images
    rates: dict[str, list[float]] = {"plain": [], "trainer": []}
    try:
        for _ in range(args.rounds):
            for name in rates:
                for connection in connections:
                    connection.send((name, args.epochs))
                seconds = [connection.recv() for connection in connections]
                rates[name].append(sum(images / s for s in seconds))
    finally:
        for connection in connections:
            connection.send(None)
        for worker in workers:
            worker.join()
    plain_rate, trainer_rate = median(rates["plain"]), median(rates["trainer"])
    print(
        f"two trainings at once, one thread each, images per second of both (median of "
        f"{args.rounds} rounds of {args.epochs} epochs): plain loops {plain_rate:,.0f}, "
        f"trainers {trainer_rate:,.0f}; speedup {trainer_rate / plain_rate:.2f}x"
    )
    return {"plain_images_per_s": plain_rate, "trainer_images_per_s": trainer_rate}


def learning_comparison(epochs: int, seeds: tuple[int, ...] = (0, 1, 2)) -> dict:
    """Train both ways for ``epochs`` with each seed; print every metric's mean and spread."""
    state = digit_classifier.load_state()
    results: dict[str, dict[str, list[float]]] = {"plain": {}, "trainer": {}}
    for seed in seeds:
        config = TrainConfig(seed=seed)
        dataset = load_dataset(config)
        trainer = Trainer(config, dataset, state, device="cpu")
        loop = PlainLoop(config, dataset)
        for _ in range(epochs):
            trainer.train_epoch()
            loop.train_epoch()
        for name, evaluated in (
            ("trainer", trainer.evaluate()),
            ("plain", loop.to_trainer(dataset, state).evaluate()),
        ):
            for metric in METRIC_NAMES:
                results[name].setdefault(metric, []).append(evaluated[metric])
    print(f"metrics after {epochs} epochs, mean +- sd over seeds {list(seeds)}:")
    for metric in METRIC_NAMES:
        cells = []
        for name in ("plain", "trainer"):
            values = torch.tensor(results[name][metric])
            cells.append(f"{name} {values.mean():.4f} +- {values.std():.4f}")
        print(f"  {metric:26s} " + "   ".join(cells))
    return {"learning": results}


# --- metrics ----------------------------------------------------------------------------


def reference_evaluate(trainer: Trainer) -> None:
    """The evaluation as first written: two generator passes in chunks of 4,096, the module
    path of the generator, the classifier (ReLU before max-pooling) in chunks of 2,048,
    style attributes in float64 over all pixels and scikit-learn's probe."""
    generator = trainer.generator.eval()
    codes = trainer.codes
    with torch.no_grad():

        def decode(c, z):
            return torch.cat(
                [
                    reference_forward(generator, a, b)
                    for a, b in zip(c.split(4096), z.split(4096), strict=True)
                ]
            )

        m.recon_error(decode(codes.classes[trainer.labels], codes.content), trainer.images)
        swaps = decode(codes.classes[trainer.swaps.targets], codes.content[trainer.swaps.sources])
        model = digit_classifier.build(digit_classifier.load_state())
        model = model.to(memory_format=torch.contiguous_format)
        predicted = relu_first_predict(model, swaps, 2048, channels_last=False)
        m.class_fidelity(predicted, trainer.swaps.targets)
        m.style_transfer(
            trainer.source_attributes, plain_style_attributes(swaps), trainer.swaps.targets
        )
        sklearn_leakage(codes.content, trainer.labels, trainer.config.seed)
    generator.train()


@torch.no_grad()
def relu_first_predict(
    model, images: torch.Tensor, batch_size: int, channels_last: bool = True
) -> torch.Tensor:
    """Predict labels as the classifier did before: ReLU, then max-pooling, after each
    convolution, with a new tensor for each ReLU output. Images are channels-last unless
    ``channels_last`` is False."""
    features = model.features  # conv, pool, ReLU, conv, pool, ReLU
    layout = torch.channels_last if channels_last else torch.contiguous_format

    def forward(x: torch.Tensor) -> torch.Tensor:
        x = x.contiguous(memory_format=layout)
        x = F.max_pool2d(F.relu(features[0](x)), 2)  # (B, 32, 13, 13)
        x = F.max_pool2d(F.relu(features[3](x)), 2)  # (B, 64, 5, 5)
        return model.head(x).argmax(1)

    return torch.cat([forward(chunk) for chunk in images.split(batch_size)])


def evaluation_parts(trainer: Trainer, classifier_before) -> dict:
    """Time the parts of Trainer.evaluate() one by one, the classifier (given channels-last,
    as it was then) and the style attributes as they were before, and a 2048 x 2048 matrix
    product."""
    codes = trainer.codes
    classifier = trainer.classifier
    with torch.no_grad():
        started = time.perf_counter()
        trainer.reconstruction_error()  # decodes the N training codes, keeps their error
        reconstruct_s = time.perf_counter() - started
        started = time.perf_counter()
        swaps = trainer.generate(
            codes.classes[trainer.swaps.targets], codes.content[trainer.swaps.sources]
        )  # (M, 1, 28, 28)
        decode_s = time.perf_counter() - started
    predicted = digit_classifier.predict(classifier, swaps)
    attributes = m.style_attributes(swaps)
    return {
        "reconstructions": reconstruct_s,
        "swaps": decode_s,
        "classifier": timed(lambda: digit_classifier.predict(classifier, swaps)),
        "classifier_before": timed(lambda: relu_first_predict(classifier_before, swaps, 128)),
        "style": timed(lambda: m.style_attributes(swaps)),
        "style_before": timed(lambda: plain_style_attributes(swaps)),
        "probe": timed(
            lambda: m.content_leakage(codes.content, trainer.labels, trainer.config.seed)
        ),
        "rest": timed(lambda: _rest_of_evaluate(trainer, predicted, attributes)),
        "matmul_flops": matmul_rate(),
    }


def _rest_of_evaluate(trainer: Trainer, predicted: torch.Tensor, attributes: torch.Tensor) -> None:
    """Run the steps of Trainer.evaluate() that the parts above leave out."""
    targets = trainer.swaps.targets
    m.ideal_neighbour_accuracy(m.nearest_classes(trainer.codes.classes.detach().cpu()))
    m.class_fidelity(predicted, targets)
    m.style_transfer(trainer.source_attributes, attributes, targets)


def classifier_flops(model) -> tuple[float, float]:
    """Count the FLOPs of the classifier on one 28x28 image (convolutions and matrix
    products, by torch.utils.flop_counter): as the modules define it, and as
    classifier.predict executes it with the C kernels, which compute the 12x12 of the
    13x13 pooled first-layer maps and the 10x10 of the 11x11 second-layer maps that the
    pooling reads, the latter by Winograd's F(2x2, 3x3) algorithm. The executed count
    leaves out the Winograd transforms' additions."""
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        model(torch.rand(64, 1, 28, 28))
    defined = counter.get_total_flops() / 64
    if native.kernels() is None:
        return defined, defined
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        model.head(torch.rand(64, 64, 5, 5))
    # multiply-adds: 4 convolution outputs per pooled value in the first layer, and 16
    # products per channel pair in each of the second layer's 5x5 tiles of 2x2 outputs
    first_layer = 2 * 9 * 1 * 32 * 4 * 12 * 12
    second_layer = 2 * 16 * 32 * 64 * 5 * 5
    return defined, counter.get_total_flops() / 64 + first_layer + second_layer


def metrics(args) -> dict:
    trainer = _default_trainer(classifier=True)
    trainer.train_epoch()
    trainer.evaluate()
    reference_evaluate(trainer)  # warm-up: imports scikit-learn
    times = interleaved(
        {
            "train": trainer.train_epoch,
            "evaluate": trainer.evaluate,
            "reference": lambda: reference_evaluate(trainer),
        },
        args.rounds,
    )
    train_s, eval_s, reference_s = (median(times[k]) for k in ("train", "evaluate", "reference"))
    print(
        f"seconds (median of {args.rounds}): train_epoch {train_s:.3f}, evaluate {eval_s:.3f} "
        f"(first version {reference_s:.3f}, {reference_s / eval_s:.1f}x slower)"
    )
    parts = _report_parts(trainer, eval_s, args.rounds)
    shares = _report_shares(train_s, eval_s)
    differences = leakage_agreement(trainer, epochs=10)
    print(
        f"content_leakage, our probe minus scikit-learn's, over 10 more epochs: "
        f"max |difference| {max(map(abs, differences)):.4f} (one of 400 held-out codes = 0.0025)"
    )
    probe = probe_speed(args.rounds)
    return {
        "train_s": train_s,
        "evaluate_s": eval_s,
        "reference_evaluate_s": reference_s,
        "parts": parts,
        "shares": shares,
        "leakage_differences": differences,
        "probe": probe,
    }


def torch_lbfgs_leakage(codes: torch.Tensor, labels: torch.Tensor, seed: int) -> float:
    """content_leakage as the previous version fitted it: torch.optim.LBFGS, the same
    settings and the objective in PyTorch operations."""
    codes = codes.detach().double()
    train, test = m.probe_split(len(labels), seed)
    mean, scale = codes[train].mean(dim=0), codes[train].std(dim=0, unbiased=False)
    x = (codes - mean) / torch.where(scale < 1e-14, torch.ones_like(scale), scale)
    classes, y = torch.unique(labels, return_inverse=True)
    design = torch.cat([x[train], torch.ones(len(train), 1, dtype=x.dtype)], dim=1)
    onehot = F.one_hot(y[train], len(classes)).double()
    weights = torch.zeros(design.shape[1], len(classes), dtype=x.dtype)
    mask = torch.ones_like(weights)
    mask[-1] = 0.0
    penalty, count = 1.0 / (2.0 * len(train)), len(train)
    optimizer = torch.optim.LBFGS(
        [weights],
        max_iter=500,
        tolerance_grad=1e-5,
        tolerance_change=1e-12,
        history_size=10,
        line_search_fn="strong_wolfe",
    )

    def objective() -> torch.Tensor:
        logits = design @ weights
        log_z = torch.logsumexp(logits, dim=1, keepdim=True)
        loss = (log_z.sum() - (logits * onehot).sum()) / count
        weights.grad = design.T @ ((torch.exp(logits - log_z) - onehot) / count)
        weights.grad += 2.0 * penalty * weights * mask
        return loss + penalty * (weights * weights * mask).sum()

    optimizer.step(objective)
    logits = x[test] @ weights[:-1] + weights[-1]
    return (logits.argmax(dim=1) == y[test]).double().mean().item()


def probe_speed(rounds: int, content_dim: int = 128, epochs: int = 10) -> dict:
    """Time content_leakage on the codes of a trainer with wide content codes, against
    PyTorch's L-BFGS and scikit-learn, and check that the three accuracies agree."""
    trainer = Trainer(
        TrainConfig(content_dim=content_dim), load_dataset(TrainConfig()), classifier_state=None
    )
    for _ in range(epochs):
        trainer.train_epoch()
    codes, labels, seed = trainer.codes.content, trainer.labels, trainer.config.seed
    cases = {
        "ours": lambda: m.content_leakage(codes, labels, seed),
        "torch_lbfgs": lambda: torch_lbfgs_leakage(codes, labels, seed),
        "sklearn": lambda: sklearn_leakage(codes, labels, seed),
    }
    accuracies = {name: function() for name, function in cases.items()}
    seconds = {name: median(values) for name, values in interleaved(cases, rounds).items()}
    print(
        f"content_leakage probe on {content_dim}-feature codes after {epochs} epochs, seconds "
        f"(median of {rounds}): ours {seconds['ours']:.3f}, PyTorch's L-BFGS "
        f"{seconds['torch_lbfgs']:.3f} ({seconds['torch_lbfgs'] / seconds['ours']:.1f}x "
        f"slower), scikit-learn {seconds['sklearn']:.3f}; accuracies "
        + ", ".join(f"{name} {value:.4f}" for name, value in accuracies.items())
    )
    return {"seconds": seconds, "accuracies": accuracies}


def _report_parts(trainer: Trainer, eval_s: float, rounds: int) -> dict:
    """Print the parts of evaluate, their share of it, and the classifier's FLOP/s."""
    before_model = copy.deepcopy(trainer.classifier).to(memory_format=torch.channels_last)
    collected = _collect(lambda t: evaluation_parts(t, before_model), trainer, rounds)
    parts = {k: median(v) for k, v in collected.items()}
    matmul_flops = parts.pop("matmul_flops")
    before = {k: parts.pop(f"{k}_before") for k in ("classifier", "style")}
    print(
        "evaluate parts, seconds and share of evaluate: "
        + ", ".join(f"{k} {v:.3f} ({v / eval_s:.2f})" for k, v in parts.items())
        + f"; their sum {sum(parts.values()):.3f}"
    )
    print(
        "before this version: "
        + ", ".join(f"{k} {v:.3f} ({v / parts[k]:.1f}x slower)" for k, v in before.items())
    )
    defined, per_image = classifier_flops(trainer.classifier)
    count = len(trainer.swaps.targets)
    rate = per_image * count / parts["classifier"]
    print(
        f"classifier: {defined / 1e6:.2f} MFLOP per image as defined, {per_image / 1e6:.2f} "
        f"executed, {rate / 1e9:.1f} GFLOP/s by the executed FLOPs on "
        f"{count} swaps; matrix product (2048 x 2048, float32) {matmul_flops / 1e9:.1f} "
        f"GFLOP/s in the same rounds, so the classifier runs at {rate / matmul_flops:.2f} of it"
    )
    return {
        **parts,
        "before": before,
        "classifier_flops_per_s": rate,
        "matmul_flops_per_s": matmul_flops,
    }


def _report_shares(train_s: float, eval_s: float) -> dict:
    schedules = {
        "every epoch": set(range(1, 21)),
        "ASHA rungs 2 6 18 and the last epoch": {2, 6, 18, 20},
        "every 5 epochs, rungs and the last": {2, 5, 6, 10, 15, 18, 20},
    }
    shares = {}
    print("share of a 20-epoch trial's time in metrics:")
    for name, epochs in schedules.items():
        share = len(epochs) * eval_s / (20 * train_s + len(epochs) * eval_s)
        shares[name] = share
        print(f"  {name:40s} {share:.2f}")
    return shares


def sklearn_leakage(codes: torch.Tensor, labels: torch.Tensor, seed: int) -> float:
    """content_leakage as first written, with scikit-learn."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import train_test_split
    from sklearn.preprocessing import StandardScaler

    x_train, x_test, y_train, y_test = train_test_split(
        codes.detach().double().numpy(), labels.numpy(), test_size=0.2, random_state=seed
    )
    scaler = StandardScaler().fit(x_train)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # convergence warnings at max_iter
        probe = LogisticRegression(max_iter=300).fit(scaler.transform(x_train), y_train)
    return float(probe.score(scaler.transform(x_test), y_test))


def leakage_agreement(trainer: Trainer, epochs: int) -> list[float]:
    """Train on; after each epoch return our probe's accuracy minus scikit-learn's."""
    differences = []
    for _ in range(epochs):
        trainer.train_epoch()
        codes, labels, seed = trainer.codes.content, trainer.labels, trainer.config.seed
        differences.append(
            m.content_leakage(codes, labels, seed) - sklearn_leakage(codes, labels, seed)
        )
    return differences


def _collect(function, trainer: Trainer, rounds: int) -> dict[str, list[float]]:
    collected: dict[str, list[float]] = {}
    for _ in range(rounds):
        for key, value in function(trainer).items():
            collected.setdefault(key, []).append(value)
    return collected


# --- classifier -------------------------------------------------------------------------


def classifier(args) -> dict:
    """Time the reference classifier on the default trainer's swaps by chunk size, memory
    layout and dtype, and compare bfloat16 predictions with float32 ones at several epochs."""
    trainer = _default_trainer(classifier=True)
    agreement = bfloat16_agreement(trainer, epochs=(1, 3, 6, 12))
    codes = trainer.codes
    with torch.no_grad():
        swaps = trainer.generate(
            codes.classes[trainer.swaps.targets], codes.content[trainer.swaps.sources]
        )  # (M, 1, 28, 28)

    rates: list[float] = []
    cases = _classifier_cases(trainer.classifier, swaps)
    cases["matrix product"] = lambda: rates.append(matmul_rate())
    times = interleaved(cases, args.rounds)
    del times["matrix product"]
    rate = median(rates)

    per_image = classifier_flops(trainer.classifier)[0]
    print(
        f"seconds for {len(swaps)} swaps (median of {args.rounds}), and GFLOP/s by the "
        "FLOPs as defined:"
    )
    figures = {"bfloat16_agreement": agreement, "matmul_flops_per_s": rate}
    for name, values in times.items():
        seconds = median(values)
        figures[name] = seconds
        print(f"  {name:45s} {seconds:.3f} s  {per_image * len(swaps) / seconds / 1e9:5.1f}")
    print(f"matrix product (2048 x 2048, float32): {rate / 1e9:.1f} GFLOP/s (measured each round)")
    return figures


def _classifier_cases(model, swaps: torch.Tensor) -> dict:
    default_layout = copy.deepcopy(model).to(memory_format=torch.contiguous_format)
    bfloat16 = copy.deepcopy(model).to(torch.bfloat16)
    swaps_bfloat16 = swaps.to(torch.bfloat16)
    cases = {
        f"chunks of {size}": lambda size=size: digit_classifier.predict(model, swaps, size)
        for size in (32, 64, 128, 2048)
    }

    def default_layout_predict() -> torch.Tensor:
        images = swaps.contiguous()  # (N, 1, 28, 28) with row-major strides
        return torch.cat([default_layout(chunk).argmax(1) for chunk in images.split(64)])

    def modules_predict() -> torch.Tensor:
        images = swaps.contiguous(memory_format=torch.channels_last)
        return torch.cat([model(chunk).argmax(1) for chunk in images.split(64)])

    cases["modules only (no C kernels), chunks of 64"] = modules_predict
    cases["default layout (not channels-last), chunks of 64"] = default_layout_predict
    cases["before: ReLU before pooling, chunks of 128"] = lambda: relu_first_predict(
        model, swaps, 128
    )
    cases["bfloat16, chunks of 64"] = lambda: digit_classifier.predict(bfloat16, swaps_bfloat16)
    return cases


def bfloat16_agreement(trainer: Trainer, epochs: tuple[int, ...]) -> dict[int, float]:
    """Train on; at each of ``epochs``, print and return the share of swaps whose bfloat16
    prediction equals the float32 one."""
    bfloat16 = copy.deepcopy(trainer.classifier).to(torch.bfloat16)
    codes = trainer.codes
    shares = {}
    while trainer.epoch < max(epochs):
        trainer.train_epoch()
        if trainer.epoch not in epochs:
            continue
        with torch.no_grad():
            swaps = trainer.generate(
                codes.classes[trainer.swaps.targets], codes.content[trainer.swaps.sources]
            )
        full = digit_classifier.predict(trainer.classifier, swaps)
        half = digit_classifier.predict(bfloat16, swaps.to(torch.bfloat16))
        differing = int((full != half).sum())
        shares[trainer.epoch] = 1 - differing / len(swaps)
        print(
            f"epoch {trainer.epoch}: bfloat16 and float32 predictions differ on {differing} "
            f"of {len(swaps)} swaps (agreement {shares[trainer.epoch]:.4f})"
        )
    return shares


# --- kernels ----------------------------------------------------------------------------


def kernels(args) -> dict:
    """Forward and backward of each upsample + transposed-conv stage on a batch of 32."""
    figures = {}
    for name, channels_in, channels_out, size, padding in (
        ("5x5 -> 14x14, 16 -> 16 channels", 16, 16, 5, 0),
        ("14x14 -> 28x28, 16 -> 1 channel", 16, 1, 14, 2),
    ):
        reference_ms, fused_ms = _time_stage(channels_in, channels_out, size, padding, args.rounds)
        print(
            f"{name}: upsample + conv_transpose2d {reference_ms:.2f} ms, fused "
            f"{fused_ms:.2f} ms (forward + backward); {reference_ms / fused_ms:.1f}x"
        )
        figures[name] = {"reference_ms": reference_ms, "fused_ms": fused_ms}
    return figures


def _time_stage(
    channels_in: int, channels_out: int, size: int, padding: int, rounds: int, repeat: int = 50
) -> tuple[float, float]:
    """Return milliseconds per call of the module path and of the fused kernel."""
    x = torch.randn(32, channels_in, size, size, requires_grad=True)
    x_last = x.detach().permute(0, 2, 3, 1).contiguous().requires_grad_()
    weight = torch.randn(channels_in, channels_out, 5, 5, requires_grad=True)
    bias = torch.randn(channels_out, requires_grad=True)

    def reference():
        for _ in range(repeat):
            upsampled = F.interpolate(x, scale_factor=2)
            F.conv_transpose2d(upsampled, weight, bias, padding=padding).sum().backward()

    def fused():
        for _ in range(repeat):
            upsample_conv_transpose(x_last, weight, bias, padding).sum().backward()

    times = interleaved({"reference": reference, "fused": fused}, rounds)
    return (median(times["reference"]) / repeat * 1e3, median(times["fused"]) / repeat * 1e3)


# --- memory -----------------------------------------------------------------------------

# The child reads VmHWM, the peak resident set of its own address space, which execve
# starts afresh. Its ru_maxrss would be wrong, because Linux carries the parent's peak
# across fork and execve into it, and this process has imported torch. A child of a
# 1 GiB process that only started Python read 1,037 MiB by ru_maxrss and 13 MiB by VmHWM.
MEMORY_SCRIPT = """
import json, sys, torch
sys.path.insert(0, {root!r})
torch.set_num_threads(1)
from glo_search import classifier
from glo_search.config import TrainConfig
from glo_search.data import load_dataset
from glo_search.trainer import Trainer

def peak_kib():
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("VmHWM:"):
                return int(line.split()[1])
    raise RuntimeError("VmHWM is missing from /proc/self/status")

before = peak_kib()
config = TrainConfig(**{changes})
trainer = Trainer(config, load_dataset(config), classifier.load_state(), device="cpu")
for _ in range(2):
    trainer.train_epoch()
    trainer.evaluate()
after = peak_kib()
print(json.dumps({{"imports_mib": before / 1024, "peak_mib": after / 1024}}))
"""


def memory(args) -> dict:
    """Peak resident memory of a process that trains one trial (VmHWM, Linux only)."""
    figures = {}
    for name, changes in (
        ("default", {}),
        ("largest of the default space", {"class_dim": 64, "content_dim": 128}),
    ):
        script = MEMORY_SCRIPT.format(root=str(ROOT), changes=changes)
        output = subprocess.run(
            [sys.executable, "-c", script], capture_output=True, text=True, check=True
        ).stdout
        values = json.loads(output.strip().splitlines()[-1])
        print(
            f"{name} config: peak RSS {values['peak_mib']:.0f} MiB, of which "
            f"{values['imports_mib']:.0f} MiB after importing torch and glo_search"
        )
        figures[name] = values
    return figures


FIGURES = {
    "arithmetic": arithmetic,
    "plain": plain,
    "pair": pair,
    "metrics": metrics,
    "classifier": classifier,
    "kernels": kernels,
    "memory": memory,
}

if __name__ == "__main__":
    started = time.perf_counter()
    code = main()
    print(f"({time.perf_counter() - started:.0f} s)")
    sys.exit(code)
