use std::rc::Rc;

use crate::buf::ReadBuf;
use crate::pooled::transaction::Transaction;
use crate::protocol::backend as be;
use crate::protocol::frame::HEADER_BYTES;
use crate::protocol::frontend as fe;
use crate::protocol::reader::Reader;
use crate::protocol::write;

use super::client::statement_cost;
use super::described::pin_parameter_types;
use super::statement::SWEEP_MIN_TEXTS;
use super::translator::REFUSAL_NAME;
use super::*;

fn parse_message(name: &str, sql: &str) -> Vec<u8> {
    let mut m = Vec::new();
    write::parse(&mut m, name, sql);
    m
}

fn bind_message(portal: &str, name: &str) -> Vec<u8> {
    let mut m = Vec::new();
    write::bind(&mut m, portal, name);
    m
}

fn message(tag: u8, body: &[u8]) -> Vec<u8> {
    let mut m = vec![tag];
    m.extend_from_slice(&(body.len() as u32 + 4).to_be_bytes());
    m.extend_from_slice(body);
    m
}

/// The messages in `bytes`, as (tag, first name in the body).
fn messages(bytes: &[u8]) -> Vec<(char, String)> {
    let mut out = Vec::new();
    let mut rest = bytes;
    while rest.len() >= 5 {
        let len = u32::from_be_bytes([rest[1], rest[2], rest[3], rest[4]]) as usize + 1;
        let body = &rest[5..len];
        let name_at = usize::from(matches!(rest[0], b'C' | b'D'));
        let mut r = Reader::new(&body[name_at..]);
        let first = if rest[0] == b'B' {
            let _ = r.cstr();
            r.cstr_utf8().unwrap_or("?").to_owned()
        } else {
            r.cstr_utf8().unwrap_or("?").to_owned()
        };
        out.push((char::from(rest[0]), first));
        rest = &rest[len..];
    }
    out
}

struct Fixture {
    tx: Transaction,
    client: ClientStatements,
    backend: BackendStatements,
    texts: SharedTexts,
    transient: Transient,
    out: Vec<u8>,
    max: usize,
}

impl Fixture {
    fn new(max: usize) -> Self {
        Fixture {
            tx: Transaction::default(),
            client: ClientStatements::new("app", None),
            backend: BackendStatements::default(),
            texts: SharedTexts::default(),
            transient: Transient::default(),
            out: Vec::new(),
            max,
        }
    }

    fn t(&mut self) -> Translator<'_> {
        Translator {
            tx: &mut self.tx,
            client: &mut self.client,
            backend: &mut self.backend,
            max: self.max,
            texts: &self.texts,
            transient: &mut self.transient,
            out: &mut self.out,
        }
    }

    fn sync(&mut self) {
        self.tx.client(fe::SYNC, 0);
    }

    fn reply(&mut self, tags: &[u8]) -> Vec<u8> {
        let mut to_client = Vec::new();
        for &tag in tags {
            let body: &[u8] = if tag == be::READY_FOR_QUERY {
                b"I"
            } else {
                b""
            };
            let reply = self.tx.backend(tag, body).expect("in turn");
            if reply == super::super::transaction::Reply::Forward {
                to_client.push(tag);
            }
            let mut synthesized = Vec::new();
            self.tx.take_synthesized(&mut synthesized);
            to_client.extend(messages(&synthesized).iter().map(|(t, _)| *t as u8));
        }
        for undo in self.tx.take_undo() {
            undo.apply(&mut self.client, &mut self.backend);
        }
        to_client
    }

    /// A new transaction on `backend`.
    fn on(&mut self, backend: BackendStatements) -> BackendStatements {
        self.transient = Transient::default();
        self.out.clear();
        std::mem::replace(&mut self.backend, backend)
    }
}

#[test]
fn a_statement_is_prepared_again_on_another_backend() {
    let mut f = Fixture::new(10);
    f.t()
        .parse(&parse_message("s1", "select $1"))
        .expect("well-formed");
    f.sync();
    let sent = messages(&f.out);
    assert_eq!(sent.len(), 1);
    assert!(sent[0].1.starts_with("bg_"), "{sent:?}");
    assert_eq!(f.reply(b"1Z"), b"1Z");
    // Next transaction, another backend: the Bind gets a Parse of the router's first.
    let first = f.on(BackendStatements::default());
    f.t()
        .bind(&bind_message("", "s1"), bind_message("", "s1").len())
        .expect("well-formed");
    f.sync();
    let sent = messages(&f.out);
    assert_eq!(sent.iter().map(|m| m.0).collect::<String>(), "PB");
    assert_eq!(sent[0].1, sent[1].1);
    assert_eq!(
        f.reply(b"12Z"),
        b"2Z",
        "the router's ParseComplete swallowed"
    );
    // Back on the first backend: it has it, nothing is re-prepared.
    f.on(first);
    f.t()
        .bind(&bind_message("", "s1"), bind_message("", "s1").len())
        .expect("well-formed");
    assert_eq!(messages(&f.out).len(), 1);
}

