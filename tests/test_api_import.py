"""`import ckptd; ckptd.fit(...)`: the API re-exported lazily from the package (issue 26)."""

from __future__ import annotations

import subprocess
import sys

import pytest


def test_import_ckptd_loads_nothing_of_the_worker_until_used() -> None:
    code = (
        "import sys, ckptd\n"
        "before = sorted(m for m in sys.modules if m.startswith(('ckptd.worker', 'tensorflow', 'keras')))\n"
        "import ckptd.worker.api as api\n"
        "same = [getattr(ckptd, n) is getattr(api, n) for n in ckptd.__all__]\n"
        "print(before, all(same), 'tensorflow' in sys.modules)\n"
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert r.stdout.split() == ["[]", "True", "False"], r.stdout


def test_an_unknown_name_is_an_attribute_error() -> None:
    import ckptd

    with pytest.raises(AttributeError, match="no_such_thing"):
        ckptd.no_such_thing  # noqa: B018
