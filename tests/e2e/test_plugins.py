"""Policy plugins through the running server: billing in every response, plugin upload and
refusal over the admin API, hostile plugins contained while the server keeps answering, hot swap
and rollback under load, and the drop-in folder."""

import threading
import time

import httpx
import openai
import pytest
from conftest import ADMIN_TOKEN, API_KEY, Server, plugin_wasm

ADMIN = {"Authorization": f"Bearer {ADMIN_TOKEN}"}
AUTH = {"Authorization": f"Bearer {API_KEY}"}


@pytest.fixture(scope="module")
def policy_server():
    s = Server(extra="[policy]\nquarantine_after = 1000\nquarantine_rate_percent = 0\n")
    yield s
    assert s.stop() == 0, s.logs()


def complete(server, model="r4-qv", **kw):
    body = {"model": model, "prompt": "Hello there", "max_tokens": 4, **kw}
    return httpx.post(f"{server.url}/v1/completions", json=body, headers=AUTH, timeout=60)


def check_billing(billing):
    splits = billing["splits"]
    assert sum(s["amount"] for s in splits) == billing["charge"]["amount"], billing
    assert [d["slot"] for d in billing["decided_by"]][:3] == ["router", "pricer", "attributor"], billing
    # A plugin's configuration (the built-in router's lists every tenant) is named, not shown.
    assert all("config" not in d and "config_sha256" in d for d in billing["decided_by"]), billing
    return billing


def upload(server, slot, package, config=None):
    files = {"plugin": ("p.wasm", plugin_wasm(package), "application/wasm")}
    data = {"config": config} if config is not None else None
    return httpx.post(f"{server.url}/admin/plugins/{slot}", files=files, data=data, headers=ADMIN, timeout=60)


def test_every_response_carries_an_exact_billing(policy_server):
    client = openai.OpenAI(base_url=f"{policy_server.url}/v1", api_key=API_KEY, max_retries=0)
    r = client.completions.create(model="r8-mlp", prompt="Once upon", max_tokens=5)
    billing = check_billing(r.model_extra["billing"])
    assert billing["charge"]["currency"] == "USD"
    assert all(d["plugin"].startswith("builtin:") for d in billing["decided_by"])
    chunks = list(client.chat.completions.create(
        model="base", messages=[{"role": "user", "content": "hi"}], max_tokens=5, stream=True,
        stream_options={"include_usage": True}))
    billed = [c.model_extra["billing"] for c in chunks if c.model_extra and c.model_extra.get("billing")]
    assert billed, "the last chunks carry the billing"
    check_billing(billed[-1])
    assert [s["payee"] for s in billed[-1]["splits"]] == ["operator:openlora", "base:openlora"]


def test_upload_refusals_change_nothing_and_a_good_plugin_decides(policy_server):
    s = policy_server
    core = b"\0asm\x01\0\0\0"
    bad = httpx.post(f"{s.url}/admin/plugins/attributor", content=core, headers=ADMIN)
    assert bad.status_code == 400 and "core wasm module" in bad.json()["error"]["message"], bad.text
    fs = upload(s, "attributor", "openlora-test-fs-reader")
    assert fs.status_code == 400 and "wasi:filesystem" in fs.json()["error"]["message"], fs.text
    wrong = upload(s, "pricer", "openlora-plugin-router")
    assert wrong.status_code == 400 and "does not export" in wrong.json()["error"]["message"]
    assert upload(s, "nonsense", "openlora-plugin-router").status_code == 400
    # Every operator slot is listed, those without a plugin too (the built-in answers there).
    empty = [(v["slot"], v["active"], v["versions"]) for v in httpx.get(f"{s.url}/admin/plugins", headers=ADMIN).json()["data"]]
    assert empty == [("router", None, []), ("pricer", None, []), ("attributor", None, [])], empty
    assert httpx.get(f"{s.url}/admin/plugins/pricer", headers=ADMIN).json()["active"] is None
    assert httpx.get(f"{s.url}/admin/plugins").status_code == 401

    ok = upload(s, "pricer", "openlora-plugin-token-pricer", '{"currency": "EUR"}')
    assert ok.status_code == 201, ok.text
    sha = ok.json()["active"]["sha256"]
    billing = check_billing(complete(s).json()["billing"])
    assert billing["charge"]["currency"] == "EUR"
    assert billing["decided_by"][1]["plugin"] == f"sha256:{sha}"

    # A configuration change without re-uploading the wasm: a new version of the same component.
    def configure(text):
        return httpx.put(f"{s.url}/admin/plugins/pricer/config", content=text, headers=ADMIN, timeout=60)

    first = ok.json()["active"]["version"]
    gbp = configure('{"currency": "GBP"}\n')
    assert gbp.status_code == 201, gbp.text
    assert gbp.json()["active"]["sha256"] == sha and gbp.json()["from_version"] == first, gbp.text
    assert gbp.json()["active"]["version"] != first
    assert complete(s).json()["billing"]["charge"]["currency"] == "GBP"
    same = configure('  {"currency": "GBP"}')
    assert same.json()["active"]["version"] == gbp.json()["active"]["version"], "whitespace makes no new version"
    for bad in ['{"currency": ', '{"currency": "not a currency"}', '{"unknown_field": 1}']:
        refused = configure(bad)
        assert refused.status_code == 400, (bad, refused.text)
        assert refused.json()["error"]["message"], refused.text
    view = httpx.get(f"{s.url}/admin/plugins/pricer", headers=ADMIN).json()
    assert view["active"] == gbp.json()["active"]["version"], "a refused configuration changes nothing"
    nothing = httpx.put(f"{s.url}/admin/plugins/router/config", content="{}", headers=ADMIN)
    assert nothing.status_code == 409 and nothing.json()["error"]["code"] == "no_active_plugin", nothing.text
    assert httpx.delete(f"{s.url}/admin/plugins/pricer", headers=ADMIN).status_code == 200
    assert complete(s).json()["billing"]["charge"]["currency"] == "USD"