/// A RowDescription body of int4 columns named `names`.
fn int4_columns(names: &[&str]) -> Vec<u8> {
    let mut body = (names.len() as i16).to_be_bytes().to_vec();
    for name in names {
        body.extend_from_slice(name.as_bytes());
        body.push(0);
        body.extend_from_slice(&16_384u32.to_be_bytes()); // table
        body.extend_from_slice(&1i16.to_be_bytes()); // column
        body.extend_from_slice(&23u32.to_be_bytes()); // int4
        body.extend_from_slice(&4i16.to_be_bytes());
        body.extend_from_slice(&(-1i32).to_be_bytes());
        body.extend_from_slice(&0i16.to_be_bytes());
    }
    body
}

impl Fixture {
    /// The backend's answer to a Describe of a statement: ParameterDescription, then a
    /// RowDescription of `columns`; what the client gets of it.
    fn described(&mut self, columns: &[&str]) -> Vec<u8> {
        let mut to_client = self.reply(b"t");
        let reply = self
            .tx
            .backend(be::ROW_DESCRIPTION, &int4_columns(columns))
            .expect("in turn");
        if reply == super::super::transaction::Reply::Forward {
            to_client.push(be::ROW_DESCRIPTION);
        }
        apply_described(self.tx.take_described(), &mut self.backend);
        to_client
    }

    fn bind(&mut self, name: &str) -> Taken {
        let bind = bind_message("", name);
        self.t().bind(&bind, bind.len()).expect("well-formed")
    }
}

#[test]
fn a_backend_given_a_described_statement_is_asked_its_row_shape_first() {
    let mut f = Fixture::new(10);
    f.t()
        .parse(&parse_message("s1", "select * from t"))
        .expect("well-formed");
    let describe = message(fe::DESCRIBE, b"Ss1\0");
    assert_eq!(f.t().describe(&describe), Ok(Taken::Passed));
    f.sync();
    assert_eq!(f.reply(b"1"), b"1");
    assert_eq!(f.described(&["a"]), b"tT", "the client's own Describe");
    assert_eq!(f.reply(b"Z"), b"Z");
    // Another backend, which has the same text as one column too: a Describe of the
    // router's own goes first, then the Bind (translated again) goes on.
    f.on(BackendStatements::default());
    assert_eq!(f.bind("s1"), Taken::Check);
    let sent: String = messages(&f.out).iter().map(|m| m.0).collect();
    assert_eq!(sent, "PDH", "Parse, Describe and Flush of the router's own");
    assert!(f.tx.checking());
    assert_eq!(f.reply(b"1"), b"", "swallowed");
    assert_eq!(f.described(&["a"]), b"", "swallowed");
    assert!(!f.tx.checking());
    f.out.clear();
    assert_eq!(f.bind("s1"), Taken::Passed);
    assert_eq!(
        messages(&f.out).iter().map(|m| m.0).collect::<String>(),
        "B"
    );
    f.sync();
    assert_eq!(f.reply(b"2Z"), b"2Z");
    // A third backend, prepared after a DDL added a column: PostgreSQL's 0A000 in place of
    // the Bind (a failing statement holds the backend's place), and for every later one.
    f.on(BackendStatements::default());
    assert_eq!(f.bind("s1"), Taken::Check);
    f.reply(b"1");
    f.described(&["a", "b"]);
    f.out.clear();
    assert_eq!(f.bind("s1"), Taken::Answered);
    assert_eq!(messages(&f.out)[0].1, REFUSAL_NAME);
    let mut error = Vec::new();
    assert_eq!(
        f.tx.backend(be::ERROR_RESPONSE, b""),
        Ok(super::super::transaction::Reply::Swallow)
    );
    f.tx.take_synthesized(&mut error);
    let text = String::from_utf8_lossy(&error);
    assert!(text.contains("C0A000"), "{text}");
    assert!(
        text.contains("Mcached plan must not change result type"),
        "{text}"
    );
    assert!(text.contains("RRevalidateCachedQuery"), "{text}");
    assert!(f.tx.take_changed_shape(), "the pool is told");
    f.sync();
    assert_eq!(f.reply(b"Z"), b"Z");
    f.out.clear();
    assert_eq!(
        f.bind("s1"),
        Taken::Answered,
        "no check: the backend's shape is known"
    );
    assert_eq!(messages(&f.out)[0].1, REFUSAL_NAME);
    assert!(!f.tx.take_changed_shape(), "once per statement");
}

#[test]
fn a_close_the_backend_skipped_after_an_error_leaves_the_statement_there() {
    // A backend with room for one statement, which has s1.
    let mut f = Fixture::new(1);
    f.t()
        .parse(&parse_message("s1", "select 1"))
        .expect("well-formed");
    f.sync();
    assert_eq!(f.reply(b"1Z"), b"1Z");
    // A pipeline whose first message fails, then a Parse that makes room by closing s1:
    // the backend skips the Close with the rest, so it still has s1.
    f.out.clear();
    assert_eq!(f.bind("nope"), Taken::Answered, "26000");
    f.t()
        .parse(&parse_message("s2", "select 2"))
        .expect("well-formed");
    f.sync();
    assert_eq!(
        f.sent(),
        "PCP",
        "the refusal, then s1 closed and s2 prepared"
    );
    f.reply(b"EZ");
    assert!(!f.client.named.contains_key("s2"), "s2 was never prepared");
    // s1 is bound as it is: a Parse of it would fail (42P05, the backend has it).
    assert_eq!(f.bind("s1"), Taken::Passed);
    assert_eq!(f.sent(), "B");
}

