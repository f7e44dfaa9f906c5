"""The scale-out setups under infra/: Docker cannot run here, so the files are parsed and checked.

Every process they start must be a program this project's environment provides (the image installs the
same package), its subcommands and options must exist (``<exe> <subcommand> --help``), images must be
built from infra/Dockerfile, and the addresses between services must name services that exist.
"""

from __future__ import annotations

import functools
import os
import re
import shlex
import shutil
import subprocess
import sys
import tomllib
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import pytest
import yaml
from packaging.requirements import Requirement
from packaging.specifiers import SpecifierSet

ROOT = Path(__file__).resolve().parents[1]
INFRA = ROOT / "infra"
DOCKERFILE = INFRA / "Dockerfile"
COMPOSE = INFRA / "docker-compose.yml"
K8S = INFRA / "k8s"
BIN = Path(sys.executable).parent  # the project environment's scripts (the image installs the same)

TORCH_PIN = "2.13.0"
# Images we do not build, and the programs a service may start from them.
THIRD_PARTY_IMAGES: dict[str, set[str]] = {
    "prefecthq/prefect": {"prefect", "python", "uvicorn"},
    "minio/minio": {"minio"},
    "quay.io/minio/minio": {"minio"},
    "minio/mc": {"mc"},
}
# Programs whose subcommands and options are checked with `--help`.
HELP_CHECKED = {"dask", "prefect", "imgclust", "moto_server"}
PLACEHOLDER = re.compile(r"^(CHANGE-?ME.*|<[^>]*>|\.\.\.|)$", re.IGNORECASE)


# ---------------------------------------------------------------------------------------------- parsing

def _repo(image: str) -> str:
    """Image reference without tag or digest: registry.example.com:5000/team/x:1.0 -> .../team/x."""
    ref = image.split("@", 1)[0]
    last = ref.rsplit("/", 1)[-1]
    return ref[: len(ref) - len(last)] + last.split(":", 1)[0]


def _third_party(image: str) -> set[str] | None:
    repo = _repo(image)
    for name, exes in THIRD_PARTY_IMAGES.items():
        if repo == name or repo.endswith("/" + name) or repo == "docker.io/" + name:
            return exes
    return None


def _argv(value: Any) -> list[str]:
    if value is None:
        return []
    if isinstance(value, str):
        return shlex.split(value)
    return [str(v) for v in value]


def _env(service: dict) -> dict[str, str]:
    env = service.get("environment") or {}
    if isinstance(env, list):
        env = dict(item.split("=", 1) if "=" in item else (item, "") for item in env)
    return {str(k): "" if v is None else str(v) for k, v in env.items()}


def _option_value(argv: list[str], *names: str, default: str | None = None) -> str | None:
    for i, tok in enumerate(argv):
        for name in names:
            if tok == name and i + 1 < len(argv):
                return argv[i + 1]
            if tok.startswith(name + "="):
                return tok.split("=", 1)[1]
    return default


def _subcommand(argv: list[str]) -> list[str]:
    """Leading words after the program: `prefect worker start ...` -> ['worker', 'start']."""
    words = []
    for tok in argv[1:3]:
        if not re.fullmatch(r"[a-z][a-z0-9-]*", tok):
            break
        words.append(tok)
    return words


def _is(argv: list[str], *prefix: str) -> bool:
    return argv[: len(prefix)] == list(prefix)


@functools.cache
def dockerfile() -> tuple[list[tuple[str, str]], dict[str, str]]:
    """Instructions (keyword, arguments with ARG defaults substituted) and the ARG defaults."""
    logical, buf = [], ""
    for line in DOCKERFILE.read_text().splitlines():
        if not buf and line.lstrip().startswith("#"):
            continue
        if line.rstrip().endswith("\\"):
            buf += line.rstrip()[:-1] + " "
            continue
        buf += line
        if buf.strip():
            logical.append(buf.strip())
        buf = ""
    args: dict[str, str] = {}
    out = []
    for line in logical:
        keyword, _, rest = line.partition(" ")
        keyword = keyword.upper()
        if keyword == "ARG":
            name, _, default = rest.strip().partition("=")
            args[name] = default.strip().strip('"')
        rest = re.sub(r"\$\{(\w+)\}|\$(\w+)", lambda m: args.get(m.group(1) or m.group(2), m.group(0)), rest)
        out.append((keyword, rest.strip()))
    return out, args


