"""serve.py as a client sees it: a real server process on 127.0.0.1, called with the official `openai` client
(and httpx for what the client will not send). A tiny Llama 3 model with random Meta-format weights, whose
logits have clear margins, and the real Llama 3 tokenizer."""

import asyncio
import contextlib
import importlib.util
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from hf_reference import random_meta_state
from llama_jax.config import preset
from llama_jax.meta_weights import params_from_meta
from subprocess_env import free_port, subprocess_env

openai = pytest.importorskip("openai")

ROOT = Path(__file__).resolve().parents[1]
TOKENIZER = Path(__file__).resolve().parents[2] / "shared" / "tokenizers" / "llama3" / "tokenizer.model"
CONFIG = preset("tiny-llama3", vocab_size=128256, max_seq_len=256)
KEY = "test-key"
SLOTS, BUDGET = 4, 64  # prefill buckets 16, 32, 48, 64


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    if not TOKENIZER.is_file():
        pytest.skip(f"real Llama 3 tokenizer not found at {TOKENIZER}")
    from llama_jax.checkpoint import save_model

    folder = tmp_path_factory.mktemp("serve") / "tiny"
    params = params_from_meta({k: v.numpy() for k, v in random_meta_state(CONFIG, seed=2).items()}, CONFIG)
    save_model(folder, jax.tree.map(jnp.asarray, params), CONFIG, TOKENIZER)
    return folder


@contextlib.contextmanager
def serving(model_dir, log_path: Path, *flags: str, env: dict | None = None):
    """A serve.py process on a free port, up and answering /health; yields (process, url) and kills it after."""
    port = free_port()
    with log_path.open("w") as log:
        proc = subprocess.Popen([sys.executable, str(ROOT / "serve.py"), "--checkpoint", str(model_dir), "--port",
                                 str(port), *flags], stdout=log, stderr=subprocess.STDOUT, cwd=ROOT, env=env)
        url = f"http://127.0.0.1:{port}"
        try:
            for _ in range(300):
                assert proc.poll() is None, log_path.read_text()[-3000:]
                try:
                    if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                        break
                except httpx.TransportError:
                    time.sleep(0.5)
            yield proc, url
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()


@pytest.fixture(scope="module")
def server(model_dir, tmp_path_factory):
    with serving(model_dir, tmp_path_factory.mktemp("serve_log") / "server.log", "--max-slots", str(SLOTS),
                 "--max-queue", "40", "--prefill-budget", str(BUDGET), "--api-key", KEY,
                 "--shutdown-timeout", "20") as running:
        yield running


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=f"{server[1]}/v1", api_key=KEY, max_retries=0)


@pytest.fixture(scope="module")
def tok(model_dir):
    from llama_jax.tokenizer import load_tokenizer

    return load_tokenizer(model_dir / "tokenizer.model")


def health(server) -> dict:
    return httpx.get(f"{server[1]}/health").json()


def post(server, path, body, key=KEY, **kw):
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    return httpx.post(f"{server[1]}{path}", headers=headers, timeout=60, **kw,
                      **({"json": body} if not isinstance(body, str) else {"content": body}))


# --- completions and chat --------------------------------------------------------------------------------------

def test_models_and_health(client, server):
    assert [m.id for m in client.models.list().data] == ["tiny"]
    h = health(server)
    # Decode steps (one token per call, and several) and 4 prefill buckets.
    assert h["status"] == "ok" and h["slots"] == SLOTS and h["compiled"] == 6


def test_greedy_completion_equals_generate_cli(client, model_dir, capsys):
    spec = importlib.util.spec_from_file_location("generate_cli", ROOT / "generate.py")
    cli = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(cli)
    assert cli.main(["--checkpoint", str(model_dir), "--prompt", "The capital of France is", "--temperature", "0",
                     "--max-new-tokens", "8"]) == 0
    expected = capsys.readouterr().out.removesuffix("\n")
    expected_first = client.completions.create(model="tiny", prompt="The capital of France is", max_tokens=1,
                                               temperature=0).choices[0].text
    out = client.completions.create(model="tiny", prompt="The capital of France is", max_tokens=8, temperature=0)
    assert out.choices[0].text == expected and out.choices[0].finish_reason == "length"
    assert out.usage.completion_tokens == 8 and out.usage.prompt_tokens == 6
    streamed = client.completions.create(model="tiny", prompt="The capital of France is", max_tokens=8,
                                         temperature=0, stream=True)
    assert "".join(c.choices[0].text for c in streamed) == expected
    # --top-logprobs: "what would the model say next?", the same candidates the server reports.
    assert cli.main(["--checkpoint", str(model_dir), "--prompt", "The capital of France is", "--temperature", "0",
                     "--max-new-tokens", "1", "--top-logprobs", "2"]) == 0
    line = capsys.readouterr().out.splitlines()[-1]
    top = client.completions.create(model="tiny", prompt="The capital of France is", max_tokens=1, temperature=0,
                                    logprobs=2).choices[0].logprobs.top_logprobs[0]
    assert line == "1: " + f"{expected_first!r} <- " + "  ".join(f"{t!r} {np.exp(lp):.4f}" for t, lp in top.items())


