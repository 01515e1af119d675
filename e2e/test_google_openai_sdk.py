"""Google end to end: `llmctl serve`, the `llmctl` setup commands, then the official OpenAI Python
SDK against the gateway, with local mocks standing in for the Gemini API (AI Studio,
generativelanguage.googleapis.com), Vertex AI (aiplatform.googleapis.com) and Google's OAuth token
endpoint (oauth2.googleapis.com/token).

Two connections are exercised with the same tests (parametrized): an AI Studio one with an
`AIza...` key and a Vertex one with a service-account key file whose `token_uri` points at the
mock. The mocks check what a real Google server would refuse (auth, paths, unknown JSON fields),
answer with Gemini-shaped bodies (wire formats §3, §4) and record every request so that the tests
can assert on what went upstream."""

import base64
import json
import re
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, urlsplit

import openai
import pytest

from serve import ROOT, llmctl_serve

SERVICE_ACCOUNT = ROOT / "mock-upstream" / "fixtures" / "google" / "test-service-account.json"
STUDIO_KEY = "AIzaSyE2e-0123456789abcdefghijklmnopqr"  # 39 characters, like a real AI Studio key
BAD_STUDIO_KEY = "AIzaSyE2e-revoked-456789abcdefghijklmn"
ACCESS_TOKEN = "ya29.e2e-token"
CLIENT_KEY = "vk-google-e2e-5678"
PROJECT = "llm-proxy-test"  # the fixture service account's project_id
LOCATION = "us-central1"
CHAT_MODEL = "gemini-2.5-flash"
EMBED_MODEL = "gemini-embedding-001"
JWT_BEARER = "urn:ietf:params:oauth:grant-type:jwt-bearer"
CLOUD_PLATFORM = "https://www.googleapis.com/auth/cloud-platform"

# The gateway's aliases for each connection (see the `gateway` fixture).
TARGETS = {
    "studio": {"chat": "studio-flash", "embed": "studio-embed", "missing": "studio-missing",
               "prefix": "/v1beta/models/"},
    "vertex": {"chat": "vertex-flash", "embed": "vertex-embed", "missing": "vertex-missing",
               "prefix": f"/v1/projects/{PROJECT}/locations/{LOCATION}/publishers/google/models/"},
}

# Everything the mocks received, in order: dicts with flavour, path, query, headers, body.
SEEN = []
# The token endpoint's form posts: dicts with the form, the JWT header and claims.
TOKEN_POSTS = []

# Known fields (camelCase on the wire); a real server answers 400 "Unknown name" for any other.
REQUEST_FIELDS = {"contents", "systemInstruction", "tools", "toolConfig", "safetySettings", "generationConfig",
                  "cachedContent"}
VERTEX_REQUEST_FIELDS = REQUEST_FIELDS | {"labels", "modelArmorConfig"}
PART_DATA = {"text", "inlineData", "fileData", "functionCall", "functionResponse", "executableCode",
             "codeExecutionResult"}
PART_META = {"thought", "thoughtSignature", "videoMetadata", "mediaResolution"}
GENERATION_FIELDS = {"temperature", "topP", "topK", "candidateCount", "maxOutputTokens", "stopSequences",
                     "presencePenalty", "frequencyPenalty", "seed", "responseMimeType", "responseSchema",
                     "responseJsonSchema", "responseLogprobs", "logprobs", "thinkingConfig", "responseModalities",
                     "mediaResolution", "speechConfig"}


def b64url_json(segment):
    return json.loads(base64.urlsafe_b64decode(segment + "=" * (-len(segment) % 4)))


