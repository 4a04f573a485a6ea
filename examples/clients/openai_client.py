"""Calls a running `openlora serve` with the official `openai` Python client (pip install openai).

    python3 examples/clients/openai_client.py [--url http://127.0.0.1:8080] [--api-key KEY]
"""

import argparse
import json

import openai


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--url", default="http://127.0.0.1:8080")
    p.add_argument("--api-key", default="none")
    args = p.parse_args()
    client = openai.OpenAI(base_url=f"{args.url}/v1", api_key=args.api_key)

    print("models:", [m.id for m in client.models.list()])

    # `model` names an adapter; openlora serves it batched with every other adapter.
    r = client.completions.create(model="startrek", prompt="Captain", max_tokens=24, temperature=0)
    print("completion:", r.choices[0].text)
    print("usage:", r.usage)
    print("billing:", json.dumps(r.model_extra["billing"], indent=1))

    stream = client.chat.completions.create(
        model="love",
        messages=[{"role": "user", "content": "Tell me a fortune"}],
        max_tokens=24,
        stream=True,
        stream_options={"include_usage": True},
        metadata={"campaign": "docs"},
    )
    text = ""
    for chunk in stream:
        if chunk.choices and chunk.choices[0].delta.content:
            text += chunk.choices[0].delta.content
        if chunk.usage:
            print("streamed:", text)
            print("usage:", chunk.usage, "billing:", chunk.model_extra.get("billing", {}).get("charge"))


if __name__ == "__main__":
    main()
