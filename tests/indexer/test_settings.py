"""Settings: YAML, then environment, then CLI flags; the Stella guide's YAML is accepted as written."""

from pathlib import Path

import platformdirs
import pytest

from indexer.settings import embedding_cache_dir, load_settings, onnx_dir
from storage.errors import InvalidInputError

GUIDE_YAML = """
encoder:
  batch_size: 16
  max_length: 512
  embedding_dimension: 1024
  normalize_embeddings: true
  prompt_type: s2p
processing:
  device: auto
  clear_cache_interval: 25
  force_gc_interval: 50
embedding:
  cache_embeddings: true
  cache_dir: ./embeddings_cache
"""


def test_guide_yaml_is_accepted_as_written(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    config = tmp_path / "stella.yaml"
    config.write_text(GUIDE_YAML)
    settings = load_settings(config, environ={})
    assert settings.encoder.batch_size == 16
    assert settings.encoder.embedding_dimension == 1024
    assert settings.processing.clear_cache_interval == 25
    assert settings.embedding.cache_embeddings is True
    assert settings.embedding.cache_dir == tmp_path.resolve() / "embeddings_cache"


def test_defaults_follow_the_guide():
    settings = load_settings(environ={})
    assert settings.encoder.model == "stella-1.5b"
    assert (settings.encoder.batch_size, settings.encoder.max_length) == (16, 512)
    assert settings.encoder.prompt_type == "s2p"
    assert settings.processing.device == "auto"


def test_caches_go_to_the_users_cache_folder_whatever_the_working_directory(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    settings = load_settings(environ={})
    assert settings.cache_dir == Path(platformdirs.user_cache_dir("stella-search", appauthor=False))
    assert onnx_dir(settings) == settings.cache_dir / "onnx"
    assert embedding_cache_dir(settings) == settings.cache_dir / "embeddings"
    assert settings.cache_dir.is_absolute() and not settings.cache_dir.is_relative_to(tmp_path.resolve())


def test_a_relative_cache_folder_is_resolved_once_where_it_is_given(tmp_path, monkeypatch):
    (tmp_path / "later").mkdir()
    monkeypatch.chdir(tmp_path)
    settings = load_settings(environ={"STELLA_SEARCH_CACHE_DIR": "cache"})
    own = load_settings(cli={"encoder": {"onnx_dir": "exports"}}, environ={})
    monkeypatch.chdir(tmp_path / "later")
    assert onnx_dir(settings) == tmp_path.resolve() / "cache" / "onnx"
    assert onnx_dir(own) == tmp_path.resolve() / "exports"


def test_precedence_yaml_then_env_then_cli(tmp_path):
    config = tmp_path / "s.yaml"
    config.write_text("encoder:\n  batch_size: 8\n  max_length: 128\nprocessing:\n  device: cpu\n")
    env = {"STELLA_SEARCH_ENCODER__BATCH_SIZE": "32", "STELLA_SEARCH_ENCODER__MAX_LENGTH": "256"}
    settings = load_settings(config, cli={"encoder": {"batch_size": 64}}, environ=env)
    assert settings.encoder.batch_size == 64  # CLI beats env
    assert settings.encoder.max_length == 256  # env beats YAML
    assert settings.processing.device == "cpu"  # YAML beats default


@pytest.mark.parametrize(
    "source, key",
    [
        ({"yaml": "encoder:\n  batch_sise: 4\n"}, "encoder.batch_sise"),
        ({"yaml": "encoders:\n  batch_size: 4\n"}, "encoders"),
        ({"env": {"STELLA_SEARCH_PROCESSING__DEVICES": "cpu"}}, "processing.devices"),
    ],
)
def test_unknown_keys_are_named(tmp_path, source, key):
    config = None
    if "yaml" in source:
        config = tmp_path / "s.yaml"
        config.write_text(source["yaml"])
    with pytest.raises(InvalidInputError, match=f"unknown key '{key}'"):
        load_settings(config, environ=source.get("env", {}))


def test_bad_values_name_the_key():
    with pytest.raises(InvalidInputError, match="encoder.prompt_type"):
        load_settings(cli={"encoder": {"prompt_type": "p2p"}}, environ={})


@pytest.mark.parametrize(("written", "meant"), [("off", "off"), ("on", "inductor"), ("aot_eager", "aot_eager")])
def test_yaml_bare_off_and_on_for_compile_mean_what_they_say(tmp_path, written, meant):
    """YAML 1.1 reads bare off/on as booleans; encoder.compile takes them as off and the default backend."""
    config = tmp_path / "s.yaml"
    config.write_text(f"encoder:\n  compile: {written}\n")
    assert load_settings(config, environ={}).encoder.compile == meant


@pytest.mark.parametrize(("value", "meant"), [("on", "inductor"), ("TRUE", "inductor"), ("no", "off")])
def test_compile_switch_words_from_the_environment(value, meant):
    settings = load_settings(environ={"STELLA_SEARCH_ENCODER__COMPILE": value})
    assert settings.encoder.compile == meant