@functools.cache
def compose() -> dict:
    return yaml.safe_load(COMPOSE.read_text())


@functools.cache
def k8s_docs() -> list[tuple[Path, dict]]:
    files = sorted(p for p in K8S.rglob("*") if p.suffix in (".yaml", ".yml"))
    docs = []
    for path in files:
        for doc in yaml.safe_load_all(path.read_text()):
            if doc is not None:
                docs.append((path, doc))
    return docs


def k8s_manifests() -> list[tuple[Path, dict]]:
    return [(p, d) for p, d in k8s_docs() if not d.get("apiVersion", "").startswith("kustomize.config.k8s.io")]


def _containers(node: Any) -> list[dict]:
    """Every container spec anywhere in a manifest (Deployments, DaskCluster, DaskWorkerGroup, ...)."""
    found = []
    if isinstance(node, dict):
        for key, value in node.items():
            if key in ("containers", "initContainers") and isinstance(value, list):
                found += [c for c in value if isinstance(c, dict) and "image" in c]
            else:
                found += _containers(value)
    elif isinstance(node, list):
        for item in node:
            found += _containers(item)
    return found


def built_images() -> set[str]:
    return {_repo(s["image"]) for s in compose()["services"].values() if "build" in s and "image" in s}


def service_commands() -> dict[str, list[str]]:
    return {name: _argv(s.get("entrypoint")) + _argv(s.get("command"))
            for name, s in compose()["services"].items()}


def _healthcheck_argv(test: Any) -> list[str]:
    if isinstance(test, str):
        return shlex.split(test)
    test = [str(t) for t in test or []]
    if not test or test[0] == "NONE":
        return []
    if test[0] == "CMD-SHELL":
        return shlex.split(test[1])
    return test[1:] if test[0] == "CMD" else test


def processes() -> list[tuple[str, str, list[str]]]:
    """(where, image, argv) of every process the setups start, health checks included."""
    procs = []
    for name, s in compose()["services"].items():
        image = s.get("image", "")
        argv = service_commands()[name]
        if argv:
            procs.append((f"compose service {name}", image, argv))
        hc = _healthcheck_argv((s.get("healthcheck") or {}).get("test"))
        if hc:
            procs.append((f"compose service {name} healthcheck", image, hc))
    for path, doc in k8s_manifests():
        for c in _containers(doc):
            argv = _argv(c.get("command")) + _argv(c.get("args"))
            where = f"{path.relative_to(ROOT)} {doc['kind']}/{doc['metadata']['name']} container {c.get('name')}"
            assert argv, f"{where}: no command/args (our image has no ENTRYPOINT; its CMD is only --help)"
            procs.append((where, c["image"], argv))
    instructions, _ = dockerfile()
    for keyword, rest in instructions:
        if keyword == "CMD":
            argv = yaml.safe_load(rest) if rest.startswith("[") else shlex.split(rest)
            procs.append(("infra/Dockerfile CMD", "imgclust", argv))
    return procs


def _help(exe: str, words: tuple[str, ...]) -> tuple[int, str]:
    env = {**os.environ, "COLUMNS": "250", "NO_COLOR": "1", "TERM": "dumb"}
    proc = subprocess.run([str(BIN / exe), *words, "--help"], capture_output=True, text=True, env=env,
                          timeout=120)
    return proc.returncode, proc.stdout + proc.stderr


@pytest.fixture(scope="module")
def help_texts() -> dict[tuple[str, tuple[str, ...]], tuple[int, str]]:
    """`<exe> <subcommand> --help` once per distinct subcommand, run concurrently."""
    keys = sorted({(argv[0], tuple(_subcommand(argv))) for _, image, argv in processes()
                   if _third_party(image) is None and argv[0] in HELP_CHECKED})
    with ThreadPoolExecutor(max_workers=4) as pool:
        return dict(zip(keys, pool.map(lambda k: _help(*k), keys)))


