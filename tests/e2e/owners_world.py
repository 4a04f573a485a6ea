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
  Rows with amount 0 may be listed or not. `requests` of a `by=adapter` or `by=day` row counts
  requests (an entry paying three payees is one request); a `since`/`until` that is not a whole
  UTC day bounds at that moment, as `/v1/usage` does (the running totals serve whole days only).
- An owner's `GET /admin/keys` lists, and its `DELETE /admin/keys/{id}` reaches, only the
  contributor keys it minted: not its own owner keys, and not the keys of a tenant that happens
  to share its name (tenants and owners are different parties).
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
        for owner, name, src in [("alice", "a-model", "r4-qv"), ("dora", "d-model", "r8-mlp")]:
            w.uploads[name] = ok(call(s, "PUT", f"/admin/adapters/{name}", w.keys[owner], **tar_upload(src)), 201)
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

