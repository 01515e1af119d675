"""Claude Code end to end (DESIGN §17, issue 16): the real CLI (`@anthropic-ai/claude-code`, from
the npm registry, installed into e2e/.node by scripts/test.sh) run as `claude -p "say hi"` against
`llmctl serve`, with the mock upstream (`llm-proxy-mock-upstream`) standing in for the Anthropic
API and for OpenAI. Claude Code speaks Anthropic Messages only (`POST /v1/messages?beta=true`,
`x-api-key`, `anthropic-version: 2023-06-01`, a long `anthropic-beta` list, always streaming,
with its system prompt, a dozen tools, thinking and `context_management`): on an `anthropic`
alias the request passes through, on an OpenAI alias it is translated both ways.

The CLI is found at $CLAUDE_CODE_BIN, else e2e/.node/node_modules/.bin/claude, else on PATH. The
tests skip only when npm itself is absent (nothing could have installed the CLI); with npm there
and the CLI missing they fail, naming the install command."""

import json
import os
import shutil
import subprocess
import time
from pathlib import Path

import anthropic
import pytest

from mock_upstream import mock_upstream
from serve import llmctl_serve

E2E = Path(__file__).resolve().parent
CLAUDE_CODE_VERSION = "2.1.197"
INSTALL = f"npm install --prefix e2e/.node @anthropic-ai/claude-code@{CLAUDE_CODE_VERSION}"
CLIENT_KEY = "vk-claude-code-e2e-2718"
ANTHROPIC_KEY = "sk-ant-api03-mock-upstream-0123456789abcdefABCDEF-xyzAA"  # anthropic::ANTHROPIC_KEY
OPENAI_KEY = "sk-upstream-openai-0123456789"  # openai::OPENAI_KEY
HELLO = "Hello from mock anthropic: "  # the mock Claude's answer starts so
OPENAI_STREAMED = "Hi there"  # the mock OpenAI's streamed answer
RUN_TIMEOUT_S = 120


def claude_binary():
    """The Claude Code CLI, or None when npm is absent (the only reason to skip)."""
    candidates = [os.environ.get("CLAUDE_CODE_BIN"), str(E2E / ".node" / "node_modules" / ".bin" / "claude"),
                  shutil.which("claude")]
    for candidate in candidates:
        if candidate and Path(candidate).is_file() and os.access(candidate, os.X_OK):
            return candidate
    if shutil.which("npm") is None:
        return None
    raise AssertionError(f"the Claude Code CLI is not installed: run `{INSTALL}` (scripts/test.sh does)")


@pytest.fixture(scope="module")
def claude():
    binary = claude_binary()
    if binary is None:
        pytest.skip("npm is not installed, so the Claude Code CLI (@anthropic-ai/claude-code) cannot be")
    return binary


@pytest.fixture(scope="module")
def gateway(tmp_path_factory, claude):
    scratch = tmp_path_factory.mktemp("claude-code-e2e")
    with mock_upstream() as mock:
        with llmctl_serve(scratch) as gw:
            gw.llmctl("connection", "add", "--name", "Anthropic", "--provider", "anthropic", "--endpoint", mock.url,
                      "--api-key", ANTHROPIC_KEY)
            gw.llmctl("connection", "add", "--name", "OpenAI", "--provider", "openai", "--endpoint", mock.url,
                      "--api-key", OPENAI_KEY)
            gw.llmctl("vkey", "add", "--name", "Claude-Code", "--key", CLIENT_KEY)
            gw.llmctl("model", "add", "--conn-id", "Anthropic", "--name", "sonnet", "--remote", "claude-sonnet-4-5-20250929")
            gw.llmctl("assign", "--vkey-id", "Claude-Code", "--model-id", "sonnet", "--alias", "team-claude")
            gw.llmctl("model", "add", "--conn-id", "OpenAI", "--name", "gpt", "--remote", "gpt-4o")
            gw.llmctl("assign", "--vkey-id", "Claude-Code", "--model-id", "gpt", "--alias", "team-gpt")
            base_url = f"http://127.0.0.1:{gw.api_port}"
            client = anthropic.Anthropic(api_key=CLIENT_KEY, base_url=base_url, max_retries=0)
            while {"team-claude", "team-gpt"} - {m.id for m in client.models.list()}:
                assert time.monotonic() < gw.deadline, "the data plane never got the assignments"
                time.sleep(0.05)
            yield {"base_url": base_url, "mock": mock, "log": gw.log_path, "scratch": scratch}