# ---------------------------------------------------------------------------------------------- Dockerfile

def _pip_installs() -> list[tuple[int, list[str]]]:
    """(instruction index, argv) of every `pip install` in a RUN."""
    found = []
    for i, (keyword, rest) in enumerate(dockerfile()[0]):
        if keyword != "RUN":
            continue
        lexer = shlex.shlex(rest, posix=True, punctuation_chars=";&|")
        lexer.whitespace_split = True
        tokens, parts = list(lexer), [[]]
        for tok in tokens:  # split the shell line at ; && || | (quotes respected)
            if set(tok) <= set(";&|"):
                parts.append([])
            else:
                parts[-1].append(tok)
        for argv in parts:
            for j in range(len(argv) - 1):
                if re.fullmatch(r"pip3?(\.\d+)?|.*/pip3?", argv[j]) and argv[j + 1] == "install":
                    found.append((i, argv[j + 2:]))
                elif argv[j:j + 3] == ["-m", "pip", "install"]:
                    found.append((i, argv[j + 3:]))
    return found


def test_dockerfile_base_image_and_python_version():
    froms = [rest for keyword, rest in dockerfile()[0] if keyword == "FROM"]
    assert froms and froms[0].split()[0] == "python:3.11-slim", froms
    requires = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["requires-python"]
    assert SpecifierSet(requires).contains("3.11"), requires


def test_dockerfile_installs_pinned_cpu_torch_before_the_project():
    installs = _pip_installs()
    torch = [(i, a) for i, a in installs if any(re.match(r"torch(\W|$)", t) for t in a)]
    project = [(i, a) for i, a in installs if any(t == "." or t.startswith((".[", "./")) for t in a)]
    assert len(torch) == 1, f"expected one pip install of torch, found {torch}"
    assert project, "no `pip install .` of the project in infra/Dockerfile"
    t_index, t_argv = torch[0]
    assert f"torch=={TORCH_PIN}" in t_argv, t_argv
    assert t_index < min(i for i, _ in project), "torch must be installed (pinned) before the project"
    index = _option_value(t_argv, "--index-url", "-i")
    assert index and index.rstrip("/").endswith("/whl/cpu"), f"torch must come from the CPU wheel index: {index}"
    deps = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    torch_req = next(Requirement(d) for d in deps if Requirement(d).name == "torch")
    assert torch_req.specifier.contains(TORCH_PIN), f"pyproject's {torch_req} excludes torch {TORCH_PIN}"
    project_argv = project[0][1]
    assert not any(re.match(r"torch(\W|$)", t) for t in project_argv)


def test_dockerfile_has_no_entrypoint_and_copies_the_repository():
    instructions = dockerfile()[0]
    assert not [r for k, r in instructions if k == "ENTRYPOINT"], (
        "compose `command` and Kubernetes `args` are written as whole command lines")
    copies = [r for k, r in instructions if k in ("COPY", "ADD")]
    assert any(r.split()[0] == "." for r in copies), f"build context (repo root) not copied: {copies}"


# ---------------------------------------------------------------------------------------------- processes

def test_every_command_is_an_installed_program_or_comes_from_a_named_image():
    for where, image, argv in processes():
        exe = argv[0]
        allowed = _third_party(image)
        if allowed is not None:
            assert exe in allowed, f"{where}: {exe!r} is not among the programs allowed for image {image}"
            continue
        assert _repo(image) in built_images(), f"{where}: image {image!r} is neither built here nor allow-listed"
        assert "/" not in exe, f"{where}: give programs by name, not path: {exe}"
        assert shutil.which(exe, path=str(BIN)), f"{where}: {exe!r} is not installed in {BIN}"


