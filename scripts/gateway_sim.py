#!/usr/bin/env python3
"""Many openlora replicas behind the inference gateway's endpoint picker: a discrete-event
simulation of adapter-cache hit rate and queueing delay for LoRA-affinity routing against random.

Pure Python 3.11 standard library; seeded and deterministic (the same parameters and seed give
the same JSON, byte for byte, on the same Python). The full-scale default, 100 replicas and
100,000 adapters, runs in about a minute on one core:

    python3 scripts/gateway_sim.py --json docs/perf/gateway-sim.json
    python3 scripts/gateway_sim.py --markdown docs/perf/gateway-sim.json   # the README's table

The model (every assumption; each default is a flag):

Workload
  * A adapters (`--adapters`, 100,000) ranked by popularity; a request asks for the adapter of
    rank k (k = 1..A) with probability proportional to 1/k^s (Zipf, `--zipf` s = 1.0).
  * Poisson arrivals at `--load` (0.8) times the cluster's nominal capacity, R * max_seqs / E[S]
    with E[S] the mean service time below (computed exactly, with the cap). Nominal capacity
    ignores adapter loads and the GPU-slot limit, so those costs show up as queueing.
  * `--requests` (600,000) requests; the first `--warmup` (200,000) warm the caches and are
    simulated but left out of every figure.
  * Every policy is fed the same trace (arrival times, adapters, output lengths), so the
    policies differ only in routing.

One replica (mirrors an `openlora serve` on one GPU)
  * Continuous batching as `--max-seqs` (64, openlora's `limits.max_running` default) parallel
    slots; a request holds a slot from admission to its last token. Decoding speed does not
    depend on how full the batch is.
  * Service time S = prefill + output tokens * time per output token: `--prefill-s` 0.05 s and
    `--tpot-s` 0.03 s (a 7B model in bf16 on one A100/H100-class GPU decoding up to 64
    sequences with mixed-adapter kernels); output tokens geometric with mean `--mean-output`
    128, capped at `--max-output` 1024. The prompt length is folded into the fixed prefill.
  * A FIFO waiting queue with vLLM's skip-ahead: when a slot frees, the first waiting request
    that can start does (see the GPU cache), so a request whose adapter cannot get a GPU slot
    does not block those behind it.
  * GPU adapter cache of `--gpu-slots` (53) adapters, LRU. A rank-16 adapter on all seven
    linear projections of a Llama-2-7B-shaped model is 40.0 M parameters, 80 MB in bf16; the
    `adapter_pool_bytes` of 4 GiB in deploy/kubernetes/base holds 53 of them. An adapter
    used by an admitted request is pinned (never evicted), so at most gpu_slots distinct
    adapters run at once; a request whose adapter is absent while every slot is pinned waits.
    This is also the `max_lora` the replica reports to the picker.
  * Host-memory (CPU) tier of `--cpu-slots` (400, 32 GB of host memory) adapters, LRU,
    inclusive: every adapter a request uses is touched there too. Beyond it, disk.
  * A request admitted with its adapter in the GPU cache is a GPU hit (also when the adapter's
    load, started for an earlier request, is still in flight: it waits for that load but
    starts none). Otherwise the adapter is loaded, `--cpu-load-s` 0.01 s from the CPU tier (80
    MB over PCIe at ~10-20 GB/s plus setup) or `--disk-load-s` 0.1 s from disk (80 MB from
    local NVMe, parsed and checked, plus the copy), evicting the least recently used unpinned
    GPU adapter. Loads on one replica are serial (one copy engine, one disk); the request
    holds its slot while it waits for its load and takes its first step when the load is done.
  * Queueing delay = arrival to first step: waiting for a slot (and for a free GPU slot) plus
    waiting for the adapter's load.

Routing (one endpoint picker, all replicas candidates, no filters)
  * `random`: uniform over the replicas.
  * `affinity`: the endpoint picker configured in
    deploy/kubernetes/overlays/inference-gateway/epp-config.yaml: lora-affinity-scorer
    (weight 3), queue-scorer (2), kv-cache-utilization-scorer (1), max-score-picker (highest
    weighted sum, ties broken uniformly at random). As the Gateway API Inference Extension
    defines them:
      lora affinity: 1.0 if the adapter is among the replica's running adapters
        (`vllm:lora_requests_info` running_lora_adapters: adapters of admitted requests), else
        0.8 if len(running) + len(waiting adapters) < max_lora, else 0.6 if the adapter is among
        the waiting adapters, else 0. An adapter resident on the GPU but idle is not reported,
        and scores like any other.
      queue: (maxQ - q) / (maxQ - minQ) over the candidates, q = `vllm:num_requests_waiting`;
        1.0 for all when every q is equal.
      KV-cache utilisation: 1 - usage, usage modelled as running / max_seqs.
  * `affinity-resident`: the same picker with a residency-aware LoRA-affinity scorer, reading
    the residency metric openlora publishes for the routers adopting it
    (`vllm:lora_adapter_loaded{level="gpu"}`): 1.0 if the adapter is on the replica's GPU
    (running or idle), else 0.8 if the GPU cache has a free slot, else 0.6 if the adapter is
    among the waiting adapters, else 0 (the scorer tests/e2e/test_replicas.py routes with).
  * `least-queue`: the same picker without the LoRA-affinity scorer (queue 2, KV 1): a
    load-only baseline that isolates what the affinity scorer adds.
  * The picker decides from the replicas' metrics as last scraped: each replica is scraped
    every `--scrape-s` (0.05 s, the endpoint picker's metrics refresh), on its own tick (the
    picker refreshes each endpoint on a timer of its own: replica j at j/R of the interval), and
    its own decisions since are not counted in. `--scrape-s 0` reads the live state instead, and so
    does a policy named with `+live` (`affinity+live`, `least-queue+live`): the same picker on
    fresh metrics, to show what the staleness costs.

Reported per policy (over the measured requests): GPU hit rate, CPU-tier hit rate, the rest
from disk; queueing delay p50/p90/p99 (nearest rank) and mean; mean replica utilisation (slot
busy time, loads included, over the window from the first measured arrival to the last
arrival, divided by replicas * max_seqs * window); throughput (completions in that window per
second); the request count.
"""