def unknown_fields(body, flavour):
    """The first problem a real Gemini/Vertex server would refuse in a generateContent body."""
    allowed = VERTEX_REQUEST_FIELDS if flavour == "vertex" else REQUEST_FIELDS
    for key in body:
        if key not in allowed:
            return f'Unknown name "{key}": Cannot find field.'
    contents = body.get("contents")
    if not isinstance(contents, list) or not contents:
        return "* GenerateContentRequest.contents: contents is not specified"
    for i, content in enumerate(contents):
        if content.get("role") not in ("user", "model"):
            return f"Please use a valid role: user, model. (contents[{i}].role={content.get('role')!r})"
        parts = content.get("parts")
        if not isinstance(parts, list) or not parts:
            return f"* GenerateContentRequest.contents[{i}].parts: contents.parts must not be empty."
        for j, part in enumerate(parts):
            extra = set(part) - PART_DATA - PART_META
            if extra:
                return f'Unknown name "{sorted(extra)[0]}" at \'contents[{i}].parts[{j}]\': Cannot find field.'
            data = set(part) & PART_DATA
            if len(data) != 1:
                return f"* GenerateContentRequest.contents[{i}].parts[{j}].data: required oneof field 'data' must have one initialized field"
            if "functionCall" in part:
                call = part["functionCall"]
                if content["role"] != "model" or not call.get("name") or not isinstance(call.get("args", {}), dict):
                    return f"* GenerateContentRequest.contents[{i}].parts[{j}].function_call: invalid function call"
            if "functionResponse" in part:
                response = part["functionResponse"]
                if content["role"] != "user" or not response.get("name") or not isinstance(response.get("response"), dict):
                    return f"* GenerateContentRequest.contents[{i}].parts[{j}].function_response.name: Name cannot be empty."
    for tool in body.get("tools", []):
        for declaration in tool.get("functionDeclarations", []):
            if not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_.\-:]{0,127}", declaration.get("name", "")):
                return "* GenerateContentRequest.tools[0].function_declarations[0].name: Invalid function name."
    for key in body.get("generationConfig", {}):
        if key not in GENERATION_FIELDS:
            return f'Unknown name "{key}" at \'generation_config\': Cannot find field.'
    return None


