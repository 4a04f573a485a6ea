"""vLLM's model-server protocol, as the Kubernetes inference gateways speak it: the LoRA load and
unload endpoints with vLLM's exact answers, `lora_path` held under the config's roots, owners
loading only as themselves, `/v1/models` fields, and the `vllm:*` metrics the endpoint picker's
LoRA-affinity scorer reads."""

import os
import re
import shutil
import tempfile
from pathlib import Path

import httpx
import openai
import pytest
from conftest import ADAPTERS, ADMIN_TOKEN, API_KEY, Server

ADMIN = {"Authorization": f"Bearer {ADMIN_TOKEN}"}
AUTH = {"Authorization": f"Bearer {API_KEY}"}
KEY_RE = re.compile(r"olk_[0-9a-f]{16}_[0-9a-f]{64}")


@pytest.fixture(scope="module")
def roots():
    base = Path(tempfile.mkdtemp(prefix="openlora-loras-"))
    (base / "loras").mkdir()
    shutil.copytree(ADAPTERS / "r4-qv", base / "loras" / "fresh")
    shutil.copytree(ADAPTERS / "r8-mlp", base / "loras" / "other")
    shutil.copytree(ADAPTERS / "r8-mlp", base / "outside")
    os.symlink(base / "outside", base / "loras" / "escape")
    shutil.copytree(ADAPTERS / "r4-qv", base / "loras" / "alice" / "mine")  # an owner's own folder
    (base / "loras" / "alice" / "mine" / "openlora.json").write_text('{"owner": "mallory"}')
    shutil.copytree(ADAPTERS / "r8-mlp", base / "loras" / "bob" / "his")
    linked = base / "loras" / "linked-file"
    linked.mkdir()
    shutil.copy(ADAPTERS / "r4-qv" / "adapter_config.json", linked / "adapter_config.json")
    os.symlink(ADAPTERS / "r4-qv" / "adapter_model.safetensors", linked / "adapter_model.safetensors")
    yield base
    shutil.rmtree(base, ignore_errors=True)


@pytest.fixture(scope="module")
def server(roots):
    s = Server(top=f'lora_path_roots = ["{roots / "loras"}"]')
    yield s
    assert s.stop() == 0, s.logs()


def load(s, body, headers=ADMIN):
    return httpx.post(f"{s.url}/v1/load_lora_adapter", json=body, headers=headers, timeout=60)


def unload(s, name, headers=ADMIN):
    return httpx.post(f"{s.url}/v1/unload_lora_adapter", json={"lora_name": name}, headers=headers, timeout=60)


def test_load_and_unload_answer_as_vllm_does(server, roots):
    s = server
    path = str(roots / "loras" / "fresh")
    r = load(s, {"lora_name": "fresh", "lora_path": path})
    assert r.status_code == 200 and r.text == "Success: LoRA adapter 'fresh' added successfully.", r.text
    client = openai.OpenAI(base_url=f"{s.url}/v1", api_key=API_KEY, max_retries=0)
    assert client.completions.create(model="fresh", prompt="Hello", max_tokens=3).choices[0].text is not None
    again = load(s, {"lora_name": "fresh", "lora_path": path})
    assert again.status_code == 400 and again.json() == {"error": {
        "message": "The lora adapter 'fresh' has already been loaded. If you want to load the adapter in place, "
                   "set 'load_inplace' to True.",
        "type": "InvalidUserInput", "param": None, "code": 400}}, again.text
    inplace = load(s, {"lora_name": "fresh", "lora_path": str(roots / "loras" / "other"), "load_inplace": True})
    assert inplace.status_code == 200, inplace.text
    assert httpx.get(f"{s.url}/admin/adapters/fresh", headers=ADMIN).json()["rank"] == 8, "replaced in place"
    wrong_base = load(s, {"lora_name": "x", "lora_path": path, "base_model_name": "some-other-model"})
    assert wrong_base.status_code == 400 and wrong_base.json()["error"]["type"] == "InvalidUserInput"

    gone = unload(s, "fresh")
    assert gone.status_code == 200 and gone.text == "Success: LoRA adapter 'fresh' removed successfully.", gone.text
    missing = unload(s, "fresh")
    assert missing.status_code == 404 and missing.json() == {"error": {
        "message": "The lora adapter 'fresh' cannot be found.", "type": "NotFoundError", "param": None,
        "code": 404}}, missing.text
    assert httpx.post(f"{s.url}/v1/completions", headers=AUTH,
                      json={"model": "fresh", "prompt": "a", "max_tokens": 2}).status_code == 404
    configured = unload(s, "r4-qv")
    assert configured.status_code == 409, "an adapter of the config file is the operator's file to edit"


def test_lora_path_must_lie_under_the_roots_and_errors_leak_nothing(server, roots):
    s = server
    cases = {
        "outside": str(ADAPTERS / "r8-mlp"),
        "through-a-link": str(roots / "loras" / "escape"),
        "dot-dot": str(roots / "loras" / ".." / "outside"),
        "relative": "loras/fresh",
        "missing": str(roots / "loras" / "no-such"),
        "a-file": str(roots / "loras" / "fresh" / "adapter_config.json"),
        "root-itself-empty": "",
    }
    for case, path in cases.items():
        r = load(s, {"lora_name": f"x-{case}", "lora_path": path})
        assert r.status_code == 400, (case, r.text)
        message = r.json()["error"]["message"]
        assert str(ADAPTERS) not in message and str(roots) not in message, (case, message)
    linked = load(s, {"lora_name": "x-link", "lora_path": str(roots / "loras" / "linked-file")})
    assert linked.status_code == 400 and "not a regular file" in linked.json()["error"]["message"], linked.text
    names = {m["id"] for m in httpx.get(f"{s.url}/v1/models", headers=AUTH).json()["data"]}
    assert not any(n.startswith("x-") for n in names), "a refused load changes nothing"
    for body in [{"lora_name": "y"}, {"lora_path": "/x"}, "not json", {"lora_name": "../etc", "lora_path": "/x"}]:
        r = httpx.post(f"{s.url}/v1/load_lora_adapter", headers=ADMIN, timeout=30,
                       **({"json": body} if isinstance(body, dict) else {"content": body}))
        assert r.status_code == 400 and r.json()["error"]["message"], (body, r.text)


