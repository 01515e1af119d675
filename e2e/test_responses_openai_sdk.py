"""The OpenAI Responses API end to end (DESIGN §17, issue 17): `llmctl serve` and the official
`openai` Python SDK (`client.responses.create`, `.stream`, `.retrieve`, `.delete`,
`.input_items.list`) against the gateway, with the mock upstream (`llm-proxy-mock-upstream`, see
mock_upstream.py) standing in for OpenAI, Azure OpenAI (v1 and dated api-versions), the Anthropic
API, Gemini and Bedrock Converse.

- Passthrough (`PASSTHROUGH`: OpenAI and Azure): the upstream gets the client's body byte for byte
  except `model` (the remote name) and `previous_response_id` (the upstream's own id, where the
  client sent the gateway's). The ids the client sees are the gateway's (tagged with the
  connection), never the upstream's. Stored state works: chains by `previous_response_id`,
  retrieve, input items, delete; also on a pool of two OpenAI accounts (two mock processes, each
  with its own store), where every call must reach the account that stored the response.
- Translation (`TRANSLATED`: Anthropic, Gemini, Bedrock Converse): answers say `store: false` and
  carry complete usage; streams keep the Responses event order; streamed function calls keep
  their arguments; `previous_response_id` is a 400 `unsupported_parameter`; a hosted `web_search`
  tool is dropped from the offered tools, but a `tool_choice` forcing it is a 400.
- Errors as the SDK's exception classes; usage in the metrics.

Every number and text the mocks answer with is in the block below, to adjust in one place."""

import json
import re
import time
import urllib.request
from urllib.parse import quote

import openai
import pytest

from mock_upstream import mock_upstream
from serve import llmctl_serve

# -- the mocks (mock-upstream crate) ---------------------------------------------------------------
# Credentials: openai::OPENAI_KEY and OPENAI_SECOND_KEY, openai::AZURE_KEY, anthropic::ANTHROPIC_KEY,
# google::GEMINI_KEY, the Bedrock SigV4 pair (see test_bedrock_openai_sdk.py).
OPENAI_KEY = "sk-upstream-openai-0123456789"
OPENAI_SECOND_KEY = "sk-upstream-openai-second-9876543210"
AZURE_KEY = "azure-upstream-key-abcdef"
ANTHROPIC_KEY = "sk-ant-api03-mock-upstream-0123456789abcdefABCDEF-xyzAA"
STUDIO_KEY = "AIzaSyA1b2C3d4E5f6G7h8I9j0KlMnOpQrStUvW"
ACCESS_KEY_ID = "AKIAIOSFODNN7EXAMPLE"
SECRET_ACCESS_KEY = "wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY"
REGION = "us-east-1"
# The mock's Responses API (responses.rs): the answer text, the get_weather call, the answer to a
# function_call_output, the fixed usage, the Azure api-version the gateway uses by default.
RESPONSES_TEXT = "Hello from mock responses: turn {n}"  # n: user messages in the conversation
TOOL_ANSWER = "Hello from mock responses: the tool said {output}"
WEATHER_ARGUMENTS = '{"location":"Paris"}'
RESPONSES_INPUT_TOKENS, RESPONSES_OUTPUT_TOKENS = 37, 11
CACHED_TOKENS = 1024  # reported (and counted in the input) when the body contains CACHEME
REASONING_TOKENS = 64  # reported (and counted in the output) by reasoning models (o*, gpt-5*)
REASONING_REMOTE = "gpt-5-mini"
DEFAULT_AZURE_RESPONSES_VERSION = "2025-04-01-preview"  # catalog::DEFAULT_AZURE_RESPONSES_API_VERSION
EXPLICIT_AZURE_RESPONSES_VERSION = "2025-03-01-preview"  # the earliest the mock (and Azure) serves
# The translated mocks: their remote models, answers (not streamed, streamed), the arguments of
# their get_weather calls, their usage where a test counts it.
ANTHROPIC_REMOTE = "claude-sonnet-4-5-20250929"
ANTHROPIC_HELLO = "Hello from mock anthropic: {text}"  # the last user text
ANTHROPIC_INPUT_TOKENS, ANTHROPIC_OUTPUT_TOKENS = 25, 12
GEMINI_REMOTE = "gemini-2.5-flash"
CONVERSE_REMOTE = "amazon.nova-pro-v1:0"  # bedrock::NOVA_PRO: not Claude, so called through Converse

