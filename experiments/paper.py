"""The paper's experiments section (Tables 2, 3 and 4, supplementary C and D) as data, run by the real scripts
(docs/method.md, "The paper's experiments").

    python experiments/paper.py --tables 2 3 C D --scale cpu --dataset fashion-mnist --out runs/paper
    python experiments/paper.py --tables 3 --scale paper --dataset cifar10 --out runs/paper --dry_run
    python experiments/paper.py --tables 4 --scale paper --dataset svhn --out runs/paper-svhn

Each table is a list of rows; each row's numbers come from runs of ``super_and.py``, ``main.py``,
``joint.py`` and ``semi.py``, started as a user starts them (one subprocess each, in ``<out>/runs/<run>``),
and read from the run folder (its ``eval.json``, ``eval_semi.json`` or the last record of its log). A run
several rows share (the one stage-1 encoder, Table 4's stage-2 model) runs once.
Running the same command again skips every finished run, resumes a killed one from its last checkpoint and
rewrites ``<out>/tables.md``, ``<out>/tables.json`` and ``<out>/tables.png`` (each row: the paper's number, the
measured mean, standard deviation and every seed's number, the run folders). tests/test_paper.py parses every row's
flags with its script's own parser.

``--seeds N`` runs every run N times: seed 0 with the scripts' default seed (the released one, in
``runs/<run>``), seed k > 0 with ``--seed k`` (in ``runs/<run>-seed<k>``), each chain on its own seed's
encoder; all runs of seed 0 come first, then seed 1's, so a cut measurement has whole tables of fewer seeds.
The paper's claims (``CLAIMS``: one row above another) are judged over the seeds by ``experiments/verdicts.py``.
"""
import json
import math
import os
import signal
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

if __package__ in (None, ""):  # run as a script: experiments/ is not a package on sys.path
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from experiments import verdicts  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
try:  # the scripts: their parsers are the source of every default, engine/files.py of names
    import datasets
    import joint as joint_script
    import main as stage2
    import semi as semi_script
    import super_and as stage1
    from engine import files
    from engine.cli import ArgumentParser, check_output_dir, positive_float, positive_int
    from engine.lifecycle import RunLock, Terminated, describe_fault, handle_signals, uninterrupted
    from engine.system import choose_device
    from lib.errors import InputError
except ImportError as err:  # run by a Python without the project's packages
    sys.exit(f"error: {err}; run the harness with the project's Python (make paper, or .venv/bin/python "
             "experiments/paper.py)")

STAGE1, STAGE2, JOINT_SCRIPT, SEMI = "super_and.py", "main.py", "joint.py", "semi.py"
LOGS = {STAGE1: files.EMBED_LOG, STAGE2: files.ASSIGN_LOG, JOINT_SCRIPT: files.JOINT_LOG, SEMI: files.SEMI_LOG}
ENCODER = files.EMBED_CKPT  # stage 1's checkpoint, written every epoch
LAST = files.LAST  # stage 2's resumable checkpoint, written every epoch
JOINT_LAST = files.JOINT_CKPT  # the joint model's, likewise
SEMI_LAST = files.SEMI_CKPT  # semi.py's, likewise
# the file a run of each kind hands to the runs it encodes for: stage 1's last, stage 2's lowest-loss epoch
ENCODER_FILES = {"embed": ENCODER, "assign": files.BEST}
EVALS = {"semi": files.SEMI_EVAL}  # the file a finished run writes, by kind (others: eval.json)
COMMAND = files.COMMAND  # what the harness ran in a folder: a folder of another command is refused
LOCK = files.HARNESS_LOCK  # <out>/paper.lock: one harness per --out
# files only a script's run folder holds: --out is never one (its tables would sit among a run's files)
RUN_FOLDER_FILES = (files.LOCK, ENCODER, files.BEST, LAST, JOINT_LAST, SEMI_LAST, *LOGS.values(), files.EVAL,
                    files.SEMI_EVAL)
OUTPUT = "output.log"  # the scripts' console output, appended

# ---- the runs ----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Run:
    """One script invocation. kind: 'embed' (stage 1 training), 'assign' (stage 2 training), 'joint' (joint.py),
    'evaluate' (main.py --test_only on an encoder: the sequential clusterings) or 'semi' (semi.py). ``encoder``:
    the run whose file it starts from (None: none): a stage-1 run's ckpt_embed.t7, a stage-2 run's ckpt_ul.t7.
    ``epochs``: which entry of the scale recipe gives its length."""
    name: str
    script: str
    kind: str
    flags: tuple = ()
    encoder: str = None
    epochs: str = None


def _is_default(parser, flag, value):
    """Whether ``value`` (as the harness passes it: a string or a number) is ``flag``'s default in ``parser``."""
    default = parser.get_default(flag.lstrip("-"))
    return str(value) == str(default) or (isinstance(default, float) and float(value) == default)


def _slug(flag, value):
    return flag.lstrip("-") + str(value).replace(".", "p")


def embed(variant="super_and"):
    """Stage 1; the default variant is what super_and.py runs without --variant (so today's script runs it)."""
    if variant == "super_and":
        return Run("embed", STAGE1, "embed", epochs="stage1")
    return Run(f"embed-{variant}", STAGE1, "embed", ("--variant", variant), epochs="stage1")


def assign(encoder="embed", epochs="stage2", **flags):
    """Stage 2 from ``encoder`` (None: --init random) with ``flags`` ({'lambda_cp': 0}); a flag at its default
    is left out, so every row asking for the default run shares the one run folder."""
    parser = stage2.get_args_parser()
    pairs = [(f"--{k}", str(v)) for k, v in flags.items() if not _is_default(parser, k, v)]
    parts = ["assign"] + ([encoder.removeprefix("embed-")] if encoder not in (None, "embed") else [])
    parts += ["random"] if encoder is None else []
    parts += [_slug(f, v) for f, v in pairs] + ([epochs] if epochs != "stage2" else [])
    init = ("--init", "random") if encoder is None else ()
    return Run("-".join(parts), STAGE2, "assign", init + tuple(x for p in pairs for x in p), encoder, epochs)


def sequential(method):
    return Run(f"sequential-{method}", STAGE2, "evaluate", ("--test_only", "--cluster", method), "embed")


JOINT = Run("joint", JOINT_SCRIPT, "joint", epochs="joint")  # from a random network, rounds as stage 1

# Table 4: every run on a WideResNet-28-2; "our model" is both stages trained on it, one pair for three rows
WRN = ("--network", "wrn28_2")
EMBED_WRN = Run("embed-wrn28_2", STAGE1, "embed", WRN, epochs="stage1")
ASSIGN_WRN = Run("assign-wrn28_2", STAGE2, "assign", WRN, EMBED_WRN.name, "stage2")


