"""twistd finds the mailgw plugin after ``pip install .`` and after ``pip install -e .``
alike (setuptools' default editable mode would hide twisted/plugins/; setup.cfg's
``package_dir`` keeps the simple layout whose .pth exposes it)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

from twisted.internet.utils import getProcessOutputAndValue
from twisted.trial.unittest import SkipTest, SynchronousTestCase, TestCase

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
        run from a folder outside the checkout; the regular install's mailgwctl
        sample-config writes the sample configuration, users file and unit."""
        if not (ROOT / "setup.cfg").exists():
            raise SkipTest("not running from a source checkout")
        venv = Path(self.mktemp()).absolute()
        await self.sh(sys.executable, "-m", "venv", str(venv))
        pip = str(venv / "bin" / "pip")
        outside = venv.parent
        # Plugin discovery needs only Twisted, mailgwctl's parser also cryptography
        # (for the account fields); --no-deps keeps it fast.
        await self.sh(pip, "install", "-q", "Twisted", "cryptography")
        for editable in (False, True):
            target = ["-e", str(ROOT)] if editable else [str(ROOT)]
            await self.sh(pip, "install", "-q", "--no-deps", *target, cwd=outside)
            helptext = await self.sh(str(venv / "bin" / "twistd"), "--help", cwd=outside)
            self.assertIn("mailgw", helptext, f"editable={editable}")
            if not editable:
                # The wheel carries the sample files: something to start from.
                sample = venv.parent / "sample"
                await self.sh(str(venv / "bin" / "mailgwctl"), "sample-config", str(sample), cwd=outside)
                for name in ("mailgw.toml", "users.toml", "mailgw.service"):
                    self.assertEqual((sample / name).read_bytes(), (ROOT / "etc" / name).read_bytes(), name)
            await self.sh(pip, "uninstall", "-q", "-y", "mailgw", cwd=outside)
            helptext = await self.sh(str(venv / "bin" / "twistd"), "--help", cwd=outside)
            self.assertNotIn(" mailgw ", helptext, f"uninstalled after editable={editable}")


class CheckoutTests(SynchronousTestCase):
    """What runs from the checkout leaves no noise in it."""

    def test_generatedCertificateIgnored(self) -> None:
        """twistd -n mailgw --config etc/mailgw.toml generates etc/tls/: git ignores it."""
        if not (ROOT / ".git").exists() or shutil.which("git") is None:
            raise SkipTest("not a git checkout")
        result = subprocess.run(
            ["git", "check-ignore", "etc/tls/gateway.pem", "etc/tls/gateway.key"],
            cwd=ROOT,
            capture_output=True,
            text=True,
            check=False,
        )
        self.assertEqual(result.stdout.split(), ["etc/tls/gateway.pem", "etc/tls/gateway.key"])

    def test_trialTempCleaned(self) -> None:
        """After a green make test, scripts/clean-trial-temp removes trial's folders
        except one a running trial holds (its lock names a live process)."""
        directory = Path(self.mktemp())
        for name in ("_trial_temp", "_trial_temp-1", "_trial_temp-2"):
            (directory / name / "0").mkdir(parents=True)
        (directory / "_trial_temp.lock").symlink_to("999999999")  # a process that is gone
        (directory / "_trial_temp-2.lock").symlink_to(str(os.getpid()))  # alive: this one
        subprocess.run([sys.executable, str(ROOT / "scripts" / "clean-trial-temp")], cwd=directory, check=True)
        self.assertEqual(sorted(p.name for p in directory.iterdir()), ["_trial_temp-2", "_trial_temp-2.lock"])
