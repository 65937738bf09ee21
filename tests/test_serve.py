"""The OpenAI-compatible endpoint, over real HTTP on 127.0.0.1: completions and chat,
token-id and text prompts, concurrent streams, a client that leaves mid-stream, bad input,
a full cache."""

import json
import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest
import uvicorn
from flax import nnx

from deepseek_jax.infer.engine import Engine
from deepseek_jax.model import Transformer
from deepseek_jax.presets import get_preset
from deepseek_jax.train.tokenizer import ByteTokenizer
from experiments.openai_api import EngineThread, Served, build_app

CFG = get_preset("tiny")  # max_position_embeddings 512
PROMPT = [5, 9, 100, 7, 3]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def server():
    """One engine (one prefill and one decode shape) behind uvicorn in a thread."""
    model = Transformer(CFG, rngs=nnx.Rngs(0))
    engine = Engine(
        model, page_size=8, num_pages=80, max_batch=4, prefill_chunk=8,
        batch_buckets=(4,), page_buckets=(64,),
    )  # fmt: skip
    served = Served(engine, "tiny", ByteTokenizer(), None, max_queue=8)
    runner = EngineThread(engine).start()
    port = _free_port()
    cfg = uvicorn.Config(build_app(served), host="127.0.0.1", port=port, log_level="warning")
    srv = uvicorn.Server(cfg)
    thread = threading.Thread(target=srv.run, daemon=True)
    thread.start()
    base = f"http://127.0.0.1:{port}"
    for _ in range(200):
        try:
            httpx.get(base + "/health", timeout=1)
            break
        except httpx.TransportError:
            time.sleep(0.05)
    yield base, served, runner
    srv.should_exit = True
    thread.join(timeout=10)
    runner.stop()


def _complete(base, **body):
    return httpx.post(base + "/v1/completions", json={"model": "tiny", **body}, timeout=120)


def _stream(base, **body):
    """(token ids, finish reason, texts) of a streamed completion."""
    toks, texts, fin = [], [], None
    with httpx.stream(
        "POST", base + "/v1/completions", json={**body, "stream": True}, timeout=120
    ) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        lines = [ln for ln in r.iter_lines() if ln]
    assert lines[-1] == "data: [DONE]"
    for ln in lines[:-1]:
        choice = json.loads(ln.removeprefix("data: "))["choices"][0]
        toks += choice["token_ids"]
        texts.append(choice["text"])
        fin = choice["finish_reason"] or fin
    return toks, fin, texts


def _metric(base, name) -> float:
    text = httpx.get(base + "/metrics").text
    return float(
        next(ln.split()[1] for ln in text.splitlines() if ln.startswith(f"deepseek_jax_{name} "))
    )


def test_completions_stream_and_concurrency(server):
    base, served, _ = server
    assert httpx.get(base + "/health").json()["status"] == "ok"
    assert httpx.get(base + "/v1/models").json()["data"][0]["id"] == "tiny"
    r = _complete(base, prompt=PROMPT, max_tokens=12, temperature=0)
    assert r.status_code == 200
    body = r.json()
    choice = body["choices"][0]
    assert len(choice["token_ids"]) == 12 and choice["finish_reason"] == "length"
    assert choice["text"] == ByteTokenizer().decode(choice["token_ids"])
    assert body["usage"] == {"prompt_tokens": 5, "completion_tokens": 12, "total_tokens": 17}
    # Concurrent streams: greedy, so each equals the non-streamed completion of its prompt.
    prompts = [PROMPT, PROMPT[::-1], [1, 2, 3], PROMPT]
    with ThreadPoolExecutor(4) as pool:
        outs = list(
            pool.map(lambda p: _stream(base, prompt=p, max_tokens=12, temperature=0), prompts)
        )
    solo = [_complete(base, prompt=p, max_tokens=12, temperature=0).json() for p in prompts[1:3]]
    assert outs[0][0] == outs[3][0] == choice["token_ids"]
    assert [o[0] for o in outs[1:3]] == [s["choices"][0]["token_ids"] for s in solo]
    assert all(o[1] == "length" for o in outs)
    assert "".join(outs[0][2]) == choice["text"]
    text = _complete(base, prompt="hello", max_tokens=3, temperature=0.8, seed=1).json()
    assert len(text["choices"][0]["token_ids"]) == 3
    chat = httpx.post(
        base + "/v1/chat/completions",
        json={"messages": [{"role": "user", "content": "hi"}], "max_tokens": 4, "temperature": 0},
        timeout=120,
    ).json()
    msg = chat["choices"][0]["message"]
    assert msg["role"] == "assistant" and chat["usage"]["prompt_tokens"] == len(
        "user: hi\nassistant:"
    )
    assert _metric(base, "generated_tokens_total") >= 12 * 7


