"""One SQLAlchemy 2.0 (asyncio, asyncpg) client of the pooled port: argv[1] port, argv[2] user,
argv[3] password, argv[4] the CA file (verify-full against "localhost"), argv[5] a client number
k, argv[6] rounds. The ORM as an application on PgBouncer uses it: its own pool of connections,
each checkout a transaction, asyncpg's prepared statements under asyncpg's names (the same
names in every client), bulk inserts through "insertmanyvalues" (one INSERT of 1,000 rows and
3,000 bound parameters, a Parse far over 20 KiB), selectinload's IN lists, updates, a failed
transaction rolled back. Every row holds k, so mixed-up statements give wrong numbers, which
the asserts catch. Odd clients use direct SSL, even ones the SSLRequest. Prints one line per
part."""
import asyncio
import sys
from urllib.parse import quote

import asyncpg
from sqlalchemy import ForeignKey, func, insert, select, text, update
from sqlalchemy.exc import DBAPIError
from sqlalchemy.ext.asyncio import async_sessionmaker, create_async_engine
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, relationship, selectinload

port, user, password, ca = int(sys.argv[1]), sys.argv[2], sys.argv[3], sys.argv[4]
k, rounds = int(sys.argv[5]), int(sys.argv[6])
tag = f"q{k}"
negotiation = "direct" if k % 2 else "postgres"
dsn = (f"postgresql://{quote(user)}:{quote(password)}@localhost:{port}/postgres?sslmode=verify-full"
       f"&sslrootcert={quote(ca)}&sslnegotiation={negotiation}")


class Base(DeclarativeBase):
    pass


class Order(Base):
    __tablename__ = f"sqla_orders_{k}"
    id: Mapped[int] = mapped_column(primary_key=True)
    client: Mapped[str]
    lines: Mapped[list["Line"]] = relationship(back_populates="order")


class Line(Base):
    __tablename__ = f"sqla_lines_{k}"
    id: Mapped[int] = mapped_column(primary_key=True)
    order_id: Mapped[int] = mapped_column(ForeignKey(f"sqla_orders_{k}.id"))
    n: Mapped[int]
    note: Mapped[str]
    order: Mapped[Order] = relationship(back_populates="lines")


async def main():
    engine = create_async_engine(
        "postgresql+asyncpg://", async_creator=lambda: asyncpg.connect(dsn=dsn, timeout=30),
        pool_size=2, max_overflow=0)
    sessions = async_sessionmaker(engine, expire_on_commit=False)
    async with engine.begin() as conn:
        await conn.run_sync(Base.metadata.drop_all)
        await conn.run_sync(Base.metadata.create_all)
    # Bulk: 50 orders, then 3,000 lines, through insertmanyvalues (RETURNING the ids): three
    # INSERTs of 1,000 rows each, prepared.
    async with sessions.begin() as session:
        order_ids = (await session.scalars(
            insert(Order).returning(Order.id), [{"client": tag} for _ in range(50)])).all()
        line_ids = (await session.scalars(insert(Line).returning(Line.id), [
            {"order_id": order_ids[i % 50], "n": i * k, "note": f"{tag}-{i}"}
            for i in range(3000)])).all()
        assert len(line_ids) == 3000, len(line_ids)
    async with sessions() as session:
        count, total = (await session.execute(
            select(func.count(), func.sum(Line.n)))).one()
    assert (count, total) == (3000, k * sum(range(3000))), (count, total)
    print(tag, "bulk", count)
    # The ORM in transactions of its own: selectinload (an IN list of the 50 orders), a
    # filtered query, an update; each round on whichever backend the checkout gets.
    for r in range(rounds):
        async with sessions.begin() as session:
            orders = (await session.scalars(
                select(Order).options(selectinload(Order.lines)).order_by(Order.id))).all()
            assert len(orders) == 50 and all(len(o.lines) == 60 for o in orders), r
            assert all(o.client == tag for o in orders), r
            line = (await session.scalars(
                select(Line).where(Line.note == f"{tag}-{r}"))).one()
            assert line.n == r * k, (r, line.n)
            await session.execute(update(Line).where(Line.id == line.id).values(n=line.n + 1))
        async with sessions() as session:
            n = await session.scalar(select(Line.n).where(Line.note == f"{tag}-{r}"))
        assert n == r * k + 1, (r, n)
    print(tag, "orm", rounds)
    # AUTOCOMMIT (sqlalchemy #12836: "prepared statement not found" through a transaction
    # pooler): each statement prepared in one transaction and run in the next.
    auto = engine.execution_options(isolation_level="AUTOCOMMIT")
    async with auto.connect() as conn:
        for r in range(rounds):
            n = await conn.scalar(select(Line.n).where(Line.note == f"{tag}-{r}"))
            assert n == r * k + 1, (r, n)
    print(tag, "autocommit", rounds)
    # A failed transaction is rolled back whole; the connection goes on.
    try:
        async with sessions.begin() as session:
            session.add(Line(order_id=order_ids[0], n=-1, note=f"{tag}-failed"))
            await session.flush()
            await session.execute(text("select 1/0"))
        failed = "none"
    except DBAPIError as e:
        failed = getattr(e.orig, "sqlstate", None) or getattr(e.orig, "pgcode", None)
    async with sessions() as session:
        left = await session.scalar(select(func.count()).where(Line.note == f"{tag}-failed"))
    print(tag, "rollback", failed, left)
    await engine.dispose()


asyncio.run(main())
