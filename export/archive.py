"""Build self-contained ``.mar`` archives with ``torch-model-archiver``.

An archive holds the exported graph (``.xml`` + ``.bin`` for OpenVINO), the handler, the inference
core as a package directory (``inference/``: the handler imports it exactly as in the repository),
``index_to_name.json``, ``model_card.json`` and ``model-config.yaml`` (TorchServe's batching and
worker keys, and the handler's section), written from :mod:`inference.settings`.

The graph files are copied out of the export folder and packed only when the copies have the SHA-256
that ``export.json`` records; the archive is built elsewhere and copied into the model store under a
temporary name, then ``os.replace``-d onto ``NAME.mar`` (:mod:`inference.atomic`): an earlier archive of
that name stays whole until the new one is complete. The archiver's inputs (``model-config.yaml``,
``model_card.json``, ``requirements.txt``, the core) stay in ``EXPORT/archive/NAME/``, and
:func:`archiver_command` gives the raw ``torch-model-archiver`` command that packs them by hand.
"""
from __future__ import annotations

import importlib.metadata
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import tempfile
from dataclasses import fields
from pathlib import Path

import yaml

import inference
from inference.atomic import clean_stale, publish_file, publish_tree
from inference.backends import RUNTIMES
from inference.class_index import INDEX_FILE, MODEL_CARD_FILE
from inference.settings import HandlerSettings, SettingsError, WorkerSettings

from .integrity import check_files
from .manifest import EXPORT_MANIFEST, PROVENANCE, load_manifest

REPO = Path(__file__).resolve().parent.parent
HANDLER = REPO / "handlers" / "classifier_handler.py"
CORE = Path(inference.__file__).resolve().parent  # the inference package, carried whole
ARCHIVE_INPUTS = "archive"  # EXPORT/archive/NAME/: the archiver's inputs, kept for the raw command


def split_options(options: dict) -> tuple[WorkerSettings, dict]:
    """``options`` (field names of both settings classes) -> (WorkerSettings, the handler's options)."""
    worker_names = {f.name for f in fields(WorkerSettings)}
    handler_names = {f.name for f in fields(HandlerSettings)}
    unknown = sorted(set(options) - worker_names - handler_names)
    if unknown:
        raise TypeError(f"unknown archive option(s): {', '.join(unknown)}")
    return (WorkerSettings(**{k: v for k, v in options.items() if k in worker_names}),
            {k: v for k, v in options.items() if k in handler_names})


def model_config(**options) -> dict:
    """The archive's ``model-config.yaml``: TorchServe's keys at top level, the handler's under ``handler``.

    ``options`` are field names of :class:`WorkerSettings` and :class:`HandlerSettings` (the graph's
    facts ``input_size`` etc. included); each is validated there.
    """
    workers, handler = split_options(options)
    settings = HandlerSettings(**handler)
    problem = settings.tta_problem()
    if problem:
        raise SettingsError(problem)
    return {**workers.to_config(), "handler": settings.to_config()}


