"""Serve a model behind an OpenAI-compatible HTTP API: ``python -m experiments.serve``.

    python -m experiments.serve --hf DIR [--port 8000]
    python -m experiments.serve --checkpoint runs/default --tokenizer data/tokenizer.json
    python -m experiments.serve --preset tiny --speculative

Requests run on the continuous batching engine over the paged latent cache
(``deepseek_jax.infer.engine``); ``--speculative`` drafts with the MTP module. Text is
encoded with ``--tokenizer``, else the directory's ``tokenizer.json``, else (``--preset``
only) UTF-8 bytes; without a tokenizer prompts must be token ids. The chat template is
``tokenizer_config.json``'s ``chat_template`` where there is one. Needs the ``serve``
extra (starlette, uvicorn).
"""

from __future__ import annotations

import argparse
import json
import os
import sys


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    from experiments.generate import add_model_source

    ap = argparse.ArgumentParser(
        prog="python -m experiments.serve",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_model_source(ap)
    ap.add_argument("--tokenizer", default=None, help="tokenizer.json")
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--port", type=int, default=8000)
    ap.add_argument("--name", default=None, help="model name clients send (default: the dir)")
    ap.add_argument("--page-size", type=int, default=16)
    ap.add_argument("--num-pages", type=int, default=1024, help="cache pool, pages")
    ap.add_argument("--max-batch", type=int, default=16)
    ap.add_argument("--prefill-chunk", type=int, default=128)
    ap.add_argument(
        "--prefill-rows", type=int, default=1, help="requests' prompt chunks per prefill program"
    )
    ap.add_argument("--max-queue", type=int, default=64, help="waiting requests before 503")
    ap.add_argument("--speculative", action="store_true", help="MTP speculative decoding")
    ap.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"))
    ap.add_argument("--seed", type=int, default=0, help="--preset init seed")
    return ap.parse_args(argv)


def load_served(args: argparse.Namespace):
    from deepseek_jax.infer.engine import Engine
    from deepseek_jax.train.tokenizer import ByteTokenizer, load_tokenizer
    from experiments.generate import load_model
    from experiments.openai_api import Served

    model = load_model(args)
    root = args.hf or args.checkpoint
    path = args.tokenizer
    if path is None and root and os.path.exists(os.path.join(root, "tokenizer.json")):
        path = os.path.join(root, "tokenizer.json")
    tok = load_tokenizer(path) if path else None
    if tok is None and args.preset and model.cfg.vocab_size >= 256:
        tok = ByteTokenizer()
    template = None
    if root and os.path.exists(os.path.join(root, "tokenizer_config.json")):
        with open(os.path.join(root, "tokenizer_config.json")) as f:
            template = json.load(f).get("chat_template")
    engine = Engine(
        model,
        page_size=args.page_size,
        num_pages=args.num_pages,
        max_batch=args.max_batch,
        prefill_chunk=args.prefill_chunk,
        prefill_rows=args.prefill_rows,
        speculative=args.speculative,
    )
    name = args.name or (os.path.basename(os.path.normpath(root)) if root else args.preset)
    return Served(engine, name, tok, template if isinstance(template, str) else None,
                  args.max_queue)  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        import uvicorn
    except ImportError:
        print("error: serving needs the serve extra: pip install -e '.[serve]'", file=sys.stderr)
        return 2
    from experiments.openai_api import EngineThread, build_app

    try:
        served = load_served(args)
    except (ValueError, FileNotFoundError, KeyError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    runner = EngineThread(served.engine).start()
    try:
        uvicorn.run(build_app(served), host=args.host, port=args.port, log_level="info")
    finally:
        runner.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
