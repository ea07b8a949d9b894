"""Image GAN experiments (examples/gan): models, the shared training loop, diversity analyses, the scripts.

Covers: the explicit LSTM cell (torch.nn.LSTMCell's forward, double backward), App. C-F model shapes, the
unrolled generator step leaving D untouched, inference via optimisation recovering z for a known generator,
percent best rank, NaN -> a clear stop with the last good checkpoint kept, resume == uninterrupted, a short
end-to-end run of every script, and argparse errors for bad flags.
"""

from __future__ import annotations

import copy
import json
import math
import os
import pickle
from pathlib import Path
from typing import Any, Dict, List

import numpy as np
import pytest
import torch
from torch import nn

import cifar10
import colored_mnist
import mnist_rnn
import stacked_mnist
from unroll_examples import diversity as dv
from unroll_examples import image_experiment as ex
from unroll_examples import image_models as M
from unroll_examples import image_training as it
from unroll_examples import mnist_data as md
from unroll_examples import runs

needs_real_mnist = pytest.mark.skipif(not md.has_split("test"), reason=md.how_to_get("test"))
# Timing fields differ between any two runs; everything else must match exactly.
TIMING = {"train_seconds", "seconds_per_iteration", "eval_seconds", "wall_seconds", "environment"}


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


def devices() -> List[str]:
    return ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


# ------------------------------------------------------------------------------------------------ LSTM


def test_lstm_cell_matches_torch_lstmcell_for_the_same_weights() -> None:
    torch.manual_seed(0)
    ref = nn.LSTMCell(3, 5)
    ours = M.LSTMCell(3, 5)
    with torch.no_grad():
        ours.weight_ih.copy_(ref.weight_ih)
        ours.weight_hh.copy_(ref.weight_hh)
        ours.bias.copy_(ref.bias_ih + ref.bias_hh)
    x, h, c = torch.randn(4, 3), torch.randn(4, 5), torch.randn(4, 5)
    for _ in range(3):  # a few steps, so the states feed back
        (h_ref, c_ref), (h_ours, c_ours) = ref(x, (h, c)), ours(x, (h, c))
        torch.testing.assert_close(h_ours, h_ref, rtol=0, atol=1e-6)
        torch.testing.assert_close(c_ours, c_ref, rtol=0, atol=1e-6)
        h, c = h_ref, c_ref


def test_input_free_cell_is_lstmcell_with_zero_input_and_starts_with_forget_bias_one() -> None:
    torch.manual_seed(1)
    ours = M.LSTMCell(0, 6)
    assert ours.weight_ih is None
    assert torch.equal(ours.bias[6:12], torch.ones(6)) and torch.equal(ours.bias[:6], torch.zeros(6))
    # Xavier-uniform per gate block: |w| <= sqrt(6 / (fan_in + fan_out)) = sqrt(1/2) for 6x6 blocks, std ~0.41.
    assert ours.weight_hh.abs().max() <= math.sqrt(0.5) and ours.weight_hh.std() > 0.3
    ref = nn.LSTMCell(2, 6)
    with torch.no_grad():
        ref.weight_hh.copy_(ours.weight_hh)
        ref.bias_ih.copy_(ours.bias)
        ref.bias_hh.zero_()
    h, c = torch.randn(3, 6), torch.randn(3, 6)
    torch.testing.assert_close(ours(None, (h, c))[0], ref(torch.zeros(3, 2), (h, c))[0], rtol=0, atol=1e-6)


@pytest.mark.parametrize("device", devices())
def test_lstm_generator_has_a_correct_double_backward(device: str) -> None:
    """A Hessian-vector product through the generator matches finite differences of its gradient."""
    torch.manual_seed(2)
    gen = M.LSTMGenerator(latent_dim=3, hidden=4, height=5, width=6).double().to(device)
    z = torch.randn(2, 3, dtype=torch.float64, device=device)
    params = list(gen.parameters())
    target = torch.randn(2, 1, 5, 6, dtype=torch.float64, device=device)

    def grads(create_graph: bool) -> List[torch.Tensor]:
        loss = (gen(z) - target).pow(2).sum()
        return list(torch.autograd.grad(loss, params, create_graph=create_graph))

    v = [torch.randn_like(p) for p in params]
    g = grads(create_graph=True)
    hvp = torch.autograd.grad(sum((gi * vi).sum() for gi, vi in zip(g, v)), params)
    eps = 1e-6
    with torch.no_grad():
        for p, vi in zip(params, v):
            p.add_(eps * vi)
    g_plus = grads(create_graph=False)
    with torch.no_grad():
        for p, vi in zip(params, v):
            p.sub_(2 * eps * vi)
    g_minus = grads(create_graph=False)
    for h, gp, gm in zip(hvp, g_plus, g_minus):
        torch.testing.assert_close(h, (gp - gm) / (2 * eps), rtol=1e-5, atol=1e-6)
    assert sum(float(h.abs().sum()) for h in hvp) > 0


