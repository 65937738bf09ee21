"""A bounded HTTP load test of ``experiments.openai_api`` on 127.0.0.1 (for bench_serve).

``clients`` threads send requests back to back for ``seconds``: streamed and whole
completions of random lengths, malformed ones (they must get a 4xx JSON error naming a
field), and streams whose client leaves after a few events. A request is *lost* when it
neither completes (200 with every requested token, or a stop) nor gets a JSON error
(4xx, or 503 with Retry-After).
"""

from __future__ import annotations

import json
import random
import socket
import threading
import time
from collections import Counter


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _one(client, base, rng, vocab) -> str:
    """Sends one random request; returns its outcome."""
    import httpx

    kind = rng.random()
    body = {
        "prompt": [rng.randrange(vocab) for _ in range(rng.randint(1, 48))],
        "max_tokens": rng.randint(1, 32),
        "temperature": rng.choice([0.0, 0.7]),
        "seed": rng.randrange(1000),
    }
    url = base + "/v1/completions"
    try:
        if kind < 0.1:  # bad input
            bad = rng.choice([{"max_tokens": 0}, {"temperature": -1}, {"prompt": []}])
            r = client.post(url, json={**body, **bad})
            ok = 400 <= r.status_code < 500 and r.json()["error"]["param"]
            return "rejected_ok" if ok else "lost"
        if kind < 0.2:  # leaves mid-stream
            with client.stream("POST", url, json={**body, "stream": True}) as r:
                for i, _ in enumerate(r.iter_lines()):
                    if i >= 2:
                        break
            return "left"
        if kind < 0.6:
            with client.stream("POST", url, json={**body, "stream": True}) as r:
                if r.status_code != 200:
                    return _error(r.status_code, r.read(), r.headers)
                toks, fin = [], None
                for ln in r.iter_lines():
                    if ln.startswith("data: {"):
                        ch = json.loads(ln[6:])["choices"][0]
                        toks += ch["token_ids"]
                        fin = ch["finish_reason"] or fin
            return _done(toks, fin, body)
        r = client.post(url, json=body)
        if r.status_code != 200:
            return _error(r.status_code, r.content, r.headers)
        ch = r.json()["choices"][0]
        return _done(ch["token_ids"], ch["finish_reason"], body)
    except (httpx.HTTPError, json.JSONDecodeError, KeyError):
        return "lost"


def _done(toks, fin, body) -> str:
    ok = fin == "stop" or (fin == "length" and len(toks) == body["max_tokens"])
    return "completed" if ok else "lost"


def _error(status, content, headers) -> str:
    try:
        json.loads(content)["error"]["message"]
    except (json.JSONDecodeError, KeyError, TypeError):
        return "lost"
    if status == 503:
        return "busy_503" if headers.get("retry-after") else "lost"
    return "rejected_ok" if 400 <= status < 500 else "lost"


def load_engine(model, clients: int = 16, page_size: int = 16):
    """An engine whose compiled shapes the load's requests (<= 48 + 32 tokens) all share:
    one batch bucket, one page bucket, prefill chunks of 8 and 16; compiled here."""
    from deepseek_jax.infer.engine import Engine
    from deepseek_jax.infer.sampling import SamplingParams

    pages = -(-(48 + 32 + 1) // page_size)
    engine = Engine(
        model, page_size=page_size, num_pages=pages * clients + 1, max_batch=clients,
        prefill_chunk=16, batch_buckets=(clients,), page_buckets=(pages,),
    )  # fmt: skip
    for n in (5, 12):  # both chunk sizes, and the decode step
        engine.submit([1] * n, SamplingParams(max_tokens=2))
    engine.run_until_done()
    return engine


def http_load(engine, cfg, seconds: float, clients: int = 16) -> dict:
    import httpx
    import uvicorn

    from experiments.openai_api import EngineThread, Served, build_app

    served = Served(engine, "bench", None, None, max_queue=64)
    runner = EngineThread(engine).start()
    port = _free_port()
    srv = uvicorn.Server(
        uvicorn.Config(build_app(served), host="127.0.0.1", port=port, log_config=None)
    )
    thread = threading.Thread(target=srv.run, daemon=True)
    thread.start()
    base = f"http://127.0.0.1:{port}"
    while not srv.started:
        time.sleep(0.05)
    outcomes: Counter[str] = Counter()
    lock = threading.Lock()
    deadline = time.time() + seconds

    def client_loop(i):
        rng = random.Random(i)
        with httpx.Client(timeout=600) as client:
            while time.time() < deadline:
                o = _one(client, base, rng, cfg.vocab_size)
                with lock:
                    outcomes[o] += 1

    threads = [threading.Thread(target=client_loop, args=(i,)) for i in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for _ in range(200):  # cancelled streams free their pages at the next step
        if not engine.has_work():
            break
        time.sleep(0.05)
    pages_left = engine.alloc.in_use
    srv.should_exit = True
    thread.join(timeout=10)
    runner.stop()
    return {"requests": sum(outcomes.values()), **outcomes, "lost": outcomes["lost"],
            "pages_in_use_after": pages_left}  # fmt: skip
