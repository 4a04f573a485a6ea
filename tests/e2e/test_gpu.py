"""`openlora serve --device cuda:0` on the embedded model, driven by the `openai` client: the real
GPU backend, on the CUDA stand-in (tests/cuda-standin) in the test command, on a GPU when one is
there. `OPENLORA_CUDA_LIBS` names a folder of CUDA libraries to load first (the stand-in's);
`OPENLORA_REQUIRE_GPU=1` makes a missing device a failure instead of a skip."""

import json
import os
import subprocess
import tempfile
import threading

import httpx
import openai
import pytest
from conftest import ADMIN_TOKEN, BINARY, ROOT, Server, adapter_tar, gpu_env, gpu_server

DEMO = ROOT / "runtime" / "assets" / "default-model" / "adapters"
BASE = "openlora-tiny-fortunes"
MODELS = [BASE, "startrek", "computers", "love"]
STANDIN = bool(os.environ.get("OPENLORA_CUDA_LIBS"))


@pytest.fixture(scope="module")
def gpu():
    s = gpu_server(config=f'admin_token = "{ADMIN_TOKEN}"\n')
    yield s
    assert s.stop() == 0, s.logs()


@pytest.fixture(scope="module")
def client(gpu):
    return openai.OpenAI(base_url=f"{gpu.url}/v1", api_key="unused", max_retries=0)


def complete(client, model, prompt="The captain said", n=16, **kw):
    return client.completions.create(model=model, prompt=prompt, max_tokens=n, temperature=0, **kw)


def test_serves_on_the_gpu_backend(gpu):
    assert "cuda:0" in gpu.logs(), gpu.logs()[-2000:]
    assert gpu.metric("openlora_requests_total") >= 0


def test_completions_chat_and_stream(client):
    base = complete(client, BASE).choices[0].text
    assert base and complete(client, BASE).choices[0].text == base
    assert any(complete(client, m).choices[0].text != base for m in MODELS[1:])
    chat = client.chat.completions.create(model="love", messages=[{"role": "user", "content": "Tell me something"}],
                                          max_tokens=16, temperature=0)
    assert chat.choices[0].message.content and chat.usage.completion_tokens > 0
    whole = complete(client, "computers", "Unix is", 20)
    chunks = list(client.completions.create(model="computers", prompt="Unix is", max_tokens=20, temperature=0,
                                            stream=True, stream_options={"include_usage": True}))
    assert "".join(c.choices[0].text for c in chunks if c.choices) == whole.choices[0].text
    assert chunks[-1].usage.completion_tokens == whole.usage.completion_tokens


def test_logprobs_penalties_and_seeded_sampling(client):
    """Rows the host must see (log-probabilities, penalties, temperature) beside device argmax rows."""
    greedy = complete(client, "startrek", n=12)
    with_lp = complete(client, "startrek", n=12, logprobs=3)
    assert with_lp.choices[0].text == greedy.choices[0].text  # the same argmax, chosen on the host
    lp = with_lp.choices[0].logprobs
    assert len(lp.tokens) == with_lp.usage.completion_tokens and all(x <= 0 for x in lp.token_logprobs)
    assert all(len(t) <= 3 for t in lp.top_logprobs)
    penalised = complete(client, "startrek", n=12, frequency_penalty=2.0)
    assert penalised.usage.completion_tokens > 0

    def sampled(seed):
        return client.completions.create(model="love", prompt="A", max_tokens=16, temperature=1.0,
                                         seed=seed).choices[0].text

    assert sampled(5) == sampled(5)


def test_mixed_adapters_concurrently(client):
    prompts = [(MODELS[i % 4], f"Q: why {i}") for i in range(16)]
    alone = {p: complete(client, *p, n=24).choices[0].text for p in prompts}
    results, errors = {}, []

    def call(p):
        try:
            results[p] = complete(client, *p, n=24)
        except Exception as e:  # noqa: BLE001 - reported below
            errors.append(repr(e))

    threads = [threading.Thread(target=call, args=(p,)) for p in prompts]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
    for p, r in results.items():
        assert r.usage.completion_tokens > 0
        billing = r.model_extra["billing"]
        assert sum(s["amount"] for s in billing["splits"]) == billing["charge"]["amount"], billing
        if STANDIN:  # the stand-in's arithmetic does not depend on the batch; a GPU's may, slightly
            assert r.choices[0].text == alone[p], p


def test_an_adapter_uploaded_at_run_time_is_served(gpu, client):
    admin = {"Authorization": f"Bearer {ADMIN_TOKEN}"}
    r = httpx.post(f"{gpu.url}/admin/adapters/trek-copy", content=adapter_tar(DEMO / "startrek", "trek-copy"), headers=admin)
    assert r.status_code == 201, r.text
    got = complete(client, "trek-copy", n=24).choices[0].text
    assert got == complete(client, "startrek", n=24).choices[0].text


def test_the_ledger_verifies(gpu, client):
    complete(client, "love")
    out = gpu.cli("ledger", "verify")
    assert out.returncode == 0, out.stdout + out.stderr


def test_bench_parity_on_the_fixtures():
    """`openlora bench --parity-only`: logits against transformers within bf16 tolerance, the
    mixed-adapter batch against PEFT on prefill and decode, and the serving path on the CPU
    against the GPU (tokens, measured contributions within 3%)."""
    env = {**os.environ, **gpu_env(), "OPENLORA_HOME": tempfile.mkdtemp()}
    out = subprocess.run([str(BINARY), "bench", "--device", "cuda:0", "--parity-only", "--fixtures",
                          str(ROOT / "tests" / "fixtures")], capture_output=True, text=True, timeout=300, env=env)
    if out.returncode != 0 and "not available" in out.stderr and not os.environ.get("OPENLORA_REQUIRE_GPU"):
        pytest.skip("no CUDA device")
    assert out.returncode == 0, out.stderr[-3000:]
    report = json.loads(out.stdout)
    for name in ["gqa-llama3-f32", "tied-f16", "mqa-bf16-sharded", "qwen2-f32", "qwen3-bf16", "mistral-window8-f32",
                 "gemma3-bf16", "mixed_adapters_vs_peft", "mixed_adapters_vs_peft_qwen2", "mixed_adapters_vs_peft_qwen3",
                 "mixed_adapters_vs_peft_mistral", "mixed_adapters_vs_peft_gemma3"]:
        assert report["parity"][name]["pass"], report["parity"][name]
    assert report["serving_parity"]["pass"] and report["serving_parity"]["requests"] == 12, report["serving_parity"]
    assert "throughput" not in report
