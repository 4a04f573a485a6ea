"""The ledger through the real server: SIGKILL under load, idempotency keys with the OpenAI
client, usage and admin reports, cancelled streams, and a ledger that stops accepting writes."""

import csv as csvlib
import io
import json
import os
import random
import signal
import subprocess
import tempfile
import threading
import time
from pathlib import Path

import httpx
import openai
import pytest

from conftest import ADMIN_TOKEN, API_KEY, BINARY, ROOT, Server, free_port

ADMIN = {"Authorization": f"Bearer {ADMIN_TOKEN}"}
AUTH = {"Authorization": f"Bearer {API_KEY}"}
MODELS = ["base", "r4-qv", "r8-mlp", "r16-all-rslora"]


def postgres_url() -> str:
    """A fresh database on the test PostgreSQL server (tests/run.sh starts one)."""
    base = os.environ.get("OPENLORA_TEST_POSTGRES")
    if not base:
        if os.environ.get("OPENLORA_REQUIRE_POSTGRES"):
            raise RuntimeError("OPENLORA_REQUIRE_POSTGRES is set but OPENLORA_TEST_POSTGRES is not")
        pytest.skip("OPENLORA_TEST_POSTGRES is not set (tests/run.sh sets it)")
    db = f"openlora_e2e_{random.getrandbits(48):012x}"
    subprocess.run(["psql", f"{base}/postgres", "-qc", f"CREATE DATABASE {db}"], check=True)
    return f"{base}/{db}"


def ledger_server(backend: str) -> Server:
    extra = f'[ledger]\nurl = "{postgres_url()}"\n' if backend == "postgres" else ""
    return Server(extra=extra, max_concurrent_requests=64)


def entries(server: Server) -> list[dict]:
    out = server.cli("ledger", "export", "--format", "jsonl")
    assert out.returncode == 0, out.stderr
    return [json.loads(line) for line in out.stdout.splitlines()]


def verified(server: Server) -> str:
    out = server.cli("ledger", "verify")
    assert out.returncode == 0, out.stdout + out.stderr
    return out.stdout


def request(url: str, i: int, key: str | None, stream: bool) -> dict | None:
    """One completion; its billing if the client saw it complete, else None."""
    headers = dict(AUTH)
    if key:
        headers["Idempotency-Key"] = key
    body = {"model": random.choice(MODELS), "prompt": f"request {i}", "max_tokens": random.randint(2, 24),
            "stream": stream}
    try:
        if not stream:
            r = httpx.post(f"{url}/v1/completions", json=body, headers=headers, timeout=30)
            return r.json()["billing"] if r.status_code == 200 else None
        billing = None
        with httpx.stream("POST", f"{url}/v1/completions", json=body, headers=headers, timeout=30) as r:
            for line in r.iter_lines():
                if line.startswith("data: {"):
                    billing = json.loads(line[6:]).get("billing") or billing
                elif line == "data: [DONE]":
                    return billing
        return None
    except (httpx.HTTPError, json.JSONDecodeError, KeyError):
        return None


@pytest.mark.parametrize("backend", ["sqlite", "postgres"])
def test_sigkill_under_load_leaves_one_entry_per_completed_request(backend):
    s = ledger_server(backend)
    seen: dict[str, dict] = {}  # request id -> billing, for every request a client saw complete
    lost_keys: list[str] = []  # idempotency keys whose request did not complete (to retry)
    lock = threading.Lock()
    try:
        for round_ in range(4):
            stop = threading.Event()

            def worker(w: int):
                i = 0
                while not stop.is_set():
                    i += 1
                    key = f"r{round_}-w{w}-{i}" if i % 3 == 0 else None
                    billing = request(s.url, i, key, stream=(i % 2 == 0))
                    with lock:
                        if billing:
                            seen[billing["request_id"]] = billing
                        elif key:
                            lost_keys.append(key)

            threads = [threading.Thread(target=worker, args=(w,)) for w in range(8)]
            for t in threads:
                t.start()
            time.sleep(random.uniform(0.8, 2.5))
            s.stop(signal.SIGKILL)
            stop.set()
            for t in threads:
                t.join()
            s.start()
            verified(s)
            # Retrying a key the crash interrupted: done already (409, billed once) or done now.
            print(f"round {round_}: retrying {len(lost_keys)} interrupted keys")
            for key in lost_keys:
                r = httpx.post(f"{s.url}/v1/completions", headers={**AUTH, "Idempotency-Key": key},
                               json={"model": "r4-qv", "prompt": "retry", "max_tokens": 2}, timeout=30)
                assert r.status_code in (200, 409), r.text
                billing = r.json()["billing"] if r.status_code == 200 else r.json()["error"]["billing"]
                seen[billing["request_id"]] = billing
            lost_keys.clear()
            got = entries(s)
            ids = [e["entry"]["request_id"] for e in got]
            keys = [e["entry"]["request_key"] for e in got]
            assert len(ids) == len(set(ids)) and len(keys) == len(set(keys)), "an entry was written twice"
            by_id = {e["entry"]["request_id"]: e for e in got}
            for rid, billing in seen.items():
                assert rid in by_id, f"round {round_}: {rid} completed for its client but has no entry"
                e = by_id[rid]
                assert e["seq"] == billing["ledger"]["seq"] and e["hash"] == billing["ledger"]["hash"]
                assert e["entry"]["charge"] == billing["charge"] and e["entry"]["splits"] == billing["splits"]
        print(f"{backend}: {len(seen)} requests completed across 4 SIGKILLs")
        assert len(seen) >= 20, f"too little load to mean anything: {len(seen)} requests"
        assert "settlements replayed exactly" in verified(s)
    finally:
        s.stop(signal.SIGKILL)


