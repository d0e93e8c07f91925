"""The speed options change how the network runs, never the method's math."""
import copy

import pytest
import torch

import main as stage2
import super_and
from conftest import NARROW, run_main
from lib.memory_bank import MemoryBank
from lib.neighbourhoods import AnchorNeighbourhoods
from models import MultiHeadNormFC, resnet18


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
        losses = super_and.train_step(net, npc, ans, x, indexes, opt, 0.2, args)
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
        losses = stage2.train_step(net, heads, images, opt, args)
        results.append(torch.cat([losses["head_losses"], torch.stack([losses["loss_assign"], losses["loss_cp"]])]))
    assert torch.allclose(results[0], results[1], rtol=0.05, atol=0.02)
    assert not torch.equal(results[0], results[1])  # autocast really ran
    assert results[1].dtype == torch.float32


def test_gpu_augment_loader_trains_on_cpu(tmp_path):
    """--gpu_augment feeds the same training loop (here on the CPU): epochs, log and checkpoint as usual."""
    run_main(super_and, NARROW + ["--subset", "64", "--batch_size", "16", "--rounds", "1", "--epochs", "1",
                                  "--gpu_augment", "--model_dir", tmp_path])
    import json
    with open(tmp_path / "log_embed.jsonl") as f:
        record = json.loads(f.readline())
    assert record["loss"] == pytest.approx(record["loss_and"] + record["loss_aug"], rel=1e-5)
    assert (tmp_path / "ckpt_embed.t7").exists()
