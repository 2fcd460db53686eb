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
    assert report.environment()["code"] == code


def test_code_version_outside_a_checkout_is_none(tmp_path, monkeypatch):
    monkeypatch.setenv("GIT_CEILING_DIRECTORIES", str(tmp_path.parent))  # no parent repo
    assert report.code_version(str(tmp_path)) == {"commit": None, "dirty": None}
