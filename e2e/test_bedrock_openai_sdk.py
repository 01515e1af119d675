"""Bedrock end to end: `llmctl serve`, the `llmctl` setup commands, then the official OpenAI Python
SDK against the gateway, with the mock upstream (`llm-proxy-mock-upstream`, see mock_upstream.py)
standing in for bedrock-runtime (Converse and ConverseStream, wire formats §5, translation §6.2,
§6.3).

Three connections are exercised with the same tests (parametrized): one with long-term AWS access
keys (`AKIA...:SECRET`) and one with temporary credentials (`AKIDEXAMPLE:SECRET:SESSION_TOKEN`),
whose requests the mock verifies as AWS would (SigV4, service `bedrock`, region us-east-1, the
percent-encoded model id encoded again in the canonical URI, `X-Amz-Security-Token`; the
mock-upstream crate's `sigv4` module), and one with a Bedrock API key (`ABSK...`) sent as
`Authorization: Bearer`. The mock validates Converse bodies as Bedrock does (ValidationException
400), answers with Converse-shaped JSON and real `application/vnd.amazon.eventstream` frames
written in odd-sized HTTP chunks, and records every request so that the tests can assert on what
went upstream. What the mock answered to a recorded request is learnt by replaying it (see
`refusal`)."""

import json
import re
from urllib.parse import quote, unquote

import openai
import pytest

from mock_upstream import mock_upstream
from serve import llmctl_serve

REGION = "us-east-1"
# The mock's credentials (the mock-upstream crate's sigv4 and bedrock constants).
# Long-term access keys: the AWS documentation's example IAM user (sigv4::IAM_*).
ACCESS_KEY_ID = "AKIAIOSFODNN7EXAMPLE"
SECRET_ACCESS_KEY = "wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY"
# Temporary credentials: the SigV4 test suite's key pair with a session token (sigv4::ACCESS_KEY_ID,
# SECRET_ACCESS_KEY, SESSION_TOKEN).
SESSION_KEY_ID = "AKIDEXAMPLE"
SESSION_SECRET = "wJalrXUtnFEMI/K7MDENG+bPxRfiCYEXAMPLEKEY"
SESSION_TOKEN = "IQoJb3JpZ2luX2VjEJr//////////wEaCXVzLWVhc3QtMSJGMEQCIHNlc3Npb24rdG9rZW4vZXhhbXBsZQ=="
WRONG_SECRET = "wJalrXUtnFEMI/K7MDENG+bPxRfiCYWRONGKEY00"
# What the mock's AWS account knows: key id -> (secret, session token).
ACCESS_KEYS = {ACCESS_KEY_ID: (SECRET_ACCESS_KEY, None), SESSION_KEY_ID: (SESSION_SECRET, SESSION_TOKEN)}
# A long-term Bedrock API key (bedrock::API_KEY).
BEDROCK_API_KEY = "ABSKQmVkcm9ja0FQSUtleS1leGFtcGxlLWF0LTEyMzQ1Njc4OTAxMjpabTl2WW1GeVltRjZjWFY0"
CLIENT_KEY = "vk-bedrock-e2e-9012"

MODEL_ID = "us.anthropic.claude-3-5-sonnet-20241022-v2:0"  # bedrock::SONNET, an inference profile id, with a `:`
BUSY_MODEL_ID = "anthropic.claude-3-haiku-20240307-v1:0"  # bedrock::BUSY: the mock throttles every call to it
FLAKY_MODEL_ID = "amazon.nova-lite-v1:0"  # bedrock::FLAKY: ModelErrorException (424), or an exception frame mid-stream

# The gateway's aliases for each connection (see the `gateway` fixture).
TARGETS = {
    "sigv4": {"auth": "sigv4", "key_id": ACCESS_KEY_ID, "chat": "sigv4-claude", "busy": "sigv4-busy", "flaky": "sigv4-flaky"},
    "bearer": {"auth": "bearer", "key_id": None, "chat": "key-claude", "busy": "key-busy", "flaky": "key-flaky"},
    "sigv4-session": {"auth": "sigv4", "key_id": SESSION_KEY_ID, "chat": "session-claude", "busy": "session-busy",
                      "flaky": "session-flaky"},
}

THROTTLED = "Too many requests, please wait before trying again."
TEMPERATURE_RANGE = ("1 validation error detected: Value '1.5' at 'inferenceConfig.temperature' failed to satisfy "
                     "constraint: Member must have value less than or equal to 1")

