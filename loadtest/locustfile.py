"""The flash crowd, as locust users. Run by ``allot loadtest``; also usable by hand:

    LOADTEST_ROUND=r1 locust -f loadtest/locustfile.py --host http://127.0.0.1:8080

Who is in the crowd:

* ``Citizen`` arrives (the first one of each simulated device exactly at the opening second),
  looks at the sites, reserves at a popular one, honours ``Retry-After`` (with jitter) on 429,
  takes the first offered alternative on sold-out, then looks the reservation up. Each task run
  is a new citizen (over the device's kept-alive connection, as through the trusted proxy;
  ``LOADTEST_FRESH_CONNECTIONS=1`` dials a new one per citizen).
* ``ImpatientCitizen`` ignores ``Retry-After`` and resubmits the same request several times:
  every answer that grants must carry the same reservation.
* ``DuplicateSubmitter`` sends the same citizen to two sites at the same moment: at most one
  may be granted.
* ``Reader`` refreshes the round list, the round and the site availability.
* ``Bot`` (``LOADTEST_BOTS`` of them, default 2) sends 20 new IDs a second from one client
  address, not waiting for answers; a gated service holds it back with 429 ``rate-limited``.

With ``LOADTEST_MODE=lottery`` the same crowd registers entries (``POST .../entries``) instead:
the polite citizen sometimes enters again at another site (the last choice counts), the
impatient one presses 3-5 times, the duplicate sends two choices at once, the bot registers
its identities at sites chosen as people choose them. Every 201/200 must carry the citizen's one
entry with this request's choice, and every entrant looks the entry up afterwards.

Whoever gets no answer (a lost connection, a timeout, a 5xx) to a reservation request sends the
same request again: the claim may have run, and the contract makes the retry safe (200 with the
same reservation). So no unit ends up held by a citizen who never learned of it.

Every answer's body is checked, not only its status. 409 ``sold-out`` / ``already-reserved`` and
429 are expected outcomes, each counted under its own name (``citizen reserve: 409 sold-out``).
Failures are 5xx, lost connections, timeouts, wrong bodies and unexpected statuses. Every
request is also written to ``$LOADTEST_RAW_DIR/<pid>.jsonl`` for the runner's checks.
"""

from __future__ import annotations

import atexit
import itertools
import os
import random
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

import gevent
import gevent.pool
import orjson
from locust import FastHttpUser, between, constant, events, task
from locust.env import Environment

from loadtest import crowd

ROUND = os.environ.get(crowd.ENV_ROUND, "r1")
PER_PERSON = int(os.environ.get(crowd.ENV_PER_PERSON, "1"))
OPENS_AT = float(os.environ.get(crowd.ENV_OPENS_AT, "0"))
CLOSES_AT = float(os.environ.get(crowd.ENV_CLOSES_AT, "0")) or float("inf")
ENDS_AT = float(os.environ.get(crowd.ENV_ENDS_AT, "0")) or float("inf")
TIMEOUT = float(os.environ.get(crowd.ENV_TIMEOUT, "10"))
BOTS = int(os.environ.get(crowd.ENV_BOTS, "2"))
P99_BUDGET_MS = float(os.environ.get(crowd.ENV_P99_MS, "1000"))
# The crowd reaches allot through the trusted reverse proxy (it sends X-Forwarded-For as one
# would), which keeps its upstream connections alive; set this to model phones dialling the
# service directly, one new TCP connection per citizen.
FRESH_CONNECTIONS = os.environ.get(crowd.ENV_FRESH_CONNECTIONS, "") == "1"
# A lottery round: the same crowd registers entries instead of racing for reservations.
LOTTERY = os.environ.get(crowd.ENV_MODE, "fcfs") == "lottery"