class GoogleMock(BaseHTTPRequestHandler):
    """Answers like a Google API host and records what it received. `flavour` is set by the
    subclasses: `studio` (generativelanguage) or `vertex` (aiplatform, plus the token endpoint)."""

    protocol_version = "HTTP/1.1"
    flavour = None

    def log_message(self, *args):
        pass

    def base_url(self):
        return f"http://127.0.0.1:{self.server.server_address[1]}"

    def send_body(self, status, data, content_type="application/json; charset=UTF-8"):
        self.send_response(status)
        self.send_header("content-type", content_type)
        self.send_header("vary", "Origin, X-Origin, Referer")
        self.send_header("server-timing", "gfet4t7; dur=412")
        self.send_header("content-length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def send_json(self, status, payload):
        self.send_body(status, json.dumps(payload, indent=2).encode())

    def rpc_error(self, code, status, message, details=None):
        error = {"code": code, "message": message, "status": status}
        if details:
            error["details"] = details
        self.send_json(code, {"error": error})

    def do_GET(self):
        self.rpc_error(404, "NOT_FOUND", "Method not found.")

    def do_POST(self):
        split = urlsplit(self.path)
        length = self.headers.get("content-length")
        if length is None:
            return self.rpc_error(411, "INVALID_ARGUMENT", "Length Required")
        raw = self.rfile.read(int(length))
        if self.flavour == "vertex" and split.path == "/token":
            return self.token(raw)
        headers = {k.lower(): v for k, v in self.headers.items()}
        try:
            body = json.loads(raw)
        except ValueError:
            body = None
        SEEN.append({"flavour": self.flavour, "path": split.path, "query": parse_qs(split.query),
                     "headers": headers, "body": body, "raw": raw})
        if self.flavour == "studio":
            key = headers.get("x-goog-api-key") or parse_qs(split.query).get("key", [None])[0]
            if key is None:
                return self.rpc_error(403, "PERMISSION_DENIED",
                                      "Method doesn't allow unregistered callers (callers without established identity). Please use API key or other form of API consumer identity to call this API.")
            if key != STUDIO_KEY:
                return self.rpc_error(400, "INVALID_ARGUMENT", "API key not valid. Please pass a valid API key.", [
                    {"@type": "type.googleapis.com/google.rpc.ErrorInfo", "reason": "API_KEY_INVALID",
                     "domain": "googleapis.com", "metadata": {"service": "generativelanguage.googleapis.com"}},
                    {"@type": "type.googleapis.com/google.rpc.LocalizedMessage", "locale": "en-US",
                     "message": "API key not valid. Please pass a valid API key."}])
            match = re.fullmatch(r"/v1beta/models/([^/:]+):(generateContent|streamGenerateContent|batchEmbedContents)", split.path)
            route = match and match.groups()
        else:
            if headers.get("authorization") != f"Bearer {ACCESS_TOKEN}":
                return self.rpc_error(401, "UNAUTHENTICATED",
                                      "Request had invalid authentication credentials. Expected OAuth 2 access token, login cookie or other valid authentication credential. See https://developers.google.com/identity/sign-in/web/devconsole-project.",
                                      [{"@type": "type.googleapis.com/google.rpc.ErrorInfo", "reason": "ACCESS_TOKEN_TYPE_UNSUPPORTED",
                                        "metadata": {"service": "aiplatform.googleapis.com", "method": "google.cloud.aiplatform.v1.PredictionService.GenerateContent"}}])
            match = re.fullmatch(r"/v1/projects/([^/]+)/locations/([^/]+)/publishers/google/models/([^/:]+):(generateContent|streamGenerateContent|predict)", split.path)
            if match and (match.group(1), match.group(2)) != (PROJECT, LOCATION):
                return self.rpc_error(403, "PERMISSION_DENIED",
                                      f"Permission 'aiplatform.endpoints.predict' denied on resource '//aiplatform.googleapis.com/projects/{match.group(1)}/locations/{match.group(2)}' (or it may not exist).")
            route = match and match.group(3, 4)
        if not route:
            return self.rpc_error(404, "NOT_FOUND", f"The requested URL {split.path} was not found on this server.")
        model, method = route
        if body is None or not isinstance(body, dict):
            return self.rpc_error(400, "INVALID_ARGUMENT", "Invalid JSON payload received. Unexpected token.")
        if method in ("generateContent", "streamGenerateContent"):
            if model != CHAT_MODEL:
                return self.model_not_found(model, method)
            problem = unknown_fields(body, self.flavour)
            if problem:
                return self.rpc_error(400, "INVALID_ARGUMENT", f"Invalid JSON payload received. {problem}", [
                    {"@type": "type.googleapis.com/google.rpc.BadRequest", "fieldViolations": [{"description": problem}]}])
            events = self.generate(body)
            if method == "generateContent":
                return self.send_json(200, events[-1] if len(events) == 1 else self.merge(events))
            return self.stream(events, parse_qs(split.query).get("alt") == ["sse"])
        if model != EMBED_MODEL:
            return self.model_not_found(model, method)
        if method == "batchEmbedContents":
            return self.batch_embed(model, body)
        return self.predict(body)

    def model_not_found(self, model, method):
        if self.flavour == "studio":
            return self.rpc_error(404, "NOT_FOUND",
                                  f"models/{model} is not found for API version v1beta, or is not supported for {method}. Call ListModels to see the list of available models and their supported methods.")
        return self.rpc_error(404, "NOT_FOUND",
                              f"Publisher Model `projects/{PROJECT}/locations/{LOCATION}/publishers/google/models/{model}` was not found or your project does not have access to it. Please ensure you are using a valid model version.")

    # -- OAuth token endpoint (oauth2.googleapis.com/token) -------------------------------------

    def token(self, raw):
        def refuse(description):
            self.send_json(400, {"error": "invalid_grant", "error_description": description})

        if not self.headers.get("content-type", "").startswith("application/x-www-form-urlencoded"):
            return self.send_json(400, {"error": "invalid_request", "error_description": "Invalid content type"})
        form = {k: v[0] for k, v in parse_qs(raw.decode(), strict_parsing=True).items()}
        record = {"form": form}
        TOKEN_POSTS.append(record)
        if form.get("grant_type") != JWT_BEARER:
            return self.send_json(400, {"error": "unsupported_grant_type", "error_description": "Invalid grant_type"})
        pieces = form.get("assertion", "").split(".")
        if len(pieces) != 3 or not pieces[2]:
            return refuse("Invalid JWT: Token must be a short-lived token and in a reasonable timeframe")
        account = json.loads(SERVICE_ACCOUNT.read_text())
        header, claims = b64url_json(pieces[0]), b64url_json(pieces[1])
        record.update(header=header, claims=claims)
        if header.get("alg") != "RS256" or header.get("kid") != account["private_key_id"]:
            return refuse("Invalid JWT Signature.")
        if claims.get("iss") != account["client_email"]:
            return refuse("Invalid JWT: Failed audience check / unknown issuer.")
        if claims.get("aud") != f"{self.base_url()}/token":
            return refuse("Invalid JWT: Failed audience check. The expected audience is the token endpoint.")
        if CLOUD_PLATFORM not in str(claims.get("scope", "")).split():
            return refuse("Invalid OAuth scope or ID token audience provided.")
        iat, exp = claims.get("iat"), claims.get("exp")
        if not isinstance(iat, int) or not isinstance(exp, int) or not 0 < exp - iat <= 3600 or exp <= time.time():
            return refuse("Invalid JWT: Token must be a short-lived token (60 minutes) and in a reasonable timeframe. Check your iat and exp values in the JWT claim.")
        self.send_json(200, {"access_token": ACCESS_TOKEN, "expires_in": 3599, "token_type": "Bearer"})

    # -- generateContent / streamGenerateContent --------------------------------------------------

    def usage(self, prompt, candidates, thoughts, final=True):
        usage = {"promptTokenCount": prompt, "totalTokenCount": prompt,
                 "promptTokensDetails": [{"modality": "TEXT", "tokenCount": prompt}]}
        if final:
            usage.update(candidatesTokenCount=candidates, thoughtsTokenCount=thoughts,
                         totalTokenCount=prompt + candidates + thoughts)
            if self.flavour == "vertex":
                usage["candidatesTokensDetails"] = [{"modality": "TEXT", "tokenCount": candidates}]
        if self.flavour == "vertex":
            usage["trafficType"] = "ON_DEMAND"
        return usage

    def response(self, parts, finish, usage, response_id):
        candidate = {"content": {"parts": parts, "role": "model"}, "index": 0}
        if finish:
            candidate["finishReason"] = finish
        answer = {"candidates": [candidate], "usageMetadata": usage, "modelVersion": CHAT_MODEL,
                  "responseId": response_id}
        if self.flavour == "vertex":
            answer["createTime"] = "2025-08-14T09:21:07.713424Z"
            if finish:
                candidate["avgLogprobs"] = -0.27
        return answer

    def generate(self, body):
        """The answer as stream events (a non-streamed answer is the single event or their merge)."""
        last = body["contents"][-1]
        texts = " ".join(p["text"] for p in last["parts"] if "text" in p)
        rid = "d2mdaLTPKYWm1MkP2ILbyAQ" if self.flavour == "studio" else "Y2mdaJy3K8ahnvgPmOmXuAk"
        if any("functionResponse" in p for p in last["parts"]):
            return [self.response([{"text": "It is 21°C in Paris."}], "STOP", self.usage(31, 9, 0), rid)]
        if "BLOCK" in texts:
            return [{"promptFeedback": {"blockReason": "PROHIBITED_CONTENT"}, "usageMetadata": self.usage(7, 0, 0, final=False),
                     "modelVersion": CHAT_MODEL, "responseId": rid}]
        if body.get("tools"):
            call = {"functionCall": {"id": "fc-e2e-1", "name": "get_weather", "args": {"city": "Paris", "unit": "celsius"}},
                    "thoughtSignature": "CiQBVKhc7nWm2bkkeSm4mQ=="}
            return [self.response([call], "STOP", self.usage(44, 21, 37), rid)]
        pieces = ["Hello", " from", " Gemini!"]
        return [self.response([{"text": piece}], "STOP" if i == len(pieces) - 1 else None,
                              self.usage(9, 4, 6, final=i == len(pieces) - 1), rid)
                for i, piece in enumerate(pieces)]

    def merge(self, events):
        text = "".join(p["text"] for e in events for p in e["candidates"][0]["content"]["parts"])
        if text == "Hello from Gemini!":  # the non-streamed plain answer has its own usage numbers
            return self.response([{"text": text}], "STOP", self.usage(8, 5, 12), events[-1]["responseId"])
        raise AssertionError("unexpected multi-event answer")

    def stream(self, events, sse):
        if not sse:  # without alt=sse Google streams one pretty-printed JSON array
            return self.send_body(200, json.dumps(events, indent=2).encode())
        self.send_response(200)
        self.send_header("content-type", "text/event-stream")
        self.send_header("content-disposition", "attachment")
        self.send_header("transfer-encoding", "chunked")
        self.end_headers()
        for event in events:
            data = b"data: " + json.dumps(event, ensure_ascii=False, separators=(",", ":")).encode() + b"\r\n\r\n"
            self.wfile.write(b"%x\r\n%s\r\n" % (len(data), data))
            self.wfile.flush()
        self.wfile.write(b"0\r\n\r\n")  # the stream simply ends: no [DONE]
        self.wfile.flush()

    # -- embeddings -------------------------------------------------------------------------------

    @staticmethod
    def vector(text, dimensions):
        # Values exact in float32, so that base64 (float32) and float answers compare equal.
        values = [len(text) * 0.125, -0.5, 0.25, 1.0, -2.0, 0.75]
        return values[:dimensions] if dimensions else values

    def batch_embed(self, model, body):
        requests = body.get("requests")
        if set(body) != {"requests"} or not isinstance(requests, list) or not requests:
            return self.rpc_error(400, "INVALID_ARGUMENT", "* BatchEmbedContentsRequest.requests: requests is not specified")
        embeddings = []
        for i, request in enumerate(requests):
            if set(request) - {"model", "content", "taskType", "title", "outputDimensionality"}:
                return self.rpc_error(400, "INVALID_ARGUMENT", f"Invalid JSON payload received. Unknown name at 'requests[{i}]': Cannot find field.")
            if request.get("model") != f"models/{model}":
                return self.rpc_error(400, "INVALID_ARGUMENT",
                                      f"* BatchEmbedContentsRequest.requests[{i}].model: Model names in the requests must match the model in the URL: models/{model}.")
            parts = (request.get("content") or {}).get("parts") or []
            if len(parts) != 1 or set(parts[0]) != {"text"}:
                return self.rpc_error(400, "INVALID_ARGUMENT", f"* BatchEmbedContentsRequest.requests[{i}].content.parts: must be text")
            embeddings.append({"values": self.vector(parts[0]["text"], request.get("outputDimensionality"))})
        self.send_json(200, {"embeddings": embeddings})

    def predict(self, body):
        instances = body.get("instances")
        if set(body) - {"instances", "parameters"} or not isinstance(instances, list) or not instances:
            return self.rpc_error(400, "INVALID_ARGUMENT", "Invalid JSON payload received. `instances` is required.")
        parameters = body.get("parameters") or {}
        predictions = []
        for i, instance in enumerate(instances):
            if set(instance) - {"content", "task_type", "title"} or not isinstance(instance.get("content"), str):
                return self.rpc_error(400, "INVALID_ARGUMENT", f"Failed to parse instances[{i}]: a `content` string is required.")
            text = instance["content"]
            predictions.append({"embeddings": {"values": self.vector(text, parameters.get("outputDimensionality")),
                                               "statistics": {"truncated": False, "token_count": len(text.split())}}})
        self.send_json(200, {"predictions": predictions,
                             "metadata": {"billableCharacterCount": sum(len(i["content"]) for i in instances)}})


class StudioMock(GoogleMock):
    flavour = "studio"


class VertexMock(GoogleMock):
    flavour = "vertex"


def start(handler):
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server, f"http://127.0.0.1:{server.server_address[1]}"


@pytest.fixture(scope="module")
def gateway(tmp_path_factory):
    studio, studio_url = start(StudioMock)
    vertex, vertex_url = start(VertexMock)
    scratch = tmp_path_factory.mktemp("google-e2e")
    key_file = scratch / "service-account.json"
    account = json.loads(SERVICE_ACCOUNT.read_text())
    account["token_uri"] = f"{vertex_url}/token"
    key_file.write_text(json.dumps(account, indent=2) + "\n")
    try:
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
                ("Gemini-Studio", "gemini-missing", "gemini-0.9-nope", "studio-missing"),
                ("Vertex-SA", "vertex-flash", CHAT_MODEL, "vertex-flash"),
                ("Vertex-SA", "vertex-embed", EMBED_MODEL, "vertex-embed"),
                ("Vertex-SA", "vertex-missing", "gemini-0.9-nope", "vertex-missing"),
                ("Gemini-Revoked", "revoked-flash", CHAT_MODEL, "revoked-flash"),
            ]
            for conn, name, remote, alias in models:
                gw.llmctl("model", "add", "--conn-id", conn, "--name", name, "--remote", remote)
                gw.llmctl("assign", "--vkey-id", "Google-App", "--model-id", name, "--alias", alias)
            client = openai.OpenAI(api_key=CLIENT_KEY, base_url=f"http://localhost:{gw.api_port}", max_retries=0)
            gw.wait_for_aliases(client, {alias for *_, alias in models})
            yield {"client": client, "api_port": gw.api_port, "studio_url": studio_url, "vertex_url": vertex_url}
    finally:
        studio.shutdown()
        vertex.shutdown()


