"""The detached supervisor (`nbdfabric up --detach`):
`python -m orchestrator.daemon RUN_DIR [--backend process|docker] [--image IMAGE]`.

It serves the OrchestratorService on RUN/orchestrator.sock and lives until Down or SIGTERM
(both stop every node first). Its stderr is RUN/orchestrator.log.
"""

from __future__ import annotations

import asyncio
import logging
import signal
import sys
from pathlib import Path

from .backends.process import RunDir
from .service import AlreadyRunning, hosted


async def serve(run: RunDir, backend: str = "process", image: str | None = None) -> int:
    async with hosted(run, backend, image) as sup:
        loop = asyncio.get_running_loop()
        tasks: set[asyncio.Task[object]] = set()

        def down() -> None:
            task = asyncio.ensure_future(sup.down())
            tasks.add(task)

        for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
            loop.add_signal_handler(sig, down)
        await sup.finished.wait()
    return 0


def main(argv: list[str] | None = None) -> int:
    import argparse

    p = argparse.ArgumentParser(prog="python -m orchestrator.daemon")
    p.add_argument("run_dir")
    p.add_argument("--backend", choices=("process", "docker"), default="process")
    p.add_argument("--image")
    args = p.parse_args(sys.argv[1:] if argv is None else argv)
    logging.basicConfig(
        level=logging.INFO,
        format="%(asctime)s orchestrator[%(process)d] %(levelname)s %(message)s",
        stream=sys.stderr,
    )
    try:
        return asyncio.run(serve(RunDir(Path(args.run_dir)), args.backend, args.image))
    except AlreadyRunning as exc:
        print(f"nbdfabric: {exc}", file=sys.stderr)
        return 1
    except Exception as exc:  # e.g. the docker engine cannot be reached
        if type(exc).__module__.startswith("docker"):
            print(f"nbdfabric: {args.backend} backend: {exc}", file=sys.stderr)
            return 1
        raise


if __name__ == "__main__":
    sys.exit(main())
