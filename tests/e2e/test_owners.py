"""Third parties through the real server (docs/THIRD-PARTIES.md): the operator, two adapter
owners, a contributor, tenants from the TOML and from the database, and revoked and expired
keys. Every route is tried by every caller that must not use it (none crosses, none gets a 500,
every refusal is in OpenAI's error shape), the allowed paths work, earnings add up to the
ledger's entries to the micro-unit, `explain` reproduces every split, a dry-run predicts what an
install pays, quotas hold, the audit trail is chained and its tampering found, and no key is
ever written down in clear.

Choices made where docs/THIRD-PARTIES.md leaves room (the server should match these):

- Key ids are the 16 hex digits of `olk_<id>_<secret>`; `DELETE /admin/keys/{id}` and
  `openlora keys revoke` take that id. `openlora keys create` prints the key (we find it with the
  `olk_...` pattern; the walkthrough assumes it is alone on stdout's last line).
  `openlora keys list --json` prints a JSON list (or `{"data": [...]}`) of rows with `id`.
- An owner uploading to a name another party holds (another owner's adapter, or one in the
  operator's `[adapters]`) gets `409 name_taken`; GET/DELETE of it is `404`. A slot
  `adapter:<name>` the owner does not own (another owner's, the operator's configured adapter's,
  or that of no adapter at all) is `404` for every plugin route, the dry-run included.
- Operator routes (`router`/`pricer`/`attributor` slots, `/admin/ledger/*`, `/admin/owners`,
  `POST /admin/keys` with scope owner/tenant) are `403 permission_error` for owners; every
  `/admin` route is `403` for contributor and tenant keys (they are valid keys of another scope:
  NOTE tests/e2e/test_ledger.py still expects 401 for a tenant key on /admin/ledger/summary),
  and so are `/v1/usage`, `/v1/completions`, `/v1/chat/completions` and `/v1/models` for owner
  and contributor keys, and `/v1/earnings*` for tenant keys. An owner deleting a key that is
  not its contributors' gets 403 or 404 (either is accepted).
- A contributor key minted by owner A for `contributor:bob` sees bob's earnings from A's
  adapters only, and may `explain` the entries of A's adapters that pay bob, not entries of
  owner B's adapters even when B's attributor pays bob too (both owners here use the same
  contributor config, so that this is tested).
- Earnings count every entry of the owner's adapters: where no owner attributor divided the
  share (`owner_split` null), the whole `owner_share` is the owner's (`owner:<name>`).
  Rows with amount 0 may be listed or not.
- Dry-run `paid` / `would_pay` per entry may be a list of splits or a `{payee: amount}` map,
  `share` a Money object or an integer; both are accepted. `paid` of an entry whose share no
  owner attributor divided is `{owner:<name>: share}`.
- `GET /admin/audit` answers `{"object": "list", "data": [...]}` (a bare list is accepted) in
  ascending `seq`; `?limit=` caps the rows. Audit `sha256` may be bare hex or `sha256:`-prefixed.
  An owner sees exactly the records whose `actor` is `owner:<name>`. The SQLite table is
  `audit_log` with a `target` column (found by name if it differs).
- `/v1/ledger/entries/{id}/explain` and `openlora explain --json` give the same JSON object;
  `owner_share` has an `amount`; `owner_split` is a list of splits; `adapter` is a name or
  `{"name", "sha256"}`.
- The builtin operator attributor is configured to give adapters exactly half of the
  non-operator part (`adapter_floor_ppm = 500000, adapter_multiplier_ppm = 0`), so owner shares
  are large and do not depend on the measured contribution.
"""

import csv
import io
import json
import re
import signal
import sqlite3
import time
from dataclasses import dataclass, field
from urllib.parse import quote

import httpx
import openai
import pytest
from conftest import ADAPTERS, ADMIN_TOKEN, API_KEY, MODEL, Server, adapter_tar, plugin_wasm

API_KEY_2 = "sk-openlora-globex-0123"
KEY_RE = re.compile(r"olk_([0-9a-f]{16})_([0-9a-f]{64})")
CONFIG = {"owner_keeps_ppm": 200000, "contributors": {"bob": 3, "carol": 1}}
CONFIG_V1 = {"owner_keeps_ppm": 500000, "contributors": {"bob": 1}}
REFUSALS = {401, 403, 404, 409}
GENESIS = "0" * 64


def server_config() -> str:
    return f"""
model = "{MODEL}"
model_name = "base"
admin_token = "{ADMIN_TOKEN}"

[adapters]
"r4-qv" = "{ADAPTERS / 'r4-qv'}"

[api_keys]
"{API_KEY}" = "acme"
"{API_KEY_2}" = "globex"

[limits]
max_concurrent_requests = 64

[owners]
max_adapters = 16
max_adapter_bytes = 1073741824
max_installs_per_hour = 40

[policy]
quarantine_after = 1000
quarantine_rate_percent = 0

[policy.slots.attributor]
builtin = {{ adapter_floor_ppm = 500000, adapter_multiplier_ppm = 0 }}
"""


# ---------------------------------------------------------------------------------------------
# helpers


def call(s: Server, method: str, path: str, key: str | None = None, client: httpx.Client | None = None,
         **kw) -> httpx.Response:
    headers = dict(kw.pop("headers", None) or {})
    if key is not None:
        headers["Authorization"] = f"Bearer {key}"
    send = client.request if client is not None else httpx.request
    return send(method, s.url + path, headers=headers, timeout=60, **kw)


def ok(r: httpx.Response, *status: int) -> dict:
    assert r.status_code in (status or (200,)), f"{r.request.method} {r.request.url}: {r.status_code} {r.text}"
    return r.json() if r.content else {}


def rows(body) -> list:
    return body["data"] if isinstance(body, dict) else body


def tar_upload(src: str, name: str = "x") -> dict:
    return {"content": adapter_tar(ADAPTERS / src, name), "headers": {"Content-Type": "application/x-tar"}}


def plugin_form(wasm: bytes, config: dict) -> dict:
    return {"files": {"plugin": ("attributor.wasm", wasm, "application/wasm")}, "data": {"config": json.dumps(config)}}


def error_shape(r: httpx.Response) -> str | None:
    """None if the body is OpenAI's error object, else what is wrong with it."""
    try:
        err = r.json()["error"]
    except Exception:  # noqa: BLE001 - any failure to parse is the finding
        return f"not an error JSON: {r.text[:200]!r}"
    missing = {"message", "type", "param", "code"} - set(err)
    if missing or not isinstance(err.get("message"), str) or not isinstance(err.get("type"), str):
        return f"error object lacks {sorted(missing)}: {err}"
    return None


def amount(x) -> int:
    return x["amount"] if isinstance(x, dict) else int(x)


def as_map(x) -> dict:
    """Splits (a list of {payee, amount}) or a {payee: amount} map, as a map without zeros."""
    out: dict[str, int] = {}
    if isinstance(x, dict):
        for k, v in x.items():
            out[k] = out.get(k, 0) + amount(v)
    else:
        for sp in x or []:
            out[sp["payee"]] = out.get(sp["payee"], 0) + sp["amount"]
    return {k: v for k, v in out.items() if v}


