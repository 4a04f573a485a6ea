"""Every model family openlora runs, served: `openlora serve` on each family's fixture (Qwen2,
Qwen3, windowed Mistral, Gemma 3, next to the Llama fixtures the other tests use) answers the `openai`
client — completions on the base and on each of the family's PEFT adapters, in one concurrent
mix, and chat through the family's own template — on the CPU backend and on the GPU backend
(`--device cuda:0`: the CUDA stand-in in the test command, a GPU where there is one)."""

import json
from concurrent.futures import ThreadPoolExecutor

import openai
import pytest
from conftest import ADMIN_TOKEN, API_KEY, FIXTURES, Server, gpu_server

FAMILIES = ["qwen2-f32", "qwen3-bf16", "mistral-window8-f32", "gemma3-bf16"]


@pytest.fixture(scope="module", params=[(f, d) for d in ["cpu", "cuda:0"] for f in FAMILIES],
                ids=lambda p: f"{p[0]}-{p[1]}")
def family(request):
    name, device = request.param
    adapters_dir = FIXTURES / "adapters" / name
    adapters = json.loads((adapters_dir / "mixed_reference.json").read_text())["rows"]
    names = sorted({a for a in adapters if a != "__base__"})
    listed = "\n".join(f'"{a}" = "{adapters_dir / a}"' for a in names)
    config = f"""
model = "{FIXTURES / "models" / name}"
model_name = "base"
admin_token = "{ADMIN_TOKEN}"

[adapters]
{listed}

[api_keys]
"{API_KEY}" = "acme"
"""
    s = Server(config=config) if device == "cpu" else gpu_server(config=config)
    yield name, names, s
    assert s.stop() == 0, s.logs()


def test_completions_on_the_base_and_every_adapter_at_once(family):
    name, adapters, s = family
    client = openai.OpenAI(base_url=f"{s.url}/v1", api_key=API_KEY, max_retries=0)
    served = {m.id for m in client.models.list().data}
    assert {"base", *adapters} <= served, served
    models = ["base", *adapters] * 3
    with ThreadPoolExecutor(len(models)) as pool:
        done = list(pool.map(lambda m: client.completions.create(
            model=m, prompt="Never put off till tomorrow", max_tokens=12, temperature=0), models))
    for model, r in zip(models, done):
        assert r.model == model and r.usage.completion_tokens > 0, (name, model, r)
        assert sum(x["amount"] for x in r.model_extra["billing"]["splits"]) == r.model_extra["billing"]["charge"]["amount"]
    # The same request gives the same tokens whatever else ran beside it.
    by_model = {}
    for model, r in zip(models, done):
        by_model.setdefault(model, set()).add(r.choices[0].text)
    assert all(len(texts) == 1 for texts in by_model.values()), by_model


def test_the_window_and_the_adapters_change_what_is_generated(family):
    """Greedy parity with transformers is the Rust tests' (tests/parity.rs, tests/adapters.rs);
    here, through the server: a prompt longer than Mistral's window, and each adapter's effect."""
    name, adapters, s = family
    prompts = json.loads((FIXTURES / "models" / name / "reference.json").read_text())["prompts"]
    client = openai.OpenAI(base_url=f"{s.url}/v1", api_key=API_KEY, max_retries=0)
    longest = max(prompts, key=len)
    texts = {m: client.completions.create(model=m, prompt=longest, max_tokens=16, temperature=0,
                                          extra_body={"ignore_eos": True})
             for m in ["base", *adapters]}
    assert all(r.usage.completion_tokens == 16 and r.usage.prompt_tokens > 8 for r in texts.values()), texts
    base = texts["base"].choices[0].text
    assert any(r.choices[0].text != base for m, r in texts.items() if m != "base"), "adapters change the output"


def test_chat_through_the_familys_template(family):
    name, adapters, s = family
    client = openai.OpenAI(base_url=f"{s.url}/v1", api_key=API_KEY, max_retries=0)
    for model in ["base", adapters[0]]:
        r = client.chat.completions.create(
            model=model, max_tokens=8, temperature=0,
            messages=[{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Say hello"},
                      {"role": "assistant", "content": "Hello"}, {"role": "user", "content": "Again"}])
        assert r.choices[0].message.role == "assistant" and r.usage.prompt_tokens > 8, (name, r)