def test_subcommands_and_options_exist(help_texts):
    for where, image, argv in processes():
        if _third_party(image) is not None:
            continue
        if argv[0] == "python" and "-c" in argv:
            code = argv[argv.index("-c") + 1]
            compile(code, f"<{where}>", "exec")
        if argv[0] not in HELP_CHECKED:
            continue
        words = tuple(_subcommand(argv))
        rc, text = help_texts[(argv[0], words)]
        assert rc == 0, f"{where}: `{' '.join([argv[0], *words])} --help` exited {rc}:\n{text[-2000:]}"
        for tok in argv[1 + len(words):]:
            if not tok.startswith("-") or re.fullmatch(r"-\d+(\.\d+)?", tok):
                continue
            opt = tok.split("=", 1)[0]
            assert re.search(rf"(?<![\w-]){re.escape(opt)}(?![\w-])", text), (
                f"{where}: option {opt} not in `{' '.join([argv[0], *words])} --help`")


def test_required_commands_are_present():
    cmds = service_commands()
    assert _is(cmds["prefect-server"], "prefect", "server", "start") or "prefecthq/prefect" in compose()[
        "services"]["prefect-server"].get("image", "")
    assert _is(cmds["dask-scheduler"], "dask", "scheduler")
    assert _is(cmds["dask-worker"], "dask", "worker")
    assert _is(cmds["prefect-worker"], "prefect", "worker", "start")
    assert _option_value(cmds["prefect-worker"], "--type", "-t") == "process"
    k8s = [argv for where, _, argv in processes() if where.startswith("infra/k8s")]
    assert any(_is(a, "dask", "worker") for a in k8s) and any(_is(a, "dask", "scheduler") for a in k8s)
    assert any(_is(a, "prefect", "worker", "start") for a in k8s)


# ---------------------------------------------------------------------------------------------- compose

def test_compose_images_are_built_from_infra_dockerfile():
    services = compose()["services"]
    assert {"prefect-server", "s3", "dask-scheduler", "dask-worker", "prefect-worker",
            "dask-gpu-worker"} <= set(services)
    assert built_images(), "no service builds our image"
    for name, s in services.items():
        if "build" in s:
            build = s["build"]
            assert isinstance(build, dict), f"{name}: give build.context and build.dockerfile"
            context = (COMPOSE.parent / build.get("context", ".")).resolve()
            assert context == ROOT, f"{name}: build context {context} is not the repository root"
            assert (context / build.get("dockerfile", "Dockerfile")).resolve() == DOCKERFILE, name
            assert "image" in s, f"{name}: name the built image so other services can share it"
        else:
            image = s.get("image", "")
            assert _repo(image) in built_images() or _third_party(image) is not None, (
                f"{name}: image {image!r} is neither built from infra/Dockerfile nor allow-listed")
        for dep in s.get("depends_on") or []:
            assert dep in services, f"{name} depends on unknown service {dep}"


def _service_running(prefix: tuple[str, ...]) -> dict[str, list[str]]:
    return {n: a for n, a in service_commands().items() if _is(a, *prefix)}


def test_compose_dask_workers_point_at_the_scheduler_service():
    schedulers = _service_running(("dask", "scheduler"))
    ports = {n: _option_value(a, "--port", default="8786") for n, a in schedulers.items()}
    workers = _service_running(("dask", "worker"))
    assert {"dask-worker", "dask-gpu-worker"} <= set(workers)
    for name, argv in workers.items():
        positional = [t for t in argv[2:] if t.startswith("tcp://")]
        assert len(positional) == 1, f"{name}: scheduler address missing: {argv}"
        url = urlparse(positional[0])
        assert url.hostname == "dask-scheduler" and url.hostname in schedulers, f"{name}: {positional[0]}"
        assert str(url.port) == ports[url.hostname], f"{name}: port {url.port} != scheduler's {ports[url.hostname]}"
        assert _option_value(argv, "--nthreads") == "1"
    replicas = compose()["services"]["dask-worker"].get("deploy", {}).get("replicas")
    assert isinstance(replicas, int) and replicas >= 2, replicas