#[test]
fn a_backend_behind_the_pools_plan_epoch_drops_its_statements_once() {
    let mut backend = BackendStatements::default();
    assert!(!backend.behind(1), "nothing to drop");
    backend.insert("bg_1", None);
    assert!(!backend.behind(1), "prepared in this epoch");
    assert!(backend.behind(2), "a DDL changed a row shape since");
    assert!(!backend.behind(2), "once");
}

/// ParameterDescription body of `oids`.
fn type_oids(oids: &[u32]) -> Vec<u8> {
    let mut body = (oids.len() as i16).to_be_bytes().to_vec();
    for oid in oids {
        body.extend_from_slice(&oid.to_be_bytes());
    }
    body
}

impl Fixture {
    /// The backend's answer to a Describe of a statement without a result: a
    /// ParameterDescription of `oids`, then NoData; what the client gets of it.
    fn described_parameters(&mut self, oids: &[u32]) -> Vec<u8> {
        let mut to_client = Vec::new();
        for (tag, body) in [
            (be::PARAMETER_DESCRIPTION, type_oids(oids)),
            (be::NO_DATA, Vec::new()),
        ] {
            let reply = self.tx.backend(tag, &body).expect("in turn");
            if reply == super::super::transaction::Reply::Forward {
                to_client.push(tag);
            }
        }
        apply_described(self.tx.take_described(), &mut self.backend);
        to_client
    }

    fn sent(&mut self) -> String {
        let sent = messages(&self.out).iter().map(|m| m.0).collect();
        self.out.clear();
        sent
    }
}

#[test]
fn a_backend_whose_plan_has_other_parameter_types_is_given_the_clients_statement() {
    let mut f = Fixture::new(10);
    f.t()
        .parse(&parse_message("s1", "insert into t values ($1)"))
        .expect("well-formed");
    let describe = message(fe::DESCRIBE, b"Ss1\0");
    assert_eq!(f.t().describe(&describe), Ok(Taken::Passed));
    f.sync();
    assert_eq!(f.reply(b"1"), b"1");
    assert_eq!(f.described_parameters(&[23]), b"tn", "told int4");
    assert_eq!(f.reply(b"Z"), b"Z");
    let statement = f.client.named.get("s1").expect("kept").clone();
    let int4 = parameter_types(&type_oids(&[23]));
    assert_eq!(statement.told_types(), int4);
    // The backend it was described on is known to have its types: a Bind just goes.
    f.out.clear();
    assert_eq!(f.bind("s1"), Taken::Passed);
    assert_eq!(f.sent(), "B");
    f.sync();
    assert_eq!(f.reply(b"2Z"), b"2Z");
    // A backend that has the text as another client prepared it after the text's
    // parameter became float4 (the router gave it the client's Parse as written, then
    // that client's Describe told float4): closed and prepared again with int4 spelled
    // out, then asked its row shape, then the Bind goes.
    let mut other = BackendStatements::default();
    let float4 = parameter_types(&type_oids(&[700]));
    other.insert(statement.server_name(), float4);
    f.on(other);
    assert_eq!(f.bind("s1"), Taken::Check);
    let sent = f.out.clone();
    assert_eq!(f.sent(), "CPDH");
    let mut pinned = Vec::new();
    statement.write_parse_for_backend(&mut pinned);
    assert!(
        sent.windows(pinned.len()).any(|w| w == pinned),
        "the Parse with int4 spelled out"
    );
    assert_eq!(f.reply(b"31"), b"", "swallowed");
    assert_eq!(f.described_parameters(&[23]), b"", "swallowed");
    assert_eq!(f.bind("s1"), Taken::Passed);
    assert_eq!(f.sent(), "B");
    f.sync();
    assert_eq!(f.reply(b"2Z"), b"2Z");
    // A backend whose plan's types the router does not know (a client's Parse as written,
    // never described there): asked first, kept if they are the client's.
    for (oids, then) in [(23, "B"), (700, "CPDH")] {
        let mut unknown = BackendStatements::default();
        unknown.insert(statement.server_name(), None);
        f.on(unknown);
        assert_eq!(f.bind("s1"), Taken::Check);
        assert_eq!(f.sent(), "DH");
        assert_eq!(f.described_parameters(&[oids]), b"", "swallowed");
        let taken = f.bind("s1");
        assert_eq!(f.sent(), then, "types {oids}");
        assert_eq!(taken == Taken::Passed, then == "B");
        f.tx = Transaction::default();
    }
}

/// What a Parse of `sql` (unnamed, no types) carries past its name.
fn after_name(sql: &str) -> Vec<u8> {
    let mut after = sql.as_bytes().to_vec();
    after.extend_from_slice(&[0, 0, 0]);
    after
}

