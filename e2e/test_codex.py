"""Codex CLI end to end (DESIGN §17, issue 17): the real CLI (`@openai/codex`, from the npm
registry, installed into e2e/.node by scripts/test.sh) run as `codex exec "say hi"` against
`llmctl serve`, with the mock upstream (`llm-proxy-mock-upstream`) standing in for OpenAI and for
the Anthropic API. Codex speaks the OpenAI Responses API only: on an OpenAI alias the request
passes through (only `model` rewritten), on an `anthropic` alias it is translated both ways.
Between Codex and the gateway sits a recording relay (`Tap`), so the tests compare what Codex sent
with what the mock received.

What Codex 0.171.0 does (found with a capture server answering a minimal Responses stream):
- Requests: one `POST {base_url}/responses` per model turn, nothing else on the provider (no
  `GET /models`: a custom provider gets fallback model metadata and a warning; no
  `/responses/compact` for a short chat; no `previous_response_id`, ever: `store: false` and the
  whole conversation in `input`).
- Headers: `authorization: Bearer <$env_key>`, `accept: text/event-stream`, `content-type:
  application/json`, `accept-encoding: zstd,gzip` (the request body itself is not compressed for a
  custom provider), `originator: codex_exec`, `user-agent: codex_exec/0.171.0 (...)`,
  `session-id`, `thread-id`, `x-client-request-id`, `x-codex-window-id`,
  `x-codex-beta-features: remote_compaction_v2`, `x-codex-turn-metadata` (a JSON string).
- Body (~40 KB, compact JSON): `model`, `stream: true`, `input` (two `developer` messages — the
  17 KB instructions, then skills/permissions — and two `user` messages — `<environment_context>`
  and the prompt — each `{"type":"message","id":"msg_…","role",content:[input_text…]}`), `tools`
  (seven `function` tools with `strict: false` — exec_command, write_stdin, request_user_input,
  view_image, get_goal, create_goal, update_goal —, one `namespace` `multi_agent_v1` holding nested
  function tools, and `{"type":"web_search","external_web_access":false}`), `tool_choice: "auto"`,
  `parallel_tool_calls: true`, `reasoning: {"summary":"auto"}`, `store: false`,
  `include: ["reasoning.encrypted_content"]`, `prompt_cache_key`, `client_metadata`.
- Answer: it prints the final message text alone on stdout; stderr carries the banner, warnings,
  the transcript and "tokens used\\n48". Exit 0 in under a second. It needs `response.completed`:
  a stream that ends without it is "stream disconnected before completion: stream closed before
  response.completed", retried (`stream_max_retries`, default 5) and then exit 1. It accepts a
  `response.completed` whose usage lacks `output_tokens_details`, has it null, or has no usage
  at all (then no "tokens used"); reasoning items with `encrypted_content` are accepted.
- Errors: 400 → exit 1 at once, the body printed; 401 and 404 → retried five times, exit 1; 500 →
  retried (30 requests, 26 s by default); connection refused → "Reconnecting... waiting for
  network" for ever. Hence `request_max_retries=0` and `stream_max_retries=0` on the provider here
  and a timeout on the run.
- A `function_call` of a tool it does not have (`get_weather`): it logs "unsupported call", sends a
  second request with the whole conversation plus the `function_call` and a `function_call_output`
  "unsupported call: get_weather", and prints the answer to that. Calls of its own tools would run
  commands in its sandbox, so these tests keep to text answers.
- Offline: by default it runs `git ls-remote https://github.com/openai/plugins.git` and resolves
  api.github.com and chatgpt.com (plugins) and ab.chatgpt.com (analytics); `--disable plugins` and
  `-c analytics.enabled=false` stop all of it. Harmless warnings: bubblewrap missing (it uses its
  bundled one), no model metadata for the alias, no helper binaries under a temporary
  CODEX_HOME. With stdin not a terminal it reads stdin and appends it to the prompt, so it gets
  /dev/null.

The CLI is found at $CODEX_BIN, else e2e/.node/node_modules/.bin/codex, else on PATH. The tests
skip only when npm itself is absent; with npm there and the CLI missing they fail, naming the
install command."""

