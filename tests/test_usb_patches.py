"""USB's patch table, the spec -> USB argument mapping (held to USB's own parser and YAML configs), the import
stand-ins, and the patch pieces run against USB's own classes: the resumed sampler's position, the numpy scalars of
its checkpoints, our data and split in its get_cifar."""
from __future__ import annotations

import argparse
import ast
import dataclasses

import numpy as np
import pytest

from contract.spec import ALGORITHM_DEFAULTS, RunSpec
from harness.plan import preset_values
from third_party.usb import patches, stand_ins
from third_party.usb.entry import (USB_ALGORITHMS, config_differences, config_path, epoch_iters, usb_args)

from usb_fixtures import usb_modules


def spec_of(algorithm: str = "fixmatch", **values) -> RunSpec:
    return RunSpec(**{"impl": "usb", "recipe": "usb", "algorithm": algorithm, "n_labels": 40, "seed": 0,
                      "data_kind": "k", "data_sha256": "a" * 64, "split_sha256": "b" * 64,
                      **ALGORITHM_DEFAULTS[algorithm], **values})


def test_every_patch_is_named_explained_and_applied_only_where_it_belongs():
    names = [p.name for p in patches.PATCHES]
    assert len(names) == len(set(names))
    assert all(len(p.why) > 80 and p.target for p in patches.PATCHES)
    always = ["entry_replaces_main", "import_stand_ins", "our_arrays", "our_split", "resume_mid_epoch",
              "bench_hook", "observe_evaluate", "atomic_checkpoint", "numpy_scalars_in_checkpoint",
              "precision_as_spec"]
    fixmatch = always[:6] + ["observe_fixmatch"] + always[6:]
    assert patches.applied("cuda", "fp32") == fixmatch
    assert patches.applied("cpu", "fp32") == fixmatch + ["cpu_device_shim"]
    assert patches.applied("cuda", "bf16", 0.01, nesterov=False, network=(16, 4)) == fixmatch + [
        "nesterov_as_spec", "network_size_from_spec", "amp_bf16", "bn_momentum"]
    assert patches.applied("cuda", "fp32", network=(28, 8)) == fixmatch
    mixmatch = patches.applied("cpu", "fp32", algorithm="mixmatch")
    assert "observe_mixmatch" in mixmatch and "observe_fixmatch" not in mixmatch
    targets = {p["name"]: p["target"] for p in patches.described(mixmatch, "mixmatch")}
    assert targets["observe_mixmatch"].startswith("semilearn.algorithms.mixmatch.mixmatch.mixup_one_target")
    assert not any("{" in t for t in targets.values())


def test_spec_maps_onto_usb_arguments(tmp_path):
    spec = spec_of(steps=3 * 2**11, eval_every=100, batch_size=32, uratio=5, lr=0.05, momentum=0.8,
                   weight_decay=1e-3, threshold=0.9, lambda_u=2.0, ema_decay=0.99, eval_batch_size=64,
                   precision="bf16", n_labels=250, seed=3)
    a = usb_args(spec, tmp_path, gpu=1, num_workers=2)
    assert (a.num_train_iter, a.epoch, a.num_eval_iter, a.num_labels, a.seed) == (6144, 6, 100, 250, 3)
    assert (a.batch_size, a.uratio, a.eval_batch_size, a.lr, a.momentum, a.weight_decay) == (32, 5, 64, 0.05, 0.8,
                                                                                             1e-3)
    assert (a.p_cutoff, a.ulb_loss_ratio, a.ema_m, a.hard_label, a.amp) == (0.9, 2.0, 0.99, True, True)
    assert (a.net, a.algorithm, a.gpu, a.num_workers, a.save_name) == ("wrn_28_2", "fixmatch", 1, 2, "usb")
    assert a.distributed is False and a.multiprocessing_distributed is False and a.world_size == 1
    m = usb_args(spec_of("mixmatch", mixup_alpha=0.75, temperature=0.4, ramp_up=1 / 64, lambda_u=75.0), tmp_path,
                 None, 1)
    assert (m.mixup_alpha, m.T, m.unsup_warm_up, m.ulb_loss_ratio, m.uratio) == (0.75, 0.4, 1 / 64, 75.0, 1)
    assert not hasattr(m, "p_cutoff") and m.mixup_manifold is False


@pytest.mark.parametrize("steps, per_epoch", [(2**20, 1024), (2**17, 1024), (500, 500), (48, 48), (3, 3),
                                              (3000, 1000), (1031, 1)])
def test_usb_epochs_divide_the_steps(steps, per_epoch):
    assert epoch_iters(steps) == per_epoch and steps % per_epoch == 0


