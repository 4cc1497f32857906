"""deploy/ validated offline: schemas, and consistency with the code.

No Docker engine, cluster or network is used. deploy/compose.yaml is checked against the Compose
Specification JSON schema vendored in deploy/schemas/; the Kubernetes manifests against the OpenAPI-derived
schemas that the PyPI package `kubernetes-validate` ships (strict: unknown fields fail). The rest keeps the
files in step with the code: environment variables the code reads, `switchyard` subcommands and flags,
topic partition counts from shared/topics.py, providers from the example config.
"""

from __future__ import annotations

import ast
import functools
import hashlib
import json
import os
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

from switchyard.shared import topics
from switchyard.shared.config import CREDENTIAL_FIELDS, parse_config

ROOT = Path(__file__).resolve().parents[1]
DEPLOY = ROOT / "deploy"
K8S = DEPLOY / "k8s"
COMPOSE_FILE = DEPLOY / "compose.yaml"
COMPOSE_SCHEMA = DEPLOY / "schemas" / "compose-spec.json"
EXAMPLE_CONFIG = DEPLOY / "switchyard.example.yaml"
ENV_EXAMPLE = DEPLOY / "switchyard.env.example"
DOCKERFILE = DEPLOY / "Dockerfile"
README = DEPLOY / "README.md"
NAMESPACE = "switchyard"

# Kubernetes versions the manifests must be valid for: the oldest this package ships schemas for that we
# support, and the newest it ships.
K8S_MIN_VERSION = "1.27.0"

# Variables the compose env file may carry for containers that are not Switchyard (the postgres image).
THIRD_PARTY_ENV = {"POSTGRES_PASSWORD"}

_ENV_NAME = re.compile(r"^[A-Z][A-Z0-9]*(?:_[A-Z0-9]+)+$")
_CONFIG_VAR = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(?::-[^}]*)?\}")
_TOPIC_NAME = re.compile(r"\bllm\.[a-z0-9][a-z0-9_.<>-]*[a-z0-9>]")


def _jsonschema() -> Any:
    return pytest.importorskip(
        "jsonschema", reason="jsonschema is not installed: add it to the dev extras in pyproject.toml")


def _kubernetes_validate() -> Any:
    return pytest.importorskip(
        "kubernetes_validate",
        reason="kubernetes-validate is not installed: add it to the dev extras in pyproject.toml")


# ---- loading ------------------------------------------------------------------------------------


@functools.cache
def compose() -> dict[str, Any]:
    return dict(yaml.safe_load(COMPOSE_FILE.read_text()))


@functools.cache
def k8s_docs() -> list[tuple[str, dict[str, Any]]]:
    """(file name, document) for every manifest, the example Secret included, kustomization.yaml not."""
    docs = []
    for path in sorted(K8S.glob("*.yaml")):
        if path.name == "kustomization.yaml":
            continue
        for doc in yaml.safe_load_all(path.read_text()):
            if doc:
                docs.append((path.name, doc))
    return docs


def k8s_kind(kind: str) -> list[dict[str, Any]]:
    return [d for _, d in k8s_docs() if d["kind"] == kind]


def k8s_one(kind: str, name: str) -> dict[str, Any]:
    found = [d for d in k8s_kind(kind) if d["metadata"]["name"] == name]
    assert len(found) == 1, f"expected exactly one {kind} {name!r} in deploy/k8s, found {len(found)}"
    return found[0]


def workloads() -> list[dict[str, Any]]:
    return [d for _, d in k8s_docs() if d["kind"] in ("Deployment", "StatefulSet", "Job")]


def pod_spec(workload: dict[str, Any]) -> dict[str, Any]:
    return dict(workload["spec"]["template"]["spec"])


def is_switchyard_image(image: str) -> bool:
    name = image.rsplit("/", 1)[-1].split("@", 1)[0].split(":", 1)[0]
    return name == "switchyard"


def switchyard_containers(workload: dict[str, Any]) -> list[dict[str, Any]]:
    spec = pod_spec(workload)
    return [c for c in [*spec.get("initContainers", []), *spec["containers"]] if is_switchyard_image(c["image"])]


def compose_switchyard_services() -> dict[str, dict[str, Any]]:
    """Compose services that run the Switchyard image (built from deploy/Dockerfile)."""
    out = {}
    for name, svc in compose()["services"].items():
        build = svc.get("build") or {}
        if build.get("dockerfile") == "deploy/Dockerfile" or is_switchyard_image(str(svc.get("image", ""))):
            out[name] = svc
    return out


def compose_long_running() -> dict[str, dict[str, Any]]:
    return {n: s for n, s in compose_switchyard_services().items() if s.get("restart") != "no"}


def compose_env(svc: dict[str, Any]) -> dict[str, str]:
    env = svc.get("environment") or {}
    if isinstance(env, list):
        env = dict(item.split("=", 1) if "=" in item else (item, "") for item in env)
    return {str(k): str(v) for k, v in env.items()}


def compose_env_files(svc: dict[str, Any]) -> list[Path]:
    files = svc.get("env_file") or []
    if isinstance(files, str | dict):
        files = [files]
    return [DEPLOY / (f if isinstance(f, str) else f["path"]) for f in files]