import argparse
import bisect
import hashlib
import heapq
import json
import math
import random
import sys
import time
import zlib
from collections import OrderedDict, deque

POLICIES = ("random", "affinity", "affinity-resident", "least-queue")

DEFAULTS = dict(
    replicas=100,
    adapters=100_000,
    zipf=1.0,
    load=0.8,
    requests=600_000,
    warmup=200_000,
    seed=1,
    max_seqs=64,
    gpu_slots=53,
    cpu_slots=400,
    cpu_load_s=0.01,
    disk_load_s=0.1,
    prefill_s=0.05,
    tpot_s=0.03,
    mean_output=128,
    max_output=1024,
    scrape_s=0.05,
    policies="random,affinity,affinity+live,affinity-resident,affinity-resident+live,least-queue,least-queue+live",
)


def mean_service_s(p: dict) -> float:
    """E[S] with output tokens geometric on 1, 2, ... (mean m), capped at c:
    E[min(G, c)] = sum_{k=0}^{c-1} P(G > k) = (1 - (1 - 1/m)^c) * m."""
    m, c = p["mean_output"], p["max_output"]
    tokens = (1 - (1 - 1 / m) ** c) * m if m > 1 else 1.0
    return p["prefill_s"] + tokens * p["tpot_s"]


def capacity_rps(p: dict) -> float:
    """The cluster's nominal capacity in requests per second: replicas * slots / E[S]."""
    return p["replicas"] * p["max_seqs"] / mean_service_s(p)