MAX_ATTEMPTS = 8  # a citizen gives up after this many tries of one reservation
MAX_HOPS = 3  # sold-out alternatives a citizen follows before giving up
CLOCK_SLACK = 2.0  # seconds around opens_at/closes_at in which round-not-open is fair
LATE = 5.0  # after ENDS_AT, a citizen whose answer was lost still retries this long
RESERVE = f"/api/v1/rounds/{ROUND}/reservations"
ENTER = f"/api/v1/rounds/{ROUND}/entries"
CHANGE_MIND = 0.25  # a polite entrant's chance of entering again at another site (lottery)
KNOWN_SITES: list[str] = []  # site ids in the order the service lists them, once seen


# -- the per-process record -------------------------------------------------------------------


class Recorder:
    """Appends JSON lines to <raw>/<pid>.jsonl; opened on first use (after locust's fork)."""

    def __init__(self) -> None:
        self._file: IO[bytes] | None = None
        self._pid = 0

    def write(self, record: dict[str, Any]) -> None:
        if self._file is None or self._pid != os.getpid():
            raw = os.environ.get(crowd.ENV_OUT)
            if not raw:
                return
            Path(raw).mkdir(parents=True, exist_ok=True)
            self._pid = os.getpid()
            self._file = Path(raw, f"{self._pid}.jsonl").open("ab", buffering=1 << 16)  # noqa: SIM115
        self._file.write(orjson.dumps(record) + b"\n")

    def flush(self, **_kw: Any) -> None:
        if self._file is not None and self._pid == os.getpid():
            self._file.flush()


RECORD = Recorder()
events.test_stop.add_listener(RECORD.flush)
events.quitting.add_listener(RECORD.flush)
atexit.register(RECORD.flush)


@events.quitting.add_listener
def _exit_code(environment: Environment, **_kw: Any) -> None:
    """Standalone use: a failed request or a slow p99 fails locust's own exit code too."""
    total = environment.stats.total
    if total.num_failures or total.get_response_time_percentile(0.99) > P99_BUDGET_MS:
        environment.process_exit_code = 1


# -- identities -------------------------------------------------------------------------------

_COUNTER = itertools.count()


def _process_index(environment: Environment) -> int:
    index = getattr(environment.runner, "worker_index", 0)
    return index if isinstance(index, int) and index >= 0 else 64 + os.getpid() % 8


@dataclass
class Person:
    """One simulated citizen and what they know about their reservation."""

    n: int
    citizen_id: str
    phone: str
    address: str
    holds: str | None = None  # the reservation_id this citizen was given
    granted: int = 0  # 201 answers received
    lost_answer: bool = False  # a reservation request of theirs went unanswered
    concurrent: bool = False  # two of their requests are in flight at once
    asked: bool = False  # some reservation request of theirs was answered
    end: str = "none"


@dataclass
class Answer:
    status: int
    code: str
    body: Any
    headers: Any
    fail: str = ""  # "", or the failure class: 5xx, connection, timeout, body, status
    why: str = ""

    def header(self, name: str) -> str | None:
        value = self.headers.get(name) if self.headers is not None else None
        return str(value) if value is not None else None

    @property
    def retry_after(self) -> float:
        value = self.header("Retry-After")
        return float(value) if value is not None and crowd.retry_after_ok(value) else 1.0

    @property
    def granted(self) -> bool:
        return self.status in (200, 201) and not self.fail


# -- the users --------------------------------------------------------------------------------


