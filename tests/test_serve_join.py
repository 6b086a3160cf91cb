"""`osx serve --address`: joining a cluster, with a stand-in for `ray` (no cluster needed). A Ray Client server
that fails to start on a busy head is tried again (bounded); any other failure is reported at once, with the
server's own reason rather than the first line of its traceback."""

import pytest

from osx.commands.serve import _join
from osx.errors import OsxError

SERVER_FAILED = ConnectionAbortedError("Initialization failure from server:\nTraceback (most recent call last):\n"
                                       '  File "proxier.py", line 770\nRuntimeError: Starting Ray client server failed.\n')


class FakeRay:
    def __init__(self, failures):
        self.failures, self.inits, self.shutdowns = list(failures), 0, 0

    def init(self, address, log_to_driver):
        self.inits += 1
        if self.failures:
            raise self.failures.pop(0)

    def shutdown(self):
        self.shutdowns += 1


def test_a_client_server_that_fails_to_start_is_tried_again():
    ray = FakeRay([SERVER_FAILED, SERVER_FAILED])
    _join(ray, "ray://127.0.0.1:10001", pause_s=0)
    assert (ray.inits, ray.shutdowns) == (3, 2)


def test_the_attempts_are_bounded_and_the_reason_is_the_servers():
    ray = FakeRay([SERVER_FAILED] * 5)
    with pytest.raises(OsxError, match=r"ray://127.0.0.1:10001 \(tried 3 times\): Initialization failure from server: "
                                       r"RuntimeError: Starting Ray client server failed\.") as e:
        _join(ray, "ray://127.0.0.1:10001", pause_s=0)
    assert ray.inits == 3 and "ray status" in e.value.hint


def test_no_cluster_fails_at_once():
    ray = FakeRay([ConnectionError("Could not find any running Ray instance. Please specify the one to connect to.")])
    with pytest.raises(OsxError, match=r"cannot join the Ray cluster at auto: Could not find any running Ray instance"):
        _join(ray, "auto", pause_s=0)
    assert (ray.inits, ray.shutdowns) == (1, 0)
