"""torchrun, reporting a failed worker in one line instead of a traceback (scripts/launch.sh starts it).

  python -m llama_mp.torchrun TORCHRUN_ARGS... -m MODULE ARGS...      (the arguments of `torchrun`)

A worker that meets bad input prints one `error:` line naming the file and exits 2 (llama_mp.cli.run). torchrun
answers any worker's non-zero exit with its own error log lines and a ChildFailedError traceback, so the one line
would drown. Here the launcher's process-failure log is off; the failed ranks that torchrun did not end itself (its
SIGTERM to the others once one fails) are the causes; causes that all exited 2 add nothing to the workers' own lines,
any others get one line per rank (an exit code, or the signal that ended it); the launcher exits with the first
cause's code (128 + the signal number for a signal, as a shell reports it).
"""

import logging
import signal
import sys

from torch.distributed import run as torchrun
from torch.distributed.elastic.multiprocessing.errors import ChildFailedError

# after the import above, which creates the logger (with the level of LOGLEVEL, default WARNING)
PROCESS_LOG = "torch.distributed.elastic.multiprocessing.api"


def main(argv: list[str]) -> int:
    logging.getLogger(PROCESS_LOG).setLevel(logging.CRITICAL)  # "failed (exitcode: 2) ...", "Sending process ..."
    try:
        torchrun.run(torchrun.parse_args(argv))
    except ChildFailedError as err:
        failures = sorted(err.failures.items())
        # torchrun ends the other workers with SIGTERM once one fails: those are not causes
        causes = [(rank, f) for rank, f in failures if f.exitcode != -signal.SIGTERM] or failures
        if any(failure.exitcode != 2 for _, failure in causes):
            for rank, failure in causes:
                how = (f"signal {-failure.exitcode} ({failure.signal_name()})" if failure.exitcode < 0
                       else f"exit code {failure.exitcode}")
                print(f"error: {err.name}: rank {rank} ended with {how}", file=sys.stderr)
        code = causes[0][1].exitcode
        return 128 - code if code < 0 else code
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