WEATHER_TOOL = {"type": "function", "function": {
    "name": "get_weather", "description": "Current weather in a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}, "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]}},
                   "required": ["city"]}}}
# The mock's tool calls (bedrock::TOOL_USE_ID, TOOL_USE_ID_2): one when not streaming, two streamed.
TOOL_USE_ID = "tooluse_kZJMlvQmRJ6eAyJE5GIl7Q"
TOOL_USE_ID_2 = "tooluse_Xq3vN0pLSa2iB7dWm9eK1g"
TOOL_INPUT = {"city": "Paris", "unit": "celsius"}
TOOL_INPUT_FRAGMENTS = ['{"city":', ' "Paris"}']
TOOL_INPUT_2 = {"city": "London"}


@pytest.fixture(scope="module")
def gateway(tmp_path_factory):
    scratch = tmp_path_factory.mktemp("bedrock-e2e")
    with mock_upstream() as mock:
        upstream_url = mock.url
        with llmctl_serve(scratch) as gw:
            gw.llmctl("connection", "add", "--name", "Bedrock-SigV4", "--provider", "bedrock", "--endpoint", upstream_url,
                      "--api-key", f"{ACCESS_KEY_ID}:{SECRET_ACCESS_KEY}", "--set", f"region={REGION}")
            gw.llmctl("connection", "add", "--name", "Bedrock-Key", "--provider", "bedrock", "--endpoint", upstream_url,
                      # The control plane needs the region of an endpoint that does not name it.
                      "--api-key", BEDROCK_API_KEY, "--set", f"region={REGION}")
            gw.llmctl("connection", "add", "--name", "Bedrock-Session", "--provider", "bedrock", "--endpoint", upstream_url,
                      "--api-key", f"{SESSION_KEY_ID}:{SESSION_SECRET}:{SESSION_TOKEN}", "--set", f"region={REGION}")
            gw.llmctl("connection", "add", "--name", "Bedrock-Wrong-Secret", "--provider", "bedrock", "--endpoint", upstream_url,
                      "--api-key", f"{SESSION_KEY_ID}:{WRONG_SECRET}:{SESSION_TOKEN}", "--set", f"region={REGION}")
            gw.llmctl("vkey", "add", "--name", "Bedrock-App", "--key", CLIENT_KEY)
            models = [
                ("Bedrock-SigV4", "sigv4-claude-model", MODEL_ID, "sigv4-claude"),
                ("Bedrock-SigV4", "sigv4-busy-model", BUSY_MODEL_ID, "sigv4-busy"),
                ("Bedrock-SigV4", "sigv4-flaky-model", FLAKY_MODEL_ID, "sigv4-flaky"),
                ("Bedrock-Key", "key-claude-model", MODEL_ID, "key-claude"),
                ("Bedrock-Key", "key-busy-model", BUSY_MODEL_ID, "key-busy"),
                ("Bedrock-Key", "key-flaky-model", FLAKY_MODEL_ID, "key-flaky"),
                ("Bedrock-Session", "session-claude-model", MODEL_ID, "session-claude"),
                ("Bedrock-Session", "session-busy-model", BUSY_MODEL_ID, "session-busy"),
                ("Bedrock-Session", "session-flaky-model", FLAKY_MODEL_ID, "session-flaky"),
                ("Bedrock-Wrong-Secret", "wrong-secret-claude", MODEL_ID, "wrong-secret-claude"),
            ]
            for conn, name, remote, alias in models:
                gw.llmctl("model", "add", "--conn-id", conn, "--name", name, "--remote", remote)
                gw.llmctl("assign", "--vkey-id", "Bedrock-App", "--model-id", name, "--alias", alias)
            client = openai.OpenAI(api_key=CLIENT_KEY, base_url=f"http://localhost:{gw.api_port}", max_retries=0)
            gw.wait_for_aliases(client, {alias for *_, alias in models})
            yield {"client": client, "api_port": gw.api_port, "log": gw.log_path, "mock": mock}


@pytest.fixture(params=list(TARGETS))
def target(request, gateway):
    return dict(TARGETS[request.param], client=gateway["client"], mock=gateway["mock"])


AUTHORIZATION_KEY_ID = re.compile(r"AWS4-HMAC-SHA256 Credential=([^/,\s]+)/")


def seen(mock):
    """The requests the mock received so far."""
    return len(mock.requests())


