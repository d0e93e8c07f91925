"""The speed options change how the network runs, never the method's math; each one really takes effect.

One step of each stage with and without an option (fast), then tiny runs of both scripts with each option
(slow): the device-side augmentation is the loader that trains, the network runs channels-last or compiled,
and the checkpoints load into a plain network. ``torch.compile`` is run with its ``eager`` backend (the
wrapping, the saved names); the real compiler (inductor) takes minutes on a CPU and runs with TEST_COMPILE=1.
Tests marked ``cuda`` run where PyTorch sees a GPU and are skipped elsewhere.
"""
import copy
import functools
import json
import os
from types import SimpleNamespace

import pytest
import torch

import datasets
import main as stage2
import super_and
from conftest import NARROW, run_main
from lib.checkpoint import load_checkpoint, load_network
from lib.memory_bank import MemoryBank
from lib.neighbourhoods import AnchorNeighbourhoods
from models import MultiHeadNormFC, resnet18

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny tensors: one thread, no waiting on a second
TINY = NARROW + ["--subset", "32", "--batch_size", "16", "--epochs", "1"]  # 2 steps per epoch
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def stage1_parts(args):
    torch.manual_seed(0)
    net = resnet18(low_dim=32, width=8)
    npc = MemoryBank(40, 32)
    ans = AnchorNeighbourhoods(40, 1)
    ans.discover(npc.memory, 0.1, 10)
    opt = torch.optim.SGD([p for p in net.parameters() if p.requires_grad], lr=0.03, momentum=0.9, nesterov=True)
    return net, npc, ans, opt


def parse(module, extra):
    return module.get_args_parser().parse_args(NARROW + extra)


@pytest.mark.parametrize("option", ["--channels_last", "--amp"])
def test_stage1_step_with_option_matches_plain(option):
    images = torch.randn(16, 3, 32, 32)
    indexes = torch.arange(8) * 5
    results = []
    for extra in ([], [option]):
        args = parse(super_and, extra)
        net, npc, ans, opt = stage1_parts(args)
        x = images
        if args.channels_last:
            net = net.to(memory_format=torch.channels_last)
            x = images.contiguous(memory_format=torch.channels_last)
        state = SimpleNamespace(model=net, bank=npc, neighbourhoods=ans, optimizer=opt)
        losses = super_and.train_step(state, x, indexes, 0.2, args)
        results.append((torch.stack(list(losses.values())), npc.memory.clone(), copy.deepcopy(net.state_dict())))
    (plain, mem_plain, net_plain), (fast, mem_fast, net_fast) = results
    if option == "--channels_last":  # the same arithmetic in another layout
        assert torch.allclose(plain, fast, rtol=1e-4, atol=1e-5)
        assert torch.allclose(mem_plain, mem_fast, atol=1e-5)
        assert torch.allclose(net_plain["linear.weight"], net_fast["linear.weight"], atol=1e-5)
    else:  # bfloat16 network, float32 losses: close, not equal
        assert torch.allclose(plain, fast, rtol=0.05)
        assert mem_fast.dtype == torch.float32
        assert not torch.equal(plain, fast)  # autocast really ran
    assert torch.isfinite(fast).all()


def test_stage2_step_with_amp_matches_plain():
    images = torch.randn(16, 3, 32, 32)
    results = []
    for extra in ([], ["--amp"]):
        args = parse(stage2, extra)
        torch.manual_seed(0)
        net = resnet18(low_dim=32, width=8)
        heads = MultiHeadNormFC(32, 10)
        opt = torch.optim.SGD([p for p in net.parameters() if p.requires_grad], lr=0.01, momentum=0.9)
        losses = stage2.train_step(SimpleNamespace(model=net, heads=heads, optimizer=opt), images, args)
        results.append(torch.cat([losses["head_losses"], torch.stack([losses["loss_assign"], losses["loss_cp"]])]))
    assert torch.allclose(results[0], results[1], rtol=0.05, atol=0.02)
    assert not torch.equal(results[0], results[1])  # autocast really ran
    assert results[1].dtype == torch.float32


# ---- whole runs of both scripts ----

def read_log(path):
    with open(path) as f:
        return [json.loads(line) for line in f]


def run_both(folder, extra):
    """Stage 1 (one round, one epoch) and stage 2 from it (one epoch), both with ``extra`` flags."""
    run_main(super_and, TINY + extra + ["--rounds", "1", "--model_dir", folder / "s1"])
    run_main(stage2, TINY + extra + ["--resume", folder / "s1" / "ckpt_embed.t7", "--model_dir", folder / "s2"])
    return load_checkpoint(folder / "s1" / "ckpt_embed.t7"), load_checkpoint(folder / "s2" / "ckpt_ul.t7")


def spy_steps(monkeypatch, look):
    """``look(network, images)`` at every training step of both scripts; returns what it gave, in order."""
    seen = []
    for module in (super_and, stage2):  # train_step(state, images, ...)
        def step(state, images, *args, real=module.train_step):
            seen.append(look(state.model, images))
            return real(state, images, *args)
        monkeypatch.setattr(module, "train_step", step)
    return seen


