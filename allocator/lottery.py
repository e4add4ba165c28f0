"""Lottery rounds in the service: the freeze, the draw, passes, winners' reservations, the record.

What runs where:

* **The freeze** (``watch``, in every worker, every ``TICK`` seconds): a lottery round whose
  window has closed (by Redis TIME) is frozen once its ledger stream is empty and PostgreSQL's
  ``ledger_seq`` has reached Redis's ``seq``, so every entry answered 201/200 is in the list.
  The list is built from the ledger by allocator/drawjob.py in a process of its own, under the
  round's advisory lock: one worker of one node freezes it, once. A PostgreSQL outage only
  delays it (the check runs again next tick).
* **The draw** and **passes**: drawjob.py again (results and the ``draw_awards`` work list in
  one transaction), then this worker makes the winners' reservations in Redis with award.lua
  (256 at a time; idempotent per entry, so an interrupted award is finished by any worker's
  next tick), and only then marks the draw ``drawn``.
* **The status** is PostgreSQL's ``draws.status``; each worker mirrors it into the round hash
  (``draw``, and ``drawn`` = 1 once results exist), which Round and Entry answers read.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import logging
import multiprocessing
import re
from collections.abc import Callable, Sequence
from typing import Any, TypeVar

import orjson

from allocator import drawjob
from allocator.catalogue import Catalogue
from allocator.claims import fresh_identifiers
from allocator.draw import ALGORITHM
from allocator.errors import (
    DrawConflict,
    DrawNotReady,
    NotFound,
    RetryLater,
    Unavailable,
    WrongMode,
)
from allocator.keys import Keys, ScriptKeys
from allocator.losswatch import LossWatch
from allocator.model import Round
from allocator.redistyping import awaited
from allocator.scripts import Scripts
from allocator.store import Store
from allocator.topology import ReplicaWait

log = logging.getLogger("allot.lottery")

TICK = 2.0  # seconds between a worker's looks at closed lottery rounds (freeze within 60 s)
AWARD_BATCH = 256  # winners per award.lua call
SETTLE_BATCH = 1000  # entries per settle.lua call
ANSWER_WITHIN = 5.0  # seconds a draw request waits for the draw before answering 202 drawing
FILE = re.compile(r"(entries|stock|results)\.csv|pass-([1-9][0-9]{0,5})\.csv")
AWARD_LOCK = "allot-award:"
FREEZE_WARN_MS = 60_000  # the contract: frozen within 60 s after closes_at

T = TypeVar("T")


class Lottery:
    def __init__(
        self,
        store: Store,
        keys: Keys,
        scripts: Scripts,
        catalogue: Catalogue,
        watch: LossWatch,
        database_url: str | None,
        *,
        replicas: ReplicaWait | None = None,
    ) -> None:
        self.store = store
        self.keys = keys
        self.scripts = scripts
        self.catalogue = catalogue
        self.watch = watch
        self.database_url = database_url
        # [redis] wait_replicas: award.lua and settle.lua replies are used (and the draw marked
        # drawn) only once a replica has them; the facade passes the one ReplicaWait it shares
        self.replicas = replicas or ReplicaWait(store.redis, 0, 0)
        self._pool: concurrent.futures.ProcessPoolExecutor | None = None
        self._tasks: dict[str, asyncio.Task[None]] = {}
        self._warned: dict[str, float] = {}

    # -- the heavy steps, off the event loop ------------------------------------------------------

    async def _job(self, fn: Callable[..., T], *args: Any) -> T:
        if self.database_url is None:
            raise Unavailable("The ledger database is not configured.")
        if self._pool is None:
            self._pool = concurrent.futures.ProcessPoolExecutor(
                max_workers=1, mp_context=multiprocessing.get_context("spawn")
            )
        loop = asyncio.get_running_loop()
        try:
            return await loop.run_in_executor(self._pool, fn, self.database_url, *args)
        except (OSError, concurrent.futures.process.BrokenProcessPool) as exc:
            self._pool = None
            raise Unavailable("The draw could not run just now; please try again.") from exc

    def close(self) -> None:
        for task in self._tasks.values():
            task.cancel()
        if self._pool is not None:
            self._pool.shutdown(wait=False, cancel_futures=True)
            self._pool = None

    # -- state --------------------------------------------------------------------------------

    async def _state(self, round_id: str) -> dict[str, Any] | None:
        async with self.store.pg() as con:
            row = await con.fetchrow(
                "SELECT status, public_randomness, drawn_at IS NOT NULL AS drawn FROM draws"
                " WHERE round_id = $1",
                round_id,
            )
        return dict(row) if row is not None else None

    async def _lottery_round(self, round_id: str) -> Round:
        rnd = await self.catalogue.round(round_id)
        if not rnd.lottery:
            raise WrongMode(f"Round {round_id!r} is first come, first served: it has no draw.")
        return rnd

    async def _publish(self, round_id: str, status: str, drawn: bool) -> None:
        """Mirror the draw's status into the round hash (Round and Entry answers read it).
        The first time Redis hears of a status past registering, the freeze's verdicts are
        copied into the entry records first (``_settle``), so an entry shown from a frozen
        round has its weight or its exclusion, whichever worker froze it."""
        rk = await self.catalogue.round_keys(round_id)
        if status != "registering":
            shown = await self.catalogue.find_round(round_id)
            if shown is not None and shown.draw_status in (None, "registering"):
                await self._settle(round_id)
        await self.store.redis_call(
            awaited(
                self.store.redis.hset(
                    rk.round, mapping={"draw": status, "drawn": "1" if drawn else "0"}
                )
            )
        )
        self.catalogue.forget_round(round_id)

    async def _settle(self, round_id: str) -> None:
        """Copy the freeze's verdicts (excluded, weights above 1) from the ledger into Redis's
        entry records (lua/settle.lua, SETTLE_BATCH pairs a call; idempotent)."""
        async with self.store.pg() as con:
            rows = await con.fetch(
                "SELECT entry_id, status, weight FROM entries WHERE round_id = $1"
                " AND (status = 'excluded' OR weight > 1)",
                round_id,
            )
        rk = await self.catalogue.round_keys(round_id)
        pairs = [
            (r["entry_id"], "x" if r["status"] == "excluded" else str(r["weight"])) for r in rows
        ]
        for i in range(0, len(pairs), SETTLE_BATCH):
            args = [x for pair in pairs[i : i + SETTLE_BATCH] for x in pair]
            reply = await self.store.redis_call(
                self.replicas.run(self.scripts.settle, [rk.round, rk.entries], args),
                key=rk.round,
            )
            if reply[0] == b"open":  # a freeze is only ever made after the close
                raise Unavailable(f"Round {round_id!r} has not closed yet by Redis's clock.")

    # -- the record and its files -------------------------------------------------------------

    async def record(self, round_id: str) -> dict[str, Any]:
        """GET /api/v1/rounds/{round_id}/draw: members not yet known are null."""
        rnd = await self._lottery_round(round_id)
        async with self.store.pg() as con:
            row = await con.fetchrow("SELECT * FROM draws WHERE round_id = $1", round_id)
            passes = await con.fetch(
                "SELECT pass, at, released, digest FROM draw_passes WHERE round_id = $1"
                " ORDER BY pass",
                round_id,
            )
        if row is None:
            raise Unavailable("The round's draw is not in the ledger yet; please try again.")
        frozen = row["status"] != "registering"
        return {
            "round_id": round_id,
            "algorithm": ALGORITHM,
            "status": row["status"],
            "commitment": row["commitment"],
            "public_randomness_source": rnd.public_randomness_source,
            "frozen_at": _iso(row["frozen_at"]),
            "entries": row["entries"],
            "entries_digest": row["entries_digest"],
            "stock_digest": row["stock_digest"],
            "public_randomness": row["public_randomness"],
            "secret": bytes(row["secret"]).hex() if frozen else None,
            "seed": row["seed"],
            "drawn_at": _iso(row["drawn_at"]),
            "results_digest": row["results_digest"],
            "passes": [
                {
                    "pass": p["pass"],
                    "at": _iso(p["at"]),
                    "released": [
                        {"site_id": s, "units": u} for s, u in orjson.loads(p["released"])
                    ],
                    "digest": p["digest"],
                }
                for p in passes
            ],
            "sites": orjson.loads(row["sites"]) if row["sites"] is not None else None,
        }

    async def file(self, round_id: str, name: str) -> bytes:
        """One published file, byte for byte; 404 until it exists."""
        await self._lottery_round(round_id)
        match = FILE.fullmatch(name)
        if match is None:
            raise NotFound(f"There is no draw file {name!r}.")
        async with self.store.pg() as con:
            if match.group(2):
                data = await con.fetchval(
                    "SELECT csv FROM draw_passes WHERE round_id = $1 AND pass = $2",
                    round_id,
                    int(match.group(2)),
                )
            else:
                column = {"entries": "entries_csv", "stock": "stock_csv"}.get(
                    match.group(1), "results_csv"
                )
                data = await con.fetchval(
                    f"SELECT {column} FROM draws WHERE round_id = $1",  # noqa: S608 - fixed names
                    round_id,
                )
        if data is None:
            raise NotFound(f"{name} of round {round_id!r} is not published yet.")
        return bytes(data)

    # -- the draw and passes ------------------------------------------------------------------

    async def draw(self, round_id: str, public_randomness: str) -> dict[str, Any]:
        """POST …/draw: the record (status ``drawn``, or ``drawing`` while awards run on)."""
        await self._lottery_round(round_id)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + ANSWER_WITHIN
        while True:
            state = await self._state(round_id)
            if state is None or state["status"] == "registering":
                raise DrawNotReady(
                    f"Round {round_id!r} is not frozen yet: the entry list is fixed within 60 s"
                    " after the registration closes."
                )
            given = state["public_randomness"]
            if given is not None and given != public_randomness:
                raise DrawConflict(
                    f"Round {round_id!r} was drawn with another public_randomness ({given!r})."
                )
            if state["status"] == "frozen":
                found = await self._job(drawjob.draw_round, round_id, public_randomness)
                if found == "busy":
                    await asyncio.sleep(0.2)
                    if loop.time() < deadline:
                        continue
                    return await self.record(round_id)
                continue  # read the state again: drawn by us, or by someone else with a value
            if state["status"] == "drawing":
                await self._publish(round_id, "drawing", True)
                await self._finish(round_id, deadline - loop.time())
            return await self.record(round_id)

    async def next_pass(self, round_id: str) -> dict[str, Any]:
        """POST …/draw/next: one more pass with the units that came back since the last one."""
        await self._lottery_round(round_id)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + ANSWER_WITHIN
        state = await self._state(round_id)
        if state is None or state["status"] in ("registering", "frozen"):
            raise DrawNotReady(f"Round {round_id!r} has not been drawn yet.")
        if state["status"] == "drawn":
            found = await self._job(drawjob.next_pass, round_id)
            if found not in ("drawing", "drawn"):
                raise Unavailable("Another pass is being drawn right now; please try again.")
            await self._publish(round_id, "drawing", True)
        await self._finish(round_id, deadline - loop.time())
        return await self.record(round_id)

    async def _finish(self, round_id: str, wait: float) -> None:
        """Run (or join) the awards of the round's latest pass, waiting at most ``wait``."""
        task = self._tasks.get(round_id)
        if task is None or task.done():
            task = asyncio.ensure_future(self._award(round_id))
            self._tasks[round_id] = task
            task.add_done_callback(_retrieved)
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(asyncio.shield(task), max(wait, 0.01))

    async def _award(self, round_id: str) -> None:
        """The winners' reservations of the latest pass, then ``drawn``. One worker at a time
        (a session advisory lock); any other simply finds the work done or does it later."""
        assert self.store.pool is not None
        async with self.store.pool.acquire() as con:
            if not await con.fetchval(
                "SELECT pg_try_advisory_lock(hashtext($1))", AWARD_LOCK + round_id
            ):
                return
            try:
                status = await con.fetchval(
                    "SELECT status FROM draws WHERE round_id = $1", round_id
                )
                if status != "drawing":
                    return
                rows = await con.fetch(
                    "SELECT entry_id, site_id FROM draw_awards WHERE round_id = $1 AND pass ="
                    " (SELECT max(pass) FROM draw_awards WHERE round_id = $1) ORDER BY rank",
                    round_id,
                )
                for i in range(0, len(rows), AWARD_BATCH):
                    await self._award_batch(
                        round_id, [(r["entry_id"], r["site_id"]) for r in rows[i : i + AWARD_BATCH]]
                    )
                await con.execute(
                    "UPDATE draws SET status = 'drawn', updated_at = now()"
                    " WHERE round_id = $1 AND status = 'drawing'",
                    round_id,
                )
            finally:
                await con.execute("SELECT pg_advisory_unlock(hashtext($1))", AWARD_LOCK + round_id)
        await self._publish(round_id, "drawn", True)
        log.info("round %s: %d winners' reservations made; drawn", round_id, len(rows))

    async def _award_batch(self, round_id: str, items: Sequence[tuple[str, str]]) -> None:
        pending = list(items)
        for _ in range(5):  # a taken pickup code: again with fresh candidates
            replies = await self._award_call(round_id, pending)
            again = []
            for item, reply in zip(pending, replies, strict=True):
                status = reply[0].decode()
                if status == "lost":
                    self.watch.whole_or_lost(round_id, reply)  # raises RoundLost
                if status == "no-code":
                    again.append(item)
                elif status == "in-cooldown":  # award.lua: excluded, its units come back
                    log.warning(
                        "round %s: a winner at %s is in cooldown from another round of the"
                        " programme and was excluded",
                        round_id,
                        item[1],
                    )
                elif status not in ("created", "existing"):
                    log.error(  # the entry_id is its owner's key: never in the log
                        "round %s: an award at %s was refused (%s)", round_id, item[1], status
                    )
            if not again:
                return
            pending = again
        raise Unavailable("Pickup codes kept colliding; the award goes on at the next tick.")

    async def _award_call(self, round_id: str, items: Sequence[tuple[str, str]]) -> Any:
        """One award.lua call for (entry_id, site_id) items."""
        rk = await self.catalogue.round_keys(round_id)
        keys = [
            rk.round,
            rk.stock,
            rk.holders,
            rk.reservations,
            rk.tally,
            rk.ledger,
            rk.entries,
            rk.entitled,  # the programme's cooldowns: a win sets its bar (same slot)
        ]
        refs = ScriptKeys(keys)
        args: list[str | int] = [len(items), await self.watch.floor(round_id)]
        for (entry_id, site_id), (reservation_id, codes) in zip(
            items, fresh_identifiers(round_id, len(items)), strict=True
        ):
            args.append(
                " ".join(
                    (
                        refs.ref(rk.codes(site_id)),
                        refs.ref(rk.site_holders(site_id)),
                        entry_id,
                        site_id,
                        reservation_id,
                        *codes,
                    )
                )
            )
        # past the replica wait: Unavailable; the draw stays `drawing` and the awards are made
        # again (award.lua is idempotent per entry) by the operator's retry or the next tick
        return await self.store.redis_call(
            self.replicas.run(self.scripts.award, keys, args), key=rk.round
        )

    # -- the freeze, and keeping Redis in step ------------------------------------------------

    async def watch_rounds(self, stop: asyncio.Event, every: float = TICK) -> None:
        """In every worker: freeze closed lottery rounds, finish interrupted awards, mirror the
        draw's status into Redis."""
        while not stop.is_set():
            try:
                await self.tick()
            except RetryLater:  # Unavailable, or Overloaded (a timeout in a busy loop)
                pass  # a store is down: the next tick tries again
            except Exception:
                log.exception("lottery check failed")
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), every)

    async def tick(self) -> None:
        now_ms = await self._redis_ms()
        due = [r for r in await self.catalogue.rounds() if r.lottery and _ms(r.closes_at) <= now_ms]
        if not due:
            return
        async with self.store.pg() as con:
            states = {
                r["round_id"]: r
                for r in await con.fetch(
                    "SELECT round_id, status, drawn_at IS NOT NULL AS drawn FROM draws"
                    " WHERE round_id = ANY($1::text[])",
                    [r.round_id for r in due],
                )
            }
        for rnd in due:
            state = states.get(rnd.round_id)
            if state is None:
                continue
            status = state["status"]
            if status == "registering":
                found = await self.freeze(rnd)
                if found == "frozen":
                    await self._publish(rnd.round_id, "frozen", False)
                elif now_ms - _ms(rnd.closes_at) > FREEZE_WARN_MS:
                    self._warn_unfrozen(rnd.round_id, found)
                continue
            if rnd.draw_status != status or rnd.drawn != state["drawn"]:
                await self._publish(rnd.round_id, status, state["drawn"])
            if status == "drawing":
                await self._finish(rnd.round_id, 0)

    def _warn_unfrozen(self, round_id: str, why: str) -> None:
        """Past the contract's 60 s and still not frozen: say why, once a minute."""
        now = self.store.monotonic()
        if now - self._warned.get(round_id, -60.0) < 60.0:
            return
        self._warned[round_id] = now
        if why == drawjob.WAITING:
            log.warning(
                "round %s closed over 60 s ago and is not frozen yet (waiting): an earlier-closing"
                " lottery round of its programme is not drawn yet (rounds of a programme are"
                " frozen and drawn in the order they close)",
                round_id,
            )
            return
        log.warning(
            "round %s closed over 60 s ago and is not frozen yet (%s): the ledger has not every"
            " change of the round or of its programme's rounds; see their stats' ledger lag and"
            " the dead-letter streams",
            round_id,
            why,
        )

    async def freeze(self, rnd: Round) -> str:
        """Freeze once the ledger has every change of the round (and, for a round of a
        programme, every change Redis had made to the programme's rounds when we looked, after
        the close): ``frozen`` or why not yet (``open``, ``behind``, ``waiting``, ``busy``)."""
        rk = await self.catalogue.round_keys(rnd.round_id)
        others = [
            r.round_id
            for r in await self.catalogue.rounds()
            if rnd.programme and r.programme == rnd.programme and r.round_id != rnd.round_id
        ]
        others_keys = [await self.catalogue.round_keys(r) for r in others]
        # one slot: a programme's rounds all live under its tag (allocator/keys.py)
        async with self.store.redis.pipeline(transaction=True) as pipe:
            # TIME through a script on the round's key: a cluster transaction refuses keyless
            # commands, and this one must run on the round's node (allocator/topology.py)
            pipe.eval("return redis.call('TIME')", 1, rk.tally)
            pipe.hget(rk.tally, "seq")
            pipe.xlen(rk.ledger)
            for ok in others_keys:
                pipe.hget(ok.tally, "seq")
            now, seq, backlog, *other_seqs = await self.store.redis_call(pipe.execute())
        secs, micros = int(now[0]), int(now[1])
        if secs * 1000 + micros // 1000 < _ms(rnd.closes_at):
            return "open"
        if backlog:
            return "behind"  # the stream still holds changes the ledger has not committed
        seqs = {rnd.round_id: int(seq or 0)}
        seqs.update((r, int(s or 0)) for r, s in zip(others, other_seqs, strict=True))
        found = await self._job(drawjob.freeze, rnd.round_id, seqs)
        if found == "frozen":
            log.info("round %s: entry list frozen", rnd.round_id)
        return found

    async def _redis_ms(self) -> int:
        secs, micros = await self.store.redis_call(awaited(self.store.redis.time()))
        return int(secs) * 1000 + int(micros) // 1000


def _ms(value: Any) -> int:
    return int(value.timestamp() * 1000)


def _iso(value: Any) -> str | None:
    return value.isoformat() if value is not None else None


def _retrieved(task: asyncio.Task[None]) -> None:
    if not task.cancelled() and task.exception() is not None:
        log.warning("lottery awards: %r (the next tick tries again)", task.exception())