def refusal(mock, call):
    """The exception the mock answers `call` with (the name in `x-amzn-ErrorType`), or None when it
    accepts it: the recorded request is replayed byte for byte, so this is the mock's verdict on
    exactly what the gateway sent (its signature included)."""
    error_type = mock.replay(call).headers.get("x-amzn-errortype")
    return error_type.split(":")[0] if error_type else None


def upstream_calls(mock, mark):
    """The requests received since `mark`, as dicts with raw_path, query, headers, raw, body, model,
    operation, auth (the scheme used: sigv4, bearer or None), key_id, request_id and refused (the
    exception the mock answered with, if any)."""
    calls = []
    for request in mock.requests()[mark:]:
        match = re.fullmatch(r"/model/([^/]+)/(converse|converse-stream)", request["path"])
        authorization = request["headers"].get("authorization", "")
        key_id = AUTHORIZATION_KEY_ID.match(authorization)
        calls.append({
            "raw_path": request["path"], "query": request["query"] or "", "headers": request["headers"],
            "raw": request["body_text"].encode(), "body": request["body"],
            "model": match and unquote(match.group(1)), "operation": match and match.group(2),
            "auth": "sigv4" if key_id else "bearer" if authorization.startswith("Bearer ") else None,
            "key_id": key_id and key_id.group(1), "request_id": request["request_id"], "recorded": request})
    # Replayed only now: the replays are recorded after the calls above.
    for call in calls:
        call["refused"] = refusal(mock, call["recorded"])
    return calls


def assert_upstream_request(call, target, operation, model=MODEL_ID):
    """Path, auth and headers of one upstream request; the virtual key never goes upstream."""
    assert call["raw_path"] == f"/model/{quote(model, safe='')}/{operation}"
    assert "%3A" in call["raw_path"] and ":" not in call["raw_path"], "the model id is one percent-encoded segment"
    assert call["model"] == model and call["query"] == ""
    assert call["refused"] is None or call["refused"] not in ("InvalidSignatureException", "UnrecognizedClientException",
                                                              "IncompleteSignatureException", "MissingAuthenticationTokenException"), call["refused"]
    assert call["auth"] == target["auth"], f"expected {target['auth']} auth, the mock saw {call['headers'].get('authorization', '')[:40]!r}"
    headers = call["headers"]
    assert headers.get("content-type", "").startswith("application/json")
    if target["auth"] == "sigv4":
        assert call["key_id"] == target["key_id"]
        assert headers["authorization"].startswith(f"AWS4-HMAC-SHA256 Credential={target['key_id']}/")
        assert f"/{REGION}/bedrock/aws4_request" in headers["authorization"]
        signed = re.search(r"SignedHeaders=([^,\s]+)", headers["authorization"]).group(1).split(";")
        assert {"content-type", "host", "x-amz-date"} <= set(signed)
        secret, token = ACCESS_KEYS[target["key_id"]]
        assert secret not in json.dumps(headers) and secret.encode() not in call["raw"]
        if token:
            assert headers["x-amz-security-token"] == token and "x-amz-security-token" in signed
        else:
            assert "x-amz-security-token" not in headers
    else:
        assert headers["authorization"] == f"Bearer {BEDROCK_API_KEY}"
        assert "x-amz-date" not in headers and "x-amz-security-token" not in headers
    assert CLIENT_KEY not in json.dumps(headers) and CLIENT_KEY.encode() not in call["raw"]


# -- auth ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", [n for n, t in TARGETS.items() if t["auth"] == "sigv4"])
def test_access_keys_sign_requests_and_never_travel(gateway, name):
    # DESIGN §16: a credential of the form ACCESS_KEY_ID:SECRET[:TOKEN] means SigV4; the secret
    # itself must never go over the wire.
    target = TARGETS[name]
    mark = seen(gateway["mock"])
    try:
        gateway["client"].chat.completions.create(model=target["chat"], messages=[{"role": "user", "content": "Say hello"}])
    except openai.APIStatusError:
        pass  # judged below, on what went upstream
    [call] = upstream_calls(gateway["mock"], mark)
    authorization = call["headers"].get("authorization", "")
    secret, _ = ACCESS_KEYS[target["key_id"]]
    assert secret not in json.dumps(call["headers"]), f"the secret access key went upstream: authorization={authorization!r}"
    assert authorization.startswith(f"AWS4-HMAC-SHA256 Credential={target['key_id']}/"), authorization
    assert call["auth"] == "sigv4" and call["refused"] is None, call["refused"]


