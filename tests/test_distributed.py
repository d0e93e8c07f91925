"""Several processes (engine/distributed.py) compute the single-process method: two gloo processes on the CPU
against one process that applies the network to each process's share separately (the same BatchNorm groups).

The step tests (slow: processes of their own) spawn two processes once for all three scripts' steps and the
sharded evaluation; the end-to-end tests (slow) run super_and.py, main.py and semi.py in two processes, kill one
and resume it.
"""
import argparse
import json
import multiprocessing
import os
import shutil
import socket
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import datasets
import main as stage2
import semi
import super_and
from conftest import NARROW, run_main
from datasets import processes
from datasets.gpu_augment import GpuTwoViewLoader
from datasets.sharding import ShardSampler, epoch_order, shard_indexes
from engine import distributed
from engine.cli import run_cli
from engine.distributed import speed_options
from lib.checkpoint import load_checkpoint
from lib.errors import InputError
from lib.memory_bank import MemoryBank
from lib.neighbourhoods import AnchorNeighbourhoods, discover_neighbourhoods
from lib.optim import sgd_optimizer
from lib.protocols import compute_features
from models import MultiHeadNormFC, resnet18

PROCESSES, BATCH, SAMPLES, DIM, WIDTH = 2, 8, 40, 16, 4  # global batch B = 8: b = 4 images per process
STAGE1 = argparse.Namespace(amp=False, batch_t=0.1, batch_m=1.0)
STAGE2 = argparse.Namespace(amp=False, batch_t=0.1, batch_m=1.0, lambda_cp=1.0)


# ---- running functions in several processes ----

def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _enter(rank, world, port):
    """What torchrun gives each process: its rank and the rendezvous in the environment."""
    os.environ.update(distributed.launch_environment(rank, world, port), OMP_NUM_THREADS="1")
    torch.set_num_threads(1)


def _child(fn, rank, world, port, args):
    _enter(rank, world, port)
    fn(rank, *args)


def spawn(fn, *args, world=PROCESSES, timeout=240, method="fork"):
    """Run ``fn(rank, *args)`` in ``world`` processes forked from this one (no second start-up of Python and
    torch: the parent has no process group; a parent that may hold a CUDA context passes method="spawn");
    returns their exit codes."""
    context = multiprocessing.get_context(method)
    port = _free_port()
    procs = [context.Process(target=_child, args=(fn, rank, world, port, args)) for rank in range(world)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout)
        if p.is_alive():
            p.kill()
    return [p.exitcode for p in procs]


# ---- one step of each script: two processes against the same global batch in one process ----

class PerProcessShares(nn.Module):
    """``net`` applied to each process's share of a global batch separately, the outputs arranged as the
    gather arranges them: BatchNorm statistics per share, as P processes compute them.
    views=2: rows [view 1 of all B; view 2 of all B], process r's share is its b images in both views."""

    def __init__(self, net, processes, views):
        super().__init__()
        self.net, self.processes, self.views = net, processes, views

    def forward(self, images):
        per_view = images.shape[0] // self.views
        b = per_view // self.processes
        outs = [self.net(torch.cat([images[v * per_view + r * b:v * per_view + (r + 1) * b]
                                    for v in range(self.views)])) for r in range(self.processes)]
        return torch.cat([o[v * b:(v + 1) * b] for v in range(self.views) for o in outs])


def global_batch(device="cpu"):
    g = torch.Generator().manual_seed(1)
    images = torch.randn(2 * BATCH, 3, 32, 32, generator=g)  # (2B, 3, 32, 32): view 1 rows, then view 2 rows
    targets = torch.randint(10, (BATCH,), generator=g)
    return images.to(device), targets.to(device)


