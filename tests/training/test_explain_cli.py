"""``python -m training explain``: the occlusion overlay of one image, offline, and its user mistakes."""
import io
import subprocess
import sys

import pytest
from PIL import Image

from inference.explain import occlusion, render_overlay
from inference.images import read_image_file
from inference.transforms import EvalPreset, normalize
from tests.conftest import REPO, encode, pattern_image
from training.__main__ import cli, main
from training.checkpoint import ModelSpec, load_model, save_checkpoint


@pytest.fixture()
def photo(tmp_path):
    path = tmp_path / "photo.jpg"
    path.write_bytes(encode(pattern_image("circle", size=40, seed=4), "JPEG", quality=92))
    return path


def test_explain_writes_the_servers_overlay_for_the_eager_model(random_checkpoint, photo, tmp_path, capsys):
    out = tmp_path / "maps" / "photo_explained.png"
    assert main(["explain", "--checkpoint", str(random_checkpoint), "--image", str(photo), "--out", str(out),
                 "--grid", "5", "--device", "cpu"]) == 0
    printed = capsys.readouterr().out
    assert "5x5 occlusion map over the 24x24 input" in printed and str(out) in printed
    written = out.read_bytes()
    image = Image.open(io.BytesIO(written))
    assert image.format == "PNG" and image.size == (24, 24)
    # the same pixels and numbers as inference.explain on the evaluation view of the image
    spec, model = load_model(random_checkpoint)
    preset = EvalPreset(crop_size=spec.input_size, resize_size=spec.resize_size)
    canvas = preset(read_image_file(str(photo), min_side=preset.min_decode_side))[None]
    ref = occlusion(lambda x: model(normalize(x, mean=spec.mean, std=spec.std)), canvas, grid=5)
    assert ref.maps.abs().max() > 0
    assert written == render_overlay(canvas[0], ref.maps[0])
    assert spec.class_names[int(ref.indices[0])] in printed
    assert sorted(p.name for p in out.parent.iterdir()) == ["photo_explained.png"]  # no temporary left


SAID = {"missing checkpoint": "checkpoint not found: ", "not a checkpoint": "is not a checkpoint written by",
        "missing image": "image not found: ", "not an image": "not an image: ",
        "grid too large": "--grid must be 1 to 16", "grid finer than the input": "--grid 16 is larger than the "
        "model's input of 12 pixels"}


@pytest.mark.parametrize("case", SAID)
def test_user_mistakes_print_one_line_and_exit_2(case, random_checkpoint, photo, tmp_path, capsys):
    junk = tmp_path / "junk.bin"
    junk.write_bytes(b"hello, not a model nor an image")
    ckpt, image, grid = str(random_checkpoint), str(photo), "7"
    if case == "missing checkpoint":
        ckpt = str(tmp_path / "nope.pt")
    elif case == "not a checkpoint":
        ckpt = str(junk)
    elif case == "missing image":
        image = str(tmp_path / "nope.jpg")
    elif case == "not an image":
        image = str(junk)
    elif case == "grid too large":
        grid = "17"
    else:
        grid = "16"  # fits the 24 px model, not a 12 px one
        ckpt_12 = tmp_path / "small.pt"
        spec = ModelSpec(arch="cbam_resnet", class_names=["a", "b"], input_size=12, resize_size=12,
                         mean=(0.5, 0.5, 0.5), std=(0.25, 0.25, 0.25),
                         model_kwargs={"widths": [8, 8, 16, 16], "head_width": 32})
        save_checkpoint(ckpt_12, spec, spec.build())
        ckpt = str(ckpt_12)
    out = tmp_path / "out.png"
    assert cli(["explain", "--checkpoint", ckpt, "--image", image, "--out", str(out), "--grid", grid,
                "--device", "cpu"]) == 2  # as `python -m training` runs it
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and len(err.splitlines()) == 1 and "Traceback" not in err
    assert SAID[case] in err  # this mistake's own line, not another's
    assert not out.exists()


def test_help_names_every_option():
    proc = subprocess.run([sys.executable, "-m", "training", "explain", "--help"], cwd=REPO, capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 0
    for option in ("--checkpoint", "--image", "--out", "--grid", "--fill", "--views-per-forward", "--device"):
        assert option in proc.stdout
    assert "(default: 7)" in proc.stdout and "(default: mean)" in proc.stdout