def test_an_idempotency_key_is_charged_once_with_the_openai_client():
    s = Server()
    try:
        client = openai.OpenAI(base_url=f"{s.url}/v1", api_key=API_KEY, max_retries=3)
        first = client.completions.with_raw_response.create(
            model="r4-qv", prompt="once", max_tokens=4, extra_headers={"Idempotency-Key": "order-42"})
        billing = json.loads(first.text)["billing"]
        with pytest.raises(openai.ConflictError) as err:
            client.completions.create(model="r4-qv", prompt="once", max_tokens=4,
                                      extra_headers={"Idempotency-Key": "order-42"})
        body = err.value.response.json()["error"]
        assert body["code"] == "idempotency_key_reused"
        assert body["billing"]["request_id"] == billing["request_id"]
        # The same key from another tenant is another request.
        usage = httpx.get(f"{s.url}/v1/usage", headers=AUTH).json()
        assert usage["tenant"] == "acme" and sum(r["requests"] for r in usage["data"]) == 1
        assert sum(r["amount"] for r in usage["data"]) == billing["charge"]["amount"]
        bad = httpx.post(f"{s.url}/v1/completions", headers={**AUTH, "Idempotency-Key": "x" * 300},
                         json={"model": "base", "prompt": "a"})
        assert bad.status_code == 400 and bad.json()["error"]["param"] == "Idempotency-Key"
        assert len(entries(s)) == 1
    finally:
        s.stop()


def test_usage_and_admin_reports_add_up_and_bad_queries_are_400s():
    s = Server()
    try:
        charged, by_model = 0, {}
        for i in range(6):
            r = httpx.post(f"{s.url}/v1/completions", headers=AUTH,
                           json={"model": MODELS[i % 4], "prompt": f"p{i}", "max_tokens": 3}, timeout=30)
            assert r.status_code == 200, r.text
            charged += r.json()["billing"]["charge"]["amount"]
            by_model[MODELS[i % 4]] = by_model.get(MODELS[i % 4], 0) + r.json()["billing"]["charge"]["amount"]
        payees = httpx.get(f"{s.url}/admin/ledger/summary?by=payee", headers=ADMIN).json()["data"]
        assert sum(r["amount"] for r in payees) == charged, "payees receive exactly what tenants were charged"
        tenants = httpx.get(f"{s.url}/admin/ledger/summary?by=tenant", headers=ADMIN).json()["data"]
        assert [(r["key"], r["requests"], r["amount"]) for r in tenants] == [("acme", 6, charged)]
        by_adapter = httpx.get(f"{s.url}/v1/usage?by=adapter&since=2020-01-01", headers=AUTH).json()["data"]
        assert sorted(r["key"] for r in by_adapter) == ["(base)", "r16-all-rslora", "r4-qv", "r8-mlp"]
        csv = httpx.get(f"{s.url}/admin/ledger/export?format=csv", headers=ADMIN)
        assert csv.headers["content-type"].startswith("text/csv") and csv.text.startswith("seq,")
        rows = list(csvlib.DictReader(io.StringIO(csv.text)))
        assert sum(int(row["amount"]) for row in rows) == charged
        for row in rows:  # every row carries its entry's usage and deciders
            assert row["deciders"].startswith("router=builtin:router@") and ";attributor=" in row["deciders"], row
            assert int(row["steps"]) > 0 and int(row["batch_share_ppm"]) > 0, row
            assert (int(row["adapter_contribution_ppm"]) > 0) == (row["adapter"] != ""), row
        one = httpx.get(f"{s.url}/admin/ledger/summary?by=payee&adapter=r4-qv", headers=ADMIN).json()["data"]
        assert sum(r["amount"] for r in one) == by_model["r4-qv"]
        cli_one = s.cli("ledger", "summary", "--by", "adapter", "--adapter", "r8-mlp", "--json")
        assert [(r["key"], r["amount"]) for r in json.loads(cli_one.stdout)] == [("r8-mlp", by_model["r8-mlp"])]
        exported = s.cli("ledger", "export", "--format", "csv", "--adapter", "r16-all-rslora")
        assert {row["adapter"] for row in csvlib.DictReader(io.StringIO(exported.stdout))} == {"r16-all-rslora"}
        assert json.loads(s.cli("ledger", "summary", "--owner", "nobody", "--json").stdout) == []
        report = httpx.get(f"{s.url}/admin/ledger/verify", headers=ADMIN, timeout=60).json()
        assert report["ok"] and report["report"]["replayed"] == 6, report
        for url, param in [("/v1/usage?by=tenant", "by"), ("/v1/usage?since=yesterday", "since"),
                           ("/admin/ledger/summary?by=color", "by"), ("/admin/ledger/export?format=xml", "format")]:
            r = httpx.get(f"{s.url}{url}", headers=ADMIN if "admin" in url else AUTH)
            assert r.status_code == 400 and r.json()["error"]["param"] == param, (url, r.text)
        assert httpx.get(f"{s.url}/admin/ledger/summary", headers=AUTH).status_code == 403  # a tenant key is not an admin credential
        assert httpx.get(f"{s.url}/v1/usage").status_code == 401
        summary = s.cli("ledger", "summary", "--by", "payee", "--json")
        assert sum(r["amount"] for r in json.loads(summary.stdout)) == charged
        bad = s.cli("ledger", "summary", "--by", "color")
        assert bad.returncode != 0 and "--by" in bad.stderr
        # A user's error is one line and an exit status, never a backtrace, whatever the environment.
        missing = subprocess.run([str(BINARY), "ledger", "verify", "--ledger",
                                  str(s.dir / "no-such.sqlite3")], capture_output=True, text=True, timeout=60,
                                 env={**s.env, "RUST_BACKTRACE": "full", "RUST_LIB_BACKTRACE": "1"})
        assert missing.returncode == 2 and missing.stderr.startswith("error: "), missing.stderr
        assert "backtrace" not in missing.stderr.lower() and len(missing.stderr.splitlines()) == 1, missing.stderr
    finally:
        s.stop()


