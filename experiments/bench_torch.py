"""The PyTorch baseline our CPU figures are held to: transformers' DeepseekV3 at a preset's
shape, timed like ``bench_train`` and ``bench_generate``.

    python3.11 -m venv /tmp/hfvenv
    /tmp/hfvenv/bin/pip install torch==2.13.0 transformers safetensors numpy
    PYTHONPATH=. /tmp/hfvenv/bin/python -m experiments.bench_torch [--preset bench-small]

Runs in the torch virtualenv that makes the test fixtures (never in the project's venv,
and no test imports it). The model comes from our preset through
``ModelConfig.to_hf_dict`` (random weights, float32). Train: forward, backward and AdamW
on random tokens, batch x seq-len as ``bench_train`` (transformers' model has no MTP
module, so it does ~22 % less work per token than ours at bench-small). Generation:
batch 1, greedy, KV cache, prompt and new-token counts as ``bench_generate``; prefill =
prompt tokens / time to the first new token, decode = the other new tokens / their time.
Last line: JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time


def build(preset: str, overrides: list[str]):
    import torch
    import transformers

    from deepseek_jax.presets import get_preset

    cfg = get_preset(preset, ["dtype=float32", *overrides])
    hf = cfg.to_hf_dict()
    config = transformers.DeepseekV3Config(**hf)
    torch.manual_seed(0)
    model = transformers.DeepseekV3ForCausalLM(config).float()
    return cfg, model


def train_tokens_per_s(model, vocab: int, batch: int, seq: int, steps: int) -> float:
    import torch

    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    model.train()
    gen = torch.Generator().manual_seed(0)
    times = []
    for i in range(steps + 2):
        ids = torch.randint(0, vocab, (batch, seq + 1), generator=gen)
        t0 = time.perf_counter()
        loss = model(input_ids=ids[:, :-1], labels=ids[:, 1:]).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        if i >= 2:  # two warm-up steps
            times.append(time.perf_counter() - t0)
    return batch * seq / statistics.median(times)


def generation_rates(model, vocab: int, prompt_len: int, new: int, repeats: int):
    import torch

    model.eval()
    ids = torch.randint(0, vocab, (1, prompt_len), generator=torch.Generator().manual_seed(1))
    kw = dict(do_sample=False, use_cache=True, pad_token_id=0, eos_token_id=None)
    pre, dec = [], []
    with torch.no_grad():
        model.generate(ids, max_new_tokens=2, min_new_tokens=2, **kw)  # warm-up
        for _ in range(repeats):
            t0 = time.perf_counter()
            model.generate(ids, max_new_tokens=1, min_new_tokens=1, **kw)
            t_first = time.perf_counter() - t0
            t0 = time.perf_counter()
            model.generate(ids, max_new_tokens=new, min_new_tokens=new, **kw)
            t_all = time.perf_counter() - t0
            pre.append(prompt_len / t_first)
            dec.append((new - 1) / max(t_all - t_first, 1e-9))
    return statistics.median(pre), statistics.median(dec)


def main(argv: list[str] | None = None) -> dict:
    import torch
    import transformers

    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--preset", default="bench-small")
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--seq-len", type=int, default=512)
    ap.add_argument("--steps", type=int, default=6)
    ap.add_argument("--prompt-len", type=int, default=128)
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("overrides", nargs="*", help="model config overrides key=value")
    args = ap.parse_args(argv)
    torch.set_num_threads(os.cpu_count() or 1)
    cfg, model = build(args.preset, args.overrides)
    train = train_tokens_per_s(model, cfg.vocab_size, args.batch_size, args.seq_len, args.steps)
    prefill, decode = generation_rates(
        model, cfg.vocab_size, args.prompt_len, args.new_tokens, args.repeats
    )
    cpu = next(
        (
            ln.split(":", 1)[1].strip()
            for ln in open("/proc/cpuinfo")
            if ln.startswith("model name")
        ),
        platform.processor(),
    )
    print(
        f"transformers {transformers.__version__}, torch {torch.__version__} "
        f"({torch.backends.cpu.get_cpu_capability()}), {torch.get_num_threads()} threads, {cpu}"
    )
    print(f"  train tokens/s ({args.batch_size} x {args.seq_len}, AdamW): {train:,.0f}")
    print(f"  prefill tokens/s (batch 1, prompt {args.prompt_len}): {prefill:,.0f}")
    print(f"  decode tokens/s (batch 1, {args.new_tokens} new): {decode:,.1f}")
    out = {
        "preset": args.preset,
        "train_tokens_per_s": round(train, 1),
        "prefill_tokens_per_s": round(prefill, 1),
        "decode_tokens_per_s": round(decode, 1),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "torch_cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "cpu": cpu,
    }
    print(json.dumps(out))
    return out


if __name__ == "__main__":
    main()
