"""The HTTP API driven by the official `openai` Python client and raw HTTP."""

import json
import signal
import threading
import time

import httpx
import openai
import pytest
import conftest
from conftest import ADAPTERS, ADMIN_TOKEN, API_KEY


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=f"{server.url}/v1", api_key=API_KEY, max_retries=0)


def test_models_lists_base_and_adapters(client):
    ids = [m.id for m in client.models.list().data]
    assert ids[0] == "base"
    assert set(ids[1:]) == {"r4-qv", "r8-mlp", "r16-all-rslora", "r64-ko-layer1"}


def test_completion_usage_matches_tokens(client):
    prompt = [0, 17, 230, 51, 9, 77]  # token ids: the prompt length is known exactly
    r = client.completions.create(model="r4-qv", prompt=prompt, max_tokens=12, temperature=0, logprobs=2)
    assert r.object == "text_completion"
    choice = r.choices[0]
    assert r.usage.prompt_tokens == len(prompt)
    assert r.usage.completion_tokens == len(choice.logprobs.tokens)
    assert r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens
    assert all(len(t) <= 2 for t in choice.logprobs.top_logprobs)
    assert all(lp <= 0 for lp in choice.logprobs.token_logprobs)
    if choice.finish_reason == "length":
        assert r.usage.completion_tokens == 12


def test_greedy_is_repeatable_and_adapters_change_output(client):
    def run(model):
        return client.completions.create(model=model, prompt="The cat", max_tokens=16, temperature=0).choices[0].text

    base = run("base")
    assert run("base") == base
    assert any(run(a) != base for a in ["r4-qv", "r16-all-rslora", "r64-ko-layer1"])


def test_seed_makes_sampling_repeatable(client):
    def run(seed):
        return client.completions.create(model="r8-mlp", prompt="A", max_tokens=16, temperature=1.0, seed=seed).choices[0].text

    assert run(5) == run(5)


def test_stream_equals_non_stream(client):
    kw = dict(model="r16-all-rslora", prompt="Never put off", max_tokens=20, temperature=0)
    whole = client.completions.create(**kw)
    chunks = list(client.completions.create(stream=True, stream_options={"include_usage": True}, **kw))
    text = "".join(c.choices[0].text for c in chunks if c.choices)
    assert text == whole.choices[0].text
    assert chunks[-1].usage.completion_tokens == whole.usage.completion_tokens
    assert chunks[-1].usage.prompt_tokens == whole.usage.prompt_tokens
    finish = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finish == [whole.choices[0].finish_reason]


def test_chat_non_stream_and_stream(client):
    msgs = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "What is a penny?"}]
    r = client.chat.completions.create(model="r8-mlp", messages=msgs, max_tokens=16, temperature=0)
    assert r.object == "chat.completion"
    assert r.choices[0].message.role == "assistant"
    assert r.usage.completion_tokens > 0 and r.usage.prompt_tokens > 5
    chunks = list(client.chat.completions.create(model="r8-mlp", messages=msgs, max_tokens=16, temperature=0, stream=True,
                                                 stream_options={"include_usage": True}))
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == r.choices[0].message.content
    assert chunks[-1].usage.total_tokens == r.usage.total_tokens


def test_chat_logprobs(client):
    r = client.chat.completions.create(model="base", messages=[{"role": "user", "content": "hi"}], max_tokens=5,
                                       temperature=0, logprobs=True, top_logprobs=3)
    content = r.choices[0].logprobs.content
    assert len(content) == r.usage.completion_tokens
    assert all(len(c.top_logprobs) == 3 and c.logprob <= 0 for c in content)
    # Greedy picks the most likely token.
    assert all(abs(c.logprob - c.top_logprobs[0].logprob) < 1e-5 for c in content)


def test_stop_strings(client):
    r = client.completions.create(model="base", prompt="The", max_tokens=40, temperature=0, stop=[" "])
    assert " " not in r.choices[0].text
    assert r.choices[0].finish_reason in ("stop", "length")