def test_a_stream_the_client_abandons_is_recorded_as_cancelled():
    s = Server()
    try:
        body = {"model": "r8-mlp", "prompt": "go on", "max_tokens": 4000, "ignore_eos": True, "stream": True}
        with httpx.stream("POST", f"{s.url}/v1/completions", json=body, headers=AUTH, timeout=30) as r:
            chunks = 0
            for line in r.iter_lines():
                chunks += line.startswith("data: {")
                if chunks >= 5:
                    break
        deadline = time.time() + 20
        while time.time() < deadline and not entries(s):
            time.sleep(0.2)
        [e] = entries(s)
        assert e["entry"]["outcome"] == "cancelled", e
        assert 5 <= e["entry"]["usage"]["completion_tokens"] < 4000
        assert e["entry"]["charge"]["amount"] > 0
        verified(s)
    finally:
        s.stop()


def test_when_the_ledger_cannot_write_the_client_gets_an_error_and_nothing_is_lost():
    pg_dir = Path(tempfile.mkdtemp(prefix="openlora-pg-")) / "pg"
    port = free_port()
    pg = ["bash", str(ROOT / "tests" / "pg.sh")]
    subprocess.run([*pg, "start", str(pg_dir), str(port)], check=True)
    s = Server(extra=f'[ledger]\nurl = "postgres://postgres@127.0.0.1:{port}/postgres"\n')
    try:
        ok = httpx.post(f"{s.url}/v1/completions", headers=AUTH, json={"model": "r4-qv", "prompt": "a", "max_tokens": 3})
        assert ok.status_code == 200, ok.text
        subprocess.run([*pg, "stop", str(pg_dir)], check=True)
        failed = httpx.post(f"{s.url}/v1/completions", headers=AUTH,
                            json={"model": "r4-qv", "prompt": "b", "max_tokens": 3}, timeout=30)
        assert failed.status_code == 503 and failed.json()["error"]["code"] == "ledger_unavailable", failed.text
        with httpx.stream("POST", f"{s.url}/v1/completions", headers=AUTH, timeout=30,
                          json={"model": "r4-qv", "prompt": "c", "max_tokens": 3, "stream": True,
                                "stream_options": {"include_usage": True}}) as r:
            events = [json.loads(line[6:]) for line in r.iter_lines() if line.startswith("data: {")]
        assert events[-1]["error"]["code"] == "ledger_unavailable", events[-1]
        assert not any(e.get("usage") for e in events), "no usage is sent for an unrecorded request"
        assert s.metric("openlora_ledger_write_failures_total") == 2
        assert httpx.get(f"{s.url}/health").status_code == 200
        subprocess.run([*pg, "restart", str(pg_dir), str(port)], check=True)
        again = httpx.post(f"{s.url}/v1/completions", headers=AUTH,
                           json={"model": "r4-qv", "prompt": "d", "max_tokens": 3}, timeout=30)
        assert again.status_code == 200, again.text
        assert again.json()["billing"]["ledger"]["seq"] == 2, "the failed requests left no entries"
        verified(s)
    finally:
        s.stop(signal.SIGKILL)
        subprocess.run([*pg, "kill", str(pg_dir)])
