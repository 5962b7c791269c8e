"""A model that predicts every reply of the token service (the idea of TigerBeetle's auditor and
Jepsen's bank test).

A Hypothesis state machine drives the real service over a real channel with random users, credits
and debits, replays of a reference with the same and with another payload, batches (a reference
repeated inside one batch), concurrent bursts on one account and page walks. An in-memory ledger,
written from the contract and docs/decisions.md rather than from the code, predicts each answer and
each balance exactly. Where concurrency leaves the order open, the model checks that the order the
service chose is one a serial ledger could have taken, and follows it.
"""

from __future__ import annotations

import asyncio
import functools
import math
from dataclasses import dataclass

import asyncpg
import grpc
from hypothesis import strategies as st
from hypothesis.stateful import Bundle, RuleBasedStateMachine, initialize, invariant, precondition, rule

from blumpo.token.v1 import token_pb2 as tpb
from tests import support
from tests.model_support import (
    Refusal,
    World,
    answer,
    machine_settings,
    now_and_then,
    recorded,
    refusal_of_status,
    run_machine,
)
from tests.support import TokenStub

# The contract's limits: a delta is at most 10^12 either way; a credit may take a balance to 10^15,
# a refund (it gives back an earlier debit) to twice that.
MAX_DELTA = 10**12
CAP = 10**15
GHOST = "00000000-0000-4000-8000-000000000000"  # a user id no example creates
REASONS = [
    tpb.LEDGER_REASON_GENERATION,
    tpb.LEDGER_REASON_GENERATION_REFUND,
    tpb.LEDGER_REASON_MONTHLY_REFILL,
    tpb.LEDGER_REASON_PURCHASE,
    tpb.LEDGER_REASON_SIGNUP_BONUS,
    tpb.LEDGER_REASON_ADJUSTMENT,
]
# References drawn from a small pool meet each other (replays and reuses); "signup" is the grant's.
# None, half the time, stands for a reference never used before (the machine numbers them).
REFERENCES = st.sampled_from([None] * 5 + ["signup", "r0", "r1", "r2", "r3"])
SMALL_DELTAS = st.integers(-120, 120).filter(lambda delta: delta != 0)
# One draw in six is at or past a limit: the largest deltas, and two the contract refuses.
DELTAS = now_and_then(SMALL_DELTAS, st.sampled_from([MAX_DELTA, -MAX_DELTA, 0, MAX_DELTA + 1]), 6)

# Appends a burst sends at once: signed as their reason wants; no refund (it needs its debit).
WELL_FORMED_MOVES = st.tuples(SMALL_DELTAS, st.sampled_from(REASONS[2:])).map(
    lambda move: (move[0] if move[1] == tpb.LEDGER_REASON_ADJUSTMENT else abs(move[0]), move[1])
) | st.tuples(SMALL_DELTAS.map(lambda delta: -abs(delta)), st.just(tpb.LEDGER_REASON_GENERATION))

Answer = tuple[tpb.LedgerEntry, bool] | Refusal  # (entry, replayed) or the refusal


def reason_name(reason: tpb.LedgerReason.ValueType) -> str:
    return tpb.LedgerReason.Name(reason).removeprefix("LEDGER_REASON_")


def request(
    user_id: str, delta: int, reason: tpb.LedgerReason.ValueType, reference: str
) -> tpb.AppendLedgerEntryRequest:
    return tpb.AppendLedgerEntryRequest(user_id=user_id, delta=delta, reason=reason, reference_id=reference)


@dataclass(frozen=True)
class Applied:
    """A new entry, bringing the balance to balance_after."""

    balance_after: int


@dataclass(frozen=True)
class Replayed:
    entry: tpb.LedgerEntry


Prediction = Applied | Replayed | Refusal