def make_trace(p: dict):
    """Arrival times, adapter ids (0 = most popular) and service times, one per request."""
    rng = random.Random(p["seed"])
    rate = p["load"] * capacity_rps(p)
    n, s = p["requests"], p["zipf"]
    t, arrivals = 0.0, []
    for _ in range(n):
        t += rng.expovariate(rate)
        arrivals.append(t)
    cum, total = [], 0.0
    for k in range(1, p["adapters"] + 1):
        total += k ** -s
        cum.append(total)
    hi = len(cum) - 1
    rand = rng.random
    adapters = [bisect.bisect(cum, rand() * total, 0, hi) for _ in range(n)]
    m, cap, prefill, tpot = p["mean_output"], p["max_output"], p["prefill_s"], p["tpot_s"]
    log_q = math.log(1 - 1 / m) if m > 1 else None
    service = []
    for _ in range(n):
        tokens = 1 if log_q is None else min(cap, 1 + int(math.log(1.0 - rand()) / log_q))
        service.append(prefill + tokens * tpot)
    return arrivals, adapters, service


def drop_one(counts: dict, key) -> None:
    """One fewer of `key` in `counts`, the key gone at none."""
    if counts[key] == 1:
        del counts[key]
    else:
        counts[key] -= 1


def simulate(p: dict, policy: str, trace) -> dict:
    """Runs `trace` through R replicas routed by `policy`; the figures over the measured requests."""
    arrivals, adapters, service = trace
    n, R, warm = len(arrivals), p["replicas"], p["warmup"]
    max_seqs, gpu_slots, cpu_slots = p["max_seqs"], p["gpu_slots"], p["cpu_slots"]
    cpu_load, disk_load, scrape = p["cpu_load_s"], p["disk_load_s"], p["scrape_s"]
    max_lora = gpu_slots
    rng = random.Random(p["seed"] * 1_000_003 + zlib.crc32(policy.encode()))
    policy, fresh = policy.removesuffix("+live"), policy.endswith("+live")
    if fresh:
        scrape = 0.0

    free = [max_seqs] * R
    waitq = [deque() for _ in range(R)]
    runc = [{} for _ in range(R)]   # adapter -> admitted requests using it (pinned on the GPU)
    waitc = [{} for _ in range(R)]  # adapter -> requests in the waiting queue
    gpu = [OrderedDict() for _ in range(R)]  # adapter -> time its load is done; LRU first
    cpu = [OrderedDict() for _ in range(R)]
    loader = [0.0] * R
    admit_t = [0.0] * n
    first_t = [0.0] * n
    end_t = [0.0] * n
    kind = bytearray(n)  # 0 GPU hit, 1 CPU tier, 2 disk
    heap = []
    push, pop = heapq.heappush, heapq.heappop

    def start(i, r, now):
        a = adapters[r]
        g, c = gpu[i], cpu[i]
        if a in g:
            g.move_to_end(a)
            ready = g[a]
            if a in c:
                c.move_to_end(a)
            else:
                c[a] = None
                if len(c) > cpu_slots:
                    c.popitem(last=False)
        else:
            if len(g) >= gpu_slots:
                pinned = runc[i]
                for victim in g:
                    if victim not in pinned:
                        break
                del g[victim]
            if a in c:
                c.move_to_end(a)
                load, kind[r] = cpu_load, 1
            else:
                c[a] = None
                if len(c) > cpu_slots:
                    c.popitem(last=False)
                load, kind[r] = disk_load, 2
            ready = max(now, loader[i]) + load
            loader[i] = ready
            g[a] = ready
        rc = runc[i]
        rc[a] = rc.get(a, 0) + 1
        free[i] -= 1
        first = ready if ready > now else now
        admit_t[r], first_t[r] = now, first
        end = first + service[r]
        end_t[r] = end
        push(heap, (end, r, i))

    def admit(i, now):
        q = waitq[i]
        while free[i] and q:
            rc, g = runc[i], gpu[i]
            if len(rc) < gpu_slots:
                r = q.popleft()
            else:  # every GPU slot pinned: the first request whose adapter is resident goes
                for k, r in enumerate(q):
                    if adapters[r] in g:
                        break
                else:
                    return
                del q[k]
            drop_one(waitc[i], adapters[r])
            start(i, r, now)

    def complete(until):
        while heap and heap[0][0] <= until:
            now, r, i = pop(heap)
            drop_one(runc[i], adapters[r])
            free[i] += 1
            admit(i, now)

    # The picker's view, per replica: its queue length and free slots (the queue + KV part of
    # the score), its running (or, residency-aware, GPU-resident) and waiting adapter sets, and
    # whether it has room for another adapter. Each replica's view is refreshed on its own tick.
    resident = policy == "affinity-resident"
    lora_w = 3.0 if policy in ("affinity", "affinity-resident") else 0.0
    kv = [1.0 - (max_seqs - f) / max_seqs for f in range(max_seqs + 1)]  # by free slots
    live = scrape <= 0
    active = gpu if resident else runc
    s_q, s_free = [0] * R, [max_seqs] * R
    s_run, s_wait, s_room = ((active, waitc) if live else ([set() for _ in range(R)], [set() for _ in range(R)])) + (
        [True] * R,)

    def room(j):
        return len(gpu[j]) < gpu_slots if resident else len(runc[j]) + len(waitc[j]) < max_lora

    def refresh(j):
        s_q[j], s_free[j] = len(waitq[j]), free[j]
        if lora_w:
            s_run[j], s_wait[j], s_room[j] = set(active[j]), set(waitc[j]), room(j)

    def base_scores(qs, fs):
        lo, hi = min(qs), max(qs)
        if hi == lo:
            return [2.0 + kv[f] for f in fs]
        span = hi - lo
        return [2.0 * ((hi - q) / span) + kv[f] for q, f in zip(qs, fs)]

    scored = policy in ("affinity", "affinity-resident", "least-queue")
    tick, tick_s = 0, scrape / R  # replica tick % R is scraped at tick * scrape / R
    w_run, w_room, w_wait = lora_w * 1.0, lora_w * 0.8, lora_w * 0.6
    randrange = rng.randrange
    for r in range(n):
        now = arrivals[r]
        if scored and not live:
            while tick * tick_s <= now:
                complete(tick * tick_s)
                refresh(tick % R)
                tick += 1
        complete(now)
        if not scored:
            i = randrange(R)
        else:
            if live:
                s_base = base_scores([len(q) for q in waitq], free)
                if lora_w:
                    s_room = [room(j) for j in range(R)]
            else:
                s_base = base_scores(s_q, s_free)
            if lora_w:
                a = adapters[r]
                scores = [b + (w_run if a in ru else w_room if ro else w_wait if a in wa else 0.0)
                          for b, ru, ro, wa in zip(s_base, s_run, s_room, s_wait)]
            else:
                scores = s_base
            best = max(scores)
            if scores.count(best) == 1:
                i = scores.index(best)
            else:
                ties = [j for j, x in enumerate(scores) if x == best]
                i = ties[randrange(len(ties))]
        a = adapters[r]
        waitq[i].append(r)
        wc = waitc[i]
        wc[a] = wc.get(a, 0) + 1
        admit(i, now)
    complete(math.inf)

    t0, t1 = arrivals[warm], arrivals[-1]
    delays = sorted(first_t[r] - arrivals[r] for r in range(warm, n))
    measured = n - warm
    busy = 0.0
    done = 0
    for r in range(n):
        b, e = admit_t[r], end_t[r]
        if e > t0 and b < t1:
            busy += min(e, t1) - max(b, t0)
        if t0 <= e <= t1:
            done += 1
    kinds = kind[warm:]

    def pct(q):
        return delays[max(0, math.ceil(q * measured) - 1)]

    return {
        "requests": measured,
        "gpu_hit_rate": round(kinds.count(0) / measured, 6),
        "cpu_hit_rate": round(kinds.count(1) / measured, 6),
        "disk_rate": round(kinds.count(2) / measured, 6),
        "queue_delay_s": {
            "p50": round(pct(0.50), 6),
            "p90": round(pct(0.90), 6),
            "p99": round(pct(0.99), 6),
            "mean": round(sum(delays) / measured, 6),
        },
        "utilisation": round(busy / (R * max_seqs * (t1 - t0)), 6),
        "throughput_rps": round(done / (t1 - t0), 3),
    }


