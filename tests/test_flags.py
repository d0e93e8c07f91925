"""Every flag that changes the math reaches its call.

One row per flag of super_and.py, main.py, semi.py and joint.py (per non-default choice of a flag of choices:
``method:pi_model``): a non-default value and the quantity it must change, seen on a tiny run (width 4, 8x8
digits, one step per epoch, one thread) through ``main(args)`` as the command line runs it. Each row checks its
quantity against a hand computation at the flag's value where there is one (the losses recomputed with
lib.losses from the step's own features and memory bank, the bank's update, the heads' softmax, the SGD update,
the learning-rate schedule, the anchors and their neighbours, semi.py's losses, ramp-up and teacher, the
clusterings' scores) and shows that the same computation at the default value does not match, or else checks
the quantity against the same run at the defaults (or, ``against``, without the flag). Flags of equal default
value run together at distinct values (``--npc_t 0.07 --batch_t 0.2``), so a swap of the two shows.

What a step saw is recorded by a spy on the script's step (``train_step``; semi.py's ``train_epoch``, one step
each here, and its ``step_losses``): the network's input and output (a forward hook; Mean Teacher's teacher too),
the memory bank before and after, the parameters before and after and their gradients; a spy on
``train_and_save`` keeps the state record and the log records. A run that stops on bad input keeps its exit
status and its standard error instead (the refusals). The runs write no checkpoint (test_lifecycle.py checks the
files) and draw no picture. A flag added to a script without a row here, or a place in ``NOT_MATH`` with its
reason, fails ``test_every_flag_has_a_row``; joint.py's flags that are the stages' own (the same parser entry)
share the stages' rows, and the ones its step combines are tested through it too.

Reading order (the sections below, top to bottom):
1. Observing a run: ``observe(script, flags)`` (a module fixture) runs ``script``'s ``main`` once per distinct
   flag list with the spies of ``spy`` installed and returns an ``Observed``: its steps, log records, state,
   error. The spies replace ``train_step`` / ``train_and_save`` (and main.py's ``cluster_embedding``) for the
   run only, calling the real ones.
2. By hand: the losses, SGD update, bank update, schedules and clusterings recomputed from what a step saw.
3. The rows, one function per flag (or per kind of flag): ``check(run, default)`` gets the run with the flag
   and the run without it (``default``) and asserts what must differ; ``against(flags, check)`` compares
   with the run of ``flags`` instead (the ``baseline`` it sets), ``refuses(...)`` expects one error line.
4. ``table()`` lists every row as (script, flag, flags, check); ``test_flag_changes_its_quantity`` runs each,
   ``test_every_flag_has_a_row`` compares the rows with the scripts' parsers.
To add a flag: write its check in section 3 and its row in ``table()``, or a reason in ``NOT_MATH``.
"""
import contextlib
import io
import math
from dataclasses import dataclass, field
from functools import partial

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import datasets
import joint
import main as stage2
import semi
import super_and
from conftest import run_main
from engine import lifecycle
from engine.system import seed_everything
from lib.losses import and_loss, aug_loss, iic_loss, ue_loss
from models import NETWORKS, MultiHeadNormFC

pytestmark = pytest.mark.usefixtures("one_thread", "no_pictures")

TINY = ["--dataset", "digits", "--width", "4", "--low_dim", "8", "--image_size", "8", "--workers", "0"]
BASE = {  # one step per epoch: the batch is the whole (sub)set, or all the labelled images
    "super_and": TINY + ["--subset", "8", "--batch_size", "8", "--rounds", "1", "--epochs", "1"],
    "main": TINY + ["--subset", "8", "--batch_size", "8", "--epochs", "1"],
    "semi": TINY + ["--subset", "40", "--batch_size", "16", "--labels_per_class", "2", "--epochs", "1"],
    "joint": TINY + ["--subset", "8", "--batch_size", "8", "--rounds", "1", "--epochs", "1"],
}
ROUND_1 = ["--rounds", "2"]  # stage 1 with anchors: round 0, then round 1's discovery and step
MODULES = {"super_and": super_and, "main": stage2, "semi": semi, "joint": joint}
# in a row's flags: the path of a stage-1 file of the run's --network, --low_dim, --width, with no data set
# recorded (STAGE1_FILE), or recorded as trained on CIFAR-10 at 32 pixels (OTHER_STAGE1_FILE: other images)
STAGE1_FILE, OTHER_STAGE1_FILE = "STAGE1_FILE", "OTHER_STAGE1_FILE"
STAGE1_FILES = {STAGE1_FILE: ("stage1", None), OTHER_STAGE1_FILE: ("other", {"dataset": "cifar10", "image_size": 32})}

# The flags that change no number of a run on one CPU process, or that no tiny offline run can show, and why.
NOT_MATH = {
    "all": {
        "model_dir": "where the files go (test_lifecycle.py, test_run_folder.py)",
        "resume": "what the run starts from (the scripts' end-to-end tests); semi.py's starting weights: row 'resume'",
        "test_only": "evaluation only, no training step",
        "data_dir": "where the images are read from (test_sources.py, test_folder.py)",
        "dataset": "other data sets need their files (test_registry.py, test_wiring.py read them)",
        "num_classes": "only an unlabelled --dataset folder takes it (test_folder.py)",
        "workers": "data-loading processes: the same batches (test_loaders.py)",
        "device": "the CPU here (test_cuda.py on a GPU)",
        "compile": "the same numbers, compiled (test_speed_options.py)",
        "sync_bn": "one process: nothing to synchronize (test_distributed.py)",
        "allow_change": "on a resume, the flags that may take new values (test_resume.py)",
    },
    "main": {"export_predictions": "a CSV of the evaluation (test_outputs.py)",
             "kmeans_baseline": "a printed baseline on the raw pixels (test_outputs.py)"},
    "semi": {"from_scratch": "the start without --resume: the base run of this table (row 'resume' is the other)"},
    "joint": {"export_predictions": "a CSV of the evaluation (test_joint.py)",
              "kmeans_baseline": "a printed baseline on the raw pixels (main.py's, test_outputs.py)"},
}


# ------------------------------------------------------------------------------------------- observing a run

@dataclass(repr=False)  # a failed assertion shows the run by this name, not by its tensors
class Observed:
    """What a run did: ``steps`` (one dict per training step, or per epoch for semi.py), the log ``records``,
    the ``state`` record and ``args`` of the last epoch, the weights before the first epoch; for a run
    stopped on bad input, ``error``: (exit status, the lines on standard error), and its ``model_dir``."""
    name: str = ""
    args: object = None
    state: object = None
    records: list = field(default_factory=list)
    steps: list = field(default_factory=list)
    first_weights: dict = None
    error: tuple = None
    model_dir: object = None
    result: object = None  # what ``main`` returned
    clusterings: list = field(default_factory=list)  # main.py --cluster: (features, labels) of each clustering

    def __repr__(self):
        return f"<run {self.name}>"


