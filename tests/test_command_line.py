"""Section "Command line": where options go, what the usage says, what a
command prints when there is nothing to show."""

import datetime
import io
import json

import vault_snapshot_agent as vsa
from support.archives import write_archive


def two_blocks(tmp_path):
    """A config with two local blocks, each holding one snapshot."""
    config = {"addr": "http://127.0.0.1:9", "vault_auth_method": "token", "token": "t",
              "local_storage": [{"name": "hot", "path": str(tmp_path / "hot")},
                                {"name": "cold", "path": str(tmp_path / "cold"),
                                 "file_prefix": "cold"}]}
    path = tmp_path / "c.json"
    path.write_text(json.dumps(config))
    runtime = vsa.Runtime.create(env={})
    try:
        _, storages = vsa.load_all(str(path), runtime)
        for number, storage in enumerate(storages):
            (tmp_path / storage.name).mkdir()
            write_archive(str(tmp_path / ("a%d" % number)), index=10 + number)
            info = vsa.verify_file(str(tmp_path / ("a%d" % number)))
            storage.upload(info, storage.new_name(datetime.datetime(2026, 12, 1 + number,
                                                                    tzinfo=vsa.UTC)))
    finally:
        runtime.signals.close()
    return str(path)


def run(argv):
    out, log = io.StringIO(), io.StringIO()
    code = vsa.main(argv, stream=log, out=out, env={})
    return code, out.getvalue(), log.getvalue()


def test_config_option_works_after_the_command_too(tmp_path):
    config = two_blocks(tmp_path)
    before = run(["-c", config, "list"])
    after = run(["list", "-c", config])
    assert before[0] == after[0] == 0
    assert before[1] == after[1] and before[1].count(".snap") == 2
    # given twice, the one after the command wins
    assert run(["-c", str(tmp_path / "missing.json"), "list", "-c", config])[0] == 0
    assert run(["-c", config, "list", "-c", str(tmp_path / "missing.json")])[0] == 2


def test_list_takes_storage_like_the_other_commands(tmp_path):
    config = two_blocks(tmp_path)
    code, out, _ = run(["list", "-c", config, "--storage", "cold"])
    assert code == 0
    assert [line.split()[1] for line in out.splitlines()] == ["cold"]
    code, _, log = run(["list", "-c", config, "--storage", "warm"])
    assert code == 2 and "--storage warm: no such storage" in log and "hot, cold" in log


def test_usage_synopsis_names_every_option_and_form():
    usage = vsa.__doc__.split("Usage::")[1].split("Exit codes")[0]
    for option in ("--config-reference", "--storage", "--check-config", "--once", "-o FILE",
                   "--yes", "--force", "verify NAME|latest|all"):
        assert option in usage, option
    help_text = io.StringIO()
    parser = vsa._parser()
    parser.print_help(help_text)
    for command in ("list", "download", "verify", "restore"):
        assert command in help_text.getvalue()


def test_an_empty_or_missing_storage_is_said_so(tmp_path):
    config = two_blocks(tmp_path)
    for name in ("a0", "a1"):
        (tmp_path / name).unlink()
    for path in (tmp_path / "cold").iterdir():
        path.unlink()
    (tmp_path / "cold").rmdir()
    code, out, log = run(["list", "-c", config])
    assert code == 0 and out.count(".snap") == 1
    assert "No snapshots in cold (local:%s): the directory %s does not exist" % (
        tmp_path / "cold", tmp_path / "cold") in log
    code, _, log = run(["download", "latest", "-c", config, "--storage", "cold"])
    assert code == 1
    assert "no snapshot to download: cold (local:%s): the directory %s does not exist" % (
        tmp_path / "cold", tmp_path / "cold") in log
    (tmp_path / "cold").mkdir()
    code, _, log = run(["list", "-c", config, "--storage", "cold"])
    assert code == 0 and "no snapshot named cold-<time>.snap there" in log