def read_env_file(path: Path) -> dict[str, str]:
    out = {}
    for line in path.read_text().splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            key, _, value = line.partition("=")
            out[key.strip()] = value.strip()
    return out


def env_example() -> dict[str, str]:
    return read_env_file(ENV_EXAMPLE)


def provider_env_examples() -> dict[str, dict[str, str]]:
    """deploy/<provider>.env.example for every provider of the example config: that provider's keys."""
    return {p: read_env_file(DEPLOY / f"{p}.env.example") for p in config_providers()
            if (DEPLOY / f"{p}.env.example").is_file()}


def credential_vars() -> dict[str, set[str]]:
    """provider -> the ${VAR}s its deployments' credentials (CREDENTIAL_FIELDS) reference in the example config."""
    out: dict[str, set[str]] = {}
    for group in yaml.safe_load(config_text()).get("models") or []:
        for dep in group.get("deployments") or []:
            found = out.setdefault(dep["provider"], set())
            for name in CREDENTIAL_FIELDS:
                found.update(_CONFIG_VAR.findall(json.dumps(dep.get(name)) if name in dep else ""))
    return out


def compose_command(svc: dict[str, Any]) -> list[str]:
    cmd = svc.get("command")
    assert isinstance(cmd, list), "give Switchyard services their command in list form"
    return [str(c) for c in cmd]


def flag_value(argv: list[str], flag: str) -> str | None:
    for i, arg in enumerate(argv):
        if arg == flag and i + 1 < len(argv):
            return argv[i + 1]
        if arg.startswith(flag + "="):
            return arg.split("=", 1)[1]
    return None


def config_text() -> str:
    return EXAMPLE_CONFIG.read_text()


def config_vars() -> set[str]:
    """The ${VAR} names in the example config's values (comments are not interpolated)."""
    names: set[str] = set()

    def walk(node: Any) -> None:
        if isinstance(node, dict):
            for value in node.values():
                walk(value)
        elif isinstance(node, list):
            for value in node:
                walk(value)
        elif isinstance(node, str):
            names.update(_CONFIG_VAR.findall(node))

    walk(yaml.safe_load(config_text()))
    return names


def config_providers() -> list[str]:
    env = {name: "placeholder" for name in config_vars()}
    return parse_config(config_text(), env=env, source=str(EXAMPLE_CONFIG)).providers()


@functools.cache
def env_names_read_by_code() -> frozenset[str]:
    """UPPER_SNAKE string constants in shared/, services/ and switchyard/: the environment variables the code can read.

    Deliberately broad (any such literal counts, however the code then reads it: os.environ.get, a helper, an
    argparse default), so the check catches names the code does not know at all: typos, and variables a
    refactor removed or renamed.
    """
    names: set[str] = set()
    for folder in ("shared", "services", "switchyard"):
        for path in (ROOT / folder).rglob("*.py"):
            for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
                if isinstance(node, ast.Constant) and isinstance(node.value, str) and _ENV_NAME.match(node.value):
                    names.add(node.value)
    return frozenset(names)


# ---- schema validation --------------------------------------------------------------------------


def test_vendored_compose_schema_is_the_noted_one() -> None:
    noted = re.search(r"sha256: ([0-9a-f]{64})", (DEPLOY / "schemas" / "README.md").read_text())
    assert noted, "deploy/schemas/README.md must note the sha256 of compose-spec.json"
    assert hashlib.sha256(COMPOSE_SCHEMA.read_bytes()).hexdigest() == noted.group(1)


def test_compose_file_matches_the_compose_specification() -> None:
    jsonschema = _jsonschema()
    schema = json.loads(COMPOSE_SCHEMA.read_text())
    validator = jsonschema.Draft202012Validator(schema)
    errors = sorted(validator.iter_errors(compose()), key=lambda e: list(e.absolute_path))
    assert not errors, "\n".join(f"{'.'.join(map(str, e.absolute_path))}: {e.message}" for e in errors)

    # The schema is strict enough to matter: a misplaced key is caught.
    broken = json.loads(json.dumps(compose()))
    broken["services"]["router"]["replicas"] = 2
    assert list(validator.iter_errors(broken)), "the compose schema accepted an unknown service key"


def k8s_versions() -> list[str]:
    kv = _kubernetes_validate()
    from kubernetes_validate import utils

    versions = sorted(set(utils.all_versions()), key=lambda v: tuple(int(x) for x in v.split(".")))
    chosen = [v for v in versions if v == K8S_MIN_VERSION] + [versions[-1]]
    assert kv is not None
    return sorted(set(chosen))


def test_kubernetes_manifests_match_the_kubernetes_schemas() -> None:
    kv = _kubernetes_validate()
    problems = []
    for version in k8s_versions():
        for file, doc in k8s_docs():
            try:
                kv.validate(doc, version, strict=True)
            except Exception as e:  # ValidationError, SchemaNotFoundError, ...
                problems.append(f"{file}: {doc.get('kind')} {doc['metadata'].get('name')} "
                                f"(Kubernetes {version}): {getattr(e, 'message', e)}")
    assert not problems, "\n".join(problems)

    # Strict validation catches a misspelt field.
    deployment = json.loads(json.dumps(k8s_one("Deployment", "router")))
    container = deployment["spec"]["template"]["spec"]["containers"][0]
    container["readinesProbe"] = container.pop("readinessProbe")
    with pytest.raises(kv.ValidationError):
        kv.validate(deployment, k8s_versions()[-1], strict=True)