def semi(method, encoder=None):
    """semi.py with ``method`` from scratch (``encoder`` None) or from ``encoder``'s file."""
    flags = WRN + (("--method", method) if method != "supervised" else ()) + (("--from_scratch",) if encoder is None
                                                                              else ())
    name = "semi-" + ("ours-" if encoder else "") + method
    return Run(name, SEMI, "semi", flags, encoder, "semi")

# ---- the tables --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Cell:
    """One number: the paper's (CIFAR-10, %; None: the paper gives none; ((data set, number), ...) where the
    paper gives one per data set) and where ours is read from: source 'eval' (the run's eval.json, a semi.py
    run's eval_semi.json) or 'log' (its log's last record), ``key`` in it; reduce 'mean' for the mean of a list
    (the five heads')."""
    paper: float
    run: Run
    source: str
    key: str
    reduce: str = None


@dataclass(frozen=True)
class Row:
    id: str
    name: str
    cells: tuple


@dataclass(frozen=True)
class Table:
    id: str
    title: str
    columns: tuple
    rows: tuple = field(default_factory=tuple)


def acc(paper, run):
    return Cell(paper, run, "eval", "acc")


def paper_number(paper, dataset):
    """The paper's number for ``dataset``: its own where the paper has one, else CIFAR-10's (for orientation)."""
    if not isinstance(paper, tuple):
        return paper
    by_dataset = dict(paper)
    return by_dataset.get(dataset, by_dataset["cifar10"])


def paper_dataset(table, dataset):
    """The data set whose numbers ``table`` shows as the paper's: ``dataset`` where the paper has them."""
    given = {d for r in table.rows for c in r.cells if c is not None and isinstance(c.paper, tuple)
             for d, _ in c.paper}
    return dataset if dataset in given else "cifar10"


def semi_acc(cifar10, svhn, run):
    return Cell((("cifar10", cifar10), ("svhn", svhn)), run, "eval", "test_acc")


LAMBDAS = (0, 0.25, 0.5, 1, 2, 4)  # the paper plots a range without listing it: our grid around λ = 1
TAUS = (0.05, 0.1, 0.2, 0.5, 1)  # likewise around τ_c = 0.1 (τ_c = 1 is also Table 3's row)

TABLES = {t.id: t for t in (
    Table("2", "Table 2: the first stage's embedding as initialization (kNN top-1 %, stage-2 ACC %)",
          ("kNN top-1", "stage-2 ACC"), (
              Row("random", "random (no first stage)", (None, acc(58.6, assign(None)))),
              Row("lemniscate", "Lemniscate", (Cell(80.8, embed("lemniscate"), "log", "knn_top1"),
                                              acc(63.8, assign("embed-lemniscate")))),
              Row("and", "AND", (Cell(86.3, embed("and"), "log", "knn_top1"), acc(73.9, assign("embed-and")))),
              Row("super_and", "Super-AND", (Cell(89.2, embed(), "log", "knn_top1"), acc(81.0, assign()))))),
    Table("3", "Table 3: alternatives to the second stage (ACC %)", ("ACC",), (
        Row("lambda0", "without the consistency-preserving loss (λ = 0)", (acc(58.2, assign(lambda_cp=0)),)),
        Row("no_norm", "without weight normalization of the heads", (acc(56.0, assign(head_norm="none")),)),
        Row("tau1", "without temperature (τ_c = 1)", (acc(19.5, assign(tau_c=1)),)),
        Row("kmeans", "sequential: first stage + k-means", (acc(38.3, sequential("kmeans")),)),
        Row("agglomerative", "sequential: first stage + hierarchical clustering",
            (acc(49.9, sequential("agglomerative")),)),
        Row("joint", "joint: both stages' losses together", (acc(68.4, JOINT),)),
        Row("two_stage", "two-stage model", (acc(81.0, assign()),)))),
    Table("C", "Supplementary C: λ and τ_c (ACC % of the lowest-loss head, mean of the five heads)",
          ("lowest-loss head", "mean of heads"),
          tuple(Row(f"lambda{v}", f"λ = {v}", (Cell(81.0 if v == 1 else None, assign(lambda_cp=v), "eval", "acc"),
                                               Cell(None, assign(lambda_cp=v), "eval", "head_acc", "mean")))
                for v in LAMBDAS)
          + tuple(Row(f"tau{v}", f"τ_c = {v}", (Cell({0.1: 81.0, 1: 19.5}.get(v), assign(tau_c=v), "eval", "acc"),
                                                Cell(None, assign(tau_c=v), "eval", "head_acc", "mean")))
                  for v in TAUS)),
    Table("D", "Supplementary D: stage 2 alone (random encoder), longer (ACC %)", ("ACC",), (
        Row("random", "random encoder, the usual stage-2 epochs", (acc(58.6, assign(None)),)),
        Row("random_long", "random encoder, 1,300 epochs instead of 300 (scaled alike)",
            (acc(59.1, assign(None, "stage2_long")),)),
        Row("two_stage", "two-stage model", (acc(81.0, assign()),)))),
    Table("4", "Table 4: few labels (CIFAR-10 4,000, SVHN 1,000 in the paper), WideResNet-28-2 (test accuracy %)",
          ("accuracy",), (
              Row("supervised", "Supervised", (semi_acc(79.7, 87.7, semi("supervised")),)),
              Row("pi_model", "Π-model", (semi_acc(83.8, 92.2, semi("pi_model")),)),
              Row("mean_teacher", "Mean Teacher", (semi_acc(84.2, 93.5, semi("mean_teacher")),)),
              Row("ours_supervised", "Our model + supervised",
                  (semi_acc(85.4, 93.4, semi("supervised", ASSIGN_WRN.name)),)),
              Row("ours_pi_model", "Our model + Π-model", (semi_acc(85.8, 93.6, semi("pi_model", ASSIGN_WRN.name)),)),
              Row("ours_mean_teacher", "Our model + Mean Teacher",
                  (semi_acc(88.0, 94.2, semi("mean_teacher", ASSIGN_WRN.name)),)))),
)}

# ---- the paper's claims -----------------------------------------------------------------------------


@dataclass(frozen=True)
class Claim:
    """The paper's claim that row ``better`` of ``table`` scores above row ``worse`` in column ``column``."""
    table: str
    better: str
    worse: str
    column: int = 0


def _chain(table, ids, column=0):
    """A > B > C as the claims A > B and B > C."""
    return tuple(Claim(table, a, b, column) for a, b in zip(ids, ids[1:]))