CLIENT_KEY = "vk-responses-e2e-1414"
PROMPT = "hi"
WEATHER_PROMPT = "What is the weather in Paris?"
WEATHER_TOOL = {"type": "function", "name": "get_weather", "description": "Current weather in a city",
                "parameters": {"type": "object", "properties": {"location": {"type": "string"}},
                               "required": ["location"]}}
WEB_SEARCH_TOOL = {"type": "web_search"}
CHAIN_TURNS = 10
POOL_CHAINS = 30  # chains started on the pool until both accounts got one (weights 1:1)

# Passthrough targets: alias, connection, the mock's path (and query) for `/responses`, its auth header.
PASSTHROUGH = {
    "openai": {"alias": "gpt", "remote": "gpt-4o", "base": "/v1/responses", "query": None,
               "auth": ("authorization", f"Bearer {OPENAI_KEY}")},
    "azure-v1-endpoint": {"alias": "azure-v1", "remote": "gpt-4o-deployment", "base": "/openai/v1/responses",
                          "query": None, "auth": ("api-key", AZURE_KEY)},
    "azure-v1-option": {"alias": "azure-v1-option", "remote": "gpt-4o-deployment",
                        "base": "/openai/v1/responses", "query": None, "auth": ("api-key", AZURE_KEY)},
    "azure-dated": {"alias": "azure-dated", "remote": "gpt-4o-deployment", "base": "/openai/responses",
                    "query": f"api-version={DEFAULT_AZURE_RESPONSES_VERSION}", "auth": ("api-key", AZURE_KEY)},
    "azure-dated-option": {"alias": "azure-dated-option", "remote": "gpt-4o-deployment",
                           "base": "/openai/responses", "query": f"api-version={EXPLICIT_AZURE_RESPONSES_VERSION}",
                           "auth": ("api-key", AZURE_KEY)},
}

# Translated targets: alias, the mock's paths (not streamed, streamed), answers, get_weather arguments.
TRANSLATED = {
    "anthropic": {"alias": "claude", "paths": ("/v1/messages",) * 2,
                  "text": ANTHROPIC_HELLO.format(text=PROMPT), "streamed": ANTHROPIC_HELLO.format(text=PROMPT),
                  "arguments": {"location": "Paris"}},
    "gemini": {"alias": "gemini", "paths": (f"/v1beta/models/{GEMINI_REMOTE}:generateContent",
                                            f"/v1beta/models/{GEMINI_REMOTE}:streamGenerateContent"),
               "text": "It is 21°C.", "streamed": "It is 21°C.", "arguments": {"city": "Paris"}},
    "converse": {"alias": "converse", "paths": (f"/model/{quote(CONVERSE_REMOTE, safe='')}/converse",
                                                f"/model/{quote(CONVERSE_REMOTE, safe='')}/converse-stream"),
                 "text": "Why did the chicken cross the road? To get to the other side.", "streamed": "It is 21°C.",
                 "arguments": {"city": "Paris"}},
}

POOL_ALIAS = "gpt-pool"
REASONING_ALIAS = "gpt-reasoning"
SLOW_ALIAS = "gpt-slow"
METERED_PASSTHROUGH, METERED_TRANSLATED = "gpt-metered", "claude-metered"

# The stream of one message item, in order (DESIGN §17; OpenAI's streaming reference).
MESSAGE_EVENTS = ["response.output_item.added", "response.content_part.added", "response.output_text.delta",
                  "response.output_text.done", "response.content_part.done", "response.output_item.done"]


