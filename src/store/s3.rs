//! Scale-out blob backend: objects in an S3-compatible bucket under a key prefix, shared by
//! every replica. A PUT is atomic (a reader sees the whole object or none) and durable once S3
//! acknowledges it, so `sync_prefix` has nothing left to do. Payloads are signed with SigV4
//! (object_store computes the SHA-256 of each body with aws-lc-rs), so the store rejects a body
//! damaged in transit.

use std::sync::Arc;

use async_trait::async_trait;
use bytes::Bytes;
use object_store::aws::AmazonS3Builder;
use object_store::path::Path as ObjectPath;
use object_store::{ObjectStore, ObjectStoreExt, PutPayload};
use tokio_stream::StreamExt;
use zeroize::Zeroizing;

use super::{BlobBody, BlobStore, StoreError};

/// Where the bucket is and how to reach it. Anything left `None` comes from the standard AWS
/// environment (`AWS_ACCESS_KEY_ID`, `AWS_SECRET_ACCESS_KEY`, `AWS_SESSION_TOKEN`,
/// `AWS_REGION`, `AWS_ENDPOINT`, instance or web-identity credentials).
pub struct S3Options {
    pub bucket: String,
    /// Key prefix inside the bucket, without leading or trailing `/` (may be empty).
    pub prefix: String,
    /// For S3-compatible stores: `http(s)://host:port`; requests then use path-style URLs.
    pub endpoint: Option<String>,
    pub region: Option<String>,
    /// Permit plain-HTTP endpoints (loopback test servers only).
    pub allow_http: bool,
    pub access_key_id: Option<String>,
    /// Read from the file named in the config; wiped from this struct when it is dropped.
    pub secret_access_key: Option<Zeroizing<String>>,
}

pub struct S3Blobs {
    store: Arc<dyn ObjectStore>,
    prefix: String,
}

/// Splits `s3://bucket/prefix` into the bucket and the prefix (empty when absent). Bucket
/// names follow the S3 naming rules (3-63 characters of `[a-z0-9.-]`, starting and ending with
/// a letter or digit); prefix segments are non-empty `[A-Za-z0-9._-]`, never `.` or `..`.
pub fn parse_url(url: &str) -> Result<(String, String), String> {
    let rest = url
        .strip_prefix("s3://")
        .ok_or_else(|| format!("{url:?} does not start with s3://"))?;
    let (bucket, prefix) = rest.split_once('/').unwrap_or((rest, ""));
    let prefix = prefix.trim_end_matches('/');
    let bucket_ok = (3..=63).contains(&bucket.len())
        && bucket
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'.' || b == b'-')
        && bucket.starts_with(|c: char| c.is_ascii_alphanumeric())
        && bucket.ends_with(|c: char| c.is_ascii_alphanumeric());
    if !bucket_ok {
        return Err(format!(
            "bucket {bucket:?} is not a valid S3 bucket name (3-63 characters of a-z 0-9 . -)"
        ));
    }
    let prefix_ok = prefix.is_empty()
        || prefix.split('/').all(|seg| {
            !seg.is_empty()
                && seg != "."
                && seg != ".."
                && seg
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'))
        });
    if !prefix_ok {
        return Err(format!(
            "prefix {prefix:?} must be /-separated segments of [A-Za-z0-9._-]"
        ));
    }
    Ok((bucket.to_string(), prefix.to_string()))
}

fn backend(e: object_store::Error) -> StoreError {
    match e {
        object_store::Error::NotFound { .. } => StoreError::NotFound,
        other => StoreError::Io(std::io::Error::other(other)),
    }
}

