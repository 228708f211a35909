"""infra/ as a user deploys it: each file parsed and checked against what its tool requires
(Ray's cluster-config schema, KubeRay's CRD schema), and every entrypoint, path and image it
names exists and agrees with the rest of the project."""

from __future__ import annotations

import copy
import fnmatch
import gzip
import json
import re
import shlex
from pathlib import Path

import jsonschema
import pytest
import yaml

from jobs.restore import build_parser
from pipeline.config import load_config

from .conftest import FIXTURES, REPO

INFRA = REPO / "infra"
PYPROJECT = (REPO / "pyproject.toml").read_text()
VERSION = re.search(r'^version = "([^"]+)"', PYPROJECT, re.MULTILINE).group(1)
RAY_VERSION = re.search(r'"ray\[[^]]*\]==([\d.]+)"', PYPROJECT).group(1)
IMAGE_DIR = "/home/ray/mimo-restore"  # where the Dockerfile puts the project


# ---- the restore command every deployment runs -------------------------------------------


def check_restore_command(command: str, project_dir: str = IMAGE_DIR) -> None:
    """``command`` runs jobs.restore with flags it knows and a config that exists and loads."""
    argv = shlex.split(command)
    assert argv[:3] == ["python", "-m", "jobs.restore"], command
    args = build_parser().parse_args(argv[3:])  # exits (SystemExit) on an unknown flag
    config = Path(args.config)
    if config.is_absolute():
        config = REPO / config.relative_to(project_dir)
    load_config(config, {"input.manifest": args.manifest, "output.uri": args.output})


# ---- AWS cluster launcher ----------------------------------------------------------------


@pytest.fixture(scope="module")
def aws():
    return yaml.safe_load((INFRA / "aws" / "cluster.yaml").read_text())


def test_aws_config_passes_rays_own_validation(aws):
    from ray.autoscaler._private.util import prepare_config, validate_config

    validate_config(prepare_config(copy.deepcopy(aws)))
    broken = copy.deepcopy(aws)
    broken["available_node_types"]["head"]["min_workerz"] = 0
    with pytest.raises(jsonschema.ValidationError):
        validate_config(prepare_config(broken))  # the check can fail


def test_aws_head_runs_no_tasks_and_gpu_workers_scale_from_zero(aws):
    types = aws["available_node_types"]
    assert types[aws["head_node_type"]]["resources"] == {"CPU": 0}
    workers = {k: v for k, v in types.items() if k != aws["head_node_type"]}
    assert workers and all(t["min_workers"] == 0 for t in workers.values())
    assert all(t["node_config"]["InstanceType"].startswith(("g", "p")) for t in workers.values())
    spot = [t for t in workers.values() if "InstanceMarketOptions" in t["node_config"]]
    assert spot and spot[0]["node_config"]["InstanceMarketOptions"]["MarketType"] == "spot"
    assert 0 < aws["idle_timeout_minutes"] <= 15
    # Declared, not left to detection, whose failure `ray up` only warns about.
    gpus = {"g5.2xlarge": (8, 1)}  # vCPUs and GPUs of the instance types used
    for worker in workers.values():
        cpus, gpu = gpus[worker["node_config"]["InstanceType"]]
        assert worker["resources"] == {"CPU": cpus, "GPU": gpu}


def test_aws_sync_and_setup(aws):
    assert {".git", "**/.git", ".venv", "tests"} & set(aws["rsync_exclude"]) >= {".venv", "tests"}
    assert ".gitignore" in aws["rsync_filter"]
    assert aws["file_mounts"]["/home/ubuntu/mimo-restore"] == "."
    assert any("pip install" in c and "-e ." in c for c in aws["setup_commands"])
    # up.sh fills in every node's AMI from one placeholder.
    up = (INFRA / "aws" / "up.sh").read_text()
    placeholder = re.search(r's/(ami-0+)/', up).group(1)
    assert {t["node_config"]["ImageId"] for t in aws["available_node_types"].values()} == {
        placeholder}
    assert "aws ssm get-parameter" in up and "ray up" in up
    # one token for every node, made by up.sh, never committed
    assert aws["file_mounts"]["/home/ubuntu/.ray/auth_token"] == "infra/aws/.auth_token"
    assert ".auth_token" in up and "/infra/aws/.auth_token" in (REPO / ".gitignore").read_text()
    assert all("RAY_AUTH_MODE=token" in " ".join(aws[k])
               for k in ("head_start_ray_commands", "worker_start_ray_commands"))