@pytest.fixture(scope="module")
def gateway(tmp_path_factory):
    scratch = tmp_path_factory.mktemp("responses-e2e")
    with mock_upstream() as mock, mock_upstream() as second:
        with llmctl_serve(scratch) as gw:
            gw.llmctl("connection", "add", "--name", "OpenAI", "--provider", "openai", "--endpoint", mock.url,
                      "--api-key", OPENAI_KEY)
            gw.llmctl("connection", "add", "--name", "OpenAI-Second", "--provider", "openai",
                      "--endpoint", second.url, "--api-key", OPENAI_SECOND_KEY)
            gw.llmctl("connection", "add", "--name", "Azure-V1-Endpoint", "--provider", "azure",
                      "--endpoint", f"{mock.url}/openai/v1", "--api-key", AZURE_KEY)
            gw.llmctl("connection", "add", "--name", "Azure-V1-Option", "--provider", "azure",
                      "--endpoint", mock.url, "--api-key", AZURE_KEY, "--set", "api_version=v1")
            gw.llmctl("connection", "add", "--name", "Azure-Dated", "--provider", "azure",
                      "--endpoint", mock.url, "--api-key", AZURE_KEY)
            gw.llmctl("connection", "add", "--name", "Azure-Dated-Option", "--provider", "azure",
                      "--endpoint", mock.url, "--api-key", AZURE_KEY,
                      "--set", f"responses_api_version={EXPLICIT_AZURE_RESPONSES_VERSION}")
            gw.llmctl("connection", "add", "--name", "Anthropic", "--provider", "anthropic", "--endpoint", mock.url,
                      "--api-key", ANTHROPIC_KEY)
            gw.llmctl("connection", "add", "--name", "Gemini", "--provider", "google", "--endpoint", mock.url,
                      "--api-key", STUDIO_KEY, "--set", "api=gemini")
            gw.llmctl("connection", "add", "--name", "Bedrock", "--provider", "bedrock", "--endpoint", mock.url,
                      "--api-key", f"{ACCESS_KEY_ID}:{SECRET_ACCESS_KEY}", "--set", f"region={REGION}")
            gw.llmctl("vkey", "add", "--name", "Responses-App", "--key", CLIENT_KEY)
            aliases = set()

            def add(conn, name, remote, *assignments):
                gw.llmctl("model", "add", "--conn-id", conn, "--name", name, "--remote", remote)
                for alias, *limits in assignments:
                    gw.llmctl("assign", "--vkey-id", "Responses-App", "--model-id", name, "--alias", alias, *limits)
                    aliases.add(alias)

            add("OpenAI", "gpt-model", PASSTHROUGH["openai"]["remote"], ("gpt",), (METERED_PASSTHROUGH,),
                (POOL_ALIAS, "--weight", "1"), (SLOW_ALIAS, "--tps", "1", "--burst", "1"))
            add("OpenAI", "gpt-reasoning-model", REASONING_REMOTE, (REASONING_ALIAS,))
            add("OpenAI-Second", "gpt-second-model", PASSTHROUGH["openai"]["remote"], (POOL_ALIAS, "--weight", "1"))
            add("Azure-V1-Endpoint", "azure-v1-model", PASSTHROUGH["azure-v1-endpoint"]["remote"], ("azure-v1",))
            add("Azure-V1-Option", "azure-v1-option-model", PASSTHROUGH["azure-v1-option"]["remote"], ("azure-v1-option",))
            add("Azure-Dated", "azure-dated-model", PASSTHROUGH["azure-dated"]["remote"], ("azure-dated",))
            add("Azure-Dated-Option", "azure-dated-option-model", PASSTHROUGH["azure-dated-option"]["remote"],
                ("azure-dated-option",))
            add("Anthropic", "claude-model", ANTHROPIC_REMOTE, ("claude",), (METERED_TRANSLATED,))
            add("Gemini", "gemini-model", GEMINI_REMOTE, ("gemini",))
            add("Bedrock", "converse-model", CONVERSE_REMOTE, ("converse",))
            client, sent = recording_client(f"http://127.0.0.1:{gw.api_port}/v1")
            gw.wait_for_aliases(client, aliases)
            yield {"client": client, "sent": sent, "mock": mock, "second": second, "gw": gw,
                   "base_url": f"http://127.0.0.1:{gw.api_port}/v1"}


