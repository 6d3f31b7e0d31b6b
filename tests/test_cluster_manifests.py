"""The cluster definitions are validated, not hoped: ``cluster/kuberay/`` is what ``deepslicing
kuberay`` writes; every KubeRay object passes the KubeRay v1.7.0 CRD schemas (their
``openAPIV3Schema``, from ``../shared/reference/kuberay-v1.7.0-crds/`` beside the repository);
every standard object passes Kubernetes' own schemas (``kubernetes-validate``, offline, strict);
``cluster/ray-up.yaml`` passes the schema Ray ships; the image's tags match our pins; and broken
copies fail with the path of the bad field.

The CRD schemas are OpenAPI v3 with Kubernetes' extensions, which plain JSON Schema does not know.
They are checked as the API server would, not skipped:

- ``x-kubernetes-int-or-string``: an integer or a string (nothing else);
- ``nullable``: null allowed besides the type;
- unknown fields are rejected (``kubectl apply`` validates strictly) unless the schema says
  ``x-kubernetes-preserve-unknown-fields``;
- ``x-kubernetes-list-type: set`` items are unique, ``map`` items unique by their
  ``x-kubernetes-list-map-keys``; ``format: int32``/``int64`` are range-checked;
- ``x-kubernetes-validations`` are CEL rules this test does not evaluate: a manifest that sets a
  field carrying them fails, so no rule is passed unread.
"""

from __future__ import annotations

import copy
import json
import re
import tomllib
from pathlib import Path
from typing import Any

import jsonschema
import kubernetes_validate
import pytest
import ray
import yaml

from deepslicing import kuberay
from deepslicing.cli import main as cli
from serve_apps.allocator import ServeConfig

ROOT = Path(__file__).resolve().parents[1]
CRDS = ROOT.parent / "shared" / "reference" / "kuberay-v1.7.0-crds"
KUBERAY = ROOT / "cluster" / "kuberay"
KUBERNETES_VERSION = "1.33"
RAY_SCHEMA = Path(ray.__file__).parent / "autoscaler" / "ray-schema.json"
INT_RANGES = {"int32": (-(2**31), 2**31 - 1), "int64": (-(2**63), 2**63 - 1)}


def _objects(path: Path) -> list[dict[str, Any]]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d]


MANIFESTS = {p.name: _objects(p) for p in sorted(KUBERAY.glob("*.yaml"))}
ALL_OBJECTS = [(name, obj) for name, objs in MANIFESTS.items() for obj in objs]


# --- the CRD schemas as the API server reads them ---------------------------------------------


def _structural(node: Any) -> Any:
    """A CRD schema node with Kubernetes' extensions turned into JSON Schema (module docstring)."""
    if isinstance(node, list):
        return [_structural(n) for n in node]
    if not isinstance(node, dict):
        return node
    out = {k: _structural(v) for k, v in node.items()}
    if out.get("x-kubernetes-int-or-string"):
        out["anyOf"] = [{"type": "integer"}, {"type": "string"}]
    if out.get("nullable") and "type" in out:
        out["type"] = [out["type"], "null"]
    open_object = out.get("x-kubernetes-preserve-unknown-fields") or "additionalProperties" in out
    if "properties" in out and not open_object:
        out["additionalProperties"] = False
    return out


def _list_type(validator, list_type, instance, schema):
    if list_type not in ("set", "map") or not isinstance(instance, list):
        return
    keys = schema.get("x-kubernetes-list-map-keys", [])
    seen = set()
    for item in instance:
        if list_type == "map":
            ident = json.dumps([item.get(k) for k in keys] if isinstance(item, dict) else item)
        else:
            ident = json.dumps(item, sort_keys=True)
        if ident in seen:
            yield jsonschema.ValidationError(
                f"duplicate {'entry by ' + ', '.join(keys) if keys else 'item'} {ident} in a "
                f"list of type {list_type}"
            )
        seen.add(ident)


def _cel_rules(validator, rules, instance, schema):
    yield jsonschema.ValidationError(
        "field carries CEL rules this test does not evaluate: "
        + "; ".join(r.get("message", r["rule"]) for r in rules)
    )


