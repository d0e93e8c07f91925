"""Input checks: evaluation at the size a file was trained at, the bound and memory estimate of --image_size,
the cluster count stage 2 makes of an unlabelled folder, and the flags' help."""
import csv
import os
import re

import numpy as np
import pytest
import torch
from PIL import Image
from test_gradcam import load_tool

import datasets
import main as stage2
import super_and
from conftest import NARROW, SMALL_32, expect_error, run_main, write_released_embed
from engine import checks, cli
from lib.checkpoint import load_checkpoint, strip_prefix
from models import NETWORKS, MultiHeadNormFC, resnet18

TRAINED = 16  # the size the module's run is trained at (not the flag's default, 32)


@pytest.fixture(scope="module")
def run16(tmp_path_factory, one_thread):
    """Stage 1 and stage 2 (one epoch each) trained at 16 x 16 pixels."""
    out = tmp_path_factory.mktemp("run16")
    flags = SMALL_32 + ["--epochs", "1", "--image_size", TRAINED]
    run_main(super_and, flags + ["--rounds", "1", "--model_dir", out / "s1"])
    run_main(stage2, flags + ["--resume", out / "s1" / "ckpt_embed.t7", "--model_dir", out / "s2"])
    return out


def sizes_read(monkeypatch):
    """The --image_size of every ``datasets.from_args`` call from here on."""
    seen, from_args = [], datasets.from_args
    monkeypatch.setattr(datasets, "from_args", lambda args, *a, **kw: (seen.append(args.image_size),
                                                                        from_args(args, *a, **kw))[1])
    return seen


def selected_probabilities(ckpt, size):
    """The selected head's probability of each of the 64 training digits at ``size`` pixels, recomputed
    from the file's weights."""
    net = resnet18(low_dim=32, width=8)
    net.load_state_dict(strip_prefix(ckpt["net"]))
    heads = MultiHeadNormFC(32, 10)
    heads.load_state_dict(ckpt["fc"])
    data = datasets.build_dataset("digits", "./data", "train", subset=64, image_size=size)
    loader = datasets.make_loader(data, 100, False, 0, torch.device("cpu"))
    clusters = stage2.evaluate(net.eval(), heads, loader, torch.device("cpu"))
    return clusters["probs"][ckpt["selected_head"]].numpy()


def csv_probabilities(path):
    with open(path) as f:
        return np.array([float(row["probability"]) for row in csv.DictReader(f)])


# ---- 1. evaluation at the size the file was trained at ----

@pytest.mark.slow
def test_every_checkpoint_records_its_arguments(run16):
    files = [run16 / "s1" / "ckpt_embed.t7", run16 / "s2" / "ckpt_ul_last.t7", run16 / "s2" / "ckpt_ul.t7"]
    for path in files:
        saved = load_checkpoint(path)["args"]
        assert (saved["image_size"], saved["network"], saved["width"], saved["low_dim"]) == (16, "resnet18", 8, 32)
    for path in files[1:]:
        saved = load_checkpoint(path)["args"]
        assert (saved["tau_c"], saved["head_norm"]) == (0.1, "released")
    best = load_checkpoint(files[2])
    assert {"net", "fc", "acc_list", "selected_head", "epoch", "stage", "normalization"} <= set(best)  # released
    assert "optimizer" not in best  # still no training state: a best-epoch file is evaluated, not continued


@pytest.mark.slow
def test_stage2_test_only_evaluates_at_the_trained_size(run16, tmp_path, monkeypatch, capsys):
    ckpt = load_checkpoint(run16 / "s2" / "ckpt_ul.t7")
    seen = sizes_read(monkeypatch)
    csv_path = tmp_path / "pred.csv"
    summary = run_main(stage2, SMALL_32 + ["--test_only", "--resume", run16 / "s2" / "ckpt_ul.t7", "--model_dir",
                                           tmp_path / "eval", "--export_predictions", csv_path])
    assert seen == [TRAINED]
    assert "evaluating at" not in capsys.readouterr().out  # nothing to say: the trained size
    expected = selected_probabilities(ckpt, TRAINED)
    np.testing.assert_allclose(csv_probabilities(csv_path), expected, atol=2e-6)
    assert not np.allclose(selected_probabilities(ckpt, 32), expected, atol=1e-3)  # the size matters here
    assert summary["images"] == 64


@pytest.mark.slow
def test_stage2_test_only_at_a_size_given_says_so(run16, tmp_path, monkeypatch, capsys):
    ckpt = load_checkpoint(run16 / "s2" / "ckpt_ul.t7")
    seen = sizes_read(monkeypatch)
    csv_path = tmp_path / "pred.csv"
    run_main(stage2, SMALL_32 + ["--test_only", "--image_size", 24, "--resume", run16 / "s2" / "ckpt_ul.t7",
                                 "--model_dir", tmp_path / "eval", "--export_predictions", csv_path])
    assert seen == [24]
    lines = capsys.readouterr().out.splitlines()
    assert lines.count("evaluating at 24 px, trained at 16 px") == 1
    np.testing.assert_allclose(csv_probabilities(csv_path), selected_probabilities(ckpt, 24), atol=2e-6)


