"""`openlora bench --url`: the S-LoRA workload driven against a running server over HTTP, with
a key, through the server's own adapters, figures read back from its JSON."""

import json
import subprocess

from conftest import API_KEY, BINARY, Server


def test_bench_drives_a_running_server_over_http(tmp_path):
    s = Server(top='dtype = "bf16"')
    try:
        out = tmp_path / "url.json"
        r = subprocess.run(
            [str(BINARY), "bench", "--url", s.url, "--api-key", API_KEY, "--rates", "20", "--requests", "8",
             "--workload-adapters", "3", "--prompt-len", "2-6", "--output-len", "3", "--out", str(out),
             "--svg", str(tmp_path / "url.svg")],
            capture_output=True, text=True, timeout=300)
        assert r.returncode == 0, r.stderr
        report = json.loads(out.read_text())
        run = report["workload"][0]
        assert report["adapters"] >= 3 and run["requests"] == 8, report
        assert all(row[3] == 3 for row in run["per_request"]), "every request generated its 3 tokens"
        assert 0 < run["ttft_s"]["p50"] <= run["ttft_s"]["p99"]
        assert run["adapter_cache"]["hit_rate"] >= 0 and run["tok_per_s"] > 0
        assert (tmp_path / "url.svg").read_text().startswith("<svg")
        # A wrong key is the server's 401, said plainly.
        bad = subprocess.run([str(BINARY), "bench", "--url", s.url, "--api-key", "nope", "--rates", "5",
                              "--requests", "1"], capture_output=True, text=True, timeout=60)
        assert bad.returncode != 0 and "401" in bad.stderr, bad.stderr
    finally:
        s.stop()
