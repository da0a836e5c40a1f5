"""HL7 MLLP on two broker nodes sharing one PostgreSQL (each node its own listener and its own
connection pool, as two processes behind a TCP balancer): ADT messages for the same people sent
to both at once, and a message the balancer resent to the other node, leave one record per
identifier and one person per human, none lost, none doubled."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from typing import Any

import pytest
from sqlalchemy.engine import Engine
from sqlmodel import Session, select

from broker.db import make_engine
from broker.facilities.models import Facility
from broker.identity.adt import feed_principal
from broker.identity.mllp import MllpHandle, start_mllp, stop_mllp
from broker.identity.models import IdentityRecord, Person

from .test_mllp import adt, exchange, frame, msa

pytestmark = pytest.mark.postgres

PEOPLE = [
    ("NEUMANN^MICHAELA", "19151111", "F"),
    ("OKAFOR^CHIDI", "19620304", "M"),
    ("LINDQVIST^ASTRID", "19880719", "F"),
    ("TANAKA^HIROSHI", "19450202", "M"),
    ("MORALES^LUCIA", "20011230", "F"),
    ("KOWALSKI^PIOTR", "19790915", "M"),
]


@pytest.fixture
def two_nodes(pg_admin: Any, _pg_template: str) -> Iterator[tuple[Engine, list[MllpHandle]]]:
    name = pg_admin.new_name("mllp2")
    url = pg_admin.create(name, template=_pg_template)
    engines = [make_engine(url), make_engine(url)]
    with Session(engines[0]) as s:
        s.add(Facility(id="fac-a", name="A", issuer="ISSUER-A"))
        s.add(Facility(id="fac-b", name="B", issuer="ISSUER-B"))
        s.commit()
    handles = [
        start_mllp(engine=e, principal=feed_principal(facility="fac-a"), host="127.0.0.1", port=0)
        for e in engines
    ]
    try:
        yield engines[0], handles
    finally:
        for h in handles:
            stop_mllp(h)
        for e in engines:
            e.dispose()
        pg_admin.drop(name)


def test_adt_to_two_nodes_at_once_neither_loses_nor_doubles(
    two_nodes: tuple[Engine, list[MllpHandle]],
) -> None:
    engine, (node_a, node_b) = two_nodes
    # Node A: each person's registration at A. Node B: the same people registered at B, and
    # A's messages again (a balancer resends what a node it gave up on may have applied).
    to_a = [frame(adt("A01", f"A{i}", f"P{i}^^^ISSUER-A", *p)) for i, p in enumerate(PEOPLE)]
    to_b = [
        block
        for i, p in enumerate(PEOPLE)
        for block in (frame(adt("A04", f"B{i}", f"Q{i}^^^ISSUER-B", *p)), to_a[i])
    ]
    acks: dict[str, list[str]] = {}
    barrier = threading.Barrier(2)

    def send(name: str, node: MllpHandle, blocks: list[bytes]) -> None:
        barrier.wait()
        acks[name] = exchange(node, blocks)

    threads = [
        threading.Thread(target=send, args=("a", node_a, to_a)),
        threading.Thread(target=send, args=("b", node_b, to_b)),
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert not any(t.is_alive() for t in threads), "a sender hung"
    assert [msa(a)[1] for a in acks["a"] + acks["b"]] == ["AA"] * (len(to_a) + len(to_b))

    # An update sent to the other node than the registration: applied, not lost.
    assert (
        msa(
            exchange(
                node_b, [frame(adt("A08", "U0", "P0^^^ISSUER-A", "NEUMANN^MICHAELA ANNA", *PEOPLE[0][1:]))]
            )[0]
        )[1]
        == "AA"
    )

    with Session(engine) as s:
        records = s.exec(select(IdentityRecord)).all()
        persons = s.exec(select(Person.id)).all()
    by_value = {r.value: r for r in records}
    assert sorted(by_value) == sorted(
        [f"P{i}" for i in range(len(PEOPLE))] + [f"Q{i}" for i in range(len(PEOPLE))]
    )
    assert len(records) == 2 * len(PEOPLE), "an identifier was recorded twice"
    for i in range(len(PEOPLE)):
        assert by_value[f"P{i}"].person_id == by_value[f"Q{i}"].person_id, f"person {i} split across nodes"
    assert len({r.person_id for r in records}) == len(PEOPLE)
    assert len(persons) == len(PEOPLE), f"{len(persons) - len(PEOPLE)} orphan persons"
    assert by_value["P0"].given == "MICHAELA" and by_value["P0"].middle == "ANNA"
