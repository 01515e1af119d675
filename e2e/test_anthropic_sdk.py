"""Anthropic Messages end to end (DESIGN §17, issue 16): `llmctl serve`, the `llmctl` setup
commands, then the official `anthropic` Python SDK (and raw HTTP, and the OpenAI SDK) against the
gateway, with the mock upstream (`llm-proxy-mock-upstream`, see mock_upstream.py) standing in for
the Anthropic API, Claude on Bedrock (InvokeModel and Bedrock's Messages endpoint), Claude on
Vertex (`rawPredict`), OpenAI, Gemini and Bedrock Converse.

- Passthrough: Messages clients on Messages-speaking targets (`NATIVE`). The upstream must get the
  client's body byte for byte except `model` (InvokeModel and Vertex: `model` replaced by the
  body's `anthropic_version`, InvokeModel without `stream` and with the `anthropic-beta` header as
  an `anthropic_beta` array), and the `anthropic-version` / `anthropic-beta` headers unchanged.
  Thinking blocks and their signatures travel both ways untouched.
- Translation: the same SDK on OpenAI, Gemini and Bedrock Converse targets (`TRANSLATED`), and the
  OpenAI SDK on Claude.
- Errors in Anthropic's shapes, the SDK's own exception classes, usage in the metrics.

What the mock answers (the mock-upstream crate's `anthropic` module): a `thinking` block with
THINKING_SIGNATURE when thinking is enabled; a `tool_use` of the first offered tool when the last
user turn says "weather"; "The tool said: ..." for a `tool_result`; else
"Hello from mock anthropic: <last user text>"; usage 25 in / 12 out, plus 1024 cache-creation and
2048 cache-read tokens when the request has `cache_control` anywhere."""

import json
import re
import time
import urllib.request
from urllib.parse import quote, unquote

import anthropic
import httpx
import openai
import pytest

from mock_upstream import mock_upstream
from serve import ROOT, llmctl_serve

CLIENT_KEY = "vk-anthropic-e2e-3141"
# The mock's credentials: anthropic::ANTHROPIC_KEY, the Bedrock ones (see test_bedrock_openai_sdk),
# openai::OPENAI_KEY, google::GEMINI_KEY and the fixture service account (Vertex).
ANTHROPIC_KEY = "sk-ant-api03-mock-upstream-0123456789abcdefABCDEF-xyzAA"
ACCESS_KEY_ID = "AKIAIOSFODNN7EXAMPLE"
SECRET_ACCESS_KEY = "wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY"
BEDROCK_API_KEY = "ABSKQmVkcm9ja0FQSUtleS1leGFtcGxlLWF0LTEyMzQ1Njc4OTAxMjpabTl2WW1GeVltRjZjWFY0"
REGION = "us-east-1"
OPENAI_KEY = "sk-upstream-openai-0123456789"
STUDIO_KEY = "AIzaSyA1b2C3d4E5f6G7h8I9j0KlMnOpQrStUvW"
SERVICE_ACCOUNT = ROOT / "mock-upstream" / "fixtures" / "google" / "test-service-account.json"
PROJECT, LOCATION = "llm-proxy-test", "us-central1"

# What the mock's Claude answers with (anthropic::THINKING_TEXT, THINKING_SIGNATURE, TOOL_USE_ID,
# CACHE_CREATION_TOKENS, CACHE_READ_TOKENS; the default usage).
HELLO = "Hello from mock anthropic: "
THINKING_TEXT = "The user greets me; a short friendly answer fits."
THINKING_SIGNATURE = "EqQBCkgIARABGAIiQMockSignatureOfTheThinkingBlock0123456789+/abcdefghijklmnopq=="
TOOL_USE_ID = "toolu_01A09q90qw90lq917835lq9"
TOOL_INPUT = {"location": "Paris"}
INPUT_TOKENS, OUTPUT_TOKENS = 25, 12
CACHE_CREATION, CACHE_READ = 1024, 2048
BEDROCK_VERSION, VERTEX_VERSION = "bedrock-2023-05-31", "vertex-2023-10-16"

# What the Python SDK sends, and what Claude Code sends.
SDK_VERSION = "2026-10-21"
CLASSIC_VERSION = "2023-06-01"
BETAS = ["interleaved-thinking-2025-05-14", "context-management-2025-06-27"]
BETA_HEADER = ",".join(BETAS)

# Messages-speaking targets: alias, remote model and how the upstream is called.
NATIVE = {
    "anthropic": {"alias": "claude", "remote": "claude-sonnet-4-5-20250929", "route": "anthropic"},
    "bedrock-invoke": {"alias": "bedrock-claude", "remote": "us.anthropic.claude-3-5-sonnet-20241022-v2:0",
                       "route": "invoke"},
    "bedrock-messages": {"alias": "bedrock-messages-claude", "remote": "us.anthropic.claude-sonnet-4-5-20250929-v1:0",
                         "route": "bedrock-messages"},
    "vertex": {"alias": "vertex-claude", "remote": "claude-sonnet-4-5@20250929", "route": "vertex"},
}
WEATHER_TOOL = {"name": "get_weather", "description": "Current weather in a city",
                "input_schema": {"type": "object", "properties": {"location": {"type": "string"}},
                                 "required": ["location"]}}