@pytest.fixture(params=["studio", "vertex"])
def target(request, gateway):
    return dict(TARGETS[request.param], flavour=request.param, client=gateway["client"])


def upstream_calls(mark, flavour):
    calls = SEEN[mark:]
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
    mark = len(SEEN)
    answer = target["client"].chat.completions.create(
        model=target["chat"], temperature=0.2, max_tokens=64,
        messages=[{"role": "system", "content": "You are terse."}, {"role": "user", "content": "Say hello"}])
    choice = answer.choices[0]
    assert choice.message.role == "assistant" and choice.message.content == "Hello from Gemini!"
    assert choice.finish_reason == "stop" and not choice.message.tool_calls
    assert answer.object == "chat.completion" and answer.id.startswith("chatcmpl-")
    assert answer.model == CHAT_MODEL
    # Gemini: prompt 8, candidates 5, thoughts 12, total 25; reasoning counts in the completion.
    assert (answer.usage.prompt_tokens, answer.usage.completion_tokens, answer.usage.total_tokens) == (8, 17, 25)
    assert answer.usage.completion_tokens_details.reasoning_tokens == 12
    [call] = upstream_calls(mark, target["flavour"])
    assert_upstream_request(call, target, "generateContent")
    body = call["body"]
    assert body["contents"] == [{"role": "user", "parts": [{"text": "Say hello"}]}]
    assert body["systemInstruction"] == {"parts": [{"text": "You are terse."}]}
    assert body["generationConfig"] == {"temperature": 0.2, "maxOutputTokens": 64}


