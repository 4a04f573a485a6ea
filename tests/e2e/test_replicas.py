"""Scale-out: three `openlora serve` replicas on loopback ports sharing one PostgreSQL database
(ledger, keys, adapters, plugins). A change made on one replica (an adapter loaded through vLLM's
`/v1/load_lora_adapter`, a plugin installed or reconfigured, an adapter unloaded) reaches the
others within seconds; a test router that scores replicas from their `vllm:*` metrics the way
the endpoint picker's LoRA-affinity scorer does keeps adapters where they are resident, against
random routing; and one replica SIGKILLed under load loses and doubles no ledger entry, with
`ledger verify` passing over every replica's entries."""

import json
import random
import re
import shutil
import signal
import tempfile
import threading
import time
from pathlib import Path

import httpx
import pytest
from conftest import ADAPTERS, ADMIN_TOKEN, API_KEY, ROOT, Server, plugin_wasm
from test_ledger import postgres_url

ADMIN = {"Authorization": f"Bearer {ADMIN_TOKEN}"}
AUTH = {"Authorization": f"Bearer {API_KEY}"}
TENANT_ADAPTERS = [f"t{i}" for i in range(9)]
REPORT = ROOT / "target" / "replicas-affinity.json"


@pytest.fixture(scope="module")
def cluster():
    url = postgres_url()
    base = Path(tempfile.mkdtemp(prefix="openlora-replicas-"))
    loras = base / "loras"
    for name in TENANT_ADAPTERS:
        shutil.copytree(ADAPTERS / "r8-mlp", loras / name)
    for owner in ["alice", "bob"]:
        shutil.copytree(ADAPTERS / "r4-qv", loras / owner / "poems")
    # One signing key for all, as a Kubernetes Secret gives every replica (the first creates it).
    extra = (f'[ledger]\nurl = "{url}"\nsigning_key = "{base / "ledger-signing.key"}"\ncheckpoint_every = 25\n'
             "[memory]\nadapter_pool_bytes = 180000\n")
    replicas = [Server(top=f'lora_path_roots = ["{loras}"]', extra=extra, max_concurrent_requests=64)
                for _ in range(3)]
    yield replicas, loras
    for r in replicas:
        r.stop(signal.SIGKILL)
    shutil.rmtree(base, ignore_errors=True)


def until(what: str, check, seconds: float = 10.0):
    deadline = time.time() + seconds
    while time.time() < deadline:
        if check():
            return
        time.sleep(0.1)
    pytest.fail(f"not within {seconds} s: {what}")


def models(r: Server) -> set[str]:
    return {m["id"] for m in httpx.get(f"{r.url}/v1/models", headers=AUTH, timeout=30).json()["data"]}


def complete(r: Server, model: str, **kw) -> httpx.Response:
    body = {"model": model, "prompt": "Hello", "max_tokens": 3, **kw.pop("body", {})}
    return httpx.post(f"{r.url}/v1/completions", json=body, headers={**AUTH, **kw.pop("headers", {})}, timeout=30)


def test_a_change_on_one_replica_reaches_every_replica(cluster):
    replicas, loras = cluster
    r0, r1, r2 = replicas
    loaded = httpx.post(f"{r0.url}/v1/load_lora_adapter", headers=ADMIN,
                        json={"lora_name": "t0", "lora_path": str(loras / "t0")})
    assert loaded.status_code == 200, loaded.text
    told = time.time()
    for r in replicas:
        until(f"t0 served by {r.url}", lambda r=r: "t0" in models(r))
        assert complete(r, "t0").status_code == 200
    print(f"an adapter loaded on one replica was served by all {time.time() - told:.2f} s later")

    files = {"plugin": ("p.wasm", plugin_wasm("openlora-plugin-token-pricer"), "application/wasm")}
    up = httpx.post(f"{r1.url}/admin/plugins/pricer", files=files, data={"config": '{"currency": "EUR"}'},
                    headers=ADMIN, timeout=60)
    assert up.status_code == 201, up.text
    sha = up.json()["active"]["sha256"]
    for r in replicas:
        until(f"EUR on {r.url}", lambda r=r: complete(r, "t0").json()["billing"]["charge"]["currency"] == "EUR")
        assert complete(r, "t0").json()["billing"]["decided_by"][1]["plugin"] == f"sha256:{sha}"
    gbp = httpx.put(f"{r2.url}/admin/plugins/pricer/config", content='{"currency": "GBP"}', headers=ADMIN)
    assert gbp.status_code == 201, gbp.text
    until("GBP on r0", lambda: complete(r0, "t0").json()["billing"]["charge"]["currency"] == "GBP")
    assert httpx.delete(f"{r0.url}/admin/plugins/pricer", headers=ADMIN).status_code == 200
    until("the built-in pricer on r1", lambda: complete(r1, "t0").json()["billing"]["charge"]["currency"] == "USD")

    gone = httpx.post(f"{r2.url}/v1/unload_lora_adapter", headers=ADMIN, json={"lora_name": "t0"})
    assert gone.status_code == 200, gone.text
    for r in replicas:
        until(f"t0 gone from {r.url}", lambda r=r: "t0" not in models(r))
    assert complete(r0, "t0").status_code == 404


