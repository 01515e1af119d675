"""The seed's flow end to end: `llmctl serve`, the four `llmctl` setup commands, then the official
OpenAI Python SDK against the gateway, with a local mock standing in for api.openai.com."""

import base64
import json
import struct
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import httpx
import openai
import pytest

from serve import llmctl_serve

UPSTREAM_KEY = "sk-upstream-e2e-0123456789"
CLIENT_KEY = "vk-front-1234"


class MockOpenAI(BaseHTTPRequestHandler):
    """Answers like api.openai.com and records what it received."""

    seen = []

    def log_message(self, *args):
        pass

    def send_json(self, status, payload, headers=()):
        data = json.dumps(payload).encode()
        self.send_response(status)
        self.send_header("content-type", "application/json")
        self.send_header("x-request-id", "req_0b2a28d2d6414b5a94c1c7933cf7c1a6")
        for name, value in headers:
            self.send_header(name, value)
        self.send_header("content-length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def do_POST(self):
        body = json.loads(self.rfile.read(int(self.headers["content-length"])))
        MockOpenAI.seen.append((self.path, dict(self.headers), body))
        if self.headers.get("authorization") != f"Bearer {UPSTREAM_KEY}":
            return self.send_json(401, {"error": {"message": "Incorrect API key provided", "type": "invalid_request_error", "param": None, "code": "invalid_api_key"}})
        if self.path == "/v1/embeddings":
            vector = [0.25, -0.5, 1.0]
            if body.get("encoding_format") == "base64":
                embedding = base64.b64encode(struct.pack("<3f", *vector)).decode()
            else:
                embedding = vector
            return self.send_json(200, {"object": "list", "data": [{"object": "embedding", "index": 0, "embedding": embedding}],
                                        "model": body["model"], "usage": {"prompt_tokens": 2, "total_tokens": 2}})
        if self.path != "/v1/chat/completions":
            return self.send_json(404, {"error": {"message": "not found", "type": "invalid_request_error", "param": None, "code": None}})
        model = body["model"]
        wants_tools = bool(body.get("tools"))
        if not body.get("stream"):
            message = {"role": "assistant", "content": "Hello from the mock!", "refusal": None}
            finish = "stop"
            if wants_tools:
                message = {"role": "assistant", "content": None, "tool_calls": [
                    {"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": "{\"city\":\"Paris\"}"}}]}
                finish = "tool_calls"
            return self.send_json(200, {"id": "chatcmpl-1", "object": "chat.completion", "created": 1755133833, "model": model,
                                        "choices": [{"index": 0, "message": message, "logprobs": None, "finish_reason": finish}],
                                        "usage": {"prompt_tokens": 8, "completion_tokens": 9, "total_tokens": 17}})
        include_usage = bool((body.get("stream_options") or {}).get("include_usage"))
        base = {"id": "chatcmpl-2", "object": "chat.completion.chunk", "created": 1755137933, "model": model}
        if wants_tools:
            deltas = [
                ({"role": "assistant", "content": None, "tool_calls": [{"index": 0, "id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": ""}}]}, None),
                ({"tool_calls": [{"index": 0, "function": {"arguments": "{\"city\":"}}]}, None),
                ({"tool_calls": [{"index": 0, "function": {"arguments": "\"Paris\"}"}}]}, None),
                ({}, "tool_calls"),
            ]
        else:
            deltas = [({"role": "assistant", "content": ""}, None), ({"content": "Hello"}, None), ({"content": " world"}, None), ({}, "stop")]
        self.send_response(200)
        self.send_header("content-type", "text/event-stream; charset=utf-8")
        self.end_headers()
        for delta, finish in deltas:
            chunk = dict(base, choices=[{"index": 0, "delta": delta, "finish_reason": finish}])
            if include_usage:
                chunk["usage"] = None
            self.wfile.write(f"data: {json.dumps(chunk)}\n\n".encode())
            self.wfile.flush()
        if include_usage:
            usage = dict(base, choices=[], usage={"prompt_tokens": 12, "completion_tokens": 3, "total_tokens": 15})
            self.wfile.write(f"data: {json.dumps(usage)}\n\n".encode())
        self.wfile.write(b"data: [DONE]\n\n")
        self.wfile.flush()
        self.close_connection = True