# Translated targets: alias, the upstream paths (not streamed, streamed), and what their mock
# answers (text, streamed text, tool call id and input).
CONVERSE_MODEL = "amazon.nova-pro-v1:0"  # bedrock::NOVA_PRO: not Claude, so called through Converse
TRANSLATED = {
    "openai": {"alias": "gpt", "paths": ("/v1/chat/completions",) * 2,
               "text": "Hello!", "streamed": "Hi there", "tool_id": "call_1", "tool_input": {"city": "Paris"}},
    "gemini": {"alias": "gemini", "paths": ("/v1beta/models/gemini-2.5-flash:generateContent",
                                            "/v1beta/models/gemini-2.5-flash:streamGenerateContent"),
               "text": "It is 21°C.", "streamed": "It is 21°C.", "tool_id": None, "tool_input": {"city": "Paris"}},
    "converse": {"alias": "converse", "paths": (f"/model/{quote(CONVERSE_MODEL, safe='')}/converse",
                                                f"/model/{quote(CONVERSE_MODEL, safe='')}/converse-stream"),
                 "text": "Why did the chicken cross the road? To get to the other side.",
                 "streamed": "It is 21°C.", "tool_id": "tooluse_kZJMlvQmRJ6eAyJE5GIl7Q", "tool_input": {"city": "Paris"}},
}
CITY_TOOL = {"name": "get_weather", "description": "Current weather in a city",
             "input_schema": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}

SLOW_ALIAS = "claude-slow"


def cache_alias(name):
    return f"{NATIVE[name]['alias']}-cache"


@pytest.fixture(scope="module")
def gateway(tmp_path_factory):
    scratch = tmp_path_factory.mktemp("anthropic-e2e")
    with mock_upstream() as mock:
        key_file = scratch / "service-account.json"
        account = json.loads(SERVICE_ACCOUNT.read_text())
        account["token_uri"] = f"{mock.url}/token"
        key_file.write_text(json.dumps(account, indent=2) + "\n")
        with llmctl_serve(scratch) as gw:
            gw.llmctl("connection", "add", "--name", "Anthropic", "--provider", "anthropic", "--endpoint", mock.url,
                      "--api-key", ANTHROPIC_KEY, "--set", f"anthropic_version={CLASSIC_VERSION}")
            gw.llmctl("connection", "add", "--name", "Bedrock-SigV4", "--provider", "bedrock", "--endpoint", mock.url,
                      "--api-key", f"{ACCESS_KEY_ID}:{SECRET_ACCESS_KEY}", "--set", f"region={REGION}")
            gw.llmctl("connection", "add", "--name", "Bedrock-Messages", "--provider", "bedrock", "--endpoint", mock.url,
                      "--api-key", BEDROCK_API_KEY, "--set", f"region={REGION}", "--set", "anthropic_api=messages")
            gw.llmctl("connection", "add", "--name", "Vertex-SA", "--provider", "google", "--endpoint", mock.url,
                      "--api-key-file", str(key_file), "--set", "api=vertex", "--set", f"location={LOCATION}")
            gw.llmctl("connection", "add", "--name", "OpenAI", "--provider", "openai", "--endpoint", mock.url,
                      "--api-key", OPENAI_KEY)
            gw.llmctl("connection", "add", "--name", "Gemini", "--provider", "google", "--endpoint", mock.url,
                      "--api-key", STUDIO_KEY, "--set", "api=gemini")
            gw.llmctl("vkey", "add", "--name", "Claude-App", "--key", CLIENT_KEY)
            connections = {"anthropic": "Anthropic", "bedrock-invoke": "Bedrock-SigV4",
                           "bedrock-messages": "Bedrock-Messages", "vertex": "Vertex-SA"}
            aliases = set()

            def add(conn, name, remote, *assignments):
                gw.llmctl("model", "add", "--conn-id", conn, "--name", name, "--remote", remote)
                for alias, *limits in assignments:
                    gw.llmctl("assign", "--vkey-id", "Claude-App", "--model-id", name, "--alias", alias, *limits)
                    aliases.add(alias)

            for name, target in NATIVE.items():
                add(connections[name], f"{name}-model", target["remote"], (target["alias"],), (cache_alias(name),))
            gw.llmctl("assign", "--vkey-id", "Claude-App", "--model-id", "anthropic-model", "--alias", SLOW_ALIAS,
                      "--tps", "1", "--burst", "1")
            aliases.add(SLOW_ALIAS)
            add("OpenAI", "gpt-model", "gpt-4o", ("gpt",))
            add("Gemini", "gemini-model", "gemini-2.5-flash", ("gemini",))
            add("Bedrock-SigV4", "converse-model", CONVERSE_MODEL, ("converse",))
            base_url = f"http://127.0.0.1:{gw.api_port}"
            listing = anthropic.Anthropic(api_key=CLIENT_KEY, base_url=base_url, max_retries=0)
            while aliases - {m.id for m in listing.models.list()}:
                assert time.monotonic() < gw.deadline, "the data plane never got the assignments"
                time.sleep(0.05)
            yield {"base_url": base_url, "mock": mock, "gw": gw, "aliases": aliases}