CLAIMS = (
    # Table 2: Super-AND > AND > Lemniscate > random as initialization of stage 2; the embeddings' kNN in order
    *_chain("2", ("super_and", "and", "lemniscate", "random"), 1), *_chain("2", ("super_and", "and", "lemniscate")),
    # Table 3: two-stage > joint > hierarchical > k-means, the two-stage model above each sequential method, each
    # ablation below the full model
    *_chain("3", ("two_stage", "joint", "agglomerative", "kmeans")),
    *(Claim("3", "two_stage", r) for r in ("agglomerative", "kmeans")),
    *(Claim("3", "two_stage", r) for r in ("lambda0", "no_norm", "tau1")),
    # supplementary C: both columns (the lowest-loss head, the mean of the heads) peak at λ = 1 and at τ_c = 0.1
    *(Claim("C", "lambda1", f"lambda{v}", c) for c in (0, 1) for v in LAMBDAS if v != 1),
    *(Claim("C", "tau0.1", f"tau{v}", c) for c in (0, 1) for v in TAUS if v != 0.1),
    # supplementary D: stage 2 alone, trained 1,300 epochs, stays below the two-stage model
    Claim("D", "two_stage", "random_long"),
    # Table 4: our model + X > X, for each method X
    *(Claim("4", f"ours_{m}", m) for m in ("supervised", "pi_model", "mean_teacher")),
)

# ---- the scales --------------------------------------------------------------------------------------

# the paper's: 5 rounds x 200 epochs of stage 1, 300 of stage 2, 1,300 for supplementary D; the joint model's
# length is not given: stage 1's rounds, so that its anchors are discovered as stage 1's (docs/method.md)
# Table 4's semi.py runs: 180 epochs (the learning rate x0.1 at 80, 120 and 160). The scripts' defaults.
_STAGE1, _JOINT = stage1.get_args_parser(), joint_script.get_args_parser()
PAPER_EPOCHS = {"stage1": (_STAGE1.get_default("rounds"), _STAGE1.get_default("epochs")),
                "stage2": stage2.get_args_parser().get_default("epochs"), "stage2_long": 1300,
                "joint": (_JOINT.get_default("rounds"), _JOINT.get_default("epochs")),
                "semi": semi_script.get_args_parser().get_default("epochs")}
# measured on 2 CPU cores (Fashion-MNIST, 2,000 images): Tables 2, 3, C and D in 54 minutes, Table 4 in 12
CPU_EPOCHS = {"stage1": (2, 3), "stage2": 3, "stage2_long": 13, "joint": (2, 3), "semi": 18}
# measured on 2 CPU cores (Fashion-MNIST, 1,000 images): docs/results.md. Each stage's released schedule passes
# through all its phases (--schedule_scale): stage 1 10 epochs a round (released 200: x 0.05), stage 2 40 epochs
# (300 x 0.2 is 60; the schedule's learning rate is below 1/1000 of its start after epoch 40, so the harness
# stops there), supplementary D 13/3 of that; semi.py 70 epochs (x0.1 at 60 and 65: from scratch it levels off at
# about 75% after the first decay)
FAIR_EPOCHS = {"stage1": (5, 10), "stage2": 40, "stage2_long": 173, "joint": (5, 10), "semi": 70}
TINY_EPOCHS = {"stage1": (1, 1), "stage2": 1, "stage2_long": 2, "joint": (1, 1), "semi": 1}
SCALES = {
    # the released network and batch, the released learning rates (the scripts' defaults); semi.py: the
    # paper's Table 4 recipe (its per-data-set labels and learning rate)
    "paper": {"epochs": PAPER_EPOCHS, "common": [], STAGE1: [], STAGE2: [], JOINT_SCRIPT: [], SEMI: []},
    # a narrow network on 2,000 images, batch 32 with the released learning rates scaled by 32/128.
    # semi.py (Table 4): meant for --dataset fashion-mnist (as make paper), its default 25 labels per class
    # (250 labelled images of the 2,000), semi.py's learning rate, 18 epochs with the schedule and (Π-model,
    # Mean Teacher) the consistency ramp-up scaled by 1/10 (x0.1 at 8, 12, 16)
    "cpu": {"epochs": CPU_EPOCHS, "common": ["--width", "8", "--batch_size", "32", "--subset", "2000",
                                             "--workers", "2"],
            STAGE1: ["--lr", "0.0075"], STAGE2: ["--lr", "0.0025"], JOINT_SCRIPT: ["--lr", "0.0075"],
            SEMI: ["--lr_decay_start", "8", "--lr_decay_every", "4"], "consistency": ["--rampup_epochs", "8"]},
    # 'cpu' made fair (docs/results.md, "A fair CPU scale"): 1,000 images, each stage long enough to level off
    # with its whole schedule compressed; the batched augmentation (the same distributions, the fastest CPU
    # path) for the stages; Table 4 on a WideResNet at width 16 (8 did not learn from scratch), batch 32 and a
    # learning rate at which the from-scratch baseline learns (0.05), the same for every row
    "fair": {"epochs": FAIR_EPOCHS, "common": ["--width", "8", "--batch_size", "32", "--subset", "1000",
                                              "--workers", "0"],
             STAGE1: ["--lr", "0.0075", "--gpu_augment", "--schedule_scale", "0.05"],
             STAGE2: ["--lr", "0.0025", "--gpu_augment", "--schedule_scale", "0.2"],
             JOINT_SCRIPT: ["--lr", "0.0075", "--gpu_augment", "--schedule_scale", "0.05"],
             SEMI: ["--lr", "0.05", "--lr_decay_start", "60", "--lr_decay_every", "5"],
             "consistency": ["--rampup_epochs", "30"], "wrn": ["--width", "16"]},
    # the test's: the smallest network that runs, at 16 pixels; semi.py on 4 labels per class (40: one batch)
    "tiny": {"epochs": TINY_EPOCHS, "common": ["--width", "4", "--low_dim", "16", "--batch_size", "32",
                                              "--subset", "320", "--image_size", "16", "--workers", "0"],
             STAGE1: ["--lr", "0.0075"], STAGE2: ["--lr", "0.0025"], JOINT_SCRIPT: ["--lr", "0.0075"],
             SEMI: ["--labels_per_class", "4"]},
}
UNKNOWN_SIZE = 50_000  # the cost estimate's guess for a data set of unknown size (a folder)


def split_size(dataset, split):
    """The images of ``dataset``'s ``split`` at full size (datasets/registry.py)."""
    info = datasets.DATASETS.get(dataset)
    return sum(info.sizes[part] for part in info.parts(split)) if info and info.sizes else UNKNOWN_SIZE