def add(into: dict, more: dict) -> dict:
    for k, v in more.items():
        into[k] = into.get(k, 0) + v
    return into


def adapter_name(a) -> str | None:
    return a if a is None or isinstance(a, str) else a["name"]


def strip_sha(x: str | None) -> str | None:
    return x.removeprefix("sha256:") if isinstance(x, str) else x


def cli_json(done) -> list:
    assert done.returncode == 0, done.stdout + done.stderr
    return rows(json.loads(done.stdout))


# ---------------------------------------------------------------------------------------------
# the world: one server, its parties, their adapters and plugins, some requests


@dataclass
class World:
    s: Server
    wasm: bytes
    keys: dict = field(default_factory=dict)       # role -> key
    ids: dict = field(default_factory=dict)        # role -> key id
    secrets: list = field(default_factory=list)    # every key made, and the TOML secrets
    entries: dict = field(default_factory=dict)    # label -> request id
    billings: dict = field(default_factory=dict)   # request id -> billing
    uploads: dict = field(default_factory=dict)    # adapter -> upload answer
    installs: dict = field(default_factory=dict)   # slot -> install answer (latest)
    made_at: dict = field(default_factory=dict)    # role -> time.time() of creation

    def key(self, role: str, key: str, key_id: str | None = None):
        m = KEY_RE.fullmatch(key)
        assert m, f"{role}: {key!r} is not olk_<16 hex>_<64 hex>"
        self.keys[role] = key
        self.ids[role] = key_id or m.group(1)
        self.secrets.append(key)
        self.made_at[role] = time.time()

    def http_key(self, role: str, by: str | None, body: dict) -> dict:
        r = call(self.s, "POST", "/admin/keys", self.keys.get(by, ADMIN_TOKEN) if by else ADMIN_TOKEN, json=body)
        made = ok(r, 201)
        assert {"id", "key", "scope", "account", "payee", "label", "created_at_ms", "expires_at_ms"} <= set(made), made
        assert made["scope"] == body["scope"], made
        assert made["key"].split("_")[1] == made["id"], made
        self.key(role, made["key"], made["id"])
        return made

    def cli_key(self, role: str, *args: str) -> str:
        done = self.s.cli("keys", "create", *args)
        assert done.returncode == 0, done.stdout + done.stderr
        found = KEY_RE.findall(done.stdout)
        assert len(found) == 1, f"`keys create` prints the key once: {done.stdout!r}"
        key = f"olk_{found[0][0]}_{found[0][1]}"
        assert done.stdout.strip().splitlines()[-1].strip() == key, "the key is alone on stdout's last line"
        assert key not in done.stderr
        self.key(role, key)
        return key

    def complete(self, label: str, key: str, model: str, prompt: str = "Hello there", max_tokens: int = 6) -> dict:
        client = openai.OpenAI(base_url=f"{self.s.url}/v1", api_key=key, max_retries=0)
        r = client.completions.create(model=model, prompt=prompt, max_tokens=max_tokens, temperature=0)
        billing = r.model_extra["billing"]
        assert sum(sp["amount"] for sp in billing["splits"]) == billing["charge"]["amount"], billing
        self.entries[label] = billing["request_id"]
        self.billings[billing["request_id"]] = billing
        return billing


@pytest.fixture(scope="module")
def world():
    wasm = plugin_wasm("openlora-plugin-contributor-attributor")
    s = Server(config=server_config())
    w = World(s=s, wasm=wasm)
    w.secrets += [API_KEY, API_KEY_2, ADMIN_TOKEN]
    try:
        # Owners: alice over HTTP, dora with the CLI (while the server runs).
        alice = w.http_key("alice", None, {"scope": "owner", "account": "alice", "label": "alice's key"})
        assert alice["account"] == "alice" and alice["expires_at_ms"] is None and alice["label"] == "alice's key"
        w.cli_key("dora", "--owner", "dora", "--label", "dora from the cli")
        listed = {k["id"]: k for k in cli_json(s.cli("keys", "list", "--json"))}
        assert listed[w.ids["dora"]]["scope"] == "owner" and listed[w.ids["dora"]]["account"] == "dora", listed
        # A tenant from the database, next to the TOML's acme and globex; and a tenant that
        # happens to share its name with an owner (tenants and owners are different parties).
        w.http_key("initech", None, {"scope": "tenant", "account": "initech"})
        w.http_key("tenant_alice", None, {"scope": "tenant", "account": "alice"})

        # Each owner uploads an adapter and installs two versions of its attributor.
        w.uploads["a-model"] = ok(call(s, "PUT", "/admin/adapters/a-model", w.keys["alice"], **tar_upload("r4-qv")), 201)
        w.uploads["d-model"] = ok(call(s, "PUT", "/admin/adapters/d-model", w.keys["dora"], **tar_upload("r8-mlp")), 201)
        assert w.uploads["a-model"]["owner"] == "alice" and w.uploads["d-model"]["owner"] == "dora", w.uploads
        for owner, name in [("alice", "a-model"), ("dora", "d-model")]:
            for cfg in (CONFIG_V1, CONFIG):
                r = call(s, "POST", f"/admin/plugins/adapter:{name}", w.keys[owner], **plugin_form(wasm, cfg))
                w.installs[f"adapter:{name}"] = ok(r, 201)
            assert w.installs[f"adapter:{name}"]["active"]["version"] == 2, w.installs

        # Contributor keys: alice's for bob (and one for carol she revokes herself), dora's for carol.
        made = w.http_key("bob", "alice", {"scope": "contributor", "payee": "contributor:bob", "label": "bob"})
        assert made["payee"] == "contributor:bob", made
        w.http_key("carol_revoked", "alice", {"scope": "contributor", "payee": "contributor:carol"})
        ok(call(s, "DELETE", f"/admin/keys/{w.ids['carol_revoked']}", w.keys["alice"]))
        w.http_key("dora_carol", "dora", {"scope": "contributor", "payee": "contributor:carol"})

        # Requests: three tenants on both owners' adapters, acme on the base model and the
        # operator's adapter too.
        for tenant, key in [("acme", API_KEY), ("globex", API_KEY_2), ("initech", w.keys["initech"])]:
            for model in ["a-model", "d-model"]:
                w.complete(f"{tenant}/{model}", key, model, prompt=f"{tenant} says hello to {model}")
        w.complete("acme/a-model/2", API_KEY, "a-model", prompt="Once upon a time", max_tokens=8)
        w.complete("acme/base", API_KEY, "base")
        w.complete("acme/r4-qv", API_KEY, "r4-qv")

        # A key the operator revokes after it worked, and a CLI tenant key the CLI revokes after
        # it worked: both refused at once.
        w.http_key("alice_revoked", None, {"scope": "owner", "account": "alice"})
        ok(call(s, "GET", "/admin/adapters", w.keys["alice_revoked"]))
        gone = ok(call(s, "DELETE", f"/admin/keys/{w.ids['alice_revoked']}", ADMIN_TOKEN))
        assert gone["id"] == w.ids["alice_revoked"] and gone["revoked"] is True, gone
        assert call(s, "GET", "/admin/adapters", w.keys["alice_revoked"]).status_code == 401
        w.cli_key("hooli_revoked", "--tenant", "hooli")
        w.complete("hooli/base", w.keys["hooli_revoked"], "base")
        done = s.cli("keys", "revoke", w.ids["hooli_revoked"])
        assert done.returncode == 0, done.stdout + done.stderr
        assert call(s, "GET", "/v1/usage", w.keys["hooli_revoked"]).status_code == 401

        # Keys that expire a second after they are made.
        for role, by, body in [("alice_expired", None, {"scope": "owner", "account": "alice"}),
                               ("initech_expired", None, {"scope": "tenant", "account": "initech"}),
                               ("bob_expired", "alice", {"scope": "contributor", "payee": "contributor:bob"})]:
            made = w.http_key(role, by, {**body, "expires_in_secs": 1})
            assert made["expires_at_ms"] and made["expires_at_ms"] - made["created_at_ms"] <= 1500, made
        time.sleep(max(0.0, max(w.made_at[r] for r in ["alice_expired", "initech_expired", "bob_expired"])
                       + 2 - time.time()))
        yield w
    finally:
        if s.proc.poll() is None:
            s.stop(signal.SIGKILL)


