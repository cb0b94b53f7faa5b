"""Test-only: on PYTHONPATH, makes every engine step of a served subprocess take R1DEPLOY_TEST_STEP_S
seconds longer, so a test can SIGTERM it while requests are surely still in flight."""

import os
import time

from r1deploy.worker.executor import LocalExecutor

_delay = float(os.environ.get("R1DEPLOY_TEST_STEP_S", "0"))
_run = LocalExecutor.execute


def _slow_run(self, *args, **kwargs):
    time.sleep(_delay)
    return _run(self, *args, **kwargs)


LocalExecutor.execute = _slow_run