@contextlib.contextmanager
def watching(model, optimizer, steps):
    """Record one step (or epoch) of ``model`` trained by ``optimizer`` into a dict appended to ``steps``:
    every forward's input and output, the optimizer's learning rate, the parameters before and after and their
    gradients after (each script zeroes them before its backward pass, so they are the step's)."""
    params = [p for group in optimizer.param_groups for p in group["params"]]
    step = {"inputs": [], "outputs": [], "lr": optimizer.param_groups[0]["lr"],
            "params": [p.detach().clone() for p in params]}

    def record(_module, inputs, output):  # returns None: the output stays the network's
        step["inputs"].append(inputs[0].detach())
        step["outputs"].append(output.detach())
    hook = model.register_forward_hook(record)
    try:
        yield step
    finally:
        hook.remove()
    step["after"] = [p.detach().clone() for p in params]
    step["grads"] = [p.grad.detach().clone() for p in params]
    steps.append(step)


def parameters(module):
    return [p.detach().clone() for p in module.parameters()]


def spy_semi(mp, seen):
    """semi.py's spies: each epoch (one step here) as ``watching`` records it, with Mean Teacher's teacher's
    forwards and its parameters before and after, the student's after; each ``step_losses`` call's method,
    weight w(t), labelled and unlabelled batches and losses into the epoch's ``calls``."""
    real_epoch, real_losses, now = semi.train_epoch, semi.step_losses, {}

    def train_epoch(state, epoch, args):
        teacher = state.teacher
        with watching(state.model, state.optimizer, seen.steps) as step:
            now["step"] = step
            step.update(epoch=epoch, calls=[], teacher_outputs=[])
            hook = None
            if teacher is not None:
                step["teacher_before"] = parameters(teacher)
                hook = teacher.register_forward_hook(lambda m, i, out: step["teacher_outputs"].append(out.detach()))
            try:
                step["losses"] = real_epoch(state, epoch, args)
            finally:
                if hook is not None:
                    hook.remove()
        if teacher is not None:
            step.update(teacher_after=parameters(teacher), student_after=parameters(state.net))
        return step["losses"]

    def step_losses(state, labelled, unlabelled, weight, args):
        losses = real_losses(state, labelled, unlabelled, weight, args)
        now["step"]["calls"].append({"method": args.method, "weight": weight, "labelled": labelled,
                                     "unlabelled": unlabelled, "losses": {k: v.detach() for k, v in losses.items()}})
        return losses
    mp.setattr(semi, "train_epoch", train_epoch)
    mp.setattr(semi, "step_losses", step_losses)


def spy(mp, module, seen):
    """Put the spies into ``module``: its step and its epoch function, as its ``main`` calls them."""
    real_epoch = module.train_and_save

    def train_and_save(run, state, epoch, args):
        if seen.first_weights is None:
            seen.first_weights = {k: v.clone() for k, v in state.net.state_dict().items()}
        seen.state, seen.args = state, args
        record = real_epoch(run, state, epoch, args)
        seen.records.append(record)
        return record
    mp.setattr(module, "train_and_save", train_and_save)

    if module is semi:
        spy_semi(mp, seen)
        return
    if module is stage2:
        real_cluster = stage2.cluster_embedding

        def cluster_embedding(features, *args, **kwargs):
            labels, connected = real_cluster(features, *args, **kwargs)
            seen.clusterings.append((features.detach().clone(), labels.copy()))
            return labels, connected
        mp.setattr(stage2, "cluster_embedding", cluster_embedding)

    real_step = module.train_step

    def train_step(state, images, *rest):
        with watching(state.model, state.optimizer, seen.steps) as step:
            step["images"] = images
            if module in (super_and, joint):
                indexes, weight = rest[0], rest[1]
                step.update(round=state.round, indexes=indexes.clone(), weight=weight,
                            memory=state.bank.memory.clone(), lookup=state.neighbourhoods.lookup(indexes))
            losses = real_step(state, images, *rest)
            step["losses"] = {k: v.clone() for k, v in losses.items()}
            if module in (super_and, joint):
                step["memory_after"] = state.bank.memory.clone()
        return losses
    mp.setattr(module, "train_step", train_step)


def write_stage1(path, network, low_dim, width, saved_args=None, num_samples=16):
    """A stage-1 file for main.py and semi.py to start from: a freshly drawn network and a memory bank, and
    ``saved_args`` (the flags it records) where given."""
    torch.manual_seed(0)
    net = NETWORKS[network](low_dim=low_dim, width=width)
    memory = F.normalize(torch.randn(num_samples, low_dim), dim=1)
    saved = {} if saved_args is None else {"args": {**saved_args, "network": network, "low_dim": low_dim,
                                                     "width": width}}
    torch.save({"net": net.state_dict(), "npc": {"memory": memory, "params": torch.tensor([0.1, 0.5])}, **saved},
               path)


@pytest.fixture(scope="module")
def observe(tmp_path_factory):
    """``observe(script, flags)``: the ``Observed`` of a run of ``script`` with its BASE flags and ``flags``,
    each distinct run made once for the module."""
    runs, folder = {}, tmp_path_factory.mktemp("flags")

    def run(script, flags=()):
        key = (script, tuple(flags))
        if key in runs:
            return runs[key]
        module, flags = MODULES[script], list(BASE[script]) + list(flags)
        args = module.get_args_parser().parse_args(flags)
        if script == "main" and "random" not in flags:  # --init random: no file
            flags += ["--resume", STAGE1_FILE]
        if script == "semi" and "--resume" not in flags:
            flags.append("--from_scratch")
        files = {}
        for token, (name, saved_args) in STAGE1_FILES.items():
            files[token] = folder / f"{name}-{args.network}-{args.low_dim}-{args.width}.t7"
            if token in flags and not files[token].exists():
                write_stage1(files[token], args.network, args.low_dim, args.width, saved_args)
        seen = Observed(" ".join(map(str, [script, *key[1]])), model_dir=folder / f"run{len(runs)}")
        flags = [str(files.get(f, f)) for f in flags] + ["--model_dir", seen.model_dir]
        stderr = io.StringIO()
        with pytest.MonkeyPatch.context() as mp, contextlib.redirect_stderr(stderr):
            spy(mp, module, seen)
            mp.setattr(lifecycle, "save_checkpoint", lambda *args, **kwargs: None)  # the files: test_lifecycle.py
            try:
                seen.result = run_main(module, flags)
            except SystemExit as stop:  # a refusal: what the command line would show
                seen.error = (stop.code, stderr.getvalue().strip().splitlines())
        if seen.args is None:  # no epoch ran (--test_only, a refusal): the flags as parsed
            seen.args = module.get_args_parser().parse_args([str(f) for f in flags])
        runs[key] = seen
        return seen
    return run


# ------------------------------------------------------------------------------------------- by hand

