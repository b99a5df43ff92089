"""``llmray serve``: an OpenAI-compatible Ray Serve application over the KV-cache generator.

``engine`` (no Ray: batched decoding to text deltas), ``openai_schema`` (request and response
shapes), ``security`` (bearer token, exposure check), ``app`` (the Serve deployment), ``cli``.
"""
