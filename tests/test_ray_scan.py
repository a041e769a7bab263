"""The Ray engine of the scan, on a local 2-CPU Ray cluster started here (no dashboard,
no network): the lines a local scan writes, a driver SIGKILLed and restarted, a worker
that dies mid-batch, malformed input, the command line, and a GPU actor on a cluster that
declares one (read on the CPU)."""
from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import ray

from conftest import make_tokenizer, save_tiny_run
from monitor.cli import main as cli
from monitor.logscan.ray_scan import scan_on_ray
from monitor.logscan.scan import make_rules, scan
from monitor.runs import open_reader

ROOT = Path(__file__).resolve().parents[1]
LABELS = ("afraid", "calm", "desperate", "happy", "angry")
N = 50
ENV = {"RAY_DISABLE_USAGE_STATS": "1", "RAY_AUTH_MODE": "disabled"}


def write_logs(path: Path) -> Path:
    """N conversations of varied length, with a line of bad JSON and a record without
    messages among them: what the local scan reports with file and line."""
    words = "the tests fail again and i cannot fix the code now please help my deadline money".split()
    rng = np.random.default_rng(3)
    lines = []
    for k in range(N):
        msgs = [{"role": ("user", "assistant", "tool")[j % 3], "content": " ".join(rng.choice(words, rng.integers(3, 50)))}
                for j in range(rng.integers(1, 7))]
        lines.append(json.dumps({"id": k, "messages": msgs}))
    lines[10:10] = ["{not json"]
    lines[20:20] = [json.dumps({"messages": "x"})]
    path.write_text("\n".join(lines) + "\n")
    return path


@pytest.fixture(scope="module")
def cluster():
    with pytest.MonkeyPatch.context() as mp:  # Ray's settings for these tests only
        for k, v in ENV.items():
            mp.setenv(k, v)
        ray.init(num_cpus=2, num_gpus=1, include_dashboard=False, object_store_memory=128 * 2**20, log_to_driver=False)
        yield ray.get_runtime_context().gcs_address
        ray.shutdown()


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    root = save_tiny_run(tmp_path_factory.mktemp("ray"), make_tokenizer(), labels=LABELS)
    logs = write_logs(root / "logs.jsonl")
    reader = open_reader(root / "run", model=str(root / "model"))
    rules = make_rules(reader.bank, alerts=["happy>0"])
    ref = scan([logs], root / "local" / "scan.jsonl", reader, rules=rules, progress=False)
    return root, logs, rules, ref


def ray_scan(work, out, **kw):
    root, logs, rules, _ = work
    kw = {"actors": 2, "shard_size": 7, "batch_size": 4, "progress": False, **kw}
    return scan_on_ray([logs], root / "run", out, model=str(root / "model"), rules=rules, **kw)


def close(a, b, path="") -> None:
    """Same keys and values everywhere, numbers within 1e-4."""
    assert type(a) is type(b) or {type(a), type(b)} <= {int, float}, path
    if isinstance(a, dict):
        assert list(a) == list(b), path
        for k in a:
            close(a[k], b[k], f"{path}.{k}")
    elif isinstance(a, list):
        assert len(a) == len(b), path
        for i, (x, y) in enumerate(zip(a, b)):
            close(x, y, f"{path}[{i}]")
    elif isinstance(a, float):
        assert abs(a - b) <= 1e-4, path
    else:
        assert a == b, path


def same_as_local(work, out_dir: Path, summary: dict) -> None:
    root, _, _, ref = work
    local = (root / "local" / "scan.jsonl").read_text().splitlines()
    got = (out_dir / "scan.jsonl").read_text().splitlines()
    assert len(got) == len(local) > N
    for x, y in zip(got, local):
        close(json.loads(x), json.loads(y))
    for k in ("conversations", "messages", "tokens", "flagged_conversations", "flags_per_rule", "skipped", "settings"):
        close(summary[k], ref[k], k)
    on_disk = json.loads((out_dir / "scan.summary.json").read_text())
    assert on_disk["status"] == "complete" and on_disk["conversations"] == N


@pytest.fixture(scope="module")
def ray_out(cluster, work, tmp_path_factory):
    out = tmp_path_factory.mktemp("ray-out") / "ray"
    return out, ray_scan(work, out)


def test_ray_scan_writes_what_the_local_scan_writes(ray_out, work):
    out, s = ray_out
    same_as_local(work, out, s)
    assert s["this_run"]["conversations"] == N and s["this_run"]["shards"] == 8
    assert [x["source"].rsplit("/", 1)[-1] for x in s["skipped"]] == ["logs.jsonl:11", "logs.jsonl:21"]
    manifest = json.loads((out / "manifest.json").read_text())
    assert sorted(manifest["shards"], key=int) == [str(k) for k in range(8)]
    assert sum(m["conversations"] for m in manifest["shards"].values()) == N
    assert sum(m["lines"] for m in manifest["shards"].values()) == s["messages"]
    assert b"".join((out / "shards" / f"{k:05d}.jsonl").read_bytes() for k in range(8)) == (out / "scan.jsonl").read_bytes()