class Sdk:
    """An `anthropic.Anthropic` client on the gateway that keeps every request it sent (`sent`)."""

    def __init__(self, base_url, key=CLIENT_KEY, **options):
        self.sent = []
        http = anthropic.DefaultHttpxClient(event_hooks={"request": [self.sent.append]})
        self.client = anthropic.Anthropic(api_key=key, base_url=base_url, max_retries=0, http_client=http, **options)
        self.messages = self.client.messages
        self.models = self.client.models


@pytest.fixture
def sdk(gateway):
    return Sdk(gateway["base_url"])


@pytest.fixture(params=list(NATIVE))
def native(request, gateway):
    return dict(NATIVE[request.param], name=request.param, mock=gateway["mock"])


@pytest.fixture(params=list(TRANSLATED))
def translated(request, gateway):
    return dict(TRANSLATED[request.param], name=request.param, mock=gateway["mock"])


# -- what went upstream ----------------------------------------------------------------------------


def seen(mock):
    return len(mock.requests())


def upstream_calls(mock, mark):
    """The model calls the mock received since `mark` (Google token exchanges left out)."""
    return [dict(r, raw=r["body_text"].encode()) for r in mock.requests()[mark:] if r["path"] != "/token"]


def expected_path(target, stream):
    route, remote = target["route"], target["remote"]
    if route == "anthropic":
        return "/v1/messages"
    if route == "bedrock-messages":
        return "/anthropic/v1/messages"
    if route == "invoke":
        return f"/model/{quote(remote, safe='')}/{'invoke-with-response-stream' if stream else 'invoke'}"
    return (f"/v1/projects/{PROJECT}/locations/{LOCATION}/publishers/anthropic/models/{remote}:"
            f"{'streamRawPredict' if stream else 'rawPredict'}")


def member(body, key):
    """The span (start, end) of the top-level member `"key": value` in the raw JSON `body`, for a
    scalar value (a string, number, true, false or null)."""
    matches = list(re.finditer(rb'"%s"\s*:\s*("(?:[^"\\]|\\.)*"|true|false|null|-?[0-9.eE+-]+)' % key.encode(), body))
    assert len(matches) == 1, f"{key} appears {len(matches)} times in {body[:200]!r}"
    return matches[0].span()


def without_member(body, key):
    """`body` without the member `key` (and one comma next to it): the two ways to drop it."""
    start, end = member(body, key)
    after = re.match(rb"\s*,", body[end:])
    before = re.search(rb",\s*$", body[:start])
    ways = []
    if after:
        ways.append(body[:start] + body[end + after.end():])
    if before:
        ways.append(body[:before.start()] + body[end:])
    return ways


def expected_bodies(client_body, target, betas=None):
    """What the upstream may receive for `client_body` (DESIGN §17 passthrough): the same bytes with
    only `model` rewritten, or replaced by `anthropic_version` (InvokeModel and Vertex; InvokeModel
    also gets the betas as `anthropic_beta` and loses `stream`)."""
    start, end = member(client_body, "model")
    route = target["route"]
    if route in ("anthropic", "bedrock-messages"):
        replacement = b'"model":' + json.dumps(target["remote"]).encode()
    else:
        version = BEDROCK_VERSION if route == "invoke" else VERTEX_VERSION
        replacement = b'"anthropic_version":' + json.dumps(version).encode()
        if route == "invoke" and betas:
            replacement += b',"anthropic_beta":' + json.dumps(betas, separators=(",", ":")).encode()
    body = client_body[:start] + replacement + client_body[end:]
    if route == "invoke" and re.search(rb'"stream"\s*:', client_body):
        return without_member(body, "stream")
    return [body]


