"""The seed's flow end to end: `llmctl serve`, the four `llmctl` setup commands, then the official
OpenAI Python SDK against the gateway, with the mock upstream (`llm-proxy-mock-upstream`, see
mock_upstream.py) standing in for api.openai.com."""

import json

import httpx
import openai
import pytest

from mock_upstream import mock_upstream
from serve import llmctl_serve

# The OpenAI key the mock upstream accepts (the mock-upstream crate's openai::OPENAI_KEY).
UPSTREAM_KEY = "sk-upstream-openai-0123456789"
CLIENT_KEY = "vk-front-1234"


@pytest.fixture(scope="module")
def gateway(tmp_path_factory):
    with mock_upstream() as upstream:
        upstream_url = upstream.url
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
            yield {"client": client, "api_port": gw.api_port, "upstream": upstream}


def test_chat(gateway):
    answer = gateway["client"].chat.completions.create(model="gpt-4", messages=[{"role": "user", "content": "Hello!"}])
    assert answer.choices[0].message.content == "Hello!"
    assert answer.usage.total_tokens == 17
    seen = gateway["upstream"].requests()[-1]
    path, headers, body = seen["path"], seen["headers"], seen["body"]
    assert path == "/v1/chat/completions" and body["model"] == "gpt-4-turbo-preview"
    assert CLIENT_KEY not in json.dumps(headers)


def test_stream_without_usage(gateway):
    chunks = list(gateway["client"].chat.completions.create(model="gpt-4", messages=[{"role": "user", "content": "hi"}], stream=True))
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == "Hi there"
    assert all(c.choices for c in chunks), "no usage-only chunk when the client did not ask"
    assert gateway["upstream"].requests()[-1]["body"]["stream_options"]["include_usage"] is True


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
    assert gateway["upstream"].requests()[-1]["body"]["encoding_format"] == "base64"
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