def recording_client(base_url, key=CLIENT_KEY):
    """An `openai.OpenAI` on the gateway, without retries, and the list of the requests it sends."""
    sent = []
    http = openai.DefaultHttpxClient(event_hooks={"request": [sent.append]})
    return openai.OpenAI(api_key=key, base_url=base_url, max_retries=0, http_client=http), sent


@pytest.fixture(params=list(PASSTHROUGH))
def passthrough(request, gateway):
    return dict(PASSTHROUGH[request.param], name=request.param)


@pytest.fixture(params=list(TRANSLATED))
def translated(request, gateway):
    return dict(TRANSLATED[request.param], name=request.param)


# -- helpers ---------------------------------------------------------------------------------------


def upstream_calls(mock, mark):
    """What the mock received since `mark`."""
    return mock.requests()[mark:]


def without_members(raw, *names):
    """The JSON text `raw` with the top-level members `names` (string values) cut out, to compare
    the rest byte for byte."""
    for name in names:
        raw = re.sub(rb'"%s"\s*:\s*"[^"]*"\s*,?\s*' % name.encode(), b"", raw, count=1)
    return raw.rstrip(b", \n")


def assert_passed_through(client_request, call, target, previous_upstream_id=None):
    """The mock got the client's body except `model` (and `previous_response_id`, the upstream's)
    at the target's path, with the upstream's credentials, not the virtual key."""
    sent = client_request.content
    sent_body = json.loads(sent)
    expected = dict(sent_body, model=target["remote"])
    if previous_upstream_id is not None:
        expected["previous_response_id"] = previous_upstream_id
    assert call["body"] == expected
    assert without_members(call["body_text"].encode(), "model", "previous_response_id") == \
        without_members(sent, "model", "previous_response_id")
    assert (call["method"], call["path"], call["query"]) == ("POST", target["base"], target["query"])
    header, value = target["auth"]
    assert call["headers"][header] == value
    assert CLIENT_KEY not in json.dumps(call["headers"])


def text_of(response):
    return response.output_text


def check_stream(events, final_text):
    """A well-formed Responses stream: created, in_progress, …, completed; strictly increasing
    sequence numbers; the message item's events in order; deltas adding up to the final text.
    Returns the completed response."""
    types = [event.type for event in events]
    assert types[:2] == ["response.created", "response.in_progress"], types
    assert types[-1] == "response.completed", types
    numbers = [event.sequence_number for event in events]
    assert all(a < b for a, b in zip(numbers, numbers[1:])), numbers
    messages = [event.output_index for event in events
                if event.type == "response.output_item.added" and event.item.type == "message"]
    assert len(messages) == 1, types
    message_events = [event for event in events if getattr(event, "output_index", None) == messages[0]]
    collapsed = [t for i, t in enumerate(e.type for e in message_events)
                 if t != "response.output_text.delta" or message_events[i - 1].type != t]
    assert collapsed == MESSAGE_EVENTS, [e.type for e in message_events]
    deltas = "".join(e.delta for e in message_events if e.type == "response.output_text.delta")
    done = next(e for e in message_events if e.type == "response.output_text.done")
    assert deltas == done.text == final_text
    completed = events[-1].response
    assert completed.id == events[0].response.id
    assert completed.output_text == final_text
    return completed


def check_streamed_function_calls(events):
    """Every streamed function call's argument deltas add up to its `.done` arguments and to its
    output item's arguments, and they are whole JSON. Returns the calls' output items."""
    calls = [event.item for event in events
             if event.type == "response.output_item.done" and event.item.type == "function_call"]
    assert calls, [event.type for event in events]
    for item in calls:
        index = next(e.output_index for e in events if e.type == "response.output_item.done" and e.item is item)
        deltas = "".join(e.delta for e in events
                         if e.type == "response.function_call_arguments.delta" and e.output_index == index)
        [done] = [e for e in events if e.type == "response.function_call_arguments.done" and e.output_index == index]
        assert deltas == done.arguments == item.arguments
        json.loads(item.arguments)
        added = next(e.item for e in events if e.type == "response.output_item.added" and e.output_index == index)
        assert added.type == "function_call" and added.name == item.name == "get_weather"
        assert item.call_id
    return calls


