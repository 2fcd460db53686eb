import re
import subprocess

import pytest

from experiments import report


def test_code_version_names_the_checked_out_commit():
    code = report.code_version()
    head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=report.ROOT, capture_output=True,
                          text=True).stdout.strip()
    if not head:
        pytest.skip("not a git checkout")
    assert re.fullmatch(r"[0-9a-f]{40}", code["commit"]) and code["commit"] == head
    assert isinstance(code["dirty"], bool)
    assert code["dirty"] == bool(code["dirty_paths"])
    assert report.environment()["code"] == code


def test_code_version_outside_a_checkout_is_none(tmp_path, monkeypatch):
    monkeypatch.setenv("GIT_CEILING_DIRECTORIES", str(tmp_path.parent))  # no parent repo
    assert report.code_version(str(tmp_path)) == {"commit": None, "dirty": None,
                                                   "dirty_paths": None}


def test_code_version_lists_the_edited_files(tmp_path):
    def git(*args):
        subprocess.run(["git", *args], cwd=tmp_path, check=True, capture_output=True)

    git("init", "-q")
    (tmp_path / "model.py").write_text("a = 1\n")
    (tmp_path / "rows.json").write_text("{}\n")
    git("add", ".")
    git("-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "init")
    assert report.code_version(str(tmp_path))["dirty_paths"] == []
    (tmp_path / "rows.json").write_text("{\"auc\": 0.9}\n")
    (tmp_path / "untracked.txt").write_text("ignored\n")  # untracked files do not count
    code = report.code_version(str(tmp_path))
    assert code["dirty"] is True and code["dirty_paths"] == ["rows.json"]


def test_cpu_details_read_the_first_processors_fields(tmp_path, monkeypatch):
    cpuinfo = tmp_path / "cpuinfo"
    cpuinfo.write_text("processor\t: 0\nvendor_id\t: AuthenticAMD\ncpu family\t: 26\n"
                       "model\t\t: 2\nmodel name\t: AMD EPYC\nflags\t\t: fpu avx avx2 avx512f "
                       "avx512bw\n\nprocessor\t: 1\nflags\t\t: fpu\n")
    real_open = open
    monkeypatch.setattr("builtins.open", lambda path, *a, **k: real_open(
        cpuinfo if path == "/proc/cpuinfo" else path, *a, **k))
    assert report.cpu_details() == {"vendor": "AuthenticAMD", "family": "26", "model": "2",
                                    "simd": ["avx", "avx2", "avx512f", "avx512bw"]}
    assert report.environment()["processor"] == "AMD EPYC"
