//! Seals: where the root key comes from. `file` (development): 32 random bytes in a file only
//! the vault's user can read. Shamir unseal and PKCS#11 are planned seals behind the same call.

use std::io::{Read, Write};
use std::path::Path;

use super::{KeyError, RootKey};
use crate::keys::secret::KEY_LEN;

fn err(path: &Path, reason: impl Into<String>) -> KeyError {
    KeyError::RootKeyFile {
        path: path.display().to_string(),
        reason: reason.into(),
    }
}

/// Reads the root key from `path`, creating it (mode 0600) when `create` is set and it is missing.
pub fn load_file_root_key(path: &Path, create: bool) -> Result<RootKey, KeyError> {
    if !path.exists() {
        if !create {
            return Err(err(path, "missing"));
        }
        let key = RootKey::generate().map_err(|_| KeyError::Rng)?;
        let mut opts = std::fs::OpenOptions::new();
        opts.write(true).create_new(true);
        #[cfg(unix)]
        {
            use std::os::unix::fs::OpenOptionsExt;
            opts.mode(0o600);
        }
        let mut f = opts.open(path).map_err(|e| err(path, e.to_string()))?;
        f.write_all(key.expose_secret())
            .and_then(|()| f.sync_all())
            .map_err(|e| err(path, e.to_string()))?;
        return Ok(key);
    }
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(path)
            .map_err(|e| err(path, e.to_string()))?
            .permissions()
            .mode();
        if mode & 0o077 != 0 {
            return Err(err(
                path,
                format!(
                    "permissions {:o} allow other users; chmod 600 it",
                    mode & 0o777
                ),
            ));
        }
    }
    let mut f = std::fs::File::open(path).map_err(|e| err(path, e.to_string()))?;
    let mut bytes = zeroize::Zeroizing::new([0u8; KEY_LEN]);
    f.read_exact(&mut bytes[..])
        .map_err(|_| err(path, format!("must hold exactly {KEY_LEN} bytes")))?;
    let mut rest = [0u8; 1];
    if f.read(&mut rest).map_err(|e| err(path, e.to_string()))? != 0 {
        return Err(err(path, format!("must hold exactly {KEY_LEN} bytes")));
    }
    Ok(RootKey::from_bytes(&mut bytes))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn creates_then_loads_the_same_key() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("root.key");
        assert!(load_file_root_key(&p, false).is_err());
        let a = load_file_root_key(&p, true).unwrap();
        let b = load_file_root_key(&p, false).unwrap();
        assert_eq!(a.expose_secret(), b.expose_secret());
    }

    #[cfg(unix)]
    #[test]
    fn refuses_a_world_readable_key() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("root.key");
        load_file_root_key(&p, true).unwrap();
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o644)).unwrap();
        assert!(load_file_root_key(&p, false).is_err());
    }
}