def assert_passthrough(call, client_request, target, stream, version, betas=None):
    """One upstream call of a passthrough: path, credentials, body byte for byte, headers."""
    client_body = client_request.content if hasattr(client_request, "content") else client_request
    assert unquote(call["path"]) == unquote(expected_path(target, stream)), call["path"]
    if target["route"] == "invoke":
        assert call["path"] == expected_path(target, stream), "the model id is one percent-encoded segment"
    assert call["raw"] in expected_bodies(client_body, target, betas), (
        f"upstream body differs from the client's beyond `model`:\nclient:   {client_body!r}\nupstream: {call['raw']!r}")
    headers = call["headers"]
    route = target["route"]
    if route == "anthropic":
        assert headers.get("x-api-key") == ANTHROPIC_KEY
    elif route == "invoke":
        assert headers.get("authorization", "").startswith(f"AWS4-HMAC-SHA256 Credential={ACCESS_KEY_ID}/")
    elif route == "bedrock-messages":
        assert headers.get("authorization") == f"Bearer {BEDROCK_API_KEY}"
    else:
        assert headers.get("authorization", "").startswith("Bearer ya29.")
    if route in ("anthropic", "bedrock-messages"):
        assert headers.get("anthropic-version") == version
    if route == "invoke":
        assert "anthropic-beta" not in headers, "InvokeModel takes the betas in the body"
    elif betas:
        assert headers.get("anthropic-beta") == ",".join(betas)
    else:
        assert "anthropic-beta" not in headers
    assert CLIENT_KEY not in json.dumps(headers) and CLIENT_KEY.encode() not in call["raw"]


def text_of(message):
    return "".join(block.text for block in message.content if block.type == "text")


# -- passthrough -----------------------------------------------------------------------------------


def test_models_list_in_anthropic_shape(gateway, sdk):
    page = sdk.models.list()
    assert {m.id for m in page.data} == gateway["aliases"]
    assert all(m.type == "model" for m in page.data)
    raw = httpx.get(f"{gateway['base_url']}/v1/models",
                    headers={"x-api-key": CLIENT_KEY, "anthropic-version": CLASSIC_VERSION}).json()
    assert raw["has_more"] is False and {m["type"] for m in raw["data"]} == {"model"}
    # Without anthropic-version: OpenAI's list.
    plain = httpx.get(f"{gateway['base_url']}/v1/models", headers={"authorization": f"Bearer {CLIENT_KEY}"}).json()
    assert plain["object"] == "list" and {m["object"] for m in plain["data"]} == {"model"}


def test_create(native, sdk):
    mark = seen(native["mock"])
    message = sdk.messages.create(model=native["alias"], max_tokens=256, system="You are terse.",
                                  messages=[{"role": "user", "content": "Say hello"}],
                                  metadata={"user_id": "e2e"}, extra_headers={"anthropic-beta": BETA_HEADER})
    assert message.type == "message" and message.role == "assistant"
    assert text_of(message) == HELLO + "Say hello"
    assert message.stop_reason == "end_turn"
    assert (message.usage.input_tokens, message.usage.output_tokens) == (INPUT_TOKENS, OUTPUT_TOKENS)
    # What the 2.x SDK sends (DESIGN §17): the key as Bearer, its own anthropic-version.
    sent = sdk.sent[-1].headers
    assert sent["authorization"] == f"Bearer {CLIENT_KEY}" and "x-api-key" not in sent
    assert sent["anthropic-version"] == SDK_VERSION and sent["anthropic-beta"] == BETA_HEADER
    [call] = upstream_calls(native["mock"], mark)
    assert_passthrough(call, sdk.sent[-1], native, stream=False, version=SDK_VERSION, betas=BETAS)


def test_stream_text(native, sdk):
    mark = seen(native["mock"])
    with sdk.messages.stream(model=native["alias"], max_tokens=256,
                             messages=[{"role": "user", "content": "Say hello in a stream"}],
                             extra_headers={"anthropic-beta": BETA_HEADER}) as stream:
        pieces = list(stream.text_stream)
        final = stream.get_final_message()
    assert "".join(pieces) == HELLO + "Say hello in a stream" and len(pieces) > 1
    assert text_of(final) == HELLO + "Say hello in a stream"
    assert final.stop_reason == "end_turn"
    assert (final.usage.input_tokens, final.usage.output_tokens) == (INPUT_TOKENS, OUTPUT_TOKENS)
    [call] = upstream_calls(native["mock"], mark)
    assert_passthrough(call, sdk.sent[-1], native, stream=True, version=SDK_VERSION, betas=BETAS)


def test_raw_http_with_x_api_key(native, gateway):
    # Claude Code's way: x-api-key, anthropic-version 2023-06-01, `?beta=true`. The body is written
    # by hand (spacing, key order, escapes, an unknown field) so that byte-for-byte means something.
    mark = seen(native["mock"])
    body = (b'{\n  "max_tokens" : 64,\n  "messages": [{"role":"user", "content": "caf\\u00e9 \xe2\x98\x95 hi"}],'
            b'\n  "model":   "' + native["alias"].encode() + b'" ,  "x_future_field": {"keep": [1, 2.50, null]},'
            b'\n  "stream": false\n}')
    answer = httpx.post(f"{gateway['base_url']}/v1/messages?beta=true", content=body, headers={
        "x-api-key": CLIENT_KEY, "anthropic-version": CLASSIC_VERSION, "anthropic-beta": BETA_HEADER,
        "content-type": "application/json"}, timeout=30)
    assert answer.status_code == 200, answer.text
    assert answer.json()["content"] == [{"type": "text", "text": HELLO + "café ☕ hi"}]
    [call] = upstream_calls(native["mock"], mark)
    assert_passthrough(call, body, native, stream=False, version=CLASSIC_VERSION, betas=BETAS)
    assert call["query"] is None, "the client's ?beta=true is not passed on"


