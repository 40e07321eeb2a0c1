"""README "Your own photos in five commands", run as written: split -> train -> evaluate -> export + archive ->
serve + curl, on a generated photo-like set at 224 px, ending with a real JPEG sent with curl to TorchServe.

The commands are parsed out of the README section's code block, so the README and this test cannot drift.
They run in a temporary folder (so their relative paths land there) with the repository on PYTHONPATH;
what differs from the README is only what a test must change: one epoch instead of the README's, the
server's ports (free ones instead of 8080-8082, through a copy of config.properties) and its private
run/log/state folders (hidden options of ``scripts.ts_server``), and the image curl sends (one of the
generated photos). It checks the path works, not the accuracy, and that it runs a second time (``--force``);
and, before the README's stop, that the served answers (the ONNX graph in TorchServe, posted with requests)
agree with ``python -m training predict`` (the eager checkpoint) on the same files: every photo, a 12 MP
phone-size copy stored sideways with an EXIF orientation, a PNG and one smaller than the crop.
"""
import csv
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import requests
from PIL import Image

from tools import REPO
from tools.torchserve import DEFAULT_CONFIG, free_ports, read_properties

pytestmark = pytest.mark.slow

SECTION = "## Your own photos in five commands"
README_PORT = "127.0.0.1:8080"
CLASSES = ("red_discs", "green_stripes", "blue_checks")
PER_CLASS = 12
SIZE = (300, 260)  # width, height: photo-like, not square, larger than the 256-px resize


def readme_commands() -> list[tuple[list[str], bool]]:
    """``(argv, background)`` of every command in the section's first ```bash block, in order."""
    text = (REPO / "README.md").read_text()
    assert SECTION in text, f"README has no section {SECTION!r}"
    section = text.split(SECTION, 1)[1].split("\n## ", 1)[0]
    block = re.search(r"```bash\n(.*?)```", section, re.S)
    assert block, "the section has no ```bash code block"
    commands = []
    for line in block.group(1).replace("\\\n", " ").splitlines():
        tokens = shlex.split(line, comments=True)
        background = bool(tokens) and tokens[-1] == "&"
        tokens = tokens[:-1] if background else tokens
        while tokens:
            cut = tokens.index("&&") if "&&" in tokens else len(tokens)
            commands.append((tokens[:cut], background and cut == len(tokens)))
            tokens = tokens[cut + 1:]
    return commands


