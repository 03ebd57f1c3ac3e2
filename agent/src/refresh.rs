//! Fresh identity after a restore (`Agent.RefreshGuest`): the guest wall clock and entropy.
//!
//! Every VM restored from one template starts with the template's clock and RNG state; the
//! host sends its wall clock and fresh random bytes right after the restore. The OS calls sit
//! behind [`RefreshAction`], so that the service runs on the host in tests without touching
//! the host's clock.

use std::io;

use crate::sys;

/// Most entropy bytes one call accepts.
pub const MAX_ENTROPY: usize = 512;

/// Errors of a refresh.
#[derive(Debug, thiserror::Error)]
pub enum RefreshError {
    /// The request is invalid.
    #[error("invalid RefreshGuest request: {0}")]
    Invalid(String),
    /// Setting the clock failed.
    #[error("cannot set the guest wall clock")]
    Clock(#[source] io::Error),
    /// Adding entropy failed.
    #[error("cannot add entropy to the guest RNG")]
    Entropy(#[source] io::Error),
    /// No refresh action is installed (the service runs outside a guest).
    #[error("RefreshGuest is not available here")]
    Unavailable,
}

/// A validated refresh.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Refresh {
    /// Nanoseconds since the Unix epoch, or None to leave the clock.
    pub unix_nanos: Option<i64>,
    /// Bytes for the RNG.
    pub entropy: Vec<u8>,
}

impl Refresh {
    /// Validates the request's fields.
    pub fn new(unix_nanos: i64, entropy: Vec<u8>) -> Result<Self, RefreshError> {
        if unix_nanos < 0 {
            return Err(RefreshError::Invalid(format!(
                "unix_nanos {unix_nanos} is negative"
            )));
        }
        if entropy.len() > MAX_ENTROPY {
            return Err(RefreshError::Invalid(format!(
                "{} entropy bytes, at most {MAX_ENTROPY}",
                entropy.len()
            )));
        }
        Ok(Refresh {
            unix_nanos: (unix_nanos != 0).then_some(unix_nanos),
            entropy,
        })
    }
}

/// What a refresh does to the system.
pub trait RefreshAction: Send + Sync {
    /// Applies a validated refresh.
    fn refresh(&self, r: &Refresh) -> Result<(), RefreshError>;
}

/// The guest's real clock and RNG.
#[derive(Debug, Clone, Copy, Default)]
pub struct SystemRefresh;

impl RefreshAction for SystemRefresh {
    fn refresh(&self, r: &Refresh) -> Result<(), RefreshError> {
        if let Some(nanos) = r.unix_nanos {
            sys::set_realtime_nanos(nanos).map_err(RefreshError::Clock)?;
        }
        if !r.entropy.is_empty() {
            sys::add_entropy(&r.entropy).map_err(RefreshError::Entropy)?;
            // The CRNG must use the new entropy now, not at its next scheduled reseed: until
            // then every VM restored from one template would draw the same random bytes.
            sys::reseed_crng().map_err(RefreshError::Entropy)?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    #[test]
    fn requests_are_validated() {
        assert!(Refresh::new(-1, vec![]).is_err());
        assert!(Refresh::new(1, vec![0; MAX_ENTROPY + 1]).is_err());
        let r = Refresh::new(0, vec![1; MAX_ENTROPY]).unwrap();
        assert_eq!(r.unix_nanos, None);
        assert_eq!(Refresh::new(5, vec![]).unwrap().unix_nanos, Some(5));
    }
}