def test_bad_input_gets_named_4xx_and_serving_continues(server):
    base, served, _ = server
    bad = [
        (httpx.post(base + "/v1/completions", content=b"{not json", timeout=30), 400, "body"),
        (_complete(base, prompt=PROMPT, model="gpt-9"), 404, "model"),
        (_complete(base, prompt=list(range(200)) * 3, max_tokens=4), 400, "prompt"),
        (_complete(base, prompt=PROMPT, max_tokens=0), 400, "max_tokens"),
        (_complete(base, prompt=PROMPT, temperature=-0.5), 400, "temperature"),
        (_complete(base, prompt=PROMPT, top_p=1.5), 400, "top_p"),
        (_complete(base, prompt=PROMPT, frequency_penality=1), 400, "frequency_penality"),
        (_complete(base, prompt=[1, 999]), 400, "prompt"),
        (_complete(base, prompt=[]), 400, "prompt"),
    ]
    for r, status, param in bad:
        assert r.status_code == status, r.text
        err = r.json()["error"]
        assert err["param"] == param and param in err["message"] or param == "body", err
    served.tokenizer = None  # a model directory without a tokenizer: text is refused
    try:
        r = _complete(base, prompt="hello")
        assert r.status_code == 400 and "token ids" in r.json()["error"]["message"]
    finally:
        served.tokenizer = ByteTokenizer()
    assert _complete(base, prompt=PROMPT, max_tokens=2).status_code == 200


def test_disconnect_frees_pages_and_full_cache_queues_then_503(server):
    base, served, runner = server
    eng = served.engine
    aborted = eng.stats["finished_abort"]
    ctx = httpx.stream(
        "POST",
        base + "/v1/completions",
        json=dict(prompt=PROMPT, max_tokens=400, temperature=0, stream=True),  # 51 of 79 pages
        timeout=60,
    )
    r = ctx.__enter__()
    lines = r.iter_lines()  # kept: a collected iterator closes the stream
    assert r.status_code == 200 and next(lines).startswith("data: ")  # it holds pages now
    assert _metric(base, "cache_pages_in_use") >= 1
    with ThreadPoolExecutor(1) as pool:
        queued = pool.submit(_complete, base, prompt=PROMPT, max_tokens=250, temperature=0)
        for _ in range(200):  # needs 33 pages, 28 are unbooked: it waits
            if eng.waiting:
                break
            time.sleep(0.05)
        runner.pause()  # hold the engine so the state below cannot move on
        assert len(eng.waiting) == 1 and eng.active == 1
        served.max_queue = 1
        busy = _complete(base, prompt=PROMPT, max_tokens=3)
        served.max_queue = 8
        assert busy.status_code == 503 and busy.headers["retry-after"] == "1"
        assert busy.json()["error"]["type"] == "server_error"
        ctx.__exit__(None, None, None)  # the client leaves mid-stream
        time.sleep(0.6)  # the server notices
        runner.resume()
        done = queued.result(timeout=120)
    assert done.status_code == 200 and len(done.json()["choices"][0]["token_ids"]) == 250
    assert eng.stats["finished_abort"] == aborted + 1
    assert _metric(base, "cache_pages_in_use") == 0 and eng.alloc.unbooked == eng.alloc.capacity
    assert _metric(base, "client_disconnects_total") >= 1


@pytest.mark.parametrize("load_s", [0, pytest.param(3, marks=pytest.mark.slow)])
def test_bench_serve_script(capsys, load_s):
    from experiments.bench_serve import main

    argv = ["--preset", "tiny", "--prompt-len", "8", "--new-tokens", "4", "--concurrency", "1,2"]
    argv += ["--repeats", "2"]
    assert main([*argv, "--load-s", str(load_s), "--load-clients", "2"]) == 0
    last = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    keys = {"decode_tokens_per_s_c1", "decode_tokens_per_s_c2", "ttft_ms_p50", "tpot_ms_p50"}
    keys |= {"tpot_ms_p99", "mtp_acceptance", "mtp_speedup", "lost_requests"}
    assert keys <= set(last) and last["lost_requests"] == 0
    assert len(last["decode_tokens_per_s_c2_runs"]) == 2
    assert last["decode_tokens_per_s_c2"] in last["decode_tokens_per_s_c2_runs"]
    assert last["decode_step_tokens_per_s_c2"] > 0 and last["decode_step_scaling"] > 0
    assert last["cache_bytes_per_token"] == 3 * (16 + 8) * 4
    assert 0 <= last["mtp_acceptance"] <= 1 and last["mtp_speedup"] > 0
    assert last["resident_requests_mla"] > last["resident_requests_gqa"] > 0


def test_serve_script_reports_bad_sources(capsys):
    from experiments.serve import main

    assert main(["--hf", "/nonexistent", "--port", "0"]) == 2
    assert "error" in capsys.readouterr().err


def test_bench_serve_prompts_and_heldout_heads():
    """A checkpoint's prompts are windows of its held-out tokens; the held-out head
    figures are fractions of the positions (none of them lost or double-counted)."""
    import numpy as np

    from experiments.bench_serve import make_prompts, mtp_heldout

    tokens = np.arange(1000) % 200
    rng = np.random.default_rng(0)
    for p in make_prompts(tokens, 256, 3, 16, rng):
        assert len(p) == 16 and all((b - a) % 200 == 1 for a, b in zip(p, p[1:], strict=False))
    rand = make_prompts(None, 256, 2, 16, rng)
    assert np.asarray(rand).shape == (2, 16) and np.asarray(rand).max() < 256
    model = Transformer(get_preset("tiny"), rngs=nnx.Rngs(0))
    h = mtp_heldout(model, tokens, seq_len=16, rows=2)
    assert set(h) == {"main_top1", "mtp_top1", "mtp_agrees_with_main"}
    assert all(0.0 <= v <= 1.0 for v in h.values())
    assert h["main_top1"] * 2 * 15 == round(h["main_top1"] * 2 * 15)  # whole positions
