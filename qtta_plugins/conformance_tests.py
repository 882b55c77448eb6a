"""The conformance kit as pytest tests: collected only when ``pytest --qtta-backend=NAME`` asks
for it (:mod:`qtta_plugins.pytest_plugin` adds this file to the session), once for each backend
named and each model family (``--qtta-family``, default both). Its fixtures come from the plugin.
"""

from __future__ import annotations

import pytest

from qtta_plugins import conformance


@pytest.mark.parametrize(
    "check", conformance.CHECKS, ids=[c.__name__.removeprefix("check_") for c in conformance.CHECKS]
)
def test_conformance(check, qtta_case):
    check(qtta_case)
