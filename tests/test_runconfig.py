"""Run configs: presets load, every mistake is a ConfigError that says what is wrong."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from gemma4_jax.errors import ConfigError
from gemma4_jax.runconfig import (
    BucketRule,
    Message,
    RunConfig,
    SamplerConfig,
    load_run_config,
    parse_override,
    run_config_from_dict,
    split_prompts,
)

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
PRESETS = sorted(CONFIGS.glob("*.yaml"))
TINY = CONFIGS / "tiny.yaml"


def test_the_expected_presets_exist():
    names = {p.stem for p in PRESETS}
    assert {"tiny", "e2b", "e4b", "31b", "26b-a4b", "sampling"} <= names


@pytest.mark.parametrize("path", PRESETS, ids=lambda p: p.name)
def test_every_preset_loads(path):
    cfg = load_run_config(path)
    assert isinstance(cfg, RunConfig)
    sizes = cfg.bucket_sizes()
    assert list(sizes) == sorted(set(sizes)) and sizes[-1] <= cfg.max_len
    assert cfg.max_new_tokens < cfg.max_len
    assert cfg.prompts is not None and cfg.load_prompts()
    if not cfg.is_builtin:
        assert Path(cfg.model).is_absolute() and cfg.model.endswith(".gguf")
        assert cfg.dtype == "bfloat16"
    # to_dict is plain data that validates back to the same config
    d = cfg.to_dict()
    assert json.loads(json.dumps(d)) == d
    assert run_config_from_dict(d) == cfg


def test_tiny_preset():
    cfg = load_run_config(TINY)
    assert cfg.model == "builtin:tiny" and cfg.dtype == "float32"
    assert cfg.sampler == SamplerConfig(kind="greedy")
    assert cfg.output is None and cfg.stop_tokens is None
    assert cfg.prefill_buckets == BucketRule(min=16, max=None)
    assert cfg.bucket_sizes() == (16, 32, 64, 128, 256)
    convs = cfg.conversations()
    assert len(convs) == len(cfg.load_prompts()) == 2
    assert convs[0] == [{"role": "user", "content": cfg.load_prompts()[0]}]


def test_sampling_preset_reads_its_prompt_file():
    cfg = load_run_config(CONFIGS / "sampling.yaml")
    assert cfg.prompts.file == CONFIGS / "prompts.txt"
    prompts = cfg.load_prompts()
    assert len(prompts) == 4 and "\n" in prompts[2]  # a multi-line block stays one prompt
    assert cfg.sampler.kind == "min_p"


# ---------------------------------------------------------------------------------------------
# Unknown keys


@pytest.mark.parametrize(
    "data, key, allowed",
    [
        ({"tempreature": 1}, "'tempreature'", "model, description, dtype, max_len"),
        ({"sampler": {"kind": "greedy", "topp": 0.9}}, "'sampler.topp'", "kind, temperature"),
        ({"prompts": {"text": ["a"], "files": "x"}}, "'prompts.files'", "text, file, split, chat"),
        ({"mesh": {"data": 1, "gpus": 2}}, "'mesh.gpus'", "data, model"),
        ({"prefill_buckets": {"min": 64, "limit": 9}}, "'prefill_buckets.limit'", "min, max, step"),
        (
            {"prompts": {"chat": [[{"role": "user", "content": "hi", "name": "x"}]]}},
            "'prompts.chat[0][0].name'",
            "role, content",
        ),
    ],
)
def test_unknown_keys_are_named_with_the_allowed_ones(data, key, allowed):
    with pytest.raises(ConfigError) as e:
        run_config_from_dict({"model": "builtin:tiny", **data}, source="x.yaml")
    msg = str(e.value)
    assert msg.startswith("x.yaml: ")
    assert f"unknown key {key}" in msg
    assert allowed in msg


def test_unknown_key_suggests_a_close_match():
    with pytest.raises(ConfigError, match="did you mean 'temperature'"):
        run_config_from_dict({"model": "builtin:tiny", "sampler": {"temprature": 0.5}})


# ---------------------------------------------------------------------------------------------
# Bad values: the message names the key, the value and what is allowed


@pytest.mark.parametrize(
    "override, expect",
    [
        ("max_len=-5", ["max_len", "-5", "integer >= 2"]),
        ("max_len='512'", ["max_len", "'512'", "integer"]),
        ("max_len=true", ["max_len", "True", "integer"]),
        ("max_new_tokens=0", ["max_new_tokens", "0", ">= 1"]),
        ("max_new_tokens=256", ["max_new_tokens", "256", "fewer than max_len (256)"]),
        ("batch_size=0", ["batch_size", ">= 1"]),
        ("dtype=float16", ["dtype", "'float16'", "float32, bfloat16"]),
        (
            "sampler.kind=beam",
            ["sampler.kind", "'beam'", "greedy, temperature, top_k, top_p, min_p"],
        ),
        ("sampler.temperature=0", ["sampler.temperature", "(0, inf)"]),
        ("sampler.top_p=1.5", ["sampler.top_p", "1.5", "(0, 1]"]),
        ("sampler.min_p=1", ["sampler.min_p", "[0, 1)"]),
        ("sampler.top_k=0", ["sampler.top_k", ">= 1"]),
        ("sampler=greedy", ["sampler", "'greedy'", "mapping with keys kind"]),
        ("prefill_buckets=[64, 32]", ["prefill_buckets", "strictly increasing"]),
        ("prefill_buckets=[64, 512]", ["prefill_buckets", "<= max_len (256)"]),
        ("prefill_buckets=[]", ["prefill_buckets", "non-empty"]),
        ("prefill_buckets.min=48", ["prefill_buckets.min", "48", "power of two"]),
        ("prefill_buckets.max=8", ["prefill_buckets.max", "8", ">= 16"]),
        ("prefill_buckets=64", ["prefill_buckets", "64", "list of lengths or a rule"]),
        ("prompts.file=p.txt", []),  # replaces the preset's text: valid
        ("prompts.split=lines", ["prompts.split", "only applies to prompts.file"]),
        ("prompts.text=[1]", ["prompts.text[0]", "1", "a string"]),
        ("prompts.text=[]", ["prompts.text", "at least one prompt"]),
        ("prompts.chat=[[{role: bot, content: hi}]]", ["prompts.chat[0][0].role", "'bot'", "user"]),
        ("prompts.chat=[[{role: user}]]", ["prompts.chat[0][0]", "missing key 'content'"]),
        ("prompts.chat=[[]]", ["prompts.chat[0]", "at least one message"]),
        ("stop_tokens=[-1]", ["stop_tokens[0]", "-1", ">= 0"]),
        ("stop_tokens=5", ["stop_tokens", "5", "list of token ids"]),
        ("mesh.data=0", ["mesh.data", "0", ">= 1"]),
        ("model=builtin:huge", ["model", "'builtin:huge'", "builtin:tiny"]),
        ("model=null", ["model", "required"]),
        ("model=", ["model", "required"]),
        ("output=3", ["output", "3", "non-empty string"]),
        ("chat_template=yes please", ["chat_template", "'yes please'", "true or false"]),
        ("seed=-1", ["seed", ">= 0"]),
    ],
)
def test_bad_values(override, expect):
    if not expect:
        load_run_config(TINY, [override])
        return
    with pytest.raises(ConfigError) as e:
        load_run_config(TINY, [override])
    msg = str(e.value)
    assert msg.startswith(f"{TINY}: ")
    for part in expect:
        assert part in msg, (part, msg)


def test_value_errors_say_which_override_set_them():
    with pytest.raises(ConfigError, match=r"from override 'sampler.kind=beam'"):
        load_run_config(TINY, ["sampler.kind=beam"])
    with pytest.raises(ConfigError, match=r"prompts.chat\[0\]\[0\].role \(from override"):
        load_run_config(TINY, ["prompts.chat=[[{role: bot, content: hi}]]"])


def test_prompt_sources_are_exclusive():
    base = {"model": "builtin:tiny"}
    with pytest.raises(ConfigError, match="exactly one of .*got prompts.text and prompts.file"):
        run_config_from_dict({**base, "prompts": {"text": ["a"], "file": "p.txt"}})
    with pytest.raises(ConfigError, match=r"exactly one of .*\(got none\)"):
        run_config_from_dict({**base, "prompts": {}})
    with pytest.raises(ConfigError, match="chat_template"):
        run_config_from_dict(
            {
                **base,
                "chat_template": False,
                "prompts": {"chat": [[{"role": "user", "content": "hi"}]]},
            }
        )


def test_file_level_errors(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_run_config(tmp_path / "missing.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("model: [unclosed\n")
    with pytest.raises(ConfigError, match="bad.yaml: not valid YAML"):
        load_run_config(bad)
    bad.write_text("- a\n- b\n")
    with pytest.raises(ConfigError, match="top level must be a mapping"):
        load_run_config(bad)
    bad.write_text("")
    with pytest.raises(ConfigError, match="model.*required"):
        load_run_config(bad)


# ---------------------------------------------------------------------------------------------
# Overrides


def test_overrides_are_yaml_scalars():
    cfg = load_run_config(
        TINY,
        [
            "max_len=1024",
            "sampler.kind=top_p",
            "sampler.top_p=0.9",
            "sampler.temperature=0.7",
            "chat_template=false",
            "stop_tokens=[1, '<turn|>']",
            "prefill_buckets=[128, 1024]",
            "mesh.model=2",
            "description=a run with spaces in it",
            "prompts.text=just one prompt",
        ],
    )
    assert cfg.max_len == 1024
    assert cfg.sampler == SamplerConfig(kind="top_p", temperature=0.7, top_p=0.9)
    assert cfg.chat_template is False and cfg.conversations() is None
    assert cfg.stop_tokens == (1, "<turn|>")
    assert cfg.prefill_buckets == (128, 1024) and cfg.bucket_sizes() == (128, 1024)
    assert cfg.mesh is not None and (cfg.mesh.data, cfg.mesh.model) == (1, 2)
    assert cfg.description == "a run with spaces in it"
    assert cfg.load_prompts() == ["just one prompt"]


def test_override_prompt_source_replaces_the_files(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "mine.txt").write_text("one\ntwo\n\nthree\n")
    cfg = load_run_config(CONFIGS / "sampling.yaml", ["prompts.text=[hello]"])
    assert cfg.prompts.text == ("hello",) and cfg.prompts.file is None
    cfg = load_run_config(TINY, ["prompts.file=mine.txt"])
    assert cfg.prompts.file == tmp_path / "mine.txt"  # override paths: relative to the cwd
    assert cfg.load_prompts() == ["one\ntwo", "three"]
    cfg = load_run_config(TINY, ["prompts.file=mine.txt", "prompts.split=lines"])
    assert cfg.load_prompts() == ["one", "two", "three"]
    cfg = load_run_config(TINY, ["prompts.chat=[[{role: user, content: hi}]]"])
    assert cfg.prompts.chat == ((Message("user", "hi"),),)
    assert cfg.conversations() == [[{"role": "user", "content": "hi"}]]


def test_override_syntax_errors():
    for bad in ["max_len", "=3", "sampler..kind=x", "max_len=[1,"]:
        with pytest.raises(ConfigError, match="override"):
            load_run_config(TINY, [bad])
    with pytest.raises(ConfigError, match="'prefill_buckets' is .* not a mapping"):
        load_run_config(TINY, ["prefill_buckets=[16, 32]", "prefill_buckets.min=8"])
    assert parse_override("a.b= {min: 64} ") == ("a.b", {"min": 64})
    assert parse_override("x=null") == ("x", None)


# ---------------------------------------------------------------------------------------------
# Paths


def test_relative_paths_resolve_against_the_yaml_folder(tmp_path, monkeypatch):
    folder = tmp_path / "runs"
    folder.mkdir()
    (folder / "p.txt").write_text("first prompt\n\nsecond\n")
    (folder / "m.gguf").write_bytes(b"GGUF")
    path = folder / "run.yaml"
    path.write_text(
        yaml.safe_dump(
            {
                "model": "m.gguf",
                "prompts": {"file": "p.txt"},
                "output": "out/results.jsonl",
            }
        )
    )
    monkeypatch.chdir(tmp_path)  # somewhere else
    cfg = load_run_config(path)
    assert cfg.model == str(folder / "m.gguf")
    assert cfg.model_path() == folder / "m.gguf"
    assert cfg.prompts.file == folder / "p.txt"
    assert cfg.output == folder / "out" / "results.jsonl"
    assert cfg.load_prompts() == ["first prompt", "second"]
    # an absolute path and ~ stay as given
    cfg = load_run_config(path, ["model=/abs/m.gguf"])
    assert cfg.model == "/abs/m.gguf"
    # builtin: is not a path
    assert load_run_config(path, ["model=builtin:tiny"]).model == "builtin:tiny"


def test_missing_files_are_reported_when_used(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("model: nowhere.gguf\nprompts: {file: nothing.txt}\n")
    cfg = load_run_config(path)  # loading does not open files
    with pytest.raises(ConfigError, match="nowhere.gguf"):
        cfg.model_path()
    with pytest.raises(ConfigError, match="prompts.file.*nothing.txt"):
        cfg.load_prompts()


def test_split_prompts():
    text = "  a\nb  \n\n\n c \n   \nd\n"
    assert split_prompts(text) == ["a\nb", "c", "d"]
    assert split_prompts(text, "lines") == ["a", "b", "c", "d"]
    assert split_prompts("") == []


def test_bucket_rule_sizes():
    assert BucketRule(64).sizes(1000) == (64, 128, 256, 512, 1000)
    assert BucketRule(64, max=256).sizes(4096) == (64, 128, 256)
    assert BucketRule(256, step=256, max=1024).sizes(4096) == (256, 512, 768, 1024)
    assert BucketRule(512).sizes(100) == (100,)


def test_configs_are_frozen():
    cfg = load_run_config(TINY)
    with pytest.raises(AttributeError):
        cfg.max_len = 5  # type: ignore[misc]
