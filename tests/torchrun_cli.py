"""The usp-infer CLI, as `torchrun tests/torchrun_cli.py batch ...` runs it, with two test-only twists set by
environment variables that only this helper reads (the library reads none):

- USP_TEST_SLOW_WRITE_S: every video write sleeps this long first (a slow disk or encoder on rank 0);
- USP_TEST_RANK_CWD: a directory name with "{rank}" in it; each rank runs from its own, so relative paths
  (the batch file, outputs) name different files on different ranks, as on nodes without a shared disk;
- USP_TEST_FAIL_WRITE: the file name of an output whose write fails (a full disk).
"""

import os
import time

from usp_infer import media
from usp_infer.cli import main

if "USP_TEST_RANK_CWD" in os.environ:
    os.chdir(os.environ["USP_TEST_RANK_CWD"].format(rank=os.environ["RANK"]))
if "USP_TEST_SLOW_WRITE_S" in os.environ:
    real_write, delay = media.write_video, float(os.environ["USP_TEST_SLOW_WRITE_S"])

    def slow_write(*args, **kwargs):
        time.sleep(delay)
        return real_write(*args, **kwargs)

    media.write_video = slow_write
if "USP_TEST_FAIL_WRITE" in os.environ:
    real_write_video, failing = media.write_video, os.environ["USP_TEST_FAIL_WRITE"]

    def failing_write(path, *args, **kwargs):
        if os.path.basename(path) == failing:
            raise OSError(28, "No space left on device")
        return real_write_video(path, *args, **kwargs)

    media.write_video = failing_write

main()