def parser_arguments(source: str) -> set[str]:
    """The dest of every add_argument / SSL_Argument in a file, read off its syntax tree (nothing imported)."""
    names = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Call) and getattr(node.func, "attr", getattr(node.func, "id", "")) in (
                "add_argument", "SSL_Argument"):
            flags = [a.value for a in node.args if isinstance(a, ast.Constant) and isinstance(a.value, str)]
            long = [f for f in flags if f.startswith("--")]
            if long:
                names.add(long[0][2:].replace("-", "_"))
    return names


@pytest.mark.parametrize("algorithm", ["fixmatch", "mixmatch"])
def test_usb_args_are_exactly_what_train_py_parses(algorithm, usb_checkout, tmp_path):
    """Every argument train.py's parser and the algorithm's get_argument define, and no other (but `distributed`,
    which main() adds, and `clip`, which its YAML configs add)."""
    module = USB_ALGORITHMS[algorithm].module.replace(".", "/") + ".py"
    expected = parser_arguments((usb_checkout / "train.py").read_text()) | parser_arguments(
        (usb_checkout / module).read_text())
    got = set(vars(usb_args(spec_of(algorithm), tmp_path, None, 1)))
    assert got - expected == {"distributed", "clip"} and expected <= got


@pytest.mark.parametrize("algorithm", ["fixmatch", "mixmatch"])
@pytest.mark.parametrize("n_labels", [40, 250, 4000])
def test_the_paper_preset_is_usbs_own_config_but_for_the_evaluation_cadence(algorithm, n_labels, usb_checkout,
                                                                          tmp_path):
    """USB's CIFAR-10 YAML config (read with PyYAML) against our arguments for the paper preset: the same in every
    value that defines the computation, except that the paper evaluates every 1,024 steps (USB: every 5,120)."""
    spec = dataclasses.replace(spec_of(algorithm, **preset_values("paper", {}, algorithm)), n_labels=n_labels)
    config = config_path(usb_checkout, spec)
    assert config.name == f"{algorithm}_cifar10_{n_labels}_0.yaml"
    assert config_differences(config, usb_args(spec, tmp_path, None, 1)) == {
        "num_eval_iter": {"usb_config": 5120, "used": 1024}}


def test_stand_ins_import_but_refuse_any_use():
    before = list(stand_ins.used)
    with stand_ins.installed():
        from transformers import BertModel  # noqa: F401
        from transformers.file_utils import PaddingStrategy
        import ruamel.yaml as yaml
        import timm.models.layers.helpers
        from typing import Union

        Union[bool, str, PaddingStrategy]  # as semilearn/datasets/collactors/nlp_collactor.py:40 at import time
        for use, what in [(lambda: BertModel.from_pretrained("x"), "transformers.BertModel"),
                          (lambda: yaml.load("a: 1"), "ruamel.yaml.load"),
                          (lambda: timm.models.layers.helpers.to_2tuple(3), "timm.models.layers.helpers.to_2tuple")]:
            with pytest.raises(ImportError) as err:
                use()
            assert what in str(err.value) and "stand-in" in str(err.value)
        assert len(stand_ins.used) == len(before) + 3
    import sys

    assert not any(n.split(".")[0] in ("transformers", "ruamel", "timm") and getattr(m, "__stand_in__", False)
                   for n, m in sys.modules.items())  # gone afterwards
    del stand_ins.used[len(before):]


