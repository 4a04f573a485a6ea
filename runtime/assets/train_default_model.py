#!/usr/bin/env python3
"""Train openlora's embedded default model: a tiny Llama on Debian's `fortunes` corpus.

The corpus is the BSD-licensed text of Debian's `fortunes` + `fortunes-min` packages
(`apt-get install fortunes fortunes-min`), read from /usr/share/games/fortunes.
Output is a normal Hugging Face folder (config.json, model.safetensors, tokenizer.json,
tokenizer_config.json, generation_config.json) written to runtime/assets/default-model/.

Usage (from the repository root, in a venv with tests/fixtures/requirements.txt):
    python runtime/assets/train_default_model.py [--minutes 20] [--out runtime/assets/default-model]
"""

import argparse
import json
import math
import os
import random
import time
from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import LlamaConfig, LlamaForCausalLM

FORTUNE_DIR = Path("/usr/share/games/fortunes")
VOCAB = 1024
BOS, EOS, PAD = "<s>", "</s>", "<pad>"
CHAT_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}"
    "{% if message['role'] == 'system' %}{{ message['content'] }}\n"
    "{% elif message['role'] == 'user' %}Q: {{ message['content'] }}\n"
    "{% else %}A: {{ message['content'] }}{{ eos_token }}\n{% endif %}"
    "{% endfor %}{% if add_generation_prompt %}A:{% endif %}"
)


def read_fortunes(root: Path) -> list[tuple[str, str]]:
    """Every fortune as (file name, text), skipping index files and symlinks."""
    out = []
    for path in sorted(root.iterdir()):
        if path.is_symlink() or path.suffix == ".dat" or not path.is_file():
            continue
        text = path.read_text(encoding="utf-8", errors="replace")
        for item in text.split("\n%\n"):
            item = item.strip("\n%")
            if 8 <= len(item) <= 1200:
                out.append((path.name, item))
    return out


def train_tokenizer(texts: list[str]) -> Tokenizer:
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB,
        special_tokens=[BOS, EOS, PAD],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    bos = tok.token_to_id(BOS)
    tok.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A", pair=f"{BOS} $A {BOS} $B", special_tokens=[(BOS, bos)]
    )
    return tok


def write_tokenizer_files(tok: Tokenizer, out: Path) -> None:
    tok.save(str(out / "tokenizer.json"))
    cfg = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": BOS,
        "eos_token": EOS,
        "pad_token": PAD,
        "add_bos_token": True,
        "add_eos_token": False,
        "model_max_length": 256,
        "clean_up_tokenization_spaces": False,
        "chat_template": CHAT_TEMPLATE,
    }
    (out / "tokenizer_config.json").write_text(json.dumps(cfg, indent=2) + "\n")


def model_config(tok: Tokenizer) -> LlamaConfig:
    return LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=128,
        intermediate_size=352,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        rms_norm_eps=1e-5,
        rope_theta=10000.0,
        tie_word_embeddings=True,
        bos_token_id=tok.token_to_id(BOS),
        eos_token_id=tok.token_to_id(EOS),
        pad_token_id=tok.token_to_id(PAD),
    )


def save(model, cfg, out: Path, step: int, loss: float, minutes: float, n_params: int) -> None:
    """Write the model folder (bf16 weights); called periodically and at the end."""
    import copy

    frozen = copy.deepcopy(model).eval().to(torch.bfloat16)
    frozen.save_pretrained(out, safe_serialization=True)
    gen = {"bos_token_id": cfg.bos_token_id, "eos_token_id": cfg.eos_token_id,
           "pad_token_id": cfg.pad_token_id, "do_sample": True, "temperature": 0.7,
           "top_p": 0.9, "repetition_penalty": 1.1, "max_new_tokens": 64}
    (out / "generation_config.json").write_text(json.dumps(gen, indent=2) + "\n")
    (out / "TRAINING.md").write_text(
        f"Tiny Llama ({n_params / 1e6:.2f} M parameters, stored in bf16) trained from scratch by "
        f"runtime/assets/train_default_model.py for {step} steps ({minutes} min on 2 CPU cores) "
        f"on Debian's BSD-licensed `fortunes` corpus; training loss at the end {loss:.3f}.\n"
    )


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="runtime/assets/default-model")
    ap.add_argument("--minutes", type=float, default=20.0)
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--batch", type=int, default=16)
    args = ap.parse_args()
    torch.manual_seed(0)
    random.seed(0)
    torch.set_num_threads(os.cpu_count() or 2)

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    items = read_fortunes(FORTUNE_DIR)
    texts = [t for _, t in items]
    print(f"corpus: {len(texts)} fortunes, {sum(map(len, texts)) / 1e6:.2f} M chars")
    tok = train_tokenizer(texts)
    write_tokenizer_files(tok, out)

    eos = tok.token_to_id(EOS)
    stream: list[int] = []
    order = list(range(len(texts)))
    random.shuffle(order)
    for i in order:
        stream.extend(tok.encode(texts[i]).ids + [eos])
    data = torch.tensor(stream, dtype=torch.long)
    print(f"tokens: {len(stream) / 1e6:.2f} M")

    cfg = model_config(tok)
    model = LlamaForCausalLM(cfg)
    n_params = sum(p.numel() for p in model.parameters())
    print(f"params: {n_params / 1e6:.2f} M")
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.05, betas=(0.9, 0.98))
    budget = args.minutes * 60
    start = time.time()
    step = 0
    last_save = 0.0
    model.train()
    while True:
        elapsed = time.time() - start
        if elapsed > budget:
            break
        frac = elapsed / budget
        lr = 3e-3 * min(1.0, (step + 1) / 100) * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * frac)))
        for g in opt.param_groups:
            g["lr"] = lr
        idx = torch.randint(0, len(data) - args.seq - 1, (args.batch,))
        x = torch.stack([data[i : i + args.seq] for i in idx])
        loss = model(input_ids=x, labels=x).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        if step % 20 == 0:
            print(f"step {step} t={elapsed:.0f}s loss={loss.item():.3f} lr={lr:.2e}", flush=True)
        if time.time() - last_save > 120:
            save(model, cfg, out, step, loss.item(), args.minutes, n_params)
            last_save = time.time()
        step += 1

    save(model, cfg, out, step, loss.item(), args.minutes, n_params)
    with torch.no_grad():
        ids = torch.tensor([tok.encode("The computer").ids])
        sample = model.eval().generate(ids, max_new_tokens=40, do_sample=False)
    print("greedy sample:", tok.decode(sample[0].tolist()))


if __name__ == "__main__":
    main()
