"""`llmctl serve` (SQLite, no Redis) records usage and enforces budgets (DESIGN §18), seen through
the official OpenAI and Anthropic SDKs and `llmctl usage -o json`, and keeps both across a restart.

Every request to the `priced` alias costs exactly 1 USD: the mock upstream reports 99,990 prompt
and 10 completion tokens (remote model `usage-99990-10-e2e`) and both prices are 10 USD per
million tokens."""

import json
import time

import anthropic
import openai
import pytest

from mock_upstream import mock_upstream
from serve import llmctl_serve

UPSTREAM_KEY = "sk-upstream-openai-0123456789"
CAPPED_KEY = "vk-e2e-capped-0123456789"
OPEN_KEY = "vk-e2e-open-0123456789"
MARKER = "usage-99990-10-e2e"
HELLO = [{"role": "user", "content": "hi"}]


def upstream_calls(upstream):
    return sum(1 for r in upstream.requests() if MARKER in r["body_text"])


def usage_by_key(gw):
    rows = json.loads(gw.llmctl("-o", "json", "usage", "--group-by", "vkey"))
    return {row["vkey_name"]: row for row in rows}


def poll(what, check, deadline):
    while True:
        value = check()
        if value:
            return value
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.2)


def openai_client(gw, key):
    return openai.OpenAI(api_key=key, base_url=f"http://localhost:{gw.api_port}", max_retries=0)


def assert_refused(client):
    with pytest.raises(openai.RateLimitError) as err:
        client.chat.completions.create(model="priced", max_tokens=1, messages=HELLO)
    assert err.value.status_code == 429
    assert err.value.type == "insufficient_quota" and err.value.code == "budget_exceeded", err.value.body
    assert err.value.response.headers["x-should-retry"] == "false"


def test_serve_records_usage_and_enforces_budgets_across_a_restart(tmp_path):
    with mock_upstream() as upstream:
        with llmctl_serve(tmp_path) as gw:
            gw.llmctl("connection", "add", "--name", "OpenAI", "--provider", "openai",
                      "--endpoint", upstream.url, "--api-key", UPSTREAM_KEY)
            gw.llmctl("model", "add", "--conn-id", "OpenAI", "--name", "priced", "--remote", MARKER,
                      "--price-input", "10", "--price-output", "10")
            gw.llmctl("vkey", "add", "--name", "capped", "--key", CAPPED_KEY,
                      "--budget-usd", "5", "--budget-period", "day")
            gw.llmctl("vkey", "add", "--name", "open", "--key", OPEN_KEY)
            for vkey in ("capped", "open"):
                gw.llmctl("assign", "--vkey-id", vkey, "--model-id", "priced", "--alias", "priced")
            shown = json.loads(gw.llmctl("-o", "json", "vkey", "get", "capped"))
            assert shown["budget_usd"] == "5.000000" and shown["budget_period"] == "day", shown

            capped, free = openai_client(gw, CAPPED_KEY), openai_client(gw, OPEN_KEY)
            gw.wait_for_aliases(capped, {"priced"})
            gw.wait_for_aliases(free, {"priced"})

            # Five dollars: five requests (plain and streamed), then refusals before any upstream call.
            for n in range(5):
                if n % 2:
                    chunks = list(capped.chat.completions.create(
                        model="priced", max_tokens=1, messages=HELLO, stream=True,
                        stream_options={"include_usage": True}))
                    assert chunks[-1].usage.prompt_tokens == 99_990
                else:
                    answer = capped.chat.completions.create(model="priced", max_tokens=1, messages=HELLO)
                    assert answer.usage.prompt_tokens == 99_990 and answer.usage.completion_tokens == 10
            assert_refused(capped)
            messages = anthropic.Anthropic(api_key=CAPPED_KEY, base_url=f"http://localhost:{gw.api_port}",
                                           max_retries=0)
            with pytest.raises(anthropic.RateLimitError) as err:
                messages.messages.create(model="priced", max_tokens=1, messages=HELLO)
            assert err.value.body["error"]["type"] == "rate_limit_error", err.value.body
            assert upstream_calls(upstream) == 5

            # The other key is unaffected.
            for _ in range(3):
                free.chat.completions.create(model="priced", max_tokens=1, messages=HELLO)
            assert upstream_calls(upstream) == 8

            # Usage reaches the control plane within a report interval, exact.
            def recorded():
                rows = usage_by_key(gw)
                done = rows.get("capped", {}).get("requests") == 5 and rows.get("open", {}).get("requests") == 3
                return rows if done else None
            rows = poll("usage to be recorded", recorded, time.monotonic() + 60)
            assert rows["capped"]["input_tokens"] == 5 * 99_990
            assert rows["capped"]["output_tokens"] == 5 * 10
            assert rows["capped"]["cost_micro_usd"] == 5_000_000 and rows["capped"]["cost_usd"] == "5.000000"
            assert rows["open"]["cost_micro_usd"] == 3_000_000

        # Restarted on the same data directory: the recorded spend is restored, still refused.
        with llmctl_serve(tmp_path) as gw:
            capped = openai_client(gw, CAPPED_KEY)
            gw.wait_for_aliases(capped, {"priced"})
            assert_refused(capped)
            assert upstream_calls(upstream) == 8

            # A raise of one dollar admits one more request.
            gw.llmctl("vkey", "update", "capped", "--budget-usd", "6")
            poll("the raised budget to admit",
                 lambda: _admitted(capped), time.monotonic() + 30)
            assert_refused(capped)
            assert upstream_calls(upstream) == 9


def _admitted(client):
    try:
        client.chat.completions.create(model="priced", max_tokens=1, messages=HELLO)
        return True
    except openai.RateLimitError as err:
        assert err.code == "budget_exceeded", err.body
        return False
