"""Shared helpers: run the scripts in-process or as a process, and write released-layout checkpoints."""
import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LAYOUT = os.path.join(ROOT, "tests", "fixtures", "released_checkpoint_layout.json")
# small, fast settings: a narrow network on a few digits at 16 pixels (a quarter of the work at the scripts'
# default of 32, which NARROW_32 keeps: the tests of the default size and of numbers that need 32 pixels)
NARROW_32 = ["--dataset", "digits", "--width", "8", "--low_dim", "32", "--workers", "0"]
NARROW = NARROW_32 + ["--image_size", "16"]
# narrower still, for runs of one-step epochs: width 4, d = 16, at 16 pixels
NARROWEST = ["--dataset", "digits", "--width", "4", "--low_dim", "16", "--workers", "0", "--image_size", "16"]


def run_script(script, args, **kwargs):
    """Run ``script`` (super_and.py or main.py) as a separate process; returns CompletedProcess."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", **kwargs.pop("env", {})}  # tiny work: one thread (above)
    return subprocess.run([sys.executable, os.path.join(ROOT, script), *map(str, args)], cwd=ROOT,
                          capture_output=True, text=True, env=env, **kwargs)


def start_script(script, args, **kwargs):
    """Start ``script`` as a separate process (one thread, as ``run_script``); returns the Popen."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", **kwargs.pop("env", {})}
    return subprocess.Popen([sys.executable, os.path.join(ROOT, script), *map(str, args)], cwd=ROOT, text=True,
                            env=env, **kwargs)


def folder_bytes(folder):
    """Every file under ``folder`` and its bytes ({} for a folder that does not exist)."""
    out = {}
    for root, _, names in os.walk(folder):
        for name in names:
            path = os.path.join(root, name)
            with open(path, "rb") as f:
                out[os.path.relpath(path, folder)] = f.read()
    return out


def same_state(a, b, ignore=("args", "seconds"), where="checkpoint"):
    """Two loaded checkpoints hold the same values, tensor for tensor and bit for bit, apart from the keys
    ``ignore`` (the arguments a resumed run was started with, wall-clock times); an AssertionError names the
    first difference."""
    import torch
    assert type(a) is type(b), f"{where}: {type(a).__name__} vs {type(b).__name__}"
    if isinstance(a, dict):
        assert set(a) - set(ignore) == set(b) - set(ignore), f"{where}: keys {sorted(a)} vs {sorted(b)}"
        for key in set(a) - set(ignore):
            same_state(a[key], b[key], ignore, f"{where}.{key}")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), f"{where}: lengths {len(a)} vs {len(b)}"
        for i, (x, y) in enumerate(zip(a, b)):
            same_state(x, y, ignore, f"{where}[{i}]")
    elif torch.is_tensor(a):
        assert a.dtype == b.dtype and a.shape == b.shape and torch.equal(a, b), where
    else:
        assert a == b, f"{where}: {a!r} vs {b!r}"


def run_main(module, args):
    """Run ``module.main`` in this process through the same CLI wrapper as the command line."""
    from engine.cli import run_cli
    return run_cli(module.main, module.get_args_parser(), [str(a) for a in args])


def released_net_state(low_dim=128):
    """A full-width ResNet-18 state dict under the released names, with the 'module.' prefix."""
    import torch

    from models import resnet18
    torch.manual_seed(0)
    return {"module." + k: v.clone() for k, v in resnet18(low_dim=low_dim).state_dict().items()}


def write_released_embed(path, num_samples, low_dim=128):
    """A stage-1 file as the released code wrote it: legacy format, DataParallel keys, no training state."""
    import torch
    memory = torch.nn.functional.normalize(torch.randn(num_samples, low_dim), dim=1)
    ans = {"samples_num": torch.tensor(num_samples), "anchor_indexes": torch.arange(num_samples),
           "instance_indexes": torch.zeros(0, dtype=torch.long), "position": torch.arange(num_samples),
           "neighbours": torch.randint(num_samples, (num_samples, 1)), "entropy": torch.rand(num_samples),
           "consistency": torch.tensor(0.5)}
    state = {"net": released_net_state(low_dim), "npc": {"params": torch.tensor([0.1, 0.5]), "memory": memory},
             "ANs_discovery": ans, "acc": 0.5, "round": 4, "epoch": 199}
    torch.save(state, path, _use_new_zipfile_serialization=False)
    return state


