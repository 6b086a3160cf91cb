"""The `osx` process and signals: Ctrl-C (SIGINT) and `kill` (SIGTERM) reach it whatever it inherited."""

import signal
import subprocess
import sys


def test_the_osx_process_honours_ctrl_c_whatever_it_inherited():
    """Started with SIGINT ignored and blocked (as Ray starts its processes, or nohup), `osx` still stops on Ctrl-C:
    its entry point puts Python's handler back and unblocks SIGINT and SIGTERM (checked in /proc as the kernel sees it)."""
    def inherited():
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT, signal.SIGTERM})

    probe = ("import signal; from osx.cli import _honour_interrupts; s = lambda: [l.split()[1] for l in open('/proc/thread-self/status') "
             "if l.startswith(('SigBlk', 'SigIgn'))]; print(s()); _honour_interrupts(); print(s()); "
             "print(signal.getsignal(signal.SIGINT) is signal.default_int_handler)")
    out = subprocess.run([sys.executable, "-c", probe], preexec_fn=inherited, capture_output=True, text=True, timeout=60).stdout.split("\n")
    before, after = eval(out[0]), eval(out[1])
    bits = (1 << (signal.SIGINT - 1)) | (1 << (signal.SIGTERM - 1))
    assert int(before[0], 16) & bits == bits and int(before[1], 16) & (1 << (signal.SIGINT - 1))  # the inherited state
    assert int(after[0], 16) & bits == 0 and not int(after[1], 16) & (1 << (signal.SIGINT - 1)) and out[2] == "True"
