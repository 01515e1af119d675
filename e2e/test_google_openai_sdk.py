"""Google end to end: `llmctl serve`, the `llmctl` setup commands, then the official OpenAI Python
SDK against the gateway, with the mock upstream (`llm-proxy-mock-upstream`, see mock_upstream.py)
standing in for the Gemini API (AI Studio, generativelanguage.googleapis.com), Vertex AI
(aiplatform.googleapis.com) and Google's OAuth token endpoint (oauth2.googleapis.com/token).

Two connections are exercised with the same tests (parametrized): an AI Studio one with an
`AIza...` key and a Vertex one with a service-account key file whose `token_uri` points at the
mock. The mock checks what a real Google server would refuse (auth, paths, unknown JSON fields,
the JWT assertion), answers with Gemini-shaped bodies (wire formats §3, §4) and records every
request so that the tests can assert on what went upstream."""

import base64
import json
import re
from urllib.parse import parse_qs

import openai
import pytest

from mock_upstream import mock_upstream
from serve import ROOT, llmctl_serve

SERVICE_ACCOUNT = ROOT / "mock-upstream" / "fixtures" / "google" / "test-service-account.json"
# The mock's credentials (the mock-upstream crate's google::GEMINI_KEY; any other key is refused).
STUDIO_KEY = "AIzaSyA1b2C3d4E5f6G7h8I9j0KlMnOpQrStUvW"
BAD_STUDIO_KEY = "AIzaSyE2e-revoked-456789abcdefghijklmn"
# The token the mock's token endpoint issues first (`ya29.mock-<n>` for the n-th exchange).
ACCESS_TOKEN = "ya29.mock-1"
CLIENT_KEY = "vk-google-e2e-5678"
PROJECT = "llm-proxy-test"  # the fixture service account's project_id
LOCATION = "us-central1"
CHAT_MODEL = "gemini-2.5-flash"
EMBED_MODEL = "gemini-embedding-001"
MISSING_MODEL = "gemini-0.9-nope"  # google::MISSING_MODEL: the mock answers 404 NOT_FOUND
# The signature of the mock's function calls (google::THOUGHT_SIGNATURE).
THOUGHT_SIGNATURE = "CiQB0e2Kb+3x/Qk9T1hvdWdodFNpZ25hdHVyZQ=="
JWT_BEARER = "urn:ietf:params:oauth:grant-type:jwt-bearer"
CLOUD_PLATFORM = "https://www.googleapis.com/auth/cloud-platform"

# The gateway's aliases for each connection (see the `gateway` fixture).
TARGETS = {
    "studio": {"chat": "studio-flash", "embed": "studio-embed", "missing": "studio-missing",
               "prefix": "/v1beta/models/"},
    "vertex": {"chat": "vertex-flash", "embed": "vertex-embed", "missing": "vertex-missing",
               "prefix": f"/v1/projects/{PROJECT}/locations/{LOCATION}/publishers/google/models/"},
}

def b64url_json(segment):
    return json.loads(base64.urlsafe_b64decode(segment + "=" * (-len(segment) % 4)))


def model_calls(mock):
    """The model calls the mock received (token exchanges apart), in order, each with its flavour
    (`studio` or `vertex`, by path), its query parsed and its raw body."""
    calls = []
    for request in mock.requests():
        if request["path"] == "/token":
            continue
        flavour = "studio" if request["path"].startswith("/v1beta/") else "vertex"
        calls.append(dict(request, flavour=flavour, query=parse_qs(request["query"] or ""),
                          raw=request["body_text"].encode()))
    return calls


def token_posts(mock):
    """The token endpoint's form posts: dicts with the form, the JWT header and claims."""
    posts = []
    for request in mock.requests():
        if request["path"] == "/token":
            form = {k: v[0] for k, v in parse_qs(request["body_text"]).items()}
            header, claims, _ = (form.get("assertion", "") + "..").split(".", 2)
            posts.append({"form": form, "header": b64url_json(header), "claims": b64url_json(claims)})
    return posts


