"""Gradient averaging through shared memory between forked training processes."""

from __future__ import annotations

import multiprocessing
import os
import signal
import time

import pytest
import torch

from mlpmixer.shared_grads import SharedGradients


def _params(rank: int) -> list[torch.nn.Parameter]:
    """Different starting values in every process, and gradients that depend on the rank."""
    torch.manual_seed(rank)
    params = [torch.nn.Parameter(torch.randn(3, 4)), torch.nn.Parameter(torch.randn(5))]
    for i, p in enumerate(params):
        p.grad = torch.full_like(p, float(10 * rank + i))
    return params


def _worker(shared: SharedGradients, rank: int, results) -> None:
    code = 0
    try:
        params = _params(rank)
        shared.attach(rank, params)
        after_attach = [p.detach().clone() for p in params]
        assert all(torch.all(p.grad == 10 * rank + i) for i, p in enumerate(params))  # gradients untouched
        shared.average()
        # Plain lists: tensors would travel as shared memory that dies with this process.
        results.put((rank, [t.tolist() for t in after_attach], [p.grad.tolist() for p in params]))
    except Exception as e:  # pragma: no cover - reported through the queue
        results.put((rank, repr(e), None))
        code = 1
    finally:
        os._exit(code)


@pytest.mark.parametrize("world", [2, 3])
def test_processes_start_equal_and_average_their_gradients(world: int) -> None:
    ctx = multiprocessing.get_context("fork")
    shared = SharedGradients(world)
    results = ctx.SimpleQueue()  # written at once (a Queue's feeder thread would not survive os._exit)
    procs = [ctx.Process(target=_worker, args=(shared, rank, results)) for rank in range(world)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout=60)
    assert all(p.exitcode is not None for p in procs), "a process hung"
    got = {}
    for rank, start, grads in (results.get() for _ in procs):
        assert grads is not None, start  # the process's error
        got[rank] = [torch.tensor(t) for t in start], [torch.tensor(g) for g in grads]
    rank0 = _params(0)
    for rank in range(world):
        start, grads = got[rank]
        assert all(torch.equal(a, b.detach()) for a, b in zip(start, rank0))  # everyone starts from rank 0
        mean = sum(10 * r for r in range(world)) / world
        assert torch.allclose(grads[0], torch.full((3, 4), mean))
        assert torch.allclose(grads[1], torch.full((5,), mean + 1))
        assert all(torch.equal(g, h) for g, h in zip(grads, got[0][1]))  # the same bits everywhere


def _stops_early(shared: SharedGradients) -> None:
    shared.abort()  # what a failing process does before it exits
    os._exit(1)


def test_a_failed_process_releases_the_others() -> None:
    ctx = multiprocessing.get_context("fork")
    shared = SharedGradients(2)
    other = ctx.Process(target=_stops_early, args=(shared,))
    other.start()
    other.join(timeout=60)
    with pytest.raises(ChildProcessError, match="Another training process stopped"):
        shared.attach(0, _params(0))  # would wait for the other process for ever otherwise
    shared.close()


def _stops_on_its_error(shared: SharedGradients, rank: int, attached) -> None:
    shared.attach(rank, _params(rank))
    attached.wait(60)  # both out of the barrier of attach: an abort while one is still in it breaks it there
    shared.abort("The data of rank 1 are bad; fix them.")  # as train.py's forked child tells its one sentence
    os._exit(1)


def test_a_process_that_stopped_on_its_error_is_not_said_to_have_died() -> None:
    """Once it has exited, the watch finds it gone: its sentence was lost for "died (killed?)"."""
    from mlpmixer import shared_grads

    ctx = multiprocessing.get_context("fork")
    shared = SharedGradients(2)
    attached = ctx.Event()
    child = ctx.Process(target=_stops_on_its_error, args=(shared, 1, attached))
    child.start()
    shared.attach(0, _params(0))
    attached.set()
    child.join(timeout=60)
    time.sleep(3 * shared_grads.WATCH_S)  # the watch has seen the child gone
    with pytest.raises(ValueError, match=r"^The data of rank 1 are bad; fix them.$"):
        shared.average()
    shared.close()


def _killed_after_attach(shared: SharedGradients, rank: int) -> None:
    shared.attach(rank, _params(rank))
    os.kill(os.getpid(), signal.SIGKILL)  # as the out-of-memory killer would: no abort, no exception


def _reports(shared: SharedGradients, rank: int, results) -> None:
    try:
        shared.attach(rank, _params(rank))
        shared.average()
        results.put("passed the barrier")
    except ChildProcessError as e:
        results.put(str(e))
    finally:
        os._exit(0)


def test_a_killed_process_releases_the_others_at_once() -> None:
    """A process that dies without a word (SIGKILL) stops the others within seconds, not WAIT_S."""
    ctx = multiprocessing.get_context("fork")
    # The killed one is rank 0, as when the parent of `mixer train --processes 2` is killed.
    shared, results = SharedGradients(2), ctx.SimpleQueue()
    procs = [ctx.Process(target=_killed_after_attach, args=(shared, 0)),
             ctx.Process(target=_reports, args=(shared, 1, results))]
    start = time.monotonic()
    for p in procs:
        p.start()
    procs[1].join(timeout=60)
    assert procs[1].exitcode == 0 and time.monotonic() - start < 30
    assert results.get() == "Training process 0 of 2 died (killed?); the saved training states are kept: add " \
                            "--resume to go on."
    procs[0].join()
    # This process as rank 0, its child killed (not yet reaped: a zombie counts as dead).
    shared = SharedGradients(2)
    child = ctx.Process(target=_killed_after_attach, args=(shared, 1))
    child.start()
    shared.attach(0, _params(0))
    with pytest.raises(ChildProcessError, match="Training process 1 of 2 died"):
        shared.average()
    child.join()
    shared.close()