#[test]
fn a_clients_parse_of_a_text_the_backend_has_is_parsed_there_again() {
    const INSERT: &str = "insert into t values ($1)";
    let mut f = Fixture::new(10);
    // The backend has the text, as another client prepared it and was told int4 (before a
    // DDL made the column float4, say).
    let mut backend = BackendStatements::default();
    let server_name = f.client.server_name(&after_name(INSERT));
    backend.insert(&server_name, parameter_types(&type_oids(&[23])));
    f.on(backend);
    f.t()
        .parse(&parse_message("s1", INSERT))
        .expect("well-formed");
    // Closed and parsed as the client sent it: the backend answers the client's Parse and
    // its Describe from the catalog as it is now.
    assert_eq!(f.sent(), "CP");
    let describe = message(fe::DESCRIBE, b"Ss1\0");
    assert_eq!(f.t().describe(&describe), Ok(Taken::Passed));
    assert_eq!(f.sent(), "D", "no check: the plan is the client's own");
    f.sync();
    assert_eq!(f.reply(b"31"), b"1", "the router's CloseComplete swallowed");
    assert_eq!(f.described_parameters(&[700]), b"tn", "told float4");
    assert_eq!(f.reply(b"Z"), b"Z");
    // A Parse that fails leaves the backend without the text (its Close ran).
    f.t()
        .parse(&parse_message("s2", INSERT))
        .expect("well-formed");
    assert_eq!(f.sent(), "CP");
    f.sync();
    assert_eq!(f.reply(b"3EZ"), b"EZ");
    assert!(!f.client.named.contains_key("s2"));
    assert!(f.backend.touch(&server_name).is_none());
}

#[test]
fn a_statement_parsed_without_a_backend_first_runs_on_a_plan_parsed_after_it() {
    const SELECT: &str = "select * from t where a = $1";
    let mut f = Fixture::new(10);
    let server_name = f.client.server_name(&after_name(SELECT));
    let older = || {
        let mut backend = BackendStatements::default();
        backend.insert(&server_name, None);
        backend
    };
    let (first, later) = (older(), older());
    // Parsed between transactions (answered by the router, [`answer_idle`]).
    let statement = f.client.statement(&after_name(SELECT), &f.texts);
    f.client.insert("s1".into(), statement);
    let mut newer = BackendStatements::default();
    newer.insert(&server_name, None);
    // The first backend that runs it has a plan from before the client's Parse: closed
    // and prepared again.
    f.on(first);
    assert_eq!(f.bind("s1"), Taken::Passed);
    assert_eq!(f.sent(), "CPB");
    f.sync();
    assert_eq!(f.reply(b"312Z"), b"2Z");
    // From then on a backend's plan runs it as it is, older or newer (what the client was
    // told, it was told by a plan parsed after its Parse).
    for backend in [newer, later] {
        f.on(backend);
        assert_eq!(f.bind("s1"), Taken::Passed);
        assert_eq!(f.sent(), "B");
        f.sync();
        assert_eq!(f.reply(b"2Z"), b"2Z");
    }
}

#[test]
fn a_plan_older_than_the_clients_with_another_row_shape_is_replaced_not_refused() {
    const SELECT: &str = "select * from t";
    let mut f = Fixture::new(10);
    // A backend that has the text with one column, described before a DDL added one.
    let server_name = f.client.server_name(&after_name(SELECT));
    let mut older = BackendStatements::default();
    older.insert(&server_name, None);
    let one_column = row_shape(be::ROW_DESCRIPTION, &int4_columns(&["a"]));
    older.described(&server_name, Described::Shape(one_column.expect("reads")));
    let mut unknown_older = BackendStatements::default();
    unknown_older.insert(&server_name, None);
    let unknown_newer = |f: &Fixture| {
        let mut backend = BackendStatements::default();
        backend.insert(&f.client.server_name(&after_name(SELECT)), None);
        backend
    };
    // The client prepares the text after the DDL on another backend: told two columns.
    f.on(BackendStatements::default());
    f.t()
        .parse(&parse_message("s1", SELECT))
        .expect("well-formed");
    let describe = message(fe::DESCRIBE, b"Ss1\0");
    assert_eq!(f.t().describe(&describe), Ok(Taken::Passed));
    f.sync();
    assert_eq!(f.reply(b"1"), b"1");
    assert_eq!(f.described(&["a", "b"]), b"tT");
    assert_eq!(f.reply(b"Z"), b"Z");
    // On the backend with the older plan: the client's statement is prepared there, its
    // shape checked, and the Bind goes (PostgreSQL answers a statement parsed after the
    // DDL with its rows, never 0A000).
    f.on(older);
    assert_eq!(f.bind("s1"), Taken::Check);
    assert_eq!(f.sent(), "CPDH");
    assert_eq!(f.reply(b"31"), b"");
    assert_eq!(f.described(&["a", "b"]), b"");
    assert_eq!(f.bind("s1"), Taken::Passed);
    assert_eq!(f.sent(), "B");
    assert!(!f.tx.take_changed_shape(), "nothing stale");
    // A plan whose shape the router does not know: one older than the client's Parse is
    // not asked (PostgreSQL's Describe of a plan from before the DDL fails with 0A000,
    // which would abort the client's transaction), the client's own is, once prepared;
    // a newer one is asked as it is.
    for (unknown, sent) in [(unknown_older, "CPDH"), (unknown_newer(&f), "DH")] {
        f.on(unknown);
        f.tx = Transaction::default();
        assert_eq!(f.bind("s1"), Taken::Check);
        assert_eq!(f.sent(), sent);
    }
}

