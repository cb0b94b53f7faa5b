"""Test-only: on PYTHONPATH, makes every engine step of a served subprocess take R1DEPLOY_TEST_STEP_S
seconds longer (one process or tensor-parallel rank 0), so a test can SIGTERM it or kill a worker while
requests are surely still in flight."""

import os
import time

from r1deploy.distributed.executor import MultiprocExecutor
from r1deploy.worker.executor import LocalExecutor

_delay = float(os.environ.get("R1DEPLOY_TEST_STEP_S", "0"))


def _slowed(execute):
    def slow_execute(self, *args, **kwargs):
        time.sleep(_delay)
        return execute(self, *args, **kwargs)

    return slow_execute


LocalExecutor.execute = _slowed(LocalExecutor.execute)
MultiprocExecutor.execute = _slowed(MultiprocExecutor.execute)
