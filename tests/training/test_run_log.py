"""The run's epoch log (training.run_log), read back by training.reports.read_log."""
import math

from training.reports import read_log
from training.run_log import LOG_COLUMNS, append_log, start_log


def test_log_keeps_resumed_rows_and_leaves_missing_columns_empty(tmp_path):
    start_log(str(tmp_path), [{"epoch": 1, "train_loss": 0.5}])  # a resumed run's history
    append_log(str(tmp_path), {"epoch": 2, "train_loss": 0.25, "lr": 1e-3, "seconds": 1.26, "weights": "model"})
    log = read_log(tmp_path / "log.csv")
    assert list(log) == LOG_COLUMNS and log["epoch"] == [1.0, 2.0] and log["train_loss"] == [0.5, 0.25]
    rows = (tmp_path / "log.csv").read_text().splitlines()
    assert rows[1].split(",")[:2] == ["1", "0.50000"] and rows[2].split(",")[:2] == ["2", "0.25000"]  # alike
    assert log["lr"][1] == 1e-3 and log["seconds"][1] == 1.3 and math.isnan(log["val_top1_ema"][1])


def test_config_yaml_repeats_the_recipe_not_the_invocation(tmp_path):
    import yaml

    from training.config import TrainConfig
    cfg = TrainConfig.create(data="d", out="o", resume="o/last.pt", force=True, epochs=3)
    cfg.save_yaml(str(tmp_path / "config.yaml"))
    saved = yaml.safe_load((tmp_path / "config.yaml").read_text())
    assert saved["epochs"] == 3 and "resume" not in saved and "force" not in saved