# ---- container image ---------------------------------------------------------------------


def _dockerignored(path: str, patterns: list[str]) -> bool:
    return any(fnmatch.fnmatch(path, p) or fnmatch.fnmatch(path, p.removeprefix("**/"))
               for p in patterns)


def test_dockerfile_copies_the_project_and_no_secrets():
    dockerfile = (INFRA / "docker" / "Dockerfile").read_text()
    ignore = [line.strip() for line in (REPO / ".dockerignore").read_text().splitlines()
              if line.strip() and not line.startswith("#")]
    assert {".git", ".venv", "tests"} <= set(ignore)

    base = re.search(r"ARG RAY_IMAGE=rayproject/ray:([\d.]+)-py311-gpu", dockerfile)
    assert base and base.group(1) == RAY_VERSION  # the image's Ray is the one pinned
    copied = []
    for sources in re.findall(r"^COPY (?:--\S+ )*(.+) \S+$", dockerfile, re.MULTILINE):
        for source in sources.split():
            assert (REPO / source).exists(), source
            assert not _dockerignored(source, ignore), f"{source} is in .dockerignore"
            copied.append(source)
    assert {"pyproject.toml", "pipeline", "jobs", "configs", "checkpoints"} <= set(copied)
    assert f"WORKDIR {IMAGE_DIR}" in dockerfile
    assert not re.search(r"(AWS_|SECRET|PASSWORD|TOKEN)", dockerfile.split("\n", 6)[-1]
                         .replace("# No credentials", ""), re.IGNORECASE)


# ---- KubeRay -----------------------------------------------------------------------------


KUBERAY = ["1.5.2", "1.6.2", "1.7.0"]  # the releases the docs claim (tests/fixtures/kuberay)


def _schema(kind: str, version: str) -> dict:
    return json.loads(gzip.decompress(
        (FIXTURES / "kuberay" / f"{kind}-{version}.json.gz").read_bytes()))


@pytest.fixture(scope="module")
def schemas() -> dict:
    """KubeRay's spec schemas by release: RayJob, the RayCluster spec inside it and, from 1.6,
    RayCronJob."""
    found = {}
    for version in KUBERAY:
        job = _schema("rayjob", version)["properties"]["spec"]
        found[version] = {"RayJob": job, "RayCluster": job["properties"]["rayClusterSpec"]}
        if version >= "1.6":
            found[version]["RayCronJob"] = _schema("raycronjob", version)["properties"]["spec"]
    return found


def unknown_fields(value, schema: dict, path: str = "spec") -> list[str]:
    """Fields the API server would reject as unknown (kubectl's strict field validation)."""
    found = []
    if isinstance(value, dict) and schema.get("type") == "object":
        if schema.get("x-kubernetes-preserve-unknown-fields"):
            return []
        props, extra = schema.get("properties"), schema.get("additionalProperties")
        for key, item in value.items():
            if props is not None and key in props:
                found += unknown_fields(item, props[key], f"{path}.{key}")
            elif isinstance(extra, dict):
                found += unknown_fields(item, extra, f"{path}.{key}")
            elif props is not None:
                found.append(f"{path}.{key}")
    elif isinstance(value, list) and "items" in schema:
        for i, item in enumerate(value):
            found += unknown_fields(item, schema["items"], f"{path}[{i}]")
    return found


def check_against(spec: dict, schema: dict) -> None:
    jsonschema.validate(spec, schema)
    assert unknown_fields(spec, schema) == []


def manifests(name: str) -> list[dict]:
    return [d for d in yaml.safe_load_all((INFRA / "kuberay" / name).read_text()) if d]


def test_schema_check_catches_mistakes(schemas):
    spec = manifests("rayjob.yaml")[0]["spec"]
    job = schemas["1.7.0"]["RayJob"]
    check_against(spec, job)
    with pytest.raises(AssertionError):
        check_against({**spec, "shutdownAfterJobFinish": True}, job)
    with pytest.raises(jsonschema.ValidationError):
        check_against({**spec, "backoffLimit": "two"}, job)


