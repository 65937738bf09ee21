"""Generate text: ``python -m experiments.generate``.

    python -m experiments.generate --hf DIR --prompt "The capital of France is"
    python -m experiments.generate --checkpoint runs/default --prompt "def " --temperature 0.8
    python -m experiments.generate --preset bench-small --prompt-ids 1,2,3 --max-new-tokens 64

The model comes from a Hugging Face directory (``--hf``; FP8 weights are dequantised), a
training run (``--checkpoint``, its latest step) or random weights (``--preset``). Text is
encoded with ``--tokenizer`` (a ``tokenizer.json``), else the HF directory's
``tokenizer.json``, else UTF-8 bytes when the vocabulary has 256 ids or more. A jitted
prefill and a jitted decode program run over the MLA latent cache; the script prints the
text, the token ids, prefill and decode tokens/s (compilation excluded, reported apart) and
the cache bytes per token.
"""

from __future__ import annotations

import argparse
import os
import sys


def add_model_source(ap: argparse.ArgumentParser) -> None:
    """--hf | --checkpoint | --preset: where ``load_model`` takes the model from."""
    from deepseek_jax.presets import PRESETS

    src = ap.add_mutually_exclusive_group(required=True)
    src.add_argument("--hf", metavar="DIR", help="Hugging Face DeepseekV3/V2 directory")
    src.add_argument("--checkpoint", metavar="RUN_DIR", help="a run of experiments.train")
    src.add_argument("--preset", choices=sorted(PRESETS), help="random weights of a preset")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(
        prog="python -m experiments.generate",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_model_source(ap)
    prompt = ap.add_mutually_exclusive_group(required=True)
    prompt.add_argument("--prompt", help="prompt text")
    prompt.add_argument("--prompt-ids", help="prompt token ids, comma separated")
    ap.add_argument("--tokenizer", default=None, help="tokenizer.json to encode/decode text")
    ap.add_argument("--max-new-tokens", type=int, default=64)
    ap.add_argument("--temperature", type=float, default=0.0, help="0: greedy")
    ap.add_argument("--top-k", type=int, default=0, help="sample from the k best (0: all)")
    ap.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling mass")
    ap.add_argument("--seed", type=int, default=0, help="sampling (and --preset init) seed")
    ap.add_argument(
        "--dtype", default="float32", choices=("float32", "bfloat16"), help="compute dtype"
    )
    ap.add_argument("--step", type=int, default=None, help="--checkpoint step (default: latest)")
    return ap.parse_args(argv)


def load_model(args: argparse.Namespace):

    from flax import nnx

    from deepseek_jax.interop.pretrained import from_pretrained
    from deepseek_jax.interop.train_checkpoint import load_run
    from deepseek_jax.model import Transformer
    from deepseek_jax.presets import get_preset

    if args.hf:
        return from_pretrained(args.hf, dtype=args.dtype)
    if args.checkpoint:
        model, _ = load_run(args.checkpoint, step=args.step)
        return model
    cfg = get_preset(args.preset).with_run(dtype=args.dtype)
    return Transformer(cfg, rngs=nnx.Rngs(args.seed))


def load_tokenizer(args: argparse.Namespace, vocab_size: int):
    from deepseek_jax.train.tokenizer import ByteTokenizer
    from deepseek_jax.train.tokenizer import load_tokenizer as load

    path = args.tokenizer
    if path is None and args.hf and os.path.exists(os.path.join(args.hf, "tokenizer.json")):
        path = os.path.join(args.hf, "tokenizer.json")
    if path is not None:
        return load(path)
    return ByteTokenizer() if vocab_size >= 256 else None


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    import numpy as np

    from deepseek_jax.infer.generate import Generator

    try:
        model = load_model(args)
        tok = load_tokenizer(args, model.cfg.vocab_size)
        if args.prompt_ids:
            ids = [int(t) for t in args.prompt_ids.replace(" ", "").split(",") if t]
        elif tok is None:
            raise ValueError("no tokenizer for a text prompt: pass --tokenizer or --prompt-ids")
        else:
            ids = tok.encode(args.prompt)
        if not ids or max(ids) >= model.cfg.vocab_size or min(ids) < 0:
            raise ValueError(f"prompt ids must be non-empty and in [0, {model.cfg.vocab_size})")
        gen = Generator(model, temperature=args.temperature, top_k=args.top_k, top_p=args.top_p)
        out = gen(np.asarray([ids], np.int32), args.max_new_tokens, seed=args.seed)
    except (ValueError, FileNotFoundError, KeyError) as e:
        print(f"error: {e}", file=sys.stderr)
        if os.environ.get("DEEPSEEK_JAX_DEBUG"):
            raise
        return 2
    new = out.tokens[0].tolist()
    if tok is not None:
        text = args.prompt if args.prompt is not None else tok.decode(ids)
        print(text + tok.decode(new))
    print(f"prompt ids ({len(ids)}): {ids}")
    print(f"new ids ({len(new)}): {new}")
    rates = out.rates(len(ids))
    print(
        f"prefill {rates['prefill_tokens_per_s']:.0f} tokens/s ({len(ids)} tokens), "
        f"decode {rates['decode_tokens_per_s']:.1f} tokens/s ({len(new) - 1} steps), "
        f"latent cache {out.cache_bytes_per_token} bytes/token, compile {out.compile_s:.1f} s"
    )
    return 0


if __name__ == "__main__":
    from experiments.runtime import start

    start(trains=False)
    sys.exit(main())