def run_claude(claude, gateway, alias, home):
    """`claude -p "say hi" --model ALIAS` on the gateway, with a scratch HOME; its result."""
    home.mkdir(parents=True, exist_ok=True)
    env = {
        "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
        "HOME": str(home),
        "ANTHROPIC_BASE_URL": gateway["base_url"],
        "ANTHROPIC_API_KEY": CLIENT_KEY,
        "DISABLE_TELEMETRY": "1",
        "CLAUDE_CODE_DISABLE_NONESSENTIAL_TRAFFIC": "1",
        "DISABLE_AUTOUPDATER": "1",
        "TERM": "dumb",
    }
    try:
        return subprocess.run([claude, "-p", "say hi", "--model", alias], env=env, cwd=home, capture_output=True,
                              text=True, timeout=RUN_TIMEOUT_S, stdin=subprocess.DEVNULL)
    except subprocess.TimeoutExpired as timeout:
        raise AssertionError(f"claude did not finish within {RUN_TIMEOUT_S} s; stdout={timeout.stdout!r} "
                             f"stderr={timeout.stderr!r}\ngateway log:\n{gateway['log'].read_text()[-4000:]}") from None


def describe(result, gateway, mark):
    requests = [{k: r[k] for k in ("method", "path", "query")} for r in gateway["mock"].requests()[mark:]]
    return (f"exit {result.returncode}\nstdout: {result.stdout!r}\nstderr: {result.stderr[-3000:]!r}\n"
            f"upstream requests: {json.dumps(requests)}\ngateway log:\n{gateway['log'].read_text()[-4000:]}")


def test_claude_code_on_an_anthropic_alias(claude, gateway, tmp_path):
    mock = gateway["mock"]
    mark = len(mock.requests())
    result = run_claude(claude, gateway, "team-claude", tmp_path / "home")
    assert result.returncode == 0 and HELLO in result.stdout and "say hi" in result.stdout, describe(result, gateway, mark)
    calls = [r for r in mock.requests()[mark:] if r["path"] == "/v1/messages"]
    assert calls, describe(result, gateway, mark)
    call = calls[-1]
    # Passed through: Claude Code's own headers and body, only the model rewritten.
    assert call["headers"]["x-api-key"] == ANTHROPIC_KEY and CLIENT_KEY not in json.dumps(call["headers"])
    assert call["headers"]["anthropic-version"] == "2023-06-01"
    assert "claude-code-20250219" in call["headers"].get("anthropic-beta", "")
    assert call["body"]["model"] == "claude-sonnet-4-5-20250929" and call["body"]["stream"] is True
    assert call["body"]["tools"] and call["body"]["system"]


def test_claude_code_on_an_openai_alias(claude, gateway, tmp_path):
    mock = gateway["mock"]
    mark = len(mock.requests())
    result = run_claude(claude, gateway, "team-gpt", tmp_path / "home")
    assert result.returncode == 0 and OPENAI_STREAMED in result.stdout, describe(result, gateway, mark)
    calls = [r for r in mock.requests()[mark:] if r["path"] == "/v1/chat/completions"]
    assert calls, describe(result, gateway, mark)
    call = calls[-1]
    assert call["headers"]["authorization"] == f"Bearer {OPENAI_KEY}"
    body = call["body"]
    assert body["model"] == "gpt-4o" and body["stream"] is True
    assert body["tools"] and all(t["type"] == "function" for t in body["tools"])
    assert any("say hi" in json.dumps(m) for m in body["messages"])