@pytest.fixture(scope="module")
def gateway(tmp_path_factory):
    scratch = tmp_path_factory.mktemp("google-e2e")
    with mock_upstream() as mock:
        # One mock serves both APIs and the token endpoint, told apart by path.
        studio_url = vertex_url = mock.url
        key_file = scratch / "service-account.json"
        account = json.loads(SERVICE_ACCOUNT.read_text())
        account["token_uri"] = f"{vertex_url}/token"
        key_file.write_text(json.dumps(account, indent=2) + "\n")
        with llmctl_serve(scratch) as gw:
            gw.llmctl("connection", "add", "--name", "Gemini-Studio", "--provider", "google",
                      "--endpoint", studio_url, "--api-key", STUDIO_KEY, "--set", "api=gemini")
            gw.llmctl("connection", "add", "--name", "Vertex-SA", "--provider", "google",
                      "--endpoint", vertex_url, "--api-key-file", str(key_file), "--set", "api=vertex",
                      "--set", f"location={LOCATION}")
            gw.llmctl("connection", "add", "--name", "Gemini-Revoked", "--provider", "google",
                      "--endpoint", studio_url, "--api-key", BAD_STUDIO_KEY, "--set", "api=gemini")
            gw.llmctl("vkey", "add", "--name", "Google-App", "--key", CLIENT_KEY)
            models = [
                ("Gemini-Studio", "gemini-flash", CHAT_MODEL, "studio-flash"),
                ("Gemini-Studio", "gemini-embed", EMBED_MODEL, "studio-embed"),
                ("Gemini-Studio", "gemini-missing", MISSING_MODEL, "studio-missing"),
                ("Vertex-SA", "vertex-flash", CHAT_MODEL, "vertex-flash"),
                ("Vertex-SA", "vertex-embed", EMBED_MODEL, "vertex-embed"),
                ("Vertex-SA", "vertex-missing", MISSING_MODEL, "vertex-missing"),
                ("Gemini-Revoked", "revoked-flash", CHAT_MODEL, "revoked-flash"),
            ]
            for conn, name, remote, alias in models:
                gw.llmctl("model", "add", "--conn-id", conn, "--name", name, "--remote", remote)
                gw.llmctl("assign", "--vkey-id", "Google-App", "--model-id", name, "--alias", alias)
            client = openai.OpenAI(api_key=CLIENT_KEY, base_url=f"http://localhost:{gw.api_port}", max_retries=0)
            gw.wait_for_aliases(client, {alias for *_, alias in models})
            yield {"client": client, "api_port": gw.api_port, "studio_url": studio_url, "vertex_url": vertex_url,
                   "mock": mock}


@pytest.fixture(params=["studio", "vertex"])
def target(request, gateway):
    return dict(TARGETS[request.param], flavour=request.param, client=gateway["client"], mock=gateway["mock"])


def upstream_calls(target, mark):
    flavour = target["flavour"]
    calls = model_calls(target["mock"])[mark:]
    assert all(c["flavour"] == flavour for c in calls), [(c["flavour"], c["path"]) for c in calls]
    return calls


def assert_upstream_request(call, target, method, model=CHAT_MODEL, query=None):
    """Path, query and auth of one upstream request; the virtual key never goes upstream."""
    assert call["path"] == f"{target['prefix']}{model}:{method}"
    assert call["query"] == (query or {})
    headers = call["headers"]
    if target["flavour"] == "studio":
        assert headers.get("x-goog-api-key") == STUDIO_KEY
        assert "authorization" not in headers
    else:
        assert headers.get("authorization") == f"Bearer {ACCESS_TOKEN}"
        assert "x-goog-api-key" not in headers
    assert headers.get("content-type", "").startswith("application/json")
    assert CLIENT_KEY not in json.dumps(headers) and CLIENT_KEY.encode() not in call["raw"]


