"""Chat template rendering (against transformers' Jinja settings), thinking split, Conversation."""

import json
import os
from pathlib import Path

import jinja2
import jinja2.ext
import pytest
from jinja2.sandbox import ImmutableSandboxedEnvironment

from gemma4_jax.chat import Conversation, PromptUpdate, render_chat, split_thinking
from gemma4_jax.errors import InputError

FIXTURES = Path(
    os.environ.get("GEMMA4_JAX_FIXTURES")
    or Path(__file__).resolve().parents[2] / "shared" / "fixtures"
)
GGUF_PATH = FIXTURES / "e4b_tiny" / "model.gguf"
needs_fixtures = pytest.mark.skipif(
    not GGUF_PATH.is_file(), reason=f"fixture GGUF not found under {FIXTURES}"
)


# ---------------------------------------------------------------------------- oracle
def hf_render(template, messages, *, add_generation_prompt, **kwargs):
    """What transformers' `apply_chat_template(tokenize=False)` does, written out independently:
    its sandbox, options, `tojson` and `raise_exception`, and the Gemma tokenizer's
    special-token map passed as variables."""

    def raise_exception(message):
        raise jinja2.exceptions.TemplateError(message)

    def tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
        return json.dumps(
            x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys
        )

    env = ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True, extensions=[jinja2.ext.loopcontrols]
    )
    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    special = {
        "bos_token": "<bos>",
        "eos_token": "<eos>",
        "unk_token": "<unk>",
        "pad_token": "<pad>",
        "mask_token": "<mask>",
    }
    return env.from_string(template).render(
        messages=messages,
        tools=kwargs.pop("tools", None),
        documents=kwargs.pop("documents", None),
        add_generation_prompt=add_generation_prompt,
        **special,
        **kwargs,
    )


# A template in the style of Gemma 4's: a system turn that also carries `<|think|>` and tools,
# thinking stripped from past model turns, an empty thought channel pre-filled when thinking is
# off, multi-line blocks that only render right with trim_blocks/lstrip_blocks, loop controls.
GEMMA4_STYLE = """{{ bos_token }}{% if enable_thinking or tools or messages[0].role == 'system' %}
<|turn>system
{% if enable_thinking %}
<|think|>
{% endif %}
{% if messages[0]['role'] == 'system' %}
{{ messages[0]['content'] | trim }}
{% set loop_messages = messages[1:] %}
{% else %}
{% set loop_messages = messages %}
{% endif %}
{% for tool in tools or [] %}
{{ tool | tojson }}
{% endfor %}
<turn|>
{% else %}
{% set loop_messages = messages %}
{% endif %}
{% for message in loop_messages %}
    {% if message['role'] == 'system' %}
        {{ raise_exception('A system message must come first') }}
    {% endif %}
    {% if message['content'] == '<skip>' %}{% continue %}{% endif %}
    {% set role = 'model' if message['role'] in ['assistant', 'model'] else message['role'] %}
<|turn>{{ role }}
{% if role == 'model' and '<channel|>' in message['content'] %}
{{ message['content'].split('<channel|>')[-1] | trim }}<turn|>
{% else %}
{{ message['content'] | trim }}<turn|>
{% endif %}
{% endfor %}
{% if add_generation_prompt %}
<|turn>model
{% if not enable_thinking %}<|channel>thought
<channel|>{% endif %}
{% endif %}"""

TOOLS = [
    {
        "type": "function",
        "function": {
            "name": "get_weather",
            "description": "Weather <now> & 'later' in a city: Zürich, 東京",
            "parameters": {"type": "object", "properties": {"city": {"type": "string"}}},
        },
    }
]

CONVERSATIONS = [
    [{"role": "user", "content": "Hello"}],
    [{"role": "system", "content": "  Be brief.\n"}, {"role": "user", "content": "Hi\n"}],
    [
        {"role": "user", "content": "What is 2+2?"},
        {"role": "assistant", "content": "<|channel>thought\nadd them<channel|>4"},
        {"role": "user", "content": "<skip>"},
        {"role": "user", "content": "And 3+3?"},
    ],
    [
        {"role": "system", "content": "sys"},
        {"role": "user", "content": "Café 🙂 <b>bold</b>"},
        {"role": "model", "content": " Hi there! "},
        {"role": "user", "content": "Again"},
    ],
]


@pytest.fixture(scope="module")
def fixture_template():
    if not GGUF_PATH.is_file():
        pytest.skip(f"fixture GGUF not found under {FIXTURES}")
    from gemma4_jax.tokenizer import read_tokenizer_fields

    return read_tokenizer_fields(GGUF_PATH)["tokenizer.chat_template"]


@pytest.fixture(scope="module")
def tok():
    if not GGUF_PATH.is_file():
        pytest.skip(f"fixture GGUF not found under {FIXTURES}")
    from gemma4_jax.tokenizer import Tokenizer

    return Tokenizer.from_gguf(GGUF_PATH)