def test_kustomization_lists_every_manifest_but_the_example_secret() -> None:
    kustomization = yaml.safe_load((K8S / "kustomization.yaml").read_text())
    listed = kustomization["resources"]
    for name in listed:
        assert (K8S / name).is_file(), f"kustomization.yaml lists {name}, which does not exist"
    on_disk = {p.name for p in K8S.glob("*.yaml")} - {"kustomization.yaml", "secret.example.yaml"}
    assert set(listed) == on_disk
    assert "secret.example.yaml" not in listed, "the example Secret must not be applied with real placeholders"
    assert kustomization.get("namespace") == NAMESPACE
    assert [i["name"] for i in kustomization.get("images", [])] == ["switchyard"]


# ---- Kubernetes: references and production settings -----------------------------------------------


def test_kubernetes_references_resolve() -> None:
    configmaps = {d["metadata"]["name"] for d in k8s_kind("ConfigMap")}
    secrets = {d["metadata"]["name"] for d in k8s_kind("Secret")}
    for _, doc in k8s_docs():
        if doc["kind"] != "Namespace":
            assert doc["metadata"].get("namespace") == NAMESPACE, f"{doc['kind']} {doc['metadata']['name']}"
    for wl in workloads():
        name = f"{wl['kind']} {wl['metadata']['name']}"
        spec = pod_spec(wl)
        volumes = {v["name"]: v for v in spec.get("volumes", [])}
        for v in volumes.values():
            if "configMap" in v:
                assert v["configMap"]["name"] in configmaps, f"{name}: volume {v['name']}"
        for c in [*spec.get("initContainers", []), *spec["containers"]]:
            for src in c.get("envFrom", []):
                if "configMapRef" in src:
                    assert src["configMapRef"]["name"] in configmaps, f"{name}/{c['name']}: envFrom"
                if "secretRef" in src:
                    assert src["secretRef"]["name"] in secrets, f"{name}/{c['name']}: envFrom"
            for m in c.get("volumeMounts", []):
                assert m["name"] in volumes, f"{name}/{c['name']}: mounts unknown volume {m['name']}"
            port_names = {p.get("name") for p in c.get("ports", [])}
            for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
                port = c.get(probe, {}).get("httpGet", {}).get("port")
                if isinstance(port, str):
                    assert port in port_names, f"{name}/{c['name']}: {probe} names unknown port {port}"
        if wl["kind"] != "Job":
            selector = wl["spec"]["selector"]["matchLabels"]
            labels = wl["spec"]["template"]["metadata"]["labels"]
            assert selector.items() <= labels.items(), f"{name}: selector does not match its pod labels"

    pod_labels = [d["spec"]["template"]["metadata"]["labels"] for d in workloads() if d["kind"] != "Job"]
    for svc in k8s_kind("Service"):
        sel = svc["spec"]["selector"]
        assert any(sel.items() <= labels.items() for labels in pod_labels), f"Service {svc['metadata']['name']}"
    for pdb in k8s_kind("PodDisruptionBudget"):
        sel = pdb["spec"]["selector"]["matchLabels"]
        matching = [labels for labels in pod_labels if sel.items() <= labels.items()]
        assert len(matching) == 1, f"PodDisruptionBudget {pdb['metadata']['name']} matches {len(matching)} workloads"
    for hpa in k8s_kind("HorizontalPodAutoscaler"):
        ref = hpa["spec"]["scaleTargetRef"]
        k8s_one(ref["kind"], ref["name"])


def test_every_kubernetes_service_has_probes_resources_a_budget_and_runs_unprivileged() -> None:
    pdb_selectors = [p["spec"]["selector"]["matchLabels"] for p in k8s_kind("PodDisruptionBudget")]
    for wl in workloads():
        name = f"{wl['kind']} {wl['metadata']['name']}"
        spec = pod_spec(wl)
        assert spec["securityContext"].get("runAsNonRoot") is True, name
        assert spec.get("automountServiceAccountToken") is False, name
        for c in [*spec.get("initContainers", []), *spec["containers"]]:
            for kind in ("requests", "limits"):
                assert {"cpu", "memory"} <= set(c.get("resources", {}).get(kind, {})), f"{name}/{c['name']}: {kind}"
            sc = c.get("securityContext", {})
            assert sc.get("allowPrivilegeEscalation") is False, f"{name}/{c['name']}"
            assert sc.get("capabilities", {}).get("drop") == ["ALL"], f"{name}/{c['name']}"
        if wl["kind"] == "Job":
            continue
        labels = wl["spec"]["template"]["metadata"]["labels"]
        assert any(sel.items() <= labels.items() for sel in pdb_selectors), f"{name} has no PodDisruptionBudget"
        for c in spec["containers"]:
            assert c["readinessProbe"]["httpGet"]["path"] == "/ready", f"{name}/{c['name']}"
            assert c["livenessProbe"]["httpGet"]["path"] == "/health", f"{name}/{c['name']}"