def test_stream_without_usage(target):
    mark = len(SEEN)
    chunks = list(target["client"].chat.completions.create(
        model=target["chat"], messages=[{"role": "user", "content": "Say hello"}], stream=True))
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == "Hello from Gemini!"
    assert chunks[0].choices[0].delta.role == "assistant"
    assert [c.choices[0].finish_reason for c in chunks if c.choices[0].finish_reason] == ["stop"]
    assert chunks[-1].choices[0].finish_reason == "stop"
    assert all(c.choices and c.usage is None for c in chunks), "no usage chunk when the client did not ask"
    assert len({c.id for c in chunks}) == 1 and all(c.object == "chat.completion.chunk" for c in chunks)
    [call] = upstream_calls(mark, target["flavour"])
    assert_upstream_request(call, target, "streamGenerateContent", query={"alt": ["sse"]})
    assert call["body"]["contents"] == [{"role": "user", "parts": [{"text": "Say hello"}]}]


def test_stream_with_usage(target):
    mark = len(SEEN)
    chunks = list(target["client"].chat.completions.create(
        model=target["chat"], messages=[{"role": "user", "content": "Say hello"}], stream=True,
        stream_options={"include_usage": True}))
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == "Hello from Gemini!"
    assert chunks[-2].choices[0].finish_reason == "stop"
    usage_chunk = chunks[-1]
    assert usage_chunk.choices == []
    # The last Gemini event: prompt 9, candidates 4, thoughts 6, total 19.
    assert (usage_chunk.usage.prompt_tokens, usage_chunk.usage.completion_tokens, usage_chunk.usage.total_tokens) == (9, 10, 19)
    assert all(c.usage is None for c in chunks[:-1])
    [call] = upstream_calls(mark, target["flavour"])
    assert_upstream_request(call, target, "streamGenerateContent", query={"alt": ["sse"]})
    assert "stream_options" not in call["body"]