def test_chat(target):
    mark = len(model_calls(target["mock"]))
    answer = target["client"].chat.completions.create(
        model=target["chat"], temperature=0.2, max_tokens=64,
        messages=[{"role": "system", "content": "You are terse."}, {"role": "user", "content": "Say hello"}])
    choice = answer.choices[0]
    assert choice.message.role == "assistant" and choice.message.content == "It is 21°C."
    assert choice.finish_reason == "stop" and not choice.message.tool_calls
    assert answer.object == "chat.completion" and answer.id.startswith("chatcmpl-")
    assert answer.model == CHAT_MODEL
    # Gemini: prompt 15 (5 cached), candidates 6, thoughts 40, total 61; reasoning counts in the
    # completion.
    assert (answer.usage.prompt_tokens, answer.usage.completion_tokens, answer.usage.total_tokens) == (15, 46, 61)
    assert answer.usage.completion_tokens_details.reasoning_tokens == 40
    [call] = upstream_calls(target, mark)
    assert_upstream_request(call, target, "generateContent")
    body = call["body"]
    assert body["contents"] == [{"role": "user", "parts": [{"text": "Say hello"}]}]
    assert body["systemInstruction"] == {"parts": [{"text": "You are terse."}]}
    assert body["generationConfig"] == {"temperature": 0.2, "maxOutputTokens": 64}


def test_stream_without_usage(target):
    mark = len(model_calls(target["mock"]))
    chunks = list(target["client"].chat.completions.create(
        model=target["chat"], messages=[{"role": "user", "content": "Say hello"}], stream=True))
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == "It is 21°C."
    assert chunks[0].choices[0].delta.role == "assistant"
    assert [c.choices[0].finish_reason for c in chunks if c.choices[0].finish_reason] == ["stop"]
    assert chunks[-1].choices[0].finish_reason == "stop"
    assert all(c.choices and c.usage is None for c in chunks), "no usage chunk when the client did not ask"
    assert len({c.id for c in chunks}) == 1 and all(c.object == "chat.completion.chunk" for c in chunks)
    [call] = upstream_calls(target, mark)
    assert_upstream_request(call, target, "streamGenerateContent", query={"alt": ["sse"]})
    assert call["body"]["contents"] == [{"role": "user", "parts": [{"text": "Say hello"}]}]


def test_stream_with_usage(target):
    mark = len(model_calls(target["mock"]))
    chunks = list(target["client"].chat.completions.create(
        model=target["chat"], messages=[{"role": "user", "content": "Say hello"}], stream=True,
        stream_options={"include_usage": True}))
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == "It is 21°C."
    assert chunks[-2].choices[0].finish_reason == "stop"
    usage_chunk = chunks[-1]
    assert usage_chunk.choices == []
    # The last Gemini event: prompt 9, candidates 5, thoughts 12, total 26.
    assert (usage_chunk.usage.prompt_tokens, usage_chunk.usage.completion_tokens, usage_chunk.usage.total_tokens) == (9, 17, 26)
    assert all(c.usage is None for c in chunks[:-1])
    [call] = upstream_calls(target, mark)
    assert_upstream_request(call, target, "streamGenerateContent", query={"alt": ["sse"]})
    assert "stream_options" not in call["body"]


WEATHER_TOOL = {"type": "function", "function": {
    "name": "get_weather", "description": "Current weather in a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}, "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]}},
                   "required": ["city"]}}}


