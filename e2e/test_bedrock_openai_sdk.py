"""Bedrock end to end: `llmctl serve`, the `llmctl` setup commands, then the official OpenAI Python
SDK against the gateway, with a local mock standing in for bedrock-runtime (Converse and
ConverseStream, wire formats §5, translation §6.2, §6.3).

Three connections are exercised with the same tests (parametrized): one with long-term AWS access
keys (`AKIDEXAMPLE:...`, the SigV4 test suite's) and one with temporary credentials
(`ASIA...:SECRET:SESSION_TOKEN`), whose requests the mock verifies as AWS would (SigV4, service
`bedrock`, region us-east-1, the percent-encoded model id encoded again in the canonical URI,
`X-Amz-Security-Token`), and one with a Bedrock API key (`ABSK...`) sent as
`Authorization: Bearer`. The mock validates Converse bodies as Bedrock does (ValidationException
400), answers with Converse-shaped JSON and real `application/vnd.amazon.eventstream` frames (both
CRC32s, type-7 string headers, `"p"` padding) written in odd-sized HTTP chunks, and records every
request so that the tests can assert on what went upstream. Standard library only."""

import base64
import hashlib
import hmac
import json
import random
import re
import string
import struct
import threading
import time
import uuid
import zlib
from datetime import datetime, timezone
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qsl, quote, unquote, urlsplit

import openai
import pytest

from serve import llmctl_serve

REGION = "us-east-1"
SERVICE = "bedrock"
# Long-term access keys: the AWS SigV4 test suite's.
ACCESS_KEY_ID = "AKIDEXAMPLE"
SECRET_ACCESS_KEY = "wJalrXUtnFEMI/K7MDENG+bPxRfiCYEXAMPLEKEY"
# Temporary credentials (STS): a 20-character ASIA... key id, a secret and a session token.
SESSION_KEY_ID = "ASIAIOSFODNN7EXAMPLE"
SESSION_SECRET = "wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY"
SESSION_TOKEN = "FwoGZXIvYXdzEJr//////////wEaDE2eTokenExampleVGhpcyBpcyBub3QgYSByZWFsIHRva2Vu=="
WRONG_SECRET = "wJalrXUtnFEMI/K7MDENG+bPxRfiCYWRONGKEY00"
# What the mock's AWS account knows: key id -> (secret, session token).
ACCESS_KEYS = {ACCESS_KEY_ID: (SECRET_ACCESS_KEY, None), SESSION_KEY_ID: (SESSION_SECRET, SESSION_TOKEN)}
# A long-term Bedrock API key: "ABSK" + base64("BedrockAPIKey-<id>-at-<account>:<secret>").
BEDROCK_API_KEY = "ABSK" + base64.b64encode(b"BedrockAPIKey-e2e1-at-123456789012:c2VjcmV0LWUyZS0wMTIzNDU2Nzg5").decode()
CLIENT_KEY = "vk-bedrock-e2e-9012"

MODEL_ID = "us.anthropic.claude-3-5-sonnet-20241022-v2:0"  # an inference profile id, with a `:`
BUSY_MODEL_ID = "anthropic.claude-3-haiku-20240307-v1:0"  # the mock throttles every call to it
FLAKY_MODEL_ID = "amazon.nova-lite-v1:0"  # ModelErrorException (424), or an exception frame mid-stream
KNOWN_MODELS = {MODEL_ID, BUSY_MODEL_ID, FLAKY_MODEL_ID}

# The gateway's aliases for each connection (see the `gateway` fixture).
TARGETS = {
    "sigv4": {"auth": "sigv4", "key_id": ACCESS_KEY_ID, "chat": "sigv4-claude", "busy": "sigv4-busy", "flaky": "sigv4-flaky"},
    "bearer": {"auth": "bearer", "key_id": None, "chat": "key-claude", "busy": "key-busy", "flaky": "key-flaky"},
    "sigv4-session": {"auth": "sigv4", "key_id": SESSION_KEY_ID, "chat": "session-claude", "busy": "session-busy",
                      "flaky": "session-flaky"},
}

# Everything the mock received, in order: dicts with raw_path, query, headers, raw, body, model,
# operation, auth (the scheme the mock accepted, or None), request_id and refused (the exception
# name the mock answered with, if any).
SEEN = []

SIGNATURE_MISMATCH = ("The request signature we calculated does not match the signature you provided. "
                      "Check your AWS Secret Access Key and signing method. Consult the service documentation for details.")
THROTTLED = "Too many requests, please wait before trying again."
TEMPERATURE_RANGE = ("1 validation error detected: Value '1.5' at 'inferenceConfig.temperature' failed to satisfy "
                     "constraint: Member must have value less than or equal to 1")

WEATHER_TOOL = {"type": "function", "function": {
    "name": "get_weather", "description": "Current weather in a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}, "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]}},
                   "required": ["city"]}}}
TOOL_USE_ID = "tooluse_kZJMlvQmRJ6eAyJE5GIl7Q"
TOOL_INPUT_FRAGMENTS = ['{"city":', ' "Paris", "un', 'it": "celsius"}']
TOOL_INPUT = {"city": "Paris", "unit": "celsius"}


# -- SigV4 (wire formats §5.6), as the service checks it ------------------------------------------


def hmac_sha256(key, text):
    return hmac.new(key, text.encode(), hashlib.sha256).digest()


