"""Our hostile plugin corpus (tests/plugins/hostile) against the running server. For every
mode: the call is contained within the deadline + 20 ms (the deadline counts CPU time; best of
three, its request measured beside a well behaved one), the response stays small, the built-in
answers when the plugin's answer is not valid; meanwhile other requests keep being served (their
latency measured with and without the flood), the server's memory stays bounded, its log holds
no forged line, and afterwards the ledger verifies, replaying every entry."""

import re
import statistics
import threading
import time

import httpx
from conftest import ADMIN_TOKEN, API_KEY, Server, plugin_wasm

ADMIN = {"Authorization": f"Bearer {ADMIN_TOKEN}"}
AUTH = {"Authorization": f"Bearer {API_KEY}"}
DEADLINE_MS = 100
# The plugin answers, within its limits: its answer stands.
DECIDES = ["ok", "sleep", "sleep-forever", "timing", "poll-count", "entropy", "log-spam", "forge-log"]
# The plugin fails (fuel, deadline, memory, stack, output, hostcall bytes, trap, invalid splits,
# declined): the built-in answers and the failure is recorded.
FAILS = ["loop", "memory", "recursion", "output", "huge-result", "off-by-one", "overflow", "panic",
         "huge-error", "random-flood", "error", "huge-payees"]


def complete(server, mode=None):
    body = {"model": "base", "prompt": "Hi", "max_tokens": 1}
    if mode:
        body["metadata"] = {"hostile-mode": mode}
    start = time.perf_counter()
    r = httpx.post(f"{server.url}/v1/completions", json=body, headers=AUTH, timeout=60)
    return r, (time.perf_counter() - start) * 1000


def rss_mib(server) -> float:
    status = open(f"/proc/{server.proc.pid}/status").read()
    return int(re.search(r"VmRSS:\s+(\d+) kB", status).group(1)) / 1024


def best_ms(server, n=9) -> float:
    return min(complete(server)[1] for _ in range(n))


def upload(server, config):
    files = {"plugin": ("hostile.wasm", plugin_wasm("openlora-test-hostile"), "application/wasm")}
    start = time.perf_counter()
    r = httpx.post(f"{server.url}/admin/plugins/attributor", files=files, data={"config": config},
                   headers=ADMIN, timeout=60)
    return r, (time.perf_counter() - start) * 1000


def test_the_hostile_corpus_is_contained_and_others_are_served():
    s = Server(extra=f"[policy]\ndeadline_ms = {DEADLINE_MS}\nquarantine_after = 1000000\n"
                     "quarantine_rate_percent = 0\n")
    try:
        ok, _ = upload(s, '{"mode": "ok"}')
        assert ok.status_code == 201, ok.text
        # A configure that sleeps answers at once (virtual time); one that never returns is
        # refused at its deadline; neither holds up the server. (Best of three: a stall of this
        # shared machine may slow one upload, though it cannot fail one, the deadline counting
        # the plugin's CPU time.)
        for _ in range(3):
            upload(s, '{"mode": "ok"}')
        _, plain = min((upload(s, '{"mode": "ok"}') for _ in range(3)), key=lambda x: x[1])
        slept = [upload(s, '{"mode": "configure-sleep"}') for _ in range(3)]
        assert all(r.status_code == 201 for r, _ in slept), [r.text for r, _ in slept]
        slept_ms = min(ms for _, ms in slept)
        assert slept_ms < plain + 20 + DEADLINE_MS, (slept_ms, plain)
        looped, looped_ms = min((upload(s, '{"mode": "configure-loop"}') for _ in range(3)), key=lambda x: x[1])
        assert looped.status_code == 400 and "deadline" in looped.json()["error"]["message"], looped.text
        # The deadline is CPU time: a busy machine stretches it in wall time (never past ten).
        assert looped_ms <= plain + 2 * DEADLINE_MS + 20, (looped_ms, plain)
        assert upload(s, '{"mode": "ok"}')[0].status_code == 201

        baseline = best_ms(s)
        rss_before = rss_mib(s)
        worst = {}
        for mode in DECIDES + FAILS:
            trials = []
            for _ in range(3):
                r, ms = complete(s, mode)
                assert r.status_code == 200, (mode, r.text)
                assert len(r.content) < 16 << 10, (mode, len(r.content))
                attributor = r.json()["billing"]["decided_by"][2]
                if mode in FAILS:
                    assert attributor["plugin"].startswith("builtin:") and attributor["failure"], (mode, attributor)
                else:
                    assert attributor["plugin"].startswith("sha256:") and not attributor["failure"], (mode, attributor)
                trials.append(ms)
            worst[mode] = min(trials) - baseline
        print(f"\nbaseline {baseline:.1f} ms; extra time per mode (best of 3): "
              + ", ".join(f"{m} {v:+.1f}" for m, v in worst.items()))
        over = {m: round(v, 1) for m, v in worst.items() if v > DEADLINE_MS + 20}
        assert not over, f"contained within the deadline + 20 ms: {over}"

        # A flood of the worst modes from two clients while a third measures ordinary requests.
        stop, flood_errors = threading.Event(), []

        def flood(modes):
            i = 0
            while not stop.is_set():
                r, _ = complete(s, modes[i % len(modes)])
                if r.status_code != 200:
                    flood_errors.append(r.text)
                i += 1

        threads = [threading.Thread(target=flood, args=(m,)) for m in
                   (["loop", "sleep-forever", "huge-payees"], ["memory", "random-flood", "huge-error"])]
        for t in threads:
            t.start()
        time.sleep(0.5)
        during = [complete(s)[1] for _ in range(15)]
        rss_during = rss_mib(s)
        stop.set()
        for t in threads:
            t.join()
        assert not flood_errors, flood_errors[:2]
        p50 = statistics.median(during)
        print(f"others: p50 {baseline:.1f} ms alone, {p50:.1f} ms during the flood (max {max(during):.1f}); "
              f"RSS {rss_before:.0f} -> {rss_during:.0f} MiB")
        assert max(during) < 2000 and p50 < 4 * baseline + DEADLINE_MS, (baseline, during)
        assert rss_during - rss_before < 256, (rss_before, rss_during)
        assert httpx.get(f"{s.url}/health", timeout=5).status_code == 200

        report = httpx.get(f"{s.url}/admin/ledger/verify", headers=ADMIN, timeout=300).json()
        assert report["ok"], report
        assert report["report"]["replayed"] >= 3 * len(DECIDES + FAILS), report
        logs = s.logs()
        assert "\x1b" not in logs, "terminal escapes reached the log"
        assert not any(line.startswith("2026-12-02T00:00:00.000000Z") for line in logs.splitlines())
        assert "FORGED server line" in logs, "the line is logged, escaped"
    finally:
        assert s.stop() == 0, s.logs()[-3000:]