class HarnessError(Exception):
    """A problem the user must fix (a folder of another command); one line, exit status ``status`` (2: bad
    input; a script's own error line keeps that script's status)."""

    def __init__(self, message, status=2):
        super().__init__(message)
        self.status = status


# ---- checks before any work --------------------------------------------------------------------------

def check_out(out):
    """--out is a folder the harness can write (or can create, the scripts' own check), and not a script's run
    folder."""
    try:
        check_output_dir(out, "--out")
    except InputError as err:
        raise HarnessError(str(err)) from None
    own = [name for name in RUN_FOLDER_FILES if os.path.isdir(out) and os.path.lexists(os.path.join(out, name))]
    if own:
        raise HarnessError(f"--out {out} is a run folder of the scripts (it holds {own[0]}); the harness keeps its "
                           "runs in <out>/runs/: choose another --out")


def check_data(args):
    """The device and the data set's files, as the scripts check them (engine.system.choose_device, the data
    set's reader on every split the runs read: a download where one is missing), each one line."""
    entry = datasets.DATASETS[args.dataset]
    data_dir = args.data_dir or stage1.get_args_parser().get_default("data_dir")
    try:
        choose_device(args.device or "auto")
        if entry.name == "folder":
            datasets.folder.scan(data_dir)
        else:
            splits = {entry.embed_split, entry.cluster_split, entry.test_split or entry.embed_split}
            entry.read(data_dir, sorted({part for split in splits for part in entry.parts(split)}))
    except InputError as err:
        raise HarnessError(str(err)) from None


def check_args(args):
    """Every flag before any work (the parser has checked each one's range and --dataset's name): --rows,
    --out and, unless --dry_run, the device and the data set's files."""
    rows = {f"{t}:{r.id}" for t in args.tables for r in TABLES[t].rows}
    unknown = sorted(set(args.rows or ()) - rows)
    if unknown:
        raise HarnessError(f"--rows {' '.join(unknown)}: no such row in --tables {' '.join(args.tables)} "
                           f"(rows: {' '.join(sorted(rows))})")
    check_out(args.out)
    if not args.dry_run:
        check_data(args)


# ---- commands ----------------------------------------------------------------------------------------

def run_flags(run, scale, dataset, extra, seed=0):
    """The flags of ``run`` at ``scale`` and seed index ``seed`` (no --model_dir or --resume: those come from the
    folder layout; seed 0: the script's default seed, no flag)."""
    recipe = SCALES[scale]
    flags = ["--dataset", dataset, *recipe["common"], *recipe[run.script], *extra]
    if run.kind == "semi" and "--method" in run.flags:  # semi.py refuses these with --method supervised
        flags += recipe.get("consistency", [])
    if "wrn28_2" in run.flags:  # Table 4's network: every run of its chain at the same width
        flags += recipe.get("wrn", [])
    if seed:
        flags += ["--seed", str(seed)]
    length = recipe["epochs"].get(run.epochs)
    if isinstance(length, tuple):  # rounds x epochs
        flags += ["--rounds", str(length[0]), "--epochs", str(length[1])]
    elif length is not None:
        flags += ["--epochs", str(length)]
    return flags + list(run.flags)


def job_name(run, seed=0):
    """The name of ``run`` at seed index ``seed``: its folder under <out>/runs and its key in tables.json."""
    return run.name + (f"-seed{seed}" if seed else "")


def folder(out, run, seed=0):
    return os.path.join(out, "runs", job_name(run, seed))


def command(run, flags, out, resume=None, seed=0):
    """The argv of ``run``: python script flags --model_dir <folder> [--resume ...] (a semi.py run resumed
    from its own checkpoint: without --from_scratch, which semi.py refuses beside --resume)."""
    if resume is not None and run.kind == "semi":
        flags = [f for f in flags if f != "--from_scratch"]
    argv = [sys.executable, os.path.join(ROOT, run.script), *flags, "--model_dir", folder(out, run, seed)]
    if resume is None and run.encoder is not None:
        encoder = RUNS[run.encoder]
        resume = os.path.join(folder(out, encoder, seed), ENCODER_FILES[encoder.kind])
    return argv + (["--resume", resume] if resume else [])


# ---- the state of a run folder -----------------------------------------------------------------------

def read_log(path):
    """The records of a JSON-lines log; a last line cut by a kill is dropped, any other line that is not a JSON
    object is one HarnessError naming the file."""
    if not os.path.exists(path):
        return []
    try:
        with open(path, "rb") as f:
            lines = f.read().split(b"\n")
    except OSError as err:
        raise HarnessError(f"{path} cannot be read ({err.strerror}); repair it or move its run folder away") from None
    records = []
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line.decode())
        except (UnicodeDecodeError, ValueError):
            if number == len(lines):  # no newline after it: cut by a kill
                break
            record = None
        if not isinstance(record, dict):
            raise HarnessError(f"{path}: line {number} is not a JSON object; the log is damaged: repair it or move "
                               "its run folder away (the run starts again)")
        records.append(record)
    return records


def _flag_value(flags, name):
    """The value given to the last ``name`` in ``flags`` (None: not given)."""
    where = [i for i, token in enumerate(flags[:-1]) if token == name]
    return flags[where[-1] + 1] if where else None


def finished(run, flags, path):
    """A stage-1 run: its checkpoint exists and its log's last record is the last epoch of the last round;
    stage 2 (training or evaluating) and the joint model: its eval.json exists (written when the run ends);
    semi.py: its eval_semi.json, likewise."""
    if run.kind == "embed":
        records = read_log(os.path.join(path, LOGS[STAGE1]))
        rounds, epochs = int(_flag_value(flags, "--rounds")), int(_flag_value(flags, "--epochs"))
        return (os.path.exists(os.path.join(path, ENCODER)) and bool(records)
                and (records[-1].get("round"), records[-1].get("epoch")) == (rounds - 1, epochs - 1))
    return os.path.exists(os.path.join(path, EVALS.get(run.kind, files.EVAL)))


UNMATCHED = ("--data_dir", "--device")  # where the data are and what runs it: the same run either way


def matched(flags):
    """``flags`` without those that do not change a run (``UNMATCHED`` and their values)."""
    drop = {i for i, token in enumerate(flags) if token in UNMATCHED}
    return [t for i, t in enumerate(flags) if i not in drop and i - 1 not in drop]


