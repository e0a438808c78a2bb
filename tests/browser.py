"""Headless Chromium for the page tests: the binary, or a skip that says why (a failure in CI, which installs it)."""

import os
import shutil

import pytest


def chromium() -> str:
    path = shutil.which("chromium") or shutil.which("chromium-browser")
    if path is None:
        if os.environ.get("CI"):
            raise AssertionError("chromium is not installed (.ci/run installs it)")
        pytest.skip("chromium not installed (apt-get install chromium; .ci/run installs it)")
    return path
