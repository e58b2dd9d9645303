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

/// pyiceberg's and Java's property names for SigV4, so one set of catalog
/// properties serves silt and the tools that read the table.
pub const ENABLED: &str = "rest.sigv4-enabled";
pub const SIGNING_NAME: &str = "rest.signing-name";
pub const SIGNING_REGION: &str = "rest.signing-region";

/// How a REST catalog's requests are signed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Signing {
    /// The service name in the signature's scope: `glue`, `s3tables`.
    pub name: String,
    pub region: String,
}

impl Signing {
    /// The signing settings in a REST catalog's `properties`, or `None` when
    /// SigV4 is off; the name defaults from the endpoint's host and the
    /// region to `sink_region`. `Err` says what is missing.
    pub fn from_properties(
        properties: &BTreeMap<String, String>,
        uri: &str,
        sink_region: Option<&str>,
    ) -> Result<Option<Signing>, String> {
        match properties.get(ENABLED).map(|v| v.trim()) {
            None | Some("false") => return Ok(None),
            Some("true") => {}
            Some(other) => return Err(format!("{ENABLED} is \"{other}\"; use true or false")),
        }
        let host = uri
            .split_once("://")
            .map_or(uri, |(_, rest)| rest)
            .split(['/', ':'])
            .next()
            .unwrap_or_default();
        let name = match properties.get(SIGNING_NAME) {
            Some(name) => name.clone(),
            None if host.starts_with("glue.") => "glue".into(),
            None if host.starts_with("s3tables.") => "s3tables".into(),
            None => {
                return Err(format!(
                    "{ENABLED} needs {SIGNING_NAME} (glue or s3tables) for {host}"
                ));
            }
        };
        let region = match (properties.get(SIGNING_REGION), sink_region) {
            (Some(region), _) => region.clone(),
            (None, Some(region)) => region.to_string(),
            (None, None) => std::env::var("AWS_REGION").unwrap_or_else(|_| "us-east-1".into()),
        };
        Ok(Some(Signing { name, region }))
    }
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
        Signing::from_properties(&table.properties, &table.uri, None)
            .map_err(|e| ("table.properties", e))?;
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
    use std::collections::BTreeMap;

    use super::super::load_str;
    use super::{ENABLED, SIGNING_NAME, SIGNING_REGION, Signing};

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
        let sigv4 = "{ catalog = \"rest\", uri = \"https://glue.eu-west-1.amazonaws.com/iceberg\", \
                     warehouse = \"123456789012\", namespace = \"t\", name = \"r\", \
                     properties = { \"rest.sigv4-enabled\" = \"true\" } }";
        refused(sigv4, "parquet", "it needs an s3 sink");
        refused(
            &sigv4.replace("glue.eu-west-1.amazonaws.com", "catalog.example.com"),
            "parquet",
            "rest.signing-name",
        );
        refused(
            &GOOD.replace(" }", ", commit_evry = \"1m\" }"),
            "parquet",
            "commit_evry",
        );
    }

    fn props(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    #[test]
    fn signing_name_and_region_default_from_the_endpoint_and_the_sink() {
        let on = props(&[(ENABLED, "true")]);
        let glue = Signing::from_properties(
            &on,
            "https://glue.eu-west-1.amazonaws.com/iceberg",
            Some("eu-west-1"),
        );
        assert_eq!(
            glue,
            Ok(Some(Signing {
                name: "glue".into(),
                region: "eu-west-1".into()
            }))
        );
        let tables = Signing::from_properties(
            &props(&[(ENABLED, "true"), (SIGNING_REGION, "us-east-2")]),
            "https://s3tables.us-east-2.amazonaws.com/iceberg",
            Some("eu-west-1"),
        );
        assert_eq!(
            tables,
            Ok(Some(Signing {
                name: "s3tables".into(),
                region: "us-east-2".into()
            }))
        );
        assert_eq!(
            Signing::from_properties(&props(&[]), "https://glue.x/iceberg", None),
            Ok(None)
        );
        let unknown = Signing::from_properties(&on, "https://catalog.example.com", None);
        assert!(unknown.unwrap_err().contains(SIGNING_NAME));
        let typo = Signing::from_properties(&props(&[(ENABLED, "yes")]), "https://glue.x", None);
        assert!(typo.unwrap_err().contains("true or false"));
    }
}