CRDValidator = jsonschema.validators.extend(
    jsonschema.Draft4Validator,
    {"x-kubernetes-list-type": _list_type, "x-kubernetes-validations": _cel_rules},
)
FORMATS = jsonschema.FormatChecker()
for _name, (_low, _high) in INT_RANGES.items():
    FORMATS.checks(_name)(
        lambda v, lo=_low, hi=_high: not isinstance(v, int) or isinstance(v, bool) or lo <= v <= hi
    )


def _crd_validators() -> dict[tuple[str, str], jsonschema.protocols.Validator]:
    validators = {}
    for path in sorted(CRDS.glob("ray.io_*.yaml")):
        crd = yaml.safe_load(path.read_text())
        for version in crd["spec"]["versions"]:
            api = f"{crd['spec']['group']}/{version['name']}"
            schema = _structural(version["schema"]["openAPIV3Schema"])
            validators[(api, crd["spec"]["names"]["kind"])] = CRDValidator(
                schema, format_checker=FORMATS
            )
    return validators


CRD_VALIDATORS = _crd_validators() if CRDS.is_dir() else {}


def problems(obj: dict[str, Any]) -> list[str]:
    """Every schema violation of a Kubernetes object as ``$.path.to.field: what is wrong``."""
    key = (obj["apiVersion"], obj["kind"])
    if key in CRD_VALIDATORS:
        errors = CRD_VALIDATORS[key].iter_errors(obj)
        return sorted(f"{e.json_path}: {e.message}" for e in errors)
    try:
        kubernetes_validate.validate(obj, KUBERNETES_VERSION, strict=True)
    except kubernetes_validate.ValidationError as e:
        return [f"{e.json_path}: {e.message}"]
    return []


def ray_up_problems(config: dict[str, Any]) -> list[str]:
    validator = jsonschema.Draft7Validator(json.loads(RAY_SCHEMA.read_text()))
    return sorted(f"{e.json_path}: {e.message}" for e in validator.iter_errors(config))


def test_crd_schemas_are_there():
    assert CRDS.is_dir(), f"{CRDS}: the KubeRay CRDs are read from shared/ beside the repository"
    kinds = {kind for (api, kind) in CRD_VALIDATORS if api == "ray.io/v1"}
    assert kinds == {"RayCluster", "RayJob", "RayService"}


# --- what the generator writes ------------------------------------------------------------------


def test_committed_manifests_are_what_the_command_writes(tmp_path):
    assert cli(["kuberay", "--out", str(tmp_path)]) == 0
    written = {p.name: p.read_text() for p in tmp_path.iterdir()}
    committed = {p.name: p.read_text() for p in KUBERAY.glob("*.yaml")}
    assert written == committed, "cluster/kuberay/ is stale: run `deepslicing kuberay`"


def test_rayservice_runs_serve_config_yaml_with_cluster_settings_only():
    local = yaml.safe_load((ROOT / "serve_apps" / "serve_config.yaml").read_text())
    (service,) = MANIFESTS["rayservice.yaml"]
    served = yaml.safe_load(service["spec"]["serveConfigV2"])
    (mlflow_service,) = [o for o in MANIFESTS["mlflow.yaml"] if o["kind"] == "Service"]
    tracking_uri = f"http://{mlflow_service['metadata']['name']}:{kuberay.MLFLOW_PORT}"
    changed = {**kuberay.CLUSTER_SERVE_ARGS, "tracking_uri": tracking_uri}
    http_options = {**local["http_options"], "host": "0.0.0.0"}
    assert {**served, "applications": None} == {
        **local,
        "http_options": http_options,
        "applications": None,
    }
    for app, local_app in zip(served["applications"], local["applications"], strict=True):
        assert app == {**local_app, "args": {**local_app["args"], **changed}}
        assert isinstance(ServeConfig(**app["args"]), ServeConfig)