def check_folder(run, flags, path):
    """The folder holds this command's run (or nothing): its command.json matches, or is written now."""
    record = {"script": run.script, "flags": matched(flags), "encoder": run.encoder}
    own = os.path.join(path, COMMAND)
    if os.path.exists(own):
        saved = read_json(own, f"delete it if {path} holds the run of this command (it is written again), else "
                               "move that folder away")
        if not isinstance(saved, dict):
            raise HarnessError(f"{own} is damaged (a JSON {type(saved).__name__}, not an object): delete it if {path} "
                               "holds the run of this command (it is written again), else move that folder away")
        if saved != record:
            raise HarnessError(f"{path} holds a run of another command ({' '.join(saved.get('flags', []))}); "
                               "choose another --out or move that folder away")
        return
    os.makedirs(path, exist_ok=True)
    with open(own, "w") as f:
        json.dump(record, f, indent=1)


def read_json(path, fix):
    """The JSON value of ``path`` (None: no such file); a file that cannot be read or parsed is one HarnessError
    naming it and saying ``fix``."""
    try:
        with open(path) as f:
            return json.load(f)
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as err:  # UnicodeDecodeError and JSONDecodeError are ValueErrors
        raise HarnessError(f"{path} is damaged ({type(err).__name__}): {fix}") from None


def read_number(cell, out, seed=0):
    """The measured number of ``cell`` at seed index ``seed`` (None where its file or key is absent); a damaged
    file, or a value that is not a finite number (a list of them for ``reduce``), is one HarnessError naming the
    file."""
    path = folder(out, cell.run, seed)
    if cell.source == "eval":
        source = os.path.join(path, EVALS.get(cell.run.kind, files.EVAL))
        saved = read_json(source, "delete it and run the same command again (the run is scored again)")
        if saved is not None and not isinstance(saved, dict):
            _damaged_number(source, cell.key, saved)
        value = None if saved is None else saved.get(cell.key)
    else:
        source = os.path.join(path, LOGS[cell.run.script])
        records = read_log(source)
        value = records[-1].get(cell.key) if records else None
    if value is None:
        return None
    if cell.reduce == "mean":
        if not isinstance(value, list) or not value or not all(map(_is_finite, value)):
            _damaged_number(source, cell.key, value)
        return sum(value) / len(value)
    return value if _is_finite(value) else _damaged_number(source, cell.key, value)


def _is_finite(value):
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _damaged_number(source, key, value):
    raise HarnessError(f"{source}: {key!r} holds {json.dumps(value)[:40]}, not a finite number: the file is damaged; "
                       "delete it (or its run folder) and run the same command again")


# ---- running -----------------------------------------------------------------------------------------

LIVE = set()  # the scripts running now (several with --jobs): told to stop when the harness is interrupted


def execute(argv, path, quiet=False, env=None):
    """Run ``argv``, its output appended to <folder>/output.log and shown indented (``quiet``: not shown, as
    when runs go on side by side); returns its exit status."""
    shown = [os.path.relpath(a) if os.path.isabs(a) and not os.path.relpath(a).startswith("..") else a
             for a in argv[1:]]
    if not quiet:
        print("    $ python " + " ".join(shown), flush=True)
    with open(os.path.join(path, OUTPUT), "a") as log, \
            subprocess.Popen(argv, stdout=log if quiet else subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                             bufsize=1, env=env, errors="backslashreplace") as proc:
        LIVE.add(proc)
        try:
            for line in proc.stdout or ():
                log.write(line)
                print("    | " + line, end="", flush=True)
            proc.wait()
        except KeyboardInterrupt as stop:  # in this thread (one job): Ctrl-C reached the script too; SIGTERM
            if isinstance(stop, Terminated) and proc.poll() is None:  # is passed on to it
                proc.send_signal(signal.SIGTERM)
            with uninterrupted(deliver=False):  # while it finishes its last write
                proc.wait()
            raise
        finally:
            LIVE.discard(proc)
    return proc.returncode


def error_line(path, offset):
    """The last ``error:`` line a script wrote to <folder>/output.log past ``offset`` (None: none)."""
    try:
        with open(os.path.join(path, OUTPUT), "rb") as f:
            f.seek(offset)
            lines = f.read().decode(errors="backslashreplace").splitlines()
    except OSError:
        return None
    errors = [line.strip() for line in lines if line.startswith("error: ")]
    return errors[-1] if errors else None


def run_one(run, flags, out, seed=0, quiet=False, env=None):
    """Bring ``run`` (at seed index ``seed``) to its end: skip it when finished, resume it from its last
    checkpoint, or start it. Returns the action taken ('skipped', 'resumed', 'ran') or 'failed (exit N)'; a
    script's own error line (bad input, a fault) is a HarnessError with its exit status."""
    path = folder(out, run, seed)
    check_folder(run, flags, path)
    if finished(run, flags, path):
        return "skipped"
    own = {"embed": ENCODER, "assign": LAST, "joint": JOINT_LAST, "semi": SEMI_LAST}.get(run.kind)
    resumable = own is not None and os.path.exists(os.path.join(path, own))
    # a run killed after its last epoch's checkpoint but before its report: the script, resumed, scores that
    # checkpoint and writes eval.json (eval_semi.json)
    log = os.path.join(path, OUTPUT)
    offset = os.path.getsize(log) if os.path.isfile(log) else 0
    status = execute(command(run, flags, out, resume=own if resumable else None, seed=seed), path, quiet, env)
    if status in (130, 143):  # the run was stopped by Ctrl-C or SIGTERM (also when they missed the harness)
        raise Terminated() if status == 143 else KeyboardInterrupt()
    error = error_line(path, offset) if status in (1, 2) else None
    if error:  # bad input or a fault outside the run: every later run would meet it too, so the harness stops
        raise HarnessError(f"{error.removeprefix('error: ')} (run {job_name(run, seed)}; its output: {log})", status)
    if status != 0:
        return f"failed (exit {status})"
    return "resumed" if resumable else "ran"


def chain(run):
    """``run`` after its encoder's chain: [stage 1, stage 2, semi.py] for Table 4's "our model" rows."""
    return (chain(RUNS[run.encoder]) if run.encoder else []) + [run]


def plan(tables, scale, dataset, extra, only, seeds=1):
    """The selected rows, and the runs they need, each once per seed: {job name: (run, flags, seed)}, seed 0's
    runs first (encoders first within a seed), then seed 1's."""
    rows = [(t, r) for t in tables for r in TABLES[t].rows if not only or f"{t}:{r.id}" in only]
    runs = {}
    for _, row in rows:
        for cell in row.cells:
            if cell is not None:
                for run in chain(cell.run):
                    runs.setdefault(run.name, run)
    ordered = sorted(runs.values(), key=lambda r: r.kind != "embed")
    return rows, {job_name(r, seed): (r, run_flags(r, scale, dataset, extra, seed), seed)
                  for seed in range(seeds) for r in ordered}


