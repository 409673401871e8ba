//! C2SP tlog-proof@v1: an inclusion proof a third party can check offline. Text form:
//! `c2sp.org/tlog-proof@v1\n`, an optional `extra <base64>\n` line (here: the entry itself),
//! `index <decimal>\n`, one base64 hash per line, a blank line, then the signed checkpoint.

use base64::Engine;
use base64::engine::general_purpose::STANDARD;

use super::merkle::Hash;

const HEADER: &str = "c2sp.org/tlog-proof@v1";

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TlogProof {
    pub extra: Option<Vec<u8>>,
    pub index: u64,
    pub hashes: Vec<Hash>,
    /// The signed checkpoint note the proof is relative to.
    pub checkpoint: String,
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ProofFormatError {
    #[error("not a c2sp.org/tlog-proof@v1 proof")]
    Header,
    #[error("malformed extra line")]
    Extra,
    #[error("malformed index line")]
    Index,
    #[error("malformed proof hash on line {0}")]
    Hash(usize),
    #[error("missing blank line before the checkpoint")]
    NoCheckpoint,
}

impl TlogProof {
    pub fn to_text(&self) -> String {
        let mut s = format!("{HEADER}\n");
        if let Some(extra) = &self.extra {
            s.push_str(&format!("extra {}\n", STANDARD.encode(extra)));
        }
        s.push_str(&format!("index {}\n", self.index));
        for h in &self.hashes {
            s.push_str(&STANDARD.encode(h));
            s.push('\n');
        }
        s.push('\n');
        s.push_str(&self.checkpoint);
        s
    }

    pub fn parse(text: &str) -> Result<TlogProof, ProofFormatError> {
        let (head, checkpoint) = text
            .split_once("\n\n")
            .ok_or(ProofFormatError::NoCheckpoint)?;
        let mut lines = head.split('\n').enumerate().peekable();
        if lines.next().map(|(_, l)| l) != Some(HEADER) {
            return Err(ProofFormatError::Header);
        }
        let mut extra = None;
        if let Some((_, l)) = lines.peek()
            && let Some(b64) = l.strip_prefix("extra ")
        {
            extra = Some(STANDARD.decode(b64).map_err(|_| ProofFormatError::Extra)?);
            lines.next();
        }
        let index = lines
            .next()
            .and_then(|(_, l)| l.strip_prefix("index "))
            .filter(|d| {
                !d.is_empty()
                    && d.bytes().all(|b| b.is_ascii_digit())
                    && (d.len() == 1 || !d.starts_with('0'))
            })
            .and_then(|d| d.parse().ok())
            .ok_or(ProofFormatError::Index)?;
        let mut hashes = Vec::new();
        for (n, l) in lines {
            let h: Hash = STANDARD
                .decode(l)
                .ok()
                .and_then(|v| v.try_into().ok())
                .ok_or(ProofFormatError::Hash(n + 1))?;
            hashes.push(h);
        }
        Ok(TlogProof {
            extra,
            index,
            hashes,
            checkpoint: checkpoint.to_string(),
        })
    }
}