def test_only_the_operator_and_owners_may_load(server, roots):
    s = server
    body = {"lora_name": "by-nobody", "lora_path": str(roots / "loras" / "fresh")}
    assert httpx.post(f"{s.url}/v1/load_lora_adapter", json=body).status_code == 401
    assert load(s, body, AUTH).status_code == 403, "a tenant's key is not an admin credential"
    keys = {}
    for owner in ["alice", "bob"]:
        made = s.cli("keys", "create", "--owner", owner)
        assert made.returncode == 0, made.stderr
        keys[owner] = {"Authorization": f"Bearer {KEY_RE.findall(made.stdout)[-1]}"}
    others = load(s, {"lora_name": "alices", "lora_path": str(roots / "loras" / "fresh")}, keys["alice"])
    assert others.status_code == 400, "an owner loads only from its own folder under the roots"
    mine = load(s, {"lora_name": "alices", "lora_path": str(roots / "loras" / "alice" / "mine")}, keys["alice"])
    assert mine.status_code == 200, mine.text
    assert httpx.get(f"{s.url}/admin/adapters/alices", headers=ADMIN).json()["owner"] == "alice", \
        "the owner is the caller, never the folder's owner file"
    assert load(s, {"lora_name": "bobs", "lora_path": str(roots / "loras" / "alice" / "mine")},
                keys["bob"]).status_code == 400
    taken = load(s, {"lora_name": "alices", "lora_path": str(roots / "loras" / "bob" / "his"), "load_inplace": True},
                 keys["bob"])
    assert taken.status_code == 409, taken.text
    assert unload(s, "alices", keys["bob"]).status_code == 404, "another owner's adapter looks like none"
    assert unload(s, "r4-qv", keys["bob"]).status_code == 404
    assert unload(s, "alices", keys["alice"]).status_code == 200
    audit = httpx.get(f"{s.url}/admin/audit", headers=ADMIN).json()["data"]
    assert {"adapter.load", "adapter.delete"} <= {a["action"] for a in audit}, audit


def test_a_server_without_roots_refuses_every_path():
    s = Server()
    try:
        r = load(s, {"lora_name": "z", "lora_path": str(ADAPTERS / "r4-qv")})
        assert r.status_code == 400 and "lora_path_roots" in r.json()["error"]["message"], r.text
    finally:
        s.stop()


def samples(text: str, name: str) -> list[tuple[dict, float]]:
    """Every sample of a metric family: (labels, value)."""
    out = []
    for line in text.splitlines():
        m = re.fullmatch(re.escape(name) + r"(\{(.*)\})? (\S+)", line)
        if m:
            labels = dict(re.findall(r'(\w+)="([^"]*)"', m.group(2) or ""))
            out.append((labels, float(m.group(3))))
    return out


def test_models_and_metrics_speak_vllm(server):
    s = server
    data = httpx.get(f"{s.url}/v1/models", headers=AUTH).json()["data"]
    base, adapter = data[0], next(m for m in data if m["id"] == "r8-mlp")
    assert base["parent"] is None and base["root"] == "base"
    assert adapter["parent"] == "base" and adapter["root"] == "r8-mlp"
    assert {"owned_by", "created"} <= set(adapter)
    assert httpx.get(f"{s.url}/health").status_code == 200
    for model in ["r8-mlp", "r16-all-rslora"]:
        r = httpx.post(f"{s.url}/v1/completions", headers=AUTH, json={"model": model, "prompt": "a", "max_tokens": 2})
        assert r.status_code == 200
    text = httpx.get(f"{s.url}/metrics").text
    for name in ["vllm:num_requests_waiting", "vllm:num_requests_running", "vllm:kv_cache_usage_perc",
                 "vllm:num_gpu_loaded_lora_adapters", "vllm:num_cpu_loaded_lora_adapters",
                 "vllm:max_gpu_lora_adapters"]:
        [(labels, value)] = samples(text, name)
        assert labels == {} and value >= 0, (name, value)
    assert 0 <= samples(text, "vllm:kv_cache_usage_perc")[0][1] <= 1
    [(cache, one)] = samples(text, "vllm:cache_config_info")
    assert cache["block_size"] == "16" and int(cache["num_gpu_blocks"]) > 0 and one == 1
    [(info, stamp)] = samples(text, "vllm:lora_requests_info")
    assert int(info["max_lora"]) >= 1 and " " not in info["running_lora_adapters"] + info["waiting_lora_adapters"]
    assert stamp > 1.7e9, "the value is the Unix time of the update"
    loaded = {(l["adapter_name"], l["level"]) for l, v in samples(text, "vllm:lora_adapter_loaded") if v == 1}
    assert {("r8-mlp", "gpu"), ("r16-all-rslora", "gpu")} <= loaded, loaded
    assert all(l["pinned"] in ("true", "false") for l, _ in samples(text, "vllm:lora_adapter_loaded"))
    assert samples(text, "vllm:num_gpu_loaded_lora_adapters")[0][1] == len({a for a, lv in loaded if lv == "gpu"})
    assert samples(text, "vllm:lora_adapter_load_seconds_count")[0][1] >= 2
    assert samples(text, "openlora_requests_total"), "our own metrics stay"