def test_tool_call_round_trip(target):
    client = target["client"]
    question = {"role": "user", "content": "What's the weather in Paris?"}
    mark = len(model_calls(target["mock"]))
    first = client.chat.completions.create(model=target["chat"], messages=[question], tools=[WEATHER_TOOL], tool_choice="auto")
    choice = first.choices[0]
    assert choice.finish_reason == "tool_calls"
    assert choice.message.content is None
    [tool_call] = choice.message.tool_calls
    assert tool_call.type == "function" and tool_call.function.name == "get_weather"
    assert json.loads(tool_call.function.arguments) == {"city": "Paris"}
    assert tool_call.id.startswith("fc_7")
    assert (first.usage.prompt_tokens, first.usage.completion_tokens, first.usage.total_tokens) == (42, 28, 70)
    [call] = upstream_calls(target, mark)
    assert_upstream_request(call, target, "generateContent")
    [declaration] = call["body"]["tools"][0]["functionDeclarations"]
    assert declaration["name"] == "get_weather" and declaration["description"] == "Current weather in a city"
    assert (declaration.get("parametersJsonSchema") or declaration.get("parameters")) == WEATHER_TOOL["function"]["parameters"]
    assert call["body"]["toolConfig"] == {"functionCallingConfig": {"mode": "AUTO"}}

    tool_output = json.dumps({"temp_c": 21, "sky": "clear"})
    mark = len(model_calls(target["mock"]))
    second = client.chat.completions.create(model=target["chat"], tools=[WEATHER_TOOL], messages=[
        question,
        choice.message.model_dump(exclude_none=True),
        {"role": "tool", "tool_call_id": tool_call.id, "content": tool_output},
    ])
    assert second.choices[0].message.content == "It is 21°C in Paris."
    assert second.choices[0].finish_reason == "stop"
    assert (second.usage.prompt_tokens, second.usage.completion_tokens, second.usage.total_tokens) == (60, 7, 67)
    [call] = upstream_calls(target, mark)
    assert_upstream_request(call, target, "generateContent")
    user, model_turn, result = call["body"]["contents"]
    assert user == {"role": "user", "parts": [{"text": "What's the weather in Paris?"}]}
    assert model_turn["role"] == "model"
    [call_part] = model_turn["parts"]
    assert call_part["functionCall"] == {"id": "fc_7", "name": "get_weather", "args": {"city": "Paris"}}
    assert call_part.get("thoughtSignature") == THOUGHT_SIGNATURE, "Gemini's thought signature is echoed"
    assert result["role"] == "user"
    [response_part] = result["parts"]
    function_response = response_part["functionResponse"]
    assert function_response["name"] == "get_weather" and function_response.get("id") == "fc_7"
    assert tool_output in function_response["response"].values()


def test_streamed_tool_call(target):
    mark = len(model_calls(target["mock"]))
    chunks = list(target["client"].chat.completions.create(
        model=target["chat"], messages=[{"role": "user", "content": "What's the weather in Paris?"}],
        tools=[WEATHER_TOOL], stream=True, stream_options={"include_usage": True}))
    calls = [tc for c in chunks if c.choices for tc in (c.choices[0].delta.tool_calls or [])]
    # Streamed calls come without an id (older models): the gateway makes one.
    assert calls[0].index == 0 and re.fullmatch(r"call_[A-Za-z0-9]{24}", calls[0].id) and calls[0].function.name == "get_weather"
    assert json.loads("".join(tc.function.arguments or "" for tc in calls)) == {"city": "Paris"}
    assert [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason] == ["tool_calls"]
    assert chunks[-1].choices == [] and chunks[-1].usage.total_tokens == 50
    [call] = upstream_calls(target, mark)
    assert_upstream_request(call, target, "streamGenerateContent", query={"alt": ["sse"]})


def test_embeddings_base64_default_and_float(target):
    client = target["client"]
    method = "batchEmbedContents" if target["flavour"] == "studio" else "predict"
    inputs = ["hello", "bonjour tout le monde"]
    expected = [[0.25, -0.5, 1.0], [0.25, -0.5, 2.0]]  # google::vector(i)
    for encoding in (openai.NOT_GIVEN, "float"):
        mark = len(model_calls(target["mock"]))
        raw = client.embeddings.with_raw_response.create(model=target["embed"], input=inputs, encoding_format=encoding)
        # The SDK asks for base64 by default (and decodes it); float when told.
        wire = raw.http_response.json()["data"][0]["embedding"]
        assert isinstance(wire, str if encoding is openai.NOT_GIVEN else list)
        answer = raw.parse()
        assert [d.embedding for d in answer.data] == expected
        assert [d.index for d in answer.data] == [0, 1]
        assert answer.object == "list"
        if target["flavour"] == "vertex":
            # Vertex counts tokens per instance (statistics.token_count: 1 + 4).
            assert answer.usage.prompt_tokens == answer.usage.total_tokens == 5
        else:
            assert answer.usage.prompt_tokens == answer.usage.total_tokens > 0
        [call] = upstream_calls(target, mark)
        assert_upstream_request(call, target, method, model=EMBED_MODEL)
        if target["flavour"] == "studio":
            assert call["body"] == {"requests": [
                {"model": f"models/{EMBED_MODEL}", "content": {"parts": [{"text": text}]}} for text in inputs]}
        else:
            assert [i["content"] for i in call["body"]["instances"]] == inputs