# -- chat ------------------------------------------------------------------------------------------


def test_chat(target):
    mark = seen(target["mock"])
    answer = target["client"].chat.completions.create(
        model=target["chat"], temperature=0.5, top_p=0.9, max_tokens=256, stop=["END"],
        messages=[{"role": "system", "content": "You are terse."}, {"role": "user", "content": "Say hello"}])
    choice = answer.choices[0]
    assert choice.message.role == "assistant"
    assert choice.message.content == "Why did the chicken cross the road? To get to the other side."
    assert choice.finish_reason == "stop" and not choice.message.tool_calls
    assert answer.object == "chat.completion" and answer.model == MODEL_ID
    [call] = upstream_calls(target["mock"], mark)
    assert answer.id == f"chatcmpl-{call['request_id']}", "the completion id is Bedrock's x-amzn-RequestId"
    # Bedrock: input 30 + cache reads 4 + cache writes 6 = prompt 40; output 20; total 60.
    assert (answer.usage.prompt_tokens, answer.usage.completion_tokens, answer.usage.total_tokens) == (40, 20, 60)
    assert answer.usage.prompt_tokens_details.cached_tokens == 4
    assert_upstream_request(call, target, "converse")
    assert call["refused"] is None
    assert call["body"] == {
        "system": [{"text": "You are terse."}],
        "messages": [{"role": "user", "content": [{"text": "Say hello"}]}],
        "inferenceConfig": {"maxTokens": 256, "temperature": 0.5, "topP": 0.9, "stopSequences": ["END"]},
    }


def test_history_is_merged_into_alternating_turns(target):
    mark = seen(target["mock"])
    answer = target["client"].chat.completions.create(model=target["chat"], messages=[
        {"role": "developer", "content": "Be brief."},
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hello! How can I help?"},
        {"role": "user", "content": "First part."},
        {"role": "user", "content": [{"type": "text", "text": "Second part."}]},
    ])
    assert answer.choices[0].message.content == "Why did the chicken cross the road? To get to the other side."
    [call] = upstream_calls(target["mock"], mark)
    assert_upstream_request(call, target, "converse")
    assert call["refused"] is None
    assert call["body"] == {
        "system": [{"text": "Be brief."}],
        "messages": [
            {"role": "user", "content": [{"text": "Hi"}]},
            {"role": "assistant", "content": [{"text": "Hello! How can I help?"}]},
            {"role": "user", "content": [{"text": "First part."}, {"text": "Second part."}]},
        ],
    }


def test_stream_without_usage(target):
    mark = seen(target["mock"])
    chunks = list(target["client"].chat.completions.create(
        model=target["chat"], messages=[{"role": "user", "content": "Say hello"}], stream=True))
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == "It is 21°C."
    assert chunks[0].choices[0].delta.role == "assistant"
    assert [c.choices[0].finish_reason for c in chunks if c.choices[0].finish_reason] == ["stop"]
    assert chunks[-1].choices[0].finish_reason == "stop"
    assert all(c.choices and c.usage is None for c in chunks), "no usage chunk when the client did not ask"
    assert all(c.object == "chat.completion.chunk" and c.model == MODEL_ID for c in chunks)
    [call] = upstream_calls(target["mock"], mark)
    assert {c.id for c in chunks} == {f"chatcmpl-{call['request_id']}"}
    assert_upstream_request(call, target, "converse-stream")
    assert call["refused"] is None
    assert call["body"] == {"messages": [{"role": "user", "content": [{"text": "Say hello"}]}]}


def test_stream_with_usage(target):
    mark = seen(target["mock"])
    chunks = list(target["client"].chat.completions.create(
        model=target["chat"], messages=[{"role": "user", "content": "Say hello"}], stream=True,
        stream_options={"include_usage": True}))
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == "It is 21°C."
    assert chunks[-2].choices[0].finish_reason == "stop"
    usage_chunk = chunks[-1]
    assert usage_chunk.choices == []
    # The metadata event: input 9 + cache reads 3 = prompt 12; output 5; total 17.
    assert (usage_chunk.usage.prompt_tokens, usage_chunk.usage.completion_tokens, usage_chunk.usage.total_tokens) == (12, 5, 17)
    assert usage_chunk.usage.prompt_tokens_details.cached_tokens == 3
    assert all(c.usage is None for c in chunks[:-1])
    [call] = upstream_calls(target["mock"], mark)
    assert_upstream_request(call, target, "converse-stream")
    assert call["refused"] is None
    assert "stream_options" not in call["body"] and "stream" not in call["body"]


