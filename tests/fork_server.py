"""A zygote for the crash tests: imports torch, Lightning and lit_ti once, then forks one training process per
request, so each of many killed runs starts in a second instead of paying the imports again.

Protocol (one JSON object per line): stdin `{"run": [overrides...], "log": path}` -> stdout `{"pid": N}`;
stdin `{"wait": N}` -> stdout `{"status": S}` (a negative status is the killing signal). The zygote itself
runs no tensor code, so each child starts its thread pools fresh.
"""

import json
import os
import sys
import time


def child(overrides: list[str], log: str) -> None:
    fd = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    os.dup2(fd, 1)
    os.dup2(fd, 2)
    replace = os.replace

    def slow_replace(src, dst):
        time.sleep(0.05)  # widen the window between writing a temp file and renaming it, so kills land there
        replace(src, dst)

    os.replace = slow_replace
    code = 0
    try:
        from tests.conftest import compose

        lit_ti.train.main(compose(*overrides))
    except SystemExit as e:
        code = e.code if isinstance(e.code, int) else 1
    except BaseException:
        import traceback

        traceback.print_exc()
        code = 1
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


if __name__ == "__main__":
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    import lightning  # noqa: F401
    import torch  # noqa: F401

    import lit_ti.methods
    import lit_ti.train

    print(json.dumps({"ready": True}), flush=True)
    for line in sys.stdin:
        request = json.loads(line)
        if "run" in request:
            pid = os.fork()
            if pid == 0:
                child(request["run"], request["log"])
            print(json.dumps({"pid": pid}), flush=True)
        elif "wait" in request:
            _, status = os.waitpid(request["wait"], 0)
            print(json.dumps({"status": os.waitstatus_to_exitcode(status)}), flush=True)