def token_counts(gateway, alias):
    text = urllib.request.urlopen(f"http://127.0.0.1:{gateway['gw'].metrics_port}/metrics", timeout=5).read().decode()
    counts = {}
    for line in text.splitlines():
        if line.startswith("llm_proxy_tokens_total{") and f'alias="{alias}"' in line:
            kind = re.search(r'kind="(\w+)"', line).group(1)
            counts[kind] = counts.get(kind, 0) + float(line.rsplit(" ", 1)[1])
    return counts


def wait_for_token_counts(gateway, alias, expected):
    deadline = time.monotonic() + 10
    while token_counts(gateway, alias) != expected:
        assert time.monotonic() < deadline, (token_counts(gateway, alias), expected)
        time.sleep(0.05)


# -- passthrough: OpenAI and Azure -----------------------------------------------------------------


def test_create_passes_through(passthrough, gateway):
    client, sent, mock = gateway["client"], gateway["sent"], gateway["mock"]
    mark = len(mock.requests())
    response = client.responses.create(model=passthrough["alias"], input=PROMPT, instructions="Be brief.",
                                       temperature=0.5, metadata={"team": "e2e"},
                                       extra_body={"an_unknown_field": {"kept": True}})
    assert text_of(response) == RESPONSES_TEXT.format(n=1)
    assert response.usage.input_tokens == RESPONSES_INPUT_TOKENS
    assert response.usage.output_tokens == RESPONSES_OUTPUT_TOKENS
    [call] = upstream_calls(mock, mark)
    assert_passed_through(sent[-1], call, passthrough)
    # The client sees the gateway's id, not the upstream's: the retrieve goes upstream untagged.
    assert response.id.startswith("resp_")
    retrieved = client.responses.retrieve(response.id)
    [get] = upstream_calls(mock, mark + 1)
    upstream_id = get["path"].rsplit("/", 1)[1]
    assert get["method"] == "GET" and get["path"] == f"{passthrough['base']}/{upstream_id}"
    assert get["query"] == passthrough["query"]
    assert upstream_id != response.id and upstream_id not in response.id
    assert retrieved.id == response.id and text_of(retrieved) == text_of(response)


def test_stream_passes_through(passthrough, gateway):
    client, sent, mock = gateway["client"], gateway["sent"], gateway["mock"]
    mark = len(mock.requests())
    with client.responses.stream(model=passthrough["alias"], input=PROMPT) as stream:
        events = list(stream)
        final = stream.get_final_response()
    completed = check_stream(events, RESPONSES_TEXT.format(n=1))
    assert final.id == completed.id and final.usage.output_tokens == RESPONSES_OUTPUT_TOKENS
    [call] = upstream_calls(mock, mark)
    assert_passed_through(sent[-1], call, passthrough)
    assert call["body"]["stream"] is True
    # Stored, under the same (gateway) id.
    assert text_of(client.responses.retrieve(completed.id)) == RESPONSES_TEXT.format(n=1)


def test_create_stream_true_passes_through(passthrough, gateway):
    client = gateway["client"]
    events = list(client.responses.create(model=passthrough["alias"], input=PROMPT, stream=True))
    check_stream(events, RESPONSES_TEXT.format(n=1))


