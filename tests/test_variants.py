"""The first stages of Table 2 (``super_and.py --variant``; docs/method.md, "Stage-1 variants (Table 2)"): each
variant's step is an SGD step on its own losses alone, Lemniscate never has anchors, short runs resume exactly,
and a run is continued only with its own variant."""
import json
import os
from types import SimpleNamespace

import pytest
import torch

import super_and
from conftest import NARROWEST, expect_error, run_main
from lib.checkpoint import load_checkpoint
from lib.errors import InputError
from lib.losses import and_loss, aug_loss, ue_loss
from lib.memory_bank import MemoryBank
from lib.neighbourhoods import AnchorNeighbourhoods
from lib.optim import sgd_optimizer
from models import resnet18

pytestmark = pytest.mark.usefixtures("one_thread")
N, B = 24, 4
TINY = NARROWEST + ["--subset", "32", "--batch_size", "16", "--rounds", "2", "--epochs", "1"]


def fresh_state():
    """A tiny network, a trained-looking bank with 12 anchors (1 neighbour each) and an optimizer."""
    torch.manual_seed(0)
    net = resnet18(low_dim=8, width=2)
    bank = MemoryBank(N, 8)
    bank.memory.copy_(torch.nn.functional.normalize(torch.randn(N, 8), dim=1))
    neighbourhoods = AnchorNeighbourhoods(N, 1)
    neighbourhoods.discover(bank.memory, 0.1, 12)
    optimizer = sgd_optimizer(net, 0.03, 0.9, 5e-4)
    return SimpleNamespace(net=net, model=net, bank=bank, neighbourhoods=neighbourhoods, optimizer=optimizer)


def batch():
    generator = torch.Generator().manual_seed(1)
    images = torch.randn(2 * B, 3, 32, 32, generator=generator)  # view 1 rows, then view 2 rows
    indexes = torch.tensor([3, 0, 17, 9])  # 0, 3, 9 or 17 may be anchors: the anchors are the 12 of lowest entropy
    return images, indexes


def by_hand(variant, weight):
    """One SGD step on only the losses ``variant`` has, written from lib/ and the released step."""
    state = fresh_state()
    images, indexes = batch()
    if variant != "super_and":
        images = images[:B]  # one view
    features = state.net(images)
    logits = state.bank(features)
    neighbours, is_anchor = state.neighbourhoods.lookup(indexes)
    loss = and_loss(logits, indexes, neighbours, is_anchor)
    if variant == "super_and":
        loss = loss + aug_loss(logits, 0.1, 1.0) + weight * ue_loss(logits, indexes)
    state.optimizer.zero_grad()
    loss.backward()
    state.optimizer.step()
    state.bank.update(indexes, features.detach())
    return state, loss


def by_script(variant, weight):
    state = fresh_state()
    images, indexes = batch()
    args = SimpleNamespace(amp=False, batch_t=0.1, batch_m=1.0)
    parts = super_and.train_step(state, images, indexes, weight, args, variant)
    return state, parts


@pytest.mark.parametrize("variant", ["super_and", "and", "lemniscate"])
def test_a_step_is_a_step_on_the_variants_losses_alone(variant):
    """Bit for bit: the network, the bank and the loss after one step equal a step on the variant's own losses
    (so the losses that are off give the network no gradient), and only Super-AND computes AUG and UE."""
    weight = 0.2  # UE on, so that Super-AND's step has all three losses
    state, parts = by_script(variant, weight)
    expected, loss = by_hand(variant, weight)
    for (name, got), want in zip(state.net.state_dict().items(), expected.net.state_dict().values()):
        assert torch.equal(got, want), name
    assert torch.equal(state.bank.memory, expected.bank.memory)
    assert torch.equal(parts["loss"], loss.detach())
    assert set(parts) == ({"loss", "loss_and", "loss_aug", "loss_ue"} if variant == "super_and"
                          else {"loss", "loss_and"})
    if variant != "super_and":  # not the same step as Super-AND's: the test above can fail
        other, _ = by_script("super_and", weight)
        assert not torch.equal(other.net.linear.weight, state.net.linear.weight)