class CrowdUser(FastHttpUser):
    abstract = True
    actor = "citizen"
    network_timeout = TIMEOUT
    connection_timeout = TIMEOUT
    concurrency = 4
    arrived = False

    # -- who and when
    def crowd_over(self) -> bool:
        """After ENDS_AT nobody new arrives: idle until locust stops (the run winds down)."""
        if time.time() < ENDS_AT:
            return False
        gevent.sleep(3600)
        return True

    def new_person(self, address: str | None = None, *, new_connection: bool = True) -> Person:
        n = _process_index(self.environment) * crowd.PER_PROCESS + next(_COUNTER)
        if new_connection and FRESH_CONNECTIONS:  # each citizen's phone dials in itself
            self.client.client.clientpool.close()
        return Person(
            n=n,
            citizen_id=crowd.citizen_id(n),
            phone=crowd.phone(n),
            address=address or crowd.client_address(n),
        )

    def wait_for_opening(self, person: Person, reaction: float) -> None:
        """The first arrival of a device opens the round's page and waits for the second."""
        if self.arrived:
            return
        self.arrived = True
        if time.time() < OPENS_AT:
            self.call(person, "GET", f"/api/v1/rounds/{ROUND}", "round", check=self.check_round)
            gevent.sleep(max(0.0, OPENS_AT - time.time()) + reaction)

    def finish(self, person: Person) -> None:
        RECORD.write(
            {
                "k": "c",
                "n": person.n,
                "who": self.actor,
                "asked": PER_PERSON if person.asked else 0,
                "end": person.end,
            }
        )

    # -- one request, checked and recorded
    def call(
        self,
        person: Person | None,
        method: str,
        path: str,
        op: str,
        *,
        json: Any = None,
        check: Any = None,
    ) -> Answer:
        headers = {"X-Forwarded-For": person.address} if person is not None else {}
        with self.client.request(
            method, path, name=f"{self.actor} {op}", json=json, headers=headers, catch_response=True
        ) as resp:
            answer = self._classify(resp)
            if not answer.fail and check is not None:
                why = check(answer)
                if why:
                    answer.fail = "status" if why.startswith("unexpected") else "body"
                    answer.why = why
            outcome = self._outcome_name(answer)
            resp.request_meta["name"] = f"{self.actor} {op}: {outcome}"
            if answer.fail:
                resp.failure(f"{outcome}: {answer.why}"[:300])
            else:
                resp.success()
            ra = None
            if answer.status in (429, 503):
                ra = crowd.retry_after_ok(answer.header("Retry-After"))
            RECORD.write(
                {
                    "k": "a",
                    "t": time.time(),
                    "ms": resp.request_meta.get("response_time", 0.0),
                    "who": self.actor,
                    "op": op,
                    "st": answer.status,
                    "code": answer.code,
                    "fail": answer.fail,
                    "ra": ra,
                    "why": answer.why[:300],
                }
            )
        return answer

    def _classify(self, resp: Any) -> Answer:
        """Status, problem code and the failures any request can have, whatever it asked."""
        status = int(resp.status_code or 0)
        if status == 0:
            error = getattr(resp, "error", None)
            timed_out = isinstance(error, (TimeoutError, socket.timeout, gevent.Timeout))
            kind = "timeout" if timed_out else "connection"
            return Answer(0, kind, None, None, fail=kind, why=f"{type(error).__name__}: {error}")
        try:
            body = orjson.loads(resp.content or b"")
        except orjson.JSONDecodeError:
            body = None
        code = body.get("code", "") if isinstance(body, dict) and status >= 400 else ""
        answer = Answer(status, str(code), body, resp.headers)
        if status >= 500:
            answer.fail, answer.why = "5xx", f"HTTP {status}"
        elif status >= 400:
            ctype = (answer.header("Content-Type") or "").split(";")[0].strip()
            wrong = crowd.problem_wrong(body, status)
            if ctype != "application/problem+json":
                wrong = wrong or f"error answered as {ctype or 'no content type'}"
            if status == 429:
                if code not in ("rate-limited", "overloaded"):
                    wrong = wrong or f"429 with code {code!r}"
                if not crowd.retry_after_ok(answer.header("Retry-After")):
                    wrong = wrong or "429 without a whole-seconds Retry-After >= 1"
            if wrong:
                answer.fail, answer.why = "body", wrong
        elif body is None:
            answer.fail, answer.why = "body", "the answer is not JSON"
        return answer

    @staticmethod
    def _outcome_name(answer: Answer) -> str:
        if answer.status == 0:
            return answer.code
        return f"{answer.status} {answer.code}".strip()

    # -- checks of bodies
    @staticmethod
    def check_round(answer: Answer) -> str | None:
        if answer.status != 200:
            return f"unexpected {answer.status} {answer.code}"
        return crowd.round_wrong(answer.body, ROUND)

    @staticmethod
    def check_sites(answer: Answer) -> str | None:
        if answer.status != 200:
            return f"unexpected {answer.status} {answer.code}"
        return crowd.sites_wrong(answer.body)

    # -- the citizen's steps
    def browse(self, person: Person) -> list[dict[str, Any]]:
        """The site list, reloaded (up to three times) when it does not come, as people do."""
        for attempt in range(3):
            answer = self.call(
                person, "GET", f"/api/v1/rounds/{ROUND}/sites", "sites", check=self.check_sites
            )
            if not answer.fail and isinstance(answer.body, dict):
                sites: list[dict[str, Any]] = answer.body["sites"]
                if not KNOWN_SITES:
                    KNOWN_SITES.extend(s["site_id"] for s in sites)
                return sites
            if attempt < 2:
                gevent.sleep(answer.retry_after if answer.status else 0.5 + random.random())
        return []

    @staticmethod
    def choose(sites: list[dict[str, Any]], avoid: str | None = None) -> str | None:
        """A popular site that still shows stock; popularity falls off like 1/rank."""
        ids: list[str] = [s["site_id"] for s in sites if s["remaining"] >= PER_PERSON] or [
            s["site_id"] for s in sites
        ]
        ids = [s for s in ids if s != avoid] or ids or list(KNOWN_SITES)
        if not ids:
            return None
        order = {s: i for i, s in enumerate(KNOWN_SITES)}
        ids.sort(key=lambda s: order.get(s, len(order)))
        choice: str = random.choices(ids, weights=[1 / (i + 1) for i in range(len(ids))])[0]
        return choice

    def reserve_once(self, person: Person, site: str, op: str = "reserve") -> Answer:
        def check(answer: Answer) -> str | None:
            return self.check_reservation_answer(person, site, answer)

        body = {"citizen_id": person.citizen_id, "phone": person.phone, "site_id": site}
        answer = self.call(person, "POST", RESERVE, op, json=body, check=check)
        if answer.status == 0 or answer.status >= 500:
            person.lost_answer = True  # the claim may have run; the answer never came
        elif answer.status != 429:
            person.asked = True
        return answer

    def reserve_answered(
        self, person: Person, site: str, op: str, *, honour_retry_after: bool = True
    ) -> Answer:
        """One reservation request, sent again while its answer is lost (none, or a 5xx): the
        claim may have run, and only asking again tells (200 with the same reservation)."""
        for attempt in range(MAX_ATTEMPTS):
            answer = self.reserve_once(person, site, op)
            lost = answer.status == 0 or answer.status >= 500
            if not lost or attempt == MAX_ATTEMPTS - 1 or time.time() >= ENDS_AT + LATE:
                break
            if answer.status == 503 and honour_retry_after:
                gevent.sleep(answer.retry_after + random.random())
            else:
                gevent.sleep(0.2 + random.random() * 0.8)
        return answer

    def check_reservation_answer(self, person: Person, site: str, answer: Answer) -> str | None:
        now = time.time()
        if answer.status in (200, 201):
            wrong = crowd.reservation_wrong(
                answer.body,
                round_id=ROUND,
                site_id=site,
                per_person=PER_PERSON,
                citizen=person.citizen_id,
            )
            if wrong:
                return wrong
            rid = answer.body["reservation_id"]
            if answer.status == 201:
                location = answer.header("Location")
                if location != f"/api/v1/reservations/{rid}":
                    return f"Location {location!r} does not name the reservation"
            RECORD.write(
                {
                    "k": "g",
                    "n": person.n,
                    "rid": rid,
                    "site": answer.body["site_id"],
                    "qty": answer.body["quantity"],
                    "st": answer.status,
                    "who": self.actor,
                    "t": now,
                }
            )
            previous = person.holds
            if answer.status == 201:
                person.granted += 1
            if previous is None:
                person.holds = rid
            if previous is not None and previous != rid:
                return f"given twice: a second reservation {rid} while holding {previous}"
            if answer.status == 201 and person.granted > 1:
                return "given twice: a second 201 for one citizen"
            if (
                answer.status == 200
                and previous is None
                and not person.lost_answer
                and not person.concurrent  # its twin's 201 may simply not be read yet
            ):
                return "200 'already yours' for a citizen who was never granted anything"
            return None
        if answer.status == 409:
            if answer.code == "sold-out":
                return crowd.alternatives_wrong(answer.body, asked_site=site, per_person=PER_PERSON)
            if answer.code == "already-reserved":
                if person.holds or person.lost_answer or person.concurrent:
                    return None
                return "already-reserved for a citizen who holds nothing"
            if answer.code == "round-not-open":
                if now < OPENS_AT + CLOCK_SLACK or now > CLOSES_AT - CLOCK_SLACK:
                    return None
                return "round-not-open while the round is open"
            return f"unexpected 409 {answer.code}"
        if answer.status == 429:
            return None
        return f"unexpected {answer.status} {answer.code}"

    def reserve(self, person: Person, site: str, *, honour_retry_after: bool = True) -> str | None:
        """Try until granted, sold out everywhere offered, or out of patience."""
        hops = attempts = 0
        while True:
            answer = self.reserve_once(person, site)
            attempts += 1
            if answer.granted:
                person.end = "granted"
                return person.holds
            if answer.code == "sold-out" and not answer.fail:
                person.end = "sold-out"
                offered = [
                    a["site_id"]
                    for a in answer.body["alternatives"]
                    if a.get("remaining", 0) >= PER_PERSON
                ]
                if not offered or hops >= MAX_HOPS or time.time() >= ENDS_AT:
                    return None
                hops += 1
                site = offered[0]  # the same district comes first
                continue
            early = time.time() < OPENS_AT + 5 and attempts < MAX_ATTEMPTS
            if answer.code == "round-not-open" and not answer.fail and early:
                gevent.sleep(0.5 + random.random() / 2)
                continue
            retryable = answer.status in (0, 429) or answer.status >= 500
            late = time.time() >= (ENDS_AT + LATE if answer.status != 429 else ENDS_AT)
            if not retryable or attempts >= MAX_ATTEMPTS or late:
                person.end = "gave-up" if retryable else "refused"
                return None
            if answer.status in (429, 503) and honour_retry_after:
                gevent.sleep(answer.retry_after + random.random())  # jitter spreads the herd
            else:
                gevent.sleep(0.2 + random.random() * 0.8)  # the browser's own retry

    # -- the entrant's steps (lottery mode)
    def enter_once(self, person: Person, site: str, accept: bool, op: str = "enter") -> Answer:
        def check(answer: Answer) -> str | None:
            return self.check_entry_answer(person, site, accept, answer, op)

        body = {
            "citizen_id": person.citizen_id,
            "phone": person.phone,
            "site_id": site,
            "accept_district": accept,
        }
        answer = self.call(person, "POST", ENTER, op, json=body, check=check)
        if answer.status == 0 or answer.status >= 500:
            person.lost_answer = True  # the entry may be made or changed; the answer never came
        elif answer.status != 429:
            person.asked = True
        return answer

    def enter_answered(
        self, person: Person, site: str, accept: bool, op: str, *, honour_retry_after: bool = True
    ) -> Answer:
        """One entry request, sent again while its answer is lost (as reserve_answered)."""
        for attempt in range(MAX_ATTEMPTS):
            answer = self.enter_once(person, site, accept, op)
            lost = answer.status == 0 or answer.status >= 500
            if not lost or attempt == MAX_ATTEMPTS - 1 or time.time() >= ENDS_AT + LATE:
                break
            if answer.status == 503 and honour_retry_after:
                gevent.sleep(answer.retry_after + random.random())
            else:
                gevent.sleep(0.2 + random.random() * 0.8)
        return answer

    def enter(self, person: Person, site: str, accept: bool, op: str = "enter") -> str | None:
        """Try until the entry is answered, refused, or out of patience (no sold-out here)."""
        attempts = 0
        while True:
            answer = self.enter_once(person, site, accept, op)
            attempts += 1
            if answer.granted:
                person.end = "entered"
                return person.holds
            early = time.time() < OPENS_AT + 5 and attempts < MAX_ATTEMPTS
            if answer.code == "round-not-open" and not answer.fail and early:
                gevent.sleep(0.5 + random.random() / 2)
                continue
            retryable = answer.status in (0, 429) or answer.status >= 500
            late = time.time() >= (ENDS_AT + LATE if answer.status != 429 else ENDS_AT)
            if not retryable or attempts >= MAX_ATTEMPTS or late:
                if person.end != "entered":
                    person.end = "gave-up" if retryable else "refused"
                return person.holds
            if answer.status in (429, 503):
                gevent.sleep(answer.retry_after + random.random())
            else:
                gevent.sleep(0.2 + random.random() * 0.8)

    def record_entry(self, person: Person, answer: Answer, op: str) -> None:
        body = answer.body
        RECORD.write(
            {
                "k": "e",
                "n": person.n,
                "eid": body["entry_id"],
                "site": body["site_id"],
                "acc": body["accept_district"],
                "st": answer.status,
                "who": self.actor,
                "op": op,
                "t": time.time(),
                "conc": person.concurrent,
            }
        )

    def check_entry_answer(
        self, person: Person, site: str, accept: bool, answer: Answer, op: str
    ) -> str | None:
        now = time.time()
        if answer.status in (200, 201):
            wrong = crowd.entry_wrong(
                answer.body,
                round_id=ROUND,
                site_id=site,
                accept_district=accept,
                citizen=person.citizen_id,
            )
            if wrong:
                return wrong
            eid = answer.body["entry_id"]
            if answer.status == 201 and answer.header("Location") != f"/api/v1/entries/{eid}":
                return f"Location {answer.header('Location')!r} does not name the entry"
            self.record_entry(person, answer, op)
            previous = person.holds
            if answer.status == 201:
                person.granted += 1
            if previous is None:
                person.holds = eid
            if previous is not None and previous != eid:
                return f"two entries for one citizen: {eid} while holding {previous}"
            if answer.status == 201 and person.granted > 1:
                return "two entries for one citizen: a second 201"
            if (
                answer.status == 200
                and previous is None
                and not person.lost_answer
                and not person.concurrent
            ):
                return "200 'the same entry' for a citizen who never entered"
            return None
        if answer.status == 409 and answer.code == "round-not-open":
            if now < OPENS_AT + CLOCK_SLACK or now > CLOSES_AT - CLOCK_SLACK:
                return None
            return "round-not-open while the round is open"
        if answer.status == 429:
            return None
        return f"unexpected {answer.status} {answer.code}"

    def look_up_entry(self, person: Person, eid: str) -> None:
        def check(answer: Answer) -> str | None:
            if answer.status != 200:
                return f"unexpected {answer.status} {answer.code} for one's own entry"
            wrong = crowd.entry_wrong(
                answer.body,
                round_id=ROUND,
                site_id=None,
                accept_district=None,
                citizen=person.citizen_id,
            )
            if wrong:
                return wrong
            if answer.body["entry_id"] != eid:
                return "the lookup answered another entry"
            self.record_entry(person, answer, "lookup")
            return None

        self.look_up_path(person, f"/api/v1/entries/{eid}", check)

    def look_up(self, person: Person, rid: str) -> None:
        def check(answer: Answer) -> str | None:
            if answer.status != 200:
                return f"unexpected {answer.status} {answer.code} for one's own reservation"
            wrong = crowd.reservation_wrong(
                answer.body,
                round_id=ROUND,
                site_id=None,
                per_person=PER_PERSON,
                citizen=person.citizen_id,
            )
            if wrong:
                return wrong
            if answer.body["reservation_id"] != rid:
                return "the lookup answered another reservation"
            return None

        self.look_up_path(person, f"/api/v1/reservations/{rid}", check)

    def look_up_path(
        self, person: Person, path: str, check: Callable[[Answer], str | None]
    ) -> None:
        """GET one's own reservation or entry, up to three times while the answer is a refusal
        to come back later (429, 503) or no answer at all, as a citizen reloads the page."""
        for attempt in range(3):
            answer = self.call(person, "GET", path, "lookup", check=check)
            if answer.status not in (0, 429, 503) or attempt == 2:
                return
            gevent.sleep(answer.retry_after + random.random() if answer.status else 0.5)


