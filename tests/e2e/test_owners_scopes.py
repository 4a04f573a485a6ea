"""Third parties, (a): every caller on every route it must not reach is refused, and nothing it
sends changes anything (see owners_world.py for the world and docs/THIRD-PARTIES.md for the rules)."""

from owners_world import *  # noqa: F401,F403 (the shared world and its helpers)

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
        add_all(me, key, [("DELETE", f"/admin/keys/{w.ids[them]}", {}),
                          ("DELETE", f"/admin/keys/{w.ids['initech']}", {}),
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
    # Key revocations last: one that crosses would make the keys it revoked refuse the rest.
    # (an owner's last of all: the keys it could revoke are other callers').
    return sorted(attempts, key=lambda a: (a[2] == "DELETE" and a[3].startswith("/admin/keys/"), a[0] in owners))


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