def test_chat_streamed_and_not(client, tok):
    from llama_jax.chat import encode_chat

    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Name a color."}]
    out = client.chat.completions.create(model="tiny", messages=messages, max_tokens=6, temperature=0,
                                         logprobs=True, top_logprobs=2)
    choice = out.choices[0]
    assert out.usage.prompt_tokens == len(encode_chat(tok, messages))
    assert choice.message.role == "assistant" and choice.finish_reason in ("stop", "length")
    assert len(choice.logprobs.content) == out.usage.completion_tokens - (choice.finish_reason == "stop")
    assert all(len(c.top_logprobs) == 2 and c.logprob == c.top_logprobs[0].logprob for c in choice.logprobs.content)
    chunks = list(client.chat.completions.create(model="tiny", messages=messages, max_tokens=6, temperature=0,
                                                 stream=True))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == choice.message.content
    assert chunks[-1].choices[0].finish_reason == choice.finish_reason


def test_stop_string_spanning_tokens_is_cut_while_streaming(client):
    full = client.completions.create(model="tiny", prompt="Once upon a time", max_tokens=12, temperature=0,
                                     logprobs=0)
    tokens, text = full.choices[0].logprobs.tokens, full.choices[0].text
    # A stop string made of the end of token 3 and the start of token 4: it appears only once both arrived.
    cut = sum(len(t) for t in tokens[:3])
    stop = text[cut - 2:cut + 2]
    assert len(tokens[2]) >= 2 and len(tokens[3]) >= 2 and text.find(stop) == cut - 2
    chunks = list(client.completions.create(model="tiny", prompt="Once upon a time", max_tokens=12,
                                            temperature=0, stop=[stop], stream=True))
    assert "".join(c.choices[0].text for c in chunks) == text[:cut - 2]
    assert chunks[-1].choices[0].finish_reason == "stop"


def test_echo_logprobs_equal_log_softmax_of_forward(client, model_dir, tok):
    """What lm-eval-harness's loglikelihood requests send: echo, logprobs=1, max_tokens=1, token ids."""
    from llama_jax.checkpoint import load_model
    from llama_jax.model import forward

    ids = tok.encode("The quick brown fox jumps over the lazy dog", bos=True, eos=False)
    out = client.completions.create(model="tiny", prompt=ids, echo=True, logprobs=1, max_tokens=1, temperature=0)
    lp = out.choices[0].logprobs
    params, config, _ = load_model(model_dir)
    logits = forward(params, jnp.asarray([ids]), jnp.arange(len(ids))[None], config=config)[0][0]
    expected = np.asarray(jax.nn.log_softmax(logits, axis=-1))
    assert len(lp.tokens) == len(ids) + 1 and lp.token_logprobs[0] is None and lp.top_logprobs[0] is None
    np.testing.assert_allclose(lp.token_logprobs[1:len(ids)], expected[np.arange(len(ids) - 1), ids[1:]],
                               atol=2e-4)
    generated = int(np.argmax(expected[-1]))
    assert lp.tokens[-1] == tok.decode([generated])
    np.testing.assert_allclose(lp.token_logprobs[-1], expected[-1, generated], atol=2e-4)
    for i in range(1, len(ids)):
        (best, value), = lp.top_logprobs[i].items()
        assert best == tok.decode([int(np.argmax(expected[i - 1]))])
        np.testing.assert_allclose(value, expected[i - 1].max(), atol=2e-4)
    assert lp.text_offset == [sum(len(t) for t in lp.tokens[:i]) for i in range(len(lp.tokens))]