def stage_core(dest: Path) -> Path:
    """Copy the inference package into ``dest/inference`` (no caches) and return ``dest``.

    torch-model-archiver copies the *contents* of a folder named in ``--extra-files`` into the
    archive's root, so the folder handed to it is ``dest``, which holds the package folder itself.
    """
    shutil.copytree(CORE, dest / CORE.name, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    return dest


def copy_checked(*, export_dir: Path, info: dict, dest: Path) -> list[Path]:
    """Copy the variant's files into ``dest`` and check the copies (what will be packed) against the
    SHA-256 that ``export.json`` records; return the copies' paths, the graph first."""
    dest.mkdir()
    for f in info["files"]:
        src = export_dir / f
        if not src.is_file():
            raise FileNotFoundError(f"{src} not found ({export_dir / EXPORT_MANIFEST} lists it): export it again")
        shutil.copyfile(src, dest / f)
    check_files(folder=dest, expected=info.get("sha256", {}), files=info["files"],
                record=str(export_dir / EXPORT_MANIFEST))
    return [dest / f for f in info["files"]]


def model_card(*, manifest: dict, info: dict, **extra) -> dict:
    """The archive's ``model_card.json``: the export's top level, the variant's own provenance (its date
    and checkpoint, which may be an earlier run's) over it, and ``extra``."""
    card = {k: v for k, v in manifest.items() if k != "variants"}
    card.update({k: info[k] for k in PROVENANCE if k in info})
    card.update(extra)
    return card


DEFAULT_VARIANT = "onnx"  # the graph an archive carries unless told
DEFAULT_VERSION = "1.0"
DEFAULT_MODEL_STORE = "model_store"
ARCHIVE_FORMATS = ("default", "no-archive")  # torch-model-archiver's: a zip .mar, or a plain folder (development)


CPU_PACKAGE = {"onnxruntime-gpu": "onnxruntime"}


def requirements(runtime: str) -> str:
    """``requirements.txt`` for the graph's runtime, pinned to the versions it was exported and checked
    with (for TorchServe's ``install_py_dep_per_model=true``); torch itself is TorchServe's own."""
    modules = [*RUNTIMES[runtime].packages, "PIL"]
    installed = importlib.metadata.packages_distributions()  # module -> distributions (onnxruntime-gpu, pillow)
    lines = []
    for module in modules:
        dist = installed.get(module, [module])[0]
        try:
            version = importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            raise ValueError(f"the {runtime} graph needs {module}, which is not installed here: install it to "
                             "archive (its version is pinned in the archive's requirements.txt)") from None
        # the CPU package of the same version: a CPU server installing the archive's requirements would pull the
        # CUDA wheel (and clash with its onnxruntime); a GPU image installs onnxruntime-gpu itself
        lines.append(f"{CPU_PACKAGE.get(dist, dist)}=={version}")
    return "\n".join(lines) + "\n"


class ArchiverError(RuntimeError):
    """torch-model-archiver refused the inputs; the message ends with its last line of output."""


#: The raw command's prefix (:func:`archiver_command`, the README): a new empty TMPDIR for the archiver.
ARCHIVER_TMPDIR = 'TMPDIR="$(mktemp -d)" '
#: Why, printed with the raw command.
ARCHIVER_TMPDIR_NOTE = ("TMPDIR: torch-model-archiver 0.12 stages its files in $TMPDIR/<model name> (/tmp/<model "
                        "name>) and deletes that folder first and after, whatever it holds")


def run_archiver(args: list[str], *, timeout: float | None = None) -> subprocess.CompletedProcess:
    """``torch-model-archiver ARGS`` (this interpreter's ``model_archiver``), its output captured as text.

    TorchServe 0.12's archiver stages its files in ``tempfile.gettempdir() / MODEL_NAME``, removing whatever
    is there first and after (``model_packaging_utils.copy_artifacts``): ``--model-name data`` would delete a
    user's ``/tmp/data``, and two builds of one name at once would mix their files. TorchServe is in limited
    maintenance, so the fix is here: each run gets ``TMPDIR`` set to a new folder of its own."""
    with tempfile.TemporaryDirectory(prefix="archiver-") as private:
        return subprocess.run([sys.executable, "-m", "model_archiver.model_packaging", *args], capture_output=True,
                              text=True, timeout=timeout, env={**os.environ, "TMPDIR": private})


def write_inputs(*, dest: Path, cfg: dict, card: dict, runtime: str) -> Path:
    """The archiver's inputs in the new folder ``dest``: ``model-config.yaml``, ``model_card.json``,
    ``requirements.txt`` and ``core/inference/``. :func:`build_archive` writes them in its temporary
    folder and, once the archive is built, publishes them as ``EXPORT/archive/FILE_NAME/`` so that the raw
    ``torch-model-archiver`` command :func:`archiver_command` prints can be re-run by hand (a refused or
    failed build leaves the earlier inputs, those of the archive in the store)."""
    dest.mkdir()
    (dest / "model-config.yaml").write_text(yaml.safe_dump(cfg, sort_keys=False))
    (dest / MODEL_CARD_FILE).write_text(json.dumps(card, indent=1))
    (dest / "requirements.txt").write_text(requirements(runtime))
    stage_core(dest / "core")
    return dest


def archiver_arguments(*, inputs: Path, export_dir: Path, graph: Path, rest: list[Path], name: str, version: str,
                       export_path: Path, archive_format: str) -> list[str]:
    extra = [inputs / "core", export_dir / INDEX_FILE, inputs / MODEL_CARD_FILE, *rest]
    return ["--model-name", name, "--version", version, "--serialized-file", str(graph), "--handler", str(HANDLER),
            "--extra-files", ",".join(map(str, extra)), "--config-file", str(inputs / "model-config.yaml"),
            "--requirements-file", str(inputs / "requirements.txt"), "--export-path", str(export_path),
            "--archive-format", archive_format, "--force"]


def archiver_command(export_dir: str | os.PathLike, *, variant: str, name: str, version: str = DEFAULT_VERSION,
                     file_name: str | None = None, model_store: str | os.PathLike = DEFAULT_MODEL_STORE,
                     archive_format: str = ARCHIVE_FORMATS[0]) -> str:
    """The raw ``torch-model-archiver`` command line equivalent to :func:`build_archive` (after it ran: its
    inputs are in the export folder). ``build_archive`` itself runs it on hash-checked copies of the graph
    and writes to a temporary name in the store, then renames; by hand, name the file with ``--model-name``."""
    export_dir = Path(export_dir)
    info = load_manifest(export_dir)["variants"][variant]
    graph, *rest = (export_dir / f for f in info["files"])
    args = archiver_arguments(inputs=export_dir / ARCHIVE_INPUTS / (file_name or name), export_dir=export_dir,
                              graph=graph, rest=rest, name=name, version=version, export_path=Path(model_store),
                              archive_format=archive_format)
    command = ARCHIVER_TMPDIR + shlex.join(["torch-model-archiver", *args])
    if file_name and file_name != name:  # the archiver names the file (or the no-archive folder) after the model
        suffix = "" if archive_format == "no-archive" else ".mar"
        command += " && " + shlex.join(["mv", str(Path(model_store) / f"{name}{suffix}"),
                                        str(Path(model_store) / f"{file_name}{suffix}")])
    return command


#: What torch-model-archiver accepts as a model name (model_archiver.model_packaging_utils); the file name too,
#: as it becomes a path and a URL.
ARCHIVE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_\-.]*$")


