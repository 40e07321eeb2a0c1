"""The run folder (training.run_folder): one run at a time, a replaced run kept aside until the new one's first checkpoint."""
import os

from tests.conftest import REPO
from training.run_log import start_log


def test_a_run_folder_holds_one_run(tmp_path):
    """A second run into a folder that holds one is refused before any work; resuming that run there is not;
    --force replaces it, and no file of the old run outlives the new one's start."""
    import pytest

    from training.run_folder import LOCK_FILE, claim_run_folder, drop_set_aside, set_aside, unlock_run_folder
    out = tmp_path / "run"
    assert claim_run_folder(str(out)) == [] and out.is_dir()  # not there yet: made, to hold its lock
    assert claim_run_folder(str(out)) == []  # empty
    for name in ("best.pt", "last.pt", "log.csv", "config.yaml", "notes.txt"):
        (out / name).write_text("old run")
    with pytest.raises(ValueError, match=r"already holds a run \(best.pt, last.pt, log.csv\): resume it with --resume"):
        claim_run_folder(str(out))
    assert not (out / LOCK_FILE).exists()  # a refused run leaves no lock file behind
    assert claim_run_folder(str(out), resume=str(out / "last.pt")) == []  # continues this run, in place
    with pytest.raises(ValueError, match="already holds a run"):  # another run's checkpoint is no licence
        claim_run_folder(str(out), resume=str(tmp_path / "other" / "last.pt"))
    replaced = claim_run_folder(str(out), force=True)
    assert sorted(replaced) == ["best.pt", "config.yaml", "last.pt", "log.csv"]
    assert (out / "best.pt").exists()  # nothing removed before the run starts
    set_aside(str(out), replaced)  # as the new run starts
    assert sorted(p.name for p in (out / ".replaced").iterdir()) == ["best.pt", "config.yaml", "last.pt", "log.csv"]
    drop_set_aside(str(out))  # at its first checkpoint
    unlock_run_folder(str(out))  # as the run's end does: the lock file goes with it
    assert sorted(p.name for p in out.iterdir()) == ["notes.txt"]  # only the run's own files


def test_a_run_stopped_before_its_first_epoch_ended_is_replaced(tmp_path):
    """Ctrl-C during epoch 1 leaves log.csv (its header) and config.yaml, no checkpoint: the same command again
    used to be refused with "resume it with --resume RUN/last.pt", a file that does not exist."""
    from training.run_folder import claim_run_folder
    out = tmp_path / "run"
    out.mkdir()
    start_log(str(out), [])
    (out / "config.yaml").write_text("epochs: 3\n")
    assert claim_run_folder(str(out)) == ["log.csv", "config.yaml"]


def test_files_no_run_wrote_are_not_taken_for_a_run(tmp_path):
    """A log.csv of another tool was taken for "a run stopped in epoch 1" and deleted without a word, and a
    config.yaml alone (`--config exp/config.yaml --out exp`) was written over (found by review 2026-12-07):
    both now need --force; a forced run sets aside the old run's tensorboard/ and eval/ as well."""
    import pytest

    from training.run_folder import claim_run_folder, restore_set_aside, set_aside, unlock_run_folder
    out = tmp_path / "results"
    out.mkdir()
    (out / "log.csv").write_text("step,reward\n1,0.5\n")
    with pytest.raises(ValueError, match=r"holds a log.csv that is no training log: the run writes its epochs there"):
        claim_run_folder(str(out))
    assert claim_run_folder(str(out), force=True) == ["log.csv"]
    unlock_run_folder(str(out))
    (out / "log.csv").write_text("epoch,train_loss,test_loss\n")  # ours, as written before val_loss was its name
    (out / "tensorboard").mkdir()  # a run stopped in its first epoch: its events go with it
    assert claim_run_folder(str(out)) == ["log.csv", "tensorboard"]
    unlock_run_folder(str(out))
    recipe = tmp_path / "exp"
    recipe.mkdir()
    (recipe / "config.yaml").write_text("# my recipe\nepochs: 3\n")
    with pytest.raises(ValueError, match=r"holds a config.yaml that no run wrote \(your --config\?\)"):
        claim_run_folder(str(recipe))
    assert (recipe / "config.yaml").read_text() == "# my recipe\nepochs: 3\n"
    assert claim_run_folder(str(recipe), force=True) == ["config.yaml"]
    unlock_run_folder(str(recipe))
    run = tmp_path / "run"
    (run / "tensorboard").mkdir(parents=True)
    (run / "tensorboard" / "events.old").write_text("old")
    (run / "eval").mkdir()
    (run / "eval" / "metrics.json").write_text("old")
    for name in ("best.pt", "last.pt", "log.csv", "config.yaml"):
        (run / name).write_text("old " + name)
    replaced = claim_run_folder(str(run), force=True)
    assert sorted(replaced) == ["best.pt", "config.yaml", "eval", "last.pt", "log.csv", "tensorboard"]
    set_aside(str(run), replaced)
    (run / "tensorboard").mkdir()  # the new run's events, then it fails before its first checkpoint
    (run / "tensorboard" / "events.new").write_text("new")
    assert sorted(restore_set_aside(str(run))) == sorted(replaced)
    assert os.listdir(run / "tensorboard") == ["events.old"] and (run / "eval" / "metrics.json").read_text() == "old"


