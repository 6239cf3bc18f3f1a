"""The patch table, the spec -> TorchSSL argument mapping, the patch pieces that need no TorchSSL checkout, and
TorchSSL's load_model under checkpoint_to_run_device."""
from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest

from contract.spec import RunSpec
from third_party.torchssl import patches
from third_party.torchssl.entry import torchssl_args, verify_data

from conftest import torchssl_modules


def test_every_patch_is_named_explained_and_applied_only_where_it_belongs():
    names = [p.name for p in patches.PATCHES]
    assert len(names) == len(set(names))
    assert all(len(p.why) > 80 and p.target and p.when in ("always", "cpu", "bf16", "bn_momentum", "fixmatch",
                                                           "mixmatch") for p in patches.PATCHES)
    always = [p.name for p in patches.PATCHES if p.when == "always"]
    assert "observe_evaluate" in always and "observe_losses" not in always
    fixmatch = ["entry_replaces_main", "our_arrays", "our_split", "exact_step_budget", "spec_schedule",
                "observe_losses", "observe_evaluate", "atomic_checkpoint", "checkpoint_to_run_device",
                "precision_as_spec"]
    assert patches.applied("cuda", "fp32") == fixmatch
    assert patches.applied("cpu", "fp32") == fixmatch + ["cpu_device_shim"]
    assert patches.applied("cuda", "bf16") == fixmatch + ["amp_bf16"]
    assert patches.applied("cuda", "fp32", 0.01) == fixmatch + ["bn_momentum"]
    mixmatch = patches.applied("cpu", "bf16", 0.01, "mixmatch")
    assert mixmatch == ["entry_replaces_main", "our_arrays", "our_split", "exact_step_budget", "spec_schedule",
                        "observe_mixmatch", "observe_evaluate", "atomic_checkpoint", "checkpoint_to_run_device",
                        "precision_as_spec", "checkpoint_below_1m_steps", "cpu_device_shim", "amp_bf16",
                        "bn_momentum"]


def test_described_patches_name_the_runs_algorithm():
    fix = {p["name"]: p["target"] for p in patches.described(patches.applied("cpu", "bf16"), "fixmatch")}
    mix = {p["name"]: p["target"] for p in patches.described(patches.applied("cpu", "bf16", algorithm="mixmatch"),
                                                              "mixmatch")}
    # FixMatch's targets read as they always have
    assert fix["entry_replaces_main"] == "fixmatch.py main() / main_worker()"
    assert fix["spec_schedule"] == "FixMatch.num_eval_iter (subclass property)"
    assert fix["amp_bf16"] == "models.fixmatch.fixmatch.autocast, models.fixmatch.fixmatch.GradScaler"
    assert mix["exact_step_budget"] == "the zip of train loaders in MixMatch.train()"
    assert mix["atomic_checkpoint"] == "MixMatch.save_model (subclass)"
    assert not any("{" in t for t in [*fix.values(), *mix.values()])


def test_amp_bf16_binds_bf16_autocast_and_a_disabled_scaler():
    import torch

    module = SimpleNamespace()
    patches.amp_bf16(module, "cpu")
    with module.autocast():
        assert torch.get_autocast_dtype("cpu") == torch.bfloat16 and torch.is_autocast_enabled("cpu")
    scaler = module.GradScaler()
    assert not scaler.is_enabled()
    loss = torch.tensor(2.0, requires_grad=True)
    assert scaler.scale(loss) is loss  # no loss scaling: bf16 needs none


def test_spec_maps_onto_torchssl_arguments(tmp_path):
    spec = RunSpec(impl="torchssl", recipe="torchssl", n_labels=250, seed=3, data_kind="k", data_sha256="a" * 64,
                   split_sha256="b" * 64, steps=1000, eval_every=100, batch_size=32, uratio=5, lr=0.05,
                   momentum=0.8, weight_decay=1e-3, threshold=0.9, lambda_u=2.0, ema_decay=0.99, depth=16,
                   widen_factor=4, eval_batch_size=64, precision="bf16")
    a = torchssl_args(spec, tmp_path, gpu=1, num_workers=2)
    assert (a.num_train_iter, a.num_eval_iter, a.num_labels, a.seed) == (1000, 100, 250, 3)
    assert (a.batch_size, a.uratio, a.eval_batch_size) == (32, 5, 64)
    assert (a.lr, a.momentum, a.weight_decay) == (0.05, 0.8, 1e-3)
    assert (a.p_cutoff, a.ulb_loss_ratio, a.ema_m, a.T) == (0.9, 2.0, 0.99, 1.0)
    assert (a.depth, a.widen_factor, a.leaky_slope, a.dropout) == (16, 4, 0.1, 0.0)
    assert a.hard_label is True and a.amp is True and a.gpu == 1 and a.num_workers == 2
    assert a.multiprocessing_distributed is False and a.distributed is False and a.world_size == 1
    assert (a.save_dir, a.save_name) == (str(tmp_path), "torchssl")
    assert not {"alpha", "ramp_up"} & set(vars(a))


def test_mixmatch_spec_maps_onto_mixmatch_py_arguments(tmp_path):
    spec = RunSpec(impl="torchssl", recipe="torchssl", algorithm="mixmatch", n_labels=250, seed=3, data_kind="k",
                   data_sha256="a" * 64, split_sha256="b" * 64, threshold=None, mixup_alpha=0.75, temperature=0.4,
                   ramp_up=1 / 64, lambda_u=75.0, uratio=1)
    a = torchssl_args(spec, tmp_path, gpu=None, num_workers=1)
    assert (a.alpha, a.T, a.ramp_up, a.ulb_loss_ratio, a.uratio) == (0.75, 0.4, 1 / 64, 75.0, 1)
    assert not {"p_cutoff", "hard_label"} & set(vars(a))


