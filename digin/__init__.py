"""DiG-IN as a service. The repository's folders install as subpackages of this one through
pyproject's package mapping: ``digin.core`` (core/, the guidance core), ``digin.api`` (api/, HTTP),
``digin.service`` (service/, the service layer), ``digin.worker`` (worker/), and this folder holds
the command line (``digin.cli``).

From a source checkout that is not installed (a bare GPU machine with the tree on PYTHONPATH, or
``python -m digin`` before ``pip install``), the mapping is not in effect: the checkout's root is
then searched too, so that ``digin.core`` is ``core/`` there as it is once installed.
"""

from pathlib import Path

_ROOT = Path(__file__).resolve().parent.parent
if (_ROOT / "pyproject.toml").is_file() and (_ROOT / "core" / "__init__.py").is_file():
    __path__.append(str(_ROOT))
