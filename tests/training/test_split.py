"""training.split: ``python -m training split`` turns IMAGES/<class>/ into the train/val/test tree training reads."""
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import REPO, encode, pattern_image
from training import split as split_module
from training.__main__ import cli, main
from training.formats import build_splits, detect_format
from training.split import SPLIT_RECORD, split_counts

SIZES = {"circle": 10, "horizontal": 12, "vertical": 20}


def write_photos(root: Path, sizes: dict = SIZES) -> Path:
    for c, n in sizes.items():
        (root / c).mkdir(parents=True, exist_ok=True)
        for i in range(n):
            (root / c / f"img_{i:02d}.png").write_bytes(encode(pattern_image(c, size=12, seed=i)))
    return root


@pytest.fixture()
def photos(tmp_path):
    return write_photos(tmp_path / "photos")


def tree(out: Path) -> dict:
    """{split: {class: sorted file names}} as found on disk."""
    return {s.name: {c.name: sorted(f.name for f in c.iterdir()) for c in sorted(s.iterdir())}
            for s in sorted(out.iterdir()) if s.is_dir()}


def run(capsys, *args):
    code = cli(["split", *map(str, args)])  # as `python -m training` runs it
    out, err = capsys.readouterr()
    return code, out, err


def test_counts_cover_every_image_once_and_training_reads_the_layout(photos, tmp_path, capsys):
    out = tmp_path / "data" / "mine"  # the parent is created too
    code, stdout, err = run(capsys, "--images", photos, "--out", out)
    assert code == 0, err
    found = tree(out)
    assert list(found) == ["test", "train", "val"]
    for c, n in SIZES.items():
        n_train, n_val, n_test = split_counts(n, val=0.1, test=0.1)
        assert (len(found["train"][c]), len(found["val"][c]), len(found["test"][c])) == (n_train, n_val, n_test)
        names = found["train"][c] + found["val"][c] + found["test"][c]
        assert sorted(names) == sorted(p.name for p in (photos / c).iterdir())  # each image once, none lost
        for s in found:  # copies, byte for byte, not links
            for name in found[s][c]:
                assert not (out / s / c / name).is_symlink()
                assert (out / s / c / name).read_bytes() == (photos / c / name).read_bytes()
    # the summary table: a row per class and a total row, with the counts per split
    lines = stdout.splitlines()
    assert lines[0].split() == ["class", "train", "val", "test", "total"]
    assert lines[1].split() == ["circle", "8", "1", "1", "10"]
    assert lines[3].split() == ["vertical", "16", "2", "2", "20"]
    assert lines[4].split() == ["total", "34", "4", "4", "42"]
    record = json.loads((out / SPLIT_RECORD).read_text())
    assert record["seed"] == 0 and record["mode"] == "copy" and record["files"] == {s: found[s] for s in record["files"]}
    # what `train --data OUT` reads: ImageFolder, val/ (next to test/) is the validation split, not carved
    assert detect_format(out) == "imagefolder"
    splits = build_splits(out, cache=False, progress=False)
    assert not splits.val_carved and splits.val_name == str(out / "val")
    assert (len(splits.train), len(splits.val), len(splits.test)) == (34, 4, 4)
    assert splits.train.classes == sorted(SIZES)
    assert not [p for p in out.parent.iterdir() if p.name.startswith(".")]  # no temporary left


def test_stratified_by_class_at_other_fractions(photos, tmp_path, capsys):
    out = tmp_path / "out"
    assert run(capsys, "--images", photos, "--out", out, "--val", 0.2, "--test", 0.25)[0] == 0
    found = tree(out)
    for c, n in SIZES.items():  # each class by itself, its fractions rounded half up
        n_test, n_val = int(n * 0.25 + 0.5), int(n * 0.2 + 0.5)
        assert len(found["test"][c]) == n_test and len(found["val"][c]) == n_val
        assert len(found["train"][c]) == n - n_test - n_val
    # --val 0: no val/ folder; training then carves its own validation split
    out0 = tmp_path / "out0"
    assert run(capsys, "--images", photos, "--out", out0, "--val", 0)[0] == 0
    assert sorted(tree(out0)) == ["test", "train"]
    assert build_splits(out0, cache=False, progress=False).val_carved


