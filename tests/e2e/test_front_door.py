"""The adapter store and the HTTP front door under abuse, through the running server: deletes and
replacements that hold across SIGKILL and restarts, concurrent uploads serialised, uploads that
could never load refused (the running version stays), tenants that cannot collide, tenants that
see only what is theirs and no server path, slow and idle connections cut off, cheap rejections,
usage from running totals, a cold adapter loading while others generate, uploads streamed in
bounded memory, and the small things (trailing bytes, 413s, the field a context error names)."""

import array
import io
import json
import re
import signal
import socket
import struct
import tarfile
import threading
import time

import httpx
import pytest
from conftest import ADAPTERS, ADMIN_TOKEN, API_KEY, Server, adapter_tar

ADMIN = {"Authorization": f"Bearer {ADMIN_TOKEN}"}
AUTH = {"Authorization": f"Bearer {API_KEY}"}
SRC = ADAPTERS / "r16-all-rslora"


def read_safetensors(path):
    raw = path.read_bytes()
    n = struct.unpack("<Q", raw[:8])[0]
    header = json.loads(raw[8:8 + n])
    header.pop("__metadata__", None)
    data = raw[8 + n:]
    return {k: (v["dtype"], v["shape"], data[v["data_offsets"][0]:v["data_offsets"][1]]) for k, v in header.items()}


def write_safetensors(tensors):
    header, blobs, offset = {}, [], 0
    for name, (dtype, shape, data) in tensors.items():
        header[name] = {"dtype": dtype, "shape": shape, "data_offsets": [offset, offset + len(data)]}
        blobs.append(data)
        offset += len(data)
    text = json.dumps(header).encode()
    return struct.pack("<Q", len(text)) + text + b"".join(blobs)


def crafted(rename=None, f64=False, rank_times=1):
    """The r16 fixture adapter as a tar, its tensors renamed, widened to F64, or its rank multiplied."""
    tensors = read_safetensors(SRC / "adapter_model.safetensors")
    config = json.loads((SRC / "adapter_config.json").read_text())
    out = {}
    for name, (dtype, shape, data) in tensors.items():
        if rename:
            name = rename(name)
        if f64:
            data, dtype = array.array("d", array.array("f", data)).tobytes(), "F64"
        if rank_times > 1:
            if "lora_A" in name:  # [r, in]: repeat the rows
                data, shape = data * rank_times, [shape[0] * rank_times, shape[1]]
            else:  # [out, r]: repeat each row's values
                row = shape[1] * 4
                data = b"".join(data[i:i + row] * rank_times for i in range(0, len(data), row))
                shape = [shape[0], shape[1] * rank_times]
        out[name] = (dtype, shape, data)
    if rank_times > 1:
        config["r"] *= rank_times
    return tar_of({"adapter_config.json": json.dumps(config).encode(),
                   "adapter_model.safetensors": write_safetensors(out)})


def tar_of(files):
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        for name, data in files.items():
            info = tarfile.TarInfo(f"a/{name}")
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return buf.getvalue()


def put(server, name, body, method="put"):
    return httpx.request(method.upper(), f"{server.url}/admin/adapters/{name}", content=body, headers=ADMIN,
                         timeout=60)


def complete(server, model, **kw):
    body = {"model": model, "prompt": "Hello", "max_tokens": 2, **kw}
    return httpx.post(f"{server.url}/v1/completions", json=body, headers=AUTH, timeout=60)


def no_paths(text, server):
    assert str(server.dir) not in text and "/tmp/" not in text and "/data/" not in text, text


@pytest.fixture(scope="module")
def store_server():
    s = Server(extra="[memory]\nadapter_pool_bytes = 2097152\n", max_upload_bytes=4_000_000)
    yield s
    s.stop()


