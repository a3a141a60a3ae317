"""Chat rendering and assistant-only loss masks: markers vs prefixes, hand-computed layouts."""

import jinja2
import numpy as np
import pytest
from tokenizers import AddedToken, Regex, Tokenizer, pre_tokenizers
from tokenizers.models import WordLevel
from transformers import PreTrainedTokenizerFast

from wf_data.data.text.chat import (
    VALID_ROLES,
    has_generation_markers,
    render_many_with_masks,
    render_with_mask,
    rendered_lengths,
    to_messages,
    validate_messages,
)

SPECIALS = [
    "<|im_start|>",
    "<|im_end|>",
    "<|begin_of_text|>",
    "<|start_header_id|>",
    "<|end_header_id|>",
    "<|eot_id|>",
]
WORDS = [
    "system",
    "user",
    "assistant",
    "tool",
    "be",
    "brief",
    "hi",
    "there",
    "hello",
    "you",
    "how",
    "are",
    "fine",
    "thanks",
    "ok",
    "42",
    "call",
    "result",
]

CHATML_MARKERS = (
    "{% for m in messages %}"
    "{{ '<|im_start|>' + m['role'] + '\n' }}"
    "{% if m['role'] == 'assistant' %}"
    "{% generation %}{{ m['content'] + '<|im_end|>\n' }}{% endgeneration %}"
    "{% else %}{{ m['content'] + '<|im_end|>\n' }}{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
CHATML_PLAIN = CHATML_MARKERS.replace("{% generation %}", "").replace("{% endgeneration %}", "")

# Meta's Llama-3 template (no markers), and the same layout with markers around the answer.
LLAMA3_PLAIN = (
    "{% for message in messages %}"
    "{% set content = '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n'"
    " + message['content'] | trim + '<|eot_id|>' %}"
    "{% if loop.index0 == 0 %}{% set content = bos_token + content %}{% endif %}"
    "{{ content }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}"
    "{% endif %}"
)
LLAMA3_MARKERS = (
    "{{ bos_token }}{% for message in messages %}"
    "{{ '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n' }}"
    "{% if message['role'] == 'assistant' %}"
    "{% generation %}{{ message['content'] | trim + '<|eot_id|>' }}{% endgeneration %}"
    "{% else %}{{ message['content'] | trim + '<|eot_id|>' }}{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}"
    "{% endif %}"
)

CONVERSATION = [
    {"role": "system", "content": "be brief"},
    {"role": "user", "content": "hi there"},
    {"role": "assistant", "content": "hello you"},
    {"role": "user", "content": "how are you?"},
    {"role": "assistant", "content": "fine, thanks!"},
]

# (mask, tokens) spans written out by hand from the template layouts.
CHATML_LAYOUT = [
    (0, ["<|im_start|>", "system", "\n", "be", " ", "brief", "<|im_end|>", "\n"]),
    (0, ["<|im_start|>", "user", "\n", "hi", " ", "there", "<|im_end|>", "\n"]),
    (0, ["<|im_start|>", "assistant", "\n"]),
    (1, ["hello", " ", "you", "<|im_end|>", "\n"]),
    (0, ["<|im_start|>", "user", "\n", "how", " ", "are", " ", "you", "?", "<|im_end|>", "\n"]),
    (0, ["<|im_start|>", "assistant", "\n"]),
    (1, ["fine", ",", " ", "thanks", "!", "<|im_end|>", "\n"]),
]
LLAMA3_LAYOUT = [
    (0, ["<|begin_of_text|>"]),
    (0, ["<|start_header_id|>", "system", "<|end_header_id|>", "\n", "\n"]),
    (0, ["be", " ", "brief", "<|eot_id|>"]),
    (0, ["<|start_header_id|>", "user", "<|end_header_id|>", "\n", "\n"]),
    (0, ["hi", " ", "there", "<|eot_id|>"]),
    (0, ["<|start_header_id|>", "assistant", "<|end_header_id|>", "\n", "\n"]),
    (1, ["hello", " ", "you", "<|eot_id|>"]),
    (0, ["<|start_header_id|>", "user", "<|end_header_id|>", "\n", "\n"]),
    (0, ["how", " ", "are", " ", "you", "?", "<|eot_id|>"]),
    (0, ["<|start_header_id|>", "assistant", "<|end_header_id|>", "\n", "\n"]),
    (1, ["fine", ",", " ", "thanks", "!", "<|eot_id|>"]),
]


def make_word_tokenizer(chat_template=None):
    """A WordLevel tokenizer: whitespace and punctuation are tokens of their own."""
    punctuation = list("?!,.")
    vocab = {t: i for i, t in enumerate(["[UNK]", *SPECIALS, " ", "\n", *punctuation, *WORDS])}
    backend = Tokenizer(WordLevel(vocab, unk_token="[UNK]"))
    backend.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Split(Regex(r"\s"), "isolated"), pre_tokenizers.Punctuation("isolated")]
    )
    backend.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in SPECIALS])
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        unk_token="[UNK]",
        bos_token="<|begin_of_text|>",
        eos_token="<|im_end|>",
        pad_token="[UNK]",
    )
    tokenizer.chat_template = chat_template
    return tokenizer