def test_embeddings_dimensions(target):
    mark = len(model_calls(target["mock"]))
    answer = target["client"].embeddings.create(model=target["embed"], input="hello", dimensions=2, encoding_format="float")
    assert answer.data[0].embedding == [0.25, -0.5]
    [call] = upstream_calls(target, mark)
    if target["flavour"] == "studio":
        assert call["body"]["requests"][0]["outputDimensionality"] == 2
    else:
        assert call["body"]["parameters"] == {"outputDimensionality": 2}


def test_vertex_service_account_token_is_exchanged_once_and_reused(gateway):
    client = gateway["client"]
    for _ in range(2):
        client.chat.completions.create(model="vertex-flash", messages=[{"role": "user", "content": "Say hello"}])
    client.embeddings.create(model="vertex-embed", input="hello")
    posts = token_posts(gateway["mock"])
    assert len(posts) == 1, "the access token is cached for all calls on the connection"
    [post] = posts
    account = json.loads(SERVICE_ACCOUNT.read_text())
    assert post["form"]["grant_type"] == JWT_BEARER
    assert post["header"]["alg"] == "RS256" and post["header"]["kid"] == account["private_key_id"]
    claims = post["claims"]
    assert claims["iss"] == account["client_email"]
    assert claims["aud"] == f"{gateway['vertex_url']}/token"
    assert claims["scope"] == CLOUD_PLATFORM
    assert "private_key" not in json.dumps(post)


def test_unknown_remote_model_is_not_found(target):
    with pytest.raises(openai.NotFoundError) as err:
        target["client"].chat.completions.create(model=target["missing"], messages=[{"role": "user", "content": "hi"}])
    assert err.value.code == "model_not_found"
    assert MISSING_MODEL in err.value.message


def test_blocked_prompt_is_content_filter_bad_request(target):
    # DESIGN §16: a prompt rejected by the provider's safety filter before generation (Gemini's
    # promptFeedback.blockReason) is a 400 with code content_filter.
    mark = len(model_calls(target["mock"]))
    with pytest.raises(openai.BadRequestError) as err:
        target["client"].chat.completions.create(model=target["chat"], messages=[{"role": "user", "content": "BLOCKME this"}])
    assert err.value.code == "content_filter"
    [call] = upstream_calls(target, mark)
    assert_upstream_request(call, target, "generateContent")


def test_blocked_prompt_while_streaming_is_a_content_filter_bad_request(target):
    # DESIGN §16: the same "streaming or not": Gemini says so in the first stream event, so the
    # gateway has to read it before it sends its response head.
    mark = len(model_calls(target["mock"]))
    with pytest.raises(openai.BadRequestError) as err:
        list(target["client"].chat.completions.create(
            model=target["chat"], messages=[{"role": "user", "content": "BLOCKME this"}], stream=True))
    assert err.value.code == "content_filter"
    [call] = upstream_calls(target, mark)
    assert_upstream_request(call, target, "streamGenerateContent", query={"alt": ["sse"]})


def test_refused_upstream_key_is_a_gateway_error_without_the_key(gateway):
    with pytest.raises(openai.InternalServerError) as err:
        gateway["client"].chat.completions.create(model="revoked-flash", messages=[{"role": "user", "content": "hi"}])
    assert err.value.status_code == 502
    assert err.value.code == "upstream_credential_refused"
    text = err.value.response.text
    assert BAD_STUDIO_KEY not in text and CLIENT_KEY not in text
    assert model_calls(gateway["mock"])[-1]["headers"]["x-goog-api-key"] == BAD_STUDIO_KEY