def test_the_batch_mixes_anchors_and_one_view_writes_view_1_to_the_bank():
    """The step test's batch has anchors and instances; AND's step updates the bank from view 1's features
    (the network's before the step: the update follows the backward pass but uses the forward's features)."""
    state = fresh_state()
    images, indexes = batch()
    assert 0 < int(state.neighbourhoods.lookup(indexes)[1].sum()) < B
    view1, view2 = (fresh_state().net(images[i * B:(i + 1) * B]).detach() for i in (0, 1))
    before = state.bank.memory[indexes].clone()
    super_and.train_step(state, images, indexes, None, SimpleNamespace(amp=False), "and")
    assert torch.equal(state.bank.memory[indexes], torch.nn.functional.normalize(before * 0.5 + view1 * 0.5, dim=1))
    assert not torch.allclose(state.bank.memory[indexes], torch.nn.functional.normalize(before + view2, dim=1))


# ---- short runs ----

def read_log(directory):
    with open(os.path.join(directory, "log_embed.jsonl")) as f:
        return [json.loads(line) for line in f]


def interrupted_after_first_epoch(monkeypatch, args):
    """Run ``args`` and stop it (Ctrl-C) right after its first epoch's checkpoint and log line."""
    real = super_and.train_and_save

    def stop(*a, **k):
        real(*a, **k)
        raise KeyboardInterrupt

    monkeypatch.setattr(super_and, "train_and_save", stop)
    with pytest.raises(SystemExit) as exit_info:
        run_main(super_and, args)
    assert exit_info.value.code == 130
    monkeypatch.setattr(super_and, "train_and_save", real)


@pytest.mark.slow
@pytest.mark.parametrize("variant", ["and", "lemniscate"])
def test_short_run_of_each_variant_logs_its_losses_and_resumes_exactly(variant, tmp_path, monkeypatch, capsys):
    """Two rounds of one epoch: the log's off losses are null and its loss is the AND loss; AND discovers
    floor(32 · 0.25) = 8 anchors in round 1, Lemniscate none; stopped after round 0 and resumed, the run ends
    bit-equal to the uninterrupted one. (Super-AND's exact resume: tests/test_super_and.py.)"""
    flags = TINY + ["--variant", variant]
    discoveries, discover = [], AnchorNeighbourhoods.discover
    monkeypatch.setattr(AnchorNeighbourhoods, "discover", lambda *a, **k: discoveries.append(1) or discover(*a, **k))
    run_main(super_and, flags + ["--model_dir", tmp_path / "whole"])
    assert len(discoveries) == (1 if variant == "and" else 0)  # Lemniscate: never
    records = read_log(tmp_path / "whole")
    assert [r["anchors"] for r in records] == ([0, 8] if variant == "and" else [0, 0])
    for r in records:
        assert r["loss_aug"] is None and r["loss_ue"] is None and r["ue_weight"] is None
        assert r["loss"] == r["loss_and"] > 0
    whole = load_checkpoint(tmp_path / "whole" / "ckpt_embed.t7")
    assert whole["args"]["variant"] == variant
    assert len(whole["ANs_discovery"]["anchor_indexes"]) == (8 if variant == "and" else 0)
    assert ("round 1: 8 anchors" in capsys.readouterr().out) == (variant == "and")

    cut = tmp_path / "cut"
    interrupted_after_first_epoch(monkeypatch, flags + ["--model_dir", cut])
    assert "interrupted: resume" in capsys.readouterr().err
    assert load_checkpoint(cut / "ckpt_embed.t7")["next"] == {"round": 1, "epoch": 0}
    run_main(super_and, flags + ["--model_dir", cut, "--resume", "ckpt_embed.t7"])
    resumed = load_checkpoint(cut / "ckpt_embed.t7")
    assert all(torch.equal(whole["net"][k], resumed["net"][k]) for k in whole["net"])
    assert torch.equal(whole["npc"]["memory"], resumed["npc"]["memory"])
    assert all(torch.equal(whole["ANs_discovery"][k], resumed["ANs_discovery"][k]) for k in whole["ANs_discovery"])
    assert [r["loss"] for r in read_log(cut)] == [r["loss"] for r in records]

    # a run is continued with its own variant only; one error line, nothing written
    other = "lemniscate" if variant == "and" else "super_and"
    before = (cut / "ckpt_embed.t7").read_bytes()
    expect_error(capsys, super_and, TINY + ["--variant", other, "--model_dir", cut, "--resume", "ckpt_embed.t7"],
                 f"--variant {variant}", other)
    assert (cut / "ckpt_embed.t7").read_bytes() == before


