"""Names that moved keep working, with a DeprecationWarning naming the new place."""

from __future__ import annotations

import subprocess
import sys


def test_recoverkit_dist_still_imports_with_a_warning() -> None:
    code = (
        "import warnings\n"
        "with warnings.catch_warnings(record=True) as w:\n"
        "    warnings.simplefilter('always')\n"
        "    from recoverkit.dist.sharded import ShardedTensor\n"
        "    from recoverkit.dist.commit import commit_step\n"
        "import recoverkit, recoverkit.distributed.commit as c\n"
        "assert ShardedTensor is recoverkit.ShardedTensor\n"
        "assert commit_step is c.commit_step\n"
        "msgs = [str(x.message) for x in w if issubclass(x.category, DeprecationWarning)]\n"
        "assert any('recoverkit.distributed' in m for m in msgs), msgs\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)