def test_seed_determinism(photos, tmp_path, capsys):
    def split(name, *extra):
        out = tmp_path / name
        assert run(capsys, "--images", photos, "--out", out, *extra)[0] == 0
        return tree(out)

    first, again, other = split("a", "--seed", 3), split("b", "--seed", 3), split("c", "--seed", 4)
    assert first == again
    assert other != first
    # the test images are drawn first: another --val keeps them
    assert split("d", "--seed", 3, "--val", 0.3)["test"] == first["test"]
    # each class is shuffled by itself: adding a class moves no other class's image
    write_photos(photos, {"zigzag": 6})
    more = split("e", "--seed", 3)
    assert all(more[s][c] == first[s][c] for s in first for c in first[s])
    assert {len(more[s]["zigzag"]) for s in more} == {4, 1}


def test_symlink_mode(photos, tmp_path, capsys):
    out = tmp_path / "links"
    assert run(capsys, "--images", photos, "--out", out, "--mode", "symlink")[0] == 0
    files = [p for p in out.rglob("*.png")]
    assert len(files) == sum(SIZES.values())
    for p in files:
        assert p.is_symlink() and Path(os.readlink(p)) == (photos / p.parent.name / p.name).resolve()
        assert p.read_bytes() == (photos / p.parent.name / p.name).read_bytes()
    assert json.loads((out / SPLIT_RECORD).read_text())["mode"] == "symlink"


def one_error_line(err: str) -> str:
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and "Traceback" not in err, err
    return lines[0]


def test_refusals_print_one_line_and_exit_2(photos, tmp_path, capsys):
    code, _, err = run(capsys, "--images", tmp_path / "absent", "--out", tmp_path / "o1")
    assert code == 2 and "folder not found" in one_error_line(err)
    # classes too small for one image per split: every such class is named
    write_photos(photos, {"tiny": 2, "single": 1})
    code, _, err = run(capsys, "--images", photos, "--out", tmp_path / "o2")
    line = one_error_line(err)
    assert code == 2 and "'tiny' has 2" in line and "'single' has 1" in line and "at least 3" in line
    assert not (tmp_path / "o2").exists()
    shutil.rmtree(photos / "tiny")
    shutil.rmtree(photos / "single")
    # fractions: no test split, or nothing left for training
    code, _, err = run(capsys, "--images", photos, "--out", tmp_path / "o3", "--test", 0)
    assert code == 2 and "--test" in one_error_line(err)
    code, _, err = run(capsys, "--images", photos, "--out", tmp_path / "o3", "--val", 0.5, "--test", 0.5)
    assert code == 2 and "leave no training images" in one_error_line(err)
    # images without class folders
    flat = tmp_path / "flat"
    flat.mkdir()
    (flat / "a.png").write_bytes(encode(pattern_image("circle", size=8)))
    code, _, err = run(capsys, "--images", flat, "--out", tmp_path / "o4")
    assert code == 2 and "no class folders" in one_error_line(err)
    # an output inside the images
    code, _, err = run(capsys, "--images", photos, "--out", photos / "split")
    assert code == 2 and "overlap" in one_error_line(err)
    # a non-empty folder that is not a split, even with --force
    other = tmp_path / "other"
    other.mkdir()
    (other / "notes.txt").write_text("mine")
    for extra in ([], ["--force"]):
        code, _, err = run(capsys, "--images", photos, "--out", other, *extra)
        assert code == 2 and "holds no split" in one_error_line(err)
    assert [p.name for p in other.iterdir()] == ["notes.txt"]