def run(p: dict) -> dict:
    """Every policy of `p` on one trace: the report (parameters, derived figures, results)."""
    policies = [x for x in p["policies"].split(",") if x]
    for x in policies:
        if x not in POLICIES and not (x.endswith("+live") and x.removesuffix("+live") in POLICIES[1:]):
            raise SystemExit(f"unknown policy {x!r}: one of {', '.join(POLICIES)}, or one of the last "
                             "three with +live")
    if not 0 <= p["warmup"] < p["requests"] - 1:
        raise SystemExit("--warmup must be at least 0 and leave at least two measured requests")
    if p["gpu_slots"] < 1 or p["cpu_slots"] < 1 or p["max_seqs"] < 1:
        raise SystemExit("--gpu-slots, --cpu-slots and --max-seqs must be at least 1")
    started = time.perf_counter()
    trace = make_trace(p)
    print(f"trace: {p['requests']} requests in {time.perf_counter() - started:.1f} s", file=sys.stderr)
    results = {}
    for x in policies:
        t = time.perf_counter()
        results[x] = simulate(p, x, trace)
        print(f"{x}: {time.perf_counter() - t:.1f} s", file=sys.stderr)
    print(f"total wall time: {time.perf_counter() - started:.1f} s", file=sys.stderr)
    return {
        "model": "scripts/gateway_sim.py",
        "model_sha256": script_sha256(),
        "parameters": {k: p[k] for k in DEFAULTS},
        "derived": {
            "mean_service_s": round(mean_service_s(p), 6),
            "capacity_rps": round(capacity_rps(p), 3),
            "arrival_rps": round(p["load"] * capacity_rps(p), 3),
            "simulated_s": round(trace[0][-1], 3),
        },
        "results": results,
    }


