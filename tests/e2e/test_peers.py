"""
test_peers.py - peers.py's rule, on a throwaway test of its own run by a child pytest: a
missing real peer skips the test on a developer's machine and fails it, with the reason,
under CI=true.
"""
import os
import subprocess
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
CHILD = '''
from peers import needs_peer, peer_missing

def test_fixture_style():
    peer_missing("frobd not installed (scripts/deps.sh test)")

@needs_peer(lambda: False, "frobctl not installed (scripts/deps.sh test)")
def test_decorator_style():
    pass

@needs_peer(lambda: True, "never said")
def test_present_peer_runs():
    pass
'''


def run_child(tmp_path, ci):
    (tmp_path / "test_child.py").write_text(CHILD)
    env = dict(os.environ, PYTHONPATH=HERE, PYTHONDONTWRITEBYTECODE="1")
    env.pop("CI", None)
    if ci is not None:
        env["CI"] = ci
    return subprocess.run([sys.executable, "-m", "pytest", "-q", "-rA", "-p", "no:cacheprovider",
                           str(tmp_path / "test_child.py")], capture_output=True, text=True,
                          env=env, cwd=str(tmp_path), timeout=120)


def test_missing_peer_skips_on_a_developer_machine(tmp_path):
    r = run_child(tmp_path, None)
    assert r.returncode == 0, r.stdout
    assert "1 passed, 2 skipped" in r.stdout, r.stdout
    assert "frobd not installed" in r.stdout and "frobctl not installed" in r.stdout, r.stdout


def test_missing_peer_fails_under_ci(tmp_path):
    r = run_child(tmp_path, "true")
    assert r.returncode == 1, r.stdout
    assert "2 failed, 1 passed" in r.stdout, r.stdout
    assert "CI=true and a real peer is missing: frobd not installed (scripts/deps.sh test)" \
        in r.stdout, r.stdout
    assert "frobctl not installed" in r.stdout, r.stdout