def test_tool_use_round_trip(native, sdk):
    question = {"role": "user", "content": "What's the weather in Paris?"}
    mark = seen(native["mock"])
    with sdk.messages.stream(model=native["alias"], max_tokens=512, tools=[WEATHER_TOOL], messages=[question],
                             extra_headers={"anthropic-beta": BETA_HEADER}) as stream:
        events = list(stream)
        final = stream.get_final_message()
    fragments = [e.delta.partial_json for e in events
                 if e.type == "content_block_delta" and e.delta.type == "input_json_delta"]
    assert json.loads("".join(fragments)) == TOOL_INPUT and len([f for f in fragments if f]) > 1
    assert final.stop_reason == "tool_use"
    [tool_use] = [b for b in final.content if b.type == "tool_use"]
    assert (tool_use.id, tool_use.name, tool_use.input) == (TOOL_USE_ID, "get_weather", TOOL_INPUT)
    [call] = upstream_calls(native["mock"], mark)
    assert_passthrough(call, sdk.sent[-1], native, stream=True, version=SDK_VERSION, betas=BETAS)

    mark = seen(native["mock"])
    second = sdk.messages.create(model=native["alias"], max_tokens=512, tools=[WEATHER_TOOL], messages=[
        question,
        {"role": "assistant", "content": [b.model_dump(exclude_none=True) for b in final.content]},
        {"role": "user", "content": [{"type": "tool_result", "tool_use_id": TOOL_USE_ID, "content": "21°C and sunny"}]},
    ])
    assert text_of(second) == "The tool said: 21°C and sunny"
    assert second.stop_reason == "end_turn"
    [call] = upstream_calls(native["mock"], mark)
    assert_passthrough(call, sdk.sent[-1], native, stream=False, version=SDK_VERSION)
    assert call["body"]["messages"][1]["content"][-1] == {
        "type": "tool_use", "id": TOOL_USE_ID, "name": "get_weather", "input": TOOL_INPUT}


def test_thinking_signature_round_trip(native, sdk):
    question = {"role": "user", "content": "Hi there"}
    thinking = {"type": "enabled", "budget_tokens": 1024}
    with sdk.messages.stream(model=native["alias"], max_tokens=2048, thinking=thinking, messages=[question]) as stream:
        events = list(stream)
        final = stream.get_final_message()
    assert any(e.type == "content_block_delta" and e.delta.type == "signature_delta" for e in events)
    thought, text = final.content
    assert (thought.type, thought.thinking, thought.signature) == ("thinking", THINKING_TEXT, THINKING_SIGNATURE)
    assert text.type == "text" and text.text == HELLO + "Hi there"
    # Not streamed: the same block.
    answer = sdk.messages.create(model=native["alias"], max_tokens=2048, thinking=thinking, messages=[question])
    assert answer.content[0].model_dump(exclude_none=True) == {
        "type": "thinking", "thinking": THINKING_TEXT, "signature": THINKING_SIGNATURE}

    # The next turn carries the thinking block back: the upstream must get its signature unchanged.
    mark = seen(native["mock"])
    follow_up = sdk.messages.create(model=native["alias"], max_tokens=2048, thinking=thinking, messages=[
        question,
        {"role": "assistant", "content": [b.model_dump(exclude_none=True) for b in final.content]},
        {"role": "user", "content": "And now?"},
    ])
    assert text_of(follow_up) == HELLO + "And now?"
    [call] = upstream_calls(native["mock"], mark)
    assert_passthrough(call, sdk.sent[-1], native, stream=False, version=SDK_VERSION)
    returned = call["body"]["messages"][1]["content"][0]
    assert returned == {"type": "thinking", "thinking": THINKING_TEXT, "signature": THINKING_SIGNATURE}


