"""The drain of a TorchServe whose access log rolled over (daily, or at 100 MB: some 800,000 requests) on a
real server: log4j2 renames the file and starts a new one, and a drain that counted answers in the new file
only found fewer answers than arrivals and waited out its whole timeout ("not drained"). Here the access log
rolls every 2 KB (about 15 answers), so a few dozen requests roll it several times."""
from __future__ import annotations

import os
import re
import time

import pytest

from export.archive import build_archive
from tests.conftest import encode, pattern_image
from tools.client import call
from tools.log_tail import inode
from tools.torchserve import TorchServe, log_config

pytestmark = pytest.mark.slow
REQUESTS = 40  # some 3 rolled files: well within the 20 a day log4j2 keeps


def _small_access_log_config(dest):
    xml = log_config(dest).read_text()
    xml, n = re.subn(r'(name="access_log".*?<SizeBasedTriggeringPolicy size=")[^"]*(")', r"\g<1>2 KB\g<2>", xml,
                     count=1, flags=re.S)
    assert n == 1
    dest.write_text(xml)
    return dest


def test_drain_counts_the_answers_of_every_rolled_access_log(export_dir, tmp_path):
    store = tmp_path / "store"
    build_archive(export_dir, variant="onnx", name="shapes", model_store=store, batch_size=1, max_batch_delay=1,
                  workers=1, topk=1, tta="none")
    server = TorchServe(model_store=store, models="shapes=shapes.mar",
                        logging=_small_access_log_config(tmp_path / "log4j2.xml"))
    try:
        server.start(timeout=180)
        # rolled by an earlier server of this log folder, 20 days ago: deleted at the next rollover (logs/ grew forever)
        old = server.log_dir / "access_log.2026-11-01.1.log"
        old.write_text("2026-11-01T00:00:00,000 [W-9000-shapes_1.0] - old line\n")
        os.utime(old, (time.time() - 20 * 86400,) * 2)
        first = inode(server.log_dir / "access_log.log")
        assert server.access_log_inode == first and server.access_log_offset == 0
        image = encode(pattern_image("circle", size=30))
        for _ in range(REQUESTS):
            status, body = call(f"{server.url}/predictions/shapes", method="POST", data=image,
                                headers={**server.auth("inference"), "Content-Type": "image/png"}, timeout=30)
            assert status == 200, body
        rolled = sorted(p.name for p in server.log_dir.glob("access_log.*.log") if p.name != "access_log.log")
        assert len(rolled) >= 2 and inode(server.log_dir / "access_log.log") != first, rolled
        assert "access_log.2026-11-01.1.log" not in rolled  # older than ROLLED_KEEP_DAYS: deleted
        result = server.drain(timeout=15)
        print(f"rolled files {rolled}; drain {result}")
        assert result["drained"] and result["in_flight"] == 0 and result["seconds"] < 5, result
    finally:
        server.close()