class CountingLoader:
    def __init__(self, n: int):
        self.n, self.requested, self.dataset = n, 0, "the dataset"

    def __len__(self):
        return self.n

    def __iter__(self):
        for i in range(self.n):
            self.requested += 1
            yield i


def test_limited_batches_stop_at_the_budget_without_fetching_more():
    loader, seen = CountingLoader(10), []
    batches = patches.LimitedBatches(loader, 4, on_fetch=lambda b, t: seen.append(b))
    assert list(batches) == [0, 1, 2, 3] and seen == [0, 1, 2, 3]
    assert loader.requested == 4 and len(batches) == 4 and batches.dataset == "the dataset"
    assert list(patches.LimitedBatches(CountingLoader(10), 0)) == []
    # zip stops at the limited (first) loader without drawing a batch from the second
    second = CountingLoader(10)
    assert len(list(zip(patches.LimitedBatches(CountingLoader(10), 3), second))) == 3 and second.requested == 3


def test_verify_data_refuses_any_other_labelled_set():
    rng = np.random.default_rng(0)
    arrays = SimpleNamespace(train_x=rng.integers(0, 256, (50, 32, 32, 3), dtype=np.uint8),
                             train_y=np.arange(50) % 10, test_x=rng.integers(0, 256, (20, 32, 32, 3), dtype=np.uint8),
                             test_y=np.arange(20) % 10)
    split, eval_idx = np.array([1, 7, 30]), np.array([0, 5, 19])
    held = lambda x, y: SimpleNamespace(data=x, targets=list(y))  # noqa: E731
    ulb = held(arrays.train_x, arrays.train_y)
    ev = held(arrays.test_x[eval_idx], arrays.test_y[eval_idx])
    verify_data(held(arrays.train_x[split], arrays.train_y[split]), ulb, ev, arrays, split, eval_idx)
    for wrong in ([1, 7, 31], [7, 1, 30], [1, 7]):
        with pytest.raises(ValueError, match="labelled"):
            verify_data(held(arrays.train_x[wrong], arrays.train_y[wrong]), ulb, ev, arrays, split, eval_idx)
    with pytest.raises(ValueError, match="evaluation"):
        verify_data(held(arrays.train_x[split], arrays.train_y[split]), ulb, held(arrays.test_x, arrays.test_y),
                    arrays, split, eval_idx)


def test_cpu_device_shim_redirects_cuda_calls_and_restores_them():
    torch = pytest.importorskip("torch")
    original = (torch.Tensor.cuda, torch.nn.Module.cuda, torch.cuda.Event, torch.cuda.synchronize)
    with patches.cpu_device_shim(torch.device("cpu")):
        x = torch.ones(3).cuda(0)
        m = torch.nn.Linear(2, 2).cuda(0)
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        torch.cuda.synchronize()
        end.record()
        assert x.device.type == "cpu" and m.weight.device.type == "cpu"
        assert 0.0 <= start.elapsed_time(end) < 1000.0  # milliseconds, as torch.cuda.Event
    assert (torch.Tensor.cuda, torch.nn.Module.cuda, torch.cuda.Event, torch.cuda.synchronize) == original


def test_a_checkpoint_written_on_another_gpu_loads_onto_the_models_device(torchssl_checkout, tmp_path, monkeypatch):
    """TorchSSL's load_model reads a checkpoint whose tensors are tagged cuda:1 (written under --gpus 0 1) onto the
    device its model is on, here the CPU; TorchSSL's own load_model sends them back to cuda:1, which fails where
    that GPU is not visible."""
    torch = pytest.importorskip("torch")
    with torchssl_modules(torchssl_checkout, "models.fixmatch.fixmatch") as (fixmatch,):
        def build(cls):
            torch.manual_seed(0)
            m = cls(lambda num_classes: torch.nn.Linear(3, num_classes), 10, 0.999, 1.0, 0.95, 1.0)
            opt = torch.optim.SGD(m.model.parameters(), lr=0.1, momentum=0.9)
            m.set_optimizer(opt, torch.optim.lr_scheduler.LambdaLR(opt, lambda k: 1.0))
            return m

        saved = build(fixmatch.FixMatch)
        saved.model(torch.ones(2, 3)).sum().backward()
        saved.optimizer.step()  # a momentum buffer in the optimizer state
        path = tmp_path / "latest_model.pth"
        with monkeypatch.context() as m:
            m.setattr(torch.serialization, "location_tag", lambda storage: "cuda:1")  # every tensor from cuda:1
            torch.save({"model": saved.model.state_dict(), "optimizer": saved.optimizer.state_dict(),
                        "scheduler": saved.scheduler.state_dict(), "it": 7,
                        "ema_model": saved.model.state_dict()}, path)
        if torch.cuda.device_count() < 2:
            with pytest.raises(RuntimeError, match="CUDA device"):
                build(fixmatch.FixMatch).load_model(str(path))
        loaded = build(patches.bench_class(fixmatch.FixMatch))
        torch.nn.init.zeros_(loaded.model.weight)
        loaded.load_model(str(path))
        assert loaded.it == 7 and loaded.model.weight.device.type == "cpu"
        assert torch.equal(loaded.model.weight, saved.model.weight)
        assert torch.equal(loaded.ema_model.weight, saved.model.weight)
        momentum = next(iter(loaded.optimizer.state_dict()["state"].values()))["momentum_buffer"]
        assert momentum.device.type == "cpu" and momentum.abs().sum() > 0
        assert torch.load is torch.serialization.load  # the mapping ends with load_model