def expected_from_layout(tokenizer, layout):
    tokens = [tok for _, span in layout for tok in span]
    mask = [flag for flag, span in layout for _ in span]
    ids = tokenizer.convert_tokens_to_ids(tokens)
    assert tokenizer.unk_token_id not in ids, "layout uses a word missing from the test vocab"
    return np.asarray(ids, np.int32), np.asarray(mask, np.uint8)


@pytest.mark.parametrize(
    "template, layout",
    [
        pytest.param(CHATML_MARKERS, CHATML_LAYOUT, id="chatml-markers"),
        pytest.param(CHATML_PLAIN, CHATML_LAYOUT, id="chatml-prefixes"),
        pytest.param(LLAMA3_PLAIN, LLAMA3_LAYOUT, id="llama3-prefixes"),
        pytest.param(LLAMA3_MARKERS, LLAMA3_LAYOUT, id="llama3-markers"),
    ],
)
def test_masks_match_hand_computed_layout(template, layout):
    tokenizer = make_word_tokenizer()
    input_ids, loss_mask = render_with_mask(CONVERSATION, tokenizer, chat_template=template)
    want_ids, want_mask = expected_from_layout(tokenizer, layout)
    assert input_ids.dtype == np.int32 and loss_mask.dtype == np.uint8
    np.testing.assert_array_equal(input_ids, want_ids)
    np.testing.assert_array_equal(loss_mask, want_mask)


def test_template_from_tokenizer_and_both_methods_agree():
    marked = make_word_tokenizer(CHATML_MARKERS)
    plain = make_word_tokenizer(CHATML_PLAIN)
    assert has_generation_markers(CHATML_MARKERS) and not has_generation_markers(CHATML_PLAIN)
    conversations = [
        CONVERSATION,
        CONVERSATION[1:3],
        CONVERSATION[1:4],  # ends with a user turn: no loss after the last answer
        [{"role": "assistant", "content": "ok"}],  # answer with no prompt at all
        CONVERSATION[:2],  # no assistant turn: an all-zero mask
    ]
    for messages in conversations:
        ids_a, mask_a = render_with_mask(messages, marked)
        ids_b, mask_b = render_with_mask(messages, plain)
        np.testing.assert_array_equal(ids_a, ids_b)
        np.testing.assert_array_equal(mask_a, mask_b)
    _, mask = render_with_mask(CONVERSATION[1:4], plain)
    ids, _ = render_with_mask(CONVERSATION[1:3], plain)
    assert mask.sum() == 5 and mask[len(ids) :].sum() == 0
    assert render_with_mask(CONVERSATION[:2], plain)[1].sum() == 0


@pytest.mark.parametrize("template", [CHATML_MARKERS, CHATML_PLAIN], ids=["markers", "prefixes"])
def test_render_many_equals_one_by_one(template):
    tokenizer = make_word_tokenizer(template)
    conversations = [CONVERSATION, CONVERSATION[1:3], CONVERSATION[:2], CONVERSATION[1:4]]
    many = render_many_with_masks(conversations, tokenizer)
    for (ids, mask), messages in zip(many, conversations, strict=True):
        want_ids, want_mask = render_with_mask(messages, tokenizer)
        np.testing.assert_array_equal(ids, want_ids)
        np.testing.assert_array_equal(mask, want_mask)
    bad = [CONVERSATION, [{"role": "robot", "content": "x"}]]
    with pytest.raises(ValueError, match="record 11 message 0: unknown role"):
        render_many_with_masks(bad, tokenizer, record_indices=[10, 11])


def test_rendered_lengths_match_render_with_mask():
    tokenizer = make_word_tokenizer(CHATML_PLAIN)
    conversations = [CONVERSATION, CONVERSATION[1:3], CONVERSATION[:2]]
    lengths = rendered_lengths(conversations, tokenizer)
    assert lengths.dtype == np.int64
    assert lengths.tolist() == [len(render_with_mask(c, tokenizer)[0]) for c in conversations]
    assert rendered_lengths([], tokenizer).shape == (0,)