def canonical_request(method, raw_path, query, headers, signed_headers, body):
    # Non-S3 services encode the (already percent-encoded) path once more: `%3A` -> `%253A`.
    canonical_uri = quote(raw_path or "/", safe="/~")
    pairs = sorted((quote(k, safe="-_.~"), quote(v, safe="-_.~")) for k, v in parse_qsl(query, keep_blank_values=True))
    canonical_query = "&".join(f"{k}={v}" for k, v in pairs)
    canonical_headers = "".join(f"{name}:{' '.join(headers[name].split())}\n" for name in signed_headers)
    return "\n".join([method, canonical_uri, canonical_query, canonical_headers, ";".join(signed_headers),
                      hashlib.sha256(body).hexdigest()])


def signature(secret, amz_date, region, service, canonical):
    date = amz_date[:8]
    scope = f"{date}/{region}/{service}/aws4_request"
    to_sign = "\n".join(["AWS4-HMAC-SHA256", amz_date, scope, hashlib.sha256(canonical.encode()).hexdigest()])
    key = hmac_sha256(("AWS4" + secret).encode(), date)
    for part in (region, service, "aws4_request"):
        key = hmac_sha256(key, part)
    return hmac.new(key, to_sign.encode(), hashlib.sha256).hexdigest()


AUTHORIZATION = re.compile(r"AWS4-HMAC-SHA256 Credential=([^/,\s]+)/(\d{8})/([^/,\s]+)/([^/,\s]+)/aws4_request,\s*"
                           r"SignedHeaders=([a-z0-9;\-]+),\s*Signature=([0-9a-f]{64})")


def sigv4_problem(method, raw_path, query, headers, body, region=REGION, service=SERVICE, now=None):
    """None if `headers` (lower-cased names) carry a valid SigV4 signature of the request by one of
    ACCESS_KEYS (with its session token, if it has one), else (exception name, message) as AWS
    answers."""
    match = AUTHORIZATION.fullmatch(headers.get("authorization", "").strip())
    if not match:
        return "IncompleteSignatureException", ("Authorization header requires 'Credential', 'Signature' and "
                                                "'SignedHeaders' parameters.")
    key_id, date, scope_region, scope_service, signed, provided = match.groups()
    if key_id not in ACCESS_KEYS:
        return "UnrecognizedClientException", "The security token included in the request is invalid."
    secret, token = ACCESS_KEYS[key_id]
    if token is not None and headers.get("x-amz-security-token") != token:
        return "UnrecognizedClientException", "The security token included in the request is invalid."
    amz_date = headers.get("x-amz-date", "")
    if not re.fullmatch(r"\d{8}T\d{6}Z", amz_date):
        return "IncompleteSignatureException", "Authorization header requires existence of either a 'X-Amz-Date' or a 'Date' header."
    if amz_date[:8] != date:
        return "InvalidSignatureException", f"Date in Credential scope does not match YYYYMMDD from ISO-8601 version of date from HTTP: '{date}' != '{amz_date[:8]}'"
    if scope_region != region:
        return "InvalidSignatureException", f"Credential should be scoped to a valid region, not '{scope_region}'."
    if scope_service != service:
        return "InvalidSignatureException", f"Credential should be scoped to correct service: '{service}'."
    names = signed.split(";")
    if names != sorted(set(names)) or "host" not in names or "x-amz-date" not in names:
        return "InvalidSignatureException", "'Host' and 'X-Amz-Date' must be signed, and SignedHeaders sorted."
    if any(name not in headers for name in names):
        return "InvalidSignatureException", SIGNATURE_MISMATCH
    if now is not None:
        signed_at = datetime.strptime(amz_date, "%Y%m%dT%H%M%SZ").replace(tzinfo=timezone.utc).timestamp()
        if abs(now - signed_at) > 15 * 60:
            return "InvalidSignatureException", f"Signature expired: {amz_date} is now earlier than the allowed window."
    expected = signature(secret, amz_date, region, service,
                         canonical_request(method, raw_path, query, headers, names, body))
    if not hmac.compare_digest(expected, provided):
        return "InvalidSignatureException", SIGNATURE_MISMATCH
    return None


# -- Converse validation (wire formats §5.2), as Bedrock refuses bodies ---------------------------

TOP_LEVEL = {"messages", "system", "inferenceConfig", "toolConfig", "guardrailConfig", "additionalModelRequestFields",
             "promptVariables", "additionalModelResponseFieldPaths", "requestMetadata", "performanceConfig",
             "outputConfig", "serviceTier"}
CONTENT_MEMBERS = {"text", "image", "document", "video", "audio", "toolUse", "toolResult", "guardContent", "cachePoint",
                   "reasoningContent", "citationsContent", "searchResult"}
RESULT_MEMBERS = {"json", "text", "image", "document", "video", "searchResult"}
INFERENCE = {"maxTokens", "temperature", "topP", "stopSequences"}
TOOL_NAME = re.compile(r"[a-zA-Z0-9_-]{1,64}")
TOOL_USE_ID_PATTERN = re.compile(r"[a-zA-Z0-9_.:-]{1,64}")