@pytest.mark.slow
def test_stage1_test_only_evaluates_at_the_trained_size(run16, monkeypatch, capsys):
    path = run16 / "s1" / "ckpt_embed.t7"
    seen = sizes_read(monkeypatch)
    args = super_and.get_args_parser().parse_args([str(a) for a in SMALL_32 + ["--test_only", "--resume", path]])
    top1 = super_and.main(args)
    assert seen == [TRAINED, TRAINED]  # the training split (the bank's images) and the test split
    assert args.image_size == 32  # the parsed flags are left alone
    assert top1 == pytest.approx(100 * load_checkpoint(path)["acc"], abs=1e-9)  # the run's own last kNN score
    assert "evaluating at" not in capsys.readouterr().out
    seen.clear()
    run_main(super_and, SMALL_32 + ["--test_only", "--image_size", 40, "--resume", path])
    assert seen == [40, 40]
    assert capsys.readouterr().out.splitlines().count("evaluating at 40 px, trained at 16 px") == 1


@pytest.mark.slow
def test_gradcam_uses_the_trained_size_of_the_best_file(run16, tmp_path, capsys):
    tool = load_tool()
    base = ["--resume", run16 / "s2" / "ckpt_ul.t7", "--dataset", "digits", "--subset", "20", "--per_class", "1",
            "--device", "cpu"]
    result = run_main(tool, base + ["--out", tmp_path / "a.png"])
    assert result["maps"]["layer4"].shape[-2:] == (TRAINED, TRAINED)  # upsampled to the input's size
    assert "evaluating at" not in capsys.readouterr().out
    result = run_main(tool, base + ["--out", tmp_path / "b.png", "--image_size", 24])
    assert result["maps"]["layer4"].shape[-2:] == (24, 24)
    assert "evaluating at 24 px, trained at 16 px" in capsys.readouterr().out.splitlines()


def test_a_file_without_arguments_keeps_the_flag():
    """Released files hold no ``args``: the flag (its default or the value given) is used as it is."""
    args = stage2.get_args_parser().parse_args(["--image_size", "48"])
    assert checks.evaluation_image_size(args, {"net": {}}, 32) is args and args.image_size == 48


# ---- 2. --image_size is bounded, and refused where it cannot fit ----

@pytest.mark.parametrize("module", [super_and, stage2])
@pytest.mark.parametrize("size", ["513", "1000", "1000000"])
def test_image_size_has_an_upper_bound(module, size, capsys):
    with pytest.raises(SystemExit) as exit_info:
        module.get_args_parser().parse_args(["--image_size", size])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and "outside [8, 512]" in err[0], err
    assert module.get_args_parser().parse_args(["--image_size", "512"]).image_size == 512
    assert module.get_args_parser().get_default("image_size") == 32
    assert "(default: 32)" in re.sub(r"\s+", " ", module.get_args_parser().format_help())


def test_gradcam_image_size_has_the_same_bound(capsys):
    parser = load_tool().get_args_parser()
    with pytest.raises(SystemExit) as exit_info:
        parser.parse_args(["--resume", "x.t7", "--image_size", "513"])
    assert exit_info.value.code == 2 and "outside [8, 512]" in capsys.readouterr().err
    assert parser.parse_args(["--resume", "x.t7", "--image_size", "512"]).image_size == cli.MAX_IMAGE_SIZE == 512


def test_memory_is_refused_before_anything_is_allocated(monkeypatch, tmp_path, capsys):
    """Too little free memory for the size: one line naming the estimate and the free memory, exit 2, before
    the data is read (so before the batch-size check that would otherwise answer first)."""
    monkeypatch.setattr(checks, "available_memory", lambda: 2**30)
    expect_error(capsys, super_and, NARROW + ["--width", "64", "--image_size", "256", "--subset", "8",
                                              "--batch_size", "64", "--model_dir", tmp_path],
                 "--image_size 256 needs about", "of host memory", "but 1.0 GiB is free", "activations")
    embed = tmp_path / "ckpt_embed.t7"
    write_released_embed(embed, 8)
    expect_error(capsys, stage2, ["--dataset", "digits", "--workers", "0", "--image_size", "256", "--subset", "8",
                                  "--batch_size", "64", "--resume", embed, "--model_dir", tmp_path],
                 "--image_size 256 needs about", "but 1.0 GiB is free")


