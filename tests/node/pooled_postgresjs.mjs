// Postgres.js (porsager/postgres) through the pooled port: argv[2] port, argv[3] user, argv[4]
// password, argv[5] the CA file (verify-full against "localhost"), argv[6] tasks. One pool of
// five connections (five clients of the router) shared by `tasks` concurrent tasks, so queries
// are pipelined on each connection; every statement is prepared (Postgres.js's default) under
// names every connection shares. Every value a task reads holds its number, so a router that
// mixes clients' statements or replies returns wrong numbers, which the checks catch. Prints
// one line per part.
import fs from 'node:fs'
import assert from 'node:assert'
import postgres from 'postgres'

const [port, user, password, ca, tasks] = process.argv.slice(2)
const sql = postgres({
  host: 'localhost',
  port: Number(port),
  user,
  password,
  database: 'postgres',
  ssl: { ca: fs.readFileSync(ca), servername: 'localhost' },
  sslnegotiation: 'direct',
  max: 5,
  prepare: true,
  onnotice: () => {},
})
const each = (f) => Promise.all(Array.from({ length: Number(tasks) }, (_, k) => f(k + 1)))

async function main() {
  // Pipelined prepared statements: every task's queries share the five connections.
  const sums = await each(async (k) => {
    let sum = 0
    for (let i = 0; i < 20; i++) {
      const [{ v }] = await sql`select ${i}::int * ${k}::int as v, ${'p' + k}::text as tag`
      sum += v
    }
    return sum === 190 * k
  })
  console.log('pipelined', sums.every(Boolean), sums.length)

  // Transactions, each seeing its own uncommitted row; a failing one is rolled back.
  await sql`delete from pooled_items where client like 'p%'`
  const counts = await each(async (k) => {
    for (let i = 0; i < 5; i++) {
      await sql.begin(async (tx) => {
        await tx`insert into pooled_items values (${'p' + k}, ${i})`
        const [{ n }] = await tx`select count(*)::int as n from pooled_items where client = ${'p' + k}`
        assert.strictEqual(n, i + 1)
      })
    }
    const failed = await sql
      .begin(async (tx) => {
        await tx`insert into pooled_items values (${'p' + k}, -1)`
        await tx`select 1/0`
      })
      .then(() => 'none', (e) => e.code)
    // Several statements sent at once inside one transaction (an array is pipelined).
    const [, [{ n }]] = await sql.begin((tx) => [
      tx`insert into pooled_items values (${'p' + k}, 100)`,
      tx`select count(*)::int as n from pooled_items where client = ${'p' + k}`,
    ])
    return `${n} ${failed}`
  })
  console.log('transactions', [...new Set(counts)].join(','))

  // A cursor: rows fetched 100 at a time from one portal (Execute with a row limit, no Sync
  // between the pieces).
  let total = 0
  for await (const rows of sql`select g from generate_series(1, 1000) g`.cursor(100)) {
    total += rows.reduce((s, r) => s + r.g, 0)
  }
  console.log('cursor', total)

  // COPY in and out.
  const writable = await sql`copy pooled_items from stdin`.writable()
  for (let i = 0; i < 200; i++) writable.write(`pcopy\t${5000 + i}\n`)
  await new Promise((resolve, reject) => writable.end((e) => (e ? reject(e) : resolve())))
  const readable = await sql`copy (select n from pooled_items where client = 'pcopy' order by n) to stdout`.readable()
  let out = ''
  for await (const chunk of readable) out += chunk
  const lines = out.trim().split('\n')
  console.log('copy', lines.length, lines[0], lines[lines.length - 1])

  // A multi-statement simple query.
  await sql.unsafe("insert into pooled_items values ('pscript', 1); insert into pooled_items values ('pscript', 2)")
  const [{ n }] = await sql`select count(*)::int as n from pooled_items where client = 'pscript'`
  console.log('script', n)

  // A DDL that changes a prepared statement's row type: on PostgreSQL, 0A000
  // (RevalidateCachedQuery), which Postgres.js answers by describing and preparing again.
  await sql`drop table if exists pjs_shape`
  await sql`create table pjs_shape (a int)`
  await sql`insert into pjs_shape values (1)`
  const before = await each(async () => (await sql`select * from pjs_shape`)[0].a)
  await sql`alter table pjs_shape alter column a type float4 using a + 0.5`
  const after = await each(async () => (await sql`select * from pjs_shape`)[0].a)
  console.log('ddl', [...new Set(before)].join(','), [...new Set(after)].join(','))
  await sql.end()
}

await main().catch((e) => {
  console.error(e)
  process.exit(1)
})