@pytest.fixture(scope="module")
def gateway(tmp_path_factory):
    upstream = ThreadingHTTPServer(("127.0.0.1", 0), MockOpenAI)
    threading.Thread(target=upstream.serve_forever, daemon=True).start()
    upstream_url = f"http://127.0.0.1:{upstream.server_address[1]}"
    try:
        with llmctl_serve(tmp_path_factory.mktemp("openai-e2e")) as gw:
            # The seed's four setup commands, names for IDs.
            gw.llmctl("connection", "add", "--name", "OpenAI-Main", "--provider", "openai",
                      "--endpoint", upstream_url, "--api-key", UPSTREAM_KEY)
            gw.llmctl("model", "add", "--conn-id", "OpenAI-Main", "--name", "gpt-4-turbo", "--remote", "gpt-4-turbo-preview")
            gw.llmctl("vkey", "add", "--name", "Frontend-App", "--key", CLIENT_KEY)
            gw.llmctl("assign", "--vkey-id", "Frontend-App", "--model-id", "gpt-4-turbo", "--alias", "gpt-4", "--tps", "50")
            gw.llmctl("model", "add", "--conn-id", "OpenAI-Main", "--name", "text-embedding-3-small", "--remote", "text-embedding-3-small")
            gw.llmctl("assign", "--vkey-id", "Frontend-App", "--model-id", "text-embedding-3-small", "--alias", "embed")
            gw.llmctl("assign", "--vkey-id", "Frontend-App", "--model-id", "gpt-4-turbo", "--alias", "slow-lane", "--tps", "1")
            client = openai.OpenAI(api_key=CLIENT_KEY, base_url=f"http://localhost:{gw.api_port}", max_retries=0)
            gw.wait_for_aliases(client, {"gpt-4", "embed", "slow-lane"})
            yield {"client": client, "api_port": gw.api_port}
    finally:
        upstream.shutdown()


def test_chat(gateway):
    answer = gateway["client"].chat.completions.create(model="gpt-4", messages=[{"role": "user", "content": "Hello!"}])
    assert answer.choices[0].message.content == "Hello from the mock!"
    assert answer.usage.total_tokens == 17
    path, headers, body = MockOpenAI.seen[-1]
    assert path == "/v1/chat/completions" and body["model"] == "gpt-4-turbo-preview"
    assert CLIENT_KEY not in json.dumps(headers)


def test_stream_without_usage(gateway):
    chunks = list(gateway["client"].chat.completions.create(model="gpt-4", messages=[{"role": "user", "content": "hi"}], stream=True))
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == "Hello world"
    assert all(c.choices for c in chunks), "no usage-only chunk when the client did not ask"
    assert MockOpenAI.seen[-1][2]["stream_options"]["include_usage"] is True


def test_stream_with_usage(gateway):
    chunks = list(gateway["client"].chat.completions.create(
        model="gpt-4", messages=[{"role": "user", "content": "hi"}], stream=True, stream_options={"include_usage": True}))
    assert chunks[-1].choices == [] and chunks[-1].usage.total_tokens == 15


def test_tool_call_deltas_are_relayed_intact(gateway):
    tools = [{"type": "function", "function": {"name": "get_weather", "parameters": {"type": "object", "properties": {"city": {"type": "string"}}}}}]
    chunks = list(gateway["client"].chat.completions.create(model="gpt-4", messages=[{"role": "user", "content": "weather?"}], tools=tools, stream=True))
    calls = [tc for c in chunks for tc in (c.choices[0].delta.tool_calls or [])]
    assert calls[0].id == "call_1" and calls[0].function.name == "get_weather"
    assert "".join(tc.function.arguments or "" for tc in calls) == '{"city":"Paris"}'
    assert chunks[-1].choices[0].finish_reason == "tool_calls"


def test_embeddings_base64_default_and_float(gateway):
    client = gateway["client"]
    default = client.embeddings.create(model="embed", input="hello")
    assert default.data[0].embedding == [0.25, -0.5, 1.0]
    assert MockOpenAI.seen[-1][2]["encoding_format"] == "base64"
    floats = client.embeddings.create(model="embed", input="hello", encoding_format="float")
    assert floats.data[0].embedding == [0.25, -0.5, 1.0]


def test_models_list_shows_only_the_callers_aliases(gateway):
    assert sorted(m.id for m in gateway["client"].models.list()) == ["embed", "gpt-4", "slow-lane"]


def test_wrong_key_is_authentication_error(gateway):
    bad = openai.OpenAI(api_key="vk-nope-0000", base_url=f"http://localhost:{gateway['api_port']}", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        bad.chat.completions.create(model="gpt-4", messages=[{"role": "user", "content": "hi"}])


def test_unassigned_alias_is_not_found(gateway):
    with pytest.raises(openai.NotFoundError) as err:
        gateway["client"].chat.completions.create(model="gpt-5", messages=[{"role": "user", "content": "hi"}])
    assert err.value.code == "model_not_found"


def test_over_tps_is_rate_limit_error(gateway):
    client = gateway["client"]
    with pytest.raises(openai.RateLimitError) as err:
        for _ in range(5):
            client.chat.completions.create(model="slow-lane", messages=[{"role": "user", "content": "hi"}])
    assert err.value.response.headers.get("retry-after-ms")


def test_malformed_json_is_bad_request(gateway):
    client = gateway["client"]
    with pytest.raises(openai.BadRequestError):
        client.chat.completions.create(model="gpt-4", messages=[{"role": "user", "content": "hi"}], extra_body={"stream": "yes"})
    raw = httpx.post(f"http://localhost:{gateway['api_port']}/chat/completions", content=b'{"model": "gpt-4", "messages": [',
                     headers={"authorization": f"Bearer {CLIENT_KEY}", "content-type": "application/json"})
    assert isinstance(client._make_status_error_from_response(raw), openai.BadRequestError)
    assert raw.json()["error"]["type"] == "invalid_request_error"