def validation_problem(body):
    """The message of the ValidationException Bedrock would answer for a Converse body, or None."""
    if not isinstance(body, dict):
        return "Malformed input request, please reformat your input and try again."
    for key in body:
        if key not in TOP_LEVEL:
            return f"Malformed input request: extraneous key [{key}] is not permitted, please reformat your input and try again."
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        return "1 validation error detected: Value null at 'messages' failed to satisfy constraint: Member must not be null"
    uses_tools = False
    for i, message in enumerate(messages):
        role = message.get("role") if isinstance(message, dict) else None
        if set(message or {}) - {"role", "content"} or role not in ("user", "assistant"):
            return f"1 validation error detected: Value '{role}' at 'messages.{i}.role' failed to satisfy constraint: Member must satisfy enum value set: [user, assistant]"
        if i == 0 and role != "user":
            return "A conversation must start with a user message. Try again with a conversation that starts with a user message."
        if i > 0 and role == messages[i - 1].get("role"):
            return ("A conversation must alternate between user and assistant roles. Make sure the conversation "
                    "alternates between user and assistant roles and try again.")
        content = message.get("content")
        if not isinstance(content, list) or not content:
            return f"The content field in the Message object at messages.{i} is empty. Add a ContentBlock object to the content field and try again."
        results = []
        for j, block in enumerate(content):
            members = set(block) if isinstance(block, dict) else set()
            if len(members) != 1 or not members <= CONTENT_MEMBERS:
                return f"The ContentBlock object at messages.{i}.content.{j} must set exactly one of its members."
            [member] = members
            if member == "text" and (not isinstance(block["text"], str) or not block["text"].strip()):
                return f"The text field in the ContentBlock object at messages.{i}.content.{j} is blank. Add text to the text field, and try again."
            if member == "toolUse":
                uses_tools = True
                use = block["toolUse"]
                if role != "assistant":
                    return f"messages.{i}.content.{j}: toolUse blocks are only allowed in assistant messages."
                if not TOOL_USE_ID_PATTERN.fullmatch(str(use.get("toolUseId", ""))) or not TOOL_NAME.fullmatch(str(use.get("name", ""))):
                    return f"1 validation error detected: Value at 'messages.{i}.content.{j}.toolUse' failed to satisfy constraint: toolUseId and name must match their patterns"
                if not isinstance(use.get("input"), dict):
                    return f"messages.{i}.content.{j}.toolUse.input: Input should be a valid dictionary"
            if member == "toolResult":
                uses_tools = True
                result = block["toolResult"]
                if role != "user":
                    return f"messages.{i}.content.{j}: toolResult blocks are only allowed in user messages."
                if not isinstance(result.get("content"), list) or any(
                        not isinstance(b, dict) or len(b) != 1 or not set(b) <= RESULT_MEMBERS for b in result["content"]):
                    return f"The toolResult content at messages.{i}.content.{j} is not valid."
                if result.get("status", "success") not in ("success", "error"):
                    return f"1 validation error detected: Value at 'messages.{i}.content.{j}.toolResult.status' failed to satisfy constraint: Member must satisfy enum value set: [success, error]"
                results.append((j, result.get("toolUseId")))
        if role == "user" and results:
            previous = messages[i - 1]["content"] if i > 0 else []
            asked = [b["toolUse"]["toolUseId"] for b in previous if "toolUse" in b]
            for j, tool_use_id in results:
                if tool_use_id not in asked:
                    return (f"messages.{i}.content.{j}: unexpected `tool_use_id` found in `tool_result` blocks: {tool_use_id}. "
                            "Each `tool_result` block must have a corresponding `tool_use` block in the previous message.")
        if role == "assistant" and i + 1 < len(messages):
            asked = [b["toolUse"]["toolUseId"] for b in content if "toolUse" in b]
            answered = {b["toolResult"].get("toolUseId") for b in messages[i + 1].get("content") or [] if isinstance(b, dict) and "toolResult" in b}
            missing = [tool_use_id for tool_use_id in asked if tool_use_id not in answered]
            if missing:
                return (f"messages.{i + 1}: `tool_use` ids were found without `tool_result` blocks immediately after: {', '.join(missing)}. "
                        "Each `tool_use` block must have a corresponding `tool_result` block in the next message.")
    tool_config = body.get("toolConfig")
    if uses_tools and tool_config is None:
        return "The toolConfig field must be defined when using toolUse and toolResult content blocks."
    if tool_config is not None:
        tools = tool_config.get("tools") if isinstance(tool_config, dict) else None
        if not isinstance(tools, list) or not tools or set(tool_config) - {"tools", "toolChoice"}:
            return "1 validation error detected: Value at 'toolConfig.tools' failed to satisfy constraint: Member must have length greater than or equal to 1"
        for k, tool in enumerate(tools):
            spec = tool.get("toolSpec") if isinstance(tool, dict) and set(tool) == {"toolSpec"} else None
            if (not isinstance(spec, dict) or set(spec) - {"name", "description", "inputSchema", "strict"}
                    or not TOOL_NAME.fullmatch(str(spec.get("name", "")))
                    or not isinstance(spec.get("inputSchema"), dict) or not isinstance(spec["inputSchema"].get("json"), dict)
                    or ("description" in spec and not spec["description"])):
                return f"The toolSpec at toolConfig.tools.{k} is not valid."
        choice = tool_config.get("toolChoice")
        if choice is not None and (not isinstance(choice, dict) or len(choice) != 1 or not set(choice) <= {"auto", "any", "tool"}):
            return "The value provided for toolConfig.toolChoice is not valid: exactly one of auto, any or tool must be set."
    system = body.get("system", [])
    if not isinstance(system, list) or any(not isinstance(b, dict) or set(b) != {"text"} or not str(b["text"]).strip() for b in system):
        return "The text field in the SystemContentBlock object is blank or the block is not valid. Add text to the text field, and try again."
    inference = body.get("inferenceConfig", {})
    if not isinstance(inference, dict) or set(inference) - INFERENCE:
        return "Malformed input request: inferenceConfig has unknown keys, please reformat your input and try again."
    if "maxTokens" in inference and (not isinstance(inference["maxTokens"], int) or inference["maxTokens"] < 1):
        return f"1 validation error detected: Value '{inference['maxTokens']}' at 'inferenceConfig.maxTokens' failed to satisfy constraint: Member must have value greater than or equal to 1"
    for name in ("temperature", "topP"):
        value = inference.get(name)
        if value is not None and not 0 <= value <= 1:
            return (f"1 validation error detected: Value '{value}' at 'inferenceConfig.{name}' failed to satisfy constraint: "
                    "Member must have value less than or equal to 1")
    stops = inference.get("stopSequences", [])
    if not isinstance(stops, list) or any(not isinstance(s, str) or not s for s in stops):
        return "1 validation error detected: Value at 'inferenceConfig.stopSequences' failed to satisfy constraint: Member must have length greater than or equal to 1"
    return None