def test_lstm_generator_writes_one_column_per_step() -> None:
    torch.manual_seed(3)
    gen = M.rnn_generator()
    z = torch.randn(2, M.LATENT_DIM)
    images = gen(z)
    assert images.shape == (2, 1, 28, 28) and images.abs().max() < 1
    # Column 0 is the readout of the first LSTM step from h_0 = ReLU(FC(z)), c_0 = 0.
    h = torch.relu(gen.project(z))
    h1, _ = gen.cell(None, (h, torch.zeros_like(h)))
    torch.testing.assert_close(images[:, 0, :, 0], torch.tanh(gen.readout(h1)))


# ---------------------------------------------------------------------------------------------- models


@pytest.mark.parametrize("make_g, make_d, shape", [
    (M.rnn_generator, M.rnn_discriminator, (1, 28, 28)),
    (M.stacked_generator, lambda: M.stacked_discriminator(M.parse_size("1/4")), (3, 32, 32)),
    (lambda: M.cifar_generator(M.parse_size("1/4")), lambda: M.cifar_discriminator(M.parse_size("1/4")),
     (3, 32, 32)),
])
def test_models_produce_images_and_logits(make_g: Any, make_d: Any, shape: tuple) -> None:
    torch.manual_seed(4)
    images = make_g()(torch.randn(3, M.LATENT_DIM))
    assert images.shape == (3, *shape) and images.abs().max() <= 1
    assert make_d()(images).shape == (3,)


def test_size_multipliers_scale_the_channels() -> None:
    assert M.scaled(M.STACKED_D_CHANNELS, M.parse_size("1/4")) == (2, 4, 8)
    assert M.scaled(M.CIFAR_G_CHANNELS, M.parse_size("0.5")) == (256, 128, 64, 32)
    convs = [m for m in M.stacked_discriminator(M.parse_size("1/2")).modules() if isinstance(m, nn.Conv2d)]
    assert [c.out_channels for c in convs] == [4, 8, 16]
    assert M.size_label(M.parse_size("0.25")) == "1/4" and M.size_label(M.parse_size("1")) == "1"
    for bad in ("0", "-1/4", "abc"):
        with pytest.raises(ValueError, match="size multiplier"):
            M.parse_size(bad)


# ------------------------------------------------------------------------------ the training loop


LATENT = 8


def tiny_gan(name: str = "tiny", sample_data: Any = None) -> it.ImageGAN:
    """8x8 one-channel images from small conv models (the App. D-F classes, tiny channel counts)."""
    def data(n: int, gen: torch.Generator) -> torch.Tensor:
        return torch.rand(n, 1, 8, 8, generator=gen) * 2 - 1

    return it.ImageGAN(name, lambda: M.ConvGenerator((4, 2), 1, latent_dim=LATENT),
                       lambda: M.ConvDiscriminator((2, 4), 1, image_size=8), sample_data or data, latent_dim=LATENT)


def test_unrolled_generator_loss_leaves_the_discriminator_untouched() -> None:
    trainer = it.GANTrainer(tiny_gan(), it.GANConfig(K=3, batch=6, steps=2))
    trainer.train_step()  # D has an Adam state and running statistics now
    before = (copy.deepcopy(trainer.D.state_dict()), copy.deepcopy(trainer.d_opt.state_dict()))
    x, z = trainer.draw()
    fake = trainer.G(z)
    loss_k = trainer.unrolled_g_loss(x, fake)
    (grad_k,) = torch.autograd.grad(loss_k, fake)
    for name, value in trainer.D.state_dict().items():
        assert torch.equal(value, before[0][name]), name
    assert trainer.d_opt.state_dict()["state"][0]["step"] == before[1]["state"][0]["step"]
    # K = 0 is -log D(G(z)) at the current D; the unrolled loss differs (the look-ahead matters).
    trainer.cfg = it.GANConfig(K=0, batch=6, steps=2)
    loss_0 = trainer.unrolled_g_loss(x, fake)
    (grad_0,) = torch.autograd.grad(loss_0, fake)
    assert not torch.allclose(grad_0, grad_k)
    expected = nn.functional.softplus(-trainer.D(fake)).mean()
    torch.testing.assert_close(loss_0, expected)


