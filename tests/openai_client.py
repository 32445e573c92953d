"""Drives `nuwa serve` with the official openai package: completions, chat, streaming, errors.

    python3 tests/openai_client.py http://127.0.0.1:8080/v1
"""

import sys

import openai

client = openai.OpenAI(base_url=sys.argv[1], api_key="unused")
model = client.models.list().data[0].id

c = client.completions.create(model=model, prompt="w5 w6 w7", max_tokens=6, temperature=0)
assert c.choices[0].finish_reason == "length", c
assert c.usage.completion_tokens == 6, c
streamed = "".join(ch.choices[0].text for ch in client.completions.create(
    model=model, prompt="w5 w6 w7", max_tokens=6, temperature=0, stream=True))
assert streamed == c.choices[0].text, (streamed, c.choices[0].text)

chat = client.chat.completions.create(model=model, messages=[{"role": "user", "content": "w5 w6"}],
                                      max_tokens=4, temperature=0)
assert chat.choices[0].message.role == "assistant", chat
parts = [ch.choices[0].delta.content or "" for ch in client.chat.completions.create(
    model=model, messages=[{"role": "user", "content": "w5 w6"}], max_tokens=4, temperature=0, stream=True)]
assert "".join(parts) == chat.choices[0].message.content, (parts, chat)

# Log-probabilities, parsed by the client's own types.
lp = client.chat.completions.create(model=model, messages=[{"role": "user", "content": "w5 w6"}],
                                    max_tokens=4, temperature=0, logprobs=True, top_logprobs=3)
content = lp.choices[0].logprobs.content
assert content and all(t.logprob <= 0 and len(t.top_logprobs) == 3 for t in content), lp
assert all(t.top_logprobs[0].token == t.token for t in content), lp  # greedy: the most likely
clp = client.completions.create(model=model, prompt="w5 w6 w7", max_tokens=3, temperature=0, logprobs=2)
assert len(clp.choices[0].logprobs.token_logprobs) == 3, clp
assert all(len(t) == 2 for t in clp.choices[0].logprobs.top_logprobs), clp

try:
    client.completions.create(model="not-this-one", prompt="w1", max_tokens=2)
    raise SystemExit("an unknown model was accepted")
except openai.NotFoundError:
    pass
try:
    client.completions.create(model=model, prompt="w1", max_tokens=2, temperature=-1)
    raise SystemExit("a negative temperature was accepted")
except openai.BadRequestError:
    pass
print("openai client: ok")