# The template shipped before: ChatML with {% generation %} markers, which plain Jinja (and so
# torchtitan) cannot parse. The shipped one now gives the same masks through prefixes.
SHIPPED_WITH_MARKERS = (
    "{%- for message in messages %}{%- if message['role'] == 'assistant' %}"
    "{{- '<|im_start|>assistant\n' }}{% generation %}{{- message['content'] + '<|im_end|>' }}"
    "{% endgeneration %}{{- '\n' }}{%- else %}{{- '<|im_start|>' + message['role'] + '\n' + "
    "message['content'] + '<|im_end|>\n' }}{%- endif %}{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\n' }}{%- endif %}"
)
SHIPPED_MESSAGES = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "Hello there, how are you?"},
    {"role": "assistant", "content": "Fine, thanks!"},
    {"role": "user", "content": "Bye."},
    {"role": "assistant", "content": "Goodbye."},
]


def test_shipped_tokenizer_template():
    from wf_data.data.text.tokenization import TokenizerWrapper

    hf_tokenizer = TokenizerWrapper.from_pretrained(None).hf_tokenizer
    template = hf_tokenizer.chat_template
    assert not has_generation_markers(template)
    with pytest.raises(jinja2.TemplateSyntaxError, match="generation"):
        jinja2.Environment().parse(SHIPPED_WITH_MARKERS)
    plain_jinja = jinja2.Environment().from_string(template)  # what torchtitan does
    for prompt in (False, True):
        assert plain_jinja.render(messages=SHIPPED_MESSAGES, add_generation_prompt=prompt) == (
            hf_tokenizer.apply_chat_template(
                SHIPPED_MESSAGES, tokenize=False, add_generation_prompt=prompt
            )
        )
    # Trained: "answer<|im_end|>"; not trained: the "\n" between turns.
    layout = [
        ("<|im_start|>system\nBe brief.<|im_end|>\n", 0),
        ("<|im_start|>user\nHello there, how are you?<|im_end|>\n", 0),
        ("<|im_start|>assistant\n", 0),
        ("Fine, thanks!<|im_end|>", 1),
        ("\n", 0),
        ("<|im_start|>user\nBye.<|im_end|>\n", 0),
        ("<|im_start|>assistant\n", 0),
        ("Goodbye.<|im_end|>", 1),
    ]
    pieces = [hf_tokenizer.encode(text, add_special_tokens=False) for text, _ in layout]
    want_ids = np.concatenate([np.asarray(p, np.int32) for p in pieces])
    want_mask = np.concatenate(
        [np.full(len(p), flag, np.uint8) for p, (_, flag) in zip(pieces, layout, strict=True)]
    )
    ids, mask = render_with_mask(SHIPPED_MESSAGES, hf_tokenizer)
    np.testing.assert_array_equal(ids, want_ids)
    np.testing.assert_array_equal(mask, want_mask)
    # The same tokens and masks as the markers template, whose only extra is a final "\n".
    marked_ids, marked_mask = render_with_mask(
        SHIPPED_MESSAGES, hf_tokenizer, chat_template=SHIPPED_WITH_MARKERS
    )
    np.testing.assert_array_equal(marked_ids, [*want_ids, *hf_tokenizer.encode("\n")])
    np.testing.assert_array_equal(marked_mask, [*want_mask, 0])


@pytest.mark.parametrize(
    "payload",
    [
        "{{ ''.__class__.__mro__[1].__subclasses__() }}",
        "{{ raise_exception.__globals__['os'].system('touch {marker}') }}",
        "{{ messages.append({'role': 'user', 'content': 'x'}) }}",  # immutable: no mutation either
    ],
    ids=["mro", "os", "mutate"],
)
def test_templates_render_in_an_immutable_sandbox(payload, tmp_path):
    marker = tmp_path / "escaped"
    evil = payload.replace("{marker}", str(marker)) + CHATML_PLAIN
    for method_template in (
        evil,
        evil.replace("{% for m in", "{% generation %}{% endgeneration %}{% for m in"),
    ):
        with pytest.raises(jinja2.exceptions.SecurityError, match="unsafe|not safely"):
            render_with_mask(CONVERSATION, make_word_tokenizer(), chat_template=method_template)
    assert not marker.exists()


