import java.io.ByteArrayInputStream;
import java.io.StringWriter;
import java.nio.charset.StandardCharsets;
import java.sql.Connection;
import java.sql.DriverManager;
import java.sql.PreparedStatement;
import java.sql.ResultSet;
import java.sql.SQLException;
import java.sql.Savepoint;
import java.sql.Statement;
import java.util.ArrayList;
import java.util.List;
import java.util.Properties;
import org.postgresql.PGConnection;

/**
 * One pgjdbc client of the pooled port: args port, user, password, CA file (verify-full against
 * "localhost"), a client number k, rounds. pgjdbc names its server-side statements S_1, S_2, ...
 * from the fifth execution of a PreparedStatement on (prepareThreshold), the same names in every
 * connection; every statement's text or parameters hold k, so a router that mixes clients'
 * statements returns wrong numbers, which the checks catch. Prints one line per part.
 */
public class PooledJdbc {
    static void check(boolean ok, String what) {
        if (!ok) {
            throw new AssertionError(what);
        }
    }

    static String one(Connection c, String sql) throws SQLException {
        try (Statement s = c.createStatement(); ResultSet r = s.executeQuery(sql)) {
            check(r.next(), "a row from " + sql);
            return r.getString(1);
        }
    }

    static long count(Connection c, String tag) throws SQLException {
        try (PreparedStatement p = c.prepareStatement("select count(*) from pooled_items where client = ?")) {
            p.setString(1, tag);
            try (ResultSet r = p.executeQuery()) {
                r.next();
                return r.getLong(1);
            }
        }
    }