# -- tools -----------------------------------------------------------------------------------------


def test_tool_call_round_trip(target):
    client = target["client"]
    question = {"role": "user", "content": "What's the weather in Paris?"}
    mark = seen(target["mock"])
    first = client.chat.completions.create(model=target["chat"], messages=[question], tools=[WEATHER_TOOL], tool_choice="auto")
    choice = first.choices[0]
    assert choice.finish_reason == "tool_calls"
    assert choice.message.content == "Let me check."
    [tool_call] = choice.message.tool_calls
    assert tool_call.id == TOOL_USE_ID and tool_call.type == "function" and tool_call.function.name == "get_weather"
    assert json.loads(tool_call.function.arguments) == TOOL_INPUT
    assert (first.usage.prompt_tokens, first.usage.completion_tokens, first.usage.total_tokens) == (40, 20, 60)
    [call] = upstream_calls(target["mock"], mark)
    assert_upstream_request(call, target, "converse")
    assert call["refused"] is None
    assert call["body"]["messages"] == [{"role": "user", "content": [{"text": "What's the weather in Paris?"}]}]
    assert call["body"]["toolConfig"] == {
        "tools": [{"toolSpec": {"name": "get_weather", "description": "Current weather in a city",
                                "inputSchema": {"json": WEATHER_TOOL["function"]["parameters"]}}}],
        "toolChoice": {"auto": {}},
    }

    tool_output = json.dumps({"temp_c": 21, "sky": "clear"})
    mark = seen(target["mock"])
    second = client.chat.completions.create(model=target["chat"], tools=[WEATHER_TOOL], messages=[
        question,
        choice.message.model_dump(exclude_none=True),
        {"role": "tool", "tool_call_id": tool_call.id, "content": tool_output},
    ])
    assert second.choices[0].message.content == "It is 21°C and sunny in Paris."
    assert second.choices[0].finish_reason == "stop" and not second.choices[0].message.tool_calls
    assert (second.usage.prompt_tokens, second.usage.completion_tokens, second.usage.total_tokens) == (40, 20, 60)
    [call] = upstream_calls(target["mock"], mark)
    assert_upstream_request(call, target, "converse")
    assert call["refused"] is None, call["refused"]
    user, assistant, result = call["body"]["messages"]
    assert user == {"role": "user", "content": [{"text": "What's the weather in Paris?"}]}
    assert assistant == {"role": "assistant", "content": [
        {"text": "Let me check."},
        {"toolUse": {"toolUseId": TOOL_USE_ID, "name": "get_weather", "input": TOOL_INPUT}}]}
    assert result["role"] == "user"
    [block] = result["content"]
    assert block["toolResult"]["toolUseId"] == TOOL_USE_ID
    assert block["toolResult"]["content"] in ([{"text": tool_output}], [{"json": json.loads(tool_output)}])
    assert block["toolResult"].get("status", "success") == "success"
    assert call["body"]["toolConfig"]["tools"][0]["toolSpec"]["name"] == "get_weather"


def test_streamed_tool_call(target):
    mark = seen(target["mock"])
    chunks = list(target["client"].chat.completions.create(
        model=target["chat"], messages=[{"role": "user", "content": "What's the weather in Paris?"}],
        tools=[WEATHER_TOOL], stream=True, stream_options={"include_usage": True}))
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == "Checking."
    deltas = [tc for c in chunks if c.choices for tc in (c.choices[0].delta.tool_calls or [])]
    # Two calls: each starts with its id, name and type; its argument pieces follow, without id.
    assert sorted({tc.index for tc in deltas}) == [0, 1]
    for index, tool_use_id, fragments, tool_input in [(0, TOOL_USE_ID, TOOL_INPUT_FRAGMENTS, {"city": "Paris"}),
                                                      (1, TOOL_USE_ID_2, None, TOOL_INPUT_2)]:
        calls = [tc for tc in deltas if tc.index == index]
        assert calls[0].id == tool_use_id and calls[0].type == "function"
        assert calls[0].function.name == "get_weather"
        assert all(tc.id is None for tc in calls[1:])
        if fragments:
            assert [tc.function.arguments for tc in calls if tc.function.arguments] == fragments
        assert json.loads("".join(tc.function.arguments or "" for tc in calls)) == tool_input
    assert [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason] == ["tool_calls"]
    assert chunks[-1].choices == [] and (chunks[-1].usage.prompt_tokens, chunks[-1].usage.completion_tokens, chunks[-1].usage.total_tokens) == (41, 36, 77)
    [call] = upstream_calls(target["mock"], mark)
    assert_upstream_request(call, target, "converse-stream")
    assert call["refused"] is None
    assert call["body"]["toolConfig"]["tools"][0]["toolSpec"]["name"] == "get_weather"