def test_an_existing_split_is_refused_and_replaced_whole_with_force(photos, tmp_path, capsys):
    out = tmp_path / "out"
    assert run(capsys, "--images", photos, "--out", out, "--seed", 0)[0] == 0
    before = tree(out)
    code, _, err = run(capsys, "--images", photos, "--out", out, "--seed", 1)
    assert code == 2 and "already holds a split" in one_error_line(err) and "--force" in err
    assert tree(out) == before  # untouched
    assert run(capsys, "--images", photos, "--out", out, "--seed", 1, "--force")[0] == 0
    after = tree(out)
    assert after != before
    for c in SIZES:  # no image of the first split survives next to the second: never two splits mixed
        names = after["train"][c] + after["val"][c] + after["test"][c]
        assert sorted(names) == sorted(set(names)) and len(names) == SIZES[c]
    assert json.loads((out / SPLIT_RECORD).read_text())["seed"] == 1
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]
    # an empty --out folder is simply filled
    empty = tmp_path / "empty"
    empty.mkdir()
    assert run(capsys, "--images", photos, "--out", empty)[0] == 0 and sorted(tree(empty)) == ["test", "train", "val"]


def test_an_interrupted_split_leaves_nothing_half_written(photos, tmp_path, capsys, monkeypatch):
    copied = []
    real_copy = shutil.copy2

    def copy_then_fail(src, dst):
        if len(copied) == 7:
            raise KeyboardInterrupt  # Ctrl-C in the middle of the copies
        copied.append(dst)
        return real_copy(src, dst)

    monkeypatch.setattr(split_module.shutil, "copy2", copy_then_fail)
    out = tmp_path / "out"
    with pytest.raises(KeyboardInterrupt):
        main(["split", "--images", str(photos), "--out", str(out)])
    assert len(copied) == 7 and not out.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["photos"]  # the temporary tree is gone too
    # an interrupted --force keeps the earlier split whole
    monkeypatch.setattr(split_module.shutil, "copy2", real_copy)
    assert run(capsys, "--images", photos, "--out", out)[0] == 0
    before = tree(out)
    copied.clear()
    monkeypatch.setattr(split_module.shutil, "copy2", copy_then_fail)
    with pytest.raises(KeyboardInterrupt):
        main(["split", "--images", str(photos), "--out", str(out), "--seed", "5", "--force"])
    assert tree(out) == before and sorted(p.name for p in tmp_path.iterdir()) == ["out", "photos"]


def test_what_a_killed_split_left_is_cleaned_up(photos, tmp_path, capsys):
    dead = 2 ** 30  # above any pid_max: no such process
    stale = tmp_path / f".out.{dead}.abc.tmp"
    (stale / "train" / "circle").mkdir(parents=True)
    out = tmp_path / "out"
    assert run(capsys, "--images", photos, "--out", out)[0] == 0
    assert not stale.exists()
    # killed after moving the old split aside, before renaming the new one in: the old one comes back
    aside = tmp_path / f".out.{dead}.old-xyz.tmp"
    before = tree(out)
    os.rename(out, aside)
    code, _, err = run(capsys, "--images", photos, "--out", out, "--seed", 9)
    assert code == 2 and "already holds a split" in err
    assert tree(out) == before and not aside.exists()
    # what the versions before 2026-12-06 left: .OUT.split-PID-* and .OUT.old-PID-*/split
    legacy = tmp_path / f".out.old-{dead}-xyz_1234"  # tempfile.mkdtemp's 8 characters after the prefix
    legacy.mkdir()
    os.rename(out, legacy / "split")
    (tmp_path / f".out.split-{dead}-abcd0123").mkdir()
    code, _, err = run(capsys, "--images", photos, "--out", out, "--seed", 9)
    assert code == 2 and "already holds a split" in err
    assert tree(out) == before and sorted(p.name for p in tmp_path.iterdir()) == ["out", "photos"]
    # a folder of the user's that merely looks like one (".out.old-2024-05": "2024" is no PID of ours) stays
    mine = tmp_path / ".out.old-2024-05"
    (mine / "keep").mkdir(parents=True)
    (mine / "keep" / "notes.txt").write_text("precious")
    code, _, err = run(capsys, "--images", photos, "--out", out, "--seed", 9, "--force")
    assert code == 0 and (mine / "keep" / "notes.txt").read_text() == "precious"