def test_deletes_and_replacements_hold_across_sigkill_and_concurrent_puts_serialise(store_server):
    s = store_server
    assert put(s, "gone", adapter_tar(ADAPTERS / "r4-qv", "gone")).status_code == 201
    assert httpx.delete(f"{s.url}/admin/adapters/gone", headers=ADMIN).status_code == 200
    configured = httpx.delete(f"{s.url}/admin/adapters/r4-qv", headers=ADMIN)
    assert configured.status_code == 409 and configured.json()["error"]["code"] == "adapter_configured", configured.text
    first = put(s, "twice", adapter_tar(ADAPTERS / "r4-qv", "twice"))
    assert first.status_code == 201, first.text
    second = put(s, "twice", adapter_tar(ADAPTERS / "r8-mlp", "twice"))
    assert second.status_code == 200 and second.json()["sha256"] != first.json()["sha256"]
    versions = s.dir / "data" / "adapters" / "versions"
    assert len(list(versions.iterdir())) == 1, "the replaced version's files are gone once nothing holds them"

    results = []
    sources = [ADAPTERS / n for n in ["r4-qv", "r8-mlp", "r16-all-rslora", "r64-ko-layer1"]]

    def race(i):
        results.append(put(s, "raced", adapter_tar(sources[i % 4], "raced")))

    threads = [threading.Thread(target=race, args=(i,)) for i in range(10)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(r.status_code for r in results) == [200] * 9 + [201], [(r.status_code, r.text[-80:]) for r in results]
    served = httpx.get(f"{s.url}/admin/adapters/raced", headers=ADMIN).json()["sha256"]
    assert served in {r.json()["sha256"] for r in results}

    s.stop(signal.SIGKILL)
    s.start()
    names = {a["name"]: a for a in httpx.get(f"{s.url}/admin/adapters", headers=ADMIN).json()["data"]}
    assert "gone" not in names, "a deleted adapter stays deleted"
    assert names["twice"]["sha256"] == second.json()["sha256"], "the replacement stands"
    assert names["raced"]["sha256"] == served, "the version last committed is the one restored"
    assert complete(s, "gone").status_code == 404
    assert complete(s, "twice").status_code == 200


@pytest.mark.parametrize("case,upload,status,says", [
    ("f64", lambda: crafted(f64=True), 400, "dtype F64"),
    ("layer 00", lambda: crafted(rename=lambda n: n.replace("layers.0.", "layers.00.")), 400, "not a LoRA"),
    ("layer +0", lambda: crafted(rename=lambda n: n.replace("layers.0.", "layers.+0.")), 400, "not a LoRA"),
    ("too large for the pool", lambda: crafted(rank_times=16), 413, "the active pool holds"),
    ("config not UTF-8", lambda: tar_of({"adapter_config.json": b"\xff\xfe{",
                                          "adapter_model.safetensors": (SRC / "adapter_model.safetensors").read_bytes()}),
     400, "UTF-8"),
])
def test_uploads_that_could_never_load_are_refused_and_the_running_version_stays(store_server, case, upload, status, says):
    s = store_server
    assert put(s, "steady", adapter_tar(ADAPTERS / "r4-qv", "steady")).status_code in (200, 201)
    before = httpx.get(f"{s.url}/admin/adapters/steady", headers=ADMIN).json()["sha256"]
    r = put(s, "steady", upload())
    assert r.status_code == status and says in r.json()["error"]["message"], (case, r.text)
    no_paths(r.text, s)
    assert httpx.get(f"{s.url}/admin/adapters/steady", headers=ADMIN).json()["sha256"] == before
    assert complete(s, "steady").status_code == 200


def test_tenant_names_with_separators_are_refused_at_start():
    with pytest.raises(RuntimeError, match="tenant names"):
        Server(config=f'admin_token = "{ADMIN_TOKEN}"\n[api_keys]\n"sk-1" = "alice:eu"\n')


def test_tenants_see_only_what_is_theirs_and_no_server_path():
    router = '[policy.slots.router]\nbuiltin = { tenants = { acme = { allow = ["r4-qv", "broken"] } } }\n'
    s = Server(extra=router)
    try:
        models = httpx.get(f"{s.url}/v1/models", headers=AUTH).json()["data"]
        assert sorted(m["id"] for m in models) == ["base", "r4-qv"], models
        assert put(s, "broken", adapter_tar(ADAPTERS / "r4-qv", "broken")).status_code == 201
        for f in (s.dir / "data" / "adapters" / "versions").glob("*/adapter_model.safetensors"):
            f.write_bytes(b"\0" * 16)
        r = complete(s, "broken")
        assert r.status_code == 503 and r.json()["error"]["type"] == "server_error", r.text
        no_paths(r.text, s)
        assert "adapter_model.safetensors" in s.logs(), "the details are in the server's log"
        r = httpx.put(f"{s.url}/admin/adapters/x", content=b"not a tar", headers=ADMIN)
        assert r.status_code == 400
        no_paths(r.text, s)
    finally:
        s.stop()


def test_slow_and_idle_connections_are_cut_off():
    s = Server(header_timeout_secs=1, body_timeout_secs=1)
    try:
        socks = []
        for i in range(60):
            c = socket.create_connection(("127.0.0.1", s.port))
            if i % 3 == 0:
                c.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\n")  # headers never finish
            elif i % 3 == 1:
                c.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n"
                          b"Content-Type: application/json\r\nAuthorization: Bearer " + API_KEY.encode()
                          + b"\r\n\r\n{")  # the body stalls
            socks.append(c)  # and every third says nothing at all
        time.sleep(3.5)
        held = 0
        for c in socks:
            c.settimeout(0.5)
            try:
                data = c.recv(65536)
                if data and b" 408 " not in data.split(b"\r\n")[0]:
                    held += 1  # answered something else: not cut off
            except TimeoutError:
                held += 1  # still open, silent
            except ConnectionResetError:
                pass
            finally:
                c.close()
        print(f"\nconnections still held after the timeouts: {held} of {len(socks)}")
        assert held == 0
        assert complete(s, "base").status_code == 200
    finally:
        s.stop()


