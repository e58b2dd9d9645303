//! Appending a Parquet sink's objects to an Apache Iceberg table, exactly
//! once.
//!
//! Each batch is encoded in the table's current schema (with Iceberg field
//! ids, new payload fields added as optional columns first), uploaded under
//! its sealed key like any object, then appended with a fast append whose
//! snapshot summary names the batches it holds (`silt.batches`). Before a
//! commit the table's snapshots are searched for those names, so a commit
//! repeated after a crash or a lost reply appends nothing twice; the spool
//! completes a batch only once its commit is found or made.

mod catalog;
mod forward;
mod schema;
mod storage;

use std::collections::{HashMap, HashSet};
use std::sync::Arc;

use bytes::Bytes;
use iceberg::arrow::schema_to_arrow_schema;
use iceberg::io::{MemoryStorage, OutputFile, Storage};
use iceberg::spec::{DataFileBuilder, Datum, Literal, PrimitiveType, Struct, Transform, Type};
use iceberg::table::Table;
use iceberg::transaction::{AddColumn, ApplyTransactionAction, Transaction};
use iceberg::writer::file_writer::{FileWriter, FileWriterBuilder, ParquetWriterBuilder};
use iceberg::{Catalog, CatalogBuilder, ErrorKind, NamespaceIdent, TableCreation, TableIdent};
use iceberg_catalog_rest::RestCatalogBuilder;
use iceberg_catalog_sql::{SqlBindStyle, SqlCatalogBuilder};
use object_store::ClientOptions;

use crate::batch::{ParquetOptions, TemplatePart, writer_properties};
use crate::config::{CatalogKind, Signing, SinkConfig, SinkKind, TableConfig};
use crate::event::Event;
use crate::sinks::{ErrorClass, shorten};
use catalog::TidyCatalog;
pub use schema::PAYLOAD_RAW;
use storage::{SinkStorage, SinkStorageFactory};

/// The snapshot summary property naming the batches a commit holds.
pub const BATCHES_PROPERTY: &str = "silt.batches";

#[derive(Debug, thiserror::Error)]
pub enum TableError {
    #[error("cannot reach Iceberg catalog {uri}: {message}")]
    Catalog { uri: String, message: String },
    #[error(
        "Iceberg table {table} does not exist: create it, or set `create = true` on the sink's table"
    )]
    Missing { table: String },
    #[error("Iceberg {action} on table {table} failed: {message}")]
    Table {
        action: &'static str,
        table: String,
        kind: ErrorKind,
        message: String,
    },
    #[error("encoding the batch for table {table}: {message}")]
    Encode { table: String, message: String },
}

impl TableError {
    /// Catalog and store trouble is retried; a missing table waits for a
    /// person; a batch that cannot be encoded never will be.
    pub fn class(&self) -> ErrorClass {
        match self {
            TableError::Catalog { .. } => ErrorClass::Transient,
            TableError::Missing { .. } => ErrorClass::Operator("NoSuchTable".into()),
            TableError::Table { kind, .. } => match kind {
                ErrorKind::DataInvalid | ErrorKind::FeatureUnsupported => {
                    ErrorClass::Operator(format!("Iceberg{kind:?}"))
                }
                _ => ErrorClass::Transient,
            },
            TableError::Encode { .. } => ErrorClass::Permanent("TableEncode".into()),
        }
    }
}

/// A batch encoded for the table, before upload.
pub struct Prepared {
    pub body: Bytes,
    data_file: DataFileBuilder,
}

/// An uploaded object waiting for its commit.
pub struct Uploaded {
    pub seq: u64,
    pub key: String,
    data_file: DataFileBuilder,
}

impl Prepared {
    pub fn uploaded(self, seq: u64, key: &str) -> Uploaded {
        Uploaded {
            seq,
            key: key.to_string(),
            data_file: self.data_file,
        }
    }
}