def test_the_command_exits_2_without_a_traceback(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "training", "split", "--images", str(tmp_path / "none"),
                           "--out", str(tmp_path / "out")], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and proc.stdout == ""
    assert one_error_line(proc.stderr) == f"error: --images {tmp_path / 'none'}: folder not found (expected " \
                                          "IMAGES/<class>/<image files>)"


def test_a_data_set_of_the_users_own_is_never_replaced_even_with_force(photos, tmp_path, capsys):
    """train/ + val/ + test/ without split.json counted as "a split": the user, told to pass --force, lost their
    own data set (found by review 2026-12-07). Only a folder with the split's record is ours to replace."""
    mine = tmp_path / "mine"
    for split in ("train", "val", "test"):
        (mine / split / "cat").mkdir(parents=True)
        (mine / split / "cat" / "photo.jpg").write_bytes(b"the user's photo")
    for extra in ([], ["--force"]):
        code, _, err = run(capsys, "--images", photos, "--out", mine, *extra)
        assert code == 2 and "no split.json" in one_error_line(err) and "choose a new folder" in err
    assert sorted(p.name for p in mine.iterdir()) == ["test", "train", "val"]
    assert (mine / "train" / "cat" / "photo.jpg").read_bytes() == b"the user's photo"


def test_what_a_file_browser_leaves_is_not_the_users_data(photos, tmp_path, capsys):
    """Finder's .DS_Store in --out made `split --force` refuse ("holds more than a split"), and a new --out
    folder holding only .DS_Store was "not empty"."""
    out = tmp_path / "out"
    out.mkdir()
    (out / ".DS_Store").write_bytes(b"\0\0\0\1Bud1")
    assert run(capsys, "--images", photos, "--out", out)[0] == 0
    (out / ".DS_Store").write_bytes(b"\0\0\0\1Bud1")
    (out / "train" / "._circle").write_bytes(b"AppleDouble")
    assert run(capsys, "--images", photos, "--out", out, "--seed", 1, "--force")[0] == 0
    assert sorted(p.name for p in out.iterdir()) == ["split.json", "test", "train", "val"]


def test_one_class_is_refused_and_unread_file_types_are_named(tmp_path, capsys):
    photos = write_photos(tmp_path / "photos", {"circle": 10})
    code, _, err = run(capsys, "--images", photos, "--out", tmp_path / "o")
    assert code == 2 and "a classifier needs at least 2 classes" in one_error_line(err)
    write_photos(photos, {"vertical": 10})
    for i in range(3):
        (photos / "vertical" / f"IMG_{i}.HEIC").write_bytes(b"\0\0\0\x18ftypheic")
    (photos / "vertical" / "._img_00.png").write_bytes(b"AppleDouble")  # hidden: neither read nor named
    code, _, err = run(capsys, "--images", photos, "--out", tmp_path / "o")
    assert code == 0 and "warning: files of types that are not read are left out (3 .heic)" in err
    assert "HEIC to JPEG" in err and "._img" not in err
    assert not any(name.startswith("._") for name in os.listdir(tmp_path / "o" / "train" / "vertical"))


def test_identical_photos_stay_in_one_split_and_one_photo_in_two_classes_is_named(photos, tmp_path, capsys):
    """A photo imported twice ("img_03 (1).png") was a coin toss away from being trained on and tested on;
    each set of identical files now lands in one split (counted as one photo). One photo in two classes is
    named. Without copies the plan is the one the seed gave before."""
    out = tmp_path / "out"
    assert run(capsys, "--images", photos, "--out", out)[0] == 0
    before = tree(out)
    for i in range(8):  # every third vertical photo imported again, and one twice
        shutil.copy(photos / "vertical" / f"img_{i:02d}.png", photos / "vertical" / f"img_{i:02d} (1).png")
    shutil.copy(photos / "vertical" / "img_03.png", photos / "vertical" / "img_03 (2).png")
    shutil.copy(photos / "circle" / "img_05.png", photos / "horizontal" / "img_05_from_circle.png")
    code, _, err = run(capsys, "--images", photos, "--out", out, "--force")
    assert code == 0
    assert "9 photos are copies (identical bytes) of another in their class" in err
    assert "1 photos are filed under more than one class" in err and "circle/img_05.png" in err
    where = {f: s for s, per_class in tree(out).items() for f in per_class.get("vertical", [])}
    for i in range(8):
        assert where[f"img_{i:02d}.png"] == where[f"img_{i:02d} (1).png"], i
    assert where["img_03.png"] == where["img_03 (2).png"]
    counts = {s: len(per_class["vertical"]) for s, per_class in tree(out).items()}
    assert sum(counts.values()) == 29 and counts["test"] >= 2 and counts["val"] >= 2  # 20 distinct: 2, 2, 16
    assert tree(out)["train"]["circle"] == before["train"]["circle"]  # no copies in this class: as before