def snapshot(s: Server) -> dict:
    """What a crossing could change, as the operator sees it."""
    def get(path):
        return ok(call(s, "GET", path, ADMIN_TOKEN))

    keys = [{k: v for k, v in row.items() if not k.startswith("last_")} for row in rows(get("/admin/keys"))]
    plugins = [{k: v for k, v in row.items() if k != "consecutive_failures"} for row in rows(get("/admin/plugins"))]
    ledger = call(s, "GET", "/admin/ledger/export?format=jsonl", ADMIN_TOKEN).text.splitlines()
    return {
        "adapters": sorted(json.dumps(a, sort_keys=True) for a in rows(get("/admin/adapters"))),
        "plugins": sorted(json.dumps(p, sort_keys=True) for p in plugins),
        "keys": sorted(json.dumps(k, sort_keys=True) for k in keys),
        "owners": json.dumps(get("/admin/owners"), sort_keys=True),
        "ledger_entries": len(ledger),
    }


# ---------------------------------------------------------------------------------------------
# (a) the cross-scope matrix


def adapter_routes(n: str) -> list:
    return [("GET", f"/admin/adapters/{n}", {}), ("PUT", f"/admin/adapters/{n}", tar_upload("r16-all-rslora")),
            ("POST", f"/admin/adapters/{n}", tar_upload("r16-all-rslora")), ("DELETE", f"/admin/adapters/{n}", {})]


def slot_routes(w: World, slot: str) -> list:
    evil = {"owner_keeps_ppm": 0, "contributors": {"mallory": 1}}
    return [
        ("GET", f"/admin/plugins/{slot}", {}),
        ("POST", f"/admin/plugins/{slot}", plugin_form(w.wasm, evil)),
        ("PUT", f"/admin/plugins/{slot}", plugin_form(w.wasm, evil)),
        ("POST", f"/admin/plugins/{slot}?config={quote(json.dumps(evil))}", {"content": w.wasm}),
        ("POST", f"/admin/plugins/{slot}/rollback", {}),
        ("POST", f"/admin/plugins/{slot}/activate/1", {}),
        ("DELETE", f"/admin/plugins/{slot}/versions/1", {}),
        ("DELETE", f"/admin/plugins/{slot}", {}),
        ("POST", f"/admin/plugins/{slot}/dry-run", plugin_form(w.wasm, evil)),
        ("POST", f"/admin/plugins/{slot}/dry-run?limit=5", plugin_form(w.wasm, evil)),
    ]


QUOTA_UP = {"max_adapters": 1000, "max_adapter_bytes": 1 << 40, "max_installs_per_hour": 100000}


def operator_routes(w: World) -> list:
    routes = []
    for slot in ["router", "pricer", "attributor"]:
        routes += slot_routes(w, slot)
    return routes + [
        ("GET", "/admin/ledger/summary", {}), ("GET", "/admin/ledger/summary?by=tenant", {}),
        ("GET", "/admin/ledger/export", {}), ("GET", "/admin/ledger/export?format=csv", {}),
        ("GET", "/admin/ledger/verify", {}),
        ("GET", "/admin/owners", {}), ("PUT", "/admin/owners/alice", {"json": QUOTA_UP}),
        ("PUT", "/admin/owners/dora", {"json": QUOTA_UP}), ("PUT", "/admin/owners/mallory", {"json": QUOTA_UP}),
        ("POST", "/admin/keys", {"json": {"scope": "owner", "account": "mallory"}}),
        ("POST", "/admin/keys", {"json": {"scope": "owner", "account": "alice"}}),
        ("POST", "/admin/keys", {"json": {"scope": "tenant", "account": "acme"}}),
    ]


def inference_routes(model: str) -> list:
    return [
        ("POST", "/v1/completions", {"json": {"model": model, "prompt": "hi", "max_tokens": 2}}),
        ("POST", "/v1/chat/completions", {"json": {"model": model, "messages": [{"role": "user", "content": "hi"}],
                                                    "max_tokens": 2}}),
        ("GET", "/v1/models", {}),
        ("GET", "/v1/usage", {}), ("GET", "/v1/usage?by=payee", {}),
    ]


def earnings_routes() -> list:
    return [("GET", "/v1/earnings", {}), ("GET", "/v1/earnings?by=payee", {}),
            ("GET", "/v1/earnings/export?format=csv", {}), ("GET", "/v1/earnings/export?format=jsonl", {})]


def explain(rid: str) -> tuple:
    return ("GET", f"/v1/ledger/entries/{rid}/explain", {})