def test_openai_penalties_change_greedy_output(client):
    kw = dict(model="base", prompt="The the the", max_tokens=24, temperature=0)
    plain = client.completions.create(**kw).choices[0].text
    penalised = client.completions.create(frequency_penalty=2.0, presence_penalty=2.0, **kw).choices[0].text
    assert penalised != plain


def test_unknown_fields_are_ignored(client):
    r = client.completions.create(model="base", prompt="x", max_tokens=2, extra_body={"not_a_field": {"a": 1}})
    assert r.usage.completion_tokens <= 2


def raw(server, path, body, key=API_KEY, **kw):
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    data = body if isinstance(body, (bytes, str)) else json.dumps(body)
    return httpx.post(f"{server.url}{path}", content=data, headers={**headers, "Content-Type": "application/json"}, **kw)


def assert_error(resp, status, param=None):
    assert resp.status_code == status, resp.text
    err = resp.json()["error"]
    assert set(err) == {"message", "type", "param", "code"}
    if param:
        assert err["param"] == param, err


def test_bad_input_errors(server, client):
    assert_error(raw(server, "/v1/completions", {"model": "base", "prompt": 5}), 400, "prompt")
    assert_error(raw(server, "/v1/completions", {"model": "base", "prompt": "x", "temperature": "hot"}), 400, "temperature")
    assert_error(raw(server, "/v1/completions", {"model": "base", "prompt": "x", "n": 2}), 400, "n")
    assert_error(raw(server, "/v1/completions", {"model": "base", "prompt": "x", "top_p": 0}), 400, "top_p")
    assert_error(raw(server, "/v1/completions", {"model": "base", "prompt": "x", "max_tokens": -1}), 400, "max_tokens")
    assert_error(raw(server, "/v1/completions", {"model": "base", "prompt": "x", "presence_penalty": 3}), 400, "presence_penalty")
    assert_error(raw(server, "/v1/completions", b"{not json"), 400)
    assert_error(raw(server, "/v1/chat/completions", {"model": "base", "messages": []}), 400, "messages")
    assert_error(raw(server, "/v1/completions", {"model": "base", "prompt": list(range(300))}), 400)
    assert_error(raw(server, "/v1/completions", {"model": "base", "prompt": [5000000]}), 400)
    assert_error(raw(server, "/v1/completions", {"model": "base", "prompt": "x" * 70000}), 413)
    assert_error(raw(server, "/v1/completions", {"model": "nope", "prompt": "x"}), 404, "model")
    assert_error(raw(server, "/v1/completions", {"model": "base", "prompt": "x"}, key="wrong"), 401)
    assert_error(raw(server, "/v1/completions", {"model": "base", "prompt": "x"}, key=None), 401)
    with pytest.raises(openai.NotFoundError):
        client.completions.create(model="no-such-adapter", prompt="x")
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=f"{server.url}/v1", api_key="bad", max_retries=0).models.list()
    with pytest.raises(openai.BadRequestError):
        client.completions.create(model="base", prompt="x", n=3)
    # The server is still fine.
    assert client.completions.create(model="base", prompt="x", max_tokens=1).usage.completion_tokens <= 1


def test_health_ready_and_metrics(server, client):
    assert httpx.get(f"{server.url}/health").status_code == 200
    assert httpx.get(f"{server.url}/ready").status_code == 200
    client.completions.create(model="r64-ko-layer1", prompt="metrics", max_tokens=3)
    text = httpx.get(f"{server.url}/metrics").text
    for name in ["openlora_requests_total", "openlora_time_to_first_token_seconds", "openlora_time_per_output_token_seconds",
                 "openlora_queue_depth", "openlora_batch_sequences", "openlora_kv_blocks_used",
                 "openlora_adapter_hits_total", "openlora_adapter_resident_bytes"]:
        assert name in text, name
    assert server.metric("openlora_requests_total", 'model="r64-ko-layer1",status="ok"') >= 1