def test_function_call_round_trip(passthrough, gateway):
    client, sent, mock = gateway["client"], gateway["sent"], gateway["mock"]
    first = client.responses.create(model=passthrough["alias"], input=WEATHER_PROMPT, tools=[WEATHER_TOOL])
    [call] = [item for item in first.output if item.type == "function_call"]
    assert call.name == "get_weather" and call.arguments == WEATHER_ARGUMENTS
    mark = len(mock.requests())
    output = "21 degrees and sunny"
    second = client.responses.create(model=passthrough["alias"], previous_response_id=first.id, tools=[WEATHER_TOOL],
                                     input=[{"type": "function_call_output", "call_id": call.call_id, "output": output}])
    assert text_of(second) == TOOL_ANSWER.format(output=output)
    [upstream] = upstream_calls(mock, mark)
    previous = upstream["body"]["previous_response_id"]
    assert previous != first.id and previous.startswith("resp_")
    assert_passed_through(sent[-1], upstream, passthrough, previous_upstream_id=previous)


def test_streamed_function_call_passes_through(passthrough, gateway):
    with gateway["client"].responses.stream(model=passthrough["alias"], input=WEATHER_PROMPT,
                                            tools=[WEATHER_TOOL]) as stream:
        events = list(stream)
    [call] = check_streamed_function_calls(events)
    assert call.arguments == WEATHER_ARGUMENTS


def test_chain_of_ten_turns(passthrough, gateway):
    client, sent, mock = gateway["client"], gateway["sent"], gateway["mock"]
    response = client.responses.create(model=passthrough["alias"], input="turn 1")
    ids = [response.id]
    for turn in range(2, CHAIN_TURNS + 1):
        mark = len(mock.requests())
        response = client.responses.create(model=passthrough["alias"], input=f"turn {turn}",
                                           previous_response_id=response.id)
        ids.append(response.id)
        [call] = upstream_calls(mock, mark)
        upstream_previous = call["body"]["previous_response_id"]
        assert upstream_previous != ids[-2]
        assert_passed_through(sent[-1], call, passthrough, previous_upstream_id=upstream_previous)
    assert text_of(response) == RESPONSES_TEXT.format(n=CHAIN_TURNS)
    assert len(set(ids)) == CHAIN_TURNS
    # Each turn is stored and retrievable under the id the client got.
    for turn, response_id in enumerate(ids, start=1):
        assert text_of(client.responses.retrieve(response_id)) == RESPONSES_TEXT.format(n=turn)


def test_input_items(passthrough, gateway):
    client, mock = gateway["client"], gateway["mock"]
    response = client.responses.create(model=passthrough["alias"], input="list my input")
    mark = len(mock.requests())
    items = client.responses.input_items.list(response.id)
    [item] = items.data
    assert item.type == "message" and item.role == "user"
    assert [part.text for part in item.content] == ["list my input"]
    [call] = upstream_calls(mock, mark)
    assert call["method"] == "GET" and call["path"].startswith(passthrough["base"] + "/")
    assert call["path"].endswith("/input_items") and response.id not in call["path"]


def test_delete_then_retrieve_is_not_found(passthrough, gateway):
    client = gateway["client"]
    response = client.responses.create(model=passthrough["alias"], input=PROMPT)
    client.responses.delete(response.id)
    with pytest.raises(openai.NotFoundError):
        client.responses.retrieve(response.id)
    with pytest.raises(openai.NotFoundError):
        client.responses.delete(response.id)


def test_usage_of_a_reasoning_model_with_cached_input(gateway):
    # CACHEME makes the mock report cached input tokens; a gpt-5 model adds a reasoning item and tokens.
    response = gateway["client"].responses.create(model=REASONING_ALIAS, input="CACHEME please")
    assert [item.type for item in response.output] == ["reasoning", "message"]
    usage = response.usage
    assert (usage.input_tokens, usage.input_tokens_details.cached_tokens) == \
        (RESPONSES_INPUT_TOKENS + CACHED_TOKENS, CACHED_TOKENS)
    assert (usage.output_tokens, usage.output_tokens_details.reasoning_tokens) == \
        (RESPONSES_OUTPUT_TOKENS + REASONING_TOKENS, REASONING_TOKENS)
    # A stream whose message follows a reasoning item.
    with gateway["client"].responses.stream(model=REASONING_ALIAS, input=PROMPT) as stream:
        events = list(stream)
    assert [e.item.type for e in events if e.type == "response.output_item.added"] == ["reasoning", "message"]
    check_stream(events, RESPONSES_TEXT.format(n=1))