def plan(w: World) -> list:
    """(caller, key, method, path, kwargs, expected statuses) for every attempt that must fail."""
    e = w.entries
    attempts = []

    def add_all(caller, key, routes, expect):
        attempts.extend((caller, key, m, p, kw, expect) for m, p, kw in routes)

    owners = {"alice": ("a-model", "dora", "d-model"), "dora": ("d-model", "alice", "a-model")}
    for me, (mine, them, theirs) in owners.items():
        key = w.keys[me]
        for name in [theirs, "r4-qv"]:
            routes = adapter_routes(name)
            add_all(me, key, [r for r in routes if r[0] in ("GET", "DELETE")], {404})
            add_all(me, key, [r for r in routes if r[0] in ("PUT", "POST")], {409})
            add_all(me, key, slot_routes(w, f"adapter:{name}"), {404})
        add_all(me, key, slot_routes(w, "adapter:ghost-of-nobody"), {404})
        add_all(me, key, [("PUT", f"/admin/adapters/{me}-for-{them}?owner={them}", tar_upload("r4-qv")),
                          ("POST", f"/admin/adapters/{me}-for-op?owner=operator", tar_upload("r4-qv"))], {403})
        add_all(me, key, operator_routes(w), {403})
        # Keys that are not its contributors': the other owner's, a tenant's (one with the owner's
        # own name too), the other owner's contributor's, and its own owner keys.
        add_all(me, key, [("DELETE", f"/admin/keys/{w.ids[them]}", {}), ("DELETE", f"/admin/keys/{w.ids['initech']}", {}),
                          ("DELETE", f"/admin/keys/{w.ids['tenant_alice']}", {}),
                          ("DELETE", f"/admin/keys/{w.ids['bob' if me == 'dora' else 'dora_carol']}", {})], {403, 404})
        if me == "alice":
            add_all(me, key, [("DELETE", f"/admin/keys/{w.ids['alice_expired']}", {})], {403, 404})
        add_all(me, key, inference_routes(mine), {403})
        # Entries of the other owner's adapter, of the operator's adapter and of the base model.
        add_all(me, key, [explain(rid) for label, rid in e.items() if label.split("/")[1] != mine], {404})

    # The contributor alice minted for bob: nothing but its earnings and the entries paying it.
    bob = w.keys["bob"]
    admin_like = (adapter_routes("a-model") + adapter_routes("bob-new") + slot_routes(w, "adapter:a-model")
                  + [("GET", "/admin/adapters", {}), ("GET", "/admin/plugins", {}), ("GET", "/admin/keys", {}),
                     ("GET", "/admin/audit", {}),
                     ("POST", "/admin/keys", {"json": {"scope": "contributor", "payee": "contributor:bob"}}),
                     ("POST", "/admin/keys", {"json": {"scope": "contributor", "payee": "contributor:carol"}}),
                     ("DELETE", f"/admin/keys/{w.ids['bob']}", {}), ("DELETE", f"/admin/keys/{w.ids['initech']}", {})]
                  + operator_routes(w))
    add_all("contributor:bob", bob, admin_like, {403})
    add_all("contributor:bob", bob, inference_routes("a-model"), {403})
    add_all("contributor:bob", bob, [explain(rid) for label, rid in e.items() if label.split("/")[1] != "a-model"],
            {404})

    # Tenants: no /admin, no earnings, no other tenant's entries.
    for tenant, key in [("acme", API_KEY), ("globex", API_KEY_2), ("initech", w.keys["initech"]),
                        ("tenant alice", w.keys["tenant_alice"])]:
        add_all(tenant, key, admin_like, {403})
        add_all(tenant, key, earnings_routes(), {403})
        add_all(tenant, key, [explain(rid) for label, rid in e.items() if not label.startswith(f"{tenant}/")], {404})

    # Keys that are not (or no longer) keys: everything, their own former rights included.
    dora_id = w.ids["dora"]
    bad = {
        "revoked owner": w.keys["alice_revoked"], "expired owner": w.keys["alice_expired"],
        "revoked contributor": w.keys["carol_revoked"], "expired contributor": w.keys["bob_expired"],
        "expired db tenant": w.keys["initech_expired"], "cli-revoked tenant": w.keys["hooli_revoked"],
        "wrong secret": f"olk_{dora_id}_{'0' * 64}", "unknown key": f"olk_{'f' * 16}_{'e' * 64}",
        "garbage": "not-a-key", "no key": None,
    }
    everything = (admin_like + inference_routes("a-model") + earnings_routes()
                  + [explain(e["acme/a-model"]), explain(e["hooli/base"]), explain(e["initech/a-model"])])
    for caller, key in bad.items():
        add_all(caller, key, everything, {401})
    return attempts


@pytest.fixture(scope="module")
def matrix(world):
    s = world.s
    before = snapshot(s)
    results = []  # (caller, method, path, status, problem) for every attempt
    with httpx.Client(timeout=60) as client:
        for caller, key, method, path, kw, expect in plan(world):
            for attempt in range(3):
                try:
                    r = call(s, method, path, key, client=client, **kw)
                    break
                except httpx.TransportError as e:
                    r = e
                    time.sleep(0.05)
            results.append((caller, key, method, path, expect, r))
    after = snapshot(s)
    return before, after, results


def test_no_caller_crosses_its_scope(world, matrix):
    before, after, results = matrix
    crossings, server_errors, not_refusals, shapes, no_answer = [], [], [], [], []
    for caller, _, method, path, _, r in results:
        what = f"{caller}: {method} {path}"
        if isinstance(r, Exception):
            no_answer.append(f"{what}: {r!r}")
            continue
        if 200 <= r.status_code < 300:
            crossings.append(f"{what} -> {r.status_code} {r.text[:200]}")
        elif r.status_code >= 500:
            server_errors.append(f"{what} -> {r.status_code} {r.text[:200]}")
        elif r.status_code not in REFUSALS:
            not_refusals.append(f"{what} -> {r.status_code} {r.text[:200]}")
        if r.status_code >= 300 and (problem := error_shape(r)):
            shapes.append(f"{what}: {problem}")
    changed = [k for k in before if before[k] != after[k]]
    print(f"\n{len(results)} attempts by {len({c for c, *_ in results})} callers on "
          f"{len({(m, p) for _, _, m, p, _, _ in results})} routes: {len(crossings)} crossings, "
          f"state changed: {changed or 'nothing'}")
    assert len(results) >= 500, len(results)
    assert not crossings, "\n".join(crossings[:40])
    assert not changed, {k: (before[k], after[k]) for k in changed}
    assert not server_errors, "\n".join(server_errors[:40])
    assert not not_refusals, "\n".join(not_refusals[:40])
    assert not shapes, "\n".join(shapes[:40])
    assert not no_answer, "\n".join(no_answer[:40])


def test_refusals_say_what_the_reference_says(world, matrix):
    """401 for keys that are not keys, 403 permission_error for another scope's route, 404 for
    another party's adapter, slot or entry (the same answer as for one that does not exist),
    409 name_taken for an upload to a name another party holds."""
    _, _, results = matrix
    wrong = []
    for caller, _, method, path, expect, r in results:
        if isinstance(r, Exception) or r.status_code < 300:
            continue  # the test above reports these
        err = r.json().get("error", {}) if r.headers.get("content-type", "").startswith("application/json") else {}
        if r.status_code not in expect:
            wrong.append(f"{caller}: {method} {path}: expected {sorted(expect)}, got {r.status_code} {r.text[:160]}")
        elif r.status_code == 403 and err.get("type") != "permission_error":
            wrong.append(f"{caller}: {method} {path}: 403 of type {err.get('type')!r}, not permission_error")
        elif r.status_code == 409 and err.get("code") != "name_taken":
            wrong.append(f"{caller}: {method} {path}: 409 with code {err.get('code')!r}, not name_taken")
    # Existence is not confirmed: another owner's adapter, slot and entry answer like nothing at all.
    s, alice = world.s, world.keys["alice"]
    for theirs, nothing in [("/admin/adapters/d-model", "/admin/adapters/zz-none"),
                            ("/admin/plugins/adapter:d-model", "/admin/plugins/adapter:zz-none"),
                            (f"/v1/ledger/entries/{world.entries['acme/d-model']}/explain",
                             "/v1/ledger/entries/req-000000000000000000000000/explain")]:
        a, b = call(s, "GET", theirs, alice), call(s, "GET", nothing, alice)
        hide = lambda r, p: re.sub(r"d-model|zz-none|req-[0-9a-f]+", "X", r.text)  # noqa: E731
        if (a.status_code, hide(a, theirs)) != (b.status_code, hide(b, nothing)):
            wrong.append(f"alice: GET {theirs} ({a.status_code} {a.text[:120]}) differs from GET {nothing} "
                         f"({b.status_code} {b.text[:120]})")
    print(f"\n{len(wrong)} refusals other than the reference's")
    assert not wrong, "\n".join(wrong[:60])


