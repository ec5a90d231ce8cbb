"""The browser the report's browser test drives: one already on the machine is used (CHROME_BIN
or the usual names), and when none can be had the message says what to install."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests import browser


def executable(folder: Path, name: str) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / name
    path.write_text("#!/bin/sh\nexit 0\n")
    path.chmod(0o755)
    return path


def test_chrome_bin_is_honoured_before_the_usual_names(tmp_path: Path) -> None:
    mine = executable(tmp_path / "mine", "my-chrome")
    executable(tmp_path / "bin", "chromium")
    found = browser.find_browser({"CHROME_BIN": str(mine)}, path=str(tmp_path / "bin"))
    assert found == str(mine)


@pytest.mark.parametrize("name", browser.BROWSER_NAMES)
def test_each_usual_name_is_found_on_the_path(tmp_path: Path, name: str) -> None:
    binary = executable(tmp_path / "bin", name)
    assert browser.find_browser({}, path=str(tmp_path / "bin")) == str(binary)


def test_a_chrome_bin_that_is_not_there_says_what_to_install(tmp_path: Path) -> None:
    with pytest.raises(browser.NoBrowser) as caught:
        browser.find_browser({"CHROME_BIN": str(tmp_path / "nope")}, path=str(tmp_path))
    assert f"CHROME_BIN={tmp_path / 'nope'} is not an executable" in str(caught.value)
    assert "apt-get install chromium" in str(caught.value)


def test_without_root_nothing_is_installed_and_the_message_says_what_to(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("PATH", str(tmp_path))  # no browser, and no apt-get either
    monkeypatch.delenv("CHROME_BIN", raising=False)
    monkeypatch.setattr(browser.os, "geteuid", lambda: 1000)
    with pytest.raises(browser.NoBrowser) as caught:
        browser.ensure_chromium()
    message = str(caught.value)
    assert message.startswith("no Chromium or Chrome found (chromium, chromium-browser, ")
    assert "brew install --cask chromium" in message and "CHROME_BIN" in message