def test_other_settings_or_other_logs_are_refused(ray_out, work, tmp_path):
    root, logs, rules, _ = work
    out = tmp_path / "ray"
    shutil.copytree(ray_out[0], out)
    again = ray_scan(work, out)  # every shard done: no actor starts, the same file
    assert again["this_run"]["conversations"] == 0 and again["this_run"]["already_done"] == N
    same_as_local(work, out, again)
    with pytest.raises(ValueError, match="other settings"):
        scan_on_ray([logs], root / "run", out, model=str(root / "model"), shard_size=7, progress=False)
    with pytest.raises(ValueError, match="other settings"):
        ray_scan(work, out, shard_size=5)
    shorter = tmp_path / "shorter.jsonl"
    shorter.write_text("".join(logs.read_text().splitlines(keepends=True)[1:]))
    with pytest.raises(ValueError, match="logs changed"):
        scan_on_ray([shorter], root / "run", out, model=str(root / "model"), rules=rules, shard_size=7, progress=False)


def test_a_killed_driver_resumes_with_no_line_lost_or_doubled(cluster, work, tmp_path):
    root, logs, rules, _ = work
    out = tmp_path / "killed"
    script = (f"import ray; from monitor.logscan.ray_scan import scan_on_ray; from monitor.logscan.scan import make_rules\n"
              f"from probes.bank import ProbeBank\nray.init(address={cluster!r}, log_to_driver=False)\n"
              f"scan_on_ray([{str(logs)!r}], {str(root / 'run')!r}, {str(out)!r}, model={str(root / 'model')!r}, "
              f"rules=make_rules(ProbeBank.load({str(root / 'run')!r}), alerts=['happy>0']), actors=1, shard_size=5, "
              f"batch_size=1, progress=False, _faults={{'delay': 0.1}})\n")
    proc = subprocess.Popen([sys.executable, "-c", script], env={**os.environ, **ENV, "PYTHONPATH": str(ROOT)},
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    manifest, deadline, done = out / "manifest.json", time.time() + 180, 0
    while done < 2 and proc.poll() is None and time.time() < deadline:
        time.sleep(0.02)
        try:
            done = len(json.loads(manifest.read_text())["shards"])
        except FileNotFoundError:  # not there yet (and never half-written: json.loads would raise)
            pass
    proc.send_signal(signal.SIGKILL)
    assert proc.wait() == -signal.SIGKILL, "the scan ended before it could be killed"
    done = len(json.loads(manifest.read_text())["shards"])
    assert 2 <= done < 10 and not (out / "scan.jsonl").exists()
    s = ray_scan(work, out, shard_size=5)
    assert not list(out.rglob(".*.tmp"))  # a temp file the kill left behind is gone
    assert s["this_run"]["already_done"] == 5 * done and s["this_run"]["conversations"] == N - 5 * done
    same_as_local(work, out, s)


def test_a_worker_that_dies_mid_batch_is_retried(cluster, work, tmp_path):
    marker = tmp_path / "fail-once"
    marker.touch()
    s = ray_scan(work, tmp_path / "ray", _faults={"fail_once": str(marker)})
    assert not marker.exists()  # an actor took it and died (os._exit) in the middle of a batch
    same_as_local(work, tmp_path / "ray", s)


def test_cli_on_a_gpu_actor(cluster, work, tmp_path, capsys):
    """``--num-gpus 1``: the cluster declares a GPU, the actor is scheduled on it and reads on
    the CPU (no CUDA here) what the local engine reads with the same options; malformed
    lines make exit code 1 and are listed by file:line."""
    root, logs, _, _ = work
    out, html, local = tmp_path / "cli", tmp_path / "scan.html", tmp_path / "local.jsonl"
    common = ["scan", "--run", str(root / "run"), "--model", str(root / "model"), "--quiet", "--alert", "happy>0", str(logs)]
    assert cli([*common, "--out", str(local)]) == 1
    capsys.readouterr()
    assert cli([*common, "--engine", "ray", "--actors", "1", "--num-gpus", "1", "--shard-size", "20",
                "--out", str(out), "--html", str(html)]) == 1
    printed = capsys.readouterr().out
    assert "logs.jsonl:11" in printed and "logs.jsonl:21" in printed and html.stat().st_size > 1000
    got, want = (out / "scan.jsonl").read_text().splitlines(), local.read_text().splitlines()
    assert len(got) == len(want) > N
    for x, y in zip(got, want):
        close(json.loads(x), json.loads(y))
    summary = json.loads((out / "scan.summary.json").read_text())
    assert summary["skipped"] == json.loads((tmp_path / "local.summary.json").read_text())["skipped"]


def test_cli_without_ray_says_what_to_install(work, tmp_path, monkeypatch, capsys):
    root, logs, _, _ = work
    monkeypatch.setitem(sys.modules, "ray", None)
    assert cli(["scan", "--engine", "ray", "--run", str(root / "run"), str(logs), "--out", str(tmp_path / "x")]) == 2
    assert "pip install 'emoprobe[ray]'" in capsys.readouterr().err
