//! `table = { ... }` on a Parquet sink: append each object to an Apache
//! Iceberg table through a catalog.

use std::collections::BTreeMap;
use std::time::Duration;

use serde::Deserialize;

use super::Secret;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum CatalogKind {
    /// The JDBC-style SQL catalog: SQLite (one device) or PostgreSQL (a fleet).
    Sql,
    /// An Iceberg REST catalog (Glue, S3 Tables, Polaris, Lakekeeper, Nessie).
    Rest,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TableConfig {
    pub catalog: CatalogKind,
    /// `sqlite:///var/lib/silt/catalog.db`, `postgresql://...` or `https://...`.
    pub uri: String,
    /// SQL: where new tables put their metadata, `s3://bucket/prefix`.
    /// REST: the catalog's warehouse name or location, as it expects it.
    pub warehouse: String,
    pub namespace: String,
    pub name: String,
    /// Create the namespace and table on first use, with the schema of the
    /// first batch; otherwise a missing table holds the sink until created.
    #[serde(default)]
    pub create: bool,
    /// Uploaded objects wait at most this long to be committed together,
    /// so a fleet makes one snapshot per device per period, not per batch.
    #[serde(default = "default_commit_every", with = "humantime_serde")]
    pub commit_every: Duration,
    /// REST: an OAuth2 client credential `client_id:client_secret`, which
    /// the catalog exchanges for a token.
    #[serde(default)]
    pub credential: Option<Secret>,
    /// REST: a bearer token.
    #[serde(default)]
    pub token: Option<Secret>,
    /// REST: more catalog properties (`scope`, `oauth2-server-uri`,
    /// `header.NAME`, ...).
    #[serde(default)]
    pub properties: BTreeMap<String, String>,
}

fn default_commit_every() -> Duration {
    Duration::from_secs(60)
}

/// Validation of the `table` key; `Err((key, message))` names the key at fault.
pub(super) fn validate(table: &TableConfig) -> Result<(), (&'static str, String)> {
    if table.catalog == CatalogKind::Rest {
        if !table.uri.starts_with("https://") && !table.uri.starts_with("http://") {
            return Err((
                "table.uri",
                format!(
                    "`{}` is not a REST catalog URI: use https://host/path",
                    table.uri
                ),
            ));
        }
        if table.credential.is_some() && table.token.is_some() {
            return Err((
                "table.token",
                "set `credential` or `token`, not both".into(),
            ));
        }
        return validate_names(table);
    }
    let rest_only = [
        ("table.credential", table.credential.is_some()),
        ("table.token", table.token.is_some()),
        ("table.properties", !table.properties.is_empty()),
    ];
    if let Some((key, _)) = rest_only.iter().find(|(_, set)| *set) {
        return Err((
            key,
            "belongs to REST catalogs (`catalog = \"rest\"`)".into(),
        ));
    }
    let sql_uri = ["sqlite:", "postgres://", "postgresql://"];
    if !sql_uri.iter().any(|p| table.uri.starts_with(p)) {
        return Err((
            "table.uri",
            format!(
                "`{}` is not a SQL catalog URI: use sqlite:///path/catalog.db or postgresql://user@host/db",
                table.uri
            ),
        ));
    }
    if !table.warehouse.starts_with("s3://") && !table.warehouse.starts_with("file://") {
        return Err((
            "table.warehouse",
            "must be an s3://bucket/prefix (or file:///dir) location".into(),
        ));
    }
    validate_names(table)
}

fn validate_names(table: &TableConfig) -> Result<(), (&'static str, String)> {
    let ident = |s: &str| !s.is_empty() && !s.contains(['.', '/']);
    if !ident(&table.namespace) {
        return Err((
            "table.namespace",
            "must be one non-empty name without `.` or `/`".into(),
        ));
    }
    if !ident(&table.name) {
        return Err((
            "table.name",
            "must be one non-empty name without `.` or `/`".into(),
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::super::load_str;

    fn sink(table: &str, format: &str) -> String {
        format!(
            "[sources.api]\ntype = \"http\"\nlisten = \"127.0.0.1:8080\"\n\n\
             [sinks.lake]\ntype = \"file\"\ninputs = [\"api\"]\npath = \"./lake\"\nformat = \"{format}\"\n\
             key = \"{{sink}}/{{yyyy}}/{{agent}}-{{batch}}.parquet\"\ntable = {table}\n"
        )
    }

    const GOOD: &str = "{ catalog = \"sql\", uri = \"sqlite:///var/lib/silt/catalog.db\", \
                        warehouse = \"file:///var/lib/silt/warehouse\", namespace = \"t\", name = \"r\" }";

    #[test]
    fn a_table_takes_defaults_for_create_and_commit_every() {
        let config = load_str(&sink(GOOD, "parquet"), "t.toml").unwrap();
        let table = config.sinks["lake"].table.clone().unwrap();
        assert!(!table.create);
        assert_eq!(table.commit_every, std::time::Duration::from_secs(60));
    }

    #[test]
    fn a_table_needs_parquet_a_sql_uri_and_plain_names() {
        let refused = |table: &str, format: &str, needle: &str| {
            let err = load_str(&sink(table, format), "t.toml")
                .unwrap_err()
                .to_string();
            assert!(err.contains(needle), "{err}");
        };
        refused(GOOD, "ndjson", "set `format = \"parquet\"`");
        refused(
            &GOOD.replace("\"sql\"", "\"rest\""),
            "parquet",
            "not a REST catalog URI",
        );
        refused(
            &GOOD.replace(" }", ", token = \"t\" }"),
            "parquet",
            "belongs to REST catalogs",
        );
        refused(
            &GOOD.replace("sqlite:///var/lib/silt/catalog.db", "mysql://db"),
            "parquet",
            "not a SQL catalog URI",
        );
        refused(
            &GOOD.replace("file:///var/lib/silt/warehouse", "/var/lib/silt/wh"),
            "parquet",
            "s3://bucket/prefix",
        );
        refused(
            &GOOD.replace("\"t\"", "\"a.b\""),
            "parquet",
            "table.namespace",
        );
        refused(&GOOD.replace("\"r\"", "\"\""), "parquet", "table.name");
        refused(
            &GOOD.replace(" }", ", commit_evry = \"1m\" }"),
            "parquet",
            "commit_evry",
        );
    }
}
