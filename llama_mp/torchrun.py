"""torchrun, reporting a failed worker in one line instead of a traceback (scripts/launch.sh starts it).

  python -m llama_mp.torchrun TORCHRUN_ARGS... -m MODULE ARGS...      (the arguments of `torchrun`)

A worker that meets bad input prints one `error:` line naming the file and exits 2 (llama_mp.cli.run). torchrun
answers any worker's non-zero exit with its own log lines and a ChildFailedError traceback, so the one line would
drown. Here:
- torchrun's two routine lines about a failure ("failed (exitcode ...", "Sending process ... closing signal") are
  dropped; its other log lines (a worker that will not stop, ...) stay;
- a rank that exited 2 met bad input and said so: the launcher adds nothing and exits 2, whatever the other ranks did
  (they end by torchrun's SIGTERM, its SIGKILL after a grace period, or an error of their own once a peer left);
- otherwise the causes are the failed ranks torchrun did not end itself (its SIGTERM, or SIGKILL when another rank has
  a cause of its own), one line each (an exit code, or the signal that ended it), and the launcher exits with the
  lowest such rank's code (128 + the signal number for a signal, as a shell reports it).
"""

import logging
import signal
import socket
import sys

from torch.distributed import run as torchrun
from torch.distributed.elastic.multiprocessing.errors import ChildFailedError

ROUTINE = ("failed (exitcode", "Sending process")  # torchrun's lines about a failure this module reports itself


def not_routine(record: logging.LogRecord) -> bool:
    return not str(record.msg).startswith(ROUTINE)


def causes(failures: dict) -> list:
    """(rank, failure) of the ranks that failed of themselves, lowest rank first."""
    failed = sorted(failures.items())
    own = [(rank, f) for rank, f in failed if f.exitcode not in (-signal.SIGTERM, -signal.SIGKILL)]
    killed = [(rank, f) for rank, f in failed if f.exitcode == -signal.SIGKILL]
    return own or killed or failed


def main(argv: list[str]) -> int:
    # (the import above created this logger)
    logging.getLogger("torch.distributed.elastic.multiprocessing.api").addFilter(not_routine)
    try:
        torchrun.run(torchrun.parse_args(argv))
    except ChildFailedError as err:
        if any(f.exitcode == 2 for f in err.failures.values()):
            return 2
        found = causes(err.failures)
        for rank, f in found:
            how = f"signal {-f.exitcode} ({f.signal_name()})" if f.exitcode < 0 else f"exit code {f.exitcode}"
            print(f"error: {err.name}: rank {rank} on {socket.gethostname()} ended with {how}", file=sys.stderr)
        code = found[0][1].exitcode
        return 128 - code if code < 0 else code
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
