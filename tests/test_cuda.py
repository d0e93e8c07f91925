"""On a CUDA device (skipped where there is none; ``make gpu-check`` runs them): the training steps against
the CPU's, the speed options, the device augmentation, the scripts, and two GPUs against one process."""
import json
import os
import tempfile
from types import SimpleNamespace

import pytest
import torch
from test_distributed import _step_worker, check_against_one_process, exact_float32, reference, spawn

import main as stage2
import semi
import super_and
from conftest import NARROW, run_main
from datasets.gpu_augment import GpuTwoViewLoader, augment, color_jitter, resized_crop, sample_jitter_params
from engine.distributed import speed_options
from lib.memory_bank import MemoryBank
from lib.neighbourhoods import AnchorNeighbourhoods
from lib.optim import sgd_optimizer
from models import MultiHeadNormFC, resnet18

pytestmark = pytest.mark.cuda
CUDA = torch.device("cuda")
MEAN, STD = (0.5, 0.4, 0.3), (0.2, 0.25, 0.3)


@pytest.fixture(autouse=True)
def float32_without_tf32():
    """TF32 off, so that the device's float32 is comparable with the CPU's; restored after."""
    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    exact_float32()
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


def one_step(module, device, flags=(), seed=0):
    """One step of ``module``'s train_step (super_and or main) with a width-8 network, built on the CPU and
    moved to ``device``: (losses, bank or None, weights), all on the CPU."""
    args = module.get_args_parser().parse_args(NARROW + list(flags))
    torch.manual_seed(seed)
    net = resnet18(low_dim=32, width=8)
    npc, ans = MemoryBank(40, 32), AnchorNeighbourhoods(40, 1)
    ans.discover(npc.memory, 0.1, 10)  # on the CPU: the same anchors for both devices
    heads = MultiHeadNormFC(32, 10)
    net, npc, ans, heads = net.to(device), npc.to(device), ans.to(device), heads.to(device)
    net, model = speed_options(net, args.channels_last, args.compile)
    opt = sgd_optimizer(net, 0.03, 0.9, 5e-4)
    images = torch.randn(16, 3, 32, 32, generator=torch.Generator().manual_seed(1)).to(device)
    if args.channels_last:
        images = images.contiguous(memory_format=torch.channels_last)
    state = SimpleNamespace(model=model, bank=npc, neighbourhoods=ans, heads=heads, optimizer=opt)
    if module is super_and:
        losses = super_and.train_step(state, images, (torch.arange(8) * 5).to(device), 0.2, args)
        bank = npc.memory.cpu()
    else:
        losses = stage2.train_step(state, images, args)
        losses.pop("head_losses")
        bank = None
    return (torch.stack(list(losses.values())).cpu(), bank,
            {k: v.cpu() for k, v in net.state_dict().items() if v.is_floating_point()})


@pytest.mark.parametrize("module", [super_and, stage2], ids=["stage1", "stage2"])
def test_training_step_on_cuda_is_the_cpu_step(module):
    (cpu_losses, cpu_bank, cpu_net), (gpu_losses, gpu_bank, gpu_net) = (one_step(module, d) for d in ("cpu", CUDA))
    torch.testing.assert_close(gpu_losses, cpu_losses, rtol=1e-4, atol=1e-5)
    if cpu_bank is not None:
        torch.testing.assert_close(gpu_bank, cpu_bank, rtol=1e-4, atol=1e-5)
    for key in cpu_net:
        torch.testing.assert_close(gpu_net[key], cpu_net[key], rtol=1e-3, atol=1e-4, msg=key)


@pytest.mark.parametrize("flags", [["--channels_last"], ["--compile"], ["--amp"], ["--amp", "--channels_last"]])
def test_speed_options_on_cuda(flags):
    """Layout and compilation leave float32 alone; bfloat16 autocast stays close, and really runs."""
    plain, _, _ = one_step(super_and, CUDA)
    fast, bank, net = one_step(super_and, CUDA, flags)
    assert torch.isfinite(fast).all() and bank.dtype == torch.float32
    if "--amp" in flags:
        torch.testing.assert_close(fast, plain, rtol=0.05, atol=0.02)
        assert not torch.equal(fast, plain)
    else:
        torch.testing.assert_close(fast, plain, rtol=1e-4, atol=1e-5)


