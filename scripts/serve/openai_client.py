"""Drives a running `dsv3 serve` with the official `openai` Python package (a client nobody
here wrote): chat, text completions, streaming of both, n + seed, logprobs, a stop string, and
error cases. Exits non-zero on the first failed check.

    python openai_client.py BASE_URL MODEL
"""
import sys

import openai

base, model = sys.argv[1], sys.argv[2]
client = openai.OpenAI(base_url=base, api_key="unused", max_retries=0, timeout=120)
checks = 0


def check(cond, what):
    global checks
    if not cond:
        sys.exit(f"FAILED: {what}")
    checks += 1


models = client.models.list()
check([m.id for m in models.data] == [model], f"models.list: {models}")

messages = [{"role": "user", "content": "Write one word."}]
chat = client.chat.completions.create(model=model, messages=messages, max_tokens=8, temperature=0,
                                      logprobs=True, top_logprobs=2)
choice = chat.choices[0]
check(chat.object == "chat.completion" and choice.message.role == "assistant", f"chat shape: {chat}")
check(choice.finish_reason in ("stop", "length"), f"finish_reason {choice.finish_reason}")
check(chat.usage.total_tokens == chat.usage.prompt_tokens + chat.usage.completion_tokens, f"usage {chat.usage}")
check(len(choice.logprobs.content) == chat.usage.completion_tokens, "one logprob entry per token")
check(all(len(e.top_logprobs) == 2 for e in choice.logprobs.content), "top_logprobs=2")

# The same request streamed: the same text, and usage at the end when asked for.
stream = client.chat.completions.create(model=model, messages=messages, max_tokens=8, temperature=0,
                                        stream=True, stream_options={"include_usage": True})
text, usage, finish = "", None, None
for chunk in stream:
    if chunk.usage:
        usage = chunk.usage
    for c in chunk.choices:
        text += c.delta.content or ""
        finish = c.finish_reason or finish
check(text == (choice.message.content or ""), f"streamed chat {text!r} != {choice.message.content!r}")
check(usage is not None and usage.completion_tokens == chat.usage.completion_tokens, f"stream usage {usage}")
check(finish == choice.finish_reason, "stream finish_reason")

# Text completions, n = 2 with a seed: reproducible choices.
a = client.completions.create(model=model, prompt="Once upon a time", max_tokens=6, n=2, seed=11, temperature=1.0)
b = client.completions.create(model=model, prompt="Once upon a time", max_tokens=6, n=2, seed=11, temperature=1.0)
check(len(a.choices) == 2 and [c.text for c in a.choices] == [c.text for c in b.choices], "n=2 with a seed")
check(a.object == "text_completion", "completion object")

streamed = "".join(c.choices[0].text for c in client.completions.create(
    model=model, prompt="Once upon a time", max_tokens=6, temperature=0, stream=True) if c.choices)
whole = client.completions.create(model=model, prompt="Once upon a time", max_tokens=6, temperature=0)
check(streamed == whole.choices[0].text, f"streamed completion {streamed!r} != {whole.choices[0].text!r}")

lp = client.completions.create(model=model, prompt=[1, 2, 3], max_tokens=3, temperature=0, logprobs=2)
check(len(lp.choices[0].logprobs.token_logprobs) == 3, "completion logprobs")

if len(whole.choices[0].text) > 3:
    stop = whole.choices[0].text[2:4]
    cut = client.completions.create(model=model, prompt="Once upon a time", max_tokens=6, temperature=0, stop=[stop])
    check(stop not in cut.choices[0].text and cut.choices[0].finish_reason == "stop", f"stop {stop!r}: {cut}")

# Errors arrive as the client's typed exceptions, with the server's message.
for kwargs, exc, needle in [
    (dict(model="no-such-model", messages=messages), openai.NotFoundError, "no-such-model"),
    (dict(model=model, messages=messages, temperature=5), openai.BadRequestError, "temperature"),
    (dict(model=model, messages=[], max_tokens=2), openai.BadRequestError, "messages"),
]:
    try:
        client.chat.completions.create(**kwargs)
        check(False, f"{kwargs} should fail")
    except exc as e:
        check(needle in str(e), f"{exc.__name__} names {needle}: {e}")

print(f"openai {openai.__version__} against {base}: {checks} checks passed")