# -- a pool of two OpenAI accounts -----------------------------------------------------------------


def test_pool_keeps_each_chain_on_the_account_that_stored_it(gateway):
    client, first, second = gateway["client"], gateway["mock"], gateway["second"]
    used = set()
    for _ in range(POOL_CHAINS):
        marks = len(first.requests()), len(second.requests())
        response = client.responses.create(model=POOL_ALIAS, input="turn 1")
        ids = [response.id]
        for turn in range(2, CHAIN_TURNS + 1):
            response = client.responses.create(model=POOL_ALIAS, input=f"turn {turn}", previous_response_id=response.id)
            ids.append(response.id)
        assert text_of(response) == RESPONSES_TEXT.format(n=CHAIN_TURNS)
        counts = len(first.requests()) - marks[0], len(second.requests()) - marks[1]
        # The whole chain on one account.
        assert sorted(counts) == [0, CHAIN_TURNS], counts
        account = 0 if counts[0] else 1
        used.add(account)
        for turn, response_id in enumerate(ids, start=1):
            assert text_of(client.responses.retrieve(response_id)) == RESPONSES_TEXT.format(n=turn)
            assert [i.content[0].text for i in client.responses.input_items.list(response_id, order="asc").data
                    if i.type == "message" and i.role == "user"] == [f"turn {k}" for k in range(1, turn + 1)]
        for response_id in ids:
            client.responses.delete(response_id)
            with pytest.raises(openai.NotFoundError):
                client.responses.retrieve(response_id)
        mocks = (first, second)
        assert len(mocks[1 - account].requests()) == marks[1 - account], "a call reached the other account"
        if used == {0, 1}:
            break
    assert used == {0, 1}, f"{POOL_CHAINS} chains all started on one account of a 1:1 pool"


# -- translation: Anthropic, Gemini, Bedrock Converse ----------------------------------------------


def complete_usage(usage):
    assert usage.input_tokens_details is not None and isinstance(usage.input_tokens_details.cached_tokens, int)
    assert usage.output_tokens_details is not None and isinstance(usage.output_tokens_details.reasoning_tokens, int)
    assert usage.total_tokens == usage.input_tokens + usage.output_tokens


def test_translated_create(translated, gateway):
    client, mock = gateway["client"], gateway["mock"]
    mark = len(mock.requests())
    response = client.responses.create(model=translated["alias"], input=PROMPT)
    assert text_of(response) == translated["text"]
    assert response.store is False and response.status == "completed"
    complete_usage(response.usage)
    calls = [c for c in upstream_calls(mock, mark) if c["path"] != "/token"]
    assert [c["path"] for c in calls] == [translated["paths"][0]]
    assert CLIENT_KEY not in json.dumps(calls[0]["headers"])


def test_translated_stream(translated, gateway):
    client, mock = gateway["client"], gateway["mock"]
    mark = len(mock.requests())
    with client.responses.stream(model=translated["alias"], input=PROMPT) as stream:
        events = list(stream)
    completed = check_stream(events, translated["streamed"])
    assert completed.store is False
    complete_usage(completed.usage)
    assert [c["path"] for c in upstream_calls(mock, mark)] == [translated["paths"][1]]


def test_translated_streamed_function_call(translated, gateway):
    client = gateway["client"]
    with client.responses.stream(model=translated["alias"], input=WEATHER_PROMPT, tools=[WEATHER_TOOL]) as stream:
        events = list(stream)
    calls = check_streamed_function_calls(events)
    assert json.loads(calls[0].arguments) == translated["arguments"]
    completed = events[-1]
    assert completed.type == "response.completed"
    assert [i.arguments for i in completed.response.output if i.type == "function_call"] == [c.arguments for c in calls]


def test_translated_previous_response_id_is_unsupported(translated, gateway):
    with pytest.raises(openai.BadRequestError) as err:
        gateway["client"].responses.create(model=translated["alias"], input=PROMPT,
                                           previous_response_id="resp_0123456789abcdef")
    assert err.value.status_code == 400 and err.value.code == "unsupported_parameter"
    assert "previous_response_id" in err.value.message