# --- continuous batching under load ----------------------------------------------------------------------------

def test_concurrent_requests_match_generator_alone(server, model_dir, tok):
    from llama_jax.checkpoint import load_model
    from llama_jax.generation import Generator, IncrementalDecoder

    rng = np.random.default_rng(0)
    lengths, max_tokens = rng.integers(3, 60, size=32), rng.integers(1, 17, size=32)
    prompts = [[tok.bos_id, *map(int, rng.integers(100, 100000, size=n - 1))] for n in lengths]
    seeded = dict(model="tiny", prompt="Tell me a story", max_tokens=10, temperature=1.0, top_p=0.9, seed=1234,
                  extra_body={"top_k": 50})
    before = health(server)
    client = openai.AsyncOpenAI(base_url=f"{server[1]}/v1", api_key=KEY, max_retries=0)

    async def load():
        alone = await client.completions.create(**seeded)
        calls = [client.completions.create(model="tiny", prompt=p, max_tokens=int(m), temperature=0)
                 for p, m in zip(prompts, max_tokens)]
        return alone, await asyncio.gather(*calls, client.completions.create(**seeded))

    alone, outs = asyncio.run(load())
    after = health(server)
    assert outs[-1].choices[0].text == alone.choices[0].text  # the seed decides, not the slot or the neighbours
    assert after["admitted_while_decoding"] > before.get("admitted_while_decoding", 0)
    # A mixed load compiles nothing new: 2 decode programs, 4 prefill buckets and (echo) their all-logits variant.
    assert after["compiled"] == before["compiled"] <= 2 + 2 * 4
    params, config, _ = load_model(model_dir)
    gen = Generator(params, config, stop_ids=tok.stop_ids, pad_id=tok.pad_id)
    for p, m, out in zip(prompts, max_tokens, outs):
        ref = gen.generate([p], max_new_tokens=16)  # one bucket for every length; greedy, so a prefix is the same
        stopped = ref.finish_reasons[0] == "stop" and len(ref.tokens[0]) < m
        assert out.usage.prompt_tokens == len(p)
        assert out.usage.completion_tokens == (len(ref.tokens[0]) + 1 if stopped else m)
        assert out.choices[0].text == IncrementalDecoder(tok).push(ref.tokens[0][:m])
        assert out.choices[0].finish_reason == ("stop" if stopped else "length")


def test_client_disconnect_frees_its_slot(server):
    before = health(server)
    with httpx.stream("POST", f"{server[1]}/v1/completions", headers={"Authorization": f"Bearer {KEY}"},
                      json={"prompt": "Hello", "max_tokens": 240, "temperature": 0, "stream": True}) as r:
        next(r.iter_lines())
    deadline = time.monotonic() + 10
    while (h := health(server))["busy"] and time.monotonic() < deadline:
        time.sleep(0.05)
    assert h["busy"] == 0 and h.get("cancelled", 0) == before.get("cancelled", 0) + 1


# --- bad input and overload ------------------------------------------------------------------------------------

@pytest.mark.parametrize("body, param", [
    ('{"prompt": "hi", ', None),
    ({"prompt": "hi", "max_tokens": "many"}, "max_tokens"),
    ({"prompt": 3.5}, "prompt"),
    ({"prompt": "hi", "model": "gpt-4"}, "model"),
    ({"prompt": "hi", "max_tokens": 0}, "max_tokens"),
    ({"prompt": "hi", "temperature": -0.5}, "temperature"),
    ({"prompt": list(range(1000, 1300))}, "prompt"),
    ({"prompt": "hi", "logprobs": 9}, "logprobs"),
])
def test_bad_completion_requests_get_400(server, body, param):
    r = post(server, "/v1/completions", body)
    assert r.status_code == 400, r.text
    error = r.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["param"] == param
    assert "\n" not in error["message"] and "Traceback" not in error["message"]


def test_bad_chat_requests_get_400_and_the_server_keeps_serving(server, client):
    for body in ({"messages": []}, {"messages": [{"role": "robot", "content": "x"}]},
                 {"messages": [{"role": "user", "content": "x " * 400}]}):
        r = post(server, "/v1/chat/completions", body)
        assert r.status_code == 400 and r.json()["error"]["param"] == "messages", r.text
    assert client.completions.create(model="tiny", prompt="ok", max_tokens=2).usage.completion_tokens == 2