class Citizen(CrowdUser):
    weight = 65
    actor = "citizen"
    wait_time = between(2, 6)

    def register(self, person: Person, sites: list[dict[str, Any]], site: str | None) -> None:
        """Enters, sometimes changes their mind once (another site: the last choice counts),
        then looks the entry up."""
        eid = self.enter(person, site, random.random() < 0.5) if site else None
        if eid and random.random() < CHANGE_MIND:
            gevent.sleep(random.uniform(0.3, 1.5))
            other = self.choose(sites, avoid=site)
            if other:
                self.enter(person, other, random.random() < 0.5, "re-enter")
        if eid:
            gevent.sleep(random.uniform(0.2, 1.0))
            self.look_up_entry(person, eid)
        self.finish(person)

    @task
    def arrive(self) -> None:
        if self.crowd_over():
            return
        person = self.new_person()
        self.wait_for_opening(person, reaction=random.expovariate(1 / 0.4))
        sites = self.browse(person)
        site = self.choose(sites)
        if LOTTERY:
            self.register(person, sites, site)
            return
        rid = self.reserve(person, site) if site else None
        if rid:
            gevent.sleep(random.uniform(0.2, 1.0))
            self.look_up(person, rid)
        self.finish(person)


class ImpatientCitizen(CrowdUser):
    """Presses the button again and again, whatever the answer and whatever Retry-After says."""

    weight = 10
    actor = "impatient"
    wait_time = between(2, 6)

    @task
    def arrive(self) -> None:
        if self.crowd_over():
            return
        person = self.new_person()
        self.wait_for_opening(person, reaction=random.expovariate(1 / 0.2))
        site = self.choose(self.browse(person))
        accept = random.random() < 0.5
        for _ in range(random.randint(3, 5)):
            if site is None:
                break
            if LOTTERY:
                answer = self.enter_answered(
                    person, site, accept, "resubmit", honour_retry_after=False
                )
                if answer.granted:
                    person.end = "entered"
            else:
                answer = self.reserve_answered(person, site, "resubmit", honour_retry_after=False)
                if answer.granted:
                    person.end = "granted"
                elif person.end != "granted" and answer.code == "sold-out":
                    person.end = "sold-out"
            gevent.sleep(random.uniform(0.05, 0.3))
        if person.holds:
            if LOTTERY:
                self.look_up_entry(person, person.holds)
            else:
                self.look_up(person, person.holds)
        self.finish(person)


