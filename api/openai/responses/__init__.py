"""OpenAI's Responses API (``POST /v1/responses``), stateless, on the same composition path as chat completions."""