    public static void main(String[] args) throws Exception {
        int port = Integer.parseInt(args[0]);
        String user = args[1], password = args[2], ca = args[3];
        int k = Integer.parseInt(args[4]), rounds = Integer.parseInt(args[5]);
        String tag = "j" + k, app = "jdbc-" + k;
        Properties props = new Properties();
        props.setProperty("user", user);
        props.setProperty("password", password);
        props.setProperty("sslmode", "verify-full");
        props.setProperty("sslrootcert", ca);
        props.setProperty("ApplicationName", app);
        props.setProperty("connectTimeout", "30");
        // Sends application_name (and the other settings) in the StartupMessage, where pgjdbc
        // would otherwise SET them after login: RESET then goes back to them.
        props.setProperty("assumeMinServerVersion", "15");
        String url = "jdbc:postgresql://localhost:" + port + "/postgres";
        try (Connection c = DriverManager.getConnection(url, props)) {
            check(one(c, "select current_setting('application_name')").equals(app), "startup name");
            try (PreparedStatement p = c.prepareStatement("delete from pooled_items where client = ?")) {
                p.setString(1, tag);
                p.executeUpdate();
            }
            // Autocommit: one PreparedStatement, server-prepared (S_n) from its fifth execution,
            // then bound in transactions of their own on whichever backend the client gets.
            try (PreparedStatement p = c.prepareStatement("select ?::int * " + k + ", ?::text")) {
                for (int i = 0; i < rounds; i++) {
                    p.setInt(1, i);
                    p.setString(2, tag);
                    try (ResultSet r = p.executeQuery()) {
                        check(r.next() && r.getInt(1) == i * k && r.getString(2).equals(tag), "row " + i);
                    }
                }
            }
            System.out.println(tag + " prepared " + rounds);
            // Transactions (pgjdbc sends BEGIN in the same batch as the first statement).
            c.setAutoCommit(false);
            for (int i = 0; i < rounds; i++) {
                try (PreparedStatement p = c.prepareStatement("insert into pooled_items values (?, ?)")) {
                    p.setString(1, tag);
                    p.setInt(2, i);
                    p.executeUpdate();
                }
                check(count(c, tag) == i + 1, "own row " + i);
                c.commit();
            }
            // A failed statement inside a transaction, rolled back to a savepoint.
            Statement s = c.createStatement();
            s.executeUpdate("insert into pooled_items values ('" + tag + "', 100)");
            Savepoint sp = c.setSavepoint();
            String failed = "none";
            try {
                s.executeQuery("select 1/0");
            } catch (SQLException e) {
                failed = e.getSQLState();
            }
            c.rollback(sp);
            s.executeUpdate("insert into pooled_items values ('" + tag + "', 101)");
            c.commit();
            System.out.println(tag + " transactions " + count(c, tag) + " " + failed);
            c.commit();
            // executeBatch: the inserts pipelined under one Sync, then committed.
            try (PreparedStatement p = c.prepareStatement("insert into pooled_items values (?, ?)")) {
                for (int i = 0; i < 50; i++) {
                    p.setString(1, tag);
                    p.setInt(2, 1000 + i);
                    p.addBatch();
                }
                int[] done = p.executeBatch();
                check(done.length == 50, "batch of 50");
            }
            c.commit();
            // A batch with a failing row: nothing of it stays.
            failed = "none";
            try (PreparedStatement p = c.prepareStatement("insert into pooled_items values (?, ?)")) {
                p.setString(1, tag);
                p.setInt(2, 2000);
                p.addBatch();
                p.setString(1, tag);
                p.setNull(2, java.sql.Types.INTEGER);
                p.addBatch();
                p.executeBatch();
            } catch (SQLException e) {
                failed = e.getSQLState();
            }
            c.rollback();
            System.out.println(tag + " batch " + count(c, tag) + " " + failed);
            c.commit();
            // A cursor: fetchSize makes pgjdbc keep a portal open and fetch 64 rows at a time.
            try (PreparedStatement p = c.prepareStatement("select g * ? from generate_series(1, 1000) g")) {
                p.setFetchSize(64);
                p.setInt(1, k);
                long total = 0;
                try (ResultSet r = p.executeQuery()) {
                    while (r.next()) {
                        total += r.getLong(1);
                    }
                }
                System.out.println(tag + " cursor " + (total == 500500L * k));
            }
            c.commit();
            // COPY in and out through the CopyManager.
            StringBuilder rows = new StringBuilder();
            for (int i = 0; i < 200; i++) {
                rows.append(tag).append('\t').append(5000 + i).append('\n');
            }
            PGConnection pg = c.unwrap(PGConnection.class);
            long in = pg.getCopyAPI().copyIn("COPY pooled_items FROM STDIN",
                    new ByteArrayInputStream(rows.toString().getBytes(StandardCharsets.UTF_8)));
            c.commit();
            StringWriter out = new StringWriter();
            pg.getCopyAPI().copyOut("COPY (select n from pooled_items where client = '" + tag
                    + "' and n >= 5000 order by n) TO STDOUT", out);
            c.commit();
            String[] lines = out.toString().trim().split("\n");
            System.out.println(tag + " copy " + in + " " + lines.length + " " + lines[0] + " " + lines[lines.length - 1]);
            // setTransactionIsolation sends SET SESSION CHARACTERISTICS: it stays with this
            // client, in every later transaction.
            c.setTransactionIsolation(k % 2 == 0 ? Connection.TRANSACTION_SERIALIZABLE
                    : Connection.TRANSACTION_REPEATABLE_READ);
            List<String> levels = new ArrayList<>();
            for (int i = 0; i < rounds; i++) {
                levels.add(one(c, "show transaction_isolation"));
                c.commit();
            }
            String want = k % 2 == 0 ? "serializable" : "repeatable read";
            System.out.println(tag + " isolation " + levels.stream().allMatch(want::equals));
            c.setTransactionIsolation(Connection.TRANSACTION_READ_COMMITTED);
            c.setAutoCommit(true);
            // A SET outside a transaction stays with this client.
            s.execute("set application_name = 'jdbc-set-" + k + "'");
            List<String> names = new ArrayList<>();
            for (int i = 0; i < rounds; i++) {
                names.add(one(c, "select current_setting('application_name')"));
            }
            s.execute("reset application_name");
            System.out.println(tag + " set " + names.stream().allMatch(("jdbc-set-" + k)::equals)
                    + " " + one(c, "show application_name"));
            // Metadata: pgjdbc's catalog queries.
            try (ResultSet r = c.getMetaData().getColumns(null, "public", "pooled_items", null)) {
                List<String> cols = new ArrayList<>();
                while (r.next()) {
                    cols.add(r.getString("COLUMN_NAME"));
                }
                System.out.println(tag + " metadata " + cols);
            }
            // A DDL that changes a server-side statement's row type: PostgreSQL answers its
            // next execution with 0A000 (RevalidateCachedQuery), which pgjdbc answers in
            // autocommit by preparing it again, whichever backend the client gets.
            s.execute("drop table if exists j_shape_" + k);
            s.execute("create table j_shape_" + k + " (a int)");
            s.execute("insert into j_shape_" + k + " values (" + k + ")");
            List<Object> read = new ArrayList<>();
            try (PreparedStatement p = c.prepareStatement("select * from j_shape_" + k)) {
                for (int i = 0; i < 6; i++) {
                    try (ResultSet r = p.executeQuery()) {
                        r.next();
                        read.add(r.getObject(1));
                    }
                }
                s.execute("alter table j_shape_" + k + " alter column a type float4 using a + 0.5");
                for (int i = 0; i < 3; i++) {
                    try (ResultSet r = p.executeQuery()) {
                        r.next();
                        read.add(r.getObject(1));
                    }
                }
            }
            System.out.println(tag + " ddl " + read.subList(4, read.size()));
            s.close();
        }
    }
}
