// node-postgres (pg, with pg-cursor and pg-copy-streams) through a port of the router: argv[2]
// port, argv[3] user, argv[4] password, argv[5] the CA file (verify-full against "localhost"),
// argv[6] "direct" or "postgres" (the SSL negotiation), argv[7] a tag naming this process's rows
// and table, argv[8] "pipeline" or "serial" (node-postgres's `pipeline` option for the pool's
// clients), argv[9] tasks. One pg.Pool of five clients shared by `tasks` concurrent tasks: the
// unnamed statement of each parameterised query (Parse, Bind, Describe of the portal, Execute,
// Sync), a named statement every client parses once under the same name, transactions and a
// failing one, a multi-statement query; and clients of their own for what a pipelined client
// refuses (a cursor fetched with row limits and Flush, COPY) and for startup parameters and a
// SET that must follow their client. (node-postgres reads binary results as text, so there are
// none.) Every value a task reads holds its number, so a router that mixes clients' statements
// or replies returns wrong numbers, which the checks catch. Prints one line per part: the test
// runs it on the direct port (PostgreSQL's own answers) and on the pooled port, and expects the
// same lines.
import fs from 'node:fs'
import assert from 'node:assert'
import pg from 'pg'
import Cursor from 'pg-cursor'
import { from as copyFrom, to as copyTo } from 'pg-copy-streams'
import { pipeline as pump } from 'node:stream/promises'
import { Readable } from 'node:stream'

const [port, user, password, ca, negotiation, tag, mode, tasks] = process.argv.slice(2)
const connection = {
  host: 'localhost',
  port: Number(port),
  user,
  password,
  database: 'postgres',
  ssl: { ca: fs.readFileSync(ca), servername: 'localhost' },
  sslnegotiation: negotiation,
}
const pool = new pg.Pool({ ...connection, max: 5, pipeline: mode === 'pipeline' })
const each = (f) => Promise.all(Array.from({ length: Number(tasks) }, (_, k) => f(k + 1)))
const code = (promise) => promise.then(() => 'none', (e) => e.code ?? e.message)

/** A client of its own (not pipelined: node-postgres refuses cursors and COPY in a pipeline). */
async function client(extra) {
  const c = new pg.Client({ ...connection, ...extra })
  await c.connect()
  return c
}

/** All five of the pool's clients at once, so that each of them runs `f`. */
async function everyPooled(f) {
  const clients = await Promise.all(Array.from({ length: 5 }, () => pool.connect()))
  try {
    return await Promise.all(clients.map(f))
  } finally {
    clients.forEach((c) => c.release())
  }
}

