"""``steadytrain serve`` of a trained run, started as users start it, used over real HTTP.

The run is the session's reference job (tests/e2e/conftest.py); answers are compared with
its weights loaded by safetensors itself and called alone, one request at a time.
"""

from __future__ import annotations

import asyncio
import json
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
import torch
from prometheus_client.parser import text_string_to_metric_families
from safetensors.torch import load_file

from steadytrain.config import EXIT_CHECKPOINT_BAD, load_config
from steadytrain.model import build_model
from tests.helpers import REPO, cli_env, free_port

pytestmark = pytest.mark.slow

# The last one, with the tokens asked for, outgrows the model's 64-token context.
PROMPTS = ["def ", "import os\n", "class Foo:", "x = [", "return", "# " + "a long comment, " * 3]


@dataclass
class Server:
    process: subprocess.Popen[str]
    url: str
    log: Path

    def output(self) -> str:
        return self.log.read_text()


def launch(
    run_dir: Path, log: Path, *settings: str, faults: dict[str, Any] | None = None
) -> Server:
    """``steadytrain serve RUN_DIR --port P --set ...``, started and not waited for."""
    port = free_port()
    env = cli_env(**({"STEADYTRAIN_SERVE_TEST_FAULTS": json.dumps(faults)} if faults else {}))
    command = [str(Path(sys.executable).parent / "steadytrain"), "serve", str(run_dir)]
    command += ["--port", str(port), *(arg for s in settings for arg in ("--set", s))]
    with log.open("w") as output:
        process = subprocess.Popen(
            command, stdout=output, stderr=subprocess.STDOUT, text=True, env=env, cwd=REPO
        )
    return Server(process, f"http://127.0.0.1:{port}", log)


def wait_listening(server: Server) -> None:
    """Until it answers /healthz (it listens before it loads)."""
    deadline = time.monotonic() + 60
    while True:
        try:
            httpx.get(f"{server.url}/healthz", timeout=2).raise_for_status()
            return
        except httpx.HTTPError:
            if server.process.poll() is not None or time.monotonic() > deadline:
                server.process.kill()
                raise AssertionError(f"serve did not start:\n{server.output()}") from None
            time.sleep(0.1)