def check_name(value: str, option: str) -> str:
    """``value`` when torch-model-archiver accepts it as a name; else ``ValueError``, before anything is written."""
    if not ARCHIVE_NAME.match(value):
        raise ValueError(f"{option} {value!r}: use letters, digits, '_', '-' and '.', starting with a letter or digit "
                         "(the name is a URL path segment and a file name)")
    return value


def check_checkpoint_current(manifest: dict, variant: str, *, export_dir: str | os.PathLike) -> None:
    """Refuse ``variant`` when an earlier export into ``export_dir`` wrote it from another checkpoint than
    the folder's latest export (a variant refused or not asked for by that export keeps its earlier graph:
    packing it would serve weights other than the ones the folder was last exported from). "Latest" is the
    latest export that wrote a graph: one whose every variant was refused leaves ``export.json`` as it was
    (the export said so, exit status 3)."""
    own, latest = manifest["variants"][variant].get("checkpoint_sha256"), manifest.get("checkpoint_sha256")
    if own and latest and own != latest:
        info = manifest["variants"][variant]
        raise ValueError(f"{export_dir}'s {variant} graph is of an earlier checkpoint ({info.get('checkpoint')}, "
                         f"exported {info.get('created')}) than its latest export ({manifest.get('checkpoint')}, "
                         f"{manifest.get('created')}): export {variant} again from the checkpoint you mean to serve, "
                         "or pass --allow-earlier-checkpoint to pack it as it is")


def archive_target(model_store: str | os.PathLike, *, file_name: str, archive_format: str) -> Path:
    """``MODEL_STORE/FILE_NAME.mar`` (or the ``no-archive`` folder); refused (``ValueError``) where it is a folder
    that no archive wrote: the build replaces it whole."""
    target = Path(model_store) / (file_name if archive_format == ARCHIVE_FORMATS[1] else f"{file_name}.mar")
    if target.is_dir() and not (target / "MAR-INF" / "MANIFEST.json").is_file():
        raise ValueError(f"{target} is a folder that no archive wrote (no MAR-INF/MANIFEST.json): choose another "
                         "--model-store or --file-name, or move that folder away")
    return target