def test_every_ray_pod_reaches_mlflow_and_serving_pods_mount_the_keys():
    (secret,) = MANIFESTS["api-keys-secret.yaml"]
    (service,) = MANIFESTS["rayservice.yaml"]
    keys_file = yaml.safe_load(service["spec"]["serveConfigV2"])["applications"][0]["args"][
        "api_keys_file"
    ]
    for name, obj in ALL_OBJECTS:
        if obj["apiVersion"] != "ray.io/v1":
            continue
        spec = obj["spec"].get("rayClusterSpec") or obj["spec"].get("rayClusterConfig")
        spec = spec or obj["spec"]
        groups = [spec["headGroupSpec"], *spec["workerGroupSpecs"]]
        for group in groups:
            pod = group["template"]["spec"]
            (container,) = pod["containers"]
            env = {e["name"]: e["value"] for e in container["env"]}
            assert env["MLFLOW_TRACKING_URI"] == f"http://mlflow:{kuberay.MLFLOW_PORT}", name
            if obj["kind"] == "RayJob":
                continue
            mounts = {m["name"]: m["mountPath"] for m in container["volumeMounts"]}
            volumes = {v["name"]: v["secret"]["secretName"] for v in pod["volumes"]}
            assert volumes["api-keys"] == secret["metadata"]["name"], name
            key = Path(keys_file).name
            assert Path(mounts["api-keys"]) / key == Path(keys_file), name
            assert key in secret["stringData"]


def test_every_ray_cluster_turns_token_auth_on_from_one_secret():
    """Each RayCluster, RayJob and RayService asks KubeRay for Ray token auth with the token in
    the Secret the file's header tells the operator to create."""
    texts = kuberay.render(kuberay.KubeRayConfig())
    ray_files = set()
    for name, obj in ALL_OBJECTS:
        if obj["apiVersion"] != "ray.io/v1":
            continue
        ray_files.add(name)
        spec = obj["spec"].get("rayClusterSpec") or obj["spec"].get("rayClusterConfig")
        spec = spec or obj["spec"]
        assert spec["authOptions"] == {"mode": "token", "secretName": kuberay.RAY_TOKEN_SECRET}
    assert ray_files == {
        "raycluster.yaml",
        "rayjob-train.yaml",
        "rayjob-sweep.yaml",
        "rayservice.yaml",
    }
    for name in ray_files:
        assert kuberay.RAY_TOKEN_COMMAND in texts[name], name
        assert f"--from-literal={kuberay.RAY_TOKEN_KEY}=" in texts[name], name


def test_the_placeholder_key_is_refused(tmp_path):
    from serve_apps.security import ApiKeyError, read_keys

    (secret,) = MANIFESTS["api-keys-secret.yaml"]
    keys_file = tmp_path / "keys"
    keys_file.write_text(
        secret["stringData"][Path(kuberay.CLUSTER_SERVE_ARGS["api_keys_file"]).name]
    )
    with pytest.raises(ApiKeyError, match="at least 16"):
        read_keys(str(keys_file))


# --- schemas ------------------------------------------------------------------------------------


@pytest.mark.parametrize("name,obj", ALL_OBJECTS, ids=[f"{n}:{o['kind']}" for n, o in ALL_OBJECTS])
def test_manifest_objects_pass_their_schemas(name, obj):
    if obj["apiVersion"] == "ray.io/v1":
        assert (obj["apiVersion"], obj["kind"]) in CRD_VALIDATORS
    assert problems(obj) == [], name


def test_every_manifest_kind_is_checked():
    kinds = {o["kind"] for _, o in ALL_OBJECTS}
    assert kinds == {
        "RayCluster",
        "RayJob",
        "RayService",
        "Deployment",
        "Service",
        "PersistentVolumeClaim",
        "Secret",
    }


def test_ray_up_passes_rays_schema():
    assert ray_up_problems(yaml.safe_load((ROOT / "cluster" / "ray-up.yaml").read_text())) == []


def test_image_and_ray_versions_match_the_pins():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    (ray_pin,) = [
        re.fullmatch(r"ray\[.*\]==(\S+)", d) for d in project["dependencies"] if "ray[" in d
    ]
    ray_version = ray_pin.group(1)
    python = re.fullmatch(r">=3\.(\d+),<3\.\d+", project["requires-python"]).group(1)
    dockerfile = (ROOT / "cluster" / "Dockerfile").read_text()
    assert re.findall(r"^FROM (\S+)$", dockerfile, re.M) == [
        f"rayproject/ray:{ray_version}-py3{python}-cpu"
    ]
    assert re.findall(r"^WORKDIR (\S+)$", dockerfile, re.M) == [kuberay.APP_DIR]
    assert ray.__version__ == ray_version
    assert f"-t deepslicing:{project['version']} " in dockerfile
    for name, obj in ALL_OBJECTS:
        text = json.dumps(obj)
        images = set(re.findall(r'"image": "([^"]+)"', text))
        assert images <= {f"deepslicing:{project['version']}", kuberay.POSTGRES_IMAGE}, name
        assert set(re.findall(r'"rayVersion": "([^"]+)"', text)) <= {ray_version}, name