impl S3Blobs {
    /// Builds the client and checks that the bucket answers (one LIST under the prefix), so a
    /// wrong endpoint, bucket or credential stops the start instead of the first push.
    pub async fn open(opts: S3Options) -> Result<Self, StoreError> {
        let mut b = AmazonS3Builder::from_env()
            .with_bucket_name(&opts.bucket)
            .with_allow_http(opts.allow_http);
        if let Some(endpoint) = &opts.endpoint {
            b = b
                .with_endpoint(endpoint)
                .with_virtual_hosted_style_request(false);
        }
        if let Some(region) = &opts.region {
            b = b.with_region(region);
        }
        if let Some(id) = &opts.access_key_id {
            b = b.with_access_key_id(id);
        }
        if let Some(secret) = &opts.secret_access_key {
            b = b.with_secret_access_key(secret.as_str());
        }
        let store: Arc<dyn ObjectStore> = Arc::new(
            b.build()
                .map_err(|e| StoreError::Io(std::io::Error::other(e)))?,
        );
        let blobs = Self {
            store,
            prefix: opts.prefix,
        };
        let probe = blobs.location("probe")?;
        blobs
            .store
            .list_with_delimiter(Some(&probe))
            .await
            .map_err(backend)?;
        Ok(blobs)
    }

    /// The object path of a key, refusing anything but `[a-z0-9_-]` segments (the contract's
    /// key alphabet, same check as the local backend).
    fn location(&self, key: &str) -> Result<ObjectPath, StoreError> {
        let valid = !key.is_empty()
            && key.split('/').all(|seg| {
                !seg.is_empty()
                    && seg.bytes().all(|b| {
                        b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_' || b == b'-'
                    })
            });
        if !valid {
            return Err(StoreError::Corrupt(format!("invalid blob key {key:?}")));
        }
        let full = if self.prefix.is_empty() {
            key.to_string()
        } else {
            format!("{}/{key}", self.prefix)
        };
        ObjectPath::parse(&full).map_err(|e| StoreError::Corrupt(format!("blob key: {e}")))
    }
}

#[async_trait]
impl BlobStore for S3Blobs {
    async fn put(&self, key: &str, data: Bytes) -> Result<(), StoreError> {
        let path = self.location(key)?;
        self.store
            .put(&path, PutPayload::from(data))
            .await
            .map_err(backend)?;
        Ok(())
    }

    async fn sync_prefix(&self, prefix: &str) -> Result<(), StoreError> {
        // Every acknowledged PUT is already durable and listed; only the key is checked.
        self.location(prefix)?;
        Ok(())
    }

    async fn get(&self, key: &str) -> Result<Bytes, StoreError> {
        let path = self.location(key)?;
        let got = self.store.get(&path).await.map_err(backend)?;
        got.bytes().await.map_err(backend)
    }

    async fn open(&self, key: &str) -> Result<BlobBody, StoreError> {
        self.get(key).await.map(BlobBody::Bytes)
    }

    async fn delete_prefix(&self, prefix: &str) -> Result<(), StoreError> {
        let path = self.location(prefix)?;
        let mut listed = Vec::new();
        let mut list = self.store.list(Some(&path));
        while let Some(meta) = list.next().await {
            listed.push(Ok(meta.map_err(backend)?.location));
        }
        let mut deleted = self
            .store
            .delete_stream(Box::pin(tokio_stream::iter(listed)));
        while let Some(r) = deleted.next().await {
            match r {
                Ok(_) | Err(object_store::Error::NotFound { .. }) => {}
                Err(e) => return Err(backend(e)),
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::parse_url;

    #[test]
    fn urls() {
        assert_eq!(
            parse_url("s3://weights/prod/vault-a").unwrap(),
            ("weights".into(), "prod/vault-a".into())
        );
        assert_eq!(
            parse_url("s3://weights").unwrap(),
            ("weights".into(), String::new())
        );
        assert_eq!(
            parse_url("s3://weights/p/").unwrap(),
            ("weights".into(), "p".into())
        );
        for bad in [
            "http://weights/p",
            "s3://",
            "s3://ab",
            "s3://Weights",
            "s3://-weights",
            "s3://weights/a//b",
            "s3://weights/../x",
            "s3://weights/a b",
        ] {
            assert!(parse_url(bad).is_err(), "{bad}");
        }
    }
}