# ---------------------------------------------------------------------------------------------
# (b) what each party may do, it can


def test_an_owner_manages_its_own_adapters_and_slots(world):
    s, alice, dora = world.s, world.keys["alice"], world.keys["dora"]
    first = ok(call(s, "PUT", "/admin/adapters/a-extra?owner=alice", alice, **tar_upload("r4-qv")), 201)
    assert first["owner"] == "alice", first
    again = ok(call(s, "POST", "/admin/adapters/a-extra", alice, **tar_upload("r8-mlp")), 200)
    assert again["sha256"] != first["sha256"] and again["owner"] == "alice", again
    assert ok(call(s, "GET", "/admin/adapters/a-extra", alice))["sha256"] == again["sha256"]

    mine = rows(ok(call(s, "GET", "/admin/adapters", alice)))
    assert sorted(a["name"] for a in mine) == ["a-extra", "a-model"], mine
    assert {a["owner"] for a in mine} == {"alice"}
    assert sorted(a["name"] for a in rows(ok(call(s, "GET", "/admin/adapters", dora)))) == ["d-model"]
    everyone = {a["name"]: a["owner"] for a in rows(ok(call(s, "GET", "/admin/adapters", ADMIN_TOKEN)))}
    assert everyone["a-extra"] == "alice" and everyone["d-model"] == "dora" and "r4-qv" in everyone, everyone

    slot = "/admin/plugins/adapter:a-extra"
    v1 = ok(call(s, "POST", slot, alice, **plugin_form(world.wasm, CONFIG_V1)), 201)["active"]["version"]
    v2 = ok(call(s, "PUT", slot, alice, **plugin_form(world.wasm, CONFIG)), 201)["active"]["version"]
    assert v2 != v1
    assert ok(call(s, "POST", f"{slot}/rollback", alice))["active"]["version"] == v1
    assert ok(call(s, "POST", f"{slot}/activate/{v2}", alice))["active"]["version"] == v2
    ok(call(s, "DELETE", f"{slot}/versions/{v1}", alice))
    view = ok(call(s, "GET", slot, alice))
    assert [v["version"] for v in view["versions"]] == [v2] and view["active"] == v2, view
    slots = {v["slot"] for v in rows(ok(call(s, "GET", "/admin/plugins", alice)))}
    assert slots == {"adapter:a-model", "adapter:a-extra"}, slots
    assert {v["slot"] for v in rows(ok(call(s, "GET", "/admin/plugins", dora)))} == {"adapter:d-model"}
    ok(call(s, "DELETE", slot, alice))
    assert ok(call(s, "GET", slot, alice))["active"] is None

    gone = ok(call(s, "DELETE", "/admin/adapters/a-extra", alice))
    assert gone.get("deleted") is True, gone
    assert call(s, "GET", "/admin/adapters/a-extra", alice).status_code == 404
    assert "a-extra" not in {a["name"] for a in rows(ok(call(s, "GET", "/admin/adapters", ADMIN_TOKEN)))}

    # Keys: an owner lists and revokes its contributors' keys only.
    keys = rows(ok(call(s, "GET", "/admin/keys", alice)))
    ids = {k["id"] for k in keys}
    assert world.ids["bob"] in ids and world.ids["dora_carol"] not in ids and world.ids["dora"] not in ids, keys
    assert world.ids["tenant_alice"] not in ids, "the tenant named alice is not owner alice's"
    assert {k["scope"] for k in keys} == {"contributor"}, f"an owner lists its contributors' keys only: {keys}"
    assert not any("key" in k for k in keys), "no secret in a listing"
    assert world.ids["dora_carol"] in {k["id"] for k in rows(ok(call(s, "GET", "/admin/keys", dora)))}


def owner_divisions(world: World, owner: str) -> list[tuple[dict, dict]]:
    """(entry, {payee: amount} of the owner's share) for every entry of the owner's adapters,
    read with the operator's explain."""
    s = world.s
    lines = call(s, "GET", "/admin/ledger/export?format=jsonl", ADMIN_TOKEN).text.splitlines()
    out = []
    for line in lines:
        entry = json.loads(line)["entry"]
        if entry["request"].get("adapter_owner") != owner:
            continue
        x = ok(call(s, "GET", f"/v1/ledger/entries/{entry['request_id']}/explain", ADMIN_TOKEN))
        division = x["owner_split"] if x.get("owner_split") else [
            {"payee": x["owner_share"].get("payee", f"owner:{owner}"), "amount": amount(x["owner_share"])}]
        out.append((entry, as_map(division)))
    return out


def earnings(s: Server, key: str, query: str = "") -> dict:
    return ok(call(s, "GET", f"/v1/earnings{query}", key))


def test_earnings_add_up_to_the_ledger_for_owners_and_contributors(world):
    s = world.s
    for owner, contributor_key, payee in [("alice", "bob", "contributor:bob"), ("dora", "dora_carol", "contributor:carol")]:
        key = world.keys[owner]
        divisions = owner_divisions(world, owner)
        assert len(divisions) >= 3, divisions
        by_payee, by_adapter, requests = {}, {}, {}
        for entry, division in divisions:
            add(by_payee, division)
            add(by_adapter, {entry["adapter"]["name"]: sum(division.values())})
            add(requests, {entry["adapter"]["name"]: 1})
        total = sum(by_payee.values())
        assert by_payee.get("contributor:bob") and by_payee.get(f"owner:{owner}"), by_payee

        got = earnings(s, key, "?by=payee")
        assert got["owner"] == owner and got["payee"] is None and got["by"] == "payee", got
        assert {r["key"]: r["amount"] for r in got["data"] if r["amount"]} == by_payee, (got, by_payee)
        assert {r["currency"] for r in got["data"]} == {"USD"}
        got = earnings(s, key, "?by=adapter")
        assert {r["key"]: r["amount"] for r in got["data"]} == by_adapter, (got, by_adapter)
        assert {r["key"]: r["requests"] for r in got["data"]} == requests, (got, requests)
        days = earnings(s, key, "?by=day")["data"]
        assert all(re.fullmatch(r"\d{4}-\d{2}-\d{2}", r["key"]) for r in days), days
        assert sum(r["amount"] for r in days) == total
        assert earnings(s, key)["data"], "a default grouping"
        assert sum(r["amount"] for r in earnings(s, key, "?by=payee&since=2020-01-01")["data"]) == total
        assert sum(r["amount"] for r in earnings(s, key, "?by=payee&until=2020-01-01")["data"]) == 0
        later = int(time.time()) + 3600
        assert sum(r["amount"] for r in earnings(s, key, f"?by=payee&since={later}")["data"]) == 0

        exported = call(s, "GET", "/v1/earnings/export?format=csv", key)
        assert exported.status_code == 200 and exported.headers["content-type"].startswith("text/csv"), exported.text
        table = list(csv.DictReader(io.StringIO(exported.text)))
        assert exported.text.splitlines()[0] == "day,adapter,payee,currency,amount,requests"
        per_pair: dict = {}
        for row in table:
            add(per_pair, {(row["adapter"], row["payee"]): int(row["amount"])})
        want_pair: dict = {}
        for entry, division in divisions:
            add(want_pair, {(entry["adapter"]["name"], p): a for p, a in division.items()})
        assert {k: v for k, v in per_pair.items() if v} == want_pair, (per_pair, want_pair)
        lines = call(s, "GET", "/v1/earnings/export?format=jsonl", key).text.splitlines()
        assert sum(json.loads(line)["amount"] for line in lines) == total

        # The contributor sees its payee's part of this owner's adapters, nothing else.
        ckey = world.keys[contributor_key]
        mine = earnings(s, ckey, "?by=payee")
        assert mine["payee"] == payee and mine["owner"] == owner, mine
        assert [(r["key"], r["amount"]) for r in mine["data"]] == [(payee, by_payee[payee])], (mine, by_payee)
        per_adapter = {a: sum(v for (ad, p), v in want_pair.items() if ad == a and p == payee) for a in by_adapter}
        got = {r["key"]: r["amount"] for r in earnings(s, ckey, "?by=adapter")["data"] if r["amount"]}
        assert got == {a: v for a, v in per_adapter.items() if v}, got
        rows_ = list(csv.DictReader(io.StringIO(call(s, "GET", "/v1/earnings/export?format=csv", ckey).text)))
        assert {r["payee"] for r in rows_} == {payee} and sum(int(r["amount"]) for r in rows_) == by_payee[payee]
        # Asking for someone else's payee does not show it.
        other = call(s, "GET", "/v1/earnings?by=payee&payee=contributor:zed", ckey)
        assert other.status_code in (400, 403) or {r["key"] for r in other.json()["data"]} <= {payee}, other.text

    for query, param in [("?by=color", "by"), ("?since=yesterday", "since"), ("/export?format=xml", "format")]:
        r = call(s, "GET", f"/v1/earnings{query}", world.keys["alice"])
        assert r.status_code == 400 and r.json()["error"]["param"] == param, (query, r.text)