def test_unrolled_loss_is_the_generator_loss_after_real_discriminator_adam_steps() -> None:
    """f_K equals -log D_K(G(z)) with D_K reached by K torch.optim.Adam steps of a copy of D on the same batch."""
    K = 3
    trainer = it.GANTrainer(tiny_gan(), it.GANConfig(K=K, batch=6, steps=3))
    for _ in range(2):
        trainer.train_step()
    x, z = trainer.draw()
    fake = trainer.G(z).detach()
    d_copy = copy.deepcopy(trainer.D)
    opt_copy = torch.optim.Adam(d_copy.parameters(), lr=trainer.cfg.d_lr, betas=(trainer.cfg.beta1, 0.999))
    # state_dict() returns the live state tensors, which load_state_dict may keep: copy them.
    opt_copy.load_state_dict(copy.deepcopy(trainer.d_opt.state_dict()))
    for _ in range(K):
        loss = it.d_loss_from_logits(d_copy(x), d_copy(fake))
        opt_copy.zero_grad()
        loss.backward()
        opt_copy.step()
    expected = nn.functional.softplus(-d_copy(fake)).mean()
    torch.testing.assert_close(trainer.unrolled_g_loss(x, fake), expected, rtol=1e-5, atol=1e-6)


def test_same_seed_same_numbers_and_seeds_are_paired_across_K() -> None:
    cfg = it.GANConfig(K=1, batch=4, steps=3, snapshot_every=1)
    a, b = it.GANTrainer(tiny_gan(), cfg), it.GANTrainer(tiny_gan(), cfg)
    a.run()
    b.run()
    assert a.losses == b.losses and all(torch.equal(x[1], y[1]) for x, y in zip(a.snapshots, b.snapshots))
    k0 = it.GANTrainer(tiny_gan(), it.GANConfig(K=0, batch=4, steps=3))
    fresh = it.GANTrainer(tiny_gan(), cfg)
    for p, q in zip(k0.G.parameters(), fresh.G.parameters()):
        assert torch.equal(p, q)
    assert all(torch.equal(u, v) for u, v in zip(k0.draw(), fresh.draw()))


def test_nan_stops_naming_the_iteration_and_keeps_the_last_good_checkpoint(tmp_path: Path) -> None:
    calls = {"n": 0}

    def poisoned(n: int, gen: torch.Generator) -> torch.Tensor:
        calls["n"] += 1
        x = torch.rand(n, 1, 8, 8, generator=gen) * 2 - 1
        return x * math.nan if calls["n"] == 4 else x

    cfg = it.GANConfig(K=2, batch=4, steps=10, checkpoint_every=2)
    trainer = it.GANTrainer(tiny_gan(sample_data=poisoned), cfg, tmp_path)
    with pytest.raises(runs.Diverged) as info:
        trainer.run()
    message = str(info.value)
    assert info.value.step == 4 and info.value.checkpoint_step == 2
    assert "iteration 4" in message and "discriminator loss" in message
    assert f"{tmp_path / it.CHECKPOINT}, iteration 2" in message
    assert torch.load(tmp_path / it.CHECKPOINT, weights_only=True)["step"] == 2


def test_run_experiment_records_a_diverged_run_and_goes_on(tmp_path: Path) -> None:
    def nan_data(n: int, gen: torch.Generator) -> torch.Tensor:
        return torch.full((n, 1, 8, 8), math.nan)

    specs = [it.RunSpec(tiny_gan("bad", nan_data), it.GANConfig(batch=4, steps=2), {"K": "bad"}),
             it.RunSpec(tiny_gan(), it.GANConfig(batch=4, steps=2), {"K": 0})]
    records, trainers = it.run_experiment(specs, tmp_path, lambda t, s, d: {"m": 1.0}, log=lambda _: None)
    assert [r["status"] for r in records] == ["diverged", "done"] and records[0]["diverged_at"] == 1
    assert list(trainers) == [specs[1].folder]
    rows = ex.aggregate(records, ("K",), ("m",))
    assert rows[0]["runs"] == 0 and rows[0]["diverged"] == 1 and rows[1]["m"] == 1.0