WEATHER_TOOL = {"type": "function", "function": {
    "name": "get_weather", "description": "Current weather in a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}, "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]}},
                   "required": ["city"]}}}


def test_tool_call_round_trip(target):
    client = target["client"]
    question = {"role": "user", "content": "What's the weather in Paris?"}
    mark = len(SEEN)
    first = client.chat.completions.create(model=target["chat"], messages=[question], tools=[WEATHER_TOOL], tool_choice="auto")
    choice = first.choices[0]
    assert choice.finish_reason == "tool_calls"
    assert choice.message.content is None
    [tool_call] = choice.message.tool_calls
    assert tool_call.type == "function" and tool_call.function.name == "get_weather"
    assert json.loads(tool_call.function.arguments) == {"city": "Paris", "unit": "celsius"}
    assert tool_call.id.startswith("fc-e2e-1")
    assert (first.usage.prompt_tokens, first.usage.completion_tokens, first.usage.total_tokens) == (44, 58, 102)
    [call] = upstream_calls(mark, target["flavour"])
    assert_upstream_request(call, target, "generateContent")
    [declaration] = call["body"]["tools"][0]["functionDeclarations"]
    assert declaration["name"] == "get_weather" and declaration["description"] == "Current weather in a city"
    assert (declaration.get("parametersJsonSchema") or declaration.get("parameters")) == WEATHER_TOOL["function"]["parameters"]
    assert call["body"]["toolConfig"] == {"functionCallingConfig": {"mode": "AUTO"}}

    tool_output = json.dumps({"temp_c": 21, "sky": "clear"})
    mark = len(SEEN)
    second = client.chat.completions.create(model=target["chat"], tools=[WEATHER_TOOL], messages=[
        question,
        choice.message.model_dump(exclude_none=True),
        {"role": "tool", "tool_call_id": tool_call.id, "content": tool_output},
    ])
    assert second.choices[0].message.content == "It is 21°C in Paris."
    assert second.choices[0].finish_reason == "stop"
    assert (second.usage.prompt_tokens, second.usage.completion_tokens, second.usage.total_tokens) == (31, 9, 40)
    [call] = upstream_calls(mark, target["flavour"])
    assert_upstream_request(call, target, "generateContent")
    user, model_turn, result = call["body"]["contents"]
    assert user == {"role": "user", "parts": [{"text": "What's the weather in Paris?"}]}
    assert model_turn["role"] == "model"
    [call_part] = model_turn["parts"]
    assert call_part["functionCall"] == {"id": "fc-e2e-1", "name": "get_weather", "args": {"city": "Paris", "unit": "celsius"}}
    assert call_part.get("thoughtSignature") == "CiQBVKhc7nWm2bkkeSm4mQ==", "Gemini's thought signature is echoed"
    assert result["role"] == "user"
    [response_part] = result["parts"]
    function_response = response_part["functionResponse"]
    assert function_response["name"] == "get_weather" and function_response.get("id") == "fc-e2e-1"
    assert tool_output in function_response["response"].values()