#[test]
fn parameter_types_the_client_was_told_are_spelled_out_for_other_backends() {
    let types = type_oids;
    let mut f = Fixture::new(10);
    // The client gave the second parameter's type, left the first to the server.
    let mut parse = Vec::new();
    write::parse(&mut parse, "s1", "select $1 + 1, $2");
    parse.truncate(parse.len() - 2);
    parse.extend_from_slice(&types(&[0, 25]));
    let len = (parse.len() - 1) as u32;
    parse[1..5].copy_from_slice(&len.to_be_bytes());
    f.t().parse(&parse).expect("well-formed");
    let statement = f.client.named.get("s1").expect("kept").clone();
    let for_backend = |statement: &Statement| {
        let mut out = Vec::new();
        statement.write_parse_for_backend(&mut out);
        out
    };
    assert_eq!(for_backend(&statement), &statement.parse[..]);
    statement.told_parameters(&types(&[23, 25]));
    let pinned = for_backend(&statement);
    let pinned = &pinned[..];
    assert!(pinned.ends_with(&types(&[23, 25])), "{pinned:?}");
    assert_eq!(
        &pinned[..pinned.len() - 10],
        &statement.parse[..statement.parse.len() - 10]
    );
    assert_eq!(
        u32::from_be_bytes([pinned[1], pinned[2], pinned[3], pinned[4]]) as usize + 1,
        pinned.len()
    );
    // Given on another backend, it is sent with both types.
    f.sync();
    f.reply(b"1Z");
    f.on(BackendStatements::default());
    assert_eq!(f.bind("s1"), Taken::Passed);
    assert!(f.out.starts_with(pinned));
    // Every type given: nothing to spell out; far more than the Parse: not kept.
    assert_eq!(pin_parameter_types(pinned, &types(&[23, 25])), None);
    assert_eq!(
        pin_parameter_types(&statement.parse, &types(&[23; 200])),
        None
    );
    assert_eq!(pin_parameter_types(&statement.parse, b"\x00"), None);
}

#[test]
fn a_statement_never_described_is_not_checked() {
    let mut f = Fixture::new(10);
    f.t()
        .parse(&parse_message("s1", "select * from t"))
        .expect("well-formed");
    f.sync();
    f.reply(b"1Z");
    f.on(BackendStatements::default());
    assert_eq!(f.bind("s1"), Taken::Passed);
    let sent: String = messages(&f.out).iter().map(|m| m.0).collect();
    assert_eq!(sent, "PB");
}

#[test]
fn row_shapes_differ_in_names_types_and_modifiers_not_in_tables() {
    let shape = |body: &[u8]| row_shape(be::ROW_DESCRIPTION, body);
    let one = int4_columns(&["a"]);
    assert_eq!(shape(&one), shape(&one));
    assert_ne!(shape(&one), shape(&int4_columns(&["b"])));
    assert_ne!(shape(&one), shape(&int4_columns(&["a", "b"])));
    assert_ne!(shape(&one), row_shape(be::NO_DATA, b""));
    let mut other_table = one.clone();
    other_table[4] ^= 1;
    assert_eq!(shape(&one), shape(&other_table));
    let mut other_type = one.clone();
    other_type[13] = 20;
    assert_ne!(shape(&one), shape(&other_type));
    let mut modifier = one.clone();
    modifier[17] = 4;
    assert_ne!(shape(&one), shape(&modifier));
    assert_eq!(shape(&one[..one.len() - 1]), None, "cut short");
}

#[test]
fn same_text_same_server_name_other_search_path_other_name() {
    let mut a = Fixture::new(10);
    let mut b = Fixture::new(10);
    let mut c = Fixture::new(10);
    c.client = ClientStatements::new("app", Some("other"));
    a.t()
        .parse(&parse_message("x", "select 1"))
        .expect("well-formed");
    b.t()
        .parse(&parse_message("y", "select 1"))
        .expect("well-formed");
    c.t()
        .parse(&parse_message("x", "select 1"))
        .expect("well-formed");
    let (na, nb, nc) = (messages(&a.out), messages(&b.out), messages(&c.out));
    assert_eq!(na[0].1, nb[0].1);
    assert_ne!(na[0].1, nc[0].1);
    // A client that sets its search_path (or its role) later parses under it from then on;
    // what it parsed before keeps its name.
    let name_of = |f: &Fixture, client: &str| {
        f.client
            .named
            .get(client)
            .expect("kept")
            .server_name()
            .to_owned()
    };
    b.client.follow("app", Some("other"));
    b.t()
        .parse(&parse_message("z", "select 1"))
        .expect("well-formed");
    assert_eq!(name_of(&b, "z"), nc[0].1, "as if it had started with it");
    assert_eq!(name_of(&b, "y"), na[0].1);
    b.client.follow("reader", Some("other"));
    b.t()
        .parse(&parse_message("w", "select 1"))
        .expect("well-formed");
    assert_ne!(name_of(&b, "w"), name_of(&b, "z"), "another role");
    b.client.follow("app", None);
    b.t()
        .parse(&parse_message("v", "select 1"))
        .expect("well-formed");
    assert_eq!(name_of(&b, "v"), na[0].1, "back to the default");
}

