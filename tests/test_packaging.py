"""twistd finds the mailgw plugin after ``pip install .`` and after ``pip install -e .``
alike (setuptools' default editable mode would hide twisted/plugins/; setup.cfg's
``package_dir`` keeps the simple layout whose .pth exposes it)."""

from __future__ import annotations

import os
import sys
from pathlib import Path

from twisted.internet.utils import getProcessOutputAndValue
from twisted.trial.unittest import SkipTest, TestCase

ROOT = Path(__file__).resolve().parent.parent


class InstallTests(TestCase):
    # Two pip installs into a fresh venv (dependencies come from pip's cache).
    timeout = 600

    async def sh(self, executable: str, *args: str, cwd: Path | None = None) -> str:
        # trial -j passes its sys.path to its workers in PYTHONPATH: the fresh venv
        # must not see this checkout's packages through it.
        env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
        env["PIP_DISABLE_PIP_VERSION_CHECK"] = "1"
        out, err, code = await getProcessOutputAndValue(executable, list(args), env=env, path=str(cwd or ROOT))
        text: str = (out + err).decode(errors="replace")
        self.assertEqual(code, 0, f"{executable} {' '.join(args)}:\n{text[-3000:]}")
        return text

    async def test_twistdListsPluginRegularAndEditable(self) -> None:
        """`twistd --help` lists mailgw after a regular and after an editable install,
        run from a folder outside the checkout."""
        if not (ROOT / "setup.cfg").exists():
            raise SkipTest("not running from a source checkout")
        venv = Path(self.mktemp()).absolute()
        await self.sh(sys.executable, "-m", "venv", str(venv))
        pip = str(venv / "bin" / "pip")
        outside = venv.parent
        # Only Twisted is needed for plugin discovery; --no-deps keeps it fast.
        await self.sh(pip, "install", "-q", "Twisted")
        for editable in (False, True):
            target = ["-e", str(ROOT)] if editable else [str(ROOT)]
            await self.sh(pip, "install", "-q", "--no-deps", *target, cwd=outside)
            helptext = await self.sh(str(venv / "bin" / "twistd"), "--help", cwd=outside)
            self.assertIn("mailgw", helptext, f"editable={editable}")
            await self.sh(pip, "uninstall", "-q", "-y", "mailgw", cwd=outside)
            helptext = await self.sh(str(venv / "bin" / "twistd"), "--help", cwd=outside)
            self.assertNotIn(" mailgw ", helptext, f"uninstalled after editable={editable}")