def test_a_folder_a_live_run_is_training_into_is_never_taken(tmp_path):
    """A second `train --out RUN` during the first's long first epoch (log.csv, no checkpoint yet) replaced its
    files. Now the first holds a lock on the folder (flock: dropped by the kernel when that process ends, however
    it ends), and a second run is refused, --force or not."""
    import subprocess
    import sys

    import pytest

    from training.run_folder import LOCK_FILE, claim_run_folder, unlock_run_folder
    out = tmp_path / "run"
    out.mkdir()
    start_log(str(out), [])
    holder = subprocess.Popen([sys.executable, "-c", f"""
import sys, time
from training.run_folder import claim_run_folder
claim_run_folder({str(out)!r})
print("locked", flush=True)
time.sleep(60)
"""], cwd=REPO, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        for force in (False, True):
            with pytest.raises(ValueError, match=rf"a run is training into it \(PID {holder.pid}\)"):
                claim_run_folder(str(out), force=force, lock=True)
        assert claim_run_folder(str(out), lock=False) == ["log.csv"]  # the other ranks do not lock
    finally:
        holder.kill()  # as kill -9 would: no clean-up ran, the kernel dropped the lock
        holder.wait()
    assert claim_run_folder(str(out)) == ["log.csv"] and (out / LOCK_FILE).read_text() == f"{os.getpid()}\n"
    assert claim_run_folder(str(out)) == ["log.csv"]  # this process holds it already: again is fine
    unlock_run_folder(str(out))
    assert not (out / LOCK_FILE).exists()


def test_a_forced_run_that_ends_before_its_first_checkpoint_leaves_the_old_run(tmp_path):
    """`train --force` removed the old run's files as it started: an error in its first epoch (or Ctrl-C, or
    kill -9) lost a good run. Now they are set aside and come back: at once when the run fails, at the next
    claim of the folder when it was killed; a new checkpoint means they go."""
    import pytest

    from training.run_folder import claim_run_folder, restore_set_aside, set_aside, unlock_run_folder
    out = tmp_path / "run"
    out.mkdir()
    for name in ("best.pt", "last.pt", "log.csv", "config.yaml", "test_metrics.json"):
        (out / name).write_text("old " + name)
    replaced = claim_run_folder(str(out), force=True)
    set_aside(str(out), replaced)
    start_log(str(out), [])  # the new run's config and log, then it fails in epoch 1
    (out / "config.yaml").write_text("new")
    assert restore_set_aside(str(out)) == sorted(replaced)
    assert {p.name: p.read_text() for p in out.iterdir() if p.is_file() and p.name != ".training.lock"} == {
        name: "old " + name for name in ("best.pt", "last.pt", "log.csv", "config.yaml", "test_metrics.json")}
    unlock_run_folder(str(out))
    set_aside(str(out), claim_run_folder(str(out), force=True))  # ... killed before its first checkpoint
    unlock_run_folder(str(out))
    assert not (out / "best.pt").exists()
    with pytest.raises(ValueError, match="already holds a run"):  # the next claim restores it, then judges
        claim_run_folder(str(out))
    assert (out / "best.pt").read_text() == "old best.pt" and not (out / ".replaced").exists()
    set_aside(str(out), claim_run_folder(str(out), force=True))  # a new run with its first checkpoint
    (out / "best.pt").write_text("new")
    assert restore_set_aside(str(out)) == [] and (out / "best.pt").read_text() == "new"
    assert not (out / ".replaced").exists()


def test_an_out_that_is_a_file_is_one_clear_line(tmp_path):
    import pytest

    from training.run_folder import claim_run_folder
    (tmp_path / "afile").write_text("x")
    with pytest.raises(ValueError, match="afile is a file: a run needs a folder"):
        claim_run_folder(str(tmp_path / "afile"))


def test_claiming_a_folder_removes_what_a_killed_run_left_half_written(tmp_path):
    from training.run_folder import claim_run_folder, unlock_run_folder
    out = tmp_path / "run"
    out.mkdir()
    dead = 2 ** 30  # above any pid_max: no such process
    leftovers = [out / f".log.csv.{dead}.abc.tmp", out / f".best.pt.{dead}.xyz.tmp", out / f".config.yaml.{dead}.q.tmp"]
    for path in leftovers:
        path.write_text("half")
    assert claim_run_folder(str(out)) == []
    assert not any(path.exists() for path in leftovers)
    unlock_run_folder(str(out))


def test_under_torchrun_only_rank_0_puts_a_killed_run_back(tmp_path):
    """Every torchrun rank reads --resume's configuration, which puts back the run a killed --force run left aside:
    each rank took the folder's lock for it, and the ranks that lost the race failed ("a run is training into it")."""
    import threading
    import time

    from training.run_folder import restore_killed_run
    out = tmp_path / "run"
    (out / ".replaced").mkdir(parents=True)
    (out / ".replaced" / "last.pt").write_text("old last.pt")
    seen = []
    rank1 = threading.Thread(target=lambda: (restore_killed_run(str(out), rank=1),
                                             seen.append((out / "last.pt").read_text())))
    rank1.start()
    time.sleep(0.3)
    assert rank1.is_alive() and not (out / "last.pt").exists()  # waiting for rank 0, not taking the lock
    restore_killed_run(str(out), rank=0)
    rank1.join(5)
    assert seen == ["old last.pt"] and not (out / ".replaced").exists()
