"""Configuration: defaults load, every bad key is named with its file, env overrides apply."""

from pathlib import Path

import pytest
import yaml

from config import ConfigError, load_settings
from config.loader import DEFAULT_CONFIG
from tasks.gpu.pool import GpuPool, SlurmQueue, holder_pool, slot_pools


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


def test_hpc_slurm_example_loads():
    settings = load_settings(DEFAULT_CONFIG.parent / "examples" / "hpc-slurm.yaml", env={})
    assert settings.backend.kind == "slurm" and settings.ssh is None
    assert (settings.slurm.partition, settings.slurm.gres, settings.slurm.memory) == ("gpu", "gpu:1", "16G")
    assert SlurmQueue.of_settings(settings) == SlurmQueue(
        host="slurm-queue-local", gpus=(0,), lease_seconds=settings.backend.gpu_lease_seconds, size=16
    )


def test_slurm_queue_cap_is_one_limit_of_its_size_named_after_the_login_node(tmp_path):
    """No cap by default; a cap is a limit slurm-queue-<ssh host, or local> that beams' holders hold."""
    uncapped = load_settings(write(tmp_path, "backend:\n  kind: slurm\n"), env={})
    assert uncapped.slurm.max_queued_jobs is None and SlurmQueue.of_settings(uncapped) is None
    assert holder_pool(uncapped) == GpuPool.of(uncapped.backend)
    text = (
        "backend:\n  kind: slurm\nslurm:\n  max_queued_jobs: 3\n"
        "ssh:\n  host: Login_1.example.org\n  user: mqi\n  remote_root: /scratch/mqi\n"
        "  engine_dir: /opt/moqui\n  engine_command: [/opt/moqui/tps_env, '{input}']\n"
    )
    capped = load_settings(write(tmp_path, text), env={})
    queue = holder_pool(capped)
    assert isinstance(queue, SlurmQueue) and queue.size == 3
    assert queue.limit_names() == ["slurm-queue-login-1.example.org"]
    assert [pool.limit_names() for pool in slot_pools(capped)][1:] == [queue.limit_names()]
    kind_ssh = load_settings(write(tmp_path, text.replace("kind: slurm", "kind: ssh")), env={})
    assert SlurmQueue.of_settings(kind_ssh) is None  # only Slurm jobs queue


@pytest.mark.parametrize(
    ("section", "message"),
    [
        ("slurm:\n  partitoin: gpu\n", "slurm.partitoin: unknown key"),
        ("slurm:\n  retry_states: [SOMETIMES]\n", "slurm.retry_states.0: Input should be 'FAILED'"),
        ("slurm:\n  gres: 'gpu:2'\n", "slurm.gres: String should match pattern"),
        ("slurm:\n  max_queued_jobs: 0\n", "slurm.max_queued_jobs: Input should be greater than or equal"),
        ("slurm:\n  partition: 'gpu; rm -rf /'\n", "slurm.partition: String should match pattern"),
        ('slurm:\n  extra_sbatch: ["--exclusive\\n#SBATCH --x"]\n', "must be one non-empty line"),
    ],
)
def test_bad_slurm_settings_name_the_key(tmp_path, section, message):
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)")):
        load_settings(write(tmp_path, section), env={})


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


PROFILE = "moqui-smc-public"


def _profile_with(key: str, value: object) -> dict[str, object]:
    """A copy of the shipped public profile, under another name, with one value changed."""
    from config.profiles import shipped_profiles

    profile = shipped_profiles()[PROFILE].model_dump()
    profile[key] = value
    return {"engine_profiles": {"site": profile}, "engine": {"profile": "site"}}


@pytest.mark.parametrize(
    ("config", "key", "message"),
    [
        ({"engine": {"timeout_seconds": float("inf")}}, "engine.timeout_seconds", "finite number"),
        ({"backend": {"gpu_lease_seconds": float("inf")}}, "backend.gpu_lease_seconds", "finite number"),
        ({"engine": {"poll_seconds": float("nan")}}, "engine.poll_seconds", "finite number"),
        ({"interpreter": {"timeout_seconds": float("inf")}}, "interpreter.timeout_seconds", "finite number"),
        ({"sensor": {"quiet_seconds": float("inf")}}, "sensor.quiet_seconds", "finite number"),
        ({"tps": {"phantom": {"unit_mm": [2, 2, float("inf")]}}}, "tps.phantom.unit_mm.2", "finite number"),
        (
            _profile_with("raw_dose_pph_power", float("inf")),
            "engine_profiles.site.raw_dose_pph_power",
            "finite",
        ),
        (
            {"engine": {"retry_delay_seconds": [-1]}},
            "engine.retry_delay_seconds.0",
            "greater than or equal to 0",
        ),
        ({"engine": {"retry_delay_seconds": [2, float("inf")]}}, "engine.retry_delay_seconds.1", "finite"),
        (
            {"paths": {"scan_dir": "{data_root:>50}/scan"}},
            "paths.scan_dir",
            "format spec or conversion (:>50)",
        ),
        (
            {"paths": {"work_dir": "{data_root!r}/{case_id}"}},
            "paths.work_dir",
            "format spec or conversion (!r)",
        ),
        ({"paths": {"output_dir": "{data_root}/{case_id:{x}}"}}, "paths.output_dir", "format spec"),
        ({"engine": {"workdir": "{data_root!s}/engine"}}, "engine.workdir", "format spec or conversion (!s)"),
        ({"engine": {"command": ["tps_env", "{input:>9}"]}}, "engine.command", "format spec or conversion"),
        ({"case": {"ready_marker": "../../etc/passwd"}}, "case.ready_marker", "not a plain file name"),
        ({"case": {"ready_marker": "sub/_READY"}}, "case.ready_marker", "not a plain file name"),
        ({"case": {"ready_marker": ".."}}, "case.ready_marker", "not a plain file name"),
        ({"case": {"ready_marker": ""}}, "case.ready_marker", "not a plain file name"),
        ({"case": {"ready_marker": "_READY\n"}}, "case.ready_marker", "not a plain file name"),
        ({"sensor": {"room_folders": ["G1", "..\\G2"]}}, "sensor.room_folders.1", "not a plain file name"),
        ({"sensor": {"room_folders": ["G1/x"]}}, "sensor.room_folders.0", "not a plain file name"),
    ],
)
def test_values_that_would_fail_later_are_rejected_naming_the_key(tmp_path, config, key, message):
    """Each of these passed `mqi config check` once and then failed beams (or read elsewhere)."""
    path = write(tmp_path, yaml.safe_dump(config))
    with pytest.raises(ConfigError) as err:
        load_settings(path, env={})
    lines = [line for line in str(err.value).splitlines() if f"{key}:" in line]
    assert lines and message in lines[0], str(err.value)


def test_notify_targets_are_checked_and_named(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("notify:\n  blocks: [physics]\n  webhook_urls: [ftp://x]\n")
    with pytest.raises(ConfigError) as raised:
        load_settings(bad, env={})
    assert "notify.blocks" in str(raised.value) and "'<block type slug>/<block name>'" in str(raised.value)
    assert "notify.webhook_urls" in str(raised.value) and "not an http(s) URL" in str(raised.value)