def test_streamed_tool_call(target):
    mark = len(SEEN)
    chunks = list(target["client"].chat.completions.create(
        model=target["chat"], messages=[{"role": "user", "content": "What's the weather in Paris?"}],
        tools=[WEATHER_TOOL], stream=True, stream_options={"include_usage": True}))
    calls = [tc for c in chunks if c.choices for tc in (c.choices[0].delta.tool_calls or [])]
    assert calls[0].index == 0 and calls[0].id.startswith("fc-e2e-1") and calls[0].function.name == "get_weather"
    assert json.loads("".join(tc.function.arguments or "" for tc in calls)) == {"city": "Paris", "unit": "celsius"}
    assert [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason] == ["tool_calls"]
    assert chunks[-1].choices == [] and chunks[-1].usage.total_tokens == 102
    [call] = upstream_calls(mark, target["flavour"])
    assert_upstream_request(call, target, "streamGenerateContent", query={"alt": ["sse"]})


def test_embeddings_base64_default_and_float(target):
    client = target["client"]
    method = "batchEmbedContents" if target["flavour"] == "studio" else "predict"
    inputs = ["hello", "bonjour tout le monde"]
    expected = [[0.625, -0.5, 0.25, 1.0, -2.0, 0.75], [2.625, -0.5, 0.25, 1.0, -2.0, 0.75]]
    for encoding in (openai.NOT_GIVEN, "float"):
        mark = len(SEEN)
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
        [call] = upstream_calls(mark, target["flavour"])
        assert_upstream_request(call, target, method, model=EMBED_MODEL)
        if target["flavour"] == "studio":
            assert call["body"] == {"requests": [
                {"model": f"models/{EMBED_MODEL}", "content": {"parts": [{"text": text}]}} for text in inputs]}
        else:
            assert [i["content"] for i in call["body"]["instances"]] == inputs