def write_photos(root: Path) -> list[Path]:
    """``root/<class>/*.jpg``: discs on red, horizontal green stripes, blue checks; noisy, 300x260 JPEGs."""
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[:SIZE[1], :SIZE[0]]
    files = []
    for k, name in enumerate(CLASSES):
        (root / name).mkdir(parents=True)
        for i in range(PER_CLASS):
            if k == 0:
                cy, cx = rng.integers(60, 200, 2)
                mask = (yy - cy) ** 2 + (xx - cx) ** 2 < rng.integers(30, 70) ** 2
            elif k == 1:
                mask = ((yy + rng.integers(0, 40)) // 20) % 2 == 0
            else:
                step = int(rng.integers(15, 40))
                mask = ((yy // step) + (xx // step)) % 2 == 0
            base = np.zeros((SIZE[1], SIZE[0], 3))
            base[..., k] = 170
            img = np.where(mask[..., None], base + 70, base * 0.4) + rng.normal(0, 12, base.shape)
            path = root / name / f"IMG_{i:04d}.jpg"
            Image.fromarray(np.clip(img, 0, 255).astype(np.uint8)).save(path, quality=90)
            files.append(path)
    return files


def write_extra_photos(photos: list[Path], root: Path) -> list[Path]:
    """Payloads beyond the 300x260 JPEGs, as users send them: a 4032x3024 JPEG stored sideways (pixels 3024
    wide, EXIF orientation 6: shown upright), a PNG, and a 64x48 JPEG (smaller than the 224-px crop)."""
    root.mkdir()
    img = Image.open(photos[3]).convert("RGB")
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise to display: the stored pixels are the upright ones turned back
    big = img.resize((4032, 3024), Image.Resampling.BICUBIC).transpose(Image.Transpose.ROTATE_90)
    big.save(root / "phone_12mp.jpg", quality=90, exif=exif)
    Image.open(photos[PER_CLASS + 5]).save(root / "stripes.png")
    Image.open(photos[2 * PER_CLASS + 1]).resize((64, 48)).save(root / "small.jpg", quality=90)
    return sorted(root.iterdir())


def served_and_offline_agree(work: Path, port: int, files: list[Path], env: dict) -> None:
    """Each file's served top-1 (class, confidence) equals ``python -m training predict``'s on the same file."""
    served = {}
    links = work / "agreement"  # one folder holding exactly these files (the classes' files share names)
    links.mkdir()
    for k, f in enumerate(files):
        r = requests.post(f"http://127.0.0.1:{port}/predictions/mine", data=f.read_bytes(), timeout=60)
        assert r.status_code == 200, (f.name, r.status_code, r.text[:500])
        name = f"{k:03d}_{f.name}"
        served[name] = r.json()["predictions"][0]
        (links / name).symlink_to(f)
    out = work / "agreement.csv"
    proc = subprocess.run([sys.executable, "-m", "training", "predict", "--checkpoint", "runs/mine/best.pt",
                           "--images", str(links), "--out", str(out)], cwd=work, env=env, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    offline = {Path(row["path"]).name: row for row in csv.DictReader(out.open())}
    assert sorted(offline) == sorted(served)
    for name, answer in served.items():
        row = offline[name]
        assert answer["class"] == row["pred_name"] and answer["index"] == int(row["pred"]), (name, answer, row)
        assert abs(answer["confidence"] - float(row["confidence"])) < 1e-4, (name, answer, row)


def substitute(argv: list[str], *, work: Path, port: int, image: Path) -> list[str]:
    argv = list(argv)
    if argv[0] == "python":
        argv[0] = sys.executable
    if "--epochs" in argv:
        argv[argv.index("--epochs") + 1] = "1"
    if argv[0] == "curl":
        argv = [a.replace(README_PORT, f"127.0.0.1:{port}") for a in argv]
        argv = [f"@{image}" if a.startswith("@") else a for a in argv]
        argv += ["--max-time", "60", "-w", "\n%{http_code}"]
    if argv[1:3] == ["-m", "scripts.ts_server"]:
        argv += ["--state-file", str(work / "server.json")]
        if argv[3] == "serve":
            argv += ["--config", str(work / "config.properties"), "--run-dir", str(work / "ts_run"),
                     "--log-dir", str(work / "ts_logs")]
    return argv


def test_readme_block_is_the_five_steps():
    names = [" ".join(argv[:4]) for argv, _ in readme_commands()]
    assert [n for n in names if n.startswith("python")] == [
        "python -m training split", "python -m training train", "python -m training evaluate",
        "python -m export --checkpoint", "python -m export archive", "python -m scripts.ts_server serve",
        "python -m scripts.ts_server wait", "python -m scripts.ts_server stop"]
    assert any(n.startswith("curl") for n in names)


def test_own_photos_in_five_commands(tmp_path):
    work = tmp_path / "work"  # the README's relative paths (photos, data/mine, runs/mine, ...) land here
    work.mkdir()
    photos = write_photos(work / "photos")
    port, management, metrics, grpc, grpc_management = free_ports(5)
    props = read_properties(DEFAULT_CONFIG)
    props.update({"inference_address": f"http://127.0.0.1:{port}",
                  "management_address": f"http://127.0.0.1:{management}",
                  "metrics_address": f"http://127.0.0.1:{metrics}",
                  "grpc_inference_port": str(grpc), "grpc_management_port": str(grpc_management)})
    (work / "config.properties").write_text("".join(f"{k}={v}\n" for k, v in props.items()))
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]),
           "PATH": os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")])}
    server, log, answers = None, open(tmp_path / "serve.log", "w+"), []
    try:
        for argv, background in readme_commands():
            argv = substitute(argv, work=work, port=port, image=photos[PER_CLASS + 3])  # a green_stripes photo
            if argv[1:4] == ["-m", "scripts.ts_server", "stop"]:  # the server is still up: compare with offline
                served_and_offline_agree(work, port, photos + write_extra_photos(photos, work / "extra"), env)
            if background:
                server = subprocess.Popen(argv, cwd=work, env=env, stdout=log, stderr=subprocess.STDOUT,
                                          start_new_session=True)
                deadline = time.time() + 180
                while not (work / "server.json").is_file():  # written once every model has a READY worker
                    log.seek(0)
                    assert server.poll() is None, f"serve exited with {server.returncode}: {log.read()[-3000:]}"
                    assert time.time() < deadline, f"TorchServe not ready after 180 s: {log.read()[-3000:]}"
                    time.sleep(0.5)
                continue
            proc = subprocess.run(argv, cwd=work, env=env, capture_output=True, text=True, timeout=600)
            assert proc.returncode == 0, f"{shlex.join(argv)} failed ({proc.returncode}):\n{proc.stdout[-3000:]}" \
                                         f"\n{proc.stderr[-3000:]}"
            if argv[0] == "curl":
                answers.append(proc.stdout)
        if server is not None:
            server.wait(timeout=90)  # the README's stop ended it, by its PID
            assert server.returncode == 0
            server = None
        # run again (README: the block redoes every step), up to the archive: each replaces the earlier output
        first = (work / "runs" / "mine" / "best.pt").stat().st_mtime_ns
        for argv, background in readme_commands():
            if background:
                break
            argv = substitute(argv, work=work, port=port, image=photos[0])
            proc = subprocess.run(argv, cwd=work, env=env, capture_output=True, text=True, timeout=600)
            assert proc.returncode == 0, f"again: {shlex.join(argv)} failed ({proc.returncode}):\n{proc.stderr[-3000:]}"
        assert (work / "runs" / "mine" / "best.pt").stat().st_mtime_ns != first
    finally:
        if server is not None and server.poll() is None:  # a failure midway: stop what this test started
            state = work / "server.json"
            if state.is_file():
                try:
                    os.kill(json.loads(state.read_text())["pid"], 15)
                except ProcessLookupError:
                    pass
            try:
                server.wait(timeout=60)
            except subprocess.TimeoutExpired:
                os.killpg(server.pid, 9)
                server.wait()
        log.close()
    # every step wrote what the README says it writes
    assert sorted(p.name for p in (work / "data" / "mine").iterdir()) == ["split.json", "test", "train", "val"]
    assert (work / "runs" / "mine" / "best.pt").is_file() and (work / "runs" / "mine" / "test_metrics.json").is_file()
    assert (work / "runs" / "mine" / "eval" / "metrics.json").is_file()
    assert (work / "exports" / "mine" / "model.onnx").is_file() and (work / "model_store" / "mine.mar").is_file()
    config = (work / "runs" / "mine" / "config.yaml").read_text()
    assert "preset: photo" in config and "input_size: 224" in config
    # the served answer: HTTP 200, JSON predictions naming one of the classes
    assert len(answers) == 1
    body, status = answers[0].rsplit("\n", 1)
    assert status == "200", answers[0]
    predictions = json.loads(body)["predictions"]
    assert predictions and {p["class"] for p in predictions} <= set(CLASSES)
    assert not (work / "server.json").exists()  # stopped: the state file is gone
    shutil.rmtree(work / "ts_run", ignore_errors=True)