#[test]
fn statements_parsed_after_a_set_local_search_path_in_the_transaction_are_told_apart() {
    let mut f = Fixture::new(10);
    let name_of = |f: &Fixture, client: &str| {
        let statement = f.client.named.get(client).expect("kept");
        statement.server_name().to_owned()
    };
    let parse = |f: &mut Fixture, name: &str, sql: &str| {
        f.t().parse(&parse_message(name, sql)).expect("well-formed");
    };
    parse(&mut f, "before", "select * from t");
    let query = |f: &mut Fixture, sql: &str| {
        let mut message = Vec::new();
        write::query(&mut message, sql);
        assert!(f.t().query(&message));
    };
    query(&mut f, "BEGIN");
    query(&mut f, "SET LOCAL search_path TO tenant_1");
    parse(&mut f, "one", "select * from t");
    query(&mut f, "SET LOCAL search_path TO tenant_2");
    parse(&mut f, "two", "select * from t");
    query(&mut f, "SET LOCAL search_path TO tenant_1");
    parse(&mut f, "one_again", "select * from t");
    let names = ["before", "one", "two", "one_again"].map(|n| name_of(&f, n));
    assert_ne!(names[0], names[1]);
    assert_ne!(names[1], names[2]);
    assert_ne!(names[0], names[2]);
    // What the transaction set before is part of it: tenant 1 after tenant 2 is not
    // taken for tenant 1 alone (the client may have set more between).
    assert_ne!(names[1], names[3]);
    // The next transaction starts from the session's own again.
    f.client.follow("app", None);
    parse(&mut f, "after", "select * from t");
    assert_eq!(name_of(&f, "after"), names[0]);
    // The same in a Parse, and a set_config for the transaction.
    parse(
        &mut f,
        "",
        "select set_config('search_path', 'tenant_1', true)",
    );
    parse(&mut f, "in_parse", "select * from t");
    assert_ne!(name_of(&f, "in_parse"), names[0]);
    f.client.follow("app", None);
    query(&mut f, "SET LOCAL work_mem = '1MB'");
    parse(&mut f, "not_a_lookup", "select * from t");
    assert_eq!(name_of(&f, "not_a_lookup"), names[0]);
    // RESET ALL takes search_path back to the session's default, whatever it was.
    query(&mut f, "RESET ALL");
    parse(&mut f, "after_reset", "select * from t");
    assert_ne!(name_of(&f, "after_reset"), names[0]);
}

#[test]
fn postgresql_answers_for_names() {
    let mut f = Fixture::new(10);
    f.t()
        .parse(&parse_message("s1", "select 1"))
        .expect("well-formed");
    f.sync();
    f.reply(b"1Z");
    f.out.clear();
    // Re-Parse of a name in use: a Parse that fails goes in its place, and the client
    // gets 42P05 in place of its error; the backend skips to the Sync.
    f.t()
        .parse(&parse_message("s1", "select 2"))
        .expect("well-formed");
    assert_eq!(messages(&f.out), [('P', REFUSAL_NAME.to_owned())]);
    f.t()
        .bind(&bind_message("", "s1"), bind_message("", "s1").len())
        .expect("well-formed");
    f.tx.client(fe::EXECUTE, 0);
    f.sync();
    let mut to_client = Vec::new();
    assert_eq!(
        f.tx.backend(be::ERROR_RESPONSE, b""),
        Ok(super::super::transaction::Reply::Swallow)
    );
    f.tx.take_synthesized(&mut to_client);
    assert!(String::from_utf8_lossy(&to_client).contains("42P05"));
    assert_eq!(f.reply(b"Z"), b"Z");
    assert_eq!(f.client.len(), 1, "the first statement keeps its name");
    // Bind of an unknown name: 26000 in place of the refusal's error.
    f.out.clear();
    f.t()
        .bind(&bind_message("", "nope"), bind_message("", "nope").len())
        .expect("well-formed");
    assert_eq!(messages(&f.out), [('P', REFUSAL_NAME.to_owned())]);
    f.sync();
    f.tx.backend(be::ERROR_RESPONSE, b"").expect("in turn");
    let mut to_client = Vec::new();
    f.tx.take_synthesized(&mut to_client);
    assert!(String::from_utf8_lossy(&to_client).contains("26000"));
    f.reply(b"Z");
    // Close of an unknown name: CloseComplete, nothing sent.
    f.out.clear();
    f.t()
        .close(&message(b'C', b"Snope\0"))
        .expect("well-formed");
    let mut synthesized = Vec::new();
    f.tx.take_synthesized(&mut synthesized);
    assert_eq!(synthesized, [b'3', 0, 0, 0, 4]);
    assert!(f.out.is_empty());
    // Close of a portal goes to the backend.
    f.t().close(&message(b'C', b"Pp1\0")).expect("well-formed");
    assert_eq!(messages(&f.out), [('C', "p1".to_owned())]);
}

#[test]
fn a_failed_parse_leaves_no_name() {
    let mut f = Fixture::new(10);
    f.t()
        .parse(&parse_message("bad", "selec 1"))
        .expect("well-formed");
    f.sync();
    assert_eq!(f.reply(b"EZ"), b"EZ");
    assert!(f.client.is_empty());
    assert!(f.backend.is_empty());
    // The name can be used again.
    f.out.clear();
    f.t()
        .parse(&parse_message("bad", "select 1"))
        .expect("well-formed");
    assert_eq!(messages(&f.out)[0].0, 'P');
}