def test_help_names_each_variant_and_what_it_turns_on():
    text = " ".join(super_and.get_args_parser().format_help().split())
    assert "--variant {super_and,and,lemniscate}" in text
    for variant, what in super_and.VARIANTS.items():
        assert f"{variant}: {' '.join(what.split())}" in text
    assert "AUG and UE" in super_and.VARIANTS["super_and"] and "no anchors" in super_and.VARIANTS["lemniscate"]
    assert super_and.get_args_parser().parse_args([]).variant == "super_and"


def test_lemniscate_skips_the_anchor_flags_checks():
    """Lemniscate has no anchors: --ANs_select_rate x (rounds - 1) > 1 is no error there, and is elsewhere."""
    args = super_and.get_args_parser().parse_args(["--rounds", "6", "--variant", "lemniscate"])
    super_and.check_flags(args, 1000)
    args.variant = "and"
    with pytest.raises(InputError, match="ANs_select_rate"):
        super_and.check_flags(args, 1000)


# ---- one view under torchrun ----

def _one_view_worker(rank, world, port, out_dir):
    """Process ``rank`` of ``world``: AND's step on its share of the batch (its b images, both views as the
    loader gives them), the network in evaluation mode so that BatchNorm does not depend on the shares."""
    from engine import distributed
    os.environ.update(distributed.launch_environment(rank, world, port), OMP_NUM_THREADS="1")
    torch.set_num_threads(1)
    distributed.init("cpu")
    state = fresh_state()
    state.net.eval()
    state.net, state.model = distributed.speed_options(state.net)
    images, indexes = batch()
    b = B // world
    local = torch.cat([images[rank * b:(rank + 1) * b], images[B + rank * b:B + (rank + 1) * b]])
    parts = super_and.train_step(state, local, indexes[rank * b:(rank + 1) * b], None, SimpleNamespace(amp=False),
                                 "and")
    torch.save({"net": state.net.state_dict(), "memory": state.bank.memory, "loss": parts["loss"]},
               os.path.join(out_dir, f"rank{rank}.pt"))
    distributed.cleanup()


@pytest.mark.slow
def test_one_view_step_in_two_processes_is_the_one_process_step(tmp_path):
    """AND's one-view rows gathered from two processes (rank order, as the indexes): the same loss, bank
    update and weights as one process on the whole batch, to float32 rounding."""
    import multiprocessing
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    context = multiprocessing.get_context("fork")
    procs = [context.Process(target=_one_view_worker, args=(rank, 2, port, str(tmp_path))) for rank in range(2)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(240)
    assert [p.exitcode for p in procs] == [0, 0]
    one = fresh_state()
    one.net.eval()
    images, indexes = batch()
    parts = super_and.train_step(one, images, indexes, None, SimpleNamespace(amp=False), "and")
    for rank in range(2):
        got = torch.load(tmp_path / f"rank{rank}.pt", weights_only=True)
        torch.testing.assert_close(got["loss"], parts["loss"], rtol=1e-6, atol=0)
        torch.testing.assert_close(got["memory"], one.bank.memory, rtol=1e-5, atol=1e-6)
        for name, value in one.net.state_dict().items():
            torch.testing.assert_close(got["net"][name], value, rtol=1e-5, atol=1e-6, msg=name)