def test_an_owners_name_holds_on_every_replica(cluster):
    replicas, loras = cluster
    r0, r1, r2 = replicas
    keys = {}
    for owner in ["alice", "bob"]:
        made = r0.cli("keys", "create", "--owner", owner)
        assert made.returncode == 0, made.stderr
        keys[owner] = {"Authorization": f"Bearer {re.findall(r'olk_[0-9a-f]{16}_[0-9a-f]{64}', made.stdout)[-1]}"}
    body = {"lora_name": "poems", "load_inplace": True}
    mine = httpx.post(f"{r0.url}/v1/load_lora_adapter", headers=keys["alice"],
                      json={**body, "lora_path": str(loras / "alice" / "poems")})
    assert mine.status_code == 200, mine.text
    for r in (r1, r2):
        theirs = httpx.post(f"{r.url}/v1/load_lora_adapter", headers=keys["bob"],
                            json={**body, "lora_path": str(loras / "bob" / "poems")})
        assert theirs.status_code == 409, theirs.text
    for r in replicas:
        until(f"alice's poems on {r.url}", lambda r=r: httpx.get(f"{r.url}/admin/adapters/poems",
                                                                  headers=ADMIN).json().get("owner") == "alice")
    assert httpx.post(f"{r2.url}/v1/unload_lora_adapter", headers=keys["alice"],
                      json={"lora_name": "poems"}).status_code == 200
    for r in replicas:
        until(f"poems gone from {r.url}", lambda r=r: "poems" not in models(r))


def scrape(r: Server) -> dict:
    """What the endpoint picker reads of a replica: queue, capacity and resident adapters."""
    text = httpx.get(f"{r.url}/metrics", timeout=10).text
    info = re.search(r'vllm:lora_requests_info\{max_lora="(\d+)",running_lora_adapters="([^"]*)",'
                     r'waiting_lora_adapters="([^"]*)"\}', text)
    resident = set(re.findall(r'vllm:lora_adapter_loaded\{adapter_name="([^"]+)",level="gpu"', text))
    waiting = float(re.search(r"^vllm:num_requests_waiting (\S+)", text, re.M).group(1))
    running = set(filter(None, info.group(2).split(",")))
    return {"max_lora": int(info.group(1)), "running": running, "waiting_adapters": set(filter(None, info.group(3).split(","))),
            "resident": resident, "queue": waiting}


def affinity_score(m: dict, adapter: str) -> float:
    """The LoRA-affinity scorer, residency-aware (`affinity-resident` in scripts/gateway_sim.py):
    the adapter active there — running, or on the GPU (`vllm:lora_adapter_loaded{level="gpu"}`,
    the residency metric the routers are adopting) — 1.0, room for another adapter 0.8, the
    adapter waiting there 0.6, full 0. The deployed picker's scorer reads running adapters only;
    on this test's short requests an adapter is rarely running when the next request comes."""
    if adapter in m["running"] or adapter in m["resident"]:
        return 1.0
    if len(m["resident"] | m["running"]) < m["max_lora"]:
        return 0.8
    if adapter in m["waiting_adapters"]:
        return 0.6
    return 0.0


def active_hits(replicas) -> tuple[float, float]:
    def one(r, name):
        text = httpx.get(f"{r.url}/metrics", timeout=10).text
        m = re.search(rf'^openlora_{name}{{tier="active"}} (\S+)', text, re.M)
        return float(m.group(1)) if m else 0.0
    return (sum(one(r, "adapter_hits_total") for r in replicas), sum(one(r, "adapter_misses_total") for r in replicas))