def test_positioned_sampler_resumes_usbs_data_order_exactly(usb_checkout):
    """USB's own loaders (get_data_loader, its DistributedSampler seeded by the epoch) over 3 epochs of 4 steps:
    a run stopped after any step k and resumed the way the entry resumes (resume_position after load_model) sees
    exactly the batches of the uninterrupted run, in order, and no more."""
    import torch

    with usb_modules(usb_checkout, "semilearn.core.utils.build", "semilearn.datasets.samplers.sampler") as (
            build, sampler):
        patches.use_positioned_sampler(build, sampler.DistributedSampler)
        args = argparse.Namespace(epoch=3, num_train_iter=12, net="wrn_28_2")
        dataset = torch.utils.data.TensorDataset(torch.arange(10))

        def loaders():
            return {"train_lb": build.get_data_loader(args, dataset, 3, num_workers=0, data_sampler="RandomSampler",
                                                      num_iters=12, num_epochs=3),
                    "train_ulb": build.get_data_loader(args, dataset, 4, num_workers=0, data_sampler="RandomSampler",
                                                       num_iters=12, num_epochs=3)}

        def batches(alg, start_it=0):
            """AlgorithmBase.train()'s loop over its loaders, with DistSamplerSeedHook's set_epoch."""
            out, it = [], start_it
            for epoch in range(alg.start_epoch, 3):
                for d in alg.loader_dict.values():
                    d.sampler.set_epoch(epoch)
                for lb, ulb in zip(alg.loader_dict["train_lb"], alg.loader_dict["train_ulb"]):
                    if it >= 12:
                        break
                    out.append((lb[0].tolist(), ulb[0].tolist()))
                    it += 1
            return out

        whole = batches(argparse.Namespace(start_epoch=0, loader_dict=loaders()))
        assert len(whole) == 12 and whole[0] != whole[4]  # 3 epochs of 4 steps, each epoch its own shuffle
        for k in range(1, 13):
            # USB's load_model after a save at step k (inside epoch (k - 1) // 4): start_epoch = that epoch + 1
            alg = argparse.Namespace(num_iter_per_epoch=4, start_epoch=(k - 1) // 4 + 1, loader_dict=loaders())
            patches.resume_position(alg, k)
            assert whole[:k] + batches(alg, k) == whole, k


def test_usbs_load_model_reads_a_checkpoint_with_numpy_scalars(usb_checkout, tmp_path):
    """Older scikit-learn returns accuracy as a numpy float64, which USB stores as best_eval_acc; torch.load's
    weights_only default refuses it unless allowed (patch numpy_scalars_in_checkpoint)."""
    import torch

    with usb_modules(usb_checkout, "semilearn.core.algorithmbase") as (base,):
        Bench = patches.bench_class(base.AlgorithmBase)
        alg = Bench.__new__(Bench)  # USB's state as load_model reads it, without building data sets
        net = torch.nn.Linear(2, 2)
        opt = torch.optim.SGD(net.parameters(), lr=0.1)
        for name, value in dict(model=net, ema_model=torch.nn.Linear(2, 2), optimizer=opt, scheduler=None,
                                loss_scaler=torch.amp.GradScaler("cpu", enabled=False),
                                print_fn=lambda *a: None).items():
            setattr(alg, name, value)
        path = tmp_path / "ckpt.pth"
        torch.save({"model": net.state_dict(), "ema_model": net.state_dict(), "optimizer": opt.state_dict(),
                    "loss_scaler": {}, "it": 7, "epoch": 1, "best_it": 3, "best_eval_acc": np.float64(0.25)}, path)
        with pytest.raises(Exception, match="[Ww]eights only"):
            base.AlgorithmBase.load_model(alg, str(path))
        alg.load_model(str(path))
        assert alg.it == 7 and alg.best_eval_acc == 0.25 and alg.start_epoch == 1


def test_get_cifar_builds_usbs_datasets_on_our_arrays_and_split(usb_checkout):
    rng = np.random.default_rng(0)
    train = (rng.integers(0, 256, (60, 32, 32, 3), dtype=np.uint8), np.arange(60) % 10)
    test = (rng.integers(0, 256, (20, 32, 32, 3), dtype=np.uint8), np.arange(20) % 10)
    split = np.array([0, 3, 11, 12, 24, 25, 36, 37, 48, 59])
    with usb_modules(usb_checkout, "semilearn.datasets.cv_datasets.cifar") as (cifar,):
        patches.use_our_data(cifar, "cifar10", train, test, split)
        args = argparse.Namespace(img_size=32, crop_ratio=0.875, ulb_num_labels=None, lb_imb_ratio=1,
                                  ulb_imb_ratio=1)
        lb, ulb, ev = cifar.get_cifar(args, "fixmatch", "cifar10", 10, 10, data_dir="/nowhere")
        from third_party.adapter import verify_data

        verify_data("USB", lb, ulb, ev, argparse.Namespace(train_x=train[0], train_y=train[1], test_x=test[0],
                                                           test_y=test[1]), split, np.arange(20))
        item = ulb[5]  # (index, weak view, strong view), ImageNet-normalised tensors
        assert item["idx_ulb"] == 5 and item["x_ulb_w"].shape == item["x_ulb_s"].shape == (3, 32, 32)
        with pytest.raises(ValueError, match="our split serves 10"):
            cifar.get_cifar(args, "fixmatch", "cifar10", 20, 10)


def test_both_adapters_share_one_copy_of_each_common_piece():
    from third_party import adapter, checkout
    from third_party.torchssl import checkout as torchssl_checkout, patches as torchssl_patches

    for name in ("Patch", "cpu_device_shim", "set_bn_momentum", "amp_bf16", "save_atomically",
                 "refuse_non_finite"):
        assert getattr(torchssl_patches, name) is getattr(patches, name) is getattr(adapter, name), name
    for name in ("CheckoutError", "CheckoutModified", "CheckoutNotTrusted", "SourceUnreachable",
                 "PinnedCommitMissing"):
        assert getattr(torchssl_checkout, name) is getattr(checkout, name), name
