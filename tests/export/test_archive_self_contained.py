"""A .mar must run without this repository importable (stock TorchServe + torch/torchvision/onnxruntime).

The in-repo tests cannot show that: the editable install makes ``inference``/``training``/``handlers``
importable everywhere, so a TorchServe worker would silently use the repository's modules instead of
the archive's. Here a clean interpreter hides the repository, extracts the archive and drives its
handler with TorchServe's own Context: the inference core must come from the archive's own
``inference/`` package, and nothing of training/export/handlers may be loaded."""
import json
import os
import subprocess
import sys
import textwrap
import zipfile

from export.archive import build_archive
from tests.conftest import REPO, encode, pattern_image

SCRIPT = textwrap.dedent('''
    import importlib.util, json, os, sys
    repo, model_dir, image = sys.argv[1:4]
    sys.path[:] = [p for p in sys.path if p not in ("", ".") and os.path.realpath(p) != os.path.realpath(repo)]
    sys.meta_path[:] = [f for f in sys.meta_path if "editable" not in repr(f).lower()]
    hidden = [m for m in ("inference", "training", "handlers", "export") if importlib.util.find_spec(m) is not None]
    assert not hidden, f"the repository is still importable: {hidden}"
    sys.path.insert(0, model_dir)
    import yaml
    from ts.context import Context, RequestProcessor
    import classifier_handler
    manifest = json.load(open(os.path.join(model_dir, "MAR-INF", "MANIFEST.json")))
    cfg = yaml.safe_load(open(os.path.join(model_dir, "model-config.yaml")))
    ctx = Context(manifest["model"]["modelName"], model_dir, manifest, 1, None, "0.12.0", model_yaml_config=cfg)
    ctx.request_processor = [RequestProcessor({})]
    handler = classifier_handler.ImageClassifierHandler()
    handler.initialize(ctx)
    handler.context = ctx
    out = handler.postprocess(handler.inference(handler.preprocess([{"body": bytearray(open(image, "rb").read())}])))
    loaded = sorted(m for m in sys.modules if m.split(".")[0] in ("training", "handlers", "export"))
    core = sorted(os.path.relpath(m.__file__, model_dir) for n, m in sys.modules.items() if n.split(".")[0] == "inference")
    print(json.dumps({"response": json.loads(out[0]), "repo_modules": loaded, "core": core}))
''')


def test_archive_runs_with_the_repository_hidden(export_dir, tmp_path):
    store = tmp_path / "store"
    build_archive(export_dir, variant="onnx", name="alone", model_store=store, topk=2, tta="flip")
    model_dir = tmp_path / "model"
    with zipfile.ZipFile(store / "alone.mar") as z:
        z.extractall(model_dir)
    image = tmp_path / "x.png"
    image.write_bytes(encode(pattern_image("vertical", size=30, seed=5)))
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    proc = subprocess.run([sys.executable, "-c", SCRIPT, str(REPO), str(model_dir), str(image)], cwd=tmp_path,
                          env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result["repo_modules"] == []
    # the core came from the archive's package directory, every module of it that the handler uses
    assert "inference/__init__.py" in result["core"] and "inference/images.py" in result["core"]
    assert all(path.startswith("inference/") for path in result["core"]), result["core"]
    with zipfile.ZipFile(store / "alone.mar") as z:
        names = set(z.namelist())
    packaged = {f"inference/{p.name}" for p in (REPO / "inference").glob("*.py")}
    assert packaged <= names, packaged - names  # a new module of the core travels by itself
    assert not any("__pycache__" in n for n in names) and "images.py" not in names  # no flat copies
    preds = result["response"]["predictions"]
    assert len(preds) == 2 and preds[0]["class"] in ("circle", "horizontal", "vertical")