def test_client_disconnect_mid_stream_cancels(server):
    body = {"model": "r16-all-rslora", "prompt": "Once", "max_tokens": 220, "ignore_eos": True, "stream": True}
    with httpx.stream("POST", f"{server.url}/v1/completions", json=body, headers={"Authorization": f"Bearer {API_KEY}"}) as r:
        lines = r.iter_lines()
        first = next(l for l in lines if l.startswith("data:"))
        assert "text" in first
        assert server.metric("openlora_running_sequences") >= 1
    # The connection is closed: the request must be cancelled and its KV blocks freed.
    deadline = time.time() + 10
    while time.time() < deadline:
        if server.metric("openlora_running_sequences") == 0 and server.metric("openlora_kv_blocks_used") == 0:
            return
        time.sleep(0.05)
    pytest.fail("the request kept running after the client went away")


def adapter_tar(name: str, corrupt: bool = False) -> bytes:
    return conftest.adapter_tar(ADAPTERS / name, name, corrupt)


def test_admin_adapter_upload_list_delete(server, client):
    admin = {"Authorization": f"Bearer {ADMIN_TOKEN}"}
    url = f"{server.url}/admin/adapters"
    assert_error(httpx.get(url, headers={"Authorization": f"Bearer {API_KEY}"}), 403)  # a tenant key, not an admin credential
    before = httpx.get(url, headers=admin).json()["data"]
    # A broken upload is refused and changes nothing.
    bad = httpx.post(f"{url}/uploaded", content=adapter_tar("r8-mlp", corrupt=True), headers=admin)
    assert_error(bad, 400)
    assert httpx.get(url, headers=admin).json()["data"] == before
    assert_error(httpx.post(f"{url}/bad name", content=adapter_tar("r8-mlp"), headers=admin), 400)
    # A good one is served at once.
    ok = httpx.post(f"{url}/uploaded", content=adapter_tar("r8-mlp"), headers=admin)
    assert ok.status_code == 201, ok.text
    assert ok.json()["rank"] == 8
    assert "uploaded" in [m.id for m in client.models.list().data]
    same = client.completions.create(model="uploaded", prompt="The cat", max_tokens=8, temperature=0).choices[0].text
    assert same == client.completions.create(model="r8-mlp", prompt="The cat", max_tokens=8, temperature=0).choices[0].text
    # The same as a multipart form replaces it (200, not 201).
    files = {f: (f, (ADAPTERS / "r4-qv" / f).read_bytes()) for f in ["adapter_config.json", "adapter_model.safetensors"]}
    again = httpx.put(f"{url}/uploaded", files=files, headers=admin)
    assert again.status_code == 200, again.text
    assert again.json()["rank"] == 4
    assert httpx.delete(f"{url}/uploaded", headers=admin).status_code == 200
    with pytest.raises(openai.NotFoundError):
        client.completions.create(model="uploaded", prompt="x")
    assert_error(httpx.delete(f"{url}/uploaded", headers=admin), 404)


def test_admin_token_is_checked_before_anything_is_parsed(server):
    url = server.url
    admin = {"Authorization": f"Bearer {ADMIN_TOKEN}"}
    broken_form = {"Content-Type": "multipart/form-data; boundary=zz"}
    # A wrong or missing token is a 401 (a tenant's key, which is not an admin credential, a
    # 403), even when the path, query or body could not be parsed.
    for auth, status in [({"Authorization": "Bearer not-the-admin-token"}, 401), ({"Authorization": f"Bearer {API_KEY}"}, 403), ({}, 401)]:
        assert_error(httpx.post(f"{url}/admin/adapters/x", content=b"not a form", headers={**auth, **broken_form}), status)
        assert_error(httpx.post(f"{url}/admin/adapters/bad name", content=b"not a tar", headers=auth), status)
        assert_error(httpx.post(f"{url}/admin/plugins/router/activate/not-a-number", headers=auth), status)
        assert_error(httpx.post(f"{url}/admin/plugins/router", content=b"\0", params={"config": "{"}, headers=auth), status)
        assert_error(httpx.get(f"{url}/admin/plugins/no-such-slot", headers=auth), status)
        assert_error(httpx.get(f"{url}/admin/ledger/summary", params={"by": "nonsense"}, headers=auth), status)
    # With the token the same requests fail on what is wrong with them, as JSON too.
    assert_error(httpx.post(f"{url}/admin/plugins/router/activate/not-a-number", headers=admin), 400)
    assert_error(httpx.post(f"{url}/admin/adapters/x", content=b"not a form", headers={**admin, **broken_form}), 400)
    assert_error(httpx.get(f"{url}/admin/plugins/no-such-slot", headers=admin), 400, "slot")
    assert_error(httpx.get(f"{url}/admin/ledger/summary", params={"by": "nonsense"}, headers=admin), 400, "by")


