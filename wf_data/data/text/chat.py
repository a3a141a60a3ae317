"""Chat records -> token ids and an assistant-only loss mask, through the tokenizer's chat template.

Two ways to find the assistant tokens, both giving `(T,)` arrays aligned with the rendered ids:

- the template marks assistant text with `{% generation %}...{% endgeneration %}`: transformers
  returns the mask directly (`return_assistant_tokens_mask=True`);
- otherwise conversation prefixes are rendered: the assistant span of message `i` is the token
  difference between `messages[:i]` + generation prompt and `messages[:i + 1]`. This needs the
  *prefix property* (each prefix tokenizes to a prefix of the whole conversation); a template or
  tokenizer that breaks it gets an error naming the message, never a silently wrong mask.

The shipped ChatML template uses prefixes: it is plain Jinja, so torchtitan and any Jinja load it.
Templates are data, not code: they render (through transformers) in Jinja's
`ImmutableSandboxedEnvironment`, where reaching Python internals (`__class__`, `__globals__`)
or mutating the messages raises `jinja2.exceptions.SecurityError`.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

VALID_ROLES = ("system", "user", "assistant", "tool")

_GENERATION_TAG = re.compile(r"\{%-?\s*generation\s*-?%\}")


def has_generation_markers(chat_template: str) -> bool:
    """True when `chat_template` marks assistant text with `{% generation %}` blocks."""
    return bool(_GENERATION_TAG.search(chat_template))


def resolve_chat_template(hf_tokenizer: Any, chat_template: str | None = None) -> str:
    """The Jinja template to render with: `chat_template` if given, else the tokenizer's own."""
    if chat_template is not None:
        if not isinstance(chat_template, str) or not chat_template.strip():
            raise ValueError(
                f"chat_template must be a non-empty Jinja string, got {chat_template!r}"
            )
        return chat_template
    try:
        return hf_tokenizer.get_chat_template(None)
    except ValueError as err:
        name = getattr(hf_tokenizer, "name_or_path", "") or type(hf_tokenizer).__name__
        raise ValueError(
            f"tokenizer {name!r} has no chat template; pass chat_template=<Jinja string>"
        ) from err


def _where(record_index: int | None) -> str:
    return "conversation" if record_index is None else f"record {record_index}"


def validate_messages(messages: Any, *, record_index: int | None = None) -> list[dict]:
    """Check a conversation: a non-empty list of `{"role": one of VALID_ROLES, "content": str}`.

    Extra keys (e.g. `name`, `tool_calls`) are kept for the template. Returns the list unchanged.
    """
    return check_messages(messages, _where(record_index))


def check_messages(messages: Any, where: str) -> list[dict]:
    """`validate_messages` with errors prefixed by `where` (a file and line, a record index).

    The one chat validator: `wf-data prepare` uses it too, so a bad conversation fails when it
    is prepared, naming its file and line, not later in training.
    """
    if isinstance(messages, (str, bytes)) or not isinstance(messages, Sequence):
        raise TypeError(
            f"{where}: chat messages must be a list of {{'role', 'content'}} dicts, "
            f"got {type(messages).__name__}"
        )
    if len(messages) == 0:
        raise ValueError(f"{where}: 'messages' is empty")
    for j, message in enumerate(messages):
        if not isinstance(message, Mapping):
            raise TypeError(
                f"{where} message {j}: expected a dict with 'role' and 'content', "
                f"got {type(message).__name__}"
            )
        role = message.get("role")
        if role not in VALID_ROLES:
            raise ValueError(
                f"{where} message {j}: unknown role {role!r}; valid roles: {', '.join(VALID_ROLES)}"
            )
        content = message.get("content")
        if not isinstance(content, str):
            raise TypeError(
                f"{where} message {j} (role {role!r}): field 'content' must be a string, "
                f"got {type(content).__name__}"
            )
    return list(messages)


def to_messages(
    record: Any,
    *,
    record_index: int | None = None,
    messages_key: str = "messages",
    input_key: str = "input",
    output_key: str = "output",
    system_key: str = "system_prompt",
) -> list[dict]:
    """Validated messages of a chat record: its `messages`, or Nemotron-style columns.

    Nemotron post-training records hold `input` (the user turn as a string, or the conversation so
    far as a list of messages), `output` (the assistant answer) and an optional `system_prompt`;
    they become `[system?, *input turns, assistant: output]`.
    """
    where = _where(record_index)
    if not isinstance(record, Mapping):
        kind = type(record).__name__
        hint = (
            " (a text record: use PretrainDataset, or convert it to chat)"
            if isinstance(record, str)
            else " (a token record: use PretrainDataset)"
            if isinstance(record, np.ndarray)
            else ""
        )
        raise TypeError(
            f"{where}: expected a chat record (dict with {messages_key!r}), got {kind}{hint}"
        )
    if messages_key in record:
        return validate_messages(record[messages_key], record_index=record_index)
    if input_key in record and output_key in record:
        prompt, answer = record[input_key], record[output_key]
        if isinstance(prompt, str):
            messages = [{"role": "user", "content": prompt}]
        else:
            messages = list(validate_messages(prompt, record_index=record_index))
        if not isinstance(answer, str):
            raise TypeError(f"{where}: {output_key!r} must be str, got {type(answer).__name__}")
        messages.append({"role": "assistant", "content": answer})
        system = record.get(system_key)
        if system and messages[0]["role"] != "system":
            messages.insert(0, {"role": "system", "content": system})
        return validate_messages(messages, record_index=record_index)
    raise ValueError(
        f"{where}: no {messages_key!r} field (found keys: {sorted(map(str, record))}); a chat "
        f"record needs {messages_key!r} or the columns {input_key!r} + {output_key!r}"
    )