pub struct TableSink {
    config: TableConfig,
    sink: SinkConfig,
    ident: TableIdent,
    parts: Vec<TemplatePart>,
    attrs: Vec<String>,
    /// `{agent}/{sink}/`: a batch's name in `silt.batches` is this and its seq.
    batch_prefix: String,
    /// Where the sink's objects are: `s3://bucket/` or `file:///dir/`.
    object_base: String,
    options: ParquetOptions,
    catalog: tokio::sync::OnceCell<Arc<dyn Catalog>>,
    /// Carries a REST catalog's requests (HTTPS, SigV4) while the catalog
    /// is in use.
    forwarder: std::sync::OnceLock<forward::Forwarder>,
}

impl TableSink {
    pub fn new(
        agent: &str,
        sink_name: &str,
        sink: &SinkConfig,
        table: &TableConfig,
        parts: &[TemplatePart],
        options: ParquetOptions,
    ) -> TableSink {
        let object_base = match sink.kind {
            SinkKind::S3 => format!("s3://{}/", sink.bucket.as_deref().unwrap_or_default()),
            SinkKind::File => {
                let dir = sink.path.clone().unwrap_or_default();
                let dir = std::path::absolute(&dir).unwrap_or(dir);
                format!(
                    "file://{}/",
                    dir.display().to_string().trim_end_matches('/')
                )
            }
        };
        let attrs = parts
            .iter()
            .filter_map(|p| match p {
                TemplatePart::Attr(name) => Some(name.clone()),
                _ => None,
            })
            .collect();
        TableSink {
            config: table.clone(),
            sink: sink.clone(),
            ident: TableIdent::new(
                NamespaceIdent::new(table.namespace.clone()),
                table.name.clone(),
            ),
            parts: parts.to_vec(),
            attrs,
            batch_prefix: format!("{agent}/{sink_name}/"),
            object_base,
            options,
            catalog: tokio::sync::OnceCell::new(),
            forwarder: std::sync::OnceLock::new(),
        }
    }

    pub fn commit_every(&self) -> std::time::Duration {
        self.config.commit_every
    }

    fn name(&self) -> String {
        format!("{}.{}", self.config.namespace, self.config.name)
    }