def test_names_of_undecodable_bytes(photos, tmp_path, capsys):
    """A zip made on Windows and unpacked here leaves names of bytes that are not UTF-8: a class folder of such a
    name is refused in one line (rename it); a photo of such a name is split, trained on (the split's digest)
    and predicted, its name written back as the same bytes."""
    from training.datasets import paths_digest
    from training.reports import write_predictions_csv
    odd = os.fsdecode(b"IMG_\xe9t\xe9.png")
    shutil.copy(photos / "circle" / "img_00.png", photos / "circle" / odd)
    out = tmp_path / "out"
    code, _, err = run(capsys, "--images", photos, "--out", out)
    assert code == 0, err
    split_of = {s: f for s, per_class in tree(out).items() for f in per_class["circle"] if f == odd}
    assert len(split_of) == 1
    assert len(paths_digest([str(out / "train" / "circle" / odd)], [0], root=str(out / "train"))) == 16
    csv_path = write_predictions_csv(tmp_path / "p.csv", [str(photos / "circle" / odd)], None,
                                     [[0.9, 0.1]], ["a", "b"])
    assert b"IMG_\xe9t\xe9.png" in Path(csv_path).read_bytes()
    os.mkdir(photos / os.fsdecode(b"caf\xe9"))
    code, _, err = run(capsys, "--images", photos, "--out", tmp_path / "out2")
    assert code == 2 and "its name is not valid UTF-8 text" in err and "rename it" in err


def test_an_out_that_links_to_another_disk_is_filled_through_the_link(photos, tmp_path, capsys):
    """data/mine -> ../bigdisk/mine: "is a directory" every time (the rename went onto the link itself); now the
    split is written into the linked folder, the link stays, and --force replaces it there."""
    target = tmp_path / "bigdisk" / "mine"
    target.mkdir(parents=True)
    (tmp_path / "data").mkdir()
    link = tmp_path / "data" / "mine"
    link.symlink_to(target, target_is_directory=True)
    assert run(capsys, "--images", photos, "--out", link)[0] == 0
    assert link.is_symlink() and (target / "split.json").is_file() and sorted(tree(link)) == ["test", "train", "val"]
    code, _, err = run(capsys, "--images", photos, "--out", link, "--seed", 3, "--force")
    assert code == 0, err
    assert link.is_symlink() and json.loads((target / "split.json").read_text())["seed"] == 3


def test_a_symlink_split_whose_originals_moved_says_so(photos, tmp_path, capsys):
    from training.image_folder import ImageFolderDataset
    out = tmp_path / "out"
    assert run(capsys, "--images", photos, "--out", out, "--mode", "symlink")[0] == 0
    moved = tmp_path / "elsewhere"
    photos.rename(moved)
    ds = ImageFolderDataset(out / "train")
    with pytest.raises(ValueError, match=r"a symlink to .*photos/circle/img_\d\d.png, which no longer exists .the "
                                         r"originals of a `split --mode symlink` moved or deleted\? split again"):
        ds.read(0)


def test_splitting_a_split_again_says_what_it_is(photos, tmp_path, capsys):
    out = tmp_path / "out"
    assert run(capsys, "--images", photos, "--out", out)[0] == 0
    code, _, err = run(capsys, "--images", out, "--out", tmp_path / "again")
    assert code == 2 and f"--images {out} is already a split (it has split.json): train on it directly" in err