def test_count_tokens(native, sdk):
    mark = seen(native["mock"])
    counted = sdk.messages.count_tokens(model=native["alias"], system="You are terse.",
                                        messages=[{"role": "user", "content": "How many tokens is this?"}],
                                        tools=[WEATHER_TOOL])
    calls = upstream_calls(native["mock"], mark)
    if native["route"] == "anthropic":
        # Forwarded: the mock counts a quarter of the body it received.
        [call] = calls
        assert call["path"] == "/v1/messages/count_tokens"
        assert call["raw"] in expected_bodies(sdk.sent[-1].content, native)
        assert call["headers"]["x-api-key"] == ANTHROPIC_KEY
        assert counted.input_tokens == max(1, len(call["raw"]) // 4)
    else:
        # Estimated locally (DESIGN §17), nothing sent upstream.
        assert calls == []
        assert counted.input_tokens >= 1
        # About 4 bytes of JSON per token over system, messages and tools.
        sent = json.loads(sdk.sent[-1].content)
        size = sum(len(json.dumps(sent[k], separators=(",", ":"), ensure_ascii=False).encode()) for k in ("system", "messages", "tools"))
        assert size / 8 <= counted.input_tokens <= size, (counted.input_tokens, size)


def test_count_tokens_is_not_rate_limited(gateway):
    # The slow lane allows one request a second; count_tokens never counts against it.
    client = Sdk(gateway["base_url"])
    for _ in range(5):
        assert client.messages.count_tokens(model=SLOW_ALIAS, messages=[{"role": "user", "content": "hi"}]).input_tokens >= 1


# -- translation -----------------------------------------------------------------------------------


def test_translated_create(translated, sdk):
    mark = seen(translated["mock"])
    message = sdk.messages.create(model=translated["alias"], max_tokens=256,
                                  messages=[{"role": "user", "content": "Say hello"}])
    assert message.type == "message" and message.role == "assistant"
    assert text_of(message) == translated["text"]
    assert message.stop_reason == "end_turn"
    assert message.usage.input_tokens > 0 and message.usage.output_tokens > 0
    [call] = upstream_calls(translated["mock"], mark)
    assert call["path"] == translated["paths"][0]
    assert "Say hello" in call["body_text"] and "anthropic_version" not in call["body_text"]
    assert CLIENT_KEY.encode() not in call["raw"] and CLIENT_KEY not in json.dumps(call["headers"])


def test_translated_stream(translated, sdk):
    mark = seen(translated["mock"])
    with sdk.messages.stream(model=translated["alias"], max_tokens=256,
                             messages=[{"role": "user", "content": "Say hello"}]) as stream:
        text = "".join(stream.text_stream)
        final = stream.get_final_message()
    assert text == translated["streamed"]
    assert text_of(final) == translated["streamed"]
    assert final.stop_reason == "end_turn"
    assert final.usage.output_tokens > 0
    [call] = upstream_calls(translated["mock"], mark)
    assert call["path"] == translated["paths"][1]


def test_translated_streamed_tool_call(translated, sdk):
    mark = seen(translated["mock"])
    with sdk.messages.stream(model=translated["alias"], max_tokens=256, tools=[CITY_TOOL],
                             messages=[{"role": "user", "content": "What's the weather in Paris?"}]) as stream:
        events = list(stream)
        final = stream.get_final_message()
    assert final.stop_reason == "tool_use"
    tool_uses = [b for b in final.content if b.type == "tool_use"]
    assert tool_uses and tool_uses[0].name == "get_weather"
    assert tool_uses[0].input == translated["tool_input"]
    if translated["tool_id"]:
        assert tool_uses[0].id == translated["tool_id"]
    assert all(b.id for b in tool_uses)
    # The streamed arguments are complete: the first tool_use block's input_json_delta pieces.
    first = next(e.index for e in events if e.type == "content_block_start" and e.content_block.type == "tool_use")
    pieces = [e.delta.partial_json for e in events if e.type == "content_block_delta" and e.index == first
              and e.delta.type == "input_json_delta"]
    assert json.loads("".join(pieces)) == translated["tool_input"]
    [call] = upstream_calls(translated["mock"], mark)
    assert call["path"] == translated["paths"][1]
    assert "get_weather" in call["body_text"]


def openai_client(gateway):
    return openai.OpenAI(api_key=CLIENT_KEY, base_url=f"{gateway['base_url']}/v1", max_retries=0)


def test_openai_sdk_on_claude(gateway):
    client, mock = openai_client(gateway), gateway["mock"]
    mark = seen(mock)
    answer = client.chat.completions.create(model="claude", max_tokens=100, messages=[
        {"role": "system", "content": "You are terse."}, {"role": "user", "content": "Say hello"}])
    assert answer.choices[0].message.content == HELLO + "Say hello"
    assert answer.choices[0].finish_reason == "stop"
    assert (answer.usage.prompt_tokens, answer.usage.completion_tokens) == (INPUT_TOKENS, OUTPUT_TOKENS)
    [call] = upstream_calls(mock, mark)
    assert call["path"] == "/v1/messages" and call["headers"]["x-api-key"] == ANTHROPIC_KEY
    assert call["headers"]["anthropic-version"] == CLASSIC_VERSION, "the connection's anthropic_version"
    assert call["body"]["model"] == NATIVE["anthropic"]["remote"]
    assert call["body"]["messages"] == [{"role": "user", "content": [{"type": "text", "text": "Say hello"}]}] or \
        call["body"]["messages"] == [{"role": "user", "content": "Say hello"}]
    assert "You are terse." in json.dumps(call["body"]["system"])


def test_openai_sdk_stream_on_claude(gateway):
    chunks = list(openai_client(gateway).chat.completions.create(
        model="claude", messages=[{"role": "user", "content": "Say hello"}], stream=True,
        stream_options={"include_usage": True}))
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == HELLO + "Say hello"
    assert [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason] == ["stop"]
    assert chunks[-1].usage.prompt_tokens == INPUT_TOKENS and chunks[-1].usage.completion_tokens == OUTPUT_TOKENS


@pytest.mark.parametrize("stream", [False, True], ids=["create", "stream"])
def test_openai_sdk_tool_call_on_claude(gateway, stream):
    tool = {"type": "function", "function": {"name": "get_weather", "description": "Current weather in a city",
                                             "parameters": WEATHER_TOOL["input_schema"]}}
    answer = openai_client(gateway).chat.completions.create(
        model="claude", tools=[tool], stream=stream, messages=[{"role": "user", "content": "What's the weather in Paris?"}])
    if stream:
        chunks = list(answer)
        calls = [tc for c in chunks if c.choices for tc in (c.choices[0].delta.tool_calls or [])]
        assert calls[0].id == TOOL_USE_ID and calls[0].function.name == "get_weather"
        assert json.loads("".join(tc.function.arguments or "" for tc in calls)) == TOOL_INPUT
        assert [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason] == ["tool_calls"]
    else:
        [call] = answer.choices[0].message.tool_calls
        assert call.id == TOOL_USE_ID and call.function.name == "get_weather"
        assert json.loads(call.function.arguments) == TOOL_INPUT
        assert answer.choices[0].finish_reason == "tool_calls"


@pytest.mark.parametrize("name", ["bedrock-invoke", "bedrock-messages", "vertex"])
def test_openai_sdk_on_claude_elsewhere(gateway, name):
    # OpenAI chat clients of Claude on Bedrock keep Converse unless the connection sets
    # anthropic_api (the Bedrock-Messages one does); Claude on Vertex is always rawPredict.
    target, mock = NATIVE[name], gateway["mock"]
    mark = seen(mock)
    answer = openai_client(gateway).chat.completions.create(
        model=target["alias"], max_tokens=100, messages=[{"role": "user", "content": "Say hello"}])
    [call] = upstream_calls(mock, mark)
    if name == "bedrock-invoke":
        assert call["path"] == f"/model/{quote(target['remote'], safe='')}/converse"
        assert answer.choices[0].message.content == "Why did the chicken cross the road? To get to the other side."
    else:
        assert unquote(call["path"]) == unquote(expected_path(target, stream=False))
        assert answer.choices[0].message.content == HELLO + "Say hello"
        assert "model" not in call["body"] if name == "vertex" else call["body"]["model"] == target["remote"]


# -- errors ----------------------------------------------------------------------------------------


def test_bad_key_is_authentication_error(gateway):
    bad = Sdk(gateway["base_url"], key="vk-nope-0000")
    with pytest.raises(anthropic.AuthenticationError) as err:
        bad.messages.create(model="claude", max_tokens=10, messages=[{"role": "user", "content": "hi"}])
    assert err.value.status_code == 401
    assert err.value.body["type"] == "error" and err.value.body["error"]["type"] == "authentication_error"
    raw = httpx.post(f"{gateway['base_url']}/v1/messages", json={"model": "claude", "max_tokens": 10, "messages": []},
                     headers={"x-api-key": "vk-nope-0000", "anthropic-version": CLASSIC_VERSION})
    assert raw.status_code == 401 and raw.json()["error"]["type"] == "authentication_error"


def test_unknown_alias_is_not_found(sdk):
    with pytest.raises(anthropic.NotFoundError) as err:
        sdk.messages.create(model="claude-nope", max_tokens=10, messages=[{"role": "user", "content": "hi"}])
    assert err.value.status_code == 404
    assert err.value.body["type"] == "error" and err.value.body["error"]["type"] == "not_found_error"


def test_over_tps_is_rate_limit_error(sdk):
    with pytest.raises(anthropic.RateLimitError) as err:
        for _ in range(5):
            sdk.messages.create(model=SLOW_ALIAS, max_tokens=10, messages=[{"role": "user", "content": "hi"}])
    assert err.value.status_code == 429
    assert err.value.body["error"]["type"] == "rate_limit_error"
    assert int(err.value.response.headers["retry-after"]) >= 1


def test_upstream_rate_limit_is_rate_limit_error(native, sdk):
    with pytest.raises(anthropic.RateLimitError) as err:
        sdk.messages.create(model=native["alias"], max_tokens=10, messages=[{"role": "user", "content": "RATELIMITME"}])
    assert err.value.status_code == 429
    assert err.value.body["error"]["type"] == "rate_limit_error"


def test_upstream_overload_is_529(native, sdk):
    with pytest.raises(anthropic.InternalServerError) as err:
        sdk.messages.create(model=native["alias"], max_tokens=10, messages=[{"role": "user", "content": "OVERLOADME"}])
    assert err.value.status_code == 529
    assert isinstance(err.value, anthropic.OverloadedError)
    assert err.value.body["type"] == "error" and err.value.body["error"]["type"] == "overloaded_error"


def test_mid_stream_failure_is_an_error_event(native, sdk):
    received = []
    with pytest.raises(anthropic.APIStatusError) as err:
        with sdk.messages.stream(model=native["alias"], max_tokens=64,
                                 messages=[{"role": "user", "content": "MIDSTREAMERROR please"}]) as stream:
            for text in stream.text_stream:
                received.append(text)
    # The SDK raises on the `error` event itself (the HTTP status was 200).
    assert type(err.value) is anthropic.APIStatusError and err.value.status_code == 200
    assert err.value.body["type"] == "error"
    if native["route"] == "invoke":
        # Bedrock's modelStreamErrorException frame, in Anthropic's shape.
        assert err.value.body["error"] == {"type": "api_error", "message": "Model stream error: the model stopped unexpectedly."}
    else:
        # Passed on as the upstream sent it.
        assert err.value.body["error"] == {"type": "overloaded_error", "message": "Overloaded"}
    assert "".join(received) and HELLO.startswith("".join(received)), received


def test_truncated_stream_is_an_error_event(native, sdk):
    # The upstream's stream ends before message_stop: the client must not take it for a whole answer.
    with pytest.raises(anthropic.APIStatusError) as err:
        with sdk.messages.stream(model=native["alias"], max_tokens=64,
                                 messages=[{"role": "user", "content": "TRUNCATEME please"}]) as stream:
            list(stream)
    assert err.value.body["type"] == "error" and err.value.body["error"]["type"] == "api_error"
    assert "message_stop" in err.value.body["error"]["message"]


def test_translated_mid_stream_failure_is_an_error_event(sdk):
    # Gemini's BREAKME: an UNAVAILABLE error as the stream's second event, after some text.
    received = []
    with pytest.raises(anthropic.APIStatusError) as err:
        with sdk.messages.stream(model="gemini", max_tokens=64,
                                 messages=[{"role": "user", "content": "BREAKME"}]) as stream:
            received.extend(stream.text_stream)
    assert err.value.body["type"] == "error" and err.value.body["error"]["type"] in ("api_error", "overloaded_error")
    assert "".join(received) == "It is"


# -- usage -----------------------------------------------------------------------------------------


def token_counts(gateway, alias):
    text = urllib.request.urlopen(f"http://127.0.0.1:{gateway['gw'].metrics_port}/metrics", timeout=5).read().decode()
    counts = {}
    for line in text.splitlines():
        if line.startswith("llm_proxy_tokens_total{") and f'alias="{alias}"' in line:
            kind = re.search(r'kind="(\w+)"', line).group(1)
            counts[kind] = counts.get(kind, 0) + float(line.rsplit(" ", 1)[1])
    return counts


def test_cache_tokens_count_as_prompt_tokens(native, gateway, sdk):
    alias = cache_alias(native["name"])
    system = [{"type": "text", "text": "A long, cacheable system prompt.", "cache_control": {"type": "ephemeral"}}]
    message = sdk.messages.create(model=alias, max_tokens=64, system=system, messages=[{"role": "user", "content": "hi"}])
    assert (message.usage.cache_creation_input_tokens, message.usage.cache_read_input_tokens) == (CACHE_CREATION, CACHE_READ)
    with sdk.messages.stream(model=alias, max_tokens=64, system=system, messages=[{"role": "user", "content": "hi"}]) as stream:
        final = stream.get_final_message()
    assert (final.usage.cache_creation_input_tokens, final.usage.cache_read_input_tokens) == (CACHE_CREATION, CACHE_READ)
    # The cache tokens are part of the prompt, and counted apart too (no reasoning series: Claude
    # does not report its thinking tokens apart).
    prompt = INPUT_TOKENS + CACHE_CREATION + CACHE_READ
    expected = {"prompt": 2 * prompt, "completion": 2 * OUTPUT_TOKENS,
                "cache_read": 2 * CACHE_READ, "cache_write": 2 * CACHE_CREATION}
    deadline = time.monotonic() + 10
    while token_counts(gateway, alias) != expected:
        assert time.monotonic() < deadline, (token_counts(gateway, alias), expected)
        time.sleep(0.05)
