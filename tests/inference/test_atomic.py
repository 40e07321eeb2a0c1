"""inference.atomic: crash-safe writes leave the mode of a newly created file (the umask's), not their temporaries' 0600."""
import os
import stat

import pytest

from inference.atomic import publish_file, publish_tree, umask, write_bytes, write_json


def mode(path) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


@pytest.fixture
def umask_022():
    old = os.umask(0o022)
    yield
    os.umask(old)


def test_every_file_or_folder_written_gets_the_umasks_mode(tmp_path, umask_022):
    """A .mar or checkpoint left 0600 could not be read by the serving user (a container's user 1000, a PVC
    filled by another user, KServe's storage)."""
    assert umask() == 0o022
    write_json(path=tmp_path / "export.json", obj={"a": 1})
    assert mode(tmp_path / "export.json") == 0o644
    (tmp_path / "src.mar").write_bytes(b"mar")
    publish_file(src=tmp_path / "src.mar", dst=tmp_path / "fmnist.mar")
    assert mode(tmp_path / "fmnist.mar") == 0o644
    os.chmod(tmp_path / "fmnist.mar", 0o600)  # as the earlier code left it: its replacement is readable again
    write_bytes(path=tmp_path / "fmnist.mar", data=b"new")
    assert mode(tmp_path / "fmnist.mar") == 0o644 and (tmp_path / "fmnist.mar").read_bytes() == b"new"
    (tmp_path / "tree").mkdir(mode=0o700)  # the new folder's mode is the umask's, not its source's
    (tmp_path / "tree" / "model.onnx").write_bytes(b"x")
    publish_tree(src=tmp_path / "tree", dst=tmp_path / "no_archive")
    assert mode(tmp_path / "no_archive") == 0o755 and (tmp_path / "no_archive" / "model.onnx").read_bytes() == b"x"
    os.chmod(tmp_path / "no_archive", 0o700)
    publish_tree(src=tmp_path / "tree", dst=tmp_path / "no_archive")
    assert mode(tmp_path / "no_archive") == 0o755


def test_a_tree_replaced_by_a_process_killed_between_its_renames_comes_back(tmp_path):
    """swap_in renames the earlier folder aside, then the new one in: a process killed in between left no
    folder at all, and clean_stale removed the one aside. It is put back now; other temporaries still go."""
    from inference.atomic import OLD_MARK, clean_stale
    dead = 2 ** 30  # above any pid_max: no such process
    aside = tmp_path / f".no_archive.{dead}.{OLD_MARK}abc.tmp"
    aside.mkdir()
    (aside / "model.onnx").write_bytes(b"the earlier archive")
    half = tmp_path / f".no_archive.{dead}.xyz.tmp"  # the new copy, unfinished
    half.mkdir()
    assert sorted(clean_stale(folder=tmp_path, name="no_archive")) == sorted([aside.name, half.name])
    assert (tmp_path / "no_archive" / "model.onnx").read_bytes() == b"the earlier archive"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["no_archive"]
    aside.mkdir()  # and when the folder is there: the one aside is only a leftover
    assert clean_stale(folder=tmp_path, name="no_archive") == [aside.name] and not aside.exists()



def test_clean_stale_never_takes_a_siblings_temporaries(tmp_path):
    """The temporaries of "photos_split.2024" begin like those of "photos_split" followed by a PID of 2024."""
    import os

    from inference.atomic import OLD_MARK, clean_stale
    sibling = tmp_path / f".photos_split.2024.{os.getpid()}.{OLD_MARK}abc.tmp"  # a live run's only copy
    sibling.mkdir()
    other = tmp_path / f".photos_split.2024.{2 ** 30}.xyz.tmp"
    other.mkdir()
    assert clean_stale(folder=tmp_path, name="photos_split") == []
    assert sibling.exists() and other.exists()
    assert clean_stale(folder=tmp_path, name="photos_split.2024") == [other.name] and sibling.exists()


def test_writing_where_a_folder_stands_names_that_path_and_leaves_no_temporary(tmp_path):
    from inference.atomic import write_json
    (tmp_path / "config.yaml").mkdir()
    with pytest.raises(IsADirectoryError) as e:
        write_json(path=tmp_path / "config.yaml", obj={})
    assert e.value.filename == str(tmp_path / "config.yaml")  # was our hidden temporary's name
    assert sorted(p.name for p in tmp_path.iterdir()) == ["config.yaml"]