class DuplicateSubmitter(CrowdUser):
    """Sends one citizen to two sites at the same moment (two tabs, two family members)."""

    weight = 5
    actor = "duplicate"
    wait_time = between(2, 6)

    @task
    def arrive(self) -> None:
        if self.crowd_over():
            return
        person = self.new_person()
        self.wait_for_opening(person, reaction=random.expovariate(1 / 0.4))
        sites = self.browse(person)
        first = self.choose(sites)
        second = self.choose(sites, avoid=first)
        person.concurrent = True
        targets = [s for s in (first, second) if s]
        if LOTTERY:  # two tabs, two choices: one entry, whichever choice the service saw last
            jobs = [
                gevent.spawn(self.enter_answered, person, s, random.random() < 0.5, "enter-twice")
                for s in targets
            ]
        else:
            jobs = [
                gevent.spawn(self.reserve_answered, person, s, "reserve-twice") for s in targets
            ]
        gevent.joinall(jobs, raise_error=True)
        person.concurrent = False
        answers: list[Answer] = [j.value for j in jobs]
        if LOTTERY:
            if any(a.granted for a in answers):
                person.end = "entered"
            if person.holds:
                self.look_up_entry(person, person.holds)
            self.finish(person)
            return
        if any(a.granted for a in answers):
            person.end = "granted"
        elif any(a.code == "sold-out" for a in answers):
            person.end = "sold-out"
        if (
            not person.holds
            and not person.lost_answer
            and any(a.code == "already-reserved" for a in answers)
        ):
            RECORD.write(
                {"k": "v", "who": self.actor, "why": "already-reserved, yet neither was granted"}
            )
        if person.holds:
            self.look_up(person, person.holds)
        self.finish(person)