def render_with_mask(
    messages: Sequence[Mapping[str, Any]],
    hf_tokenizer: Any,
    chat_template: str | None = None,
    *,
    record_index: int | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Render one conversation: `(input_ids (T,) int32, loss_mask (T,) uint8)`, 1 on assistant.

    `hf_tokenizer` is a transformers fast tokenizer; `chat_template` overrides its own template.
    Uses the template's `{% generation %}` markers when present, else conversation prefixes.
    """
    (result,) = render_many_with_masks(
        [messages], hf_tokenizer, chat_template, record_indices=[record_index]
    )
    return result


def render_many_with_masks(
    conversations: Sequence[Sequence[Mapping[str, Any]]],
    hf_tokenizer: Any,
    chat_template: str | None = None,
    *,
    record_indices: Sequence[int] | None = None,
) -> list[tuple[np.ndarray, np.ndarray]]:
    """`render_with_mask` over many conversations; with markers, one batched render and
    tokenizer call for all of them. `record_indices` name the conversations in errors."""
    if record_indices is None:
        record_indices = [None] * len(conversations)
    conversations = [
        validate_messages(c, record_index=i)
        for c, i in zip(conversations, record_indices, strict=True)
    ]
    template = resolve_chat_template(hf_tokenizer, chat_template)
    if not conversations:
        return []
    if not has_generation_markers(template):
        return [
            _render_with_prefixes(c, hf_tokenizer, template, i)
            for c, i in zip(conversations, record_indices, strict=True)
        ]
    return _render_with_markers(conversations, hf_tokenizer, template, record_indices)


def _render_with_markers(conversations, hf_tokenizer, template, record_indices):
    encoded = hf_tokenizer.apply_chat_template(
        [list(c) for c in conversations],
        chat_template=template,
        tokenize=True,
        return_dict=True,
        return_assistant_tokens_mask=True,
    )
    results = []
    for messages, ids, mask, index in zip(
        conversations,
        encoded["input_ids"],
        encoded["assistant_masks"],
        record_indices,
        strict=True,
    ):
        input_ids = np.asarray(ids, dtype=np.int32)
        loss_mask = np.asarray(mask, dtype=np.uint8)
        if not loss_mask.any() and any(m["role"] == "assistant" and m["content"] for m in messages):
            raise ValueError(
                f"{_where(index)}: the chat template has {{% generation %}} markers but marked "
                "no token of the assistant messages; check that the markers wrap assistant content"
            )
        results.append((input_ids, loss_mask))
    return results


def _render_with_prefixes(messages, hf_tokenizer, template, record_index):
    assistant_at = [i for i, m in enumerate(messages) if m["role"] == "assistant"]
    turn_ends = [i + 1 for i in assistant_at]
    if not turn_ends or turn_ends[-1] != len(messages):
        turn_ends.append(len(messages))  # the whole conversation is always rendered last
    # Batched: one Jinja call per flag value, one Rust tokenizer call for all the strings.
    prompts = (
        hf_tokenizer.apply_chat_template(
            [messages[:i] for i in assistant_at],
            chat_template=template,
            tokenize=False,
            add_generation_prompt=True,
        )
        if assistant_at
        else []
    )
    turns = hf_tokenizer.apply_chat_template(
        [messages[:end] for end in turn_ends], chat_template=template, tokenize=False
    )
    encoded = hf_tokenizer(prompts + turns, add_special_tokens=False, return_attention_mask=False)
    ids = encoded["input_ids"]
    input_ids = np.asarray(ids[-1], dtype=np.int32)
    loss_mask = np.zeros(len(input_ids), dtype=np.uint8)
    num = len(assistant_at)
    for k, i in enumerate(assistant_at):
        start = _checked_prefix(ids[k], input_ids, i, i, record_index)
        stop = _checked_prefix(ids[num + k], input_ids, i, i + 1, record_index)
        if stop < start:
            raise ValueError(
                f"{_where(record_index)} message {i}: the assistant turn renders shorter "
                f"({stop} tokens) than its prompt with the generation prompt ({start} tokens)"
            )
        loss_mask[start:stop] = 1
    return input_ids, loss_mask


def _checked_prefix(prefix_ids, full_ids: np.ndarray, message_index, end, record_index) -> int:
    """Length of `prefix_ids` after checking it is a token prefix of `full_ids`."""
    prefix = np.asarray(prefix_ids, dtype=np.int32)
    if len(prefix) > len(full_ids) or not np.array_equal(prefix, full_ids[: len(prefix)]):
        rendered = (
            f"messages[:{end}] + generation prompt" if end == message_index else f"messages[:{end}]"
        )
        raise ValueError(
            f"{_where(record_index)} message {message_index} (assistant): the chat template breaks "
            f"the prefix property: {rendered} does not tokenize to a prefix of the whole "
            "conversation (the template rewrites earlier turns, or the tokenizer merges across the "
            "turn boundary); use a template with {% generation %} markers"
        )
    return len(prefix)


def rendered_lengths(
    conversations: Sequence[Sequence[Mapping[str, Any]]],
    hf_tokenizer: Any,
    chat_template: str | None = None,
) -> np.ndarray:
    """Token counts `(N,) int64` of whole rendered conversations (already validated), batched.

    Equal to `len(render_with_mask(...)[0])`, at the cost of one render and tokenization each.
    """
    if len(conversations) == 0:
        return np.zeros(0, dtype=np.int64)
    template = resolve_chat_template(hf_tokenizer, chat_template)
    texts = hf_tokenizer.apply_chat_template(
        [list(c) for c in conversations], chat_template=template, tokenize=False
    )
    ids = hf_tokenizer(texts, add_special_tokens=False, return_attention_mask=False)["input_ids"]
    return np.fromiter((len(x) for x in ids), dtype=np.int64, count=len(ids))