class Ledger:
    """The model: each account's balance and entries, changed as the contract says."""

    def __init__(self) -> None:
        self.balances: dict[str, int] = {}
        self.entries: dict[str, list[tpb.LedgerEntry]] = {}  # per user, oldest first
        self.by_reference: dict[tuple[str, str], tpb.LedgerEntry] = {}

    def record(self, entry: tpb.LedgerEntry) -> None:
        assert (entry.user_id, entry.reference_id) not in self.by_reference, "two entries for one reference"
        self.entries.setdefault(entry.user_id, []).append(entry)
        self.by_reference[entry.user_id, entry.reference_id] = entry
        self.balances[entry.user_id] = entry.balance_after

    def judge(self, asked: tpb.AppendLedgerEntryRequest) -> Prediction:
        """What the service must answer to asked, given every entry so far."""
        user, delta, reference = asked.user_id, asked.delta, asked.reference_id
        if delta == 0 or abs(delta) > MAX_DELTA or not signed_right(asked.reason, delta):
            return Refusal(grpc.StatusCode.INVALID_ARGUMENT, "INVALID_ARGUMENT")
        if user not in self.balances:
            return Refusal(grpc.StatusCode.NOT_FOUND, "ACCOUNT_NOT_FOUND", {"key": user})
        earlier = self.by_reference.get((user, reference))
        if earlier is not None:
            if (earlier.delta, earlier.reason) == (delta, asked.reason):
                return Replayed(earlier)
            reused = {"reference_id": reference, "delta": str(earlier.delta), "reason": reason_name(earlier.reason)}
            return Refusal(grpc.StatusCode.ALREADY_EXISTS, "IDEMPOTENCY_KEY_REUSED", reused)
        if asked.reason == tpb.LEDGER_REASON_GENERATION_REFUND:
            unmatched = self.unmatched_refund(asked)
            if unmatched is not None:
                return unmatched
        balance = self.balances[user]
        if balance + delta < 0:
            held = {"balance": str(balance), "requested": str(-delta)}
            return Refusal(grpc.StatusCode.FAILED_PRECONDITION, "INSUFFICIENT_TOKENS", held)
        if delta > 0 and balance + delta > credit_limit(asked.reason):
            held = {"balance": str(balance), "limit": str(CAP)}
            return Refusal(grpc.StatusCode.FAILED_PRECONDITION, "BALANCE_LIMIT_EXCEEDED", held)
        return Applied(balance + delta)

    def unmatched_refund(self, asked: tpb.AppendLedgerEntryRequest) -> Refusal | None:
        """A refund must name `<x>:refund` of a GENERATION debit <x> of its user, and give back
        no more than it."""
        reference = asked.reference_id
        debit = self.by_reference.get((asked.user_id, reference.removesuffix(":refund")))
        if not reference.endswith(":refund") or debit is None or debit.reason != tpb.LEDGER_REASON_GENERATION:
            metadata = {"reference_id": reference, "requested": str(asked.delta)}
        elif asked.delta > -debit.delta:
            metadata = {"reference_id": reference, "requested": str(asked.delta), "debit": str(-debit.delta)}
        else:
            return None
        return Refusal(grpc.StatusCode.FAILED_PRECONDITION, "REFUND_UNMATCHED", metadata)

    def check(self, asked: tpb.AppendLedgerEntryRequest, got: Answer) -> Prediction:
        """Compares an answer with the prediction, records what it wrote; returns the prediction."""
        predicted = self.judge(asked)
        if isinstance(predicted, Applied):
            assert not isinstance(got, Refusal), f"{asked} refused: {got}, expected {predicted}"
            entry, replayed = got
            assert not replayed, f"{asked} replayed {entry}, expected a new entry"
            written = (entry.user_id, entry.delta, entry.reason, entry.reference_id, entry.balance_after)
            assert written == (asked.user_id, asked.delta, asked.reason, asked.reference_id, predicted.balance_after)
            self.record(entry)
        elif isinstance(predicted, Replayed):
            assert got == (predicted.entry, True), f"{asked} answered {got}, expected the replay of {predicted.entry}"
        else:
            assert got == predicted, f"{asked} answered {got}, expected {predicted}"
        return predicted


