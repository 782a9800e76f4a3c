"""Configuration: defaults load, every bad key is named with its file, env overrides apply."""

from pathlib import Path

import pytest

from config import ConfigError, load_settings
from config.loader import DEFAULT_CONFIG
from tasks.gpu.pool import GpuPool


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "config.yaml"
    path.write_text(text, encoding="utf-8")
    return path


def test_default_config_loads_and_resolves_paths_beside_the_file():
    settings = load_settings(DEFAULT_CONFIG, env={})
    assert settings.root == (DEFAULT_CONFIG.parent / "../data").resolve()
    assert settings.scan_dir == settings.root / "scan"
    assert settings.work_dir("C1") == settings.root / "work" / "C1"
    assert GpuPool.of(settings.backend).limit_names() == ["gpu-local-0", "gpu-local-1", "gpu-local-2"]


def test_unknown_key_is_named_with_file(tmp_path):
    path = write(tmp_path, "engine:\n  timout_seconds: 10\n")
    with pytest.raises(ConfigError) as err:
        load_settings(path, env={})
    assert f"{path}: engine.timout_seconds: unknown key" in str(err.value)


def test_unknown_top_level_key_and_wrong_type_are_all_reported(tmp_path):
    path = write(tmp_path, "colour: blue\nbackend:\n  gpus: lots\n")
    with pytest.raises(ConfigError) as err:
        load_settings(path, env={})
    text = str(err.value)
    assert "colour: unknown key" in text
    assert "backend.gpus" in text and "'lots'" in text


def test_duplicate_key_is_an_error(tmp_path):
    path = write(tmp_path, "engine:\n  retries: 1\n  retries: 3\n")
    with pytest.raises(ConfigError, match="key 'retries' appears twice"):
        load_settings(path, env={})


def test_unknown_placeholder_is_rejected(tmp_path):
    path = write(tmp_path, "paths:\n  output_dir: '{data_root}/out/{patient}'\n")
    with pytest.raises(ConfigError) as err:
        load_settings(path, env={})
    assert "paths.output_dir" in str(err.value) and "{patient}" in str(err.value)


def test_per_case_folders_must_use_case_id(tmp_path):
    path = write(tmp_path, "paths:\n  work_dir: '{data_root}/work'\n")
    with pytest.raises(ConfigError, match=r"paths.work_dir: .*must contain \{case_id\}"):
        load_settings(path, env={})


def test_engine_command_placeholders_checked(tmp_path):
    path = write(tmp_path, "engine:\n  command: ['/opt/tps_env', '{inptu}']\n")
    with pytest.raises(ConfigError, match=r"engine.command: .*\{inptu\}"):
        load_settings(path, env={})


def test_environment_override_and_its_errors(tmp_path):
    path = write(tmp_path, "")
    settings = load_settings(path, env={"MQI__BACKEND__GPUS": "[4, 5]", "MQI__ENGINE__RETRIES": "0"})
    assert settings.backend.gpus == [4, 5] and settings.engine.retries == 0
    with pytest.raises(ConfigError, match="environment MQI__ENGINE__RETRIES: engine.retries"):
        load_settings(path, env={"MQI__ENGINE__RETRIES": "many"})
    with pytest.raises(ConfigError, match="engine.retires: unknown key"):
        load_settings(path, env={"MQI__ENGINE__RETIRES": "1"})


def test_missing_file_and_bad_yaml(tmp_path):
    with pytest.raises(ConfigError, match="cannot read config file"):
        load_settings(tmp_path / "nope.yaml", env={})
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_settings(write(tmp_path, "engine: [\n"), env={})


def test_commands_must_pass_their_inputs(tmp_path):
    path = write(tmp_path, "engine:\n  command: ['/opt/tps_env']\n")
    with pytest.raises(ConfigError, match=r"engine.command: .*must pass \{input\}"):
        load_settings(path, env={})
    path = write(tmp_path, "interpreter:\n  command: ['python', 'main_cli.py', '--logdir', '{case_dir}']\n")
    with pytest.raises(ConfigError, match=r"interpreter.command: .*must pass \{csv_dir\}"):
        load_settings(path, env={})


def test_hpc_ssh_example_loads():
    example = DEFAULT_CONFIG.parent / "examples" / "hpc-ssh.yaml"
    settings = load_settings(example, env={})
    assert settings.backend.kind == "ssh" and settings.ssh is not None
    assert settings.ssh.engine_command == ["/opt/moqui/tps_env", "{input}"]
    assert settings.ssh.key_passphrase_env == "MQI_SSH_KEY_PASSPHRASE"
    assert settings.config_path(settings.ssh.known_hosts) == Path("~/.ssh/known_hosts").expanduser()


def test_ssh_backend_needs_a_complete_ssh_section(tmp_path):
    with pytest.raises(ConfigError, match="backend.kind is ssh but there is no ssh: section"):
        load_settings(write(tmp_path, "backend:\n  kind: ssh\n"), env={})
    with pytest.raises(ConfigError) as err:
        load_settings(write(tmp_path, "ssh:\n  host: hpc1\n  user: mqi\n"), env={})
    text = str(err.value)
    assert all(
        f"ssh.{key}: Field required" in text for key in ("remote_root", "engine_dir", "engine_command")
    )


@pytest.mark.parametrize(
    ("key", "value", "message"),
    [
        ("remote_root", "scratch/mqi", "must be an absolute path on the GPU host"),
        ("engine_command", "['/opt/moqui/tps_env']", "must pass {input}"),
        ("engine_command", "['{python}', '{input}']", "unknown placeholder"),
        ("forward_env", "['CUDA-VISIBLE']", "is not an environment variable name"),
        ("key_file", "'-----BEGIN OPENSSH PRIVATE KEY-----'", "a key never belongs in the config"),
        ("key_passphrase_env", "'my passphrase'", "should match pattern"),
        ("compression", "gzip", "ssh.compression"),
        ("colour", "blue", "ssh.colour: unknown key"),
    ],
)
def test_ssh_settings_are_validated(tmp_path, key, value, message):
    base = {
        "host": "hpc1",
        "user": "mqi",
        "remote_root": "/scratch/mqi",
        "engine_dir": "/opt/moqui",
        "engine_command": "['/opt/moqui/tps_env', '{input}']",
        key: value,
    }
    text = "backend:\n  kind: ssh\nssh:\n" + "".join(f"  {k}: {v}\n" for k, v in base.items())
    with pytest.raises(ConfigError) as err:
        load_settings(write(tmp_path, text), env={})
    assert message in str(err.value)


def test_passphrase_sources_are_exclusive(tmp_path):
    text = (
        "ssh:\n  host: hpc1\n  user: mqi\n  remote_root: /r\n  engine_dir: /e\n"
        "  engine_command: [t, '{input}']\n"
        "  key_passphrase_env: A\n  key_passphrase_secret_block: b\n"
    )
    with pytest.raises(ConfigError, match="not both"):
        load_settings(write(tmp_path, text), env={})


def test_a_value_may_take_an_environment_variable(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text('engine:\n  command: ["${MQI_ENGINE_DIR}/build/tps_env", "{input}"]\n')
    settings = load_settings(path, env={"MQI_ENGINE_DIR": "/opt/moqui"})
    assert settings.engine.command == ["/opt/moqui/build/tps_env", "{input}"]
    with pytest.raises(
        ConfigError, match=r"engine.command\[0\]: environment variable MQI_ENGINE_DIR is not set"
    ):
        load_settings(path, env={})
