"""Every manifest under k8s/ validated offline: core kinds against the Kubernetes schemas
(kubernetes-validate), KubeRay kinds against our JSON schemas, their pod templates as real PodTemplates,
and what they point at (config, entrypoint flags, Serve import path) against our own code."""
from __future__ import annotations

import json
import shlex
from pathlib import Path

import jsonschema
import kubernetes_validate
import pytest
import yaml

from melo_ray.config import load_config

K8S = Path(__file__).resolve().parent.parent / "k8s"
CONFIGS = Path(__file__).resolve().parent.parent / "configs"
K8S_VERSION = "1.30.0"
KUBERAY = {"RayJob": "rayjob.schema.json", "RayService": "rayservice.schema.json"}


def documents() -> list[tuple[str, dict]]:
    docs = []
    for path in sorted(K8S.glob("*.yaml")):
        if path.name == "kustomization.yaml":
            continue
        for doc in yaml.safe_load_all(path.read_text()):
            if doc:
                docs.append((path.name, doc))
    return docs


def pod_templates(doc: dict) -> list[dict]:
    spec = doc["spec"].get("rayClusterSpec") or doc["spec"].get("rayClusterConfig")
    return [spec["headGroupSpec"]["template"]] + [g["template"] for g in spec.get("workerGroupSpecs", [])]


@pytest.mark.parametrize("name,doc", documents(), ids=lambda v: v if isinstance(v, str) else v.get("kind"))
def test_manifest_is_valid(name, doc):
    kind = doc["kind"]
    if kind in KUBERAY:
        schema = json.loads((K8S / "schemas" / KUBERAY[kind]).read_text())
        jsonschema.validate(doc, schema)
        for i, template in enumerate(pod_templates(doc)):
            wrapped = {"apiVersion": "v1", "kind": "PodTemplate", "metadata": {"name": f"t{i}"}, "template": template}
            kubernetes_validate.validate(wrapped, K8S_VERSION, strict=True)
    else:
        kubernetes_validate.validate(doc, K8S_VERSION, strict=True)


def test_the_schemas_catch_mistakes():
    schema = json.loads((K8S / "schemas" / "rayjob.schema.json").read_text())
    doc = next(d for _, d in documents() if d["kind"] == "RayJob")
    broken = json.loads(json.dumps(doc))
    del broken["spec"]["entrypoint"]
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(broken, schema)
    broken = json.loads(json.dumps(doc))
    broken["spec"]["rayClusterSpec"]["workerGroupSpecs"][0]["replicas"] = "one"
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(broken, schema)
    template = json.loads(json.dumps(pod_templates(doc)[0]))
    template["spec"]["containers"][0]["resources"]["limits"]["cpu"] = {"many": 2}
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate({"apiVersion": "v1", "kind": "PodTemplate", "metadata": {"name": "t"},
                                      "template": template}, K8S_VERSION, strict=True)


def test_bulk_edit_config_map_holds_a_valid_config_matching_the_default():
    doc = next(d for _, d in documents() if d["kind"] == "ConfigMap" and d["metadata"]["name"] == "melo-ray-bulk-edit-config")
    mounted = load_config(yaml.safe_load(doc["data"]["config.yaml"]))
    default = load_config(CONFIGS / "smollm2-135m.yaml")
    assert mounted.model_dump(exclude={"pipeline"}) == default.model_dump(exclude={"pipeline"})


def test_rayjob_entrypoint_is_our_job_with_valid_flags():
    import argparse

    from pipelines.bulk_edit.cli import add_arguments

    doc = next(d for _, d in documents() if d["kind"] == "RayJob")
    argv = shlex.split(doc["spec"]["entrypoint"])
    assert argv[:3] == ["python", "-m", "pipelines.bulk_edit"]
    parser = argparse.ArgumentParser(exit_on_error=False)
    add_arguments(parser)
    args = parser.parse_args(argv[3:])
    assert args.config == "/etc/melo-ray/config.yaml"
    mounts = [m["mountPath"] for c in pod_templates(doc)[0]["spec"]["containers"] for m in c.get("volumeMounts", [])]
    assert "/etc/melo-ray" in mounts


def test_kustomization_lists_files_that_exist():
    kustomization = yaml.safe_load((K8S / "kustomization.yaml").read_text())
    for resource in kustomization["resources"]:
        assert (K8S / resource).is_file(), resource
    for generator in kustomization.get("configMapGenerator", []):
        for item in generator["files"]:
            assert (K8S / item.split("=")[-1]).is_file(), item


def test_rayservice_points_at_our_app_builder_with_valid_args():
    import importlib

    import melo_ray.serving.app as serve_module
    doc = next(d for _, d in documents() if d["kind"] == "RayService")
    config = yaml.safe_load(doc["spec"]["serveConfigV2"])
    (application,) = config["applications"]
    module, name = application["import_path"].split(":")
    assert callable(getattr(importlib.import_module(module), name))
    settings = serve_module.ServeSettings.model_validate(application["args"])
    assert settings.config == "/etc/melo-ray/config.yaml"
    assert [d["name"] for d in application["deployments"]] == [serve_module.MeloServer.name]
    assert application["deployments"][0]["num_replicas"] == settings.replicas