def offered_tool_names(name, body):
    """The names of the tools a translated upstream was offered, and whether anything else was."""
    if name == "anthropic":
        return [tool["name"] for tool in body.get("tools", [])]
    if name == "gemini":
        tools = body.get("tools", [])
        assert all(set(tool) == {"functionDeclarations"} for tool in tools), tools
        return [d["name"] for tool in tools for d in tool["functionDeclarations"]]
    tools = body.get("toolConfig", {}).get("tools", [])
    assert all(set(tool) == {"toolSpec"} for tool in tools), tools
    return [tool["toolSpec"]["name"] for tool in tools]


def test_translated_web_search_tool_is_dropped(translated, gateway):
    client, mock = gateway["client"], gateway["mock"]
    mark = len(mock.requests())
    client.responses.create(model=translated["alias"], input=PROMPT, tools=[WEATHER_TOOL, WEB_SEARCH_TOOL])
    [call] = [c for c in upstream_calls(mock, mark) if c["path"] != "/token"]
    assert offered_tool_names(translated["name"], call["body"]) == ["get_weather"]


def test_translated_forced_web_search_is_refused(translated, gateway):
    mark = len(gateway["mock"].requests())
    with pytest.raises(openai.BadRequestError) as err:
        gateway["client"].responses.create(model=translated["alias"], input=PROMPT,
                                           tools=[WEATHER_TOOL, WEB_SEARCH_TOOL], tool_choice={"type": "web_search"})
    assert err.value.status_code == 400 and "web_search" in err.value.message
    assert upstream_calls(gateway["mock"], mark) == []


# -- errors ----------------------------------------------------------------------------------------


def test_wrong_key_is_authentication_error(gateway):
    client, _ = recording_client(gateway["base_url"], key="vk-nope-0000")
    with pytest.raises(openai.AuthenticationError):
        client.responses.create(model="gpt", input=PROMPT)


def test_unknown_alias_is_not_found(gateway):
    with pytest.raises(openai.NotFoundError) as err:
        gateway["client"].responses.create(model="gpt-nope", input=PROMPT)
    assert err.value.code == "model_not_found"


def test_over_tps_is_rate_limit_error(gateway):
    with pytest.raises(openai.RateLimitError):
        for _ in range(5):
            gateway["client"].responses.create(model=SLOW_ALIAS, input=PROMPT)


def test_unknown_response_id_is_not_found(gateway):
    with pytest.raises(openai.NotFoundError):
        gateway["client"].responses.retrieve("resp_0123456789abcdef")


# -- usage in the metrics --------------------------------------------------------------------------


def test_passthrough_usage_reaches_the_metrics(gateway):
    client = gateway["client"]
    client.responses.create(model=METERED_PASSTHROUGH, input=PROMPT)
    with client.responses.stream(model=METERED_PASSTHROUGH, input=PROMPT) as stream:
        list(stream)
    # gpt-4o without CACHEME: no cached or reasoning tokens, so no cache_read or reasoning series.
    wait_for_token_counts(gateway, METERED_PASSTHROUGH,
                          {"prompt": 2 * RESPONSES_INPUT_TOKENS, "completion": 2 * RESPONSES_OUTPUT_TOKENS})


def test_translated_usage_reaches_the_metrics(gateway):
    client = gateway["client"]
    response = client.responses.create(model=METERED_TRANSLATED, input=PROMPT)
    assert (response.usage.input_tokens, response.usage.output_tokens) == (ANTHROPIC_INPUT_TOKENS, ANTHROPIC_OUTPUT_TOKENS)
    with client.responses.stream(model=METERED_TRANSLATED, input=PROMPT) as stream:
        list(stream)
    wait_for_token_counts(gateway, METERED_TRANSLATED,
                          {"prompt": 2 * ANTHROPIC_INPUT_TOKENS, "completion": 2 * ANTHROPIC_OUTPUT_TOKENS})