def run_traffic(replicas, pick, n: int, seed: int) -> float:
    """`n` requests over Zipf-distributed adapters from 4 clients; returns the active-pool hit rate."""
    rng = random.Random(seed)
    weights = [1 / (i + 1) ** 1.1 for i in range(len(TENANT_ADAPTERS))]
    plan = rng.choices(TENANT_ADAPTERS, weights, k=n)
    before = active_hits(replicas)
    lock, errors = threading.Lock(), []

    def client(part):
        for adapter in part:
            with lock:
                target = pick(adapter)
            r = complete(target, adapter)
            if r.status_code != 200:
                errors.append(r.text)

    threads = [threading.Thread(target=client, args=(plan[i::4],)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors[:3]
    after = active_hits(replicas)
    hits, misses = after[0] - before[0], after[1] - before[1]
    return hits / max(1.0, hits + misses)


@pytest.fixture(scope="module")
def loaded(cluster):
    """Every tenant adapter loaded through one replica and served by all."""
    replicas, loras = cluster
    for name in TENANT_ADAPTERS:
        r = httpx.post(f"{replicas[0].url}/v1/load_lora_adapter", headers=ADMIN,
                       json={"lora_name": name, "lora_path": str(loras / name), "load_inplace": True})
        assert r.status_code == 200, r.text
    for r in replicas:
        until(f"every adapter on {r.url}", lambda r=r: set(TENANT_ADAPTERS) <= models(r))
    return replicas


def test_lora_affinity_routing_keeps_adapters_where_they_are(loaded):
    replicas = loaded
    capacity = scrape(replicas[0])["max_lora"]
    assert 1 <= capacity < len(TENANT_ADAPTERS), f"the pool must not hold every adapter: {capacity}"

    rng = random.Random(7)
    random_rate = run_traffic(replicas, lambda adapter: rng.choice(replicas), 90, seed=1)

    def by_affinity(adapter):
        scored = [(affinity_score(m, adapter), -m["queue"], rng.random(), r)
                  for r in replicas for m in [scrape(r)]]
        return max(scored, key=lambda s: s[:3])[3]

    affinity_rate = run_traffic(replicas, by_affinity, 90, seed=1)
    REPORT.parent.mkdir(parents=True, exist_ok=True)
    REPORT.write_text(json.dumps({"replicas": 3, "adapters": len(TENANT_ADAPTERS), "max_lora": capacity,
                                  "requests": 90, "random_hit_rate": random_rate,
                                  "affinity_hit_rate": affinity_rate}, indent=1))
    print(f"active-pool hit rate: LoRA affinity {affinity_rate:.2f} vs random {random_rate:.2f}")
    assert affinity_rate > random_rate, (affinity_rate, random_rate)


def test_a_replica_killed_under_load_loses_and_doubles_nothing(loaded):
    replicas = loaded
    victim = replicas[2]
    alive = [True, True, True]
    done: dict[str, dict] = {}
    lock, stop = threading.Lock(), threading.Event()

    def worker(w: int):
        rng = random.Random(w)
        for i in range(30):
            key = f"kill-w{w}-{i}"
            for attempt in range(8):
                choices = [r for r, up in zip(replicas, alive) if up]
                r = rng.choice(choices)
                try:
                    resp = complete(r, rng.choice(TENANT_ADAPTERS + ["base"]), headers={"Idempotency-Key": key},
                                    body={"max_tokens": rng.randint(2, 12)})
                except httpx.HTTPError:
                    time.sleep(0.05)
                    continue  # the replica died under it: the same key, on another replica
                if resp.status_code in (200, 409):
                    billing = resp.json()["billing"] if resp.status_code == 200 else resp.json()["error"]["billing"]
                    with lock:
                        done[key] = billing
                    break
                assert resp.status_code in (502, 503), resp.text
            else:
                pytest.fail(f"{key} never completed")
            if stop.is_set():
                return

    threads = [threading.Thread(target=worker, args=(w,)) for w in range(6)]
    for t in threads:
        t.start()
    until("some load", lambda: len(done) >= 30, seconds=60)
    alive[2] = False
    victim.stop(signal.SIGKILL)
    at_kill = len(done)
    for t in threads:
        t.join()
    print(f"SIGKILL after {at_kill} of 180 requests")
    assert at_kill < 180, "the replica must die under load"
    assert len(done) == 180, len(done)

    out = replicas[0].cli("ledger", "export", "--format", "jsonl")
    assert out.returncode == 0, out.stderr
    entries = [json.loads(line) for line in out.stdout.splitlines()]
    keys = [e["entry"]["request_key"] for e in entries]
    assert len(keys) == len(set(keys)), "an entry was written twice"
    by_key = {e["entry"]["request_key"]: e for e in entries}
    for key, billing in done.items():
        e = by_key.get(f"idem:acme:{key}")
        assert e is not None, f"{key} completed for its client but has no entry"
        assert e["entry"]["request_id"] == billing["request_id"] and e["entry"]["charge"] == billing["charge"]
    verified = replicas[1].cli("ledger", "verify")
    assert verified.returncode == 0, verified.stdout + verified.stderr
    assert "settlements replayed exactly" in verified.stdout, verified.stdout

    victim.start()  # same data folder: it catches up with what changed while it was down
    assert set(TENANT_ADAPTERS) <= models(victim)
    assert complete(victim, "t3").status_code == 200