def signed_right(reason: tpb.LedgerReason.ValueType, delta: int) -> bool:
    """GENERATION is a debit; ADJUSTMENT either; every other reason a credit."""
    if reason == tpb.LEDGER_REASON_GENERATION:
        return delta < 0
    return reason == tpb.LEDGER_REASON_ADJUSTMENT or delta > 0


def credit_limit(reason: tpb.LedgerReason.ValueType) -> int:
    return 2 * CAP if reason == tpb.LEDGER_REASON_GENERATION_REFUND else CAP


def outcome_name(predicted: Prediction) -> str:
    return predicted.reason if isinstance(predicted, Refusal) else type(predicted).__name__.lower()


def answer_of(response: tpb.AppendLedgerEntryResponse | Refusal) -> Answer:
    return response if isinstance(response, Refusal) else (response.entry, response.replayed)


def batch_answer(result: tpb.AppendLedgerEntryResult) -> Answer:
    if result.status.code != grpc.StatusCode.OK.value[0]:
        assert not result.HasField("entry")
        return refusal_of_status(result.status)
    return result.entry, result.replayed


class TokenMachine(RuleBasedStateMachine):
    users = Bundle("users")
    # One draw in eight is a user that does not exist.
    accounts = now_and_then(users, st.just(GHOST), 8)

    def __init__(self, world: World, token: TokenStub, grants: dict[str, int]) -> None:
        super().__init__()
        self.world = world
        self.token = token
        self.grants = grants
        self.ledger = Ledger()
        self.references = 0
        self.may_fill = self.filled = False
        world.examples += 1

    def _reference(self, drawn: str | None) -> str:
        if drawn is not None:
            return drawn
        self.references += 1
        return f"order-{self.references}"

    def _append(self, asked: tpb.AppendLedgerEntryRequest) -> Prediction:
        predicted = self.ledger.check(
            asked, answer_of(self.world.run(lambda: answer(self.token.AppendLedgerEntry(asked))))
        )
        self.world.seen[f"append {outcome_name(predicted)}"] += 1
        return predicted

    def _batch(self, entries: list[tpb.AppendLedgerEntryRequest]) -> None:
        response = self.world.run(
            lambda: self.token.AppendLedgerEntries(tpb.AppendLedgerEntriesRequest(entries=entries))
        )
        assert len(response.results) == len(entries)
        # Judged in order: an entry sees what the earlier ones of the batch wrote.
        for asked, result in zip(entries, response.results, strict=True):
            predicted = self.ledger.check(asked, batch_answer(result))
            self.world.seen[f"batch entry {outcome_name(predicted)}"] += 1

    def _create_user(self, plan: str) -> str:
        created = self.world.run(
            lambda: self.token.CreateUser(tpb.CreateUserRequest(email=support.new_email(), plan=plan))
        )
        user = created.user
        assert (user.account.plan, user.account.balance) == (plan, self.grants[plan])
        # The signup grant is the account's one entry: a SIGNUP_BONUS with reference "signup".
        listed = self.world.run(
            lambda: self.token.ListLedgerEntries(tpb.ListLedgerEntriesRequest(user_id=user.user_id))
        )
        [grant] = listed.entries
        assert (grant.delta, grant.reason, grant.reference_id, grant.balance_after) == (
            self.grants[plan],
            tpb.LEDGER_REASON_SIGNUP_BONUS,
            "signup",
            self.grants[plan],
        )
        assert not listed.next_page_token
        self.ledger.record(grant)
        return user.user_id

    # About one example in four may bring an account near the cap (1000 entries: the costliest step).
    @initialize(target=users, plan=st.sampled_from(["free", "pro"]), may_fill=st.sampled_from([False, True]))
    def first_user(self, plan: str, may_fill: bool) -> str:
        self.may_fill = may_fill
        return self._create_user(plan)

    @precondition(lambda self: len(self.ledger.balances) < 4)
    @rule(target=users, plan=st.sampled_from(["free", "pro"]))
    def another_user(self, plan: str) -> str:
        return self._create_user(plan)

    @rule(user=accounts, delta=DELTAS, reason=st.sampled_from(REASONS), reference=REFERENCES)
    def append(self, user: str, delta: int, reason: tpb.LedgerReason.ValueType, reference: str | None) -> None:
        self._append(request(user, delta, reason, self._reference(reference)))

    def _earlier_entry(self, user: str, data: st.DataObject) -> tpb.LedgerEntry:
        """One of the user's entries. Drawn as a number of fixed range, so the draws stay the same
        when a rerun's concurrent burst wrote other entries (Hypothesis replays draws to shrink)."""
        entries = self.ledger.entries[user]
        return entries[data.draw(st.integers(0, 2**16)) % len(entries)]

    @rule(user=users, data=st.data())
    def replay_same(self, user: str, data: st.DataObject) -> None:
        earlier = self._earlier_entry(user, data)
        predicted = self._append(request(user, earlier.delta, earlier.reason, earlier.reference_id))
        assert predicted == Replayed(earlier)

    @rule(user=users, data=st.data(), change=st.sampled_from(["delta", "reason", "both"]))
    def replay_other_payload(self, user: str, data: st.DataObject, change: str) -> None:
        earlier = self._earlier_entry(user, data)
        delta = earlier.delta
        if change != "reason":
            delta += -1 if earlier.delta in (-1, MAX_DELTA) else 1
        reason = earlier.reason
        if change != "delta":
            # The next reason whose sign fits the delta (a wrong sign is refused before any lookup).
            later = REASONS[REASONS.index(earlier.reason) + 1 :] + REASONS
            reason = next(r for r in later if r != earlier.reason and signed_right(r, delta))
        predicted = self._append(request(user, delta, reason, earlier.reference_id))
        assert isinstance(predicted, Refusal) and predicted.reason == "IDEMPOTENCY_KEY_REUSED"

    @rule(
        items=st.lists(st.tuples(accounts, DELTAS, st.sampled_from(REASONS), REFERENCES), min_size=1, max_size=8),
        repeat=st.sampled_from(["none", "same", "other delta"]),
        at=st.integers(0, 7),
    )
    def batch(self, items: list[tuple[str, int, tpb.LedgerReason.ValueType, str | None]], repeat: str, at: int) -> None:
        entries = [request(user, delta, reason, self._reference(ref)) for user, delta, reason, ref in items]
        if repeat != "none":
            # A reference repeated inside the batch, with the same payload or another delta.
            copy = tpb.AppendLedgerEntryRequest()
            copy.CopyFrom(entries[at % len(entries)])
            if repeat == "other delta":
                copy.delta = copy.delta + 1 if copy.delta != -1 else -2
            entries.append(copy)
        self._batch(entries)

    @rule(
        user=users,
        moves=st.lists(WELL_FORMED_MOVES, min_size=2, max_size=12),
    )
    @recorded
    def concurrent_burst(self, user: str, moves: list[tuple[int, tpb.LedgerReason.ValueType]]) -> None:
        """K appends with distinct references at once on one account. The model cannot know the
        order: the service's ledger tells it, and must be a serial order from the balance before
        in which every refusal saw a balance that existed and could not pay."""
        self.references += 1
        asked = [
            request(user, delta, reason, f"burst-{self.references}-{i}") for i, (delta, reason) in enumerate(moves)
        ]
        before = self.ledger.balances[user]
        answers = [answer_of(got) for got in self.world.run(lambda: self._all_at_once(asked))]
        written = {got[0].entry_id: got[0] for got in answers if not isinstance(got, Refusal)}
        assert all(got[1] is False for got in answers if not isinstance(got, Refusal))
        debits = sum(-delta for delta, _ in moves if delta < 0)
        credits = sum(delta for delta, _ in moves if delta > 0)
        if before - debits >= 0 and before + credits <= CAP:
            # Affordable and under the cap in any order: every one is applied.
            assert len(written) == len(asked), f"refused though affordable in any order: {answers}"
        order: list[tpb.LedgerEntry] = []
        if written:
            newest = self.world.run(
                lambda: self.token.ListLedgerEntries(tpb.ListLedgerEntriesRequest(user_id=user, page_size=len(written)))
            )
            order = list(reversed(newest.entries))
            assert {entry.entry_id: entry for entry in order} == written, "the newest entries are not the burst's"
        balances = [before]
        for entry in order:
            assert entry.balance_after == balances[-1] + entry.delta, f"not a serial order from {before}: {order}"
            balances.append(entry.balance_after)
        for one, got in zip(asked, answers, strict=True):
            if isinstance(got, Refusal):
                seen = int(got.metadata["balance"])
                assert seen in balances, f"{got} saw a balance that never existed ({balances})"
                if one.delta < 0:
                    assert got.reason == "INSUFFICIENT_TOKENS" and seen + one.delta < 0, got
                else:
                    assert got.reason == "BALANCE_LIMIT_EXCEEDED" and seen + one.delta > credit_limit(one.reason), got
        for entry in order:
            self.ledger.record(entry)
        self.world.seen["burst"] += 1
        self.world.seen["burst refusal"] += len(asked) - len(written)

    @rule(user=users, delta=SMALL_DELTAS, reason=st.sampled_from(REASONS), copies=st.integers(2, 8))
    @recorded
    def concurrent_same_reference(self, user: str, delta: int, reason: tpb.LedgerReason.ValueType, copies: int) -> None:
        """One request sent several times at once: one entry at most; the others replay it."""
        self.references += 1
        asked = request(user, delta, reason, f"burst-{self.references}")
        answers = [answer_of(got) for got in self.world.run(lambda: self._all_at_once([asked] * copies))]
        predicted = self.ledger.judge(asked)
        if isinstance(predicted, Applied):
            firsts = [got for got in answers if not isinstance(got, Refusal) and not got[1]]
            assert len(firsts) == 1, f"{len(firsts)} of {copies} copies wrote an entry: {answers}"
            self.ledger.check(asked, firsts[0])
            assert answers.count((firsts[0][0], True)) == copies - 1, answers
        else:
            for got in answers:
                self.ledger.check(asked, got)
        self.world.seen[f"same reference burst {outcome_name(predicted)}"] += 1

    async def _all_at_once(
        self, asked: list[tpb.AppendLedgerEntryRequest]
    ) -> list[tpb.AppendLedgerEntryResponse | Refusal]:
        return await asyncio.gather(*(answer(self.token.AppendLedgerEntry(one)) for one in asked))

    @precondition(lambda self: self.may_fill and not self.filled)
    @rule(user=users)
    def fill_near_the_cap(self, user: str) -> None:
        """One batch of up to 1000 credits of 10^12 brings the balance within 10^12 of the cap,
        where the largest purchase is refused and the largest refund still passes."""
        count = min(1000, (CAP - self.ledger.balances[user]) // MAX_DELTA)
        self.filled = True
        if count > 0:
            self._batch([request(user, MAX_DELTA, tpb.LEDGER_REASON_PURCHASE, f"fill-{i}") for i in range(count)])
            self.world.seen["filled near the cap"] += 1
        for reason in (tpb.LEDGER_REASON_PURCHASE, tpb.LEDGER_REASON_GENERATION_REFUND):
            self._append(request(user, MAX_DELTA, reason, self._reference(None)))

    def _near_the_cap(self) -> list[str]:
        return [user for user, balance in self.ledger.balances.items() if balance > CAP - MAX_DELTA]

    @precondition(lambda self: self._near_the_cap())
    @rule(
        data=st.data(),
        reason=st.sampled_from([tpb.LEDGER_REASON_PURCHASE, tpb.LEDGER_REASON_GENERATION_REFUND]),
        past=st.sampled_from([0, 1, MAX_DELTA]),
    )
    def credit_at_the_cap(self, data: st.DataObject, reason: tpb.LedgerReason.ValueType, past: int) -> None:
        """A credit that takes the balance to the cap (past 0) or past it: a purchase past it is
        refused; a refund that names no debit is refused before the cap is looked at."""
        near = self._near_the_cap()
        user = near[data.draw(st.integers(0, 2**16)) % len(near)]
        delta = min(MAX_DELTA, max(1, CAP - self.ledger.balances[user] + past))
        self._append(request(user, delta, reason, self._reference(None)))

    @rule(user=accounts, page_size=st.sampled_from([0, 1, 2, 3, 7, 500]))
    def walk_pages(self, user: str, page_size: int) -> None:
        """Every entry, newest first, page after page, each page full but the last."""
        first = tpb.ListLedgerEntriesRequest(user_id=user, page_size=page_size)
        if user == GHOST:
            got = self.world.run(lambda: answer(self.token.ListLedgerEntries(first)))
            assert got == Refusal(grpc.StatusCode.NOT_FOUND, "USER_NOT_FOUND", {"key": GHOST})
            return
        expected = list(reversed(self.ledger.entries[user]))
        if len(expected) > 20 * (page_size or 50):
            first.page_size = 500  # a long ledger in few pages
        size = first.page_size or 50
        seen: list[tpb.LedgerEntry] = []
        pages = 0
        page_request = first
        for _ in range(len(expected) // size + 2):
            page = self.world.run(functools.partial(self.token.ListLedgerEntries, page_request))
            pages += 1
            seen.extend(page.entries)
            if not page.next_page_token:
                break
            page_request = tpb.ListLedgerEntriesRequest(
                user_id=user, page_size=first.page_size, page_token=page.next_page_token
            )
        assert seen == expected
        assert pages == max(1, math.ceil(len(expected) / size))
        self.world.seen["page walk"] += 1

    @invariant()
    @recorded
    def balances_match(self) -> None:
        """After every step: each balance is the model's, and the ledger adds up to it."""
        self.world.steps += 1
        users = list(self.ledger.balances)
        balances, checks = self.world.run(lambda: self._balances_and_checks(users))
        assert [got.balance for got in balances] == [self.ledger.balances[user] for user in users]
        assert all(check.accounts_checked == 1 and not check.mismatches for check in checks), checks

    async def _balances_and_checks(
        self, users: list[str]
    ) -> tuple[list[tpb.GetTokenBalanceResponse], list[tpb.CheckBalancesResponse]]:
        balances = asyncio.gather(*(self.token.GetTokenBalance(tpb.GetTokenBalanceRequest(user_id=u)) for u in users))
        checks = asyncio.gather(*(self.token.CheckBalances(tpb.CheckBalancesRequest(user_id=u)) for u in users))
        return await balances, await checks


async def test_the_model_predicts_every_reply_of_the_token_service(token: TokenStub, admin: asyncpg.Connection) -> None:
    grants = {
        row["code"]: row["signup_grant"] for row in await admin.fetch("SELECT code, signup_grant FROM token.plan")
    }
    assert grants["free"] == 100  # the contract's free plan
    world = World(asyncio.get_running_loop())
    await run_machine(world, lambda: TokenMachine(world, token, grants), machine_settings(max_examples=30, steps=30))
    print(world.report("token model"))
    assert world.steps >= world.examples * 2
    everything = await token.CheckBalances(tpb.CheckBalancesRequest())
    assert everything.accounts_checked >= world.examples and not everything.mismatches