import http.client
import json
import os
import shutil
import subprocess
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import openai
import pytest

from mock_upstream import mock_upstream
from serve import llmctl_serve

E2E = Path(__file__).resolve().parent
CODEX_VERSION = "0.171.0"
# Both CLIs in one install: a second `npm install` into the prefix would remove the first (scripts/test.sh).
INSTALL = f"npm install --prefix e2e/.node @anthropic-ai/claude-code@2.1.197 @openai/codex@{CODEX_VERSION}"
CLIENT_KEY = "vk-codex-e2e-1618"
OPENAI_KEY = "sk-upstream-openai-0123456789"  # responses/openai::OPENAI_KEY
ANTHROPIC_KEY = "sk-ant-api03-mock-upstream-0123456789abcdefABCDEF-xyzAA"  # anthropic::ANTHROPIC_KEY
OPENAI_REMOTE = "gpt-5.1-codex"  # a reasoning model: the mock adds a reasoning item, as Codex's models do
ANTHROPIC_REMOTE = "claude-sonnet-4-5-20250929"
RESPONSES_HELLO = "Hello from mock responses: turn "  # responses::TEXT_PREFIX, then the user-message count
ANTHROPIC_HELLO = "Hello from mock anthropic: "  # then the last user text
PROMPT = "say hi"
RUN_TIMEOUT_S = 120


def codex_binary():
    """The Codex CLI, or None when npm is absent (the only reason to skip)."""
    candidates = [os.environ.get("CODEX_BIN"), str(E2E / ".node" / "node_modules" / ".bin" / "codex"),
                  shutil.which("codex")]
    for candidate in candidates:
        if candidate and Path(candidate).is_file() and os.access(candidate, os.X_OK):
            return candidate
    if shutil.which("npm") is None:
        return None
    raise AssertionError(f"the Codex CLI is not installed: run `{INSTALL}` (scripts/test.sh does)")


class Tap:
    """A recording HTTP relay in front of the gateway: forwards each request as received and
    relays the answer as it arrives (re-chunked), keeping every request (method, path, headers,
    raw body) in `requests`."""

    def __init__(self, target_port):
        self.requests = []
        tap = self

        class Relay(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def relay(self):
                body = self.rfile.read(int(self.headers.get("content-length") or 0))
                record = {"method": self.command, "path": self.path,
                          "headers": {k.lower(): v for k, v in self.headers.items()}, "body": body}
                tap.requests.append(record)
                upstream = http.client.HTTPConnection("127.0.0.1", target_port, timeout=RUN_TIMEOUT_S)
                try:
                    headers = {k: v for k, v in self.headers.items() if k.lower() not in ("host", "connection")}
                    upstream.request(self.command, self.path, body=body, headers=headers)
                    answer = upstream.getresponse()
                    record["status"] = answer.status
                    self.send_response(answer.status)
                    for name, value in answer.getheaders():
                        if name.lower() not in ("content-length", "transfer-encoding", "connection"):
                            self.send_header(name, value)
                    self.send_header("transfer-encoding", "chunked")
                    self.end_headers()
                    while chunk := answer.read1(65536):
                        if answer.status != 200:
                            record["answer"] = record.get("answer", b"") + chunk
                        self.wfile.write(b"%x\r\n%s\r\n" % (len(chunk), chunk))
                        self.wfile.flush()
                    self.wfile.write(b"0\r\n\r\n")
                finally:
                    upstream.close()

            do_GET = do_POST = do_DELETE = relay

            def log_message(self, *args):
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Relay)
        self.server.daemon_threads = True
        self.port = self.server.server_address[1]
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture(scope="module")
def codex():
    binary = codex_binary()
    if binary is None:
        pytest.skip("npm is not installed, so the Codex CLI (@openai/codex) cannot be")
    return binary