# -- ConverseStream framing (wire formats §5.4) ---------------------------------------------------


def string_header(name, value):
    name, value = name.encode(), value.encode()
    return struct.pack(">B", len(name)) + name + b"\x07" + struct.pack(">H", len(value)) + value


def frame(headers, payload):
    """One event-stream message: prelude (total length, headers length, CRC), headers, payload, CRC."""
    encoded = b"".join(string_header(name, value) for name, value in headers)
    prelude = struct.pack(">II", 16 + len(encoded) + len(payload), len(encoded))
    message = prelude + struct.pack(">I", zlib.crc32(prelude) & 0xFFFFFFFF) + encoded + payload
    return message + struct.pack(">I", zlib.crc32(message) & 0xFFFFFFFF)


def padding():
    return "".join(random.choices(string.ascii_letters + string.digits, k=random.randint(1, 40)))


def event_frame(event_type, payload):
    payload = dict(payload, p=padding())
    return frame([(":event-type", event_type), (":content-type", "application/json"), (":message-type", "event")],
                 json.dumps(payload, separators=(",", ":")).encode())


def exception_frame(exception_type, payload):
    return frame([(":exception-type", exception_type), (":content-type", "application/json"), (":message-type", "exception")],
                 json.dumps(payload, separators=(",", ":")).encode())


def decode_frames(data):
    """The inverse of `frame`, CRCs checked (used to check the mock itself)."""
    events = []
    while data:
        total, header_length, prelude_crc = struct.unpack(">III", data[:12])
        assert prelude_crc == zlib.crc32(data[:8]) & 0xFFFFFFFF
        assert struct.unpack(">I", data[total - 4:total])[0] == zlib.crc32(data[:total - 4]) & 0xFFFFFFFF
        headers, at = {}, 12
        while at < 12 + header_length:
            name_length = data[at]
            name = data[at + 1:at + 1 + name_length].decode()
            at += 1 + name_length
            assert data[at] == 7
            value_length = struct.unpack(">H", data[at + 1:at + 3])[0]
            headers[name] = data[at + 3:at + 3 + value_length].decode()
            at += 3 + value_length
        events.append((headers, json.loads(data[12 + header_length:total - 4])))
        data = data[total:]
    return events


# -- the mock --------------------------------------------------------------------------------------


def plan(body):
    """What the model answers: content blocks (text pieces / tool uses), stop reason, usage."""
    last = body["messages"][-1]
    if last["role"] == "user" and any("toolResult" in b for b in last["content"]):
        return {"blocks": [("text", ["It is 21°C", " and sunny", " in Paris."])], "stop": "end_turn",
                "usage": {"inputTokens": 95, "outputTokens": 11, "totalTokens": 106, "cacheReadInputTokens": 0, "cacheWriteInputTokens": 0}}
    tools = [t["toolSpec"]["name"] for t in (body.get("toolConfig") or {}).get("tools", [])]
    if "get_weather" in tools:
        return {"blocks": [("text", ["Let me check", " the weather."]), ("toolUse", TOOL_USE_ID, "get_weather", TOOL_INPUT_FRAGMENTS)],
                "stop": "tool_use",
                "usage": {"inputTokens": 402, "outputTokens": 58, "totalTokens": 460, "cacheReadInputTokens": 0, "cacheWriteInputTokens": 0}}
    return {"blocks": [("text", ["Hello", " from", " Bedrock!"])], "stop": "end_turn",
            "usage": {"inputTokens": 12, "outputTokens": 5, "totalTokens": 20, "cacheReadInputTokens": 3, "cacheWriteInputTokens": 0}}