def test_cheap_rejections_and_the_small_things(store_server):
    s = store_server
    r = httpx.post(f"{s.url}/v1/completions", content=b'{"model": "base", "prompt": "hi", "max_tokens": 1} trailing',
                   headers={**AUTH, "Content-Type": "application/json"})
    assert r.status_code == 400 and "trailing" in r.json()["error"]["message"], r.text
    assert complete(s, "m" * 300).status_code == 404
    r = complete(s, "base", stop=["x" * 257])
    assert r.status_code == 400 and r.json()["error"]["param"] == "stop", r.text
    r = complete(s, "base", prompt="hello " * 20000, max_tokens=1)
    assert r.status_code == 400 and r.json()["error"]["param"] == "prompt", r.text
    big = b"x" * (5 << 20)
    r = httpx.put(f"{s.url}/admin/adapters/huge", files={"adapter_model.safetensors": ("w", big)}, headers=ADMIN,
                  timeout=120)
    assert r.status_code == 413, r.text
    assert httpx.get(f"{s.url}/health").status_code == 200


def test_metrics_can_ask_for_a_token():
    token = "metrics-token-0123456789"
    s = Server(config=f'admin_token = "{ADMIN_TOKEN}"\nmetrics_token = "{token}"\n')
    try:
        assert httpx.get(f"{s.url}/metrics").status_code == 401
        assert httpx.get(f"{s.url}/metrics", headers={"Authorization": "Bearer nope"}).status_code == 401
        r = httpx.get(f"{s.url}/metrics", headers={"Authorization": f"Bearer {token}"})
        assert r.status_code == 200 and "openlora_" in r.text
    finally:
        s.stop()


def test_usage_from_running_totals_matches_the_entries_across_a_sigkill(store_server):
    s = store_server
    for i in range(6):
        assert complete(s, ["base", "r4-qv", "r8-mlp"][i % 3]).status_code == 200
    day = "2020-01-01"                       # whole days: the running totals
    moment = "2020-01-01T00:00:01Z"          # not a whole day: every entry is read
    for by in ["adapter", "payee"]:
        fast = httpx.get(f"{s.url}/v1/usage?by={by}&since={day}", headers=AUTH).json()["data"]
        slow = httpx.get(f"{s.url}/v1/usage?by={by}&since={moment}", headers=AUTH).json()["data"]
        assert fast == slow and fast, (by, fast, slow)
    s.stop(signal.SIGKILL)
    s.start()
    after = httpx.get(f"{s.url}/admin/ledger/summary?by=tenant&since={day}", headers=ADMIN).json()["data"]
    scan = httpx.get(f"{s.url}/admin/ledger/summary?by=tenant&since={moment}", headers=ADMIN).json()["data"]
    assert after == scan, (after, scan)


def test_a_cold_adapter_loads_while_others_keep_generating(store_server):
    s = store_server
    assert put(s, "cold", crafted(rank_times=8)).status_code in (200, 201)
    times, usage = [], []

    def stream():
        body = {"model": "base", "prompt": "Once", "max_tokens": 200, "ignore_eos": True, "stream": True,
                "stream_options": {"include_usage": True}}
        with httpx.stream("POST", f"{s.url}/v1/completions", json=body, headers=AUTH, timeout=120) as resp:
            for line in resp.iter_lines():
                if line.startswith("data: {"):
                    times.append(time.perf_counter())
                    if json.loads(line[6:]).get("usage"):
                        usage.append(json.loads(line[6:])["usage"])

    t = threading.Thread(target=stream)
    t.start()
    time.sleep(0.05)
    r = complete(s, "cold")
    t.join()
    assert r.status_code == 200, r.text
    assert usage and usage[-1]["completion_tokens"] == 200, "the other stream ran to its end"
    gaps = sorted(b - a for a, b in zip(times, times[1:]))
    print(f"\nlongest gap {gaps[-1] * 1000:.1f} ms, median {gaps[len(gaps) // 2] * 1000:.1f} ms")
    assert gaps[-1] < 1.0, "no stall of a second while the adapter loaded"


def test_an_upload_streams_to_disk_in_bounded_memory():
    s = Server()
    try:
        filler = b"\0" * (96 << 20)
        archive = tar_of({"adapter_config.json": (SRC / "adapter_config.json").read_bytes(),
                          "adapter_model.safetensors": (SRC / "adapter_model.safetensors").read_bytes(),
                          "filler.bin": filler})
        del filler
        peak = lambda: int(re.search(r"VmHWM:\s+(\d+) kB", open(f"/proc/{s.proc.pid}/status").read()).group(1)) >> 10
        before = peak()
        r = put(s, "streamed", archive)
        assert r.status_code == 201, r.text
        print(f"\na {len(archive) >> 20} MiB upload: server peak RSS {before} -> {peak()} MiB")
        assert peak() - before < 48, "the upload was held in memory"
    finally:
        s.stop()