async function main() {
  // Parameterised queries: node-postgres sends each as the unnamed statement.
  const unnamed = await each(async (k) => {
    let sum = 0
    for (let i = 0; i < 20; i++) {
      const { rows } = await pool.query('select $1::int * $2::int as v, $3::text as t', [i, k, tag + k])
      assert.strictEqual(rows[0].t, tag + k)
      sum += rows[0].v
    }
    return sum === 190 * k
  })
  console.log('unnamed', unnamed.every(Boolean))

  // A named statement: each client parses it once, every client under the same name.
  const named = await each(async (k) => {
    let sum = 0
    for (let i = 0; i < 20; i++) {
      const { rows } = await pool.query({ name: 'nv', text: 'select $1::int + $2::int as v', values: [i, k] })
      sum += rows[0].v
    }
    return sum === 190 + 20 * k
  })
  console.log('named', named.every(Boolean))

  // Transactions on a client taken from the pool, each seeing its own rows; a failing one is
  // aborted until its ROLLBACK.
  const mine = (k) => `${tag}-${k}`
  await pool.query('delete from pooled_items where client like $1', [tag + '%'])
  const transactions = await each(async (k) => {
    const c = await pool.connect()
    try {
      for (let i = 0; i < 5; i++) {
        await c.query('begin')
        await c.query('insert into pooled_items values ($1, $2)', [mine(k), i])
        const { rows } = await c.query('select count(*)::int as n from pooled_items where client = $1', [mine(k)])
        assert.strictEqual(rows[0].n, i + 1)
        await c.query('commit')
      }
      await c.query('begin')
      await c.query('insert into pooled_items values ($1, -1)', [mine(k)])
      const failed = await code(c.query('select 1/0'))
      const aborted = await code(c.query('select 1'))
      await c.query('rollback')
      const { rows } = await c.query('select count(*)::int as n from pooled_items where client = $1', [mine(k)])
      return `${rows[0].n} ${failed} ${aborted}`
    } finally {
      c.release()
    }
  })
  console.log('transactions', [...new Set(transactions)].join(','))

  // A multi-statement query (no parameters: the simple protocol).
  await pool.query(`insert into pooled_items values ('${tag}-script', 1); insert into pooled_items values ('${tag}-script', 2)`)
  const script = await pool.query('select count(*)::int as n from pooled_items where client = $1', [`${tag}-script`])
  console.log('script', script.rows[0].n)

  // Startup parameters, and a SET outside a transaction, stay with their client while the
  // pool's clients run beside them.
  const tokyo = await client({ application_name: `${tag}-tokyo`, options: '-c TimeZone=Asia/Tokyo', statement_timeout: 4321 })
  const lima = await client({ application_name: `${tag}-lima`, options: '-c TimeZone=Asia/Tokyo' })
  await lima.query("set timezone to 'America/Lima'")
  const shown = new Set()
  await Promise.all([
    each(async (k) => {
      for (let i = 0; i < 5; i++) await pool.query('select $1::int', [k])
    }),
    (async () => {
      for (let i = 0; i < 5; i++) {
        for (const c of [tokyo, lima]) {
          const { rows } = await c.query(
            "select current_setting('application_name') as a, current_setting('TimeZone') as z, current_setting('statement_timeout') as s",
          )
          shown.add(`${rows[0].a}=${rows[0].z}/${rows[0].s}`)
        }
      }
    })(),
  ])
  console.log('settings', [...shown].sort().join(' ').replaceAll(tag, 'T'))

  // A cursor: rows fetched 100 at a time from one portal (Execute with a row limit and a Flush,
  // no Sync until the cursor closes).
  const cursor = tokyo.query(new Cursor('select g from generate_series(1, 1000) g'))
  let total = 0
  for (;;) {
    const rows = await cursor.read(100)
    if (rows.length === 0) break
    total += rows.reduce((s, r) => s + r.g, 0)
  }
  await cursor.close()
  console.log('cursor', total)

  // COPY in and out.
  const lines = Array.from({ length: 200 }, (_, i) => `${tag}-copy\t${5000 + i}\n`)
  await pump(Readable.from(lines), lima.query(copyFrom('copy pooled_items from stdin')))
  let out = ''
  for await (const chunk of lima.query(copyTo(`copy (select n from pooled_items where client = '${tag}-copy' order by n) to stdout`))) {
    out += chunk
  }
  const copied = out.trim().split('\n')
  console.log('copy', copied.length, copied[0], copied[copied.length - 1])

  // A DDL that changes a named statement's row type. node-postgres does not prepare a statement
  // again: PostgreSQL answers 0A000 on every client that parsed it before the DDL, an unnamed
  // query reads the new type, and a client parsing it after the DDL gets the new plan.
  const table = `${tag}_shape`
  await pool.query(`drop table if exists ${table}`)
  await pool.query(`create table ${table} (a int)`)
  await pool.query(`insert into ${table} values (1)`)
  const shape = { name: 'shape', text: `select * from ${table}` }
  const before = await everyPooled(async (c) => (await c.query(shape)).rows[0].a)
  await pool.query(`alter table ${table} alter column a type float4 using a + 0.5`)
  const after = await everyPooled(async (c) => {
    const stale = await code(c.query(shape))
    const { rows } = await c.query(`select * from ${table}`)
    return `${stale} ${rows[0].a}`
  })
  const fresh = await client({})
  const parsedAfter = (await fresh.query(shape)).rows[0].a
  console.log('ddl', [...new Set(before)].join(','), [...new Set(after)].join(','), parsedAfter)

  await Promise.all([tokyo.end(), lima.end(), fresh.end(), pool.end()])
}

await main().catch((e) => {
  console.error(e)
  process.exit(1)
})