def stage1_losses(step, npc_t, batch_t, batch_m):
    """Eq. 1-3 of one stage-1 step from its features and the bank before it: {loss, loss_and, loss_aug,
    loss_ue}, at these τ, T_b, m_b; a step of weight None (AND, Lemniscate: one view) has the AND loss alone."""
    features, indexes = step["outputs"][0].float(), step["indexes"]
    logits = features @ step["memory"].T / npc_t
    neighbours, is_anchor = step["lookup"]
    parts = {"loss_and": and_loss(logits, indexes, neighbours, is_anchor)}
    if step["weight"] is None:
        return {"loss": parts["loss_and"], **parts}
    parts.update(loss_aug=aug_loss(logits, batch_t, batch_m), loss_ue=ue_loss(logits, indexes))
    return {"loss": parts["loss_and"] + parts["loss_aug"] + step["weight"] * parts["loss_ue"], **parts}


def stage2_losses(step, heads, tau_c, head_norm, batch_t, batch_m, lambda_cp):
    """Eq. 9 per head, Eq. 11 and their sum of one stage-2 step from its features and the frozen heads' W:
    softmax(v · Ŵ / τ_c), Ŵ normalized per feature row (released) or per class column (paper), or W as drawn
    (none)."""
    features = step["outputs"][0].float()
    batch = features.shape[0] // 2
    head_losses = []
    for head in heads.heads:
        weight = head.weight if head_norm == "none" else F.normalize(head.weight, dim=1 if head_norm == "released"
                                                                      else 0)
        probs = F.softmax(features @ weight / tau_c, dim=1)
        head_losses.append(iic_loss(probs[:batch], probs[batch:]))
    head_losses = torch.stack(head_losses)
    cp = aug_loss(features, batch_t, batch_m)
    return {"loss": head_losses.mean() + lambda_cp * cp, "loss_assign": head_losses.mean(), "loss_cp": cp,
            "head_losses": head_losses}


def joint_losses(step, heads, npc_t=0.1, tau_c=0.1, batch_t=0.1, batch_m=1.0, lambda_cp=1.0):
    """joint.py's step by hand: stage 1's losses on the bank's logits plus stage 2's on the same features."""
    one = stage1_losses(step, npc_t, batch_t, batch_m)
    two = stage2_losses(step, heads, tau_c, "released", batch_t, batch_m, lambda_cp)
    return {**one, **two, "loss": one["loss"] + two["loss"]}


def ramp(epoch, length):
    """exp(−5 (1 − t)²), t = epoch / length clipped to 1; 1 without a ramp-up."""
    return 1.0 if length == 0 else math.exp(-5 * (1 - min(epoch / length, 1.0)) ** 2)


def semi_losses(step, method, weight):
    """One semi.py step by hand from the network's outputs (and the teacher's): supervised, the mean
    cross-entropy of the labelled rows; the semi-supervised methods, the labelled rows' summed cross-entropy
    over all B rows + w · mean squared difference of the softmax outputs of the two passes (Π-model: the
    network's one output on [view 1; view 2], halved; Mean Teacher: the student's and the teacher's)."""
    logits, labels = step["outputs"][0].float(), step["calls"][0]["labelled"]["target"]
    if method == "pi_model":
        logits, target = logits.chunk(2)
    elif method == "mean_teacher":
        target = step["teacher_outputs"][0].float()
    log_probs = logits.log_softmax(1)
    nll = -log_probs[torch.arange(len(labels)), labels]
    if method == "supervised":
        return {"loss": nll.mean()}
    classification = nll.sum() / len(logits)
    consistency = (log_probs.exp() - target.softmax(1)).pow(2).mean()
    return {"loss": classification + weight * consistency, "class": classification, "consistency": consistency}


def sgd_error(steps, lrs, momentum, weight_decay):
    """How far the steps' parameter updates are from SGD with Nesterov momentum by hand (d = g + wd·p;
    b = d at the first step, then m·b + d; p <- p − lr·(d + m·b)): the largest difference over the largest
    update: float32 rounding gives 1e-7 to 1e-5, another learning rate, momentum or weight decay 3e-3 and more."""
    buffers, worst, largest = None, 0.0, 0.0
    for step, lr in zip(steps, lrs, strict=True):
        d = [g + weight_decay * p for g, p in zip(step["grads"], step["params"])]
        buffers = d if buffers is None else [momentum * b + x for b, x in zip(buffers, d)]
        for before, after, x, b in zip(step["params"], step["after"], d, buffers):
            update = -lr * (x + momentum * b)
            worst = max(worst, ((after - before) - update).abs().max().item())
            largest = max(largest, update.abs().max().item())
    return worst / largest


def entropy(memory, temperature):
    """Entropy of softmax(memory · memoryᵀ / τ) per row, whole matrix at once."""
    z = memory @ memory.T / temperature
    return -(F.softmax(z, dim=1) * F.log_softmax(z, dim=1)).sum(1)


def bank_error(step, momentum):
    """The largest distance of the bank after a step from the update by hand: each image's slot becomes
    normalize(m · slot + (1 − m) · its view-2 feature); the other slots stay."""
    indexes, features = step["indexes"], step["outputs"][0].float()
    written = features[len(indexes):] if len(features) == 2 * len(indexes) else features  # one view: itself
    want = step["memory"].clone()
    want[indexes] = F.normalize(momentum * want[indexes] + (1 - momentum) * written, dim=1)
    return (step["memory_after"] - want).abs().max().item()


def close(record, computed, keys, rel=1e-5):
    """The log record's losses equal the hand computation's."""
    for key in keys:
        assert record[key] == pytest.approx(computed[key].tolist(), rel=rel, abs=1e-6), key