# ---------------------------------------------------------------------------------------------
# (c) explain


def check_explanation(x: dict, billing: dict, owner: str, adapter: str, tenant: str, slot_sha: str) -> None:
    spec = ["request_id", "seq", "hash", "hash_ok", "tenant", "outcome", "finish", "base_model", "adapter",
            "adapter_owner", "request", "usage", "deciders", "charge", "operator_split", "owner_share",
            "owner_split", "splits", "replay"]
    assert set(spec) <= set(x), sorted(set(spec) - set(x))
    assert x["request_id"] == billing["request_id"] and x["tenant"] == tenant and x["adapter_owner"] == owner, x
    assert adapter_name(x["adapter"]) == adapter and x["outcome"] == "completed" and x["hash_ok"] is True, x
    assert x["seq"] == billing["ledger"]["seq"] and x["hash"] == billing["ledger"]["hash"], (x, billing)
    charge = x["charge"]["amount"]
    assert x["charge"] == billing["charge"] and charge > 0
    op = x["operator_split"]
    assert sum(sp["amount"] for sp in op) == charge, op
    at = [i for i, sp in enumerate(op) if sp["payee"] == f"owner:{owner}"]
    assert len(at) == 1, op
    assert amount(x["owner_share"]) == op[at[0]]["amount"] > 0, (x["owner_share"], op)
    assert sum(sp["amount"] for sp in x["owner_split"]) == amount(x["owner_share"]), x["owner_split"]
    assert x["splits"] == op[:at[0]] + x["owner_split"] + op[at[0] + 1:], x
    assert x["splits"] == billing["splits"], (x["splits"], billing["splits"])
    assert as_map(x["owner_split"]).keys() >= {"contributor:bob", f"owner:{owner}"}, x["owner_split"]
    slots = [d["slot"] for d in x["deciders"]]
    assert slots[-3:] == ["pricer", "attributor", f"adapter:{adapter}"], slots
    mine = [d for d in x["deciders"] if d["slot"] == f"adapter:{adapter}"][0]
    assert mine["plugin"] == f"sha256:{slot_sha}" and mine["failure"] is None and mine["fuel"] > 0, mine
    assert x["usage"]["completion_tokens"] >= 1 and x["request"]["tenant"] == tenant, x
    r = x["replay"]
    assert r["ok"] is True and r["problem"] is None, r
    assert r["charge"] == x["charge"] and r["splits"] == x["splits"], r


def test_explain_reproduces_every_micro_unit_for_each_party(world):
    s = world.s
    rid = world.entries["acme/a-model"]
    billing = world.billings[rid]
    sha = world.installs["adapter:a-model"]["active"]["sha256"]
    path = f"/v1/ledger/entries/{rid}/explain"
    answers = {who: ok(call(s, "GET", path, key)) for who, key in [
        ("owner", world.keys["alice"]), ("tenant", API_KEY), ("operator", ADMIN_TOKEN), ("contributor", world.keys["bob"])]}
    for who, x in answers.items():
        check_explanation(x, billing, "alice", "a-model", "acme", sha)
        assert x == answers["operator"], who
    # The DB tenant's own entry, explained to it.
    other = world.entries["initech/a-model"]
    check_explanation(ok(call(s, "GET", f"/v1/ledger/entries/{other}/explain", world.keys["initech"])),
                      world.billings[other], "alice", "a-model", "initech", sha)
    # dora's entries, explained to dora.
    d = world.entries["globex/d-model"]
    check_explanation(ok(call(s, "GET", f"/v1/ledger/entries/{d}/explain", world.keys["dora"])),
                      world.billings[d], "dora", "d-model", "globex",
                      world.installs["adapter:d-model"]["active"]["sha256"])

    done = s.cli("explain", rid, "--json")
    assert done.returncode == 0, done.stdout + done.stderr
    cli = json.loads(done.stdout)
    assert cli == answers["operator"], (cli, answers["operator"])
    text = s.cli("explain", rid)
    assert text.returncode == 0, text.stdout + text.stderr
    out = text.stdout
    assert rid in out and sha[:12] in out, out
    for sp in answers["operator"]["operator_split"] + answers["operator"]["owner_split"]:
        assert sp["payee"] in out and str(sp["amount"]) in out, (sp, out)
    assert str(billing["charge"]["amount"]) in out
    assert "replay" in out.lower(), out
    missing = s.cli("explain", "req-000000000000000000000000")
    assert missing.returncode != 0 and "req-000000000000000000000000" in missing.stdout + missing.stderr


# ---------------------------------------------------------------------------------------------
# (d) dry-run


def dry_run(s: Server, key: str, slot: str, wasm: bytes, config: dict, limit: int | None = None) -> dict:
    q = f"?limit={limit}" if limit is not None else ""
    return ok(call(s, "POST", f"/admin/plugins/{slot}/dry-run{q}", key, **plugin_form(wasm, config)))


def check_totals(run: dict) -> None:
    paid, would = {}, {}
    for e in run["entries"]:
        add(paid, as_map(e["paid"]))
        add(would, as_map(e["would_pay"]))
    assert as_map(run["totals"]["paid"]) == paid and as_map(run["totals"]["would_pay"]) == would, run["totals"]