def test_trainer_resume_equals_uninterrupted(tmp_path: Path) -> None:
    cfg = it.GANConfig(K=2, batch=4, steps=6, snapshot_every=2, checkpoint_every=3)
    whole = it.GANTrainer(tiny_gan(), cfg, tmp_path / "whole")
    whole.run()

    class KilledAfterFour(it.GANTrainer):
        def train_step(self) -> Any:
            if self.step == 3:  # dies during iteration 4: the checkpoint of iteration 3 (checkpoint_every) is the last
                raise KeyboardInterrupt
            return super().train_step()

    with pytest.raises(KeyboardInterrupt):
        KilledAfterFour(tiny_gan(), cfg, tmp_path / "part").run()
    resumed = it.GANTrainer(tiny_gan(), cfg, tmp_path / "part", resume=True)
    assert resumed.step == 3
    resumed.run()
    assert resumed.losses == whole.losses
    for name, value in whole.G.state_dict().items():
        assert torch.equal(value, resumed.G.state_dict()[name]), name
    assert [s for s, _ in resumed.snapshots] == [0, 2, 4, 6]


needs_fork = pytest.mark.skipif(not runs.can_fork(), reason="parallel runs need the 'fork' start method")


def _evaluate_with_samples(trainer: it.GANTrainer, spec: it.RunSpec, run_dir: Path) -> Dict[str, Any]:
    return {"sample_sum": float(trainer.samples(8).double().sum()), "pid": os.getpid()}


@needs_fork
def test_parallel_workers_give_the_numbers_of_one_worker(tmp_path: Path) -> None:
    """Runs in forked workers (largest K first) equal the sequential runs, record for record, and the
    trainers handed back for the figures are reloaded from the workers' checkpoints."""
    specs = [it.RunSpec(tiny_gan(), it.GANConfig(K=K, batch=4, steps=3, seed=seed, snapshot_every=1), {"K": K})
             for K in (0, 2) for seed in (0, 1)]
    one, _ = it.run_experiment(specs, tmp_path / "one", _evaluate_with_samples, log=lambda _: None)
    lines: List[str] = []
    two, trainers = it.run_experiment(specs, tmp_path / "two", _evaluate_with_samples, log=lines.append,
                                      workers=2)
    strip = lambda r: {k: v for k, v in r.items() if k not in TIMING | {"pid", "eval_seconds"}}  # noqa: E731
    assert [strip(r) for r in two] == [strip(r) for r in one]
    assert {r["pid"] for r in two} != {os.getpid()}  # trained elsewhere
    assert len(lines) == len(specs) and all(line.split(":")[0] in {s.folder for s in specs} for line in lines)
    assert list(trainers) == [specs[0].folder, specs[2].folder]
    assert [step for step, _ in trainers[specs[2].folder].snapshots] == [0, 1, 2, 3]


@needs_fork
def test_an_error_in_a_worker_stops_the_experiment_and_resume_finishes_it(tmp_path: Path) -> None:
    def broken(trainer: it.GANTrainer, spec: it.RunSpec, run_dir: Path) -> Dict[str, Any]:
        if spec.cfg.K == 2:
            raise RuntimeError("evaluation failed")
        return {"m": 1.0}

    specs = [it.RunSpec(tiny_gan(), it.GANConfig(K=K, batch=4, steps=2), {"K": K}) for K in (0, 2)]
    with pytest.raises(RuntimeError, match="evaluation failed"):
        it.run_experiment(specs, tmp_path, broken, log=lambda _: None, workers=2)
    assert (tmp_path / specs[1].folder / it.CHECKPOINT).is_file()  # trained before the evaluation failed
    records, _ = it.run_experiment(specs, tmp_path, lambda t, s, d: {"m": 2.0}, resume=True, log=lambda _: None,
                                   workers=2)
    assert [r["status"] for r in records] == ["done", "done"] and records[1]["m"] == 2.0