def build_archive(export_dir: str | os.PathLike, *, variant: str = DEFAULT_VARIANT, name: str, version: str = DEFAULT_VERSION,
                  file_name: str | None = None, model_store: str | os.PathLike = DEFAULT_MODEL_STORE,
                  archive_format: str = ARCHIVE_FORMATS[0], allow_earlier_checkpoint: bool = False,
                  **config) -> Path:
    """Write ``model_store/FILE_NAME.mar`` (or a folder for ``no-archive``) and return its path.

    ``config``: field names of :class:`WorkerSettings` and :class:`HandlerSettings` (defaults there).
    ``allow_earlier_checkpoint``: pack a variant of an earlier checkpoint (:func:`check_checkpoint_current`).
    """
    export_dir = Path(export_dir)
    check_name(name, "--name")
    check_name(file_name or name, "--file-name")
    if "," in str(export_dir):  # the archiver's --extra-files is a comma-separated list of paths
        raise ValueError(f"{export_dir}: torch-model-archiver cannot take a path with ',' in --extra-files; "
                         "move or link the export folder to a path without one")
    manifest = load_manifest(export_dir)
    if variant not in manifest["variants"]:
        raise ValueError(f"{export_dir} holds no {variant} graph (it has: {', '.join(manifest['variants'])})")
    if not allow_earlier_checkpoint:
        check_checkpoint_current(manifest, variant, export_dir=export_dir)
    info = manifest["variants"][variant]
    model_store = Path(model_store)
    model_store.mkdir(parents=True, exist_ok=True)
    options = dict(config)
    if info["output"] != "logits":
        options["tta"] = "none"  # the graph does its own TTA/top-k
    if info["topk"]:
        options["topk"] = min(options.get("topk", HandlerSettings.topk), info["topk"])
    cfg = model_config(**options, input_size=info["input_size"], resize_size=manifest["resize_size"],
                       graph_output=info["output"], graph_tta=info["tta"], graph_topk=info["topk"],
                       precision=info["precision"])
    file_name = file_name or name
    target = archive_target(model_store, file_name=file_name, archive_format=archive_format)
    clean_stale(folder=model_store, name=target.name)  # what a killed build left
    card = model_card(manifest=manifest, info=info, name=name, version=version, variant=variant, variant_info=info,
                      runtime=info["runtime"], precision=info["precision"],
                      tta=info["tta"] if info["tta"] != "none" else cfg["handler"]["tta"], parity=info["parity"],
                      handler=cfg["handler"])
    with tempfile.TemporaryDirectory() as tmp:
        graph, *rest = copy_checked(export_dir=export_dir, info=info, dest=Path(tmp) / "graph")
        inputs = write_inputs(dest=Path(tmp) / "inputs", cfg=cfg, card=card, runtime=info["runtime"])
        export_path = Path(tmp) / "out"
        export_path.mkdir()
        proc = run_archiver(archiver_arguments(
            inputs=inputs, export_dir=export_dir, graph=graph, rest=rest, name=name, version=version,
            export_path=export_path, archive_format=archive_format))
        if proc.returncode != 0:
            said = (proc.stderr.strip() or proc.stdout.strip() or "no output").splitlines()[-1]
            raise ArchiverError(f"torch-model-archiver failed (exit status {proc.returncode}): {said}")
        built = export_path / (name if archive_format == ARCHIVE_FORMATS[1] else f"{name}.mar")
        if archive_format == ARCHIVE_FORMATS[1]:
            publish_tree(src=built, dst=target)
        else:
            publish_file(src=built, dst=target)  # tmp may be another file system: copied in, then renamed
        (export_dir / ARCHIVE_INPUTS).mkdir(exist_ok=True)
        clean_stale(folder=export_dir / ARCHIVE_INPUTS, name=file_name)  # what a killed build left, put back
        publish_tree(src=inputs, dst=export_dir / ARCHIVE_INPUTS / file_name)  # what the by-hand command reads
    return target


def archive_plan(export_dir: str | os.PathLike, *, variants: str, name: str, file_name: str | None = None,
                 allow_earlier_checkpoint: bool = False) -> list[tuple[str, str, str]]:
    """``(variant, model name, file name)`` of each archive of ``variants`` (``all``, or a comma list);
    with several, model and file names (``file_name``, else ``name``) get a ``_<variant>`` suffix. Every
    variant is checked before any archive is written: it exists, and it is of the folder's latest
    checkpoint unless ``allow_earlier_checkpoint`` (:func:`check_checkpoint_current`)."""
    check_name(name, "--name")
    check_name(file_name or name, "--file-name")
    manifest = load_manifest(export_dir)
    names = list(manifest["variants"]) if variants == "all" else [v.strip() for v in variants.split(",") if v.strip()]
    if not names:
        raise ValueError(f"--variant {variants!r} names no variant (e.g. onnx, or all)")
    if missing := [v for v in names if v not in manifest["variants"]]:
        raise ValueError(f"{export_dir} holds no {', '.join(missing)} graph (it has: {', '.join(manifest['variants'])})")
    if not allow_earlier_checkpoint:
        for v in names:
            check_checkpoint_current(manifest, v, export_dir=export_dir)
    if len(names) == 1:
        return [(names[0], name, file_name or name)]
    return [(v, f"{name}_{v.replace('-', '_')}", f"{file_name or name}_{v.replace('-', '_')}") for v in names]


def build_archives(export_dir: str | os.PathLike, *, variants: str, name: str, file_name: str | None = None,
                   allow_earlier_checkpoint: bool = False, **kwargs) -> list[Path]:
    """One archive per variant of :func:`archive_plan`; none when one of them is refused there."""
    plan = archive_plan(export_dir, variants=variants, name=name, file_name=file_name,
                        allow_earlier_checkpoint=allow_earlier_checkpoint)
    for _, _, f in plan:  # every target before any archive is written
        archive_target(kwargs.get("model_store", DEFAULT_MODEL_STORE), file_name=f,
                       archive_format=kwargs.get("archive_format", ARCHIVE_FORMATS[0]))
    return [build_archive(export_dir, variant=v, name=n, file_name=f, allow_earlier_checkpoint=True, **kwargs)
            for v, n, f in plan]