def script_sha256() -> str:
    """This script's sha256: a report names the model that made it."""
    with open(__file__, "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()


def markdown(report: dict) -> str:
    """The README's table, from a saved report."""
    p = report["parameters"]
    lines = [
        f"| routing ({p['replicas']} replicas, {p['adapters']:,} adapters, Zipf s={p['zipf']}, "
        f"load {p['load']}) | GPU hit | CPU-tier hit | from disk | queueing p50 | p90 | p99 | mean "
        "| utilisation | throughput |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for name, r in report["results"].items():
        q = r["queue_delay_s"]
        lines.append(
            f"| {name} | {r['gpu_hit_rate'] * 100:.1f}% | {r['cpu_hit_rate'] * 100:.1f}% "
            f"| {r['disk_rate'] * 100:.1f}% | {q['p50'] * 1000:.1f} ms | {q['p90'] * 1000:.1f} ms "
            f"| {q['p99'] * 1000:.1f} ms | {q['mean'] * 1000:.1f} ms | {r['utilisation'] * 100:.1f}% "
            f"| {r['throughput_rps']:.0f} req/s |")
    return "\n".join(lines)


def main(argv=None):
    """The command line: run and print (or write) a report, or print a saved report's table."""
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    for key, value in DEFAULTS.items():
        ap.add_argument("--" + key.replace("_", "-"), type=type(value), default=value,
                        help=f"default {value}")
    ap.add_argument("--json", metavar="PATH", help="write the report (parameters and results) here")
    ap.add_argument("--markdown", metavar="REPORT",
                    help="print the markdown table of a saved JSON report and exit")
    args = ap.parse_args(argv)
    if args.markdown:
        with open(args.markdown) as f:
            print(markdown(json.load(f)))
        return
    p = {k: getattr(args, k) for k in DEFAULTS}
    report = run(p)
    text = json.dumps(report, indent=2, sort_keys=False) + "\n"
    if args.json:
        with open(args.json, "w") as f:
            f.write(text)
    else:
        sys.stdout.write(text)
    print(markdown(report), file=sys.stderr)


if __name__ == "__main__":
    main()
