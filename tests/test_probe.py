"""harness.workers.probe in-process: what it counts is what is there."""

from __future__ import annotations

import asyncio
import socket
import threading

from harness.workers.probe import PROBE_TEMPLATE, Probe, install, tcp_connections_to


def test_it_counts_connections_to_a_port() -> None:
    server = socket.create_server(("127.0.0.1", 0))
    port = server.getsockname()[1]
    try:
        assert tcp_connections_to(port) == 0
        client = socket.create_connection(("127.0.0.1", port))
        accepted, _ = server.accept()
        assert tcp_connections_to(port) == 1
        client.close()
        accepted.close()
        assert tcp_connections_to(port) == 0
    finally:
        server.close()


def test_it_counts_what_a_run_leaves_open() -> None:
    install()
    probe = Probe(db_port=None)
    before = probe.before()
    clean = probe.after(before)
    assert (clean.open_loops, clean.pending_tasks, clean.new_threads) == (0, 0, ())

    leaked = asyncio.new_event_loop()
    task = leaked.create_task(asyncio.sleep(10))  # never run: pending for good
    stop = threading.Event()
    thread = threading.Thread(target=stop.wait, name="left-running")
    thread.start()
    try:
        left = probe.after(before)
        assert (left.open_loops, left.pending_tasks, left.new_threads) == (1, 1, ("left-running",))
        assert left.line(7) == PROBE_TEMPLATE.format(
            run_id=7, open_loops=1, pending_tasks=1, new_threads="left-running", db_connections=0
        )
    finally:
        stop.set()
        thread.join()
        task.cancel()
        leaked.run_until_complete(asyncio.sleep(0))
        leaked.close()
    assert probe.after(before).open_loops == 0
