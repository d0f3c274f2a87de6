"""Naming the lost process of a multi-process run from the roll call and the backend's error."""

import os
import socket
import subprocess
import sys

import torch

from dkdm.peers import describe_loss, is_peer_failure, lost_ranks

GLOO = ("[/pytorch/third_party/gloo/gloo/transport/tcp/pair.cc:553] Connection closed by peer [127.0.0.1]:23478. "
        "This is typically caused by a remote worker crashing. Check the logs of the remote worker.")


def _dead_pid():
    p = subprocess.Popen([sys.executable, "-c", "pass"])
    p.wait()
    return p.pid


def test_transport_failures_are_peer_failures_and_other_errors_are_not():
    assert is_peer_failure(RuntimeError(GLOO))
    assert is_peer_failure(RuntimeError("Read error [10.0.0.2]:4242: Connection reset by peer"))
    assert is_peer_failure(torch.distributed.DistBackendError("NCCL communicator was aborted"))
    assert not is_peer_failure(RuntimeError("mat1 and mat2 shapes cannot be multiplied (4x3 and 5x6)"))
    assert not is_peer_failure(ValueError("Connection closed by peer"))


def test_the_dead_local_rank_is_named_with_its_pid_and_the_backends_reason():
    here = socket.gethostname()
    dead = _dead_pid()
    roll = [(here, os.getpid()), (here, dead), (here, os.getppid())]
    assert lost_ranks(roll, me=0, wait=0.2) == ([1], [])
    line = describe_loss(RuntimeError(GLOO), roll, me=0)
    assert line == f"rank 1 (pid {dead}) of this run stopped (Connection closed by peer [127.0.0.1]:23478)"


def test_a_rank_on_another_host_is_named_with_its_host_and_without_a_roll_call_no_rank_is_guessed():
    here = socket.gethostname()
    roll = [(here, os.getpid()), ("node-7", 1234)]
    line = describe_loss(RuntimeError(GLOO), roll, me=0)
    assert "another host" in line and "rank 1 on node-7" in line
    assert describe_loss(RuntimeError(GLOO), None, me=0).startswith("another process of this run stopped (")
    # every local peer alive (a collective that failed for another reason): no rank is blamed
    alive = [(here, os.getpid()), (here, os.getppid())]
    assert describe_loss(RuntimeError(GLOO), alive, me=0).startswith("another process of this run stopped")
