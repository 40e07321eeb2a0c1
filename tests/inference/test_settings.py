"""inference.settings: one definition of every model-config.yaml key, its default, type and choices."""
import argparse
from dataclasses import fields

import pytest
import yaml

from inference.backends import GRAPH_OUTPUTS, OPENVINO_PRECISIONS
from inference.settings import HandlerSettings, SettingsError, WorkerSettings, add_arguments, from_args
from inference.tta import ADAPTIVE_METRICS, AGGREGATES, TTA_MODES


def test_defaults_round_trip_through_yaml():
    settings = HandlerSettings(input_size=28, resize_size=32, graph_topk=3)
    text = yaml.safe_dump(settings.to_config(), sort_keys=False)
    assert HandlerSettings.from_config(yaml.safe_load(text)) == settings
    assert WorkerSettings().to_config() == {"minWorkers": 1, "maxWorkers": 1, "batchSize": 8, "maxBatchDelay": 10,
                                            "responseTimeout": 60}


def test_choices_are_the_module_constants():
    meta = {f.name: f.metadata for f in fields(HandlerSettings)}
    assert meta["tta"]["choices"] is TTA_MODES and meta["tta_aggregate"]["choices"] is AGGREGATES
    assert meta["adaptive_metric"]["choices"] is ADAPTIVE_METRICS
    assert meta["graph_output"]["choices"] is GRAPH_OUTPUTS
    assert meta["openvino_precision"]["choices"] is OPENVINO_PRECISIONS


@pytest.mark.parametrize("section,match", [
    ({"input_size": 28, "tta": "rotate"}, r"handler\.tta must be one of none, flip"),
    ({"input_size": 28, "topk": "5"}, r"handler\.topk must be an integer, got '5'"),
    ({"input_size": 28, "topk": True}, r"handler\.topk must be an integer"),
    ({"input_size": 28, "topk": 0}, r"handler\.topk must be >= 1"),
    ({"input_size": 28, "adaptive_threshold": 1.5}, r"handler\.adaptive_threshold must be <= 1\.0"),
    ({"input_size": 28, "adaptive_tta": "yes"}, r"handler\.adaptive_tta must be true or false"),
    ({"input_size": 28, "tta_scales": []}, r"handler\.tta_scales must be a non-empty list"),
    ({"input_size": 28, "tta_scales": [1.0, 9.0]}, r"handler\.tta_scales must be <= 4\.0"),
    ({"input_size": 28, "graph_output": "features"}, r"handler\.graph_output must be one of logits"),
    # an exported graph can hold flip, five_crop, ten_crop (export.wrappers): multi_scale was accepted, and its
    # metric counted 3 views where a 2-scale graph has 2
    ({"input_size": 28, "graph_output": "probabilities", "graph_tta": "multi_scale"},
     r"handler\.graph_tta must be one of none, flip, five_crop, ten_crop"),
    ({"input_size": 28, "max_pixel": 10}, r"unknown key\(s\) max_pixel"),
    ({}, r"handler\.input_size is required"),
])
def test_bad_sections_name_the_key(section, match):
    with pytest.raises(SettingsError, match=match):
        HandlerSettings.from_config(section)


def test_ints_are_accepted_for_floats_and_lists_become_tuples():
    s = HandlerSettings.from_config({"input_size": 28, "adaptive_threshold": 1, "tta_scales": [1, 1.2]})
    assert s.adaptive_threshold == 1.0 and isinstance(s.adaptive_threshold, float)
    assert s.tta_scales == (1.0, 1.2)


def test_handler_tta_is_none_for_graphs_with_their_own_tta():
    assert HandlerSettings(input_size=8, resize_size=10, tta="ten_crop").handler_tta == "ten_crop"
    assert HandlerSettings(input_size=8, tta="flip", graph_output="probabilities").handler_tta == "none"


