"""The gateway simulation (scripts/gateway_sim.py): deterministic for a seed, LoRA-affinity
routing keeps more adapters on the GPU than random routing, and the README's table is the
committed full-scale report's, at the issue's scale. Needs no server binary."""

import importlib.util
import json
import subprocess
import sys

from conftest import ROOT

SCRIPT = ROOT / "scripts" / "gateway_sim.py"
REPORT = ROOT / "docs" / "perf" / "gateway-sim.json"
BEGIN = "<!-- gateway-sim table: python3 scripts/gateway_sim.py --markdown docs/perf/gateway-sim.json -->"
END = "<!-- /gateway-sim table -->"
SMALL = ["--replicas", "10", "--adapters", "2000", "--requests", "20000", "--warmup", "5000",
         "--policies", "random,affinity,affinity+live,affinity-resident", "--seed", "7"]


def sim(*args: str) -> subprocess.CompletedProcess:
    done = subprocess.run([sys.executable, str(SCRIPT), *args], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    return done


def module():
    spec = importlib.util.spec_from_file_location("gateway_sim", SCRIPT)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_a_small_cluster_is_deterministic_and_affinity_keeps_adapters_on_the_gpu(tmp_path):
    one, two = tmp_path / "one.json", tmp_path / "two.json"
    sim(*SMALL, "--json", str(one))
    sim(*SMALL, "--json", str(two))
    assert one.read_bytes() == two.read_bytes(), "the same seed gives the same report"
    report = json.loads(one.read_text())
    results = report["results"]
    assert list(results) == ["random", "affinity", "affinity+live", "affinity-resident"]
    for r in results.values():
        assert r["requests"] == 15000
        assert abs(r["gpu_hit_rate"] + r["cpu_hit_rate"] + r["disk_rate"] - 1) < 1e-5
        q = r["queue_delay_s"]
        assert 0 <= q["p50"] <= q["p90"] <= q["p99"]
        assert 0 < r["utilisation"] < 1
    assert results["affinity"]["gpu_hit_rate"] > results["random"]["gpu_hit_rate"] + 0.1, results
    assert results["affinity+live"]["gpu_hit_rate"] > results["random"]["gpu_hit_rate"] + 0.1, results
    assert results["affinity-resident"]["gpu_hit_rate"] > results["random"]["gpu_hit_rate"] + 0.1, results
    # Another seed is another run.
    other = tmp_path / "other.json"
    sim(*SMALL[:-1], "8", "--json", str(other))
    assert json.loads(other.read_text())["results"] != results


def test_the_readme_table_is_the_committed_reports():
    readme = (ROOT / "README.md").read_text()
    assert readme.count(BEGIN) == 1 and readme.count(END) == 1, f"README.md needs one {BEGIN} ... {END} block"
    table = readme[readme.index(BEGIN) + len(BEGIN):readme.index(END)].strip()
    assert table == sim("--markdown", str(REPORT)).stdout.strip(), (
        "README.md's simulation table differs from "
        "`python3 scripts/gateway_sim.py --markdown docs/perf/gateway-sim.json`")


def test_the_committed_report_is_the_default_run_at_the_issues_scale():
    report = json.loads(REPORT.read_text())
    params = report["parameters"]
    assert params["replicas"] == 100 and params["adapters"] == 100_000
    regenerate = "regenerate with `python3 scripts/gateway_sim.py --json docs/perf/gateway-sim.json`"
    assert params == module().DEFAULTS, regenerate
    assert report["model_sha256"] == module().script_sha256(), f"the script changed since its report: {regenerate}"
    results = report["results"]
    assert {"random", "affinity"} <= set(results)
    assert all(r["requests"] == params["requests"] - params["warmup"] for r in results.values())
    assert results["affinity"]["gpu_hit_rate"] > results["random"]["gpu_hit_rate"]