def test_device_augmentation_on_cuda_is_the_cpu_arithmetic():
    """With the same parameters, crop-and-resize, colour jitter and the switched-off pipeline give the CPU's
    numbers on the device; a random draw stays on the device with the shapes and ranges it should have."""
    g = torch.Generator().manual_seed(0)
    uint8 = torch.randint(0, 256, (6, 40, 36, 3), dtype=torch.uint8, generator=g)
    off = dict(scale=None, brightness=0, contrast=0, saturation=0, hue=0, grayscale_p=0, flip_p=0)
    on_device, on_host = augment(uint8.to(CUDA), MEAN, STD, 32, **off), augment(uint8, MEAN, STD, 32, **off)
    torch.testing.assert_close(on_device.cpu(), on_host, rtol=0, atol=1e-5)
    img = uint8.permute(0, 3, 1, 2).float() / 255
    top, left = torch.tensor([0, 3, 5, 1, 0, 7]), torch.tensor([2, 0, 4, 1, 9, 0])
    h, w = torch.tensor([40, 20, 31, 12, 25, 33]), torch.tensor([30, 36, 17, 22, 27, 29])
    cpu = resized_crop(img, top, left, h, w, 32)
    gpu = resized_crop(img.to(CUDA), top.to(CUDA), left.to(CUDA), h.to(CUDA), w.to(CUDA), 32)
    torch.testing.assert_close(gpu.cpu(), cpu, rtol=0, atol=1e-5)
    params = sample_jitter_params(6, generator=g)
    moved = {k: None if v is None else v.to(CUDA) for k, v in params.items()}
    jittered = color_jitter(cpu.clamp(0, 1).to(CUDA), moved)
    torch.testing.assert_close(jittered.cpu(), color_jitter(cpu.clamp(0, 1), params), rtol=0, atol=1e-5)
    loader = GpuTwoViewLoader(uint8.numpy(), torch.arange(6), 3, MEAN, STD, CUDA, size=32)
    batches = list(loader)
    assert len(batches) == 2
    for batch in batches:
        assert all(v.device.type == "cuda" for v in batch.values())
        assert batch["view1"].shape == (3, 3, 32, 32) and torch.isfinite(batch["view2"]).all()
        assert torch.equal(batch["target"], batch["index"])
    assert sorted(torch.cat([b["index"] for b in batches]).tolist()) == list(range(6))


def test_three_scripts_on_cuda_with_every_speed_option(tmp_path, capsys):
    fast = ["--device", "cuda", "--amp", "--channels_last", "--gpu_augment", "--subset", "64", "--batch_size", "16"]
    run_main(super_and, NARROW + fast + ["--rounds", "2", "--epochs", "1", "--model_dir", tmp_path / "s1"])
    with open(tmp_path / "s1" / "log_embed.jsonl") as f:
        log = [json.loads(line) for line in f]
    assert [r["anchors"] for r in log] == [0, 16] and all(r["knn_top1"] is not None for r in log)
    run_main(stage2, NARROW + fast + ["--epochs", "1", "--resume", tmp_path / "s1" / "ckpt_embed.t7",
                                      "--model_dir", tmp_path / "s2"])
    assert os.path.exists(tmp_path / "s2" / "eval.json")
    summary = run_main(semi, NARROW + fast[:-2] + ["--batch_size", "8", "--epochs", "1", "--labels_per_class", "2",
                                                   "--resume", tmp_path / "s2" / "ckpt_ul.t7", "--model_dir",
                                                   tmp_path / "semi"])
    assert 0 <= summary["test_acc"] <= 100


@pytest.mark.parametrize("sync_bn", [False, True], ids=["per_process_batchnorm", "sync_bn"])
def test_two_gpus_equal_one_process(sync_bn):
    """NCCL on cuda:0 and cuda:1 against one process on cuda:0: per-process BatchNorm against the network on
    each process's share, --sync_bn against the network on the whole global batch."""
    if torch.cuda.device_count() < 2:
        pytest.skip("needs two GPUs")
    with tempfile.TemporaryDirectory() as out:
        assert spawn(_step_worker, out, "cuda", sync_bn, method="spawn") == [0, 0]
        first, second = (torch.load(os.path.join(out, f"rank{r}.pt"), map_location="cpu", weights_only=True)
                         for r in range(2))
    one = to_cpu(reference(CUDA, per_process_batchnorm=not sync_bn))
    check_against_one_process(first, second, one, rtol=1e-4, exact_features=False)


def to_cpu(value):
    if isinstance(value, dict):
        return {k: to_cpu(v) for k, v in value.items()}
    if isinstance(value, list):
        return [to_cpu(v) for v in value]
    return value.cpu() if torch.is_tensor(value) else value
