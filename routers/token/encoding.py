"""Chat examples as training rows: token ids with labels that score only the answer turn, and the loss over
those answer tokens. Shared by the routers' training (PHATGOOSE gates, mixer gates) and the demo experts'
LoRA recipe (evals/recipe.py); torch is imported where a loss is computed, so importing this is light."""

from __future__ import annotations

from typing import Any

__all__ = ["IGNORE_INDEX", "answer_loss", "encode_chat"]

IGNORE_INDEX = -100  # label value PyTorch's cross-entropy skips: prompt and padding tokens


def encode_chat(
    tokenizer: Any, messages: list[dict[str, str]], answer: str, max_length: int
) -> tuple[list[int], list[int]]:
    """Token ids of ``messages`` followed by the assistant turn ``answer``, chat-formatted, and labels that
    score only that final answer turn (everything before it is IGNORE_INDEX). Raises ValueError when the
    whole exceeds ``max_length`` tokens. The demo recipe and PHATGOOSE gate training both encode with it."""
    prompt = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    full = tokenizer.apply_chat_template([*messages, {"role": "assistant", "content": answer}], tokenize=False)
    if not full.startswith(prompt):
        raise ValueError("the chat template renders the prompt differently with and without the answer")
    # The answer turn up to and including its end-of-turn token (<|im_end|>); the newline after it is
    # never generated, so it is not trained.
    completion = full[len(prompt) :].rstrip()
    # Tokenized apart, exactly as generation sees them: the prompt is encoded, then tokens follow.
    prompt_ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
    completion_ids = tokenizer(completion, add_special_tokens=False)["input_ids"]
    ids = prompt_ids + completion_ids
    if len(ids) > max_length:
        first = next((m["content"] for m in messages if m.get("role") == "user"), "")
        raise ValueError(f"example of {len(ids)} tokens exceeds max_length={max_length}: {first[:60]!r}")
    return ids, [IGNORE_INDEX] * len(prompt_ids) + completion_ids


def answer_loss(model: Any, items: list[tuple[list[int], list[int]]], pad_id: int) -> Any:
    """Mean cross-entropy over the scored (answer) tokens of a batch of (ids, labels) rows.

    Rows are left-padded so every answer sits at the end; the vocabulary projection then runs only on
    the last few positions (``logits_to_keep``) instead of all of them: with a 49k vocabulary that
    projection and its softmax are a large share of a step on short examples.
    """
    import torch

    width = max(len(ids) for ids, _ in items)
    # Positions from the last prompt token on: the first of them predicts the first answer token.
    keep = max(sum(1 for t in labels if t != IGNORE_INDEX) for _, labels in items) + 1
    ids = torch.full((len(items), width), pad_id, dtype=torch.long)
    labels = torch.full((len(items), width), IGNORE_INDEX, dtype=torch.long)
    mask = torch.zeros((len(items), width), dtype=torch.long)
    for row, (x, y) in enumerate(items):
        ids[row, width - len(x) :] = torch.tensor(x)
        labels[row, width - len(y) :] = torch.tensor(y)
        mask[row, width - len(x) :] = 1
    # Positions count from each row's first real token, as they would without padding.
    position_ids = (mask.cumsum(-1) - 1).clamp(min=0)
    logits = model(input_ids=ids, attention_mask=mask, position_ids=position_ids, logits_to_keep=keep).logits
    # logits[:, i] predicts token width - keep + i + 1; the last position predicts nothing.
    targets = labels[:, width - keep + 1 :]
    return torch.nn.functional.cross_entropy(
        logits[:, :-1].reshape(-1, logits.shape[-1]).float(), targets.reshape(-1), ignore_index=IGNORE_INDEX
    )
