"""A fuzz run of the inference and admin endpoints through real sockets: random and mutated JSON
bodies, headers, query strings and multipart forms (seeded, so a failure replays). Every answer
must be a well-formed status with an OpenAI-shaped error body when it is an error, and none may
be a 500. `OPENLORA_FUZZ_REQUESTS` sets the size (the test command runs a CI-sized one)."""

import json
import os
import random

import httpx
from conftest import ADAPTERS, ADMIN_TOKEN, API_KEY, Server, adapter_tar

SEED = int(os.environ.get("OPENLORA_FUZZ_SEED", "20261202"))
REQUESTS = int(os.environ.get("OPENLORA_FUZZ_REQUESTS", "1500"))

VALID = [
    ("POST", "/v1/completions", {"model": "r4-qv", "prompt": "Hello", "max_tokens": 3}),
    ("POST", "/v1/completions", {"model": "base", "prompt": ["a", "b"], "max_tokens": 2, "stream": True,
                                 "logprobs": 2, "stop": ["x"], "temperature": 0.5, "seed": 3}),
    ("POST", "/v1/chat/completions", {"model": "r8-mlp", "messages": [{"role": "user", "content": "hi"}],
                                      "max_tokens": 2, "metadata": {"k": "v"}}),
    ("POST", "/v1/chat/completions", {"model": "base", "messages": [{"role": "system", "content": "s"},
                                      {"role": "user", "content": [{"type": "text", "text": "t"}]}],
                                      "max_tokens": 2, "stream": True, "stream_options": {"include_usage": True},
                                      "logprobs": True, "top_logprobs": 2}),
    ("GET", "/v1/models", None),
    ("GET", "/v1/usage", None),
    ("GET", "/admin/adapters", None),
    ("GET", "/admin/plugins", None),
    ("GET", "/admin/ledger/summary", None),
    ("GET", "/metrics", None),
    ("GET", "/health", None),
]
PATHS = ["/v1/completions", "/v1/chat/completions", "/v1/models", "/v1/usage", "/admin/adapters/fz",
         "/admin/adapters", "/admin/plugins/router", "/admin/plugins/adapter:fz", "/admin/plugins/pricer/rollback",
         "/admin/plugins/pricer/activate/1", "/admin/plugins/pricer/versions/1", "/admin/ledger/export",
         "/admin/ledger/verify", "/admin/ledger/summary", "/v1/x", "/admin/%00", "/v1/completions/..%2f", "//"]
ODD = [None, True, False, 0, -1, 1.5, 2**64, -2**63, 1e308, float("inf"), "", "\x00", "\u202e", "x" * 5000,
       [], [1], {}, {"a": None}, [[[]]], "é" * 300, "<|endoftext|>", {"role": "user"}, [{"role": "tool"}]]


def mutate(rng, value, depth=0):
    """A mutated copy of a JSON value: fields dropped, added, retyped, or set to odd values."""
    if isinstance(value, dict) and depth < 4:
        out = {k: mutate(rng, v, depth + 1) if rng.random() < 0.3 else v for k, v in value.items()
               if rng.random() > 0.1}
        if rng.random() < 0.3:
            out[rng.choice(["model", "prompt", "messages", "max_tokens", "n", "stop", "logprobs", "stream",
                            "temperature", "top_p", "seed", "metadata", "zz", "user", "tools"])] = rng.choice(ODD)
        return out
    if isinstance(value, list) and depth < 4:
        out = [mutate(rng, v, depth + 1) for v in value if rng.random() > 0.1]
        if rng.random() < 0.2:
            out.append(rng.choice(ODD))
        return out
    return rng.choice(ODD) if rng.random() < 0.5 else value


def body_bytes(rng, value):
    text = json.dumps(value, allow_nan=True).encode() if value is not None else b""
    roll = rng.random()
    if roll < 0.1 and text:
        cut = rng.randrange(len(text))
        return text[:cut]
    if roll < 0.15:
        return text + rng.choice([b" trailing", b"\x00", b"}}", b"\n{}"])
    if roll < 0.2:
        return bytes(rng.randrange(256) for _ in range(rng.randrange(64)))
    if roll < 0.25:
        return b"[" * 10000 + b"]" * 10000
    return text


