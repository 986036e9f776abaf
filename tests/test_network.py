"""No network unless the config names a hub id: offline mode for local configs, and a traced
local training run (strace) that opens no connection beyond the machine."""

from __future__ import annotations

import ipaddress
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from peftlab.config import load_config
from peftlab.network import hub_ids, network_settings_restored, offline_unless_hub

REPO = Path(__file__).resolve().parents[1]


def test_hub_ids_name_only_what_the_hub_would_serve(tmp_path):
    assert hub_ids(load_config("smoke")) == []
    local = tmp_path / "model"
    local.mkdir()
    (local / "config.json").write_text("{}")
    named = load_config("smoke", ["model.config=null", "model.name_or_path=google/gemma-3-1b-it"])
    assert hub_ids(named) == ["google/gemma-3-1b-it"]
    assert hub_ids(load_config("smoke", [f"model.tokenizer={local}"])) == []
    data = load_config("smoke", ["data.sources.0.path=tatsu-lab/alpaca"])
    assert hub_ids(data) == ["tatsu-lab/alpaca"]


def test_offline_for_a_local_config_and_restored_after(monkeypatch):
    import huggingface_hub.constants as constants

    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    with network_settings_restored():
        assert offline_unless_hub(load_config("smoke")) is True
        assert os.environ["HF_HUB_OFFLINE"] == "1" and constants.is_offline_mode()
    assert "HF_HUB_OFFLINE" not in os.environ and not constants.is_offline_mode()
    with network_settings_restored():
        assert offline_unless_hub(load_config("smoke", ["data.sources.0.path=tatsu-lab/alpaca"])) is False
        assert "HF_HUB_OFFLINE" not in os.environ and not constants.is_offline_mode()


def _strace_usable() -> str | None:
    if shutil.which("strace") is None:
        return "strace is not installed (apt-get install -y strace): the network trace needs it"
    probe = subprocess.run(["strace", "-f", "-o", os.devnull, "true"], capture_output=True, text=True)
    if probe.returncode != 0:
        return f"strace cannot trace here (ptrace not permitted?): {probe.stderr.strip()[:120]}"
    return None


CONNECT = re.compile(r"connect\(\d+, \{sa_family=(AF_INET6?|AF_UNIX)(.*?)\}")


def outside_connections(trace: str) -> list[str]:
    """connect() calls in an strace log that leave the machine (any AF_INET / AF_INET6 address but
    loopback), and reads of the DNS resolver's configuration (a name lookup)."""
    found = []
    for line in trace.splitlines():
        if "/etc/resolv.conf" in line:
            found.append(line)
        match = CONNECT.search(line)
        if match is None or match.group(1) == "AF_UNIX":
            # AF_UNIX: local sockets. glibc asks nscd (when it runs) for user names too (torch looks
            # up the user); a DNS lookup without nscd reads resolv.conf and connects by AF_INET.
            continue
        address = re.search(r'inet_(?:addr|pton)\((?:AF_INET6, )?"([^"]+)"', match.group(2))
        if address is None or not ipaddress.ip_address(address.group(1)).is_loopback:
            found.append(line)
    return found


def test_outside_connections_parser():
    lines = ['1 connect(3, {sa_family=AF_INET, sin_port=htons(53), sin_addr=inet_addr("10.255.255.53")}, 16) = 0',
             '1 connect(3, {sa_family=AF_INET, sin_port=htons(80), sin_addr=inet_addr("127.0.0.1")}, 16) = 0',
             '1 connect(3, {sa_family=AF_INET6, sin6_port=htons(443), inet_pton(AF_INET6, "2001:db8::1", &sin6_addr)}, 28)',
             '1 connect(3, {sa_family=AF_UNIX, sun_path="/var/run/nscd/socket"}, 110) = -1 ENOENT']
    assert outside_connections("\n".join(lines)) == [lines[0], lines[2]]


@pytest.mark.slow
def test_a_local_training_run_reaches_for_no_network(tmp_path, gemma_tokenizer):
    reason = _strace_usable()
    if reason is not None:
        pytest.skip(reason)
    from peftlab.data.prepare import prepare_data

    run_dir = tmp_path / "run"
    prepare_data(load_config("smoke"), run_dir, gemma_tokenizer)
    trace = tmp_path / "trace.txt"
    # qlora: training imports bitsandbytes, whose CPU backend asks the kernel hub on AVX512-BF16 CPUs.
    env = {**os.environ, "PYTHONPATH": str(REPO / "src")}
    for variable in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE"):
        env.pop(variable, None)
    done = subprocess.run(
        ["strace", "-f", "-e", "trace=network,openat", "-o", str(trace), sys.executable, "-m", "peftlab", "train",
         "smoke", "--out", str(run_dir), "--method", "qlora", "--set", "methods.qlora.max_steps=1"],
        capture_output=True, text=True, env=env, cwd=tmp_path, timeout=600,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    assert (run_dir / "train" / "qlora" / "metrics.json").exists()
    logged = trace.read_text(errors="replace")
    assert "peftlab" in logged  # the trace covers the run
    assert outside_connections(logged) == []