def test_a_dry_run_predicts_what_the_install_pays(world):
    s, alice, acme = world.s, world.keys["alice"], API_KEY
    ok(call(s, "PUT", "/admin/adapters/a-dry", alice, **tar_upload("r16-all-rslora")), 201)
    prompts = [("The sea", 5), ("Numbers: one two", 7), ("Why", 3)]
    before = [world.complete(f"acme/a-dry/{i}", acme, "a-dry", p, n) for i, (p, n) in enumerate(prompts)]
    for b in before:
        assert as_map(b["splits"]).get("owner:alice"), b  # undivided: the owner's share whole

    run = dry_run(s, alice, "adapter:a-dry", world.wasm, CONFIG)
    assert run["slot"] == "adapter:a-dry" and run["checked"] == 3 and run["failed"] == 0, run
    assert sorted(e["request_id"] for e in run["entries"]) == sorted(b["request_id"] for b in before), run
    predicted = {}
    for e in run["entries"]:
        billing = world.billings[e["request_id"]]
        share = as_map(billing["splits"])["owner:alice"]
        assert amount(e["share"]) == share and e["error"] is None, e
        assert as_map(e["paid"]) == {"owner:alice": share}, e
        assert sum(as_map(e["would_pay"]).values()) == share and "contributor:bob" in as_map(e["would_pay"]), e
        assert e["seq"] == billing["ledger"]["seq"]
        predicted[e["request_id"]] = as_map(e["would_pay"])
    check_totals(run)
    assert dry_run(s, alice, "adapter:a-dry", world.wasm, CONFIG, limit=1)["checked"] == 1
    nothing = call(s, "GET", "/admin/plugins/adapter:a-dry", alice)
    assert nothing.status_code == 404 or nothing.json()["active"] is None, "a dry-run installs nothing"
    bad = call(s, "POST", "/admin/plugins/adapter:a-dry/dry-run", alice, **plugin_form(world.wasm, {"contributors": {}}))
    assert bad.status_code == 400 and not error_shape(bad), bad.text

    installed = ok(call(s, "POST", "/admin/plugins/adapter:a-dry", alice, **plugin_form(world.wasm, CONFIG)), 201)
    after = [world.complete(f"acme/a-dry/again/{i}", acme, "a-dry", p, n) for i, (p, n) in enumerate(prompts)]
    for old, new in zip(before, after):
        x_old = ok(call(s, "GET", f"/v1/ledger/entries/{old['request_id']}/explain", alice))
        x_new = ok(call(s, "GET", f"/v1/ledger/entries/{new['request_id']}/explain", alice))
        assert x_old["usage"] == x_new["usage"] and x_old["charge"] == x_new["charge"], (x_old["usage"], x_new["usage"])
        assert as_map(x_new["owner_split"]) == predicted[old["request_id"]], (x_new["owner_split"], predicted)
        assert x_new["deciders"][-1]["plugin"] == f"sha256:{installed['active']['sha256']}"

    again = dry_run(s, alice, "adapter:a-dry", world.wasm, CONFIG, limit=100)
    assert again["checked"] == 6 and again["failed"] == 0, again
    check_totals(again)
    new_ids = {b["request_id"] for b in after}
    for e in again["entries"]:
        if e["request_id"] in new_ids:
            assert as_map(e["would_pay"]) == as_map(e["paid"]), e
        else:
            assert as_map(e["paid"]) == {"owner:alice": amount(e["share"])}, e


# ---------------------------------------------------------------------------------------------
# (e) quotas


def owner_row(s: Server, name: str) -> dict:
    found = [r for r in rows(ok(call(s, "GET", "/admin/owners", ADMIN_TOKEN)))
             if name in (r.get("name"), r.get("owner"), r.get("account"))]
    assert len(found) == 1, found
    return found[0]


def nested(obj, name: str):
    """The value of the first field `name` anywhere in `obj`."""
    if isinstance(obj, dict):
        if name in obj:
            return obj[name]
        obj = list(obj.values())
    if isinstance(obj, list):
        for v in obj:
            if (found := nested(v, name)) is not None:
                return found
    return None


def adapters_of(s: Server, key: str) -> list:
    return sorted((a["name"], a["sha256"]) for a in rows(ok(call(s, "GET", "/admin/adapters", key))))


def test_quotas_refuse_and_a_refused_upload_changes_nothing(world):
    s = world.s
    world.http_key("quincy", None, {"scope": "owner", "account": "quincy"})
    world.http_key("rhea", None, {"scope": "owner", "account": "rhea"})
    quincy, rhea = world.keys["quincy"], world.keys["rhea"]
    ok(call(s, "PUT", "/admin/owners/quincy", ADMIN_TOKEN, json={"max_adapters": 1, "max_installs_per_hour": 1}))
    ok(call(s, "PUT", "/admin/owners/rhea", ADMIN_TOKEN, json={"max_adapter_bytes": 1000}))
    row = owner_row(s, "quincy")
    assert nested(row, "max_adapters") == 1 and nested(row, "max_installs_per_hour") == 1, row
    assert nested(row, "max_adapter_bytes") == 1073741824, row  # absent: the [owners] default

    ok(call(s, "PUT", "/admin/adapters/q-one", quincy, **tar_upload("r4-qv")), 201)
    listed, everyone = adapters_of(s, quincy), adapters_of(s, ADMIN_TOKEN)
    r = call(s, "PUT", "/admin/adapters/q-two", quincy, **tar_upload("r4-qv"))
    assert r.status_code == 429 and r.json()["error"]["code"] == "quota_exceeded" and not error_shape(r), r.text
    assert adapters_of(s, quincy) == listed and adapters_of(s, ADMIN_TOKEN) == everyone
    assert call(s, "GET", "/admin/adapters/q-two", ADMIN_TOKEN).status_code == 404
    ok(call(s, "PUT", "/admin/adapters/q-one", quincy, **tar_upload("r8-mlp")), 200)  # replacing adds none

    ok(call(s, "POST", "/admin/plugins/adapter:q-one", quincy, **plugin_form(world.wasm, CONFIG)), 201)
    r = call(s, "POST", "/admin/plugins/adapter:q-one", quincy, **plugin_form(world.wasm, CONFIG_V1))
    assert r.status_code == 429 and r.json()["error"]["code"] == "quota_exceeded", r.text
    assert int(r.headers["retry-after"]) > 0, r.headers
    assert len(ok(call(s, "GET", "/admin/plugins/adapter:q-one", quincy))["versions"]) == 1

    everyone = adapters_of(s, ADMIN_TOKEN)
    r = call(s, "PUT", "/admin/adapters/r-one", rhea, **tar_upload("r4-qv"))
    assert r.status_code == 413 and r.json()["error"]["code"] == "quota_exceeded" and not error_shape(r), r.text
    assert adapters_of(s, rhea) == [] and adapters_of(s, ADMIN_TOKEN) == everyone
    assert call(s, "GET", "/admin/adapters/r-one", ADMIN_TOKEN).status_code == 404
    # The operator lifts rhea's quota: the same upload is taken.
    ok(call(s, "PUT", "/admin/owners/rhea", ADMIN_TOKEN, json={}))
    ok(call(s, "PUT", "/admin/adapters/r-one", rhea, **tar_upload("r4-qv")), 201)


# ---------------------------------------------------------------------------------------------
# (f) the audit trail