def estimate(runs, dataset, scale, step_seconds):
    """Training steps of every run at ``scale`` and, at ``step_seconds`` a step, the hours they take."""
    recipe = SCALES[scale]
    batch = int(_flag_value(recipe["common"], "--batch_size") or stage2.get_args_parser().get_default("batch_size"))
    subset = _flag_value(recipe["common"], "--subset")
    info = datasets.DATASETS.get(dataset)
    n1 = min(split_size(dataset, info.embed_split if info else "train"), int(subset or 10**9))
    n2 = min(split_size(dataset, info.cluster_split if info else "train"), int(subset or 10**9))
    total = 0
    for run, flags, _ in runs.values():
        if run.kind == "evaluate":
            continue
        epochs = int(_flag_value(flags, "--epochs")) * int(_flag_value(flags, "--rounds") or 1)
        if run.kind == "semi":  # an epoch: the labelled images once (the unlabelled ones beside them)
            labels = int(_flag_value(flags, "--labels_per_class")
                         or semi_script.PAPER_DEFAULTS.get(dataset, semi_script.OTHER_DEFAULTS)[0])
            semi_batch = int(_flag_value(flags, "--batch_size")
                             or semi_script.get_args_parser().get_default("batch_size"))
            classes = info.num_classes if info and info.num_classes else 10
            total += epochs * max(1, min(labels * classes, n1) // semi_batch)
            continue
        total += epochs * ((n1 if run.kind in ("embed", "joint") else n2) // batch)  # joint: stage 1's images
    hours = total * step_seconds / 3600
    return total, hours


def measured_step_seconds():
    """Seconds of one full step at batch 128, width 64, measured on this project's CPU reference
    (bench/results-cpu.json), or None."""
    try:
        with open(os.path.join(ROOT, "bench", "results-cpu.json")) as f:
            return json.load(f)["stage1_step_s"]
    except (OSError, KeyError, ValueError):
        return None


def fmt(x):
    return "-" if x is None else f"{x:.1f}" if isinstance(x, (int, float)) and math.isfinite(x) else str(x)


def measured_cell(cell, out, state_of, seeds):
    """A cell's numbers over the seeds: every seed's (None where its run did not finish), mean, std, n."""
    values = [read_number(cell, out, seed) if state_of(seed) in ("skipped", "ran", "resumed") else None
              for seed in range(seeds)]
    return {"values": values, **verdicts.summary(values)}


def write_tables(out, rows, runs, status, args):
    """tables.json (every row's cells: paper, each seed's number, mean, std, run folders, status; every claim's
    verdict), tables.md and tables.png."""
    seeds = args.seeds
    result = {"scale": args.scale, "dataset": args.dataset, "paper_dataset": "cifar10", "seeds": seeds,
              "verdict_rule": verdicts.RULE, "tables": {}, "claims": [], "runs": {}}
    for name, (run, flags, seed) in runs.items():
        result["runs"][name] = {"folder": folder(args.out, run, seed), "script": run.script, "flags": flags,
                                "encoder": run.encoder and job_name(RUNS[run.encoder], seed), "seed": seed,
                                "status": status[name]}
    lines = [f"# The paper's experiments at scale '{args.scale}' on {args.dataset}", "",
             "Paper: CIFAR-10 (Table 4: the data set's column where it has one), the paper's scale. Measured: "
             f"this run, mean ± standard deviation over the seeds (n: how many finished; {seeds} asked). "
             f"Verdicts: {verdicts.RULE}", ""]
    for table_id in dict.fromkeys(t for t, _ in rows):
        table = TABLES[table_id]
        shown_dataset = paper_dataset(table, args.dataset)
        entries = []
        lines += [f"## {table.title}", ""] + ([f"Paper: its {shown_dataset} column.", ""]
                                              if shown_dataset != "cifar10" else []) + [
                  "| row | " + " | ".join(f"{c} (paper) | {c} (measured)" for c in table.columns) + " | runs |",
                  "|---|" + "---|---|" * len(table.columns) + "---|"]
        for t, row in rows:
            if t != table_id:
                continue
            cells = []
            for column, cell in zip(table.columns, row.cells):
                if cell is None:
                    cells.append({"column": column, "paper": None, "measured": None, "values": [], "run": None})
                    continue
                state = status[job_name(cell.run)]
                numbers = measured_cell(cell, args.out, lambda k, c=cell: status[job_name(c.run, k)], seeds)
                cells.append({"column": column, "paper": paper_number(cell.paper, args.dataset),
                              "measured": numbers["mean"], **numbers,
                              "run": folder(args.out, cell.run), "runs": [folder(args.out, cell.run, k)
                                                                          for k in range(seeds)],
                              "source": f"{cell.source}:{cell.key}" + (f" ({cell.reduce})" if cell.reduce else ""),
                              "status": state})
            entries.append({"id": row.id, "name": row.name, "cells": cells})
            shown = [f"{fmt(c['paper'])} | " + (verdicts.spread(c) if c.get("measured") is not None
                                                else (c.get("status") or "-")) for c in cells]
            folders = ", ".join(dict.fromkeys(os.path.basename(c["run"]) for c in cells if c["run"]))
            lines.append(f"| {row.name} | " + " | ".join(shown) + f" | {folders} |")
        result["tables"][table_id] = {"title": table.title, "columns": list(table.columns),
                                      "paper_dataset": shown_dataset, "rows": entries}
        judged = judge(table_id, result["tables"][table_id])
        result["claims"] += judged
        if judged:
            lines += ["", "| the paper's claim | paper | measured difference (mean ± s.e., n) | verdict |",
                      "|---|---|---|---|"]
            lines += [f"| {c['claim']} | {fmt(c['paper_difference'])} | {verdicts.difference(c)} | "
                      f"**{c['verdict']}** |" for c in judged]
        lines.append("")
    result["head_swing"] = head_swing(args.out, runs, status)
    lines += swing_lines(result["head_swing"])
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "tables.json"), "w") as f:
        json.dump(result, f, indent=1)
    with open(os.path.join(args.out, "tables.md"), "w") as f:
        f.write("\n".join(lines))
    verdicts.plot(result, os.path.join(args.out, "tables.png"))
    verdicts.plot_curves(curves(args.out, runs, status), {k: t for k, (_, t) in CURVES.items()},
                         os.path.join(args.out, "curves.png"))
    return result


SWING_EPOCHS = 10  # the last epochs of each stage-2 run that the head swing is read over


