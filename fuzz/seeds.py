#!/usr/bin/env python3
"""Writes the fuzz seed corpus (fuzz/corpus/<target>/) from the golden fixtures
(mock-upstream/fixtures/golden/*/*.json): client requests, upstream answers and error bodies, Gemini
SSE streams, OpenAI SSE streams, and Bedrock event-stream frames encoded as the wire carries them
(prelude, string headers, CRC32s; AWS event-stream encoding). Stream seeds start with the chunking
byte the harness reads first. Run by scripts/fuzz.sh; the output is deterministic."""
import base64
import glob
import hashlib
import json
import os
import struct
import sys
import zlib

root = os.path.dirname(os.path.abspath(__file__))
golden = os.path.join(root, "..", "mock-upstream", "fixtures", "golden")
corpus = sys.argv[1] if len(sys.argv) > 1 else os.path.join(root, "corpus")


def dump(value):
    return json.dumps(value, separators=(",", ":")).encode()


def header(name, value):
    name, value = name.encode(), value.encode()
    return bytes([len(name)]) + name + b"\x07" + struct.pack(">H", len(value)) + value


def frame(headers, payload, corrupt=False):
    encoded = b"".join(header(k, v) for k, v in headers)
    total = 12 + len(encoded) + len(payload) + 4
    prelude = struct.pack(">II", total, len(encoded))
    prelude += struct.pack(">I", zlib.crc32(prelude))
    message = prelude + encoded + payload
    crc = zlib.crc32(message) ^ (0xFFFFFFFF if corrupt else 0)
    return message + struct.pack(">I", crc)


def bedrock_frames(events):
    out = b""
    for event in events:
        payload = dump(event.get("payload", {}))
        if "exception" in event:
            headers = [(":message-type", "exception"), (":exception-type", event["exception"]),
                       (":content-type", "application/json")]
        else:
            headers = [(":message-type", "event"), (":event-type", event["event"]),
                       (":content-type", "application/json")]
        out += frame(headers, payload, event.get("corrupt_crc", False))
    return out


def anthropic_sse(events):
    return b"".join(b"event: " + e.get("type", "").encode() + b"\ndata: " + dump(e) + b"\n\n"
                    for e in events)


def anthropic_frames(events):
    """Anthropic events as Bedrock InvokeModelWithResponseStream `chunk` frames."""
    headers = [(":message-type", "event"), (":event-type", "chunk"),
               (":content-type", "application/json")]
    return b"".join(frame(headers, dump({"bytes": base64.b64encode(dump(e)).decode()}))
                    for e in events)


def sse(events, done=False):
    out = b"".join(b"data: " + dump(e) + b"\r\n\r\n" for e in events)
    return out + (b"data: [DONE]\n\n" if done else b"")


def responses_event_seeds():
    """Model event sequences for the Responses writer (fuzz/src/lib.rs `responses_events`): one
    opcode byte per event (its value modulo 14), its text up to the next 0xff."""
    def ev(op, text=b""):
        return bytes([op]) + text + b"\xff"
    whole = (ev(0, b"msg_1") + ev(2) + ev(6, b"think") + ev(7, b"sig") + ev(9) + ev(3, b"opaque")
             + ev(10) + ev(1) + ev(5, b"Hel") + ev(5, b"lo") + ev(9) + ev(4, b"toolu_1")
             + ev(8, b'{"a":') + ev(8, b"1}") + ev(9) + ev(11 + 14 * 2))
    cut = ev(0, b"msg_2") + ev(1) + ev(5, b"par") + ev(11)
    failed = ev(0, b"msg_3") + ev(4, b"t") + ev(8, b"{") + ev(12, b"upstream failed")
    loose = ev(5, b"no start") + ev(8, b"{}") + ev(7, b"s") + ev(11 + 14 * 5)
    return [whole, cut, failed, loose, ev(13, b"before anything")]


def main():
    seeds = {"request": [], "sse": [], "event_stream": [], "answer": [],
             "responses_events": responses_event_seeds()}
    for path in sorted(glob.glob(os.path.join(golden, "*", "*.json"))):
        provider = os.path.basename(os.path.dirname(path))
        with open(path) as f:
            fixture = json.load(f)
        if "request" in fixture:
            seeds["request"].append(dump(fixture["request"]))
        for key in ("answer", "body"):
            if key in fixture:
                seeds["answer"].append(dump(fixture[key]))
        if "openai_answer" in fixture:
            seeds["answer"].append(dump(fixture["openai_answer"]))
        if "openai_stream" in fixture:
            seeds["sse"].append(b"\x07" + sse(fixture["openai_stream"], done=True))
        if "stream" in fixture:
            if provider == "google":
                seeds["sse"].append(b"\x05" + sse(fixture["stream"]))
            elif provider == "bedrock":
                seeds["event_stream"].append(b"\x0b" + bedrock_frames(fixture["stream"]))
            elif provider == "anthropic":
                seeds["sse"].append(b"\x05" + anthropic_sse(fixture["stream"]))
                seeds["event_stream"].append(b"\x0b" + anthropic_frames(fixture["stream"]))
            elif provider == "openai_chat":
                seeds["sse"].append(b"\x07" + sse(fixture["stream"], done=True))
            elif provider == "responses":
                # Responses fixtures name the upstream whose stream they translate.
                upstream = fixture.get("upstream")
                if upstream == "anthropic":
                    seeds["sse"].append(b"\x05" + anthropic_sse(fixture["stream"]))
                elif upstream == "openai_chat":
                    seeds["sse"].append(b"\x07" + sse(fixture["stream"], done=True))
                elif upstream == "gemini":
                    seeds["sse"].append(b"\x05" + sse(fixture["stream"]))
                elif upstream == "converse":
                    seeds["event_stream"].append(b"\x0b" + bedrock_frames(fixture["stream"]))
    for target, items in seeds.items():
        directory = os.path.join(corpus, target)
        os.makedirs(directory, exist_ok=True)
        for item in items:
            name = hashlib.sha1(item).hexdigest()
            with open(os.path.join(directory, name), "wb") as f:
                f.write(item)
        print(f"seeds.py: {len(items)} seeds for {target}", file=sys.stderr)


if __name__ == "__main__":
    main()
