"""The official OpenAI client against `corolla api` (driven by tests/tests/api.rs).

Usage: openai_client.py checks|disconnect|unavailable; API_BASE, API_KEY, MODEL, PROMPT and
MAX_TOKENS come from the environment. Prints one JSON object (the last line) for the test to
check; `disconnect` also talks over stdin/stdout (OPEN, then waits for a line, then CLOSED).
"""

import json
import os
import sys
import threading

import openai

BASE = os.environ["API_BASE"]
KEY = os.environ.get("API_KEY", "unused")
MODEL = os.environ.get("MODEL", "")
PROMPT = os.environ.get("PROMPT", "")
MAX_TOKENS = int(os.environ.get("MAX_TOKENS", "16"))
PENALTY_PROMPT = os.environ.get("PENALTY_PROMPT", "")
PRESENCE = float(os.environ.get("PRESENCE", "0"))
FREQUENCY = float(os.environ.get("FREQUENCY", "0"))


def client(key=KEY):
    return openai.OpenAI(base_url=BASE, api_key=key, max_retries=0, timeout=300)


def error_of(call):
    try:
        call()
    except openai.APIError as e:
        return {"class": type(e).__name__, "status": getattr(e, "status_code", None), "message": str(e)}
    return {"class": None}


def chat_stream(c, include_usage):
    chunks = list(
        c.chat.completions.create(
            model=MODEL,
            messages=[{"role": "user", "content": PROMPT}],
            temperature=0,
            max_tokens=MAX_TOKENS,
            stream=True,
            stream_options={"include_usage": True} if include_usage else None,
        )
    )
    text = "".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices)
    return {
        "text": text,
        "first_role": chunks[0].choices[0].delta.role if chunks and chunks[0].choices else None,
        "finish": [ch.choices[0].finish_reason for ch in chunks if ch.choices and ch.choices[0].finish_reason],
        "usage": chunks[-1].usage.model_dump() if chunks and chunks[-1].usage else None,
        "objects": sorted({ch.object for ch in chunks}),
    }


def checks():
    c = client()
    out = {"models": [m.id for m in c.models.list().data]}
    whole = c.chat.completions.create(
        model=MODEL,
        messages=[{"role": "user", "content": PROMPT}],
        temperature=0,
        max_tokens=MAX_TOKENS,
    )
    out["chat"] = {
        "text": whole.choices[0].message.content,
        "finish": whole.choices[0].finish_reason,
        "usage": whole.usage.model_dump(),
        "object": whole.object,
    }
    out["stream"] = chat_stream(c, True)
    penalized = c.chat.completions.create(
        model=MODEL,
        messages=[{"role": "user", "content": PENALTY_PROMPT}],
        temperature=0,
        max_tokens=MAX_TOKENS,
        presence_penalty=PRESENCE,
        frequency_penalty=FREQUENCY,
    )
    out["penalized"] = penalized.choices[0].message.content
    # Many at once: each gets the same greedy reply.
    results = [None] * 4

    def one(i):
        results[i] = chat_stream(client(), False)["text"]

    threads = [threading.Thread(target=one, args=(i,)) for i in range(len(results))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    out["concurrent"] = results
    text = c.completions.create(model=MODEL, prompt="1, 2, 3, 4,", temperature=0, max_tokens=8)
    out["completion"] = {"text": text.choices[0].text, "object": text.object, "usage": text.usage.model_dump()}
    message = [{"role": "user", "content": "hi"}]
    out["errors"] = {
        "unknown_model": error_of(lambda: c.chat.completions.create(model="no-such-model", messages=message)),
        "n2": error_of(lambda: c.chat.completions.create(model=MODEL, messages=message, n=2)),
        "temperature": error_of(lambda: c.chat.completions.create(model=MODEL, messages=message, temperature=7)),
        "wrong_key": error_of(lambda: client("wrong").models.list()),
    }
    return out


def disconnect():
    c = client()
    stream = c.completions.create(model=MODEL, prompt="1, 2, 3, 4, 5,", temperature=0, max_tokens=2000, stream=True)
    got = []
    for chunk in stream:
        got.append(chunk.choices[0].text if chunk.choices else "")
        if len(got) >= 3:
            break
    print("OPEN", flush=True)
    sys.stdin.readline()
    stream.close()
    print("CLOSED", flush=True)
    sys.stdin.readline()
    return {"received": got}


def unavailable():
    c = client()
    return {
        "error": error_of(
            lambda: c.chat.completions.create(
                model=MODEL, messages=[{"role": "user", "content": PROMPT}], max_tokens=4
            )
        )
    }


if __name__ == "__main__":
    result = {"checks": checks, "disconnect": disconnect, "unavailable": unavailable}[sys.argv[1]]()
    print(json.dumps(result), flush=True)