MODES = ["loop", "memory", "recursion", "output", "off-by-one", "overflow", "panic", "huge-result"]


def test_hostile_plugins_are_contained_and_the_server_keeps_answering(policy_server):
    s = policy_server
    assert upload(s, "attributor", "openlora-test-hostile", '{"mode": "ok"}').status_code == 201
    before = s.metric("openlora_plugin_failures_total", 'kind="fuel",slot="attributor"')
    for mode in MODES:
        r = complete(s, metadata={"hostile-mode": mode})
        assert r.status_code == 200, (mode, r.text)
        billing = check_billing(r.json()["billing"])
        attributor = billing["decided_by"][2]
        assert attributor["plugin"].startswith("builtin:attributor"), (mode, attributor)
        assert attributor["failure"], mode
        assert r.json()["choices"][0]["text"] is not None
    assert s.metric("openlora_plugin_failures_total", 'kind="fuel",slot="attributor"') == before + 1
    fine = complete(s).json()["billing"]
    assert fine["splits"] == [{"payee": "operator:hostile", "amount": fine["charge"]["amount"], "reason": "all"}]
    assert httpx.get(f"{s.url}/health").status_code == 200


def test_hot_swap_and_rollback_under_load_lose_no_request(policy_server):
    s = policy_server
    v1 = upload(s, "attributor", "openlora-plugin-proportional-attributor", '{"operator": "operator:v1"}')
    assert v1.status_code == 201, v1.text
    results, errors, stop = [], [], threading.Event()

    def worker():
        while not stop.is_set():
            try:
                r = complete(s, stream=False)
                if r.status_code != 200:
                    errors.append(r.text)
                else:
                    results.append(r.json()["billing"])
            except Exception as e:  # noqa: BLE001 - every failure is a test failure
                errors.append(repr(e))

    threads = [threading.Thread(target=worker) for _ in range(6)]
    for t in threads:
        t.start()
    time.sleep(1)
    v2 = upload(s, "attributor", "openlora-plugin-proportional-attributor", '{"operator": "operator:v2"}')
    assert v2.status_code == 201
    time.sleep(1)
    back = httpx.post(f"{s.url}/admin/plugins/attributor/rollback", headers=ADMIN)
    assert back.json()["active"]["version"] == v1.json()["active"]["version"]
    time.sleep(1)
    again = httpx.post(f"{s.url}/admin/plugins/attributor/activate/{v2.json()['active']['version']}", headers=ADMIN)
    assert again.status_code == 200, again.text
    time.sleep(1)
    stop.set()
    for t in threads:
        t.join()
    assert not errors, errors[:3]
    operator = {v1.json()["active"]["version"]: "operator:v1", v2.json()["active"]["version"]: "operator:v2"}
    seen = set()
    for billing in results:
        check_billing(billing)
        by = billing["decided_by"][2]
        assert by["failure"] is None
        assert billing["splits"][0]["payee"] == operator[by["version"]], billing
        seen.add(by["version"])
    assert seen == set(operator), seen
    assert len(results) > 20, len(results)


def test_a_plugin_dropped_in_the_folder_is_loaded(policy_server):
    s = policy_server
    drop = s.dir / "data" / "plugins" / "drop"
    (drop / "router.json").write_text('{"aliases": {"trek": "r4-qv"}}')
    (drop / "router.wasm").write_bytes(plugin_wasm("openlora-plugin-router"))
    deadline = time.time() + 10
    while time.time() < deadline:
        slots = httpx.get(f"{s.url}/admin/plugins", headers=ADMIN).json()["data"]
        if any(v["slot"] == "router" and v["active"] for v in slots):
            break
        time.sleep(0.2)
    else:
        pytest.fail(f"router not loaded from the drop folder: {s.logs()[-2000:]}")
    r = complete(s, model="trek")
    assert r.status_code == 200, r.text
    assert r.json()["billing"]["decided_by"][0]["plugin"].startswith("sha256:")
    assert complete(s, model="no-such-adapter").status_code == 404