def test_memory_estimate_terms(tmp_path):
    folder = tmp_path / "photos"
    (folder / ".cache").mkdir(parents=True)
    (folder / ".cache" / "old.npy").write_bytes(b"x")  # hidden: not an image
    for i in range(5):
        (folder / f"{i}.png").write_bytes(b"x")
    args = super_and.get_args_parser().parse_args(["--dataset", "folder", "--data_dir", str(folder), "--image_size",
                                                   "100", "--batch_size", "8", "--workers", "3"])
    need = checks.memory_estimate(args)
    assert need["data"] == 5 * 100 * 100 * 3  # the decoded cache, uint8
    assert need["batches"] == 6 * 16 * 3 * 100 * 100 * 4  # two per worker, 8 x 2 views, float32
    assert need["activations"] == checks.activation_bytes("resnet18", 64, 100, 16)
    args.amp = True  # bfloat16 activations: half the bytes
    assert checks.memory_estimate(args)["activations"] == need["activations"] // 2
    args.amp = False
    evaluation = checks.memory_estimate(args, train=False)
    assert evaluation["batches"] == 6 * 100 * 3 * 100 * 100 * 4
    args.dataset = "digits"  # a registered data set keeps its own size: only batches and activations grow
    assert checks.memory_estimate(args)["data"] == 0


@pytest.mark.parametrize("network", ["resnet18", "resnet101", "wrn28_2"])
def test_activation_estimate_against_what_autograd_keeps(network, one_thread):
    """The rough formula lies between the tensors one forward pass saves for the backward (measured with
    saved-tensor hooks) and twice that."""
    net = NETWORKS[network](low_dim=16, width=8)
    saved = {}

    def pack(t):
        saved[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        net(torch.randn(2, 3, 32, 32))
    params = {p.untyped_storage().data_ptr() for p in net.parameters()}
    measured = sum(n for ptr, n in saved.items() if ptr not in params)
    estimate = checks.activation_bytes(network, 8, 32, 2)
    assert measured <= estimate <= 1.5 * measured
    assert checks.activation_bytes(network, 8, 64, 2) == 4 * estimate  # grows with the pixels


def test_device_memory_is_checked_on_cuda(monkeypatch):
    monkeypatch.setattr(checks, "available_memory", lambda: 2**40)
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (2**29, 2**34))
    args = super_and.get_args_parser().parse_args(["--image_size", "128"])
    with pytest.raises(checks.InputError, match=r"of cuda:0 memory .* but 0\.5 GiB is free"):
        checks.check_memory(args, torch.device("cuda:0"))
    checks.check_memory(super_and.get_args_parser().parse_args(["--image_size", "8", "--batch_size", "2"]),
                        torch.device("cuda:0"))  # a small size fits


def test_available_memory_reads_meminfo():
    with open("/proc/meminfo") as f:
        line = next(line for line in f if line.startswith("MemAvailable:"))
    assert abs(checks.available_memory() - int(line.split()[1]) * 1024) < 2**30


# ---- 3. the clusters stage 2 makes of an unlabelled folder ----

@pytest.fixture(scope="module")
def flat64(tmp_path_factory):
    """A flat folder of 64 digits, and a released-layout stage-1 file for 64 images (no heads)."""
    out = tmp_path_factory.mktemp("flat")
    folder = out / "photos"
    folder.mkdir()
    data = datasets.build_dataset("digits", "./data", "train", subset=64)
    for i in range(64):
        Image.fromarray(np.asarray(data.data[i])).save(folder / f"{i:02d}.png")
    write_released_embed(out / "ckpt_embed.t7", 64)
    return folder, out / "ckpt_embed.t7"


@pytest.mark.slow
def test_stage2_refuses_more_clusters_than_images(flat64, tmp_path, capsys):
    folder, embed = flat64
    flags = ["--dataset", "folder", "--data_dir", folder, "--resume", embed, "--model_dir", tmp_path, "--workers", "0",
             "--batch_size", "64", "--epochs", "1"]
    expect_error(capsys, stage2, flags + ["--num_classes", "100"], "--num_classes 100 is more than the 64 images")
    expect_error(capsys, stage2, flags + ["--num_classes", "20", "--subset", "10"],
                 "--num_classes 20 is more than the 10 images")  # counted after --subset
    expect_error(capsys, stage2, flags, "pass --num_classes K")  # a stage-1 file has no heads to count


def test_is_flat_agrees_with_scan_on_a_link_to_itself(tmp_path):
    folder = tmp_path / "photos"
    folder.mkdir()
    for i in range(3):
        Image.fromarray(np.full((8, 8, 3), 40 * i, dtype=np.uint8)).save(folder / f"{i}.png")
    os.symlink(folder, folder / "again")
    files, targets, classes = datasets.folder.scan(str(folder))
    assert classes is None and len(files) == 3 and (targets == -1).all()
    assert datasets.folder.is_flat(str(folder))
    for name in ("a", "b"):  # real class folders: neither flat nor unlabelled
        (folder / name).mkdir()
        Image.fromarray(np.zeros((8, 8, 3), dtype=np.uint8)).save(folder / name / "x.png")
    assert datasets.folder.scan(str(folder))[2] == ("a", "b") and not datasets.folder.is_flat(str(folder))


# ---- 4. the help of --num_classes ----

@pytest.mark.parametrize("module", [super_and, stage2])
def test_num_classes_help_says_where_it_is_used(module):
    text = re.sub(r"\s+", " ", module.get_args_parser().format_help())
    assert "clusters to make of an unlabelled folder in stage 2 (>= 2); stage 1 ignores it" in text