def test_compose_prefect_api_url_points_at_the_prefect_server():
    services = compose()["services"]
    servers = {n: _option_value(a, "--port", default="4200")
               for n, a in _service_running(("prefect", "server", "start")).items()}
    assert "prefect-server" in servers
    assert "PREFECT_API_URL" in _env(services["prefect-worker"])
    for name, s in services.items():
        url = _env(s).get("PREFECT_API_URL")
        if url is None:
            continue
        parsed = urlparse(url)
        assert parsed.hostname in servers, f"{name}: PREFECT_API_URL {url} names no prefect server service"
        assert str(parsed.port) == servers[parsed.hostname] and parsed.path.rstrip("/") == "/api", f"{name}: {url}"


def test_compose_worker_environment():
    services = compose()["services"]
    s3_ports = {n: _option_value(a, "-p", "--port", default="5000")
                for n, a in _service_running(("moto_server",)).items()}
    for name in ("prefect-worker", "dask-worker"):
        env = _env(services[name])
        for key in ("AWS_ENDPOINT_URL", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"):
            assert env.get(key), f"{name}: {key} missing"
        endpoint = urlparse(env["AWS_ENDPOINT_URL"])
        if endpoint.hostname in services:
            assert endpoint.hostname in s3_ports and str(endpoint.port) == s3_ports[endpoint.hostname], (
                f"{name}: AWS_ENDPOINT_URL {env['AWS_ENDPOINT_URL']} does not match the S3 service")
        assert env.get("DO_NOT_TRACK") == "1"
        assert env.get("PREFECT_SERVER_ANALYTICS_ENABLED") == "false"
        assert "imgclust" in env.get("PREFECT_LOGGING_EXTRA_LOGGERS", "").split(",")


def test_compose_gpu_worker_is_gated_and_reserves_a_gpu():
    gpu = compose()["services"]["dask-gpu-worker"]
    assert gpu.get("profiles"), "the GPU worker must only start with a profile"
    assert _option_value(service_commands()["dask-gpu-worker"], "--resources") == "GPU=1"
    devices = gpu["deploy"]["resources"]["reservations"]["devices"]
    assert any(d.get("driver") == "nvidia" and "gpu" in d.get("capabilities", []) for d in devices)


# ---------------------------------------------------------------------------------------------- Kubernetes

def _by_kind(kind: str) -> list[dict]:
    return [d for _, d in k8s_manifests() if d.get("kind") == kind]


def test_k8s_manifests_parse_and_kustomization_lists_existing_files():
    assert k8s_manifests(), "no manifests under infra/k8s"
    for path, doc in k8s_manifests():
        assert doc.get("apiVersion") and doc.get("kind") and doc.get("metadata", {}).get("name"), path
    kustomizations = [d for p, d in k8s_docs() if p.name == "kustomization.yaml"]
    assert len(kustomizations) == 1
    for res in kustomizations[0].get("resources", []):
        assert (K8S / res).is_file(), f"kustomization resource {res} does not exist"
    for c in [c for _, d in k8s_manifests() for c in _containers(d)]:
        assert _repo(c["image"]) in built_images() or _third_party(c["image"]) is not None, c["image"]


def test_k8s_dask_cluster_and_gpu_worker_group():
    clusters = [d for d in _by_kind("DaskCluster") if d["apiVersion"] == "kubernetes.dask.org/v1"]
    assert len(clusters) == 1
    cluster = clusters[0]
    [worker] = cluster["spec"]["worker"]["spec"]["containers"]
    args = _argv(worker.get("command")) + _argv(worker.get("args"))
    assert _is(args, "dask", "worker") and _option_value(args, "--name") == "$(DASK_WORKER_NAME)", args
    [scheduler] = cluster["spec"]["scheduler"]["spec"]["containers"]
    assert _is(_argv(scheduler.get("command")) + _argv(scheduler.get("args")), "dask", "scheduler")
    assert any(p.get("containerPort") == 8786 for p in scheduler.get("ports", []))
    for group in _by_kind("DaskWorkerGroup"):
        assert group["spec"]["cluster"] == cluster["metadata"]["name"], group["metadata"]["name"]
        for c in _containers(group):
            args = _argv(c.get("command")) + _argv(c.get("args"))
            gpus = (c.get("resources", {}).get("limits") or {}).get("nvidia.com/gpu")
            assert (_option_value(args, "--resources") == "GPU=1") == bool(gpus), (
                f"{group['metadata']['name']}: --resources GPU=1 and an nvidia.com/gpu limit go together")
    assert any(_option_value(_argv(c.get("args")), "--resources") == "GPU=1"
               for g in _by_kind("DaskWorkerGroup") for c in _containers(g)), "no GPU DaskWorkerGroup"


def _resolved_env(container: dict) -> dict[str, str]:
    """A container's environment with envFrom ConfigMaps (from the manifests) resolved."""
    maps = {d["metadata"]["name"]: d.get("data", {}) for d in _by_kind("ConfigMap")}
    secrets = {d["metadata"]["name"] for d in _by_kind("Secret")}
    env: dict[str, str] = {}
    for ref in container.get("envFrom", []):
        if "configMapRef" in ref:
            name = ref["configMapRef"]["name"]
            assert name in maps, f"ConfigMap {name} is not in infra/k8s"
            env.update({k: str(v) for k, v in maps[name].items()})
        if "secretRef" in ref:
            assert ref["secretRef"]["name"] in secrets, f"Secret {ref['secretRef']['name']} has no template"
    for item in container.get("env", []):
        if "value" in item:
            env[item["name"]] = str(item["value"])
    return env


def test_k8s_prefect_worker_reaches_the_prefect_api():
    services = {d["metadata"]["name"]: d for d in _by_kind("Service")}
    workers = [c for d in _by_kind("Deployment") for c in _containers(d)
               if _is(_argv(c.get("command")) + _argv(c.get("args")), "prefect", "worker", "start")]
    assert len(workers) == 1
    env = _resolved_env(workers[0])
    url = urlparse(env.get("PREFECT_API_URL", ""))
    assert url.scheme in ("http", "https") and url.path.rstrip("/").endswith("/api"), env.get("PREFECT_API_URL")
    if "." not in (url.hostname or ""):  # an in-namespace Service: it must be in the manifests, on that port
        assert url.hostname in services, f"PREFECT_API_URL names Service {url.hostname}, not in infra/k8s"
        assert url.port in [p["port"] for p in services[url.hostname]["spec"]["ports"]]
    assert env.get("DO_NOT_TRACK") == "1" and env.get("PREFECT_SERVER_ANALYTICS_ENABLED") == "false"
    assert "imgclust" in env.get("PREFECT_LOGGING_EXTRA_LOGGERS", "")


def test_k8s_secrets_are_placeholders():
    secrets = _by_kind("Secret")
    assert secrets, "no Secret template for the S3 credentials"
    keys = set()
    for s in secrets:
        assert not s.get("data"), f"Secret {s['metadata']['name']}: use stringData placeholders, not data"
        for key, value in (s.get("stringData") or {}).items():
            keys.add(key)
            assert PLACEHOLDER.match(str(value)), f"Secret {s['metadata']['name']}: {key} is not a placeholder"
    assert {"AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"} <= keys


# ---------------------------------------------------------------------------------------------- consistency

def test_workers_poll_the_pool_the_deployments_use_and_readme_addresses():
    pools = {_option_value(a, "--pool", "-p") for _, _, a in processes() if _is(a, "prefect", "worker", "start")}
    assert pools == {"imgclust"}, pools
    prefect_yaml = ROOT / "deployments" / "prefect.yaml"
    if prefect_yaml.is_file():
        doc = yaml.safe_load(prefect_yaml.read_text())
        used = {d["work_pool"]["name"] for d in doc.get("deployments", []) if d.get("work_pool")}
        assert used <= pools, f"deployments use pools {used}, the workers poll {pools}"
    readme = (INFRA / "README.md").read_text()
    assert "tcp://dask-scheduler:8786" in readme
    cluster = _by_kind("DaskCluster")[0]["metadata"]["name"]
    assert f"tcp://{cluster}-scheduler:8786" in readme
    assert "docker compose -f infra/docker-compose.yml up -d" in readme and "kubectl apply -k infra/k8s" in readme