def test_every_error_is_json_404_and_405_included(server):
    admin = {"Authorization": f"Bearer {ADMIN_TOKEN}"}
    wrong_method = httpx.get(f"{server.url}/v1/completions", headers={"Authorization": f"Bearer {API_KEY}"})
    assert_error(wrong_method, 405)
    assert "POST" in wrong_method.headers.get("allow", ""), wrong_method.headers
    assert_error(httpx.delete(f"{server.url}/v1/models"), 405)
    assert_error(httpx.patch(f"{server.url}/admin/adapters/x", headers=admin), 405)
    assert_error(httpx.post(f"{server.url}/health"), 405)
    assert_error(httpx.get(f"{server.url}/no/such/route"), 404)
    assert_error(httpx.get(f"{server.url}/admin/no-such-thing", headers=admin), 404)
    # Without the token an unknown admin path says nothing about what exists.
    assert_error(httpx.get(f"{server.url}/admin/no-such-thing"), 401)


def test_json_logs_with_plugin_lines_as_fields():
    s = conftest.Server(
        extra='[policy.slots.router.builtin]\ntenants = { acme = { allow = ["r4-qv"] } }\n',
        env={"OPENLORA_LOG_FORMAT": "json", "RUST_LOG": "info"},
    )
    try:
        refused = raw(s, "/v1/completions", {"model": "r8-mlp", "prompt": "x", "max_tokens": 1})
        assert_error(refused, 403)
    finally:
        assert s.stop() == 0, s.logs()
    lines = [json.loads(line) for line in s.logs().splitlines() if line.strip()]
    assert all({"timestamp", "level", "fields"} <= set(line) for line in lines), lines
    assert any(line["fields"]["message"].startswith("serving `base`") for line in lines), lines
    # The built-in router's log line: a tracing event with the line as a field, not kept in memory.
    logged = [line["fields"] for line in lines if line["fields"]["message"] == "plugin log"]
    assert len(logged) == 1, lines
    assert logged[0]["slot"] == "router" and logged[0]["plugin"].startswith("builtin:router@"), logged
    assert logged[0]["level"] == "info" and logged[0]["line"] == "tenant acme refused adapter r8-mlp", logged


def test_concurrency_limit_is_429_with_retry_after(fresh_server):
    s = fresh_server(max_concurrent_requests=1)
    body = {"model": "base", "prompt": "x", "max_tokens": 100, "ignore_eos": True}
    results = []

    def call():
        results.append(raw(s, "/v1/completions", body, timeout=60))

    threads = [threading.Thread(target=call) for _ in range(16)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    busy = [r for r in results if r.status_code == 429]
    assert busy, "16 concurrent requests never hit a limit of 1"
    assert all(r.status_code in (200, 429) for r in results), [r.status_code for r in results]
    assert_error(busy[0], 429)
    assert busy[0].headers["retry-after"] == "1"


def test_sigterm_drains_in_flight_streams(fresh_server):
    s = fresh_server()
    body = {"model": "r4-qv", "prompt": "x", "max_tokens": 60, "ignore_eos": True, "stream": True}
    got = []

    def consume():
        with httpx.stream("POST", f"{s.url}/v1/completions", json=body, headers={"Authorization": f"Bearer {API_KEY}"},
                          timeout=60) as r:
            for line in r.iter_lines():
                if line.startswith("data:"):
                    got.append(line)

    t = threading.Thread(target=consume)
    t.start()
    while not got:
        time.sleep(0.01)
    s.proc.send_signal(signal.SIGTERM)
    t.join(timeout=60)
    assert got[-1] == "data: [DONE]", got[-3:]
    assert s.proc.wait(timeout=30) == 0
