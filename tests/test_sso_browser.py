"""The SSO portal in a real browser [7]: headless Chromium, driven with Selenium and
Debian's chromedriver, logs in through the page, sees its session, logs out; a wrong
password shows a clear error.  Screenshots are saved for review (in the test's
folder, or in $MAILGW_SCREENSHOTS)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from twisted.internet import reactor
from twisted.internet.threads import blockingCallFromThread
from twisted.trial.unittest import TestCase

from tests.edge import in_thread
from tests.gateway import start_gateway
from tests.servers.base import require_binary
from tests.servers.dovecot import Dovecot
from tests.servers.pki import TestPKI

VPN_USERS: dict[str, tuple[str, str | None]] = {"bob": ("bob-vpn", None)}


class BrowserPortalTests(TestCase):
    timeout = 90

    async def test_loginSessionLogout(self) -> None:
        """Through the page: a wrong password shows the error and adds nothing; the
        right one shows "Logged in as bob" and adds the portal entry; "Log out" ends
        it."""
        chromium = require_binary("chromium", "chromium")
        chromedriver = require_binary("chromedriver", "chromium-driver")
        try:
            from selenium import webdriver
            from selenium.common.exceptions import StaleElementReferenceException, TimeoutException
            from selenium.webdriver.chrome.service import Service
            from selenium.webdriver.common.by import By
            from selenium.webdriver.support.ui import WebDriverWait
        except ImportError:
            if os.environ.get("CI") == "true":
                raise
            self.skipTest("selenium is not installed (pip install selenium)")
        dovecot = Dovecot.started(self, users={"bob": "bob-mail"})
        pki = TestPKI(Path(self.mktemp()).absolute())
        gateway = start_gateway(
            self,
            pki,
            VPN_USERS,
            {"default_server": {"host": "127.0.0.1", "port": dovecot.pop3_port, "tls": "none"}},
            sso={"pop3": {"enabled": True, "portal": "ssl:0:interface=127.0.0.1", "policy": ["127.0.0.0/8"]}},
        )
        service = gateway.service
        assert service is not None and service.identities is not None
        identities = service.identities
        url = f"https://127.0.0.1:{service._portal.port.getHost().port}/"
        shots = Path(os.environ.get("MAILGW_SCREENSHOTS") or self.mktemp()).absolute()
        shots.mkdir(parents=True, exist_ok=True)

        def lookup(ip: str) -> Any:
            # The table belongs to the reactor thread.
            return blockingCallFromThread(reactor, identities.lookup, ip)  # type: ignore[arg-type]

        def browse() -> dict[str, Any]:
            options = webdriver.ChromeOptions()
            options.binary_location = chromium
            for argument in ("--headless=new", "--no-sandbox", "--ignore-certificate-errors",
                             "--disable-dev-shm-usage", "--window-size=390,844"):
                options.add_argument(argument)
            driver = webdriver.Chrome(service=Service(executable_path=chromedriver), options=options)
            seen: dict[str, Any] = {}

            def page_with(text: str) -> str:
                """The page's text once it shows C{text} (the click's navigation is
                asynchronous)."""
                wait = WebDriverWait(driver, 15, ignored_exceptions=(StaleElementReferenceException,))
                try:
                    wait.until(lambda d: text in d.find_element(By.TAG_NAME, "body").text)
                except TimeoutException:
                    pass
                return str(driver.find_element(By.TAG_NAME, "body").text)

            try:
                driver.set_page_load_timeout(30)
                driver.get(url)
                driver.find_element(By.ID, "user").send_keys("bob")
                driver.find_element(By.ID, "password").send_keys("wrong")
                driver.find_element(By.CSS_SELECTOR, "form button[type=submit]").click()
                seen["wrong"] = page_with("Wrong user name")
                seen["entry_after_wrong"] = lookup("127.0.0.1")
                driver.save_screenshot(str(shots / "portal-wrong-password.png"))
                driver.find_element(By.ID, "user").clear()
                driver.find_element(By.ID, "user").send_keys("bob")
                driver.find_element(By.ID, "password").send_keys("bob-vpn")
                driver.find_element(By.CSS_SELECTOR, "form button[type=submit]").click()
                seen["logged_in"] = page_with("Logged in as")
                seen["entry"] = lookup("127.0.0.1")
                driver.save_screenshot(str(shots / "portal-logged-in.png"))
                driver.find_element(By.XPATH, "//form[@action='/logout']//button").click()
                seen["logged_out"] = page_with("logged out")
                seen["entry_after_logout"] = lookup("127.0.0.1")
            finally:
                driver.quit()
            return seen

        seen = await in_thread(browse)
        self.assertIn("Wrong user name or password", seen["wrong"])
        self.assertIsNone(seen["entry_after_wrong"])
        self.assertIn("Logged in as bob", seen["logged_in"])
        self.assertEqual(seen["entry"].user, "bob")
        self.assertEqual(seen["entry"].source.value, "portal")
        self.assertIn("logged out", seen["logged_out"].lower())
        self.assertIsNone(seen["entry_after_logout"])
        for name in ("portal-wrong-password.png", "portal-logged-in.png"):
            self.assertGreater((shots / name).stat().st_size, 10_000)