def test_ingress_is_a_statefulset_that_owns_reply_partitions_by_ordinal() -> None:
    sts = k8s_one("StatefulSet", "ingress")
    headless = k8s_one("Service", sts["spec"]["serviceName"])
    assert headless["spec"].get("clusterIP") == "None", "a StatefulSet's serviceName must be a headless Service"
    assert sts["spec"]["replicas"] <= topics.PARTITIONS[topics.REPLIES], "one llm.replies partition per replica"
    (container,) = sts["spec"]["template"]["spec"]["containers"]
    env = {e["name"]: e.get("value") for e in container.get("env", [])}
    assert env.get("SWITCHYARD_REPLY_PARTITION") == "ordinal"
    # No other workload runs ingress: a Deployment's pods would have no ordinal and share partitions.
    for wl in workloads():
        if wl is not sts:
            for c in switchyard_containers(wl):
                assert c["args"][0] != "ingress", f"{wl['kind']} {wl['metadata']['name']} runs ingress"
    # The Service clients use is a normal (load-balanced) Service in front of the same pods.
    ingress_svc = k8s_one("Service", "ingress")
    assert ingress_svc["spec"].get("clusterIP") != "None"


def test_ordinal_reply_partition_is_parsed_from_statefulset_hostnames(monkeypatch: pytest.MonkeyPatch) -> None:
    try:
        from switchyard.services.ingress.app import reply_partition_from_env
    except ImportError as e:
        pytest.skip(f"switchyard.services.ingress.app.reply_partition_from_env is not importable: {e}")
    import socket

    for ordinal in (0, 3, topics.PARTITIONS[topics.REPLIES] - 1):
        monkeypatch.setattr(socket, "gethostname", lambda o=ordinal: f"ingress-{o}")
        assert reply_partition_from_env("ordinal") == ordinal


def test_configmap_carries_the_example_config_verbatim() -> None:
    cm = k8s_one("ConfigMap", "switchyard-config")
    assert cm["data"]["switchyard.yaml"] == config_text(), (
        "deploy/k8s/configmap.yaml (switchyard-config) differs from deploy/switchyard.example.yaml; "
        "copy the file into the ConfigMap")
    env = k8s_one("ConfigMap", "switchyard-env")["data"]
    mounts = {m["mountPath"] for wl in workloads() for c in switchyard_containers(wl) for m in c["volumeMounts"]}
    assert str(Path(env["SWITCHYARD_CONFIG"]).parent) in mounts


# ---- compose ------------------------------------------------------------------------------------


def test_compose_runs_a_three_broker_kraft_cluster_with_safe_replication() -> None:
    kafka = {n: s for n, s in compose()["services"].items() if str(s.get("image", "")).startswith("apache/kafka:")}
    assert len(kafka) == 3, f"expected 3 Kafka brokers, found {sorted(kafka)}"
    envs = {n: compose_env(s) for n, s in kafka.items()}
    node_of = {int(e["KAFKA_NODE_ID"]): n for n, e in envs.items()}
    assert len(node_of) == 3, "every node needs its own KAFKA_NODE_ID"
    controllers = {i: n for i, n in node_of.items() if "controller" in envs[n]["KAFKA_PROCESS_ROLES"]}
    assert len(controllers) in (1, 3), "a KRaft quorum of 1 or 3 controllers"
    for name, env in envs.items():
        assert "broker" in env["KAFKA_PROCESS_ROLES"], name
        voters = {int(i): hp.split(":")[0] for i, hp in
                  (v.split("@") for v in env["KAFKA_CONTROLLER_QUORUM_VOTERS"].split(","))}
        assert voters == controllers, f"{name}: quorum voters {voters} are not the controllers {controllers}"
        assert int(env["KAFKA_DEFAULT_REPLICATION_FACTOR"]) == 3, name
        assert int(env["KAFKA_MIN_INSYNC_REPLICAS"]) == 2, name
        assert env["KAFKA_AUTO_CREATE_TOPICS_ENABLE"] == "false", name
        assert int(env["KAFKA_OFFSETS_TOPIC_REPLICATION_FACTOR"]) == 3, name
        assert env["KAFKA_ADVERTISED_LISTENERS"].startswith(f"PLAINTEXT://{name}:"), name
        assert env["CLUSTER_ID"] == envs[sorted(envs)[0]]["CLUSTER_ID"], "one cluster id for every node"
        assert any(v.endswith(":/var/lib/kafka/data") for v in kafka[name].get("volumes", [])), name

    bootstrap = {compose_env(s)["KAFKA_BOOTSTRAP_SERVERS"] for s in compose_switchyard_services().values()}
    assert len(bootstrap) == 1
    assert {hp.split(":")[0] for hp in bootstrap.pop().split(",")} == set(kafka)


