#!/usr/bin/env python3
"""Bounded load run on loopback: N concurrent streaming clients for T seconds against a
fresh `openlora serve` (embedded model and demo adapters). Reports throughput, statuses,
streams that ended without `[DONE]`, and the server's resident memory over time.

Not part of the test command (it is a benchmark). Usage, after `cargo build --release`:
    target/e2e-venv/bin/python tests/e2e/load.py [--clients 200] [--seconds 60] [--bin target/release/openlora]
"""

import argparse
import asyncio
import json
import os
import random
import socket
import subprocess
import tempfile
import time
from collections import Counter

import httpx


def rss_mib(pid: int) -> float:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return 0.0


async def client(url: str, stop_at: float, stats: Counter, lat: list, rng: random.Random):
    models = ["openlora-tiny-fortunes", "startrek", "computers", "love"]
    async with httpx.AsyncClient(timeout=120) as http:
        while time.time() < stop_at:
            body = {"model": rng.choice(models), "prompt": "The meaning of life is", "max_tokens": 32,
                    "stream": True, "stream_options": {"include_usage": True}}
            t0 = time.time()
            done = False
            try:
                async with http.stream("POST", f"{url}/v1/completions", json=body) as r:
                    if r.status_code != 200:
                        stats[f"status_{r.status_code}"] += 1
                        await r.aread()
                        continue
                    async for line in r.aiter_lines():
                        if line == "data: [DONE]":
                            done = True
                        elif line.startswith("data: ") and '"choices":[]' in line:
                            stats["tokens"] += json.loads(line[6:])["usage"]["completion_tokens"]
                stats["ok" if done else "lost"] += 1
                lat.append(time.time() - t0)
            except httpx.HTTPError as e:
                stats[f"error_{type(e).__name__}"] += 1


async def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--clients", type=int, default=200)
    ap.add_argument("--seconds", type=float, default=60)
    ap.add_argument("--bin", default="target/release/openlora")
    args = ap.parse_args()
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    home = tempfile.mkdtemp(prefix="openlora-load-")
    proc = subprocess.Popen([args.bin, "serve", "--listen", f"127.0.0.1:{port}"], env={**os.environ, "OPENLORA_HOME": home},
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    for _ in range(600):
        try:
            if httpx.get(f"{url}/ready").status_code == 200:
                break
        except httpx.HTTPError:
            time.sleep(0.1)
    stats: Counter = Counter()
    lat: list = []
    mem = []
    stop_at = time.time() + args.seconds
    tasks = [asyncio.create_task(client(url, stop_at, stats, lat, random.Random(i))) for i in range(args.clients)]
    start = time.time()
    while time.time() < stop_at:
        mem.append(round(rss_mib(proc.pid), 1))
        await asyncio.sleep(5)
    await asyncio.gather(*tasks)
    elapsed = time.time() - start
    mem.append(round(rss_mib(proc.pid), 1))
    metrics = httpx.get(f"{url}/metrics").text
    proc.terminate()
    proc.wait(timeout=60)
    lat.sort()
    pct = lambda p: round(lat[min(len(lat) - 1, int(p * len(lat)))], 3) if lat else None
    print(json.dumps({
        "clients": args.clients, "seconds": round(elapsed, 1), "statuses": dict(stats),
        "completed_per_s": round(stats["ok"] / elapsed, 1), "tokens_per_s": round(stats["tokens"] / elapsed, 1),
        "latency_s": {"p50": pct(0.5), "p99": pct(0.99)}, "server_rss_mib_every_5s": mem,
        "server_5xx": sum(v for k, v in stats.items() if k.startswith("status_5")),
        "engine_steps": next((float(l.split()[-1]) for l in metrics.splitlines()
                              if l.startswith("openlora_step_seconds_count")), None),
    }, indent=2))


if __name__ == "__main__":
    asyncio.run(main())