def test_cli_options_come_from_the_fields():
    p = argparse.ArgumentParser()
    add_arguments(p, WorkerSettings)
    add_arguments(p, HandlerSettings)
    flags = {a.dest: a for a in p._actions}
    cli = [f.name for cls in (WorkerSettings, HandlerSettings) for f in fields(cls) if f.metadata["cli"]]
    assert set(cli) <= set(flags) and "input_size" not in flags  # graph facts are not options
    assert tuple(flags["tta"].choices) == TTA_MODES
    args = p.parse_args(["--tta", "multi_scale", "--tta-scales", "1,1.3", "--adaptive-tta", "--batch-size", "4"])
    settings = from_args(args, HandlerSettings, input_size=28, resize_size=32)
    assert (settings.tta, settings.tta_scales, settings.adaptive_tta) == ("multi_scale", (1.0, 1.3), True)
    assert from_args(args, WorkerSettings).batch_size == 4
    assert from_args(p.parse_args([]), HandlerSettings, input_size=28) == HandlerSettings(input_size=28)
    with pytest.raises(SystemExit):
        p.parse_args(["--tta", "rotate"])
    # an int that may be left unset (its default then depends on the device): unset is None, set is an int
    assert from_args(p.parse_args([]), HandlerSettings, input_size=28).max_batch_pixels is None
    assert from_args(p.parse_args(["--max-batch-pixels", "400000000"]), HandlerSettings,
                     input_size=28).max_batch_pixels == 400_000_000
    assert "max_batch_pixels" not in HandlerSettings(input_size=28).to_config()  # unset: left to the worker


def test_a_request_budget_over_the_batch_budget_is_refused():
    """Admission lets a batch's first request in whatever the batch budget (so that a batch makes progress):
    a request budget above the batch's would make the batch budget a soft one."""
    from inference.settings import SettingsError
    with pytest.raises(SettingsError, match=r"^model-config.yaml handler.max_request_pixels 64000000 is more than "
                                            r"max_batch_pixels 50000000: one request could take more than a whole "
                                            r"batch's budget; lower max_request_pixels or raise max_batch_pixels$"):
        HandlerSettings.from_config({"input_size": 28, "max_batch_pixels": 50_000_000})
    assert HandlerSettings(input_size=28, max_request_pixels=50_000_000, max_batch_pixels=50_000_000)
    with pytest.raises(SettingsError, match=r"max_request_pixels 200000000 is more than max_batch_pixels 128000000 "
                                            r"\(its default\)"):  # unset: the CPU's default, the smallest
        HandlerSettings(input_size=28, max_request_pixels=200_000_000)


@pytest.mark.parametrize("tta,scales,refused", [("five_crop", (1.0,), True), ("ten_crop", (1.0,), True),
                                                ("multi_scale", (1.0, 1.15), True), ("multi_scale", (1.0, 0.87), False)])
def test_crop_tta_without_room_to_crop_is_refused_at_archive_time(tta, scales, refused, caplog):
    """The demo's 28/28 archive with five_crop ran five identical views (5x the compute for the plain answer).
    `export archive` refuses it; a worker loading an archive built before still starts, and logs why."""
    from export.archive import model_config
    options = dict(input_size=28, resize_size=28, tta=tta, tta_scales=scales)
    if refused:
        with pytest.raises(SettingsError, match=f"tta {tta} cuts its views from the resize_size square, and "
                                                "resize_size 28 is input_size 28: every view would be the same"):
            model_config(**options)
        section = {**HandlerSettings(input_size=28, tta="flip").to_config(), "tta": tta, "tta_scales": list(scales)}
        assert HandlerSettings.from_config(section).tta == tta
        assert "every view would be the same image" in caplog.text
    else:  # 0.87 zooms in: a view of its own
        assert model_config(**options)["handler"]["tta"] == tta
    assert model_config(**{**options, "resize_size": 32})["handler"]["tta"] == tta
    assert HandlerSettings(**options, graph_output="probabilities").tta_problem() is None  # the graph's own views