def write_released_ul(path, num_classes=10, low_dim=128):
    """A stage-2 file as released: legacy format, 'module.' keys, five heads, acc_list."""
    import torch
    fc = {f"heads.{i}.weight": torch.randn(low_dim, num_classes) for i in range(5)}
    state = {"net": released_net_state(low_dim), "fc": fc, "acc_list": [10.0] * 5}
    torch.save(state, path, _use_new_zipfile_serialization=False)
    return state


@pytest.fixture(scope="session", autouse=True)
def one_thread():
    """The tests' networks and tensors are tiny: one thread is faster than two OpenMP threads waiting on
    each other, and far faster when the cores are shared (two threads on one free core spin). Every test
    has it; fixtures and modules that name it say that their numbers depend on it (the golden runs)."""
    import torch
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def pytest_unconfigure(config):
    """The test process ends: the objects it made need no collection on the way out (the collector's walk over
    what torch loaded is most of a second of each test process's exit, which ``make test`` waits for)."""
    import gc
    gc.freeze()


# the files of the longest end-to-end tests (tens of seconds each: the harness, joint.py's kill, semi.py's SIGTERM)
LONGEST = ("test_paper.py", "test_joint.py", "test_faults.py")


def pytest_collection_modifyitems(config, items):
    """The end-to-end (``slow``) tests first, those of ``LONGEST`` the first of them, then the files that hold
    such tests, each file's tests together: the two test processes then end on many short tests, each taking
    what the other still has queued (``--dist worksteal``), rather than one waiting on the other's long one.
    Tests marked ``cuda`` are skipped where PyTorch sees no CUDA device (``make gpu-check`` runs them)."""
    import torch
    heavy = {item.path for item in items if "slow" in item.keywords}
    items.sort(key=lambda item: ("slow" not in item.keywords, item.path not in heavy,
                                 LONGEST.index(item.path.name) if item.path.name in LONGEST else len(LONGEST),
                                 item.path))  # a stable sort
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device (make gpu-check runs it where there is one)")
    for item in items:
        if "cuda" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def layout():
    with open(LAYOUT) as f:
        return json.load(f)


def expect_error(capsys, module, args, *fragments):
    """Bad input: exit status 2 and one line on stderr, starting 'error: ' and naming each fragment."""
    with pytest.raises(SystemExit) as exit_info:
        run_main(module, args)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: "), err
    for fragment in fragments:
        assert fragment in err[0], err[0]


# ---- the data-set tests (tests/test_sources.py, test_registry.py, test_images.py, ...) ----

@pytest.fixture
def no_network(monkeypatch):
    """Any attempt to open a connection fails loudly (and would surface as an offline error); local
    (AF_UNIX) sockets stay, since DataLoader workers pass tensors through them."""
    import socket

    def refuse(*args, **kwargs):
        raise AssertionError("a test tried to use the network")

    def local_only(original):
        def connect(sock, *args, **kwargs):
            if sock.family == socket.AF_UNIX:
                return original(sock, *args, **kwargs)
            refuse()
        return connect
    monkeypatch.setattr(socket.socket, "connect", local_only(socket.socket.connect))
    monkeypatch.setattr(socket.socket, "connect_ex", local_only(socket.socket.connect_ex))
    monkeypatch.setattr(socket, "create_connection", refuse)


@pytest.fixture(scope="module")
def digits_train():
    """scikit-learn's bundled digits as the reader gives them: the 1,497 training images and labels."""
    from datasets import sources
    return sources.digits(".", "train")


@pytest.fixture(scope="module")
def digits_test():
    """The 300 test digits, images and labels."""
    from datasets import sources
    return sources.digits(".", "test")