class BedrockMock(BaseHTTPRequestHandler):
    """Answers like bedrock-runtime.us-east-1.amazonaws.com and records what it received."""

    protocol_version = "HTTP/1.1"

    def log_message(self, *args):
        pass

    def send_body(self, status, data, headers=()):
        self.send_response(status)
        self.send_header("content-type", "application/json")
        self.send_header("x-amzn-RequestId", self.request_id)
        for name, value in headers:
            self.send_header(name, value)
        self.send_header("content-length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def refuse(self, status, exception, message, error_type=None):
        if getattr(self, "call", None) is not None:
            self.call["refused"] = exception
        self.send_body(status, json.dumps({"message": message}).encode(),
                       [("x-amzn-ErrorType", error_type or exception)])

    def do_GET(self):
        self.request_id = str(uuid.uuid4())
        self.call = None
        self.refuse(404, "UnknownOperationException", "Unknown operation")

    def do_POST(self):
        self.request_id = str(uuid.uuid4())
        self.call = None
        length = self.headers.get("content-length")
        if length is None:
            self.close_connection = True
            return self.refuse(411, "LengthRequiredException", "Length Required")
        raw = self.rfile.read(int(length))
        split = urlsplit(self.path)
        headers = {k.lower(): v for k, v in self.headers.items()}
        self.call = {"raw_path": split.path, "query": split.query, "headers": headers, "raw": raw, "body": None,
                     "model": None, "operation": None, "auth": None, "key_id": None, "request_id": self.request_id, "refused": None}
        SEEN.append(self.call)

        # Authentication comes first, as on AWS.
        authorization = headers.get("authorization", "")
        if authorization.startswith("AWS4-HMAC-SHA256 "):
            problem = sigv4_problem("POST", split.path, split.query, headers, raw, now=time.time())
            if problem:
                return self.refuse(403, *problem)
            self.call["auth"] = "sigv4"
            self.call["key_id"] = AUTHORIZATION.fullmatch(authorization.strip()).group(1)
        elif authorization.startswith("Bearer "):
            if authorization[len("Bearer "):] != BEDROCK_API_KEY:
                return self.refuse(403, "UnrecognizedClientException", "Invalid API Key format: Must start with pre-defined prefix")
            self.call["auth"] = "bearer"
        else:
            return self.refuse(403, "MissingAuthenticationTokenException", "Missing Authentication Token")

        match = re.fullmatch(r"/model/([^/]+)/(converse|converse-stream)", split.path)
        if not match:
            return self.refuse(404, "UnknownOperationException", "Unknown operation")
        model, operation = unquote(match.group(1)), match.group(2)
        self.call.update(model=model, operation=operation)
        if model not in KNOWN_MODELS:
            return self.refuse(400, "ValidationException", "The provided model identifier is invalid.")
        try:
            body = json.loads(raw)
        except ValueError:
            return self.refuse(400, "SerializationException", "Unexpected character in the request body.")
        self.call["body"] = body
        problem = validation_problem(body)
        if problem:
            return self.refuse(400, "ValidationException", problem)
        if model == BUSY_MODEL_ID:
            return self.refuse(429, "ThrottlingException", THROTTLED,
                               "ThrottlingException:http://internal.amazon.com/coral/com.amazon.bedrock/")
        if model == FLAKY_MODEL_ID and operation == "converse":
            return self.refuse(424, "ModelErrorException", "The model produced an invalid response. Try your request again.")
        answer = plan(body)
        if operation == "converse":
            return self.converse(answer)
        return self.converse_stream(answer, fail_midway=model == FLAKY_MODEL_ID)

    def converse(self, answer):
        content = []
        for block in answer["blocks"]:
            if block[0] == "text":
                content.append({"text": "".join(block[1])})
            else:
                _, tool_use_id, name, fragments = block
                content.append({"toolUse": {"toolUseId": tool_use_id, "name": name, "input": json.loads("".join(fragments))}})
        self.send_body(200, json.dumps({
            "metrics": {"latencyMs": 812},
            "output": {"message": {"content": content, "role": "assistant"}},
            "stopReason": answer["stop"],
            "usage": answer["usage"],
        }).encode())

    def converse_stream(self, answer, fail_midway):
        frames = [event_frame("messageStart", {"role": "assistant"})]
        for index, block in enumerate(answer["blocks"]):
            if block[0] == "text":
                for piece in block[1]:
                    frames.append(event_frame("contentBlockDelta", {"contentBlockIndex": index, "delta": {"text": piece}}))
                    if fail_midway:
                        break
            else:
                _, tool_use_id, name, fragments = block
                frames.append(event_frame("contentBlockStart", {"contentBlockIndex": index,
                                                                "start": {"toolUse": {"toolUseId": tool_use_id, "name": name}}}))
                for fragment in fragments:
                    frames.append(event_frame("contentBlockDelta", {"contentBlockIndex": index, "delta": {"toolUse": {"input": fragment}}}))
            if fail_midway:
                frames.append(exception_frame("modelStreamErrorException", {
                    "message": "Model stream error: the model stopped unexpectedly.", "originalStatusCode": 500,
                    "originalMessage": "Internal server error"}))
                break
            frames.append(event_frame("contentBlockStop", {"contentBlockIndex": index}))
        else:
            frames.append(event_frame("messageStop", {"stopReason": answer["stop"]}))
            frames.append(event_frame("metadata", {"usage": answer["usage"], "metrics": {"latencyMs": 1450}}))
        data = b"".join(frames)
        self.send_response(200)
        self.send_header("content-type", "application/vnd.amazon.eventstream")
        self.send_header("x-amzn-RequestId", self.request_id)
        self.send_header("transfer-encoding", "chunked")
        self.end_headers()
        # Odd-sized HTTP chunks: frames split inside preludes, headers and payloads, and chunks
        # holding the end of one frame and the start of the next.
        sizes, at, k = [5, 17, 3, 64, 1, 29, 200, 11], 0, 0
        while at < len(data):
            piece = data[at:at + sizes[k % len(sizes)]]
            at, k = at + len(piece), k + 1
            self.wfile.write(b"%x\r\n%s\r\n" % (len(piece), piece))
            self.wfile.flush()
        self.wfile.write(b"0\r\n\r\n")
        self.wfile.flush()


@pytest.fixture(scope="module")
def gateway(tmp_path_factory):
    upstream = ThreadingHTTPServer(("127.0.0.1", 0), BedrockMock)
    threading.Thread(target=upstream.serve_forever, daemon=True).start()
    upstream_url = f"http://127.0.0.1:{upstream.server_address[1]}"
    scratch = tmp_path_factory.mktemp("bedrock-e2e")
    try:
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
            yield {"client": client, "api_port": gw.api_port, "log": gw.log_path}
    finally:
        upstream.shutdown()


@pytest.fixture(params=list(TARGETS))
def target(request, gateway):
    return dict(TARGETS[request.param], client=gateway["client"])


def upstream_calls(mark):
    return SEEN[mark:]


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


# -- the mock itself -------------------------------------------------------------------------------


def test_mock_sigv4_check_matches_the_aws_test_suite():
    # aws-sig-v4-test-suite "get-vanilla": the published signature.
    headers = {"host": "example.amazonaws.com", "x-amz-date": "20150830T123600Z"}
    canonical = canonical_request("GET", "/", "", headers, ["host", "x-amz-date"], b"")
    published = "5fa00fa31553b73ebf1942676e86291e8372ff2a2260956d9b8aae1d763fbf31"
    assert signature(SECRET_ACCESS_KEY, "20150830T123600Z", "us-east-1", "service", canonical) == published
    headers["authorization"] = (f"AWS4-HMAC-SHA256 Credential={ACCESS_KEY_ID}/20150830/us-east-1/service/aws4_request, "
                                f"SignedHeaders=host;x-amz-date, Signature={published}")
    assert sigv4_problem("GET", "/", "", headers, b"", service="service") is None
    assert sigv4_problem("GET", "/", "", headers, b"tampered", service="service") == ("InvalidSignatureException", SIGNATURE_MISMATCH)
    assert sigv4_problem("GET", "/x", "", headers, b"", service="service") == ("InvalidSignatureException", SIGNATURE_MISMATCH)
    assert sigv4_problem("GET", "/", "", headers, b"")[0] == "InvalidSignatureException"  # scoped to `service`, not bedrock
    # The canonical URI encodes the already-encoded model id again.
    assert canonical_request("POST", "/model/a%3A0/converse", "", headers, ["host"], b"").split("\n")[1] == "/model/a%253A0/converse"


def test_mock_frames_round_trip():
    data = event_frame("contentBlockDelta", {"contentBlockIndex": 0, "delta": {"text": "Hé"}}) + event_frame("messageStop", {"stopReason": "end_turn"})
    [(h1, p1), (h2, p2)] = decode_frames(data)
    assert h1 == {":event-type": "contentBlockDelta", ":content-type": "application/json", ":message-type": "event"}
    assert p1["delta"] == {"text": "Hé"} and p1["p"] and p2["stopReason"] == "end_turn"
    # aws-c-event-stream test vectors: the empty message, and a payload without headers.
    assert frame([], b"") == bytes.fromhex("00000010" "00000000" "05c248eb" "7d98c8ff")
    assert frame([], b"{'foo':'bar'}") == bytes.fromhex("0000001d" "00000000" "fd528c5a") + b"{'foo':'bar'}" + bytes.fromhex("c3653936")


def test_mock_validation_refuses_what_bedrock_refuses():
    user = {"role": "user", "content": [{"text": "hi"}]}
    use = {"role": "assistant", "content": [{"toolUse": {"toolUseId": "t1", "name": "get_weather", "input": {}}}]}
    result = {"role": "user", "content": [{"toolResult": {"toolUseId": "t1", "content": [{"text": "ok"}], "status": "success"}}]}
    tools = {"tools": [{"toolSpec": {"name": "get_weather", "inputSchema": {"json": {"type": "object"}}}}]}
    assert validation_problem({"messages": [user]}) is None
    assert validation_problem({"messages": [user, use, result], "toolConfig": tools}) is None
    assert "alternate" in validation_problem({"messages": [user, user]})
    assert "start with a user" in validation_problem({"messages": [use]})
    assert "blank" in validation_problem({"messages": [{"role": "user", "content": [{"text": " "}]}]})
    assert "toolConfig field must be defined" in validation_problem({"messages": [user, use, result]})
    wrong_id = {"role": "user", "content": [{"toolResult": {"toolUseId": "t2", "content": [{"text": "ok"}]}}]}
    assert "without `tool_result`" in validation_problem({"messages": [user, use, wrong_id], "toolConfig": tools})
    extra_id = {"role": "user", "content": result["content"] + wrong_id["content"]}
    assert "unexpected `tool_use_id`" in validation_problem({"messages": [user, use, extra_id], "toolConfig": tools})
    assert "without `tool_result`" in validation_problem({"messages": [user, use, user], "toolConfig": tools})
    assert "extraneous key [stream]" in validation_problem({"messages": [user], "stream": True})
    assert "temperature" in validation_problem({"messages": [user], "inferenceConfig": {"temperature": 1.5}})


# -- auth ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", [n for n, t in TARGETS.items() if t["auth"] == "sigv4"])
def test_access_keys_sign_requests_and_never_travel(gateway, name):
    # DESIGN §16: a credential of the form ACCESS_KEY_ID:SECRET[:TOKEN] means SigV4; the secret
    # itself must never go over the wire.
    target = TARGETS[name]
    mark = len(SEEN)
    try:
        gateway["client"].chat.completions.create(model=target["chat"], messages=[{"role": "user", "content": "Say hello"}])
    except openai.APIStatusError:
        pass  # judged below, on what went upstream
    [call] = upstream_calls(mark)
    authorization = call["headers"].get("authorization", "")
    secret, _ = ACCESS_KEYS[target["key_id"]]
    assert secret not in json.dumps(call["headers"]), f"the secret access key went upstream: authorization={authorization!r}"
    assert authorization.startswith(f"AWS4-HMAC-SHA256 Credential={target['key_id']}/"), authorization
    assert call["auth"] == "sigv4" and call["refused"] is None, call["refused"]


# -- chat ------------------------------------------------------------------------------------------


def test_chat(target):
    mark = len(SEEN)
    answer = target["client"].chat.completions.create(
        model=target["chat"], temperature=0.5, top_p=0.9, max_tokens=256, stop=["END"],
        messages=[{"role": "system", "content": "You are terse."}, {"role": "user", "content": "Say hello"}])
    choice = answer.choices[0]
    assert choice.message.role == "assistant" and choice.message.content == "Hello from Bedrock!"
    assert choice.finish_reason == "stop" and not choice.message.tool_calls
    assert answer.object == "chat.completion" and answer.model == MODEL_ID
    [call] = upstream_calls(mark)
    assert answer.id == f"chatcmpl-{call['request_id']}", "the completion id is Bedrock's x-amzn-RequestId"
    # Bedrock: input 12 + cache reads 3 = prompt 15; output 5; total 20.
    assert (answer.usage.prompt_tokens, answer.usage.completion_tokens, answer.usage.total_tokens) == (15, 5, 20)
    assert answer.usage.prompt_tokens_details.cached_tokens == 3
    assert_upstream_request(call, target, "converse")
    assert call["refused"] is None
    assert call["body"] == {
        "system": [{"text": "You are terse."}],
        "messages": [{"role": "user", "content": [{"text": "Say hello"}]}],
        "inferenceConfig": {"maxTokens": 256, "temperature": 0.5, "topP": 0.9, "stopSequences": ["END"]},
    }


def test_history_is_merged_into_alternating_turns(target):
    mark = len(SEEN)
    answer = target["client"].chat.completions.create(model=target["chat"], messages=[
        {"role": "developer", "content": "Be brief."},
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hello! How can I help?"},
        {"role": "user", "content": "First part."},
        {"role": "user", "content": [{"type": "text", "text": "Second part."}]},
    ])
    assert answer.choices[0].message.content == "Hello from Bedrock!"
    [call] = upstream_calls(mark)
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
    mark = len(SEEN)
    chunks = list(target["client"].chat.completions.create(
        model=target["chat"], messages=[{"role": "user", "content": "Say hello"}], stream=True))
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == "Hello from Bedrock!"
    assert chunks[0].choices[0].delta.role == "assistant"
    assert [c.choices[0].finish_reason for c in chunks if c.choices[0].finish_reason] == ["stop"]
    assert chunks[-1].choices[0].finish_reason == "stop"
    assert all(c.choices and c.usage is None for c in chunks), "no usage chunk when the client did not ask"
    assert all(c.object == "chat.completion.chunk" and c.model == MODEL_ID for c in chunks)
    [call] = upstream_calls(mark)
    assert {c.id for c in chunks} == {f"chatcmpl-{call['request_id']}"}
    assert_upstream_request(call, target, "converse-stream")
    assert call["refused"] is None
    assert call["body"] == {"messages": [{"role": "user", "content": [{"text": "Say hello"}]}]}


def test_stream_with_usage(target):
    mark = len(SEEN)
    chunks = list(target["client"].chat.completions.create(
        model=target["chat"], messages=[{"role": "user", "content": "Say hello"}], stream=True,
        stream_options={"include_usage": True}))
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == "Hello from Bedrock!"
    assert chunks[-2].choices[0].finish_reason == "stop"
    usage_chunk = chunks[-1]
    assert usage_chunk.choices == []
    assert (usage_chunk.usage.prompt_tokens, usage_chunk.usage.completion_tokens, usage_chunk.usage.total_tokens) == (15, 5, 20)
    assert usage_chunk.usage.prompt_tokens_details.cached_tokens == 3
    assert all(c.usage is None for c in chunks[:-1])
    [call] = upstream_calls(mark)
    assert_upstream_request(call, target, "converse-stream")
    assert call["refused"] is None
    assert "stream_options" not in call["body"] and "stream" not in call["body"]


# -- tools -----------------------------------------------------------------------------------------


def test_tool_call_round_trip(target):
    client = target["client"]
    question = {"role": "user", "content": "What's the weather in Paris?"}
    mark = len(SEEN)
    first = client.chat.completions.create(model=target["chat"], messages=[question], tools=[WEATHER_TOOL], tool_choice="auto")
    choice = first.choices[0]
    assert choice.finish_reason == "tool_calls"
    assert choice.message.content == "Let me check the weather."
    [tool_call] = choice.message.tool_calls
    assert tool_call.id == TOOL_USE_ID and tool_call.type == "function" and tool_call.function.name == "get_weather"
    assert json.loads(tool_call.function.arguments) == TOOL_INPUT
    assert (first.usage.prompt_tokens, first.usage.completion_tokens, first.usage.total_tokens) == (402, 58, 460)
    [call] = upstream_calls(mark)
    assert_upstream_request(call, target, "converse")
    assert call["refused"] is None
    assert call["body"]["messages"] == [{"role": "user", "content": [{"text": "What's the weather in Paris?"}]}]
    assert call["body"]["toolConfig"] == {
        "tools": [{"toolSpec": {"name": "get_weather", "description": "Current weather in a city",
                                "inputSchema": {"json": WEATHER_TOOL["function"]["parameters"]}}}],
        "toolChoice": {"auto": {}},
    }

    tool_output = json.dumps({"temp_c": 21, "sky": "clear"})
    mark = len(SEEN)
    second = client.chat.completions.create(model=target["chat"], tools=[WEATHER_TOOL], messages=[
        question,
        choice.message.model_dump(exclude_none=True),
        {"role": "tool", "tool_call_id": tool_call.id, "content": tool_output},
    ])
    assert second.choices[0].message.content == "It is 21°C and sunny in Paris."
    assert second.choices[0].finish_reason == "stop" and not second.choices[0].message.tool_calls
    assert (second.usage.prompt_tokens, second.usage.completion_tokens, second.usage.total_tokens) == (95, 11, 106)
    [call] = upstream_calls(mark)
    assert_upstream_request(call, target, "converse")
    assert call["refused"] is None, call["refused"]
    user, assistant, result = call["body"]["messages"]
    assert user == {"role": "user", "content": [{"text": "What's the weather in Paris?"}]}
    assert assistant == {"role": "assistant", "content": [
        {"text": "Let me check the weather."},
        {"toolUse": {"toolUseId": TOOL_USE_ID, "name": "get_weather", "input": TOOL_INPUT}}]}
    assert result["role"] == "user"
    [block] = result["content"]
    assert block["toolResult"]["toolUseId"] == TOOL_USE_ID
    assert block["toolResult"]["content"] in ([{"text": tool_output}], [{"json": json.loads(tool_output)}])
    assert block["toolResult"].get("status", "success") == "success"
    assert call["body"]["toolConfig"]["tools"][0]["toolSpec"]["name"] == "get_weather"


def test_streamed_tool_call(target):
    mark = len(SEEN)
    chunks = list(target["client"].chat.completions.create(
        model=target["chat"], messages=[{"role": "user", "content": "What's the weather in Paris?"}],
        tools=[WEATHER_TOOL], stream=True, stream_options={"include_usage": True}))
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == "Let me check the weather."
    calls = [tc for c in chunks if c.choices for tc in (c.choices[0].delta.tool_calls or [])]
    assert calls[0].index == 0 and calls[0].id == TOOL_USE_ID and calls[0].type == "function"
    assert calls[0].function.name == "get_weather"
    assert all(tc.index == 0 for tc in calls) and all(tc.id is None for tc in calls[1:])
    assert [tc.function.arguments for tc in calls if tc.function.arguments] == TOOL_INPUT_FRAGMENTS
    assert json.loads("".join(tc.function.arguments or "" for tc in calls)) == TOOL_INPUT
    assert [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason] == ["tool_calls"]
    assert chunks[-1].choices == [] and (chunks[-1].usage.prompt_tokens, chunks[-1].usage.completion_tokens, chunks[-1].usage.total_tokens) == (402, 58, 460)
    [call] = upstream_calls(mark)
    assert_upstream_request(call, target, "converse-stream")
    assert call["refused"] is None
    assert call["body"]["toolConfig"]["tools"][0]["toolSpec"]["name"] == "get_weather"


# -- errors ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("stream", [False, True], ids=["converse", "converse-stream"])
def test_throttling_is_rate_limit_error(target, stream):
    mark = len(SEEN)
    with pytest.raises(openai.RateLimitError) as err:
        answer = target["client"].chat.completions.create(
            model=target["busy"], messages=[{"role": "user", "content": "hi"}], stream=stream)
        if stream:
            list(answer)
    assert err.value.status_code == 429
    assert THROTTLED in err.value.message
    [call] = upstream_calls(mark)  # max_retries=0: exactly one upstream call
    assert_upstream_request(call, target, "converse-stream" if stream else "converse", model=BUSY_MODEL_ID)
    assert call["refused"] == "ThrottlingException"


@pytest.mark.parametrize("stream", [False, True], ids=["converse", "converse-stream"])
def test_validation_exception_is_bad_request_with_the_message(target, stream):
    # OpenAI allows temperature up to 2, Converse up to 1: Bedrock refuses it with a ValidationException.
    mark = len(SEEN)
    with pytest.raises(openai.BadRequestError) as err:
        answer = target["client"].chat.completions.create(
            model=target["chat"], temperature=1.5, messages=[{"role": "user", "content": "hi"}], stream=stream)
        if stream:
            list(answer)
    assert err.value.status_code == 400
    assert TEMPERATURE_RANGE in err.value.message
    assert err.value.type == "invalid_request_error"
    [call] = upstream_calls(mark)
    assert_upstream_request(call, target, "converse-stream" if stream else "converse")
    assert call["refused"] == "ValidationException"


def test_model_error_is_bad_gateway(target):
    # DESIGN §16: statuses outside the kept set (Bedrock's 424 ModelErrorException) become 502.
    mark = len(SEEN)
    with pytest.raises(openai.InternalServerError) as err:
        target["client"].chat.completions.create(model=target["flaky"], messages=[{"role": "user", "content": "hi"}])
    assert err.value.status_code == 502
    assert "The model produced an invalid response" in err.value.message
    [call] = upstream_calls(mark)
    assert_upstream_request(call, target, "converse", model=FLAKY_MODEL_ID)
    assert call["refused"] == "ModelErrorException"


def test_exception_frame_mid_stream_is_an_api_error(target):
    mark = len(SEEN)
    received = []
    with pytest.raises(openai.APIError) as err:
        for chunk in target["client"].chat.completions.create(
                model=target["flaky"], messages=[{"role": "user", "content": "hi"}], stream=True):
            received.append(chunk)
    assert "".join(c.choices[0].delta.content or "" for c in received if c.choices) == "Hello"
    assert not any(c.choices and c.choices[0].finish_reason for c in received)
    assert "Model stream error" in err.value.message
    [call] = upstream_calls(mark)
    assert_upstream_request(call, target, "converse-stream", model=FLAKY_MODEL_ID)


def test_wrong_secret_is_a_gateway_error_without_the_secret(gateway):
    mark = len(SEEN)
    with pytest.raises(openai.InternalServerError) as err:
        gateway["client"].chat.completions.create(model="wrong-secret-claude", messages=[{"role": "user", "content": "hi"}])
    assert err.value.status_code == 502
    assert err.value.code == "upstream_credential_refused"
    text = err.value.response.text
    assert WRONG_SECRET not in text and CLIENT_KEY not in text
    [call] = upstream_calls(mark)
    assert call["headers"].get("authorization", "").startswith(f"AWS4-HMAC-SHA256 Credential={SESSION_KEY_ID}/")
    assert call["refused"] == "InvalidSignatureException", "the mock checks signatures: a wrong secret must fail"