# ---------------------------------------------------------------------------- rendering
@pytest.mark.parametrize("messages", CONVERSATIONS)
@pytest.mark.parametrize("add_generation_prompt", [True, False])
@pytest.mark.parametrize("enable_thinking", [False, True])
@pytest.mark.parametrize("tools", [None, TOOLS])
def test_gemma4_style_matches_transformers(messages, add_generation_prompt, enable_thinking, tools):
    got = render_chat(
        GEMMA4_STYLE,
        messages,
        add_generation_prompt=add_generation_prompt,
        enable_thinking=enable_thinking,
        tools=tools,
    )
    want = hf_render(
        GEMMA4_STYLE,
        messages,
        add_generation_prompt=add_generation_prompt,
        enable_thinking=enable_thinking,
        tools=tools,
    )
    assert got == want


def test_gemma4_style_by_hand():
    messages = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "What is 2+2?"},
        {"role": "assistant", "content": "<|channel>thought\nadd them<channel|>4"},
        {"role": "user", "content": "And 3+3?"},
    ]
    assert render_chat(GEMMA4_STYLE, messages, enable_thinking=True, tools=TOOLS) == (
        "<bos><|turn>system\n<|think|>\nBe brief.\n"
        + json.dumps(TOOLS[0], ensure_ascii=False)
        + "\n<turn|>\n<|turn>user\nWhat is 2+2?<turn|>\n<|turn>model\n4<turn|>\n"
        "<|turn>user\nAnd 3+3?<turn|>\n<|turn>model\n"
    )
    assert render_chat(GEMMA4_STYLE, messages[1:2]) == (
        "<bos><|turn>user\nWhat is 2+2?<turn|>\n<|turn>model\n<|channel>thought\n<channel|>"
    )
    # tojson keeps `<`, `&`, `'` and non-ASCII as they are (Jinja's own filter escapes them).
    assert "Weather <now> & 'later' in a city: Zürich, 東京" in render_chat(
        GEMMA4_STYLE, messages, tools=TOOLS
    )


@needs_fixtures
@pytest.mark.parametrize("messages", CONVERSATIONS)
@pytest.mark.parametrize("add_generation_prompt", [True, False])
def test_fixture_template_matches_transformers(fixture_template, messages, add_generation_prompt):
    kw = {"add_generation_prompt": add_generation_prompt, "enable_thinking": False}
    assert render_chat(fixture_template, messages, **kw) == hf_render(
        fixture_template, messages, **kw
    )


@needs_fixtures
def test_fixture_template_by_hand(fixture_template):
    config = json.loads((FIXTURES / "tokenizer" / "tokenizer_config.json").read_text())
    assert fixture_template == config["chat_template"]

    assert render_chat(fixture_template, [{"role": "user", "content": "Hello"}]) == (
        "<bos><|turn>user\nHello<turn|>\n<|turn>model\n"
    )
    messages = [
        {"role": "system", "content": "  You are terse.\n"},
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hello!\n"},
        {"role": "user", "content": "Bye"},
    ]
    want = (
        "<bos><|turn>system\nYou are terse.<turn|>\n<|turn>user\nHi<turn|>\n"
        "<|turn>model\nHello!<turn|>\n<|turn>user\nBye<turn|>\n"
    )
    assert render_chat(fixture_template, messages, add_generation_prompt=False) == want
    assert render_chat(fixture_template, messages) == want + "<|turn>model\n"
    # `model` and `assistant` are the same role; the fixture template ignores enable_thinking.
    as_model = [dict(m, role="model") if m["role"] == "assistant" else m for m in messages]
    assert render_chat(fixture_template, as_model, enable_thinking=True) == want + (
        "<|turn>model\n"
    )


@needs_fixtures
def test_fixture_prompt_tokenizes_to_turn_markers(fixture_template, tok):
    text = render_chat(fixture_template, [{"role": "user", "content": "Hello there"}])
    # The case "<|turn>user\nHello there<turn|>\n<|turn>model\n" of tokenization.json.
    want = [2, 5, 360, 639, 274, 315, 532, 944, 481, 773, 6, 274, 5, 352, 354, 495, 351, 274]
    assert tok.encode(text, add_bos=False) == want


def test_generation_block_renders_body():
    template = (
        "{% for m in messages %}[{% generation %}{{ m['content'] }}{% endgeneration %}]{% endfor %}"
    )
    assert render_chat(template, [{"role": "user", "content": "a"}]) == "[a]"


def test_extra_variables_and_strftime():
    template = "{{ greeting }} {{ pad_token }} {{ strftime_now('%Y') | length }}"
    assert render_chat(template, [], greeting="hi", pad_token="<pad>") == "hi <pad> 4"


