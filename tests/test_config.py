"""Configuration errors name the file, the line and the key."""

import pytest

from appliance import config as cfg
from appliance.errors import ConfigError, NotInitialised


def _edit(home, old, new):
    path = home / "appliance.yaml"
    text = path.read_text()
    assert old in text
    path.write_text(text.replace(old, new))
    return text.replace(old, new).splitlines()


def _line_of(lines, needle):
    return next(i for i, line in enumerate(lines, 1) if needle in line)


def test_defaults_load(home):
    config = cfg.load(home)
    assert config.appliance.store.compression_level == 3
    assert config.hot_tier.kind == "filesystem"
    assert config.key_file == home / "kek.key"


@pytest.mark.parametrize("old,new,message", [
    ("compression_level: 3", "compression_level: high", "store.compression_level: must be a whole number"),
    ("compression_level: 3", "compression_level: 40", "must be 0 (off) to 19"),
    ("compression_level: 3", "compresion_level: 3", "store.compresion_level: unknown key"),
    ("keep_previous_versions: true", "keep_previous_versions: 1", "must be true or false"),
    ("port: 11112", "port: [1, 2]", "dicom.port: must be a whole number"),
    ("ae_title: ARCHIVE", "ae_title: THIS_TITLE_IS_FAR_TOO_LONG", "1 to 16 ASCII"),
    ("hot_tier: hot", "hot_tier: nvme", "no tier named 'nvme'"),
])
def test_invalid_values_name_file_line_and_key(home, old, new, message):
    lines = _edit(home, old, new)
    with pytest.raises(ConfigError) as err:
        cfg.load(home)
    assert f"appliance.yaml:{_line_of(lines, new)}:" in str(err.value)
    assert message in str(err.value)


def test_yaml_syntax_error_names_the_line(home):
    lines = _edit(home, "  port: 11112", "  port: [11112")
    with pytest.raises(ConfigError, match=r"appliance.yaml:\d+: invalid YAML") as err:
        cfg.load(home)
    line = int(str(err.value).split("appliance.yaml:")[1].split(":")[0])
    assert line >= _line_of(lines, "port: [11112")


def test_duplicate_key_is_an_error(home):
    path = home / "appliance.yaml"
    path.write_text(path.read_text() + "key_file: other.key\n")
    with pytest.raises(ConfigError, match="duplicate key 'key_file'"):
        cfg.load(home)


def test_bad_tier_file(home):
    (home / "tiers" / "cold.yaml").write_text("name: cold\nkind: tape-robot\npath: /x\n")
    with pytest.raises(ConfigError, match=r"cold.yaml:2: kind: must be one of filesystem"):
        cfg.load(home)
    (home / "tiers" / "cold.yaml").write_text("name: cold\n")
    with pytest.raises(ConfigError, match=r"cold.yaml:\d+: kind: is required"):
        cfg.load(home)


def test_not_a_home(tmp_path):
    with pytest.raises(NotInitialised, match="appliance init"):
        cfg.load(tmp_path)