    fn failed(&self, action: &'static str) -> impl Fn(iceberg::Error) -> TableError + '_ {
        move |e| TableError::Table {
            action,
            table: self.name(),
            kind: e.kind(),
            message: shorten(&e.to_string(), 400),
        }
    }

    async fn catalog(&self) -> Result<Arc<dyn Catalog>, TableError> {
        let catalog = self
            .catalog
            .get_or_try_init(|| async {
                let storage = SinkStorage::new(&self.sink);
                let factory = Arc::new(SinkStorageFactory::new(storage.clone()));
                let table = &self.config;
                let loaded: iceberg::Result<Arc<dyn Catalog>> = match table.catalog {
                    CatalogKind::Sql => {
                        let bind = if table.uri.starts_with("sqlite:") {
                            SqlBindStyle::QMark
                        } else {
                            SqlBindStyle::DollarNumeric
                        };
                        let props = HashMap::from([
                            ("uri".to_string(), sql_uri(&table.uri)),
                            ("warehouse".to_string(), table.warehouse.clone()),
                            ("sql_bind_style".to_string(), bind.to_string()),
                        ]);
                        SqlCatalogBuilder::default()
                            .with_storage_factory(factory)
                            .load("silt", props)
                            .await
                            .map(|sql| Arc::new(TidyCatalog::new(sql, storage)) as Arc<dyn Catalog>)
                    }
                    CatalogKind::Rest => {
                        let mut props: HashMap<String, String> =
                            table.properties.clone().into_iter().collect();
                        props.insert("uri".into(), self.rest_uri().await?);
                        props.insert("warehouse".into(), table.warehouse.clone());
                        if let Some(credential) = &table.credential {
                            props.insert("credential".into(), credential.expose().to_string());
                        }
                        if let Some(token) = &table.token {
                            props.insert("token".into(), token.expose().to_string());
                        }
                        RestCatalogBuilder::default()
                            .with_storage_factory(factory)
                            .load("silt", props)
                            .await
                            .map(|rest| Arc::new(rest) as Arc<dyn Catalog>)
                    }
                };
                loaded.map_err(|e| TableError::Catalog {
                    uri: redact_uri(&table.uri),
                    message: shorten(&e.to_string(), 400),
                })
            })
            .await?;
        Ok(catalog.clone())
    }

    /// Where the REST client sends its requests: a plain-HTTP catalog
    /// itself, or a loopback forwarder that does TLS and signing for it.
    async fn rest_uri(&self) -> Result<String, TableError> {
        let table = &self.config;
        let refused = |message: String| TableError::Catalog {
            uri: redact_uri(&table.uri),
            message,
        };
        let signing =
            Signing::from_properties(&table.properties, &table.uri, self.sink.region.as_deref())
                .map_err(refused)?;
        if signing.is_none() && table.uri.starts_with("http://") {
            return Ok(table.uri.clone());
        }
        if let Some(forwarder) = self.forwarder.get() {
            return Ok(forwarder.local_uri.clone());
        }
        let signer = match signing {
            Some(signing) => Some(forward::Signer {
                signing,
                credentials: crate::sinks::s3_credentials(&self.sink).map_err(refused)?,
            }),
            None => None,
        };
        let options =
            crate::sinks::trusting_ca_file(ClientOptions::new(), &self.sink).map_err(refused)?;
        let forwarder = forward::Forwarder::start(&table.uri, options, signer)
            .await
            .map_err(refused)?;
        Ok(self.forwarder.get_or_init(|| forwarder).local_uri.clone())
    }

    /// The table, created from `batch`'s columns if it is missing and the
    /// sink may create it.
    async fn table(
        &self,
        catalog: &dyn Catalog,
        batch: &arrow_schema::Schema,
    ) -> Result<Table, TableError> {
        match catalog.load_table(&self.ident).await {
            Ok(table) => return Ok(table),
            Err(e) if e.kind() == ErrorKind::TableNotFound && self.config.create => {}
            Err(e) if e.kind() == ErrorKind::TableNotFound => {
                return Err(TableError::Missing { table: self.name() });
            }
            Err(e) => return Err(self.failed("load")(e)),
        }
        let namespace = self.ident.namespace();
        if !catalog
            .namespace_exists(namespace)
            .await
            .map_err(self.failed("namespace lookup"))?
        {
            match catalog.create_namespace(namespace, HashMap::new()).await {
                Ok(_) => {}
                Err(e) if e.kind() == ErrorKind::NamespaceAlreadyExists => {}
                Err(e) => return Err(self.failed("namespace create")(e)),
            }
        }
        let schema = schema::initial_schema(batch).map_err(self.failed("schema"))?;
        let spec = schema::partition_spec(&self.parts, &schema).map_err(self.failed("schema"))?;
        let creation = TableCreation::builder()
            .name(self.config.name.clone())
            .schema(schema)
            .partition_spec(spec)
            .build();
        match catalog.create_table(namespace, creation).await {
            Ok(table) => {
                tracing::info!(table = %self.name(), "created Iceberg table from the first batch's columns");
                Ok(table)
            }
            // Another agent of the fleet was first.
            Err(e) if e.kind() == ErrorKind::TableAlreadyExists => catalog
                .load_table(&self.ident)
                .await
                .map_err(self.failed("load")),
            Err(e) => Err(self.failed("create")(e)),
        }
    }

    /// The table with every column of `batch`, adding the missing ones as
    /// optional columns (a concurrent writer may add them first).
    async fn with_columns(
        &self,
        catalog: &dyn Catalog,
        batch: &arrow_schema::Schema,
    ) -> Result<Table, TableError> {
        let mut table = self.table(catalog, batch).await?;
        for attempt in 0.. {
            let added = schema::new_columns(batch, table.metadata().current_schema());
            if added.is_empty() {
                return Ok(table);
            }
            let names: Vec<&str> = added.iter().map(|(n, _)| n.as_str()).collect();
            let tx = Transaction::new(&table);
            let mut update = tx.update_schema();
            for (name, field_type) in &added {
                update = update.add_column(AddColumn::optional(name, field_type.clone()));
            }
            let tx = update.apply(tx).map_err(self.failed("schema update"))?;
            match tx.commit(catalog).await {
                Ok(updated) => {
                    tracing::info!(table = %self.name(), columns = ?names, "added columns to the Iceberg table");
                    table = updated;
                }
                Err(e) if attempt < 3 => {
                    tracing::debug!(table = %self.name(), error = %e, "schema update raced another writer; reloading");
                    table = catalog
                        .load_table(&self.ident)
                        .await
                        .map_err(self.failed("load"))?;
                }
                Err(e) => return Err(self.failed("schema update")(e)),
            }
        }
        unreachable!("the loop returns")
    }

    /// Encodes `events` (one partition of the key template) for the table.
    pub async fn prepare(&self, events: &[Event], agent: &str) -> Result<Prepared, TableError> {
        let catalog = self.catalog().await?;
        let (batch_schema, arrays) = schema::batch_columns(events, agent, &self.attrs);
        let table = self.with_columns(catalog.as_ref(), &batch_schema).await?;
        let metadata = table.metadata();
        let table_schema = metadata.current_schema().clone();
        let encode = |message: String| TableError::Encode {
            table: self.name(),
            message,
        };
        let target = schema_to_arrow_schema(&table_schema).map_err(|e| encode(e.to_string()))?;
        let record = schema::conform(events, (&batch_schema, &arrays), Arc::new(target))
            .map_err(|e| encode(e.to_string()))?;

        let memory = MemoryStorage::new();
        let path = "memory:///batch.parquet";
        let output = OutputFile::new(Arc::new(memory.clone()), path.to_string());
        let props = writer_properties(&self.options).map_err(|e| encode(e.to_string()))?;
        let mut writer = ParquetWriterBuilder::new(props, table_schema.clone())
            .build(output)
            .await
            .map_err(|e| encode(e.to_string()))?;
        writer
            .write(&record)
            .await
            .map_err(|e| encode(e.to_string()))?;
        let mut files = writer.close().await.map_err(|e| encode(e.to_string()))?;
        let mut data_file = files
            .pop()
            .ok_or_else(|| encode("the Parquet writer produced no file".into()))?;
        let body = memory.read(path).await.map_err(|e| encode(e.to_string()))?;

        let spec = metadata.default_partition_spec();
        let mut values = Vec::new();
        for field in spec.fields() {
            let source = table_schema.field_by_id(field.source_id).ok_or_else(|| {
                encode(format!(
                    "partition source {} is not in the schema",
                    field.source_id
                ))
            })?;
            values.push(
                partition_value(&record, &source.name, &source.field_type, &field.transform)
                    .map_err(|e| encode(e.to_string()))?,
            );
        }
        data_file
            .partition(Struct::from_iter(values))
            .partition_spec_id(spec.spec_id());
        Ok(Prepared { body, data_file })
    }

    /// Appends the uploaded objects in one snapshot, unless an earlier
    /// attempt already did; returns how many it appended.
    pub async fn commit(&self, files: &[&Uploaded]) -> Result<usize, TableError> {
        let catalog = self.catalog().await?;
        let table = catalog
            .load_table(&self.ident)
            .await
            .map_err(self.failed("load"))?;
        let done = self.committed_batches(&table);
        let todo: Vec<&Uploaded> = files
            .iter()
            .copied()
            .filter(|f| !done.contains(&f.seq))
            .collect();
        if todo.is_empty() {
            return Ok(0);
        }
        let mut data_files = Vec::with_capacity(todo.len());
        for file in &todo {
            let built = file
                .data_file
                .clone()
                .file_path(format!("{}{}", self.object_base, file.key))
                .build()
                .map_err(|e| TableError::Encode {
                    table: self.name(),
                    message: e.to_string(),
                })?;
            data_files.push(built);
        }
        let names = todo
            .iter()
            .map(|f| format!("{}{}", self.batch_prefix, f.seq))
            .collect::<Vec<_>>()
            .join(",");
        let tx = Transaction::new(&table);
        let append = tx
            .fast_append()
            .add_data_files(data_files)
            .set_snapshot_properties(HashMap::from([(BATCHES_PROPERTY.to_string(), names)]));
        let tx = append.apply(tx).map_err(self.failed("append"))?;
        tx.commit(catalog.as_ref())
            .await
            .map_err(self.failed("commit"))?;
        Ok(todo.len())
    }

    /// The table's current schema, partition spec and snapshot, for
    /// `silt check`; `Ok(None)` if it does not exist yet.
    pub async fn describe(&self) -> Result<Option<String>, TableError> {
        let catalog = self.catalog().await?;
        let table = match catalog.load_table(&self.ident).await {
            Ok(table) => table,
            Err(e) if e.kind() == ErrorKind::TableNotFound => return Ok(None),
            Err(e) => return Err(self.failed("load")(e)),
        };
        let metadata = table.metadata();
        let mut text = String::new();
        for field in metadata.current_schema().as_struct().fields() {
            let need = if field.required {
                "required"
            } else {
                "optional"
            };
            text.push_str(&format!(
                "  {:>3} {} {} {need}\n",
                field.id, field.name, field.field_type
            ));
        }
        let spec: Vec<String> = metadata
            .default_partition_spec()
            .fields()
            .iter()
            .map(|f| format!("{}({})", f.transform, f.name))
            .collect();
        text.push_str(&format!("  partitioned by: {}\n", spec.join(", ")));
        text.push_str(&format!(
            "  snapshots: {}, current {}\n",
            metadata.snapshots().len(),
            metadata
                .current_snapshot_id()
                .map_or("none".to_string(), |id| id.to_string())
        ));
        Ok(Some(text))
    }

    /// Sequence numbers of this sink's batches some snapshot already holds.
    fn committed_batches(&self, table: &Table) -> HashSet<u64> {
        table
            .metadata()
            .snapshots()
            .filter_map(|s| s.summary().additional_properties.get(BATCHES_PROPERTY))
            .flat_map(|names| names.split(','))
            .filter_map(|name| name.strip_prefix(&self.batch_prefix)?.parse().ok())
            .collect()
    }
}

/// A partition value of the batch: every row of a batch renders the same
/// key prefix, so the first row stands for all.
fn partition_value(
    record: &arrow_array::RecordBatch,
    column: &str,
    column_type: &Type,
    transform: &Transform,
) -> iceberg::Result<Option<Literal>> {
    use arrow_array::Array;
    use arrow_array::cast::AsArray;
    use arrow_array::types::{Int64Type, TimestampMicrosecondType};
    let Some(array) = record.column_by_name(column) else {
        return Ok(None);
    };
    if record.num_rows() == 0 || array.is_null(0) {
        return Ok(None);
    }
    let datum = match column_type {
        Type::Primitive(PrimitiveType::Timestamptz) => {
            Datum::timestamptz_micros(array.as_primitive::<TimestampMicrosecondType>().value(0))
        }
        Type::Primitive(PrimitiveType::Long) => {
            Datum::long(array.as_primitive::<Int64Type>().value(0))
        }
        Type::Primitive(PrimitiveType::Boolean) => Datum::bool(array.as_boolean().value(0)),
        Type::Primitive(PrimitiveType::String) => Datum::string(array.as_string::<i32>().value(0)),
        _ => return Ok(None),
    };
    let function = iceberg::transform::create_transform_function(transform)?;
    Ok(function.transform_literal(&datum)?.map(Literal::from))
}

/// The URI as sqlx takes it: a SQLite catalog file is created on first use
/// unless the operator chose a mode.
fn sql_uri(uri: &str) -> String {
    if uri.starts_with("sqlite:") && !uri.contains("mode=") {
        let join = if uri.contains('?') { '&' } else { '?' };
        format!("{uri}{join}mode=rwc")
    } else {
        uri.to_string()
    }
}

/// A catalog URI for logs: no password.
fn redact_uri(uri: &str) -> String {
    match url::Url::parse(uri) {
        Ok(mut url) if url.password().is_some() => {
            let _ = url.set_password(Some("REDACTED"));
            url.to_string()
        }
        _ => uri.to_string(),
    }
}