def test_compose_setup_jobs_run_first() -> None:
    services = compose()["services"]
    ours = compose_switchyard_services()
    jobs = {n: s for n, s in ours.items() if s.get("restart") == "no"}
    by_command = {tuple(compose_command(s)[:2]): n for n, s in jobs.items()}
    topics_job = by_command[("topics", "create")]
    migrate_job = by_command[("migrate",)]
    rf = int(flag_value(compose_command(jobs[topics_job]), "--replication-factor")
             or compose_env(jobs[topics_job]).get("KAFKA_REPLICATION_FACTOR", "1"))
    assert rf == 3, "topics must be created with replication factor 3 (min.insync.replicas=2)"

    kafka = [n for n, s in services.items() if str(s.get("image", "")).startswith("apache/kafka:")]
    for broker in kafka:
        assert jobs[topics_job]["depends_on"][broker]["condition"] == "service_healthy"
    pg = [n for n, s in services.items() if str(s.get("image", "")).startswith("postgres:")]
    assert pg and all(jobs[migrate_job]["depends_on"][p]["condition"] == "service_healthy" for p in pg)

    for name, svc in compose_long_running().items():
        deps = svc.get("depends_on", {})
        for job in (topics_job, migrate_job):
            assert deps.get(job, {}).get("condition") == "service_completed_successfully", f"{name} -> {job}"
    for name, svc in services.items():
        for dep in svc.get("depends_on", {}):
            assert dep in services, f"{name} depends on unknown service {dep}"


def test_compose_postgres_and_healthchecks() -> None:
    services = compose()["services"]
    (pg,) = [s for s in services.values() if str(s.get("image", "")).startswith("postgres:")]
    assert pg["image"] == "postgres:15"
    assert "pg_isready" in " ".join(pg["healthcheck"]["test"])
    assert any(v.endswith(":/var/lib/postgresql/data") for v in pg["volumes"])
    assert set(compose()["volumes"]) >= {v.split(":")[0] for s in services.values() for v in s.get("volumes", [])
                                         if not v.startswith(".")}
    for name, svc in services.items():
        if svc.get("restart") != "no":
            assert "healthcheck" in svc, f"{name} has no healthcheck"
    for name, svc in compose_long_running().items():
        test = " ".join(svc["healthcheck"]["test"])
        cmd = compose_command(svc)
        port = flag_value(cmd, "--port") if cmd[0] == "ingress" else flag_value(cmd, "--health-port")
        assert port, f"{name}: no port to probe"
        assert f":{port}/ready" in test, f"{name}: healthcheck must probe /ready on port {port}"


def test_compose_ingress_replicas_own_distinct_reply_partitions() -> None:
    ingress = {n: s for n, s in compose_long_running().items() if compose_command(s)[0] == "ingress"}
    assert len(ingress) >= 2
    partitions, host_ports = [], []
    for name, svc in ingress.items():
        assert svc.get("deploy", {}).get("replicas", 1) == 1, f"{name}: one process per reply partition"
        cmd = compose_command(svc)
        value = flag_value(cmd, "--reply-partition") or compose_env(svc).get("SWITCHYARD_REPLY_PARTITION")
        assert value is not None and value.isdigit(), f"{name}: needs its own SWITCHYARD_REPLY_PARTITION"
        partitions.append(int(value))
        assert flag_value(cmd, "--host") == "0.0.0.0", f"{name}: must listen on all interfaces in a container"
        host_ports += [str(p).rsplit(":", 2)[-2] for p in svc.get("ports", [])]
    assert len(set(partitions)) == len(partitions), f"reply partitions repeat: {partitions}"
    assert all(0 <= p < topics.PARTITIONS[topics.REPLIES] for p in partitions)
    assert len(set(host_ports)) == len(host_ports), f"host ports repeat: {host_ports}"


def test_compose_config_and_secrets() -> None:
    for name, svc in compose_switchyard_services().items():
        env = compose_env(svc)
        target = env["SWITCHYARD_CONFIG"]
        mounts = [v for v in svc.get("volumes", []) if v.split(":")[1] == target]
        assert mounts, f"{name}: nothing mounted at SWITCHYARD_CONFIG={target}"
        assert (DEPLOY / mounts[0].split(":")[0]).resolve() == EXAMPLE_CONFIG.resolve()
        files = compose_env_files(svc)
        assert files, f"{name}: secrets come from the env file"
        assert files[0] == ENV_EXAMPLE.with_suffix(""), f"{name}: the shared env file comes first"
        for f in files:
            assert f.with_name(f.name + ".example").is_file(), f"{name}: {f} has no .example beside it"
    example = env_example()
    every_example = set(example).union(*provider_env_examples().values())
    assert config_vars() <= every_example, "every ${VAR} in the example config must be in an env file example"
    assert {"DATABASE_URL", "SWITCHYARD_MASTER_KEY"} <= set(example)
    password = re.match(r"postgresql://[^:]+:([^@]+)@", example["DATABASE_URL"])
    assert password and password.group(1) == example["POSTGRES_PASSWORD"], "keep the two passwords in step"
    secret = k8s_one("Secret", "switchyard-secrets")["stringData"]
    every_secret = {key for doc in k8s_kind("Secret") for key in doc["stringData"]}
    assert config_vars() <= every_secret, "every ${VAR} in the example config must be in an example Secret"
    assert {"DATABASE_URL", "SWITCHYARD_MASTER_KEY"} <= set(secret)


