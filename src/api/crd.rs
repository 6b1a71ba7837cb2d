//! The CRD manifests, generated from the Rust types and committed under `crds/`.

use std::path::{Path, PathBuf};

use kube::CustomResourceExt;
use thiserror::Error;

use super::{ImageSet, NodeImage, Registry};

/// Failure to render or write the CRD manifests.
#[derive(Debug, Error)]
pub enum CrdError {
    #[error("cannot render CRD {name} as YAML: {source}")]
    Render {
        name: String,
        source: serde_yaml::Error,
    },
    #[error("cannot write {path}: {source}")]
    Write {
        path: PathBuf,
        source: std::io::Error,
    },
}

/// Every CRD as `(file name, YAML document)`, sorted by file name as `crds/*.yaml` globs.
pub fn crd_files() -> Result<Vec<(String, String)>, CrdError> {
    let mut files = [ImageSet::crd(), NodeImage::crd(), Registry::crd()]
        .into_iter()
        .map(|crd| {
            let name = crd.metadata.name.clone().unwrap_or_default();
            let yaml = serde_yaml::to_string(&crd).map_err(|source| CrdError::Render {
                name: name.clone(),
                source,
            })?;
            Ok((format!("{name}.yaml"), format!("---\n{yaml}")))
        })
        .collect::<Result<Vec<_>, CrdError>>()?;
    files.sort();
    Ok(files)
}

/// All CRDs as one multi-document YAML stream, byte for byte `cat crds/*.yaml`.
pub fn crd_stream() -> Result<String, CrdError> {
    Ok(crd_files()?.into_iter().map(|(_, yaml)| yaml).collect())
}

/// Writes one file per CRD into `dir`, returning the paths written.
pub fn write_crds(dir: &Path) -> Result<Vec<PathBuf>, CrdError> {
    std::fs::create_dir_all(dir).map_err(|source| CrdError::Write {
        path: dir.to_path_buf(),
        source,
    })?;
    crd_files()?
        .into_iter()
        .map(|(name, yaml)| {
            let path = dir.join(name);
            std::fs::write(&path, yaml).map_err(|source| CrdError::Write {
                path: path.clone(),
                source,
            })?;
            Ok(path)
        })
        .collect()
}