# the project's top-level modules and packages (tests/ aside), as sys.modules names them
PROJECT_MODULES = {name.removesuffix(".py") for name in os.listdir(ROOT) if name != "tests" and (
    name.endswith(".py") or os.path.isdir(os.path.join(ROOT, name)) and not name.startswith("."))}


def draw_nothing(*args, **kwargs):
    """What ``skip_pictures`` puts in place of a ``plot_*`` function."""


_HOLDERS = [-1, []]  # the number of loaded modules when last searched, and the (module, name) pairs found


def skip_pictures(monkeypatch):
    """Replace main.py's ``plot_*`` functions, wherever a loaded module holds them, by one that draws
    nothing: the tests that check numbers do not pay matplotlib's seconds per run (test_outputs.py checks the
    pictures). The holders are searched again only when modules were loaded since the last search."""
    import main as stage2
    if len(sys.modules) != _HOLDERS[0]:
        drawers = {name: getattr(stage2, name) for name in dir(stage2) if name.startswith("plot_")}
        ours = [module for name, module in list(sys.modules.items()) if name.partition(".")[0] in PROJECT_MODULES]
        _HOLDERS[:] = [len(sys.modules), [  # the project's modules, not the tests' own calls
            (module, name) for module in ours for name, drawer in drawers.items()
            if getattr(module, name, None) in (drawer, draw_nothing)]]
    for module, name in _HOLDERS[1]:
        monkeypatch.setattr(module, name, draw_nothing)


@pytest.fixture(autouse=True)
def pictures_where_checked(request, monkeypatch):
    """A run in the test's process draws its pictures only in tests marked ``pictures`` (those that check them):
    elsewhere matplotlib's second or two per run buys nothing. Runs of session- and module-scoped fixtures and
    runs in processes of their own draw them."""
    if "pictures" not in request.keywords:
        skip_pictures(monkeypatch)


@pytest.fixture(scope="module")
def no_pictures():
    """``skip_pictures`` for a whole test module (module-scoped run fixtures included)."""
    with pytest.MonkeyPatch.context() as mp:
        skip_pictures(mp)
        yield


@pytest.fixture(scope="session", autouse=True)
def digits_read_once():
    """scikit-learn's digits decoded once per test process: the ``digits`` entry's reader keeps what it read and
    gives every later read the same read-only images and a copy of the labels (a tiny run then costs its
    training, not 0.2 s of image resizing and a 5 MB copy). The reader's own tests call
    ``datasets.sources.digits``; runs in processes of their own read as users' do."""
    import datasets
    reader = datasets.DATASETS["digits"].read
    read, kept = reader.read, {}

    def read_once(data_dir, part):
        if part not in kept:
            kept[part] = read(data_dir, part)
            kept[part][0].setflags(write=False)  # the images shared, read-only: a write fails loudly
        images, labels = kept[part]
        return images, labels.copy()
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(reader, "read", read_once)
        yield


SMALL = NARROW + ["--subset", "64", "--batch_size", "16"]  # 64 digits, 4 steps an epoch
SMALL_32 = NARROW_32 + ["--subset", "64", "--batch_size", "16"]


@pytest.fixture(scope="session")
def stage1_ckpt(tmp_path_factory):
    """A one-epoch stage-1 checkpoint on ``SMALL``, once per test process (tests read it, never write)."""
    import super_and
    out = tmp_path_factory.mktemp("s1")
    run_main(super_and, SMALL + ["--rounds", "1", "--epochs", "1", "--model_dir", out])
    return out / "ckpt_embed.t7"


@pytest.fixture(scope="session")
def stage2_run(stage1_ckpt, tmp_path_factory):
    """The folder of a one-epoch stage-2 run on ``SMALL`` from ``stage1_ckpt``, once per test process (tests
    may evaluate it there, never change its checkpoints or log)."""
    import main as stage2
    out = tmp_path_factory.mktemp("s2")
    run_main(stage2, SMALL + ["--epochs", "1", "--resume", stage1_ckpt, "--model_dir", out])
    return out