def _k8s_secret_keys(container: dict[str, Any]) -> set[str]:
    """The keys of every Secret a container reads (envFrom, or env valueFrom.secretKeyRef)."""
    keys = {e["name"] for e in container.get("env", []) if "secretKeyRef" in e.get("valueFrom", {})}
    for src in container.get("envFrom", []):
        if "secretRef" in src:
            keys |= set(k8s_one("Secret", src["secretRef"]["name"])["stringData"])
    return keys


def _compose_keys(svc: dict[str, Any]) -> set[str]:
    """Every variable a compose service gets: its environment and its env files (their .example beside them)."""
    keys = set(compose_env(svc))
    for f in compose_env_files(svc):
        keys |= set(read_env_file(f.with_name(f.name + ".example")))
    return keys


def test_provider_secrets_reach_only_their_providers_workers() -> None:
    """Issue 18: a provider's keys are mounted in that provider's worker pool only, never in ingress (the
    internet-facing process), the router, accounting, the setup job or another provider's workers."""
    by_provider = credential_vars()
    assert by_provider and all(by_provider.values()), "the example config's credentials name no ${VAR}"
    every = set().union(*by_provider.values())
    for wl in workloads():
        for c in switchyard_containers(wl):
            args = [str(a) for a in c["args"]]
            own = by_provider.get(flag_value(args, "--provider") or "", set()) if args[0] == "worker" else set()
            held = _k8s_secret_keys(c) & every
            where = f"k8s {wl['metadata']['name']}/{c['name']}"
            assert held == own, f"{where} holds provider keys {sorted(held)}; it should hold {sorted(own)}"
    names = [d["metadata"]["name"] for d in k8s_kind("Secret")]
    assert len(names) == len(set(names)), f"Secret names repeat: {names}"
    shared = set(k8s_one("Secret", "switchyard-secrets")["stringData"])
    assert not shared & every, f"the Secret every pod reads holds provider keys {sorted(shared & every)}"
    for name, svc in compose_switchyard_services().items():
        cmd = compose_command(svc)
        own = by_provider.get(flag_value(cmd, "--provider") or "", set()) if cmd[0] == "worker" else set()
        held = _compose_keys(svc) & every
        assert held == own, f"compose {name} holds provider keys {sorted(held)}; it should hold {sorted(own)}"


# ---- in step with the code ------------------------------------------------------------------------


def test_example_config_is_valid() -> None:
    config = parse_config(config_text(), env=env_example(), source=str(EXAMPLE_CONFIG))
    assert config.providers(), "the example config names no provider"


def test_worker_pools_match_the_providers_in_the_config() -> None:
    providers = set(config_providers())
    compose_workers: dict[str, str] = {}
    for name, svc in compose_long_running().items():
        cmd = compose_command(svc)
        if cmd[0] == "worker":
            provider = flag_value(cmd, "--provider")
            assert provider and name == f"worker-{provider}", f"compose service {name} runs workers for {provider}"
            compose_workers[name] = provider
    assert set(compose_workers.values()) == providers

    k8s_workers = {}
    for wl in workloads():
        for c in switchyard_containers(wl):
            if c["args"][0] == "worker":
                provider = flag_value(c["args"], "--provider")
                assert provider and wl["metadata"]["name"] == f"worker-{provider}"
                k8s_workers[wl["metadata"]["name"]] = provider
    assert set(k8s_workers.values()) == providers
    autoscaled = {h["spec"]["scaleTargetRef"]["name"] for h in k8s_kind("HorizontalPodAutoscaler")}
    assert autoscaled == set(k8s_workers), "every worker pool has its HorizontalPodAutoscaler example"


def test_every_provider_in_the_config_has_an_adapter() -> None:
    from switchyard.services.workers.providers import ADAPTERS

    missing = sorted(set(config_providers()) - set(ADAPTERS))
    if missing:
        pytest.skip(f"no worker adapter yet for {missing}: worker-<provider> for these would exit at start")


def _deploy_env_names() -> dict[str, set[str]]:
    """Every environment variable name the deploy files give a Switchyard process, with where."""
    found: dict[str, set[str]] = {}

    def add(name: str, where: str) -> None:
        found.setdefault(name, set()).add(where)

    for name, svc in compose_switchyard_services().items():
        for key in compose_env(svc):
            add(key, f"compose.yaml:{name}")
    for key in env_example():
        if key not in THIRD_PARTY_ENV:
            add(key, ENV_EXAMPLE.name)
    for provider, keys in provider_env_examples().items():
        for key in keys:
            add(key, f"{provider}.env.example")
    envfrom_cms, envfrom_secrets = set(), set()
    for wl in workloads():
        for c in switchyard_containers(wl):
            for e in c.get("env", []):
                add(e["name"], f"k8s {wl['metadata']['name']}/{c['name']}")
            for src in c.get("envFrom", []):
                if "configMapRef" in src:
                    envfrom_cms.add(src["configMapRef"]["name"])
                if "secretRef" in src:
                    envfrom_secrets.add(src["secretRef"]["name"])
    for cm in k8s_kind("ConfigMap"):
        if cm["metadata"]["name"] in envfrom_cms:
            for key in cm["data"]:
                add(key, f"k8s ConfigMap {cm['metadata']['name']}")
    for secret in k8s_kind("Secret"):
        if secret["metadata"]["name"] in envfrom_secrets:
            for key in {**secret.get("stringData", {}), **secret.get("data", {})}:
                add(key, f"k8s Secret {secret['metadata']['name']}")
    return found