def headers_for(rng, path):
    h = {}
    token = ADMIN_TOKEN if path.startswith("/admin") else API_KEY
    roll = rng.random()
    if roll < 0.8:
        h["Authorization"] = f"Bearer {token}"
    elif roll < 0.9:
        h["Authorization"] = rng.choice(["Bearer ", "Basic abc", f"Bearer {token}x", "Bearer \u00e9".encode(),
                                         f"bearer {token}", b"Bearer \xff\xfe"])
    h["Content-Type"] = rng.choice(["application/json"] * 6 + ["text/plain", "multipart/form-data",
                                     "multipart/form-data; boundary=zz", "application/x-tar", ""])
    if rng.random() < 0.2:
        h["Idempotency-Key"] = rng.choice(["k1", "", "x" * 300, "\u00e9".encode(), "a b", "k" + str(rng.randrange(5))])
    if rng.random() < 0.05:
        h["Content-Encoding"] = "gzip"
    return {k: v for k, v in h.items() if v != ""}


def multipart(rng):
    parts = []
    for _ in range(rng.randrange(4)):
        name = rng.choice(["plugin", "config", "adapter_config.json", "adapter_model.safetensors", "file", "x"])
        data = rng.choice([b"\0asm\x0d\0\x01\0", b"{", b"", bytes(rng.randrange(256) for _ in range(50)),
                           json.dumps({"r": rng.choice(ODD)}).encode()])
        parts.append((name, (name, data, "application/octet-stream")))
    return parts


def check(r, what):
    assert r.status_code != 500 and r.status_code < 600, (what, r.status_code, r.text[:500])
    if r.status_code >= 400 and r.headers.get("content-type", "").startswith("application/json"):
        err = r.json()["error"]
        assert {"message", "type", "code"} <= set(err), (what, r.text[:300])


def test_fuzzed_requests_never_get_a_500():
    s = Server()
    rng = random.Random(SEED)
    statuses = {}
    try:
        client = httpx.Client(base_url=s.url, timeout=60)
        assert client.put("/admin/adapters/fz", content=adapter_tar(ADAPTERS / "r4-qv", "fz"),
                          headers={"Authorization": f"Bearer {ADMIN_TOKEN}"}).status_code == 201
        for i in range(REQUESTS):
            if rng.random() < 0.6:
                method, path, body = rng.choice(VALID)
                body = mutate(rng, body) if body is not None and rng.random() < 0.8 else body
            else:
                method = rng.choice(["GET", "POST", "PUT", "DELETE", "PATCH"])
                path = rng.choice(PATHS)
                body = mutate(rng, rng.choice(VALID)[2] or {})
            if rng.random() < 0.1:
                path += rng.choice(["?since=yesterday", "?by=color", "?format=xml", "?owner=%00", "?config={",
                                    "?since=2020-01-01&by=tenant", "?x=" + "y" * 3000])
            headers = headers_for(rng, path)
            what = f"#{i} {method} {path}"
            try:
                if rng.random() < 0.08 and method in ("POST", "PUT"):
                    headers.pop("Content-Type", None)
                    r = client.request(method, path, files=multipart(rng), headers=headers)
                else:
                    r = client.request(method, path, content=body_bytes(rng, body), headers=headers)
            except (httpx.LocalProtocolError, UnicodeEncodeError):
                continue  # a header httpx itself refuses to send
            except httpx.RemoteProtocolError as e:
                raise AssertionError(f"{what}: {e}; headers {headers}; body {str(body)[:300]}\n{s.logs()[-2000:]}")
            check(r, what)
            statuses[r.status_code] = statuses.get(r.status_code, 0) + 1
        print(f"\n{REQUESTS} fuzzed requests (seed {SEED}): statuses {dict(sorted(statuses.items()))}")
        assert client.get("/health").status_code == 200
        verify = client.get("/admin/ledger/verify", headers={"Authorization": f"Bearer {ADMIN_TOKEN}"})
        assert verify.json()["ok"], verify.text
    finally:
        assert s.stop() == 0, s.logs()[-3000:]