def test_api_key_required(server):
    for key in (None, "wrong"):
        r = post(server, "/v1/completions", {"prompt": "hi"}, key=key)
        assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"
    assert httpx.get(f"{server[1]}/v1/models").status_code == 401


def test_full_queue_gets_429_with_retry_after(server):
    async def flood():
        async with httpx.AsyncClient(base_url=server[1], headers={"Authorization": f"Bearer {KEY}"},
                                     timeout=120) as c:
            return await asyncio.gather(*(c.post("/v1/completions", json={"prompt": "Hi", "max_tokens": 100,
                                                                             "temperature": 0})
                                          for _ in range(60)))

    responses = asyncio.run(flood())
    assert {r.status_code for r in responses} == {200, 429}
    for r in responses:
        if r.status_code == 429:
            assert r.headers["retry-after"] == "1" and r.json()["error"]["code"] == "queue_full"
        else:
            assert r.json()["usage"]["completion_tokens"] == 100


def test_sigterm_finishes_running_requests_then_exits_0(server):
    proc, url = server
    with httpx.stream("POST", f"{url}/v1/completions", headers={"Authorization": f"Bearer {KEY}"}, timeout=60,
                      json={"prompt": "Hello", "max_tokens": 200, "temperature": 0, "stream": True}) as r:
        lines = r.iter_lines()
        next(lines)
        proc.send_signal(signal.SIGTERM)
        rest = [line for line in lines if line]
    assert rest[-1] == "data: [DONE]" and '"finish_reason": "length"' in "".join(rest)
    assert proc.wait(timeout=30) == 0


def test_server_on_a_tensor_mesh_matches_generator_on_one_device(model_dir, tok, tmp_path):
    """--mesh-tensor 4 on 4 CPU devices: 2 KV heads repeated to 4, one per device; greedy text as one device's."""
    from llama_jax.checkpoint import load_model
    from llama_jax.generation import Generator, IncrementalDecoder

    rng = np.random.default_rng(1)
    prompts = [[tok.bos_id, *map(int, rng.integers(100, 100000, size=n - 1))] for n in (5, 40, 90)]
    with serving(model_dir, tmp_path / "mesh.log", "--mesh-tensor", "4", "--max-slots", "2", "--prefill-budget",
                 "32", "--no-warmup", env=subprocess_env(4)) as (_, url):
        assert httpx.get(f"{url}/health").json()["devices"] == 4
        client = openai.OpenAI(base_url=f"{url}/v1", api_key="none", max_retries=0)
        outs = [client.completions.create(model="tiny", prompt=p, max_tokens=8, temperature=0) for p in prompts]
    params, config, _ = load_model(model_dir)
    gen = Generator(params, config, stop_ids=tok.stop_ids, pad_id=tok.pad_id)
    for p, out in zip(prompts, outs):
        ref = gen.generate([p], max_new_tokens=8)
        assert out.choices[0].text == IncrementalDecoder(tok).push(ref.tokens[0])
        assert out.choices[0].finish_reason == ref.finish_reasons[0]


def test_prefill_budget_below_the_smallest_chunk_is_refused():
    from llama_jax.generation import Generator
    from llama_jax.inference.batching import BatchingEngine, EngineError
    from llama_jax.model import init_params

    config = preset("tiny-llama2")
    gen = Generator(init_params(config, jax.random.key(0)), config)
    with pytest.raises(EngineError, match=r"^the prefill budget \(--prefill-budget\) must be >= 16 tokens, got 8$"):
        BatchingEngine(gen, prefill_budget=8)
    assert BatchingEngine(gen, prefill_budget=16).buckets == [16]


def test_cache_that_does_not_fit_the_device_is_one_line_error():
    from llama_jax.inference.batching import EngineError, check_memory
    from llama_jax.kv_cache import cache_bytes

    class Device:  # what an accelerator's memory_stats() reports (a CPU reports None: nothing is checked)
        def __init__(self, free):
            self.free = free

        def memory_stats(self):
            return None if self.free is None else {"bytes_limit": self.free + 100, "bytes_in_use": 100}

    need = cache_bytes(CONFIG, 8, 256)
    check_memory(need, 8, 256, Device(None))
    check_memory(need, 8, 256, Device(need))
    with pytest.raises(EngineError, match=r"^the KV cache for 8 slots x 256 tokens needs .* GiB free: lower"):
        check_memory(need, 8, 256, Device(need - 1))