def build(device="cpu"):
    """The same network, bank, round-1 anchors and heads in every process (and in the reference)."""
    torch.manual_seed(0)
    net = resnet18(low_dim=DIM, width=WIDTH)
    npc = MemoryBank(SAMPLES, DIM)
    npc.memory.copy_(F.normalize(npc.memory, dim=1))
    ans = AnchorNeighbourhoods(SAMPLES, 1)
    ans.discover(npc.memory, 0.1, SAMPLES // 4)
    heads = MultiHeadNormFC(DIM, 10, 5, 0.1)
    anchors, others = ans.anchor_indexes[:BATCH // 2], ans.instance_indexes[:BATCH // 2]
    indexes = torch.stack([anchors, others], dim=1).reshape(-1)  # (B,): anchors and non-anchors on each process
    return net.to(device), npc.to(device), ans.to(device), heads.to(device), indexes.to(device)


def share(images, rank, world, views):
    """Process ``rank``'s rows of a global batch: its b images in each view."""
    per_view = images.shape[0] // views
    b = per_view // world
    return torch.cat([images[v * per_view + rank * b:v * per_view + (rank + 1) * b] for v in range(views)])


def fresh_network(device="cpu"):
    torch.manual_seed(2)
    net = resnet18(low_dim=DIM, width=WIDTH)
    for module in net.modules():
        if isinstance(module, nn.BatchNorm2d):
            module.running_var.fill_(2.0)  # not the initial values, so that the broadcast is seen
    return net.to(device)


def new_classifier(device="cpu"):
    torch.manual_seed(0)
    return semi.Classifier(resnet18(low_dim=DIM, width=WIDTH), DIM, 10).to(device)


def eval_items(count):
    g = torch.Generator().manual_seed(count)
    return [{"image": torch.randn(3, 32, 32, generator=g), "target": i % 10} for i in range(count)]


def run_steps(model, net, npc, ans, heads, images, targets, indexes, rank, world):
    """Two steps of stage 1, two of stage 2 and one of semi.py on ``model`` (the same network object
    restarted from its initial weights each time); what each left behind."""
    initial = {k: v.clone() for k, v in net.state_dict().items()}
    out = {}
    opt = sgd_optimizer(net, 0.03, 0.9, 5e-4)
    local, local_indexes = share(images, rank, world, 2), indexes[rank * BATCH // world:(rank + 1) * BATCH // world]
    state = SimpleNamespace(model=model, bank=npc, neighbourhoods=ans, heads=heads, optimizer=opt)
    out["stage1_losses"] = [super_and.train_step(state, local, local_indexes, 0.2, STAGE1) for _ in range(2)]
    out["stage1_grads"] = {n: p.grad.clone() for n, p in net.named_parameters() if p.grad is not None}
    out["stage1_params"] = {n: p.detach().clone() for n, p in net.named_parameters()}
    out["memory"] = npc.memory.clone()
    net.load_state_dict(initial)
    opt = sgd_optimizer(net, 0.01, 0.9, 5e-4)
    state.optimizer = opt
    out["stage2_losses"] = [stage2.train_step(state, local, STAGE2) for _ in range(2)]
    out["stage2_grads"] = {n: p.grad.clone() for n, p in net.named_parameters() if p.grad is not None}
    return out


def semi_step(model, classifier, images, targets, rank, world):
    opt = sgd_optimizer(classifier, 0.005, 0.9, 5e-4)
    b = BATCH // world
    loader = [{"image": share(images[:BATCH], rank, world, 1), "target": targets[rank * b:(rank + 1) * b]}]
    state = SimpleNamespace(model=model, net=model, teacher=None, train_loader=loader, unlabelled_loader=None,
                            optimizer=opt, device=images.device, max_weight=0.0)
    loss = semi.train_epoch(state, 0, SimpleNamespace(method="supervised", amp=False, rampup_epochs=0))["loss"]
    return {"semi_loss": loss,
            "semi_grads": {n: p.grad.clone() for n, p in classifier.named_parameters() if p.grad is not None}}


def exact_float32():
    """CUDA: no TF32 in matrix products and convolutions, so that float32 is float32 as on the CPU."""
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False


def _step_worker(rank, out_dir, device_type="cpu", sync_bn=False):
    device = distributed.init(device_type)
    exact_float32()
    net, npc, ans, heads, indexes = build(device)
    images, targets = global_batch(device)
    _, model = speed_options(net, sync_bn=sync_bn)  # DistributedDataParallel for two processes
    out = run_steps(model, net, npc, ans, heads, images, targets, indexes, rank, distributed.world_size())
    classifier = new_classifier(device)
    out.update(semi_step(distributed.wrap(classifier, sync_bn), classifier, images, targets, rank,
                         distributed.world_size()))
    net = fresh_network(device)
    if rank == 1:  # BatchNorm running statistics of its own: evaluation takes rank 0's
        for module in net.modules():
            if isinstance(module, nn.BatchNorm2d):
                module.running_mean.uniform_()
    for count in (30, 5):  # 5 batches (3 on rank 0, 2 on rank 1); one batch (none on rank 1)
        loader = torch.utils.data.DataLoader(eval_items(count), batch_size=7)
        out[f"features_{count}"] = distributed.compute_features_sharded(net, loader, device)
    torch.save(out, os.path.join(out_dir, f"rank{rank}.pt"))  # (tensors on the device: load with map_location)
    distributed.cleanup()


@pytest.fixture(scope="module")
def two_processes(tmp_path_factory):
    out = tmp_path_factory.mktemp("steps")
    assert spawn(_step_worker, str(out)) == [0] * PROCESSES
    return [torch.load(out / f"rank{r}.pt", weights_only=True) for r in range(PROCESSES)]


def reference(device="cpu", per_process_batchnorm=True):
    """The same global batch in one process, the network applied to each process's share separately (or,
    as synchronized BatchNorm has it, to the whole batch at once)."""
    device = torch.device(device)
    exact_float32()
    net, npc, ans, heads, indexes = build(device)
    images, targets = global_batch(device)
    classifier = new_classifier(device)
    model, model_c = net, classifier
    if per_process_batchnorm:
        model, model_c = PerProcessShares(net, PROCESSES, 2), PerProcessShares(classifier, PROCESSES, 1)
    out = run_steps(model, net, npc, ans, heads, images, targets, indexes, 0, 1)
    out.update(semi_step(model_c, classifier, images, targets, 0, 1))
    net = fresh_network(device)
    for count in (30, 5):
        loader = torch.utils.data.DataLoader(eval_items(count), batch_size=7)
        out[f"features_{count}"] = compute_features(net, loader, device)
    return out


@pytest.fixture(scope="module")
def one_process(one_thread):
    return reference()


def check_against_one_process(first, second, one, rtol=1e-5, exact_features=True):
    """Two processes' outputs (``first``, ``second``: ranks 0 and 1) against the one-process ``reference``."""
    for name in ("stage1_grads", "stage1_params", "stage2_grads", "semi_grads"):
        assert all(torch.equal(first[name][k], second[name][k]) for k in first[name]), name
    assert torch.equal(first["memory"], second["memory"])  # the same bank on every process
    assert_close_dicts(first["stage1_grads"], one["stage1_grads"], rtol)
    assert_close_dicts(first["stage1_params"], one["stage1_params"], rtol)
    torch.testing.assert_close(first["memory"], one["memory"], rtol=rtol, atol=rtol / 10)
    for stage, parts in (("stage1", ("loss", "loss_and", "loss_aug", "loss_ue")),
                         ("stage2", ("loss", "loss_assign", "loss_cp", "head_losses"))):
        for got, want in zip(first[f"{stage}_losses"], one[f"{stage}_losses"]):
            for part in parts:
                torch.testing.assert_close(got[part], want[part], rtol=rtol, atol=0, msg=part)
    assert len(first["stage1_grads"]) == len(one["stage1_grads"]) > 0
    assert_close_dicts(first["stage2_grads"], one["stage2_grads"], rtol)
    assert_close_dicts(first["semi_grads"], one["semi_grads"], rtol)
    assert first["semi_loss"] == pytest.approx(one["semi_loss"], rel=rtol)
    for rank_out in (first, second):
        for count in (30, 5):  # each process its share of the batches, gathered: the one-process features
            got, want = rank_out[f"features_{count}"], one[f"features_{count}"]
            assert torch.equal(got, want) if exact_features else torch.allclose(got, want, rtol=rtol, atol=rtol)


def assert_close_dicts(got, want, rtol=1e-5, atol=1e-6):
    assert set(got) == set(want)
    for key in want:
        scale = want[key].abs().max().item()
        torch.testing.assert_close(got[key], want[key], rtol=rtol, atol=atol * max(scale, 1e-3), msg=key)


@pytest.mark.slow  # two processes of their own
def test_each_scripts_step_and_evaluation_equal_one_process(two_processes, one_process):
    """Gradient (DDP's average), losses, weights after the step and the bank update of two processes are the
    single process's on the same global batch (stage 1, stage 2, semi.py), to float32 rounding; the two
    processes agree exactly; the sharded evaluation gives the one-process features exactly."""
    check_against_one_process(*two_processes, one_process)


# ---- the neighbourhood discovery, split over the processes ----

SPLIT_SAMPLES, SPLIT_BLOCK, SPLIT_ANCHORS, SPLIT_K = 150, 16, 37, 3  # 10 blocks: 55 block pairs; 37 anchors: 18 + 19


def split_bank(dtype, unit=True):
    """A random bank with no ties (unit rows, or norms up to 3 for the shifted entropy) and labels."""
    g = torch.Generator().manual_seed(5)
    memory = F.normalize(torch.randn(SPLIT_SAMPLES, DIM, generator=g, dtype=torch.float64), dim=1)
    if not unit:
        memory = memory * torch.rand(SPLIT_SAMPLES, 1, generator=g, dtype=torch.float64).mul(2.8).add(0.2)
    return memory.to(dtype), torch.randint(10, (SPLIT_SAMPLES,), generator=g)


def _discovery_worker(rank, out_dir):
    from lib import neighbourhoods
    neighbourhoods.BLOCK = SPLIT_BLOCK  # (a forked process: the parent's module is untouched)
    distributed.init("cpu")
    out = {}
    for dtype in (torch.float32, torch.float64):
        for unit in (True, False):
            memory, labels = split_bank(dtype, unit)
            if rank == 1:
                memory = memory + 1  # another bank: rank 0's decides
                memory[0] = float("nan")
            split = AnchorNeighbourhoods(SPLIT_SAMPLES, SPLIT_K)
            consistency = split.discover(memory, 0.1, SPLIT_ANCHORS, labels, collectives=distributed.ProcessGroup())
            out[f"{dtype}_{unit}"] = {**split.state_dict(), "returned": consistency}
    torch.save(out, os.path.join(out_dir, f"rank{rank}.pt"))
    distributed.cleanup()


def test_split_discovery_gives_every_process_the_one_process_anchors(tmp_path, monkeypatch, one_thread):
    """Two processes each compute half the entropy's block pairs and half the anchors' neighbours: both end
    with the same buffers, which are one process's on the same bank (the entropies to float rounding, as the
    sums are added in another order), and the bank used is rank 0's."""
    from lib import neighbourhoods
    assert spawn(_discovery_worker, str(tmp_path)) == [0] * PROCESSES
    first, second = (torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(PROCESSES))
    monkeypatch.setattr(neighbourhoods, "BLOCK", SPLIT_BLOCK)
    for dtype in (torch.float32, torch.float64):
        for unit in (True, False):
            key = f"{dtype}_{unit}"
            memory, labels = split_bank(dtype, unit)
            ans = AnchorNeighbourhoods(SPLIT_SAMPLES, SPLIT_K)
            consistency = ans.discover(memory, 0.1, SPLIT_ANCHORS, labels)
            one = {**ans.state_dict(), "returned": consistency}
            assert set(first[key]) == set(one)
            for name in one:
                assert torch.equal(torch.as_tensor(first[key][name]), torch.as_tensor(second[key][name])), (key, name)
            torch.testing.assert_close(first[key]["entropy"], one["entropy"], rtol=0,
                                       atol=1e-5 if dtype == torch.float32 else 1e-12)
            assert first[key]["entropy"].dtype == dtype
            for name in ("anchor_indexes", "neighbours", "instance_indexes", "position", "consistency"):
                assert torch.equal(first[key][name], one[name]), (key, name)
            assert first[key]["returned"] == one["returned"]
            assert first[key]["neighbours"].shape == (SPLIT_ANCHORS, SPLIT_K)


# ---- the shared shuffle ----

@pytest.mark.parametrize("world", [1, 2, 3, 4])
def test_every_index_once_per_epoch_across_processes(world):
    n, batch = 50, 12
    shares = [shard_indexes(n, batch, r, world, seed=7, epoch=3) for r in range(world)]
    order = epoch_order(n, 7, 3)
    steps = n // batch  # whole global batches only: 2 images left out
    assert all(len(s) == steps * batch // world for s in shares)
    visited = torch.cat(shares)
    assert len(set(visited.tolist())) == steps * batch  # none twice
    assert sorted(visited.tolist()) == sorted(order[:steps * batch].tolist())
    for k in range(steps):  # step k gathered in rank order is the global batch k of the shuffle
        b = batch // world
        gathered = torch.cat([s[k * b:(k + 1) * b] for s in shares])
        assert torch.equal(gathered, order[k * batch:(k + 1) * batch])
    assert not torch.equal(epoch_order(n, 7, 4), order) and torch.equal(epoch_order(n, 7, 3), order)


def test_loaders_shard_the_same_shuffle():
    """The DataLoader's sampler and the device loader take the same indexes for the same process."""
    items = datasets.ImageDataset(torch.zeros(30, 8, 8, 3, dtype=torch.uint8).numpy(), torch.arange(30),
                                  datasets.eval_transform((0.5,) * 3, (0.5,) * 3, 8), mean=(0.5,) * 3,
                                  std=(0.5,) * 3, image_size=8)
    seen = []
    for rank in range(2):
        sampler = ShardSampler(30, 8, rank, 2, seed=5)
        sampler.set_epoch(1)
        plain = torch.utils.data.DataLoader(items, batch_size=4, sampler=sampler, drop_last=True)
        device = GpuTwoViewLoader(items.data, items.targets, 4, (0.5,) * 3, (0.5,) * 3, "cpu", size=8,
                                  sampler=sampler)
        assert len(plain) == len(device) == 3
        got = [b["index"] for b in plain]
        assert all(torch.equal(a, b["index"]) for a, b in zip(got, device))
        seen += torch.cat(got).tolist()
    assert sorted(seen) == sorted(epoch_order(30, 5, 1)[:24].tolist())


def test_batch_must_split_evenly(monkeypatch):
    monkeypatch.setattr(processes, "world_size", lambda: 3)
    assert processes.split_batch(129) == 43
    with pytest.raises(InputError, match="--batch_size 128 .* does not split evenly across 3 processes"):
        processes.split_batch(128)


def test_one_process_is_untouched():
    """Without a launcher every helper hands its input back: the single-process numbers cannot move."""
    x = torch.randn(6, 3, requires_grad=True)
    assert distributed.world_size() == 1 and distributed.is_main()
    assert distributed.gather_views(x) is x and distributed.gather(x) is x and distributed.average(x) is x
    net = nn.Linear(3, 2)
    assert distributed.wrap(net, sync_bn=True) is net
    loader = torch.utils.data.DataLoader(eval_items(3), batch_size=2)
    assert distributed.shard(loader) is loader


# ---- the scripts end to end in two processes (slow) ----

FLAGS = NARROW + ["--subset", "64", "--batch_size", "16", "--device", "cpu"]
STAGE1_FLAGS = FLAGS + ["--rounds", "2", "--epochs", "1"]


def _script_worker(rank, script, argv, dump_dir, stop_after):
    """Run ``script``'s main as one of the processes; after each stage-1 epoch dump this process's bank,
    anchors, weights and the indexes it trained on, and at ``stop_after`` (round, epoch) die as a kill does."""
    module = {"super_and": super_and, "main": stage2, "semi": semi}[script]
    if script == "super_and":
        seen = []
        step, save = super_and.train_step, super_and.train_and_save

        def recording_step(state, images, indexes, *rest):
            seen.append(indexes.clone())
            return step(state, images, indexes, *rest)

        def dumping_save(run, state, epoch, args):
            record = save(run, state, epoch, args)
            torch.save({"memory": state.bank.memory, "ans": state.neighbourhoods.state_dict(),
                        "net": state.net.state_dict(), "indexes": torch.cat(seen)},
                       os.path.join(dump_dir, f"rank{rank}-{state.round}-{epoch}.pt"))
            seen.clear()
            if (state.round, epoch) == stop_after:
                os._exit(137)  # no cleanup, the lock left behind: as SIGKILL leaves the folder
            return record

        super_and.train_step, super_and.train_and_save = recording_step, dumping_save
    run_cli(module.main, module.get_args_parser(), argv)


def run_two(script, argv, dump_dir, stop_after=None):
    os.makedirs(dump_dir, exist_ok=True)
    return spawn(_script_worker, script, [str(a) for a in argv], str(dump_dir), stop_after)


def read_log(path):
    with open(path) as f:
        return [json.loads(line) for line in f]


def same_records(a, b):
    return [{k: v for k, v in r.items() if k != "seconds"} for r in a] == \
        [{k: v for k, v in r.items() if k != "seconds"} for r in b]


@pytest.fixture(scope="module")
def stage1_two(tmp_path_factory):
    out = tmp_path_factory.mktemp("ddp")
    assert run_two("super_and", STAGE1_FLAGS + ["--model_dir", out / "whole"], out / "dumps") == [0, 0]
    return out


@pytest.mark.slow
def test_two_processes_agree_after_every_epoch(stage1_two):
    """Banks, anchors and weights equal on both processes; every index trained on once per epoch."""
    dumps = stage1_two / "dumps"
    for position in ("0-0", "1-0"):
        a, b = (torch.load(dumps / f"rank{r}-{position}.pt", weights_only=True) for r in range(2))
        assert torch.equal(a["memory"], b["memory"])
        assert all(torch.equal(a["ans"][k], b["ans"][k]) for k in a["ans"])
        assert all(torch.equal(a["net"][k], b["net"][k]) for k in a["net"])
        visited = torch.cat([a["indexes"], b["indexes"]]).tolist()
        assert len(visited) == len(set(visited)) == 64  # 4 global batches of 16: all 64 images, once each
    ckpt = load_checkpoint(stage1_two / "whole" / "ckpt_embed.t7")
    assert torch.equal(ckpt["npc"]["memory"], a["memory"])
    assert len(ckpt["ANs_discovery"]["anchor_indexes"]) == 16
    log = read_log(stage1_two / "whole" / "log_embed.jsonl")
    assert [(r["round"], r["epoch"]) for r in log] == [(0, 0), (1, 0)]  # one line per epoch: rank 0 alone
    assert not os.path.exists(stage1_two / "whole" / "run.lock")


@pytest.mark.slow
def test_knn_of_two_processes_is_the_one_process_number(stage1_two, capsys):
    """The sharded evaluation of the last epoch gives the number one process computes from the saved file."""
    whole = stage1_two / "whole"
    top1 = run_main(super_and, FLAGS + ["--test_only", "--resume", whole / "ckpt_embed.t7", "--model_dir", whole])
    assert top1 == read_log(whole / "log_embed.jsonl")[-1]["knn_top1"]


@pytest.mark.slow
def test_killed_two_process_run_resumes_with_one_or_two(stage1_two, tmp_path):
    killed = tmp_path / "killed"
    assert run_two("super_and", STAGE1_FLAGS + ["--model_dir", killed], tmp_path / "d1", stop_after=(0, 0)) == \
        [137, 137]
    assert load_checkpoint(killed / "ckpt_embed.t7")["next"] == {"round": 1, "epoch": 0}
    shutil.copytree(killed, tmp_path / "again")
    # two processes again: the uninterrupted run, exactly (each epoch's streams come from seed, epoch, rank)
    assert run_two("super_and", STAGE1_FLAGS + ["--model_dir", tmp_path / "again", "--resume", "ckpt_embed.t7"],
                   tmp_path / "d2") == [0, 0]
    whole, again = (load_checkpoint(d / "ckpt_embed.t7") for d in (stage1_two / "whole", tmp_path / "again"))
    assert torch.equal(whole["npc"]["memory"], again["npc"]["memory"])
    assert all(torch.equal(whole["net"][k], again["net"][k]) for k in whole["net"])
    assert same_records(read_log(stage1_two / "whole" / "log_embed.jsonl"), read_log(tmp_path / "again" /
                                                                                      "log_embed.jsonl"))
    # one process: round 1 starts from the two processes' bank, with its anchors and the saved weights
    saved = load_checkpoint(killed / "ckpt_embed.t7")
    run_main(super_and, STAGE1_FLAGS + ["--model_dir", killed, "--resume", "ckpt_embed.t7"])
    log = read_log(killed / "log_embed.jsonl")
    assert [(r["round"], r["epoch"]) for r in log] == [(0, 0), (1, 0)]
    assert same_records(log[:1], read_log(stage1_two / "whole" / "log_embed.jsonl")[:1])
    resumed = load_checkpoint(killed / "ckpt_embed.t7")
    anchors, neighbours = discover_neighbourhoods(saved["npc"]["memory"], 0.1, 16, 1)
    assert torch.equal(resumed["ANs_discovery"]["anchor_indexes"], anchors)
    assert torch.equal(resumed["ANs_discovery"]["neighbours"], neighbours)
    assert resumed["next"] == {"round": 2, "epoch": 0}


@pytest.mark.slow
def test_stage2_and_semi_in_two_processes(stage1_two, tmp_path, capsys):
    """main.py and semi.py under two processes: one log line per epoch, rank 0's files, and evaluations that
    one process repeats from the saved files."""
    encoder = stage1_two / "whole" / "ckpt_embed.t7"
    assert run_two("main", FLAGS + ["--epochs", "1", "--resume", encoder, "--model_dir", tmp_path / "s2"],
                   tmp_path / "d") == [0, 0]
    log = read_log(tmp_path / "s2" / "log_ul.jsonl")
    assert len(log) == 1
    with open(tmp_path / "s2" / "eval.json") as f:
        assert json.load(f)["head_acc"] == log[-1]["head_acc"]
    summary = run_main(stage2, FLAGS + ["--test_only", "--resume", tmp_path / "s2" / "ckpt_ul_last.t7",
                                        "--model_dir", tmp_path / "check"])
    assert summary["head_acc"] == log[-1]["head_acc"]  # one process, the same numbers
    # killed after its last checkpoint, before eval.json: resumed, both processes score the checkpoint (the
    # evaluation is collective) and rank 0 writes eval.json again
    written = (tmp_path / "s2" / "eval.json").read_text()
    (tmp_path / "s2" / "eval.json").unlink()
    assert run_two("main", FLAGS + ["--epochs", "1", "--resume", "ckpt_ul_last.t7", "--model_dir", tmp_path / "s2"],
                   tmp_path / "d") == [0, 0]
    assert (tmp_path / "s2" / "eval.json").read_text() == written
    assert run_two("semi", FLAGS + ["--epochs", "1", "--labels_per_class", "4", "--resume", tmp_path / "s2" /
                                    "ckpt_ul.t7", "--model_dir", tmp_path / "semi"], tmp_path / "d") == [0, 0]
    semi_log = read_log(tmp_path / "semi" / "log_semi.jsonl")
    assert len(semi_log) == 1 and os.path.exists(tmp_path / "semi" / "labelled_indexes.json")
