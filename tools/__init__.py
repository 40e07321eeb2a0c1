"""Tools shared by ``scripts/``, ``benchmarks/`` and ``tests/``, each written once.

A layer below those three and above the project's packages (``training``, ``export``, ``inference``,
``handlers``): it imports nothing from ``scripts``, ``benchmarks`` or ``tests``. One concept a module:

* ``torchserve`` -- a TorchServe process of our own: free ports, start, readiness, stop by PID;
* ``drain``      -- waiting until the requests a TorchServe received are answered;
* ``log_tail``   -- the lines appended to a log4j2 rolling log, across its rollovers;
* ``client``     -- HTTP calls to the inference and management APIs (standard library only);
* ``locust``     -- running ``locustfile.py`` headless and reading its CSVs;
* ``photos``     -- the real photos used as payloads, re-encoded as 500x375 JPEG q90;
* ``models``     -- random-initialised models exported for load runs (benchmark, soak);
* ``processes``  -- CPU time and worker processes of a TorchServe's process tree;
* ``timing``     -- median seconds per call (``torch.utils.benchmark.Timer``);
* ``image_constraints`` -- the serving image's pip constraints (``deploy/image/constraints.txt``).
"""
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
