#!/usr/bin/env python3
"""The Hugging Face transformers + PEFT side of `bench/compare.sh`.

Reads the model and adapter folders `openlora bench --device cpu --keep DIR` wrote (the very
same weights openlora served) and the openlora report, and serves the same work with
`model.generate(adapter_names=...)`, PEFT's mixed-adapter batching:

* fixed batches: the report's batch sizes, prompt and new-token counts, base and mixed (one
  adapter per row), greedy;
* the S-LoRA workload: the report's exact per-rate request sequence (arrival times, adapters,
  prompt and output lengths, rebuilt here from the same seed-free list the report carries),
  served as a static-batching server does it: whatever has arrived when the model is free runs
  as one `generate` batch (up to --max-batch), left-padded, each row with its own adapter.

Writes a JSON report in openlora's shape (`batches`, `workload`) for each dtype asked.
"""

import argparse
import json
import math
import time
from pathlib import Path

import torch
from peft import PeftModel
from transformers import AutoModelForCausalLM

DTYPES = {"f32": torch.float32, "bf16": torch.bfloat16, "f16": torch.float16}


def load(model_dir: Path, adapters: list[tuple[str, Path]], dtype):
    base = AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype)
    model = PeftModel.from_pretrained(base, adapters[0][1], adapter_name=adapters[0][0])
    for name, path in adapters[1:]:
        model.load_adapter(path, adapter_name=name)
    model.eval()
    return model


def prompt_ids(i: int, length: int, vocab: int, salt: int) -> list[int]:
    # The same token ids openlora's harness uses (serving.rs / cpu_bench.rs).
    return [((salt + i * 7919 + t * 104_729) % (vocab - 1) + 1) for t in range(length)]


@torch.inference_mode()
def generate(model, rows: list[list[int]], names: list[str], new_tokens: list[int]) -> None:
    width = max(len(r) for r in rows)
    ids = torch.tensor([[0] * (width - len(r)) + r for r in rows])
    mask = torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in rows])
    model.generate(input_ids=ids, attention_mask=mask, adapter_names=names, max_new_tokens=max(new_tokens),
                   min_new_tokens=max(new_tokens), do_sample=False, pad_token_id=0)


def fixed_batches(model, report: dict, vocab: int) -> dict:
    out = {}
    prompt, new = report["prompt"], report["new_tokens"]
    for b in report["batches"]:
        b = int(b)
        rows = [prompt_ids(i, prompt, vocab, 7) for i in range(b)]
        res = {}
        seconds = []
        for mode, names in [("base", ["__base__"] * b), ("mixed", [f"a{i}" for i in range(b)])]:
            generate(model, rows, names, [min(new, 4)] * b)  # warm-up
            # The best of three runs, as openlora bench reports its own.
            runs = []
            for _ in range(3):
                t = time.perf_counter()
                generate(model, rows, names, [new] * b)
                runs.append(time.perf_counter() - t)
            s = min(runs)
            seconds.append(s)
            res[mode] = {"tok_per_s": b * new / s, "seconds": s, "tokens": b * new}
        res["mixed_over_base"] = seconds[1] / seconds[0]
        out[str(b)] = res
    return out


def quantile(values: list[float], q: float) -> float:
    if not values:
        return 0.0
    v = sorted(values)
    return v[min(max(math.ceil(q * len(v)), 1), len(v)) - 1]


def workload(model, run: dict, vocab: int, max_batch: int) -> dict:
    # The report's per-request rows give each request's adapter; arrivals are rebuilt by the
    # report's own generator output, which it records in "arrivals".
    arrivals = run["arrivals"]
    start = time.perf_counter()
    pending = list(enumerate(arrivals))
    ttft, tpot, ends = {}, {}, {}
    tokens = 0
    while pending:
        now = time.perf_counter() - start
        ready = [p for p in pending if p[1]["at_s"] <= now][:max_batch]
        if not ready:
            time.sleep(max(0.0, pending[0][1]["at_s"] - now))
            continue
        pending = [p for p in pending if p not in ready]
        rows = [prompt_ids(i, a["prompt"], vocab, 11) for i, a in ready]
        names = [f"a{a['adapter']}" for _, a in ready]
        outs = [a["output"] for _, a in ready]
        t0 = time.perf_counter()
        generate(model, rows, names, outs)
        t1 = time.perf_counter() - start
        # A static batch returns every row at once: the first token is seen when it ends
        # (no streaming), and the step time is the batch's time over its longest output.
        per_token = (time.perf_counter() - t0) / max(outs)
        for (i, a), n in zip(ready, outs):
            ttft[i] = t1 - a["at_s"]
            tpot[i] = per_token
            ends[i] = t1
            tokens += n
    makespan = time.perf_counter() - start
    slo = run["slo"]
    met = sum(1 for i in ttft if ttft[i] <= slo["ttft_s"] and tpot[i] <= slo["tpot_s"])
    pct = lambda v: {"p50": quantile(v, 0.5), "p90": quantile(v, 0.9), "p99": quantile(v, 0.99)}
    return {"spec": run["spec"], "seconds": makespan, "requests": len(arrivals),
            "req_per_s": len(arrivals) / makespan, "tok_per_s": tokens / makespan,
            "ttft_s": pct(list(ttft.values())), "tpot_s": pct(list(tpot.values())),
            "slo": {**slo, "attainment": met / max(len(arrivals), 1)}}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--report", required=True, type=Path, help="openlora bench's JSON report")
    ap.add_argument("--data", required=True, type=Path, help="the folder given to openlora bench --keep")
    ap.add_argument("--dtype", action="append", choices=sorted(DTYPES), help="repeatable; default f32 and bf16")
    ap.add_argument("--max-batch", type=int, default=16, help="most requests in one generate batch")
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    ap.add_argument("--out", required=True, type=Path)
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    report = json.loads(args.report.read_text())
    n = max([int(b) for b in report["batches"]] + [r["spec"]["adapters"] for r in report["workload"]])
    adapters = [(f"a{i}", args.data / "adapters" / f"a{i}") for i in range(n)]
    vocab = report["model"]["vocab"]
    results = {"threads": torch.get_num_threads(), "torch": torch.__version__, "by_dtype": {}}
    for name in args.dtype or ["f32", "bf16"]:
        model = load(args.data / "model", adapters, DTYPES[name])
        results["by_dtype"][name] = {
            "batches": fixed_batches(model, report, vocab),
            "workload": [workload(model, run, vocab, args.max_batch) for run in report["workload"]],
        }
        del model
    args.out.write_text(json.dumps(results, indent=2))
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
