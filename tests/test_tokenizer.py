"""The GGUF-built tokenizer against transformers' reference ids and tokenizer.json."""

import json
import os
from pathlib import Path

import pytest
from tokenizers import Tokenizer as HFTokenizer

from gemma4_jax.errors import GGUFError, InputError
from gemma4_jax.tokenizer import Tokenizer, read_tokenizer_fields

FIXTURES = Path(
    os.environ.get("GEMMA4_JAX_FIXTURES")
    or Path(__file__).resolve().parents[2] / "shared" / "fixtures"
)
TOK_DIR = FIXTURES / "tokenizer"
GGUF_PATH = FIXTURES / "e4b_tiny" / "model.gguf"

pytestmark = pytest.mark.skipif(
    not (TOK_DIR / "tokenization.json").is_file() or not GGUF_PATH.is_file(),
    reason=f"tokenizer fixtures not found under {FIXTURES}",
)


def _cases():
    path = TOK_DIR / "tokenization.json"
    if not path.is_file():
        return []
    return json.loads(path.read_text(encoding="utf-8"))["cases"]


CASES = _cases()
CASE_IDS = [repr(c["text"][:24]) for c in CASES]


@pytest.fixture(scope="module")
def fields():
    return read_tokenizer_fields(GGUF_PATH)


@pytest.fixture(scope="module")
def tok(fields):
    return Tokenizer.from_gguf_fields(fields)


@pytest.fixture(scope="module")
def hf_ref():
    """The `tokenizers` library on transformers' own tokenizer.json: an independent oracle."""
    return HFTokenizer.from_file(str(TOK_DIR / "tokenizer.json"))


# ---------------------------------------------------------------------------- fixture ids
def test_fixture_has_cases():
    assert len(CASES) == 34


@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
def test_encode_matches_transformers(tok, case):
    assert tok.encode(case["text"], add_bos=True) == case["hf_ids"]
    assert tok.encode(case["text"], add_bos=False) == case["hf_ids_no_bos"]
    # The file says add_bos_token = true.
    assert tok.encode(case["text"]) == case["hf_ids"]


@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
def test_decode_matches_transformers(tok, hf_ref, case):
    assert tok.decode(case["hf_ids_no_bos"]) == case["hf_decoded"]
    assert tok.decode(case["hf_ids"]) == "<bos>" + case["hf_decoded"]
    assert tok.decode(case["hf_ids"], skip_special=True) == hf_ref.decode(
        case["hf_ids"], skip_special_tokens=True
    )


@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
def test_stream_matches_decode(tok, case):
    stream = tok.stream()
    pieces = [stream.push(i) for i in case["hf_ids_no_bos"]]
    pieces.append(stream.flush())
    assert "".join(pieces) == case["hf_decoded"]
    assert all("\ufffd" not in p for p in pieces)

    stream = tok.stream(skip_special=True)
    text = stream.extend(case["hf_ids"]) + stream.flush()
    assert text == tok.decode(case["hf_ids"], skip_special=True)


def test_stream_holds_back_partial_utf8(tok):
    # 分 is not in the fixture vocab: it is spelled as three byte-fallback tokens.
    ids = tok.encode("分", add_bos=False)
    assert [tok.id_to_token(i) for i in ids] == ["<0xE5>", "<0x88>", "<0x86>"]
    stream = tok.stream()
    assert [stream.push(i) for i in ids] == ["", "", "分"]
    # A truncated character comes out as U+FFFD only at the end of the stream.
    stream = tok.stream()
    assert stream.push(ids[0]) == "" and stream.push(ids[1]) == ""
    assert stream.flush() == "\ufffd"
    # ...or as soon as a byte proves it invalid.
    stream = tok.stream()
    assert stream.push(ids[0]) == ""
    assert stream.push(tok.token_to_id("a")) == "\ufffda"


# ---------------------------------------------------------------------------- structure
def test_rebuilt_tokenizer_json_equals_transformers(tok):
    ref = json.loads((TOK_DIR / "tokenizer.json").read_text(encoding="utf-8"))
    mine = json.loads(tok.backend.to_str())
    for key in ("normalizer", "pre_tokenizer", "decoder", "post_processor", "added_tokens"):
        assert mine[key] == ref[key], key
    assert mine["model"] == ref["model"]


def test_properties(tok, fields):
    assert (tok.bos_id, tok.eos_id, tok.pad_id, tok.vocab_size) == (2, 1, 0, 1024)
    assert tok.add_bos is True
    assert tok.stop_ids == (1, 6)
    assert tok.token_to_id("<turn|>") == 6
    assert tok.token_to_id("<|channel>") == 8
    assert tok.token_to_id("no such token") is None
    assert tok.id_to_token(2) == "<bos>"
    assert tok.id_to_token(17) == "<0x00>"
    assert tok.chat_template == fields["tokenizer.chat_template"]
    assert tok.chat_template.startswith("{{ bos_token }}")
    # Markers marked USER_DEFINED in the GGUF are still special, as in transformers.
    assert {0, 1, 2, 5, 6, 7, 8, 9, 14} <= tok.special_ids
    assert 17 not in tok.special_ids and 273 not in tok.special_ids


