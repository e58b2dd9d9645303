//! The SQL catalog, minus the litter of lost races: a commit or create that
//! fails leaves the metadata file it wrote unreferenced, and when a fleet
//! shares a table those pile up. Java's Iceberg deletes them; iceberg-rust's
//! SQL catalog does not, so this wrapper does.

use std::collections::{HashMap, HashSet};

use async_trait::async_trait;
use iceberg::table::Table;
use iceberg::{Catalog, Namespace, NamespaceIdent, Result, TableCommit, TableCreation, TableIdent};
use iceberg_catalog_sql::SqlCatalog;

use super::storage::SinkStorage;

#[derive(Debug)]
pub struct TidyCatalog {
    inner: SqlCatalog,
    /// The storage the catalog writes through; it remembers the metadata
    /// files this process wrote.
    storage: SinkStorage,
    /// One commit or create at a time, so the files written in between are
    /// that call's (a sink commits in order anyway).
    writing: tokio::sync::Mutex<()>,
}

impl TidyCatalog {
    pub fn new(inner: SqlCatalog, storage: SinkStorage) -> TidyCatalog {
        TidyCatalog {
            inner,
            storage,
            writing: Default::default(),
        }
    }

    /// Deletes the metadata files a failed call wrote, unless the table
    /// refers to them after all (a reply lost after the update went
    /// through). When the table cannot be read, they stay: safe, not tidy.
    async fn forget_unreferenced(&self, ident: &TableIdent, written: Vec<String>) {
        if written.is_empty() {
            return;
        }
        let Ok(table) = self.inner.load_table(ident).await else {
            return;
        };
        let metadata = table.metadata();
        let referenced: HashSet<&str> = metadata
            .metadata_log()
            .iter()
            .map(|log| log.metadata_file.as_str())
            .chain(table.metadata_location())
            .collect();
        for path in written.iter().filter(|p| !referenced.contains(p.as_str())) {
            match iceberg::io::Storage::delete(&self.storage, path).await {
                Ok(()) => {
                    tracing::debug!(path = %path, "deleted the metadata file of a commit that lost a race")
                }
                Err(e) => {
                    tracing::debug!(path = %path, error = %e, "could not delete an unreferenced metadata file")
                }
            }
        }
    }
}

#[async_trait]
impl Catalog for TidyCatalog {
    async fn list_namespaces(
        &self,
        parent: Option<&NamespaceIdent>,
    ) -> Result<Vec<NamespaceIdent>> {
        self.inner.list_namespaces(parent).await
    }

    async fn create_namespace(
        &self,
        namespace: &NamespaceIdent,
        properties: HashMap<String, String>,
    ) -> Result<Namespace> {
        self.inner.create_namespace(namespace, properties).await
    }

    async fn get_namespace(&self, namespace: &NamespaceIdent) -> Result<Namespace> {
        self.inner.get_namespace(namespace).await
    }

    async fn namespace_exists(&self, namespace: &NamespaceIdent) -> Result<bool> {
        self.inner.namespace_exists(namespace).await
    }

    async fn update_namespace(
        &self,
        namespace: &NamespaceIdent,
        properties: HashMap<String, String>,
    ) -> Result<()> {
        self.inner.update_namespace(namespace, properties).await
    }

    async fn drop_namespace(&self, namespace: &NamespaceIdent) -> Result<()> {
        self.inner.drop_namespace(namespace).await
    }

    async fn list_tables(&self, namespace: &NamespaceIdent) -> Result<Vec<TableIdent>> {
        self.inner.list_tables(namespace).await
    }

    async fn create_table(
        &self,
        namespace: &NamespaceIdent,
        creation: TableCreation,
    ) -> Result<Table> {
        let _one = self.writing.lock().await;
        let ident = TableIdent::new(namespace.clone(), creation.name.clone());
        self.storage.take_written_metadata();
        let created = self.inner.create_table(namespace, creation).await;
        if created.is_err() {
            self.forget_unreferenced(&ident, self.storage.take_written_metadata())
                .await;
        }
        created
    }

    async fn load_table(&self, table: &TableIdent) -> Result<Table> {
        self.inner.load_table(table).await
    }

    async fn drop_table(&self, table: &TableIdent) -> Result<()> {
        self.inner.drop_table(table).await
    }

    async fn purge_table(&self, table: &TableIdent) -> Result<()> {
        self.inner.purge_table(table).await
    }

    async fn table_exists(&self, table: &TableIdent) -> Result<bool> {
        self.inner.table_exists(table).await
    }

    async fn rename_table(&self, src: &TableIdent, dest: &TableIdent) -> Result<()> {
        self.inner.rename_table(src, dest).await
    }

    async fn register_table(&self, table: &TableIdent, metadata_location: String) -> Result<Table> {
        self.inner.register_table(table, metadata_location).await
    }

    async fn update_table(&self, commit: TableCommit) -> Result<Table> {
        let _one = self.writing.lock().await;
        let ident = commit.identifier().clone();
        self.storage.take_written_metadata();
        let updated = self.inner.update_table(commit).await;
        if updated.is_err() {
            self.forget_unreferenced(&ident, self.storage.take_written_metadata())
                .await;
        }
        updated
    }
}
