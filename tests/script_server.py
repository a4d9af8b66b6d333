"""Runs the training scripts many times, fast: this process loads torch and the scripts' libraries once,
then forks a child for each run, which runs the script as `python script.py args` would, in its own
working folder, with its own stdout, stderr and exit status.

For the fuzz test, where a fresh Python that loads torch for each of a hundred draws would take minutes.
Requests are JSON lines on stdin, {"script", "args", "cwd", "timeout"}; each answer is a JSON line on
stdout, {"status", "stdout", "stderr"}, status None where the run outlived its timeout and was killed.
"""
import json
import os
import runpy
import signal
import sys
import tempfile
import time
import traceback

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

import common  # noqa: E402,F401  (what every child needs, loaded once here: the point of this server)
import imageio.v2  # noqa: E402,F401
import matplotlib  # noqa: E402

matplotlib.use('Agg')
import matplotlib.pyplot  # noqa: E402,F401
import torchvision.transforms.functional  # noqa: E402,F401
import torchvision.utils  # noqa: E402,F401


def run_script(script, args, stdout_path, stderr_path):
    """In the child: run the script as the interpreter would and exit with its status."""
    for fd, path in ((1, stdout_path), (2, stderr_path)):
        os.dup2(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC), fd)
    sys.argv = [os.path.join(REPO, script), *args]
    status = 0
    try:
        runpy.run_path(sys.argv[0], run_name='__main__')
    except SystemExit as stop:
        if isinstance(stop.code, str):
            print(stop.code, file=sys.stderr)
        status = stop.code if isinstance(stop.code, int) else stop.code is not None
    except BaseException:  # noqa: B036  what the interpreter prints for an uncaught exception, and its status
        traceback.print_exc()
        status = 1
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(status)


def serve(request):
    with tempfile.TemporaryDirectory() as outputs:
        stdout_path, stderr_path = os.path.join(outputs, 'stdout'), os.path.join(outputs, 'stderr')
        pid = os.fork()
        if pid == 0:
            os.chdir(request['cwd'])
            run_script(request['script'], request['args'], stdout_path, stderr_path)
        deadline = time.monotonic() + request['timeout']
        while (finished := os.waitpid(pid, os.WNOHANG))[0] == 0 and time.monotonic() < deadline:
            time.sleep(0.01)
        if finished[0] == 0:
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
            status = None
        else:
            status = os.waitstatus_to_exitcode(finished[1])
        with open(stdout_path) as out, open(stderr_path) as err:
            return {'status': status, 'stdout': out.read(), 'stderr': err.read()}


if __name__ == '__main__':
    for line in sys.stdin:
        print(json.dumps(serve(json.loads(line))), flush=True)