def test_a_cached_diverged_run_is_not_trained_again_on_resume(tmp_path: Path) -> None:
    def nan_data(n: int, gen: torch.Generator) -> torch.Tensor:
        return torch.full((n, 1, 8, 8), math.nan)

    spec = it.RunSpec(tiny_gan("bad", nan_data), it.GANConfig(batch=4, steps=2), {"K": 0})
    (first,), _ = it.run_experiment([spec], tmp_path, lambda t, s, d: {}, log=lambda _: None)
    assert first["status"] == "diverged"
    (tmp_path / spec.folder / it.CHECKPOINT).write_bytes(b"")  # loading it would fail: it must not be read
    (again,), _ = it.run_experiment([spec], tmp_path, lambda t, s, d: {}, resume=True, log=lambda _: None)
    assert again == first


# ------------------------------------------------------------------------ inference via optimisation


def test_inference_via_optimisation_recovers_z_for_a_known_generator() -> None:
    gen = torch.Generator().manual_seed(5)
    weight = torch.randn(4, 36, generator=gen, dtype=torch.float64) / 2
    bias = 0.1 * torch.randn(36, generator=gen, dtype=torch.float64)

    def generator(z: torch.Tensor) -> torch.Tensor:
        return torch.tanh(z.double() @ weight + bias).view(-1, 1, 6, 6)

    z_true = torch.randn(6, 4, generator=gen, dtype=torch.float64)
    rec = dv.reconstruct(generator, generator(z_true), latent_dim=4, restarts=3, max_iter=40, seed=0)
    assert rec.mse.shape == (6,) and rec.mse_per_restart.shape == (3, 6)
    assert float(rec.mse.max()) < 1e-10
    torch.testing.assert_close(rec.z.double(), z_true, rtol=0, atol=1e-3)
    # The best restart is kept per target.
    torch.testing.assert_close(rec.mse, rec.mse_per_restart.min(dim=0).values)
    # A target the generator cannot produce (outside tanh's range) keeps a clearly positive error.
    far = dv.reconstruct(generator, torch.full((1, 1, 6, 6), 3.0, dtype=torch.float64), 4, restarts=1,
                         max_iter=20)
    assert float(far.mse[0]) > 3.0


def test_percent_best_rank_and_table_3_arithmetic() -> None:
    mse = torch.tensor([[1.0, 2.0, 3.0, 1.0], [2.0, 1.0, 3.0, 0.5], [3.0, 3.0, 3.0, 3.0]])
    # Target 2 is a three-way tie: a third of a win each.
    expected = torch.tensor([100 * (1 + 1 / 3) / 4, 100 * (2 + 1 / 3) / 4, 100 * (1 / 3) / 4], dtype=torch.float64)
    torch.testing.assert_close(dv.percent_best_rank(mse), expected)
    assert float(dv.percent_best_rank(mse).sum()) == pytest.approx(100.0)
    table = dv.reconstruction_table({"0": [torch.tensor([0.2, 0.4]), torch.tensor([0.4, 0.4])],
                                     "10": [torch.tensor([0.1, 0.5]), torch.tensor([0.1, 0.1])]})
    assert table["0"]["mse"] == pytest.approx(0.35) and table["0"]["mse_se"] == pytest.approx(0.05)
    # Run 0: each wins one target (50/50); run 1: "10" wins both -> 25% and 75%.
    assert table["0"]["percent_best"] == pytest.approx(25.0) and table["10"]["percent_best"] == pytest.approx(75.0)
    # One run has no standard error (not a spread of 0).
    one = dv.reconstruction_table({"0": [torch.tensor([0.2, 0.4])], "10": [torch.tensor([0.1, 0.5])]})
    assert one["0"]["mse"] == pytest.approx(0.3) and math.isnan(one["0"]["mse_se"])


def test_distance_profiles_share_bins_and_see_collapse() -> None:
    gen = torch.Generator().manual_seed(6)
    spread = torch.rand(200, 1, 6, 6, generator=gen) * 2 - 1
    collapsed = spread[:3].repeat(70, 1, 1, 1)[:200] + 0.01 * torch.randn(200, 1, 6, 6, generator=gen)
    a = dv.distance_profile(spread, 2000, 0, (0.0, 15.0), bins=30)
    b = dv.distance_profile(collapsed, 2000, 0, (0.0, 15.0), bins=30)
    assert a["edges"] == b["edges"] and len(a["histogram"]) == 30
    assert b["distance_quartiles"][0] < 0.5 < a["distance_quartiles"][0]


# --------------------------------------------------------------------------------------- the scripts

TINY = ["--steps", "2", "--batch", "4", "--seeds", "0", "--snapshot-every", "1", "--checkpoint-every", "1",
        "--no-progress"]