@pytest.fixture(scope="module")
def gateway(tmp_path_factory, codex):
    scratch = tmp_path_factory.mktemp("codex-e2e")
    with mock_upstream() as mock:
        with llmctl_serve(scratch) as gw:
            gw.llmctl("connection", "add", "--name", "OpenAI", "--provider", "openai", "--endpoint", mock.url,
                      "--api-key", OPENAI_KEY)
            gw.llmctl("connection", "add", "--name", "Anthropic", "--provider", "anthropic", "--endpoint", mock.url,
                      "--api-key", ANTHROPIC_KEY)
            gw.llmctl("vkey", "add", "--name", "Codex", "--key", CLIENT_KEY)
            gw.llmctl("model", "add", "--conn-id", "OpenAI", "--name", "codex-gpt", "--remote", OPENAI_REMOTE)
            gw.llmctl("assign", "--vkey-id", "Codex", "--model-id", "codex-gpt", "--alias", "team-gpt")
            gw.llmctl("model", "add", "--conn-id", "Anthropic", "--name", "codex-claude", "--remote", ANTHROPIC_REMOTE)
            gw.llmctl("assign", "--vkey-id", "Codex", "--model-id", "codex-claude", "--alias", "team-claude")
            client = openai.OpenAI(api_key=CLIENT_KEY, base_url=f"http://127.0.0.1:{gw.api_port}/v1", max_retries=0)
            gw.wait_for_aliases(client, {"team-gpt", "team-claude"})
            with Tap(gw.api_port) as tap:
                yield {"mock": mock, "tap": tap, "log": gw.log_path}


def run_codex(codex, gateway, alias, home):
    """`codex exec "say hi" -m ALIAS` through the tap to the gateway, with a scratch HOME and
    CODEX_HOME, offline (no plugin sync, no analytics), without retries; its result."""
    codex_home = home / ".codex"
    codex_home.mkdir(parents=True, exist_ok=True)
    provider = ('{name="llm-proxy",base_url="http://127.0.0.1:%d/v1",env_key="LLM_PROXY_KEY",wire_api="responses",'
                'request_max_retries=0,stream_max_retries=0}' % gateway["tap"].port)
    env = {
        "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
        "HOME": str(home),
        "CODEX_HOME": str(codex_home),
        "LLM_PROXY_KEY": CLIENT_KEY,
        "TERM": "dumb",
    }
    command = [codex, "exec", "--skip-git-repo-check", "--disable", "plugins", "-c", "analytics.enabled=false",
               "-c", "model_provider=llm-proxy", "-c", f"model_providers.llm-proxy={provider}", "-m", alias, PROMPT]
    try:
        return subprocess.run(command, env=env, cwd=home, capture_output=True, text=True, timeout=RUN_TIMEOUT_S,
                              stdin=subprocess.DEVNULL)
    except subprocess.TimeoutExpired as timeout:
        raise AssertionError(f"codex did not finish within {RUN_TIMEOUT_S} s; stdout={timeout.stdout!r} "
                             f"stderr={timeout.stderr!r}\ngateway log:\n{gateway['log'].read_text()[-4000:]}") from None


def describe(result, gateway, mark, tap_mark):
    requests = [{k: r[k] for k in ("method", "path", "query")} for r in gateway["mock"].requests()[mark:]]
    answers = [(r["method"], r["path"], r.get("status"), r.get("answer", b"")[:2000]) for r in gateway["tap"].requests[tap_mark:]]
    return (f"exit {result.returncode}\nstdout: {result.stdout!r}\nstderr: {result.stderr[-3000:]!r}\n"
            f"gateway answers: {answers}\nupstream requests: {json.dumps(requests)}\n"
            f"gateway log:\n{gateway['log'].read_text()[-4000:]}")


