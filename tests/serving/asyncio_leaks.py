"""Run inside a Ray actor (`actor.__ray_call__.remote(collect_and_report)`): a module of its own so Ray's
workers import it by name (tests/serving/test_serving_jobs.py)."""
from __future__ import annotations

LEAK = "Task was destroyed but it is pending"


def collect_and_report(replica) -> list[str]:
    """In a model replica's process: run the cycle collector and return what asyncio reported meanwhile (a task
    destroyed while pending is reported when the collector frees it)."""
    import gc
    import logging

    seen: list[str] = []

    class Capture(logging.Handler):
        def emit(self, record):
            seen.append(record.getMessage())

    handler = Capture()
    logging.getLogger("asyncio").addHandler(handler)
    try:
        gc.collect()
    finally:
        logging.getLogger("asyncio").removeHandler(handler)
    return [m for m in seen if LEAK in m]


def plant_leak_and_collect(replica) -> list[str]:
    """Positive control: leave a task pending on a private loop (in a thread of its own), drop it, and collect:
    `collect_and_report` must see asyncio's report, so a real leak could not go unseen."""
    import asyncio
    import threading

    def leak() -> None:
        loop = asyncio.new_event_loop()
        queue: asyncio.Queue = asyncio.Queue()

        async def main() -> None:
            loop.create_task(queue.get())  # waits forever; nobody keeps it
            await asyncio.sleep(0.01)

        loop.run_until_complete(main())
        loop.close()

    thread = threading.Thread(target=leak)
    thread.start()
    thread.join()
    return collect_and_report(replica)
