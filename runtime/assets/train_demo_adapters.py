#!/usr/bin/env python3
"""Fine-tune the demo LoRA adapters shipped with the embedded default model.

Each adapter is a real PEFT LoRA folder trained on one slice of Debian's `fortunes` corpus,
so each visibly pulls the default model's output toward its topic. Written to
runtime/assets/default-model/adapters/<name>/. Run after train_default_model.py, from the
repository root, in the venv of tests/fixtures/requirements.txt:
    python runtime/assets/train_demo_adapters.py [--seconds 100]
"""

import argparse
import json
import random
from pathlib import Path

import torch
from peft import LoraConfig, get_peft_model
from tokenizers import Tokenizer
from transformers import LlamaForCausalLM

FORTUNE_DIR = Path("/usr/share/games/fortunes")
# name -> (fortune files, rank, lora_alpha, target modules)
DEMOS = {
    "startrek": (["startrek"], 8, 16, ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]),
    "computers": (["computers", "linux", "perl"], 16, 16, ["q_proj", "v_proj", "gate_proj", "up_proj", "down_proj"]),
    "love": (["love", "songs-poems"], 4, 8, ["q_proj", "k_proj", "v_proj", "o_proj"]),
}


def read(files: list[str]) -> list[str]:
    out = []
    for f in files:
        text = (FORTUNE_DIR / f).read_text(encoding="utf-8", errors="replace")
        out += [t.strip("\n%") for t in text.split("\n%\n") if 8 <= len(t) <= 1200]
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="runtime/assets/default-model")
    ap.add_argument("--seconds", type=float, default=100.0)
    args = ap.parse_args()
    import time

    model_dir = Path(args.model)
    tok = Tokenizer.from_file(str(model_dir / "tokenizer.json"))
    eos = tok.token_to_id("</s>")
    for name, (files, r, alpha, targets) in DEMOS.items():
        torch.manual_seed(0)
        random.seed(0)
        texts = read(files)
        stream = []
        for t in texts:
            stream += tok.encode(t).ids + [eos]
        data = torch.tensor(stream)
        base = LlamaForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
        cfg = LoraConfig(r=r, lora_alpha=alpha, target_modules=targets, lora_dropout=0.0, bias="none",
                         task_type="CAUSAL_LM")
        model = get_peft_model(base, cfg)
        opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=4e-3)
        model.train()
        start, step = time.time(), 0
        while time.time() - start < args.seconds:
            idx = torch.randint(0, len(data) - 97, (16,))
            x = torch.stack([data[i : i + 96] for i in idx])
            loss = model(input_ids=x, labels=x).loss
            opt.zero_grad()
            loss.backward()
            opt.step()
            step += 1
        out = model_dir / "adapters" / name
        model.save_pretrained(out)
        (out / "README.md").unlink(missing_ok=True)
        cfg_path = out / "adapter_config.json"
        c = json.loads(cfg_path.read_text())
        c["base_model_name_or_path"] = "openlora-tiny-fortunes"
        cfg_path.write_text(json.dumps(c, indent=2, sort_keys=True) + "\n")
        print(f"{name}: {len(stream)} tokens of {files}, {step} steps, loss {loss.item():.3f}", flush=True)


if __name__ == "__main__":
    main()