def _cluster_specs() -> dict[str, dict]:
    cronjob = {d["kind"]: d for d in manifests("cronjob.yaml")}
    created = yaml.safe_load(cronjob["ConfigMap"]["data"]["rayjob.yaml"])
    return {
        "raycluster.yaml": manifests("raycluster.yaml")[0]["spec"],
        "rayjob.yaml": manifests("rayjob.yaml")[0]["spec"]["rayClusterSpec"],
        "raycronjob.yaml": manifests("raycronjob.yaml")[0]["spec"]["jobTemplate"][
            "rayClusterSpec"],
        "cronjob.yaml": created["spec"]["rayClusterSpec"],
    }


@pytest.mark.parametrize("version", KUBERAY)
def test_every_kuberay_manifest_fits_the_crds_of_the_releases_the_docs_claim(schemas, version):
    (cluster,) = manifests("raycluster.yaml")
    (job,) = manifests("rayjob.yaml")
    (cron,) = manifests("raycronjob.yaml")
    created = yaml.safe_load({d["kind"]: d for d in manifests("cronjob.yaml")}["ConfigMap"]
                             ["data"]["rayjob.yaml"])
    for doc, kind in ((cluster, "RayCluster"), (job, "RayJob"), (created, "RayJob")):
        assert doc["apiVersion"] == "ray.io/v1" and doc["kind"] == kind
        check_against(doc["spec"], schemas[version][kind])
    assert cron["kind"] == "RayCronJob"
    if version >= "1.7":
        check_against(cron["spec"], schemas[version]["RayCronJob"])
    elif "RayCronJob" in schemas[version]:  # why the docs say 1.7: 1.6 has no timeZone
        with pytest.raises(AssertionError, match="timeZone"):
            check_against(cron["spec"], schemas[version]["RayCronJob"])
    readme = (INFRA / "README.md").read_text()
    assert "1.5 or newer; 1.7 or newer for RayCronJob" in readme


def _pods() -> dict[str, dict]:
    """Every pod spec in infra/kuberay, by where it is."""
    pods = {}
    for name, spec in _cluster_specs().items():
        pods[f"{name} head"] = spec["headGroupSpec"]["template"]["spec"]
        for group in spec["workerGroupSpecs"]:
            pods[f"{name} {group['groupName']}"] = group["template"]["spec"]
    cron = {d["kind"]: d for d in manifests("cronjob.yaml")}["CronJob"]
    pods["cronjob.yaml CronJob"] = cron["spec"]["jobTemplate"]["spec"]["template"]["spec"]
    return pods


def test_every_pod_runs_restricted_and_bounded():
    """Kubernetes' restricted Pod Security Standard, and requests and limits everywhere."""
    for where, pod in _pods().items():
        context = pod["securityContext"]
        assert context["runAsNonRoot"] is True and context["runAsUser"] != 0, where
        assert context["seccompProfile"]["type"] == "RuntimeDefault", where
        for container in pod["containers"]:
            sc = container["securityContext"]
            assert sc["allowPrivilegeEscalation"] is False, where
            assert sc["capabilities"]["drop"] == ["ALL"], where
            assert not sc.get("privileged") and "add" not in sc["capabilities"], where
            for bound in ("requests", "limits"):
                assert {"cpu", "memory"} <= set(container["resources"][bound]), (where, bound)
    assert _pods()["cronjob.yaml CronJob"]["containers"][0]["securityContext"][
        "readOnlyRootFilesystem"] is True


def test_every_service_account_a_pod_names_is_defined():
    defined = {d["metadata"]["name"] for name in ("serviceaccount.yaml", "cronjob.yaml")
               for d in manifests(name) if d["kind"] == "ServiceAccount"}
    named = {pod.get("serviceAccountName") for pod in _pods().values()}
    assert named <= defined, named - defined
    readme = (INFRA / "README.md").read_text()
    assert "kubectl apply -f infra/kuberay/serviceaccount.yaml" in readme


def test_the_image_runs_as_its_non_root_user():
    dockerfile = (INFRA / "docker" / "Dockerfile").read_text()
    users = re.findall(r"^USER (\S+)", dockerfile, re.MULTILINE)
    assert users and users[-1].split(":")[0] not in ("0", "root")
    ray_uid = {pod["securityContext"]["runAsUser"] for where, pod in _pods().items()
               if "CronJob" not in where}
    assert ray_uid == {int(users[-1].split(":")[0])}