def test_embeddings_dimensions(target):
    mark = len(SEEN)
    answer = target["client"].embeddings.create(model=target["embed"], input="hello", dimensions=3, encoding_format="float")
    assert answer.data[0].embedding == [0.625, -0.5, 0.25]
    [call] = upstream_calls(mark, target["flavour"])
    if target["flavour"] == "studio":
        assert call["body"]["requests"][0]["outputDimensionality"] == 3
    else:
        assert call["body"]["parameters"] == {"outputDimensionality": 3}


def test_vertex_service_account_token_is_exchanged_once_and_reused(gateway):
    client = gateway["client"]
    for _ in range(2):
        client.chat.completions.create(model="vertex-flash", messages=[{"role": "user", "content": "Say hello"}])
    client.embeddings.create(model="vertex-embed", input="hello")
    assert len(TOKEN_POSTS) == 1, "the access token is cached for all calls on the connection"
    [post] = TOKEN_POSTS
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
    assert "gemini-0.9-nope" in err.value.message


def test_blocked_prompt_is_content_filter_bad_request(target):
    # DESIGN §16: a prompt rejected by the provider's safety filter before generation (Gemini's
    # promptFeedback.blockReason) is a 400 with code content_filter.
    mark = len(SEEN)
    with pytest.raises(openai.BadRequestError) as err:
        target["client"].chat.completions.create(model=target["chat"], messages=[{"role": "user", "content": "BLOCK this"}])
    assert err.value.code == "content_filter"
    [call] = upstream_calls(mark, target["flavour"])
    assert_upstream_request(call, target, "generateContent")


def test_blocked_prompt_while_streaming_is_a_content_filter_bad_request(target):
    # DESIGN §16: the same "streaming or not": Gemini says so in the first stream event, so the
    # gateway has to read it before it sends its response head.
    mark = len(SEEN)
    with pytest.raises(openai.BadRequestError) as err:
        list(target["client"].chat.completions.create(
            model=target["chat"], messages=[{"role": "user", "content": "BLOCK this"}], stream=True))
    assert err.value.code == "content_filter"
    [call] = upstream_calls(mark, target["flavour"])
    assert_upstream_request(call, target, "streamGenerateContent", query={"alt": ["sse"]})


def test_refused_upstream_key_is_a_gateway_error_without_the_key(gateway):
    with pytest.raises(openai.InternalServerError) as err:
        gateway["client"].chat.completions.create(model="revoked-flash", messages=[{"role": "user", "content": "hi"}])
    assert err.value.status_code == 502
    assert err.value.code == "upstream_credential_refused"
    text = err.value.response.text
    assert BAD_STUDIO_KEY not in text and CLIENT_KEY not in text
    assert SEEN[-1]["headers"]["x-goog-api-key"] == BAD_STUDIO_KEY