#[test]
fn eviction_closes_the_least_recently_used() {
    let mut f = Fixture::new(2);
    for name in ["a", "b"] {
        f.t()
            .parse(&parse_message(name, &format!("select '{name}'")))
            .expect("well-formed");
    }
    f.sync();
    f.reply(b"11Z");
    // Use a, then parse c: b goes.
    f.out.clear();
    f.t()
        .bind(&bind_message("", "a"), bind_message("", "a").len())
        .expect("well-formed");
    f.t()
        .parse(&parse_message("c", "select 'c'"))
        .expect("well-formed");
    f.sync();
    let sent = messages(&f.out);
    assert_eq!(sent.iter().map(|m| m.0).collect::<String>(), "BCP");
    assert_eq!(f.reply(b"231Z"), b"21Z", "the router's CloseComplete");
    assert_eq!(f.backend.len(), 2);
}

#[test]
fn the_unnamed_statement_survives_the_transaction() {
    let mut f = Fixture::new(10);
    f.t()
        .parse(&parse_message("", "select $1"))
        .expect("well-formed");
    f.sync();
    f.reply(b"1Z");
    f.on(BackendStatements::default());
    f.t()
        .bind(&bind_message("", ""), bind_message("", "").len())
        .expect("well-formed");
    f.sync();
    assert_eq!(
        messages(&f.out).iter().map(|m| m.0).collect::<String>(),
        "PB",
        "parsed again on this backend"
    );
    assert_eq!(f.reply(b"12Z"), b"2Z");
}

#[test]
fn a_clients_statements_are_bounded_and_their_cost_follows_removals() {
    let mut f = Fixture::new(10);
    let long = format!("select '{}'", "x".repeat(10_000));
    let tries = MAX_CLIENT_STATEMENT_BYTES / 10_000 + 10;
    for i in 0..tries {
        f.t()
            .parse(&parse_message(&format!("s{i}"), &format!("{long} -- {i}")))
            .expect("well-formed");
    }
    assert!(
        f.client.named.len() < tries,
        "past the budget, a Parse is refused"
    );
    assert!(f.client.named.contains_key("s0"));
    assert!(f.client.bytes <= MAX_CLIENT_STATEMENT_BYTES);
    let total: usize = f
        .client
        .named
        .iter()
        .map(|(n, s)| statement_cost(n, s))
        .sum();
    assert_eq!(f.client.bytes, total);
    assert!(f.client.remove("s0"));
    f.client.clear();
    assert_eq!(f.client.bytes, 0);
}

#[test]
fn closes_between_transactions_are_answered_without_a_backend() {
    let mut statements = ClientStatements::new("app", None);
    let mut f = Fixture::new(10);
    f.t()
        .parse(&parse_message("s1", "select 1"))
        .expect("well-formed");
    statements.named = std::mem::take(&mut f.client.named);
    statements.bytes = std::mem::take(&mut f.client.bytes);
    let mut plain = ReadBuf::new(256);
    let mut bytes = message(b'C', b"Ss1\0");
    bytes.extend_from_slice(&message(b'H', b""));
    bytes.extend_from_slice(&message(b'S', b""));
    bytes.extend_from_slice(&message(b'C', b"Sother\0"));
    plain.spare_mut()[..bytes.len()].copy_from_slice(&bytes);
    plain.commit(bytes.len());
    let mut out = Vec::new();
    let known = KnownGood::default();
    let texts = SharedTexts::default();
    assert!(
        !answer_idle(&mut plain, &mut statements, &known, &texts, 10, &mut out),
        "a Close without its Sync stays"
    );
    assert_eq!(out, [b'3', 0, 0, 0, 4, b'Z', 0, 0, 0, 5, b'I']);
    assert!(statements.is_empty());
    assert_eq!(plain.data(), message(b'C', b"Sother\0"));
    // A batch with anything else goes to a backend, whole.
    let mut plain = ReadBuf::new(256);
    let mut bytes = message(b'C', b"Ss1\0");
    bytes.extend_from_slice(&bind_message("", "s1"));
    bytes.extend_from_slice(&message(b'S', b""));
    plain.spare_mut()[..bytes.len()].copy_from_slice(&bytes);
    plain.commit(bytes.len());
    out.clear();
    assert!(!answer_idle(
        &mut plain,
        &mut statements,
        &known,
        &texts,
        10,
        &mut out
    ));
    assert!(out.is_empty());
    assert_eq!(plain.len(), bytes.len());
}

#[test]
fn clients_that_prepare_the_same_text_share_one_copy() {
    let texts = SharedTexts::default();
    let after_name = |sql: &str| parse_message("x", sql)[HEADER_BYTES + 2..].to_vec();
    let (a, b) = (
        ClientStatements::new("app", None),
        ClientStatements::new("app", None),
    );
    let held = a.statement(&after_name("select 1"), &texts);
    let other = b.statement(&after_name("select 1"), &texts);
    assert!(Rc::ptr_eq(&held.parse, &other.parse), "one copy");
    assert_eq!(texts.len(), 1);
    // Another role's (or search_path's) is another statement on the backends.
    let third = ClientStatements::new("other", None);
    let elsewhere = third.statement(&after_name("select 1"), &texts);
    assert_ne!(held.server_name(), elsewhere.server_name());
    assert_eq!(texts.len(), 2);
    // Texts no client holds go when the set has doubled (its 2048th text sweeps it); held
    // ones stay.
    drop((other, elsewhere));
    for i in 0..2 * SWEEP_MIN_TEXTS - 1 {
        let _ = a.statement(&after_name(&format!("select {i} + 1")), &texts);
    }
    assert_eq!(texts.len(), 2, "swept: the held one and the newest");
    let again = b.statement(&after_name("select 1"), &texts);
    assert!(Rc::ptr_eq(&held.parse, &again.parse));
}

