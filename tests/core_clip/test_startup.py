"""core_clip.startup: the collector is paused only inside the block, and command-line runs freeze at exit."""
import gc
import subprocess
import sys

import pytest

from core_clip.startup import paused_gc


@pytest.fixture
def collector_on():
    was = gc.isenabled()
    gc.enable()
    yield
    if not was:
        gc.disable()


def test_paused_inside_restored_after(collector_on):
    with paused_gc():
        assert not gc.isenabled()
        with paused_gc():
            assert not gc.isenabled()
        assert not gc.isenabled()   # the inner block does not switch it back on early
    assert gc.isenabled()


def test_restored_after_an_exception(collector_on):
    with pytest.raises(KeyError):
        with paused_gc():
            raise KeyError("x")
    assert gc.isenabled()


def test_a_disabled_collector_stays_disabled(collector_on):
    gc.disable()
    with paused_gc():
        pass
    assert not gc.isenabled()


def _python(code: str) -> str:
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    return proc.stdout


def test_importing_the_packages_leaves_the_collector_on():
    assert _python("import gc, clipguide, core_clip; print(gc.isenabled())").strip() == "True"


def test_a_command_line_run_freezes_at_exit_once(tmp_path):
    # atexit runs handlers last-registered first, so the probe registered before the runs reports after the freeze
    run = f"main(['embed', '--text', 'a red circle', '--out', {str(tmp_path / 'e.safetensors')!r}])"
    out = _python(
        "import atexit, gc\n"
        "atexit.register(lambda: print('frozen at exit', gc.get_freeze_count() > 0))\n"
        "from core_clip.cli import main\n"
        "n = atexit._ncallbacks()\n"
        f"assert {run} == 0 and {run} == 0\n"
        "print('registered', atexit._ncallbacks() - n, 'frozen before exit', gc.get_freeze_count() > 0)\n")
    assert "registered 1 frozen before exit False" in out
    assert out.rstrip().endswith("frozen at exit True")