def head_swing(out, runs, status, last=SWING_EPOCHS):
    """For every stage-2 training run, over its finished seeds and their last ``last`` epochs: how far the
    selected head (lowest training loss, the paper's rule and the default) is below the best of the five
    heads and above their mean, how often it is the best, and how much its accuracy moves from one epoch to
    the next (with how often the selection changes head). {run name: numbers}."""
    logs = {}
    for name, (run, _, seed) in runs.items():
        if run.kind == "assign" and status[name] in ("skipped", "ran", "resumed"):
            records = [r for r in read_log(os.path.join(folder(out, run, seed), LOGS[STAGE2])) if "head_acc" in r]
            if records:
                logs.setdefault(run.name, []).append(records[-last:])
    swing = {}
    for name, seeds in logs.items():
        gaps, above, best, moves, switches, pairs = [], [], 0, [], 0, 0
        for records in seeds:
            for r in records:
                selected = r["head_acc"][r["selected_head"]]
                gaps.append(max(r["head_acc"]) - selected)
                above.append(selected - sum(r["head_acc"]) / len(r["head_acc"]))
                best += selected == max(r["head_acc"])
            for a, b in zip(records, records[1:]):
                moves.append(abs(b["head_acc"][b["selected_head"]] - a["head_acc"][a["selected_head"]]))
                switches += a["selected_head"] != b["selected_head"]
                pairs += 1
        swing[name] = {"seeds": len(seeds), "epochs": len(gaps), "below_best_mean": sum(gaps) / len(gaps),
                       "below_best_max": max(gaps), "above_mean_of_heads": sum(above) / len(above),
                       "is_best": best / len(gaps), "epoch_to_epoch_mean": sum(moves) / len(moves) if moves else None,
                       "epoch_to_epoch_max": max(moves) if moves else None,
                       "switches": switches / pairs if pairs else None}
    return swing


CURVES = {"embed": ("knn_top1", "stage 1: kNN top-1 %"), "assign": ("acc", "stage 2: selected head ACC %"),
          "joint": ("acc", "joint model: selected head ACC %"), "semi": ("test_acc", "semi.py: test accuracy %")}


def curves(out, runs, status):
    """Every finished or cut run's number per epoch (the log's): {kind: {run name: {seed: [numbers]}}}, the
    epochs of all rounds in order for stage 1 and the joint model."""
    found = {}
    for name, (run, _, seed) in runs.items():
        key = CURVES.get(run.kind, (None,))[0]
        if key is None or not status[name]:
            continue
        records = read_log(os.path.join(folder(out, run, seed), LOGS[run.script]))
        values = [r[key] for r in records if r.get(key) is not None]
        if values:
            found.setdefault(run.kind, {}).setdefault(run.name, {})[seed] = values
    return found


def swing_lines(swing):
    """tables.md's section on the selected head's swing."""
    if not swing:
        return []
    lines = [f"## The selected head's swing (last {SWING_EPOCHS} epochs of each stage-2 run, all finished seeds)", "",
             "| run | seeds x epochs | below the best head: mean / max | above the heads' mean | is the best | "
             "epoch to epoch: mean / max change | selection changes head |", "|---|---|---|---|---|---|---|"]
    for name, w in swing.items():
        moves = "-" if w["epoch_to_epoch_mean"] is None else \
            f"{w['epoch_to_epoch_mean']:.1f} / {w['epoch_to_epoch_max']:.1f}"
        switches = "-" if w["switches"] is None else f"{100 * w['switches']:.0f}%"
        lines.append(f"| {name} | {w['seeds']} x {w['epochs'] // max(1, w['seeds'])} | {w['below_best_mean']:.1f} / "
                     f"{w['below_best_max']:.1f} | {w['above_mean_of_heads']:+.1f} | {100 * w['is_best']:.0f}% | "
                     f"{moves} | {switches} |")
    return lines + [""]


def judge(table_id, table):
    """The verdict of every claim of ``table_id`` whose two rows are in ``table`` (tables.json's entry)."""
    rows = {r["id"]: r for r in table["rows"]}
    judged = []
    for claim in CLAIMS:
        if claim.table != table_id or claim.better not in rows or claim.worse not in rows:
            continue
        better, worse = rows[claim.better]["cells"][claim.column], rows[claim.worse]["cells"][claim.column]
        verdict, diff, se, n = verdicts.verdict(better["values"], worse["values"])
        paper = (better["paper"] - worse["paper"] if better["paper"] is not None and worse["paper"] is not None
                 else None)
        column = f" ({table['columns'][claim.column]})" if len(table["columns"]) > 1 else ""
        judged.append({"table": table_id, "better": claim.better, "worse": claim.worse, "column": claim.column,
                       "claim": f"{rows[claim.better]['name']} > {rows[claim.worse]['name']}{column}",
                       "paper_difference": paper, "difference": diff, "standard_error": se, "n": n,
                       "verdict": verdict})
    return judged


def get_args_parser():
    p = ArgumentParser(description="Run the paper's experiments section with the real scripts")
    p.add_argument("--tables", nargs="+", default=list(TABLES), choices=list(TABLES), help="tables to run")
    p.add_argument("--rows", nargs="+", default=None, metavar="TABLE:ROW",
                   help="only these rows, e.g. 3:lambda0 3:two_stage (default: every row of --tables)")
    p.add_argument("--scale", default="cpu", choices=list(SCALES),
                   help="paper: the paper's epochs and network; cpu: about an hour on 2 CPU cores; fair: each "
                        "stage levelled off on 1,000 images (docs/results.md); tiny: tests")
    p.add_argument("--seeds", default=1, type=positive_int,
                   help="run every run with this many seeds (0: the scripts' default seed, k: --seed k) and "
                        "report mean ± standard deviation and a verdict per claim")
    p.add_argument("--dataset", default="cifar10", choices=list(datasets.DATASETS),
                   help="the scripts' --dataset (the paper's tables: cifar10)")
    p.add_argument("--out", default="runs/paper", help="folder of the runs and of tables.md / tables.json")
    p.add_argument("--data_dir", default=None, help="passed to the scripts")
    p.add_argument("--device", default=None, help="passed to the scripts")
    p.add_argument("--step_seconds", default=None, type=positive_float,
                   help="seconds per training step for the cost estimate (default with --scale paper: "
                        "bench/results-cpu.json's step at batch 128, width 64 on the project's 2-core CPU)")
    p.add_argument("--jobs", default=1, type=positive_int,
                   help="runs side by side (a run waits for its encoder): on a CPU, about one per core, each "
                        "on cores / jobs threads; their output goes to each run's output.log")
    p.add_argument("--dry_run", action="store_true", help="print the plan and the estimate; run nothing")
    return p


