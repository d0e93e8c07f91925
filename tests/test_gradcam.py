"""Fig. 3's class activation maps (docs/method.md, "Class activation maps (Fig. 3)"): captum's Grad-CAM against
Grad-CAM written from its definition, the choice of correct and wrong images, the picture, and
tools/gradcam.py end to end on a stage-2 run of main.py."""
import importlib.util
import os

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

import datasets
from conftest import ROOT, expect_error, run_main
from models import MultiHeadNormFC, resnet18

pytestmark = pytest.mark.usefixtures("one_thread")
MEAN, STD = (0.4, 0.45, 0.5), (0.25, 0.2, 0.3)


def load_tool():
    spec = importlib.util.spec_from_file_location("gradcam_tool", os.path.join(ROOT, "tools", "gradcam.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


TOOL = load_tool()
DPI, TRUNKS, class_activation_maps, figure_inches, gradcam_figure, predict, select_cases = (
    TOOL.DPI, TOOL.TRUNKS, TOOL.class_activation_maps, TOOL.figure_inches, TOOL.gradcam_figure, TOOL.predict,
    TOOL.select_cases)


def png_size(path):
    with open(path, "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"
    return Image.open(path).size  # (width, height)


def expected_size(rows, per_class, labelled):
    width, height = figure_inches(rows, per_class, labelled)
    return round(width * DPI), round(height * DPI)


@pytest.fixture(scope="module")
def tiny():
    """A narrow two-trunk network, two frozen heads over 3 clusters, 12 synthetic 32x32 images (3 classes)."""
    torch.manual_seed(0)
    net, heads = resnet18(low_dim=8, width=4).eval(), MultiHeadNormFC(8, 3, num_heads=2)
    rng = np.random.default_rng(0)
    ys, xs = np.mgrid[:32, :32]
    images = []
    for _ in range(12):  # a bright square on noise, somewhere else in each image
        image = rng.integers(0, 80, (32, 32, 3))
        y, x = rng.integers(0, 24, 2)
        image[(ys >= y) & (ys < y + 8) & (xs >= x) & (xs < x + 8)] += 150
        images.append(image.astype(np.uint8))
    data = datasets.ImageDataset(np.stack(images), np.arange(12) % 3, datasets.eval_transform(MEAN, STD),
                                 num_classes=3, class_names=["a", "b", "c"], mean=MEAN, std=STD)
    return net, heads, data


def grad_cam_by_definition(net, head, image, cluster, suffix):
    """Grad-CAM (Selvaraju et al.) of the head's logit v·Ŵ_c/τ_c at the last stage of one trunk, written out:
    channel weights = spatial mean of the gradient, map = ReLU(sum of weighted activations), bilinear up."""
    x = image[None]
    inputs, acts, pooled = {"": x, "_sobel": net.sobel(x)}, {}, []
    for s in ("", "_sobel"):
        out = F.relu(getattr(net, "bn1" + s)(getattr(net, "conv1" + s)(inputs[s])))
        for stage in range(1, 5):
            out = getattr(net, f"layer{stage}{s}")(out)
        acts[s] = out
        pooled.append(out.mean(dim=(2, 3)))
    v = F.normalize(net.linear(torch.cat(pooled, dim=1)), dim=1)
    logit = (v @ head.normalized_weight() / head.temperature)[0, cluster]
    grad = torch.autograd.grad(logit, acts[suffix])[0]
    cam = F.relu((grad.mean(dim=(2, 3), keepdim=True) * acts[suffix]).sum(dim=1, keepdim=True))
    return F.interpolate(cam, size=tuple(image.shape[-2:]), mode="bilinear", align_corners=False)[0, 0]


def test_picture_and_maps(tiny, tmp_path):
    net, heads, data = tiny
    path = tmp_path / "gradcam.png"
    preds, probs = predict(net, heads.heads[1], data, torch.device("cpu"))
    mapping = np.array([2, 0, 1])
    result = gradcam_figure(net, heads, 1, data, mapping, 2, path)
    assert png_size(path) == expected_size(3, 2, labelled=True)
    shown = sorted({i for row in result["rows"] for i in row["success"] + row["failure"]})
    assert result["indexes"].tolist() == shown and len(shown) > 0
    np.testing.assert_array_equal(result["clusters"], preds[shown])  # the map is of the assigned cluster
    np.testing.assert_allclose(result["probs"], probs[shown])
    rgb, sobel = result["maps"]["layer4"], result["maps"]["layer4_sobel"]
    assert set(result["maps"]) == set(TRUNKS)
    for maps in (rgb, sobel):
        assert maps.shape == (len(shown), 32, 32)  # the image's spatial size
        assert np.isfinite(maps).all() and (maps >= 0).all()
        assert (maps.reshape(len(shown), -1).std(axis=1) > 0).all()  # every map varies over the image
    assert not np.allclose(rgb, sobel)  # the two trunks look at different things
    assert not net.training  # left in eval mode, as it came


def test_maps_are_grad_cam_of_the_assigned_logit(tiny):
    net, heads, data = tiny
    head = heads.heads[0]
    images = torch.stack([data[i]["image"] for i in range(4)])
    clusters = np.array([0, 2, 1, 2])  # any cluster, not only the argmax
    maps = class_activation_maps(net, head, images, clusters, batch_size=3)  # two batches
    for name, suffix in (("layer4", ""), ("layer4_sobel", "_sobel")):
        for i in range(4):
            expected = grad_cam_by_definition(net, head, images[i], int(clusters[i]), suffix).detach().numpy()
            assert expected.max() > 0
            np.testing.assert_allclose(maps[name][i], expected, rtol=1e-4, atol=1e-6 * expected.max())


def test_selection_of_correct_and_wrong_images():
    # mapping: cluster 0 -> class 2, cluster 1 -> class 0, cluster 2 -> class 1
    mapping = np.array([2, 0, 1])
    preds = np.array([1, 1, 1, 1, 0, 0, 2, 2, 2, 1])
    targets = np.array([0, 0, 1, 0, 2, 1, 1, 1, 0, 2])
    probs = np.array([0.9, 0.5, 0.99, 0.7, 0.8, 0.6, 0.3, 0.95, 0.4, 0.99])
    rows = select_cases(preds, probs, targets, mapping, per_class=2)
    assert rows == [
        {"class": 0, "cluster": 1, "success": [0, 3], "failure": [2, 9]},  # 0.99 tie: lower index first
        {"class": 1, "cluster": 2, "success": [7, 6], "failure": [8]},
        {"class": 2, "cluster": 0, "success": [4], "failure": [5]},
    ]
    unlabelled = select_cases(preds, probs, np.full(10, -1), None, per_class=2, num_clusters=4)
    assert [r["success"] for r in unlabelled] == [[4, 5], [2, 9], [7, 8], []]
    assert all(r["class"] is None and r["failure"] == [] for r in unlabelled)


def test_unlabelled_picture(tiny, tmp_path):
    net, heads, data = tiny
    flat = datasets.ImageDataset(data.data, np.full(12, -1), data.transform, num_classes=3, mean=MEAN, std=STD)
    result = gradcam_figure(net, heads, 0, flat, None, 3, tmp_path / "clusters.png")
    assert png_size(tmp_path / "clusters.png") == expected_size(3, 3, labelled=False)
    preds, probs = predict(net, heads.heads[0], flat, torch.device("cpu"))
    for row in result["rows"]:  # the most confident of each cluster, highest first
        members = np.flatnonzero(preds == row["cluster"])
        assert row["success"] == members[np.argsort(-probs[members], kind="stable")][:3].tolist()


# ---- tools/gradcam.py on a stage-2 checkpoint of main.py ----

@pytest.mark.slow
def test_tool_end_to_end(stage2_run, tmp_path, capsys):
    from lib.checkpoint import load_checkpoint, strip_prefix
    tool = load_tool()
    out = tmp_path / "fig3.png"
    result = run_main(tool, ["--resume", "ckpt_ul.t7", "--model_dir", stage2_run, "--dataset", "digits",
                             "--subset", "80", "--out", out, "--per_class", "2", "--device", "cpu"])
    assert "head " in capsys.readouterr().out
    assert png_size(out) == expected_size(10, 2, labelled=True)
    # recompute the selected head's clusters from the checkpoint, independently of the tool
    ckpt = load_checkpoint(stage2_run / "ckpt_ul.t7")
    net = resnet18(low_dim=32, width=8)
    net.load_state_dict(strip_prefix(ckpt["net"]))
    heads = MultiHeadNormFC(32, 10)
    heads.load_state_dict(ckpt["fc"])
    size = ckpt["args"]["image_size"]  # the tool evaluates at the size the file was trained at
    data = datasets.build_dataset("digits", "./data", "train", subset=80, image_size=size)
    preds, _ = predict(net, heads.heads[ckpt["selected_head"]], data, torch.device("cpu"))
    np.testing.assert_array_equal(result["clusters"], preds[result["indexes"]])
    targets = data.targets.numpy()
    for row in result["rows"]:
        assert all(targets[i] == row["class"] and preds[i] == row["cluster"] for i in row["success"])
        assert all(targets[i] != row["class"] and preds[i] == row["cluster"] for i in row["failure"])
    assert result["maps"]["layer4"].shape == (len(result["indexes"]), size, size)


@pytest.mark.slow
def test_tool_on_an_unlabelled_folder(stage2_run, tmp_path):
    folder = tmp_path / "photos"
    folder.mkdir()
    data = datasets.build_dataset("digits", "./data", "test", subset=12)
    for i in range(12):
        Image.fromarray(np.asarray(data.data[i])).save(folder / f"{i:02d}.png")
    out = tmp_path / "clusters.png"
    result = run_main(load_tool(), ["--resume", stage2_run / "ckpt_ul.t7", "--dataset", "folder",
                                    "--data_dir", folder, "--model_dir", tmp_path / "run", "--out", out])
    assert png_size(out) == expected_size(10, 2, labelled=False)
    assert all(row["class"] is None and row["failure"] == [] for row in result["rows"])
    assert sum(len(row["success"]) for row in result["rows"]) == len(result["indexes"]) > 0


@pytest.mark.slow
def test_tool_bad_input(stage1_ckpt, stage2_run, tmp_path, capsys):
    tool = load_tool()
    base = ["--model_dir", stage2_run, "--dataset", "digits", "--subset", "20"]
    expect_error(capsys, tool, base + ["--resume", "nothing.t7", "--out", tmp_path / "a.png"], "not found")
    expect_error(capsys, tool, ["--model_dir", stage1_ckpt.parent, "--dataset", "digits",
                                "--resume", "ckpt_embed.t7", "--out", tmp_path / "a.png"], "not a stage-2")
    expect_error(capsys, tool, base + ["--resume", "ckpt_ul.t7", "--head", "7", "--out", tmp_path / "a.png"],
                 "--head 7", "5 heads")
    expect_error(capsys, tool, base + ["--resume", "ckpt_ul.t7", "--out", tmp_path / "ckpt.t7"], "checkpoint")
    two_classes = tmp_path / "two"
    for name in ("cat", "dog"):
        (two_classes / name).mkdir(parents=True)
        for i in range(3):
            Image.fromarray(np.full((32, 32, 3), 60 * i, np.uint8)).save(two_classes / name / f"{i}.png")
    expect_error(capsys, tool, ["--resume", stage2_run / "ckpt_ul.t7", "--dataset", "folder", "--data_dir",
                                two_classes, "--model_dir", tmp_path / "run", "--out", tmp_path / "a.png"],
                 "10 clusters", "2 classes")


def test_a_full_device_is_an_error_naming_it_and_nothing_said_written(tiny):
    """The picture is drawn whole, then written whole: /dev/full (a full disk) is an OSError naming the file,
    which the command line turns into one line and exit 1 (engine.cli.run_cli) before any 'wrote'."""
    import errno

    from engine.lifecycle import describe_fault
    net, heads, data = tiny
    with pytest.raises(OSError) as failed:
        gradcam_figure(net, heads, 0, data, np.array([0, 1, 2]), 1, "/dev/full")
    assert failed.value.errno == errno.ENOSPC and failed.value.filename == "/dev/full"
    assert describe_fault(failed.value).startswith("cannot write /dev/full: no space left")


def test_tool_refuses_another_data_set_an_unbounded_per_class_and_a_run_file(tmp_path, capsys):
    """A checkpoint of digits explained on Fashion-MNIST, --per_class beyond TOOL.MAX_PER_CLASS, an --out that is
    another run's log (by name) or a copy of it (by content): one line, exit 2, nothing written."""
    from lib.checkpoint import save_checkpoint
    save_checkpoint({"net": {"linear.weight": torch.zeros(2, 2)}, "fc": {}, "args": {"dataset": "digits"}},
                    tmp_path / "ckpt_ul.t7")
    (tmp_path / "run").mkdir()
    log = tmp_path / "run" / "log_ul.jsonl"
    log.write_text('{"epoch": 0, "loss": 1.5}\n')
    (tmp_path / "copy.png").write_text('{"epoch": 0, "loss": 1.5}\n')
    base = ["--resume", "ckpt_ul.t7", "--model_dir", tmp_path, "--device", "cpu"]
    expect_error(capsys, TOOL, base + ["--dataset", "fashion-mnist", "--out", tmp_path / "a.png"],
                 "trained on digits, not --dataset fashion-mnist")
    expect_error(capsys, TOOL, base + ["--per_class", "100000", "--out", tmp_path / "a.png"], "--per_class",
                 f"outside [1, {TOOL.MAX_PER_CLASS}]")
    expect_error(capsys, TOOL, base + ["--out", log], "a run's file (log_ul.jsonl)")
    expect_error(capsys, TOOL, base + ["--out", tmp_path / "copy.png"], "is a run's log")
    assert sorted(os.listdir(tmp_path)) == ["ckpt_ul.t7", "copy.png", "run"]
    assert log.read_text() == (tmp_path / "copy.png").read_text() == '{"epoch": 0, "loss": 1.5}\n'


def test_a_network_without_the_sobel_trunk_is_one_line():
    from lib.errors import InputError
    from models import NETWORKS
    tool = load_tool()
    with pytest.raises(InputError, match="no Sobel trunk"):
        tool.architecture(NETWORKS["wrn28_2"](low_dim=8, width=8).state_dict())
    assert tool.architecture(resnet18(low_dim=8, width=4).state_dict()) == ("resnet18", 4, 8)