#[test]
fn parses_of_accepted_statements_are_answered_without_a_backend() {
    let known = KnownGood::default();
    let texts = SharedTexts::default();
    let mut statements = ClientStatements::new("app", None);
    let mut batch = parse_message("p1", "select 1");
    batch.extend_from_slice(&message(b'S', b""));
    let fill = |bytes: &[u8]| {
        let mut plain = ReadBuf::new(256);
        plain.spare_mut()[..bytes.len()].copy_from_slice(bytes);
        plain.commit(bytes.len());
        plain
    };
    let mut out = Vec::new();
    // Not known to parse yet: a backend must see it.
    let mut plain = fill(&batch);
    assert!(!answer_idle(
        &mut plain,
        &mut statements,
        &known,
        &texts,
        10,
        &mut out
    ));
    assert!(out.is_empty() && statements.is_empty());
    let accepted = statements.statement(&parse_message("x", "select 1")[7..], &texts);
    known.add(&accepted);
    let mut plain = fill(&batch);
    assert!(answer_idle(
        &mut plain,
        &mut statements,
        &known,
        &texts,
        10,
        &mut out
    ));
    assert_eq!(out, [b'1', 0, 0, 0, 4, b'Z', 0, 0, 0, 5, b'I']);
    assert_eq!(statements.len(), 1);
    // The statement kept is the one a backend accepted: the same Parse, one copy.
    let kept = statements.named.get("p1").expect("kept");
    assert!(Rc::ptr_eq(&kept.parse, &accepted.parse), "{kept:?}");
    // The same name again is 42P05: for a backend to answer.
    out.clear();
    let mut plain = fill(&batch);
    assert!(!answer_idle(
        &mut plain,
        &mut statements,
        &known,
        &texts,
        10,
        &mut out
    ));
    assert!(out.is_empty());
}

#[test]
fn deallocate_all_pipelined_before_a_parse_and_deallocate_of_a_name_only_the_router_knows() {
    let mut f = Fixture::new(10);
    f.t()
        .parse(&parse_message("s1", "select 1"))
        .expect("well-formed");
    f.sync();
    f.reply(b"1Z");
    f.out.clear();
    // Pipelined: DEALLOCATE ALL, then a Parse of the same name.
    assert!(f.t().query(&message(b'Q', b"DEALLOCATE ALL\0")));
    f.t()
        .parse(&parse_message("s1", "select 2"))
        .expect("well-formed");
    f.sync();
    assert_eq!(
        messages(&f.out).iter().map(|m| m.0).collect::<String>(),
        "QP"
    );
    assert_eq!(f.reply(b"CZ1Z"), b"CZ1Z");
    // DEALLOCATE of a name only the router knows: answered by the router.
    f.out.clear();
    assert!(!f.t().query(&message(b'Q', b"DEALLOCATE s1\0")));
    assert!(f.out.is_empty());
    let mut synthesized = Vec::new();
    f.tx.take_synthesized(&mut synthesized);
    assert_eq!(
        messages(&synthesized)
            .iter()
            .map(|m| m.0)
            .collect::<String>(),
        "CZ"
    );
    assert!(f.client.is_empty());
}

#[test]
fn a_named_parse_longer_than_a_buffer_is_gathered_and_kept() {
    let mut f = Fixture::new(10);
    let parse = parse_message("long", &format!("select '{}'", "x".repeat(30_000)));
    let (start, rest) = parse.split_at(4_000);
    assert!(
        !f.t().long_parse(start, parse.len()),
        "the rest is not passed on"
    );
    assert!(f.transient.gathering());
    assert!(f.out.is_empty(), "nothing goes before it is all here");
    let (middle, end) = rest.split_at(20_000);
    f.t().gathered_rest(middle, false).expect("well-formed");
    assert!(f.out.is_empty());
    f.t().gathered_rest(end, true).expect("well-formed");
    assert!(!f.transient.gathering());
    let sent = messages(&f.out);
    assert_eq!(sent.len(), 1);
    assert!(sent[0].1.starts_with("bg_"), "renamed as a short one");
    f.sync();
    assert_eq!(f.reply(b"1Z"), b"1Z");
    // Given to another backend whole in a later transaction.
    f.on(BackendStatements::default());
    let bind = bind_message("", "long");
    assert_eq!(f.t().bind(&bind, bind.len()), Ok(Taken::Passed));
    let sent = messages(&f.out);
    assert_eq!(sent.iter().map(|m| m.0).collect::<String>(), "PB");
    // Over the bound: refused where it starts, nothing gathered.
    let mut f = Fixture::new(10);
    let total = MAX_GATHERED_BYTES + 1;
    assert!(!f.t().long_parse(&start[..100], total));
    assert!(!f.transient.gathering());
    assert!(f.client.is_empty());
}