@pytest.mark.parametrize("text,match", [
    ("handler: {input_size: 28, tta_scales: [.nan, 1.0]}", "tta_scales must be a finite number"),
    ("handler: {input_size: 28, max_aspect_ratio: .nan}", "max_aspect_ratio must be a finite number"),  # guard off
    ("handler: {input_size: 28, adaptive_threshold: .inf}", "adaptive_threshold must be a finite number"),
    ("handler: flip", "handler must be a mapping of key: value, got str 'flip'"),
    ("handler: {input_size: 28, 1: a, foo: b}", "unknown key.s. 1, foo"),  # was: TypeError comparing int and str
    ("handler: {input_size: 28, resize_size: 8}", "resize_size 8 is smaller than input_size 28"),
    ("handler: {input_size: 28, graph_output: topk}", "graph_topk is missing: graph_output topk needs the k"),
])
def test_hand_edited_handler_sections_are_refused_naming_the_problem(text, match):
    """NaN passes every range comparison (a NaN max_aspect_ratio switched the aspect guard off, a NaN scale failed
    every multi_scale request); a section that is no mapping, or keys of mixed types, were raw Python errors."""
    with pytest.raises(SettingsError, match=match):
        HandlerSettings.from_config(yaml.safe_load(text)["handler"])


def test_the_top_level_worker_keys_are_checked_and_named_as_written():
    """minWorkers: two crashed the handler's initialize with int()'s traceback; TorchServe's other keys pass."""
    config = {"minWorkers": 2, "maxWorkers": 2, "batchSize": 8, "deviceType": "cpu", "jobQueueSize": 100,
              "handler": {"input_size": 28}}
    assert WorkerSettings.of_model_config(config).workers == 2
    with pytest.raises(SettingsError, match=r"model-config.yaml.minWorkers must be an integer"):
        WorkerSettings.of_model_config({**config, "minWorkers": "two"})
    with pytest.raises(SettingsError, match=r"model-config.yaml.batchSize must be >= 1, got 0"):  # the file's name
        WorkerSettings.of_model_config({**config, "batchSize": 0})


def test_a_bad_list_of_scales_on_the_command_line_says_so(capsys):
    p = argparse.ArgumentParser()
    add_arguments(p, HandlerSettings)
    with pytest.raises(SystemExit):
        p.parse_args(["--tta-scales", "1,abc"])
    assert "'1,abc' is not a comma-separated list of numbers" in capsys.readouterr().err  # was "invalid <lambda>"


def test_scales_that_cut_one_square_twice_and_adaptive_without_tta_are_refused_at_archive_time(caplog):
    """multi_scale 1.3 and 1.5 on a 224/256 archive both cut the whole 256 square (the same view, counted twice);
    adaptive_tta with no handler TTA did nothing. Refused by `export archive`, logged by a worker loading one."""
    from export.archive import model_config
    with pytest.raises(SettingsError, match=r"tta_scales 1.0, 1.3, 1.5 cut squares of sides \[224, 256, 256\] from "
                                            r"the resize_size 256 square \(a scale above 1.14 is the whole square\)"):
        model_config(input_size=224, resize_size=256, tta="multi_scale", tta_scales=(1.0, 1.3, 1.5))
    assert model_config(input_size=224, resize_size=256, tta="multi_scale")["handler"]["tta"] == "multi_scale"
    for options in ({"tta": "none"}, {"graph_output": "probabilities", "graph_tta": "flip"}):
        with pytest.raises(SettingsError, match="adaptive_tta needs the handler's TTA, and it has none"):
            model_config(input_size=28, adaptive_tta=True, **options)
    section = {**HandlerSettings(input_size=28, tta="none").to_config(), "adaptive_tta": True}
    assert HandlerSettings.from_config(section).adaptive_tta and "adaptive TTA would do nothing" in caplog.text
