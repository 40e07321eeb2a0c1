"""inference.class_index: index_to_name.json as export writes it and as people write it by hand (TorchServe's
ImageNet form included), every other shape refused naming the file; a graph's width checked against it."""
from __future__ import annotations

import json

import pytest

from inference.class_index import check_graph_width, read_index_to_name, write_index_to_name


def test_written_names_read_back_and_torchserves_imagenet_form_reads_its_last_item(tmp_path):
    path = tmp_path / "index_to_name.json"
    write_index_to_name(path, ["cat", "dög", "[x]"])
    assert read_index_to_name(path) == ["cat", "dög", "[x]"]
    path.write_text(json.dumps({"1": ["n01443537", "goldfish"], "0": ["n01440764", "tench"]}))
    assert read_index_to_name(path) == ["tench", "goldfish"]  # as TorchServe's load_label_mapping reads it


@pytest.mark.parametrize("mapping, match", [
    ({"0": "a", "1": "b", "01": "c"}, "written plainly, not '01'"),   # was: 'b' silently dropped
    ({"0": "a", "-1": "b"}, "not '-1'"),
    ({"0": "a", "x": "b"}, "not 'x'"),
    ({"0": "a", "1": None}, "class 1 has no name"),                  # was: the name "None"
    ({"0": "a", "1": 1.5}, "class 1 has no name"),
    ({"0": "a", "1": []}, "class 1 has no name"),
    ({"0": "a", "2": "c"}, "indices must be 0..1 without gaps"),
    ([["a"]], "expected a non-empty JSON object"),
])
def test_other_shapes_are_refused_naming_the_file(tmp_path, mapping, match):
    path = tmp_path / "index_to_name.json"
    path.write_text(json.dumps(mapping))
    with pytest.raises(ValueError, match=match) as e:
        read_index_to_name(path)
    assert str(path) in str(e.value)


def test_a_graph_width_other_than_the_names_is_refused():
    names = ["a", "b", "c"]
    check_graph_width(3, class_names=names)
    check_graph_width(2, class_names=names, graph_topk=2)
    for width, topk in ((4, None), (2, None), (3, 2), (4, 4)):
        with pytest.raises(ValueError, match="are of different models"):
            check_graph_width(width, class_names=names, graph_topk=topk)


def test_a_unicode_digit_key_is_refused_naming_the_file(tmp_path):
    path = tmp_path / "index_to_name.json"
    path.write_text(json.dumps({"0": "a", "²": "b"}))  # "²".isdigit() is True, int("²") raises
    with pytest.raises(ValueError, match="written plainly, not '²'"):
        read_index_to_name(path)