def loads_into_plain_network(ckpt):
    net = resnet18(low_dim=32, width=8)
    load_network(net, ckpt["net"], "checkpoint")  # exact keys and shapes, no '_orig_mod.' prefix
    return net


@pytest.fixture
def gpu_loaders(monkeypatch):
    """Every GpuTwoViewLoader the scripts build, with the batches it yielded; and the ``train`` flag of every
    DataLoader they build (the PIL pipeline's training loader must not be one of them)."""
    from datasets import gpu_augment
    built, loader_kinds = [], []

    class Spy(gpu_augment.GpuTwoViewLoader):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            self.batches = 0
            built.append(self)

        def __iter__(self):
            for batch in super().__iter__():
                self.batches += 1
                yield batch

    real_make_loader = datasets.make_loader

    def make_loader(dataset, batch_size, train, *args, **kwargs):
        loader_kinds.append(train)
        return real_make_loader(dataset, batch_size, train, *args, **kwargs)

    monkeypatch.setattr(gpu_augment, "GpuTwoViewLoader", Spy)
    monkeypatch.setattr(datasets, "make_loader", make_loader)  # the scripts' evaluation loaders
    monkeypatch.setattr(datasets.loaders, "make_loader", make_loader)  # and the training loaders built inside
    return built, loader_kinds


@pytest.mark.slow
def test_gpu_augment_is_the_training_loader_of_both_stages(tmp_path, gpu_loaders):
    built, loader_kinds = gpu_loaders
    run_both(tmp_path, ["--gpu_augment"])
    assert [(loader.device.type, loader.batches) for loader in built] == [("cpu", 2), ("cpu", 2)]  # one per stage
    assert True not in loader_kinds  # evaluation loaders only
    (record,) = read_log(tmp_path / "s1" / "log_embed.jsonl")
    assert record["loss"] == pytest.approx(record["loss_and"] + record["loss_aug"], rel=1e-5)
    assert len(read_log(tmp_path / "s2" / "log_ul.jsonl")) == 1


@pytest.mark.slow
def test_channels_last_runs_both_stages(tmp_path, monkeypatch):
    layout = spy_steps(monkeypatch, lambda net, images: (
        images.is_contiguous(memory_format=torch.channels_last),
        net.conv1.weight.is_contiguous(memory_format=torch.channels_last)))
    for ckpt in run_both(tmp_path, ["--channels_last"]):
        loads_into_plain_network(ckpt)
    assert layout == [(True, True)] * 4  # 2 steps of each stage


@pytest.mark.slow
@pytest.mark.parametrize("backend", [
    "eager",
    pytest.param("inductor", marks=pytest.mark.skipif(not os.environ.get("TEST_COMPILE"),
                                                      reason="minutes on a CPU; TEST_COMPILE=1 runs it")),
])
def test_compile_runs_both_stages(tmp_path, monkeypatch, backend):
    monkeypatch.setattr(torch, "compile", functools.partial(torch.compile, backend=backend))
    compiled = spy_steps(monkeypatch, lambda net, images: hasattr(net, "_orig_mod"))  # torch's compiled wrapper
    try:
        s1, s2 = run_both(tmp_path, ["--compile"])
    finally:
        torch._dynamo.reset()
    assert compiled == [True] * 4
    for ckpt in (s1, s2):
        assert not any(key.startswith("_orig_mod.") for key in ckpt["net"])
        loads_into_plain_network(ckpt)


@pytest.mark.slow
@pytest.mark.cuda
@needs_cuda
def test_cuda_step_of_both_stages_with_amp_and_gpu_augment(tmp_path, monkeypatch, gpu_loaders):
    built, loader_kinds = gpu_loaders
    outputs = []

    def look(net, images):
        def hook(module, inputs, out):
            outputs.append((out.dtype, out.device.type))
            handle.remove()
        handle = net.linear.register_forward_hook(hook)  # the step's forward pass only
        return images.device.type

    devices = spy_steps(monkeypatch, look)
    s1, s2 = run_both(tmp_path, ["--device", "cuda", "--amp", "--gpu_augment"])
    assert devices == ["cuda"] * 4
    assert outputs == [(torch.bfloat16, "cuda")] * 4  # autocast ran the network in bfloat16
    assert [(loader.device.type, loader.batches) for loader in built] == [("cuda", 2), ("cuda", 2)]
    assert True not in loader_kinds
    assert s1["npc"]["memory"].dtype == torch.float32 and torch.isfinite(s1["npc"]["memory"]).all()
    for folder, name in (("s1", "log_embed.jsonl"), ("s2", "log_ul.jsonl")):
        (record,) = read_log(tmp_path / folder / name)
        assert all(torch.isfinite(torch.tensor(v)).all() for k, v in record.items() if k.startswith("loss"))
    for ckpt in (s1, s2):
        loads_into_plain_network(ckpt)  # saved from the GPU, loaded on the CPU
