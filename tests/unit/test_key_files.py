"""Key files and directories others can read or change are refused, as ssh does (issue 11)."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest

from distfork import security
from distfork.config import Config


@pytest.mark.parametrize(("mode", "ok"), [
    (0o600, True), (0o400, True), (0o640, True),  # group read: the group is ours (a Secret with fsGroup)
    (0o660, False), (0o604, False), (0o606, False), (0o644, False), (0o666, False),
])
def test_secret_key_files(tmp_path: Path, mode: int, ok: bool) -> None:
    f = tmp_path / "client.key_secret"
    f.write_text("x")
    f.chmod(mode)
    os.chown(f, os.getuid(), os.getgid())
    if ok:
        security.check_private(str(f), "the secret key file")
    else:
        with pytest.raises(ValueError, match=rf"by other users \(mode {mode:04o}\).*chmod 600 {f}"):
            security.check_private(str(f), "the secret key file")


@pytest.mark.parametrize(("mode", "ok"), [(0o700, True), (0o755, True), (0o775, False), (0o777, False)])
def test_allow_list_directories(tmp_path: Path, mode: int, ok: bool) -> None:
    d = tmp_path / "allowed"
    d.mkdir()
    d.chmod(mode)
    if ok:
        security.check_private(str(d), "the allow-list directory", directory=True)
    else:
        with pytest.raises(ValueError, match="writable by other users"):
            security.check_private(str(d), "the allow-list directory", directory=True)


def test_keygen_makes_private_files_and_directories_whatever_the_umask(tmp_path: Path) -> None:
    old = os.umask(0)
    try:
        paths = security.keygen(str(tmp_path / "keys"))
    finally:
        os.umask(old)
    for name in ("broker_secret", "worker_secret", "client_secret"):
        assert stat.S_IMODE(os.stat(paths[name]).st_mode) == 0o600
    for d in (tmp_path / "keys", tmp_path / "keys" / "allowed", tmp_path / "keys" / "allowed" / "clients"):
        assert stat.S_IMODE(d.stat().st_mode) == 0o700
    with pytest.raises(FileExistsError, match="--force"):
        security.keygen(str(tmp_path / "keys"))


def test_star_is_not_an_allow_list(tmp_path: Path) -> None:
    paths = security.keygen(str(tmp_path / "keys"))
    with pytest.raises(ValueError, match="admit every key"):
        security.server_keys(Config(curve_secret_file=paths["broker_secret"], curve_allow_dir="*"))


def test_default_keys_are_for_tcp_and_shared_ipc_only(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path / "config"))
    private = tmp_path / "private"
    private.mkdir(mode=0o700)
    shared = tmp_path / "shared"
    shared.mkdir()
    shared.chmod(0o1777)
    cfg = Config()
    assert security.client_keys(cfg, f"ipc://{private}/broker") is None  # the embedded cluster's kind
    assert not (tmp_path / "config").exists()
    assert security.client_keys(cfg, f"ipc://{shared}/broker") is not None
    assert security.client_keys(cfg, "tcp://127.0.0.1:7340") is not None
    assert stat.S_IMODE((tmp_path / "config" / "distfork").stat().st_mode) == 0o700
    assert security.client_keys(Config(insecure=True), "tcp://127.0.0.1:7340") is None
    assert security.client_keys(Config(default_keys=False), "tcp://127.0.0.1:7340") is None