def test_every_environment_variable_in_deploy_is_one_the_code_reads() -> None:
    known = env_names_read_by_code() | config_vars()
    unknown = {name: sorted(where) for name, where in _deploy_env_names().items() if name not in known}
    assert not unknown, (
        "deploy/ sets environment variables that neither shared/ nor services/ reads, nor the example config "
        f"references as ${{VAR}}: {unknown}")


def test_every_switchyard_process_gets_the_settings_it_needs() -> None:
    required = {"KAFKA_BOOTSTRAP_SERVERS", "SWITCHYARD_CONFIG", "DATABASE_URL", "SWITCHYARD_MASTER_KEY"}
    example = set(env_example())
    for name, svc in compose_switchyard_services().items():
        have = set(compose_env(svc)) | (example if compose_env_files(svc) else set())
        assert required <= have, f"compose {name} lacks {sorted(required - have)}"
    for wl in workloads():
        for c in switchyard_containers(wl):
            have = {e["name"] for e in c.get("env", [])}
            for src in c.get("envFrom", []):
                if "configMapRef" in src:
                    have |= set(k8s_one("ConfigMap", src["configMapRef"]["name"])["data"])
                if "secretRef" in src:
                    have |= set(k8s_one("Secret", src["secretRef"]["name"])["stringData"])
            assert required <= have, f"k8s {wl['metadata']['name']}/{c['name']} lacks {sorted(required - have)}"
    acks = {compose_env(s).get("KAFKA_ACKS") for s in compose_switchyard_services().values()}
    acks.add(k8s_one("ConfigMap", "switchyard-env")["data"].get("KAFKA_ACKS"))
    assert acks <= {"all", None}, "real Kafka deployments produce with acks=all"


def test_replica_counts_fit_the_partition_counts() -> None:
    consumed = {"router": topics.PARTITIONS[topics.REQUESTS], "accounting": topics.PARTITIONS[topics.USAGE],
                "worker": topics.PROVIDER_PARTITIONS, "ingress": topics.PARTITIONS[topics.REPLIES]}
    for name, svc in compose_long_running().items():
        limit = consumed[compose_command(svc)[0]]
        assert svc.get("deploy", {}).get("replicas", 1) <= limit, name
    for wl in workloads():
        for c in switchyard_containers(wl):
            if wl["kind"] != "Job":
                assert wl["spec"]["replicas"] <= consumed[c["args"][0]], wl["metadata"]["name"]
    for hpa in k8s_kind("HorizontalPodAutoscaler"):
        assert hpa["spec"]["maxReplicas"] <= topics.PROVIDER_PARTITIONS, hpa["metadata"]["name"]
        assert hpa["spec"]["minReplicas"] <= hpa["spec"]["maxReplicas"]


def test_topic_names_and_partition_counts_match_shared_topics() -> None:
    providers = config_providers()
    wanted = topics.all_topics(providers)
    generic = {
        topics.provider_topic("<name>"): topics.PROVIDER_PARTITIONS,
        topics.provider_topic("<name>", batch=True): topics.PROVIDER_PARTITIONS,
        topics.provider_topic("<p>"): topics.PROVIDER_PARTITIONS,
        topics.provider_topic("<p>", batch=True): topics.PROVIDER_PARTITIONS,
    }
    known = {**wanted, **generic}

    # Every topic the deploy files mention (comments included) is one the code creates.
    for path in [COMPOSE_FILE, *sorted(K8S.glob("*.yaml"))]:
        for name in _TOPIC_NAME.findall(path.read_text()):
            name = name.rstrip(".")
            if name.startswith(topics.PROVIDER_PREFIX) and name.endswith("*"):
                continue
            assert name in known, f"{path.relative_to(ROOT)} mentions topic {name}, unknown to shared/topics.py"

    # The README's partition table matches shared/topics.py, row for row.
    rows = dict(re.findall(r"^\| `(llm\.[^`]+)` \| (\d+) \|", README.read_text(), flags=re.M))
    expected = {**topics.PARTITIONS,
                topics.provider_topic("<name>"): topics.PROVIDER_PARTITIONS,
                topics.provider_topic("<name>", batch=True): topics.PROVIDER_PARTITIONS}
    assert {k: int(v) for k, v in rows.items()} == expected, "deploy/README.md partition table"


# ---- the CLI ------------------------------------------------------------------------------------


_HELP_SCRIPT = """
import contextlib, io, json, sys
from switchyard.cli import main
out = {}
for path in json.loads(sys.argv[1]):
    buf = io.StringIO()
    try:
        with contextlib.redirect_stdout(buf):
            main([*path, "--help"])
        code = 0
    except SystemExit as e:
        code = e.code or 0
    out[" ".join(path)] = buf.getvalue() if code == 0 else None
print(json.dumps(out))
"""