class Reader(CrowdUser):
    """Refreshes the pages: the rounds, the round, and site availability."""

    weight = 20
    actor = "reader"
    wait_time = between(2, 5)

    def on_start(self) -> None:
        self.person = self.new_person()

    @task(1)
    def rounds(self) -> None:
        if self.crowd_over():
            return

        def check(answer: Answer) -> str | None:
            if answer.status != 200:
                return f"unexpected {answer.status} {answer.code}"
            return crowd.rounds_wrong(answer.body, ROUND)

        self.call(self.person, "GET", "/api/v1/rounds", "rounds", check=check)

    @task(2)
    def round(self) -> None:
        if self.crowd_over():
            return
        self.call(self.person, "GET", f"/api/v1/rounds/{ROUND}", "round", check=self.check_round)

    @task(4)
    def sites(self) -> None:
        if self.crowd_over():
            return
        self.browse(self.person)


class Bot(CrowdUser):
    """A scalper's script: 20 new IDs a second, all from one address, never waiting for answers.

    It starts a second before the opening and fires at its own pace (up to 32 requests in
    flight), so a slow service does not slow it down the way it slows people down.
    """

    fixed_count = BOTS
    actor = "bot"
    concurrency = 32
    rate = 20.0
    wait_time = constant(0)

    @task
    def hammer(self) -> None:
        if self.crowd_over():
            return
        if not self.arrived:
            self.arrived = True
            gevent.sleep(max(0.0, OPENS_AT - 1 - time.time()))
        if not KNOWN_SITES:
            self.browse(self.new_person(address=crowd.BOT_ADDRESS, new_connection=False))
        pool = gevent.pool.Pool(self.concurrency)
        while time.time() < ENDS_AT:
            if pool.free_count():
                pool.spawn(self.claim)
            gevent.sleep(1 / self.rate)
        pool.join()

    def claim(self) -> None:
        person = self.new_person(address=crowd.BOT_ADDRESS, new_connection=False)
        if KNOWN_SITES and LOTTERY:
            # sites chosen as people choose them, so that a fair draw gives it the same chance
            site = self.choose([{"site_id": s, "remaining": PER_PERSON} for s in KNOWN_SITES])
            if site:
                answer = self.enter_answered(person, site, random.random() < 0.5, "enter")
                person.end = "entered" if answer.granted else answer.code or str(answer.status)
        elif KNOWN_SITES:
            answer = self.reserve_answered(person, KNOWN_SITES[0], "reserve")  # the popular one
            person.end = "granted" if answer.granted else answer.code or str(answer.status)
        self.finish(person)