# --- broken copies fail with the path of the bad field ------------------------------------------


def _set(obj: dict[str, Any], path: str, value: Any) -> dict[str, Any]:
    """A deep copy of ``obj`` with the field at ``a.b[0].c`` set to ``value``."""
    broken = copy.deepcopy(obj)
    *parents, last = [int(p) if p.isdigit() else p for p in re.findall(r"[^.\[\]]+", path)]
    node = broken
    for part in parents:
        node = node[part]
    node[last] = value
    return broken


POD = "template.spec.containers[0]"
BROKEN = [
    ("raycluster.yaml", 0, "spec.workerGroupSpecs[0].maxReplicas", "four"),
    ("raycluster.yaml", 0, f"spec.headGroupSpec.{POD}.resources.limits.cpu", [1]),
    ("raycluster.yaml", 0, "spec.workerGroupSpecs[0].maxReplicas", 2**31),
    ("raycluster.yaml", 0, "spec.authOptions.mode", "password"),
    ("rayjob-train.yaml", 0, "spec.shutdownAfterJobFinishes", "yes"),
    ("rayjob-sweep.yaml", 0, "spec.rayClusterSpec.enableInTreeAutoscaling", 1),
    (
        "rayservice.yaml",
        0,
        f"spec.rayClusterConfig.headGroupSpec.{POD}.ports[0].containerPort",
        "6379",
    ),
    ("mlflow.yaml", 1, "spec.replicas", "one"),
    ("mlflow.yaml", 1, f"spec.{POD}.ports[0].containerPort", "http"),
    ("mlflow.yaml", 2, "spec.ports[0].port", "5000x"),
    ("mlflow.yaml", 0, "spec.accessModes", "ReadWriteOnce"),
    ("api-keys-secret.yaml", 0, "stringData.keys", 5),
]


@pytest.mark.parametrize("name,index,path,value", BROKEN)
def test_a_broken_manifest_fails_with_the_path_of_the_bad_field(name, index, path, value):
    found = problems(_set(MANIFESTS[name][index], path, value))
    assert found, f"{name}: {path} = {value!r} passed"
    assert any(p.startswith(f"$.{path}: ") for p in found), found


def test_unknown_fields_duplicates_and_cel_guarded_fields_are_rejected():
    (cluster,) = MANIFESTS["raycluster.yaml"]
    typo = _set(cluster, "spec.enableInTreeAutoScaling", True)
    assert any(p.startswith("$.spec: ") and "enableInTreeAutoScaling" in p for p in problems(typo))
    ports = cluster["spec"]["headGroupSpec"]["template"]["spec"]["containers"][0]["ports"]
    twice = _set(cluster, f"spec.headGroupSpec.{POD}.ports", [*ports, {"containerPort": 6379}])
    assert any(
        p.startswith(f"$.spec.headGroupSpec.{POD}.ports: duplicate") for p in problems(twice)
    )
    (job,) = MANIFESTS["rayjob-train.yaml"]
    managed = _set(job, "spec.managedBy", "ray.io/kuberay-operator")
    assert any(p.startswith("$.spec.managedBy: field carries CEL") for p in problems(managed))
    assert problems(_set(cluster, f"spec.headGroupSpec.{POD}.resources.limits.cpu", 1)) == []


def test_a_broken_ray_up_fails_with_the_path_of_the_bad_field():
    config = yaml.safe_load((ROOT / "cluster" / "ray-up.yaml").read_text())
    found = ray_up_problems(_set(config, "provider.worker_ips", "192.0.2.11"))
    assert any(p.startswith("$.provider.worker_ips: ") for p in found), found
    found = ray_up_problems(_set(config, "max_workers", "two"))
    assert any(p.startswith("$.max_workers: ") for p in found), found