def codex_request(gateway, tap_mark):
    """The one request Codex sent for its one turn, checked against what Codex 0.171.0 sends."""
    sent = gateway["tap"].requests[tap_mark:]
    assert [(r["method"], r["path"]) for r in sent] == [("POST", "/v1/responses")], sent
    [request] = sent
    assert request["headers"]["authorization"] == f"Bearer {CLIENT_KEY}"
    body = json.loads(request["body"])
    assert body["stream"] is True and body["store"] is False
    assert body["include"] == ["reasoning.encrypted_content"]
    roles = [item.get("role") for item in body["input"] if item.get("type") == "message"]
    assert roles.count("developer") >= 1 and roles[-1] == "user"
    tool_types = {tool["type"] for tool in body["tools"]}
    assert {"function", "namespace", "web_search"} <= tool_types, tool_types
    return request, body


def test_codex_on_an_openai_alias(codex, gateway, tmp_path):
    mock, tap = gateway["mock"], gateway["tap"]
    mark, tap_mark = len(mock.requests()), len(tap.requests)
    result = run_codex(codex, gateway, "team-gpt", tmp_path / "home")
    assert result.returncode == 0 and RESPONSES_HELLO in result.stdout, describe(result, gateway, mark, tap_mark)
    sent, sent_body = codex_request(gateway, tap_mark)
    calls = [r for r in mock.requests()[mark:] if r["method"] == "POST"]
    assert [c["path"] for c in calls] == ["/v1/responses"], describe(result, gateway, mark, tap_mark)
    [call] = calls
    # Passed through: Codex's body byte for byte, only `model` rewritten; the upstream key, not the virtual key.
    alias_member = b'"model":"team-gpt"'
    assert sent["body"].count(alias_member) == 1
    assert call["body_text"].encode() == sent["body"].replace(alias_member, f'"model":"{OPENAI_REMOTE}"'.encode())
    assert call["body"] == dict(sent_body, model=OPENAI_REMOTE)
    assert call["headers"]["authorization"] == f"Bearer {OPENAI_KEY}"
    assert CLIENT_KEY not in json.dumps(call["headers"])
    # Codex printed the mock's answer, and only that, on stdout.
    assert result.stdout.strip().startswith(RESPONSES_HELLO), result.stdout


def test_codex_on_an_anthropic_alias(codex, gateway, tmp_path):
    mock = gateway["mock"]
    mark, tap_mark = len(mock.requests()), len(gateway["tap"].requests)
    result = run_codex(codex, gateway, "team-claude", tmp_path / "home")
    assert result.returncode == 0 and ANTHROPIC_HELLO in result.stdout, describe(result, gateway, mark, tap_mark)
    assert PROMPT in result.stdout, result.stdout
    _, sent_body = codex_request(gateway, tap_mark)
    calls = [r for r in mock.requests()[mark:] if r["method"] == "POST"]
    assert [c["path"] for c in calls] == ["/v1/messages"], describe(result, gateway, mark, tap_mark)
    [call] = calls
    assert call["headers"]["x-api-key"] == ANTHROPIC_KEY and CLIENT_KEY not in json.dumps(call["headers"])
    body = call["body"]
    assert body["model"] == ANTHROPIC_REMOTE and body["stream"] is True
    # Codex's developer messages became the system prompt.
    system = body["system"] if isinstance(body["system"], str) else "".join(part["text"] for part in body["system"])
    developer_texts = [part["text"] for item in sent_body["input"] if item.get("role") == "developer"
                       for part in item["content"]]
    assert developer_texts and all(text in system for text in developer_texts)
    assert all(message["role"] in ("user", "assistant") for message in body["messages"])
    assert PROMPT in json.dumps(body["messages"][-1])
    # Only Codex's function tools were offered: web_search and the namespace were dropped.
    function_names = {tool["name"] for tool in sent_body["tools"] if tool["type"] == "function"}
    offered = body["tools"]
    assert {tool["name"] for tool in offered} == function_names
    assert all("input_schema" in tool and tool.get("type") in (None, "custom") for tool in offered), offered