def read_results(out: Path) -> Dict[str, Any]:
    return json.loads((out / "results.json").read_text())


def assert_outputs(out: Path, figures: List[str], n_runs: int) -> Dict[str, Any]:
    results = read_results(out)
    assert results["status"] == "done" and len(results["runs"]) == n_runs
    assert all(r["status"] == "done" and r["step"] == 2 for r in results["runs"])
    assert results["deviations"] and any("steps: 2" in line for line in results["deviations"])
    for name in figures:
        assert (out / name).stat().st_size > 1000, name
    for record in results["runs"]:
        assert (out / record["run"] / it.CHECKPOINT).is_file() and (out / record["run"] / it.RESULT).is_file()
    return results


@needs_real_mnist
def test_stacked_mnist_end_to_end(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    out = tmp_path / "out"
    argv = TINY + ["--K", "0", "1", "--sizes", "1/4", "--eval-samples", "40", "--out", str(out),
                   "--classifier-cache", str(tmp_path / "clf.pt"), "--classifier-train", "300",
                   "--classifier-epochs", "1"]
    assert stacked_mnist.main(argv) == 0
    results = assert_outputs(out, ["samples.png", "samples_over_training.png", "losses.png"], 2)
    assert {(r["X"], r["K"]) for r in results["table"]} == {("1/4", 0), ("1/4", 1)}
    assert all(1 <= r["modes"] <= 40 and 0 <= r["kl"] <= math.log(1000) + 1e-9 for r in results["runs"])
    assert results["classifier"]["n_heldout"] == 2000
    printed = capsys.readouterr().out
    assert "30.6 ± 20.73 modes" in printed and "deviations from the paper" in printed


@needs_real_mnist
def test_mnist_rnn_end_to_end(tmp_path: Path) -> None:
    out = tmp_path / "out"
    argv = TINY + ["--K", "0", "2", "--targets", "3", "--lbfgs-iters", "3", "--pairs", "50", "--out", str(out)]
    assert mnist_rnn.main(argv) == 0
    results = assert_outputs(out, ["samples_over_training.png", "samples.png", "pairwise_distances.png",
                                   "reconstructions.png", "losses.png"], 2)
    assert set(results["diversity_table"]) == {"0", "2"}
    assert sum(row["percent_best"] for row in results["diversity_table"].values()) == pytest.approx(100.0)
    assert all(len(r["recon_mse_per_target"]) == 3 for r in results["runs"])


def write_cifar_batches(folder: Path, n: int = 12) -> None:
    """Tiny training batches in the real CIFAR-10 python format."""
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for name in ("data_batch_1", "data_batch_2", "data_batch_3", "data_batch_4", "data_batch_5"):
        entry = {b"labels": [int(v) for v in rng.integers(0, 10, n)],
                 b"data": rng.integers(0, 256, size=(n, 3072), dtype=np.uint8)}
        (folder / name).write_bytes(pickle.dumps(entry, protocol=2))


def test_cifar10_end_to_end(tmp_path: Path) -> None:
    write_cifar_batches(tmp_path / "cifar")
    out = tmp_path / "out"
    argv = TINY + ["--K", "0", "1", "--targets", "3", "--lbfgs-iters", "3", "--pairs", "50", "--out", str(out),
                   "--data-dir", str(tmp_path / "cifar"), "--no-checksum"]
    assert cifar10.main(argv) == 0
    results = assert_outputs(out, ["samples.png", "pairwise_distances.png", "reconstructions.png"], 2)
    assert results["data"] == "CIFAR-10 train split (60 images)"
    assert "0.0231 ± 0.0024" in results["table_markdown"]
    # Without --no-checksum the made-up batches fail the official md5 check: a clear error, exit status 2.
    assert cifar10.main(TINY + ["--data-dir", str(tmp_path / "cifar"), "--out", str(tmp_path / "o2")]) == 2


def _comparable(record: Dict[str, Any]) -> Dict[str, Any]:
    return {k: v for k, v in record.items() if k not in TIMING}


@needs_real_mnist
def test_colored_mnist_resume_equals_uninterrupted(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    base = ["--steps", "4", "--batch", "4", "--seeds", "0", "--K", "0", "2", "--snapshot-every", "2",
            "--checkpoint-every", "1", "--eval-samples", "30", "--js-samples", "200", "--no-progress"]
    whole, part = tmp_path / "whole", tmp_path / "part"
    assert colored_mnist.main(base + ["--out", str(whole)]) == 0
    expected = assert_outputs_colored(whole)

    original = it.GANTrainer.train_step

    def killed_in_the_second_run(self: it.GANTrainer) -> Any:
        if self.cfg.K == 2 and self.step == 3:
            raise KeyboardInterrupt  # the process dies mid-run
        return original(self)

    monkeypatch.setattr(it.GANTrainer, "train_step", killed_in_the_second_run)
    assert colored_mnist.main(base + ["--out", str(part)]) == 130  # Ctrl-C: one line, exit code 130
    monkeypatch.setattr(it.GANTrainer, "train_step", original)
    assert not (part / "results.json").exists()
    assert colored_mnist.main(base + ["--out", str(part), "--resume"]) == 0
    got = read_results(part)
    assert [_comparable(r) for r in got["runs"]] == [_comparable(r) for r in expected["runs"]]
    assert got["table"] == expected["table"]
    for run in ("X1_4-K0-seed0", "X1_4-K2-seed0"):
        a = runs.read_final(whole / run / runs.FINAL)
        b = runs.read_final(part / run / runs.FINAL)
        assert all(torch.equal(a.state["G"][k], b.state["G"][k]) for k in a.state["G"])
        assert torch.equal(a.log["losses"], b.log["losses"])
        assert all(torch.equal(x[1], y[1]) for x, y in zip(a.log["snapshots"], b.log["snapshots"]))


def assert_outputs_colored(out: Path) -> Dict[str, Any]:
    results = read_results(out)
    assert results["status"] == "done" and len(results["runs"]) == 2
    assert all(0 <= r["js"] <= math.log(2) for r in results["runs"])
    assert (out / "colors.png").is_file() and (out / "samples_over_training.png").is_file()
    return results


@pytest.mark.parametrize("script, flags, message", [
    (stacked_mnist, ["--K", "-1"], "K must be >= 0"),
    (stacked_mnist, ["--sizes", "0"], "size multiplier must be > 0"),
    (stacked_mnist, ["--sizes", "quarter"], "size multiplier must be a number"),
    (stacked_mnist, ["--batch", "1"], "batch must be >= 2"),
    (stacked_mnist, ["--eval-samples", "0"], "--eval-samples must be >= 1"),
    (stacked_mnist, ["--workers", "0"], "--workers must be >= 1"),
    (colored_mnist, ["--steps", "0"], "steps must be >= 1"),
    (colored_mnist, ["--K", "1", "1"], "--K values must be distinct"),
    (colored_mnist, ["--g-loss", "hinge"], "invalid choice: 'hinge'"),
    (mnist_rnn, ["--threads", "0"], "argument --threads: must be >= 1"),
    (mnist_rnn, ["--targets", "0"], "--targets must be >= 1"),
    (mnist_rnn, ["--d-lr", "-1"], "learning rates must be > 0"),
    (cifar10, ["--unroll-lr", "0"], "learning rates must be > 0"),
    (stacked_mnist, ["--threads", "0"], "argument --threads: must be >= 1"),
    (cifar10, ["--beta1", "1.5"], "betas must lie in [0, 1)"),
    (cifar10, ["--steps", "ten"], "invalid int value: 'ten'"),
])
def test_bad_flags_are_argparse_errors(script: Any, flags: List[str], message: str, tmp_path: Path,
                                       capsys: pytest.CaptureFixture) -> None:
    with pytest.raises(SystemExit) as info:
        script.parse_args(flags + ["--out", str(tmp_path / "out")])
    assert info.value.code == 2
    assert message in capsys.readouterr().err


def test_existing_runs_need_resume_and_resume_needs_runs(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    """Checked when the script takes the folder, before any data is loaded (none exists here)."""
    out = tmp_path / "out"
    assert cifar10.main(["--resume", "--out", str(out), "--data-dir", str(tmp_path / "none")]) == 2
    assert "holds no checkpoint to continue" in capsys.readouterr().err
    (out / "K0-seed0").mkdir(parents=True)
    (out / "K0-seed0" / it.CHECKPOINT).write_bytes(b"")
    assert cifar10.main(["--out", str(out), "--data-dir", str(tmp_path / "none")]) == 2
    assert "pass --resume" in capsys.readouterr().err
