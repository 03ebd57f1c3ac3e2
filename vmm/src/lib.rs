//! VMM
