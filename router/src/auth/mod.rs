//! SCRAM-SHA-256 authentication.
