"""pytest plugin (``pytest11`` entry point ``qtta``): the conformance kit for backend adapters.

A third-party adapter (``qtta-mybackend``) is checked against the same assertions as torchao,
Brevitas and NNCF (:mod:`qtta_plugins.conformance`) with::

    pytest --qtta-backend=mybackend                     # the kit's checks, both model families
    pytest --qtta-backend=mybackend --qtta-family=bncnn  # the BatchNorm CNN only

which adds the kit's tests (:mod:`qtta_plugins.conformance_tests`) to the session, next to the
project's own. Or use the fixtures in your own tests: ``qtta_backend`` (the backend named by
``--qtta-backend``; override it in a ``conftest.py`` to fix yours), ``qtta_family`` and
``qtta_case`` (a :class:`~qtta_plugins.conformance.Case`: float model, its quantized version,
inputs)::

    import pytest
    from qtta_plugins import conformance

    @pytest.fixture(scope="session")
    def qtta_backend():
        return "mybackend"

    @pytest.mark.parametrize("check", conformance.CHECKS)
    def test_kit(check, qtta_case):
        check(qtta_case)

An adapter without an export path declares it (its ``qtta_export`` raises
``UnsupportedExportError`` saying so) and the export check is skipped with that reason; one that
does not implement ``qtta_export`` fails it (:mod:`qtta_plugins.conformance`).

A session that passes no ``--qtta-*`` option is left as it was: nothing is collected, no fixture is
autouse, nothing is printed, and this module imports neither torch nor any backend (the kit is
imported by the fixtures, when a test asks for them).
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import pytest

if TYPE_CHECKING:
    from .conformance import Case

# the kit's assertions report their operands, as in the user's own test files
pytest.register_assert_rewrite("qtta_plugins.conformance")

KIT_TESTS = Path(__file__).with_name("conformance_tests.py")
_FAMILIES = ("bncnn", "vit")  # qtta_plugins.conformance.FAMILIES, without importing torch


def pytest_addoption(parser: pytest.Parser) -> None:
    group = parser.getgroup("qtta", "qtta-plugins conformance kit for backend adapters")
    group.addoption(
        "--qtta-backend",
        action="append",
        default=[],
        metavar="NAME",
        help="run the qtta-plugins conformance kit against the adapter of backend NAME "
        "(repeatable)",
    )
    group.addoption(
        "--qtta-family",
        action="append",
        default=[],
        choices=_FAMILIES,
        help="model family of the conformance kit's cases (repeatable; default: all)",
    )


def pytest_configure(config: pytest.Config) -> None:
    if config.getoption("qtta_backend") and str(KIT_TESTS) not in config.args:
        config.args.append(str(KIT_TESTS))


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    backends = metafunc.config.getoption("qtta_backend")
    if backends and "qtta_backend" in metafunc.fixturenames:
        metafunc.parametrize("qtta_backend", list(dict.fromkeys(backends)), scope="session")
    if "qtta_family" in metafunc.fixturenames:
        families = metafunc.config.getoption("qtta_family") or _FAMILIES
        metafunc.parametrize("qtta_family", list(dict.fromkeys(families)), scope="session")


@pytest.fixture(scope="session")
def qtta_backend() -> str:
    """The backend the kit checks: each ``--qtta-backend`` value (override this fixture to fix
    one)."""
    pytest.skip(
        "no backend to check: pass --qtta-backend=NAME or override the qtta_backend fixture"
    )


@pytest.fixture(scope="session")
def qtta_family() -> str:
    """The model family of the case: each ``--qtta-family`` value, by default every family (the
    plugin parametrizes it; choose with ``--qtta-family``)."""
    return _FAMILIES[0]  # pragma: no cover - always parametrized by pytest_generate_tests


@pytest.fixture(scope="session")
def qtta_case(qtta_backend: str, qtta_family: str) -> Case:
    """A :class:`~qtta_plugins.conformance.Case`: a float ``qtta_family`` model quantized by
    ``qtta_backend`` at W4A4 (first / last layers 8 bit), and its calibration and test inputs."""
    from .conformance import make_case

    return make_case(qtta_backend, qtta_family)
