//! The router's TOML files as text: the branch catalog and the router configuration.
//!
//! Written by hand (not through serde) so the tests also pin the file format operators write.

use std::fmt::Write as _;
use std::net::SocketAddr;
use std::path::Path;

use crate::certs::Certs;

/// One `[[branch]]` entry of the catalog.
#[derive(Clone, Debug)]
pub struct BranchSpec {
    /// The branch id (the text after the last dot of the user name).
    pub id: String,
    /// The primary's address.
    pub primary: SocketAddr,
    /// The replicas' addresses.
    pub replicas: Vec<SocketAddr>,
    /// (role name, SCRAM verifier) pairs.
    pub roles: Vec<(String, String)>,
    /// The `[branch.pool]` table's lines (raw TOML, e.g. `"pool_size = 2\n"`), if any.
    pub pool: Option<String>,
}

impl BranchSpec {
    /// A branch with a primary, no replicas and no roles.
    pub fn new(id: &str, primary: SocketAddr) -> BranchSpec {
        BranchSpec {
            id: id.to_owned(),
            primary,
            replicas: Vec::new(),
            roles: Vec::new(),
            pool: None,
        }
    }

    /// Adds a replica.
    pub fn replica(mut self, addr: SocketAddr) -> BranchSpec {
        self.replicas.push(addr);
        self
    }

    /// Adds a role with its verifier (`SCRAM-SHA-256$...`, as in pg_authid).
    pub fn role(mut self, name: &str, verifier: &str) -> BranchSpec {
        self.roles.push((name.to_owned(), verifier.to_owned()));
        self
    }

    /// Sets the branch's `[branch.pool]` lines (raw TOML): `.pool("pool_size = 2\n")`.
    pub fn pool(mut self, lines: &str) -> BranchSpec {
        self.pool = Some(lines.to_owned());
        self
    }
}

/// The catalog file for `branches`.
pub fn catalog_toml(branches: &[BranchSpec]) -> String {
    let mut out = String::new();
    for branch in branches {
        let replicas: Vec<String> = branch
            .replicas
            .iter()
            .map(|a| toml_string(&a.to_string()))
            .collect();
        // Writing to a String cannot fail.
        let _ = write!(
            out,
            "[[branch]]\nid = {}\nprimary = {}\nreplicas = [{}]\n\n[branch.roles]\n",
            toml_string(&branch.id),
            toml_string(&branch.primary.to_string()),
            replicas.join(", ")
        );
        for (name, verifier) in &branch.roles {
            let _ = writeln!(out, "{} = {}", toml_string(name), toml_string(verifier));
        }
        if let Some(pool) = &branch.pool {
            out.push_str("\n[branch.pool]\n");
            out.push_str(pool);
            if !pool.ends_with('\n') {
                out.push('\n');
            }
        }
        out.push('\n');
    }
    out
}

/// The router configuration: TLS from `certs`, the direct and pooled ports on `127.0.0.1:0`,
/// two workers. It ends inside its `[timeouts]` table, so text appended to it may add timeouts
/// before its own tables.
pub fn router_toml(certs: &Certs, catalog_file: &str) -> String {
    format!(
        "catalog = {}\nworkers = 2\n\n[listen]\ndirect = \"127.0.0.1:0\"\npooled = \"127.0.0.1:0\"\n\n\
         [tls]\ncert = {}\nkey = {}\n\n[timeouts]\nstartup = \"3s\"\ndrain = \"1s\"\nhealth_check_interval = \"500ms\"\n",
        toml_string(catalog_file),
        toml_path(&certs.cert_path()),
        toml_path(&certs.key_path()),
    )
}

fn toml_path(path: &Path) -> String {
    toml_string(path.to_str().expect("temp paths are UTF-8"))
}

/// A TOML basic string with the characters TOML requires escaped.
pub fn toml_string(text: &str) -> String {
    let mut out = String::with_capacity(text.len() + 2);
    out.push('"');
    for c in text.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            '\t' => out.push_str("\\t"),
            c if c.is_control() => {
                let _ = write!(out, "\\u{:04X}", u32::from(c));
            }
            c => out.push(c),
        }
    }
    out.push('"');
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn catalog_matches_the_documented_format() {
        let primary: SocketAddr = "127.0.0.1:5433".parse().expect("addr");
        let replica: SocketAddr = "127.0.0.1:5434".parse().expect("addr");
        let branches = [
            BranchSpec::new("b1", primary)
                .replica(replica)
                .role("app", "SCRAM-SHA-256$4096:c2FsdA==$a:b")
                .role("app.ro", "SCRAM-SHA-256$4096:x$y:z"),
            BranchSpec::new("b2", primary).pool("pool_size = 2"),
        ];
        let expected = "[[branch]]\nid = \"b1\"\nprimary = \"127.0.0.1:5433\"\n\
                        replicas = [\"127.0.0.1:5434\"]\n\n[branch.roles]\n\
                        \"app\" = \"SCRAM-SHA-256$4096:c2FsdA==$a:b\"\n\
                        \"app.ro\" = \"SCRAM-SHA-256$4096:x$y:z\"\n\n\
                        [[branch]]\nid = \"b2\"\nprimary = \"127.0.0.1:5433\"\n\
                        replicas = []\n\n[branch.roles]\n\n[branch.pool]\npool_size = 2\n\n";
        assert_eq!(catalog_toml(&branches), expected);
    }

    #[test]
    fn toml_strings_are_escaped() {
        assert_eq!(toml_string("plain"), "\"plain\"");
        assert_eq!(toml_string("a\"b\\c"), "\"a\\\"b\\\\c\"");
        assert_eq!(toml_string("x\ny\u{1}"), "\"x\\ny\\u0001\"");
    }

    #[test]
    fn router_config_names_the_cert_files() {
        let certs = Certs::generate();
        let text = router_toml(&certs, "catalog.toml");
        assert!(text.starts_with("catalog = \"catalog.toml\"\nworkers = 2\n"));
        assert!(text.contains(&format!("cert = \"{}\"", certs.cert_path().display())));
        assert!(text.contains("direct = \"127.0.0.1:0\""));
        assert!(text.contains("pooled = \"127.0.0.1:0\""));
        assert!(
            text.ends_with("health_check_interval = \"500ms\"\n"),
            "{text}"
        );
    }
}