def audit(s: Server, key: str, query: str = "?limit=1000") -> list:
    return rows(ok(call(s, "GET", f"/admin/audit{query}", key)))


def test_the_audit_trail_names_every_act(world):
    s = world.s
    records = audit(s, ADMIN_TOKEN)
    fields = {"seq", "at_ms", "actor", "key_id", "action", "target", "sha256", "detail", "prev_hash", "hash"}
    assert records and all(fields <= set(r) for r in records), records[:2]
    seqs = [r["seq"] for r in records]
    assert seqs == sorted(seqs) and len(set(seqs)) == len(seqs), seqs
    for a, b in zip(records, records[1:]):
        if b["seq"] == a["seq"] + 1:
            assert b["prev_hash"] == a["hash"], (a, b)
    if records[0]["seq"] == 1:
        assert records[0]["prev_hash"] == GENESIS, records[0]

    def find(**want):
        return [r for r in records if all(
            (strip_sha(r.get(k)) == strip_sha(v)) if k != "mentions" else v in json.dumps(r) for k, v in want.items())]

    assert find(actor="owner:alice", key_id=world.ids["alice"], target="a-model",
                sha256=world.uploads["a-model"]["sha256"]), "alice's upload"
    assert find(actor="owner:dora", key_id=world.ids["dora"], target="d-model",
                sha256=world.uploads["d-model"]["sha256"]), "dora's upload"
    assert find(actor="owner:alice", target="adapter:a-model",
                sha256=world.installs["adapter:a-model"]["active"]["sha256"]), "alice's install"
    assert find(actor="owner:alice", mentions="a-extra"), "the a-extra acts"
    actions_on_extra = {r["action"] for r in find(actor="owner:alice", mentions="a-extra")}
    assert len(actions_on_extra) >= 6, actions_on_extra  # upload, install, rollback, activate, remove, deactivate, delete
    assert find(actor="cli", key_id=None, mentions=world.ids["dora"]), "the CLI made dora's key"
    assert find(actor="cli", key_id=None, mentions=world.ids["hooli_revoked"]), "the CLI's key and revocation"
    assert len(find(actor="cli", mentions=world.ids["hooli_revoked"])) >= 2, "created and revoked"
    assert find(actor="operator", key_id=None, mentions=world.ids["alice_revoked"]), "the operator's revocation"
    assert find(actor="operator", mentions="quincy"), "owner quotas"
    assert find(actor="owner:alice", key_id=world.ids["alice"], mentions=world.ids["bob"]), "alice minted bob's key"
    assert find(actor="owner:alice", mentions=world.ids["carol_revoked"]), "alice revoked carol's key"
    assert not any(k in json.dumps(records) for k in world.secrets), "no key in the audit trail"

    mine = audit(s, world.keys["alice"])
    assert mine and {r["actor"] for r in mine} == {"owner:alice"}, {r["actor"] for r in mine}
    assert [r["seq"] for r in mine] == [r["seq"] for r in records if r["actor"] == "owner:alice"]
    assert {r["actor"] for r in audit(s, world.keys["dora"])} == {"owner:dora"}
    assert len(audit(s, ADMIN_TOKEN, "?limit=2")) == 2

    done = s.cli("ledger", "verify")
    assert done.returncode == 0, done.stdout + done.stderr
    assert "audit" in done.stdout.lower(), done.stdout
    report = ok(httpx.get(f"{s.url}/admin/ledger/verify", headers={"Authorization": f"Bearer {ADMIN_TOKEN}"},
                          timeout=120))
    assert report["ok"] is True and "audit" in json.dumps(report["report"]), report


# ---------------------------------------------------------------------------------------------
# (g) secrets


def test_no_key_is_written_down_in_clear(world):
    s = world.s
    secrets = [k for k in world.secrets]
    secrets += [k.split("_")[2] for k in world.secrets if KEY_RE.fullmatch(k)]  # the secret halves too
    assert len(world.secrets) >= 12, world.secrets
    log = s.logs()
    assert log, "the server logs something"
    leaked = [k[:12] + "..." for k in secrets if k in log]
    assert not leaked, f"in the server's log: {leaked}"
    files = [p for p in (s.dir / "data").rglob("*") if p.is_file()]
    assert any(p.name.startswith("ledger.sqlite3") for p in files), files
    for p in files:
        data = p.read_bytes()
        leaked = [k[:12] + "..." for k in secrets if k.encode() in data]
        assert not leaked, f"{p.relative_to(s.dir)}: {leaked}"
    for args in [("keys", "list"), ("keys", "list", "--json")]:
        done = s.cli(*args)
        assert done.returncode == 0, done.stdout + done.stderr
        leaked = [k[:12] + "..." for k in secrets if k in done.stdout + done.stderr]
        assert not leaked, f"`openlora {' '.join(args)}`: {leaked}"
        for role in ["alice", "dora", "bob", "initech"]:
            assert world.ids[role] in done.stdout, (role, done.stdout)
    listed = {k["id"]: k for k in cli_json(s.cli("keys", "list", "--json"))}
    assert listed[world.ids["alice_revoked"]].get("revoked") in (True,) or listed[world.ids["alice_revoked"]].get(
        "revoked_at_ms"), listed[world.ids["alice_revoked"]]


# ---------------------------------------------------------------------------------------------
# (f, last: it stops the server) a tampered audit record is found


def test_a_tampered_audit_record_fails_verification(world):
    s = world.s
    assert s.stop() == 0, s.logs()[-3000:]
    good = s.cli("ledger", "verify")
    assert good.returncode == 0 and "audit" in good.stdout.lower(), good.stdout + good.stderr

    db = sqlite3.connect(s.dir / "data" / "ledger.sqlite3")
    tables = [t for (t,) in db.execute("SELECT name FROM sqlite_master WHERE type = 'table'")]
    table = "audit_log" if "audit_log" in tables else next(t for t in tables if "audit" in t and "head" not in t)
    columns = [c[1] for c in db.execute(f"PRAGMA table_info({table})")]
    assert "seq" in columns and "target" in columns, columns
    seqs = [q for (q,) in db.execute(f"SELECT seq FROM {table} ORDER BY seq")]
    victim = seqs[len(seqs) // 2]
    (target,) = db.execute(f"SELECT target FROM {table} WHERE seq = ?", (victim,)).fetchone()
    db.execute(f"UPDATE {table} SET target = ? WHERE seq = ?", (f"{target}-edited", victim))
    db.commit()
    db.close()

    bad = s.cli("ledger", "verify")
    out = bad.stdout + bad.stderr
    assert bad.returncode != 0, out
    assert "audit" in out.lower() and re.search(rf"\b{victim}\b", out), f"names audit record {victim}: {out}"
    report = s.cli("ledger", "verify", "--json")
    assert report.returncode != 0 and "audit" in report.stdout, report.stdout
    try:
        s.start()
    except RuntimeError as e:  # refusing to start on a broken audit trail is fine too, if it says so
        assert "audit" in str(e).lower(), str(e)[-2000:]
        return
    answer = httpx.get(f"{s.url}/admin/ledger/verify", headers={"Authorization": f"Bearer {ADMIN_TOKEN}"},
                       timeout=120).json()
    assert answer["ok"] is False and "audit" in json.dumps(answer), answer