def test_raise_exception_and_sandbox():
    bad = [{"role": "user", "content": "x"}, {"role": "system", "content": "late"}]
    with pytest.raises(jinja2.exceptions.TemplateError, match="must come first"):
        render_chat(GEMMA4_STYLE, bad)
    # The environment is immutable: a template cannot edit the caller's messages.
    with pytest.raises(jinja2.exceptions.SecurityError):
        render_chat("{{ messages.append(1) }}", [{"role": "user", "content": "x"}])


def test_bad_messages():
    with pytest.raises(InputError, match="role"):
        render_chat("x", [{"role": "robot", "content": "x"}])
    with pytest.raises(InputError, match=r"messages\[0\]"):
        render_chat("x", [{"content": "no role"}])
    with pytest.raises(InputError, match="chat template"):
        render_chat(None, [{"role": "user", "content": "x"}])


# ---------------------------------------------------------------------------- thinking
@pytest.mark.parametrize(
    ("text", "want"),
    [
        ("<|channel>thought\nLet me add.\n<channel|>The answer is 4.",
         ("Let me add.", "The answer is 4.")),
        ("<|channel>thought\n<channel|>\n4", ("", "4")),
        ("Pre <|channel>thought\nA<channel|> mid <|channel>thought\nB<channel|> end",
         ("A\n\nB", "Pre  mid  end")),
        ("<|channel>thought\nstill thinking", ("still thinking", "")),
        ("<|channel>thought", ("", "")),
        ("reasoning pre-filled by the prompt<channel|>answer",
         ("reasoning pre-filled by the prompt", "answer")),
        ("plain answer", (None, "plain answer")),
        ("", (None, "")),
        ("<|channel>final\nsomething<channel|>x", (None, "<|channel>final\nsomething<channel|>x")),
        ("<|channel>thoughtful words", (None, "<|channel>thoughtful words")),
        ("<think>other formats</think>text", (None, "<think>other formats</think>text")),
    ],
)  # fmt: skip
def test_split_thinking(text, want):
    assert split_thinking(text) == want


@needs_fixtures
def test_split_thinking_after_decode(tok):
    ids = tok.encode("<|channel>thought\nreasoning<channel|>answer", add_bos=False)
    assert ids[0] == tok.token_to_id("<|channel>")
    assert split_thinking(tok.decode(ids)) == ("reasoning", "answer")


# ---------------------------------------------------------------------------- conversation
@needs_fixtures
def test_conversation_incremental(tok):
    conv = Conversation.from_tokenizer(tok, system="Be terse.")
    conv.add_user("Hi")
    first = conv.next_prompt()
    assert first == PromptUpdate(
        "<bos><|turn>system\nBe terse.<turn|>\n<|turn>user\nHi<turn|>\n<|turn>model\n", False
    )
    conv.add_model("Hello!<turn|>", fed=True)  # the engine fed its stop token back
    conv.add_user("More")
    second = conv.next_prompt()
    assert second == PromptUpdate("\n<|turn>user\nMore<turn|>\n<|turn>model\n", False)
    full = conv.render()
    assert full == first.text + "Hello!<turn|>" + second.text
    # Feeding the pieces separately gives the same ids as the whole prompt.
    pieces = [first.text, "Hello!<turn|>", second.text]
    assert sum((tok.encode(p, add_bos=False) for p in pieces), []) == tok.encode(
        full, add_bos=False
    )
    assert [m["role"] for m in conv.messages] == ["system", "user", "model", "user"]


@needs_fixtures
def test_conversation_reset_when_history_changes(tok):
    reply = "<|channel>thought\nhmm<channel|>Sure."
    conv = Conversation.from_tokenizer(tok)
    conv.add_user("Q1")
    conv.next_prompt()
    conv.add_model(reply, fed=True)  # thinking is dropped from the history...
    conv.add_user("Q2")
    update = conv.next_prompt()  # ...so the cached text no longer prefixes the prompt
    assert update.reset and update.text == conv.render()
    assert conv.messages[1]["content"] == "Sure."

    conv = Conversation.from_tokenizer(tok)
    conv.add_user("Q1")
    first = conv.next_prompt()
    conv.add_model(reply, fed=True, keep_thinking=True)
    conv.add_user("Q2")
    update = conv.next_prompt()
    assert not update.reset
    assert conv.render() == first.text + reply + update.text


def test_conversation_without_fed_reply_sends_it():
    conv = Conversation("{% for m in messages %}[{{ m['role'] }}:{{ m['content'] }}]{% endfor %}")
    conv.add_user("a")
    assert conv.next_prompt() == ("[user:a]", False)
    conv.add_model("b")  # not fed: the engine must receive it in the next prompt
    conv.add_user("c")
    assert conv.next_prompt() == ("[model:b][user:c]", False)
    conv.reset_cache()
    assert conv.next_prompt() == ("[user:a][model:b][user:c]", False)
    with pytest.raises(InputError):
        conv.add("robot", "x")
    with pytest.raises(InputError):
        Conversation(None)
