"""The Python baseline of `cargo run --release --example bench`: acquire+release cycles of the
reference Python `dimutex` (PyPI `dimutex==1.3.1`) against a GCS emulator.

Usage: python python_cycle.py --api-url http://127.0.0.1:PORT --bucket BUCKET
                              --concurrency C --cycles N [--prefix P] [--warmup W]

C asyncio tasks share one aiohttp session (as an application would); task i owns the lock
`{P}w{i}` (one `dimutex.GCS` object) and runs N/C cycles of `acquire()` then `release()`.
Protocol, one JSON object per line:

    start-up: W warm-up cycles per task, then  -> {"ready": true, "dimutex": VERSION}
    stdin "go"                                 -> the N cycles, then
                                                  {"done": true, "cycles": N, "wall_s": ...,
                                                   "user_s": ..., "sys_s": ..., "errors": 0}
    stdin "quit" or EOF                        -> exit 0

The bench reads this process's CPU time from /proc between "go" and "done", exactly as it
reads its own; `user_s`/`sys_s` (getrusage around the cycles) are a cross-check. Nothing but
the cycles runs between the two: stdin is read with a plain blocking read outside them.

`dimutex` turns `STORAGE_EMULATOR_HOST` into an https URL, so the variable is removed before
the import and the emulator URL is passed as `api_url` (no credentials are looked up).
"""

import argparse
import asyncio
import json
import os
import resource
import sys
import time

os.environ.pop('STORAGE_EMULATOR_HOST', None)

import aiohttp  # noqa: E402

import dimutex  # noqa: E402


class _NoToken:
    """Never used: with `api_url` set, dimutex sends no Authorization header."""

    async def get(self) -> str:  # pragma: no cover
        raise RuntimeError('no token in emulator mode')


def _write(obj: dict) -> None:
    sys.stdout.write(json.dumps(obj) + '\n')
    sys.stdout.flush()


async def _worker(lock: 'dimutex.GCS', cycles: int) -> None:
    for _ in range(cycles):
        await lock.acquire()
        await lock.release()


async def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument('--api-url', required=True)
    parser.add_argument('--bucket', required=True)
    parser.add_argument('--concurrency', type=int, default=1)
    parser.add_argument('--cycles', type=int, required=True)
    parser.add_argument('--prefix', default='bench-py/')
    parser.add_argument('--warmup', type=int, default=5)
    args = parser.parse_args()

    # As dimutex builds its own session in emulator mode, shared by all locks.
    session = aiohttp.ClientSession(
        connector=aiohttp.TCPConnector(ssl=False),
        timeout=aiohttp.ClientTimeout(total=10),
    )
    locks = [
        dimutex.GCS(
            bucket=args.bucket,
            name=f'{args.prefix}w{i}',
            api_url=args.api_url.rstrip('/'),
            session=session,
            token=_NoToken(),
            required=False,
        )
        for i in range(args.concurrency)
    ]
    per_task = [args.cycles // args.concurrency] * args.concurrency
    for i in range(args.cycles % args.concurrency):
        per_task[i] += 1
    try:
        await asyncio.gather(*(_worker(lock, args.warmup) for lock in locks))
        _write({'ready': True, 'dimutex': getattr(dimutex, '__version__', '?')})
        while True:
            command = sys.stdin.readline().strip()
            if command in ('', 'quit'):
                break
            if command != 'go':
                _write({'done': False, 'error': f'unknown command {command!r}'})
                continue
            errors = 0
            ru0 = resource.getrusage(resource.RUSAGE_SELF)
            t0 = time.perf_counter()
            try:
                await asyncio.gather(*(_worker(lock, n) for lock, n in zip(locks, per_task)))
            except Exception as e:  # noqa: BLE001 - reported, never hidden
                errors += 1
                _write({'done': False, 'error': f'{type(e).__name__}: {e}'})
                continue
            wall = time.perf_counter() - t0
            ru1 = resource.getrusage(resource.RUSAGE_SELF)
            _write({
                'done': True,
                'cycles': args.cycles,
                'wall_s': wall,
                'user_s': ru1.ru_utime - ru0.ru_utime,
                'sys_s': ru1.ru_stime - ru0.ru_stime,
                'errors': errors,
            })
    finally:
        await session.close()
    return 0


if __name__ == '__main__':
    sys.exit(asyncio.run(main()))