def main(args):
    """Check every flag, take <out>/paper.lock (one harness per --out; none with --dry_run, which writes
    nothing), then ``run_tables``."""
    check_args(args)
    if args.dry_run:
        return run_tables(args)
    with RunLock(args.out, name=LOCK, flag="--out"):
        return run_tables(args)


def run_tables(args):
    """The plan, its estimate, the runs (``run_all``) and the tables: (tables.json's content, failed runs)."""
    extra = (["--data_dir", args.data_dir] if args.data_dir else []) + (["--device", args.device] if args.device
                                                                       else [])
    rows, runs = plan(args.tables, args.scale, args.dataset, extra, set(args.rows or ()), args.seeds)
    step = args.step_seconds or (measured_step_seconds() if args.scale == "paper" else None)
    steps, hours = estimate(runs, args.dataset, args.scale, step or 0)
    seeds = f" ({args.seeds} seeds)" if args.seeds > 1 else ""
    print(f"{len(rows)} rows, {len(runs)} runs{seeds} at scale '{args.scale}' on {args.dataset}: {steps:,} training "
          "steps" + (f", about {hours:,.0f} hours at {step:.2f} s per step" if step else ""), flush=True)
    status = run_all(runs, args)
    if args.dry_run:
        return None, []
    result = write_tables(args.out, rows, runs, status, args)
    print(f"wrote {os.path.join(args.out, 'tables.md')}, tables.json, tables.png and curves.png")
    failed = [n for n, s in status.items() if s.startswith("failed") or s.startswith("encoder")]
    return result, failed


def ready(name, runs, status, dry_run):
    """Why ``name`` will not run (its encoder did not end) or None."""
    run, _, seed = runs[name]
    encoder = run.encoder and job_name(RUNS[run.encoder], seed)
    state = status.get(encoder, "skipped") if encoder else "skipped"
    if state not in ("skipped", "ran", "resumed") and not (dry_run and state == "planned"):
        return f"encoder {encoder}: {state}"
    return None


def run_all(runs, args):
    """Bring every run to its end in plan order, ``args.jobs`` at a time (a run starts once its encoder is
    done); returns {job name: status}. Side by side, each script's output goes to its output.log only, and
    each gets cores / jobs threads unless OMP_NUM_THREADS is set."""
    status, done, stopping = {}, {name: threading.Event() for name in runs}, threading.Event()
    quiet, env = args.jobs > 1, None
    if quiet and "OMP_NUM_THREADS" not in os.environ:
        env = {**os.environ, "OMP_NUM_THREADS": str(max(1, (os.cpu_count() or 1) // args.jobs))}

    def bring(i, name):
        run, flags, seed = runs[name]
        try:
            if run.encoder:
                done[job_name(RUNS[run.encoder], seed)].wait()
            if stopping.is_set():  # another run was interrupted: start nothing new
                return
            start, status[name] = time.time(), ready(name, runs, status, args.dry_run)
            if status[name] is None and args.dry_run:
                status[name] = "planned"
                print(f"[{i}/{len(runs)}] {name}: " + " ".join(command(run, flags, args.out, seed=seed)[1:]))
                return
            if status[name] is None:
                print(f"[{i}/{len(runs)}] {name}", flush=True)
                try:
                    status[name] = run_one(run, flags, args.out, seed, quiet, env)
                except BaseException:
                    stopping.set()
                    raise
            print(f"[{i}/{len(runs)}] {name}: {status[name]}"
                  + (f" ({time.time() - start:.0f} s)" if status[name] in ("ran", "resumed") else ""), flush=True)
        finally:
            status[name] = status.get(name) or "interrupted"
            done[name].set()

    side_by_side([lambda i=i, name=name: bring(i, name) for i, name in enumerate(runs, start=1)],
                 1 if args.dry_run else args.jobs, stopping)
    return status


def side_by_side(tasks, jobs, stopping):
    """Call ``tasks`` in order, ``jobs`` at a time; on an interruption or error (``stopping`` is set: the tasks
    not yet started return at once), the scripts still running are told to stop (SIGTERM: each checkpoints
    and exits 143) after 10 s to end by themselves."""
    if jobs == 1:
        for task in tasks:
            task()
        return
    pool = ThreadPoolExecutor(jobs)
    try:  # submitted in plan order: a run's encoder is taken from the queue before the run itself
        for future in [pool.submit(task) for task in tasks]:
            future.result()
    except BaseException:  # Ctrl-C (the scripts got it too), SIGTERM or an error: stop what still runs
        stopping.set()
        pool.shutdown(wait=False, cancel_futures=True)
        deadline = time.time() + (0 if isinstance(sys.exc_info()[1], Terminated) else 10)  # SIGTERM: not theirs
        while LIVE and time.time() < deadline:
            time.sleep(0.1)
        for proc in list(LIVE):
            proc.send_signal(signal.SIGTERM)
        pool.shutdown(wait=True)
        raise
    pool.shutdown()


RUNS = {}
for _table in TABLES.values():
    for _row in _table.rows:
        for _cell in _row.cells:
            if _cell is not None:  # one name, one run: rows that share a run share its folder
                assert RUNS.setdefault(_cell.run.name, _cell.run) == _cell.run, _cell.run.name
for _variant in ("super_and", "lemniscate", "and"):
    RUNS.setdefault(embed(_variant).name, embed(_variant))
for _encoder in (EMBED_WRN, ASSIGN_WRN):
    RUNS.setdefault(_encoder.name, _encoder)


def cli(argv=None):
    """The command line: ``main`` with every way of stopping one line on standard error and an exit status:
    bad input 2 (a script's error line: that script's status), a fault (a full disk) 1, Ctrl-C 130, SIGTERM
    143 (as Ctrl-C: the running script stopped, the finished runs kept), a failed run 1."""
    parsed = get_args_parser().parse_args(argv)
    try:
        with handle_signals():
            _, failures = main(parsed)
    except (HarnessError, InputError) as err:
        print(f"error: {err}", file=sys.stderr)
        raise SystemExit(getattr(err, "status", 2)) from None
    except OSError as err:
        print(f"error: {describe_fault(err)}; the finished runs are intact: run the same command again",
              file=sys.stderr)
        raise SystemExit(1) from None
    except KeyboardInterrupt as stop:
        terminated = isinstance(stop, Terminated) or getattr(stop, "terminated", False)
        print(f"{'terminated' if terminated else 'interrupted'}: run the same command again to continue (finished "
              "runs are skipped, the interrupted one resumed)", file=sys.stderr)
        raise SystemExit(143 if terminated else 130) from None
    raise SystemExit(1 if failures else 0)


if __name__ == "__main__":
    cli()