def test_from_gguf_equals_from_fields(tok):
    other = Tokenizer.from_gguf(GGUF_PATH)
    text = "<|turn>user\nCafé 東京 🙂<turn|>"
    assert other.encode(text) == tok.encode(text)
    assert other.stop_ids == tok.stop_ids


def test_read_fields_decodes_string_arrays(fields):
    tokens = fields["tokenizer.ggml.tokens"]
    assert isinstance(tokens, list) and all(isinstance(t, str) for t in tokens)
    assert tokens[14] == '<|"|>'
    assert fields["tokenizer.ggml.merges"][0] == "\u2581 \u2581"
    assert fields["tokenizer.ggml.add_bos_token"] is True
    assert fields["tokenizer.ggml.model"] == "gemma4"


def test_add_space_prefix(fields):
    tok = Tokenizer.from_gguf_fields({**fields, "tokenizer.ggml.add_space_prefix": True})
    plain = Tokenizer.from_gguf_fields(fields)
    assert tok.encode("the world", add_bos=False) == plain.encode(" the world", add_bos=False)
    ids = tok.encode("the world", add_bos=False)
    assert tok.decode(ids) == "the world"
    stream = tok.stream()
    assert stream.extend(ids) + stream.flush() == "the world"


def test_add_bos_false_in_file(fields):
    tok = Tokenizer.from_gguf_fields({**fields, "tokenizer.ggml.add_bos_token": False})
    assert tok.encode("Hello") == [315, 532, 944]
    assert tok.encode("Hello", add_bos=True) == [2, 315, 532, 944]


def test_eot_joins_stop_ids(fields):
    tok = Tokenizer.from_gguf_fields({**fields, "tokenizer.ggml.eot_token_id": 5})
    assert tok.stop_ids == (1, 5, 6)


# ---------------------------------------------------------------------------- errors
@pytest.mark.parametrize(
    "key",
    ["tokenizer.ggml.model", "tokenizer.ggml.tokens", "tokenizer.ggml.token_type",
     "tokenizer.ggml.merges"],
)  # fmt: skip
def test_missing_key_is_named(fields, key):
    broken = {k: v for k, v in fields.items() if k != key}
    with pytest.raises(GGUFError, match=key.replace(".", r"\.")):
        Tokenizer.from_gguf_fields(broken)


@pytest.mark.parametrize(
    ("patch", "key"),
    [
        ({"tokenizer.ggml.model": "gpt2"}, "tokenizer.ggml.model"),
        ({"tokenizer.ggml.model": "t5"}, "tokenizer.ggml.model"),
        ({"tokenizer.ggml.token_type": [1] * 10}, "tokenizer.ggml.token_type"),
        ({"tokenizer.ggml.merges": ["a b c"]}, "tokenizer.ggml.merges"),
        ({"tokenizer.ggml.merges": ["zz qq"]}, "tokenizer.ggml.merges"),
        ({"tokenizer.ggml.tokens": []}, "tokenizer.ggml.tokens"),
        ({"tokenizer.ggml.tokens": "abc"}, "tokenizer.ggml.tokens"),
        ({"tokenizer.ggml.bos_token_id": 5000}, "tokenizer.ggml.bos_token_id"),
        ({"tokenizer.ggml.eos_token_id": "1"}, "tokenizer.ggml.eos_token_id"),
        ({"tokenizer.ggml.add_bos_token": 1}, "tokenizer.ggml.add_bos_token"),
    ],
)
def test_bad_metadata_is_named(fields, patch, key):
    with pytest.raises(GGUFError, match=key.replace(".", r"\.")):
        Tokenizer.from_gguf_fields({**fields, **patch})


def test_duplicate_token_is_rejected(fields):
    tokens = list(fields["tokenizer.ggml.tokens"])
    tokens[500] = tokens[400]
    with pytest.raises(GGUFError, match="twice"):
        Tokenizer.from_gguf_fields({**fields, "tokenizer.ggml.tokens": tokens})


def test_not_a_gguf(tmp_path):
    path = tmp_path / "bad.gguf"
    path.write_bytes(b"not a gguf file at all" * 4)
    with pytest.raises(GGUFError, match="bad.gguf"):
        Tokenizer.from_gguf(path)


def test_out_of_vocab_ids(tok):
    with pytest.raises(InputError, match="1024"):
        tok.decode([1, 1024])
    with pytest.raises(InputError):
        tok.decode([-1])
    with pytest.raises(InputError):
        tok.stream().push(4096)