def semi_lr(epoch, lr, start, every):
    return lr if epoch < start else lr * 0.1 ** (1 + (epoch - start) // every)


# ------------------------------------------------------------------------------------------- the rows: stage 1

def s1_temperatures(run, default, npc_t=0.07, batch_t=0.2):
    """τ scales the bank's logits (all three losses, both rounds, and the anchors' entropy), T_b the AUG loss."""
    for step, record in zip(run.steps, run.records, strict=True):
        close(record, stage1_losses(step, npc_t, batch_t, 1.0), ["loss", "loss_and", "loss_aug", "loss_ue"])
        for wrong in ((0.1, 0.1), (batch_t, npc_t), (npc_t, npc_t), (batch_t, batch_t)):
            assert record["loss"] != pytest.approx(stage1_losses(step, *wrong, 1.0)["loss"].item(), rel=1e-3)
    round_start = run.steps[0]["memory_after"]  # the bank round 1's anchors come from
    torch.testing.assert_close(run.state.neighbourhoods.entropy, entropy(round_start, npc_t), rtol=1e-4, atol=1e-5)
    assert not torch.allclose(entropy(round_start, npc_t), entropy(round_start, batch_t), rtol=1e-2)
    assert run.records[0]["loss"] != default.records[0]["loss"]


def s1_npc_m(run, default, npc_m=0.3, batch_m=1.5):
    """m weighs the old slot in the bank's update."""
    for step in run.steps:
        assert bank_error(step, npc_m) < 1e-6
        assert bank_error(step, 0.5) > 1e-3 and bank_error(step, batch_m) > 1e-3


def s1_batch_m(run, default, npc_m=0.3, batch_m=1.5):
    """m_b weighs the AUG loss's negatives."""
    for step, record in zip(run.steps, run.records, strict=True):
        close(record, stage1_losses(step, 0.1, 0.1, batch_m), ["loss", "loss_aug"])
        for wrong in (1.0, npc_m):
            assert record["loss_aug"] != pytest.approx(stage1_losses(step, 0.1, 0.1, wrong)["loss_aug"].item(),
                                                       rel=1e-4)


def s1_select_rate(run, default):
    """floor(N · rate · round) anchors, the lowest-entropy images of the bank at the round's start."""
    assert [r["anchors"] for r in run.records] == [0, 4]  # floor(8 · 0.5 · round), not floor(8 · 0.25 · round)
    lowest = entropy(run.steps[0]["memory_after"], 0.1).topk(4, largest=False).indices
    assert sorted(run.state.neighbourhoods.anchor_indexes.tolist()) == sorted(lowest.tolist())


def s1_ans_size(run, default, k=3):
    """Each anchor's k nearest images by cosine similarity, itself excluded; round 1's AND loss sees them."""
    memory = F.normalize(run.steps[0]["memory_after"], dim=1)
    similarity = (memory @ memory.T).fill_diagonal_(float("-inf"))
    anchors = run.state.neighbourhoods.anchor_indexes
    want = similarity[anchors].topk(k, dim=1).indices
    got = run.state.neighbourhoods.neighbours
    assert got.shape == (2, k) and default.state.neighbourhoods.neighbours.shape[1] == 1
    assert [sorted(row) for row in got.tolist()] == [sorted(row) for row in want.tolist()]
    step, record = run.steps[-1], run.records[-1]
    assert step["lookup"][0].shape[1] == k and step["lookup"][1].any()
    close(record, stage1_losses(step, 0.1, 0.1, 1.0), ["loss_and"])


def s1_variant(variant, anchors):
    """--variant and|lemniscate: the network sees view 1 alone (B rows); the loss is the AND loss by hand
    alone, AUG, UE and w logged as null; the bank takes the one view; AND discovers round 1's anchors,
    Lemniscate none. The default run trains on both views with all three losses."""
    def check(run, default):
        assert [r["anchors"] for r in run.records] == anchors
        assert len(run.state.neighbourhoods.anchor_indexes) == anchors[-1]
        for step, record in zip(run.steps, run.records, strict=True):
            batch = len(step["indexes"])
            assert [x.shape[0] for x in step["inputs"]] == [batch]
            assert torch.equal(step["inputs"][0], step["images"][:batch])
            assert record["loss_aug"] is None and record["loss_ue"] is None and record["ue_weight"] is None
            close(record, stage1_losses(step, 0.1, 0.1, 1.0), ["loss", "loss_and"])
            assert bank_error(step, 0.5) < 1e-6
        assert bool(run.steps[-1]["lookup"][1].any()) == (anchors[-1] > 0)
        assert [x.shape[0] for x in default.steps[0]["inputs"]] == [16]
        assert default.records[0]["loss_aug"] is not None and default.records[0]["loss"] != default.records[0][
            "loss_and"]
    return check


def s1_rounds(run, default):
    assert [(r["round"], r["epoch"]) for r in run.records] == [(0, 0), (1, 0), (2, 0)]
    assert [r["anchors"] for r in run.records] == [0, 2, 4]  # floor(8 · 0.25 · round)
    assert [(r["round"], r["epoch"]) for r in default.records] == [(0, 0)]


def s1_epochs(run, default):
    assert [(r["round"], r["epoch"]) for r in run.records] == [(0, 0), (0, 1)]
    assert [(r["round"], r["epoch"]) for r in default.records] == [(0, 0)]


# ------------------------------------------------------------------------------------------- the rows: stage 2

def s2_loss_row(wrong, tau_c=0.1, head_norm="released", batch_t=0.1, batch_m=1.0, lambda_cp=1.0):
    """The logged head losses, assignment, consistency and total loss equal Eq. 9 / Eq. 11 by hand at the
    flags' values, and differ from the same computation with ``wrong`` (one flag at another value)."""
    values = dict(tau_c=tau_c, head_norm=head_norm, batch_t=batch_t, batch_m=batch_m, lambda_cp=lambda_cp)
    name = "loss" if "lambda_cp" in wrong else "loss_cp" if {"batch_t", "batch_m"} & set(wrong) else "loss_assign"

    def check(run, default):
        for step, record in zip(run.steps, run.records, strict=True):
            close(record, stage2_losses(step, run.state.heads, **values),
                  ["loss", "loss_assign", "loss_cp", "head_losses"])
            other = stage2_losses(step, run.state.heads, **{**values, **wrong})
            assert record[name] != pytest.approx(other[name].item(), rel=1e-3), name
        assert run.records[0]["loss"] != default.records[0]["loss"]
    return check


def s2_num_heads(run, default):
    assert len(run.state.heads.heads) == 3 and len(run.records[0]["head_losses"]) == 3
    assert len(default.records[0]["head_losses"]) == 5
    close(run.records[0], stage2_losses(run.steps[0], run.state.heads, 0.1, "released", 0.1, 1.0, 1.0),
          ["head_losses", "loss"])


def s2_init(run, default):
    """--init random (no --resume): the network is the one drawn under the seed, then the heads drawn after
    it, not the stage-1 file's (the default run's start); the step's losses are Eq. 9 / 11 by hand."""
    seed_everything(run.args.seed)
    drawn = NETWORKS[run.args.network](low_dim=8, width=4).state_dict()
    heads = MultiHeadNormFC(8, 10, 5, 0.1, "released").state_dict()
    assert run.first_weights.keys() == drawn.keys()
    assert all(torch.equal(run.first_weights[k], v) for k, v in drawn.items())
    assert all(torch.equal(run.state.heads.state_dict()[k], v) for k, v in heads.items())  # frozen: as drawn
    start = torch.load(default.args.resume, weights_only=True)["net"]
    assert all(torch.equal(default.first_weights[k], v) for k, v in start.items())
    assert not torch.equal(start["conv1.weight"], drawn["conv1.weight"])
    close(run.records[0], stage2_losses(run.steps[0], run.state.heads, 0.1, "released", 0.1, 1.0, 1.0),
          ["loss", "head_losses"])


def hungarian_accuracy(labels, targets, classes=10):
    """The share of images whose cluster is matched to their class, the one-to-one matching of most hits."""
    from scipy.optimize import linear_sum_assignment
    hits = np.zeros((classes, classes), dtype=np.int64)
    np.add.at(hits, (labels, targets), 1)
    rows, cols = linear_sum_assignment(-hits)
    return hits[rows, cols].sum() / len(labels)


def s2_cluster(method):
    """--test_only --cluster METHOD on the stage-1 file: one clustering of the embedding of the evaluation
    images, scikit-learn's METHOD's (k-means: 10 starts from the seed; agglomerative: Ward), scored by hand
    (Hungarian ACC, NMI, ARI, in %); no training step. The same command without --cluster is refused in one
    line (a stage-1 file has no heads to evaluate)."""
    from sklearn.cluster import AgglomerativeClustering, KMeans
    from sklearn.metrics import adjusted_rand_score, normalized_mutual_info_score

    def check(run, default):
        (features, labels), = run.clusterings
        assert features.shape == (12, 8) and not run.steps and not run.records
        x = features.double().numpy()
        model = (KMeans(10, n_init=10, random_state=run.args.seed % 2**32) if method == "kmeans"
                 else AgglomerativeClustering(10, linkage="ward"))
        assert labels.tolist() == model.fit_predict(x).tolist()
        targets = np.asarray(datasets.from_args(run.args, "train").targets)
        summary = run.result
        assert summary["method"] == method and summary["images"] == len(targets) == 12
        assert summary["acc"] == pytest.approx(100 * hungarian_accuracy(labels, targets), rel=1e-12)
        assert summary["nmi"] == pytest.approx(100 * normalized_mutual_info_score(targets, labels), rel=1e-9)
        assert summary["ari"] == pytest.approx(100 * adjusted_rand_score(targets, labels), rel=1e-9, abs=1e-9)
        code, lines = default.error  # without --cluster a stage-1 file has no heads to evaluate
        assert code == 2 and len(lines) == 1 and "stage-1" in lines[0] and not default.clusterings, lines
    return check


def s2_epochs(run, default):
    assert [r["epoch"] for r in run.records] == [0, 1] and [r["epoch"] for r in default.records] == [0]


# ------------------------------------------------------------------------------------------- the rows: joint.py

def joint_row(wrong):
    """joint.py's step: every logged loss equals stage 1's + stage 2's by hand at the run's JOINT values,
    τ for the bank's logits and round 1's anchors, τ_c for the heads, T_b and m_b for both AUG losses (on the
    logits and on the features), λ for the second; each of ``wrong`` (a flag at another value) misses."""
    values = dict(npc_t=0.07, tau_c=0.2, batch_t=0.15, batch_m=1.5, lambda_cp=0.3)

    def check(run, default):
        assert [r["anchors"] for r in run.records] == [0, 2]
        for step, record in zip(run.steps, run.records, strict=True):
            close(record, joint_losses(step, run.state.heads, **values),
                  ["loss", "loss_and", "loss_aug", "loss_ue", "loss_assign", "loss_cp", "head_losses"])
            for other in wrong:
                assert record["loss"] != pytest.approx(
                    joint_losses(step, run.state.heads, **{**values, **other})["loss"].item(), rel=1e-4), other
        round_start = run.steps[0]["memory_after"]
        torch.testing.assert_close(run.state.neighbourhoods.entropy, entropy(round_start, 0.07), rtol=1e-4,
                                   atol=1e-5)
        assert run.records[0]["loss"] != default.records[0]["loss"]
    return check


# ------------------------------------------------------------------------------------------- the rows: semi.py

def semi_labels_per_class(run, default):
    """K labelled images of each class, by the training split's labels."""
    targets = run.state.train_loader.dataset.dataset.targets
    assert torch.bincount(targets[run.state.labelled], minlength=10).tolist() == [3] * 10
    assert len(default.state.labelled) == 20


def semi_decay(run, default, start=1, every=2, epochs=4):
    """--lr_decay_start, --lr_decay_every: each epoch's learning rate (log and optimizer) is the schedule's
    by hand, lr x 0.1 at ``start`` and every ``every`` epochs after, and not the default schedule's (80, 40),
    the one with either left at its default, nor the one with the two swapped; the updates are SGD's at it."""
    want = [semi_lr(e, 0.005, start, every) for e in range(epochs)]
    assert [r["lr"] for r in run.records] == pytest.approx(want, rel=1e-12)
    assert [s["lr"] for s in run.steps] == pytest.approx(want, rel=1e-12)
    for other in ((80, 40), (every, start), (start, 40), (80, every)):
        assert [r["lr"] for r in run.records] != pytest.approx([semi_lr(e, 0.005, *other) for e in range(epochs)])
    assert sgd_error(run.steps, want, 0.9, 5e-4) < 1e-4


def semi_resume(run, default):
    """--resume STAGE1: the encoder starts from the file's weights (--from_scratch: from the seed's)."""
    start = torch.load(run.args.resume, weights_only=True)["net"]
    weights = {k[len("encoder."):]: v for k, v in run.first_weights.items() if k.startswith("encoder.")}
    assert set(weights) == set(start) and all(torch.equal(weights[k], v) for k, v in start.items())
    assert not torch.equal(default.first_weights["encoder.conv1.weight"], start["conv1.weight"])


def semi_epochs(run, default):
    assert [r["epoch"] for r in run.records] == [0, 1] and len(run.steps) == 2 and len(default.steps) == 1


def schedule_scale_row(script):
    """--schedule_scale 0.0125 over 3 epochs: the released steps at 80 and every 40 epochs become 1 and 1, so
    the learning rate (log and optimizer) is lr, lr, lr x 0.1 and (stage 1) the UE weight 0, 0.2, 0.4, where
    the default keeps lr and a UE weight of 0."""
    def check(run, default):
        base = {"super_and": 0.03, "main": 0.01}[script]
        want = [base, base, base * 0.1]
        assert [r["lr"] for r in run.records] == pytest.approx(want, rel=1e-12)
        assert [s["lr"] for s in run.steps] == pytest.approx(want, rel=1e-12)
        assert {r["lr"] for r in default.records} == {base}
        if script == "super_and":
            assert [r["ue_weight"] for r in run.records] == pytest.approx([0, 0.2, 0.4], abs=1e-12)
            assert {r["ue_weight"] for r in default.records} == {0}
    return check


def semi_pi_model(run, default):
    """--method pi_model: one pass of the network over [view 1; view 2] of the B_L = 16 labelled then the
    B_U = 8 unlabelled images; the step's loss is the Π-model's by hand at w(t) = 3000 · ramp(epoch / 4), not
    the cross-entropy alone. The default (supervised) passes the 16 labelled images once, its loss their mean
    cross-entropy."""
    for step, record in zip(run.steps, run.records, strict=True):
        (call,) = step["calls"]
        labelled, unlabelled = call["labelled"], call["unlabelled"]
        assert call["method"] == "pi_model"
        assert torch.equal(step["inputs"][0], torch.cat([labelled["view1"], unlabelled["view1"], labelled["view2"],
                                                         unlabelled["view2"]]))
        want = semi_losses(step, "pi_model", 3000 * ramp(step["epoch"], 4))
        close(record, want, ["loss", "class", "consistency"])
        assert record["loss"] != pytest.approx(want["class"].item(), rel=1e-3)
    (call,) = default.steps[0]["calls"]
    assert call["method"] == "supervised" and call["unlabelled"] is None and "consistency" not in default.records[0]
    assert torch.equal(default.steps[0]["inputs"][0], call["labelled"]["image"])
    close(default.records[0], semi_losses(default.steps[0], "supervised", 0.0), ["loss"])


def semi_mean_teacher(run, default):
    """--method mean_teacher: the student sees view 1 and the teacher view 2 of the labelled and unlabelled
    images; the loss is Mean Teacher's by hand at w(t) = 2000 · ramp(epoch / 2); the teacher starts as the
    student."""
    assert all(torch.equal(a, b) for a, b in zip(run.steps[0]["teacher_before"],
                                                 [run.first_weights[k] for k, _ in run.state.net.named_parameters()]))
    for step, record in zip(run.steps, run.records, strict=True):
        (call,) = step["calls"]
        labelled, unlabelled = call["labelled"], call["unlabelled"]
        assert call["method"] == "mean_teacher" and len(step["teacher_outputs"]) == 1
        assert torch.equal(step["inputs"][0], torch.cat([labelled["view1"], unlabelled["view1"]]))
        want = semi_losses(step, "mean_teacher", 2000 * ramp(step["epoch"], 2))
        close(record, want, ["loss", "class", "consistency"])
        assert record["loss"] != pytest.approx(want["class"].item(), rel=1e-3)
    assert default.steps[0]["calls"][0]["method"] == "supervised" and default.state.teacher is None


def teacher_error(run, alphas):
    """The largest distance of the teacher after each step from α·teacher before + (1 − α)·student after."""
    worst = 0.0
    for step, alpha in zip(run.steps, alphas, strict=True):
        for before, after, student in zip(step["teacher_before"], step["teacher_after"], step["student_after"],
                                          strict=True):
            worst = max(worst, (after - (alpha * before + (1 - alpha) * student)).abs().max().item())
    return worst


def semi_ema(run, default):
    """--ema_decay_rampup 0.3, --ema_decay 0.4 (--rampup_epochs 2, one step per epoch): the teacher follows
    the student's EMA with α = min(1 − 1/(step + 1), decay) = 0, 0.3 (in the ramp-up), 0.4 (after it); not
    with the defaults' 0, 0.5, 2/3 nor with the two swapped."""
    assert teacher_error(run, [0.0, 0.3, 0.4]) < 1e-6
    for wrong in ([0.0, 0.5, 2 / 3], [0.0, 0.4, 0.3], [0.0, 0.3, 0.3]):
        assert teacher_error(run, wrong) > 1e-4, wrong


def semi_consistency_weight(run, default):
    """--consistency_weight 3000: w(t) logged and used is 3000 · ramp(epoch / 4), not the Π-model's default
    100 · M/N = 100 · 20/40."""
    for step, record in zip(run.steps, run.records, strict=True):
        want = 3000 * ramp(step["epoch"], 4)
        assert record["weight"] == pytest.approx(want, rel=1e-12) == step["calls"][0]["weight"]
        assert record["weight"] != pytest.approx(50 * ramp(step["epoch"], 4), rel=1e-3)
        close(record, semi_losses(step, "pi_model", want), ["loss"])
        assert record["loss"] != pytest.approx(semi_losses(step, "pi_model", 50 * ramp(step["epoch"], 4))[
            "loss"].item(), rel=1e-6)


def semi_rampup_epochs(run, default):
    """--rampup_epochs 4: at epoch 1 w = 3000 · exp(−5 · 0.75²), not the 80 epochs' 3000 · exp(−5 · (79/80)²);
    epoch 0 is exp(−5) for both."""
    assert [r["weight"] for r in run.records] == pytest.approx([3000 * math.exp(-5), 3000 * math.exp(-5 * 0.75 ** 2)],
                                                               rel=1e-12)
    assert run.records[1]["weight"] != pytest.approx(3000 * ramp(1, 80), rel=1e-3)
    close(run.records[1], semi_losses(run.steps[1], "pi_model", 3000 * ramp(1, 4)), ["loss"])


def semi_unlabelled_batch_size(run, default):
    """--unlabelled_batch_size 8: each step's unlabelled batch has 8 images (not --batch_size's 16), none of
    them labelled; the network's pass has 2 · (16 + 8) rows."""
    for step in run.steps:
        (call,) = step["calls"]
        unlabelled = call["unlabelled"]
        assert len(unlabelled["index"]) == 8 == len(unlabelled["view1"]) and len(call["labelled"]["index"]) == 16
        assert not set(unlabelled["index"].tolist()) & set(run.state.labelled)
        assert [x.shape[0] for x in step["inputs"]] == [48]


def semi_transfer(run, default):
    """--transfer: an encoder recorded as trained on CIFAR-10 at 32 pixels starts the digits run (its
    weights); without the flag the same command stops with one line naming --transfer."""
    code, lines = default.error
    assert code == 2 and len(lines) == 1 and lines[0].startswith("error: ") and "--transfer" in lines[0], lines
    start = torch.load(run.args.resume, weights_only=True)
    assert start["args"]["dataset"] == "cifar10"
    weights = {k[len("encoder."):]: v for k, v in run.first_weights.items() if k.startswith("encoder.")}
    assert set(weights) == set(start["net"]) and all(torch.equal(weights[k], v) for k, v in start["net"].items())


def refuses(*fragments):
    """A refusal: exit status 2 and one line on standard error, 'error: ' and each fragment, before the run
    made its folder; the default run trains."""
    def check(run, default):
        assert run.error is not None, "the run was not refused"
        code, lines = run.error
        assert code == 2 and len(lines) == 1 and lines[0].startswith("error: "), run.error
        assert all(f in lines[0] for f in fragments), lines[0]
        assert not run.model_dir.exists() and default.error is None and default.records
    check.refusal = True
    return check


def against(flags, check):
    """``check`` compared with the run of ``flags`` instead of the base run."""
    def compared(run, default):
        check(run, default)
    compared.baseline = tuple(flags)
    return compared


# ------------------------------------------------------------------------------------------- the rows: all three

def encoder(state):
    return state.net.encoder if isinstance(state.net, semi.Classifier) else state.net


def optimizer_row(name, value, default_value, base_lr):
    """--lr, --momentum, --weight_decay: every step's update is SGD's by hand at the flag's value and not at
    the default value; the learning rate is also the log's and the optimizer's at each step (epoch < 80)."""
    def check(run, default):
        hyper = {"lr": base_lr, "momentum": 0.9, "weight_decay": 5e-4, name: value}
        assert [s["lr"] for s in run.steps] == [hyper["lr"]] * len(run.steps)
        assert [r["lr"] for r in run.records] == [hyper["lr"]] * len(run.records)

        def error(h):
            return sgd_error(run.steps, [h["lr"]] * len(run.steps), h["momentum"], h["weight_decay"])
        assert error(hyper) < 1e-4  # float32 rounding: 1e-7 to 1e-5
        assert error({**hyper, name: default_value}) > 1e-3  # 3e-3 (weight decay) to 9
    return check


def low_dim_row(script, run, default):
    if script == "semi":
        assert run.state.net.classifier.in_features == 12 and default.state.net.classifier.in_features == 8
    else:
        assert run.steps[0]["outputs"][0].shape[1] == 12 and default.steps[0]["outputs"][0].shape[1] == 8
    if script == "super_and":
        assert run.state.bank.memory.shape == (8, 12)
    if script == "main":
        assert all(h.weight.shape == (12, 10) for h in run.state.heads.heads)


def width_row(script, run, default):
    assert encoder(run.state).conv1.weight.shape[0] == 6 and encoder(default.state).conv1.weight.shape[0] == 4


def image_size_row(script, run, default):
    assert run.steps[0]["inputs"][0].shape[-2:] == (16, 16)
    assert default.steps[0]["inputs"][0].shape[-2:] == (8, 8)


def network_row(script, run, default):
    assert type(encoder(run.state)).__name__ == "WideResNet"
    assert type(encoder(default.state)).__name__ == "SobelResNet"


def subset_row(script, run, default):
    if script == "super_and":
        assert len(run.state.bank.memory) == 12 and len(run.state.labels) == 12
        assert len(default.state.bank.memory) == 8
    elif script == "main":
        assert run.state.clusters["preds"].shape[1] == 12 and default.state.clusters["preds"].shape[1] == 8
    else:  # the labelled images are drawn from the first 30 only
        assert max(run.state.labelled) < 30 <= max(default.state.labelled)


def batch_size_row(script, run, default):
    rows = 8  # the network's rows per step: both views of 4 images, or semi.py's 8 labelled images
    assert [x.shape[0] for s in run.steps for x in s["inputs"]] == [rows] * (2 * len(run.records))
    assert {x.shape[0] for s in default.steps for x in s["inputs"]} == {16}


def shape_rows(script):
    """The flags that change shapes: --low_dim (the features and what holds them), --width (the first
    convolution), --image_size (a step's images), --network, --subset (the images a run trains on),
    --batch_size (a step's rows). The first three run together: each changes its own shape only."""
    shapes = ["--low_dim", "12", "--width", "6", "--image_size", "16"]
    return [("low_dim", shapes, partial(low_dim_row, script)), ("width", shapes, partial(width_row, script)),
            ("image_size", shapes, partial(image_size_row, script)),
            ("network", ["--network", "wrn28_2"], partial(network_row, script)),
            ("subset", ["--subset", "30" if script == "semi" else "12"], partial(subset_row, script)),
            ("batch_size", ["--batch_size", "8" if script == "semi" else "4"], partial(batch_size_row, script))]


def seed_row(script):
    """--seed draws the initial weights (stage 2: the heads; semi.py: also the labelled images)."""
    def check(run, default):
        first = run.first_weights[next(iter(run.first_weights))]
        first_default = default.first_weights[next(iter(default.first_weights))]
        if script == "main":  # the network comes from the stage-1 file
            assert torch.equal(first, first_default)
            assert not torch.equal(run.state.heads.heads[0].weight, default.state.heads.heads[0].weight)
        else:
            assert not torch.equal(first, first_default)
        if script == "semi":
            assert run.state.labelled != default.state.labelled
    return check


def amp_row(run, default):
    """--amp: the network runs in bfloat16 under autocast."""
    assert run.steps[0]["outputs"][0].dtype == torch.bfloat16
    assert default.steps[0]["outputs"][0].dtype == torch.float32


def channels_last_row(run, default):
    """--channels_last: the network's weights (and stage 1's and 2's images) in the channels-last layout (the
    numbers stay)."""
    layout = torch.channels_last
    conv = encoder(run.state).conv1.weight
    assert conv.is_contiguous(memory_format=layout) and not encoder(default.state).conv1.weight.is_contiguous(
        memory_format=layout)
    if not isinstance(run.state.net, semi.Classifier):
        assert run.steps[0]["inputs"][0].is_contiguous(memory_format=layout)
        assert not default.steps[0]["inputs"][0].is_contiguous(memory_format=layout)


def gpu_augment_row(run, default):
    """--gpu_augment: the batches come from the batched augmentation on the device (here the CPU)."""
    from datasets.gpu_augment import GpuTwoViewLoader
    assert isinstance(run.state.train_loader, GpuTwoViewLoader)
    assert not isinstance(default.state.train_loader, GpuTwoViewLoader)


# ------------------------------------------------------------------------------------------- the table

TEMPERATURES_1 = ROUND_1 + ["--npc_t", "0.07", "--batch_t", "0.2"]  # equal defaults: distinct values, one run
MOMENTA_1 = ["--npc_m", "0.3", "--batch_m", "1.5"]
TEMPERATURES_2 = ["--tau_c", "0.07", "--batch_t", "0.2"]
WEIGHTS_2 = ["--batch_m", "1.5", "--lambda_cp", "0.3"]
SCHEDULE = ["--epochs", "3", "--schedule_scale", "0.0125"]
DECAY = ["--epochs", "4", "--lr_decay_start", "1", "--lr_decay_every", "2"]
SPEED = ["--amp", "--channels_last", "--gpu_augment"]  # each changes its own quantity only
# joint.py: the flags its step uses in both stages' losses, equal defaults at distinct values, one run
JOINT = ROUND_1 + ["--npc_t", "0.07", "--tau_c", "0.2", "--batch_t", "0.15", "--batch_m", "1.5", "--lambda_cp", "0.3"]
CLUSTER = ["--test_only", "--subset", "12"]  # more images than the 10 clusters
PI = ["--method", "pi_model", "--consistency_weight", "3000", "--rampup_epochs", "4", "--unlabelled_batch_size", "8",
      "--epochs", "2"]
MEAN_TEACHER = ["--method", "mean_teacher", "--consistency_weight", "2000", "--rampup_epochs", "2",
                "--ema_decay_rampup", "0.3", "--ema_decay", "0.4", "--epochs", "3"]


def table():
    """(script, flag, flags of the run, check) for every row."""
    rows = [
        ("super_and", "npc_t", TEMPERATURES_1, s1_temperatures),
        ("super_and", "batch_t", TEMPERATURES_1, s1_temperatures),
        ("super_and", "npc_m", MOMENTA_1, s1_npc_m),
        ("super_and", "batch_m", MOMENTA_1, s1_batch_m),
        ("super_and", "ANs_select_rate", ROUND_1 + ["--ANs_select_rate", "0.5"], s1_select_rate),
        ("super_and", "ANs_size", ROUND_1 + ["--ANs_size", "3"], s1_ans_size),
        ("super_and", "rounds", ["--rounds", "3"], s1_rounds),
        ("super_and", "epochs", ["--epochs", "2"], s1_epochs),
        ("super_and", "variant:and", ROUND_1 + ["--variant", "and"], s1_variant("and", [0, 2])),
        ("super_and", "variant:lemniscate", ROUND_1 + ["--variant", "lemniscate"], s1_variant("lemniscate", [0, 0])),
        ("main", "tau_c", TEMPERATURES_2, s2_loss_row({"tau_c": 0.2}, tau_c=0.07, batch_t=0.2)),
        ("main", "batch_t", TEMPERATURES_2, s2_loss_row({"batch_t": 0.07}, tau_c=0.07, batch_t=0.2)),
        ("main", "batch_m", WEIGHTS_2, s2_loss_row({"batch_m": 1.0}, batch_m=1.5, lambda_cp=0.3)),
        ("main", "lambda_cp", WEIGHTS_2, s2_loss_row({"lambda_cp": 1.0}, batch_m=1.5, lambda_cp=0.3)),
        ("main", "head_norm:paper", ["--head_norm", "paper"],
         s2_loss_row({"head_norm": "released"}, head_norm="paper")),
        ("main", "head_norm:none", ["--head_norm", "none"], s2_loss_row({"head_norm": "released"}, head_norm="none")),
        ("main", "init", ["--init", "random"], s2_init),
        ("main", "cluster:kmeans", CLUSTER + ["--cluster", "kmeans"], against(CLUSTER, s2_cluster("kmeans"))),
        ("main", "cluster:agglomerative", CLUSTER + ["--cluster", "agglomerative"],
         against(CLUSTER, s2_cluster("agglomerative"))),
        ("main", "num_heads", ["--num_heads", "3"], s2_num_heads),
        ("main", "epochs", ["--epochs", "2"], s2_epochs),
        ("super_and", "schedule_scale", SCHEDULE, schedule_scale_row("super_and")),
        ("main", "schedule_scale", SCHEDULE, schedule_scale_row("main")),
        ("semi", "labels_per_class", ["--labels_per_class", "3"], semi_labels_per_class),
        ("semi", "lr_decay_start", DECAY, semi_decay),
        ("semi", "lr_decay_every", DECAY, semi_decay),
        ("semi", "resume", ["--resume", STAGE1_FILE], semi_resume),
        ("semi", "epochs", ["--epochs", "2"], semi_epochs),
        ("semi", "method:pi_model", PI, semi_pi_model),
        ("semi", "method:mean_teacher", MEAN_TEACHER, semi_mean_teacher),
        ("semi", "consistency_weight", PI, semi_consistency_weight),
        ("semi", "rampup_epochs", PI, semi_rampup_epochs),
        ("semi", "unlabelled_batch_size", PI, semi_unlabelled_batch_size),
        ("semi", "ema_decay_rampup", MEAN_TEACHER, semi_ema),
        ("semi", "ema_decay", MEAN_TEACHER, semi_ema),
        ("semi", "transfer", ["--resume", OTHER_STAGE1_FILE, "--transfer"],
         against(["--resume", OTHER_STAGE1_FILE], semi_transfer)),
        ("semi", "gpu_augment", ["--gpu_augment"], refuses("--gpu_augment", "joint.py")),
        ("joint", "npc_t", JOINT, joint_row([{"npc_t": 0.1}, {"npc_t": 0.2}, {"npc_t": 0.15}])),
        ("joint", "tau_c", JOINT, joint_row([{"tau_c": 0.1}, {"tau_c": 0.07}, {"tau_c": 0.15}])),
        ("joint", "batch_t", JOINT, joint_row([{"batch_t": 0.1}, {"batch_t": 0.07}, {"batch_t": 0.2}])),
        ("joint", "batch_m", JOINT, joint_row([{"batch_m": 1.0}, {"batch_m": 0.3}])),
        ("joint", "lambda_cp", JOINT, joint_row([{"lambda_cp": 1.0}, {"lambda_cp": 1.5}])),
        ("joint", "amp", SPEED, amp_row), ("joint", "channels_last", SPEED, channels_last_row),
        ("joint", "gpu_augment", SPEED, gpu_augment_row),
    ]
    for script, base_lr in (("super_and", 0.03), ("main", 0.01), ("semi", 0.005)):
        rows += [(script, "lr", ["--lr", "0.05"], optimizer_row("lr", 0.05, base_lr, base_lr)),
                 (script, "momentum", ["--momentum", "0.5"], optimizer_row("momentum", 0.5, 0.9, base_lr)),
                 (script, "weight_decay", ["--weight_decay", "0.1"], optimizer_row("weight_decay", 0.1, 5e-4, base_lr))]
        rows += [(script, flag, flags, check) for flag, flags, check in shape_rows(script)]
        speed = SPEED if script != "semi" else SPEED[:2]  # semi.py refuses --gpu_augment (its row above)
        rows += [(script, "seed", ["--seed", "1"], seed_row(script)), (script, "amp", speed, amp_row),
                 (script, "channels_last", speed, channels_last_row)]
        if script != "semi":
            rows.append((script, "gpu_augment", SPEED, gpu_augment_row))
    return rows


ROWS = table()


def flag_of(row):
    """The flag a row tests: 'method' of the row named 'method:pi_model'."""
    return row[1].split(":")[0]


def same_flag(a, b):
    """Two parser entries define the same flag: its spelling, default, type (a range check: the same function
    of the same bounds), choices and kind."""
    def kind(action):
        parse = action.type
        bounds = tuple(cell.cell_contents for cell in getattr(parse, "__closure__", None) or ())
        return (action.option_strings, action.default, action.choices, action.nargs, action.const,
                getattr(parse, "__qualname__", parse), bounds)
    return kind(a) == kind(b)


def actions(script):
    return {a.dest: a for a in MODULES[script].get_args_parser()._actions if a.dest != "help"}


@pytest.mark.parametrize("script, flags, check",
                         [pytest.param(script, flags, check, id=f"{script}--{flag}") for script, flag, flags, check
                          in ROWS])
def test_flag_changes_its_quantity(observe, script, flags, check):
    run, default = observe(script, flags), observe(script, getattr(check, "baseline", ()))
    if not getattr(check, "refusal", False):
        assert run.error is None, run.error
    check(run, default)


@pytest.mark.parametrize("script", list(MODULES))
def test_every_flag_has_a_row(script):
    """Each flag of the script's parser has a row above or a reason in NOT_MATH; the table names no other.
    joint.py's other flags are the stages' own (the same parser entry: spelling, default, type, choices) and
    share the row of the stage that has one."""
    flags = actions(script)
    rows = {flag_of(row) for row in ROWS if row[0] == script}
    reasons = set(NOT_MATH["all"]) | set(NOT_MATH.get(script, {}))
    shared = set()
    if script == "joint":
        for stage in ("super_and", "main"):
            theirs, covered = actions(stage), {flag_of(row) for row in ROWS if row[0] == stage}
            shared |= {f for f in covered if f in flags and f in theirs and same_flag(flags[f], theirs[f])}
    assert set(flags) - rows - reasons - shared == set(), "flags without a row"
    assert rows - set(flags) == set(), "rows of flags the script does not have"


@pytest.mark.parametrize("script", list(MODULES))
def test_the_default_run_repeats_exactly(observe, script):
    """The table's differences come from the flags: the base run made again gives the same losses and weights."""
    first, again = observe(script), observe(script, ["--seed", "1567010775"])
    assert [r["loss"] for r in first.records] == [r["loss"] for r in again.records]
    assert all(torch.equal(a, b) for a, b in zip(first.steps[-1]["after"], again.steps[-1]["after"], strict=True))