def test_template_breaking_prefix_property_names_message():
    # Earlier answers are rendered shortened (as some "thinking" templates do): the prefix
    # method cannot find the answer's tokens, and must say so rather than guess.
    rewriting = CHATML_PLAIN.replace(
        "{{ m['content'] + '<|im_end|>\n' }}{% else %}",
        "{{ (m['content'] if loop.last else 'ok') + '<|im_end|>\n' }}{% else %}",
    )
    assert rewriting != CHATML_PLAIN
    tokenizer = make_word_tokenizer(rewriting)
    render_with_mask(CONVERSATION[:3], tokenizer)  # one answer: fine
    with pytest.raises(ValueError, match=r"message 2 \(assistant\).*prefix property"):
        render_with_mask(CONVERSATION, tokenizer, record_index=7)
    with pytest.raises(ValueError, match=r"record 7 message 2"):
        render_with_mask(CONVERSATION, tokenizer, record_index=7)


def test_markers_that_mark_nothing_are_an_error():
    broken = CHATML_MARKERS.replace(
        "{% if m['role'] == 'assistant' %}", "{% if m['role'] == 'nobody' %}"
    )
    with pytest.raises(ValueError, match="generation"):
        render_with_mask(CONVERSATION, make_word_tokenizer(broken))


def test_missing_chat_template_is_an_error():
    with pytest.raises(ValueError, match="no chat template"):
        render_with_mask(CONVERSATION, make_word_tokenizer(None))


def test_tool_role_is_rendered_without_loss():
    messages = [
        {"role": "user", "content": "call"},
        {"role": "assistant", "content": "call"},
        {"role": "tool", "content": "42"},
        {"role": "assistant", "content": "result 42"},
    ]
    tokenizer = make_word_tokenizer(CHATML_PLAIN)
    ids, mask = render_with_mask(messages, tokenizer)
    tokens = tokenizer.convert_ids_to_tokens(ids.tolist())
    trained = [t for t, m in zip(tokens, mask, strict=True) if m]
    assert trained == ["call", "<|im_end|>", "\n", "result", " ", "42", "<|im_end|>", "\n"]


# --------------------------------------------------------------------------- record validation


def test_missing_messages_names_record_and_keys():
    with pytest.raises(ValueError, match=r"record 3: no 'messages' field.*\['prompt', 'text'\]"):
        to_messages({"text": "hi", "prompt": "x"}, record_index=3)


def test_unknown_role_lists_valid_roles():
    with pytest.raises(
        ValueError, match=r"record 5 message 1: unknown role 'human'.*" + ", ".join(VALID_ROLES)
    ):
        to_messages(
            {"messages": [{"role": "user", "content": "a"}, {"role": "human", "content": "b"}]},
            record_index=5,
        )


@pytest.mark.parametrize(
    "record, error, pattern",
    [
        ("plain text", TypeError, r"record 0: expected a chat record.*got str.*text record"),
        (np.arange(4), TypeError, r"got ndarray.*token record"),
        ({"messages": "hi"}, TypeError, r"chat messages must be a list"),
        ({"messages": []}, ValueError, r"'messages' is empty"),
        ({"messages": ["hi"]}, TypeError, r"message 0: expected a dict"),
        ({"messages": [{"role": "user"}]}, TypeError, r"message 0 \(role 'user'\).*content"),
        ({"messages": [{"role": "user", "content": 3}]}, TypeError, r"got int"),
    ],
)
def test_bad_records_are_clear_errors(record, error, pattern):
    with pytest.raises(error, match=pattern):
        to_messages(record, record_index=0)


def test_nemotron_records_to_messages():
    assert to_messages({"input": "hi", "output": "hello", "system_prompt": "be brief"}) == [
        {"role": "system", "content": "be brief"},
        {"role": "user", "content": "hi"},
        {"role": "assistant", "content": "hello"},
    ]
    # Empty system prompt: no system turn; list input: the conversation so far.
    history = [
        {"role": "user", "content": "hi"},
        {"role": "assistant", "content": "hello"},
        {"role": "user", "content": "how are you"},
    ]
    assert to_messages({"input": history, "output": "fine", "system_prompt": ""}) == [
        *history,
        {"role": "assistant", "content": "fine"},
    ]
    assert to_messages({"q": "a", "a": "b"}, input_key="q", output_key="a")[1] == {
        "role": "assistant",
        "content": "b",
    }
    with pytest.raises(TypeError, match="'output' must be str"):
        to_messages({"input": "hi", "output": None})
    # A record with `messages` wins over the columns.
    assert to_messages({"messages": history, "input": "x", "output": "y"}) == history


def test_validate_messages_keeps_extra_keys():
    messages = [{"role": "assistant", "content": "", "tool_calls": [{"name": "f"}]}]
    assert validate_messages(messages) == messages