def cli_helps(paths: set[tuple[str, ...]]) -> dict[tuple[str, ...], str | None]:
    """`switchyard PATH --help` for every path, in one interpreter (None where the command does not exist)."""
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    ordered = sorted(paths)
    proc = subprocess.run([sys.executable, "-c", _HELP_SCRIPT, json.dumps(ordered)], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, f"switchyard --help failed:\n{proc.stdout}\n{proc.stderr}"
    helps = json.loads(proc.stdout.strip().splitlines()[-1])
    return {path: helps[" ".join(path)] for path in ordered}


def _deploy_commands() -> list[tuple[str, list[str]]]:
    out = [(f"compose.yaml:{n}", compose_command(s)) for n, s in compose_switchyard_services().items()]
    for wl in workloads():
        for c in switchyard_containers(wl):
            where = f"{wl['metadata']['name']}/{c['name']}"
            assert "command" not in c, f"{where}: use args; the image's ENTRYPOINT runs switchyard"
            out.append((f"k8s {wl['metadata']['name']}/{c['name']}", [str(a) for a in c["args"]]))
    return out


def test_every_deploy_command_exists_in_the_cli() -> None:
    if not (ROOT / "switchyard" / "cli.py").exists():
        pytest.skip("switchyard/cli.py (the `switchyard` command) does not exist yet")
    # The runtime contract deploy/ relies on, beyond the commands the files use.
    contract: dict[tuple[str, ...], list[str]] = {
        ("ingress",): ["--host", "--port", "--reply-partition"], ("router",): ["--health-port"],
        ("worker",): ["--provider", "--health-port"], ("accounting",): ["--health-port"],
        ("topics", "create"): ["--replication-factor"], ("migrate",): []}
    commands = _deploy_commands()
    wanted: set[tuple[str, ...]] = set(contract)
    for _, argv in commands:
        words = argv[: next((i for i, a in enumerate(argv) if a.startswith("-")), len(argv))]
        wanted |= {tuple(words[:i]) for i in range(len(words) + 1)}
    helps = cli_helps(wanted)
    for where, argv in [*commands, *(("the runtime contract", [*p, *f]) for p, f in contract.items())]:
        path: tuple[str, ...] = ()
        for arg in argv:
            if arg.startswith("-"):
                break
            parent = helps[path]
            assert parent is not None and helps[(*path, arg)] is not None and re.search(
                rf"\b{re.escape(arg)}\b", parent), f"{where}: `switchyard {' '.join(path)}` has no subcommand {arg!r}"
            path = (*path, arg)
        help_text = helps[path] or ""
        for arg in argv:
            if arg.startswith("--"):
                flag = arg.split("=", 1)[0]
                assert re.search(rf"(?<![\w-]){re.escape(flag)}(?![\w-])", help_text), (
                    f"{where}: `switchyard {' '.join(path)}` has no flag {flag}")


# ---- the image ------------------------------------------------------------------------------------


def _dockerfile_instructions() -> list[tuple[str, str]]:
    text = re.sub(r"\\\n", " ", DOCKERFILE.read_text())
    out = []
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            op, _, rest = line.partition(" ")
            out.append((op.upper(), rest.strip()))
    return out


def test_dockerfile_builds_one_non_root_image_for_every_service() -> None:
    instructions = _dockerfile_instructions()
    froms = [rest.split()[0] for op, rest in instructions if op == "FROM"]
    assert froms and all(f == "python:3.11-slim" for f in froms), froms
    final = instructions[max(i for i, (op, _) in enumerate(instructions) if op == "FROM"):]
    users = [rest for op, rest in final if op == "USER"]
    assert users, "the final stage must switch to a non-root user"
    user = users[-1].split(":")[0]
    assert user not in ("root", "0"), "the image must not run as root"
    assert user.isdigit(), "use a numeric USER so Kubernetes runAsNonRoot can verify it"
    uids = {c["securityContext"].get("runAsUser") for wl in workloads() for c in [pod_spec(wl)]}
    assert uids == {int(user)}, "k8s runAsUser must be the image's user"
    (entrypoint,) = [json.loads(rest) for op, rest in final if op == "ENTRYPOINT"]
    assert entrypoint[-1] == "switchyard", "the command picks the service: ENTRYPOINT runs `switchyard`"
    runs = " ".join(rest for op, rest in instructions if op == "RUN")
    assert re.search(r"pip (wheel|install)\b.* \.(\s|$)", runs), "the image installs the repository with pip"
    exposed = {p for op, rest in final if op == "EXPOSE" for p in rest.split()}
    assert {"8080", "8081"} <= exposed

    ignore = (DEPLOY / "Dockerfile.dockerignore").read_text().splitlines()
    kept = {line[1:].rstrip("/") for line in ignore if line.startswith("!")}
    assert {"pyproject.toml", "shared", "services", "switchyard"} <= kept
    for name in ("pyproject.toml", "shared", "services", "switchyard"):
        assert (ROOT / name).exists()


def test_readme_covers_what_an_operator_needs() -> None:
    text = README.read_text()
    for needle in ("acks=all", "enable.idempotence", "min.insync.replicas=2", "--reset-offsets",
                   "--to-datetime", "llm.usage", "event id", "llm.dead", "Little's law", "in memory",
                   "consumer lag", "at least once", "exactly once"):
        assert needle in text, f"deploy/README.md does not mention {needle!r}"
