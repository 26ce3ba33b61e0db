"""`from diffusers import StableDiffusionPipeline` in a fresh process of this environment, without
importing anything of ours first (export/torchvision_compat.py: the startup file `make install`
writes into site-packages)."""

import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest

from export.torchvision_compat import STARTUP_FILE, _extension_loads, write_startup_file

pytestmark = pytest.mark.slow

# transformers' image processors import torchvision; diffusers' SD pipeline imports them.
USER_CODE = ("from diffusers import StableDiffusionPipeline; from transformers import CLIPImageProcessor; "
             "import torchvision.transforms.functional; "
             "print(sorted(m for m in sys.modules if m.split('.')[0] in ('export', 'zoo', 'services')))")


def _fresh(code: str, cwd: Path) -> subprocess.CompletedProcess:
    env = {"PATH": "/usr/bin:/bin", "HF_HUB_OFFLINE": "1"}  # no PYTHONPATH: nothing of ours on the path
    return subprocess.run([sys.executable, "-c", code], cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=300)


def test_the_startup_file_makes_diffusers_import_in_a_fresh_process(tmp_path):
    write_startup_file(tmp_path)
    run = _fresh(f"import site, sys; site.addsitedir({str(tmp_path)!r}); {USER_CODE}", tmp_path)
    assert run.returncode == 0, run.stderr[-2000:]
    assert run.stdout.strip() == "[]"  # the hook was loaded by path: no package of ours imported
    if not _extension_loads():  # the environment this exists for: without the file, the error users met
        bare = _fresh(f"import sys; {USER_CODE}", tmp_path)
        assert bare.returncode != 0 and "torchvision::nms does not exist" in bare.stderr


def test_the_installed_environment_has_it():
    """`make install` wrote it into this environment's site-packages (the check CI runs)."""
    installed = Path(sysconfig.get_paths()["purelib"]) / STARTUP_FILE
    if not installed.exists():
        pytest.fail(f"{installed} is missing: `make install` writes it (python -m export.torchvision_compat)")
    run = _fresh(f"import sys; {USER_CODE}", Path("/"))
    assert run.returncode == 0, run.stderr[-2000:]