# -- errors ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("stream", [False, True], ids=["converse", "converse-stream"])
def test_throttling_is_rate_limit_error(target, stream):
    mark = seen(target["mock"])
    with pytest.raises(openai.RateLimitError) as err:
        answer = target["client"].chat.completions.create(
            model=target["busy"], messages=[{"role": "user", "content": "hi"}], stream=stream)
        if stream:
            list(answer)
    assert err.value.status_code == 429
    assert THROTTLED in err.value.message
    [call] = upstream_calls(target["mock"], mark)  # max_retries=0: exactly one upstream call
    assert_upstream_request(call, target, "converse-stream" if stream else "converse", model=BUSY_MODEL_ID)
    assert call["refused"] == "ThrottlingException"


@pytest.mark.parametrize("stream", [False, True], ids=["converse", "converse-stream"])
def test_validation_exception_is_bad_request_with_the_message(target, stream):
    # OpenAI allows temperature up to 2, Converse up to 1: Bedrock refuses it with a ValidationException.
    mark = seen(target["mock"])
    with pytest.raises(openai.BadRequestError) as err:
        answer = target["client"].chat.completions.create(
            model=target["chat"], temperature=1.5, messages=[{"role": "user", "content": "hi"}], stream=stream)
        if stream:
            list(answer)
    assert err.value.status_code == 400
    assert TEMPERATURE_RANGE in err.value.message
    assert err.value.type == "invalid_request_error"
    [call] = upstream_calls(target["mock"], mark)
    assert_upstream_request(call, target, "converse-stream" if stream else "converse")
    assert call["refused"] == "ValidationException"


def test_model_error_is_bad_gateway(target):
    # DESIGN §16: statuses outside the kept set (Bedrock's 424 ModelErrorException) become 502.
    mark = seen(target["mock"])
    with pytest.raises(openai.InternalServerError) as err:
        target["client"].chat.completions.create(model=target["flaky"], messages=[{"role": "user", "content": "hi"}])
    assert err.value.status_code == 502
    assert "The model produced an invalid response" in err.value.message
    [call] = upstream_calls(target["mock"], mark)
    assert_upstream_request(call, target, "converse", model=FLAKY_MODEL_ID)
    assert call["refused"] == "ModelErrorException"


def test_exception_frame_mid_stream_is_an_api_error(target):
    mark = seen(target["mock"])
    received = []
    with pytest.raises(openai.APIError) as err:
        for chunk in target["client"].chat.completions.create(
                model=target["flaky"], messages=[{"role": "user", "content": "hi"}], stream=True):
            received.append(chunk)
    assert "".join(c.choices[0].delta.content or "" for c in received if c.choices) == "It is"
    assert not any(c.choices and c.choices[0].finish_reason for c in received)
    assert "Model stream error" in err.value.message
    [call] = upstream_calls(target["mock"], mark)
    assert_upstream_request(call, target, "converse-stream", model=FLAKY_MODEL_ID)


def test_wrong_secret_is_a_gateway_error_without_the_secret(gateway):
    mark = seen(gateway["mock"])
    with pytest.raises(openai.InternalServerError) as err:
        gateway["client"].chat.completions.create(model="wrong-secret-claude", messages=[{"role": "user", "content": "hi"}])
    assert err.value.status_code == 502
    assert err.value.code == "upstream_credential_refused"
    text = err.value.response.text
    assert WRONG_SECRET not in text and CLIENT_KEY not in text
    [call] = upstream_calls(gateway["mock"], mark)
    assert call["headers"].get("authorization", "").startswith(f"AWS4-HMAC-SHA256 Credential={SESSION_KEY_ID}/")
    assert call["refused"] == "InvalidSignatureException", "the mock checks signatures: a wrong secret must fail"
