"""A long-running driver around the reference Python `dimutex` (PyPI `dimutex==1.3.1`), for
the cross-implementation tests in `tests/interop.rs`.

Usage: python dimutex_peer.py --api-url http://127.0.0.1:PORT --bucket BUCKET

One process, one asyncio loop, one aiohttp session serve many commands. It reads one JSON
object per line on stdin and answers one JSON object per line on stdout, in order:

    {"op": "acquire", "name": N, "ttl": SECS}   -> {"ok": true}
                                                 | {"ok": false, "error": "AlreadyAcquiredError"}
    {"op": "acquire", ..., "at": UNIX_SECS}     the same, but starts at that wall time
    {"op": "release", "name": N}                -> {"ok": true}
                                                 | {"ok": false, "error": "AlreadyReleasedError"}
    {"op": "refresh", "name": N, "ttl": SECS}   -> {"ok": true} | AlreadyReleasedError
    {"op": "acquired", "name": N}               -> {"ok": true, "acquired": BOOL}
    {"op": "inspect", "name": N}                -> {"ok": true, "status": 200, "object": {...}}
    {"op": "quit"}                              -> {"ok": true}, then exit 0

Every answer also carries `"id"` (echoed from the command, if given), `"started"` (the wall
time, UNIX seconds, when the operation began) and `"ms"` (how long it took). Any other
exception (a `ClientResponseError`, a `ValueError` from parsing `expires`, a bad command...)
is reported as `{"ok": false, "error": "crash", "kind": TYPE, "detail": TRACEBACK}` (plus
`"status"` for HTTP errors); it never ends the loop. The first line written is
`{"ready": true, "dimutex": VERSION}`.

The lock objects are `dimutex.GCS` instances, one per name, kept for the process's lifetime
and sharing the session. `dimutex` would turn `STORAGE_EMULATOR_HOST` into an https URL, so
the variable is removed before it is imported and the fake's URL is passed as `api_url`.
"""

import argparse
import asyncio
import json
import os
import sys
import time
import traceback
from datetime import timedelta

# Read by dimutex at import time (and forced to https): make sure it plays no part.
os.environ.pop('STORAGE_EMULATOR_HOST', None)

import aiohttp  # noqa: E402

import dimutex  # noqa: E402
from dimutex import AlreadyAcquiredError, AlreadyReleasedError  # noqa: E402


class _NoToken:
    """Never used: with `api_url` set, dimutex sends no Authorization header. Passing it
    spares gcloud-aio-auth's credential discovery at construction."""

    async def get(self) -> str:  # pragma: no cover
        raise RuntimeError('no token in emulator mode')


class Peer:
    def __init__(self, api_url: str, bucket: str) -> None:
        self.api_url = api_url
        self.bucket = bucket
        # As dimutex builds its own session in emulator mode.
        self.session = aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(ssl=False),
            timeout=aiohttp.ClientTimeout(total=10),
        )
        self.locks: dict = {}

    def lock(self, name: str, ttl=None) -> 'dimutex.GCS':
        gcs = self.locks.get(name)
        if gcs is None:
            gcs = dimutex.GCS(
                bucket=self.bucket,
                name=name,
                api_url=self.api_url,
                session=self.session,
                token=_NoToken(),
                required=False,
            )
            self.locks[name] = gcs
        if ttl is not None:
            gcs.ttl = timedelta(seconds=float(ttl))
        return gcs

    async def run(self, cmd: dict) -> dict:
        op = cmd.get('op')
        if op == 'acquire':
            gcs = self.lock(cmd['name'], cmd.get('ttl'))
            await _sleep_until(cmd.get('at'))
            await gcs.acquire(force=bool(cmd.get('force', False)))
            return {'ok': True}
        if op == 'release':
            await self.lock(cmd['name']).release()
            return {'ok': True}
        if op == 'refresh':
            await self.lock(cmd['name'], cmd.get('ttl')).refresh()
            return {'ok': True}
        if op == 'acquired':
            return {'ok': True, 'acquired': await self.lock(cmd['name']).acquired()}
        if op == 'inspect':
            resp = await self.lock(cmd['name'])._get()
            body = await resp.text()
            try:
                obj = json.loads(body)
            except ValueError:
                obj = body
            return {'ok': True, 'status': resp.status, 'object': obj}
        if op == 'quit':
            return {'ok': True}
        raise ValueError(f'unknown op {op!r}')

    async def close(self) -> None:
        await self.session.close()


async def _sleep_until(at) -> None:
    if at is None:
        return
    delay = float(at) - time.time()
    if delay > 0:
        await asyncio.sleep(delay)


def _crash(e: BaseException) -> dict:
    out = {
        'ok': False,
        'error': 'crash',
        'kind': type(e).__name__,
        'detail': ''.join(traceback.format_exception(type(e), e, e.__traceback__)),
    }
    status = getattr(e, 'status', None)
    if isinstance(status, int):
        out['status'] = status
    return out


def _write(obj: dict) -> None:
    sys.stdout.write(json.dumps(obj) + '\n')
    sys.stdout.flush()


async def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument('--api-url', required=True)
    parser.add_argument('--bucket', required=True)
    args = parser.parse_args()

    loop = asyncio.get_running_loop()
    reader = asyncio.StreamReader()
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)

    peer = Peer(args.api_url.rstrip('/'), args.bucket)
    _write({'ready': True, 'dimutex': getattr(dimutex, '__version__', '?')})
    try:
        while True:
            line = await reader.readline()
            if not line:
                break  # stdin closed: the test is gone.
            line = line.strip()
            if not line:
                continue
            cmd = None
            started = time.time()
            t0 = time.perf_counter()
            try:
                cmd = json.loads(line)
                if not isinstance(cmd, dict):
                    raise ValueError('a command must be a JSON object')
                out = await peer.run(cmd)
            except AlreadyAcquiredError:
                out = {'ok': False, 'error': 'AlreadyAcquiredError'}
            except AlreadyReleasedError:
                out = {'ok': False, 'error': 'AlreadyReleasedError'}
            except Exception as e:  # noqa: BLE001 - every failure is an answer, never an exit
                out = _crash(e)
            out['started'] = started
            out['ms'] = round((time.perf_counter() - t0) * 1000, 3)
            if isinstance(cmd, dict) and 'id' in cmd:
                out['id'] = cmd['id']
            _write(out)
            if isinstance(cmd, dict) and cmd.get('op') == 'quit':
                break
    finally:
        await peer.close()
    return 0


if __name__ == '__main__':
    sys.exit(asyncio.run(main()))