def wait_ready(server: Server, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while httpx.get(f"{server.url}/readyz", timeout=2).status_code != 200:
        assert time.monotonic() < deadline, server.output()
        time.sleep(0.1)


def stop(server: Server) -> int:
    if server.process.poll() is None:
        server.process.send_signal(signal.SIGTERM)
    return server.process.wait(timeout=30)


def metric_samples(server: Server) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    text = httpx.get(f"{server.url}/metrics", timeout=5).text
    return {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


@pytest.fixture(scope="module")
def model_alone(reference: Path) -> torch.nn.Module:
    """The run's model with its final weights, loaded by safetensors (not by steadytrain)."""
    model = build_model(load_config(reference / "config.yaml"))
    model.load_state_dict(load_file(str(reference / "final" / "model.safetensors")))
    return model.eval()


def greedy_alone(model: torch.nn.Module, prompt: str, num_tokens: int) -> list[int]:
    tokens = list(prompt.encode())
    with torch.inference_mode():
        for _ in range(num_tokens):
            logits = model(torch.tensor([tokens[-model.max_seq_len :]]))  # type: ignore[operator]
            tokens.append(int(logits[0, -1].argmax()))
    return tokens[len(prompt.encode()) :]


# A slow model (every call), a poisoned prompt, and 2 s of loading to see /readyz answer 503.
FAULTS = {"load_delay_s": 2, "step_delay_s": 0.15, "poison_prompt": "POISON"}


@dataclass
class Servers:
    main: Server
    faulty: Server  # with FAULTS, small batches and queue, no wait
    faulty_while_loading: httpx.Response  # its /readyz as soon as it listened


@pytest.fixture(scope="module")
def servers(reference: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Servers]:
    """The module's two servers, started together so that their start-ups overlap."""
    logs = tmp_path_factory.mktemp("serve")
    main = launch(reference, logs / "serve.log", "serve.max_batch_size=4", "serve.max_wait_ms=100")
    faulty = launch(
        reference,
        logs / "faulty.log",
        "serve.max_batch_size=2",
        "serve.max_queue=2",
        "serve.max_wait_ms=0",
        "serve.retry_after_s=7",
        faults=FAULTS,
    )
    try:
        wait_listening(faulty)
        early = httpx.get(f"{faulty.url}/readyz", timeout=5)
        wait_listening(main)
        wait_ready(main)
        yield Servers(main, faulty, early)
        assert stop(main) == 0, main.output()
    finally:
        main.process.kill()
        faulty.process.kill()


@pytest.fixture(scope="module")
def server(servers: Servers) -> Server:
    return servers.main


async def post_all(url: str, bodies: list[tuple[str, dict[str, Any]]]) -> list[httpx.Response]:
    async with httpx.AsyncClient(base_url=url, timeout=60) as client:
        return await asyncio.gather(*(client.post(path, json=body) for path, body in bodies))


def test_concurrent_answers_match_the_model_alone_and_batches_form(
    server: Server, model_alone: torch.nn.Module
) -> None:
    tokens = 24
    rows = [list(prompt.encode()) for prompt in PROMPTS]
    bodies = [
        *(
            ("/v1/generate", {"prompt": prompt, "max_new_tokens": tokens, "temperature": 0})
            for prompt in PROMPTS
        ),
        *(("/v1/forward", {"tokens": row}) for row in rows),
    ]
    responses = asyncio.run(post_all(server.url, bodies))
    assert all(response.status_code == 200 for response in responses), responses[0].text
    generated, logprobs = responses[: len(PROMPTS)], responses[len(PROMPTS) :]
    for prompt, response in zip(PROMPTS, generated, strict=True):
        expected = greedy_alone(model_alone, prompt, tokens)
        assert response.json()["tokens"] == expected, prompt
        assert response.json()["text"] == bytes(expected).decode(errors="replace")
    with torch.inference_mode():
        for row, response in zip(rows, logprobs, strict=True):
            alone = torch.log_softmax(model_alone(torch.tensor([row]))[0, :-1], dim=-1)
            expected = alone.gather(1, torch.tensor(row[1:])[:, None])[:, 0]
            assert torch.allclose(torch.tensor(response.json()["logprobs"]), expected, atol=1e-4)
    samples = metric_samples(server)
    calls = samples[("steadytrain_serve_batch_size_count", (("kind", "generate"),))]
    requests = samples[("steadytrain_serve_batch_size_sum", (("kind", "generate"),))]
    assert requests / calls > 2  # six concurrent generations shared decoding steps
    assert samples[("steadytrain_serve_batch_size_sum", (("kind", "forward"),))] == len(rows)
    assert samples[("steadytrain_serve_batch_size_count", (("kind", "forward"),))] < len(rows)
    assert samples[("steadytrain_serve_padding_tokens_total", (("kind", "forward"),))] > 0
    ok = (("endpoint", "/v1/generate"), ("outcome", "ok"))
    assert samples[("steadytrain_serve_requests_total", ok)] >= len(PROMPTS)


def test_a_stream_sends_the_tokens_of_the_plain_answer(server: Server) -> None:
    body = {"prompt": "def ", "max_new_tokens": 8, "temperature": 0}
    plain = httpx.post(f"{server.url}/v1/generate", json=body, timeout=30).json()
    with httpx.stream(
        "POST", f"{server.url}/v1/generate", json={**body, "stream": True}, timeout=30
    ) as response:
        assert response.headers["content-type"].startswith("text/event-stream")
        events = [line for line in response.iter_lines() if line.startswith(("data:", "event:"))]
    tokens = [json.loads(line[5:])["token"] for line in events[:-2]]
    assert tokens == plain["tokens"]
    assert events[-2] == "event: done" and json.loads(events[-1][5:]) == plain


def test_bad_requests_get_a_one_line_reason(server: Server) -> None:
    def post(path: str, **kwargs: Any) -> httpx.Response:
        return httpx.post(f"{server.url}{path}", timeout=10, **kwargs)

    cases = [
        (
            post(
                "/v1/generate", content=b'{"prompt": ', headers={"content-type": "application/json"}
            ),
            400,
            "not valid JSON",
        ),
        (post("/v1/generate", json={"prompt": "x", "temperature": -1}), 422, "temperature"),
        (post("/v1/generate", json={"prompt": "x", "bogus": 1}), 422, "bogus"),
        (post("/v1/generate", json={"prompt": "x" * 5000}), 413, "max_prompt_tokens"),
        (
            post("/v1/generate", json={"prompt": "x", "max_new_tokens": 10**6}),
            422,
            "max_new_tokens",
        ),
        (post("/v1/forward", json={"tokens": [1, 999]}), 422, "[0, 256)"),
        (post("/v1/forward", json={"tokens": list(range(65))}), 413, "64"),
        (post("/v1/forward", content=b"tokens=1"), 415, "application/json"),
    ]
    for response, status, reason in cases:
        assert response.status_code == status, response.text
        error = response.json()["error"]
        assert reason in error and "\n" not in error


def test_faults_readiness_overflow_disconnect_and_drain(servers: Servers) -> None:
    early, server = servers.faulty_while_loading, servers.faulty
    assert early.status_code == 503 and "loading" in early.json()["reason"]
    wait_ready(server)
    asyncio.run(_poison_overflow_and_disconnect(server))
    _drain_on_sigterm(server)


async def _poison_overflow_and_disconnect(server: Server) -> None:
    async with httpx.AsyncClient(base_url=server.url, timeout=60) as client:

        def generate(prompt: str, tokens: int) -> asyncio.Task[httpx.Response]:
            body = {"prompt": prompt, "max_new_tokens": tokens, "temperature": 0}
            return asyncio.ensure_future(client.post("/v1/generate", json=body))

        # A poisoned request fails alone, beside one in the same decoding batch.
        poisoned, beside = await asyncio.gather(generate("POISON!", 2), generate("def ", 2))
        assert poisoned.status_code == 500 and "injected fault" in poisoned.json()["error"]
        assert beside.status_code == 200 and beside.json()["num_tokens"] == 2
        # Two long generations fill the batch; two more fill the queue; the next is refused.
        running = [generate("def ", 15), generate("x = ", 15)]
        await asyncio.sleep(0.5)
        async with httpx.AsyncClient(base_url=server.url, timeout=0.8) as impatient:
            body = {"prompt": "bye", "max_new_tokens": 2, "temperature": 0}
            leaving = asyncio.ensure_future(impatient.post("/v1/generate", json=body))
            queued = generate("class", 2)
            await asyncio.sleep(0.3)
            refused = await client.post("/v1/generate", json={"prompt": "late"})
            assert refused.status_code == 503 and refused.headers["retry-after"] == "7"
            with pytest.raises(httpx.TimeoutException):
                await leaving  # its client gives up and disconnects: its place is freed
        await asyncio.sleep(0.3)
        taken = generate("after", 2)  # in the place the disconnected request left
        answers = [await task for task in [*running, queued, taken]]
        assert [a.status_code for a in answers] == [200] * 4, [a.text for a in answers]
    samples = metric_samples(server)
    outcome = (("endpoint", "/v1/generate"), ("outcome", "disconnected"))
    assert samples[("steadytrain_serve_requests_total", outcome)] == 1
    assert samples[("steadytrain_serve_rejections_total", (("reason", "queue_full"),))] == 1
    assert samples[("steadytrain_serve_batch_failures_total", (("kind", "generate"),))] >= 1
    # The disconnected request never ran: the poison's neighbour 2 tokens, the long ones 15
    # each, the queued one and the one that took the freed place 2 each.
    assert samples[("steadytrain_serve_generated_tokens_total", ())] == 2 + 15 * 2 + 2 * 2


def _drain_on_sigterm(server: Server) -> None:
    async def during_drain() -> httpx.Response:
        async with httpx.AsyncClient(base_url=server.url, timeout=30) as client:
            body = {"prompt": "def ", "max_new_tokens": 10, "temperature": 0}
            request = asyncio.ensure_future(client.post("/v1/generate", json=body))
            await asyncio.sleep(0.5)
            server.process.send_signal(signal.SIGTERM)
            return await request

    answer = asyncio.run(during_drain())
    assert answer.status_code == 200 and answer.json()["num_tokens"] == 10
    assert server.process.wait(timeout=30) == 0, server.output()
    with pytest.raises(httpx.ConnectError):
        httpx.get(f"{server.url}/healthz", timeout=2)
    assert "stopped" in server.output()


def test_a_corrupted_checkpoint_is_refused_with_one_line(reference: Path, tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    shutil.copytree(reference, run_dir)
    weights = run_dir / "checkpoints" / "step_00000024" / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-100] ^= 0xFF  # a flipped byte in the tensors' data
    weights.write_bytes(bytes(data))
    command = [str(Path(sys.executable).parent / "steadytrain"), "serve", str(run_dir)]
    served = subprocess.run(
        [*command, "--checkpoint", "24", "--port", str(free_port())],
        capture_output=True,
        text=True,
        env=cli_env(),
        timeout=90,
    )
    assert served.returncode == EXIT_CHECKPOINT_BAD, served.stderr
    errors = [line for line in served.stderr.splitlines() if "error" in line]
    assert len(errors) == 1 and "model.safetensors: checksum mismatch" in errors[0], served.stderr
    assert "Traceback" not in served.stderr