def test_the_gpu_check_stops_only_what_it_started():
    script = (INFRA / "gpu_check.sh").read_text()
    assert not re.search(r"\b(pkill|killall)\s+(-\S+\s+)*-f\b", script)
    assert "setsid" in script and 'pkill -s "$session"' in script


def test_one_cluster_spec_everywhere_with_the_projects_image_and_ray():
    specs = _cluster_specs()
    first = next(iter(specs.values()))
    assert all(s == first for s in specs.values()), "the cluster specs have drifted apart"
    assert first["rayVersion"] == RAY_VERSION
    assert first["enableInTreeAutoscaling"] and first["autoscalerOptions"]["version"] == "v2"
    assert first["headGroupSpec"]["rayStartParams"]["num-cpus"] == "0"
    (gpu,) = first["workerGroupSpecs"]
    assert gpu["minReplicas"] == 0 and gpu["maxReplicas"] >= 1
    containers = [first["headGroupSpec"]["template"]["spec"]["containers"][0],
                  gpu["template"]["spec"]["containers"][0]]
    assert {c["image"] for c in containers} == {f"mimo-restore:{VERSION}"}
    assert containers[1]["resources"]["limits"]["nvidia.com/gpu"] == "1"


def test_jobs_run_the_restore_with_a_real_config_and_end():
    (job,) = manifests("rayjob.yaml")
    (cron,) = manifests("raycronjob.yaml")
    created = yaml.safe_load({d["kind"]: d for d in manifests("cronjob.yaml")}["ConfigMap"]
                             ["data"]["rayjob.yaml"])
    for spec in (job["spec"], cron["spec"]["jobTemplate"], created["spec"]):
        check_restore_command(spec["entrypoint"])
        assert spec["shutdownAfterJobFinishes"] is True
        assert spec["ttlSecondsAfterFinished"] > 0 and spec["backoffLimit"] >= 1
        # a nightly run must end before the next one starts
        assert 0 < spec["activeDeadlineSeconds"] < 24 * 3600
    assert "feature-gates=RayCronJob=true" in (INFRA / "kuberay" / "raycronjob.yaml").read_text()


def test_cronjob_alternative_creates_the_rayjob_with_the_rights_it_needs():
    docs = {d["kind"]: d for d in manifests("cronjob.yaml")}
    cron = docs["CronJob"]
    assert cron["apiVersion"] == "batch/v1"
    assert cron["spec"]["schedule"] == manifests("raycronjob.yaml")[0]["spec"]["schedule"]
    pod = cron["spec"]["jobTemplate"]["spec"]["template"]["spec"]
    assert pod["serviceAccountName"] == docs["ServiceAccount"]["metadata"]["name"]
    (container,) = pod["containers"]
    assert container["command"][:3] == ["kubectl", "create", "-f"]
    mount = container["volumeMounts"][0]
    (volume,) = [v for v in pod["volumes"] if v["name"] == mount["name"]]
    assert volume["configMap"]["name"] == docs["ConfigMap"]["metadata"]["name"]
    key = container["command"][3].removeprefix(mount["mountPath"] + "/")
    created = yaml.safe_load(docs["ConfigMap"]["data"][key])
    assert created["kind"] == "RayJob" and "generateName" in created["metadata"]
    (rule,) = docs["Role"]["rules"]
    assert rule["apiGroups"] == ["ray.io"] and "rayjobs" in rule["resources"]
    assert "create" in rule["verbs"]
    binding = docs["RoleBinding"]
    assert binding["roleRef"]["name"] == docs["Role"]["metadata"]["name"]
    assert binding["subjects"][0]["name"] == pod["serviceAccountName"]


def test_readme_commands_name_files_that_exist():
    readme = (INFRA / "README.md").read_text()
    generated = {"infra/aws/.cluster.resolved.yaml", "infra/aws/.auth_token"}  # by up.sh
    for path in re.findall(r"infra/[\w/.-]+\.(?:yaml|sh|py)|configs/[\w.-]+\.yaml", readme):
        assert (REPO / path).exists() or path in generated, path
    for command in re.findall(r"python -m jobs\.restore[^`\n]*", readme.replace("\\\n", " ")):
        check_restore_command(command.split("#")[0], project_dir=str(REPO))
