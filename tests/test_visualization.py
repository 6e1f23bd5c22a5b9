"""Locality figures: what is drawn equals the model's own maps; PNG files; CLIs; TensorBoard."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from torch.utils.tensorboard import SummaryWriter

from dino_locat.checkpoint import load_pretrained_backbone, save_checkpoint
from dino_locat.models import build_backbone
from dino_locat.training import get_args_parser as train_parser
from dino_locat.training import main as train
from dino_locat.visualization import NO_GAUG_NOTE, locality_figures, log_locality_figures
from dino_locat.visualization.inputs import load_image_files

REPO = Path(__file__).resolve().parents[1]
TINY = {"img_size": 32, "patch_size": 8, "depth": 2}  # 4x4 grid, 3 heads (locatvit_t)


def load_cli(name: str):
    spec = importlib.util.spec_from_file_location(name, REPO / "eval" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def write_images(folder: Path, count: int) -> list[Path]:
    """Real image files on disk: a bright square at a different place in each."""
    paths = []
    for i in range(count):
        pixels = np.zeros((40, 40, 3), dtype=np.uint8)
        pixels[4 + 8 * i : 16 + 8 * i, 6:20] = (250, 200, 40)
        path = folder / f"image{i}.png"
        Image.fromarray(pixels).save(path)
        paths.append(path)
    return paths


def write_tiny_checkpoint(path: Path, arch: str, epoch: int, seed: int) -> torch.nn.Module:
    """A DINO-format checkpoint (backbone.* + head.* in student/teacher) of a tiny model."""
    torch.manual_seed(seed)
    backbone = build_backbone(arch, **TINY)
    with torch.no_grad():
        for block in backbone.blocks:
            if block.attn.gaug is not None:
                block.attn.gaug.log_alpha.bias.fill_(0.3 * seed)
                block.attn.gaug.log_var.bias.fill_(0.5 * seed)
    state = {f"backbone.{k}": v for k, v in backbone.state_dict().items()}
    state["head.last_layer.weight"] = torch.zeros(16, 8)
    save_checkpoint(
        {
            "student": state,
            "teacher": state,
            "epoch": epoch,
            "optimizer": {},
            "args": {"arch": arch, "patch_size": 8, "global_crops_size": 32},
        },
        path,
    )
    return backbone.eval()


def drawn(fig, rows: int, cols: int) -> np.ndarray:
    return np.array(fig.axes).reshape(rows, cols)


def png_size_and_spread(path: Path) -> tuple[tuple[int, int], float]:
    with Image.open(path) as image:
        return image.size, float(np.asarray(image.convert("L"), dtype=np.float32).std())


@pytest.fixture(scope="module")
def batch(tmp_path_factory) -> torch.Tensor:
    return load_image_files(write_images(tmp_path_factory.mktemp("img"), 2), 32)


def test_attention_panels_draw_the_models_cls_attention(batch):
    torch.manual_seed(0)
    model = build_backbone("locatvit_t", **TINY).eval()
    result = locality_figures(model, batch, threshold=0.6)
    with torch.no_grad():
        maps, (h, w) = model.get_attention_maps(batch)
    expected = maps[-1][:, :, 0, 1:].reshape(2, 3, h, w).numpy()
    np.testing.assert_allclose(result.cls_attention, expected, rtol=0, atol=0)
    axes = drawn(result.figures["cls_attention"], rows=4, cols=4)
    for i in range(2):
        for head in range(3):
            panel = axes[2 * i, 1 + head].images[0]
            np.testing.assert_array_equal(np.asarray(panel.get_array()), expected[i, head])
            assert panel.get_extent() == [0, 32, 32, 0]  # stretched over the whole image


def test_threshold_mask_keeps_fewest_patches_with_the_mass(batch):
    torch.manual_seed(1)
    result = locality_figures(build_backbone("locatvit_t", **TINY), batch, threshold=0.6)
    for att, keep in zip(
        result.cls_attention.reshape(-1, 16), result.masks.reshape(-1, 16), strict=True
    ):
        share = att / att.sum()
        assert share[keep].sum() >= 0.6
        assert share[keep].sum() - share[keep].min() < 0.6  # dropping any kept patch fails
        assert share[keep].min() >= share[~keep].max(initial=0)


def test_gaug_panels_draw_the_models_bias_and_var_alpha(batch):
    torch.manual_seed(2)
    model = build_backbone("locatvit_t", **TINY).eval()
    result = locality_figures(model, batch, queries=[(1, 2), (3, 0)])
    with torch.no_grad():
        biases, _ = model.get_gaussian_biases(batch)
    for q, (row, col) in enumerate([(1, 2), (3, 0)]):
        fig = result.figures[f"gaug_bias_img1_q{row}-{col}"]
        axes = drawn(fig, rows=2, cols=3)
        for block in range(2):
            for head in range(3):
                expected = biases[block][1, head, 1 + row * 4 + col, 1:].reshape(4, 4).numpy()
                np.testing.assert_array_equal(result.gaug_bias[1, q, block, head], expected)
                heat = axes[block, head].images[-1]
                np.testing.assert_array_equal(np.asarray(heat.get_array()), expected)
                assert expected[row, col] == expected.max()  # the bump sits on the query
    with torch.no_grad(), model.recording_gaug():
        model(batch)
    stats = model.gaug_statistics()
    for values, reference in zip(result.gaug, stats, strict=True):
        np.testing.assert_array_equal(values["var"], reference["var"].numpy())
        np.testing.assert_array_equal(values["alpha"], reference["alpha"].numpy())


def test_visualize_cli_writes_all_panels_for_locatvit(tmp_path, capsys):
    write_tiny_checkpoint(tmp_path / "checkpoint.pth", "locatvit_t", epoch=5, seed=1)
    images = write_images(tmp_path, 2)
    out = tmp_path / "figures"
    cli = load_cli("visualize")
    argv = ["--pretrained_weights", str(tmp_path / "checkpoint.pth"), "--output_dir", str(out)]
    cli.main(
        cli.get_args_parser().parse_args(
            argv + ["--images", *map(str, images), "--threshold", "0.6", "--bias_images", "2"]
        )
    )
    expected = {  # 150 px panels + a 90 px title band; summaries are 1000 x 450
        "cls_attention.png": (4 * 150, 4 * 150 + 90),  # 2 images x (attention + mask rows)
        "gaug_bias_img0_q2-2.png": (3 * 150, 2 * 150 + 90),  # blocks x heads
        "gaug_bias_img0_q0-0.png": (450, 390),
        "gaug_bias_img1_q2-2.png": (450, 390),
        "gaug_bias_img1_q0-0.png": (450, 390),
        "gaug_var_alpha.png": (1000, 450),
    }
    assert sorted(p.name for p in out.iterdir()) == sorted(expected)
    for name, size in expected.items():
        measured, spread = png_size_and_spread(out / name)
        assert measured == size, name
        assert spread > 5.0, f"{name} looks blank"
    assert "no GAug" not in capsys.readouterr().out


def test_visualize_cli_plain_vit_gets_attention_and_a_no_gaug_note(tmp_path, capsys):
    write_tiny_checkpoint(tmp_path / "vit.pth", "vit_t", epoch=1, seed=0)
    out = tmp_path / "figures"
    cli = load_cli("visualize")
    args = ["--pretrained_weights", str(tmp_path / "vit.pth"), "--output_dir", str(out)]
    cli.main(cli.get_args_parser().parse_args(args + ["--num_images", "3"]))
    assert [p.name for p in out.iterdir()] == ["cls_attention_no_gaug.png"]
    assert png_size_and_spread(out / "cls_attention_no_gaug.png")[0] == (600, 3 * 150 + 90)
    assert NO_GAUG_NOTE in capsys.readouterr().out
    torch.manual_seed(0)
    result = locality_figures(build_backbone("vit_t", **TINY), torch.randn(1, 3, 32, 32))
    assert list(result.figures) == ["cls_attention_no_gaug"] and result.note == NO_GAUG_NOTE
    texts = [t.get_text() for t in result.figures["cls_attention_no_gaug"].texts]
    assert any("no GAug" in t for t in texts)


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--query_patches", "4,0"], "--query_patches 4,0 lies outside the 4x4 patch grid"),
        (["--image_size", "30"], "--image_size 30 is not a multiple of the patch size 8"),
        (["--threshold", "1.5"], "--threshold must be in (0, 1]"),
    ],
)
def test_visualize_cli_bad_flags_exit_with_a_clear_message(tmp_path, capsys, extra, message):
    write_tiny_checkpoint(tmp_path / "checkpoint.pth", "locatvit_t", epoch=1, seed=0)
    cli = load_cli("visualize")
    argv = ["--pretrained_weights", str(tmp_path / "checkpoint.pth"), "--num_images", "1"]
    argv += ["--output_dir", str(tmp_path / "out"), *extra]
    with pytest.raises(SystemExit) as exit_info:
        cli.main(cli.get_args_parser().parse_args(argv))
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())


def test_visualize_cli_names_an_unreadable_image_or_missing_checkpoint(tmp_path, capsys):
    write_tiny_checkpoint(tmp_path / "checkpoint.pth", "locatvit_t", epoch=1, seed=0)
    broken = tmp_path / "broken.jpg"
    broken.write_bytes(b"not a jpeg")
    cli = load_cli("visualize")
    for weights, images, named in [
        (tmp_path / "checkpoint.pth", [str(broken)], "broken.jpg"),
        (tmp_path / "missing.pth", [], "missing.pth"),
    ]:
        argv = ["--pretrained_weights", str(weights), "--output_dir", str(tmp_path / "o")]
        argv += ["--images", *images] if images else []
        with pytest.raises(SystemExit) as exit_info:
            cli.main(cli.get_args_parser().parse_args(argv))
        assert exit_info.value.code == 2
        assert named in capsys.readouterr().err


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory) -> Path:
    """A real 2-epoch DINO run of a 2-block LocAtViT (checkpoints every epoch, figures)."""
    out = tmp_path_factory.mktemp("run")
    flags = "--arch locatvit_t --depth 2 --epochs 2 --subset 32 --batch_size_per_gpu 16"
    flags += " --out_dim 64 --local_crops_number 2 --warmup_epochs 1 --num_workers 0"
    flags += f" --saveckp_freq 1 --vis_freq 1 --print_freq 1 --output_dir {out}"
    train(train_parser().parse_args(flags.split()))
    return out


def test_trends_from_a_runs_checkpoints_match_direct_statistics(tiny_run, tmp_path):
    images = write_images(tmp_path, 3)
    cli = load_cli("gaug_trends")
    argv = ["--run_dir", str(tiny_run), "--output_dir", str(tmp_path / "out")]
    argv += ["--source", "checkpoints", "--images", *map(str, images)]
    cli.main(cli.get_args_parser().parse_args(argv))
    record = json.loads((tmp_path / "out" / "gaug_trends.json").read_text())
    assert record["epochs"] == [1, 2] and record["cap"] == 16.0  # 32 px / 8 px = 4x4 grid
    for row, name in enumerate(["checkpoint0000.pth", "checkpoint0001.pth"]):
        model, info = load_pretrained_backbone(tiny_run / name)
        assert info["epoch"] == row + 1
        with torch.no_grad(), model.recording_gaug():
            model(load_image_files(images, info["image_size"]))
        stats = model.gaug_statistics()
        var = [float(s["var_mean"]) for s in stats]
        alpha = [float(s["alpha_mean"]) for s in stats]
        np.testing.assert_allclose(record["var_mean"][row], var, rtol=1e-6)
        np.testing.assert_allclose(record["alpha_mean"][row], alpha, rtol=1e-6)
    assert record["var_mean"][0] != record["var_mean"][1]  # the weights did change
    size, spread = png_size_and_spread(tmp_path / "out" / "gaug_trends.png")
    assert size == (1000, 450) and spread > 5.0


def test_trends_from_a_runs_tensorboard_scalars(tiny_run, tmp_path):
    cli = load_cli("gaug_trends")
    argv = ["--run_dir", str(tiny_run), "--output_dir", str(tmp_path)]
    cli.main(cli.get_args_parser().parse_args(argv))  # auto: the scalars are there
    record = json.loads((tmp_path / "gaug_trends.json").read_text())
    assert record["x_label"] == "epoch (iteration / 2)"  # 32 images / batch 16
    assert record["epochs"] == [0.0, 0.5, 1.0, 1.5] and record["cap"] == 16.0
    events = EventAccumulator(str(tiny_run / "tensorboard"), size_guidance={"scalars": 0})
    events.Reload()
    for block in range(2):
        for stat in ("var", "alpha"):
            logged = [e.value for e in events.Scalars(f"gaug/{stat}_mean/block{block:02d}")]
            assert [row[block] for row in record[f"{stat}_mean"]] == pytest.approx(logged)
    assert png_size_and_spread(tmp_path / "gaug_trends.png")[0] == (1000, 450)


def test_training_run_logged_the_locality_figures(tiny_run):
    events = EventAccumulator(str(tiny_run / "tensorboard"), size_guidance={"images": 0})
    events.Reload()
    figures = events.Images("locality/cls_attention")
    assert [f.step for f in figures] == [1, 3]  # last step of each epoch (2 steps, vis_freq 1)
    assert "locality/gaug_var_alpha" in events.Tags()["images"]


def test_trends_from_tensorboard_scalars_without_epoch_info(tmp_path):
    writer = SummaryWriter(tmp_path / "run" / "tensorboard")
    for step in range(0, 6, 2):
        for block in range(2):
            writer.add_scalar(f"gaug/var_mean/block{block:02d}", 1.0 + step + block, step)
            writer.add_scalar(f"gaug/alpha_mean/block{block:02d}", 0.5 * step + block, step)
    writer.close()
    cli = load_cli("gaug_trends")
    cli.main(cli.get_args_parser().parse_args(["--run_dir", str(tmp_path / "run")]))
    record = json.loads((tmp_path / "run" / "gaug_trends.json").read_text())
    assert record["epochs"] == [0, 2, 4] and record["x_label"] == "training iteration"
    assert record["var_mean"] == [[1.0, 2.0], [3.0, 4.0], [5.0, 6.0]]
    assert record["alpha_mean"] == [[0.0, 1.0], [1.0, 2.0], [2.0, 3.0]]
    assert record["cap"] is None


def test_trends_cli_reports_a_run_without_data(tmp_path, capsys):
    cli = load_cli("gaug_trends")
    (tmp_path / "empty").mkdir()
    with pytest.raises(SystemExit) as exit_info:
        cli.main(cli.get_args_parser().parse_args(["--run_dir", str(tmp_path / "empty")]))
    assert exit_info.value.code == 2
    assert "no checkpoint*.pth files in" in capsys.readouterr().err


@pytest.mark.parametrize("arch", ["locatvit_t", "vit_t"])
def test_training_hook_writes_figures_and_histograms_to_tensorboard(tmp_path, batch, arch):
    torch.manual_seed(3)
    model = build_backbone(arch, **TINY).train()
    writer = SummaryWriter(tmp_path)
    log_locality_figures(writer, model, batch, step=7)
    writer.close()
    assert model.training  # the caller's mode is restored
    events = EventAccumulator(str(tmp_path), size_guidance={"images": 0, "histograms": 0})
    events.Reload()
    tags = events.Tags()
    if arch == "vit_t":
        assert tags["images"] == ["locality/cls_attention_no_gaug"] and tags["histograms"] == []
        return
    assert sorted(tags["images"]) == [
        "locality/cls_attention",
        "locality/gaug_bias_img0_q0-0",
        "locality/gaug_bias_img0_q2-2",
        "locality/gaug_var_alpha",
    ]
    image = events.Images("locality/gaug_var_alpha")[0]
    assert (image.step, image.width, image.height) == (7, 1000, 450)
    assert sorted(tags["histograms"]) == [
        f"locality/gaug_{s}/block{b:02d}" for s in ("alpha", "var") for b in range(2)
    ]
    with model.recording_gaug(), torch.no_grad():
        model.eval()(batch)
    alpha = model.gaug_statistics()[1]["alpha"]
    histogram = events.Histograms("locality/gaug_alpha/block01")[0].histogram_value
    assert histogram.num == alpha.numel()
    assert histogram.sum == pytest.approx(float(alpha.sum()), rel=1e-5)
